//! Where Services and EndpointSlices come from: a directory of manifests
//! (dev, demos) or the API server. Both only record objects; the sync step
//! reads their snapshots.

pub mod kube;
pub mod manifests;
pub mod retry;
