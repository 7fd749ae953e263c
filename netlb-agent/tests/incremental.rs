//! The incremental pipeline (change tracker -> per-Service model -> syncer)
//! against a from-scratch build: random sequences of object changes, with
//! conflicts, moves of slices between Services, zone changes and injected
//! write failures, must leave the maps exactly as a fresh agent would
//! program them from the same objects. Plus scenarios that pin down what a
//! change costs: which Services are recomputed and how many map writes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use netlb_agent::{
    datapath::dataplane::fake::FakeDataplane,
    datapath::sync::{SyncReport, Syncer},
    k8s::objects::{
        EndpointObject, NodeObject, ProxyLabel, ServiceObject, ServicePortObject, ServiceType,
        SliceObject, SlicePort, fixtures,
    },
    k8s::tracker::{Kind, ObjectStore},
    model::desired,
    model::{self, NodeContext},
};

const NODEPORT_ADDRESSES: [Ipv4Addr; 2] =
    [Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 2)];

fn node_context(zone: Option<&str>) -> NodeContext {
    NodeContext {
        node_name: Some("node0".into()),
        proxy_name: None,
        zone: zone.map(str::to_owned),
    }
}

/// One incremental sync step, as the agent's loop runs it.
fn step(
    store: &mut ObjectStore,
    node: &NodeContext,
    syncer: &mut Syncer,
    dp: &mut FakeDataplane,
) -> (usize, SyncReport) {
    let changes = store.take_changes();
    let recomputed = changes.services.len();
    for change in &changes.services {
        let (_, want) = desired::for_change(change, node, &NODEPORT_ADDRESSES);
        syncer.update_service(&change.key, want.frontends);
    }
    (recomputed, syncer.apply(dp).expect("apply"))
}

/// What the datapath sees, independent of id and index numbering: each
/// frontend's header, the addresses behind its slots and rev-NAT entry,
/// and the source ranges under its key.
type Shape = BTreeMap<
    (Ipv4Addr, u16, u8, u8),
    (
        u16,
        (Ipv4Addr, u16),
        Vec<(Ipv4Addr, u16, u8, u8)>,
        Vec<(Ipv4Addr, u32)>,
        u32,
    ),
>;

fn shape(dp: &FakeDataplane) -> (Shape, usize, usize, usize, Vec<Ipv4Addr>) {
    dp.check_consistent().expect("consistent maps");
    dp.check_affinity_matches().expect("affinity matches");
    let mut out = Shape::new();
    for (key, value) in dp.services.iter().filter(|(k, _)| k.backend_slot == 0) {
        let rev = dp.rev_nat[&value.rev_nat_index];
        let mut backends: Vec<(Ipv4Addr, u16, u8, u8)> = (1..=value.count)
            .map(|slot| {
                let id = dp.services[&netlb_common::ServiceKey {
                    backend_slot: slot,
                    ..*key
                }]
                    .backend_id;
                let b = dp.backends[&id];
                (
                    Ipv4Addr::from(u32::from_be(b.address_be)),
                    u16::from_be(b.port_be),
                    b.proto,
                    b.flags,
                )
            })
            .collect();
        backends.sort();
        let address = Ipv4Addr::from(u32::from_be(key.address_be));
        assert_eq!(
            (
                Ipv4Addr::from(u32::from_be(rev.address_be)),
                u16::from_be(rev.port_be)
            ),
            (address, u16::from_be(key.port_be)),
            "rev-NAT entry of {key:?}"
        );
        let ranges: Vec<(Ipv4Addr, u32)> = dp
            .source_ranges
            .iter()
            .filter(|(_, r)| {
                u32::from_be(r.rev_nat_index_be) == value.rev_nat_index
                    && r.proto == key.proto
                    && r.scope == key.scope
            })
            .map(|(len, r)| (Ipv4Addr::from(u32::from_be(r.address_be)), *len))
            .collect();
        out.insert(
            (address, u16::from_be(key.port_be), key.proto, key.scope),
            (
                value.flags,
                (address, u16::from_be(rev.port_be)),
                backends,
                ranges,
                // Slot 0's backend_id: the affinity timeout.
                value.backend_id,
            ),
        );
    }
    // No range outlives its frontend.
    let owned: usize = out.values().map(|v| v.3.len()).sum();
    assert_eq!(
        owned,
        dp.source_ranges.len(),
        "source ranges without a frontend"
    );
    // Affinity matches are exactly the slots of affinity frontends
    // (`check_consistent` checks each slot has one).
    let slots_with_affinity: usize = dp
        .services
        .iter()
        .filter(|(k, v)| k.backend_slot == 0 && v.flags & netlb_common::svc_flags::AFFINITY != 0)
        .map(|(_, v)| v.count as usize)
        .sum();
    assert_eq!(
        slots_with_affinity,
        dp.affinity_matches.len(),
        "affinity matches"
    );
    (
        out,
        dp.services.len(),
        dp.backends.len(),
        dp.rev_nat.len(),
        dp.cluster_ips.iter().copied().collect(),
    )
}

