//! Control-plane cost without the kernel: the incremental sync step (change
//! tracking, per-Service model, desired state, diff) against the in-memory
//! fake dataplane. For 1k, 10k, 30k and 100k Services with 4 endpoints
//! each: the first sync, and one endpoint change. For one Service with
//! 10,000 endpoints: an unchanged resync of it and one endpoint change.
//! Reports, asserts nothing. `cargo bench -p netlb-agent --bench sync`.

use std::time::{Duration, Instant};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use netlb_agent::{
    datapath::dataplane::fake::FakeDataplane,
    datapath::sync::Syncer,
    k8s::objects::{ServiceObject, SliceObject},
    k8s::tracker::ObjectStore,
    model::NodeContext,
    model::desired,
};

fn service(i: usize) -> Service {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {"clusterIP": format!("10.{}.{}.{}", 96 + i / 65536, i / 256 % 256, i % 256),
                 "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}]},
    }))
    .unwrap()
}

fn slice(i: usize, endpoints: usize, first: usize) -> EndpointSlice {
    let eps: Vec<serde_json::Value> = (0..endpoints)
        .map(|k| {
            let n = first + k;
            serde_json::json!({"addresses": [format!("10.{}.{}.{}", 100 + n / 65536, n / 256 % 256, n % 256)],
                               "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": format!("svc-{i}-1"), "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "", "protocol": "TCP", "port": 8080}],
        "endpoints": eps,
    }))
    .unwrap()
}

/// One sync step: take the changes, recompute the changed Services, apply.
/// Returns (time, Services recomputed, map operations).
fn step(
    store: &mut ObjectStore,
    syncer: &mut Syncer,
    dp: &mut FakeDataplane,
) -> (Duration, usize, usize) {
    let started = Instant::now();
    let changes = store.take_changes();
    let n = changes.services.len();
    for change in &changes.services {
        let (_, want) = desired::for_change(change, &NodeContext::default(), &[]);
        syncer.update_service(&change.key, want.frontends);
    }
    let report = syncer.apply(dp).unwrap();
    (started.elapsed(), n, report.writes + report.deletes)
}

fn main() {
    for n in [1_000, 10_000, 30_000, 100_000] {
        let mut store = ObjectStore::default();
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::with_limits(1 << 20, 1 << 18);
        let t = Instant::now();
        for i in 0..n {
            let svc = ServiceObject::from_service(&service(i), store.names());
            store.apply_service(svc);
            let sl = SliceObject::from_slice(&slice(i, 4, i * 4), store.names());
            store.apply_slice(sl);
        }
        let ingest = t.elapsed();
        let (first, recomputed, ops) = step(&mut store, &mut syncer, &mut dp);
        println!(
            "services={n:>6}: ingest {ingest:?}; first sync {first:?} ({recomputed} Services, {ops} map operations)"
        );
        // One endpoint of one Service changes (a pod replaced).
        let mut changed = slice(0, 4, 0);
        changed.endpoints.as_mut().unwrap()[3].addresses = vec!["10.250.0.1".into()];
        let sl = SliceObject::from_slice(&changed, store.names());
        store.apply_slice(sl);
        let (one, recomputed, ops) = step(&mut store, &mut syncer, &mut dp);
        println!(
            "services={n:>6}: one endpoint change {one:?} ({recomputed} Service recomputed, {ops} map operations)"
        );
    }
    // One Service with 10,000 endpoints.
    let mut store = ObjectStore::default();
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::with_limits(1 << 20, 1 << 18);
    let svc = ServiceObject::from_service(&service(0), store.names());
    store.apply_service(svc);
    let big = slice(0, 10_000, 0);
    let sl = SliceObject::from_slice(&big, store.names());
    store.apply_slice(sl);
    let (first, _, ops) = step(&mut store, &mut syncer, &mut dp);
    println!("one Service with 10,000 endpoints: first sync {first:?} ({ops} map operations)");
    let keys = store.service_keys();
    store.mark_services(keys);
    let (unchanged, _, ops) = step(&mut store, &mut syncer, &mut dp);
    println!(
        "one Service with 10,000 endpoints: unchanged resync {unchanged:?} ({ops} map operations)"
    );
    let mut changed = big.clone();
    changed.endpoints.as_mut().unwrap()[1234].addresses = vec!["10.250.0.1".into()];
    let sl = SliceObject::from_slice(&changed, store.names());
    store.apply_slice(sl);
    let (one, _, ops) = step(&mut store, &mut syncer, &mut dp);
    println!(
        "one Service with 10,000 endpoints: one endpoint change {one:?} ({ops} map operations)"
    );
    // Where the time goes.
    let keys = store.service_keys();
    store.mark_services(keys);
    let changes = store.take_changes();
    let t = Instant::now();
    let model = netlb_agent::model::build_service(
        changes.services[0].service.as_ref().unwrap(),
        changes.services[0].slices.iter().map(|s| &**s),
        &NodeContext::default(),
    );
    let t_model = t.elapsed();
    let t = Instant::now();
    let want = desired::build(&model, &[]);
    let t_desired = t.elapsed();
    let t = Instant::now();
    syncer.update_service(&changes.services[0].key, want.frontends);
    let t_update = t.elapsed();
    let t = Instant::now();
    syncer.apply(&mut dp).unwrap();
    let t_apply = t.elapsed();
    println!(
        "  phases of a resync of it: model {t_model:?}, desired {t_desired:?}, update {t_update:?}, apply {t_apply:?}"
    );
}
