//! The objects every mode of the comparison is fed: one description of the
//! Service ports and their endpoints, rendered as API objects for the
//! double (netlb, or a real kube-proxy) and as kube-proxy's rules for the
//! reproduced iptables and nftables modes.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// One port of a Service with its ready endpoints (kube-proxy programs
/// per Service port: its `ServicePortName`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub namespace: String,
    pub name: String,
    /// The port's name (`""` for a single unnamed port).
    pub port_name: String,
    /// `TCP`, `UDP` or `SCTP`, as the API spells it.
    pub protocol: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub target_port: u16,
    pub node_port: Option<u16>,
    pub endpoints: Vec<Ipv4Addr>,
}

impl ServicePort {
    /// kube-proxy's `ServicePortName.String()`: `ns/name:port`, or
    /// `ns/name` for an unnamed port.
    pub fn service_port_name(&self) -> String {
        if self.port_name.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            format!("{}/{}:{}", self.namespace, self.name, self.port_name)
        }
    }

    /// The Service object (one port).
    pub fn service_json(&self) -> Value {
        let mut port = json!({
            "name": self.port_name,
            "port": self.port,
            "targetPort": self.target_port,
            "protocol": self.protocol,
        });
        let mut spec = json!({
            "type": if self.node_port.is_some() { "NodePort" } else { "ClusterIP" },
            "clusterIP": self.cluster_ip.to_string(),
            "clusterIPs": [self.cluster_ip.to_string()],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": self.name},
        });
        if let Some(np) = self.node_port {
            port["nodePort"] = json!(np);
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
        spec["ports"] = json!([port]);
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": spec,
        })
    }

    /// The EndpointSlice controller's slice for this port: every endpoint
    /// ready, on `node`.
    pub fn slice_json(&self, node: &str) -> Value {
        let endpoints: Vec<Value> = self
            .endpoints
            .iter()
            .map(|ip| {
                json!({
                    "addresses": [ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": node,
                })
            })
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "addressType": "IPv4",
            "metadata": {
                "name": format!("{}-abcde", self.name),
                "namespace": self.namespace,
                "labels": {
                    "kubernetes.io/service-name": self.name,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "endpoints": endpoints,
            "ports": [{"name": self.port_name, "port": self.target_port, "protocol": self.protocol}],
        })
    }
}

/// The cluster IP of bench Service `i`: 10.96.1.1 upward (10.96.0.0/12
/// holds 100k of them; 10.96.0.x is left to the harness's own Services).
pub fn bench_cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 1)) + i as u32)
}

/// The first node port; Service `i` below `node_ports` gets `FIRST + i`.
pub const FIRST_NODE_PORT: u16 = 30000;

/// `count` bench Services (`bench/svc-i`, port `http` 80 -> 8080), each
/// with all of `backends` as endpoints; the first `node_ports` of them are
/// NodePort Services (the range 30000-32767 holds 2,768 ports at most).
pub fn bench_services(count: usize, backends: &[Ipv4Addr], node_ports: usize) -> Vec<ServicePort> {
    (0..count)
        .map(|i| ServicePort {
            namespace: "bench".into(),
            name: format!("svc-{i}"),
            port_name: "http".into(),
            protocol: "TCP".into(),
            cluster_ip: bench_cluster_ip(i),
            port: 80,
            target_port: 8080,
            node_port: (i < node_ports.min(2768)).then(|| FIRST_NODE_PORT + i as u16),
            endpoints: backends.to_vec(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bench_services_fit_the_ranges() {
        let b = [Ipv4Addr::new(10, 244, 0, 10)];
        let s = bench_services(100_000, &b, 5000);
        assert_eq!(s.len(), 100_000);
        assert_eq!(s.iter().filter(|p| p.node_port.is_some()).count(), 2768);
        assert_eq!(s[2767].node_port, Some(32767));
        assert_eq!(s[99_999].cluster_ip, Ipv4Addr::new(10, 97, 135, 160));
        assert_eq!(s[0].service_port_name(), "bench/svc-0:http");
        let svc = s[0].service_json();
        assert_eq!(svc["spec"]["type"], "NodePort");
        assert_eq!(svc["spec"]["ports"][0]["nodePort"], 30000);
        let slice = s[0].slice_json("node0");
        assert_eq!(slice["endpoints"][0]["addresses"][0], "10.244.0.10");
        assert_eq!(
            slice["metadata"]["labels"]["kubernetes.io/service-name"],
            "svc-0"
        );
    }
}
