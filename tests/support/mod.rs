//! Shared test support. Integration tests use it with `mod support;`.
//!
//! * [`openstack`]: drives the loopback OpenStack lab of `tests/lab/` (start
//!   it with `tests/lab/up.sh`) as an admin through its REST APIs.
//! * [`kube_api`]: an in-process fake Kubernetes API server (nodes, pods,
//!   PDBs, evictions, events, watches) plus a `kubectl drain` emulation.
#![allow(dead_code)]

pub mod kube_api;
pub mod openstack;
pub mod wait;
