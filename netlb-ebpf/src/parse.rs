//! Header parsing. Untagged Ethernet + IPv4 without options: TCP and UDP are
//! load-balanced, fragmented datagrams included; ICMP errors quoting a TCP
//! or UDP header are candidates for error translation; everything else is
//! passed unmodified.
//!
//! Fragments (Cilium's `ipv4_handle_fragmentation`): the first fragment of a
//! datagram carries its L4 header; its ports are recorded under (source,
//! destination, IP id, protocol) in `FRAGMENTS`, and the later fragments,
//! which carry none, are parsed with them (`no_l4`), so that every fragment
//! gets the first one's translation (addresses only: the ports and the L4
//! checksum, which covers the whole datagram, are in the first fragment).
//! A later fragment that arrives before its first passes unmodified.

use aya_ebpf::programs::TcContext;
use netlb_common::{FragKey, FragPorts, proto, stat};

use crate::{maps, verdict::Reason};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 header.
pub const IP_OFF: usize = ETH_HLEN;
pub const IP_HLEN: usize = 20;
pub const IP_CSUM_OFF: usize = IP_OFF + 10;
pub const IP_SADDR_OFF: usize = IP_OFF + 12;
pub const IP_DADDR_OFF: usize = IP_OFF + 16;
/// Offset of the L4 header. Fixed because packets with IPv4 options are
/// not load-balanced (see [`parse`]); a constant offset also keeps every packet
/// access provably in bounds for the verifier without range tracking.
pub const L4_OFF: usize = IP_OFF + IP_HLEN;
pub const L4_SPORT_OFF: usize = L4_OFF;
pub const L4_DPORT_OFF: usize = L4_OFF + 2;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const TCP_CSUM_OFF: usize = L4_OFF + 16;
const UDP_CSUM_OFF: usize = L4_OFF + 6;

/// ICMP errors: `[eth][IPv4][ICMP type code csum unused(4)][quoted IPv4][quoted L4 (8)]`,
/// again with constant offsets (quoted headers with options are not
/// translated).
pub const ICMP_CSUM_OFF: usize = L4_OFF + 2;
pub const INNER_IP_OFF: usize = L4_OFF + 8;
pub const INNER_IP_CSUM_OFF: usize = INNER_IP_OFF + 10;
pub const INNER_SADDR_OFF: usize = INNER_IP_OFF + 12;
pub const INNER_DADDR_OFF: usize = INNER_IP_OFF + 16;
pub const INNER_L4_OFF: usize = INNER_IP_OFF + IP_HLEN;
pub const INNER_SPORT_OFF: usize = INNER_L4_OFF;
pub const INNER_DPORT_OFF: usize = INNER_L4_OFF + 2;
/// RFC 792: an error quotes the IP header and the first 64 bits of data.
const QUOTED_L4: usize = 8;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Header prefix of a TCP or UDP packet: Ethernet + IPv4 + TCP.
const L4_HDR: usize = L4_OFF + TCP_HLEN;
/// Header prefix of an ICMP error with its quoted headers.
const ICMP_HDR: usize = INNER_L4_OFF + QUOTED_L4;

/// IPv4 header, as on the wire.
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    /// Network byte order.
    pub tot_len_be: u16,
    /// Network byte order.
    pub id_be: u16,
    /// Flags + fragment offset. Network byte order.
    pub frag_off_be: u16,
    pub ttl: u8,
    pub protocol: u8,
    /// Stored exactly as computed over the raw header bytes.
    pub check: u16,
    /// Network byte order.
    pub saddr_be: u32,
    /// Network byte order.
    pub daddr_be: u32,
}

/// What the programs need of a packet. Addresses and ports stay in network
/// byte order as read from the wire: they are compared with map keys that
/// store network order too, and written back without swapping.
///
/// Verifier workaround: the fields leave no implicit padding (`pad` fills
/// the hole before `l4_csum_off`). Copies of a struct with padding move
/// undefined bytes, which LLVM may take from any register, one a helper
/// call has just clobbered included, and the verifier rejects the read
/// (`R3 !read_ok`).
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Packet {
    pub saddr_be: u32,
    pub daddr_be: u32,
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); 0 for UDP.
    pub tcp_flags: u8,
    /// A later fragment: no L4 header in this packet (the ports come from
    /// the first fragment; nothing but addresses may be rewritten).
    pub no_l4: bool,
    /// Always zero.
    pub pad: u8,
    /// Offset of the L4 checksum field.
    pub l4_csum_off: usize,
    /// TCP sequence and acknowledgment numbers. Host byte order (compared
    /// with wrapping arithmetic, never written back).
    pub seq: u32,
    pub ack: u32,
    /// TCP receive window as in the header (unscaled). Host byte order.
    pub win: u16,
    /// A SYN's window scale option (0 without it); 0 for other packets.
    pub wscale: u8,
    /// Always zero.
    pub pad2: u8,
}

