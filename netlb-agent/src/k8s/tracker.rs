//! The agent's object store and change tracking, in the shape of
//! kube-proxy's `ServiceChangeTracker` and `EndpointsChangeTracker`: sources
//! record objects (in their lean form) as events arrive, comparing each with
//! the one it replaces; only a real change marks its Service dirty. The sync
//! step takes the dirty Services with their objects and recomputes those
//! alone, so the cost of a change depends on the size of the changed Service,
//! not on the cluster.
//!
//! The store is the only copy of the objects (no reflector beside it). A
//! relist after `410 Gone` or a reconnect is applied object by object into
//! the same maps (mark and sweep), so it never holds two copies of the
//! cluster.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::SystemTime,
};

use crate::k8s::objects::{Interner, Name, NodeObject, ServiceObject, SliceObject};

/// A namespaced object's (namespace, name).
pub type ObjectKey = (Name, Name);

/// The kinds the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Service => "Service",
            Self::EndpointSlice => "EndpointSlice",
            Self::Node => "Node",
        }
    }
}

/// A dirty Service with what its model needs: its object (`None` when it
/// is gone) and its slices.
#[derive(Clone, Debug)]
pub struct ServiceChange {
    pub key: ObjectKey,
    pub service: Option<Arc<ServiceObject>>,
    pub slices: Vec<Arc<SliceObject>>,
}

/// What changed since the last [`ObjectStore::take_changes`].
#[derive(Debug, Default)]
pub struct Changes {
    pub services: Vec<ServiceChange>,
    /// The Node, when it changed in what the model uses.
    pub node: Option<NodeObject>,
    /// Trigger times of the EndpointSlices that changed (programming
    /// latency).
    pub triggers: Vec<SystemTime>,
}

/// An object that could not be decoded, for reporting.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Undecodable {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub message: String,
}

#[derive(Debug, Default)]
pub struct ObjectStore {
    names: Interner,
    services: HashMap<ObjectKey, Arc<ServiceObject>>,
    slices: HashMap<ObjectKey, Arc<SliceObject>>,
    /// (namespace, service name) -> the names of its slices.
    /// (A sorted vector: most Services have one slice.)
    slices_of: HashMap<ObjectKey, Vec<Name>>,
    node: Option<NodeObject>,
    node_changed: bool,
    dirty: HashSet<ObjectKey>,
    triggers: Vec<SystemTime>,
    /// Keys seen since a relist of that kind began (mark and sweep).
    relisting: HashMap<Kind, HashSet<ObjectKey>>,
    /// Kinds whose first complete list arrived.
    listed: HashSet<Kind>,
    /// Objects whose last version could not be decoded, by (kind, key).
    undecodable: BTreeMap<(Kind, ObjectKey), Undecodable>,
    /// Bumped on every change, for callers that poll.
    pub version: u64,
}

impl ObjectStore {
    pub fn names(&mut self) -> &mut Interner {
        &mut self.names
    }

    fn key(&mut self, namespace: &str, name: &str) -> ObjectKey {
        (self.names.intern(namespace), self.names.intern(name))
    }

    fn seen(&mut self, kind: Kind, key: &ObjectKey) {
        if let Some(seen) = self.relisting.get_mut(&kind) {
            seen.insert(key.clone());
        }
    }

