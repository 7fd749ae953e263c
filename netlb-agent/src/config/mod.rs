//! Settings types shared by the command line, the loader and the
//! conntrack garbage collector: port ranges, Go-style durations, conntrack
//! timeouts and the datapath's runtime configuration.
//!
//! Owns: turning flags into settings. Must not: read Kubernetes objects or
//! touch the kernel (the reservation of NAT ports in `/proc/sys` aside).

pub mod kubeproxy;

use std::path::{Path, PathBuf};
use std::{net::Ipv4Addr, str::FromStr, time::Duration};

use netlb_common::{DatapathConfig, be_addr, config_flags, ct_timeouts, port_ranges};

/// An inclusive port range, written `MIN-MAX` (kube-proxy's and the API
/// server's syntax for `--service-node-port-range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortRange {
    pub min: u16,
    pub max: u16,
}

impl PortRange {
    pub fn contains(&self, port: u16) -> bool {
        (self.min..=self.max).contains(&port)
    }

    pub fn overlaps(&self, other: &PortRange) -> bool {
        self.min <= other.max && other.min <= self.max
    }

    /// How many ports the range holds (never zero).
    pub fn size(&self) -> u32 {
        u32::from(self.max) - u32::from(self.min) + 1
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.min, self.max)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("invalid port range {input:?} (want MIN-MAX with 1 <= MIN <= MAX <= 65535)")]
pub struct PortRangeError {
    input: String,
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(input: &str) -> Result<Self, PortRangeError> {
        let err = || PortRangeError {
            input: input.to_owned(),
        };
        let (min, max) = input.split_once('-').ok_or_else(err)?;
        let min: u16 = min.trim().parse().map_err(|_| err())?;
        let max: u16 = max.trim().parse().map_err(|_| err())?;
        if min == 0 || min > max {
            return Err(err());
        }
        Ok(Self { min, max })
    }
}

/// A duration in Go's syntax (`10s`, `6h`, `1h30m`, `250ms`), as kube-proxy's
/// flags take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoDuration(pub Duration);

#[derive(Debug, thiserror::Error)]
#[error("invalid duration {input:?} (want e.g. 10s, 6h, 1h30m)")]
pub struct DurationError {
    input: String,
    #[source]
    source: jiff::Error,
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(input: &str) -> Result<Self, DurationError> {
        let parsed: jiff::SignedDuration = input.parse().map_err(|source| DurationError {
            input: input.to_owned(),
            source,
        })?;
        let d = Duration::try_from(parsed).map_err(|source| DurationError {
            input: input.to_owned(),
            source,
        })?;
        Ok(Self(d))
    }
}

/// Conntrack timeouts (Cilium's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtTimeouts {
    /// TCP, SYN seen but no reply.
    pub tcp_syn: Duration,
    pub tcp_established: Duration,
    /// TCP after a RST or a FIN from both sides.
    pub tcp_close: Duration,
    /// UDP and other protocols.
    pub other: Duration,
}

impl Default for CtTimeouts {
    fn default() -> Self {
        let s = |v: u32| Duration::from_secs(u64::from(v));
        Self {
            tcp_syn: s(ct_timeouts::TCP_SYN_S),
            tcp_established: s(ct_timeouts::TCP_ESTABLISHED_S),
            tcp_close: s(ct_timeouts::TCP_CLOSE_S),
            other: s(ct_timeouts::OTHER_S),
        }
    }
}

/// What the datapath is told at run time (slot 0 of `NETLB_CONFIG`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathSettings {
    /// Hairpin SNAT source; `None` disables hairpin SNAT.
    pub service_loopback: Option<Ipv4Addr>,
    /// Source address for north-south flows to backends on other nodes;
    /// `None` disables that SNAT.
    pub snat_addr: Option<Ipv4Addr>,
    pub timeouts: CtTimeouts,
    /// Source ports of north-south SNAT.
    pub nat_ports: PortRange,
    /// The cluster's NodePort range.
    pub node_ports: PortRange,
    /// Source validation on pod interfaces.
    pub validate_source: bool,
    /// The node's network namespace cookie for the socket-level programs;
    /// `None` turns them off.
    pub host_netns_cookie: Option<u64>,
    /// The cluster's pod network (`--cluster-cidr`): (network, prefix).
    pub cluster_cidr: Option<(Ipv4Addr, u8)>,
    /// The Service CIDRs (`--service-cluster-ip-range`): new connections to
    /// their addresses that are no cluster IP are dropped.
    pub service_cidrs: Vec<(Ipv4Addr, u8)>,
}

impl Default for DatapathSettings {
    fn default() -> Self {
        Self {
            service_loopback: None,
            snat_addr: None,
            timeouts: CtTimeouts::default(),
            nat_ports: PortRange {
                min: port_ranges::NAT_MIN,
                max: port_ranges::NAT_MAX,
            },
            node_ports: PortRange {
                min: port_ranges::NODEPORT_MIN,
                max: port_ranges::NODEPORT_MAX,
            },
            validate_source: true,
            host_netns_cookie: None,
            cluster_cidr: None,
            service_cidrs: Vec::new(),
        }
    }
}