impl Packet {
    /// A tuple without TCP header fields (ICMP quotes, later fragments,
    /// socket addresses).
    #[inline(always)]
    pub const fn tuple(
        saddr_be: u32,
        sport_be: u16,
        daddr_be: u32,
        dport_be: u16,
        proto: u8,
    ) -> Self {
        Self {
            saddr_be,
            daddr_be,
            sport_be,
            dport_be,
            proto,
            tcp_flags: 0,
            no_l4: false,
            pad: 0,
            l4_csum_off: 0,
            seq: 0,
            ack: 0,
            win: 0,
            wscale: 0,
            pad2: 0,
        }
    }
}

/// The fixed part of a TCP header after the ports, as on the wire.
#[repr(C)]
struct TcpFields {
    /// Network byte order.
    seq_be: u32,
    /// Network byte order.
    ack_be: u32,
    /// Data offset (high nibble) and reserved bits.
    doff: u8,
    flags: u8,
    /// Network byte order.
    win_be: u16,
}

/// Longest TCP header (data offset 15).
const TCP_MAX_HLEN: usize = 60;
/// Options walked in a SYN before giving up (a SYN carries five at most in
/// practice: MSS, SACK permitted, timestamps, NOP, window scale).
const TCP_MAX_OPTIONS: usize = 12;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_WINDOW: u8 = 3;

/// The window scale option of a SYN whose header is `hlen` bytes long (0
/// without one). Bounded for the verifier: at most `TCP_MAX_OPTIONS`
/// options. The option bytes are read with `bpf_skb_load_bytes`
/// (`TcContext::load`), not through packet pointers: with a variable
/// offset, LLVM folds `data + off + 1 > data_end` into
/// `data + off >= data_end`, whose fall-through the verifier grants no
/// readable range ("R3 offset is outside of the packet"). Only SYNs pay for
/// these helper calls.
#[inline(always)]
fn syn_wscale(ctx: &TcContext, hlen: usize) -> u8 {
    let end = L4_OFF
        + if hlen > TCP_MAX_HLEN {
            TCP_MAX_HLEN
        } else {
            hlen
        };
    let mut off = L4_OFF + TCP_HLEN;
    for _ in 0..TCP_MAX_OPTIONS {
        if off >= end {
            break;
        }
        let Ok(kind) = ctx.load::<u8>(off) else {
            break;
        };
        if kind == TCPOPT_EOL {
            break;
        }
        if kind == TCPOPT_NOP {
            off += 1;
            continue;
        }
        let Ok(len) = ctx.load::<u8>(off + 1) else {
            break;
        };
        if len < 2 {
            break;
        }
        if kind == TCPOPT_WINDOW && len == 3 {
            return ctx.load::<u8>(off + 2).unwrap_or(0);
        }
        off += usize::from(len);
    }
    0
}

/// An ICMP error quoting a TCP or UDP header: the outer addresses and the
/// quoted tuple (the packet the error is about, as the error's sender saw
/// it).
#[derive(Clone, Copy)]
pub struct IcmpError {
    pub outer_saddr_be: u32,
    pub outer_daddr_be: u32,
    /// The quoted packet's tuple (`tcp_flags` and `l4_csum_off` unused).
    pub inner: Packet,
}

/// A parsed packet netlb may act on.
pub enum Parsed {
    L4(Packet),
    IcmpError(IcmpError),
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

#[inline(always)]
fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*const T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *const T)
}

/// Makes the first `len` bytes linear (headers may sit partly in paged data,
/// e.g. after GRO). Only when they are not already and the packet has more:
/// the helper call is not free, and a short packet (a pure ACK is shorter
/// than an ICMP error's headers) gains nothing from it. A failure only
/// leaves the packet shorter than `len`, which the bounds checks sort out.
/// Invalidates every packet pointer taken before.
#[inline(always)]
fn linearize(ctx: &TcContext, len: usize) {
    let linear = ctx.data_end() - ctx.data();
    if linear < len && (linear as u32) < ctx.len() {
        let _ = ctx.pull_data(ctx.len().min(len as u32));
    }
}

