//! Socket-level load balancing for the node's own processes and
//! hostNetwork pods (Cilium's socket-LB, Calico's connect-time LB): their
//! packets never cross a pod interface's TC ingress, so the translation
//! happens at the socket, before a packet exists. cgroup v2 `connect4` and
//! `sendmsg4` replace a frontend destination with a backend; `recvmsg4` and
//! `getpeername4` show the frontend again where the application reads its
//! peer. Nothing is translated per packet, and the TC programs never see
//! these flows as Service flows (their destination is a backend already),
//! so no flow is translated twice.
//!
//! Sockets of the node's network namespace (the agent's) are always
//! rewritten. Pods in the same cgroup tree keep the TC path while the agent
//! runs (it attaches their interfaces as they appear); while it is away
//! (stopped, crashed, being upgraded: its heartbeat in `CT_GC` is older
//! than `CtGc::AGENT_AWAY_S`), their sockets are rewritten too, so that a
//! pod created meanwhile, whose interface has no TC program, reaches
//! Services at once. For pod sockets the client key of session affinity is
//! the pod's network namespace (its address is not known at `connect`),
//! and a frontend with loadBalancerSourceRanges is left alone (its
//! packets go on to the load balancer, which applies them). Backends are
//! chosen with the view of traffic from inside the cluster (kube-proxy's
//! rules for locally originated traffic: internalTrafficPolicy for cluster
//! IPs, cluster-wide endpoints for node ports, external and load-balancer
//! IPs).

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie, bpf_set_retval},
    programs::SockAddrContext,
};
use netlb_common::{BackendValue, CtGc, SockRevKey, SockRevValue, proto, stat, svc_flags};

use crate::{lb, maps, parse::Packet};

/// The hook lets the call go on.
const ALLOW: i32 = 1;
/// The hook fails the call with the errno set by `bpf_set_retval`.
const DENY: i32 = 0;
const ECONNREFUSED: i32 = 111;
const ETIMEDOUT: i32 = 110;

/// Whose socket a hook rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Owner {
    /// The node's own (its network namespace is the agent's).
    Host,
    /// A pod's, while the agent is away; the namespace's cookie.
    Pod(u64),
}

/// Whether the hooks rewrite this socket, and whose it is. Off without
/// the node's namespace cookie (socket-level load balancing disabled).
#[inline(always)]
fn owner(ctx: &SockAddrContext, host_cookie: u64) -> Option<Owner> {
    if host_cookie == 0 {
        return None;
    }
    // SAFETY: helper on the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.sock_addr.cast()) };
    if netns == host_cookie {
        return Some(Owner::Host);
    }
    let agent = maps::CT_GC.get(CtGc::AGENT).copied().unwrap_or_default();
    CtGc::agent_away(&agent, crate::conntrack::now_s()).then_some(Owner::Pod(netns))
}

#[inline(always)]
fn socket_cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: helper on the program's own context.
    unsafe { bpf_get_socket_cookie(ctx.sock_addr.cast()) }
}

/// Fails the call with `errno` (what the client would have ended with),
/// counted in `stat_index`; nothing leaves for the Service address.
#[inline(always)]
fn deny(errno: i32, stat_index: u32) -> i32 {
    // SAFETY: helper without preconditions for cgroup programs.
    unsafe { bpf_set_retval(-errno) };
    maps::count(stat_index);
    DENY
}

/// Records which frontend a socket's backend stands for, so that the
/// application reads the Service address as its peer. Best effort: without
/// it the application sees the backend.
#[inline(always)]
fn remember_frontend(
    cookie: u64,
    backend: &BackendValue,
    protocol: u8,
    frontend_addr: u32,
    frontend_port_be: u16,
    rev_nat_index: u32,
) {
    let key = SockRevKey {
        cookie,
        backend_addr: backend.address_be,
        backend_port_be: backend.port_be,
        proto: protocol,
        pad: 0,
    };
    let value = SockRevValue {
        frontend_addr,
        frontend_port_be,
        pad: 0,
        rev_nat_index,
    };
    let _ = maps::SOCK_REV.insert(key, value, 0);
}

