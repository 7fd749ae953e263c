//! netlb datapath: TC programs for Kubernetes Service load balancing.
//!
//! - `from_pod` (TC ingress of a pod's host-side veth): packets the pod sends.
//!   Service frontends are DNATed to a backend; replies of hairpinned flows
//!   (sent to the service loopback address) are reverse-translated.
//! - `to_pod` (TC egress of a pod's host-side veth): packets going to the pod.
//!   Replies from backends are reverse-NATed so the client sees VIP:port.
//! - `from_netdev` (TC ingress of a node uplink): NodePorts, external IPs and
//!   load-balancer IPs are DNATed; replies of source-NATed flows get their
//!   client back as destination.
//! - `to_netdev` (TC egress of a node uplink): source NAT of north-south flows
//!   to backends on other nodes, reverse NAT of replies to outside clients.
//! - `sock_connect4`, `sock_sendmsg4`, `sock_recvmsg4`, `sock_getpeername4`
//!   (cgroup v2 socket hooks): load balancing for the node's own sockets
//!   ([`sock`]).
//!
//! Module per concern, after Cilium's `bpf/lib`: [`parse`] (headers),
//! [`lb`] (frontend lookup, backend selection), [`conntrack`], [`nat`]
//! (rewrites and checksums), [`nodeport`] (north-south flows and their
//! SNAT), [`icmp`] (errors about translated flows), [`reject`] (ICMP port
//! unreachable), [`verdict`] (the one place errors become TC verdicts and
//! drop counters).
//!
//! Every program hands on what it neither drops nor redirects with
//! `TCX_NEXT`, so the programs attached after netlb on the same hook (a
//! CNI's, the bandwidth plugin's classic clsact filters) still run.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Inline assembly for the atomic add of `maps::count_backend_flow`.
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

#[cfg(target_arch = "bpf")]
mod conntrack;
#[cfg(target_arch = "bpf")]
mod gc;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod lb;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod nodeport;
#[cfg(target_arch = "bpf")]
mod parse;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod reject;
#[cfg(target_arch = "bpf")]
mod sock;
#[cfg(target_arch = "bpf")]
mod verdict;

/// The crate only has content for the BPF target; on the host (e.g. `cargo
/// clippy --workspace`) it is an empty binary.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any reachable panic path, so this is never called
    // in a loaded program.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
