//! Conntrack garbage collection: what the kernel's conntrack GC worker does
//! for kube-proxy, for netlb's own table (a plain hash map, see the
//! datapath's `conntrack` module).
//!
//! One sweep reads the whole table (one batched snapshot), decides in a pure
//! function ([`plan`]) what goes, and deletes it entry by entry, re-reading
//! each entry first so that nothing the datapath refreshed or handed to a
//! newer connection meanwhile is deleted:
//! - a connection past its lifetime goes with all its links, which frees
//!   its NAT port;
//! - a UDP connection whose backend is no longer a serving endpoint of its
//!   frontend goes, so that its next datagram selects a live backend
//!   (kube-proxy's `CleanStaleEntries`: UDP only, serving endpoints, and
//!   never for a frontend without serving endpoints);
//! - a link whose connection is gone (or has other links now) goes once it
//!   is not fresh (links are written just before their connection);
//! - expired host-flow records go;
//! - when the table is fuller than [`HIGH_WATER`] after that, connections
//!   that never got a reply go, oldest first, then closing ones, until it
//!   is at [`LOW_WATER`]: the kernel's `early_drop`. Established connections
//!   are never evicted; when even that is not enough, new connections are
//!   refused by the datapath (`drop_ct_full`).
//!
//! The sweep also reports which backend ids and rev-NAT indices live
//! connections still use, so the sync step can keep them from being handed
//! out again while a connection may refer to them.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use netlb_common::{
    CtEntry4, CtKey4, CtState, ct_flags, ct_kind, ct_link_key, ct_link_kinds, ct_link_owner,
    from_be_addr, proto,
};

use crate::{
    datapath::dataplane::{ConntrackTable, DataplaneError, monotonic_now_s},
    k8s::tracker::ObjectKey,
    model::desired::UdpServing,
    support::lock,
};

/// Early drop starts above this fill level...
pub const HIGH_WATER: f64 = 0.90;
/// ...and stops at this one.
pub const LOW_WATER: f64 = 0.80;

/// Why an entry is deleted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// A connection past its lifetime (and its links).
    Expired,
    /// A UDP connection to an endpoint that no longer serves.
    StaleUdp,
    /// A link without its connection.
    OrphanLink,
    /// A host-flow record past its lifetime.
    HostExpired,
    /// Evicted because the table was nearly full.
    EarlyDrop,
}

impl Cause {
    pub const ALL: [Cause; 5] = [
        Cause::Expired,
        Cause::StaleUdp,
        Cause::OrphanLink,
        Cause::HostExpired,
        Cause::EarlyDrop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::StaleUdp => "stale_udp",
            Self::OrphanLink => "orphan_link",
            Self::HostExpired => "host_expired",
            Self::EarlyDrop => "early_drop",
        }
    }
}

/// One planned deletion: the entry as the snapshot had it, so the sweep can
/// tell whether it changed since.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deletion {
    pub key: CtKey4,
    pub seen: CtEntry4,
    pub cause: Cause,
}

/// What a sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries in the table when the sweep read it.
    pub entries: usize,
    pub capacity: u32,
    /// Live connections after the sweep, by state (`CtState` order).
    pub connections: [u64; 3],
    /// NAT ports held by live connections after the sweep.
    pub nat_ports_in_use: u64,
    /// Entries deleted, by cause.
    pub deleted: BTreeMap<&'static str, u64>,
    /// Planned deletions skipped because the entry changed meanwhile.
    pub skipped: u64,
    /// Backend ids and rev-NAT indices that live connections use.
    pub backend_ids: BTreeSet<u32>,
    pub rev_nat_indices: BTreeSet<u32>,
    pub duration: Duration,
}

impl SweepReport {
    pub fn deleted_total(&self) -> u64 {
        self.deleted.values().sum()
    }
}

