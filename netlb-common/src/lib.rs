//! Map keys and values shared by the netlb datapath (netlb-ebpf) and the agent.
//!
//! Every type is `#[repr(C)]` with explicit padding so that the kernel and
//! userspace agree on the layout byte for byte; a size assertion under each
//! type catches accidental changes. Padding must always be written as zero:
//! hash map keys are compared as raw bytes.
//!
//! Byte order, per field:
//! - `be` fields hold network byte order (big endian), exactly as they appear in
//!   the packet, so the datapath can compare and copy them without swapping.
//! - every other field is host byte order.
//!
//! The map layout follows Cilium's load balancer (`bpf/lib/lb.h`): a service
//! frontend is a set of entries in [`SERVICES`](map_names::SERVICES) keyed by
//! `(vip, port, proto, scope, slot)`; slot 0 is the frontend itself and holds
//! the backend count; slots `1..=count` hold backend ids; backends live in their
//! own map by id and reverse NAT information lives in a third map by index.
#![cfg_attr(not(test), no_std)]

/// An IPv4 address as `_be` fields hold it: its wire bytes in memory order
/// (so `from_ne_bytes` of the octets, whatever the host's byte order).
pub fn be_addr(ip: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address a `_be` field holds (inverse of [`be_addr`]).
pub fn from_be_addr(be: u32) -> core::net::Ipv4Addr {
    core::net::Ipv4Addr::from(be.to_ne_bytes())
}

/// The version of the pinned layout: the maps' types, keys and values as
/// this crate defines them. A new agent that finds maps of another version
/// (or other sizes) pinned builds its own beside them and migrates the
/// state (see the agent's `migrate`); every change of a map's layout bumps
/// it and is recorded in CHANGELOG.md.
///
/// - 1: netlb v0.1.0 (maps pinned directly in the bpffs directory).
/// - 2: conntrack values carry a TCP window side ([`TcpWin`]), `STATS` has
///   room for 64 counters, the in-kernel collector's `CT_GC`; maps pinned
///   in `maps/v2-<sizes>/`.
pub const LAYOUT_VERSION: u32 = 2;

/// Names of the maps in the eBPF object; the agent finds them by these names
/// and pins them under `<bpffs>/maps/<generation>/<name>`.
pub mod map_names {
    pub const SERVICES: &str = "NETLB_SERVICES";
    pub const BACKENDS: &str = "NETLB_BACKENDS";
    pub const REV_NAT: &str = "NETLB_REV_NAT";
    pub const CONNTRACK: &str = "NETLB_CT";
    pub const STATS: &str = "NETLB_STATS";
    pub const BACKEND_STATS: &str = "NETLB_BACKEND_STATS";
    pub const CONFIG: &str = "NETLB_CONFIG";
    /// Pod addresses by the interface they live behind (source validation).
    pub const POD_SOURCES: &str = "NETLB_POD_SOURCES";
    /// Socket-level load balancing: the frontend a socket's backend stands
    /// for.
    pub const SOCK_REV: &str = "NETLB_SOCK_REV";
    /// loadBalancerSourceRanges: the sources a frontend admits.
    pub const SOURCE_RANGES: &str = "NETLB_SOURCE_RANGES";
    /// Session affinity: the backend a client last got from a frontend.
    pub const AFFINITY: &str = "NETLB_AFFINITY";
    /// Session affinity: which backends belong to which affinity frontend.
    pub const AFFINITY_MATCH: &str = "NETLB_AFFINITY_MATCH";
    /// IPv4 fragments: the ports of a fragmented datagram, from its first
    /// fragment, for the others.
    pub const FRAGMENTS: &str = "NETLB_FRAGMENTS";
    /// Every cluster IP (a port it does not define is rejected).
    pub const CLUSTER_IPS: &str = "NETLB_CLUSTER_IPS";
    /// The Service CIDRs (an address in them that is no cluster IP is
    /// dropped).
    pub const SERVICE_CIDRS: &str = "NETLB_SERVICE_CIDRS";
    /// The in-kernel conntrack collector: its timer and the agent's
    /// heartbeat (a BTF map: the kernel finds the timer through BTF).
    pub const CT_GC: &str = "NETLB_CT_GC";
    /// All maps, in the order the agent pins and reports them.
    pub const ALL: [&str; 16] = [
        SERVICES,
        BACKENDS,
        REV_NAT,
        CONNTRACK,
        STATS,
        BACKEND_STATS,
        CONFIG,
        POD_SOURCES,
        SOCK_REV,
        SOURCE_RANGES,
        AFFINITY,
        AFFINITY_MATCH,
        FRAGMENTS,
        CLUSTER_IPS,
        SERVICE_CIDRS,
        CT_GC,
    ];
}

/// Names of the TC programs in the eBPF object.
pub mod program_names {
    /// TC ingress of a pod's host-side veth: packets leaving the pod.
    pub const FROM_POD: &str = "from_pod";
    /// TC egress of a pod's host-side veth: packets going to the pod.
    pub const TO_POD: &str = "to_pod";
    /// TC ingress of a node uplink: north-south traffic arriving.
    pub const FROM_NETDEV: &str = "from_netdev";
    /// TC egress of a node uplink: north-south traffic leaving.
    pub const TO_NETDEV: &str = "to_netdev";
    /// Every TC program, in load order.
    pub const ALL: [&str; 4] = [FROM_POD, TO_POD, FROM_NETDEV, TO_NETDEV];
    /// Arms the in-kernel conntrack collector's timer (run once by the
    /// agent with `BPF_PROG_TEST_RUN`, never attached).
    pub const CT_GC_ARM: &str = "ct_gc_arm";
    /// cgroup `connect4`: a host socket connecting to a frontend is
    /// connected to a backend instead.
    pub const SOCK_CONNECT4: &str = "sock_connect4";
    /// cgroup `sendmsg4`: a host UDP datagram sent to a frontend goes to a
    /// backend.
    pub const SOCK_SENDMSG4: &str = "sock_sendmsg4";
    /// cgroup `recvmsg4`: a datagram from a socket's backend seems to come
    /// from the frontend.
    pub const SOCK_RECVMSG4: &str = "sock_recvmsg4";
    /// cgroup `getpeername4`: a socket's backend peer reads as the frontend.
    pub const SOCK_GETPEERNAME4: &str = "sock_getpeername4";
    /// The socket-level (cgroup) programs.
    pub const SOCK: [&str; 4] = [
        SOCK_CONNECT4,
        SOCK_SENDMSG4,
        SOCK_RECVMSG4,
        SOCK_GETPEERNAME4,
    ];
}

/// Default map sizes; the agent may override them at load time.
pub mod limits {
    /// `SERVICES` entries: one per frontend plus one per backend slot
    /// (100k single-port Services with 4 endpoints use 500k). The three
    /// service maps are allocated as they fill (`BPF_F_NO_PREALLOC`), so a
    /// large default costs nothing until used.
    pub const MAX_SERVICE_ENTRIES: u32 = 1_048_576;
    /// Distinct backends (address, port, protocol). Backend ids are
    /// `1..=MAX_BACKENDS`; id 0 is never used so that a zeroed value is invalid.
    pub const MAX_BACKENDS: u32 = 524_288;
    /// Reverse NAT entries: one per distinct (VIP, port).
    pub const MAX_REV_NAT: u32 = 262_144;
    /// Conntrack entries (a hash map the agent garbage-collects): two per
    /// east-west connection, two or three per north-south one.
    pub const MAX_CONNTRACK: u32 = 524_288;
    /// Pod addresses known for source validation.
    pub const MAX_POD_SOURCES: u32 = 65_536;
    /// loadBalancerSourceRanges entries (one per frontend and CIDR).
    pub const MAX_SOURCE_RANGES: u32 = 65_536;
    /// Session-affinity clients (an LRU: a lost entry only loses
    /// stickiness).
    pub const MAX_AFFINITY: u32 = 131_072;
    /// (backend, affinity frontend) pairs.
    pub const MAX_AFFINITY_MATCH: u32 = 262_144;
    /// Cluster IPs (one per Service, two for dual-stack ones).
    pub const MAX_CLUSTER_IPS: u32 = 262_144;
    /// Service CIDRs.
    pub const MAX_SERVICE_CIDRS: u32 = 16;
    /// Fragmented datagrams in flight (an LRU: a datagram's entry is only
    /// needed until its last fragment passed).
    pub const MAX_FRAGMENTS: u32 = 8_192;
    /// Socket-level reverse translations (an LRU: one per socket and
    /// backend, only needed while the socket lives).
    pub const MAX_SOCK_REV: u32 = 131_072;
    /// Largest backend count of one frontend (bounded so slot arithmetic can
    /// never overflow `u16`).
    pub const MAX_BACKENDS_PER_SERVICE: u16 = 65_000;
}

/// IP protocol numbers as used in keys (`IPPROTO_*`).
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const SCTP: u8 = 132;
}

