//! Datapath tests through BPF_PROG_TEST_RUN on the real programs: build the
//! packet, seed the maps, run the program, check verdict, bytes, checksums
//! (recomputed from scratch) and maps.
//!
//! BPF_PROG_TEST_RUN for sched_cls programs was introduced in v4.12
//! (1cf1cae963c2). Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod harness;
mod packet;

use std::net::Ipv4Addr;

use harness::*;
use netlb_agent::datapath::dataplane::{ConntrackTable, Dataplane};
use netlb_common::{ServiceKey, ServiceValue, program_names, proto, scope, stat, svc_flags};
use packet::{Ipv4Packet, PacketBuilder, be_addr};

#[test]
fn tcp_syn_to_vip_is_dnated_and_reply_reverse_natted() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());

    let syn = PacketBuilder::tcp(CLIENT, 40000, VIP, 80).syn().build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).expect("parse output");
    assert!(
        BACKENDS.contains(&pkt.daddr()),
        "daddr {} not a backend",
        pkt.daddr()
    );
    assert_eq!(pkt.dport(), 9376);
    assert_eq!(pkt.saddr(), CLIENT);
    assert_eq!(pkt.sport(), 40000);
    pkt.assert_checksums();
    assert_eq!(pkt.payload(), Ipv4Packet::parse(&syn).unwrap().payload());
    assert_eq!(dp.stat(stat::FORWARD_NAT), 1);
    assert_eq!(dp.stat(stat::NEW_FLOW), 1);
    assert_eq!(dp.conntrack_len(), 2, "SERVICE and REPLY entries");
    let backend = pkt.daddr();

    // The same flow again: same backend, no new conntrack entry.
    let (verdict, out2) = dp.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(Ipv4Packet::parse(&out2).unwrap().daddr(), backend);
    assert_eq!(dp.stat(stat::NEW_FLOW), 1);
    assert_eq!(dp.stat(stat::FORWARD_NAT), 2);

    // The backend's SYN-ACK, on its way to the client pod.
    let synack = PacketBuilder::tcp(backend, 9376, CLIENT, 40000)
        .syn()
        .ack()
        .payload(b"hello")
        .build();
    let (verdict, out) = dp.run(program_names::TO_POD, &synack);
    assert_eq!(verdict, TCX_NEXT);
    let reply = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((reply.saddr(), reply.sport()), (VIP, 80));
    assert_eq!((reply.daddr(), reply.dport()), (CLIENT, 40000));
    assert_eq!(reply.payload(), b"hello");
    reply.assert_checksums();
    assert_eq!(dp.stat(stat::REVERSE_NAT), 1);
}

#[test]
fn flows_spread_over_backends() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let mut hits = [0usize; 3];
    for sport in 30000..30300u16 {
        let syn = PacketBuilder::tcp(CLIENT, sport, VIP, 80).syn().build();
        let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
        assert_eq!(verdict, TCX_NEXT);
        let daddr = Ipv4Packet::parse(&out).unwrap().daddr();
        let i = BACKENDS
            .iter()
            .position(|b| *b == daddr)
            .expect("a backend");
        hits[i] += 1;
    }
    for (i, n) in hits.iter().enumerate() {
        assert!(*n >= 60, "backend {i} got {n} of 300 flows: {hits:?}");
    }
    let mut flows = 0;
    for id in 100..103 {
        flows += dp.maps.backend_stats(id).unwrap().flows;
    }
    assert_eq!(flows, 300);
}

#[test]
fn udp_with_and_without_checksum() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 53, proto::UDP, &[(BACKENDS[0], 5353)]);

    let query = PacketBuilder::udp(CLIENT, 50000, VIP, 53)
        .payload(b"dns query bytes")
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &query);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.daddr(), pkt.dport()), (BACKENDS[0], 5353));
    assert_ne!(pkt.l4_checksum(), 0);
    pkt.assert_checksums();

    // A zero UDP checksum means "none" and must stay zero.
    let no_csum = PacketBuilder::udp(CLIENT, 50001, VIP, 53)
        .payload(b"no checksum")
        .zero_udp_checksum()
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &no_csum);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.daddr(), pkt.dport()), (BACKENDS[0], 5353));
    assert_eq!(pkt.l4_checksum(), 0);
    pkt.assert_checksums();

    // The answer.
    let answer = PacketBuilder::udp(BACKENDS[0], 5353, CLIENT, 50000)
        .payload(b"dns answer")
        .build();
    let (verdict, out) = dp.run(program_names::TO_POD, &answer);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.sport()), (VIP, 53));
    pkt.assert_checksums();
}

#[test]
fn hairpin_flow_is_snatted_and_restored() {
    let mut dp = Datapath::load();
    // The client pod is the only backend of the service.
    dp.add_service(VIP, 80, proto::TCP, &[(CLIENT, 9376)]);

    let syn = PacketBuilder::tcp(CLIENT, 41000, VIP, 80).syn().build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.sport()), (LOOPBACK, 41000));
    assert_eq!((pkt.daddr(), pkt.dport()), (CLIENT, 9376));
    pkt.assert_checksums();
    assert_eq!(dp.stat(stat::HAIRPIN), 1);

    // The pod answers the service loopback address; the reply leaves the pod
    // through the same veth (from_pod) and must look like it came from the VIP.
    let synack = PacketBuilder::tcp(CLIENT, 9376, LOOPBACK, 41000)
        .syn()
        .ack()
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &synack);
    // Straight back out of the pod's veth, not through the kernel's routing
    // (the frontend may be a local address of the node).
    assert_eq!(verdict, TC_ACT_REDIRECT);
    let reply = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((reply.saddr(), reply.sport()), (VIP, 80));
    assert_eq!((reply.daddr(), reply.dport()), (CLIENT, 41000));
    reply.assert_checksums();
    // Ethernet addresses swapped: towards the pod.
    assert_eq!(out[..6], synack[6..12]);
    assert_eq!(out[6..12], synack[..6]);
}

