//! Connection state under the conditions of a production node, through
//! BPF_PROG_TEST_RUN on the real programs: each test is one of the
//! sequences issue 8 lists as broken (numbered as there), asserting the
//! correct outcome (verdicts, bytes, checksums, map contents).
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod harness;
mod packet;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use harness::*;
use netlb_agent::{
    config::{CtTimeouts, DatapathSettings, PortRange},
    datapath::conntrack,
    datapath::dataplane::{ConntrackTable, Dataplane},
    datapath::layout::MapSizes,
    model::desired::UdpServing,
};
use netlb_common::{CtState, ct_kind, program_names, proto, stat, svc_flags};
use packet::{Ipv4Packet, PacketBuilder, be_addr};

/// Timeouts short enough to watch entries expire in a test.
fn short_timeouts() -> CtTimeouts {
    CtTimeouts {
        tcp_syn: Duration::from_secs(2),
        tcp_established: Duration::from_secs(2),
        tcp_close: Duration::from_secs(1),
        other: Duration::from_secs(1),
    }
}

fn load_short() -> Datapath {
    Datapath::load_with(DatapathSettings {
        service_loopback: Some(LOOPBACK),
        snat_addr: Some(NODE),
        timeouts: short_timeouts(),
        ..Default::default()
    })
}

/// Opens a TCP connection CLIENT:sport -> VIP:80 through `from_pod` and
/// answers it from the backend through `to_pod`; returns the backend.
fn handshake(dp: &Datapath, client: Ipv4Addr, sport: u16, vip: Ipv4Addr, port: u16) -> Ipv4Addr {
    let syn = PacketBuilder::tcp(client, sport, vip, port).syn().build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TCX_NEXT);
    let backend = Ipv4Packet::parse(&out).unwrap();
    let (b, bport) = (backend.daddr(), backend.dport());
    let synack = PacketBuilder::tcp(b, bport, client, sport)
        .syn()
        .ack()
        .build();
    let (verdict, out) = dp.run(program_names::TO_POD, &synack);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().saddr(), vip);
    b
}

fn data(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Vec<u8> {
    PacketBuilder::tcp(src, sport, dst, dport)
        .ack()
        .payload(b"payload")
        .build()
}

/// Sequence 2: A Service's ready endpoints drop to zero (a readiness flap): the
/// established connection keeps going, a new one is refused; with a Local
/// policy, a new one is dropped and the established one kept as well.
#[test]
fn no_endpoints_rejects_and_drops_new_connections_only() {
    for drop in [false, true] {
        let mut dp = Datapath::load();
        let fe = Frontend::cluster_ip(VIP, 80, proto::TCP, 7);
        dp.add_frontend(fe, &[(BACKENDS[0], 9376)], 0);
        let backend = handshake(&dp, CLIENT, 41000, VIP, 80);
        // The agent programs count 0 (and DROP for Local without local
        // endpoints).
        let flags = if drop {
            svc_flags::CLUSTER_IP | svc_flags::DROP
        } else {
            svc_flags::CLUSTER_IP
        };
        dp.set_frontend(Frontend { flags, ..fe }, 0);

        let (verdict, out) = dp.run(program_names::FROM_POD, &data(CLIENT, 41000, VIP, 80));
        assert_eq!(verdict, TCX_NEXT, "drop={drop}: established connection");
        assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), backend);
        let (verdict, _) = dp.run(program_names::TO_POD, &data(backend, 9376, CLIENT, 41000));
        assert_eq!(verdict, TCX_NEXT);

        let syn = PacketBuilder::tcp(CLIENT, 41001, VIP, 80).syn().build();
        let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
        if drop {
            assert_eq!(verdict, TC_ACT_SHOT);
            assert_eq!(dp.stat(stat::DROP_NO_LOCAL_ENDPOINTS), 1);
        } else {
            assert_eq!(verdict, TC_ACT_REDIRECT);
            assert_eq!(Ipv4Packet::parse(&out).unwrap().protocol(), proto::ICMP);
            assert_eq!(dp.stat(stat::REJECT), 1);
        }
    }
}

/// Sequence 3: A UDP DNS pod is replaced (its backend id freed) and a TCP Service's
/// new endpoint gets that id: an idle DNS client's next datagram must not
/// go to the TCP Service's pod. The connection carries its backend's
/// address, not just the id; and a connection whose frontend changed
/// identity (a new rev-NAT index: the Service was recreated) re-selects.
#[test]
fn a_reused_backend_id_or_a_recreated_frontend_never_redirects_a_tracked_flow() {
    let mut dp = Datapath::load();
    let dns = Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 53), 53, proto::UDP, 5);
    let ids = dp.add_frontend(dns, &[(BACKENDS[0], 53)], 0);
    let query = PacketBuilder::udp(CLIENT, 50000, dns.vip, 53)
        .payload(b"query")
        .build();
    let (_, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[0]);

    // The TCP Service's pod takes over the id of the DNS pod.
    let web_pod = Ipv4Addr::new(10, 244, 0, 77);
    dp.maps
        .upsert_backend(
            ids[0],
            &netlb_common::BackendValue {
                address_be: be_addr(web_pod),
                port_be: 8080u16.to_be(),
                proto: proto::TCP,
                flags: 0,
            },
        )
        .unwrap();
    let (verdict, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!(
        (pkt.daddr(), pkt.dport()),
        (BACKENDS[0], 53),
        "moved to another Service's pod"
    );

    // The DNS Service is recreated on the same address (new rev-NAT index)
    // with a new pod: the flow selects it.
    let recreated = Frontend {
        rev_nat_index: 6,
        ..dns
    };
    dp.add_frontend(recreated, &[(BACKENDS[1], 53)], 0);
    let (_, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[1]);
    assert_eq!(dp.stat(stat::CT_RESELECT), 1);
    // Replies come from the frontend.
    let answer = PacketBuilder::udp(BACKENDS[1], 53, CLIENT, 50000).build();
    let (_, out) = dp.run(program_names::TO_POD, &answer);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().saddr(), dns.vip);
}