/// The maps a fresh agent programs from every object in the store.
fn from_scratch(store: &ObjectStore, node: &NodeContext) -> FakeDataplane {
    let (services, slices) = store.all();
    let services: Vec<ServiceObject> = services.iter().map(|s| (**s).clone()).collect();
    let slices: Vec<SliceObject> = slices.iter().map(|s| (**s).clone()).collect();
    let model = model::build(&services, &slices, node);
    let want = desired::build(&model, &NODEPORT_ADDRESSES);
    let mut dp = FakeDataplane::new();
    let report = Syncer::new().sync(&mut dp, &want).expect("fresh sync");
    assert_eq!(report.failed, 0);
    dp
}

/// Random objects from small pools, so that Services collide on addresses
/// and node ports, slices move between Services and endpoints are shared.
struct Gen {
    rng: fastrand::Rng,
    /// Per pod address 10.244.0.(i+1): (on node0, ready, serving,
    /// terminating). A pod's conditions are the same in every slice that
    /// lists it (the backend entry is shared by address; see docs/datapath.md).
    pods: [(bool, bool, bool, bool); 8],
}

const SERVICES: [(&str, &str); 6] = [
    ("a", "web"),
    ("a", "api"),
    ("a", "dns"),
    ("b", "web"),
    ("b", "db"),
    ("b", "cache"),
];

