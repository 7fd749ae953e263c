//! Manifests the tests, the demo and the benchmarks write for the agent.

use crate::topology::Pod;

/// An endpoint's conditions, as the EndpointSlice controller sets them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointState {
    /// Ready (and serving).
    Ready,
    /// Its readiness probe fails: neither ready nor serving.
    Unready,
    /// Being deleted but still serving (graceful termination).
    Terminating,
    /// Being deleted and no longer serving.
    TerminatingNotServing,
}

impl EndpointState {
    fn conditions(self) -> &'static str {
        match self {
            Self::Ready => "{ready: true, serving: true, terminating: false}",
            Self::Unready => "{ready: false, serving: false, terminating: false}",
            Self::Terminating => "{ready: false, serving: true, terminating: true}",
            Self::TerminatingNotServing => "{ready: false, serving: false, terminating: true}",
        }
    }
}

/// An EndpointSlice `<service>-abc12` for `service` with the given ports
/// `(name, protocol, port)` and one ready endpoint per pod, on the pod's
/// node (`node<index>`, the name the testbed's agents run under).
pub fn endpoint_slice_yaml(service: &str, ports: &[(&str, &str, u16)], pods: &[&Pod]) -> String {
    let endpoints: Vec<(&Pod, EndpointState)> =
        pods.iter().map(|p| (*p, EndpointState::Ready)).collect();
    endpoint_slice_yaml_with_states(service, ports, &endpoints)
}

/// As [`endpoint_slice_yaml`], with each endpoint's conditions.
pub fn endpoint_slice_yaml_with_states(
    service: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[(&Pod, EndpointState)],
) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc12\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (name, protocol, port) in ports {
        s.push_str(&format!(
            "  - name: \"{name}\"\n    protocol: {protocol}\n    port: {port}\n"
        ));
    }
    s.push_str(if endpoints.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    });
    for (pod, state) in endpoints {
        s.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {}\n    nodeName: node{}\n    targetRef: {{kind: Pod, name: {}}}\n",
            pod.ip,
            state.conditions(),
            pod.node,
            pod.name
        ));
    }
    s
}