    /// Records a Service (added or modified).
    pub fn apply_service(&mut self, svc: ServiceObject) {
        let key = (svc.namespace.clone(), svc.name.clone());
        self.seen(Kind::Service, &key);
        self.undecodable.remove(&(Kind::Service, key.clone()));
        if self.services.get(&key).is_some_and(|old| **old == svc) {
            return;
        }
        self.services.insert(key.clone(), Arc::new(svc));
        self.mark(key);
    }

    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.undecodable.remove(&(Kind::Service, key.clone()));
        if self.services.remove(&key).is_some() {
            self.mark(key);
        }
    }

    /// Records an EndpointSlice (added or modified): its Service is dirty,
    /// and so is the one it belonged to before when its label changed.
    pub fn apply_slice(&mut self, slice: SliceObject) {
        let key = (slice.namespace.clone(), slice.name.clone());
        self.seen(Kind::EndpointSlice, &key);
        self.undecodable.remove(&(Kind::EndpointSlice, key.clone()));
        let old = self.slices.get(&key).cloned();
        if old.as_deref() == Some(&slice) {
            return;
        }
        if let Some(old) = &old {
            self.unlink_slice(old);
        }
        if let Some(t) = slice.trigger_time
            && old
                .as_ref()
                .is_none_or(|o| o.trigger_time != slice.trigger_time)
        {
            self.triggers.push(t);
        }
        if let Some(service) = &slice.service {
            let owner = (slice.namespace.clone(), service.clone());
            let names = self.slices_of.entry(owner.clone()).or_default();
            if let Err(i) = names.binary_search(&slice.name) {
                names.insert(i, slice.name.clone());
            }
            self.mark(owner);
        }
        self.slices.insert(key, Arc::new(slice));
    }

    pub fn delete_slice(&mut self, namespace: &str, name: &str) {
        let key = self.key(namespace, name);
        self.undecodable.remove(&(Kind::EndpointSlice, key.clone()));
        if let Some(old) = self.slices.remove(&key) {
            self.unlink_slice(&old);
        }
    }

    fn unlink_slice(&mut self, old: &SliceObject) {
        if let Some(service) = &old.service {
            let owner = (old.namespace.clone(), service.clone());
            if let Some(set) = self.slices_of.get_mut(&owner) {
                if let Ok(i) = set.binary_search(&old.name) {
                    set.remove(i);
                }
                if set.is_empty() {
                    self.slices_of.remove(&owner);
                }
            }
            self.mark(owner);
        }
    }

    /// Records this node's Node; a change of nothing the model uses marks
    /// nothing.
    pub fn apply_node(&mut self, node: NodeObject) {
        // Seen by a (re)list: the sweep at its end must keep it.
        let key = self.key("", "node");
        self.seen(Kind::Node, &key);
        if self.node.as_ref() != Some(&node) {
            self.node = Some(node);
            self.node_changed = true;
            self.version += 1;
        }
    }

    /// An object whose JSON could not be decoded: the previous version (if
    /// any) stays as it was, and the failure is reported.
    pub fn undecodable(&mut self, kind: Kind, namespace: &str, name: &str, message: String) {
        let key = self.key(namespace, name);
        self.seen(kind, &key);
        self.undecodable.insert(
            (kind, key),
            Undecodable {
                kind,
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                message,
            },
        );
        self.version += 1;
    }

    pub fn undecodable_objects(&self) -> Vec<Undecodable> {
        self.undecodable.values().cloned().collect()
    }

    fn mark(&mut self, key: ObjectKey) {
        self.dirty.insert(key);
        self.version += 1;
    }

    /// A (re)list of `kind` begins: objects not seen again before
    /// [`end_list`](Self::end_list) are deleted then.
    pub fn begin_list(&mut self, kind: Kind) {
        self.relisting.insert(kind, HashSet::new());
    }

    /// A (re)list of `kind` is complete: objects it did not contain are
    /// gone. The first complete list of a kind marks it listed.
    pub fn end_list(&mut self, kind: Kind) {
        let Some(seen) = self.relisting.remove(&kind) else {
            return;
        };
        match kind {
            Kind::Service => {
                let gone: Vec<ObjectKey> = self
                    .services
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for (ns, name) in gone {
                    self.delete_service(&ns, &name);
                }
            }
            Kind::EndpointSlice => {
                let gone: Vec<ObjectKey> = self
                    .slices
                    .keys()
                    .filter(|k| !seen.contains(*k))
                    .cloned()
                    .collect();
                for (ns, name) in gone {
                    self.delete_slice(&ns, &name);
                }
            }
            Kind::Node => {
                if seen.is_empty() && self.node.take().is_some() {
                    self.node_changed = true;
                }
            }
        }
        self.undecodable
            .retain(|(k, key), _| *k != kind || seen.contains(key));
        self.listed.insert(kind);
        self.version += 1;
    }

    /// Whether Services and EndpointSlices have both been listed once:
    /// nothing may be programmed before (kube-proxy's rule).
    pub fn synced(&self) -> bool {
        self.listed.contains(&Kind::Service) && self.listed.contains(&Kind::EndpointSlice)
    }

    /// Marks every Service dirty (a change of something every Service's
    /// model depends on: the node's zone or addresses).
    pub fn mark_all(&mut self) {
        let keys: Vec<ObjectKey> = self
            .services
            .keys()
            .chain(self.slices_of.keys())
            .cloned()
            .collect();
        for key in keys {
            self.mark(key);
        }
    }

    /// `taken` (changes already taken this step) widened to every Service,
    /// for a change of something every Service's model depends on (the
    /// node's zone): the Services of `taken` stay in it, a deleted one
    /// (which `mark_all` no longer knows) included, with every other one
    /// added. No change is lost however events combine in one step.
    pub fn widen_to_all(&mut self, mut taken: Changes) -> Changes {
        self.mark_services(taken.services.drain(..).map(|c| c.key));
        self.mark_all();
        let all = self.take_changes();
        taken.services = all.services;
        taken.triggers.extend(all.triggers);
        taken.node = taken.node.or(all.node);
        taken
    }

    /// Marks the given Services dirty (verification resync, retries).
    pub fn mark_services(&mut self, keys: impl IntoIterator<Item = ObjectKey>) {
        for key in keys {
            self.mark(key);
        }
    }

    /// Every Service key, in order (the verification resync walks it in
    /// chunks).
    pub fn service_keys(&self) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self.services.keys().cloned().collect();
        keys.sort();
        keys
    }

    pub fn node(&self) -> Option<&NodeObject> {
        self.node.as_ref()
    }

    pub fn counts(&self) -> (usize, usize) {
        (self.services.len(), self.slices.len())
    }

    /// The dirty Services with their objects, the Node if it changed, and
    /// the trigger times since the last call.
    pub fn take_changes(&mut self) -> Changes {
        let dirty = std::mem::take(&mut self.dirty);
        let mut services: Vec<ServiceChange> = dirty
            .into_iter()
            .map(|key| {
                let slices = self
                    .slices_of
                    .get(&key)
                    .into_iter()
                    .flatten()
                    .filter_map(|name| self.slices.get(&(key.0.clone(), name.clone())).cloned())
                    .collect();
                ServiceChange {
                    service: self.services.get(&key).cloned(),
                    slices,
                    key,
                }
            })
            .collect();
        services.sort_by(|a, b| a.key.cmp(&b.key));
        let node = if std::mem::take(&mut self.node_changed) {
            Some(self.node.clone().unwrap_or_default())
        } else {
            None
        };
        Changes {
            services,
            node,
            triggers: std::mem::take(&mut self.triggers),
        }
    }

    /// Every object, for a from-scratch rebuild (tests).
    pub fn all(&self) -> (Vec<Arc<ServiceObject>>, Vec<Arc<SliceObject>>) {
        (
            self.services.values().cloned().collect(),
            self.slices.values().cloned().collect(),
        )
    }

    /// Forgets names nothing refers to any more.
    pub fn shrink(&mut self) {
        self.names.shrink();
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::k8s::objects::fixtures;

    fn svc(store: &mut ObjectStore, name: &str, port: u16) -> ServiceObject {
        let vip = Ipv4Addr::new(10, 96, 0, 1);
        fixtures::cluster_ip_service(store.names(), "default", name, vip, "", port)
    }

    fn slice(store: &mut ObjectStore, name: &str, service: &str, ips: &[u8]) -> SliceObject {
        let addresses = ips.iter().map(|i| Ipv4Addr::new(10, 244, 0, *i));
        fixtures::ready_slice(
            store.names(),
            "default",
            name,
            service,
            ("", 9376),
            addresses,
        )
    }

    fn dirty(store: &mut ObjectStore) -> Vec<String> {
        store
            .take_changes()
            .services
            .into_iter()
            .map(|c| {
                format!(
                    "{}{}",
                    c.key.1,
                    if c.service.is_some() { "" } else { " (gone)" }
                )
            })
            .collect()
    }

    /// A Service deleted in the same step as a zone change of the Node: the
    /// step recomputes every Service, the deleted one included (it would
    /// otherwise stay programmed, and keep its cluster IP from a new
    /// Service).
    #[test]
    fn a_deletion_in_the_same_step_as_a_zone_change_is_not_lost() {
        let mut store = ObjectStore::default();
        for name in ["a", "b"] {
            let s = svc(&mut store, name, 80);
            store.apply_service(s);
        }
        store.take_changes();
        store.delete_service("default", "a");
        let zone = store.names().intern("zone-b");
        store.apply_node(NodeObject {
            zone: Some(zone),
            deleting: false,
        });
        let taken = store.take_changes();
        assert!(taken.node.is_some());
        let widened = store.widen_to_all(taken);
        let keys: Vec<(String, bool)> = widened
            .services
            .iter()
            .map(|c| (c.key.1.to_string(), c.service.is_some()))
            .collect();
        assert_eq!(keys, [("a".into(), false), ("b".into(), true)]);
        assert!(widened.node.is_some());
        assert!(store.take_changes().services.is_empty());
    }

    #[test]
    fn only_real_changes_mark_their_service() {
        let mut s = ObjectStore::default();
        let a = svc(&mut s, "a", 80);
        let b = svc(&mut s, "b", 80);
        s.apply_service(a.clone());
        s.apply_service(b);
        let sa = slice(&mut s, "a-1", "a", &[1, 2]);
        s.apply_slice(sa.clone());
        assert_eq!(dirty(&mut s), ["a", "b"]);
        // The same objects again (a resync, a relist): nothing.
        s.apply_service(a.clone());
        s.apply_slice(sa.clone());
        assert!(dirty(&mut s).is_empty());
        // A port change marks a only; an endpoint change marks a only.
        let a2 = svc(&mut s, "a", 8080);
        s.apply_service(a2);
        assert_eq!(dirty(&mut s), ["a"]);
        let sa2 = slice(&mut s, "a-1", "a", &[1, 2, 3]);
        s.apply_slice(sa2);
        let changes = s.take_changes();
        assert_eq!(changes.services.len(), 1);
        assert_eq!(changes.services[0].slices[0].endpoints.len(), 3);
    }

    #[test]
    fn a_slice_moving_between_services_marks_both() {
        let mut s = ObjectStore::default();
        for name in ["a", "b"] {
            let o = svc(&mut s, name, 80);
            s.apply_service(o);
        }
        let sl = slice(&mut s, "x-1", "a", &[1]);
        s.apply_slice(sl);
        dirty(&mut s);
        let moved = slice(&mut s, "x-1", "b", &[1]);
        s.apply_slice(moved);
        assert_eq!(dirty(&mut s), ["a", "b"]);
        s.delete_slice("default", "x-1");
        let changes = s.take_changes();
        assert_eq!(changes.services.len(), 1);
        assert!(changes.services[0].slices.is_empty());
    }

    #[test]
    fn a_relist_deletes_what_it_did_not_contain_without_a_second_copy() {
        let mut s = ObjectStore::default();
        s.begin_list(Kind::Service);
        for name in ["a", "b", "c"] {
            let o = svc(&mut s, name, 80);
            s.apply_service(o);
        }
        s.end_list(Kind::Service);
        assert!(!s.synced());
        s.begin_list(Kind::EndpointSlice);
        s.end_list(Kind::EndpointSlice);
        assert!(s.synced());
        dirty(&mut s);
        // A relist that no longer has b, and a changed c.
        s.begin_list(Kind::Service);
        let a = svc(&mut s, "a", 80);
        s.apply_service(a);
        let c = svc(&mut s, "c", 81);
        s.apply_service(c);
        assert_eq!(s.counts().0, 3, "objects are updated in place");
        s.end_list(Kind::Service);
        assert_eq!(dirty(&mut s), ["b (gone)", "c"]);
        assert_eq!(s.counts().0, 2);
    }

    #[test]
    fn a_listed_node_survives_the_end_of_its_list() {
        let mut s = ObjectStore::default();
        let zone = Some(s.names().intern("zone-a"));
        s.begin_list(Kind::Node);
        s.apply_node(NodeObject {
            zone: zone.clone(),
            deleting: false,
        });
        s.end_list(Kind::Node);
        assert_eq!(s.node().and_then(|n| n.zone.clone()), zone);
        assert_eq!(s.take_changes().node.and_then(|n| n.zone), zone);
        // A relist without it: gone.
        s.begin_list(Kind::Node);
        s.end_list(Kind::Node);
        assert!(s.node().is_none());
    }

    #[test]
    fn a_node_change_of_nothing_used_marks_nothing() {
        let mut s = ObjectStore::default();
        let zone = Some(s.names().intern("zone-a"));
        s.apply_node(NodeObject {
            zone: zone.clone(),
            deleting: false,
        });
        assert!(s.take_changes().node.is_some());
        s.apply_node(NodeObject {
            zone,
            deleting: false,
        });
        assert!(s.take_changes().node.is_none());
    }
}