/// `connect4` and `sendmsg4`: a frontend destination becomes a backend.
#[inline(always)]
pub fn to_backend(ctx: &SockAddrContext) -> i32 {
    let cfg = maps::config();
    let Some(owner) = owner(ctx, cfg.host_netns_cookie) else {
        return ALLOW;
    };
    let sa = ctx.sock_addr;
    // SAFETY: reads of the context's fields. `user_ip4` holds the address
    // and the low 16 bits of `user_port` the port, both in network byte
    // order, as the application passed them.
    let (daddr, dport_be, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let protocol = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return ALLOW,
    };
    let cookie = socket_cookie(ctx);
    // The socket cookie stands in for the source in the hash: a socket
    // keeps its backend while the backend set does not change (an
    // unconnected UDP socket sending to one VIP, say).
    let pkt = Packet::tuple(
        cookie as u32,
        (cookie >> 32) as u16,
        daddr,
        dport_be,
        protocol,
    );
    let Some(fe) = lb::lookup_frontend(&pkt, true) else {
        // A cluster IP's undefined port: refused; an unallocated Service
        // address: as a dropped SYN would end, at once.
        return match lb::no_frontend(daddr, &cfg) {
            lb::NoFrontend::Pass => ALLOW,
            lb::NoFrontend::Reject => deny(ECONNREFUSED, stat::SOCK_REJECT),
            lb::NoFrontend::Drop => deny(ETIMEDOUT, stat::SOCK_REJECT),
        };
    };
    // The client as session affinity and source ranges know it: a host
    // process's packets leave with the node's address as their source
    // (kube-proxy sees the node IP for them); a pod's address is not known
    // here, its network namespace stands for it.
    let client_be = match owner {
        Owner::Host => cfg.snat_addr_be,
        Owner::Pod(netns) => {
            if fe.value.flags & svc_flags::SOURCE_RANGES != 0 {
                return ALLOW;
            }
            (netns ^ (netns >> 32)) as u32
        }
    };
    // Outside the source ranges, the call times out at once, as a dropped
    // SYN would make it.
    if !lb::source_allowed(&fe, client_be) {
        return deny(ETIMEDOUT, stat::DROP_SOURCE_RANGE);
    }
    if fe.value.count == 0 {
        // kube-proxy's REJECT (connection refused) and DROP (the client
        // times out): the call fails at once instead, with the errno the
        // client would have ended with, and nothing leaves for the VIP.
        let errno = if fe.value.flags & svc_flags::DROP != 0 {
            ETIMEDOUT
        } else {
            ECONNREFUSED
        };
        return deny(errno, stat::SOCK_REJECT);
    }
    let Ok((id, backend)) = lb::select_backend(&fe, &pkt, client_be) else {
        return ALLOW;
    };
    remember_frontend(
        cookie,
        &backend,
        protocol,
        daddr,
        dport_be,
        fe.value.rev_nat_index,
    );
    // SAFETY: writes of the context's destination fields, allowed for
    // connect4 and sendmsg4.
    unsafe {
        (*sa).user_ip4 = backend.address_be;
        (*sa).user_port = backend.port_be as u32;
    }
    maps::count(stat::SOCK_LB);
    if owner != Owner::Host {
        maps::count(stat::SOCK_LB_POD);
    }
    maps::count_backend_flow(id);
    ALLOW
}

/// `recvmsg4` and `getpeername4`: a backend peer reads as the frontend the
/// socket addressed.
#[inline(always)]
pub fn to_frontend(ctx: &SockAddrContext) -> i32 {
    let cfg = maps::config();
    // Any socket the hooks rewrote has its entry (a pod's, rewritten while
    // the agent was away, keeps it once the agent is back).
    if cfg.host_netns_cookie == 0 {
        return ALLOW;
    }
    let sa = ctx.sock_addr;
    // SAFETY: reads of the context's fields (network byte order, as above).
    let (addr, port_be, protocol) =
        unsafe { ((*sa).user_ip4, (*sa).user_port as u16, (*sa).protocol) };
    let protocol = match protocol {
        6 => proto::TCP,
        17 => proto::UDP,
        _ => return ALLOW,
    };
    let key = SockRevKey {
        cookie: socket_cookie(ctx),
        backend_addr: addr,
        backend_port_be: port_be,
        proto: protocol,
        pad: 0,
    };
    // SAFETY: the value is copied out at once.
    let Some(rev) = (unsafe { maps::SOCK_REV.get(key) }).copied() else {
        return ALLOW;
    };
    // SAFETY: writes of the context's address fields, allowed for recvmsg4
    // and getpeername4.
    unsafe {
        (*sa).user_ip4 = rev.frontend_addr;
        (*sa).user_port = rev.frontend_port_be as u32;
    }
    maps::count(stat::SOCK_REV_NAT);
    ALLOW
}
