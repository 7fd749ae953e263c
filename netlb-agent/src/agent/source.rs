//! Where the agent's objects come from, as the loop sees it: the API
//! source records into the store on its own; a manifest directory is read
//! again whenever it changed.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, atomic::Ordering, mpsc::Sender},
};

use super::{RunError, SourceConfig, lock, step::SyncStepError};
use crate::{
    k8s::{
        kube::ApiSource,
        manifests,
        objects::{ServiceObject, SliceObject},
        tracker::{Kind, ObjectStore},
    },
    serve::metrics::Metrics,
};

pub(super) enum Source {
    Manifests {
        dir: PathBuf,
        fingerprint: Option<u64>,
    },
    Api(ApiSource),
}

impl Source {
    /// Starts watching the configured source (the API source's watches
    /// run on `runtime` and wake the loop through `notify`).
    pub(super) fn start(
        config: &SourceConfig,
        runtime: &tokio::runtime::Handle,
        store: &Arc<Mutex<ObjectStore>>,
        notify: Sender<()>,
    ) -> Result<Self, RunError> {
        Ok(match config {
            SourceConfig::Manifests(dir) => Self::Manifests {
                dir: dir.clone(),
                fingerprint: None,
            },
            SourceConfig::Api(cfg) => Self::Api(ApiSource::start(
                runtime,
                cfg.clone(),
                Arc::clone(store),
                notify,
            )?),
        })
    }

    /// Reads the manifest directory into the store when it changed (the
    /// API source records on its own); `true` when it did.
    pub(super) fn poll(
        &mut self,
        store: &Mutex<ObjectStore>,
        metrics: &Metrics,
    ) -> Result<bool, SyncStepError> {
        let Self::Manifests { dir, fingerprint } = self else {
            return Ok(false);
        };
        match manifests::fingerprint(dir) {
            Ok(fp) if Some(fp) != *fingerprint => {
                *fingerprint = Some(fp);
            }
            Ok(_) => return Ok(false),
            Err(e) => {
                log::warn!("cannot read {}: {e}", dir.display());
                return Ok(false);
            }
        }
        let snapshot = manifests::load_dir(dir).map_err(SyncStepError::Manifests)?;
        for error in &snapshot.errors {
            log::warn!("ignored manifest object: {error}");
            metrics.invalid_object("manifest");
        }
        for allocation in &snapshot.allocations {
            log::debug!("allocated {allocation}");
        }
        // The directory is the whole truth each time: a list.
        let mut store = lock(store);
        store.begin_list(Kind::Service);
        for svc in &snapshot.services {
            let obj = ServiceObject::from_service(svc, store.names());
            store.apply_service(obj);
        }
        store.end_list(Kind::Service);
        store.begin_list(Kind::EndpointSlice);
        for slice in &snapshot.endpoint_slices {
            let obj = SliceObject::from_slice(slice, store.names());
            store.apply_slice(obj);
        }
        store.end_list(Kind::EndpointSlice);
        Ok(true)
    }

    /// The API source's state for the health endpoints and metrics.
    pub(super) fn report(&self, metrics: &Metrics) {
        if let Self::Api(api) = self {
            metrics.set_watch_errors(api.stats.errors.load(Ordering::Relaxed));
            metrics.set_source_outage(api.health.outage_since());
            let failing = lock(&api.failing);
            metrics.set_source_failures(failing.values().cloned().collect());
        }
    }
}