impl Gen {
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[self.rng.usize(..from.len())]
    }

    fn service(&mut self, store: &mut ObjectStore) -> ServiceObject {
        let (ns, name) = self.pick(&SERVICES);
        let type_ = self.pick(&[
            ServiceType::ClusterIp,
            ServiceType::NodePort,
            ServiceType::LoadBalancer,
            ServiceType::ExternalName,
        ]);
        let external = type_ != ServiceType::ClusterIp;
        let names = store.names();
        let mut ports = Vec::new();
        for (port_name, protocol, port) in [
            ("http", "TCP", 80u16),
            ("dns", "UDP", 53),
            ("alt", "TCP", 8080),
        ] {
            if self.rng.u8(..3) == 0 {
                continue;
            }
            ports.push(ServicePortObject {
                name: names.intern(port_name),
                protocol: names.intern(protocol),
                port,
                node_port: external.then(|| 30000 + self.rng.u16(0..3)),
            });
        }
        ServiceObject {
            namespace: names.intern(ns),
            name: names.intern(name),
            proxy: if self.rng.u8(..10) == 0 {
                ProxyLabel::Named(names.intern("other-proxy"))
            } else {
                ProxyLabel::None
            },
            type_,
            cluster_ips: match self.rng.u8(..10) {
                0 => None,
                _ => Some(vec![Ipv4Addr::new(10, 96, 0, self.rng.u8(1..5))]),
            },
            external_ips: (0..self.rng.usize(0..2))
                .map(|_| Ipv4Addr::new(203, 0, 113, self.rng.u8(1..3)))
                .collect(),
            load_balancer_ips: if type_ == ServiceType::LoadBalancer && self.rng.bool() {
                vec![Ipv4Addr::new(198, 51, 100, self.rng.u8(1..3))]
            } else {
                vec![]
            },
            internal_policy_local: self.rng.u8(..4) == 0,
            external_policy_local: self.rng.bool(),
            health_check_node_port: None,
            session_affinity_timeout: [None, Some(10_800), Some(30)][self.rng.usize(0..3)],
            // Ranges matter on load-balancer IPs only; one of them holds
            // the node's addresses (which admits the LB IPs themselves).
            source_ranges: {
                let mut r: Vec<(Ipv4Addr, u8)> = [
                    (Ipv4Addr::new(203, 0, 113, 0), 24),
                    (Ipv4Addr::new(192, 0, 2, 0), 24),
                    (Ipv4Addr::new(10, 0, 0, 0), 8),
                ]
                .into_iter()
                .filter(|_| self.rng.u8(..3) == 0)
                .collect();
                r.sort();
                r
            },
            ports,
            issues: vec![],
        }
    }

    fn pod_conditions(&mut self) -> (bool, bool, bool, bool) {
        let ready = self.rng.u8(..4) != 0;
        let terminating = !ready && self.rng.bool();
        (
            self.rng.bool(),
            ready,
            ready || (terminating && self.rng.bool()),
            terminating,
        )
    }

    /// A pod changes conditions: every slice listing it says so.
    fn pod_change(&mut self, store: &mut ObjectStore) {
        let pod = self.rng.usize(0..8);
        let (local, ..) = self.pods[pod];
        let (_, ready, serving, terminating) = self.pod_conditions();
        self.pods[pod] = (local, ready, serving, terminating);
        let address = Ipv4Addr::new(10, 244, 0, pod as u8 + 1);
        let (_, slices) = store.all();
        for slice in slices {
            if slice.endpoints.iter().any(|e| e.address == address) {
                let mut updated = (*slice).clone();
                for e in updated
                    .endpoints
                    .iter_mut()
                    .filter(|e| e.address == address)
                {
                    (e.ready, e.serving, e.terminating) = (ready, serving, terminating);
                }
                store.apply_slice(updated);
            }
        }
    }

    fn slice(&mut self, store: &mut ObjectStore) -> SliceObject {
        let (ns, service) = self.pick(&SERVICES);
        let index = self.rng.u8(0..2);
        let names = store.names();
        let ports = ["http", "dns", "alt"]
            .iter()
            .zip([("TCP", 8080u16), ("UDP", 5353), ("TCP", 9090)])
            .filter(|_| self.rng.u8(..4) != 0)
            .map(|(n, (proto, port))| SlicePort {
                name: Some(names.intern(n)),
                protocol: names.intern(proto),
                port: Some(port),
            })
            .collect();
        let endpoints = (0..self.rng.usize(0..5))
            .map(|_| {
                let pod = self.rng.usize(0..8);
                let (local, ready, serving, terminating) = self.pods[pod];
                EndpointObject {
                    address: Ipv4Addr::new(10, 244, 0, pod as u8 + 1),
                    ready,
                    serving,
                    terminating,
                    node_name: Some(names.intern(if local { "node0" } else { "node1" })),
                    zone_hints: if self.rng.u8(..3) == 0 {
                        vec![names.intern(if self.rng.bool() { "z1" } else { "z2" })]
                    } else {
                        vec![]
                    },
                    node_hints: vec![],
                }
            })
            .collect();
        SliceObject {
            namespace: names.intern(ns),
            // A slice name is not tied to one Service: relabelling moves it.
            name: names.intern(&format!("{}-{index}", self.pick(&["web", "api", "db"]))),
            proxy: ProxyLabel::None,
            service: Some(names.intern(service)),
            ipv4: self.rng.u8(..10) != 0,
            ports,
            endpoints,
            trigger_time: None,
            issues: vec![],
        }
    }
}

fn listed_store() -> ObjectStore {
    let mut store = ObjectStore::default();
    for kind in [Kind::Service, Kind::EndpointSlice, Kind::Node] {
        store.begin_list(kind);
        store.end_list(kind);
    }
    store
}

