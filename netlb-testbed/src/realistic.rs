//! Services and EndpointSlices shaped like a real API server's answers:
//! labels and annotations a Helm release and `kubectl apply` leave
//! (`last-applied-configuration`), `managedFields` of the writers, owner
//! references, and endpoints with conditions, `nodeName`, `zone` and a
//! `targetRef`. The control-plane benchmark and the scale test feed them to
//! the API-server double, so that memory and decoding cost are those of a
//! real cluster, not of minimal objects.

use std::net::Ipv4Addr;

use serde_json::{Value, json};

/// The namespace of Service `i` (a cluster spreads them).
pub fn namespace(i: usize) -> String {
    format!("team-{}", i % 50)
}

/// The cluster IP of Service `i` (10.96.0.0/12 from 10.96.1.1 up; 10.96.0.x
/// is left to tests).
pub fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 1, 1)) + i as u32)
}

/// Four endpoint addresses per Service, in 10.128.0.0/9: pod addresses of a
/// cluster, never any node's (they die in the test topology).
pub fn endpoint_ips(i: usize, count: usize) -> Vec<Ipv4Addr> {
    (0..count)
        .map(|k| Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 1)) + (i * count + k) as u32))
        .collect()
}

fn uid(kind: u32, i: usize) -> String {
    format!("{kind:08x}-5e1b-4c2a-9d3f-{i:012x}")
}

const TIME: &str = "2026-11-20T08:15:42Z";

/// Service `name` in `namespace`, one TCP port 80 -> 8080, with what Helm
/// and `kubectl apply` leave on it.
pub fn service(i: usize, name: &str, namespace: &str, cluster_ip: Ipv4Addr) -> Value {
    let labels = json!({
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/instance": "bench",
        "app.kubernetes.io/part-of": "shop",
        "app.kubernetes.io/managed-by": "Helm",
        "app.kubernetes.io/version": "2.14.1",
        "helm.sh/chart": "shop-backend-2.14.1",
    });
    let spec = json!({
        "type": "ClusterIP",
        "clusterIP": cluster_ip.to_string(),
        "clusterIPs": [cluster_ip.to_string()],
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "internalTrafficPolicy": "Cluster",
        "sessionAffinity": "None",
        "selector": {"app.kubernetes.io/name": name, "app.kubernetes.io/instance": "bench"},
        "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
    });
    let last_applied = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
            "annotations": {"meta.helm.sh/release-name": "bench", "meta.helm.sh/release-namespace": namespace}},
        "spec": {"selector": spec["selector"], "ports": spec["ports"], "type": "ClusterIP"},
    });
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid(1, i),
            "creationTimestamp": TIME,
            "labels": labels,
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": last_applied.to_string(),
                "meta.helm.sh/release-name": "bench",
                "meta.helm.sh/release-namespace": namespace,
            },
            "managedFields": [{
                "manager": "helm",
                "operation": "Update",
                "apiVersion": "v1",
                "time": TIME,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:metadata": {
                        "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {},
                            "f:meta.helm.sh/release-name": {}, "f:meta.helm.sh/release-namespace": {}},
                        "f:labels": {".": {}, "f:app.kubernetes.io/instance": {}, "f:app.kubernetes.io/managed-by": {},
                            "f:app.kubernetes.io/name": {}, "f:app.kubernetes.io/part-of": {},
                            "f:app.kubernetes.io/version": {}, "f:helm.sh/chart": {}},
                    },
                    "f:spec": {
                        "f:internalTrafficPolicy": {},
                        "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                        "f:selector": {}, "f:sessionAffinity": {}, "f:type": {},
                    },
                },
            }],
        },
        "spec": spec,
        "status": {"loadBalancer": {}},
    })
}

/// The EndpointSlice controller's slice for Service `service` with one
/// ready endpoint per address, as it writes them.
pub fn slice(
    i: usize,
    name: &str,
    service: &str,
    namespace: &str,
    ips: &[Ipv4Addr],
    port: u16,
) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .enumerate()
        .map(|(k, ip)| {
            let zone = ["zone-a", "zone-b", "zone-c"][(i + k) % 3];
            json!({
                "addresses": [ip.to_string()],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("worker-{:03}", (i + k) % 200),
                "zone": zone,
                "targetRef": {
                    "kind": "Pod",
                    "namespace": namespace,
                    "name": format!("{service}-7d9f8b6c5d-{:05x}", (i * 7 + k) % 0xfffff),
                    "uid": uid(3, i * 16 + k),
                },
            })
        })
        .collect();
    let mut owner_refs_fields = json!({".": {}});
    owner_refs_fields[format!("k:{{\"uid\":\"{}\"}}", uid(1, i))] = json!({});
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "addressType": "IPv4",
        "metadata": {
            "name": name,
            "generateName": format!("{service}-"),
            "namespace": namespace,
            "uid": uid(2, i),
            "creationTimestamp": TIME,
            "generation": 3,
            "labels": {
                "app.kubernetes.io/instance": "bench",
                "app.kubernetes.io/managed-by": "Helm",
                "app.kubernetes.io/name": service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                "kubernetes.io/service-name": service,
            },
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": TIME},
            "ownerReferences": [{
                "apiVersion": "v1", "kind": "Service", "name": service, "uid": uid(1, i),
                "controller": true, "blockOwnerDeletion": true,
            }],
            "managedFields": [{
                "manager": "kube-controller-manager",
                "operation": "Update",
                "apiVersion": "discovery.k8s.io/v1",
                "time": TIME,
                "fieldsType": "FieldsV1",
                "fieldsV1": {
                    "f:addressType": {},
                    "f:endpoints": {},
                    "f:metadata": {
                        "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                        "f:generateName": {},
                        "f:labels": {".": {}, "f:app.kubernetes.io/instance": {}, "f:app.kubernetes.io/managed-by": {},
                            "f:app.kubernetes.io/name": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                            "f:kubernetes.io/service-name": {}},
                        "f:ownerReferences": owner_refs_fields,
                    },
                    "f:ports": {},
                },
            }],
        },
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    })
}

/// Service `i` of a generated cluster and its slice with `endpoints`
/// addresses (see [`endpoint_ips`]).
pub fn service_and_slice(i: usize, endpoints: &[Ipv4Addr]) -> (Value, Value) {
    let name = format!("svc-{i}");
    let ns = namespace(i);
    (
        service(i, &name, &ns, cluster_ip(i)),
        slice(i, &format!("{name}-x7k2p"), &name, &ns, endpoints, 8080),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn objects_are_about_the_size_of_real_ones() {
        let (svc, slice) = service_and_slice(12_345, &endpoint_ips(12_345, 4));
        let (a, b) = (svc.to_string().len(), slice.to_string().len());
        // A Helm-managed Service read back from a real server is 2-4 KB, an
        // EndpointSlice of 4 endpoints about 2-3 KB.
        assert!((2_000..4_000).contains(&a), "service {a} B");
        assert!((2_000..4_000).contains(&b), "slice {b} B");
        assert_eq!(cluster_ip(0), Ipv4Addr::new(10, 96, 1, 1));
        assert_eq!(cluster_ip(99_999).octets()[0], 10);
    }
}
