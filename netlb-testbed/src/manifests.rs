//! Manifests the tests, the demo and the benchmarks write for the agent.

use crate::topology::Pod;

/// An EndpointSlice `<service>-abc12` for `service` with the given ports
/// `(name, protocol, port)` and one ready endpoint per pod, on the pod's
/// node (`node<index>`, the name the testbed's agents run under).
pub fn endpoint_slice_yaml(service: &str, ports: &[(&str, &str, u16)], pods: &[&Pod]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: {service}-abc12\n  labels:\n    kubernetes.io/service-name: {service}\naddressType: IPv4\nports:\n"
    );
    for (name, protocol, port) in ports {
        s.push_str(&format!(
            "  - name: \"{name}\"\n    protocol: {protocol}\n    port: {port}\n"
        ));
    }
    s.push_str(if pods.is_empty() {
        "endpoints: []\n"
    } else {
        "endpoints:\n"
    });
    for pod in pods {
        s.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    nodeName: node{}\n    targetRef: {{kind: Pod, name: {}}}\n",
            pod.ip, pod.node, pod.name
        ));
    }
    s
}