/// Sequence 4b: The server resets a connection and the client reuses the tuple: the
/// whole closed connection (SERVICE and REPLY) is replaced by the new one,
/// whose replies are translated.
#[test]
fn a_syn_after_a_server_reset_replaces_the_whole_connection() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let first = handshake(&dp, CLIENT, 42000, VIP, 80);
    let rst = PacketBuilder::tcp(first, 9376, CLIENT, 42000)
        .rst()
        .ack()
        .build();
    let (verdict, out) = dp.run(program_names::TO_POD, &rst);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(
        Ipv4Packet::parse(&out).unwrap().saddr(),
        VIP,
        "RST translated"
    );
    let conns = dp.entries_of(ct_kind::SERVICE);
    assert_eq!(CtState::of(proto::TCP, conns[0].1.flags), CtState::Closing);

    // Make the hash pick another backend for the same tuple: drop the first
    // backend from the slots (it stays in BACKENDS, as a terminating one).
    let index = BACKENDS.iter().position(|b| *b == first).unwrap();
    remove_backend(&mut dp, VIP, 80, proto::TCP, index);
    let second = handshake(&dp, CLIENT, 42000, VIP, 80);
    assert_ne!(second, first);
    assert_eq!(dp.stat(stat::CT_REOPEN), 1);
    // One connection, one link, both of the new connection.
    let conns = dp.entries_of(ct_kind::SERVICE);
    let links = dp.entries_of(ct_kind::REPLY);
    assert_eq!((conns.len(), links.len()), (1, 1), "{conns:?} {links:?}");
    assert_eq!(conns[0].1.target_addr, be_addr(second));
    assert_eq!(links[0].0.saddr, be_addr(second));
    // The old backend's late packets are not translated as the new flow's.
    let late = data(first, 9376, CLIENT, 42000);
    let (_, out) = dp.run(program_names::TO_POD, &late);
    assert_eq!(out, late);
}

/// Found by the comparison bench: a client reaching two Services from the
/// same source port (its kernel picks source ports per destination), both
/// DNATed to the same backend, would give both connections one reply
/// tuple; the second SYN took the first's REPLY link over and the backend
/// answered it from the first's socket, whose connection the client's RST
/// then killed. The second connection gets another backend, or, with a
/// single one, its SYN is dropped (the client retransmits) until the first
/// closes; the first keeps its translation throughout.
#[test]
fn a_second_frontend_never_takes_over_a_live_connections_reply_tuple() {
    let mut dp = Datapath::load();
    let vip2 = Ipv4Addr::new(10, 96, 0, 20);
    let two = [(BACKENDS[0], 9376), (BACKENDS[1], 9376)];
    dp.add_frontend(Frontend::cluster_ip(VIP, 80, proto::TCP, 7), &two, 0);
    dp.add_frontend(Frontend::cluster_ip(vip2, 80, proto::TCP, 8), &two, 0);
    for sport in 43000..43020 {
        let first = handshake(&dp, CLIENT, sport, VIP, 80);
        let syn = PacketBuilder::tcp(CLIENT, sport, vip2, 80).syn().build();
        let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
        assert_eq!(verdict, TCX_NEXT);
        let second = Ipv4Packet::parse(&out).unwrap().daddr();
        assert_ne!(
            second, first,
            "sport {sport}: both connections on one backend tuple"
        );
        // Each backend's replies go back as their own frontend.
        for (backend, vip) in [(first, VIP), (second, vip2)] {
            let (_, out) = dp.run(program_names::TO_POD, &data(backend, 9376, CLIENT, sport));
            assert_eq!(
                Ipv4Packet::parse(&out).unwrap().saddr(),
                vip,
                "sport {sport}"
            );
        }
    }
    // Half of the second frontend's first choices collided (the hash
    // spreads them); none was dropped.
    let avoided = dp.stat(stat::CT_TUPLE_AVOIDED);
    assert!((3..=17).contains(&avoided), "{avoided}");
    assert_eq!(dp.stat(stat::DROP_TUPLE_COLLISION), 0);

    // One backend for both: the second SYN is dropped while the first
    // connection lives, and opens once it is closing.
    let (vip3, vip4) = (Ipv4Addr::new(10, 96, 0, 30), Ipv4Addr::new(10, 96, 0, 40));
    let one = [(BACKENDS[2], 9376)];
    dp.add_frontend(Frontend::cluster_ip(vip3, 80, proto::TCP, 9), &one, 0);
    dp.add_frontend(Frontend::cluster_ip(vip4, 80, proto::TCP, 10), &one, 0);
    handshake(&dp, CLIENT, 44000, vip3, 80);
    let syn = PacketBuilder::tcp(CLIENT, 44000, vip4, 80).syn().build();
    let (verdict, _) = dp.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_TUPLE_COLLISION), 1);
    let (_, out) = dp.run(
        program_names::TO_POD,
        &data(BACKENDS[2], 9376, CLIENT, 44000),
    );
    assert_eq!(
        Ipv4Packet::parse(&out).unwrap().saddr(),
        vip3,
        "the first keeps its link"
    );
    let rst = PacketBuilder::tcp(CLIENT, 44000, vip3, 80)
        .rst()
        .ack()
        .build();
    let (verdict, _) = dp.run(program_names::FROM_POD, &rst);
    assert_eq!(verdict, TCX_NEXT);
    handshake(&dp, CLIENT, 44000, vip4, 80);
    assert_eq!(dp.stat(stat::DROP_TUPLE_COLLISION), 1);
}