#[test]
fn random_change_sequences_program_what_a_fresh_agent_would() {
    let seeds = std::env::var("NETLB_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200u64);
    for seed in 0..seeds {
        let mut g = Gen {
            rng: fastrand::Rng::with_seed(seed),
            pods: [(false, true, true, false); 8],
        };
        for pod in 0..8 {
            g.pods[pod] = g.pod_conditions();
        }
        let mut store = listed_store();
        let mut node = node_context(None);
        let mut syncer = Syncer::new();
        let mut dp = FakeDataplane::new();
        for round in 0..40 {
            for _ in 0..g.rng.usize(1..5) {
                match g.rng.u8(..11) {
                    0..=2 => {
                        let s = g.service(&mut store);
                        store.apply_service(s);
                    }
                    3 => {
                        let (ns, name) = g.pick(&SERVICES);
                        store.delete_service(ns, name);
                    }
                    4..=7 => {
                        let s = g.slice(&mut store);
                        store.apply_slice(s);
                    }
                    8 => {
                        let ns = g.pick(&["a", "b"]);
                        let name = format!("{}-{}", g.pick(&["web", "api", "db"]), g.rng.u8(0..2));
                        store.delete_slice(ns, &name);
                    }
                    9 => {
                        // A zone change recomputes every Service (hints).
                        let zone = g.pick(&[None, Some("z1"), Some("z2")]);
                        let zone_name = zone.map(|z| store.names().intern(z));
                        store.apply_node(NodeObject {
                            zone: zone_name,
                            deleting: false,
                        });
                        if node.zone.as_deref() != zone {
                            node = node_context(zone);
                            store.mark_all();
                        }
                    }
                    _ => g.pod_change(&mut store),
                }
            }
            // Now and then the agent is killed in the middle of a step (no
            // later operation happens) and a new one starts: it adopts what
            // the maps hold and syncs every Service it lists.
            if g.rng.u8(..4) == 0 {
                dp.crash_at = Some(dp.attempts() + g.rng.usize(0..40));
                step(&mut store, &node, &mut syncer, &mut dp);
                dp.crash_at = None;
                syncer = Syncer::adopt(&dp).expect("adopt");
                store.mark_all();
            }
            // Now and then one map operation of the step fails; the next
            // step must finish the job.
            let inject = g.rng.u8(..4) == 0;
            if inject {
                dp.fail_at = Some(dp.attempts() + g.rng.usize(0..12));
            }
            let (_, report) = step(&mut store, &node, &mut syncer, &mut dp);
            syncer
                .check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} round {round}: {e}"));
            dp.check_consistent().unwrap_or_else(|e| {
                panic!("seed {seed} round {round}: inconsistent after a failure: {e}")
            });
            if report.failed + report.failed_deletes > 0 {
                assert!(
                    inject,
                    "seed {seed} round {round}: failure without injection"
                );
                dp.fail_at = None;
                step(&mut store, &node, &mut syncer, &mut dp);
            }
            dp.fail_at = None;
            let fresh = from_scratch(&store, &node);
            assert_eq!(shape(&dp), shape(&fresh), "seed {seed} round {round}");
            // And nothing is left to do.
            let (_, again) = step(&mut store, &node, &mut syncer, &mut dp);
            assert_eq!(
                (again.writes, again.deletes),
                (0, 0),
                "seed {seed} round {round}"
            );
        }
        // Every Service gone: the maps are empty.
        for (ns, name) in SERVICES {
            store.delete_service(ns, name);
        }
        step(&mut store, &node, &mut syncer, &mut dp);
        assert_eq!(
            shape(&dp),
            (Shape::new(), 0, 0, 0, vec![]),
            "seed {seed}: left behind"
        );
    }
}

/// Services `svc-0..n` with one port and `per` endpoints each.
fn cluster(store: &mut ObjectStore, n: u16, per: u8) {
    for i in 0..n {
        let vip = Ipv4Addr::new(10, 96, (i >> 8) as u8, i as u8);
        let svc = fixtures::cluster_ip_service(
            store.names(),
            "default",
            &format!("svc-{i}"),
            vip,
            "http",
            80,
        );
        store.apply_service(svc);
        let slice = endpoint_slice(store, i, per);
        store.apply_slice(slice);
    }
}