#[test]
fn service_without_backends_rejects_with_icmp_port_unreachable() {
    for (l4, builder) in [
        ("tcp", PacketBuilder::tcp(CLIENT, 42000, VIP, 80).syn()),
        (
            "udp",
            PacketBuilder::udp(CLIENT, 42000, VIP, 80).payload(b"x"),
        ),
    ] {
        let mut dp = Datapath::load();
        let proto = if l4 == "tcp" { proto::TCP } else { proto::UDP };
        dp.add_service(VIP, 80, proto, &[]);
        let input = builder.build();
        let (verdict, out) = dp.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TC_ACT_REDIRECT, "{l4}");
        // MACs swapped: back to the client.
        assert_eq!(&out[0..6], &input[6..12], "{l4}: dst mac");
        assert_eq!(&out[6..12], &input[0..6], "{l4}: src mac");
        let pkt = Ipv4Packet::parse(&out).unwrap();
        assert_eq!(pkt.protocol(), proto::ICMP);
        assert_eq!((pkt.saddr(), pkt.daddr()), (VIP, CLIENT));
        pkt.assert_checksums();
        let icmp = pkt.payload_with_l4_header();
        assert_eq!(icmp.len(), 8 + 20 + 8, "{l4}: ICMP error length");
        assert_eq!((icmp[0], icmp[1]), (3, 3), "{l4}: dest/port unreachable");
        // Quotes the original IPv4 header and 8 bytes of L4.
        assert_eq!(&icmp[8..36], &input[14..42], "{l4}: quoted datagram");
        assert_eq!(dp.stat(stat::REJECT), 1);
        assert_eq!(dp.conntrack_len(), 0);
    }
}

#[test]
fn packets_that_are_not_for_services_pass_unmodified() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());

    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "non-service address",
            PacketBuilder::tcp(CLIENT, 40000, Ipv4Addr::new(10, 244, 1, 5), 80)
                .syn()
                .build(),
        ),
        (
            "service address, other port",
            PacketBuilder::tcp(CLIENT, 40000, VIP, 81).syn().build(),
        ),
        (
            "service port, other protocol",
            PacketBuilder::udp(CLIENT, 40000, VIP, 80).build(),
        ),
        ("ARP", PacketBuilder::arp()),
    ];
    for (name, input) in cases {
        let (verdict, out) = dp.run(program_names::FROM_POD, &input);
        assert_eq!(verdict, TCX_NEXT, "{name}");
        assert_eq!(out, input, "{name}: bytes changed");
    }
    assert_eq!(dp.stat(stat::FORWARD_NAT), 0);
}

#[test]
fn malformed_packets_are_never_modified() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());

    // IPv4 options: passed unmodified, counted.
    let options = PacketBuilder::tcp(CLIENT, 40000, VIP, 80)
        .syn()
        .ip_options(&[1, 1, 1, 0]) // NOP NOP NOP EOL
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &options);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(out, options);
    assert_eq!(dp.stat(stat::PASS_IP_OPTIONS), 1);

    // A non-first fragment (offset 185 * 8): no ports to balance on.
    let fragment = PacketBuilder::udp(CLIENT, 40000, VIP, 80)
        .payload(b"middle of a datagram")
        .fragment_offset(185)
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &fragment);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(out, fragment);
    assert_eq!(dp.stat(stat::PASS_FRAGMENT), 1);

    // Truncated TCP header: dropped with a reason.
    let mut truncated = PacketBuilder::tcp(CLIENT, 40000, VIP, 80).syn().build();
    truncated.truncate(14 + 20 + 10);
    let (verdict, _) = dp.run(program_names::FROM_POD, &truncated);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_TRUNCATED_L4), 1);

    // An IPv4 frame whose header says version 6: dropped with a reason.
    // (Frames shorter than an IPv4 header are refused by BPF_PROG_TEST_RUN
    // itself, so the parser's length check cannot be exercised here.)
    let mut bad_version = PacketBuilder::tcp(CLIENT, 40000, VIP, 80).syn().build();
    bad_version[14] = 0x65;
    let (verdict, _) = dp.run(program_names::FROM_POD, &bad_version);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_MALFORMED_L3), 1);

    assert_eq!(dp.stat(stat::FORWARD_NAT), 0);
    assert_eq!(dp.conntrack_len(), 0);
}

#[test]
fn an_established_connection_keeps_its_backend_after_the_backend_is_removed() {
    // Issue 8, sequence 1: a rolling update removes the backend of a
    // keep-alive connection. kube-proxy leaves the connection alone until
    // it ends; netlb used to move it to another backend, which answered RST.
    let mut dp = Datapath::load();
    dp.add_service(VIP, 80, proto::TCP, &three_backends());
    let syn = PacketBuilder::tcp(CLIENT, 43000, VIP, 80).syn().build();
    let (_, out) = dp.run(program_names::FROM_POD, &syn);
    let first = Ipv4Packet::parse(&out).unwrap().daddr();
    let index = BACKENDS.iter().position(|b| *b == first).unwrap();
    let synack = PacketBuilder::tcp(first, 9376, CLIENT, 43000)
        .syn()
        .ack()
        .build();
    assert_eq!(dp.run(program_names::TO_POD, &synack).0, TCX_NEXT);

    remove_backend(&mut dp, VIP, 80, proto::TCP, index);

    let data = PacketBuilder::tcp(CLIENT, 43000, VIP, 80)
        .ack()
        .payload(b"GET /")
        .build();
    let (verdict, out) = dp.run(program_names::FROM_POD, &data);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!(
        (pkt.daddr(), pkt.dport()),
        (first, 9376),
        "moved mid-stream"
    );
    pkt.assert_checksums();
    // Its replies are still translated.
    let reply = PacketBuilder::tcp(first, 9376, CLIENT, 43000)
        .ack()
        .payload(b"200")
        .build();
    let (_, out) = dp.run(program_names::TO_POD, &reply);
    assert_eq!(Ipv4Packet::parse(&out).unwrap().saddr(), VIP);
    // New connections never pick the removed backend.
    for sport in 30000..30100u16 {
        let syn = PacketBuilder::tcp(CLIENT, sport, VIP, 80).syn().build();
        let (_, out) = dp.run(program_names::FROM_POD, &syn);
        assert_ne!(Ipv4Packet::parse(&out).unwrap().daddr(), first);
    }
    assert_eq!(dp.stat(stat::CT_RESELECT), 0);
}

