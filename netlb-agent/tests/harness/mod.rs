//! The datapath test harness: the real programs loaded without pins, maps
//! seeded the way the agent writes them, packets run through
//! BPF_PROG_TEST_RUN.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::net::Ipv4Addr;

use aya::{
    Ebpf,
    programs::{TestRun, TestRunOptions},
};
use netlb_agent::{
    config::DatapathSettings,
    datapath::dataplane::{
        ConntrackTable, Dataplane,
        kernel::{AyaDataplane, KernelConntrack, Observer},
    },
    datapath::{
        layout::MapSizes,
        loader::{self, LoadOptions},
    },
};
use netlb_common::{
    BackendValue, RevNatValue, ServiceKey, ServiceValue, program_names, scope, svc_flags,
};

use crate::packet::{Ipv4Packet, be_addr};

/// `TCX_NEXT` (-1) as BPF_PROG_TEST_RUN reports it.
pub const TCX_NEXT: u32 = u32::MAX;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 11);
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::new(169, 254, 42, 1);
pub const BACKENDS: [Ipv4Addr; 3] = [
    Ipv4Addr::new(10, 244, 0, 21),
    Ipv4Addr::new(10, 244, 0, 22),
    Ipv4Addr::new(10, 244, 0, 23),
];

/// This node's address (north-south SNAT source), an outside client and a
/// pod on another node.
pub const NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);
pub const EXT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
pub const EXT2: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 11);
pub const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 21);

/// A frontend as the harness programs it.
#[derive(Clone, Copy, Debug)]
pub struct Frontend {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub rev_nat_index: u32,
    pub flags: u16,
}

impl Frontend {
    pub fn cluster_ip(vip: Ipv4Addr, port: u16, proto: u8, rev_nat_index: u32) -> Self {
        Self {
            vip,
            port,
            proto,
            rev_nat_index,
            flags: svc_flags::CLUSTER_IP,
        }
    }

    pub fn node_port(port: u16, proto: u8, rev_nat_index: u32) -> Self {
        Self {
            vip: NODE,
            port,
            proto,
            rev_nat_index,
            flags: svc_flags::NODE_PORT,
        }
    }
}

pub struct Datapath {
    pub ebpf: Ebpf,
    pub maps: AyaDataplane,
    pub observer: Observer,
    pub ct: KernelConntrack,
    pub next_backend_id: u32,
}

impl Datapath {
    pub fn load() -> Self {
        Self::load_with(DatapathSettings {
            service_loopback: Some(LOOPBACK),
            snat_addr: Some(NODE),
            ..Default::default()
        })
    }

    pub fn load_with(settings: DatapathSettings) -> Self {
        Self::load_sized(settings, MapSizes::default())
    }

    pub fn load_sized(settings: DatapathSettings, sizes: MapSizes) -> Self {
        let mut ebpf = loader::load(&LoadOptions {
            pin_dir: None,
            settings,
            sizes,
        })
        .expect("load the datapath (root and a BPF-capable kernel needed)");
        let maps = AyaDataplane::from_ebpf(&mut ebpf).expect("service maps");
        let observer = Observer::from_ebpf(&mut ebpf).expect("observer maps");
        let ct = KernelConntrack::from_ebpf(&mut ebpf).expect("conntrack map");
        Self {
            ebpf,
            maps,
            observer,
            ct,
            next_backend_id: 100,
        }
    }