/// 4a/4c and the "small table under churn" case: the table is a hash that
/// the kernel never evicts from, so a full table refuses new connections
/// and leaves every entry of a live connection (and its NAT port) alone.
#[test]
fn a_full_table_refuses_new_connections_and_keeps_live_ones_whole() {
    let mut dp = Datapath::load_sized(
        DatapathSettings {
            service_loopback: Some(LOOPBACK),
            snat_addr: Some(NODE),
            ..Default::default()
        },
        MapSizes {
            conntrack: 64,
            ..Default::default()
        },
    );
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let np = Frontend::node_port(30080, proto::TCP, 8);
    dp.add_frontend(np, &[(REMOTE, 9376)], 0);
    // A long-lived east-west flow and a source-NATed north-south one.
    let backend = handshake(&dp, CLIENT, 43000, VIP, 80);
    let ns_syn = PacketBuilder::tcp(EXT, 20000, NODE, 30080).syn().build();
    let out = through_node(&dp, &ns_syn);
    let nat_port = Ipv4Packet::parse(&out).unwrap().sport();
    // A churn of short flows, far more than the table holds.
    for sport in 1..=200u16 {
        let syn = PacketBuilder::tcp(Ipv4Addr::new(10, 244, 0, 50), 10000 + sport, VIP, 80)
            .syn()
            .build();
        dp.run(program_names::FROM_POD, &syn);
        let syn = PacketBuilder::tcp(EXT2, 10000 + sport, NODE, 30080)
            .syn()
            .build();
        dp.run(program_names::FROM_NETDEV, &syn);
    }
    assert!(dp.stat(stat::DROP_CT_FULL) > 0);
    assert!(dp.ct.entries().unwrap().len() <= 64);
    // Both live connections still work both ways, on the same backend and
    // NAT port.
    let (_, out) = dp.run(program_names::FROM_POD, &data(CLIENT, 43000, VIP, 80));
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), backend);
    let (_, out) = dp.run(program_names::TO_POD, &data(backend, 9376, CLIENT, 43000));
    assert_eq!(Ipv4Packet::parse(&out).unwrap().saddr(), VIP);
    let out = through_node(&dp, &data(EXT, 20000, NODE, 30080));
    assert_eq!(Ipv4Packet::parse(&out).unwrap().sport(), nat_port);
    let out = through_node(&dp, &data(REMOTE, 9376, NODE, nat_port));
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!(
        (pkt.saddr(), pkt.sport(), pkt.daddr(), pkt.dport()),
        (NODE, 30080, EXT, 20000)
    );
}

/// Sequences 5 and 4c: NAT ports come back: a closed connection's port is free again
/// once its close timeout has passed (the datapath reclaims it, and the
/// garbage collector deletes its entries), a live connection's port is
/// never handed to another client, and packets that cannot open a
/// connection never take a port.
#[test]
fn nat_ports_are_released_after_close_and_never_taken_from_live_connections() {
    let mut dp = Datapath::load_with(DatapathSettings {
        service_loopback: Some(LOOPBACK),
        snat_addr: Some(NODE),
        timeouts: short_timeouts(),
        nat_ports: PortRange {
            min: 20000,
            max: 20003,
        },
        ..Default::default()
    });
    dp.add_frontend(
        Frontend::node_port(30080, proto::TCP, 8),
        &[(REMOTE, 9376)],
        0,
    );
    // An ACK flood from spoofed sources: passed to the node's stack, no port
    // taken.
    for i in 0..50u16 {
        let ack = data(
            Ipv4Addr::new(198, 51, 100, (i % 250) as u8 + 1),
            40000 + i,
            NODE,
            30080,
        );
        let (verdict, out) = dp.run(program_names::FROM_NETDEV, &ack);
        assert_eq!(verdict, TCX_NEXT);
        assert_eq!(out, ack);
    }
    assert_eq!(dp.stat(stat::PASS_NOT_NEW), 50);
    assert!(dp.entries_of(ct_kind::NAT_IN).is_empty());
    // Four clients take the four ports (their own: they are in the range);
    // a fifth finds none.
    for i in 0..4u16 {
        let syn = PacketBuilder::tcp(EXT, 20000 + i, NODE, 30080)
            .syn()
            .build();
        let out = through_node(&dp, &syn);
        assert_eq!(Ipv4Packet::parse(&out).unwrap().sport(), 20000 + i);
    }
    let fifth = PacketBuilder::tcp(EXT2, 20000, NODE, 30080).syn().build();
    assert_eq!(dp.run(program_names::FROM_NETDEV, &fifth).0, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_NAT_PORTS), 1);
    // The first client resets its connection; the others stay open.
    let rst = PacketBuilder::tcp(EXT, 20000, NODE, 30080)
        .rst()
        .ack()
        .build();
    through_node(&dp, &rst);
    // Still closing: no port yet.
    assert_eq!(dp.run(program_names::FROM_NETDEV, &fifth).0, TC_ACT_SHOT);
    // Keep the other three alive past the close timeout.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(700));
        for i in 1..4u16 {
            through_node(&dp, &data(EXT, 20000 + i, NODE, 30080));
        }
    }
    let out = through_node(&dp, &fifth);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.daddr()), (NODE, REMOTE));
    let reused = pkt.sport();
    assert_eq!(reused, 20000);
    // The port is the closed connection's, and its reply reaches the new
    // client only.
    let reply = PacketBuilder::tcp(REMOTE, 9376, NODE, reused)
        .syn()
        .ack()
        .build();
    let out = through_node(&dp, &reply);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), EXT2);
    // The live ones kept theirs.
    for i in 1..4u16 {
        let out = through_node(&dp, &data(EXT, 20000 + i, NODE, 30080));
        assert_eq!(Ipv4Packet::parse(&out).unwrap().sport(), 20000 + i);
    }
    // The garbage collector releases everything once it all expires.
    std::thread::sleep(Duration::from_millis(3500));
    let report = conntrack::sweep(&mut dp.ct, &UdpServing::new()).unwrap();
    assert_eq!(report.nat_ports_in_use, 0, "{report:?}");
    assert!(dp.ct.entries().unwrap().is_empty(), "{:?}", dp.ct.entries());
}