#[test]
fn nodeport_to_remote_backend_is_snated_and_reply_restored() {
    for protocol in [proto::TCP, proto::UDP] {
        let mut dp = Datapath::load();
        dp.add_service(NODE, 30080, protocol, &[(REMOTE, 9376)]);
        let build = |src, sport, dst, dport| match protocol {
            proto::TCP => PacketBuilder::tcp(src, sport, dst, dport).syn(),
            _ => PacketBuilder::udp(src, sport, dst, dport),
        };

        // In at the uplink: DNAT only (the kernel routes on the client's
        // address); out again towards the backend's node: SNAT to the node.
        let request = build(EXT, 20000, NODE, 30080).payload(b"request").build();
        let (verdict, routed) = dp.run(program_names::FROM_NETDEV, &request);
        assert_eq!(verdict, TCX_NEXT);
        let pkt = Ipv4Packet::parse(&routed).unwrap();
        assert_eq!((pkt.saddr(), pkt.sport()), (EXT, 20000));
        assert_eq!((pkt.daddr(), pkt.dport()), (REMOTE, 9376));
        pkt.assert_checksums();
        let (verdict, out) = dp.run(program_names::TO_NETDEV, &routed);
        assert_eq!(verdict, TCX_NEXT);
        let pkt = Ipv4Packet::parse(&out).unwrap();
        // The client's port is in the NAT range (1024-29999), so it is kept.
        assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 20000));
        assert_eq!((pkt.daddr(), pkt.dport()), (REMOTE, 9376));
        assert_eq!(pkt.payload(), b"request");
        pkt.assert_checksums();
        assert_eq!(dp.stat(stat::SNAT_FLOW), 1);

        // The backend's reply comes back to the node address and leaves
        // towards the client as if from the node port.
        let reply = build(REMOTE, 9376, NODE, 20000).payload(b"reply").build();
        let (verdict, routed) = dp.run(program_names::FROM_NETDEV, &reply);
        assert_eq!(verdict, TCX_NEXT);
        let pkt = Ipv4Packet::parse(&routed).unwrap();
        assert_eq!((pkt.saddr(), pkt.sport()), (REMOTE, 9376));
        assert_eq!((pkt.daddr(), pkt.dport()), (EXT, 20000));
        pkt.assert_checksums();
        let (verdict, out) = dp.run(program_names::TO_NETDEV, &routed);
        assert_eq!(verdict, TCX_NEXT);
        let pkt = Ipv4Packet::parse(&out).unwrap();
        assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 30080));
        assert_eq!((pkt.daddr(), pkt.dport()), (EXT, 20000));
        assert_eq!(pkt.payload(), b"reply");
        pkt.assert_checksums();
        assert_eq!(dp.stat(stat::SNAT_REVERSE), 1);
        assert_eq!(dp.stat(stat::REVERSE_NAT), 1);

        // The second packet of the flow takes the same path without new
        // entries.
        let before = dp.conntrack_len();
        assert_eq!(before, 3, "SERVICE, EGRESS, NAT_IN");
        let out = through_node(&dp, &request);
        let pkt = Ipv4Packet::parse(&out).unwrap();
        assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 20000));
        assert_eq!(dp.conntrack_len(), before);
        assert_eq!(dp.stat(stat::NEW_FLOW), 1);
    }
}

#[test]
fn nodeport_snat_port_collision_takes_another_port() {
    let mut dp = Datapath::load();
    dp.add_service(NODE, 30080, proto::TCP, &[(REMOTE, 9376)]);
    // Two clients with the same source port, and one with a port outside the
    // NAT range (in the kernel's ephemeral range, where host connections
    // take theirs).
    let mut nat_ports = Vec::new();
    for (client, sport) in [(EXT, 20000), (EXT2, 20000), (EXT, 40000)] {
        let syn = PacketBuilder::tcp(client, sport, NODE, 30080).syn().build();
        let out = through_node(&dp, &syn);
        let pkt = Ipv4Packet::parse(&out).unwrap();
        assert_eq!(pkt.saddr(), NODE);
        assert!(
            (1024..=29_999).contains(&pkt.sport()),
            "NAT port {} outside the range",
            pkt.sport()
        );
        nat_ports.push(pkt.sport());
    }
    assert_eq!(nat_ports[0], 20000);
    assert_ne!(nat_ports[1], 20000, "second client must not reuse the port");
    assert_ne!(nat_ports[2], nat_ports[1]);
    // Each reply finds its own client.
    for ((client, sport), nat_port) in [(EXT, 20000), (EXT2, 20000), (EXT, 40000)]
        .into_iter()
        .zip(nat_ports)
    {
        let synack = PacketBuilder::tcp(REMOTE, 9376, NODE, nat_port)
            .syn()
            .ack()
            .build();
        let out = through_node(&dp, &synack);
        let pkt = Ipv4Packet::parse(&out).unwrap();
        assert_eq!((pkt.daddr(), pkt.dport()), (client, sport));
        assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 30080));
        pkt.assert_checksums();
    }
}

#[test]
fn nodeport_to_local_backend_keeps_the_client_address() {
    let mut dp = Datapath::load();
    let local = BACKENDS[0];
    dp.add_service_with(
        NODE,
        30080,
        proto::TCP,
        &[(local, 9376)],
        netlb_common::backend_flags::LOCAL,
    );
    let syn = PacketBuilder::tcp(EXT, 40000, NODE, 30080).syn().build();
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &syn);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.sport()), (EXT, 40000));
    assert_eq!((pkt.daddr(), pkt.dport()), (local, 9376));
    pkt.assert_checksums();
    assert_eq!(dp.stat(stat::SNAT_FLOW), 0);
    assert_eq!(dp.conntrack_len(), 2, "SERVICE and OUT+REV");
    // The pod's reply leaves through the uplink with the node port as source.
    let synack = PacketBuilder::tcp(local, 9376, EXT, 40000)
        .syn()
        .ack()
        .payload(b"hi")
        .build();
    let (verdict, out) = dp.run(program_names::TO_NETDEV, &synack);
    assert_eq!(verdict, TCX_NEXT);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 30080));
    assert_eq!((pkt.daddr(), pkt.dport()), (EXT, 40000));
    assert_eq!(pkt.payload(), b"hi");
    pkt.assert_checksums();
}