/// Decides what a sweep deletes from a snapshot; see the module docs.
/// Returns the deletions (links after their connection) and the report of
/// what stays.
pub fn plan(
    entries: &[(CtKey4, CtEntry4)],
    now: u32,
    capacity: u32,
    udp_serving: &UdpServing,
) -> (Vec<Deletion>, SweepReport) {
    let mut sweep = Sweep {
        index: entries.iter().copied().collect(),
        doomed: HashMap::new(),
        evictable: Vec::new(),
    };
    sweep.judge_connections(entries, now, udp_serving);
    sweep.judge_links(entries, now);
    sweep.early_drop(entries.len(), capacity);
    let report = sweep.report(entries, capacity);
    (sweep.deletions(), report)
}

/// One sweep's judgement of a snapshot.
struct Sweep {
    index: HashMap<CtKey4, CtEntry4>,
    doomed: HashMap<CtKey4, Cause>,
    /// Connections that stay, for early drop: (rank, created, key).
    evictable: Vec<(u8, u32, CtKey4)>,
}

impl Sweep {
    /// Expired and stale-UDP connections go with their links; those that
    /// never got a reply, and closing ones, may go early.
    fn judge_connections(
        &mut self,
        entries: &[(CtKey4, CtEntry4)],
        now: u32,
        udp_serving: &UdpServing,
    ) {
        for (key, conn) in entries.iter().filter(|(k, _)| k.kind == ct_kind::SERVICE) {
            let cause = if now > conn.lifetime_s {
                Some(Cause::Expired)
            } else if key.proto == proto::UDP && stale_udp(key, conn, udp_serving) {
                Some(Cause::StaleUdp)
            } else {
                None
            };
            if let Some(cause) = cause {
                doom_connection(key, conn, cause, &self.index, &mut self.doomed);
                continue;
            }
            let state = CtState::of(key.proto, conn.flags);
            let rank = match state {
                _ if conn.flags & ct_flags::SEEN_REPLY == 0 => Some(0),
                CtState::Closing => Some(1),
                _ => None,
            };
            if let Some(rank) = rank {
                self.evictable.push((rank, conn.created_s, *key));
            }
        }
    }

    /// Expired HOST entries, and links past their trusted time whose
    /// connection is gone or has other links now.
    fn judge_links(&mut self, entries: &[(CtKey4, CtEntry4)], now: u32) {
        for (key, link) in entries.iter() {
            match key.kind {
                ct_kind::SERVICE => {}
                ct_kind::HOST => {
                    if now > link.lifetime_s {
                        self.doomed.insert(*key, Cause::HostExpired);
                    }
                }
                kind => {
                    // A second of grace past the trusted time: the
                    // datapath's coarse clock may lag this one, and a link
                    // is written just before its connection.
                    if self.doomed.contains_key(key) || now <= link.lifetime_s {
                        continue;
                    }
                    let owner = ct_link_owner(key, link);
                    let owned = match self.index.get(&owner) {
                        Some(conn) => {
                            !self.doomed.contains_key(&owner)
                                && ct_link_key(&owner, conn, kind) == *key
                        }
                        None => false,
                    };
                    if !owned {
                        self.doomed.insert(*key, Cause::OrphanLink);
                    }
                }
            }
        }
    }

    /// Early drop, when the table stays too full: connections that never
    /// got a reply, oldest first, then closing ones, down to the low water
    /// mark.
    fn early_drop(&mut self, entries: usize, capacity: u32) {
        let remaining = entries - self.doomed.len();
        let high = (f64::from(capacity) * HIGH_WATER) as usize;
        if capacity == 0 || remaining <= high {
            return;
        }
        let low = (f64::from(capacity) * LOW_WATER) as usize;
        let mut remaining = remaining;
        self.evictable.sort();
        for (_, _, key) in std::mem::take(&mut self.evictable) {
            if remaining <= low {
                break;
            }
            let before = self.doomed.len();
            doom_connection(
                &key,
                &self.index[&key],
                Cause::EarlyDrop,
                &self.index,
                &mut self.doomed,
            );
            remaining -= self.doomed.len() - before;
        }
    }