/// The quoted header of an ICMP error, if it is one netlb can translate.
/// `outer`: the error's own source and destination.
#[inline(always)]
fn icmp_error(ctx: &TcContext, outer: (u32, u32)) -> Option<IcmpError> {
    linearize(ctx, ICMP_HDR);
    let kind = ptr_at::<u8>(ctx, L4_OFF)?;
    // SAFETY: `ptr_at` checked the bounds.
    let kind = unsafe { *kind };
    if kind != ICMP_DEST_UNREACH && kind != ICMP_TIME_EXCEEDED && kind != ICMP_PARAMETERPROB {
        return None;
    }
    let inner = ptr_at::<Ipv4Hdr>(ctx, INNER_IP_OFF)?;
    // SAFETY: `ptr_at` checked the bounds of the whole quoted header.
    let inner = unsafe { &*inner };
    if inner.version_ihl != 0x45 || (inner.protocol != proto::TCP && inner.protocol != proto::UDP) {
        return None;
    }
    let ports = ptr_at::<[u16; 2]>(ctx, INNER_L4_OFF)?;
    // SAFETY: `ptr_at` checked the bounds.
    let [sport_be, dport_be] = unsafe { *ports };
    Some(IcmpError {
        outer_saddr_be: outer.0,
        outer_daddr_be: outer.1,
        inner: Packet::tuple(
            inner.saddr_be,
            sport_be,
            inner.daddr_be,
            dport_be,
            inner.protocol,
        ),
    })
}

/// Parses the packet. `Ok(None)`: not ours, pass it unmodified.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Option<Parsed>, Reason> {
    linearize(ctx, L4_HDR);
    let Some(eth_type) = ptr_at::<u16>(ctx, 12) else {
        return Ok(None);
    };
    // SAFETY: `ptr_at` checked the bounds.
    if u16::from_be(unsafe { *eth_type }) != ETH_P_IP {
        return Ok(None);
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, IP_OFF).ok_or(Reason::MalformedL3)?;
    // SAFETY: `ptr_at` checked the bounds of the whole header.
    let ip = unsafe { &*ip };
    if ip.version_ihl >> 4 != 4 {
        return Err(Reason::MalformedL3);
    }
    let (l4_len, l4_csum_off) = match ip.protocol {
        proto::TCP => (TCP_HLEN, TCP_CSUM_OFF),
        proto::UDP => (UDP_HLEN, UDP_CSUM_OFF),
        proto::ICMP => (0, ICMP_CSUM_OFF),
        _ => return Ok(None),
    };
    if ip.version_ihl & 0x0f != 5 {
        maps::count(stat::PASS_IP_OPTIONS);
        return Ok(None);
    }
    // MF flag or a non-zero offset: a fragment.
    let frag = u16::from_be(ip.frag_off_be) & 0x3fff;
    if frag != 0 && ip.protocol == proto::ICMP {
        return Ok(None);
    }
    if ip.protocol == proto::ICMP {
        return Ok(icmp_error(ctx, (ip.saddr_be, ip.daddr_be)).map(Parsed::IcmpError));
    }
    let (saddr_be, daddr_be, protocol) = (ip.saddr_be, ip.daddr_be, ip.protocol);
    let frag_key = FragKey {
        saddr_be,
        daddr_be,
        id_be: ip.id_be,
        proto: protocol,
        pad: 0,
    };
    if frag & 0x1fff != 0 {
        // A later fragment: the ports its first fragment recorded.
        // SAFETY: the value is copied out at once.
        let Some(ports) = (unsafe { maps::FRAGMENTS.get(frag_key) }).copied() else {
            maps::count(stat::PASS_FRAGMENT);
            return Ok(None);
        };
        return Ok(Some(Parsed::L4(Packet {
            no_l4: true,
            ..Packet::tuple(saddr_be, ports.sport_be, daddr_be, ports.dport_be, protocol)
        })));
    }
    if ctx.data() + L4_OFF + l4_len > ctx.data_end() {
        return Err(Reason::TruncatedL4);
    }
    let ports = ptr_at::<[u16; 2]>(ctx, L4_OFF).ok_or(Reason::TruncatedL4)?;
    // SAFETY: `ptr_at` checked the bounds.
    let [sport_be, dport_be] = unsafe { *ports };
    let mut pkt = Packet {
        l4_csum_off,
        ..Packet::tuple(saddr_be, sport_be, daddr_be, dport_be, protocol)
    };
    if protocol == proto::TCP {
        let tcp = ptr_at::<TcpFields>(ctx, L4_OFF + 4).ok_or(Reason::TruncatedL4)?;
        // SAFETY: `ptr_at` checked the bounds.
        let tcp = unsafe { &*tcp };
        pkt.tcp_flags = tcp.flags;
        pkt.seq = u32::from_be(tcp.seq_be);
        pkt.ack = u32::from_be(tcp.ack_be);
        pkt.win = u16::from_be(tcp.win_be);
        if tcp.flags & TCP_SYN != 0 {
            let hlen = usize::from(tcp.doff >> 4) * 4;
            pkt.wscale = syn_wscale(ctx, hlen);
        }
    }
    if frag != 0 {
        // The first fragment (MF set, offset 0): its ports for the others.
        // Best effort: without the entry the later fragments pass as they
        // are.
        let _ = maps::FRAGMENTS.insert(frag_key, FragPorts { sport_be, dport_be }, 0);
    }
    Ok(Some(Parsed::L4(pkt)))
}
