//! Shared test support. Integration tests use it with `mod support;`.
//!
//! * [`openstack`]: drives the loopback OpenStack lab of `tests/lab/` (start
//!   it with `tests/lab/up.sh`) as an admin through its REST APIs.
//! * [`kube_api`]: an in-process fake Kubernetes API server (nodes, pods,
//!   PDBs, evictions, finalizers, events, watches).
//! * [`kubectl`]: the real `kubectl` (drain, delete, patch) against it.
//! * [`cluster`]: the cluster a daemon test runs against: the fake, or a real
//!   one named by `DRAINER_TEST_KUBECONFIG` (a Ready test Node, a kubelet player).
//! * [`proxy`]: a TCP proxy a test cuts, as a network partition cuts one client off.
//! * [`memory`]: simulated `/proc/meminfo` files of the lab's hosts, freed as their VMs leave.
#![allow(dead_code)]

pub mod cluster;
pub mod kube_api;
pub mod kubectl;
pub mod memory;
pub mod openstack;
pub mod proxy;
pub mod wait;
