//! Per-packet cost of the real programs through BPF_PROG_TEST_RUN: a first
//! packet (frontend lookup, backend selection, conntrack create, DNAT), the
//! backend's SYN-ACK (reverse NAT, checked against its connection), data on
//! the established connection both ways (conntrack hit and DNAT; reverse
//! NAT) and a packet that matches nothing, with 10 and with 100,000 Services
//! programmed; and the first and established packets of a plain Service, one
//! with session affinity and one with loadBalancerSourceRanges, measured in
//! turn in the same run. Reports medians; asserts nothing. Run with
//! `cargo xtask bench`.

#[path = "../tests/packet/mod.rs"]
mod packet;

use std::{net::Ipv4Addr, time::Duration};

use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use netlb_agent::{
    config::DatapathSettings,
    datapath::dataplane::{Dataplane, kernel::AyaDataplane},
    datapath::{
        layout::MapSizes,
        loader::{self, LoadOptions},
    },
};
use netlb_common::{
    BackendValue, RevNatValue, ServiceKey, ServiceValue, program_names, proto, scope, svc_flags,
};
use packet::{Ipv4Packet, PacketBuilder, be_addr};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
/// `TCX_NEXT` (-1) as BPF_PROG_TEST_RUN reports it.
const TCX_NEXT: u32 = u32::MAX;
const SAMPLES: u16 = 2000;

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// Programs `services` frontends on port 80 with 4 backends each.
fn program(dp: &mut AyaDataplane, services: u32) {
    let mut next_id = 1;
    for i in 0..services {
        let key = ServiceKey {
            address_be: be_addr(vip(i)),
            port_be: 80u16.to_be(),
            backend_slot: 0,
            proto: proto::TCP,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        for slot in 1..=4u16 {
            let backend = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + next_id);
            dp.upsert_backend(
                next_id,
                &BackendValue {
                    address_be: be_addr(backend),
                    port_be: 9376u16.to_be(),
                    proto: proto::TCP,
                    flags: 0,
                },
            )
            .expect("backend");
            dp.upsert_service(
                &ServiceKey {
                    backend_slot: slot,
                    ..key
                },
                &ServiceValue {
                    backend_id: next_id,
                    ..Default::default()
                },
            )
            .expect("slot");
            next_id += 1;
        }
        dp.upsert_rev_nat(
            i + 1,
            &RevNatValue {
                address_be: be_addr(vip(i)),
                port_be: 80u16.to_be(),
                pad: [0; 2],
            },
        )
        .expect("rev nat");
        dp.upsert_service(
            &key,
            &ServiceValue {
                backend_id: 0,
                rev_nat_index: i + 1,
                count: 4,
                flags: svc_flags::CLUSTER_IP,
            },
        )
        .expect("frontend");
    }
}

fn run_once(prog: &SchedClassifier, packet: &[u8], out: &mut [u8]) -> (u32, Duration, usize) {
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(packet),
            data_out: Some(out),
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    (r.return_value, r.duration, r.data_size_out as usize)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn measure(services: u32) {
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: None,
        settings: DatapathSettings {
            service_loopback: Some(Ipv4Addr::new(169, 254, 42, 1)),
            snat_addr: Some(Ipv4Addr::new(192, 168, 77, 10)),
            ..Default::default()
        },
        sizes: MapSizes {
            service_entries: 1 << 20,
            backends: 1 << 19,
            rev_nat: 1 << 17,
            ..Default::default()
        },
    })
    .expect("load (needs root)");
    let mut dp = AyaDataplane::from_ebpf(&mut ebpf).expect("maps");
    let started = std::time::Instant::now();
    program(&mut dp, services);
    let programmed = started.elapsed();
    let from_pod: &SchedClassifier = ebpf
        .program(program_names::FROM_POD)
        .unwrap()
        .try_into()
        .unwrap();
    let to_pod: &SchedClassifier = ebpf
        .program(program_names::TO_POD)
        .unwrap()
        .try_into()
        .unwrap();
    let target = vip(services / 2);
    let mut out = vec![0u8; 256];

    let mut first = Vec::new();
    let mut synack = Vec::new();
    let mut established = Vec::new();
    let mut reply = Vec::new();
    for sport in 20000..20000 + SAMPLES {
        let syn = PacketBuilder::tcp(CLIENT, sport, target, 80).syn().build();
        let (verdict, d, len) = run_once(from_pod, &syn, &mut out);
        assert_eq!(verdict, TCX_NEXT);
        first.push(d);
        let backend = Ipv4Packet::parse(&out[..len]).expect("dnat output").daddr();
        let syn_ack = PacketBuilder::tcp(backend, 9376, CLIENT, sport)
            .syn()
            .ack()
            .build();
        synack.push(run_once(to_pod, &syn_ack, &mut out).1);
        // Data both ways on the established connection.
        let data = PacketBuilder::tcp(CLIENT, sport, target, 80)
            .ack()
            .payload(b"GET / HTTP/1.1")
            .build();
        established.push(run_once(from_pod, &data, &mut out).1);
        let answer = PacketBuilder::tcp(backend, 9376, CLIENT, sport)
            .ack()
            .payload(b"HTTP/1.1 200 OK")
            .build();
        reply.push(run_once(to_pod, &answer, &mut out).1);
    }
    let miss = PacketBuilder::tcp(CLIENT, 20000, Ipv4Addr::new(10, 244, 9, 9), 80)
        .syn()
        .build();
    let passthrough: Vec<Duration> = (0..SAMPLES)
        .map(|_| run_once(from_pod, &miss, &mut out).1)
        .collect();
    // The same packet run back to back by the kernel: the average per run
    // without the per-call overhead. Only a packet the program leaves
    // unchanged can be measured this way (BPF_PROG_TEST_RUN reruns the
    // program on the packet as the previous run left it, so a DNATed packet
    // would be measured as a pass-through from its second run on).
    let batched = from_pod
        .test_run(TestRunOptions {
            data_in: Some(&miss),
            data_out: Some(&mut out),
            repeat: 100_000,
            ..Default::default()
        })
        .expect("BPF_PROG_TEST_RUN")
        .duration;

    println!(
        "services={services:>6} (programmed in {programmed:?}): first packet {:>4} ns, established {:>4} ns, reply {:>4} ns, SYN-ACK reply {:>4} ns, no-match {:>4} ns (medians of {SAMPLES} single runs); no-match averaged over 100,000 back-to-back runs {} ns",
        median(first).as_nanos(),
        median(established).as_nanos(),
        median(reply).as_nanos(),
        median(synack).as_nanos(),
        median(passthrough).as_nanos(),
        batched.as_nanos(),
    );
}

