//! `netlb-agent list ...`: what the pinned datapath maps hold, like
//! `cilium bpf lb list`.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use netlb_common::{CtState, ct_flags, ct_kind, from_be_addr, proto, scope, stat};
use serde::Serialize;

use crate::{
    datapath::dataplane::monotonic_now_s,
    datapath::dataplane::{
        ConntrackTable, Dataplane, DataplaneError,
        kernel::{AyaDataplane, KernelConntrack, Observer},
    },
};

fn proto_name(p: u8) -> String {
    match p {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        proto::SCTP => "SCTP".into(),
        other => other.to_string(),
    }
}

#[derive(Serialize)]
pub struct ServiceRow {
    pub frontend: String,
    pub protocol: String,
    pub scope: &'static str,
    pub rev_nat_index: u32,
    pub flags: u16,
    /// Backends in slot order, `address:port (id)`; empty = reject.
    pub backends: Vec<String>,
}

#[derive(Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: String,
    pub flags: u8,
    pub flows: u64,
}

#[derive(Serialize)]
pub struct ConntrackRow {
    /// `service` (a connection) or the link kind (`reply`, `egress`,
    /// `nat-in`, `host`).
    pub kind: &'static str,
    pub protocol: String,
    pub source: String,
    pub destination: String,
    /// Connections: `opening`, `established` or `closing`.
    pub state: Option<&'static str>,
    /// Connections: the backend (DNAT destination); NAT_IN links: the
    /// client they restore.
    pub target: Option<String>,
    pub backend_id: u32,
    pub rev_nat_index: u32,
    /// Source-NATed connections and their links: the node address and NAT
    /// port.
    pub nat: Option<String>,
    pub hairpin: bool,
    /// Seconds since the connection was created.
    pub age_s: u64,
    /// Seconds until the connection expires unless more packets come
    /// (links: until they are checked against their connection again);
    /// negative when it is due for garbage collection.
    pub expires_in_s: i64,
}

#[derive(Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub drop: bool,
    pub value: u64,
}

/// One map's fill level.
#[derive(Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: usize,
    pub capacity: u32,
}

/// Fill levels of the frontend, backend and conntrack maps.
pub fn fill(pin_dir: &Path) -> Result<Vec<MapFill>, DataplaneError> {
    let maps = AyaDataplane::open(pin_dir)?.dump()?;
    let conntrack = conntrack(pin_dir)?.len();
    let capacity = |name: &str| {
        aya::maps::MapInfo::from_pin(pin_dir.join(name))
            .map(|info| info.max_entries())
            .unwrap_or(0)
    };
    Ok(vec![
        MapFill {
            map: netlb_common::map_names::SERVICES,
            entries: maps.services.len(),
            capacity: capacity(netlb_common::map_names::SERVICES),
        },
        MapFill {
            map: netlb_common::map_names::BACKENDS,
            entries: maps.backends.len(),
            capacity: capacity(netlb_common::map_names::BACKENDS),
        },
        MapFill {
            map: netlb_common::map_names::CONNTRACK,
            entries: conntrack,
            capacity: capacity(netlb_common::map_names::CONNTRACK),
        },
    ])
}

