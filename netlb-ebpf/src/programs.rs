//! Program entry points. Each entry point only maps its `try_` function's
//! result; verdicts for errors come from [`crate::verdict`].

use aya_ebpf::{
    macros::{cgroup_sock_addr, classifier},
    programs::{SockAddrContext, TcContext},
};
use netlb_common::{
    CtEntry4, CtKey4, CtState, DatapathConfig, config_flags, ct_flags, ct_kind, proto, stat,
    svc_flags,
};

use crate::{
    conntrack::{self, Followed, Found},
    icmp,
    lb::{self, Frontend},
    maps, nat, nodeport,
    parse::{self, Packet, Parsed},
    reject, sock,
    verdict::{NEXT, Reason},
};

#[classifier]
pub fn from_pod(ctx: TcContext) -> i32 {
    match try_from_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v.into(),
    }
}

#[classifier]
pub fn to_pod(ctx: TcContext) -> i32 {
    match try_to_pod(&ctx) {
        Ok(v) => v,
        Err(v) => v.into(),
    }
}

#[classifier]
pub fn from_netdev(ctx: TcContext) -> i32 {
    match try_from_netdev(&ctx) {
        Ok(v) => v,
        Err(v) => v.into(),
    }
}

#[classifier]
pub fn to_netdev(ctx: TcContext) -> i32 {
    match try_to_netdev(&ctx) {
        Ok(v) => v,
        Err(v) => v.into(),
    }
}

#[cgroup_sock_addr(connect4)]
pub fn sock_connect4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_backend(&ctx)
}

#[cgroup_sock_addr(recvmsg4)]
pub fn sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock::to_frontend(&ctx)
}

/// Source validation on pod interfaces (Cilium checks a pod's source
/// address the same way): a packet that opens, closes or reopens a Service
/// connection must come from the interface its source address lives behind,
/// so that no pod can forge another pod's tuple (a RST, then a SYN) and move
/// its connections. Addresses the agent has not registered (a pod whose
/// route it has not seen yet, a bridged CNI without per-pod routes) pass.
#[inline(always)]
fn validate_source(ctx: &TcContext, pkt: &Packet, cfg: &DatapathConfig) -> Result<(), Reason> {
    if cfg.flags & config_flags::VALIDATE_SOURCE == 0 {
        return Ok(());
    }
    // SAFETY: the value is copied out at once.
    let Some(ifindex) = (unsafe { maps::POD_SOURCES.get(pkt.saddr_be) }).copied() else {
        return Ok(());
    };
    // SAFETY: reading the context's ifindex (the receiving interface at
    // ingress).
    if ifindex != unsafe { (*ctx.skb.skb).ifindex } {
        return Err(Reason::SpoofedSource);
    }
    Ok(())
}

/// What a packet to a frontend does, once conntrack has been asked.
enum Flow {
    /// A packet of a live connection: DNAT to its backend.
    Existing(CtEntry4),
    /// A new connection, written: DNAT to its backend.
    New(CtEntry4),
}

/// The part shared by both ingress programs: follow the packet's live
/// connection; otherwise (nothing tracked, or an entry that must be
/// replaced) open a new one if the packet may, with the new-connection-only
/// rules (reject, drop, source validation) first. `not_new`: the verdict for
/// a packet that can neither use nor open a connection. `link_kind`: the
/// link (REPLY or EGRESS) that holds the backend's side of the tuple on
/// this path. `create` writes the
/// new connection's entries for backend `(id, backend)` and returns its
/// SERVICE value.
#[inline(always)]
fn to_frontend(
    ctx: &TcContext,
    pkt: &Packet,
    fe: &Frontend,
    cfg: &DatapathConfig,
    not_new: impl FnOnce() -> Result<i32, Reason>,
    link_kind: u8,
    create: impl FnOnce(&CtKey4, u32, &netlb_common::BackendValue, u32) -> Result<CtEntry4, Reason>,
) -> Result<Result<Flow, i32>, Reason> {
    let conn_key = conntrack::key(pkt, ct_kind::SERVICE);
    // Verifier workaround: a flag and a zeroed entry instead of an
    // `Option<CtEntry4>`, whose `None` leaves the payload undefined; a copy
    // of undefined bytes may be read from a register a helper call
    // clobbered, which the verifier rejects (`R3 !read_ok`).
    let north_south = link_kind == ct_kind::EGRESS;
    let (stale, old) =
        match conntrack::find(&conn_key, pkt, fe.value.rev_nat_index, cfg, north_south) {
            Found::Live(conn) => return Ok(Ok(Flow::Existing(conn))),
            Found::Stale(old) => (true, old),
            Found::Missing => (false, CtEntry4::default()),
            Found::OutOfWindow => return Err(Reason::CtOutOfWindow),
            Found::WrongSide => return Err(Reason::CtWrongSide),
        };
    if !conntrack::can_open(pkt) {
        return not_new().map(Err);
    }
    // Before REJECT: kube-proxy's firewall chain comes first, so a source
    // outside the ranges is dropped whether or not there are endpoints.
    if !lb::source_allowed(fe, pkt.saddr_be) {
        return Err(Reason::SourceRange);
    }
    if fe.value.count == 0 {
        return lb::no_backends(ctx, pkt, fe).map(Err);
    }
    if stale {
        let reopen = CtState::of(pkt.proto, old.flags) == CtState::Closing;
        maps::count(if reopen {
            stat::CT_REOPEN
        } else {
            stat::CT_RESELECT
        });
        conntrack::delete_links(&conn_key, &old);
    }
    let (id, backend) = lb::select_backend(fe, pkt, pkt.saddr_be)?;
    let now = conntrack::now_s();
    // The client may already have a live connection to that backend from
    // this source port, through another frontend: the two would share a
    // reply tuple (see `conntrack::tuple_taken`). Then the next slot, once;
    // if that collides too, the SYN is dropped (counted) and the client
    // retransmits. The check comes before `create`, which keeps a single
    // call site (two would leave the closure out of line, and a BPF call
    // cannot take its six arguments).
    let (mut id, mut backend) = (id, backend);
    if conntrack::tuple_taken(&conn_key, backend.address_be, backend.port_be, link_kind) {
        (id, backend) = lb::next_backend(fe, pkt)?;
        if conntrack::tuple_taken(&conn_key, backend.address_be, backend.port_be, link_kind) {
            return Err(Reason::TupleCollision);
        }
        maps::count(stat::CT_TUPLE_AVOIDED);
    }
    let conn = create(&conn_key, id, &backend, now)?;
    maps::count(stat::NEW_FLOW);
    Ok(Ok(Flow::New(conn)))
}