/// `ServiceKey::scope` values.
pub mod scope {
    /// The frontend as seen by traffic from outside the node's pods (and the
    /// only scope of services without a split).
    pub const EXTERNAL: u8 = 0;
    /// The in-cluster view of a frontend whose external view differs
    /// (externalTrafficPolicy Local); looked up only when the scope-0 frontend
    /// has [`svc_flags::TWO_SCOPES`](super::svc_flags::TWO_SCOPES).
    pub const INTERNAL: u8 = 1;
}

/// `ServiceValue::flags` bits (slot 0 only).
pub mod svc_flags {
    pub const CLUSTER_IP: u16 = 1 << 0;
    pub const NODE_PORT: u16 = 1 << 1;
    pub const EXTERNAL_IP: u16 = 1 << 2;
    pub const LOAD_BALANCER: u16 = 1 << 3;
    /// Backends restricted to this node's endpoints (a Local traffic policy).
    pub const LOCAL_ONLY: u16 = 1 << 4;
    /// A scope-[`INTERNAL`](super::scope::INTERNAL) frontend exists too.
    pub const TWO_SCOPES: u16 = 1 << 5;
    /// With `count == 0`: endpoints exist but this traffic policy may use
    /// none of them (Local without local endpoints): drop silently, as
    /// kube-proxy's DROP, instead of rejecting.
    pub const DROP: u16 = 1 << 6;
    /// New connections only from the sources in `SOURCE_RANGES` under this
    /// frontend's key (loadBalancerSourceRanges); others are dropped.
    pub const SOURCE_RANGES: u16 = 1 << 7;
    /// sessionAffinity ClientIP: a client's new connections go to the
    /// backend its last one got, while it is still one of the frontend's
    /// (`AFFINITY_MATCH`) and the last was less than the timeout ago. The
    /// timeout (seconds) is in slot 0's `backend_id`, unused otherwise.
    pub const AFFINITY: u16 = 1 << 8;
    /// Set only in the maps of a datapath being replaced (an upgrade or a
    /// resize), with `DROP` and a count of 0: new connections wait (their
    /// SYN is retransmitted) until the new datapath takes over, so that none
    /// is opened in maps that are no longer copied. The slots stay; the
    /// count is restored from them if the migration is abandoned.
    pub const FROZEN: u16 = 1 << 15;
}

