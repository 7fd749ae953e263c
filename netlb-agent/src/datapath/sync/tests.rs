use super::*;
use crate::{
    datapath::dataplane::fake::{FakeDataplane, Op},
    model::ServicePortName,
    model::desired::{DesiredBackend, DesiredFrontend},
};
use netlb_common::{proto, scope, svc_flags};

fn fe(last: u8) -> FrontendKey {
    FrontendKey {
        address: Ipv4Addr::new(10, 96, 0, last),
        port: 80,
        proto: proto::TCP,
        scope: scope::EXTERNAL,
    }
}

fn backend(last: u8) -> DesiredBackend {
    DesiredBackend {
        addr: BackendAddr {
            address: Ipv4Addr::new(10, 244, 0, last),
            port: 9376,
            proto: proto::TCP,
        },
        flags: 0,
    }
}

fn desired(services: &[(u8, &[u8])]) -> DesiredState {
    let mut state = DesiredState::default();
    for (vip, backends) in services {
        state.frontends.insert(
            fe(*vip),
            DesiredFrontend {
                service: ServicePortName {
                    namespace: "default".into(),
                    name: format!("svc{vip}").into(),
                    port_name: "".into(),
                    protocol: "TCP".into(),
                },
                flags: svc_flags::CLUSTER_IP,
                backends: backends.iter().map(|b| backend(*b)).collect(),
                source_ranges: vec![],
                affinity_timeout: 0,
            },
        );
    }
    state
}

/// Frontend 10 as a load-balancer IP admitting `ranges` (/24s of
/// 192.0.2.x... given by their third octet).
fn with_ranges(ranges: &[u8]) -> DesiredState {
    let mut state = desired(&[(10, &[1, 2])]);
    let fe = state.frontends.get_mut(&fe(10)).unwrap();
    if !ranges.is_empty() {
        fe.flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
    }
    fe.source_ranges = ranges
        .iter()
        .map(|r| (Ipv4Addr::new(198, 51, *r, 0), 24))
        .collect();
    state
}

/// Frontend 10 with `backends`, with session affinity of `timeout`
/// seconds when given.
fn with_affinity(backends: &[u8], timeout: Option<u32>) -> DesiredState {
    let mut state = desired(&[(10, backends)]);
    let fe = state.frontends.get_mut(&fe(10)).unwrap();
    if let Some(t) = timeout {
        fe.flags |= svc_flags::AFFINITY;
        fe.affinity_timeout = t;
    }
    state
}

fn matches(dp: &FakeDataplane) -> Vec<u32> {
    dp.affinity_matches.iter().map(|m| m.backend_id).collect()
}

