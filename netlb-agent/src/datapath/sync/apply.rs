//! [`Syncer::apply`]: the changed frontends written in batches and in
//! make-before-break order (see the module docs of [`super`]).

use super::*;

impl Syncer {
    /// Reconciles the changed frontends with the fewest map operations, in
    /// batches and make-before-break order (see the module docs). Failed
    /// frontends are marked for a retry by the next call; the rest is done.
    pub fn apply(&mut self, dp: &mut dyn Dataplane) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        self.generation += 1;
        let mut run = Run {
            generation: self.generation,
            changes: self.take_changes(),
            failed: BTreeSet::new(),
            report: SyncReport::default(),
        };
        // 0. What the verification found: entries nothing owns go (before
        // any id is handed out), entries the kernel holds differently are
        // rewritten from the mirror.
        self.repair(dp, &mut run.report);
        // 1. Backends: new ones get ids, changed flags are rewritten.
        self.write_backends(dp, &mut run);
        // 2. Rev-NAT entries for new frontend addresses.
        self.write_rev_nats(dp, &mut run);
        // 3. Slots, then slot 0, then the tails, of changed frontends.
        let writes = self.plan_frontends(&run);
        self.write_frontends(dp, &mut run, writes);
        // 4. Removed frontends: slot 0 first, then their slots; then what
        // earlier syncs could not delete.
        self.remove_frontends(dp, &mut run);
        self.delete_strays(dp, &mut run.report);
        // 5. Rev-NAT entries and backends nothing references any more.
        self.delete_unreferenced_rev_nat(dp, &mut run);
        self.delete_unreferenced_backends(dp, &mut run);
        Ok(self.finish(dp, run, started))
    }

    /// What each changed frontend becomes (`None`: removed); unchanged ones
    /// are left out.
    fn take_changes(&mut self) -> Vec<(FrontendKey, Option<DesiredFrontend>)> {
        let dirty: Vec<FrontendKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut changes = Vec::new();
        for key in dirty {
            match self.target(&key) {
                Some(want) if self.unchanged(&key, want) => {}
                Some(want) => changes.push((key, Some(want.clone()))),
                None if self.frontends.contains_key(&key) => changes.push((key, None)),
                None => {}
            }
        }
        changes
    }

    /// Step 1: new backends get ids, backends whose flags changed are
    /// rewritten; a frontend whose backend could not be written waits.
    fn write_backends(&mut self, dp: &mut dyn Dataplane, run: &mut Run) {
        let mut plan = self.plan_backends(run);
        // A reused id starts with zeroed counters; an id whose counters
        // cannot be reset is not used (its frontends retry next time).
        let mut reset_failed: HashSet<BackendId> = HashSet::default();
        for (addr, id) in &plan.fresh {
            if let Err(e) = dp.reset_backend_stats(*id) {
                log::warn!("resetting the counters of backend id {id} ({addr:?}): {e}");
                reset_failed.insert(*id);
            }
        }
        if !reset_failed.is_empty() {
            plan.writes.retain(|p| {
                if reset_failed.contains(&p.item.0) {
                    run.failed.insert(p.frontend);
                    false
                } else {
                    true
                }
            });
            plan.backends
                .retain(|_, (id, _)| !reset_failed.contains(id));
        }
        let mut failed = BTreeSet::new();
        run.report.writes += write_batch(
            &plan.writes,
            &mut |items| dp.upsert_backends(items),
            &mut failed,
        );
        self.record_backends(&plan, &failed);
        run.failed.extend(failed);
        // A backend is planned once, for the first frontend that wants it;
        // when its write failed, every frontend that wants it waits too.
        for (key, want) in &run.changes {
            if let Some(want) = want
                && !run.failed.contains(key)
                && want
                    .backends
                    .iter()
                    .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
                    .any(|b| {
                        self.backends
                            .get(&b.addr)
                            .is_none_or(|st| st.flags != b.flags)
                    })
            {
                run.failed.insert(*key);
            }
        }
    }

    /// The backend writes the changed frontends need: new backends (with
    /// fresh ids) and backends whose flags changed.
    fn plan_backends(&mut self, run: &mut Run) -> BackendPlan {
        let mut plan = BackendPlan::default();
        for (key, want) in &run.changes {
            let Some(want) = want else { continue };
            for b in want
                .backends
                .iter()
                .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
            {
                if plan.backends.contains_key(&b.addr) {
                    continue;
                }
                let id = match self.backends.get(&b.addr) {
                    Some(st) if st.flags == b.flags => continue,
                    Some(st) => st.id,
                    None => match self.backend_ids.alloc() {
                        Some(id) => {
                            plan.fresh.push((b.addr, id));
                            id
                        }
                        None => {
                            run.failed.insert(*key);
                            run.report.exhausted += 1;
                            continue;
                        }
                    },
                };
                plan.backends.insert(b.addr, (id, b.flags));
                plan.writes.push(Planned {
                    frontend: *key,
                    item: (id, backend_value(&b.addr, b.flags)),
                });
            }
        }
        plan
    }

    /// The mirror follows the backend writes that succeeded (everything
    /// planned but for the failed frontends'; a failed write names its
    /// frontend); fresh ids that reached no map are free again.
    fn record_backends(&mut self, plan: &BackendPlan, failed: &BTreeSet<FrontendKey>) {
        let failed_ids: HashSet<BackendId> = plan
            .writes
            .iter()
            .filter(|p| failed.contains(&p.frontend))
            .map(|p| p.item.0)
            .collect();
        for (addr, (id, flags)) in &plan.backends {
            if failed_ids.contains(id) {
                continue;
            }
            let refs = self.backends.get(addr).map(|b| b.refs).unwrap_or(0);
            if refs == 0 {
                // Written for a frontend that may still fail: deleted below
                // unless a frontend takes a reference.
                self.unreferenced_backends.insert(*addr);
            }
            self.backends.insert(
                *addr,
                Backend {
                    id: *id,
                    flags: *flags,
                    refs,
                },
            );
            self.backend_addrs.insert(*id, *addr);
        }
        for (addr, id) in &plan.fresh {
            if !self.backends.contains_key(addr) {
                self.backend_ids.unuse(*id);
            }
        }
    }

    /// Step 2: a rev-NAT entry for each new frontend address and port.
    fn write_rev_nats(&mut self, dp: &mut dyn Dataplane, run: &mut Run) {
        let mut writes: Vec<Planned<(RevNatIndex, RevNatValue)>> = Vec::new();
        let mut planned: HashMap<(Ipv4Addr, u16), RevNatIndex> = HashMap::default();
        for (key, want) in &run.changes {
            if want.is_none() || run.failed.contains(key) {
                continue;
            }
            let rev = (key.address, key.port);
            if self.rev_nat.contains_key(&rev) || planned.contains_key(&rev) {
                continue;
            }
            let Some(index) = self.rev_nat_ids.alloc() else {
                run.failed.insert(*key);
                run.report.exhausted += 1;
                continue;
            };
            planned.insert(rev, index);
            writes.push(Planned {
                frontend: *key,
                item: (index, rev_nat_value(key.address, key.port)),
            });
        }
        let mut failed = BTreeSet::new();
        run.report.writes +=
            write_batch(&writes, &mut |items| dp.upsert_rev_nats(items), &mut failed);
        for p in &writes {
            let rev = (p.frontend.address, p.frontend.port);
            if failed.contains(&p.frontend) {
                self.rev_nat_ids.unuse(p.item.0);
            } else {
                self.rev_nat.insert(
                    rev,
                    RevNat {
                        index: p.item.0,
                        refs: 0,
                    },
                );
                self.unreferenced_rev_nat.insert(rev);
            }
        }
        run.failed.extend(failed);
        // Frontends of one address and port (protocols, scopes) share the
        // entry: when its write failed they all wait.
        for (key, want) in &run.changes {
            if want.is_some() && !self.rev_nat.contains_key(&(key.address, key.port)) {
                run.failed.insert(*key);
            }
        }
    }

    /// Step 3's plan: every changed frontend's new layout, the slots and
    /// auxiliary entries it needs written.
    fn plan_frontends(&mut self, run: &Run) -> FrontendWrites {
        let mut writes = FrontendWrites::default();
        // Room left in each auxiliary map (strays still take theirs).
        let strays = aux_counts(&self.stray_aux);
        let mut aux_room = [0, 1].map(|k| {
            self.aux_capacity[k]
                .saturating_sub(self.aux_counts[k])
                .saturating_sub(strays[k])
        });
        for (key, want) in &run.changes {
            let Some(want) = want else { continue };
            if !run.failed.contains(key) {
                self.plan_frontend(key, want, &mut aux_room, &mut writes);
            }
        }
        writes
    }

    fn plan_frontend(
        &mut self,
        key: &FrontendKey,
        want: &DesiredFrontend,
        aux_room: &mut [usize; 2],
        writes: &mut FrontendWrites,
    ) {
        let rev_nat = self.rev_nat[&(key.address, key.port)].index;
        let wanted_ids: Vec<BackendId> = want
            .backends
            .iter()
            .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
            .map(|b| self.backends[&b.addr].id)
            .collect();
        let old = self.frontends.get(key).cloned();
        let old_slots = old.as_ref().map(|f| f.slots.as_slice()).unwrap_or_default();
        let slots = next_slots(old_slots, &wanted_ids);
        for (i, id) in slots.iter().enumerate() {
            if old_slots.get(i) != Some(id) {
                writes.slots.push(Planned {
                    frontend: *key,
                    item: (
                        service_key(key, i as u16 + 1),
                        ServiceValue {
                            backend_id: *id,
                            ..Default::default()
                        },
                    ),
                });
            }
        }
        // An unknown frontend may lack any entry: all are written again.
        let known = old.as_ref().filter(|f| f.flags != UNKNOWN_FLAGS);
        let (flags, timeout, new_aux) = self.fit_aux(key, rev_nat, want, &slots, known, aux_room);
        let old_aux: &[Aux] = old.as_ref().map(|f| f.aux.as_slice()).unwrap_or_default();
        for entry in &new_aux {
            if known.is_none_or(|f| f.aux.binary_search(entry).is_err()) {
                writes.aux.push(Planned {
                    frontend: *key,
                    item: *entry,
                });
            }
        }
        let aux_dels = old_aux
            .iter()
            .filter(|r| new_aux.binary_search(r).is_err())
            .copied()
            .collect();
        let mut new = Frontend::new(rev_nat, flags, slots);
        new.aux = new_aux;
        new.timeout = timeout;
        writes.plans.push(Plan {
            key: *key,
            old,
            new,
            aux_dels,
        });
    }

    /// Step 3: auxiliary entries and slots, then headers, then the slots
    /// past the new counts and the auxiliary entries no longer needed; the
    /// mirror follows what was written.
    fn write_frontends(
        &mut self,
        dp: &mut dyn Dataplane,
        run: &mut Run,
        mut writes: FrontendWrites,
    ) {
        let slot_failed = self.write_slots(dp, run, &mut writes);
        let header_failed = write_headers(dp, run, &writes.plans, &slot_failed);
        let done = |key: &FrontendKey| !slot_failed.contains(key) && !header_failed.contains(key);
        let tail_failed = delete_tails(dp, run, &writes.plans, &done);
        self.delete_dropped_aux(dp, run, &writes.plans, &done);
        // The mirror and the reference counts follow what was written.
        for plan in writes.plans {
            let key = plan.key;
            if !done(&key) {
                run.failed.insert(key);
                self.record_unknown(plan);
                continue;
            }
            if tail_failed.contains(&key) {
                let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
                self.stray_slots.extend(
                    (plan.new.slots.len()..old_len).map(|slot| service_key(&key, slot as u16 + 1)),
                );
            }
            self.move_refs(&key, plan.old.as_ref(), &plan.new);
            self.set_frontend(key, plan.new);
        }
    }

    /// Auxiliary entries before the slots and the header that use them
    /// (make before break: a new range admits, a new backend matches,
    /// before the header could refuse or forget). Returns the frontends
    /// whose entries or slots failed.
    fn write_slots(
        &mut self,
        dp: &mut dyn Dataplane,
        run: &mut Run,
        writes: &mut FrontendWrites,
    ) -> BTreeSet<FrontendKey> {
        let mut aux_failed = BTreeSet::new();
        run.report.writes += write_batch(
            &writes.aux,
            &mut |items| dp.upsert_aux(items),
            &mut aux_failed,
        );
        writes.slots.retain(|p| !aux_failed.contains(&p.frontend));
        let mut slot_failed = BTreeSet::new();
        run.report.writes += write_batch(
            &writes.slots,
            &mut |items| dp.upsert_services(items),
            &mut slot_failed,
        );
        slot_failed.extend(aux_failed);
        if !slot_failed.is_empty() {
            self.roll_back_slots(dp, &writes.plans, &slot_failed);
        }
        slot_failed
    }

    /// Slots written past a failed frontend's old count are unreachable
    /// (its header still says the old count): taken back at once, so that
    /// a frontend too big for the map does not keep the others out of it.
    /// What cannot be taken back is deleted by a later sync.
    fn roll_back_slots(
        &mut self,
        dp: &mut dyn Dataplane,
        plans: &[Plan],
        slot_failed: &BTreeSet<FrontendKey>,
    ) {
        let rollback: Vec<Planned<ServiceKey>> = plans
            .iter()
            .filter(|plan| slot_failed.contains(&plan.key))
            .flat_map(|plan| {
                let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
                (old_len..plan.new.slots.len()).map(move |slot| Planned {
                    frontend: plan.key,
                    item: service_key(&plan.key, slot as u16 + 1),
                })
            })
            .collect();
        let mut rollback_failed = BTreeSet::new();
        write_batch(
            &rollback,
            &mut |items| dp.delete_services(items),
            &mut rollback_failed,
        );
        self.stray_slots.extend(
            rollback
                .iter()
                .filter(|p| rollback_failed.contains(&p.frontend))
                .map(|p| p.item),
        );
    }

    /// Entries the new layouts dropped, once their headers no longer need
    /// them (a failure leaves them for a later sync).
    fn delete_dropped_aux(
        &mut self,
        dp: &mut dyn Dataplane,
        run: &mut Run,
        plans: &[Plan],
        done: &dyn Fn(&FrontendKey) -> bool,
    ) {
        let deletes: Vec<Planned<Aux>> = plans
            .iter()
            .filter(|plan| done(&plan.key))
            .flat_map(|plan| {
                plan.aux_dels.iter().map(|r| Planned {
                    frontend: plan.key,
                    item: *r,
                })
            })
            .collect();
        let mut failed = BTreeSet::new();
        run.report.deletes += write_batch(&deletes, &mut |items| dp.delete_aux(items), &mut failed);
        self.stray_aux.extend(
            deletes
                .iter()
                .filter(|p| failed.contains(&p.frontend))
                .map(|p| p.item),
        );
    }

    /// A frontend whose slots or header failed: its state in the kernel is
    /// unknown, so the next sync rewrites every slot and the header, and
    /// deletes everything past the new count. The kernel may hold old or
    /// new slots and auxiliary entries: both are kept alive.
    fn record_unknown(&mut self, plan: Plan) {
        let key = plan.key;
        let len = plan
            .new
            .slots
            .len()
            .max(plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0));
        let mut held: Vec<BackendId> = plan
            .old
            .as_ref()
            .map(|f| f.held.clone())
            .unwrap_or_default();
        held.extend(
            plan.new
                .slots
                .iter()
                .filter(|id| !held.contains(id))
                .copied()
                .collect::<Vec<_>>(),
        );
        if let Some(old) = &plan.old {
            self.add_refs(&key, old, -1);
        }
        let mut aux: Vec<Aux> = plan.old.as_ref().map(|f| f.aux.clone()).unwrap_or_default();
        aux.extend(plan.new.aux.iter().copied());
        aux.sort();
        aux.dedup();
        let unknown = Frontend {
            rev_nat: plan.new.rev_nat,
            flags: UNKNOWN_FLAGS,
            slots: vec![0; len],
            held,
            aux,
            timeout: plan.new.timeout,
        };
        self.add_refs(&key, &unknown, 1);
        self.set_frontend(key, unknown);
    }

    /// Step 4: removed frontends lose slot 0 first; their slots and
    /// auxiliary entries become strays, deleted next.
    fn remove_frontends(&mut self, dp: &mut dyn Dataplane, run: &mut Run) {
        let removed: Vec<FrontendKey> = run
            .changes
            .iter()
            .filter(|(_, want)| want.is_none())
            .map(|(k, _)| *k)
            .collect();
        let heads: Vec<Planned<ServiceKey>> = removed
            .iter()
            .map(|k| Planned {
                frontend: *k,
                item: service_key(k, 0),
            })
            .collect();
        let mut head_failed = BTreeSet::new();
        run.report.deletes += write_batch(
            &heads,
            &mut |items| dp.delete_services(items),
            &mut head_failed,
        );
        for key in &removed {
            if head_failed.contains(key) {
                run.failed.insert(*key);
                continue;
            }
            if let Some(f) = self.frontends.remove(key) {
                self.service_entries -= 1 + f.slots.len();
                for (count, n) in self.aux_counts.iter_mut().zip(aux_counts(&f.aux)) {
                    *count -= n;
                }
                self.degraded.remove(key);
                self.stray_aux.extend(f.aux.iter().copied());
                self.add_refs(key, &f, -1);
                // Its slots are unreachable now; delete them below (and on
                // the next sync if a deletion fails).
                self.stray_slots.extend(
                    (1..=f.slots.len())
                        .rev()
                        .map(|slot| service_key(key, slot as u16)),
                );
            }
        }
    }

    /// Deletes the strays: slots and auxiliary entries no programmed
    /// frontend has (left by a crashed agent, or deletions that failed).
    fn delete_strays(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        // A frontend written since may have taken the same keys: those are
        // its own now.
        self.forget_owned_strays();
        // One call per auxiliary entry: a failure keeps that entry alone.
        for entry in std::mem::take(&mut self.stray_aux) {
            match dp.delete_aux(std::slice::from_ref(&entry)) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    log::warn!("deleting {entry:?}: {}", e.source);
                    report.failed_deletes += 1;
                    self.stray_aux.push(entry);
                }
            }
        }
        if self.stray_slots.is_empty() {
            return;
        }
        let planned: Vec<Planned<ServiceKey>> = std::mem::take(&mut self.stray_slots)
            .into_iter()
            .map(|k| Planned {
                frontend: frontend_of(&k),
                item: k,
            })
            .collect();
        let mut failed = BTreeSet::new();
        report.deletes += write_batch(
            &planned,
            &mut |items| dp.delete_services(items),
            &mut failed,
        );
        self.stray_slots = planned
            .into_iter()
            .filter(|p| failed.contains(&p.frontend))
            .map(|p| p.item)
            .collect();
        report.failed_deletes += failed.len();
    }

    /// Step 5: rev-NAT entries no programmed frontend references; a failed
    /// deletion stays a candidate for the next sync.
    fn delete_unreferenced_rev_nat(&mut self, dp: &mut dyn Dataplane, run: &mut Run) {
        let stale: Vec<((Ipv4Addr, u16), RevNatIndex)> =
            std::mem::take(&mut self.unreferenced_rev_nat)
                .into_iter()
                .filter_map(|k| {
                    self.rev_nat
                        .get(&k)
                        .filter(|r| r.refs == 0)
                        .map(|r| (k, r.index))
                })
                .collect();
        for (rev, index) in stale {
            if let Err(e) = dp.delete_rev_nat(index) {
                log::warn!("deleting rev-NAT entry {index} ({}:{}): {e}", rev.0, rev.1);
                self.unreferenced_rev_nat.insert(rev);
                run.report.failed_deletes += 1;
                continue;
            }
            run.report.deletes += 1;
            self.rev_nat.remove(&rev);
            self.rev_nat_ids.release(index, run.generation);
        }
    }

    /// Step 5: backends no programmed frontend references.
    fn delete_unreferenced_backends(&mut self, dp: &mut dyn Dataplane, run: &mut Run) {
        let stale: Vec<(BackendAddr, BackendId)> = std::mem::take(&mut self.unreferenced_backends)
            .into_iter()
            .filter_map(|addr| {
                self.backends
                    .get(&addr)
                    .filter(|b| b.refs == 0)
                    .map(|b| (addr, b.id))
            })
            .collect();
        for (addr, id) in stale {
            if let Err(e) = dp.delete_backend(id) {
                log::warn!("deleting backend {id} ({addr:?}): {e}");
                self.unreferenced_backends.insert(addr);
                run.report.failed_deletes += 1;
                continue;
            }
            run.report.deletes += 1;
            self.backends.remove(&addr);
            self.backend_addrs.remove(&id);
            self.backend_ids.release(id, run.generation);
        }
    }

    /// Failed and degraded frontends are tried again by the next apply;
    /// cluster IPs follow the frontends.
    fn finish(&mut self, dp: &mut dyn Dataplane, run: Run, started: Instant) -> SyncReport {
        let mut report = run.report;
        report.failed = run.failed.len();
        self.dirty.extend(run.failed);
        // Frontends without a feature whose map is full: tried again by
        // every apply, until their entries fit.
        self.dirty.extend(self.degraded.keys().copied());
        // Cluster IPs, after the frontends (a new Service's address must not
        // reject its own port before its frontend exists; a removed one's
        // goes after its frontend).
        self.sync_cluster_ips(dp, &mut report);
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report.duration = started.elapsed();
        report
    }

    /// Drops from the strays the slots and auxiliary entries that a
    /// programmed frontend has (its slots `1..=count`, its aux entries): a
    /// crashed agent's leftovers whose keys a frontend written since uses.
    fn forget_owned_strays(&mut self) {
        let frontends = &self.frontends;
        self.stray_slots.retain(|k| {
            frontends
                .get(&frontend_of(k))
                .is_none_or(|f| usize::from(k.backend_slot) > f.slots.len())
        });
        if self.stray_aux.is_empty() {
            return;
        }
        let owned: HashSet<Aux> = self
            .frontends
            .values()
            .flat_map(|f| f.aux.iter().copied())
            .collect();
        self.stray_aux.retain(|a| !owned.contains(a));
    }
    fn sync_cluster_ips(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        if self.cluster_ips_dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.cluster_ips_dirty);
        let adds: Vec<Ipv4Addr> = dirty
            .iter()
            .filter(|ip| self.cluster_ip_refs.contains_key(ip) && !self.cluster_ips.contains(ip))
            .copied()
            .collect();
        let dels: Vec<Ipv4Addr> = dirty
            .iter()
            .filter(|ip| !self.cluster_ip_refs.contains_key(ip) && self.cluster_ips.contains(ip))
            .copied()
            .collect();
        let done = |r: Result<(), BatchError>, n: usize| match r {
            Ok(()) => n,
            Err(e) => {
                log::warn!("cluster IPs: {e}: {}", e.source);
                e.index
            }
        };
        let written = done(dp.upsert_cluster_ips(&adds), adds.len());
        report.writes += written;
        self.cluster_ips.extend(adds[..written].iter().copied());
        self.cluster_ips_dirty
            .extend(adds[written..].iter().copied());
        let deleted = done(dp.delete_cluster_ips(&dels), dels.len());
        report.deletes += deleted;
        for ip in &dels[..deleted] {
            self.cluster_ips.remove(ip);
        }
        self.cluster_ips_dirty
            .extend(dels[deleted..].iter().copied());
        if written < adds.len() || deleted < dels.len() {
            report.failed_deletes += dels.len() - deleted;
            report.failed += usize::from(written < adds.len());
        }
    }
}