/// `BackendValue::flags` bits.
pub mod backend_flags {
    /// The endpoint is terminating (used only as kube-proxy's fallback).
    pub const TERMINATING: u8 = 1 << 0;
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// Conntrack entry kinds (`CtTuple::kind`). One connection is one
/// [`SERVICE`](ct_kind::SERVICE) entry, which holds all of its state; the
/// other kinds are *links*: immutable translations that let packets of the
/// other direction (or of another hook) find the connection. A link is
/// trusted on its own for at most [`ct_timeouts::LINK_REFRESH_S`]; after that,
/// and for every TCP SYN, FIN or RST, the datapath checks it against its
/// connection (deleting it if the connection is gone), so a link never
/// outlives its connection by more than a second of traffic.
pub mod ct_kind {
    /// Client -> frontend, keyed as the client sent it (before DNAT): the
    /// connection itself (backend, state, lifetime, NAT).
    pub const SERVICE: u8 = 0;
    /// Backend -> client (-> service loopback for hairpin flows), keyed as
    /// the backend sends it: an east-west flow's reply, translated by
    /// `to_pod` (`from_pod` for hairpin replies).
    pub const REPLY: u8 = 1;
    /// A north-south flow between client and backend as it crosses an
    /// uplink's egress (`to_netdev`), found from both directions: the key is
    /// normalised ([`ct_normalize`](super::ct_normalize)) and
    /// [`ct_flags::CLIENT_IS_SADDR`](super::ct_flags::CLIENT_IS_SADDR) says
    /// which end is the client. Forward packets get the SNAT source, replies
    /// the frontend as source.
    pub const EGRESS: u8 = 2;
    /// A reply to a source-NATed flow as it arrives at an uplink
    /// (`from_netdev`): remote backend -> node address:NAT port. The key is
    /// the NAT port's reservation (inserted with `BPF_NOEXIST`).
    pub const NAT_IN: u8 = 3;
    /// A UDP flow of the node itself (or masqueraded by the CNI) that left an
    /// uplink from a node address with a source port that is a UDP NodePort
    /// there, keyed as its reply arrives. `from_netdev` leaves such replies
    /// alone instead of opening a Service flow with them.
    pub const HOST: u8 = 4;
}

/// `CtEntry::flags` bits.
pub mod ct_flags {
    /// SERVICE and REPLY: the client is its own backend; the forward packet's
    /// source becomes the service loopback address (`nat_addr`) and the
    /// reply's destination goes back to the client (the reply's source).
    pub const HAIRPIN: u16 = 1 << 0;
    /// SERVICE and EGRESS: the flow is source-NATed to `nat_addr:nat_port`
    /// (north-south, backend on another node).
    pub const SNAT: u16 = 1 << 1;
    /// SERVICE: created at an uplink (north-south); its links are EGRESS
    /// (and NAT_IN with [`SNAT`]) instead of REPLY.
    pub const NORTH_SOUTH: u16 = 1 << 2;
    /// EGRESS: the key's source end is the client.
    pub const CLIENT_IS_SADDR: u16 = 1 << 3;
    /// SERVICE: a packet went through in the reply direction (TCP: the
    /// connection is established once this is set).
    pub const SEEN_REPLY: u16 = 1 << 4;
    /// SERVICE: the client sent a FIN.
    pub const FIN_FWD: u16 = 1 << 5;
    /// SERVICE: the backend sent a FIN.
    pub const FIN_REV: u16 = 1 << 6;
    /// SERVICE: a RST went through (either direction).
    pub const RST: u16 = 1 << 7;
}

/// Connection states, derived from [`ct_flags`]; shared by the datapath and
/// the agent's garbage collector so both agree on every timeout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum CtState {
    /// TCP: SYN seen, no reply yet.
    Opening,
    /// TCP: a reply went through and neither side closed. UDP and other
    /// protocols: any live flow.
    Established,
    /// TCP: a RST, or a FIN from both sides.
    Closing,
}

impl CtState {
    /// The state of a SERVICE entry of protocol `proto` with `flags`.
    #[inline(always)]
    pub const fn of(proto: u8, flags: u16) -> Self {
        const BOTH_FINS: u16 = ct_flags::FIN_FWD | ct_flags::FIN_REV;
        if proto != proto::TCP {
            Self::Established
        } else if flags & ct_flags::RST != 0 || flags & BOTH_FINS == BOTH_FINS {
            Self::Closing
        } else if flags & ct_flags::SEEN_REPLY != 0 {
            Self::Established
        } else {
            Self::Opening
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Opening => "opening",
            Self::Established => "established",
            Self::Closing => "closing",
        }
    }
}

/// Default conntrack timeouts (Cilium's), in seconds. The agent writes the
/// effective ones into [`DatapathConfig`].
pub mod ct_timeouts {
    /// TCP: SYN seen, no reply yet.
    pub const TCP_SYN_S: u32 = 60;
    /// TCP established.
    pub const TCP_ESTABLISHED_S: u32 = 6 * 3600;
    /// TCP after a RST or a FIN from both sides.
    pub const TCP_CLOSE_S: u32 = 10;
    /// UDP and every other protocol.
    pub const OTHER_S: u32 = 60;
    /// How long a link entry is trusted before it is checked against its
    /// connection again; also the granularity of lifetime refreshes.
    pub const LINK_REFRESH_S: u32 = 1;
}

/// Key of the `SERVICES` hash map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    /// Service virtual IPv4 address. Network byte order (`be`).
    pub address_be: u32,
    /// Service port. Network byte order (`be`).
    pub port_be: u16,
    /// 0 = frontend, 1..=count = backend slots. Host byte order.
    pub backend_slot: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// See [`scope`].
    pub scope: u8,
    /// Always zero.
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 12);

/// Value of the `SERVICES` hash map.
///
/// In slot 0 (frontend): `count`, `rev_nat_index` and `flags` are meaningful and
/// `backend_id` is 0. In slots 1..=count: only `backend_id` is meaningful.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ServiceValue {
    /// Backend id (slots >= 1); 0 in the frontend slot. Host byte order.
    pub backend_id: u32,
    /// Reverse NAT index of this frontend. Host byte order.
    pub rev_nat_index: u32,
    /// Number of backend slots (slot 0). 0 means "reject". Host byte order.
    pub count: u16,
    /// See [`svc_flags`]. Host byte order.
    pub flags: u16,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

/// The data of a `SOURCE_RANGES` LPM-trie key: a frontend (its rev-NAT
/// index, protocol and scope) and a source prefix. The trie matches the
/// key's bytes in order, so the frontend part comes first and is always
/// matched whole: a key's prefix length is
/// [`SourceRangeKey::FRONTEND_BITS`] plus the CIDR's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SourceRangeKey {
    /// The frontend's rev-NAT index. Network byte order (`be`): the trie
    /// compares bytes, and one order for every key is all it needs.
    pub rev_nat_index_be: u32,
    /// IP protocol of the frontend.
    pub proto: u8,
    /// Scope of the frontend.
    pub scope: u8,
    /// Always zero (matched as part of the frontend).
    pub pad: [u8; 2],
    /// Source address (the prefix's first bits count). Network byte order.
    pub address_be: u32,
}
const _: () = assert!(core::mem::size_of::<SourceRangeKey>() == 12);

impl SourceRangeKey {
    /// Bits of the key that name the frontend.
    pub const FRONTEND_BITS: u32 = 64;
}

/// Key of the `FRAGMENTS` LRU map: one fragmented datagram as a hook sees
/// it (Cilium's `ipv4_frag_id`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragKey {
    /// Network byte order.
    pub saddr_be: u32,
    /// Network byte order.
    pub daddr_be: u32,
    /// The IPv4 identification. Network byte order.
    pub id_be: u16,
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}
const _: () = assert!(core::mem::size_of::<FragKey>() == 12);