/// Sequence 6: Packets that belong to the node are not taken for Service flows: a
/// TCP reply from outside to a masqueraded connection whose port is a node
/// port, and a UDP reply to a host flow from a UDP node port's port; the
/// node's own connections to backends keep their ports (the NAT range
/// avoids the ephemeral range).
#[test]
fn replies_to_host_connections_on_node_port_numbers_are_left_alone() {
    let mut dp = Datapath::load();
    dp.add_frontend(
        Frontend::node_port(30080, proto::TCP, 8),
        &[(REMOTE, 9376)],
        0,
    );
    dp.add_frontend(
        Frontend::node_port(30053, proto::UDP, 9),
        &[(REMOTE, 53)],
        0,
    );
    let server = Ipv4Addr::new(198, 51, 100, 7);
    // TCP: the masqueraded connection's SYN-ACK.
    let synack = PacketBuilder::tcp(server, 443, NODE, 30080)
        .syn()
        .ack()
        .build();
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &synack);
    assert_eq!((verdict, &out), (TCX_NEXT, &synack));
    // UDP: the node sends from 30053 first (recorded), the reply passes.
    let query = PacketBuilder::udp(NODE, 30053, server, 53)
        .payload(b"q")
        .build();
    let (verdict, out) = dp.run(program_names::TO_NETDEV, &query);
    assert_eq!((verdict, &out), (TCX_NEXT, &query));
    let answer = PacketBuilder::udp(server, 53, NODE, 30053)
        .payload(b"a")
        .build();
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &answer);
    assert_eq!((verdict, &out), (TCX_NEXT, &answer));
    assert_eq!(dp.stat(stat::PASS_HOST_FLOW), 1);
    // Another client is still a new node port flow.
    let client = PacketBuilder::udp(EXT, 5000, NODE, 30053)
        .payload(b"q")
        .build();
    let (_, out) = dp.run(program_names::FROM_NETDEV, &client);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), REMOTE);
    assert_eq!(dp.stat(stat::NEW_FLOW), 1);
    // A host connection to a backend from an ephemeral port passes the
    // uplink untouched both ways, and no NAT port is ever in its range.
    let host = data(NODE, 45000, REMOTE, 9376);
    let (verdict, out) = dp.run(program_names::TO_NETDEV, &host);
    assert_eq!((verdict, &out), (TCX_NEXT, &host));
    let host_reply = data(REMOTE, 9376, NODE, 45000);
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &host_reply);
    assert_eq!((verdict, &out), (TCX_NEXT, &host_reply));
    for i in 0..100u16 {
        let syn = PacketBuilder::tcp(EXT2, 40000 + i, NODE, 30080)
            .syn()
            .build();
        let out = through_node(&dp, &syn);
        let port = Ipv4Packet::parse(&out).unwrap().sport();
        assert!((1024..=29_999).contains(&port), "NAT port {port}");
    }
}

/// Sequence 7: Entries age: an idle UDP flow rebalances after its timeout, and an
/// old REPLY link never rewrites later direct traffic on its tuple.
#[test]
fn expired_connections_rebalance_and_their_links_stop_translating() {
    let mut dp = load_short();
    let dns = Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 53), 53, proto::UDP, 5);
    dp.add_frontend(dns, &[(BACKENDS[0], 53)], 0);
    let query = PacketBuilder::udp(CLIENT, 50000, dns.vip, 53).build();
    let (_, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[0]);
    // The backend set changes; the live flow stays.
    dp.add_frontend(dns, &[(BACKENDS[1], 53)], 0);
    let (_, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[0]);
    assert_eq!(dp.stat(stat::NEW_FLOW), 1);
    // Idle past the timeout (1 s): the next datagram selects anew.
    std::thread::sleep(Duration::from_millis(2200));
    let (_, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[1]);
    assert_eq!(dp.stat(stat::NEW_FLOW), 2);

    // A TCP connection expires; later the client reaches the backend
    // directly on the same tuple: the backend's packets pass untouched.
    let web = Frontend::cluster_ip(VIP, 80, proto::TCP, 7);
    dp.add_frontend(web, &[(BACKENDS[2], 9376)], 0);
    let b = handshake(&dp, CLIENT, 45000, VIP, 80);
    std::thread::sleep(Duration::from_millis(3200));
    let direct = data(b, 9376, CLIENT, 45000);
    let (verdict, out) = dp.run(program_names::TO_POD, &direct);
    assert_eq!((verdict, &out), (TCX_NEXT, &direct));
    assert!(dp.stat(stat::CT_STALE_LINK) >= 1);
    assert!(
        dp.entries_of(ct_kind::REPLY)
            .iter()
            .all(|(k, _)| k.sport_be != 9376u16.to_be() || k.dport_be != 45000u16.to_be()),
        "the stale link is gone"
    );
}

