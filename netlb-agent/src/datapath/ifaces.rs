//! Interface discovery: enumerates interfaces matching name patterns and
//! their IPv4 addresses, and learns about changes from rtnetlink
//! notifications (`RTMGRP_LINK`, `RTMGRP_IPV4_IFADDR`), without shelling out
//! to `ip`.

use std::{
    collections::BTreeSet,
    ffi::CStr,
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    sync::mpsc::Sender,
    thread::JoinHandle,
};

/// A shell-style pattern with `*` and `?` (e.g. `veth*`, `lxc*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamePattern(String);

impl NamePattern {
    pub fn new(pattern: &str) -> Self {
        Self(pattern.to_owned())
    }

    pub fn matches(&self, name: &str) -> bool {
        glob(self.0.as_bytes(), name.as_bytes())
    }
}

impl std::fmt::Display for NamePattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn glob(pattern: &[u8], name: &[u8]) -> bool {
    match (pattern.split_first(), name.split_first()) {
        (None, None) => true,
        (Some((b'*', rest)), _) => {
            glob(rest, name) || (!name.is_empty() && glob(pattern, &name[1..]))
        }
        (Some((b'?', rest)), Some((_, name_rest))) => glob(rest, name_rest),
        (Some((p, rest)), Some((n, name_rest))) => p == n && glob(rest, name_rest),
        _ => false,
    }
}

/// Names of all interfaces of the current network namespace.
pub fn interface_names() -> io::Result<BTreeSet<String>> {
    // SAFETY: if_nameindex returns a heap array terminated by a zero entry,
    // freed below with if_freenameindex.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut names = BTreeSet::new();
        let mut entry = list;
        while (*entry).if_index != 0 && !(*entry).if_name.is_null() {
            names.insert(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}

/// An IPv4 address of a local interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct InterfaceAddr {
    pub ifname: String,
    pub address: Ipv4Addr,
}

/// IPv4 addresses of all interfaces of the current network namespace, in
/// the kernel's order (per interface, the primary address first).
pub fn ipv4_addresses() -> io::Result<Vec<InterfaceAddr>> {
    let mut out = Vec::new();
    // SAFETY: getifaddrs returns a linked list freed below with freeifaddrs;
    // every pointer is checked for null before use and sockaddrs are only
    // read as sockaddr_in when their family is AF_INET.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        if libc::getifaddrs(&mut list) != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut entry = list;
        while !entry.is_null() {
            let addr = (*entry).ifa_addr;
            if !addr.is_null()
                && i32::from((*addr).sa_family) == libc::AF_INET
                && !(*entry).ifa_name.is_null()
            {
                let sin = addr.cast::<libc::sockaddr_in>();
                // `s_addr` holds the address in network order.
                let ip = Ipv4Addr::from(u32::from_be((*sin).sin_addr.s_addr));
                out.push(InterfaceAddr {
                    ifname: CStr::from_ptr((*entry).ifa_name)
                        .to_string_lossy()
                        .into_owned(),
                    address: ip,
                });
            }
            entry = (*entry).ifa_next;
        }
        libc::freeifaddrs(list);
    }
    Ok(out)
}

/// An IPv4 CIDR, as `--nodeport-addresses` takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid IPv4 CIDR {input:?} (want a.b.c.d/n)")]
pub struct CidrError {
    input: String,
}

impl std::str::FromStr for Ipv4Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Self, CidrError> {
        let net: ipnet::Ipv4Net = input.parse().map_err(|_| CidrError {
            input: input.to_owned(),
        })?;
        Ok(Self {
            network: net.addr(),
            prefix: net.prefix_len(),
        })
    }
}

impl Ipv4Cidr {
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        ipnet::Ipv4Net::new(self.network, self.prefix).is_ok_and(|net| net.contains(&ip))
    }
}

/// Opens an rtnetlink socket subscribed to link, IPv4 address and IPv4
/// route notifications. Open it on the thread that is in the right network
/// namespace.
pub fn link_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2)/bind(2) calls with a zeroed sockaddr_nl.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_nl = std::mem::zeroed();
        addr.nl_family = libc::AF_NETLINK as u16;
        addr.nl_groups =
            (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR | libc::RTMGRP_IPV4_ROUTE) as u32;
        if libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }
}

