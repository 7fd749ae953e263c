//! The rules kube-proxy writes for a set of Service ports, so the
//! comparison can load kube-proxy's datapath without a kube-proxy binary.
//! Reproduced from kube-proxy's source (`pkg/proxy/iptables/proxier.go`,
//! `pkg/proxy/nftables/proxier.go`, v1.33-v1.36: the rule-writing code is
//! the same in those releases) for what the benchmark uses: ClusterIP and
//! NodePort Services with `externalTrafficPolicy: Cluster`, ready
//! endpoints, and Services without endpoints. The unit tests hold the
//! expected text of kube-proxy's own proxier tests for the same objects.

pub mod iptables;
pub mod nftables;

use std::net::Ipv4Addr;

use sha2::{Digest as _, Sha256};

/// The proxier's settings that shape the rules.
#[derive(Debug, Clone)]
pub struct ProxierParams {
    /// `--cluster-cidr` (detect-local-mode ClusterCIDR): sources outside it
    /// are masqueraded to cluster IPs.
    pub cluster_cidr: String,
    /// The node's addresses (nftables' `nodeport-ips`: in nftables mode
    /// `--nodeport-addresses` defaults to `primary`).
    pub node_ips: Vec<Ipv4Addr>,
    /// The Service CIDRs (nftables drops traffic to their unallocated
    /// addresses).
    pub service_cidrs: Vec<String>,
    /// The node's name: endpoints with this `nodeName` are local.
    pub node_name: String,
}

/// SHA-256 of `input`, RFC 4648 base32 (standard alphabet), the first 16
/// characters: kube-proxy's `portProtoHash` and endpoint chain hash.
pub fn hash16(input: &str) -> String {
    let digest = Sha256::digest(input.as_bytes());
    data_encoding::BASE32.encode(&digest)[..16].to_owned()
}

/// Endpoints as kube-proxy orders them: by the `ip:port` string.
fn sorted_endpoints(port: &crate::compare::model::ServicePort) -> Vec<String> {
    let mut eps: Vec<String> = port
        .endpoints
        .iter()
        .map(|ip| format!("{ip}:{}", port.target_port))
        .collect();
    eps.sort();
    eps.dedup();
    eps
}

/// The objects and settings of kube-proxy's proxier tests
/// (`NewFakeProxier`), shared by both generators' tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use std::net::Ipv4Addr;

    use super::ProxierParams;
    use crate::compare::model::ServicePort;

    /// NewFakeProxier: pod CIDR 10.0.0.0/8, node IP 192.168.0.2, Service
    /// CIDR 172.30.0.0/16, node `test-node`.
    pub fn params() -> ProxierParams {
        ProxierParams {
            cluster_cidr: "10.0.0.0/8".into(),
            node_ips: vec![Ipv4Addr::new(192, 168, 0, 2)],
            service_cidrs: vec!["172.30.0.0/16".into()],
            node_name: "test-node".into(),
        }
    }

    /// A TCP Service port (target port = port) with `eps` as endpoints.
    pub fn port(
        ns: &str,
        name: &str,
        port_name: &str,
        ip: [u8; 4],
        port: u16,
        node_port: Option<u16>,
        eps: &[[u8; 4]],
    ) -> ServicePort {
        ServicePort {
            namespace: ns.into(),
            name: name.into(),
            port_name: port_name.into(),
            protocol: "TCP".into(),
            cluster_ip: ip.into(),
            port,
            target_port: port,
            node_port,
            endpoints: eps.iter().map(|&e| e.into()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_hashes_match_kube_proxy() {
        // Vectors from kube-proxy's proxier tests.
        assert_eq!(hash16("ns1/svc1:p80tcp"), "XPGD46QRK7WJZT7O");
        assert_eq!(hash16("ns1/svc1:p80tcp10.180.0.1:80"), "SXIVWICOYRO3J4NJ");
        assert_eq!(hash16("ns2/svc2:p80tcp"), "GNZBNJ2PO5MGZ6GT");
        assert_eq!(hash16("ns2/svc2:p8080tcp"), "2VJB64SDSIJUP5T6");
        assert_eq!(hash16("ns4/svc4:p80tcp10.180.0.4:80"), "UKSFD7AGPMPPLUHC");
    }
}