pub fn services(pin_dir: &Path) -> Result<Vec<ServiceRow>, DataplaneError> {
    let maps = AyaDataplane::open(pin_dir)?.dump()?;
    let backends: BTreeMap<u32, _> = maps.backends.iter().copied().collect();
    let mut frontends = BTreeMap::new();
    let mut slots = BTreeMap::new();
    for (key, value) in &maps.services {
        let fe = (
            from_be_addr(key.address_be),
            u16::from_be(key.port_be),
            key.proto,
            key.scope,
        );
        if key.backend_slot == 0 {
            frontends.insert(fe, *value);
        } else {
            slots.insert((fe, key.backend_slot), value.backend_id);
        }
    }
    Ok(frontends
        .into_iter()
        .map(|(fe, value)| ServiceRow {
            frontend: format!("{}:{}", fe.0, fe.1),
            protocol: proto_name(fe.2),
            // One view for every client, unless the frontend has two (a
            // Local external traffic policy): then the external one and
            // the in-cluster one.
            scope: if fe.3 == scope::INTERNAL {
                "internal"
            } else if value.flags & netlb_common::svc_flags::TWO_SCOPES != 0 {
                "external"
            } else {
                "all"
            },
            rev_nat_index: value.rev_nat_index,
            flags: value.flags,
            backends: (1..=value.count)
                .map(|slot| match slots.get(&(fe, slot)) {
                    Some(id) => match backends.get(id) {
                        Some(b) => {
                            format!(
                                "{}:{} ({id})",
                                from_be_addr(b.address_be),
                                u16::from_be(b.port_be)
                            )
                        }
                        None => format!("<missing backend {id}>"),
                    },
                    None => format!("<missing slot {slot}>"),
                })
                .collect(),
        })
        .collect())
}

pub fn backends(pin_dir: &Path) -> Result<Vec<BackendRow>, DataplaneError> {
    let dp = AyaDataplane::open(pin_dir)?;
    let maps = dp.dump()?;
    let mut rows = Vec::with_capacity(maps.backends.len());
    for (id, b) in maps.backends {
        let stats = dp.backend_stats(id)?;
        rows.push(BackendRow {
            id,
            address: from_be_addr(b.address_be),
            port: u16::from_be(b.port_be),
            protocol: proto_name(b.proto),
            flags: b.flags,
            flows: stats.flows,
        });
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn conntrack(pin_dir: &Path) -> Result<Vec<ConntrackRow>, DataplaneError> {
    let table = KernelConntrack::open(pin_dir)?;
    let now = i64::from(monotonic_now_s());
    let endpoint =
        |addr: u32, port_be: u16| format!("{}:{}", from_be_addr(addr), u16::from_be(port_be));
    let mut rows: Vec<ConntrackRow> = table
        .entries()?
        .into_iter()
        .map(|(k, v)| {
            let snat =
                v.flags & ct_flags::SNAT != 0 || (k.kind == ct_kind::NAT_IN && v.nat_port_be != 0);
            ConntrackRow {
                kind: match k.kind {
                    ct_kind::SERVICE => "service",
                    ct_kind::REPLY => "reply",
                    ct_kind::EGRESS => "egress",
                    ct_kind::NAT_IN => "nat-in",
                    ct_kind::HOST => "host",
                    _ => "unknown",
                },
                protocol: proto_name(k.proto),
                source: endpoint(k.saddr, k.sport_be),
                destination: endpoint(k.daddr, k.dport_be),
                state: (k.kind == ct_kind::SERVICE).then(|| CtState::of(k.proto, v.flags).name()),
                target: matches!(k.kind, ct_kind::SERVICE | ct_kind::NAT_IN)
                    .then(|| endpoint(v.target_addr, v.target_port_be)),
                backend_id: v.backend_id,
                rev_nat_index: v.rev_nat_index,
                nat: snat.then(|| endpoint(v.nat_addr, v.nat_port_be)),
                hairpin: v.flags & ct_flags::HAIRPIN != 0,
                age_s: (now - i64::from(v.created_s)).max(0) as u64,
                expires_in_s: i64::from(v.lifetime_s) - now,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (&a.source, &a.destination, a.kind).cmp(&(&b.source, &b.destination, b.kind))
    });
    Ok(rows)
}

pub fn stats(pin_dir: &Path) -> Result<Vec<StatRow>, DataplaneError> {
    let values = Observer::open(pin_dir)?.stats()?;
    Ok(values
        .iter()
        .enumerate()
        .map(|(i, value)| StatRow {
            counter: stat::NAMES[i],
            drop: stat::is_drop(i as u32),
            value: *value,
        })
        .collect())
}

/// A plain text table: a header row and left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = &str>| {
        let cells: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().copied());
    for row in rows {
        line(&mut out, &mut row.iter().map(String::as_str));
    }
    out
}
