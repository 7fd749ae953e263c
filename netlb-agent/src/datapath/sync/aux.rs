//! Auxiliary entries of a frontend (source ranges, affinity matches):
//! what a frontend needs, and what it gets when their maps are full.

use super::*;

/// The auxiliary entries of a frontend (sorted): its source ranges and,
/// with session affinity, a match for every backend in its slots.
pub(super) fn aux_entries(
    key: &FrontendKey,
    rev_nat: RevNatIndex,
    flags: u16,
    ranges: &[(Ipv4Addr, u8)],
    slots: &[BackendId],
) -> Vec<Aux> {
    let mut out: Vec<Aux> = ranges
        .iter()
        .map(|(network, len)| {
            Aux::SourceRange((
                SourceRangeKey::FRONTEND_BITS + u32::from(*len),
                SourceRangeKey {
                    // Big-endian, as the datapath looks it up (the trie
                    // compares bytes).
                    rev_nat_index_be: rev_nat.to_be(),
                    proto: key.proto,
                    scope: key.scope,
                    pad: [0; 2],
                    address_be: be_addr(*network),
                },
            ))
        })
        .collect();
    if flags & svc_flags::AFFINITY != 0 {
        let frontend = AffinityFrontend {
            rev_nat_index: rev_nat,
            proto: key.proto,
            scope: key.scope,
            pad: [0; 2],
        };
        out.extend(slots.iter().filter(|id| **id != 0).map(|id| {
            Aux::AffinityMatch(AffinityMatchKey {
                backend_id: *id,
                frontend,
            })
        }));
    }
    out.sort();
    out.dedup();
    out
}

/// The kinds of auxiliary entries, as indices: their maps fill
/// independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxKind {
    SourceRange = 0,
    AffinityMatch = 1,
}

impl AuxKind {
    pub const ALL: [AuxKind; 2] = [AuxKind::SourceRange, AuxKind::AffinityMatch];

    pub(super) fn of(aux: &Aux) -> Self {
        match aux {
            Aux::SourceRange(_) => Self::SourceRange,
            Aux::AffinityMatch(_) => Self::AffinityMatch,
        }
    }

    /// The map it lives in.
    pub fn map(self) -> &'static str {
        match self {
            Self::SourceRange => netlb_common::map_names::SOURCE_RANGES,
            Self::AffinityMatch => netlb_common::map_names::AFFINITY_MATCH,
        }
    }
}

/// Entries of each kind in `aux`.
pub(super) fn aux_counts<'a>(aux: impl IntoIterator<Item = &'a Aux>) -> [usize; 2] {
    let mut counts = [0; 2];
    for a in aux {
        counts[AuxKind::of(a) as usize] += 1;
    }
    counts
}

impl Syncer {
    /// The header flags, affinity timeout and auxiliary entries frontend
    /// `key` gets with `slots`: what `want` says, unless its new entries of
    /// a kind do not fit the room left (`room`, decreased by what is
    /// planned). Then the frontend keeps its endpoints right and goes
    /// without the feature: with no room for its affinity matches it is
    /// programmed without session affinity (new connections are balanced,
    /// none goes to a backend it no longer has); with no room for its
    /// source ranges it keeps the ranges it has (its previous consistent
    /// state: none, for a new frontend). Such a frontend is counted and
    /// retried by every apply until its entries fit.
    pub(super) fn fit_aux(
        &mut self,
        key: &FrontendKey,
        rev_nat: RevNatIndex,
        want: &DesiredFrontend,
        slots: &[BackendId],
        known: Option<&Frontend>,
        room: &mut [usize; 2],
    ) -> (u16, u32, Vec<Aux>) {
        let mut flags = want.flags;
        let mut timeout = want.affinity_timeout;
        let mut aux = aux_entries(key, rev_nat, flags, &want.source_ranges, slots);
        let adds = |aux: &[Aux]| {
            aux_counts(
                aux.iter()
                    .filter(|a| known.is_none_or(|f| f.aux.binary_search(a).is_err())),
            )
        };
        let mut degraded = [false; 2];
        let wanted = adds(&aux);
        if wanted[AuxKind::SourceRange as usize] > room[AuxKind::SourceRange as usize] {
            degraded[AuxKind::SourceRange as usize] = true;
            let had = known.map_or(0, |f| f.flags & svc_flags::SOURCE_RANGES);
            flags = (flags & !svc_flags::SOURCE_RANGES) | had;
            aux.retain(|a| AuxKind::of(a) != AuxKind::SourceRange);
            aux.extend(
                known
                    .into_iter()
                    .flat_map(|f| f.aux.iter())
                    .filter(|a| AuxKind::of(a) == AuxKind::SourceRange)
                    .copied(),
            );
        }
        if wanted[AuxKind::AffinityMatch as usize] > room[AuxKind::AffinityMatch as usize] {
            degraded[AuxKind::AffinityMatch as usize] = true;
            flags &= !svc_flags::AFFINITY;
            timeout = 0;
            aux.retain(|a| AuxKind::of(a) != AuxKind::AffinityMatch);
        }
        aux.sort();
        aux.dedup();
        for (r, n) in room.iter_mut().zip(adds(&aux)) {
            *r = r.saturating_sub(n);
        }
        self.note_degraded(key, degraded);
        (flags, timeout, aux)
    }

    /// Records which features frontend `key` goes without (none: it is
    /// whole again), warning once when it starts to.
    fn note_degraded(&mut self, key: &FrontendKey, degraded: [bool; 2]) {
        if degraded.iter().any(|d| *d) {
            let before = self.degraded.insert(*key, degraded).unwrap_or_default();
            for kind in AuxKind::ALL {
                let k = kind as usize;
                if degraded[k] && !before[k] {
                    self.degraded_total[k] += 1;
                    log::warn!(
                        "{} is full: frontend {}:{} is programmed without {}; raise --max-{} (retried until it fits)",
                        kind.map(),
                        key.address,
                        key.port,
                        match kind {
                            AuxKind::SourceRange => "its new loadBalancerSourceRanges",
                            AuxKind::AffinityMatch => "session affinity",
                        },
                        match kind {
                            AuxKind::SourceRange => "source-ranges",
                            AuxKind::AffinityMatch => "affinity-matches",
                        }
                    );
                }
            }
        } else {
            self.degraded.remove(key);
        }
    }
}