#[test]
fn uplink_leaves_unrelated_traffic_alone() {
    let mut dp = Datapath::load();
    dp.add_service(NODE, 30080, proto::TCP, &[(REMOTE, 9376)]);
    // Another port of the node, pod-to-pod traffic, and a packet to the node
    // address that belongs to no SNATed flow: all pass unchanged.
    for frame in [
        PacketBuilder::tcp(EXT, 40000, NODE, 22).syn().build(),
        PacketBuilder::tcp(REMOTE, 9376, BACKENDS[0], 40000)
            .ack()
            .build(),
        PacketBuilder::udp(REMOTE, 9376, NODE, 50000).build(),
    ] {
        for program in [program_names::FROM_NETDEV, program_names::TO_NETDEV] {
            let (verdict, out) = dp.run(program, &frame);
            assert_eq!(verdict, TCX_NEXT, "{program}");
            assert_eq!(out, frame, "{program} changed the packet");
        }
    }
    assert_eq!(dp.conntrack_len(), 0);
}

#[test]
fn nodeport_local_policy_without_local_endpoints_drops() {
    let mut dp = Datapath::load();
    let key = ServiceKey {
        address_be: be_addr(NODE),
        port_be: 30080u16.to_be(),
        backend_slot: 0,
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    dp.maps
        .upsert_service(
            &key,
            &ServiceValue {
                backend_id: 0,
                rev_nat_index: 9,
                count: 0,
                flags: svc_flags::NODE_PORT | svc_flags::LOCAL_ONLY | svc_flags::DROP,
            },
        )
        .unwrap();
    let syn = PacketBuilder::tcp(EXT, 40000, NODE, 30080).syn().build();
    let (verdict, _) = dp.run(program_names::FROM_NETDEV, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_NO_LOCAL_ENDPOINTS), 1);
}

#[test]
fn closed_flow_entries_do_not_capture_a_new_connection_on_the_same_tuple() {
    let mut dp = Datapath::load();
    let local = BACKENDS[0];
    dp.add_service_with(
        NODE,
        30080,
        proto::TCP,
        &[(local, 9376)],
        netlb_common::backend_flags::LOCAL,
    );
    let syn = PacketBuilder::tcp(EXT, 40000, NODE, 30080).syn().build();
    assert_eq!(dp.run(program_names::FROM_NETDEV, &syn).0, TCX_NEXT);
    // Both sides close.
    let server_fin = PacketBuilder::tcp(local, 9376, EXT, 40000)
        .fin()
        .ack()
        .build();
    let (_, out) = dp.run(program_names::TO_NETDEV, &server_fin);
    assert_eq!(
        Ipv4Packet::parse(&out).unwrap().saddr(),
        NODE,
        "FIN translated"
    );
    let client_fin = PacketBuilder::tcp(EXT, 40000, NODE, 30080)
        .fin()
        .ack()
        .build();
    let (_, out) = dp.run(program_names::FROM_NETDEV, &client_fin);
    assert_eq!(
        Ipv4Packet::parse(&out).unwrap().daddr(),
        local,
        "FIN translated"
    );

    // The client now reaches the pod directly from the same port: the pod's
    // SYN-ACK must leave untranslated, not as the closed node-port flow.
    let direct_synack = PacketBuilder::tcp(local, 9376, EXT, 40000)
        .syn()
        .ack()
        .build();
    let (verdict, out) = dp.run(program_names::TO_NETDEV, &direct_synack);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(
        out, direct_synack,
        "stale entry applied to a new connection"
    );

    // A new connection to the node port from the same port is a new flow.
    assert_eq!(dp.run(program_names::FROM_NETDEV, &syn).0, TCX_NEXT);
    assert_eq!(dp.stat(stat::NEW_FLOW), 2);
    let synack = PacketBuilder::tcp(local, 9376, EXT, 40000)
        .syn()
        .ack()
        .build();
    let (_, out) = dp.run(program_names::TO_NETDEV, &synack);
    let pkt = Ipv4Packet::parse(&out).unwrap();
    assert_eq!((pkt.saddr(), pkt.sport()), (NODE, 30080));
    pkt.assert_checksums();
}