/// Value of `FRAGMENTS`: the datagram's ports. Network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragPorts {
    pub sport_be: u16,
    pub dport_be: u16,
}
const _: () = assert!(core::mem::size_of::<FragPorts>() == 4);

/// A frontend as the affinity maps name it: rev-NAT index, protocol and
/// scope (the rev-NAT index alone is shared by TCP and UDP and both scopes
/// of one address and port).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AffinityFrontend {
    /// Host byte order.
    pub rev_nat_index: u32,
    pub proto: u8,
    pub scope: u8,
    /// Always zero.
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<AffinityFrontend>() == 8);

/// Key of the `AFFINITY` LRU map: a client of a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityKey {
    /// The client's address. Network byte order.
    pub client_be: u32,
    pub frontend: AffinityFrontend,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 12);

/// Value of `AFFINITY`: the backend the client's last new connection got,
/// and when (seconds of `CLOCK_MONOTONIC`). Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AffinityValue {
    pub backend_id: u32,
    pub last_s: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 8);

/// Key of `AFFINITY_MATCH` (value `u8` 1): a backend in the slots of an
/// affinity frontend. An affinity entry whose pair is missing is stale (the
/// backend left the Service) and chooses again.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct AffinityMatchKey {
    /// Host byte order.
    pub backend_id: u32,
    pub frontend: AffinityFrontend,
}
const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 12);

/// Value of the `BACKENDS` hash map, keyed by backend id (`u32`, host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendValue {
    /// Backend (pod) IPv4 address. Network byte order (`be`).
    pub address_be: u32,
    /// Backend (target) port. Network byte order (`be`).
    pub port_be: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// See [`backend_flags`].
    pub flags: u8,
}
const _: () = assert!(core::mem::size_of::<BackendValue>() == 8);

/// Value of the `REV_NAT` hash map, keyed by reverse NAT index (`u32`, host
/// order): the frontend address a reply must appear to come from.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RevNatValue {
    /// Service virtual IPv4 address. Network byte order (`be`).
    pub address_be: u32,
    /// Service port. Network byte order (`be`).
    pub port_be: u16,
    /// Always zero.
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 8);

/// Key of the conntrack map: a 5-tuple as seen on the wire plus the entry
/// kind. Generic over the address so that the IPv6 map reuses the shape with
/// `[u32; 4]` addresses; [`CtKey4`] is the IPv4 key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, PartialOrd, Ord)]
pub struct CtTuple<A> {
    /// Source address. Network byte order.
    pub saddr: A,
    /// Destination address. Network byte order.
    pub daddr: A,
    /// Source port. Network byte order (`be`).
    pub sport_be: u16,
    /// Destination port. Network byte order (`be`).
    pub dport_be: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// See [`ct_kind`].
    pub kind: u8,
    /// Always zero.
    pub pad: [u8; 2],
}
/// The IPv4 conntrack key.
pub type CtKey4 = CtTuple<u32>;
const _: () = assert!(core::mem::size_of::<CtTuple<u32>>() == 16);
const _: () = assert!(core::mem::size_of::<CtTuple<[u32; 4]>>() == 40);

/// Value of the conntrack map. Addresses are network byte order (as the
/// packet holds them), `_be` ports network byte order, the rest host order.
///
/// | field | SERVICE | REPLY | EGRESS | NAT_IN | HOST |
/// | --- | --- | --- | --- | --- | --- |
/// | `target` | backend (DNAT destination) | backend | backend | the client (restored destination) | - |
/// | `nat` | SNAT source (node address and NAT port; service loopback for hairpin) | copy | SNAT source | copy | - |
/// | `frontend` | the frontend | the frontend (replies' source) | the frontend | the frontend | - |
/// | `backend_id`, `rev_nat_index` | the connection's | copies | copies | copies | - |
/// | `lifetime_s` | expiry | trusted until | trusted until | trusted until | expiry |
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct CtEntry<A> {
    pub target_addr: A,
    pub nat_addr: A,
    pub frontend_addr: A,
    /// Network byte order (`be`).
    pub target_port_be: u16,
    /// Network byte order (`be`).
    pub nat_port_be: u16,
    /// Network byte order (`be`).
    pub frontend_port_be: u16,
    /// See [`ct_flags`].
    pub flags: u16,
    pub backend_id: u32,
    pub rev_nat_index: u32,
    /// Seconds of `CLOCK_MONOTONIC` (`bpf_ktime_get_coarse_ns() / 1e9`).
    pub lifetime_s: u32,
    /// When the connection was created, seconds of `CLOCK_MONOTONIC`.
    pub created_s: u32,
    /// TCP: what one side of the connection sent, for the window check of
    /// the other side's RSTs and FINs. SERVICE: the client's; the
    /// connection's reply link (REPLY east-west, EGRESS north-south): the
    /// backend's; unused elsewhere.
    pub win: TcpWin,
}
/// The IPv4 conntrack value.
pub type CtEntry4 = CtEntry<u32>;
const _: () = assert!(core::mem::size_of::<CtEntry<u32>>() == 48);
const _: () = assert!(core::mem::size_of::<CtEntry<[u32; 4]>>() == 84);

/// One side of a TCP connection as the datapath saw it send: the highest
/// acknowledgment number and the largest window it advertised. A RST or FIN
/// from the other side changes the connection's state only when its
/// sequence number lies within what this side would accept (the kernel's
/// conntrack judges segments by the same window, `tcp_in_window`): a blind
/// RST from the Internet, or one forged by another pod, is dropped and
/// counted instead of closing the connection. Host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct TcpWin {
    /// The highest acknowledgment number this side sent: the next sequence
    /// number it expects from the other.
    pub ack: u32,
    /// The largest receive window this side advertised, scaled, in bytes.
    pub win: u32,
    /// This side's window scale (RFC 7323) from its SYN, or
    /// [`TcpWin::SCALE_UNKNOWN`] (the check then assumes the largest).
    pub scale: u8,
    /// [`TcpWin::ACK_SEEN`]: `ack` and `win` hold what this side sent.
    pub flags: u8,
    /// Always zero.
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<TcpWin>() == 12);

impl TcpWin {
    /// This side's SYN was not seen (a connection carried over from an
    /// earlier layout): windows are taken at the largest scale.
    pub const SCALE_UNKNOWN: u8 = 0xff;
    /// RFC 7323's largest shift.
    pub const MAX_SCALE: u8 = 14;
    /// `flags`: `ack` and `win` are known.
    pub const ACK_SEEN: u8 = 1;

