//! Frontend lookup and backend selection (Cilium's `lb4_lookup_service` and
//! `lb4_select_backend_id`, random-by-hash flavour).

use aya_ebpf::programs::TcContext;
use netlb_common::{BackendValue, ServiceKey, ServiceValue, ct_dir, scope, stat, svc_flags};

use crate::{conntrack, maps, parse::Packet, reject, verdict::Reason};

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

/// The backend chosen for a packet.
pub struct Selected {
    pub id: u32,
    pub backend: BackendValue,
    /// No (usable) conntrack entry existed: the caller creates the flow.
    pub new_flow: bool,
}

/// What to do with a packet to a frontend.
pub enum Choice {
    /// Already answered (ICMP reject): return this verdict.
    Verdict(i32),
    Backend(Selected),
}

/// The frontend stage shared by both ingress programs: reject or drop when
/// there are no backends, follow the flow's conntrack entry when its
/// backend still exists, select a backend otherwise.
#[inline(always)]
pub fn choose(ctx: &TcContext, pkt: &Packet, fe: &Frontend) -> Result<Choice, Reason> {
    if fe.value.count == 0 {
        if fe.value.flags & svc_flags::DROP != 0 {
            return Err(Reason::NoLocalEndpoints);
        }
        return Ok(Choice::Verdict(reject::port_unreachable(ctx, pkt)?));
    }
    if let Some(entry) = conntrack::lookup_flow(&conntrack::key(pkt, ct_dir::SERVICE), pkt) {
        match backend(entry.backend_id) {
            Some(backend) => {
                return Ok(Choice::Backend(Selected {
                    id: entry.backend_id,
                    backend,
                    new_flow: false,
                }));
            }
            // The backend was removed: pick a new one, as Cilium does for
            // stale entries.
            None => maps::count(stat::CT_RESELECT),
        }
    }
    let (id, backend) = select_backend(fe, flow_hash(pkt))?;
    Ok(Choice::Backend(Selected {
        id,
        backend,
        new_flow: true,
    }))
}