    /// What stays.
    fn report(&self, entries: &[(CtKey4, CtEntry4)], capacity: u32) -> SweepReport {
        let mut report = SweepReport {
            entries: entries.len(),
            capacity,
            ..Default::default()
        };
        for (key, entry) in entries.iter() {
            if self.doomed.contains_key(key) {
                continue;
            }
            match key.kind {
                ct_kind::SERVICE => {
                    let state = CtState::of(key.proto, entry.flags);
                    report.connections[state as usize] += 1;
                    report.backend_ids.insert(entry.backend_id);
                    report.rev_nat_indices.insert(entry.rev_nat_index);
                }
                ct_kind::NAT_IN => report.nat_ports_in_use += 1,
                _ => {}
            }
        }
        report
    }

    /// Connections before their links, so that a link never outlives its
    /// connection in the table.
    fn deletions(self) -> Vec<Deletion> {
        let index = self.index;
        let mut deletions: Vec<Deletion> = self
            .doomed
            .into_iter()
            .map(|(key, cause)| Deletion {
                key,
                seen: index[&key],
                cause,
            })
            .collect();
        deletions.sort_by_key(|d| (d.key.kind != ct_kind::SERVICE, d.key));
        deletions
    }
}

/// kube-proxy's rule: a UDP connection to a frontend that has serving
/// endpoints, whose backend is not one of them.
fn stale_udp(key: &CtKey4, conn: &CtEntry4, udp_serving: &UdpServing) -> bool {
    let frontend = (from_be_addr(key.daddr), u16::from_be(key.dport_be));
    let backend = (
        from_be_addr(conn.target_addr),
        u16::from_be(conn.target_port_be),
    );
    udp_serving
        .get(&frontend)
        .is_some_and(|serving| !serving.contains(&backend))
}

/// Marks a connection and the links it owns.
fn doom_connection(
    key: &CtKey4,
    conn: &CtEntry4,
    cause: Cause,
    index: &HashMap<CtKey4, CtEntry4>,
    doomed: &mut HashMap<CtKey4, Cause>,
) {
    doomed.insert(*key, cause);
    for kind in ct_link_kinds(conn).into_iter().flatten() {
        let link_key = ct_link_key(key, conn, kind);
        if let Some(link) = index.get(&link_key)
            && ct_link_owner(&link_key, link) == *key
        {
            doomed.insert(link_key, cause);
        }
    }
}

/// Whether a planned deletion still applies to the entry as it is now: the
/// datapath may have refreshed it (a connection's lifetime), or handed its
/// key to a newer connection (a reclaimed NAT port, a reopened tuple).
fn still_applies(d: &Deletion, now_entry: &CtEntry4) -> bool {
    match d.key.kind {
        // The same connection (same creation) that was not refreshed past
        // the verdict; early drop only if nothing else changed.
        ct_kind::SERVICE => {
            now_entry.created_s == d.seen.created_s
                && now_entry.target_addr == d.seen.target_addr
                && match d.cause {
                    Cause::Expired => now_entry.lifetime_s == d.seen.lifetime_s,
                    _ => true,
                }
        }
        // The same link of the same connection.
        _ => {
            now_entry.created_s == d.seen.created_s
                && now_entry.target_addr == d.seen.target_addr
                && now_entry.target_port_be == d.seen.target_port_be
                && now_entry.frontend_addr == d.seen.frontend_addr
                && now_entry.frontend_port_be == d.seen.frontend_port_be
        }
    }
}

/// Whether the connection `owner` as the table holds it now is alive at
/// `now` and has the link `link_key` of `kind`: then that link is live,
/// whatever the snapshot said.
fn vouched_for(
    table: &dyn ConntrackTable,
    link_key: &CtKey4,
    owner: &CtKey4,
    now: u32,
) -> Result<bool, DataplaneError> {
    Ok(match table.get(owner)? {
        Some(conn) => {
            now <= conn.lifetime_s && ct_link_key(owner, &conn, link_key.kind) == *link_key
        }
        None => false,
    })
}