    /// A side whose SYN carried window scale `scale` (0 without the
    /// option) and advertised `raw_win` in it (never scaled in a SYN).
    #[inline(always)]
    pub const fn from_syn(scale: u8, raw_win: u16) -> Self {
        Self {
            ack: 0,
            win: raw_win as u32,
            scale: if scale > Self::MAX_SCALE {
                Self::MAX_SCALE
            } else {
                scale
            },
            flags: 0,
            pad: [0; 2],
        }
    }

    /// Records a segment this side sent (`ack` only means something with
    /// `has_ack`; a SYN's window is never scaled). Returns whether
    /// anything changed, so that an unchanged entry is not written.
    #[inline(always)]
    pub fn record(&mut self, syn: bool, has_ack: bool, ack: u32, raw_win: u16) -> bool {
        let mut changed = false;
        if has_ack && (self.flags & Self::ACK_SEEN == 0 || (ack.wrapping_sub(self.ack) as i32) > 0)
        {
            self.ack = ack;
            self.flags |= Self::ACK_SEEN;
            changed = true;
        }
        let shift = if syn {
            0
        } else if self.scale > Self::MAX_SCALE {
            Self::MAX_SCALE
        } else {
            self.scale
        };
        let win = (raw_win as u32) << shift;
        if win > self.win {
            self.win = win;
            changed = true;
        }
        changed
    }

    /// Whether a segment from the other side with sequence number `seq` is
    /// within what this side accepts: `[ack - win - 1, ack + win + 1]`
    /// (liberal below, for retransmissions of what was already
    /// acknowledged). Anything goes while this side's ack is unknown.
    #[inline(always)]
    pub const fn admits(&self, seq: u32) -> bool {
        if self.flags & Self::ACK_SEEN == 0 {
            return true;
        }
        let low = self.ack.wrapping_sub(self.win).wrapping_sub(1);
        let span = self.win.saturating_mul(2).saturating_add(2);
        seq.wrapping_sub(low) <= span
    }
}

/// Normalises an EGRESS key so that both directions of a flow find the same
/// entry: the lower (address, port) end first, compared as stored (any total
/// order works as long as every user applies the same one). Returns whether
/// the ends were swapped.
#[inline(always)]
pub fn ct_normalize(key: &mut CtKey4) -> bool {
    if (key.saddr, key.sport_be) > (key.daddr, key.dport_be) {
        core::mem::swap(&mut key.saddr, &mut key.daddr);
        core::mem::swap(&mut key.sport_be, &mut key.dport_be);
        true
    } else {
        false
    }
}

/// The key of a connection's link of `kind`: REPLY (backend -> client, or
/// -> service loopback for hairpin flows), EGRESS (client <-> backend,
/// normalised) or NAT_IN (backend -> NAT address:port). The inverse of
/// [`ct_link_owner`].
#[inline(always)]
pub fn ct_link_key(conn_key: &CtKey4, conn: &CtEntry4, kind: u8) -> CtKey4 {
    let (daddr, dport_be) = match kind {
        ct_kind::NAT_IN => (conn.nat_addr, conn.nat_port_be),
        ct_kind::REPLY if conn.flags & ct_flags::HAIRPIN != 0 => (conn.nat_addr, conn_key.sport_be),
        _ => (conn_key.saddr, conn_key.sport_be),
    };
    let mut key = CtTuple {
        saddr: conn.target_addr,
        daddr,
        sport_be: conn.target_port_be,
        dport_be,
        proto: conn_key.proto,
        kind,
        pad: [0; 2],
    };
    if kind == ct_kind::EGRESS {
        ct_normalize(&mut key);
    }
    key
}

/// The link kinds a connection has, by its flags (at most two; `None` when
/// unused).
#[inline(always)]
pub fn ct_link_kinds(conn: &CtEntry4) -> [Option<u8>; 2] {
    if conn.flags & ct_flags::NORTH_SOUTH == 0 {
        [Some(ct_kind::REPLY), None]
    } else if conn.flags & ct_flags::SNAT != 0 {
        [Some(ct_kind::EGRESS), Some(ct_kind::NAT_IN)]
    } else {
        [Some(ct_kind::EGRESS), None]
    }
}

/// The SERVICE key a link entry belongs to (its connection).
#[inline(always)]
pub fn ct_link_owner(key: &CtKey4, link: &CtEntry4) -> CtKey4 {
    let (client, client_port) = match key.kind {
        // Hairpin: the client is its own backend, the reply's source.
        ct_kind::REPLY if link.flags & ct_flags::HAIRPIN != 0 => (key.saddr, key.dport_be),
        ct_kind::REPLY => (key.daddr, key.dport_be),
        ct_kind::EGRESS if link.flags & ct_flags::CLIENT_IS_SADDR != 0 => (key.saddr, key.sport_be),
        ct_kind::EGRESS => (key.daddr, key.dport_be),
        // NAT_IN (and anything else): the client is the restored destination.
        _ => (link.target_addr, link.target_port_be),
    };
    CtTuple {
        saddr: client,
        daddr: link.frontend_addr,
        sport_be: client_port,
        dport_be: link.frontend_port_be,
        proto: key.proto,
        kind: ct_kind::SERVICE,
        pad: [0; 2],
    }
}

/// Value of the backend counter array (`BACKEND_STATS`, indexed by backend
/// id). One array shared by the CPUs, added to atomically once per new
/// flow: a per-CPU array would cost its size times the node's CPUs (8 MiB
/// per CPU at the default half a million backends), and per-packet
/// counting would bounce a shared cache line on every packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Flows (new conntrack entries, or connects and sends of host
    /// sockets) that selected this backend. Native endian.
    pub flows: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 8);

