//! Test packets: a builder that computes every checksum from scratch, and a
//! parser that checks them from scratch.
#![allow(
    dead_code,
    reason = "shared by the test binaries and the bench, each using part of it"
)]

use std::net::Ipv4Addr;

use netlb_common::proto;

/// An IPv4 address as the datapath stores it (network byte order in memory).
pub fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x11];
const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// RFC 1071 ones'-complement sum, folded and complemented.
pub fn checksum(chunks: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    let mut odd: Option<u8> = None;
    for chunk in chunks {
        for &b in chunk.iter() {
            match odd.take() {
                Some(hi) => sum += u32::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u32::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, len: usize) -> Vec<u8> {
    let mut p = Vec::with_capacity(12);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.push(0);
    p.push(protocol);
    p.extend_from_slice(&(len as u16).to_be_bytes());
    p
}

pub struct PacketBuilder {
    protocol: u8,
    src: Ipv4Addr,
    sport: u16,
    dst: Ipv4Addr,
    dport: u16,
    tcp_flags: u8,
    payload: Vec<u8>,
    options: Vec<u8>,
    fragment_offset: u16,
    zero_udp_checksum: bool,
    seq: u32,
    ack_number: Option<u32>,
    window: u16,
    tcp_options: Vec<u8>,
}

impl PacketBuilder {
    fn new(protocol: u8, src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self {
            protocol,
            src,
            sport,
            dst,
            dport,
            tcp_flags: 0,
            payload: Vec::new(),
            options: Vec::new(),
            fragment_offset: 0,
            zero_udp_checksum: false,
            seq: 1000,
            ack_number: None,
            window: 64240,
            tcp_options: Vec::new(),
        }
    }

    /// TCP sequence number (default 1000).
    pub fn seq(mut self, seq: u32) -> Self {
        self.seq = seq;
        self
    }

    /// TCP acknowledgment number (sets ACK; default 2000 with `ack()`).
    pub fn ack_number(mut self, ack: u32) -> Self {
        self.tcp_flags |= 0x10;
        self.ack_number = Some(ack);
        self
    }

    /// TCP window field (default 64240).
    pub fn window(mut self, window: u16) -> Self {
        self.window = window;
        self
    }

    /// TCP options (padded to a multiple of 4 bytes with EOL).
    pub fn tcp_options(mut self, options: &[u8]) -> Self {
        self.tcp_options = options.to_vec();
        while !self.tcp_options.len().is_multiple_of(4) {
            self.tcp_options.push(0);
        }
        self
    }

    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::new(proto::TCP, src, sport, dst, dport)
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Self::new(proto::UDP, src, sport, dst, dport)
    }

    pub fn syn(mut self) -> Self {
        self.tcp_flags |= 0x02;
        self
    }

    pub fn ack(mut self) -> Self {
        self.tcp_flags |= 0x10;
        self
    }

    pub fn rst(mut self) -> Self {
        self.tcp_flags |= 0x04;
        self
    }

    pub fn fin(mut self) -> Self {
        self.tcp_flags |= 0x01;
        self
    }

    pub fn payload(mut self, payload: &[u8]) -> Self {
        self.payload = payload.to_vec();
        self
    }

    /// IPv4 options (a multiple of 4 bytes).
    pub fn ip_options(mut self, options: &[u8]) -> Self {
        assert_eq!(options.len() % 4, 0);
        self.options = options.to_vec();
        self
    }

    /// Fragment offset in 8-byte units.
    pub fn fragment_offset(mut self, offset: u16) -> Self {
        self.fragment_offset = offset;
        self
    }

    pub fn zero_udp_checksum(mut self) -> Self {
        self.zero_udp_checksum = true;
        self
    }

    /// An ICMP error frame from `src` to `dst` of `kind`/`code` quoting
    /// `about` (a frame from this builder): its IPv4 header and the first 8
    /// bytes after it, as RFC 792 says. `rest` is the 4-byte field after the
    /// checksum (the next-hop MTU of fragmentation needed, in its low half).
    pub fn icmp_error(
        src: Ipv4Addr,
        dst: Ipv4Addr,
        kind: u8,
        code: u8,
        rest: u32,
        about: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![kind, code, 0, 0];
        icmp.extend_from_slice(&rest.to_be_bytes());
        icmp.extend_from_slice(&about[14..14 + 20 + 8]);
        let csum = checksum(&[&icmp]);
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        let mut ip = Vec::new();
        ip.push(0x45);
        ip.push(0xc0);
        ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x4321u16.to_be_bytes());
        ip.extend_from_slice(&[0, 0]);
        ip.push(64);
        ip.push(proto::ICMP);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        let ip_csum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());
        let mut frame = Vec::new();
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&icmp);
        frame
    }

    /// An ARP request frame.
    pub fn arp() -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&CLIENT_MAC);
        f.extend_from_slice(&[10, 244, 0, 11]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 244, 0, 1]);
        f
    }

    pub fn build(self) -> Vec<u8> {
        let mut l4 = Vec::new();
        l4.extend_from_slice(&self.sport.to_be_bytes());
        l4.extend_from_slice(&self.dport.to_be_bytes());
        let csum_at = if self.protocol == proto::TCP {
            l4.extend_from_slice(&self.seq.to_be_bytes());
            let ack: u32 = match self.ack_number {
                Some(ack) => ack,
                None if self.tcp_flags & 0x10 != 0 => 2000,
                None => 0,
            };
            l4.extend_from_slice(&ack.to_be_bytes());
            l4.push(((5 + self.tcp_options.len() / 4) as u8) << 4); // data offset
            l4.push(self.tcp_flags);
            l4.extend_from_slice(&self.window.to_be_bytes());
            l4.extend_from_slice(&[0, 0]); // checksum
            l4.extend_from_slice(&[0, 0]); // urgent
            l4.extend_from_slice(&self.tcp_options);
            16
        } else {
            l4.extend_from_slice(&((8 + self.payload.len()) as u16).to_be_bytes());
            l4.extend_from_slice(&[0, 0]);
            6
        };
        l4.extend_from_slice(&self.payload);
        let pseudo = pseudo_header(self.src, self.dst, self.protocol, l4.len());
        let mut csum = checksum(&[&pseudo, &l4]);
        if self.protocol == proto::UDP {
            if self.zero_udp_checksum {
                csum = 0;
            } else if csum == 0 {
                csum = 0xffff;
            }
        }
        l4[csum_at..csum_at + 2].copy_from_slice(&csum.to_be_bytes());

        let ihl = 5 + self.options.len() / 4;
        let mut ip = Vec::new();
        ip.push(0x40 | ihl as u8);
        ip.push(0);
        ip.extend_from_slice(&((ihl * 4 + l4.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&0x1234u16.to_be_bytes());
        ip.extend_from_slice(&(self.fragment_offset & 0x1fff).to_be_bytes());
        ip.push(64);
        ip.push(self.protocol);
        ip.extend_from_slice(&[0, 0]);
        ip.extend_from_slice(&self.src.octets());
        ip.extend_from_slice(&self.dst.octets());
        ip.extend_from_slice(&self.options);
        let ip_csum = checksum(&[&ip]);
        ip[10..12].copy_from_slice(&ip_csum.to_be_bytes());

        let mut frame = Vec::new();
        frame.extend_from_slice(&HOST_MAC);
        frame.extend_from_slice(&CLIENT_MAC);
        frame.extend_from_slice(&0x0800u16.to_be_bytes());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&l4);
        frame
    }
}