/// Entries damaged by hand (a slot pointing elsewhere, a header with
/// another count, a backend rewritten, a rev-NAT entry deleted, an
/// affinity match deleted, a cluster IP deleted, strays added) are all
/// found by the verification, counted by map, and repaired by the next
/// apply: the maps then equal a fresh sync's.
#[test]
fn the_verification_finds_and_repairs_every_damaged_entry() {
    let want = {
        let mut w = with_affinity(&[1, 2, 3], Some(60));
        w.frontends
            .extend(desired(&[(11, &[4, 5]), (12, &[6])]).frontends);
        w
    };
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &want).unwrap();
    let mut fresh = FakeDataplane::new();
    Syncer::new().sync(&mut fresh, &want).unwrap();
    assert_eq!(dp.services, fresh.services);
    // Nothing to repair in a healthy datapath.
    let (_, repairs) = syncer.verify_chunk(&dp, None, usize::MAX).unwrap();
    assert!(repairs.is_empty(), "{repairs:?}");
    assert!(syncer.verify_all(&dp.dump().unwrap()).is_empty());
    // Damage.
    let slot = service_key(&fe(11), 2);
    dp.services.get_mut(&slot).unwrap().backend_id = 99;
    dp.services.get_mut(&service_key(&fe(12), 0)).unwrap().count = 7;
    let id = dp.services[&service_key(&fe(10), 1)].backend_id;
    dp.backends.get_mut(&id).unwrap().port_be = 1234u16.to_be();
    let rev = dp.services[&service_key(&fe(11), 0)].rev_nat_index;
    dp.rev_nat.remove(&rev);
    let m = *dp.affinity_matches.iter().next().unwrap();
    dp.affinity_matches.remove(&m);
    dp.cluster_ips.remove(&fe(12).address);
    dp.services
        .insert(service_key(&fe(13), 0), ServiceValue::default());
    dp.services
        .insert(service_key(&fe(10), 9), ServiceValue::default());
    dp.backends.insert(77, BackendValue::default());
    dp.rev_nat.insert(55, RevNatValue::default());
    // Found, by map.
    let (last, mut repairs) = syncer.verify_chunk(&dp, None, 2).unwrap();
    assert_eq!(last, Some(fe(11)));
    let (last, more) = syncer.verify_chunk(&dp, last, 2).unwrap();
    assert_eq!(last, Some(fe(12)));
    for (map, n) in more
        .into_iter()
        .chain(syncer.verify_all(&dp.dump().unwrap()))
    {
        *repairs.entry(map).or_default() += n;
    }
    use netlb_common::map_names;
    assert_eq!(
        repairs,
        Repairs::from([
            (map_names::SERVICES, 2 + 2),
            (map_names::BACKENDS, 1 + 1),
            (map_names::REV_NAT, 1 + 1),
            (map_names::AFFINITY_MATCH, 1),
            (map_names::CLUSTER_IPS, 1),
        ])
    );
    // Repaired.
    let report = syncer.apply(&mut dp).unwrap();
    assert_eq!(report.failed, 0);
    dp.check_consistent().unwrap();
    dp.check_affinity_matches().unwrap();
    assert_eq!(dp.services, fresh.services);
    assert_eq!(dp.backends, fresh.backends);
    assert_eq!(dp.rev_nat, fresh.rev_nat);
    assert_eq!(dp.affinity_matches, fresh.affinity_matches);
    assert_eq!(dp.cluster_ips, fresh.cluster_ips);
    // And found nothing more.
    let (_, repairs) = syncer.verify_chunk(&dp, None, usize::MAX).unwrap();
    assert!(repairs.is_empty(), "{repairs:?}");
    assert!(syncer.verify_all(&dp.dump().unwrap()).is_empty());
}

/// A full affinity-match map: a Service that does not fit is programmed
/// without affinity (its endpoints right), one that fits keeps it, a
/// rolling update of either never leaves a removed backend in its
/// slots, and the counts say what is in use; once room appears the
/// degraded frontend gets its affinity back.
#[test]
fn a_full_affinity_map_leaves_every_service_consistent_and_is_counted() {
    let both = |a: &[u8], b: &[u8]| {
        let mut w = with_affinity(a, Some(60));
        let mut second = with_affinity(b, Some(60));
        let fe11 = second.frontends.remove(&fe(10)).unwrap();
        w.frontends.insert(
            fe(11),
            DesiredFrontend {
                service: ServicePortName {
                    name: "svc11".into(),
                    ..fe11.service.clone()
                },
                ..fe11
            },
        );
        w
    };
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.set_aux_capacity(16, 3);
    syncer.sync(&mut dp, &both(&[1, 2], &[3, 4])).unwrap();
    dp.check_consistent().unwrap();
    dp.check_affinity_matches().unwrap();
    // svc10 got its two matches; svc11's two would not fit.
    let head = |dp: &FakeDataplane, vip| dp.services[&service_key(&fe(vip), 0)];
    assert_ne!(head(&dp, 10).flags & svc_flags::AFFINITY, 0);
    assert_eq!(head(&dp, 11).flags & svc_flags::AFFINITY, 0);
    assert_eq!(head(&dp, 11).count, 2);
    assert_eq!(syncer.aux_count(AuxKind::AffinityMatch), 2);
    assert_eq!(dp.affinity_matches.len(), 2);
    assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (1, 1));
    // A rolling update of both: backends 1 and 3 go, 5 and 6 come.
    syncer.sync(&mut dp, &both(&[2, 5], &[4, 6])).unwrap();
    dp.check_consistent().unwrap();
    dp.check_affinity_matches().unwrap();
    let ids_of = |dp: &FakeDataplane, vip| -> BTreeSet<BackendId> {
        (1..=head(dp, vip).count)
            .map(|s| dp.services[&service_key(&fe(vip), s)].backend_id)
            .collect()
    };
    let addrs = |syncer: &Syncer, b: &[u8]| -> BTreeSet<BackendId> {
        b.iter()
            .map(|b| syncer.backend_id(&backend(*b).addr).unwrap())
            .collect()
    };
    assert_eq!(ids_of(&dp, 10), addrs(&syncer, &[2, 5]));
    assert_eq!(ids_of(&dp, 11), addrs(&syncer, &[4, 6]));
    assert!(dp.affinity_matches.len() <= 3);
    assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (1, 1));
    // svc10 goes: its matches are deleted after the step's headers, so
    // svc11 gets its own at the next apply (the retry).
    let mut only11 = both(&[2, 5], &[4, 6]);
    only11.frontends.remove(&fe(10));
    syncer.sync(&mut dp, &only11).unwrap();
    assert!(syncer.has_pending());
    syncer.apply(&mut dp).unwrap();
    dp.check_consistent().unwrap();
    dp.check_affinity_matches().unwrap();
    assert_ne!(head(&dp, 11).flags & svc_flags::AFFINITY, 0);
    assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (0, 1));
    assert_eq!(syncer.aux_count(AuxKind::AffinityMatch), 2);
}

