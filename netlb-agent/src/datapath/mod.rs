//! The kernel side: what is programmed, and how.
//!
//! Owns: the [`sync::Syncer`] (desired frontends to the minimal diff of map
//! operations, make-before-break), the [`dataplane::Dataplane`] trait (the
//! only seam to the kernel, with its kernel and fake implementations),
//! loading and pinning the programs ([`loader`], [`layout`], [`migrate`]),
//! the node's interfaces and routes ([`ifaces`]) and the conntrack
//! collector ([`conntrack`]). Must not: read Kubernetes objects or decide
//! Service semantics (it takes [`crate::model::desired`] as given), or
//! serve anything.

pub mod conntrack;
pub mod dataplane;
pub mod ifaces;
pub mod layout;
pub mod loader;
pub mod migrate;
pub mod sync;
