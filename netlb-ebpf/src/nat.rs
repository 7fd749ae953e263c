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
use netlb_common::{CtEntry4, proto, stat};

use crate::{
    maps,
    parse::{
        ICMP_CSUM_OFF, INNER_IP_CSUM_OFF, IP_CSUM_OFF, IP_DADDR_OFF, IP_SADDR_OFF, L4_DPORT_OFF,
        L4_SPORT_OFF, Packet,
    },
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
    // A later fragment has no L4 header: the first fragment's checksum
    // update covers the whole datagram's pseudo header.
    if !pkt.no_l4 {
        ctx.l4_csum_replace(
            pkt.l4_csum_off,
            old_be as u64,
            new_be as u64,
            l4_flags(pkt, 4) | BPF_F_PSEUDO_HDR,
        )
        .map_err(|_| Reason::Rewrite)?;
    }
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
    // A later fragment carries no ports: the first fragment's are
    // rewritten.
    if old_be == new_be || pkt.no_l4 {
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

/// DNAT of the destination address only (a hairpinned reply goes back from
/// the service loopback address to the client).
#[inline(always)]
pub fn dnat_addr(ctx: &TcContext, pkt: &Packet, addr_be: u32) -> Result<(), Reason> {
    rewrite_addr(ctx, pkt, IP_DADDR_OFF, pkt.daddr_be, addr_be)
}

/// Reverse NAT of a reply: its source becomes the frontend the client
/// addressed.
#[inline(always)]
pub fn snat_to_frontend(ctx: &TcContext, pkt: &Packet, link: &CtEntry4) -> Result<(), Reason> {
    snat(ctx, pkt, link.frontend_addr, link.frontend_port_be)?;
    maps::count(stat::REVERSE_NAT);
    Ok(())
}

/// Rewrites an address of an ICMP error's outer header: only the IPv4
/// checksum covers it (ICMP has no pseudo header).
#[inline(always)]
pub fn icmp_outer_addr(
    ctx: &TcContext,
    offset: usize,
    old_be: u32,
    new_be: u32,
) -> Result<(), Reason> {
    if old_be == new_be {
        return Ok(());
    }
    ctx.l3_csum_replace(IP_CSUM_OFF, old_be as u64, new_be as u64, 4)
        .map_err(|_| Reason::Rewrite)?;
    ctx.store(offset, &new_be, 0).map_err(|_| Reason::Rewrite)
}

/// Rewrites an address of an ICMP error's quoted IPv4 header: the quoted
/// header's checksum follows it, and the ICMP checksum (which covers the
/// quoted bytes) follows both changes. `bpf_l3_csum_replace` is a plain
/// incremental update of a 16-bit checksum field, so it serves for both.
/// The quoted L4 checksum is left alone, as Cilium and the kernel's NAT do:
/// the receiver only matches the quoted addresses and ports.
#[inline(always)]
pub fn icmp_inner_addr(
    ctx: &TcContext,
    offset: usize,
    old_be: u32,
    new_be: u32,
) -> Result<(), Reason> {
    if old_be == new_be {
        return Ok(());
    }
    let old_csum: u16 = ctx.load(INNER_IP_CSUM_OFF).map_err(|_| Reason::Rewrite)?;
    ctx.l3_csum_replace(INNER_IP_CSUM_OFF, old_be as u64, new_be as u64, 4)
        .map_err(|_| Reason::Rewrite)?;
    let new_csum: u16 = ctx.load(INNER_IP_CSUM_OFF).map_err(|_| Reason::Rewrite)?;
    ctx.l3_csum_replace(ICMP_CSUM_OFF, old_be as u64, new_be as u64, 4)
        .map_err(|_| Reason::Rewrite)?;
    ctx.l3_csum_replace(ICMP_CSUM_OFF, old_csum as u64, new_csum as u64, 2)
        .map_err(|_| Reason::Rewrite)?;
    ctx.store(offset, &new_be, 0).map_err(|_| Reason::Rewrite)
}

/// Rewrites a port of an ICMP error's quoted L4 header (covered by the ICMP
/// checksum only).
#[inline(always)]
pub fn icmp_inner_port(
    ctx: &TcContext,
    offset: usize,
    old_be: u16,
    new_be: u16,
) -> Result<(), Reason> {
    if old_be == new_be {
        return Ok(());
    }
    ctx.l3_csum_replace(ICMP_CSUM_OFF, old_be as u64, new_be as u64, 2)
        .map_err(|_| Reason::Rewrite)?;
    ctx.store(offset, &new_be, 0).map_err(|_| Reason::Rewrite)
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