/// The kernel's batch commands through the `Dataplane` trait: thousands of
/// entries per call, in order; a key already gone is not an error; a full
/// map stops the batch at the first entry that does not fit and names it.
#[test]
fn batch_writes_and_deletes_in_the_kernel() {
    use netlb_agent::{datapath::layout::MapSizes, datapath::sync::Syncer};
    let sizes = MapSizes {
        service_entries: 20_000,
        ..MapSizes::default()
    };
    let mut dp = Datapath::load_sized(Default::default(), sizes);
    let key = |i: u32| ServiceKey {
        address_be: be_addr(Ipv4Addr::from(0x0a60_0000 + i)),
        port_be: 80u16.to_be(),
        backend_slot: 0,
        proto: proto::TCP,
        scope: scope::EXTERNAL,
        pad: [0; 2],
    };
    let value = |i: u32| ServiceValue {
        backend_id: i,
        rev_nat_index: i,
        count: 0,
        flags: svc_flags::CLUSTER_IP,
    };
    // More than one call's worth (8192 per call).
    let items: Vec<(ServiceKey, ServiceValue)> = (0..19_000).map(|i| (key(i), value(i))).collect();
    dp.maps.upsert_services(&items).expect("batch upsert");
    for i in [0, 8_191, 8_192, 18_999] {
        assert_eq!(dp.maps.service(&key(i)).unwrap(), Some(value(i)));
    }
    // Past the map's size: the first entry that does not fit is named.
    let more: Vec<(ServiceKey, ServiceValue)> =
        (19_000..21_000).map(|i| (key(i), value(i))).collect();
    let err = dp.maps.upsert_services(&more).expect_err("map full");
    assert_eq!(err.index, 1_000, "{err:?}");
    assert!(dp.maps.service(&key(19_999)).unwrap().is_some());
    // Deleting, with keys already gone among them (never written, deleted
    // twice): everything named is gone, nothing else.
    let mut gone: Vec<ServiceKey> = (0..10_000).map(key).collect();
    gone.insert(5, key(500_000));
    gone.push(key(3));
    dp.maps.delete_services(&gone).expect("batch delete");
    assert_eq!(dp.maps.service(&key(9_999)).unwrap(), None);
    assert_eq!(dp.maps.service(&key(10_000)).unwrap(), Some(value(10_000)));
    let left = dp.maps.dump().unwrap().services.len();
    assert_eq!(left, 10_000);
    // The syncer's failure path on the kernel: a Service too big for what
    // is left is reported failed, the others are programmed.
    dp.maps
        .delete_services(&(10_000..20_000).map(key).collect::<Vec<_>>())
        .unwrap();
    let mut syncer = Syncer::new();
    let mut want = netlb_agent::model::desired::DesiredState::default();
    let frontend = |i: u32, n: u16| {
        (
            netlb_agent::model::desired::FrontendKey {
                address: Ipv4Addr::new(10, 97, (i >> 8) as u8, i as u8),
                port: 80,
                proto: proto::TCP,
                scope: scope::EXTERNAL,
            },
            netlb_agent::model::desired::DesiredFrontend {
                service: netlb_agent::model::ServicePortName {
                    namespace: "default".into(),
                    name: format!("svc-{i}").into(),
                    port_name: "".into(),
                    protocol: "TCP".into(),
                },
                flags: svc_flags::CLUSTER_IP,
                backends: (0..n)
                    .map(|b| netlb_agent::model::desired::DesiredBackend {
                        addr: netlb_agent::model::desired::BackendAddr {
                            address: Ipv4Addr::new(10, 244, i as u8, b as u8),
                            port: 8080,
                            proto: proto::TCP,
                        },
                        flags: 0,
                    })
                    .collect(),
                source_ranges: vec![],
                affinity_timeout: 0,
            },
        )
    };
    // 100 Services of 4 backends fit (500 entries); one of 30,000 does not.
    want.frontends.extend((0..100).map(|i| frontend(i, 4)));
    want.frontends.extend([frontend(1_000, 30_000)]);
    let report = syncer.sync(&mut dp.maps, &want).unwrap();
    assert_eq!(report.failed, 1, "{report:?}");
    let programmed = dp.maps.dump().unwrap();
    for i in 0..100 {
        let (fe, _) = frontend(i, 4);
        let head = dp
            .maps
            .service(&ServiceKey {
                address_be: be_addr(fe.address),
                ..key(0)
            })
            .unwrap()
            .expect("programmed");
        assert_eq!(head.count, 4);
    }
    assert!(programmed.backends.len() >= 400);
}

/// loadBalancerSourceRanges on a load-balancer IP: a new connection from a
/// source inside a range is load-balanced, one from outside is dropped
/// (before REJECT: even without endpoints it is a drop), and a connection
/// already established keeps flowing when the ranges change (kube-proxy
/// filters new connections).
#[test]
fn source_ranges_admit_new_connections_only_from_their_sources() {
    use netlb_agent::datapath::dataplane::{Aux, SourceRange};
    use netlb_common::SourceRangeKey;
    let mut dp = Datapath::load();
    let lb = Ipv4Addr::new(198, 51, 100, 7);
    let fe = Frontend {
        vip: lb,
        port: 80,
        proto: proto::TCP,
        rev_nat_index: 9,
        flags: svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES,
    };
    let range = |network: Ipv4Addr, len: u32| -> SourceRange {
        (
            SourceRangeKey::FRONTEND_BITS + len,
            SourceRangeKey {
                rev_nat_index_be: 9u32.to_be(),
                proto: proto::TCP,
                scope: scope::EXTERNAL,
                pad: [0; 2],
                address_be: be_addr(network),
            },
        )
    };
    // 203.0.113.0/25 admits EXT (203.0.113.10) and EXT2 (.11); a range of
    // another frontend (index 10) admits everything and must not count.
    let mut other = range(Ipv4Addr::UNSPECIFIED, 0);
    other.1.rev_nat_index_be = 10u32.to_be();
    dp.maps
        .upsert_aux(&[
            Aux::SourceRange(range(Ipv4Addr::new(203, 0, 113, 0), 25)),
            Aux::SourceRange(other),
        ])
        .unwrap();
    dp.add_frontend(fe, &three_backends(), 0);

    let syn = PacketBuilder::tcp(EXT, 40000, lb, 80).syn().build();
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &syn);
    assert_eq!(verdict, TCX_NEXT);
    assert!(BACKENDS.contains(&Ipv4Packet::parse(&out).unwrap().daddr()));

    let outsider = Ipv4Addr::new(203, 0, 113, 200);
    let syn = PacketBuilder::tcp(outsider, 40000, lb, 80).syn().build();
    let (verdict, _) = dp.run(program_names::FROM_NETDEV, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_SOURCE_RANGE), 1);
    // From a pod outside the ranges too (kube-proxy's firewall applies to
    // every source).
    let (verdict, _) = dp.run(
        program_names::FROM_POD,
        &PacketBuilder::tcp(CLIENT, 40001, lb, 80).syn().build(),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::DROP_SOURCE_RANGE), 2);
    // Without endpoints a disallowed source is still dropped, not rejected.
    dp.set_frontend(fe, 0);
    let (verdict, _) = dp.run(program_names::FROM_NETDEV, &syn);
    assert_eq!(verdict, TC_ACT_SHOT);
    assert_eq!(dp.stat(stat::REJECT), 0);
    dp.set_frontend(fe, 3);
    // The range is narrowed to EXT2 alone: EXT's established connection
    // keeps its backend; a new one from EXT is dropped.
    dp.maps
        .upsert_aux(&[Aux::SourceRange(range(EXT2, 32))])
        .unwrap();
    dp.maps
        .delete_aux(&[Aux::SourceRange(range(Ipv4Addr::new(203, 0, 113, 0), 25))])
        .unwrap();
    let ack = PacketBuilder::tcp(EXT, 40000, lb, 80).ack().build();
    let (verdict, out) = dp.run(program_names::FROM_NETDEV, &ack);
    assert_eq!(verdict, TCX_NEXT);
    assert!(BACKENDS.contains(&Ipv4Packet::parse(&out).unwrap().daddr()));
    let (verdict, _) = dp.run(
        program_names::FROM_NETDEV,
        &PacketBuilder::tcp(EXT, 40002, lb, 80).syn().build(),
    );
    assert_eq!(verdict, TC_ACT_SHOT);
    let (verdict, _) = dp.run(
        program_names::FROM_NETDEV,
        &PacketBuilder::tcp(EXT2, 40002, lb, 80).syn().build(),
    );
    assert_eq!(verdict, TCX_NEXT);
    // The flag off: everyone.
    dp.set_frontend(
        Frontend {
            flags: svc_flags::LOAD_BALANCER,
            ..fe
        },
        3,
    );
    let (verdict, _) = dp.run(
        program_names::FROM_NETDEV,
        &PacketBuilder::tcp(outsider, 40003, lb, 80).syn().build(),
    );
    assert_eq!(verdict, TCX_NEXT);
}