/// The datapath's runtime configuration, in slot 0 of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DatapathConfig {
    /// Hairpin source address (service loopback). Network byte order (`be`).
    /// 0 disables hairpin SNAT.
    pub service_loopback_be: u32,
    /// This node's address for source NAT of north-south flows to backends
    /// on other nodes (the address replies come back to). Network byte
    /// order (`be`). 0 disables that SNAT (only local backends then work
    /// from outside).
    pub snat_addr_be: u32,
    /// Conntrack timeouts in seconds (see [`ct_timeouts`]). Host byte order.
    pub timeout_tcp_syn_s: u32,
    pub timeout_tcp_established_s: u32,
    pub timeout_tcp_close_s: u32,
    pub timeout_other_s: u32,
    /// Source ports for north-south SNAT, inclusive. Host byte order.
    pub nat_port_min: u16,
    pub nat_port_max: u16,
    /// The NodePort range, inclusive (replies of host UDP flows from a port
    /// in it are recorded, see [`ct_kind::HOST`]). Host byte order.
    pub nodeport_min: u16,
    pub nodeport_max: u16,
    /// See [`config_flags`]. Host byte order.
    pub flags: u32,
    /// The cluster's pod network (kube-proxy's `--cluster-cidr`): traffic
    /// arriving at an uplink from a source in it is in-cluster traffic
    /// (kube-proxy's detect-local). Network byte order; with
    /// `cluster_mask_be` 0, no source is (the feature is off).
    pub cluster_cidr_be: u32,
    /// The network namespace cookie of the node (the agent's own): the
    /// socket-level programs rewrite only sockets of this namespace; pods
    /// keep the TC path while an agent runs (see [`CtGc::AGENT_AWAY_S`]).
    /// 0 turns them off. Host byte order.
    pub host_netns_cookie: u64,
    /// Netmask of `cluster_cidr_be`. Network byte order.
    pub cluster_mask_be: u32,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 56);

impl DatapathConfig {
    /// Whether `saddr_be` is a pod address of the cluster (`--cluster-cidr`).
    #[inline(always)]
    pub const fn from_cluster(&self, saddr_be: u32) -> bool {
        self.cluster_mask_be != 0 && saddr_be & self.cluster_mask_be == self.cluster_cidr_be
    }
}

impl DatapathConfig {
    /// The timeout of a connection in `state` (protocol `proto`), seconds.
    #[inline(always)]
    pub const fn timeout_s(&self, proto: u8, state: CtState) -> u32 {
        if proto != proto::TCP {
            return self.timeout_other_s;
        }
        match state {
            CtState::Opening => self.timeout_tcp_syn_s,
            CtState::Established => self.timeout_tcp_established_s,
            CtState::Closing => self.timeout_tcp_close_s,
        }
    }
}

/// `DatapathConfig::flags` bits.
pub mod config_flags {
    /// Drop packets from pod interfaces that would open, close or reopen a
    /// Service connection with a source address registered behind another
    /// interface (`POD_SOURCES`).
    pub const VALIDATE_SOURCE: u32 = 1 << 0;
    /// `SERVICE_CIDRS` holds the Service CIDRs: new connections to their
    /// unallocated addresses are dropped.
    pub const SERVICE_CIDRS: u32 = 1 << 1;
}

/// Defaults of the NAT port and NodePort ranges.
pub mod port_ranges {
    /// North-south SNAT ports: below the NodePort range and the kernel's
    /// default ephemeral range (32768-60999), so that neither a node
    /// port nor a host connection's port is ever handed out as a NAT port.
    pub const NAT_MIN: u16 = 1024;
    pub const NAT_MAX: u16 = 29_999;
    /// Kubernetes' default `--service-node-port-range`.
    pub const NODEPORT_MIN: u16 = 30_000;
    pub const NODEPORT_MAX: u16 = 32_767;
}

/// The kernel's `struct bpf_timer` (`include/uapi/linux/bpf.h`): opaque,
/// 16 bytes, 8-byte aligned. The kernel finds a map value's timer by this
/// BTF type name, so the name must stay `bpf_timer`. Userspace never sees
/// its contents (lookups return it zeroed, updates leave it alone).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct bpf_timer {
    pub opaque: [u64; 2],
}
const _: () = assert!(core::mem::size_of::<bpf_timer>() == 16);

/// Value of the `CT_GC` array: the in-kernel conntrack collector. The
/// datapath reclaims expired connections itself when the agent is away
/// (stopped, crashed, being upgraded): the timer fires every `interval_ms`
/// and sweeps the table unless the agent's collector swept it recently
/// (`agent_sweep_s`), or at once when an insert found the table full
/// (`force`).
///
/// Two slots, because a userspace update of a value cancels and frees the
/// timer in it: slot [`CtGc::KERNEL`] holds the timer and what the
/// datapath writes (`kernel_sweep_s`, `force`) and is never written by
/// userspace; slot [`CtGc::AGENT`] holds what the agent writes
/// (`interval_ms`, `agent_sweep_s`; its timer is never used). Host byte
/// order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CtGc {
    /// Kernel-managed (slot `KERNEL` only).
    pub timer: bpf_timer,
    /// Slot `AGENT`: the sweep period, milliseconds (the agent's
    /// `--conntrack-gc-interval`).
    pub interval_ms: u32,
    /// Slot `AGENT`: when the agent's collector last swept (seconds of
    /// `CLOCK_MONOTONIC`).
    pub agent_sweep_s: u32,
    /// Slot `KERNEL`: when the kernel last swept (seconds of
    /// `CLOCK_MONOTONIC`).
    pub kernel_sweep_s: u32,
    /// Slot `KERNEL`: set by the datapath when an insert failed for a full
    /// table: the next timer run sweeps whatever the agent did.
    pub force: u32,
    /// Slot `AGENT`: when the agent last said it runs (seconds of
    /// `CLOCK_MONOTONIC`, every second; 0 when it stopped). While it is
    /// away ([`CtGc::AGENT_AWAY_S`]), the socket-level programs serve pod
    /// sockets too: a pod created meanwhile has no TC programs on its
    /// interface.
    pub alive_s: u32,
    /// Always zero.
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<CtGc>() == 40);

impl CtGc {
    /// The datapath's slot (the timer).
    pub const KERNEL: u32 = 0;
    /// The agent's slot.
    pub const AGENT: u32 = 1;
    /// Slots of the array.
    pub const SLOTS: u32 = 2;
    /// The agent is away once its `alive_s` is this many seconds old.
    pub const AGENT_AWAY_S: u32 = 3;

    /// Whether the agent (slot `AGENT`) is away at `now`.
    #[inline(always)]
    pub const fn agent_away(agent: &Self, now: u32) -> bool {
        agent.alive_s == 0 || now.wrapping_sub(agent.alive_s) > Self::AGENT_AWAY_S
    }