#[test]
fn cluster_ips_are_counted_by_their_frontends_and_follow_them() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    // Two ports of one cluster IP: one entry, written after the headers.
    let mut want = desired(&[(10, &[1])]);
    let mut second = want.frontends[&fe(10)].clone();
    second.service.port_name = "second".into();
    want.frontends
        .insert(FrontendKey { port: 81, ..fe(10) }, second);
    syncer.sync(&mut dp, &want).unwrap();
    let ops = dp.take_ops();
    let ip = fe(10).address;
    let written = position(&ops, &Op::UpsertClusterIp(ip));
    assert!(written > position(&ops, &slot0(10)), "{ops:?}");
    assert_eq!(dp.cluster_ips.iter().copied().collect::<Vec<_>>(), vec![ip]);
    // One port goes: the address stays.
    syncer.sync(&mut dp, &desired(&[(10, &[1])])).unwrap();
    assert!(dp.cluster_ips.contains(&ip));
    // A restarted agent keeps it and deletes what no Service has.
    dp.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, 99));
    let mut adopted = Syncer::adopt(&dp).unwrap();
    adopted.sync(&mut dp, &desired(&[(10, &[1])])).unwrap();
    assert_eq!(dp.cluster_ips.iter().copied().collect::<Vec<_>>(), vec![ip]);
    // The Service goes: its frontend first, then the address.
    dp.take_ops();
    adopted.sync(&mut dp, &DesiredState::default()).unwrap();
    let ops = dp.take_ops();
    let head = ops
        .iter()
        .position(|o| *o == Op::DeleteService(service_key(&fe(10), 0)))
        .unwrap();
    assert!(position(&ops, &Op::DeleteClusterIp(ip)) > head, "{ops:?}");
    assert!(dp.cluster_ips.is_empty());
}

#[test]
fn affinity_matches_follow_the_slots_make_before_break() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &with_affinity(&[1, 2], None)).unwrap();
    assert!(dp.affinity_matches.is_empty());
    // On: a match per backend, before the header that carries the flag
    // and the timeout.
    dp.take_ops();
    syncer
        .sync(&mut dp, &with_affinity(&[1, 2], Some(10_800)))
        .unwrap();
    let ops = dp.take_ops();
    let header = position(&ops, &slot0(10));
    assert!(
        ops.iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::UpsertAux(Aux::AffinityMatch(_))))
            .all(|(i, _)| i < header)
    );
    assert_eq!(matches(&dp).len(), 2);
    assert_eq!(dp.services[&service_key(&fe(10), 0)].backend_id, 10_800);
    dp.check_consistent().unwrap();
    // A backend replaced: its match goes after the slot moved away.
    syncer
        .sync(&mut dp, &with_affinity(&[1, 3], Some(10_800)))
        .unwrap();
    dp.check_consistent().unwrap();
    assert_eq!(matches(&dp).len(), 2);
    let ids: Vec<u32> = (1..=2)
        .map(|s| dp.services[&service_key(&fe(10), s)].backend_id)
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(matches(&dp), sorted);
    // Only the timeout changes: the header alone.
    dp.take_ops();
    syncer
        .sync(&mut dp, &with_affinity(&[1, 3], Some(60)))
        .unwrap();
    assert_eq!(dp.take_ops(), vec![slot0(10)]);
    // Off: the header first, then every match.
    syncer.sync(&mut dp, &with_affinity(&[1, 3], None)).unwrap();
    assert!(dp.affinity_matches.is_empty());
    assert_eq!(dp.services[&service_key(&fe(10), 0)].backend_id, 0);
    // Adopted by a restarted agent: nothing to write.
    syncer
        .sync(&mut dp, &with_affinity(&[1, 3], Some(5)))
        .unwrap();
    let mut adopted = Syncer::adopt(&dp).unwrap();
    let report = adopted
        .sync(&mut dp, &with_affinity(&[1, 3], Some(5)))
        .unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0));
}

