//! The verification resync's comparison of the mirror with the kernel,
//! and the repair of what differs.

use super::*;

impl Syncer {
    /// Compares programmed frontends from `after` on (at most `limit`) with
    /// what the kernel holds: slot 0, every backend slot, the backends the
    /// slots name and the frontend's rev-NAT entry. What differs is marked
    /// for the next [`apply`](Self::apply) to repair (a frontend is
    /// rewritten whole, a backend or rev-NAT entry rewritten). Returns the
    /// last frontend checked (`None`: the walk is over) and the repairs.
    pub fn verify_chunk(
        &mut self,
        dp: &dyn Dataplane,
        after: Option<FrontendKey>,
        limit: usize,
    ) -> Result<(Option<FrontendKey>, Repairs), SyncError> {
        let range = match after {
            Some(a) => self
                .frontends
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.frontends.range(..),
        };
        let chunk: Vec<(FrontendKey, Frontend)> =
            range.take(limit).map(|(k, f)| (*k, f.clone())).collect();
        let mut repairs = Repairs::new();
        let mut rewrite = Vec::new();
        let mut checked_backends: HashSet<BackendId> = HashSet::default();
        for (key, f) in &chunk {
            if f.flags == UNKNOWN_FLAGS {
                // Being rewritten already.
                continue;
            }
            let head = ServiceValue {
                backend_id: f.timeout,
                rev_nat_index: f.rev_nat,
                count: f.slots.len() as u16,
                flags: f.flags,
            };
            let mut whole = dp.read_service(&service_key(key, 0))? == Some(head);
            for (i, id) in f.slots.iter().enumerate() {
                if !whole {
                    break;
                }
                whole = dp
                    .read_service(&service_key(key, i as u16 + 1))?
                    .is_some_and(|v| v.backend_id == *id);
            }
            if !whole {
                *repairs
                    .entry(netlb_common::map_names::SERVICES)
                    .or_default() += 1;
                rewrite.push(*key);
            }
            for id in &f.slots {
                if !checked_backends.insert(*id) {
                    continue;
                }
                let Some(addr) = self.backend_addrs.get(id) else {
                    continue;
                };
                let Some(backend) = self.backends.get(addr) else {
                    continue;
                };
                if dp.read_backend(*id)? != Some(backend_value(addr, backend.flags)) {
                    *repairs
                        .entry(netlb_common::map_names::BACKENDS)
                        .or_default() += 1;
                    self.rewrite_backends.insert(*id);
                }
            }
            let want_rev = rev_nat_value(key.address, key.port);
            if dp.read_rev_nat(f.rev_nat)? != Some(want_rev)
                && self.rewrite_rev_nat.insert(f.rev_nat)
            {
                *repairs.entry(netlb_common::map_names::REV_NAT).or_default() += 1;
            }
        }
        self.mark_unknown(rewrite);
        let last = chunk.last().map(|(k, _)| *k);
        Ok((last, repairs))
    }

    /// Compares every entry the kernel holds with the mirror (a whole
    /// `dump`): entries nothing programmed owns (a crashed agent's, or
    /// written behind the agent's back) are marked for deletion, auxiliary
    /// entries and cluster IPs that are missing for rewriting. Returns the
    /// repairs.
    pub fn verify_all(&mut self, maps: &ProgrammedMaps) -> Repairs {
        let mut repairs = Repairs::new();
        self.find_strays(maps, &mut repairs);
        self.verify_aux(maps, &mut repairs);
        self.verify_cluster_ips(maps, &mut repairs);
        repairs
    }

    /// Slots, backends and rev-NAT entries no programmed frontend owns.
    fn find_strays(&mut self, maps: &ProgrammedMaps, repairs: &mut Repairs) {
        use netlb_common::map_names;
        let pending_slots: HashSet<ServiceKey> = self.stray_slots.iter().copied().collect();
        for (key, _) in &maps.services {
            let owned = self
                .frontends
                .get(&frontend_of(key))
                .is_some_and(|f| usize::from(key.backend_slot) <= f.slots.len());
            if !owned && !pending_slots.contains(key) {
                *repairs.entry(map_names::SERVICES).or_default() += 1;
                self.stray_slots.push(*key);
            }
        }
        let pending: HashSet<BackendId> = self.stray_backends.iter().copied().collect();
        for (id, _) in &maps.backends {
            if !self.backend_addrs.contains_key(id) && !pending.contains(id) {
                *repairs.entry(map_names::BACKENDS).or_default() += 1;
                self.stray_backends.push(*id);
            }
        }
        let known_rev: HashSet<RevNatIndex> = self.rev_nat.values().map(|r| r.index).collect();
        let pending: HashSet<RevNatIndex> = self.stray_rev_nat.iter().copied().collect();
        for (index, _) in &maps.rev_nat {
            if !known_rev.contains(index) && !pending.contains(index) {
                *repairs.entry(map_names::REV_NAT).or_default() += 1;
                self.stray_rev_nat.push(*index);
            }
        }
    }