    /// The sweep period of `agent` (slot `AGENT`), at least a second.
    #[inline(always)]
    pub const fn period_ms(agent: &Self) -> u32 {
        if agent.interval_ms < 1000 {
            1000
        } else {
            agent.interval_ms
        }
    }

    /// Whether the kernel sweeps at `now`, from its slot and the agent's:
    /// the agent has not swept for two periods (plus a second of clock
    /// granularity), or a full table asked for it; at most once a second
    /// either way.
    #[inline(always)]
    pub const fn kernel_sweeps(kernel: &Self, agent: &Self, now: u32) -> bool {
        let period_s = Self::period_ms(agent).div_ceil(1000);
        let agent_away = now.wrapping_sub(agent.agent_sweep_s) > 2 * period_s + 1;
        let rested = now != kernel.kernel_sweep_s;
        (agent_away || kernel.force != 0) && rested
    }
}

/// Key of the socket-level reverse translation map (`SOCK_REV`): a socket
/// and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevKey {
    /// `bpf_get_socket_cookie()`. Host byte order.
    pub cookie: u64,
    /// Backend address. Network byte order.
    pub backend_addr: u32,
    /// Backend port. Network byte order (`be`).
    pub backend_port_be: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// Always zero.
    pub pad: u8,
}
const _: () = assert!(core::mem::size_of::<SockRevKey>() == 16);

/// Value of `SOCK_REV`: the frontend the socket addressed.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SockRevValue {
    /// Frontend address. Network byte order.
    pub frontend_addr: u32,
    /// Frontend port. Network byte order (`be`).
    pub frontend_port_be: u16,
    /// Always zero.
    pub pad: u16,
    /// The frontend's rev-NAT index. Host byte order.
    pub rev_nat_index: u32,
}
const _: () = assert!(core::mem::size_of::<SockRevValue>() == 12);

/// Counters in the per-CPU `STATS` array. Indices double as metric label
/// values through [`stat::NAMES`]. Drop reasons are the `DROP_*` entries; the
/// others count packets that were passed or handled.
pub mod stat {
    /// Packets DNATed to a backend (forward path).
    pub const FORWARD_NAT: u32 = 0;
    /// Replies reverse-NATed back to the frontend address.
    pub const REVERSE_NAT: u32 = 1;
    /// New connections (conntrack entries created).
    pub const NEW_FLOW: u32 = 2;
    /// Hairpin flows (client is its own backend), source-NATed.
    pub const HAIRPIN: u32 = 3;
    /// New connections to a frontend with no backends, answered with ICMP
    /// port unreachable as kube-proxy's REJECT does.
    pub const REJECT: u32 = 4;
    /// Tracked connections that could not be kept (their frontend changed
    /// identity, or they expired) and selected a backend anew.
    pub const CT_RESELECT: u32 = 5;
    /// IPv4 packets with options: passed unmodified (not load-balanced).
    pub const PASS_IP_OPTIONS: u32 = 6;
    /// IPv4 fragments that arrived before their datagram's first fragment:
    /// passed unmodified (their ports are unknown).
    pub const PASS_FRAGMENT: u32 = 7;
    /// North-south flows source-NATed to the node address (backend on
    /// another node).
    pub const SNAT_FLOW: u32 = 8;
    /// Replies of source-NATed flows restored to the client at the uplink.
    pub const SNAT_REVERSE: u32 = 9;
    /// ICMP errors about a translated flow, translated (outer and quoted
    /// headers).
    pub const ICMP_ERROR_NAT: u32 = 10;
    /// A TCP SYN found a closing connection on its tuple and replaced it.
    pub const CT_REOPEN: u32 = 11;
    /// Packets to a node port that cannot open a connection (not a SYN) and
    /// belong to no tracked one: left to the node's stack.
    pub const PASS_NOT_NEW: u32 = 12;
    /// Replies of the node's own UDP flows from a NodePort-range port,
    /// left alone instead of opening a Service flow.
    pub const PASS_HOST_FLOW: u32 = 13;
    /// Links found stale (their connection gone) and removed.
    pub const CT_STALE_LINK: u32 = 14;
    /// Sockets connected (or UDP datagrams sent) to a backend instead of a
    /// frontend, by the socket-level programs: host sockets, and pod
    /// sockets while no agent runs ([`SOCK_LB_POD`] counts those too).
    pub const SOCK_LB: u32 = 25;
    /// Sockets refused at connect/sendmsg: a frontend without endpoints
    /// (or without an endpoint allowed here).
    pub const SOCK_REJECT: u32 = 26;
    /// Sockets whose peer (or datagram source) was shown as the frontend.
    pub const SOCK_REV_NAT: u32 = 27;
    /// Dropped: IPv4 header truncated or not version 4.
    pub const DROP_MALFORMED_L3: u32 = 15;
    /// Dropped: L4 header of a TCP/UDP packet truncated.
    pub const DROP_TRUNCATED_L4: u32 = 16;
    /// Dropped: a backend slot or backend referenced by a frontend is missing
    /// (the agent is mid-update or the maps are inconsistent).
    pub const DROP_NO_BACKEND_ENTRY: u32 = 17;
    /// Dropped: the conntrack table is full (a new connection could not be
    /// tracked).
    pub const DROP_CT_FULL: u32 = 18;
    /// Dropped: a packet rewrite helper failed.
    pub const DROP_REWRITE: u32 = 19;
    /// Dropped: building the reject reply failed.
    pub const DROP_REJECT_FAILED: u32 = 20;
    /// Dropped: a Local traffic policy without local endpoints.
    pub const DROP_NO_LOCAL_ENDPOINTS: u32 = 21;
    /// Dropped: no free source-NAT port for a new north-south flow.
    pub const DROP_NAT_PORTS: u32 = 22;
    /// Dropped: a TCP packet to a Service address that cannot open a
    /// connection (no SYN) and belongs to no tracked one (kube-proxy's
    /// `ct state invalid` drop).
    pub const DROP_CT_INVALID: u32 = 23;
    /// Dropped: a pod sent a packet with a source address that belongs to
    /// another pod interface.
    pub const DROP_SPOOFED_SOURCE: u32 = 24;
    /// Dropped: a new connection to a load-balancer IP from a source outside
    /// the Service's loadBalancerSourceRanges.
    pub const DROP_SOURCE_RANGE: u32 = 28;
    /// Dropped: a new connection from a pod or host process to an address
    /// of the Service CIDRs that no Service has (kube-proxy nftables'
    /// "drop traffic to unallocated ClusterIPs").
    pub const DROP_UNALLOCATED_SERVICE_IP: u32 = 29;
    /// A new connection's first backend was passed over: another live
    /// connection of the same client tuple (the client reached that backend
    /// through another frontend from the same source port) already has the
    /// reply tuple it would have.
    pub const CT_TUPLE_AVOIDED: u32 = 30;
    /// Dropped: a new connection whose reply tuple is another live
    /// connection's with every backend tried (the client retransmits).
    pub const DROP_TUPLE_COLLISION: u32 = 31;
    /// Sweeps of the in-kernel conntrack collector (the agent was away, or
    /// the table was full).
    pub const CT_GC_KERNEL_SWEEPS: u32 = 32;
    /// Entries the in-kernel collector deleted (expired connections, their
    /// links, links without a connection, expired host flows).
    pub const CT_GC_KERNEL_DELETED: u32 = 33;
    /// Dropped: a TCP RST or FIN outside the window its connection expects
    /// (a blind or forged one); the connection's state is left alone, as
    /// the kernel's conntrack ignores out-of-window segments.
    pub const DROP_CT_OUT_OF_WINDOW: u32 = 34;
    /// Dropped: a packet that names a connection opened at another kind of
    /// hook (an outside client's tuple sent by a pod, a pod's tuple arriving
    /// from outside): a forged source.
    pub const DROP_CT_WRONG_SIDE: u32 = 35;
    /// Nanoseconds the in-kernel collector spent sweeping (its cost: a
    /// sweep runs in softirq context).
    pub const CT_GC_KERNEL_NS: u32 = 36;
    /// Pod sockets connected (or UDP datagrams sent) to a backend by the
    /// socket-level programs because the agent was away (also counted in
    /// `SOCK_LB`).
    pub const SOCK_LB_POD: u32 = 37;
    /// Number of counters.
    pub const COUNT: u32 = 38;
    /// Slots of the `STATS` array: room for counters added later without
    /// changing the map's shape (an upgrade then keeps it as it is).
    pub const CAPACITY: u32 = 64;