/// One sweep: snapshot, plan, delete. The snapshot is read bucket by
/// bucket while the datapath writes, so it may hold a connection's link
/// without the connection (created between two reads) or an entry that
/// changed since: every deletion is re-judged against the table as it is
/// at that moment. A connection goes only if it is the one the plan saw
/// and was not refreshed; a link goes only if its connection, looked up
/// now, no longer vouches for it.
pub fn sweep(
    table: &mut dyn ConntrackTable,
    udp_serving: &UdpServing,
) -> Result<SweepReport, DataplaneError> {
    let started = Instant::now();
    let entries = table.entries()?;
    let now = monotonic_now_s();
    let (deletions, mut report) = plan(&entries, now, table.capacity(), udp_serving);
    for d in &deletions {
        let Some(current) = table.get(&d.key)? else {
            continue;
        };
        let keep = !still_applies(d, &current)
            || (d.key.kind != ct_kind::SERVICE
                && d.key.kind != ct_kind::HOST
                && vouched_for(
                    &*table,
                    &d.key,
                    &ct_link_owner(&d.key, &current),
                    monotonic_now_s(),
                )?);
        if keep {
            report.skipped += 1;
            continue;
        }
        table.delete(&d.key)?;
        *report.deleted.entry(d.cause.name()).or_default() += 1;
    }
    report.duration = started.elapsed();
    Ok(report)
}

/// What the sync loop and the collector thread share.
#[derive(Debug, Default)]
struct Shared {
    /// Each Service's UDP frontends with their serving endpoints.
    udp_serving: Mutex<HashMap<ObjectKey, UdpServing>>,
    /// The sync loop's last sync generation ([`crate::datapath::sync::Syncer::generation`]).
    sync_generation: AtomicU64,
    /// The last sweep, with the sync generation current when it started.
    last: Mutex<Option<(u64, SweepReport)>>,
    /// When the last sweep ended (seconds of `CLOCK_MONOTONIC`).
    last_sweep_s: AtomicU32,
    stop: AtomicBool,
}

/// The garbage collector's thread: a sweep every `interval` (every second
/// while the table is over half full), and one at once when the sync loop
/// asks (a UDP endpoint stopped serving: its flows must move within a
/// second).
pub struct Collector {
    shared: Arc<Shared>,
    started_s: u32,
    wake: mpsc::Sender<()>,
    /// A UDP endpoint stopped serving: sweep once the sync is written.
    wake_when_published: AtomicBool,
    thread: Option<JoinHandle<()>>,
}

/// Sweep at least this often while the table is over half full.
const BUSY_INTERVAL: Duration = Duration::from_secs(1);

/// Told of every sweep (the agent's metrics).
pub type OnSweep = Box<dyn Fn(&SweepReport) + Send>;

impl Collector {
    pub fn spawn(
        mut table: Box<dyn ConntrackTable + Send>,
        interval: Duration,
        on_sweep: OnSweep,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (wake, rx) = mpsc::channel::<()>();
        let thread_shared = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("conntrack-gc".into())
            .spawn(move || {
                let shared = thread_shared;
                let mut wait = Duration::ZERO;
                loop {
                    match rx.recv_timeout(wait) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    if shared.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    while rx.try_recv().is_ok() {}
                    let generation = shared.sync_generation.load(Ordering::Acquire);
                    let serving: UdpServing = lock(&shared.udp_serving)
                        .values()
                        .flat_map(|s| s.iter().map(|(k, v)| (*k, v.clone())))
                        .collect();
                    match sweep(table.as_mut(), &serving) {
                        Ok(report) => {
                            shared
                                .last_sweep_s
                                .store(monotonic_now_s(), Ordering::Release);
                            let busy = report.capacity > 0
                                && report.entries * 2 > report.capacity as usize;
                            wait = if busy {
                                BUSY_INTERVAL.min(interval)
                            } else {
                                interval
                            };
                            if report.deleted_total() > 0 {
                                log::debug!(
                                    "conntrack sweep: {} entries, deleted {:?} in {:?}",
                                    report.entries,
                                    report.deleted,
                                    report.duration
                                );
                            }
                            on_sweep(&report);
                            *lock(&shared.last) = Some((generation, report));
                        }
                        Err(e) => {
                            log::warn!("conntrack sweep failed: {e}");
                            wait = interval;
                        }
                    }
                }
            })?;
        Ok(Self {
            shared,
            started_s: monotonic_now_s(),
            wake,
            wake_when_published: AtomicBool::new(false),
            thread: Some(thread),
        })
    }

