//! `netlb-agent list ...`: what the pinned datapath maps hold, like
//! `cilium bpf lb list`.

use std::{collections::BTreeMap, fmt::Write as _, net::Ipv4Addr, path::Path};

use netlb_common::{ct_dir, ct_flags, from_be_addr, proto, scope, stat};
use serde::Serialize;

use crate::dataplane::{
    Dataplane, DataplaneError,
    kernel::{AyaDataplane, Observer},
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
    pub packets: u64,
}

#[derive(Serialize)]
pub struct ConntrackRow {
    pub direction: &'static str,
    pub source: String,
    pub destination: String,
    pub protocol: String,
    pub backend_id: u32,
    pub rev_nat_index: u32,
    pub hairpin: bool,
    /// OUT entries with SNAT: the source they write; NAT_IN entries: the
    /// client they restore.
    pub nat: Option<String>,
}

#[derive(Serialize)]
pub struct StatRow {
    pub counter: &'static str,
    pub drop: bool,
    pub value: u64,
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
            scope: if fe.3 == scope::INTERNAL {
                "internal"
            } else {
                "external"
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
    let maps = AyaDataplane::open(pin_dir)?.dump()?;
    let observer = Observer::open(pin_dir)?;
    let mut rows = Vec::with_capacity(maps.backends.len());
    for (id, b) in maps.backends {
        let stats = observer.backend_stats(id)?;
        rows.push(BackendRow {
            id,
            address: from_be_addr(b.address_be),
            port: u16::from_be(b.port_be),
            protocol: proto_name(b.proto),
            flags: b.flags,
            flows: stats.flows,
            packets: stats.packets,
        });
    }
    rows.sort_by_key(|r| r.id);
    Ok(rows)
}

pub fn conntrack(pin_dir: &Path) -> Result<Vec<ConntrackRow>, DataplaneError> {
    let observer = Observer::open(pin_dir)?;
    let mut rows: Vec<ConntrackRow> = observer
        .conntrack()?
        .into_iter()
        .map(|(k, v)| ConntrackRow {
            direction: match k.direction {
                ct_dir::SERVICE => "service",
                ct_dir::REPLY => "reply",
                ct_dir::OUT if v.flags & ct_flags::SNAT != 0 => "out-snat",
                ct_dir::OUT => "out-rev",
                ct_dir::NAT_IN => "nat-in",
                _ => "unknown",
            },
            source: format!("{}:{}", from_be_addr(k.saddr_be), u16::from_be(k.sport_be)),
            destination: format!("{}:{}", from_be_addr(k.daddr_be), u16::from_be(k.dport_be)),
            protocol: proto_name(k.proto),
            backend_id: v.backend_id,
            rev_nat_index: v.rev_nat_index,
            hairpin: v.flags & ct_flags::HAIRPIN != 0,
            nat: (v.nat_addr_be != 0 && v.flags & ct_flags::HAIRPIN == 0).then(|| {
                format!(
                    "{}:{}",
                    from_be_addr(v.nat_addr_be),
                    u16::from_be(v.nat_port_be)
                )
            }),
        })
        .collect();
    rows.sort_by(|a, b| (&a.source, &a.destination).cmp(&(&b.source, &b.destination)));
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