    /// Metric label of each counter, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "forward_nat",
        "reverse_nat",
        "new_flow",
        "hairpin",
        "reject",
        "ct_reselect",
        "pass_ip_options",
        "pass_fragment",
        "snat_flow",
        "snat_reverse",
        "icmp_error_nat",
        "ct_reopen",
        "pass_not_new",
        "pass_host_flow",
        "ct_stale_link",
        "drop_malformed_l3",
        "drop_truncated_l4",
        "drop_no_backend_entry",
        "drop_ct_full",
        "drop_rewrite",
        "drop_reject_failed",
        "drop_no_local_endpoints",
        "drop_nat_ports",
        "drop_ct_invalid",
        "drop_spoofed_source",
        "sock_lb",
        "sock_reject",
        "sock_rev_nat",
        "drop_source_range",
        "drop_unallocated_service_ip",
        "ct_tuple_avoided",
        "drop_tuple_collision",
        "ct_gc_kernel_sweeps",
        "ct_gc_kernel_deleted",
        "drop_ct_out_of_window",
        "drop_ct_wrong_side",
        "ct_gc_kernel_ns",
        "sock_lb_pod",
    ];

    /// Whether the counter is a drop reason.
    pub const fn is_drop(index: u32) -> bool {
        (index >= DROP_MALFORMED_L3 && index <= DROP_SPOOFED_SOURCE)
            || index == DROP_SOURCE_RANGE
            || index == DROP_UNALLOCATED_SERVICE_IP
            || index == DROP_TUPLE_COLLISION
            || index == DROP_CT_OUT_OF_WINDOW
            || index == DROP_CT_WRONG_SIDE
    }
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all types are `#[repr(C)]`, contain only integers and have
    // explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for ServiceKey {}
    unsafe impl aya::Pod for ServiceValue {}
    unsafe impl aya::Pod for BackendValue {}
    unsafe impl aya::Pod for RevNatValue {}
    unsafe impl aya::Pod for SourceRangeKey {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityValue {}
    unsafe impl aya::Pod for AffinityMatchKey {}
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for CtTuple<u32> {}
    unsafe impl aya::Pod for CtEntry<u32> {}
    unsafe impl aya::Pod for SockRevKey {}
    unsafe impl aya::Pod for SockRevValue {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for DatapathConfig {}
    unsafe impl aya::Pod for CtGc {}
    unsafe impl aya::Pod for TcpWin {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A side that acknowledged up to 1,000,000 with a 64 KiB window
    /// (scale 7: 512 raw).
    fn side() -> TcpWin {
        let mut w = TcpWin::from_syn(7, 64_240);
        assert!(w.record(false, true, 1_000_000, 512));
        w
    }

    #[test]
    fn a_segment_in_the_window_is_admitted_and_one_outside_is_not() {
        let w = side();
        assert_eq!(w.win, 512 << 7, "scaled, larger than the SYN's");
        for seq in [
            1_000_000,
            1_000_000 + 65_537,
            1_000_000 - 1,
            1_000_000 - 65_537,
        ] {
            assert!(w.admits(seq), "{seq}");
        }
        for seq in [1_000_000 + 65_538, 1_000_000 - 65_538, 0, 3_000_000_000] {
            assert!(!w.admits(seq), "{seq}");
        }
    }

    #[test]
    fn acks_only_move_forward_across_the_sequence_wrap() {
        let mut w = TcpWin::from_syn(0, 1000);
        assert!(w.record(false, true, u32::MAX - 10, 1000));
        assert!(w.record(false, true, 5, 1000), "wrapped forward");
        assert!(!w.record(false, true, u32::MAX - 100, 1000), "old ack");
        assert_eq!(w.ack, 5);
        assert!(w.admits(u32::MAX - 500));
        assert!(w.admits(900));
        assert!(!w.admits(2000));
    }

    #[test]
    fn an_unknown_side_admits_everything_and_an_unknown_scale_is_the_largest() {
        assert!(TcpWin::default().admits(12345));
        let mut w = TcpWin {
            scale: TcpWin::SCALE_UNKNOWN,
            ..Default::default()
        };
        w.record(false, true, 10, 1);
        assert_eq!(w.win, 1 << TcpWin::MAX_SCALE);
    }
}
