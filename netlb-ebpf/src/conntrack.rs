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

#[inline(always)]
pub fn key(pkt: &Packet, direction: u8) -> ConntrackKey {
    ConntrackKey {
        saddr_be: pkt.saddr_be,
        daddr_be: pkt.daddr_be,
        sport_be: pkt.sport_be,
        dport_be: pkt.dport_be,
        proto: pkt.proto,
        direction,
        pad: [0; 2],
    }
}

/// Looks up an entry and refreshes its `last_seen_ns`.
#[inline(always)]
pub fn lookup(key: &ConntrackKey) -> Option<ConntrackValue> {
    let entry = maps::CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer to a live map value; the field update is a plain store
    // (a racing writer on another CPU can only store a similar timestamp).
    unsafe {
        let now = bpf_ktime_get_ns();
        if now.wrapping_sub((*entry).last_seen_ns) > LAST_SEEN_GRANULARITY_NS {
            (*entry).last_seen_ns = now;
        }
        Some(*entry)
    }
}

/// Looks up the entry `key` for `pkt` with TCP close tracking: FIN or RST
/// marks the entry [`ct_flags::CLOSING`]; a SYN that finds a closing entry
/// belongs to a new connection reusing the tuple, so the stale entry is
/// removed and not applied (`None`).
#[inline(always)]
pub fn lookup_flow(key: &ConntrackKey, pkt: &Packet) -> Option<ConntrackValue> {
    let entry = maps::CONNTRACK.get_ptr_mut(key)?;
    // SAFETY: pointer to a live map value; flag and timestamp updates are
    // plain stores (a racing CPU can only store the same flag or a similar
    // time).
    unsafe {
        if pkt.tcp_flags & TCP_SYN != 0 && (*entry).flags & ct_flags::CLOSING != 0 {
            let _ = maps::CONNTRACK.remove(key);
            return None;
        }
        if pkt.tcp_flags & (TCP_FIN | TCP_RST) != 0 {
            (*entry).flags |= ct_flags::CLOSING;
        }
    }
    lookup(key)
}

/// Creates both entries of a new flow. The REPLY entry is written first so
/// that no reply can arrive before its reverse translation exists.
/// `reply_daddr_be`: where the backend sends replies (the client, or the
/// service loopback address for a hairpin flow).
#[inline(always)]
pub fn create(
    pkt: &Packet,
    backend_id: u32,
    backend_addr_be: u32,
    backend_port_be: u16,
    rev_nat_index: u32,
    hairpin_source_be: Option<u32>,
) -> Result<(), Reason> {
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let (reply_daddr_be, flags, nat_addr_be) = match hairpin_source_be {
        Some(lo) => (lo, ct_flags::HAIRPIN, pkt.saddr_be),
        None => (pkt.saddr_be, 0, 0),
    };
    let reply_key = ConntrackKey {
        saddr_be: backend_addr_be,
        daddr_be: reply_daddr_be,
        sport_be: backend_port_be,
        dport_be: pkt.sport_be,
        proto: pkt.proto,
        direction: ct_dir::REPLY,
        pad: [0; 2],
    };
    let value = ConntrackValue {
        backend_id,
        rev_nat_index,
        nat_addr_be,
        flags,
        nat_port_be: 0,
        last_seen_ns: now,
    };
    maps::CONNTRACK
        .insert(reply_key, value, 0)
        .map_err(|_| Reason::CtWrite)?;
    let service_value = ConntrackValue {
        nat_addr_be: 0,
        ..value
    };
    maps::CONNTRACK
        .insert(key(pkt, ct_dir::SERVICE), service_value, 0)
        .map_err(|_| Reason::CtWrite)
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