#[test]
fn source_ranges_are_written_before_the_header_that_needs_them_and_deleted_after() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &with_ranges(&[])).unwrap();
    // Turned on: both ranges, then the header with the flag.
    dp.take_ops();
    syncer.sync(&mut dp, &with_ranges(&[1, 2])).unwrap();
    let ops = dp.take_ops();
    let header = position(&ops, &slot0(10));
    let ranges: Vec<usize> = ops
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Op::UpsertAux(Aux::SourceRange(_))))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(ranges.len(), 2, "{ops:?}");
    assert!(ranges.iter().all(|i| *i < header), "{ops:?}");
    dp.check_consistent().unwrap();
    // One range replaced: the new one is written, the old one deleted,
    // the header untouched.
    syncer.sync(&mut dp, &with_ranges(&[2, 3])).unwrap();
    let ops = dp.take_ops();
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::UpsertAux(Aux::SourceRange(_))))
            .count(),
        1,
        "{ops:?}"
    );
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, Op::DeleteAux(Aux::SourceRange(_))))
            .count(),
        1,
        "{ops:?}"
    );
    assert!(!ops.contains(&slot0(10)));
    // Turned off: the header loses the flag first, then the ranges go.
    syncer.sync(&mut dp, &with_ranges(&[])).unwrap();
    let ops = dp.take_ops();
    let header = position(&ops, &slot0(10));
    assert!(
        ops.iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::DeleteAux(Aux::SourceRange(_))))
            .all(|(i, _)| i > header),
        "{ops:?}"
    );
    assert!(dp.source_ranges.is_empty());
    // A restarted agent adopts them; an unchanged resync writes nothing.
    syncer.sync(&mut dp, &with_ranges(&[4])).unwrap();
    let mut adopted = Syncer::adopt(&dp).unwrap();
    dp.take_ops();
    let report = adopted.sync(&mut dp, &with_ranges(&[4])).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", dp.ops);
    // Deleting the Service deletes its ranges.
    adopted.sync(&mut dp, &DesiredState::default()).unwrap();
    assert!(dp.source_ranges.is_empty());
    assert!(dp.services.is_empty());
}

fn slot0(vip: u8) -> Op {
    Op::UpsertService(service_key(&fe(vip), 0))
}

fn position(ops: &[Op], op: &Op) -> usize {
    ops.iter()
        .position(|o| o == op)
        .unwrap_or_else(|| panic!("{op:?} not in {ops:?}"))
}

#[test]
fn first_sync_writes_backends_then_slots_then_frontend() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    let report = syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
    let ops = dp.take_ops();
    // 3 backends, the rev-NAT entry, 3 slots, the header, the cluster IP.
    assert_eq!(report.writes, 3 + 1 + 3 + 1 + 1, "{ops:?}");
    assert_eq!(report.deletes, 0);
    let frontend = position(&ops, &slot0(10));
    for slot in 1..=3 {
        assert!(position(&ops, &Op::UpsertService(service_key(&fe(10), slot))) < frontend);
    }
    for id in 1..=3 {
        assert!(position(&ops, &Op::UpsertBackend(id)) < frontend);
    }
    assert!(position(&ops, &Op::UpsertRevNat(1)) < frontend);
    dp.check_consistent().unwrap();
}

#[test]
fn unchanged_resync_is_free() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    let want = desired(&[(10, &[1, 2, 3]), (11, &[])]);
    syncer.sync(&mut dp, &want).unwrap();
    dp.take_ops();
    let report = syncer.sync(&mut dp, &want).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0));
    assert!(dp.ops.is_empty());
}