/// A backend answering a hairpinned flow: translated back here, since the
/// reply is addressed to the client's own pod, and sent straight back (see
/// `nat::bounce`).
#[inline(always)]
fn hairpin_reply(ctx: &TcContext, pkt: &Packet, cfg: &DatapathConfig) -> Result<i32, Reason> {
    let key = conntrack::key(pkt, ct_kind::REPLY);
    match conntrack::follow(&key, pkt, cfg, |_| true) {
        Followed::Translate(link) => {
            nat::snat_to_frontend(ctx, pkt, &link)?;
            nat::dnat_addr(ctx, pkt, pkt.saddr_be)?;
            nat::bounce(ctx)
        }
        Followed::Pass => Ok(NEXT),
        Followed::OutOfWindow => Err(Reason::CtOutOfWindow),
    }
}

/// A pod's packet to no frontend: a cluster IP's undefined port is
/// rejected, an unallocated Service address dropped (new connections
/// only), anything else handed on.
#[inline(always)]
fn pod_without_frontend(
    ctx: &TcContext,
    pkt: &Packet,
    cfg: &DatapathConfig,
) -> Result<i32, Reason> {
    if !conntrack::can_open(pkt) {
        return Ok(NEXT);
    }
    match lb::no_frontend(pkt.daddr_be, cfg) {
        lb::NoFrontend::Pass => Ok(NEXT),
        lb::NoFrontend::Reject => reject::port_unreachable(ctx, pkt),
        lb::NoFrontend::Drop => Err(Reason::UnallocatedServiceIp),
    }
}

#[inline(always)]
fn try_from_pod(ctx: &TcContext) -> Result<i32, Reason> {
    let pkt = match parse::parse(ctx)? {
        Some(Parsed::L4(pkt)) => pkt,
        Some(Parsed::IcmpError(e)) => {
            icmp::from_pod(ctx, &e)?;
            return Ok(NEXT);
        }
        None => return Ok(NEXT),
    };
    let cfg = maps::config();
    let loopback_be = cfg.service_loopback_be;
    if loopback_be != 0 && pkt.daddr_be == loopback_be {
        return hairpin_reply(ctx, &pkt, &cfg);
    }
    let Some(fe) = lb::lookup_frontend(&pkt, true) else {
        return pod_without_frontend(ctx, &pkt, &cfg);
    };
    // Only packets that change a connection's state are validated; a data
    // packet with a forged source can only join the connection it names.
    if conntrack::is_control(&pkt) || pkt.proto != proto::TCP {
        validate_source(ctx, &pkt, &cfg)?;
    }
    let flow = to_frontend(
        ctx,
        &pkt,
        &fe,
        &cfg,
        || Err(Reason::CtInvalid),
        ct_kind::REPLY,
        |conn_key, id, backend, now| {
            // Hairpin: the client is its own backend. Without SNAT the
            // backend would answer itself directly and the client socket
            // would see a pod address.
            let hairpin = loopback_be != 0 && backend.address_be == pkt.saddr_be;
            let conn = CtEntry4 {
                target_addr: backend.address_be,
                target_port_be: backend.port_be,
                nat_addr: if hairpin { loopback_be } else { 0 },
                frontend_addr: pkt.daddr_be,
                frontend_port_be: pkt.dport_be,
                flags: if hairpin { ct_flags::HAIRPIN } else { 0 },
                backend_id: id,
                rev_nat_index: fe.value.rev_nat_index,
                lifetime_s: now.wrapping_add(cfg.timeout_s(pkt.proto, CtState::of(pkt.proto, 0))),
                created_s: now,
                win: conntrack::client_side(&pkt),
                ..Default::default()
            };
            let reply = conntrack::link_key(conn_key, &conn, ct_kind::REPLY);
            conntrack::create(
                conn_key,
                &conn,
                &[(reply, conntrack::link_value(&conn, conn.flags, now))],
            )?;
            Ok(conn)
        },
    )?;
    let (conn, new_flow) = match flow {
        Ok(Flow::Existing(conn)) => (conn, false),
        Ok(Flow::New(conn)) => (conn, true),
        Err(verdict) => return Ok(verdict),
    };
    nat::dnat(ctx, &pkt, conn.target_addr, conn.target_port_be)?;
    if conn.flags & ct_flags::HAIRPIN != 0 {
        nat::snat_addr(ctx, &pkt, conn.nat_addr)?;
        if new_flow {
            maps::count(stat::HAIRPIN);
        }
    }
    maps::count(stat::FORWARD_NAT);
    if new_flow {
        maps::count_backend_flow(conn.backend_id);
    }
    Ok(NEXT)
}