fn endpoint_slice(store: &mut ObjectStore, i: u16, per: u8) -> SliceObject {
    let addresses = (0..per).map(|e| Ipv4Addr::new(10, 128 + (i >> 8) as u8, i as u8, e + 1));
    fixtures::ready_slice(
        store.names(),
        "default",
        &format!("svc-{i}-abcde"),
        &format!("svc-{i}"),
        ("http", 8080),
        addresses,
    )
}

#[test]
fn a_change_recomputes_its_service_only_and_writes_what_changed() {
    let mut store = listed_store();
    let node = node_context(None);
    let mut syncer = Syncer::new();
    let mut dp = FakeDataplane::new();
    cluster(&mut store, 2_000, 3);
    let (recomputed, first) = step(&mut store, &node, &mut syncer, &mut dp);
    assert_eq!(recomputed, 2_000);
    // 6,000 backends + 6,000 slots + 2,000 headers + 2,000 rev-NAT + 2,000
    // cluster IPs.
    assert_eq!(first.writes, 18_000);

    // One more endpoint in one Service: that Service alone, three writes
    // (its backend, its new slot, its header's count).
    let grown = endpoint_slice(&mut store, 1_234, 4);
    store.apply_slice(grown);
    dp.take_ops();
    let (recomputed, report) = step(&mut store, &node, &mut syncer, &mut dp);
    assert_eq!((recomputed, report.writes, report.deletes), (1, 3, 0));

    // The same objects again (a relist after a watch expired): nothing is
    // recomputed, nothing written.
    for kind in [Kind::Service, Kind::EndpointSlice] {
        store.begin_list(kind);
    }
    let (services, slices) = store.all();
    for s in services {
        store.apply_service((*s).clone());
    }
    for s in slices {
        store.apply_slice((*s).clone());
    }
    for kind in [Kind::Service, Kind::EndpointSlice] {
        store.end_list(kind);
    }
    let (recomputed, report) = step(&mut store, &node, &mut syncer, &mut dp);
    assert_eq!((recomputed, report.writes, report.deletes), (0, 0, 0));

    // A relist that misses one Service deletes it (and only it): its
    // header, its slots, its rev-NAT entry, its backends, its cluster IP.
    store.begin_list(Kind::Service);
    let (services, _) = store.all();
    for s in services.iter().filter(|s| &*s.name != "svc-7") {
        store.apply_service((**s).clone());
    }
    store.end_list(Kind::Service);
    let (recomputed, report) = step(&mut store, &node, &mut syncer, &mut dp);
    assert_eq!(
        (recomputed, report.writes, report.deletes),
        (1, 0, 1 + 3 + 1 + 3 + 1)
    );

    // A Node change that does not touch the zone recomputes nothing.
    store.apply_node(NodeObject {
        zone: None,
        deleting: true,
    });
    let (recomputed, report) = step(&mut store, &node, &mut syncer, &mut dp);
    assert_eq!((recomputed, report.writes), (0, 0));
    assert_eq!(shape(&dp), shape(&from_scratch(&store, &node)));
}

/// One Service `name` with one TCP port `port_name` 80 on 10.96.0.`vip`.
fn simple_service(store: &mut ObjectStore, name: &str, vip: u8, port_name: &str) -> ServiceObject {
    let vip = Ipv4Addr::new(10, 96, 0, vip);
    fixtures::cluster_ip_service(store.names(), "default", name, vip, port_name, 80)
}

/// Slice `name` of Service `service`, port `port_name` 8080, endpoints
/// 10.244.0.`ips`.
fn simple_slice(
    store: &mut ObjectStore,
    name: &str,
    service: &str,
    port_name: &str,
    ips: &[u8],
) -> SliceObject {
    let addresses = ips.iter().map(|i| Ipv4Addr::new(10, 244, 0, *i));
    fixtures::ready_slice(
        store.names(),
        "default",
        name,
        service,
        (port_name, 8080),
        addresses,
    )
}