/// A parsed Ethernet + IPv4 frame (no options).
pub struct Ipv4Packet<'a> {
    frame: &'a [u8],
}

impl<'a> Ipv4Packet<'a> {
    pub fn parse(frame: &'a [u8]) -> Option<Self> {
        if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] != 0x45 {
            return None;
        }
        let tot_len = u16::from_be_bytes([frame[16], frame[17]]) as usize;
        if frame.len() != 14 + tot_len {
            return None;
        }
        Some(Self { frame })
    }

    fn ip(&self) -> &[u8] {
        &self.frame[14..34]
    }

    fn l4(&self) -> &[u8] {
        &self.frame[34..]
    }

    pub fn protocol(&self) -> u8 {
        self.ip()[9]
    }

    pub fn saddr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip()[12], self.ip()[13], self.ip()[14], self.ip()[15])
    }

    pub fn daddr(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.ip()[16], self.ip()[17], self.ip()[18], self.ip()[19])
    }

    pub fn sport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[0], self.l4()[1]])
    }

    pub fn dport(&self) -> u16 {
        u16::from_be_bytes([self.l4()[2], self.l4()[3]])
    }

    fn l4_header_len(&self) -> usize {
        match self.protocol() {
            proto::TCP => ((self.l4()[12] >> 4) as usize) * 4,
            proto::UDP | proto::ICMP => 8,
            other => panic!("unexpected protocol {other}"),
        }
    }

    fn csum_offset(&self) -> usize {
        match self.protocol() {
            proto::TCP => 16,
            proto::UDP => 6,
            proto::ICMP => 2,
            other => panic!("unexpected protocol {other}"),
        }
    }

    pub fn l4_checksum(&self) -> u16 {
        let at = self.csum_offset();
        u16::from_be_bytes([self.l4()[at], self.l4()[at + 1]])
    }

    /// L4 payload after the L4 header.
    pub fn payload(&self) -> &[u8] {
        &self.l4()[self.l4_header_len()..]
    }

    /// Everything after the IPv4 header.
    pub fn payload_with_l4_header(&self) -> &[u8] {
        self.l4()
    }

    /// The packet an ICMP error quotes: its addresses and ports, and whether
    /// the quoted IPv4 header's checksum is right.
    pub fn quoted(&self) -> (Ipv4Addr, u16, Ipv4Addr, u16, bool) {
        assert_eq!(self.protocol(), proto::ICMP);
        let inner = &self.l4()[8..];
        let ip = &inner[..20];
        let mut zeroed = ip.to_vec();
        let stored = u16::from_be_bytes([zeroed[10], zeroed[11]]);
        zeroed[10..12].copy_from_slice(&[0, 0]);
        let ok = checksum(&[&zeroed]) == stored;
        (
            Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            u16::from_be_bytes([inner[20], inner[21]]),
            Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            u16::from_be_bytes([inner[22], inner[23]]),
            ok,
        )
    }

    /// Recomputes the IPv4 and L4 checksums from scratch and compares.
    pub fn assert_checksums(&self) {
        let mut ip = self.ip().to_vec();
        let stored = u16::from_be_bytes([ip[10], ip[11]]);
        ip[10..12].copy_from_slice(&[0, 0]);
        assert_eq!(checksum(&[&ip]), stored, "IPv4 header checksum");

        let at = self.csum_offset();
        let stored = self.l4_checksum();
        let mut l4 = self.l4().to_vec();
        l4[at..at + 2].copy_from_slice(&[0, 0]);
        let expected = match self.protocol() {
            proto::ICMP => checksum(&[&l4]),
            protocol => {
                let pseudo = pseudo_header(self.saddr(), self.daddr(), protocol, l4.len());
                checksum(&[&pseudo, &l4])
            }
        };
        if self.protocol() == proto::UDP {
            if stored == 0 {
                return; // no checksum
            }
            let expected = if expected == 0 { 0xffff } else { expected };
            assert_eq!(stored, expected, "UDP checksum");
        } else {
            assert_eq!(
                stored,
                expected,
                "L4 checksum (protocol {})",
                self.protocol()
            );
        }
    }
}