    /// Records one Service's UDP frontends with their serving endpoints;
    /// sweeps at once when an endpoint stopped serving a frontend that
    /// still has serving ones (its flows must move within a second).
    pub fn update_service(&self, key: &ObjectKey, udp_serving: UdpServing) {
        let stale = {
            let mut all = lock(&self.shared.udp_serving);
            let stale = all.get(key).is_some_and(|old| {
                old.iter().any(|(frontend, old)| {
                    udp_serving
                        .get(frontend)
                        .is_some_and(|new| !old.is_subset(new))
                })
            });
            if udp_serving.is_empty() {
                all.remove(key);
            } else {
                all.insert(key.clone(), udp_serving);
            }
            stale
        };
        if stale {
            self.wake_when_published.store(true, Ordering::Release);
        }
    }

    /// The sync step `generation` is done (ids it released are out of the
    /// maps); runs the sweep a UDP change asked for.
    pub fn publish(&self, generation: u64) {
        self.shared
            .sync_generation
            .store(generation, Ordering::Release);
        if self.wake_when_published.swap(false, Ordering::AcqRel) {
            let _ = self.wake.send(());
        }
    }

    /// When the last sweep ended (seconds of `CLOCK_MONOTONIC`; the start
    /// time until the first one): the heartbeat that keeps the kernel's
    /// collector idle.
    pub fn last_sweep_s(&self) -> u32 {
        match self.shared.last_sweep_s.load(Ordering::Acquire) {
            0 => self.started_s,
            s => s,
        }
    }

