//! Address and port rewrites with incremental checksum updates.
//!
//! Checksums are updated with the kernel's `bpf_l3_csum_replace` /
//! `bpf_l4_csum_replace` helpers rather than by hand: they know the skb's
//! checksum state (CHECKSUM_PARTIAL packets from local sockets carry only the
//! pseudo-header sum, which must be updated for address changes and left alone
//! for port changes). The `from`/`to` values are the fields' raw in-memory
//! (network order) words, which is what the ones'-complement sum is defined
//! over, so no byte swapping is needed.

use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect, programs::TcContext};
use netlb_common::{ct_dir, ct_flags, proto, stat};

use crate::{
    conntrack, maps,
    parse::{IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF, L4_SPORT_OFF, Packet},
    verdict::Reason,
};

/// `BPF_F_PSEUDO_HDR`: the changed field is part of the pseudo header.
const BPF_F_PSEUDO_HDR: u64 = 0x10;
/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 means "none" and stays 0; a
/// computed 0 is written as 0xffff (RFC 768).
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

#[inline(always)]
fn l4_flags(pkt: &Packet, size: u64) -> u64 {
    if pkt.proto == proto::UDP {
        size | BPF_F_MARK_MANGLED_0
    } else {
        size
    }
}

#[inline(always)]
fn rewrite_addr(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old_be: u32,
    new_be: u32,
) -> Result<(), Reason> {
    if old_be == new_be {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off,
        old_be as u64,
        new_be as u64,
        l4_flags(pkt, 4) | BPF_F_PSEUDO_HDR,
    )
    .map_err(|_| Reason::Rewrite)?;
    ctx.l3_csum_replace(IP_CSUM_OFF, old_be as u64, new_be as u64, 4)
        .map_err(|_| Reason::Rewrite)?;
    ctx.store(offset, &new_be, 0).map_err(|_| Reason::Rewrite)
}

#[inline(always)]
fn rewrite_port(
    ctx: &TcContext,
    pkt: &Packet,
    offset: usize,
    old_be: u16,
    new_be: u16,
) -> Result<(), Reason> {
    if old_be == new_be {
        return Ok(());
    }
    ctx.l4_csum_replace(
        pkt.l4_csum_off,
        old_be as u64,
        new_be as u64,
        l4_flags(pkt, 2),
    )
    .map_err(|_| Reason::Rewrite)?;
    ctx.store(offset, &new_be, 0).map_err(|_| Reason::Rewrite)
}

/// SNAT of source address and port (north-south flows to remote backends).
#[inline(always)]
pub fn snat(ctx: &TcContext, pkt: &Packet, addr_be: u32, port_be: u16) -> Result<(), Reason> {
    rewrite_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr_be, addr_be)?;
    rewrite_port(ctx, pkt, L4_SPORT_OFF, pkt.sport_be, port_be)
}

/// DNAT: destination becomes the backend.
#[inline(always)]
pub fn dnat(ctx: &TcContext, pkt: &Packet, addr_be: u32, port_be: u16) -> Result<(), Reason> {
    rewrite_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr_be, addr_be)?;
    rewrite_port(ctx, pkt, L4_DPORT_OFF, pkt.dport_be, port_be)
}

/// SNAT of the source address only (hairpin: the client becomes the service
/// loopback address, its port is kept).
#[inline(always)]
pub fn snat_addr(ctx: &TcContext, pkt: &Packet, addr_be: u32) -> Result<(), Reason> {
    rewrite_addr(ctx, pkt, IP_SADDR_OFF, pkt.saddr_be, addr_be)
}

/// Reverse NAT of a reply's source: it becomes the frontend of
/// `rev_nat_index`. `false` when that frontend is gone: the reply passes as
/// it is, like a reply whose conntrack entry kube-proxy has flushed.
#[inline(always)]
pub fn source_to_frontend(
    ctx: &TcContext,
    pkt: &Packet,
    rev_nat_index: u32,
) -> Result<bool, Reason> {
    // SAFETY: the value is copied out immediately.
    let Some(rev) = (unsafe { maps::REV_NAT.get(rev_nat_index) }).copied() else {
        return Ok(false);
    };
    snat(ctx, pkt, rev.address_be, rev.port_be)?;
    Ok(true)
}

/// Reverse NAT of a reply, if the packet belongs to a tracked flow: the
/// source becomes the frontend (VIP:port); for hairpin flows the destination
/// goes back from the service loopback address to the client.
/// Returns whether the packet was translated.
#[inline(always)]
pub fn reverse(ctx: &TcContext, pkt: &Packet) -> Result<bool, Reason> {
    let Some(entry) = conntrack::lookup_flow(&conntrack::key(pkt, ct_dir::REPLY), pkt) else {
        return Ok(false);
    };
    if !source_to_frontend(ctx, pkt, entry.rev_nat_index)? {
        return Ok(false);
    }
    if entry.flags & ct_flags::HAIRPIN != 0 {
        rewrite_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr_be, entry.nat_addr_be)?;
    }
    maps::count(stat::REVERSE_NAT);
    Ok(true)
}

/// Sends a packet back out of the interface it arrived on, with its
/// Ethernet addresses swapped (an ICMP reject, or a hairpinned reply going
/// straight back to the pod that sent it). A hairpinned reply must not go
/// through the kernel's routing: its new source may be an address of the
/// node itself (a NodePort on the node's IP), and a packet arriving with a
/// local source address is dropped as a martian.
#[inline(always)]
pub fn bounce(ctx: &TcContext) -> Result<i32, Reason> {
    let macs: [u8; 12] = ctx.load(0).map_err(|_| Reason::Rewrite)?;
    let mut swapped = [0u8; 12];
    swapped[..6].copy_from_slice(&macs[6..]);
    swapped[6..].copy_from_slice(&macs[..6]);
    ctx.store(0, &swapped, 0).map_err(|_| Reason::Rewrite)?;
    // SAFETY: reading the context's ifindex.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: helper without preconditions.
    let verdict = unsafe { bpf_redirect(ifindex, 0) } as i32;
    if verdict != TC_ACT_REDIRECT {
        return Err(Reason::Rewrite);
    }
    Ok(verdict)
}