/// Sequence 9: A pod forges another pod's tuple (a RST, then a SYN) to move its
/// connection: the source address lives behind another interface, so both
/// are dropped, and the victim's connection stays on its backend.
#[test]
fn a_pod_cannot_close_or_reopen_another_pods_connection() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let victim = handshake(&dp, CLIENT, 46000, VIP, 80);
    // The agent registers CLIENT behind another interface than the one
    // BPF_PROG_TEST_RUN runs on (the loopback, ifindex 1).
    let mut sources =
        netlb_agent::datapath::dataplane::kernel::PodSources::from_ebpf(&mut dp.ebpf).unwrap();
    sources
        .sync(
            &[
                (be_addr(CLIENT), 9999),
                (be_addr(Ipv4Addr::new(10, 244, 0, 12)), 1),
            ]
            .into(),
        )
        .unwrap();
    let rst = PacketBuilder::tcp(CLIENT, 46000, VIP, 80)
        .rst()
        .ack()
        .build();
    assert_eq!(dp.run(program_names::FROM_POD, &rst).0, TC_ACT_SHOT);
    let syn = PacketBuilder::tcp(CLIENT, 46000, VIP, 80).syn().build();
    assert_eq!(dp.run(program_names::FROM_POD, &syn).0, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_SPOOFED_SOURCE), 2);
    let conns = dp.entries_of(ct_kind::SERVICE);
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].1.target_addr, be_addr(victim));
    assert_eq!(
        CtState::of(proto::TCP, conns[0].1.flags),
        CtState::Established
    );
    // A pod sending from its own interface is served.
    let own = PacketBuilder::tcp(Ipv4Addr::new(10, 244, 0, 12), 46000, VIP, 80)
        .syn()
        .build();
    assert_eq!(dp.run(program_names::FROM_POD, &own).0, TCX_NEXT);
}

/// Sequence 10: ICMP errors about translated flows are translated, outer and quoted
/// headers both, with every checksum right: fragmentation needed from the
/// node and port unreachable from the backend towards a client pod; an
/// error from a client pod about a reply; and the north-south cases at the
/// uplink (an error about a source-NATed packet from beyond, about a reply
/// on its way to the outside client).
#[test]
fn icmp_errors_of_translated_flows_are_translated_both_ways() {
    let mut dp = Datapath::load();
    let dns = Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 53), 53, proto::UDP, 5);
    dp.add_frontend(dns, &[(BACKENDS[0], 5353)], 0);
    dp.add_service(VIP, 80, proto::TCP, &[(BACKENDS[1], 9376)]);

    // Fragmentation needed from the node (10.244.0.1 here) about a large
    // request CLIENT -> VIP:80, which left DNATed.
    let router = Ipv4Addr::new(169, 254, 1, 1);
    let syn = PacketBuilder::tcp(CLIENT, 47000, VIP, 80).syn().build();
    let (_, dnated) = dp.run(program_names::FROM_POD, &syn);
    let frag_needed = PacketBuilder::icmp_error(router, CLIENT, 3, 4, 1400, &dnated);
    let (verdict, out) = dp.run(program_names::TO_POD, &frag_needed);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    pkt.assert_checksums();
    assert_eq!((pkt.saddr(), pkt.daddr()), (router, CLIENT));
    assert_eq!(pkt.quoted(), (CLIENT, 47000, VIP, 80, true));
    let icmp = pkt.payload_with_l4_header();
    assert_eq!(
        (icmp[0], icmp[1], &icmp[4..8]),
        (3, 4, &1400u32.to_be_bytes()[..])
    );

    // Port unreachable from the DNS backend (no listener).
    let query = PacketBuilder::udp(CLIENT, 51000, dns.vip, 53)
        .payload(b"q")
        .build();
    let (_, dnated) = dp.run(program_names::FROM_POD, &query);
    let unreachable = PacketBuilder::icmp_error(BACKENDS[0], CLIENT, 3, 3, 0, &dnated);
    let (_, out) = dp.run(program_names::TO_POD, &unreachable);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    pkt.assert_checksums();
    assert_eq!(pkt.saddr(), dns.vip, "the error comes from the frontend");
    assert_eq!(pkt.quoted(), (CLIENT, 51000, dns.vip, 53, true));

    // The client pod's own error about a reply it got (VIP:53 -> CLIENT)
    // goes to the backend, about the backend's packet.
    let answer = PacketBuilder::udp(BACKENDS[0], 5353, CLIENT, 51000).build();
    let (_, translated) = dp.run(program_names::TO_POD, &answer);
    let error = PacketBuilder::icmp_error(CLIENT, dns.vip, 3, 3, 0, &translated);
    let (_, out) = dp.run(program_names::FROM_POD, &error);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    pkt.assert_checksums();
    assert_eq!(pkt.daddr(), BACKENDS[0]);
    assert_eq!(pkt.quoted(), (BACKENDS[0], 5353, CLIENT, 51000, true));

    // North-south, source-NATed to a remote backend.
    dp.add_frontend(
        Frontend::node_port(30080, proto::TCP, 8),
        &[(REMOTE, 9376)],
        0,
    );
    let syn = PacketBuilder::tcp(EXT, 20000, NODE, 30080).syn().build();
    let (_, dnated) = dp.run(program_names::FROM_NETDEV, &syn);
    let (_, snated) = dp.run(program_names::TO_NETDEV, &dnated);
    // A router beyond the node: fragmentation needed about the SNATed
    // packet, back to the node; then out again towards the client.
    let beyond = Ipv4Addr::new(192, 168, 77, 1);
    let error = PacketBuilder::icmp_error(beyond, NODE, 3, 4, 1400, &snated);
    let (verdict, restored) = dp.run(program_names::FROM_NETDEV, &error);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&restored).unwrap();
    pkt.assert_checksums();
    assert_eq!(pkt.daddr(), EXT);
    assert_eq!(pkt.quoted(), (EXT, 20000, REMOTE, 9376, true));
    let (_, out) = dp.run(program_names::TO_NETDEV, &restored);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    pkt.assert_checksums();
    assert_eq!((pkt.saddr(), pkt.daddr()), (beyond, EXT));
    assert_eq!(pkt.quoted(), (EXT, 20000, NODE, 30080, true));

    // The outside client's error about a reply it got (NODE:30080 -> EXT)
    // goes to the backend as an error about the backend's own packet.
    let reply = PacketBuilder::tcp(REMOTE, 9376, NODE, 20000)
        .syn()
        .ack()
        .build();
    let translated = through_node(&dp, &reply);
    let error = PacketBuilder::icmp_error(EXT, NODE, 3, 4, 1400, &translated);
    let (_, out) = dp.run(program_names::FROM_NETDEV, &error);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    pkt.assert_checksums();
    assert_eq!(pkt.daddr(), REMOTE);
    assert_eq!(pkt.quoted(), (REMOTE, 9376, NODE, 20000, true));
    assert_eq!(dp.stat(stat::ICMP_ERROR_NAT), 6);

    // An error about an untracked flow passes as it is.
    let direct = PacketBuilder::udp(CLIENT, 52000, BACKENDS[2], 53).build();
    let error = PacketBuilder::icmp_error(BACKENDS[2], CLIENT, 3, 3, 0, &direct);
    let (verdict, out) = dp.run(program_names::TO_POD, &error);
    assert_eq!((verdict, &out), (TCX_NEXT, &error));
}

