//! Answers a packet to a frontend without backends with ICMP destination
//! unreachable / port unreachable, as kube-proxy's `REJECT` rule does
//! (iptables' default `--reject-with icmp-port-unreachable`). A TCP client
//! sees "connection refused" at once, a UDP client gets ECONNREFUSED.
//!
//! The packet is rewritten in place into the ICMP error and redirected back
//! out of the interface it came in on (towards the client pod):
//! `[eth][IPv4 VIP -> client][ICMP 3/3][original IPv4 header][first 8 bytes of L4]`.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_skb_change_tail},
    programs::TcContext,
};
use netlb_common::{proto, stat};

use crate::{
    maps, nat,
    parse::{ETH_HLEN, IP_HLEN, IP_OFF, L4_OFF, Packet},
    verdict::Reason,
};

const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_PORT_UNREACH: u8 = 3;
/// RFC 792: the error quotes the IP header plus the first 64 bits of data.
const QUOTED_L4: usize = 8;

#[repr(C)]
struct IcmpError {
    kind: u8,
    code: u8,
    /// Ones'-complement sum over the ICMP message, stored as computed over
    /// the raw bytes.
    check: u16,
    unused: u32,
    quoted_ip: [u8; IP_HLEN],
    quoted_l4: [u8; QUOTED_L4],
}
const ICMP_LEN: usize = core::mem::size_of::<IcmpError>();
const _: () = assert!(ICMP_LEN == 36);

#[repr(C)]
struct Ipv4Header {
    version_ihl: u8,
    tos: u8,
    tot_len_be: u16,
    id_be: u16,
    frag_off_be: u16,
    ttl: u8,
    protocol: u8,
    check: u16,
    saddr_be: u32,
    daddr_be: u32,
}
const _: () = assert!(core::mem::size_of::<Ipv4Header>() == IP_HLEN);

/// Folds a 32-bit ones'-complement sum (as returned by `bpf_csum_diff`) into
/// the 16-bit checksum field value.
#[inline(always)]
fn csum_fold(sum: i64) -> u16 {
    let mut s = sum as u64 & 0xffff_ffff;
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    !(s as u16)
}

/// Ones'-complement sum of a 4-byte-aligned stack object.
#[inline(always)]
fn csum_of<T>(obj: &mut T) -> u16 {
    // SAFETY: `obj` is a live stack object of `size_of::<T>()` bytes, a
    // multiple of 4 as `bpf_csum_diff` requires (asserted at the call sites'
    // types).
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            (obj as *mut T).cast(),
            core::mem::size_of::<T>() as u32,
            0,
        )
    };
    csum_fold(sum)
}

#[inline(always)]
pub fn port_unreachable(ctx: &TcContext, pkt: &Packet) -> Result<i32, Reason> {
    let quoted_ip: [u8; IP_HLEN] = ctx.load(IP_OFF).map_err(|_| Reason::RejectFailed)?;
    // A UDP datagram may be shorter than 8 bytes of L4 payload... but its
    // header alone is 8 bytes and TCP's is 20, both checked by the parser.
    let quoted_l4: [u8; QUOTED_L4] = ctx.load(L4_OFF).map_err(|_| Reason::RejectFailed)?;

    let mut icmp = IcmpError {
        kind: ICMP_DEST_UNREACH,
        code: ICMP_PORT_UNREACH,
        check: 0,
        unused: 0,
        quoted_ip,
        quoted_l4,
    };
    icmp.check = csum_of(&mut icmp);

    let ip_len = IP_HLEN + ICMP_LEN;
    let mut ip = Ipv4Header {
        version_ihl: 0x45,
        tos: 0,
        tot_len_be: (ip_len as u16).to_be(),
        id_be: 0,
        frag_off_be: 0,
        ttl: 64,
        protocol: proto::ICMP,
        check: 0,
        // The error comes from the frontend the client addressed.
        saddr_be: pkt.daddr_be,
        daddr_be: pkt.saddr_be,
    };
    ip.check = csum_of(&mut ip);

    // Resize to exactly the ICMP error. The skb may still be marked
    // CHECKSUM_PARTIAL by the client's stack; nothing on the way back to the
    // pod completes that checksum (veth delivers it as verified), and the
    // ICMP and IPv4 checksums written here are complete anyway.
    // SAFETY: `ctx.skb.skb` is the program's context.
    let ret = unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + ip_len) as u32, 0) };
    if ret != 0 {
        return Err(Reason::RejectFailed);
    }
    ctx.store(IP_OFF, &ip, 0)
        .map_err(|_| Reason::RejectFailed)?;
    ctx.store(L4_OFF, &icmp, 0)
        .map_err(|_| Reason::RejectFailed)?;

    maps::count(stat::REJECT);
    // Egress of the interface the packet came in on: back to the client.
    nat::bounce(ctx).map_err(|_| Reason::RejectFailed)
}
