//! Kubernetes in: where Services, EndpointSlices and the Node come from
//! (the API server's list/watch, or a directory of manifests), their lean
//! forms, and the object store that records what changed.
//!
//! Owns: talking to the API server (watches, backoff, outage reporting),
//! decoding objects into [`objects`], and [`tracker::ObjectStore`], which
//! marks the Services that really changed. Must not: compute Service
//! semantics (that is [`crate::model`]) or touch the kernel; sources only
//! record, the sync step reads.

pub mod kube;
pub mod manifests;
pub mod objects;
pub mod retry;
pub mod tracker;