#[inline(always)]
fn try_to_pod(ctx: &TcContext) -> Result<i32, Reason> {
    let pkt = match parse::parse(ctx)? {
        Some(Parsed::L4(pkt)) => pkt,
        Some(Parsed::IcmpError(e)) => {
            icmp::to_pod(ctx, &e)?;
            return Ok(NEXT);
        }
        None => return Ok(NEXT),
    };
    let key = conntrack::key(&pkt, ct_kind::REPLY);
    let cfg = maps::config();
    match conntrack::follow(&key, &pkt, &cfg, |_| true) {
        Followed::Translate(link) => nat::snat_to_frontend(ctx, &pkt, &link)?,
        Followed::Pass => {}
        Followed::OutOfWindow => return Err(Reason::CtOutOfWindow),
    }
    Ok(NEXT)
}

#[inline(always)]
fn try_from_netdev(ctx: &TcContext) -> Result<i32, Reason> {
    let cfg = maps::config();
    let pkt = match parse::parse(ctx)? {
        Some(Parsed::L4(pkt)) => pkt,
        Some(Parsed::IcmpError(e)) => {
            icmp::from_netdev(ctx, &e, cfg.snat_addr_be)?;
            return Ok(NEXT);
        }
        None => return Ok(NEXT),
    };
    // Only packets to the node's SNAT address can be replies of source-NATed
    // flows; checking the address first spares every other packet a lookup.
    if cfg.snat_addr_be != 0
        && pkt.daddr_be == cfg.snat_addr_be
        && nodeport::restore_reply(ctx, &pkt, &cfg)?
    {
        return Ok(NEXT);
    }
    // The external view, where a Local traffic policy applies; but a pod
    // of another node (a source in --cluster-cidr) gets the in-cluster
    // view, as kube-proxy's detect-local sends it to cluster-wide
    // endpoints.
    let Some(fe) = lb::lookup_frontend(&pkt, cfg.from_cluster(pkt.saddr_be)) else {
        return Ok(NEXT);
    };
    let node_port = fe.value.flags & svc_flags::NODE_PORT != 0;
    // A reply to one of the node's own UDP flows whose port is also a UDP
    // node port is not a new Service flow.
    if node_port && pkt.proto == proto::UDP && nodeport::is_host_reply(&pkt) {
        maps::count(stat::PASS_HOST_FLOW);
        return Ok(NEXT);
    }
    let flow = to_frontend(
        ctx,
        &pkt,
        &fe,
        &cfg,
        || {
            // To a node port (an address of this node), a packet that cannot
            // open a connection belongs to the node's own stack: a reply to a
            // host or masqueraded connection whose port is also a node port.
            if node_port {
                maps::count(stat::PASS_NOT_NEW);
                Ok(NEXT)
            } else {
                Err(Reason::CtInvalid)
            }
        },
        ct_kind::EGRESS,
        |conn_key, id, backend, now| {
            nodeport::create_flow(&pkt, conn_key, &fe, id, backend, &cfg, now)
        },
    )?;
    let (conn, new_flow) = match flow {
        Ok(Flow::Existing(conn)) => (conn, false),
        Ok(Flow::New(conn)) => (conn, true),
        Err(verdict) => return Ok(verdict),
    };
    nat::dnat(ctx, &pkt, conn.target_addr, conn.target_port_be)?;
    maps::count(stat::FORWARD_NAT);
    if new_flow {
        maps::count_backend_flow(conn.backend_id);
    }
    Ok(NEXT)
}

#[inline(always)]
fn try_to_netdev(ctx: &TcContext) -> Result<i32, Reason> {
    let pkt = match parse::parse(ctx)? {
        Some(Parsed::L4(pkt)) => pkt,
        Some(Parsed::IcmpError(e)) => {
            icmp::to_netdev(ctx, &e)?;
            return Ok(NEXT);
        }
        None => return Ok(NEXT),
    };
    let cfg = maps::config();
    nodeport::egress(ctx, &pkt, &cfg)?;
    Ok(NEXT)
}