/// sessionAffinity ClientIP: a client's new connections (any source port)
/// keep going to the backend its first one got while they come less than
/// the timeout apart; another backend once the pair leaves
/// `AFFINITY_MATCH` (the backend left the Service); hash-chosen again once
/// the timeout passed. Frontends without the flag ignore all of it.
#[test]
fn session_affinity_pins_a_client_until_its_backend_leaves_or_the_timeout_passes() {
    use netlb_agent::datapath::dataplane::Aux;
    use netlb_common::{AffinityFrontend, AffinityMatchKey};
    let mut dp = Datapath::load();
    let fe = Frontend {
        flags: svc_flags::CLUSTER_IP | svc_flags::AFFINITY,
        ..Frontend::cluster_ip(VIP, 80, proto::TCP, 7)
    };
    let ids = dp.add_frontend(fe, &three_backends(), 0);
    let header = |timeout: u32| {
        (
            ServiceKey {
                address_be: be_addr(VIP),
                port_be: 80u16.to_be(),
                backend_slot: 0,
                proto: proto::TCP,
                scope: scope::EXTERNAL,
                pad: [0; 2],
            },
            ServiceValue {
                backend_id: timeout,
                rev_nat_index: 7,
                count: 3,
                flags: fe.flags,
            },
        )
    };
    let (key, value) = header(2);
    dp.maps.upsert_service(&key, &value).unwrap();
    let pair = |id: u32| {
        Aux::AffinityMatch(AffinityMatchKey {
            backend_id: id,
            frontend: AffinityFrontend {
                rev_nat_index: 7,
                proto: proto::TCP,
                scope: scope::EXTERNAL,
                pad: [0; 2],
            },
        })
    };
    dp.maps
        .upsert_aux(&ids.iter().map(|id| pair(*id)).collect::<Vec<_>>())
        .unwrap();
    let backend_of = |dp: &Datapath, client: Ipv4Addr, sport: u16| -> Ipv4Addr {
        let syn = PacketBuilder::tcp(client, sport, VIP, 80).syn().build();
        let (verdict, out) = dp.run(program_names::FROM_POD, &syn);
        assert_eq!(verdict, TCX_NEXT);
        Ipv4Packet::parse(&out).unwrap().daddr()
    };
    // One client, 30 connections: one backend.
    let first = backend_of(&dp, CLIENT, 41000);
    for sport in 41001..41030 {
        assert_eq!(backend_of(&dp, CLIENT, sport), first, "port {sport}");
    }
    // Different clients are spread (the first choice is the flow hash).
    let spread: std::collections::BTreeSet<Ipv4Addr> = (1..=12)
        .map(|i| backend_of(&dp, Ipv4Addr::new(10, 244, 5, i), 42000))
        .collect();
    assert!(spread.len() >= 2, "{spread:?}");
    // The backend leaves the Service (its match goes): the client moves,
    // and sticks to its new backend.
    let index = BACKENDS.iter().position(|b| *b == first).unwrap();
    dp.maps.delete_aux(&[pair(ids[index])]).unwrap();
    let second = backend_of(&dp, CLIENT, 43000);
    // (The hash may pick the same slot again; its pair is gone, so the
    // choice is the hash's, and from then on it sticks.)
    for sport in 43001..43010 {
        assert_eq!(backend_of(&dp, CLIENT, sport), second);
    }
    dp.maps.upsert_aux(&[pair(ids[index])]).unwrap();
    // The timeout: what the hash alone gives each source port of another
    // client, then pinned to the first port's backend, a port whose own
    // choice differs still gets the pinned one within the timeout and its
    // own once the timeout (2 s, whole seconds of the coarse clock) passed.
    let client = Ipv4Addr::new(10, 244, 6, 1);
    let (key, mut value) = header(2);
    value.flags = svc_flags::CLUSTER_IP;
    dp.maps.upsert_service(&key, &value).unwrap();
    let by_hash: Vec<Ipv4Addr> = (0..30)
        .map(|i| backend_of(&dp, client, 46000 + i))
        .collect();
    let plain: std::collections::BTreeSet<Ipv4Addr> = by_hash.iter().copied().collect();
    assert!(plain.len() >= 2, "without the flag: {plain:?}");
    // Those connections are tracked: forget them, so that the same tuples
    // open new ones below.
    for (key, _) in dp.ct.entries().unwrap() {
        dp.ct.delete(&key).unwrap();
    }
    let (key, value) = header(2);
    dp.maps.upsert_service(&key, &value).unwrap();
    let pinned = backend_of(&dp, client, 46000);
    assert_eq!(pinned, by_hash[0]);
    let other = (1..30)
        .find(|i| by_hash[*i] != pinned)
        .expect("a port hashing elsewhere");
    assert_eq!(backend_of(&dp, client, 46000 + other as u16), pinned);
    std::thread::sleep(std::time::Duration::from_millis(3_100));
    for (key, _) in dp.ct.entries().unwrap() {
        dp.ct.delete(&key).unwrap();
    }
    assert_eq!(
        backend_of(&dp, client, 46000 + other as u16),
        by_hash[other],
        "expired affinity"
    );
}

