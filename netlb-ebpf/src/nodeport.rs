//! North-south flows at the node uplinks (Cilium's `bpf/lib/nodeport.h`,
//! reduced to what kube-proxy does with netfilter): `from_netdev` DNATs
//! traffic to NodePorts, external IPs and load-balancer IPs like PREROUTING,
//! the kernel routes it, and `to_netdev` applies the source-side rewrites like
//! POSTROUTING. Keeping the kernel's routing between the two halves means no
//! packet is ever seen by the stack with a local source address arriving
//! from outside (which it would drop as martian).
//!
//! A flow from client C to frontend F whose backend B is on another node
//! (externalTrafficPolicy Cluster) is source-NATed to the node address N and
//! a NAT port P, so that B's replies come back through this node:
//!
//! | entry (direction) | key | used by | does |
//! | --- | --- | --- | --- |
//! | SERVICE | C -> F | `from_netdev` | DNAT to B (established flows) |
//! | OUT + SNAT | C -> B | `to_netdev` | source C -> N:P |
//! | NAT_IN | B -> N:P | `from_netdev` | destination N:P -> C (reply) |
//! | OUT + REV | B -> C | `to_netdev` | source B -> F (reply) |
//!
//! A local backend needs only SERVICE and OUT + REV: the client's address
//! reaches the pod, and the reply leaves through the uplink.

use aya_ebpf::{helpers::bpf_get_prandom_u32, programs::TcContext};
use netlb_common::{backend_flags, ct_dir, ct_flags, stat};

use crate::{
    conntrack,
    lb::{Frontend, Selected},
    maps, nat,
    parse::Packet,
    verdict::Reason,
};

/// NAT ports, as Cilium's default `NODEPORT_PORT_MIN_NAT..=MAX_NAT`: above
/// the NodePort range. The client's own port is kept when it is in range.
const NAT_PORT_MIN: u32 = 32_768;
const NAT_PORT_MAX: u32 = 65_535;
/// Reservation attempts before giving up on a new flow. Bounded and
/// constant so the verifier sees a finite loop.
const NAT_PORT_ATTEMPTS: u32 = 16;

/// Creates the conntrack entries of a new north-south flow (see the module
/// table). Reply-side entries go first, so that no reply can arrive before
/// its translation exists.
#[inline(always)]
pub fn create_flow(
    pkt: &Packet,
    fe: &Frontend,
    sel: &Selected,
    snat_addr_be: u32,
) -> Result<(), Reason> {
    let b = &sel.backend;
    let rev = fe.value.rev_nat_index;
    let mut service_flags = 0;
    if b.flags & backend_flags::LOCAL == 0 && snat_addr_be != 0 {
        let port_be = reserve_port(pkt, b.address_be, b.port_be, snat_addr_be)?;
        conntrack::put(
            &conntrack::tuple(
                pkt.saddr_be,
                pkt.sport_be,
                b.address_be,
                b.port_be,
                pkt.proto,
                ct_dir::OUT,
            ),
            &conntrack::value(sel.id, rev, (snat_addr_be, port_be), ct_flags::SNAT),
        )?;
        service_flags = ct_flags::SNAT;
        maps::count(stat::SNAT_FLOW);
    }
    conntrack::put(
        &conntrack::tuple(
            b.address_be,
            b.port_be,
            pkt.saddr_be,
            pkt.sport_be,
            pkt.proto,
            ct_dir::OUT,
        ),
        &conntrack::value(sel.id, rev, (0, 0), ct_flags::REV),
    )?;
    conntrack::put(
        &conntrack::key(pkt, ct_dir::SERVICE),
        &conntrack::value(sel.id, rev, (0, 0), service_flags),
    )
}

/// Reserves a NAT port for `pkt`'s flow to the backend by inserting its
/// NAT_IN entry with `BPF_NOEXIST` (atomic across CPUs). Returns the port
/// (network byte order).
#[inline(always)]
fn reserve_port(
    pkt: &Packet,
    backend_addr_be: u32,
    backend_port_be: u16,
    snat_addr_be: u32,
) -> Result<u16, Reason> {
    let value = conntrack::value(0, 0, (pkt.saddr_be, pkt.sport_be), 0);
    let client_port = u16::from_be(pkt.sport_be) as u32;
    let mut port = if client_port >= NAT_PORT_MIN {
        client_port
    } else {
        random_port()
    };
    for _ in 0..NAT_PORT_ATTEMPTS {
        // `port` is within NAT_PORT_MIN..=NAT_PORT_MAX, so it fits u16.
        let port_be = (port as u16).to_be();
        let key = conntrack::tuple(
            backend_addr_be,
            backend_port_be,
            snat_addr_be,
            port_be,
            pkt.proto,
            ct_dir::NAT_IN,
        );
        if conntrack::put_new(&key, &value) {
            return Ok(port_be);
        }
        // The same client tuple again (its SERVICE entry was evicted, or
        // it starts a new connection after the old one closed): keep its
        // port, with a fresh entry.
        if let Some(existing) = conntrack::lookup(&key)
            && existing.nat_addr_be == pkt.saddr_be
            && existing.nat_port_be == pkt.sport_be
        {
            conntrack::put(&key, &value)?;
            return Ok(port_be);
        }
        port = random_port();
    }
    Err(Reason::NatPorts)
}

#[inline(always)]
fn random_port() -> u32 {
    // SAFETY: helper without preconditions.
    let r = unsafe { bpf_get_prandom_u32() };
    NAT_PORT_MIN + r % (NAT_PORT_MAX - NAT_PORT_MIN + 1)
}

/// `from_netdev`: a reply to a source-NATed flow gets its client back as
/// destination. Returns whether the packet was one.
#[inline(always)]
pub fn restore_reply(ctx: &TcContext, pkt: &Packet) -> Result<bool, Reason> {
    let Some(entry) = conntrack::lookup_flow(&conntrack::key(pkt, ct_dir::NAT_IN), pkt) else {
        return Ok(false);
    };
    nat::dnat(ctx, pkt, entry.nat_addr_be, entry.nat_port_be)?;
    maps::count(stat::SNAT_REVERSE);
    Ok(true)
}

/// `to_netdev`: source rewrites of tracked north-south flows leaving the
/// node: SNAT towards remote backends, reverse NAT of replies to clients.
#[inline(always)]
pub fn egress(ctx: &TcContext, pkt: &Packet) -> Result<(), Reason> {
    let Some(entry) = conntrack::lookup_flow(&conntrack::key(pkt, ct_dir::OUT), pkt) else {
        return Ok(());
    };
    if entry.flags & ct_flags::SNAT != 0 {
        return nat::snat(ctx, pkt, entry.nat_addr_be, entry.nat_port_be);
    }
    if entry.flags & ct_flags::REV != 0 && nat::source_to_frontend(ctx, pkt, entry.rev_nat_index)? {
        maps::count(stat::REVERSE_NAT);
    }
    Ok(())
}
