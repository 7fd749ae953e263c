//! North-south flows at the node uplinks (Cilium's `bpf/lib/nodeport.h`,
//! reduced to what kube-proxy does with netfilter): `from_netdev` DNATs
//! traffic to NodePorts, external IPs and load-balancer IPs like PREROUTING,
//! the kernel routes it, and `to_netdev` applies the source-side rewrites like
//! POSTROUTING. Keeping the kernel's routing between the two halves means no
//! packet is ever seen by the stack with a local source address arriving
//! from outside (which it would drop as martian).
//!
//! A flow from client C to frontend F with backend B is one SERVICE entry
//! (C -> F) plus links:
//!
//! | entry | key | used by | does |
//! | --- | --- | --- | --- |
//! | SERVICE | C -> F | `from_netdev` | DNAT to B; the connection's state |
//! | EGRESS | {C, B} normalised | `to_netdev` | C -> B: source to N:P (SNAT flows); B -> C: source to F |
//! | NAT_IN | B -> N:P | `from_netdev` | destination N:P -> C (SNAT flows only) |
//!
//! A backend on another node (externalTrafficPolicy Cluster) gets the flow
//! source-NATed to the node address N and a NAT port P, so that its replies
//! come back through this node. A local backend sees the client's address.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use netlb_common::{
    BackendValue, CtEntry4, CtKey4, DatapathConfig, backend_flags, ct_flags, ct_kind,
    ct_link_owner, proto, scope, stat, svc_flags,
};

use crate::{
    conntrack::{self, Followed, tuple},
    lb::Frontend,
    maps, nat,
    parse::Packet,
    verdict::Reason,
};

/// Reservation attempts before giving up on a new flow. Bounded and
/// constant so the verifier sees a finite loop.
const NAT_PORT_ATTEMPTS: u32 = 16;

/// Writes the connection entry of a new north-south flow and its links
/// (see the module table), links first; returns the connection.
#[inline(always)]
pub fn create_flow(
    pkt: &Packet,
    conn_key: &CtKey4,
    fe: &Frontend,
    id: u32,
    backend: &BackendValue,
    cfg: &DatapathConfig,
    now: u32,
) -> Result<CtEntry4, Reason> {
    let mut conn = CtEntry4 {
        target_addr: backend.address_be,
        target_port_be: backend.port_be,
        frontend_addr: pkt.daddr_be,
        frontend_port_be: pkt.dport_be,
        flags: ct_flags::NORTH_SOUTH,
        backend_id: id,
        rev_nat_index: fe.value.rev_nat_index,
        lifetime_s: now
            .wrapping_add(cfg.timeout_s(pkt.proto, netlb_common::CtState::of(pkt.proto, 0))),
        created_s: now,
        win: conntrack::client_side(pkt),
        ..Default::default()
    };
    let snat = backend.flags & backend_flags::LOCAL == 0 && cfg.snat_addr_be != 0;
    if snat {
        conn.flags |= ct_flags::SNAT;
        conn.nat_addr = cfg.snat_addr_be;
        conn.nat_port_be = reserve_port(pkt, conn_key, &conn, cfg, now)?;
    }
    let egress_key = conntrack::link_key(conn_key, &conn, ct_kind::EGRESS);
    // The key is normalised: note which end is the client.
    let client_is_saddr = egress_key.saddr == pkt.saddr_be && egress_key.sport_be == pkt.sport_be;
    let egress = conntrack::link_value(
        &conn,
        (conn.flags & ct_flags::SNAT)
            | if client_is_saddr {
                ct_flags::CLIENT_IS_SADDR
            } else {
                0
            },
        now,
    );
    if let Err(e) = conntrack::create(conn_key, &conn, &[(egress_key, egress)]) {
        if snat {
            conntrack::remove(&conntrack::link_key(conn_key, &conn, ct_kind::NAT_IN));
        }
        return Err(e);
    }
    if snat {
        maps::count(stat::SNAT_FLOW);
    }
    Ok(conn)
}

/// Reserves a NAT port for the new connection `conn` by inserting its NAT_IN
/// link with `BPF_NOEXIST` (atomic across CPUs): the client's own port when
/// it is in the NAT range, else random ones. A taken port is reclaimed when
/// it belongs to this very client tuple (a replaced connection) or to a
/// connection that is gone or expired: ports are free again as soon as their
/// connection's close timeout has passed, without waiting for the agent's
/// garbage collector. Returns the port (network byte order).
#[inline(always)]
fn reserve_port(
    pkt: &Packet,
    conn_key: &CtKey4,
    conn: &CtEntry4,
    cfg: &DatapathConfig,
    now: u32,
) -> Result<u16, Reason> {
    let (min, max) = (cfg.nat_port_min as u32, cfg.nat_port_max as u32);
    if min == 0 || max < min {
        return Err(Reason::NatPorts);
    }
    let value = CtEntry4 {
        // A NAT_IN link restores the client as destination.
        target_addr: pkt.saddr_be,
        target_port_be: pkt.sport_be,
        ..conntrack::link_value(conn, 0, now)
    };
    let client_port = u16::from_be(pkt.sport_be) as u32;
    let mut port = if client_port >= min && client_port <= max {
        client_port
    } else {
        random_port(min, max)
    };
    for _ in 0..NAT_PORT_ATTEMPTS {
        // `port` is within min..=max, both u16, so it fits.
        let port_be = (port as u16).to_be();
        let key = tuple(
            conn.target_addr,
            conn.target_port_be,
            cfg.snat_addr_be,
            port_be,
            pkt.proto,
            ct_kind::NAT_IN,
        );
        if conntrack::put_new(&key, &value) {
            return Ok(port_be);
        }
        if reclaimable(&key, conn_key, now) {
            conntrack::put(&key, &value)?;
            return Ok(port_be);
        }
        port = random_port(min, max);
    }
    Err(Reason::NatPorts)
}