/// Splits a built frame's IPv4 datagram into fragments of at most
/// `chunk` payload bytes (a multiple of 8), as a sender's stack would.
fn fragments(frame: &[u8], chunk: usize) -> Vec<Vec<u8>> {
    let (eth, ip, payload) = (&frame[..14], &frame[14..34], &frame[34..]);
    let pieces: Vec<&[u8]> = payload.chunks(chunk).collect();
    pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let mut header = ip.to_vec();
            header[2..4].copy_from_slice(&((20 + piece.len()) as u16).to_be_bytes());
            let more = if i + 1 < pieces.len() { 0x2000 } else { 0 };
            let offset = ((i * chunk) / 8) as u16;
            header[6..8].copy_from_slice(&(more | offset).to_be_bytes());
            header[10..12].copy_from_slice(&[0, 0]);
            let csum = packet::checksum(&[&header]);
            header[10..12].copy_from_slice(&csum.to_be_bytes());
            [eth, &header, piece].concat()
        })
        .collect()
}

/// The IPv4 header checksum of a frame is valid.
fn ip_checksum_ok(frame: &[u8]) -> bool {
    packet::checksum(&[&frame[14..34]]) == 0
}

/// A UDP datagram larger than the MTU through a ClusterIP (upstream's
/// "should be able to handle large requests: udp"): every fragment gets the
/// first one's translation, there and back (the later ones only their
/// addresses; the first carries the ports and the checksum of the whole
/// datagram). A later fragment arriving before its first passes as it is.
#[test]
fn fragmented_datagrams_are_translated_as_a_whole() {
    let mut dp = Datapath::load();
    dp.add_service(VIP, 53, proto::UDP, &three_backends());
    let payload: Vec<u8> = (0..2000u32).map(|i| (i * 7) as u8).collect();
    let request = PacketBuilder::udp(CLIENT, 40000, VIP, 53)
        .payload(&payload)
        .build();
    let frags = fragments(&request, 1480);
    assert_eq!(frags.len(), 2);
    let mut out_frames = Vec::new();
    for frag in &frags {
        let (verdict, out) = dp.run(program_names::FROM_POD, frag);
        assert_eq!(verdict, TCX_NEXT);
        assert!(ip_checksum_ok(&out));
        out_frames.push(out);
    }
    let backend = Ipv4Addr::from(<[u8; 4]>::try_from(&out_frames[0][30..34]).unwrap());
    assert!(BACKENDS.contains(&backend));
    // The later fragment: the same destination, its bytes otherwise as
    // sent.
    assert_eq!(&out_frames[1][30..34], &backend.octets());
    assert_eq!(&out_frames[1][34..], &frags[1][34..]);
    // Reassembled, the datagram is the request to the backend with a valid
    // UDP checksum over all of it.
    let mut whole = out_frames[0][..34].to_vec();
    whole.extend_from_slice(&out_frames[0][34..]);
    whole.extend_from_slice(&out_frames[1][34..]);
    let total = (whole.len() - 14) as u16;
    whole[16..18].copy_from_slice(&total.to_be_bytes());
    whole[20..22].copy_from_slice(&[0, 0]);
    whole[24..26].copy_from_slice(&[0, 0]);
    let csum = packet::checksum(&[&whole[14..34]]);
    whole[24..26].copy_from_slice(&csum.to_be_bytes());
    let reassembled = Ipv4Packet::parse(&whole).unwrap();
    assert_eq!(reassembled.dport(), 9376);
    reassembled.assert_checksums();
    assert_eq!(reassembled.payload(), &payload[..]);

    // The backend's large answer, fragmented: both fragments come from the
    // VIP.
    let answer = PacketBuilder::udp(backend, 9376, CLIENT, 40000)
        .payload(&payload)
        .build();
    for frag in fragments(&answer, 1480) {
        let (verdict, out) = dp.run(program_names::TO_POD, &frag);
        assert_eq!(verdict, TCX_NEXT);
        assert_eq!(&out[26..30], &VIP.octets(), "reply fragment source");
        assert!(ip_checksum_ok(&out));
    }
    assert_eq!(dp.stat(stat::PASS_FRAGMENT), 0);

    // Out of order: a later fragment of an unknown datagram passes as it is.
    let other = PacketBuilder::udp(CLIENT, 40001, VIP, 53)
        .payload(&payload)
        .build();
    let mut frags = fragments(&other, 1480);
    frags[1][18..20].copy_from_slice(&0x4321u16.to_be_bytes());
    frags[1][24..26].copy_from_slice(&[0, 0]);
    let csum = packet::checksum(&[&frags[1][14..34]]);
    frags[1][24..26].copy_from_slice(&csum.to_be_bytes());
    let (verdict, out) = dp.run(program_names::FROM_POD, &frags[1]);
    assert_eq!(verdict, TCX_NEXT);
    assert_eq!(out, frags[1]);
    assert_eq!(dp.stat(stat::PASS_FRAGMENT), 1);
}

