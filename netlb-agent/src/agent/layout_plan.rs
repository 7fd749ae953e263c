//! Which pinned generation of maps the agent uses, and the migration from
//! another one (see [`crate::datapath::layout`] and
//! [`crate::datapath::migrate`]).

use std::path::PathBuf;

use super::{RunError, RunOptions, interfaces::present_interfaces};
use crate::datapath::{
    layout::{self, MapSizes},
    loader::{self, Attacher},
    migrate,
};

/// Which pinned generation of maps this agent uses, and what becomes of
/// the others (see `layout` and `migrate`).
#[derive(Debug)]
pub(super) struct LayoutPlan {
    /// This build's generation for its sizes.
    pub(super) target: PathBuf,
    /// The live generation to carry over, when it is another one.
    pub(super) from: Option<layout::Generation>,
    /// Generations nothing uses (left by a crash or an earlier migration).
    pub(super) stale: Vec<layout::Generation>,
}

pub(super) fn plan_layout(
    pin_dir: &std::path::Path,
    sizes: &MapSizes,
) -> Result<LayoutPlan, RunError> {
    let generations = layout::pinned_generations(pin_dir);
    let target = layout::generation_dir(pin_dir, sizes);
    let live = layout::live_generation(pin_dir, &generations);
    let from = match live {
        Some(g) if g.dir != target => Some(g),
        Some(_) => None,
        // Nothing attached: the newest other generation's state, if this
        // build has none yet.
        None if !target.exists() => generations
            .iter()
            .filter(|g| g.dir != target)
            .max_by_key(|g| (g.version, g.dir.clone()))
            .cloned(),
        None => None,
    };
    if from.is_some() && target.exists() {
        // Half built by an agent that crashed before switching to it: the
        // live generation is still the other one. Start over.
        log::warn!(
            "removing {} (a migration into it was interrupted)",
            target.display()
        );
        std::fs::remove_dir_all(&target).map_err(|source| {
            RunError::Loader(loader::LoaderError::Remove {
                path: target.clone(),
                source,
            })
        })?;
    }
    let stale = generations
        .into_iter()
        .filter(|g| g.dir != target && Some(&g.dir) != from.as_ref().map(|f| &f.dir))
        .collect();
    Ok(LayoutPlan {
        target,
        from,
        stale,
    })
}

/// Switches the programs of a migration (see `migrate::Switch`).
struct Switcher<'a> {
    ebpf: &'a mut aya::Ebpf,
    attacher: &'a mut Attacher,
    opts: &'a RunOptions,
}

impl migrate::Switch for Switcher<'_> {
    type Error = loader::LoaderError;

    fn sockets(&mut self) -> Result<(), Self::Error> {
        match &self.opts.cgroup_root {
            Some(cgroup) => loader::attach_cgroup(self.ebpf, &self.opts.pin_dir, cgroup),
            // The old socket programs would keep the old (frozen) maps.
            None => loader::detach_cgroup(&self.opts.pin_dir),
        }
    }

    fn tc(&mut self) -> Result<(), Self::Error> {
        let present = present_interfaces(&self.opts.pod_ifaces, &self.opts.netdevs)
            .map_err(|source| loader::LoaderError::Interfaces { source })?;
        let n = self.attacher.switch_all(self.ebpf, &present)?;
        log::info!("switched {n} TC hooks to the new maps");
        Ok(())
    }
}

/// Carries the live generation `from` over into this agent's maps and
/// switches the programs to them; on failure the old datapath keeps
/// running and this agent's half-built maps go.
pub(super) fn migrate_from(
    from: &layout::Generation,
    target: &std::path::Path,
    ebpf: &mut aya::Ebpf,
    attacher: &mut Attacher,
    opts: &RunOptions,
) -> Result<(), RunError> {
    log::info!(
        "the pinned maps in {} are of layout {} or other sizes: carrying their state over into {}",
        from.dir.display(),
        from.version,
        target.display()
    );
    let mut switcher = Switcher {
        ebpf,
        attacher,
        opts,
    };
    match migrate::run(from, target, &mut switcher) {
        Ok(report) => {
            log::info!(
                "migrated in {:.0?}: copied {:?}; {} frontends frozen for {:.0?}, {} live entries copied again, {} added after the switch",
                report.took,
                report.copied,
                report.frozen,
                report.frozen_for,
                report.recopied,
                report.late
            );
            if let Err(e) = migrate::remove_generation(from) {
                log::warn!("cannot remove {}: {e}", from.dir.display());
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(target);
            Err(RunError::Migrate(Box::new(e)))
        }
    }
}
