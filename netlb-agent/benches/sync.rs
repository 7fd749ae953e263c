//! Control-plane cost without the kernel: model, desired state and diff
//! against the in-memory fake dataplane, for 1,000 and 10,000 Services with
//! 4 endpoints each; first sync and one endpoint change. Reports, asserts
//! nothing. `cargo bench -p netlb-agent --bench sync`.

use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use netlb_agent::{
    dataplane::fake::FakeDataplane,
    desired,
    model::{self, NodeContext},
    sync::Syncer,
};

fn objects(n: usize) -> (Vec<Service>, Vec<EndpointSlice>) {
    let mut services = Vec::with_capacity(n);
    let mut slices = Vec::with_capacity(n);
    for i in 0..n {
        services.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
                "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
                         "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}]},
            }))
            .unwrap(),
        );
        let eps: Vec<serde_json::Value> = (0..4)
            .map(|k| {
                let n = i * 4 + k;
                serde_json::json!({"addresses": [format!("10.{}.{}.{}", 100 + n / 65536, n / 256 % 256, n % 256)],
                                   "conditions": {"ready": true}})
            })
            .collect();
        slices.push(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                             "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                "addressType": "IPv4",
                "ports": [{"name": "", "protocol": "TCP", "port": 8080}],
                "endpoints": eps,
            }))
            .unwrap(),
        );
    }
    (services, slices)
}

fn step(
    services: &[Service],
    slices: &[EndpointSlice],
    syncer: &mut Syncer,
    dp: &mut FakeDataplane,
) -> (Duration, Duration, Duration, usize) {
    let t = Instant::now();
    let model = model::build(services, slices, &NodeContext::default());
    let t_model = t.elapsed();
    let t = Instant::now();
    let desired = desired::build(&model, &[]);
    let t_desired = t.elapsed();
    let report = syncer.sync(dp, &desired).unwrap();
    (
        t_model,
        t_desired,
        report.duration,
        report.writes + report.deletes,
    )
}

fn main() {
    for n in [1_000, 10_000] {
        let (services, mut slices) = objects(n);
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        let (m, d, s, ops) = step(&services, &slices, &mut syncer, &mut dp);
        println!(
            "services={n:>6}: first sync: model {m:?}, desired {d:?}, diff+apply {s:?} ({ops} map operations)"
        );
        slices[0].endpoints.as_mut().unwrap()[3].addresses = vec!["10.99.99.99".into()];
        let (m, d, s, ops) = step(&services, &slices, &mut syncer, &mut dp);
        println!(
            "services={n:>6}: one endpoint change: model {m:?}, desired {d:?}, diff+apply {s:?} ({ops} map operations)"
        );
    }
}