/// First packet and established data of three frontends measured in
/// turn: plain, with session affinity (its matches written, so the
/// client's affinity entry is found and checked), with source ranges (the
/// client's /24 admitted).
fn measure_features() {
    use netlb_agent::datapath::dataplane::Aux;
    use netlb_common::{AffinityFrontend, AffinityMatchKey, SourceRangeKey};
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: None,
        settings: DatapathSettings::default(),
        sizes: MapSizes::default(),
    })
    .expect("load (needs root)");
    let mut dp = AyaDataplane::from_ebpf(&mut ebpf).expect("maps");
    program(&mut dp, 10);
    let header = |i: u32, flags: u16, backend_id: u32| {
        (
            ServiceKey {
                address_be: be_addr(vip(i)),
                port_be: 80u16.to_be(),
                backend_slot: 0,
                proto: proto::TCP,
                scope: scope::EXTERNAL,
                pad: [0; 2],
            },
            ServiceValue {
                backend_id,
                rev_nat_index: i + 1,
                count: 4,
                flags,
            },
        )
    };
    // Service 1: affinity (its backends are ids 5..=8).
    let frontend = AffinityFrontend {
        rev_nat_index: 2,
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    let matches: Vec<Aux> = (5..=8)
        .map(|backend_id| {
            Aux::AffinityMatch(AffinityMatchKey {
                backend_id,
                frontend,
            })
        })
        .collect();
    dp.upsert_aux(&matches).expect("matches");
    let (k, v) = header(1, svc_flags::CLUSTER_IP | svc_flags::AFFINITY, 10_800);
    dp.upsert_service(&k, &v).expect("affinity frontend");
    // Service 2: source ranges admitting the client's /24.
    dp.upsert_aux(&[Aux::SourceRange((
        SourceRangeKey::FRONTEND_BITS + 24,
        SourceRangeKey {
            rev_nat_index_be: 3u32.to_be(),
            proto: proto::TCP,
            scope: scope::EXTERNAL,
            pad: [0; 2],
            address_be: be_addr(Ipv4Addr::new(10, 244, 0, 0)),
        },
    ))])
    .expect("range");
    let (k, v) = header(2, svc_flags::CLUSTER_IP | svc_flags::SOURCE_RANGES, 0);
    dp.upsert_service(&k, &v).expect("ranged frontend");
    let from_pod: &SchedClassifier = ebpf
        .program(program_names::FROM_POD)
        .unwrap()
        .try_into()
        .unwrap();
    let mut out = vec![0u8; 256];
    let names = ["plain", "session affinity", "source ranges"];
    let mut first: [Vec<Duration>; 3] = Default::default();
    let mut established: [Vec<Duration>; 3] = Default::default();
    for sport in 20000..20000 + SAMPLES {
        for (i, target) in (0..3).map(|i| (i, vip(i as u32))) {
            let syn = PacketBuilder::tcp(CLIENT, sport, target, 80).syn().build();
            let (verdict, d, _) = run_once(from_pod, &syn, &mut out);
            assert_eq!(verdict, TCX_NEXT, "{}", names[i]);
            first[i].push(d);
            let data = PacketBuilder::tcp(CLIENT, sport, target, 80)
                .ack()
                .payload(b"GET / HTTP/1.1")
                .build();
            established[i].push(run_once(from_pod, &data, &mut out).1);
        }
    }
    for (i, name) in names.iter().enumerate() {
        println!(
            "{name:>16}: first packet {:>4} ns, established {:>4} ns (medians of {SAMPLES}, in turn with the others)",
            median(std::mem::take(&mut first[i])).as_nanos(),
            median(std::mem::take(&mut established[i])).as_nanos(),
        );
    }
}