/// The garbage collector on the real map: expired connections go with their
/// links, live ones stay, a UDP flow to an endpoint that stopped serving
/// goes (so its next datagram selects a live one), and it reports the
/// backend ids live connections use.
#[test]
fn the_garbage_collector_sweeps_the_real_table() {
    let mut dp = load_short();
    let dns = Frontend::cluster_ip(Ipv4Addr::new(10, 96, 0, 53), 53, proto::UDP, 5);
    let dns_ids = dp.add_frontend(dns, &[(BACKENDS[0], 53)], 0);
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let query = PacketBuilder::udp(CLIENT, 53000, dns.vip, 53).build();
    dp.run(program_names::FROM_POD, &query);
    handshake(&dp, CLIENT, 48000, VIP, 80);
    assert_eq!(dp.ct.entries().unwrap().len(), 4);
    // Nothing stale yet.
    let mut serving = UdpServing::new();
    serving.insert((dns.vip, 53), BTreeSet::from([(BACKENDS[0], 53)]));
    let report = conntrack::sweep(&mut dp.ct, &serving).unwrap();
    assert_eq!(report.deleted_total(), 0);
    assert_eq!(report.connections, [0, 2, 0]);
    assert!(report.backend_ids.contains(&dns_ids[0]));
    // The DNS endpoint stops serving: its flow goes at once.
    serving.insert((dns.vip, 53), BTreeSet::from([(BACKENDS[1], 53)]));
    let report = conntrack::sweep(&mut dp.ct, &serving).unwrap();
    assert_eq!(report.deleted.get("stale_udp"), Some(&2), "{report:?}");
    assert_eq!(dp.ct.entries().unwrap().len(), 2);
    // Everything expires.
    std::thread::sleep(Duration::from_millis(3200));
    let report = conntrack::sweep(&mut dp.ct, &serving).unwrap();
    assert_eq!(report.deleted.get("expired"), Some(&2), "{report:?}");
    assert!(dp.ct.entries().unwrap().is_empty());
}

