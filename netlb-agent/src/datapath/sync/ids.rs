//! Backend ids and rev-NAT indices: stable, and handed out again only
//! after a conntrack sweep found no connection naming them.

use std::collections::BTreeSet;

/// Lowest-first id allocator over `1..=max`. A released id is quarantined,
/// not freed: tracked connections may still name it (a backend id, a rev-NAT
/// index), so it is handed out again only after a conntrack sweep that
/// started after its release found no connection using it
/// ([`Syncer::reclaim`]).
#[derive(Clone, Debug)]
pub(super) struct Ids {
    max: u32,
    next: u32,
    free: BTreeSet<u32>,
    /// Released ids and the sync generation that released them.
    pub(super) quarantine: Vec<(u32, u64)>,
}

impl Ids {
    pub(super) fn new(max: u32) -> Self {
        Self {
            max,
            next: 1,
            free: BTreeSet::new(),
            quarantine: Vec::new(),
        }
    }

    pub(super) fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next <= self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// An id that never reached the maps (its write failed): free at once.
    pub(super) fn unuse(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// An id removed from the maps in sync generation `generation`.
    pub(super) fn release(&mut self, id: u32, generation: u64) {
        self.quarantine.push((id, generation));
    }

    /// Frees quarantined ids released at or before `generation` that
    /// `in_use` does not contain.
    pub(super) fn reclaim(&mut self, in_use: &BTreeSet<u32>, generation: u64) -> usize {
        let before = self.free.len();
        let free = &mut self.free;
        self.quarantine.retain(|(id, released)| {
            if *released <= generation && !in_use.contains(id) {
                free.insert(*id);
                false
            } else {
                true
            }
        });
        self.free.len() - before
    }

    /// Marks ids already in use (adoption). The gaps below them may still
    /// be named by connections of the earlier agent: quarantined.
    pub(super) fn adopt(&mut self, used: &BTreeSet<u32>) {
        let top = used.iter().next_back().copied().unwrap_or(0);
        self.next = top + 1;
        self.free.clear();
        self.quarantine = (1..=top)
            .filter(|id| !used.contains(id))
            .map(|id| (id, 0))
            .collect();
    }
}
