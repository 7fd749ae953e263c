//! ICMP errors about translated flows (Cilium's `icmp_err` reverse NAT,
//! netfilter's RELATED handling): an error quotes the packet it is about as
//! its sender saw it, so both the quoted header and the outer header get the
//! translation that packet's connection applies at this hook, in the other
//! direction. Without it, a fragmentation-needed error from inside the path
//! never reaches the client's socket (its quote names the backend, not the
//! VIP the socket is connected to) and Path MTU discovery breaks; a backend's
//! port unreachable never reaches a UDP client connected to a VIP.
//!
//! Per hook, what the quoted packet is and what the error becomes (C client,
//! F frontend, B backend, N:P the SNAT address and port):
//!
//! | hook | quoted packet | found by | rewrite |
//! | --- | --- | --- | --- |
//! | `to_pod` | C -> B (after DNAT) | REPLY B -> C | quoted dst B -> F; outer src B -> F |
//! | `from_pod` | F -> C (a translated reply) | SERVICE C -> F | quoted src F -> B; outer dst F -> B |
//! | `from_netdev` | N:P -> B (after SNAT) | NAT_IN B -> N:P | quoted src -> C; outer dst N -> C |
//! | `from_netdev` | F -> C (a translated reply) | SERVICE C -> F | quoted src F -> B (and dst C -> N:P when SNATed); outer dst F -> B |
//! | `to_netdev` | C -> B (after DNAT) | EGRESS | quoted dst B -> F; outer src B -> F |
//! | `to_netdev` | B -> C (a reply, before reverse NAT) | EGRESS | quoted dst C -> N:P when SNATed |
//!
//! Errors are never recorded in a connection's state and never open one.

use aya_ebpf::programs::TcContext;
use netlb_common::{CtEntry4, ct_flags, ct_kind, stat};

use crate::{
    conntrack::{self, tuple},
    maps, nat,
    parse::{
        INNER_DADDR_OFF, INNER_DPORT_OFF, INNER_SADDR_OFF, INNER_SPORT_OFF, IP_DADDR_OFF,
        IP_SADDR_OFF, IcmpError, Packet,
    },
    verdict::Reason,
};

/// The key of the quoted packet's reverse tuple (the packet the error is
/// about, seen from the other end) of `kind`.
#[inline(always)]
fn reversed(inner: &Packet, kind: u8) -> netlb_common::CtKey4 {
    tuple(
        inner.daddr_be,
        inner.dport_be,
        inner.saddr_be,
        inner.sport_be,
        inner.proto,
        kind,
    )
}

/// Rewrites the quoted destination.
#[inline(always)]
fn inner_dst(ctx: &TcContext, e: &IcmpError, addr_be: u32, port_be: u16) -> Result<(), Reason> {
    nat::icmp_inner_addr(ctx, INNER_DADDR_OFF, e.inner.daddr_be, addr_be)?;
    nat::icmp_inner_port(ctx, INNER_DPORT_OFF, e.inner.dport_be, port_be)
}

/// Rewrites the quoted source.
#[inline(always)]
fn inner_src(ctx: &TcContext, e: &IcmpError, addr_be: u32, port_be: u16) -> Result<(), Reason> {
    nat::icmp_inner_addr(ctx, INNER_SADDR_OFF, e.inner.saddr_be, addr_be)?;
    nat::icmp_inner_port(ctx, INNER_SPORT_OFF, e.inner.sport_be, port_be)
}

/// The error's sender was the backend itself (a port unreachable): it must
/// seem to come from the frontend.
#[inline(always)]
fn outer_src_backend_to_frontend(
    ctx: &TcContext,
    e: &IcmpError,
    link: &CtEntry4,
) -> Result<(), Reason> {
    if e.outer_saddr_be == e.inner.daddr_be {
        nat::icmp_outer_addr(ctx, IP_SADDR_OFF, e.outer_saddr_be, link.frontend_addr)?;
    }
    Ok(())
}