/// The state of one [`Syncer::apply`]: the changes it works on, the
/// frontends that failed (retried by the next apply), what it did.
struct Run {
    generation: u64,
    changes: Vec<(FrontendKey, Option<DesiredFrontend>)>,
    failed: BTreeSet<FrontendKey>,
    report: SyncReport,
}

/// Step 1's plan: the backend writes, each planned backend's id and
/// flags, and the ids allocated for it.
#[derive(Default)]
struct BackendPlan {
    writes: Vec<Planned<(BackendId, BackendValue)>>,
    backends: HashMap<BackendAddr, (BackendId, u8)>,
    fresh: Vec<(BackendAddr, BackendId)>,
}

/// A changed frontend's new layout.
struct Plan {
    key: FrontendKey,
    old: Option<Frontend>,
    new: Frontend,
    /// Auxiliary entries the old layout has and the new one not.
    aux_dels: Vec<Aux>,
}

/// Step 3's plan: the layouts, and the slots and auxiliary entries to
/// write before their headers.
#[derive(Default)]
struct FrontendWrites {
    plans: Vec<Plan>,
    slots: Vec<Planned<(ServiceKey, ServiceValue)>>,
    aux: Vec<Planned<Aux>>,
}

/// Slot 0 of every planned frontend whose header changed (not of those
/// whose slots failed). Returns the frontends whose header failed.
fn write_headers(
    dp: &mut dyn Dataplane,
    run: &mut Run,
    plans: &[Plan],
    slot_failed: &BTreeSet<FrontendKey>,
) -> BTreeSet<FrontendKey> {
    let mut writes: Vec<Planned<(ServiceKey, ServiceValue)>> = Vec::new();
    for plan in plans {
        if slot_failed.contains(&plan.key) {
            continue;
        }
        let changed = match &plan.old {
            Some(f) => {
                f.rev_nat != plan.new.rev_nat
                    || f.flags != plan.new.flags
                    || f.timeout != plan.new.timeout
                    || f.slots.len() != plan.new.slots.len()
            }
            None => true,
        };
        if changed {
            writes.push(Planned {
                frontend: plan.key,
                item: (
                    service_key(&plan.key, 0),
                    ServiceValue {
                        // The affinity timeout (0 without).
                        backend_id: plan.new.timeout,
                        rev_nat_index: plan.new.rev_nat,
                        count: plan.new.slots.len() as u16,
                        flags: plan.new.flags,
                    },
                ),
            });
        }
    }
    let mut failed = BTreeSet::new();
    run.report.writes += write_batch(&writes, &mut |items| dp.upsert_services(items), &mut failed);
    failed
}

/// The slots past each written frontend's new count. Returns the
/// frontends whose deletions failed.
fn delete_tails(
    dp: &mut dyn Dataplane,
    run: &mut Run,
    plans: &[Plan],
    done: &dyn Fn(&FrontendKey) -> bool,
) -> BTreeSet<FrontendKey> {
    let mut deletes: Vec<Planned<ServiceKey>> = Vec::new();
    for plan in plans.iter().filter(|plan| done(&plan.key)) {
        let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
        for slot in plan.new.slots.len()..old_len {
            deletes.push(Planned {
                frontend: plan.key,
                item: service_key(&plan.key, slot as u16 + 1),
            });
        }
    }
    let mut failed = BTreeSet::new();
    run.report.deletes += write_batch(
        &deletes,
        &mut |items| dp.delete_services(items),
        &mut failed,
    );
    failed
}
