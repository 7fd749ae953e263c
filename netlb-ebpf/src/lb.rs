//! Frontend lookup and backend selection (Cilium's `lb4_lookup_service` and
//! `lb4_select_backend_id`, random-by-hash flavour).

use aya_ebpf::{maps::lpm_trie::Key, programs::TcContext};
use netlb_common::{
    AffinityFrontend, AffinityKey, AffinityMatchKey, AffinityValue, BackendValue, ServiceKey,
    ServiceValue, SourceRangeKey, scope, svc_flags,
};

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
/// the fields). Deterministic, so `BPF_PROG_TEST_RUN` results are repeatable.
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

/// Picks the backend of a new connection from `client_be`: with session
/// affinity, the client's previous backend if it is still the frontend's
/// and the previous new connection was less than the timeout ago
/// (kube-proxy's `recent` match: every new connection renews it); else a
/// slot from the flow hash.
#[inline(always)]
pub fn select_backend(
    fe: &Frontend,
    pkt: &Packet,
    client_be: u32,
) -> Result<(u32, BackendValue), Reason> {
    if fe.value.flags & svc_flags::AFFINITY == 0 {
        return select_by_hash(fe, pkt);
    }
    let frontend = AffinityFrontend {
        rev_nat_index: fe.value.rev_nat_index,
        proto: fe.key.proto,
        scope: fe.key.scope,
        pad: [0; 2],
    };
    let key = AffinityKey {
        client_be,
        frontend,
    };
    let now = conntrack::now_s();
    // Slot 0's backend_id holds the timeout on affinity frontends.
    let timeout = fe.value.backend_id;
    // SAFETY: values are copied out immediately.
    if let Some(last) = unsafe { maps::AFFINITY.get(key) }.copied()
        && now.wrapping_sub(last.last_s) <= timeout
        && maps::AFFINITY_MATCH
            .get_ptr(AffinityMatchKey {
                backend_id: last.backend_id,
                frontend,
            })
            .is_some()
        && let Some(backend) = unsafe { maps::BACKENDS.get(last.backend_id) }.copied()
    {
        remember(&key, last.backend_id, now);
        return Ok((last.backend_id, backend));
    }
    let (id, backend) = select_by_hash(fe, pkt)?;
    remember(&key, id, now);
    Ok((id, backend))
}

#[inline(always)]
fn remember(key: &AffinityKey, backend_id: u32, now: u32) {
    // Best effort: a failed insert only loses stickiness.
    let _ = maps::AFFINITY.insert(
        key,
        AffinityValue {
            backend_id,
            last_s: now,
        },
        0,
    );
}

/// Picks a backend slot from the flow hash and resolves it to a backend.
#[inline(always)]
fn select_by_hash(fe: &Frontend, pkt: &Packet) -> Result<(u32, BackendValue), Reason> {
    slot_backend(fe, flow_hash(pkt))
}

/// The backend of the slot after the flow hash's (for a new connection
/// whose first choice collides, see `conntrack::link_taken`); none with a
/// single slot.
#[inline(always)]
pub fn next_backend(fe: &Frontend, pkt: &Packet) -> Result<(u32, BackendValue), Reason> {
    if fe.value.count < 2 {
        return Err(Reason::TupleCollision);
    }
    slot_backend(fe, flow_hash(pkt).wrapping_add(1))
}

/// The backend of slot `hash % count + 1`.
#[inline(always)]
fn slot_backend(fe: &Frontend, hash: u32) -> Result<(u32, BackendValue), Reason> {
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

/// Whether a new connection from `saddr_be` may use the frontend: always,
/// unless it has loadBalancerSourceRanges, and then only from a source in
/// one of them (kube-proxy's firewall chain, which checks new connections).
#[inline(always)]
pub fn source_allowed(fe: &Frontend, saddr_be: u32) -> bool {
    if fe.value.flags & svc_flags::SOURCE_RANGES == 0 {
        return true;
    }
    let key = Key::new(
        SourceRangeKey::FRONTEND_BITS + 32,
        SourceRangeKey {
            // The trie compares bytes: the index goes in big-endian, as
            // the agent writes it.
            rev_nat_index_be: fe.value.rev_nat_index.to_be(),
            proto: fe.key.proto,
            scope: fe.key.scope,
            pad: [0; 2],
            address_be: saddr_be,
        },
    );
    maps::SOURCE_RANGES.get(key).is_some()
}

/// What a new connection to an address without a frontend for its port
/// and protocol meets (kube-proxy nftables' cluster-IP checks).
pub enum NoFrontend {
    /// Not a Service address: none of netlb's business.
    Pass,
    /// A cluster IP, on a port its Service does not define: REJECT.
    Reject,
    /// An address of the Service CIDRs that is no cluster IP: DROP.
    Drop,
}

/// Classifies a new connection to `daddr_be` that found no frontend (the
/// callers check only connection openers: a cost on new flows, not on
/// every packet). With Service CIDRs configured, only addresses inside
/// them look further.
#[inline(always)]
pub fn no_frontend(daddr_be: u32, cfg: &netlb_common::DatapathConfig) -> NoFrontend {
    let cidrs = cfg.flags & netlb_common::config_flags::SERVICE_CIDRS != 0;
    // The trie compares the address's bytes in wire order.
    if cidrs && maps::SERVICE_CIDRS.get(Key::new(32, daddr_be)).is_none() {
        return NoFrontend::Pass;
    }
    if maps::CLUSTER_IPS.get_ptr(daddr_be).is_some() {
        return NoFrontend::Reject;
    }
    if cidrs {
        NoFrontend::Drop
    } else {
        NoFrontend::Pass
    }
}

/// A new connection to a frontend without usable backends: kube-proxy's
/// DROP (a Local policy without local endpoints) or REJECT (ICMP port
/// unreachable). Only new connections get here: established ones keep their
/// backend (kube-proxy applies both rules to `ct state new` only).
#[inline(always)]
pub fn no_backends(ctx: &TcContext, pkt: &Packet, fe: &Frontend) -> Result<i32, Reason> {
    if fe.value.flags & svc_flags::DROP != 0 {
        return Err(Reason::NoLocalEndpoints);
    }
    reject::port_unreachable(ctx, pkt)
}