/// Reads link notifications from `socket`, sets `changed` and sends `()` on
/// `tx` for each batch: the receiver re-enumerates interfaces and routes,
/// which also covers a buffer overrun (ENOBUFS) that lost messages. Ends
/// when the receiver is gone.
pub fn spawn_watcher(
    socket: OwnedFd,
    changed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tx: Sender<()>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("netlink-links".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                // SAFETY: reading into a buffer we own.
                let n = unsafe {
                    libc::recv(socket.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                if n < 0 {
                    let err = io::Error::last_os_error();
                    match err.raw_os_error() {
                        Some(libc::EINTR) | Some(libc::ENOBUFS) => {}
                        _ => {
                            log::error!("netlink link watcher stopped: {err}");
                            return;
                        }
                    }
                }
                changed.store(true, std::sync::atomic::Ordering::Relaxed);
                if tx.send(()).is_err() {
                    return;
                }
            }
        })
}

/// Addresses routed as a single host (`/32`) through an interface matching
/// `patterns`: the pod addresses of routed CNIs (Calico, Cilium's native
/// routing, kindnet, the test topology), by interface index, in the
/// datapath's byte order. Read from `/proc/net/route`, whose `Destination`
/// and `Mask` columns print the raw (network-order) word as hex.
pub fn pod_routes(patterns: &[NamePattern]) -> io::Result<std::collections::BTreeMap<u32, u32>> {
    let text = std::fs::read_to_string("/proc/net/route")?;
    Ok(parse_pod_routes(&text, patterns, |name| {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: if_nametoindex reads a NUL-terminated string we own.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        (index != 0).then_some(index)
    }))
}

fn parse_pod_routes(
    text: &str,
    patterns: &[NamePattern],
    ifindex: impl Fn(&str) -> Option<u32>,
) -> std::collections::BTreeMap<u32, u32> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (Some(iface), Some(dst), Some(mask)) = (cols.first(), cols.get(1), cols.get(7)) else {
            continue;
        };
        if *mask != "FFFFFFFF" || !patterns.iter().any(|p| p.matches(iface)) {
            continue;
        }
        let (Ok(dst), Some(index)) = (u32::from_str_radix(dst, 16), ifindex(iface)) else {
            continue;
        };
        out.insert(dst, index);
    }
    out
}

/// Enters the network namespace at `path` (e.g. `/run/netns/NAME`). Call it
/// before any thread is started: it only changes the calling thread, and
/// threads inherit it from their creator.
pub fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: setns on a namespace file descriptor we own.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs() {
        let c: Ipv4Cidr = "192.168.77.0/24".parse().unwrap();
        assert!(c.contains(Ipv4Addr::new(192, 168, 77, 10)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 78, 10)));
        let all: Ipv4Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(Ipv4Addr::new(8, 8, 8, 8)));
        let host: Ipv4Cidr = "10.0.0.1/32".parse().unwrap();
        assert!(host.contains(Ipv4Addr::new(10, 0, 0, 1)));
        assert!(!host.contains(Ipv4Addr::new(10, 0, 0, 2)));
        for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "10.0.0/8", "/8"] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn loopback_is_listed() {
        let addrs = ipv4_addresses().unwrap();
        assert!(
            addrs.iter().any(|a| a.address == Ipv4Addr::LOCALHOST),
            "{addrs:?}"
        );
    }

    #[test]
    fn pod_routes_are_host_routes_through_pod_interfaces() {
        let text = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            uplink0\t004DA8C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            vethab1\t0B00F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            vethab2\t0C00F40A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            uplink0\t0101A8C0\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let routes = parse_pod_routes(text, &[NamePattern::new("veth*")], |name| match name {
            "vethab1" => Some(11),
            "vethab2" => Some(12),
            _ => None,
        });
        let want: std::collections::BTreeMap<u32, u32> = [
            (netlb_common::be_addr(Ipv4Addr::new(10, 244, 0, 11)), 11),
            (netlb_common::be_addr(Ipv4Addr::new(10, 244, 0, 12)), 12),
        ]
        .into();
        assert_eq!(routes, want);
    }

    #[test]
    fn glob_patterns() {
        let cases = [
            ("veth*", "veth1234", true),
            ("veth*", "veth", true),
            ("veth*", "eth0", false),
            ("lxc*", "lxc_health", true),
            ("cali?", "cali1", true),
            ("cali?", "cali12", false),
            ("*", "anything", true),
            ("eth0", "eth0", true),
            ("eth0", "eth01", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(
                NamePattern::new(pattern).matches(name),
                want,
                "{pattern} vs {name}"
            );
        }
    }
}