    /// Programs a frontend `vip:port` with `backends` (address, target port),
    /// each under a new backend id (the first test service gets ids 100..).
    pub fn add_service(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16)],
    ) {
        self.add_service_with(vip, port, proto, backends, 0);
    }

    /// As [`add_service`], with `backend_flags` on every backend.
    pub fn add_service_with(
        &mut self,
        vip: Ipv4Addr,
        port: u16,
        proto: u8,
        backends: &[(Ipv4Addr, u16)],
        backend_flags: u8,
    ) {
        self.add_frontend(
            Frontend {
                vip,
                port,
                proto,
                rev_nat_index: 7,
                flags: svc_flags::CLUSTER_IP,
            },
            backends,
            backend_flags,
        );
    }

    /// Programs a frontend with `backends`, each under a new backend id;
    /// returns the ids.
    pub fn add_frontend(
        &mut self,
        fe: Frontend,
        backends: &[(Ipv4Addr, u16)],
        backend_flags: u8,
    ) -> Vec<u32> {
        let Frontend {
            vip,
            port,
            proto,
            rev_nat_index,
            flags,
        } = fe;
        let mut ids = Vec::new();
        let base = ServiceKey {
            address_be: be_addr(vip),
            port_be: port.to_be(),
            backend_slot: 0,
            proto,
            scope: scope::EXTERNAL,
            pad: [0; 2],
        };
        self.maps
            .upsert_rev_nat(
                rev_nat_index,
                &RevNatValue {
                    address_be: be_addr(vip),
                    port_be: port.to_be(),
                    pad: [0; 2],
                },
            )
            .unwrap();
        for (i, (addr, target)) in backends.iter().enumerate() {
            let id = self.next_backend_id;
            self.next_backend_id += 1;
            ids.push(id);
            self.maps
                .upsert_backend(
                    id,
                    &BackendValue {
                        address_be: be_addr(*addr),
                        port_be: target.to_be(),
                        proto,
                        flags: backend_flags,
                    },
                )
                .unwrap();
            self.maps
                .upsert_service(
                    &ServiceKey {
                        backend_slot: i as u16 + 1,
                        ..base
                    },
                    &ServiceValue {
                        backend_id: id,
                        ..Default::default()
                    },
                )
                .unwrap();
        }
        self.maps
            .upsert_service(
                &base,
                &ServiceValue {
                    backend_id: 0,
                    rev_nat_index,
                    count: backends.len() as u16,
                    flags,
                },
            )
            .unwrap();
        ids
    }

    /// Rewrites a frontend's slot 0 (count and flags), as the agent does
    /// when its endpoints change, leaving the slots alone.
    pub fn set_frontend(&mut self, fe: Frontend, count: u16) {
        self.maps
            .upsert_service(
                &ServiceKey {
                    address_be: be_addr(fe.vip),
                    port_be: fe.port.to_be(),
                    backend_slot: 0,
                    proto: fe.proto,
                    scope: scope::EXTERNAL,
                    pad: [0; 2],
                },
                &ServiceValue {
                    backend_id: 0,
                    rev_nat_index: fe.rev_nat_index,
                    count,
                    flags: fe.flags,
                },
            )
            .unwrap();
    }

    /// The conntrack entries of one kind.
    pub fn entries_of(&self, kind: u8) -> Vec<(netlb_common::CtKey4, netlb_common::CtEntry4)> {
        self.ct
            .entries()
            .expect("conntrack")
            .into_iter()
            .filter(|(k, _)| k.kind == kind)
            .collect()
    }

    pub fn run(&self, program: &str, packet: &[u8]) -> (u32, Vec<u8>) {
        let prog: &aya::programs::SchedClassifier = self
            .ebpf
            .program(program)
            .expect("program")
            .try_into()
            .expect("sched_cls");
        let mut out = vec![0u8; 4096];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(packet),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    pub fn stat(&self, index: u32) -> u64 {
        self.observer.stats().expect("stats")[index as usize]
    }

    pub fn conntrack_len(&self) -> usize {
        self.ct.entries().expect("conntrack").len()
    }
}

pub fn three_backends() -> Vec<(Ipv4Addr, u16)> {
    BACKENDS.iter().map(|a| (*a, 9376)).collect()
}

/// Removes the backend at `index` of the three-backend service the way the
/// agent does after a rolling update (the slots are rewritten without it,
/// the backend entry is deleted) and returns the remaining addresses.
pub fn remove_backend(
    dp: &mut Datapath,
    vip: Ipv4Addr,
    port: u16,
    protocol: u8,
    index: usize,
) -> Vec<(Ipv4Addr, u16)> {
    let remaining: Vec<(Ipv4Addr, u16)> = BACKENDS
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != index)
        .map(|(_, a)| (*a, 9376))
        .collect();
    dp.maps.delete_backend(100 + index as u32).unwrap();
    for slot in 1..=3u16 {
        dp.maps
            .delete_service(&ServiceKey {
                address_be: be_addr(vip),
                port_be: port.to_be(),
                backend_slot: slot,
                proto: protocol,
                scope: scope::EXTERNAL,
                pad: [0; 2],
            })
            .unwrap();
    }
    dp.add_service(vip, port, protocol, &remaining);
    remaining
}

/// Runs `from_netdev` then `to_netdev` on a packet, as the node routes it in
/// through the uplink and out again; both stages must pass it.
pub fn through_node(dp: &Datapath, frame: &[u8]) -> Vec<u8> {
    let (verdict, routed) = dp.run(program_names::FROM_NETDEV, frame);
    assert_eq!(verdict, TCX_NEXT, "from_netdev");
    Ipv4Packet::parse(&routed).unwrap().assert_checksums();
    let (verdict, out) = dp.run(program_names::TO_NETDEV, &routed);
    assert_eq!(verdict, TCX_NEXT, "to_netdev");
    out
}
