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
#![no_std]

/// An IPv4 address as `_be` fields hold it: its wire bytes in memory order
/// (so `from_ne_bytes` of the octets, whatever the host's byte order).
pub fn be_addr(ip: core::net::Ipv4Addr) -> u32 {
    u32::from_ne_bytes(ip.octets())
}

/// The address a `_be` field holds (inverse of [`be_addr`]).
pub fn from_be_addr(be: u32) -> core::net::Ipv4Addr {
    core::net::Ipv4Addr::from(be.to_ne_bytes())
}

/// Names of the maps in the eBPF object; the agent finds them by these names
/// and pins them under `<bpffs>/<name>`.
pub mod map_names {
    pub const SERVICES: &str = "NETLB_SERVICES";
    pub const BACKENDS: &str = "NETLB_BACKENDS";
    pub const REV_NAT: &str = "NETLB_REV_NAT";
    pub const CONNTRACK: &str = "NETLB_CT";
    pub const STATS: &str = "NETLB_STATS";
    pub const BACKEND_STATS: &str = "NETLB_BACKEND_STATS";
    pub const CONFIG: &str = "NETLB_CONFIG";
    /// All maps, in the order the agent pins and reports them.
    pub const ALL: [&str; 7] = [
        SERVICES,
        BACKENDS,
        REV_NAT,
        CONNTRACK,
        STATS,
        BACKEND_STATS,
        CONFIG,
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
    /// Every program, in load order.
    pub const ALL: [&str; 4] = [FROM_POD, TO_POD, FROM_NETDEV, TO_NETDEV];
}

/// Default map sizes; the agent may override them at load time.
pub mod limits {
    /// `SERVICES` entries: one per frontend plus one per backend slot.
    pub const MAX_SERVICE_ENTRIES: u32 = 262_144;
    /// Distinct backends (address, port, protocol). Backend ids are
    /// `1..=MAX_BACKENDS`; id 0 is never used so that a zeroed value is invalid.
    pub const MAX_BACKENDS: u32 = 262_144;
    /// Reverse NAT entries: one per distinct (VIP, port).
    pub const MAX_REV_NAT: u32 = 131_072;
    /// Conntrack entries (LRU): two per tracked flow.
    pub const MAX_CONNTRACK: u32 = 524_288;
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
}

/// `BackendValue::flags` bits.
pub mod backend_flags {
    /// The endpoint is terminating (used only as kube-proxy's fallback).
    pub const TERMINATING: u8 = 1 << 0;
    /// The endpoint runs on this node.
    pub const LOCAL: u8 = 1 << 1;
}

/// `ConntrackKey::direction` values.
pub mod ct_dir {
    /// Client -> VIP, keyed as the client sent it (before DNAT).
    pub const SERVICE: u8 = 0;
    /// Backend -> client, keyed as the backend sends it (before reverse NAT).
    /// Translated by `to_pod` (east-west flows).
    pub const REPLY: u8 = 1;
    /// A north-south flow's packet as it leaves through an uplink (`to_netdev`,
    /// after routing): client -> remote backend (source NAT to the node,
    /// [`ct_flags::SNAT`](super::ct_flags::SNAT)) or backend -> client
    /// (reverse NAT to the frontend, [`ct_flags::REV`](super::ct_flags::REV)).
    pub const OUT: u8 = 2;
    /// A reply to a source-NATed flow as it arrives at an uplink
    /// (`from_netdev`): remote backend -> node address:NAT port. Its value's
    /// `nat_addr_be`/`nat_port_be` hold the client to restore as destination.
    /// The key doubles as the NAT port reservation.
    pub const NAT_IN: u8 = 3;
}

/// `ConntrackValue::flags` bits.
pub mod ct_flags {
    /// The flow was source-NATed to the service loopback address (hairpin):
    /// the reply's destination must be restored to `nat_addr_be`.
    pub const HAIRPIN: u16 = 1 << 0;
    /// OUT entry: rewrite the source to `nat_addr_be`:`nat_port_be` (a
    /// north-south flow to a backend on another node, externalTrafficPolicy
    /// Cluster). On a SERVICE entry: the flow is source-NATed.
    pub const SNAT: u16 = 1 << 1;
    /// OUT entry: rewrite the source to the frontend of `rev_nat_index`.
    pub const REV: u16 = 1 << 2;
    /// A TCP FIN or RST went through this entry: the connection is closing.
    /// A SYN that finds a closing entry starts a new connection on a reused
    /// tuple, so the entry is stale: it is removed rather than applied (the
    /// part of netfilter's TCP state tracking that matters for NAT).
    pub const CLOSING: u16 = 1 << 3;
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

/// Key of the `CT` (conntrack) LRU hash map: a 5-tuple as seen on the wire
/// plus the direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConntrackKey {
    /// Source IPv4 address. Network byte order (`be`).
    pub saddr_be: u32,
    /// Destination IPv4 address. Network byte order (`be`).
    pub daddr_be: u32,
    /// Source port. Network byte order (`be`).
    pub sport_be: u16,
    /// Destination port. Network byte order (`be`).
    pub dport_be: u16,
    /// IP protocol, see [`proto`].
    pub proto: u8,
    /// See [`ct_dir`].
    pub direction: u8,
    /// Always zero.
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<ConntrackKey>() == 16);

/// Value of the `CT` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConntrackValue {
    /// Selected backend (SERVICE entries). Host byte order.
    pub backend_id: u32,
    /// Reverse NAT index of the frontend. Host byte order.
    pub rev_nat_index: u32,
    /// The address a NAT puts in: REPLY entries of hairpin flows and NAT_IN
    /// entries, the client's real address (the reply's destination); OUT
    /// entries with [`ct_flags::SNAT`], the node address (the source). Network
    /// byte order (`be`); 0 otherwise.
    pub nat_addr_be: u32,
    /// See [`ct_flags`]. Host byte order.
    pub flags: u16,
    /// The port that goes with `nat_addr_be` (NAT_IN: the client's port;
    /// OUT with SNAT: the allocated NAT port). Network byte order (`be`); 0
    /// when unused.
    pub nat_port_be: u16,
    /// `bpf_ktime_get_ns()` of the last packet seen. Host byte order.
    pub last_seen_ns: u64,
}
const _: () = assert!(core::mem::size_of::<ConntrackValue>() == 24);