/// Whether the NAT_IN entry `key` may be taken over by `conn_key`: it is
/// that connection's own (a reconnecting client tuple), or its owner is gone,
/// expired, or has another NAT port now.
#[inline(always)]
fn reclaimable(key: &CtKey4, conn_key: &CtKey4, now: u32) -> bool {
    // SAFETY: values are copied out at once.
    let Some(existing) = (unsafe { maps::CONNTRACK.get(key) }).copied() else {
        return true;
    };
    let owner = ct_link_owner(key, &existing);
    if owner == *conn_key {
        return true;
    }
    match unsafe { maps::CONNTRACK.get(owner) }.copied() {
        Some(c) => {
            !conntrack::alive(&c, now) || conntrack::link_key(&owner, &c, ct_kind::NAT_IN) != *key
        }
        None => true,
    }
}

#[inline(always)]
fn random_port(min: u32, max: u32) -> u32 {
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    // `checked_rem`, not `%`: the compiler cannot see that the span is never
    // zero, and a panic path would leave the program without a final exit
    // (the verifier's "last insn is not an exit or jmp").
    min + r
        .checked_rem(max.wrapping_sub(min).wrapping_add(1))
        .unwrap_or(0)
}

/// `from_netdev`: a reply to a source-NATed flow gets its client back as
/// destination. Returns whether the packet was one.
#[inline(always)]
pub fn restore_reply(ctx: &TcContext, pkt: &Packet, cfg: &DatapathConfig) -> Result<bool, Reason> {
    let key = conntrack::key(pkt, ct_kind::NAT_IN);
    let link = match conntrack::follow(&key, pkt, cfg, |_| true) {
        Followed::Translate(link) => link,
        Followed::Pass => return Ok(false),
        Followed::OutOfWindow => return Err(Reason::CtOutOfWindow),
    };
    nat::dnat(ctx, pkt, link.target_addr, link.target_port_be)?;
    maps::count(stat::SNAT_REVERSE);
    Ok(true)
}

/// `to_netdev`: source rewrites of tracked north-south flows leaving the
/// node: SNAT towards remote backends, the frontend as source of replies to
/// clients. Untracked UDP from a NodePort-range port of a node address that
/// is a UDP node port is recorded as a host flow (see `ct_kind::HOST`).
#[inline(always)]
pub fn egress(ctx: &TcContext, pkt: &Packet, cfg: &DatapathConfig) -> Result<(), Reason> {
    let mut key = conntrack::key(pkt, ct_kind::EGRESS);
    let swapped = netlb_common::ct_normalize(&mut key);
    // The packet travels client -> backend when the client end is its source.
    let from_client = |link: &CtEntry4| (link.flags & ct_flags::CLIENT_IS_SADDR != 0) != swapped;
    let link = match conntrack::follow(&key, pkt, cfg, |l| !from_client(l)) {
        Followed::Translate(link) => link,
        Followed::Pass => {
            if pkt.proto == proto::UDP {
                record_host_flow(pkt, cfg);
            }
            return Ok(());
        }
        Followed::OutOfWindow => return Err(Reason::CtOutOfWindow),
    };
    if from_client(&link) {
        if link.flags & ct_flags::SNAT != 0 {
            nat::snat(ctx, pkt, link.nat_addr, link.nat_port_be)?;
        }
        Ok(())
    } else {
        nat::snat_to_frontend(ctx, pkt, &link)
    }
}

/// Records (or refreshes) a HOST entry for an outgoing UDP datagram of the
/// node whose source is a UDP node port: its replies would otherwise look
/// like new connections to that node port.
#[inline(always)]
fn record_host_flow(pkt: &Packet, cfg: &DatapathConfig) {
    let sport = u16::from_be(pkt.sport_be);
    if sport < cfg.nodeport_min || sport > cfg.nodeport_max {
        return;
    }
    let frontend = netlb_common::ServiceKey {
        address_be: pkt.saddr_be,
        port_be: pkt.sport_be,
        backend_slot: 0,
        proto: pkt.proto,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    match unsafe { maps::SERVICES.get(frontend) } {
        Some(v) if v.flags & svc_flags::NODE_PORT != 0 => {}
        _ => return,
    }
    let key = tuple(
        pkt.daddr_be,
        pkt.dport_be,
        pkt.saddr_be,
        pkt.sport_be,
        pkt.proto,
        ct_kind::HOST,
    );
    let now = conntrack::now_s();
    let lifetime = now.wrapping_add(cfg.timeout_other_s);
    if let Some(entry) = maps::CONNTRACK.get_ptr_mut(key) {
        // SAFETY: pointer to a live map value; a plain store of a lifetime.
        unsafe {
            if lifetime > (*entry).lifetime_s {
                (*entry).lifetime_s = lifetime;
            }
        }
        return;
    }
    let _ = conntrack::put(
        &key,
        &CtEntry4 {
            lifetime_s: lifetime,
            created_s: now,
            ..Default::default()
        },
    );
}

/// `from_netdev`: whether a UDP datagram to a node port is the reply of a
/// recorded host flow.
#[inline(always)]
pub fn is_host_reply(pkt: &Packet) -> bool {
    let key = conntrack::key(pkt, ct_kind::HOST);
    // SAFETY: the value is copied out at once.
    match unsafe { maps::CONNTRACK.get(key) } {
        Some(entry) => conntrack::now_s() <= entry.lifetime_s,
        None => false,
    }
}