    /// The last sweep's report, once: (sync generation at its start, report).
    pub fn take_report(&self) -> Option<(u64, SweepReport)> {
        lock(&self.shared.last).take()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = self.wake.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::dataplane::fake::FakeConntrack;
    use netlb_common::{CtTuple, be_addr, ct_normalize};

    const NOW: u32 = 10_000;

    fn ip(s: &str) -> u32 {
        be_addr(s.parse().unwrap())
    }

    fn key(src: (&str, u16), dst: (&str, u16), proto: u8, kind: u8) -> CtKey4 {
        CtTuple {
            saddr: ip(src.0),
            daddr: ip(dst.0),
            sport_be: src.1.to_be(),
            dport_be: dst.1.to_be(),
            proto,
            kind,
            pad: [0; 2],
        }
    }

    /// An east-west connection client -> vip:80 -> backend:9376 and its
    /// REPLY link.
    fn east_west(
        client: (&str, u16),
        backend: &str,
        proto: u8,
        flags: u16,
        lifetime: u32,
    ) -> Vec<(CtKey4, CtEntry4)> {
        let conn_key = key(client, ("10.96.0.10", 80), proto, ct_kind::SERVICE);
        let conn = CtEntry4 {
            target_addr: ip(backend),
            target_port_be: 9376u16.to_be(),
            frontend_addr: ip("10.96.0.10"),
            frontend_port_be: 80u16.to_be(),
            flags,
            backend_id: 7,
            rev_nat_index: 3,
            lifetime_s: lifetime,
            created_s: 100,
            ..Default::default()
        };
        let link_key = ct_link_key(&conn_key, &conn, ct_kind::REPLY);
        let link = CtEntry4 {
            lifetime_s: NOW - 5,
            ..conn
        };
        vec![(conn_key, conn), (link_key, link)]
    }

    /// A north-south connection with SNAT (SERVICE, EGRESS, NAT_IN).
    fn north_south_snat(client_port: u16, nat_port: u16, lifetime: u32) -> Vec<(CtKey4, CtEntry4)> {
        let conn_key = key(
            ("203.0.113.10", client_port),
            ("192.168.77.10", 30080),
            proto::TCP,
            ct_kind::SERVICE,
        );
        let conn = CtEntry4 {
            target_addr: ip("10.244.1.21"),
            target_port_be: 9376u16.to_be(),
            nat_addr: ip("192.168.77.10"),
            nat_port_be: nat_port.to_be(),
            frontend_addr: ip("192.168.77.10"),
            frontend_port_be: 30080u16.to_be(),
            flags: ct_flags::NORTH_SOUTH | ct_flags::SNAT | ct_flags::SEEN_REPLY,
            backend_id: 9,
            rev_nat_index: 4,
            lifetime_s: lifetime,
            created_s: 200,
            ..Default::default()
        };
        let egress_key = ct_link_key(&conn_key, &conn, ct_kind::EGRESS);
        let mut check = CtTuple {
            kind: ct_kind::EGRESS,
            ..conn_key
        };
        check.daddr = conn.target_addr;
        check.dport_be = conn.target_port_be;
        let swapped = ct_normalize(&mut check);
        assert_eq!(check, egress_key);
        let egress = CtEntry4 {
            flags: ct_flags::SNAT
                | if swapped {
                    0
                } else {
                    ct_flags::CLIENT_IS_SADDR
                },
            lifetime_s: NOW - 1,
            ..conn
        };
        let nat_key = ct_link_key(&conn_key, &conn, ct_kind::NAT_IN);
        let nat = CtEntry4 {
            target_addr: conn_key.saddr,
            target_port_be: conn_key.sport_be,
            flags: 0,
            lifetime_s: NOW - 1,
            ..conn
        };
        vec![(conn_key, conn), (egress_key, egress), (nat_key, nat)]
    }

    fn deleted(plan: &[Deletion]) -> BTreeSet<(u8, Cause)> {
        plan.iter().map(|d| (d.key.kind, d.cause)).collect()
    }

    #[test]
    fn live_connections_stay_and_are_counted() {
        let mut entries = east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::TCP,
            ct_flags::SEEN_REPLY,
            NOW + 100,
        );
        entries.extend(north_south_snat(40000, 40000, NOW + 5));
        let (planned, report) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert!(planned.is_empty(), "{planned:?}");
        assert_eq!(report.connections, [0, 2, 0]);
        assert_eq!(report.nat_ports_in_use, 1);
        assert_eq!(report.backend_ids, BTreeSet::from([7, 9]));
        assert_eq!(report.rev_nat_indices, BTreeSet::from([3, 4]));
    }

    #[test]
    fn an_expired_connection_goes_with_all_its_links_and_frees_its_nat_port() {
        let entries = north_south_snat(40000, 40000, NOW - 1);
        let (planned, report) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert_eq!(planned.len(), 3);
        assert_eq!(planned[0].key.kind, ct_kind::SERVICE, "connection first");
        assert!(planned.iter().all(|d| d.cause == Cause::Expired));
        assert_eq!(report.nat_ports_in_use, 0);
        assert_eq!(report.connections, [0, 0, 0]);
    }

