//! Frontend lookup and backend selection (Cilium's `lb4_lookup_service` and
//! `lb4_select_backend_id`, random-by-hash flavour).

use netlb_common::{BackendValue, ServiceKey, ServiceValue, scope, svc_flags};

use crate::{maps, parse::Packet, verdict::Reason};

/// A frontend found for a packet: its key (with slot 0) and slot-0 value.
pub struct Frontend {
    pub key: ServiceKey,
    pub value: ServiceValue,
}

/// Looks up the frontend for the packet's destination. `from_pod`: the
/// in-cluster view, which follows the scope-INTERNAL entry when the frontend
/// has one (externalTrafficPolicy Local splits the two views).
#[inline(always)]
pub fn lookup_frontend(pkt: &Packet, from_pod: bool) -> Option<Frontend> {
    let mut key = ServiceKey {
        address_be: pkt.daddr_be,
        port_be: pkt.dport_be,
        backend_slot: 0,
        proto: pkt.proto,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    // SAFETY: the value is copied out immediately.
    let value = *unsafe { maps::SERVICES.get(key) }?;
    if from_pod && value.flags & svc_flags::TWO_SCOPES != 0 {
        key.scope = scope::INTERNAL;
        // SAFETY: as above.
        let internal = *unsafe { maps::SERVICES.get(key) }?;
        return Some(Frontend {
            key,
            value: internal,
        });
    }
    Some(Frontend { key, value })
}

/// A 32-bit hash of the flow's 5-tuple (murmur3's finaliser over a mix of
/// the fields). Deterministic, so `BPF_PROG_TEST_RUN` results are repeatable
/// and every packet of a flow that lost its conntrack entry still maps to the
/// same slot while the backend set is unchanged.
#[inline(always)]
pub fn flow_hash(pkt: &Packet) -> u32 {
    let ports = ((pkt.sport_be as u32) << 16) | pkt.dport_be as u32;
    let mut h = pkt.saddr_be.wrapping_mul(0x9e37_79b1)
        ^ pkt.daddr_be.rotate_left(13)
        ^ ports.wrapping_mul(0x85eb_ca77)
        ^ pkt.proto as u32;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// Picks a backend slot from the flow hash and resolves it to a backend.
/// The caller guarantees `fe.value.count > 0`.
#[inline(always)]
pub fn select_backend(fe: &Frontend, hash: u32) -> Result<(u32, BackendValue), Reason> {
    let count = fe.value.count as u32;
    if count == 0 {
        return Err(Reason::NoBackendEntry);
    }
    let mut slot_key = fe.key;
    // `count` fits u16 (checked by the agent), so the slot does too.
    slot_key.backend_slot = (hash % count + 1) as u16;
    // SAFETY: values are copied out immediately.
    let slot = unsafe { maps::SERVICES.get(slot_key) }.ok_or(Reason::NoBackendEntry)?;
    let id = slot.backend_id;
    let backend = *unsafe { maps::BACKENDS.get(id) }.ok_or(Reason::NoBackendEntry)?;
    Ok((id, backend))
}

/// The backend by id, if it still exists.
#[inline(always)]
pub fn backend(id: u32) -> Option<BackendValue> {
    // SAFETY: the value is copied out immediately.
    unsafe { maps::BACKENDS.get(id) }.copied()
}