/// Seconds for the datapath (at least 1, at most `u32::MAX`).
fn secs(d: Duration) -> u32 {
    d.as_secs().clamp(1, u64::from(u32::MAX)) as u32
}

impl DatapathSettings {
    /// The map value. An unset address is 0, which the datapath reads as
    /// "off".
    pub fn to_config(&self) -> DatapathConfig {
        DatapathConfig {
            service_loopback_be: self.service_loopback.map(be_addr).unwrap_or(0),
            snat_addr_be: self.snat_addr.map(be_addr).unwrap_or(0),
            timeout_tcp_syn_s: secs(self.timeouts.tcp_syn),
            timeout_tcp_established_s: secs(self.timeouts.tcp_established),
            timeout_tcp_close_s: secs(self.timeouts.tcp_close),
            timeout_other_s: secs(self.timeouts.other),
            nat_port_min: self.nat_ports.min,
            nat_port_max: self.nat_ports.max,
            nodeport_min: self.node_ports.min,
            nodeport_max: self.node_ports.max,
            flags: if self.validate_source {
                config_flags::VALIDATE_SOURCE
            } else {
                0
            } | if self.service_cidrs.is_empty() {
                0
            } else {
                config_flags::SERVICE_CIDRS
            },
            cluster_cidr_be: self
                .cluster_cidr
                .map(|(network, prefix)| be_addr(Ipv4Addr::from(u32::from(network) & mask(prefix))))
                .unwrap_or(0),
            cluster_mask_be: self
                .cluster_cidr
                .map(|(_, prefix)| mask(prefix).to_be())
                .unwrap_or(0),
            pad: 0,
            host_netns_cookie: self.host_netns_cookie.unwrap_or(0),
        }
    }
}

/// The netmask of a prefix length, host order.
fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    }
}

/// Where the network namespace's IPv4 sysctls are (per namespace: the
/// agent's, once it entered the node's).
const SYSCTL_IPV4: &str = "/proc/sys/net/ipv4";

/// The kernel's ephemeral port range (`ip_local_port_range` in `dir`).
fn ephemeral_ports_in(dir: &Path) -> Option<PortRange> {
    let text = std::fs::read_to_string(dir.join("ip_local_port_range")).ok()?;
    let mut parts = text.split_whitespace().map(|p| p.parse::<u16>());
    match (parts.next(), parts.next()) {
        (Some(Ok(min)), Some(Ok(max))) if min > 0 && min <= max => Some(PortRange { min, max }),
        _ => None,
    }
}

/// The ranges of `net.ipv4.ip_local_reserved_ports` (`1024-2047,8080`).
fn parse_reserved(text: &str) -> Vec<PortRange> {
    text.trim()
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .filter_map(|p| match p.split_once('-') {
            Some(_) => p.parse().ok(),
            None => p
                .trim()
                .parse()
                .ok()
                .filter(|port: &u16| *port > 0)
                .map(|port| PortRange {
                    min: port,
                    max: port,
                }),
        })
        .collect()
}

/// What [`reserve_nat_ports`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NatPortReservation {
    /// The NAT ports lie outside the ephemeral range: nothing to do.
    NotNeeded,
    /// The overlap was reserved already.
    AlreadyReserved(PortRange),
    /// The overlap was added to `ip_local_reserved_ports`.
    Reserved(PortRange),
}