    /// Auxiliary entries: the kernel's against the frontends'. A frontend
    /// missing one is rewritten; one no frontend has is a stray.
    fn verify_aux(&mut self, maps: &ProgrammedMaps, repairs: &mut Repairs) {
        let held: HashSet<Aux> = maps
            .source_ranges
            .iter()
            .map(|r| Aux::SourceRange(*r))
            .chain(maps.affinity_matches.iter().map(|m| Aux::AffinityMatch(*m)))
            .collect();
        let mut owned_aux: HashSet<Aux> = HashSet::default();
        let mut rewrite = Vec::new();
        for (key, f) in &self.frontends {
            owned_aux.extend(f.aux.iter().copied());
            if f.flags == UNKNOWN_FLAGS {
                continue;
            }
            if let Some(missing) = f.aux.iter().find(|a| !held.contains(a)) {
                *repairs.entry(AuxKind::of(missing).map()).or_default() += 1;
                rewrite.push(*key);
            }
        }
        self.mark_unknown(rewrite);
        let pending: HashSet<Aux> = self.stray_aux.iter().copied().collect();
        for a in held {
            if !owned_aux.contains(&a) && !pending.contains(&a) {
                *repairs.entry(AuxKind::of(&a).map()).or_default() += 1;
                self.stray_aux.push(a);
            }
        }
    }

    /// Cluster IPs: what the kernel holds is what the mirror says it
    /// holds; `sync_cluster_ips` then makes it what is wanted.
    fn verify_cluster_ips(&mut self, maps: &ProgrammedMaps, repairs: &mut Repairs) {
        let held: HashSet<Ipv4Addr> = maps.cluster_ips.iter().copied().collect();
        let differ: Vec<Ipv4Addr> = held
            .symmetric_difference(&self.cluster_ips)
            .copied()
            .collect();
        for ip in differ {
            *repairs
                .entry(netlb_common::map_names::CLUSTER_IPS)
                .or_default() += 1;
            if held.contains(&ip) {
                self.cluster_ips.insert(ip);
            } else {
                self.cluster_ips.remove(&ip);
            }
            self.cluster_ips_dirty.insert(ip);
        }
    }

    /// Applies the verification's findings (see [`verify_chunk`] and
    /// [`verify_all`]); what fails stays for the next apply.
    ///
    /// [`verify_chunk`]: Self::verify_chunk
    /// [`verify_all`]: Self::verify_all
    pub(super) fn repair(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        for index in std::mem::take(&mut self.stray_rev_nat) {
            match dp.delete_rev_nat(index) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    log::warn!("deleting stray rev-NAT entry {index}: {e}");
                    self.stray_rev_nat.push(index);
                    report.failed_deletes += 1;
                }
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            match dp.delete_backend(id) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    log::warn!("deleting stray backend {id}: {e}");
                    self.stray_backends.push(id);
                    report.failed_deletes += 1;
                }
            }
        }
        for id in std::mem::take(&mut self.rewrite_backends) {
            let Some((addr, flags)) = self
                .backend_addrs
                .get(&id)
                .and_then(|a| self.backends.get(a).map(|b| (*a, b.flags)))
            else {
                continue;
            };
            match dp.upsert_backend(id, &backend_value(&addr, flags)) {
                Ok(()) => report.writes += 1,
                Err(e) => {
                    log::warn!("rewriting backend {id}: {e}");
                    self.rewrite_backends.insert(id);
                }
            }
        }
        let revs: Vec<((Ipv4Addr, u16), RevNatIndex)> = self
            .rev_nat
            .iter()
            .filter(|(_, r)| self.rewrite_rev_nat.contains(&r.index))
            .map(|(k, r)| (*k, r.index))
            .collect();
        self.rewrite_rev_nat.clear();
        for ((address, port), index) in revs {
            match dp.upsert_rev_nat(index, &rev_nat_value(address, port)) {
                Ok(()) => report.writes += 1,
                Err(e) => {
                    log::warn!("rewriting rev-NAT entry {index}: {e}");
                    self.rewrite_rev_nat.insert(index);
                }
            }
        }
    }
}