/// The datapath reclaims expired connections without the agent: while the
/// agent's heartbeat comes, the in-kernel collector stays idle; once it
/// stops, the timer sweeps the table, deleting expired connections with
/// their links and leaving live ones.
#[test]
fn the_kernel_collector_reclaims_expired_entries_while_the_agent_is_away() {
    let mut dp = load_short();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    // Ten connections that expire, one that is kept alive.
    for sport in 40000..40010 {
        handshake(&dp, CLIENT, sport, VIP, 80);
    }
    let keep = handshake(&dp, CLIENT, 41000, VIP, 80);
    assert_eq!(dp.conntrack_len(), 22);
    let keep_alive = |dp: &Datapath| {
        let (verdict, _) = dp.run(program_names::FROM_POD, &data(CLIENT, 41000, VIP, 80));
        assert_eq!(verdict, TCX_NEXT);
        let (verdict, _) = dp.run(program_names::TO_POD, &data(keep, 9376, CLIENT, 41000));
        assert_eq!(verdict, TCX_NEXT);
    };
    // A one-second period; the agent's heartbeat comes for four seconds:
    // the kernel leaves the (expired) entries to the agent.
    let mut heartbeat =
        netlb_agent::datapath::dataplane::kernel::Heartbeat::from_ebpf(&mut dp.ebpf)
            .expect("heartbeat");
    heartbeat
        .configure(Duration::from_secs(1))
        .expect("configure");
    netlb_agent::datapath::loader::arm_ct_gc(&mut dp.ebpf).expect("arm");
    for _ in 0..8 {
        let now = netlb_agent::datapath::dataplane::monotonic_now_s();
        heartbeat.beat(now, now).expect("heartbeat");
        keep_alive(&dp);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(dp.stat(stat::CT_GC_KERNEL_SWEEPS), 0);
    assert_eq!(dp.conntrack_len(), 22);
    // The heartbeat stops: the kernel sweeps within about three periods.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while dp.conntrack_len() != 2 && std::time::Instant::now() < deadline {
        keep_alive(&dp);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(dp.conntrack_len(), 2, "{:?}", dp.ct.entries().unwrap());
    assert!(dp.stat(stat::CT_GC_KERNEL_SWEEPS) >= 1);
    assert_eq!(dp.stat(stat::CT_GC_KERNEL_DELETED), 20);
    // The kept connection still works.
    keep_alive(&dp);
}

/// A window scale option (shift 7) as a SYN carries it.
const WSCALE_7: [u8; 4] = [1, 3, 3, 7];

/// The state of the one SERVICE entry whose client port is `sport`.
fn state_of(dp: &Datapath, sport: u16) -> CtState {
    let conns = dp.entries_of(ct_kind::SERVICE);
    let (_, conn) = conns
        .iter()
        .find(|(k, _)| u16::from_be(k.sport_be) == sport)
        .expect("connection");
    CtState::of(proto::TCP, conn.flags)
}

/// Issue 17, item 7: a blind RST or FIN from the Internet to an idle
/// NodePort connection (its tuple guessed, its sequence numbers not) is
/// dropped and leaves the connection established; the endpoints' own RST
/// and FIN, in window, still close it.
#[test]
fn a_blind_rst_from_outside_never_closes_a_node_port_connection() {
    let mut dp = Datapath::load();
    let np = Frontend::node_port(30080, proto::TCP, 8);
    dp.add_frontend(np, &[(BACKENDS[0], 9376)], backend_flags_local());
    // Client ISN 1,000,000, backend ISN 5,000,000, both with window scale 7.
    let syn = PacketBuilder::tcp(EXT, 20000, NODE, 30080)
        .syn()
        .seq(1_000_000)
        .tcp_options(&WSCALE_7)
        .build();
    through_node(&dp, &syn);
    let synack = PacketBuilder::tcp(BACKENDS[0], 9376, EXT, 20000)
        .syn()
        .seq(5_000_000)
        .ack_number(1_000_001)
        .tcp_options(&WSCALE_7)
        .build();
    let (verdict, _) = dp.run(program_names::TO_NETDEV, &synack);
    assert_eq!(verdict, TCX_NEXT);
    let ack = PacketBuilder::tcp(EXT, 20000, NODE, 30080)
        .seq(1_000_001)
        .ack_number(5_000_001)
        .window(512)
        .build();
    through_node(&dp, &ack);
    let reply = PacketBuilder::tcp(BACKENDS[0], 9376, EXT, 20000)
        .seq(5_000_001)
        .ack_number(1_000_001)
        .window(512)
        .payload(b"hello")
        .build();
    dp.run(program_names::TO_NETDEV, &reply);
    assert_eq!(state_of(&dp, 20000), CtState::Established);

    // Blind RSTs and a FIN far outside the backend's window (64 KiB at
    // scale 7 around 1,000,001): dropped, counted, no state change.
    for seq in [1_000_001 + 10_000_000, 3_000_000_000, 1_000_001 - 200_000] {
        for forged in [
            PacketBuilder::tcp(EXT, 20000, NODE, 30080)
                .rst()
                .seq(seq)
                .build(),
            PacketBuilder::tcp(EXT, 20000, NODE, 30080)
                .fin()
                .seq(seq)
                .ack_number(5_000_006)
                .build(),
        ] {
            let (verdict, _) = dp.run(program_names::FROM_NETDEV, &forged);
            assert_eq!(verdict, TC_ACT_SHOT, "seq {seq}");
        }
    }
    assert_eq!(dp.stat(stat::DROP_CT_OUT_OF_WINDOW), 6);
    assert_eq!(state_of(&dp, 20000), CtState::Established);
    // Data still flows.
    through_node(&dp, &data(EXT, 20000, NODE, 30080));
    // The client's own RST, at its next sequence number, closes it.
    let rst = PacketBuilder::tcp(EXT, 20000, NODE, 30080)
        .rst()
        .seq(1_000_001)
        .build();
    through_node(&dp, &rst);
    assert_eq!(state_of(&dp, 20000), CtState::Closing);
}

fn backend_flags_local() -> u8 {
    netlb_common::backend_flags::LOCAL
}

/// Issue 17, item 7: another pod forges the backend's RST towards a client
/// pod (a source the datapath cannot tell apart): out of the client's
/// window it is dropped at the client's interface and the connection stays;
/// the backend's real RST closes it.
#[test]
fn a_forged_backend_rst_never_closes_another_pods_connection() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &[(BACKENDS[0], 9376)]);
    let syn = PacketBuilder::tcp(CLIENT, 47000, VIP, 80)
        .syn()
        .seq(7_000_000)
        .tcp_options(&WSCALE_7)
        .build();
    dp.run(program_names::FROM_POD, &syn);
    let synack = PacketBuilder::tcp(BACKENDS[0], 9376, CLIENT, 47000)
        .syn()
        .seq(9_000_000)
        .ack_number(7_000_001)
        .tcp_options(&WSCALE_7)
        .build();
    assert_eq!(dp.run(program_names::TO_POD, &synack).0, TCX_NEXT);
    let ack = PacketBuilder::tcp(CLIENT, 47000, VIP, 80)
        .seq(7_000_001)
        .ack_number(9_000_001)
        .window(256)
        .build();
    assert_eq!(dp.run(program_names::FROM_POD, &ack).0, TCX_NEXT);
    assert_eq!(state_of(&dp, 47000), CtState::Established);
    // The forger does not know the backend's sequence numbers.
    let forged = PacketBuilder::tcp(BACKENDS[0], 9376, CLIENT, 47000)
        .rst()
        .seq(123_456)
        .build();
    assert_eq!(dp.run(program_names::TO_POD, &forged).0, TC_ACT_SHOT);
    let forged_fin = PacketBuilder::tcp(BACKENDS[0], 9376, CLIENT, 47000)
        .fin()
        .seq(9_000_001 + 5_000_000)
        .ack_number(7_000_001)
        .build();
    assert_eq!(dp.run(program_names::TO_POD, &forged_fin).0, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_CT_OUT_OF_WINDOW), 2);
    assert_eq!(state_of(&dp, 47000), CtState::Established);
    // The client still reaches its backend; the backend's own RST (at its
    // next sequence number) closes the connection.
    let (_, out) = dp.run(program_names::FROM_POD, &data(CLIENT, 47000, VIP, 80));
    assert_eq!(Ipv4Packet::parse(&out).unwrap().daddr(), BACKENDS[0]);
    let rst = PacketBuilder::tcp(BACKENDS[0], 9376, CLIENT, 47000)
        .rst()
        .seq(9_000_001)
        .build();
    let (verdict, out) = dp.run(program_names::TO_POD, &rst);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().saddr(), VIP);
    assert_eq!(state_of(&dp, 47000), CtState::Closing);
}