/// externalTrafficPolicy Local on a node without local endpoints: the
/// external view (scope EXTERNAL) drops, the in-cluster view (scope
/// INTERNAL) has the cluster-wide endpoints. At an uplink, a pod of
/// another node is in-cluster traffic when `--cluster-cidr` holds it
/// (kube-proxy's detect-local), so it is served; an outside client is not.
#[test]
fn pods_of_other_nodes_get_the_in_cluster_view_with_a_cluster_cidr() {
    let settings = |cidr: Option<(Ipv4Addr, u8)>| netlb_agent::config::DatapathSettings {
        service_loopback: Some(LOOPBACK),
        snat_addr: Some(NODE),
        cluster_cidr: cidr,
        ..Default::default()
    };
    for (cidr, served) in [
        (None, false),
        (Some((Ipv4Addr::new(10, 244, 0, 0), 16)), true),
    ] {
        let mut dp = Datapath::load_with(settings(cidr));
        // Backends of the internal view, then the INTERNAL slot 0 by hand.
        let external = Frontend {
            flags: svc_flags::NODE_PORT
                | svc_flags::LOCAL_ONLY
                | svc_flags::DROP
                | svc_flags::TWO_SCOPES,
            ..Frontend::node_port(30080, proto::TCP, 5)
        };
        let ids = dp.add_frontend(external, &three_backends(), 0);
        dp.set_frontend(external, 0);
        let internal = ServiceKey {
            address_be: be_addr(NODE),
            port_be: 30080u16.to_be(),
            backend_slot: 0,
            proto: proto::TCP,
            scope: scope::INTERNAL,
            pad: [0; 2],
        };
        for (i, id) in ids.iter().enumerate() {
            dp.maps
                .upsert_service(
                    &ServiceKey {
                        backend_slot: i as u16 + 1,
                        ..internal
                    },
                    &ServiceValue {
                        backend_id: *id,
                        ..Default::default()
                    },
                )
                .unwrap();
        }
        dp.maps
            .upsert_service(
                &internal,
                &ServiceValue {
                    backend_id: 0,
                    rev_nat_index: 5,
                    count: 3,
                    flags: svc_flags::NODE_PORT,
                },
            )
            .unwrap();
        let from_pod = PacketBuilder::tcp(REMOTE, 41000, NODE, 30080).syn().build();
        let (verdict, out) = dp.run(program_names::FROM_NETDEV, &from_pod);
        if served {
            assert_eq!(verdict, TCX_NEXT, "cluster CIDR {cidr:?}");
            assert!(BACKENDS.contains(&Ipv4Packet::parse(&out).unwrap().daddr()));
        } else {
            assert_eq!(verdict, TC_ACT_SHOT, "cluster CIDR {cidr:?}");
            assert_eq!(dp.stat(stat::DROP_NO_LOCAL_ENDPOINTS), 1);
        }
        // An outside client is external traffic either way: dropped.
        let (verdict, _) = dp.run(
            program_names::FROM_NETDEV,
            &PacketBuilder::tcp(EXT, 41000, NODE, 30080).syn().build(),
        );
        assert_eq!(verdict, TC_ACT_SHOT);
    }
}

/// kube-proxy nftables' cluster-IP checks: a new connection to a cluster
/// IP on a port its Service does not define is rejected (ICMP port
/// unreachable); with Service CIDRs configured, one to an address of them
/// that no Service has is dropped; anything else passes. Packets that
/// cannot open a connection are never judged.
#[test]
fn undefined_ports_are_rejected_and_unallocated_service_addresses_dropped() {
    let cidr = |on: bool| netlb_agent::config::DatapathSettings {
        service_cidrs: if on {
            vec![(Ipv4Addr::new(10, 96, 0, 0), 12)]
        } else {
            vec![]
        },
        ..Default::default()
    };
    for cidrs in [false, true] {
        let mut dp = Datapath::load_with(cidr(cidrs));
        dp.add_service(VIP, 80, proto::TCP, &three_backends());
        dp.maps.upsert_cluster_ips(&[VIP]).unwrap();
        if cidrs {
            dp.maps
                .set_service_cidrs(&[(Ipv4Addr::new(10, 96, 0, 0), 12)])
                .unwrap();
        }
        // The defined port still works.
        let (verdict, _) = dp.run(
            program_names::FROM_POD,
            &PacketBuilder::tcp(CLIENT, 40000, VIP, 80).syn().build(),
        );
        assert_eq!(verdict, TCX_NEXT);
        // Another port of the cluster IP: rejected, TCP and UDP alike.
        for packet in [
            PacketBuilder::tcp(CLIENT, 40001, VIP, 81).syn().build(),
            PacketBuilder::udp(CLIENT, 40001, VIP, 53).build(),
        ] {
            let (verdict, out) = dp.run(program_names::FROM_POD, &packet);
            assert_eq!(verdict, TC_ACT_REDIRECT, "cidrs {cidrs}");
            assert_eq!(Ipv4Packet::parse(&out).unwrap().protocol(), proto::ICMP);
        }
        assert_eq!(dp.stat(stat::REJECT), 2);
        // A TCP packet that opens nothing: not judged.
        let ack = PacketBuilder::tcp(CLIENT, 40002, VIP, 81).ack().build();
        assert_eq!(dp.run(program_names::FROM_POD, &ack).0, TCX_NEXT);
        // An address of the Service CIDR without a Service.
        let unallocated = PacketBuilder::tcp(CLIENT, 40003, Ipv4Addr::new(10, 96, 0, 99), 80)
            .syn()
            .build();
        let (verdict, _) = dp.run(program_names::FROM_POD, &unallocated);
        if cidrs {
            assert_eq!(verdict, TC_ACT_SHOT);
            assert_eq!(dp.stat(stat::DROP_UNALLOCATED_SERVICE_IP), 1);
        } else {
            assert_eq!(verdict, TCX_NEXT);
        }
        // Outside the Service CIDR: none of netlb's business.
        let outside = PacketBuilder::tcp(CLIENT, 40004, Ipv4Addr::new(192, 0, 2, 7), 80)
            .syn()
            .build();
        assert_eq!(dp.run(program_names::FROM_POD, &outside).0, TCX_NEXT);
    }
}
