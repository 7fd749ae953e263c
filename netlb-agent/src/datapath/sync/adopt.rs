//! Adoption: the mirror rebuilt from what a previous agent programmed.

use super::*;

impl Syncer {
    /// Rebuilds the mirror from the maps (a restarted agent adopting pinned
    /// maps): ids and indices stay what they are.
    pub fn adopt(dp: &dyn Dataplane) -> Result<Self, SyncError> {
        Self::adopt_with_limits(dp, limits::MAX_BACKENDS, limits::MAX_REV_NAT)
    }

    /// [`Syncer::adopt`] for maps of the given sizes. Every adopted
    /// frontend is reconciled by the first [`apply`](Self::apply): kept as
    /// it is when a Service still wants it so, removed when none does.
    pub fn adopt_with_limits(
        dp: &dyn Dataplane,
        max_backends: u32,
        max_rev_nat: u32,
    ) -> Result<Self, SyncError> {
        let maps = dp.dump()?;
        let mut syncer = Self::with_limits(max_backends, max_rev_nat);
        syncer.adopt_backends(&maps);
        syncer.adopt_rev_nat(&maps);
        syncer.adopt_frontends(&maps);
        // Cluster IPs: adopted as they are; those no Service wants go in the
        // first apply.
        syncer.cluster_ips = maps.cluster_ips.iter().copied().collect();
        syncer.cluster_ips_dirty = maps.cluster_ips.iter().copied().collect();
        syncer.adopt_aux(&maps);
        syncer.count_adopted_refs();
        Ok(syncer)
    }

    fn adopt_backends(&mut self, maps: &ProgrammedMaps) {
        for (id, value) in &maps.backends {
            let addr = BackendAddr {
                address: from_be_addr(value.address_be),
                port: u16::from_be(value.port_be),
                proto: value.proto,
            };
            self.backends.insert(
                addr,
                Backend {
                    id: *id,
                    flags: value.flags,
                    refs: 0,
                },
            );
            self.backend_addrs.insert(*id, addr);
        }
        self.backend_ids
            .adopt(&maps.backends.iter().map(|(id, _)| *id).collect());
    }

    fn adopt_rev_nat(&mut self, maps: &ProgrammedMaps) {
        for (index, value) in &maps.rev_nat {
            self.rev_nat.insert(
                (from_be_addr(value.address_be), u16::from_be(value.port_be)),
                RevNat {
                    index: *index,
                    refs: 0,
                },
            );
        }
        self.rev_nat_ids
            .adopt(&maps.rev_nat.iter().map(|(i, _)| *i).collect());
    }

    /// Frontends from their slot 0, then their slots; slots of no
    /// frontend (or past its count) are strays.
    fn adopt_frontends(&mut self, maps: &ProgrammedMaps) {
        let mut slots: BTreeMap<(FrontendKey, u16), BackendId> = BTreeMap::new();
        for (key, value) in &maps.services {
            let fe = frontend_of(key);
            if key.backend_slot == 0 {
                self.service_entries += 1 + value.count as usize;
                let mut f = Frontend::new(
                    value.rev_nat_index,
                    value.flags,
                    vec![0; value.count as usize],
                );
                f.timeout = value.backend_id;
                self.frontends.insert(fe, f);
            } else {
                slots.insert((fe, key.backend_slot), value.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            match self.frontends.get_mut(&fe) {
                Some(f) if (slot as usize) <= f.slots.len() => {
                    f.slots[slot as usize - 1] = id;
                    f.held.push(id);
                }
                _ => self.stray_slots.push(service_key(&fe, slot)),
            }
        }
    }

    /// Auxiliary entries belong to the frontend with their rev-NAT index,
    /// protocol and scope; the others are strays.
    fn adopt_aux(&mut self, maps: &ProgrammedMaps) {
        let mut owners: HashMap<(RevNatIndex, u8, u8), FrontendKey> = HashMap::default();
        for (key, f) in &self.frontends {
            owners.insert((f.rev_nat, key.proto, key.scope), *key);
        }
        let aux = maps
            .source_ranges
            .iter()
            .map(|r| {
                let (_, d) = r;
                (
                    (u32::from_be(d.rev_nat_index_be), d.proto, d.scope),
                    Aux::SourceRange(*r),
                )
            })
            .chain(maps.affinity_matches.iter().map(|m| {
                (
                    (m.frontend.rev_nat_index, m.frontend.proto, m.frontend.scope),
                    Aux::AffinityMatch(*m),
                )
            }));
        for (owner, entry) in aux {
            match owners.get(&owner).and_then(|k| self.frontends.get_mut(k)) {
                Some(f) => f.aux.push(entry),
                None => self.stray_aux.push(entry),
            }
        }
        for f in self.frontends.values_mut() {
            f.aux.sort();
        }
        self.aux_counts = aux_counts(self.frontends.values().flat_map(|f| f.aux.iter()));
    }

    /// Reference counts from what the adopted frontends use; every adopted
    /// frontend is reconciled by the first apply, and what none uses is a
    /// candidate for deletion.
    fn count_adopted_refs(&mut self) {
        let frontends: Vec<(FrontendKey, Frontend)> = self
            .frontends
            .iter()
            .map(|(k, f)| (*k, f.clone()))
            .collect();
        for (key, f) in &frontends {
            self.add_refs(key, f, 1);
            self.dirty.insert(*key);
        }
        self.unreferenced_backends = self
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(a, _)| *a)
            .collect();
        self.unreferenced_rev_nat = self
            .rev_nat
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(k, _)| *k)
            .collect();
    }
}