#[derive(Debug, thiserror::Error)]
#[error(
    "the NAT port range {nat} overlaps the kernel's ephemeral ports {ephemeral} \
     (net.ipv4.ip_local_port_range), so host connections could be handed NAT ports, \
     and {overlap} cannot be reserved in {path}; either choose a --nat-port-range \
     outside {ephemeral}, or reserve {overlap} on the node \
     (sysctl -w net.ipv4.ip_local_reserved_ports={overlap}) before netlb starts"
)]
pub struct NatPortsError {
    nat: PortRange,
    ephemeral: PortRange,
    overlap: PortRange,
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

/// Makes sure no host connection is ever handed a NAT port: where the NAT
/// port range overlaps the kernel's ephemeral ports, the overlap is added
/// to `net.ipv4.ip_local_reserved_ports` (what the kernel never picks for
/// an unbound socket), keeping what is reserved already. A reservation
/// that cannot be written is an error: the agent refuses to start rather
/// than let a host connection collide with a source-NATed flow.
pub fn reserve_nat_ports(nat: PortRange) -> Result<NatPortReservation, NatPortsError> {
    reserve_nat_ports_in(Path::new(SYSCTL_IPV4), nat)
}

fn reserve_nat_ports_in(dir: &Path, nat: PortRange) -> Result<NatPortReservation, NatPortsError> {
    let Some(ephemeral) = ephemeral_ports_in(dir) else {
        return Ok(NatPortReservation::NotNeeded);
    };
    if !nat.overlaps(&ephemeral) {
        return Ok(NatPortReservation::NotNeeded);
    }
    let overlap = PortRange {
        min: nat.min.max(ephemeral.min),
        max: nat.max.min(ephemeral.max),
    };
    let path = dir.join("ip_local_reserved_ports");
    let error = |source| NatPortsError {
        nat,
        ephemeral,
        overlap,
        path: path.clone(),
        source,
    };
    let current = std::fs::read_to_string(&path).map_err(error)?;
    let mut ranges = parse_reserved(&current);
    let covered = (overlap.min..=overlap.max).all(|port| ranges.iter().any(|r| r.contains(port)));
    if covered {
        return Ok(NatPortReservation::AlreadyReserved(overlap));
    }
    ranges.push(overlap);
    let text: Vec<String> = ranges.iter().map(ToString::to_string).collect();
    std::fs::write(&path, text.join(",")).map_err(error)?;
    Ok(NatPortReservation::Reserved(overlap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sysctls(port_range: &str, reserved: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "netlb-sysctl-{}-{}",
            std::process::id(),
            port_range.replace(' ', "-")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("ip_local_port_range"), port_range).unwrap();
        std::fs::write(dir.join("ip_local_reserved_ports"), reserved).unwrap();
        dir
    }

    #[test]
    fn nat_ports_that_overlap_the_ephemeral_ports_are_reserved() {
        let nat: PortRange = "1024-29999".parse().unwrap();
        // The kernel's default range: nothing to do.
        let dir = sysctls("32768\t60999\n", "\n");
        assert_eq!(
            reserve_nat_ports_in(&dir, nat).unwrap(),
            NatPortReservation::NotNeeded
        );
        // A common tuning: the overlap is added to what is reserved.
        let dir = sysctls("1024 65535\n", "8080,9000-9100\n");
        assert_eq!(
            reserve_nat_ports_in(&dir, nat).unwrap(),
            NatPortReservation::Reserved("1024-29999".parse().unwrap())
        );
        let written = std::fs::read_to_string(dir.join("ip_local_reserved_ports")).unwrap();
        assert_eq!(written, "8080-8080,9000-9100,1024-29999");
        assert_eq!(
            reserve_nat_ports_in(&dir, nat).unwrap(),
            NatPortReservation::AlreadyReserved("1024-29999".parse().unwrap())
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_reservation_that_cannot_be_written_is_an_error_that_says_how_to_fix_it() {
        let nat: PortRange = "1024-29999".parse().unwrap();
        let dir = sysctls("20000 40000", "");
        // A directory where the file should be: the write fails.
        std::fs::remove_file(dir.join("ip_local_reserved_ports")).unwrap();
        std::fs::create_dir(dir.join("ip_local_reserved_ports")).unwrap();
        let e = reserve_nat_ports_in(&dir, nat).unwrap_err();
        let text = e.to_string();
        assert!(text.contains("20000-29999"), "{text}");
        assert!(text.contains("--nat-port-range"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn port_ranges_parse_and_compare() {
        let r: PortRange = "1024-29999".parse().unwrap();
        assert_eq!((r.min, r.max, r.size()), (1024, 29_999, 28_976));
        assert!(r.contains(1024) && r.contains(29_999) && !r.contains(30_000));
        let np: PortRange = "30000-32767".parse().unwrap();
        assert!(!r.overlaps(&np));
        assert!(np.overlaps(&"32767-40000".parse().unwrap()));
        for bad in ["", "1024", "0-10", "10-5", "1-65536", "a-b"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad}");
        }
    }

    #[test]
    fn go_durations() {
        for (text, want) in [
            ("10s", Duration::from_secs(10)),
            ("6h", Duration::from_secs(6 * 3600)),
            ("1h30m", Duration::from_secs(5400)),
            ("250ms", Duration::from_millis(250)),
        ] {
            assert_eq!(text.parse::<GoDuration>().unwrap().0, want, "{text}");
        }
        assert!("-5s".parse::<GoDuration>().is_err());
        assert!("ten seconds".parse::<GoDuration>().is_err());
    }

    #[test]
    fn defaults_avoid_node_ports_and_ephemeral_ports() {
        let s = DatapathSettings::default();
        assert!(!s.nat_ports.overlaps(&s.node_ports));
        // The kernel's default ephemeral range.
        assert!(!s.nat_ports.overlaps(&PortRange {
            min: 32_768,
            max: 60_999
        }));
        let cfg = s.to_config();
        assert_eq!(cfg.timeout_tcp_established_s, 6 * 3600);
        assert_eq!(cfg.timeout_tcp_close_s, 10);
        assert_eq!(cfg.flags, config_flags::VALIDATE_SOURCE);
    }
}