/// Value of the per-backend counter array (`BACKEND_STATS`, indexed by
/// backend id). Updated with atomic adds, so one array serves all CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Flows (new conntrack entries) that selected this backend.
    pub flows: u64,
    /// Packets DNATed to this backend.
    pub packets: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 16);

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
}
const _: () = assert!(core::mem::size_of::<DatapathConfig>() == 8);

/// Counters in the per-CPU `STATS` array. Indices double as metric label
/// values through [`stat::NAMES`]. Drop reasons are the `DROP_*` entries; the
/// others count packets that were passed or handled.
pub mod stat {
    /// Packets DNATed to a backend (forward path).
    pub const FORWARD_NAT: u32 = 0;
    /// Replies reverse-NATed back to the frontend address.
    pub const REVERSE_NAT: u32 = 1;
    /// New flows (conntrack entries created).
    pub const NEW_FLOW: u32 = 2;
    /// Hairpin flows (client is its own backend), source-NATed.
    pub const HAIRPIN: u32 = 3;
    /// Packets to a frontend with no backends, answered with ICMP port
    /// unreachable as kube-proxy's REJECT does.
    pub const REJECT: u32 = 4;
    /// Conntrack entries whose backend was gone; a new backend was selected.
    pub const CT_RESELECT: u32 = 5;
    /// IPv4 packets with options: passed unmodified (not load-balanced).
    pub const PASS_IP_OPTIONS: u32 = 6;
    /// IPv4 fragments: passed unmodified (not load-balanced).
    pub const PASS_FRAGMENT: u32 = 7;
    /// Dropped: IPv4 header truncated or not version 4.
    pub const DROP_MALFORMED_L3: u32 = 8;
    /// Dropped: L4 header of a TCP/UDP packet truncated.
    pub const DROP_TRUNCATED_L4: u32 = 9;
    /// Dropped: a backend slot or backend referenced by a frontend is missing
    /// (the agent is mid-update or the maps are inconsistent).
    pub const DROP_NO_BACKEND_ENTRY: u32 = 10;
    /// Dropped: conntrack entry could not be written.
    pub const DROP_CT_WRITE: u32 = 11;
    /// Dropped: a packet rewrite helper failed.
    pub const DROP_REWRITE: u32 = 12;
    /// Dropped: building the reject reply failed.
    pub const DROP_REJECT_FAILED: u32 = 13;
    /// Dropped: a Local traffic policy without local endpoints.
    pub const DROP_NO_LOCAL_ENDPOINTS: u32 = 14;
    /// North-south flows source-NATed to the node address (backend on
    /// another node).
    pub const SNAT_FLOW: u32 = 15;
    /// Replies of source-NATed flows restored to the client at the uplink.
    pub const SNAT_REVERSE: u32 = 16;
    /// Dropped: no free source-NAT port for a new north-south flow.
    pub const DROP_NAT_PORTS: u32 = 17;
    /// Number of counters.
    pub const COUNT: u32 = 18;

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
        "drop_malformed_l3",
        "drop_truncated_l4",
        "drop_no_backend_entry",
        "drop_ct_write",
        "drop_rewrite",
        "drop_reject_failed",
        "drop_no_local_endpoints",
        "snat_flow",
        "snat_reverse",
        "drop_nat_ports",
    ];

    /// Whether the counter is a drop reason.
    pub const fn is_drop(index: u32) -> bool {
        (index >= DROP_MALFORMED_L3 && index <= DROP_NO_LOCAL_ENDPOINTS) || index == DROP_NAT_PORTS
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
    unsafe impl aya::Pod for ConntrackKey {}
    unsafe impl aya::Pod for ConntrackValue {}
    unsafe impl aya::Pod for BackendStats {}
    unsafe impl aya::Pod for DatapathConfig {}
}