#[test]
fn adding_one_endpoint_is_three_writes() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
    dp.take_ops();
    let report = syncer
        .sync(&mut dp, &desired(&[(10, &[1, 2, 3, 4])]))
        .unwrap();
    let ops = dp.take_ops();
    assert_eq!(
        ops,
        vec![
            Op::UpsertBackend(4),
            Op::UpsertService(service_key(&fe(10), 4)),
            slot0(10),
        ]
    );
    assert_eq!((report.writes, report.deletes), (3, 0));
    dp.check_consistent().unwrap();
}

#[test]
fn removing_one_endpoint_moves_the_last_slot() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
    dp.take_ops();
    // Backend 1 (id 1, slot 1) goes; backend 3 moves into slot 1.
    syncer.sync(&mut dp, &desired(&[(10, &[2, 3])])).unwrap();
    let ops = dp.take_ops();
    assert_eq!(
        ops,
        vec![
            Op::UpsertService(service_key(&fe(10), 1)),
            slot0(10),
            Op::DeleteService(service_key(&fe(10), 3)),
            Op::DeleteBackend(1),
        ]
    );
    assert_eq!(dp.services[&service_key(&fe(10), 1)].backend_id, 3);
    assert_eq!(dp.services[&service_key(&fe(10), 0)].count, 2);
    dp.check_consistent().unwrap();
}

#[test]
fn deleting_a_service_deletes_frontend_first_then_slots_rev_nat_backends() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer
        .sync(&mut dp, &desired(&[(10, &[1, 2]), (11, &[2])]))
        .unwrap();
    dp.take_ops();
    syncer.sync(&mut dp, &desired(&[(11, &[2])])).unwrap();
    let ops = dp.take_ops();
    assert_eq!(ops[0], Op::DeleteService(service_key(&fe(10), 0)));
    let rev = position(&ops, &Op::DeleteRevNat(1));
    let backend = position(&ops, &Op::DeleteBackend(1));
    for slot in 1..=2 {
        assert!(position(&ops, &Op::DeleteService(service_key(&fe(10), slot))) < rev);
    }
    assert!(rev < backend);
    // Backend 2 is still used by svc11.
    assert!(!ops.contains(&Op::DeleteBackend(2)));
    // And the cluster IP, after the frontend.
    assert!(position(&ops, &Op::DeleteClusterIp(fe(10).address)) > 0);
    assert_eq!(ops.len(), 6, "{ops:?}");
    dp.check_consistent().unwrap();
}

#[test]
fn adoption_keeps_ids_and_rewrites_nothing() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    let want = desired(&[(10, &[1, 2, 3]), (11, &[3, 4]), (12, &[])]);
    syncer.sync(&mut dp, &want).unwrap();
    dp.take_ops();
    let mut adopted = Syncer::adopt(&dp).unwrap();
    let report = adopted.sync(&mut dp, &want).unwrap();
    assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", dp.ops);
    for b in [1, 2, 3, 4] {
        assert_eq!(
            adopted.backend_id(&backend(b).addr),
            syncer.backend_id(&backend(b).addr)
        );
    }
    // A new backend after adoption gets a fresh id, not a used one.
    adopted
        .sync(
            &mut dp,
            &desired(&[(10, &[1, 2, 3, 5]), (11, &[3, 4]), (12, &[])]),
        )
        .unwrap();
    assert_eq!(adopted.backend_id(&backend(5).addr), Some(5));
    dp.check_consistent().unwrap();
}