/// kube-proxy's change-tracker cases as a table: each event, the Services
/// it makes the sync recompute, and the map writes and deletes that sync
/// makes (the minimal set, make-before-break).
#[test]
fn change_tracker_scenarios() {
    type Event = fn(&mut ObjectStore);
    let table: &[(&str, Event, &[&str], usize, usize)] = &[
        (
            "a Service without endpoints: its rev-NAT entry, a rejecting frontend, its cluster IP",
            |s| {
                let o = simple_service(s, "a", 1, "http");
                s.apply_service(o)
            },
            &["a"],
            3,
            0,
        ),
        (
            "its slice: two backends, two slots, the count",
            |s| {
                let o = simple_slice(s, "a-1", "a", "http", &[1, 2]);
                s.apply_slice(o)
            },
            &["a"],
            5,
            0,
        ),
        (
            "the same slice again (a resync): nothing",
            |s| {
                let o = simple_slice(s, "a-1", "a", "http", &[1, 2]);
                s.apply_slice(o)
            },
            &[],
            0,
            0,
        ),
        (
            "the same Service again: nothing",
            |s| {
                let o = simple_service(s, "a", 1, "http");
                s.apply_service(o)
            },
            &[],
            0,
            0,
        ),
        (
            "the Service port renamed: the slice's port no longer matches; the count goes to 0, then slots and backends go",
            |s| {
                let o = simple_service(s, "a", 1, "web");
                s.apply_service(o)
            },
            &["a"],
            1,
            4,
        ),
        (
            "the slice follows the rename: backends, slots, count again",
            |s| {
                let o = simple_slice(s, "a-1", "a", "web", &[1, 2]);
                s.apply_slice(o)
            },
            &["a"],
            5,
            0,
        ),
        (
            "one endpoint more: its backend, its slot, the count",
            |s| {
                let o = simple_slice(s, "a-1", "a", "web", &[1, 2, 3]);
                s.apply_slice(o)
            },
            &["a"],
            3,
            0,
        ),
        (
            "one endpoint less: the count, then the last slot and the backend",
            |s| {
                let o = simple_slice(s, "a-1", "a", "web", &[1, 2]);
                s.apply_slice(o)
            },
            &["a"],
            1,
            2,
        ),
        (
            "a second Service, no slice yet",
            |s| {
                let o = simple_service(s, "b", 2, "web");
                s.apply_service(o)
            },
            &["b"],
            3,
            0,
        ),
        (
            "the slice moves from a to b: both recomputed; backends are shared, not rewritten",
            |s| {
                let o = simple_slice(s, "a-1", "b", "web", &[1, 2]);
                s.apply_slice(o)
            },
            &["a", "b"],
            // a: its count; b: two slots and its count.
            4,
            // a's two slots.
            2,
        ),
        (
            "Service a deleted: its frontend, rev-NAT entry and cluster IP",
            |s| s.delete_service("default", "a"),
            &["a"],
            0,
            3,
        ),
        (
            "the slice deleted: b rejects; its slots and the backends go",
            |s| s.delete_slice("default", "a-1"),
            &["b"],
            1,
            4,
        ),
        (
            "a slice of a Service that does not exist: recomputed, nothing to program",
            |s| {
                let o = simple_slice(s, "x-1", "x", "web", &[9]);
                s.apply_slice(o)
            },
            &["x"],
            0,
            0,
        ),
    ];
    let mut store = listed_store();
    let node = node_context(None);
    let mut syncer = Syncer::new();
    let mut dp = FakeDataplane::new();
    for (what, event, recomputed, writes, deletes) in table {
        event(&mut store);
        let changes = store.take_changes();
        let names: Vec<String> = changes
            .services
            .iter()
            .map(|c| c.key.1.to_string())
            .collect();
        assert_eq!(names, *recomputed, "{what}: recomputed");
        for change in &changes.services {
            let (_, want) = desired::for_change(change, &node, &NODEPORT_ADDRESSES);
            syncer.update_service(&change.key, want.frontends);
        }
        let report = syncer.apply(&mut dp).unwrap();
        assert_eq!(
            (report.writes, report.deletes),
            (*writes, *deletes),
            "{what}: writes, deletes"
        );
        assert_eq!(shape(&dp), shape(&from_scratch(&store, &node)), "{what}");
    }
}