/// Fills the conntrack table with `connections` east-west connections
/// (SERVICE and REPLY entries), every other one expired.
fn fill_conntrack(
    table: &mut netlb_agent::datapath::dataplane::kernel::KernelConntrack,
    connections: u32,
) {
    use netlb_common::{CtEntry4, CtTuple, ct_kind, ct_link_key};
    let now = netlb_agent::datapath::dataplane::monotonic_now_s();
    for i in 0..connections {
        let client = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i / 50_000);
        let key = CtTuple {
            saddr: be_addr(client),
            daddr: be_addr(vip(1)),
            sport_be: (10_000 + (i % 50_000) as u16).to_be(),
            dport_be: 80u16.to_be(),
            proto: proto::TCP,
            kind: ct_kind::SERVICE,
            pad: [0; 2],
        };
        let conn = CtEntry4 {
            target_addr: be_addr(Ipv4Addr::new(10, 244, 0, 21)),
            target_port_be: 9376u16.to_be(),
            frontend_addr: be_addr(vip(1)),
            frontend_port_be: 80u16.to_be(),
            flags: netlb_common::ct_flags::SEEN_REPLY,
            backend_id: 1,
            rev_nat_index: 2,
            lifetime_s: if i % 2 == 0 { now - 10 } else { now + 3600 },
            created_s: now - 20,
            ..Default::default()
        };
        let link = ct_link_key(&key, &conn, ct_kind::REPLY);
        table
            .insert(
                &link,
                &CtEntry4 {
                    lifetime_s: now - 5,
                    ..conn
                },
            )
            .expect("link");
        table.insert(&key, &conn).expect("connection");
    }
}

/// What a sweep of a table of 500,000 entries (250,000 connections, half
/// of them expired) costs: the agent's collector, and the datapath's own
/// (the in-kernel timer, which runs while the agent is away).
fn measure_ct_sweep() {
    use netlb_agent::datapath::dataplane::ConntrackTable as _;
    use netlb_common::stat;
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: None,
        settings: DatapathSettings::default(),
        sizes: MapSizes::default(),
    })
    .expect("load (needs root)");
    let mut table = netlb_agent::datapath::dataplane::kernel::KernelConntrack::from_ebpf(&mut ebpf)
        .expect("conntrack");
    let observer =
        netlb_agent::datapath::dataplane::kernel::Observer::from_ebpf(&mut ebpf).expect("stats");
    fill_conntrack(&mut table, 250_000);
    let entries = table.entries().expect("entries").len();
    let report =
        netlb_agent::datapath::conntrack::sweep(&mut table, &Default::default()).expect("sweep");
    println!(
        "conntrack sweep, agent: {entries} entries read, {} deleted in {:?} (snapshot, plan, deletions re-checked against their owners)",
        report.deleted_total(),
        report.duration
    );
    fill_conntrack(&mut table, 250_000);
    let entries = table.entries().expect("entries").len();
    // The agent is away: its heartbeat is old, the timer fires every second.
    let mut heartbeat = netlb_agent::datapath::dataplane::kernel::Heartbeat::from_ebpf(&mut ebpf)
        .expect("heartbeat");
    heartbeat
        .configure(Duration::from_secs(1))
        .expect("configure");
    heartbeat.beat(1, 1).expect("heartbeat");
    loader::arm_ct_gc(&mut ebpf).expect("arm");
    let stats = || observer.stats().expect("stats");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stats()[stat::CT_GC_KERNEL_DELETED as usize] < report.deleted_total()
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let s = stats();
    let sweeps = s[stat::CT_GC_KERNEL_SWEEPS as usize];
    let ns = s[stat::CT_GC_KERNEL_NS as usize];
    println!(
        "conntrack sweep, kernel: {entries} entries, {} deleted in {sweeps} runs of at most 16,384 deletions, {:?} in all, {:?} a run (softirq)",
        s[stat::CT_GC_KERNEL_DELETED as usize],
        Duration::from_nanos(ns),
        Duration::from_nanos(ns / sweeps.max(1)),
    );
    // A walk that finds nothing to delete: the next period's.
    let before = stats();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while stats()[stat::CT_GC_KERNEL_SWEEPS as usize] == before[stat::CT_GC_KERNEL_SWEEPS as usize]
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = stats();
    println!(
        "conntrack sweep, kernel, nothing to delete: {} entries walked in {:?}",
        table.entries().expect("entries").len(),
        Duration::from_nanos(
            after[stat::CT_GC_KERNEL_NS as usize] - before[stat::CT_GC_KERNEL_NS as usize]
        ),
    );
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    for services in [10, 100_000] {
        measure(services);
    }
    measure_features();
    measure_ct_sweep();
}