#[test]
fn a_released_backend_id_is_reused_only_after_a_sweep_finds_it_unused() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &desired(&[(10, &[1, 2])])).unwrap();
    // Backend 1 (id 1) goes: a UDP DNS pod replaced, say.
    syncer.sync(&mut dp, &desired(&[(10, &[2])])).unwrap();
    let released_in = syncer.generation();
    // Another Service gets a new endpoint: it must not get id 1, which
    // tracked connections may still name.
    syncer
        .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3])]))
        .unwrap();
    assert_eq!(syncer.backend_id(&backend(3).addr), Some(3));
    // A sweep that started before the release cannot vouch for id 1.
    assert_eq!(
        syncer.reclaim(&BTreeSet::new(), &BTreeSet::new(), released_in - 1),
        0
    );
    // A later sweep that still sees a connection on id 1 keeps it too.
    assert_eq!(
        syncer.reclaim(&BTreeSet::from([1]), &BTreeSet::new(), released_in),
        0
    );
    syncer
        .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3, 4])]))
        .unwrap();
    assert_eq!(syncer.backend_id(&backend(4).addr), Some(4));
    // Once no connection names it, it is free again, counters zeroed.
    assert_eq!(
        syncer.reclaim(&BTreeSet::new(), &BTreeSet::new(), released_in),
        1
    );
    syncer
        .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3, 4, 5])]))
        .unwrap();
    assert_eq!(syncer.backend_id(&backend(5).addr), Some(1));
    assert_eq!(dp.stats_reset.last(), Some(&1));
    assert_eq!(syncer.quarantined(), 0);
    dp.check_consistent().unwrap();
}

#[test]
fn adopted_gaps_wait_for_the_first_sweep() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
    syncer.sync(&mut dp, &desired(&[(10, &[3])])).unwrap();
    let mut adopted = Syncer::adopt(&dp).unwrap();
    adopted.sync(&mut dp, &desired(&[(10, &[3, 4])])).unwrap();
    assert_eq!(adopted.backend_id(&backend(4).addr), Some(4));
    adopted.reclaim(&BTreeSet::from([2]), &BTreeSet::new(), 0);
    adopted
        .sync(&mut dp, &desired(&[(10, &[3, 4, 5])]))
        .unwrap();
    assert_eq!(adopted.backend_id(&backend(5).addr), Some(1));
}

#[test]
fn adoption_removes_stale_entries() {
    let mut dp = FakeDataplane::new();
    let mut syncer = Syncer::new();
    syncer
        .sync(&mut dp, &desired(&[(10, &[1, 2]), (11, &[3])]))
        .unwrap();
    // A slot left behind by a crash.
    dp.services.insert(
        service_key(&fe(10), 7),
        ServiceValue {
            backend_id: 2,
            ..Default::default()
        },
    );
    let mut adopted = Syncer::adopt(&dp).unwrap();
    adopted.sync(&mut dp, &desired(&[(10, &[1, 2])])).unwrap();
    assert!(!dp.services.contains_key(&service_key(&fe(10), 7)));
    assert!(!dp.services.contains_key(&service_key(&fe(11), 0)));
    assert_eq!(dp.backends.len(), 2);
    assert_eq!(dp.rev_nat.len(), 1);
    dp.check_consistent().unwrap();
}

#[test]
fn failures_mid_sync_converge_on_retry() {
    let from = desired(&[(10, &[1, 2, 3]), (11, &[4])]);
    let to = desired(&[(10, &[2, 3, 5, 6]), (12, &[4, 7])]);
    // Fail each operation of the transition in turn.
    for fail_at in 0..20 {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &from).unwrap();
        dp.fail_at = Some(dp.ops.len() + fail_at);
        // Keep the attempt counter aligned: it counts from the start.
        let first = syncer.sync(&mut dp, &to).unwrap();
        dp.check_consistent()
            .unwrap_or_else(|e| panic!("fail_at {fail_at}: {e}"));
        if dp.fail_at.is_some() {
            // The transition has fewer operations than that.
            assert_eq!((first.failed, first.failed_deletes), (0, 0));
            continue;
        }
        assert!(
            first.failed + first.failed_deletes > 0,
            "fail_at {fail_at}: {first:?}"
        );
        syncer.sync(&mut dp, &to).unwrap();
        dp.check_consistent().unwrap();
        let mut fresh = FakeDataplane::new();
        Syncer::new().sync(&mut fresh, &to).unwrap();
        let shape = |d: &FakeDataplane| {
            let mut fronts: Vec<(ServiceKey, u16, u16)> = d
                .services
                .iter()
                .filter(|(k, _)| k.backend_slot == 0)
                .map(|(k, v)| (*k, v.count, v.flags))
                .collect();
            fronts.sort();
            (fronts, d.services.len(), d.backends.len(), d.rev_nat.len())
        };
        assert_eq!(shape(&dp), shape(&fresh), "fail_at {fail_at}");
        let report = syncer.sync(&mut dp, &to).unwrap();
        assert_eq!((report.writes, report.deletes), (0, 0), "fail_at {fail_at}");
    }
}