    #[test]
    fn a_link_without_its_connection_goes_once_it_is_not_fresh() {
        let mut entries = east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::TCP,
            0,
            NOW + 50,
        );
        entries.remove(0);
        let (planned, _) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert_eq!(
            deleted(&planned),
            BTreeSet::from([(ct_kind::REPLY, Cause::OrphanLink)])
        );
        // A fresh one (its connection is about to be written) stays.
        entries[0].1.lifetime_s = NOW + 1;
        let (planned, _) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert!(planned.is_empty());
    }

    #[test]
    fn a_link_taken_over_by_another_connection_is_not_deleted_with_the_old_one() {
        // Connection A expired; its NAT_IN key now belongs to connection B
        // (the datapath reclaimed the port).
        let a = north_south_snat(40000, 40000, NOW - 1);
        let mut b = north_south_snat(41000, 40000, NOW + 100);
        // B's NAT_IN has the same key as A's; keep B's value for that key.
        let nat_key = b[2].0;
        assert_eq!(nat_key, a[2].0);
        let mut entries = vec![a[0], a[1]];
        entries.append(&mut b);
        let (planned, _) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert!(planned.iter().all(|d| d.key != nat_key), "{planned:?}");
        assert_eq!(planned.len(), 2, "A's SERVICE and EGRESS: {planned:?}");
    }

    #[test]
    fn udp_connections_to_endpoints_that_stopped_serving_go() {
        let mut entries = east_west(
            ("10.244.0.11", 5353),
            "10.244.0.21",
            proto::UDP,
            0,
            NOW + 50,
        );
        entries.extend(east_west(
            ("10.244.0.12", 5353),
            "10.244.0.22",
            proto::UDP,
            0,
            NOW + 50,
        ));
        let mut serving = UdpServing::new();
        serving.insert(
            ("10.96.0.10".parse().unwrap(), 80),
            BTreeSet::from([("10.244.0.22".parse().unwrap(), 9376)]),
        );
        let (planned, _) = plan(&entries, NOW, 1000, &serving);
        assert_eq!(planned.len(), 2);
        assert!(planned.iter().all(|d| d.cause == Cause::StaleUdp));
        assert!(
            planned
                .iter()
                .all(|d| d.seen.target_addr == ip("10.244.0.21"))
        );
        // A frontend without serving endpoints keeps its flows, as
        // kube-proxy does.
        let (planned, _) = plan(&entries, NOW, 1000, &UdpServing::new());
        assert!(planned.is_empty());
        // TCP is never touched by this rule.
        let tcp = east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::TCP,
            ct_flags::SEEN_REPLY,
            NOW + 50,
        );
        let (planned, _) = plan(&tcp, NOW, 1000, &serving);
        assert!(planned.is_empty());
    }

    #[test]
    fn a_nearly_full_table_drops_unanswered_then_closing_connections_never_established_ones() {
        let mut entries = Vec::new();
        // 4 established, 3 unanswered (opening), 3 closing: 20 entries in a
        // table of 21 (95 %).
        for i in 0..4u16 {
            entries.extend(east_west(
                ("10.244.0.11", 40000 + i),
                "10.244.0.21",
                proto::TCP,
                ct_flags::SEEN_REPLY,
                NOW + 50,
            ));
        }
        for i in 0..3u16 {
            let mut c = east_west(
                ("10.244.0.12", 40000 + i),
                "10.244.0.21",
                proto::TCP,
                0,
                NOW + 50,
            );
            c[0].1.created_s = 100 + u32::from(i);
            entries.extend(c);
        }
        for i in 0..3u16 {
            entries.extend(east_west(
                ("10.244.0.13", 40000 + i),
                "10.244.0.21",
                proto::TCP,
                ct_flags::SEEN_REPLY | ct_flags::RST,
                NOW + 5,
            ));
        }
        let (planned, report) = plan(&entries, NOW, 21, &UdpServing::new());
        // Down to 80 % (16 entries): two connections of two entries go, the
        // oldest unanswered ones.
        assert_eq!(planned.len(), 4, "{planned:?}");
        assert!(planned.iter().all(|d| d.cause == Cause::EarlyDrop));
        let ports: BTreeSet<u16> = planned
            .iter()
            .filter(|d| d.key.kind == ct_kind::SERVICE)
            .map(|d| u16::from_be(d.key.sport_be))
            .collect();
        assert_eq!(ports, BTreeSet::from([40000, 40001]));
        assert!(
            planned
                .iter()
                .all(|d| d.key.kind != ct_kind::SERVICE || d.key.saddr == ip("10.244.0.12"))
        );
        assert_eq!(report.connections, [1, 4, 3]);
    }

    /// A connection written while the sweep read the table: the snapshot
    /// has its link (read after it was written, and no longer fresh by the
    /// time the plan runs) but not its connection (read before). The link
    /// is live and must stay, or the connection's replies leave
    /// untranslated.
    #[test]
    fn a_sweep_never_deletes_the_link_of_a_connection_created_while_it_ran() {
        let now = monotonic_now_s();
        let mut table = FakeConntrack {
            capacity: 100,
            ..Default::default()
        };
        let pair = east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::TCP,
            ct_flags::SEEN_REPLY,
            now + 100,
        );
        let (conn_key, conn) = pair[0];
        let (link_key, mut link) = pair[1];
        link.lifetime_s = now - 1;
        table.entries.insert(conn_key, conn);
        table.entries.insert(link_key, link);
        table.torn_snapshot = Some(vec![(link_key, link)]);
        let report = sweep(&mut table, &UdpServing::new()).unwrap();
        assert_eq!(report.deleted_total(), 0, "{report:?}");
        assert!(table.entries.contains_key(&link_key));
        // A link whose connection really is gone still goes.
        table.entries.remove(&conn_key);
        let report = sweep(&mut table, &UdpServing::new()).unwrap();
        assert_eq!(report.deleted.get("orphan_link"), Some(&1));
        assert!(table.entries.is_empty());
    }

    /// An expired connection replaced by a new one on the same tuple
    /// between the snapshot and the deletions: the new one's links stay.
    #[test]
    fn a_sweep_leaves_the_links_of_a_connection_that_replaced_a_doomed_one() {
        let now = monotonic_now_s();
        let mut table = FakeConntrack {
            capacity: 100,
            ..Default::default()
        };
        let old = east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::UDP,
            0,
            now - 1,
        );
        for (k, v) in &old {
            table.entries.insert(*k, *v);
        }
        let snapshot = table.entries().unwrap();
        table.torn_snapshot = Some(snapshot);
        // The datapath replaces the connection (same backend, created now).
        let mut conn = old[0].1;
        conn.created_s = now;
        conn.lifetime_s = now + 60;
        table.entries.insert(old[0].0, conn);
        let mut link = old[1].1;
        link.created_s = now;
        link.lifetime_s = now - 1;
        table.entries.insert(old[1].0, link);
        let report = sweep(&mut table, &UdpServing::new()).unwrap();
        assert_eq!(report.deleted_total(), 0, "{report:?}");
        assert_eq!(table.entries.len(), 2);
    }

    #[test]
    fn sweep_skips_entries_the_datapath_changed_after_the_snapshot() {
        let mut table = FakeConntrack {
            capacity: 100,
            ..Default::default()
        };
        let now = monotonic_now_s();
        // Expired one second ago at snapshot time.
        for (k, v) in east_west(
            ("10.244.0.11", 40000),
            "10.244.0.21",
            proto::UDP,
            0,
            now - 1,
        ) {
            table.entries.insert(k, v);
        }
        let entries = table.entries().unwrap();
        let (deletions, _) = plan(&entries, now, 100, &UdpServing::new());
        assert_eq!(deletions.len(), 2);
        // The datapath refreshes the connection before the deletions run.
        let conn_key = entries
            .iter()
            .find(|(k, _)| k.kind == ct_kind::SERVICE)
            .unwrap()
            .0;
        let refreshed = CtEntry4 {
            lifetime_s: now + 60,
            ..table.entries[&conn_key]
        };
        assert!(!still_applies(&deletions[0], &refreshed));
        // Through `sweep`: nothing refreshed, both go.
        let report = sweep(&mut table, &UdpServing::new()).unwrap();
        assert_eq!(report.deleted_total(), 2);
        assert!(table.entries.is_empty());
    }
}
