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
        for (id, value) in &maps.backends {
            let addr = BackendAddr {
                address: from_be_addr(value.address_be),
                port: u16::from_be(value.port_be),
                proto: value.proto,
            };
            syncer.backends.insert(
                addr,
                Backend {
                    id: *id,
                    flags: value.flags,
                    refs: 0,
                },
            );
            syncer.backend_addrs.insert(*id, addr);
        }
        syncer
            .backend_ids
            .adopt(&maps.backends.iter().map(|(id, _)| *id).collect());
        for (index, value) in &maps.rev_nat {
            syncer.rev_nat.insert(
                (from_be_addr(value.address_be), u16::from_be(value.port_be)),
                RevNat {
                    index: *index,
                    refs: 0,
                },
            );
        }
        syncer
            .rev_nat_ids
            .adopt(&maps.rev_nat.iter().map(|(i, _)| *i).collect());
        let mut slots: BTreeMap<(FrontendKey, u16), BackendId> = BTreeMap::new();
        for (key, value) in &maps.services {
            let fe = FrontendKey {
                address: from_be_addr(key.address_be),
                port: u16::from_be(key.port_be),
                proto: key.proto,
                scope: key.scope,
            };
            if key.backend_slot == 0 {
                syncer.service_entries += 1 + value.count as usize;
                let mut f = Frontend::new(
                    value.rev_nat_index,
                    value.flags,
                    vec![0; value.count as usize],
                );
                f.timeout = value.backend_id;
                syncer.frontends.insert(fe, f);
            } else {
                slots.insert((fe, key.backend_slot), value.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            match syncer.frontends.get_mut(&fe) {
                Some(f) if (slot as usize) <= f.slots.len() => {
                    f.slots[slot as usize - 1] = id;
                    f.held.push(id);
                }
                _ => syncer.stray_slots.push(service_key(&fe, slot)),
            }
        }
        // Cluster IPs: adopted as they are; those no Service wants go in the
        // first apply.
        syncer.cluster_ips = maps.cluster_ips.iter().copied().collect();
        syncer.cluster_ips_dirty = maps.cluster_ips.iter().copied().collect();
        // Auxiliary entries belong to the frontend with their rev-NAT
        // index, protocol and scope.
        let mut owners: HashMap<(RevNatIndex, u8, u8), FrontendKey> = HashMap::default();
        for (key, f) in &syncer.frontends {
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
            match owners.get(&owner).and_then(|k| syncer.frontends.get_mut(k)) {
                Some(f) => f.aux.push(entry),
                None => syncer.stray_aux.push(entry),
            }
        }
        for f in syncer.frontends.values_mut() {
            f.aux.sort();
        }
        syncer.aux_counts = aux_counts(syncer.frontends.values().flat_map(|f| f.aux.iter()));
        // Reference counts from what the frontends use.
        let frontends: Vec<(FrontendKey, Frontend)> = syncer
            .frontends
            .iter()
            .map(|(k, f)| (*k, f.clone()))
            .collect();
        for (key, f) in &frontends {
            syncer.add_refs(key, f, 1);
            syncer.dirty.insert(*key);
        }
        syncer.unreferenced_backends = syncer
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(a, _)| *a)
            .collect();
        syncer.unreferenced_rev_nat = syncer
            .rev_nat
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        Ok(syncer)
    }
}