/// Issue 17, item 7: a pod that forges an outside client's address (the
/// tuple of a source-NATed NodePort connection) cannot close or take over
/// that connection: the connection was opened at the uplink, so a pod's
/// packet naming it is dropped, SYN included; the outside client keeps its
/// backend and NAT port.
#[test]
fn a_pod_forging_an_outside_client_cannot_take_over_its_connection() {
    let mut dp = Datapath::load();
    let np = Frontend::node_port(30080, proto::TCP, 8);
    dp.add_frontend(np, &[(REMOTE, 9376)], 0);
    let syn = PacketBuilder::tcp(EXT, 21000, NODE, 30080).syn().build();
    let out = through_node(&dp, &syn);
    let nat_port = Ipv4Packet::parse(&out).unwrap().sport();
    let reply = PacketBuilder::tcp(REMOTE, 9376, NODE, nat_port)
        .syn()
        .ack()
        .build();
    through_node(&dp, &reply);
    // The forger is a local pod: its packets enter at `from_pod`, with the
    // outside client's tuple (RST, then a SYN to re-open it elsewhere).
    for forged in [
        PacketBuilder::tcp(EXT, 21000, NODE, 30080)
            .rst()
            .ack()
            .build(),
        PacketBuilder::tcp(EXT, 21000, NODE, 30080).syn().build(),
        data(EXT, 21000, NODE, 30080),
    ] {
        assert_eq!(dp.run(program_names::FROM_POD, &forged).0, TC_ACT_SHOT);
    }
    assert_eq!(dp.stat(stat::DROP_CT_WRONG_SIDE), 3);
    let conns = dp.entries_of(ct_kind::SERVICE);
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].1.target_addr, be_addr(REMOTE));
    assert_eq!(
        CtState::of(proto::TCP, conns[0].1.flags),
        CtState::Established
    );
    let out = through_node(&dp, &data(EXT, 21000, NODE, 30080));
    assert_eq!(Ipv4Packet::parse(&out).unwrap().sport(), nat_port);
}

/// Issue 17, item 3: the agent's collector sweeps the real table in a loop
/// while connections are opened as fast as BPF_PROG_TEST_RUN goes, across
/// second boundaries (when a link written just before its connection stops
/// being fresh): afterwards every connection still translates its replies.
#[test]
fn a_sweep_racing_connection_creation_never_breaks_a_connection() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let mut table = dp.ct.reopen().expect("second handle");
    let stop = Arc::new(AtomicBool::new(false));
    let sweeping = Arc::clone(&stop);
    let sweeper = std::thread::spawn(move || {
        let mut sweeps = 0u64;
        let mut deleted = 0u64;
        while !sweeping.load(Ordering::Relaxed) {
            let report = conntrack::sweep(&mut table, &UdpServing::new()).expect("sweep");
            deleted += report.deleted_total();
            sweeps += 1;
        }
        (sweeps, deleted)
    });
    let started = std::time::Instant::now();
    let mut opened: Vec<(Ipv4Addr, u16, Ipv4Addr)> = Vec::new();
    'outer: for client in 11..=250u8 {
        for sport in 20000..21000u16 {
            if started.elapsed() > Duration::from_millis(3500) {
                break 'outer;
            }
            // Clients of their own (a backend as client would hairpin).
            let client = Ipv4Addr::new(10, 244, 2, client);
            let backend = handshake(&dp, client, sport, VIP, 80);
            opened.push((client, sport, backend));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let (sweeps, deleted) = sweeper.join().expect("sweeper");
    let broken: Vec<_> = opened
        .iter()
        .filter(|(client, sport, backend)| {
            let (_, out) = dp.run(
                program_names::TO_POD,
                &data(*backend, 9376, *client, *sport),
            );
            Ipv4Packet::parse(&out).unwrap().saddr() != VIP
        })
        .collect();
    println!(
        "{} connections opened during {sweeps} sweeps ({deleted} entries deleted): {} broken",
        opened.len(),
        broken.len()
    );
    assert!(sweeps > 10, "{sweeps}");
    assert!(
        broken.is_empty(),
        "{} broken: {:?}",
        broken.len(),
        &broken[..broken.len().min(5)]
    );
}