#[inline(always)]
fn translated() {
    maps::count(stat::ICMP_ERROR_NAT);
}

/// `to_pod`: an error about a packet a client pod sent to a frontend.
#[inline(always)]
pub fn to_pod(ctx: &TcContext, e: &IcmpError) -> Result<(), Reason> {
    let Some(link) = conntrack::peek_link(&reversed(&e.inner, ct_kind::REPLY)) else {
        return Ok(());
    };
    if link.flags & ct_flags::HAIRPIN != 0 {
        return Ok(());
    }
    inner_dst(ctx, e, link.frontend_addr, link.frontend_port_be)?;
    outer_src_backend_to_frontend(ctx, e, &link)?;
    translated();
    Ok(())
}

/// An error about a translated reply, sent by its client back towards the
/// frontend (`from_pod` and `from_netdev`): it goes to the backend.
#[inline(always)]
fn about_reply(ctx: &TcContext, e: &IcmpError) -> Result<bool, Reason> {
    let Some(conn) = conntrack::peek_conn(&reversed(&e.inner, ct_kind::SERVICE)) else {
        return Ok(false);
    };
    if conn.flags & ct_flags::HAIRPIN != 0 {
        return Ok(false);
    }
    inner_src(ctx, e, conn.target_addr, conn.target_port_be)?;
    if conn.flags & ct_flags::SNAT != 0 {
        inner_dst(ctx, e, conn.nat_addr, conn.nat_port_be)?;
    }
    if e.outer_daddr_be == e.inner.saddr_be {
        nat::icmp_outer_addr(ctx, IP_DADDR_OFF, e.outer_daddr_be, conn.target_addr)?;
    }
    translated();
    Ok(true)
}

/// `from_pod`: an error a client pod sends about a reply it got.
#[inline(always)]
pub fn from_pod(ctx: &TcContext, e: &IcmpError) -> Result<(), Reason> {
    about_reply(ctx, e).map(|_| ())
}

/// `from_netdev`: an error about a packet this node source-NATed towards a
/// remote backend, or about a reply it translated for an outside client.
#[inline(always)]
pub fn from_netdev(ctx: &TcContext, e: &IcmpError, snat_addr_be: u32) -> Result<(), Reason> {
    if snat_addr_be != 0
        && e.outer_daddr_be == snat_addr_be
        && let Some(link) = conntrack::peek_link(&reversed(&e.inner, ct_kind::NAT_IN))
    {
        inner_src(ctx, e, link.target_addr, link.target_port_be)?;
        nat::icmp_outer_addr(ctx, IP_DADDR_OFF, e.outer_daddr_be, link.target_addr)?;
        translated();
        return Ok(());
    }
    about_reply(ctx, e).map(|_| ())
}

/// `to_netdev`: an error leaving the node about a north-south packet, on its
/// way to the outside client (about a forward packet) or to a remote backend
/// (about a reply).
#[inline(always)]
pub fn to_netdev(ctx: &TcContext, e: &IcmpError) -> Result<(), Reason> {
    let mut key = tuple(
        e.inner.saddr_be,
        e.inner.sport_be,
        e.inner.daddr_be,
        e.inner.dport_be,
        e.inner.proto,
        ct_kind::EGRESS,
    );
    let swapped = netlb_common::ct_normalize(&mut key);
    let Some(link) = conntrack::peek_link(&key) else {
        return Ok(());
    };
    let quoted_from_client = (link.flags & ct_flags::CLIENT_IS_SADDR != 0) != swapped;
    if quoted_from_client {
        inner_dst(ctx, e, link.frontend_addr, link.frontend_port_be)?;
        outer_src_backend_to_frontend(ctx, e, &link)?;
    } else if link.flags & ct_flags::SNAT != 0 {
        inner_dst(ctx, e, link.nat_addr, link.nat_port_be)?;
    } else {
        return Ok(());
    }
    translated();
    Ok(())
}
