//! Connection tracking: one SERVICE entry (client's tuple, before DNAT) and
//! one REPLY entry (backend's tuple, before reverse NAT) per flow, in an LRU
//! hash so old flows age out on their own.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use netlb_common::{ConntrackKey, ConntrackValue, ct_dir, ct_flags};

use crate::{
    maps,
    parse::{Packet, TCP_FIN, TCP_RST, TCP_SYN},
    verdict::Reason,
};

/// Refresh `last_seen_ns` at most this often, so established flows do not
/// write to a shared cache line on every packet.
const LAST_SEEN_GRANULARITY_NS: u64 = 1_000_000_000;

/// The conntrack key of a packet's own tuple.
#[inline(always)]
pub fn key(pkt: &Packet, direction: u8) -> ConntrackKey {
    tuple(
        pkt.saddr_be,
        pkt.sport_be,
        pkt.daddr_be,
        pkt.dport_be,
        pkt.proto,
        direction,
    )
}

/// Refreshes a live entry's `last_seen_ns` (at most every
/// [`LAST_SEEN_GRANULARITY_NS`]) and copies it out.
///
/// # Safety
/// `entry` points to a live value of the conntrack map. The field update is
/// a plain store (a racing writer on another CPU can only store a similar
/// timestamp).
#[inline(always)]
unsafe fn refresh(entry: *mut ConntrackValue) -> ConntrackValue {
    // SAFETY: per the function's contract.
    unsafe {
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        *entry
    }
}

/// Looks up an entry and refreshes its `last_seen_ns`.
#[inline(always)]
pub fn lookup(key: &ConntrackKey) -> Option<ConntrackValue> {
    let entry = maps::CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: a live map value.
    Some(unsafe { refresh(entry) })
}

/// Looks up the entry `key` for `pkt` with TCP close tracking: FIN or RST
/// marks the entry [`ct_flags::CLOSING`]; a SYN that finds a closing entry
/// belongs to a new connection reusing the tuple, so the stale entry is
/// removed and not applied (`None`). One map lookup, as [`lookup`].
#[inline(always)]
pub fn lookup_flow(key: &ConntrackKey, pkt: &Packet) -> Option<ConntrackValue> {
    let entry = maps::CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer to a live map value; the flag update is a plain store
    // (a racing CPU can only store the same flag).
    unsafe {
        if pkt.tcp_flags & TCP_SYN != 0 && (*entry).flags & ct_flags::CLOSING != 0 {
            let _ = maps::CONNTRACK.remove(key);
            return None;
        }
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*entry).flags |= ct_flags::CLOSING;
        }
        Some(refresh(entry))
    }
}

/// Creates both entries of a new flow. The REPLY entry is written first so
/// that no reply can arrive before its reverse translation exists.
/// `hairpin_source_be`: the service loopback address when the client is its
/// own backend (the backend then replies to it, not to the client).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    backend_id: u32,
    backend_addr_be: u32,
    backend_port_be: u16,
    rev_nat_index: u32,
    hairpin_source_be: Option<u32>,
) -> Result<(), Reason> {
    let (reply_daddr_be, flags, nat_addr_be) = match hairpin_source_be {
        Some(lo) => (lo, ct_flags::HAIRPIN, pkt.saddr_be),
        None => (pkt.saddr_be, 0, 0),
    };
    let value = value(backend_id, rev_nat_index, (nat_addr_be, 0), flags);
    put(
        &tuple(
            backend_addr_be,
            backend_port_be,
            reply_daddr_be,
            pkt.sport_be,
            pkt.proto,
            ct_dir::REPLY,
        ),
        &value,
    )?;
    put(
        &key(pkt, ct_dir::SERVICE),
        &ConntrackValue {
            nat_addr_be: 0,
            ..value
        },
    )
}

/// A conntrack key from its parts.
#[inline(always)]
pub fn tuple(
    saddr_be: u32,
    sport_be: u16,
    daddr_be: u32,
    dport_be: u16,
    proto: u8,
    direction: u8,
) -> ConntrackKey {
    ConntrackKey {
        saddr_be,
        daddr_be,
        sport_be,
        dport_be,
        proto,
        direction,
        pad: [0; 2],
    }
}

/// A fresh value stamped with the current time.
#[inline(always)]
pub fn value(backend_id: u32, rev_nat_index: u32, nat: (u32, u16), flags: u16) -> ConntrackValue {
    ConntrackValue {
        backend_id,
        rev_nat_index,
        nat_addr_be: nat.0,
        flags,
        nat_port_be: nat.1,
        // SAFETY: helper without preconditions.
        last_seen_ns: unsafe { bpf_ktime_get_ns() },
    }
}

/// Inserts or replaces an entry.
#[inline(always)]
pub fn put(key: &ConntrackKey, value: &ConntrackValue) -> Result<(), Reason> {
    maps::CONNTRACK
        .insert(key, value, 0)
        .map_err(|_| Reason::CtWrite)
}

/// `BPF_NOEXIST`: insert only if the key is free.
const BPF_NOEXIST: u64 = 1;

/// Inserts an entry only if its key is free (an atomic reservation).
/// `false`: the key is taken.
#[inline(always)]
pub fn put_new(key: &ConntrackKey, value: &ConntrackValue) -> bool {
    maps::CONNTRACK.insert(key, value, BPF_NOEXIST).is_ok()
}
