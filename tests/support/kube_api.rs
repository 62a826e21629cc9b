//! In-process fake Kubernetes API server for tests, following the real
//! kube-apiserver wire protocol (JSON; protobuf only for what kubectl sends
//! so: DeleteOptions, and the ConfigMaps of `kubectl create configmap`) as
//! closely as our code and the real `kubectl` need, and never
//! more leniently than the real one where we model a behaviour.
//!
//! ```ignore
//! mod support;
//! use support::{kube_api::KubeApi, kubectl::Kubectl};
//!
//! #[tokio::test]
//! async fn t() {
//!     let api = KubeApi::start();            // spawns on the current runtime
//!     api.add_node("n1");
//!     let client = api.kube_client();        // kube::Client, plain HTTP, no auth
//!     let took = Kubectl::new(&api).drain("n1", &[], Duration::from_secs(30)).await;
//! }
//! ```
//!
//! # Control API (synchronous)
//! * [`KubeApi::start`], [`KubeApi::url`], [`KubeApi::kube_client`],
//!   [`KubeApi::write_kubeconfig`], [`KubeApi::write_kubeconfig_with_token`],
//!   [`KubeApi::service_account_token`].
//! * Objects: [`KubeApi::add_node`], [`KubeApi::add_namespace`],
//!   [`KubeApi::add_daemonset`], [`KubeApi::set_unschedulable`] (a strategic
//!   merge PATCH through the same code path as HTTP, so watchers see it),
//!   [`KubeApi::json_patch_pod`] (likewise, a JSON patch), [`KubeApi::node`],
//!   [`KubeApi::pod`], [`KubeApi::pdbs`],
//!   [`KubeApi::set_pod_phase`] (a kubelet status update), [`KubeApi::events`]
//!   (every Event clients created or patched, both APIs, in order, as stored),
//!   [`KubeApi::add_crd`] (a CustomResourceDefinition, served at once),
//!   [`KubeApi::objects`] (every stored object of a built-in or custom resource),
//!   [`KubeApi::leases`] (the Leases of a namespace), [`KubeApi::config_maps`]
//!   (the ConfigMaps of a namespace).
//! * Simulated components: [`KubeApi::set_kubelet`] (default on: a pod bound
//!   to an existing node becomes Running+Ready ~100 ms after creation; a
//!   terminating pod is stopped after its grace period capped at 1 s, then
//!   removed, or, with finalizers, marked Failed with grace 0 and left to
//!   them), [`KubeApi::set_disruption_controller`] (default on: PDB status is
//!   recomputed every 50 ms, asynchronously, like kube-controller-manager,
//!   failing safe (`SyncFailed`) where the real one does, with its events).
//! * Watch control: [`KubeApi::drop_watches`] (abort every open watch
//!   connection), [`KubeApi::compact`] (every resourceVersion handed out so far
//!   becomes "too old" for watch: 410 in-stream), [`KubeApi::set_bookmark_interval`],
//!   [`KubeApi::watch_events_sent`], [`KubeApi::bookmarks_sent`],
//!   [`KubeApi::open_watches`].
//! * [`KubeApi::set_unreachable`]: the server looks crashed or cut off (every
//!   connection, open or new, is reset without an answer) until turned off.
//! * [`KubeApi::requests`]: `(method, path?query)` of every HTTP request
//!   (`KUBE_API_DEBUG=1` prints them, with request bodies).
//!
//! Deviations from the real server (all documented where they are made):
//! no managedFields; server-side apply is a JSON merge patch; strategic merge
//! patch is a JSON merge patch except for `metadata.finalizers` (merged, with
//! `$deleteFromPrimitiveList`); no workload controllers (ReplicaSet,
//! StatefulSet, ...) are stored, so a PDB with `maxUnavailable` or a percentage
//! over pods they own fails safe with "found no controllers", as the real
//! controller does when they are missing; controller events are written once
//! per PDB and reason (no count/series); no admission beyond namespace
//! existence and lifecycle (no new content in a terminating namespace) and
//! default tolerations; no garbage collector (ownerReferences never delete
//! anything); authentication only for ServiceAccount tokens of
//! [`KubeApi::service_account_token`] (refused once their ServiceAccount is
//! gone, as kube-apiserver's validator does), and no authorization (RBAC
//! objects are stored, not enforced: a real cluster with
//! `DRAINER_TEST_KUBECONFIG` checks deploy/'s rules); responses are JSON only.
//!
//! A namespace's DELETE leaves it `Terminating`; a namespace controller (every
//! 50 ms) deletes its content and removes it once empty, so a finalizer on a
//! pod in it keeps it, as on a real cluster. Like the real one it starts 5 s
//! (namespaceDeletionGracePeriod) after the DELETE:
//! [`KubeApi::set_namespace_deletion_grace`] changes that.
//!
//! # Leases
//! `coordination.k8s.io/v1` Leases (namespaced, no status subresource, no
//! generation) follow kube-apiserver's leaseStrategy: an update must carry
//! a resourceVersion (AllowUnconditionalUpdate is false: a 422 without one,
//! a 409 when stale); a PUT to a missing Lease creates it (AllowCreateOnUpdate,
//! 201), whatever resourceVersion it names; a POST naming a resourceVersion is
//! the storage's 500; `spec.strategy` and `spec.preferredHolder` are dropped
//! (CoordinatedLeaderElection off, its default); ValidateLeaseSpec's
//! `leaseDurationSeconds > 0` and `leaseTransitions >= 0` (422).
//! `acquireTime`/`renewTime` decode as Go's `time.Parse(RFC3339Micro)` (exactly
//! six fractional digits, else a 400 with Go's message) and are stored in UTC
//! to the microsecond. Every PUT (all kinds) must name the object of its URL
//! and a uid in its body is a precondition (409), as real.
//!
//! # ConfigMaps
//! core/v1 ConfigMaps (namespaced, shortName `cm`, no status, no generation;
//! unconditional updates allowed, a stale resourceVersion is a 409) are
//! decoded as Go does (a non-string value in `data` is the real 400 `cannot
//! unmarshal ... into Go struct field ConfigMap.data of type string`; a null
//! one is `""`) and validated as ValidateConfigMap/ValidateConfigMapUpdate
//! (422): IsConfigMapKey for every key of `data` and `binaryData`, no key in
//! both (`data[k]`: `duplicate of key present in binaryData`), at most 1 MiB
//! of values (`[]: Too long: may not be more than 1048576 bytes`, the 1.32+
//! wording), and with `immutable: true` no change to `data`, `binaryData` or
//! `immutable` (``field is immutable when `immutable` is set``). Empty maps
//! are not stored (protobuf), so they are never served. Discovery lists the
//! verbs served here (no `deletecollection`, unlike the real one, as for
//! every built-in kind of this server).
//!
//! # Custom resources
//! `apiextensions.k8s.io/v1` CustomResourceDefinitions are stored (typed by
//! k8s-openapi) and validated for the essentials (name `<plural>.<group>`, a
//! group with a dot, names.kind/plural, scope, exactly one storage version, a
//! structural schema per version: a type on every node but int-or-string and
//! preserve-unknown-fields ones, printer columns' name/type/jsonPath). A
//! create fills in what the real naming and establishing controllers write
//! at once (`NamesAccepted` and `Established` True, `acceptedNames` =
//! spec.names, `storedVersions`), so the resource is served as soon as the
//! CREATE returns (a real one is Established a few ms later). A DELETE marks
//! the CRD Terminating with the `customresourcecleanup.apiextensions.k8s.io`
//! finalizer; a CRD finalizer controller (every 50 ms) deletes its instances
//! (their finalizers hold them, and it) and then the CRD, ending the open
//! watches on its resource; creates meanwhile are refused (405); its scope
//! is immutable. Until a CRD exists its resource is a 404 and absent
//! from discovery.
//!
//! A CRD serves its storage version only, at `/apis/{group}/{version}/{plural}`
//! (under `/namespaces/{ns}/` when Namespaced), with discovery (shortNames,
//! categories), list/get/watch with the same resourceVersion semantics as
//! the built-in kinds (list items keep apiVersion/kind, as unstructured lists do), create/update/merge and JSON patch/server-side apply
//! (a merge patch, as for built-ins) and delete (finalizers, deletionTimestamp).
//! As the real customResourceStrategy: `metadata.generation` starts at 1 and
//! is bumped by any change outside metadata (status too when there is no
//! status subresource); with a status subresource, writes to the resource
//! keep the stored status, writes to `/status` keep everything but `status`
//! (labels and annotations too: the real statusStrategy copies the old
//! object); an update without a resourceVersion is a 422
//! (AllowUnconditionalUpdate is false), a stale one a 409. Strategic merge
//! patch is a 415. Field selectors: `metadata.name` and (namespaced)
//! `metadata.namespace` only. Metadata is decoded as an ObjectMeta (a 400
//! otherwise); ownerReferences are stored (no garbage collector).
//!
//! Objects are pruned and validated against the version's `openAPIV3Schema`
//! with kube-openapi's messages: type (object, array, string, integer (1.0
//! counts), number, boolean), `required`, `enum`, `nullable` (a null in a
//! non-nullable field is dropped), `x-kubernetes-preserve-unknown-fields`,
//! `x-kubernetes-int-or-string`, `additionalProperties`, `default` (applied on
//! write only), `minimum`/`maximum` (and exclusive), `format: date-time`
//! (strfmt's IsDateTime: RFC 3339) and `date`. Unknown fields are
//! dropped with a `Warning: unknown field "spec.x"` header (fieldValidation
//! Warn, the default), silently (`Ignore`), or refused with the real 400
//! `strict decoding error` (`Strict`); a server-side apply patch with unknown
//! fields is always a 400 (`field not declared in schema`: apply is typed
//! against the schema). Not checked (more lenient than real):
//! other formats (uuid, ipv4, ...), pattern, min/maxLength, min/maxItems,
//! uniqueItems, min/maxProperties, multipleOf, allOf/anyOf/oneOf/not,
//! list-type/map-keys, CEL `x-kubernetes-validations` other than the
//! transition rule `self == oldSelf` (evaluated on update; a CRD with any
//! other rule is refused, stricter), the embedded
//! ObjectMeta schema, and (in the CRD) that defaults match their schema; validation ratcheting (real: unchanged invalid fields
//! pass on update) is not modelled (stricter). Finalizers of CRDs and custom
//! resources need only be qualified names (apimachinery's rule; the real one
//! warns about those without a `/`, not modelled). Conversion webhooks, scale subresources,
//! deletecollection (405) and multi-version serving are not modelled: other
//! served versions are a 404 (stricter), and changing the storage version
//! hides the objects stored under the previous one (real: every served
//! version shows them).
//!
//! `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (kubectl get) on a
//! custom resource answers a meta.k8s.io/v1 Table: a Name column, then the
//! version's additionalPrinterColumns (or Age when it declares none, as the
//! real server), from simple JSONPaths (`.a.b`, `.a[0].b`; filters give an
//! empty cell), typed as real (`date` as a human duration); rows carry
//! PartialObjectMetadata (or `includeObject=Object|None`); a watch (kubectl
//! get -w) sends each event's object as a one-row Table, with the column
//! definitions in the first only. Built-in kinds answer plain JSON, which
//! kubectl prints with its own columns. The
//! fake serves no OpenAPI document: kubectl needs `--validate=false`.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::State as AxState;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event as CoreEvent, Namespace, Node, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event as EventsV1Event;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ListMeta, ObjectMeta, Status, StatusCause, StatusDetails};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

/// The namespace controller's wait after a namespace's DELETE (kube-controller-manager's
/// `namespaceDeletionGracePeriod`).
const NAMESPACE_DELETION_GRACE: Duration = Duration::from_secs(5);
/// Bearer tokens of ServiceAccounts: `fake-sa:NAMESPACE:NAME:UID`.
const SA_TOKEN_PREFIX: &str = "fake-sa:";
/// How long a token stays valid after its ServiceAccount's deletion began.
const SA_TOKEN_LEEWAY_SECONDS: i64 = 60;
/// Number of watch events kept for resuming watches (etcd/watch-cache history).
const HISTORY: usize = 2000;
/// How long an entry stays in a PDB's `status.disruptedPods` (controller DeletionTimeout).
const DISRUPTED_POD_TIMEOUT: Duration = Duration::from_secs(120);
/// Kubelet: delay between a pod being bound and becoming Running.
const KUBELET_START_DELAY: Duration = Duration::from_millis(100);
/// Kubelet: cap on how long a terminating pod is kept.
const KUBELET_MAX_GRACE: Duration = Duration::from_secs(1);

// ---------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, PartialOrd, Ord)]
pub enum Res {
    Namespace,
    Node,
    Pod,
    Pdb,
    Event,
    CoreEvent,
    DaemonSet,
    // What `kubectl apply/delete -k deploy/` sends besides the above: stored
    // as given (validated by the typed decoder only); RBAC is not enforced.
    ServiceAccount,
    Role,
    RoleBinding,
    ClusterRole,
    ClusterRoleBinding,
    /// apiextensions.k8s.io/v1 CustomResourceDefinition.
    Crd,
    /// coordination.k8s.io/v1 Lease (see [`State::update`] and
    /// [`lease_prepare`] for what differs from the other built-in kinds).
    Lease,
    /// core/v1 ConfigMap (see [`validate_config_map`] and
    /// [`config_map_decode`]).
    ConfigMap,
    /// A custom resource served from a stored CRD: an index into
    /// [`CUSTOM_KINDS`] (its names; the rest is read from the CRD itself).
    Custom(u32),
}

const RBAC_GROUP: &str = "rbac.authorization.k8s.io";
/// The API groups of the built-in kinds, as `/apis` lists them.
const BUILTIN_GROUPS: [&str; 6] = [
    "policy",
    "events.k8s.io",
    "apps",
    RBAC_GROUP,
    CRD_GROUP,
    COORDINATION_GROUP,
];
const COORDINATION_GROUP: &str = "coordination.k8s.io";

impl Res {
    const ALL: [Res; 15] = [
        Res::Namespace,
        Res::Node,
        Res::Pod,
        Res::Pdb,
        Res::Event,
        Res::CoreEvent,
        Res::DaemonSet,
        Res::ServiceAccount,
        Res::Role,
        Res::RoleBinding,
        Res::ClusterRole,
        Res::ClusterRoleBinding,
        Res::Crd,
        Res::Lease,
        Res::ConfigMap,
    ];

    fn lookup(group: &str, version: &str, plural: &str) -> Option<Res> {
        Some(match (group, version, plural) {
            ("", "v1", "namespaces") => Res::Namespace,
            ("", "v1", "nodes") => Res::Node,
            ("", "v1", "pods") => Res::Pod,
            ("", "v1", "events") => Res::CoreEvent,
            ("policy", "v1", "poddisruptionbudgets") => Res::Pdb,
            ("events.k8s.io", "v1", "events") => Res::Event,
            ("apps", "v1", "daemonsets") => Res::DaemonSet,
            ("", "v1", "serviceaccounts") => Res::ServiceAccount,
            (RBAC_GROUP, "v1", "roles") => Res::Role,
            (RBAC_GROUP, "v1", "rolebindings") => Res::RoleBinding,
            (RBAC_GROUP, "v1", "clusterroles") => Res::ClusterRole,
            (RBAC_GROUP, "v1", "clusterrolebindings") => Res::ClusterRoleBinding,
            (CRD_GROUP, "v1", "customresourcedefinitions") => Res::Crd,
            (COORDINATION_GROUP, "v1", "leases") => Res::Lease,
            ("", "v1", "configmaps") => Res::ConfigMap,
            _ => return None,
        })
    }
    fn plural(self) -> &'static str {
        match self {
            Res::Namespace => "namespaces",
            Res::Node => "nodes",
            Res::Pod => "pods",
            Res::Pdb => "poddisruptionbudgets",
            Res::Event | Res::CoreEvent => "events",
            Res::DaemonSet => "daemonsets",
            Res::ServiceAccount => "serviceaccounts",
            Res::Role => "roles",
            Res::RoleBinding => "rolebindings",
            Res::ClusterRole => "clusterroles",
            Res::ClusterRoleBinding => "clusterrolebindings",
            Res::Crd => "customresourcedefinitions",
            Res::Lease => "leases",
            Res::ConfigMap => "configmaps",
            Res::Custom(i) => &custom_kind(i).plural,
        }
    }
    fn group(self) -> &'static str {
        match self {
            Res::Crd => CRD_GROUP,
            Res::Custom(i) => &custom_kind(i).group,
            Res::Pdb => "policy",
            Res::Event => "events.k8s.io",
            Res::DaemonSet => "apps",
            Res::Role | Res::RoleBinding | Res::ClusterRole | Res::ClusterRoleBinding => RBAC_GROUP,
            Res::Lease => COORDINATION_GROUP,
            _ => "",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Res::Pdb => "policy/v1",
            Res::Event => "events.k8s.io/v1",
            Res::DaemonSet => "apps/v1",
            Res::Role | Res::RoleBinding | Res::ClusterRole | Res::ClusterRoleBinding => "rbac.authorization.k8s.io/v1",
            Res::Crd => "apiextensions.k8s.io/v1",
            Res::Lease => "coordination.k8s.io/v1",
            Res::Custom(i) => &custom_kind(i).api_version,
            _ => "v1",
        }
    }
    fn kind(self) -> &'static str {
        match self {
            Res::Namespace => "Namespace",
            Res::Node => "Node",
            Res::Pod => "Pod",
            Res::Pdb => "PodDisruptionBudget",
            Res::Event | Res::CoreEvent => "Event",
            Res::DaemonSet => "DaemonSet",
            Res::ServiceAccount => "ServiceAccount",
            Res::Role => "Role",
            Res::RoleBinding => "RoleBinding",
            Res::ClusterRole => "ClusterRole",
            Res::ClusterRoleBinding => "ClusterRoleBinding",
            Res::Crd => "CustomResourceDefinition",
            Res::Lease => "Lease",
            Res::ConfigMap => "ConfigMap",
            Res::Custom(i) => &custom_kind(i).kind,
        }
    }
    fn namespaced(self) -> bool {
        match self {
            Res::Custom(i) => custom_kind(i).namespaced,
            _ => !matches!(
                self,
                Res::Namespace | Res::Node | Res::ClusterRole | Res::ClusterRoleBinding | Res::Crd
            ),
        }
    }
    /// `pods`, `poddisruptionbudgets.policy`: as in real error messages.
    fn qualified(self) -> String {
        if self.group().is_empty() {
            self.plural().to_string()
        } else {
            format!("{}.{}", self.plural(), self.group())
        }
    }
    /// `Pod`, `PodDisruptionBudget.policy`: as in real 422 messages.
    fn qualified_kind(self) -> String {
        if self.group().is_empty() {
            self.kind().to_string()
        } else {
            format!("{}.{}", self.kind(), self.group())
        }
    }
    /// Built-in kinds only: whether a custom resource has a status
    /// subresource depends on its CRD ([`State::has_status`]).
    fn has_status(self) -> bool {
        matches!(
            self,
            Res::Node | Res::Pod | Res::Pdb | Res::DaemonSet | Res::Namespace | Res::Crd
        )
    }
    fn tracks_generation(self) -> bool {
        matches!(self, Res::Pod | Res::Pdb | Res::DaemonSet | Res::Crd | Res::Custom(_))
    }
    /// Round-trips through the k8s-openapi type: rejects what the typed
    /// decoder rejects and yields exactly its serialisation.
    fn canonical(self, v: Value) -> Result<Value, String> {
        fn rt<T: serde::de::DeserializeOwned + serde::Serialize>(v: Value) -> Result<Value, String> {
            let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
            serde_json::to_value(&t).map_err(|e| e.to_string())
        }
        match self {
            Res::Namespace => rt::<Namespace>(v),
            Res::Node => rt::<Node>(v),
            Res::Pod => rt::<Pod>(v),
            Res::Pdb => rt::<PodDisruptionBudget>(v),
            Res::Event => rt::<EventsV1Event>(v),
            Res::CoreEvent => rt::<CoreEvent>(v),
            Res::DaemonSet => rt::<DaemonSet>(v),
            Res::ServiceAccount => rt::<ServiceAccount>(v),
            Res::Role => rt::<Role>(v),
            Res::RoleBinding => rt::<RoleBinding>(v),
            Res::ClusterRole => rt::<ClusterRole>(v),
            Res::ClusterRoleBinding => rt::<ClusterRoleBinding>(v),
            Res::Crd => rt::<CustomResourceDefinition>(v),
            Res::Lease => {
                // metav1.MicroTime decodes with Go's time.Parse(RFC3339Micro),
                // stricter than jiff (exactly six fractional digits).
                let mut v = v;
                for field in ["acquireTime", "renewTime"] {
                    if let Some(t) = v.pointer_mut(&format!("/spec/{field}"))
                        && let Value::String(text) = t
                    {
                        let at = parse_rfc3339_micro(text)
                            .map_err(|e| format!("Lease in version \"v1\" cannot be handled as a Lease: {e}"))?;
                        *t = json!(at.to_string());
                    }
                }
                rt::<Lease>(v)
            }
            Res::ConfigMap => config_map_decode(v)
                .and_then(rt::<ConfigMap>)
                .map_err(|e| format!("ConfigMap in version \"v1\" cannot be handled as a ConfigMap: {e}")),
            // The body is pruned and validated against the CRD's schema
            // instead; metadata is decoded as ObjectMeta, as real.
            Res::Custom(_) => {
                let mut v = v;
                if let Some(m) = v.get("metadata").cloned() {
                    let meta: ObjectMeta = serde_json::from_value(m).map_err(|e| e.to_string())?;
                    v["metadata"] = serde_json::to_value(&meta).map_err(|e| e.to_string())?;
                }
                Ok(v)
            }
        }
    }
    fn list_kind(self) -> String {
        match self {
            Res::Custom(i) => custom_kind(i).list_kind.clone(),
            _ => format!("{}List", self.kind()),
        }
    }
}

const CRD_GROUP: &str = "apiextensions.k8s.io";
/// The finalizer a CRD's deletion adds: its instances are deleted first.
const CRD_CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

/// The names of a custom resource, as [`Res::Custom`] serves it: one entry
/// per (group, version, plural, kind, listKind, scope) ever seen by any
/// server of this process, leaked so that [`Res`] stays `Copy` and its names
/// `&'static str`. Servers share the table, never the objects.
#[derive(PartialEq, Debug)]
struct CustomKind {
    group: String,
    version: String,
    plural: String,
    kind: String,
    list_kind: String,
    namespaced: bool,
    api_version: String,
}

static CUSTOM_KINDS: Mutex<Vec<&'static CustomKind>> = Mutex::new(Vec::new());

fn custom_kind(i: u32) -> &'static CustomKind {
    CUSTOM_KINDS.lock().unwrap_or_else(|e| e.into_inner())[i as usize]
}

fn custom_kind_of(res: Res) -> Option<&'static CustomKind> {
    match res {
        Res::Custom(i) => Some(custom_kind(i)),
        _ => None,
    }
}

fn intern_custom_kind(k: CustomKind) -> Res {
    let mut kinds = CUSTOM_KINDS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(i) = kinds.iter().position(|c| **c == k) {
        return Res::Custom(i as u32);
    }
    kinds.push(Box::leak(Box::new(k)));
    Res::Custom((kinds.len() - 1) as u32)
}

// ---------------------------------------------------------------------------
// Errors (metav1.Status)
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
    pub details: Option<Box<StatusDetails>>,
    pub retry_after: Option<u32>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }
    fn details_for(res: Res, name: &str) -> StatusDetails {
        StatusDetails {
            name: Some(name.to_string()).filter(|s| !s.is_empty()),
            group: Some(res.group().to_string()).filter(|s| !s.is_empty()),
            kind: Some(res.plural().to_string()),
            ..Default::default()
        }
    }
    fn not_found(res: Res, name: &str) -> Self {
        let mut e = Self::new(404, "NotFound", format!("{} \"{}\" not found", res.qualified(), name));
        e.details = Some(Box::new(Self::details_for(res, name)));
        e
    }
    fn already_exists(res: Res, name: &str) -> Self {
        let mut e = Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{}\" already exists", res.qualified(), name),
        );
        e.details = Some(Box::new(Self::details_for(res, name)));
        e
    }
    fn conflict(res: Res, name: &str, why: &str) -> Self {
        let mut e = Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{}\": {}",
                res.qualified(),
                name,
                why
            ),
        );
        e.details = Some(Box::new(Self::details_for(res, name)));
        e
    }
    /// Store.Update's refusal of an update without a resourceVersion when
    /// the strategy's AllowUnconditionalUpdate is false: a 422 whose "kind"
    /// is the qualified resource (`leases.coordination.k8s.io`).
    fn rv_required(res: Res, name: &str) -> Self {
        let cause = "Invalid value: 0x0: must be specified for an update";
        let mut e = Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: metadata.resourceVersion: {cause}",
                res.qualified()
            ),
        );
        let mut details = Self::details_for(res, name);
        details.causes = Some(vec![StatusCause {
            field: Some("metadata.resourceVersion".into()),
            message: Some(cause.into()),
            reason: Some("FieldValueInvalid".into()),
        }]);
        e.details = Some(Box::new(details));
        e
    }
    fn stale(res: Res, name: &str) -> Self {
        Self::conflict(
            res,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }
    /// The NamespaceLifecycle admission plugin's refusal.
    fn namespace_terminating(res: Res, name: &str, ns: &str) -> Self {
        let mut e = Self::new(
            403,
            "Forbidden",
            format!(
                "{} \"{name}\" is forbidden: unable to create new content in namespace {ns} because it is being terminated",
                res.qualified()
            ),
        );
        let mut details = Self::details_for(res, name);
        details.causes = Some(vec![StatusCause {
            reason: Some("NamespaceTerminating".into()),
            message: Some(format!("namespace {ns} is being terminated")),
            field: Some("metadata.namespace".into()),
        }]);
        e.details = Some(Box::new(details));
        e
    }
    fn unauthorized() -> Self {
        Self::new(401, "Unauthorized", "Unauthorized")
    }
    fn bad_request(msg: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", msg)
    }
    /// 422 with one cause per `(field, "Invalid value: ...: why")`.
    fn invalid(res: Res, name: &str, errs: Vec<(String, String, &'static str)>) -> Self {
        let msgs: Vec<String> = errs.iter().map(|(f, m, _)| format!("{f}: {m}")).collect();
        let msg = if msgs.len() == 1 {
            msgs[0].clone()
        } else {
            format!("[{}]", msgs.join(", "))
        };
        let mut e = Self::new(
            422,
            "Invalid",
            format!("{} \"{}\" is invalid: {}", res.qualified_kind(), name, msg),
        );
        e.details = Some(Box::new(StatusDetails {
            name: Some(name.to_string()),
            group: Some(res.group().to_string()).filter(|s| !s.is_empty()),
            kind: Some(res.kind().to_string()),
            causes: Some(
                errs.into_iter()
                    .map(|(f, m, r)| StatusCause {
                        field: Some(f),
                        message: Some(m),
                        reason: Some(r.into()),
                    })
                    .collect(),
            ),
            ..Default::default()
        }));
        e
    }
    fn not_found_path() -> Self {
        let mut e = Self::new(404, "NotFound", "the server could not find the requested resource");
        e.details = Some(Box::new(StatusDetails::default()));
        e
    }
    fn method_not_allowed() -> Self {
        let mut e = Self::new(
            405,
            "MethodNotAllowed",
            "the server does not allow this method on the requested resource",
        );
        e.details = Some(Box::new(StatusDetails::default()));
        e
    }
    fn expired(msg: impl Into<String>) -> Self {
        Self::new(410, "Expired", msg)
    }
    pub fn status(&self) -> Status {
        Status {
            code: Some(self.code as i32),
            details: self.details.clone().map(|d| *d),
            message: Some(self.message.clone()),
            metadata: ListMeta::default(),
            reason: Some(self.reason.to_string()).filter(|r| !r.is_empty()),
            status: Some("Failure".into()),
        }
    }
    fn to_value(&self) -> Value {
        serde_json::to_value(self.status()).expect("status serialises")
    }
}

fn invalid_value(v: &str, why: &str) -> String {
    format!("Invalid value: \"{v}\": {why}")
}

type ApiResult<T> = Result<T, ApiError>;

// ---------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------

#[derive(Clone, Debug, Default)]
struct FieldSelector(Vec<(String, bool, String)>); // (field, equal?, value)

impl FieldSelector {
    /// `selectable`: a custom resource's `selectableFields` (without the
    /// leading dot), the only fields besides metadata's it may be selected by.
    fn parse(res: Res, s: &str, selectable: &[String]) -> ApiResult<Self> {
        let mut out = vec![];
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (k, eq, v) = if let Some((k, v)) = term.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = term.split_once("==") {
                (k, true, v)
            } else if let Some((k, v)) = term.split_once('=') {
                (k, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: invalid selector: '{s}'; can't understand '{term}'"
                )));
            };
            let k = k.trim().to_string();
            if !field_supported(res, &k) && !selectable.contains(&k) {
                return Err(ApiError::bad_request(format!("field label not supported: {k}")));
            }
            out.push((k, eq, v.trim().to_string()));
        }
        Ok(FieldSelector(out))
    }
    fn matches(&self, res: Res, obj: &Value) -> bool {
        self.0.iter().all(|(k, eq, v)| (field_value(res, obj, k) == *v) == *eq)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn field_supported(res: Res, f: &str) -> bool {
    if f == "metadata.name" || (f == "metadata.namespace" && res.namespaced()) {
        return true;
    }
    match res {
        Res::Node => f == "spec.unschedulable",
        Res::Namespace => f == "status.phase",
        Res::Pod => matches!(
            f,
            "spec.nodeName"
                | "spec.restartPolicy"
                | "spec.schedulerName"
                | "spec.serviceAccountName"
                | "spec.hostNetwork"
                | "status.phase"
                | "status.podIP"
                | "status.nominatedNodeName"
        ),
        Res::CoreEvent => {
            f.starts_with("involvedObject.") || matches!(f, "reason" | "reportingComponent" | "source" | "type")
        }
        Res::Event => f.starts_with("regarding.") || matches!(f, "reason" | "reportingController" | "type"),
        _ => false,
    }
}

fn field_value(res: Res, obj: &Value, f: &str) -> String {
    let s = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    match f {
        "spec.unschedulable" | "spec.hostNetwork" => {
            let p = format!("/{}", f.replace('.', "/"));
            obj.pointer(&p).and_then(Value::as_bool).unwrap_or(false).to_string()
        }
        "source" if res == Res::CoreEvent => s("/source/component"),
        _ => s(&format!("/{}", f.replace('.', "/"))),
    }
}

#[derive(Clone, Debug)]
enum LabelReq {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

#[derive(Clone, Debug, Default)]
struct LabelSelector(Vec<LabelReq>);

impl LabelSelector {
    fn parse(s: &str) -> ApiResult<Self> {
        let bad = || ApiError::bad_request(format!("unable to parse requirement: invalid label selector: {s:?}"));
        let mut terms = vec![];
        let mut depth = 0;
        let mut cur = String::new();
        for c in s.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if c == ',' && depth == 0 {
                terms.push(std::mem::take(&mut cur));
            } else {
                cur.push(c);
            }
        }
        terms.push(cur);
        let mut out = vec![];
        for t in terms.iter().map(|t| t.trim()).filter(|t| !t.is_empty()) {
            let set = |rest: &str| -> ApiResult<Vec<String>> {
                let rest = rest.trim();
                let inner = rest
                    .strip_prefix('(')
                    .and_then(|r| r.strip_suffix(')'))
                    .ok_or_else(bad)?;
                Ok(inner
                    .split(',')
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
                    .collect())
            };
            let req = if let Some(k) = t.strip_prefix('!') {
                LabelReq::NotExists(k.trim().to_string())
            } else if let Some((k, rest)) = t.split_once(" notin ") {
                LabelReq::NotIn(k.trim().to_string(), set(rest)?)
            } else if let Some((k, rest)) = t.split_once(" in ") {
                LabelReq::In(k.trim().to_string(), set(rest)?)
            } else if let Some((k, v)) = t.split_once("!=") {
                LabelReq::Ne(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once("==") {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if let Some((k, v)) = t.split_once('=') {
                LabelReq::Eq(k.trim().to_string(), v.trim().to_string())
            } else if t.contains(' ') || t.contains('(') {
                return Err(bad());
            } else {
                LabelReq::Exists(t.to_string())
            };
            out.push(req);
        }
        Ok(LabelSelector(out))
    }
    fn matches(&self, obj: &Value) -> bool {
        let labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
        let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            LabelReq::Eq(k, v) => get(k) == Some(v.as_str()),
            LabelReq::Ne(k, v) => get(k) != Some(v.as_str()),
            LabelReq::In(k, vs) => get(k).is_some_and(|x| vs.iter().any(|v| v == x)),
            LabelReq::NotIn(k, vs) => get(k).is_none_or(|x| !vs.iter().any(|v| v == x)),
            LabelReq::Exists(k) => get(k).is_some(),
            LabelReq::NotExists(k) => get(k).is_none(),
        })
    }
}

/// metav1.LabelSelector (PDB spec.selector) semantics: `None` matches nothing,
/// `{}` matches everything.
fn object_selector_matches(sel: Option<&Value>, pod: &Value) -> bool {
    let Some(sel) = sel.filter(|s| !s.is_null()) else {
        return false;
    };
    let labels = pod.pointer("/metadata/labels").and_then(Value::as_object);
    let get = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    if let Some(ml) = sel.get("matchLabels").and_then(Value::as_object)
        && !ml.iter().all(|(k, v)| get(k) == v.as_str())
    {
        return false;
    }
    if let Some(exprs) = sel.get("matchExpressions").and_then(Value::as_array) {
        for e in exprs {
            let key = e.get("key").and_then(Value::as_str).unwrap_or("");
            let vals: Vec<&str> = e
                .get("values")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let ok = match e.get("operator").and_then(Value::as_str).unwrap_or("") {
                "In" => get(key).is_some_and(|x| vals.contains(&x)),
                "NotIn" => get(key).is_none_or(|x| !vals.contains(&x)),
                "Exists" => get(key).is_some(),
                "DoesNotExist" => get(key).is_none(),
                _ => false,
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

// ---------------------------------------------------------------------------
// Helpers on JSON objects
// ---------------------------------------------------------------------------

fn now_ts() -> String {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .expect("timestamp")
        .to_string()
}
fn now_micro() -> String {
    let ts = jiff::Timestamp::now();
    let micros = ts.as_microsecond();
    let t = jiff::Timestamp::from_microsecond(micros).expect("timestamp");
    format!("{}", t.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
}
fn parse_ts(s: &str) -> Option<jiff::Timestamp> {
    s.parse().ok()
}

/// Go's `quote` of package time (in its parse errors).
fn go_time_quote(b: &[u8]) -> String {
    let mut out = String::from("\"");
    for &c in b {
        if !(b' '..0x80).contains(&c) {
            out.push_str(&format!("\\x{c:02x}"));
        } else {
            if c == b'"' || c == b'\\' {
                out.push('\\');
            }
            out.push(c as char);
        }
    }
    out.push('"');
    out
}

/// metav1.MicroTime's decoding: Go's `time.Parse(RFC3339Micro, s)`, with
/// its acceptance (exactly six fractional digits, a `Z` or `±hh:mm` offset,
/// a one- or two-digit hour) and its error messages. The instant, or the
/// message.
fn parse_rfc3339_micro(s: &str) -> Result<jiff::Timestamp, String> {
    const LAYOUT: &str = "2006-01-02T15:04:05.000000Z07:00";
    let all = s.as_bytes();
    let cannot = |rest: &[u8], elem: &str| {
        format!(
            "parsing time {} as \"{LAYOUT}\": cannot parse {} as \"{elem}\"",
            go_time_quote(all),
            go_time_quote(rest)
        )
    };
    let message = |m: &str| format!("parsing time {}{m}", go_time_quote(all));
    let digit = |v: &[u8], i: usize| v.get(i).is_some_and(u8::is_ascii_digit);
    // getnum: one or two digits (exactly two when fixed).
    let getnum = |v: &[u8], fixed: bool| -> Option<(i64, usize)> {
        if !digit(v, 0) {
            return None;
        }
        if !digit(v, 1) {
            return (!fixed).then(|| (i64::from(v[0] - b'0'), 1));
        }
        Some((i64::from(v[0] - b'0') * 10 + i64::from(v[1] - b'0'), 2))
    };
    // atoi: an optional sign, then digits only (none is 0).
    let atoi = |v: &[u8]| -> Option<i64> {
        let (neg, d) = match v.first() {
            Some(b'-') => (true, &v[1..]),
            Some(b'+') => (false, &v[1..]),
            _ => (false, v),
        };
        if !d.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let n = d.iter().fold(0i64, |n, c| n * 10 + i64::from(c - b'0'));
        Some(if neg { -n } else { n })
    };
    let mut v = all;
    let lit = |v: &mut &[u8], c: u8| -> Result<(), String> {
        if v.first() != Some(&c) {
            return Err(cannot(v, &(c as char).to_string()));
        }
        *v = &v[1..];
        Ok(())
    };
    // 2006
    if v.len() < 4 || !digit(v, 0) {
        return Err(cannot(v, "2006"));
    }
    let (p, rest) = v.split_at(4);
    v = rest;
    let year = atoi(p).ok_or_else(|| cannot(v, "2006"))?;
    // -01-02T15:04:05
    let field = |v: &mut &[u8], sep: u8, elem: &str, fixed: bool, max: i64, what: &str| {
        lit(v, sep)?;
        let (n, used) = getnum(v, fixed).ok_or_else(|| cannot(v, elem))?;
        *v = &v[used..];
        if n > max || (what == "month" && n == 0) {
            return Err(message(&format!(": {what} out of range")));
        }
        Ok::<i64, String>(n)
    };
    let month = field(&mut v, b'-', "01", true, 12, "month")?;
    let day = field(&mut v, b'-', "02", true, 99, "day")?;
    let hour = field(&mut v, b'T', "15", false, 23, "hour")?;
    let minute = field(&mut v, b':', "04", true, 59, "minute")?;
    let second = field(&mut v, b':', "05", true, 59, "second")?;
    // .000000: exactly seven bytes, consumed even when they are wrong.
    if v.len() < 7 {
        return Err(cannot(v, ".000000"));
    }
    let (frac, rest) = v.split_at(7);
    v = rest;
    if !matches!(frac[0], b'.' | b',') {
        return Err(cannot(v, ".000000"));
    }
    let micros = atoi(&frac[1..]).ok_or_else(|| cannot(v, ".000000"))?;
    if micros < 0 {
        return Err(message(": fractional second out of range"));
    }
    // Z07:00
    let offset = if v.first() == Some(&b'Z') {
        v = &v[1..];
        0
    } else {
        if v.len() < 6 || v[3] != b':' {
            return Err(cannot(v, "Z07:00"));
        }
        let (tz, rest) = v.split_at(6);
        v = rest;
        let hh = getnum(&tz[1..3], true).map(|(n, _)| n);
        let mm = getnum(&tz[4..6], true).map(|(n, _)| n);
        let (Some(hh), Some(mm)) = (hh, mm) else {
            return Err(cannot(v, "Z07:00"));
        };
        if mm > 60 {
            return Err(message(": time zone offset minute out of range"));
        }
        if hh > 24 {
            return Err(message(": time zone offset hour out of range"));
        }
        match tz[0] {
            b'+' => hh * 3600 + mm * 60,
            b'-' => -(hh * 3600 + mm * 60),
            _ => return Err(cannot(v, "Z07:00")),
        }
    };
    if !v.is_empty() {
        return Err(message(&format!(": extra text: {}", go_time_quote(v))));
    }
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if day < 1 || day > days_in_month {
        return Err(message(": day out of range"));
    }
    let civil = jiff::civil::DateTime::new(
        year as i16,
        month as i8,
        day as i8,
        hour as i8,
        minute as i8,
        second as i8,
        (micros * 1000) as i32,
    )
    .map_err(|e| message(&format!(": {e}")))?;
    let tz = jiff::tz::Offset::from_seconds(offset as i32)
        .map(jiff::tz::TimeZone::fixed)
        .map_err(|e| message(&format!(": {e}")))?;
    civil
        .to_zoned(tz)
        .map(|z| z.timestamp())
        .map_err(|e| message(&format!(": {e}")))
}

fn new_uid() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let c = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(c);
    h.write_u128(jiff::Timestamp::now().as_nanosecond() as u128);
    let a = h.finish();
    let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
    h2.write_u64(a ^ c);
    let b = h2.finish();
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        (a >> 32) as u32,
        (a >> 16) as u16,
        (a & 0xfff) as u16,
        (0x8000 | (b >> 48) & 0x3fff) as u16,
        b & 0xffff_ffff_ffff
    )
}

fn random_suffix() -> String {
    const ALPHA: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(jiff::Timestamp::now().as_nanosecond() as u128);
    let mut x = h.finish();
    (0..5)
        .map(|_| {
            let c = ALPHA[(x % ALPHA.len() as u64) as usize] as char;
            x /= ALPHA.len() as u64;
            c
        })
        .collect()
}

fn meta_str<'a>(obj: &'a Value, field: &str) -> Option<&'a str> {
    obj.get("metadata").and_then(|m| m.get(field)).and_then(Value::as_str)
}
fn name_of(obj: &Value) -> &str {
    meta_str(obj, "name").unwrap_or("")
}
fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.get("metadata").is_some_and(Value::is_object) {
        obj["metadata"] = json!({});
    }
    obj["metadata"].as_object_mut().expect("metadata object")
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(p) => {
            if !target.is_object() {
                *target = json!({});
            }
            let t = target.as_object_mut().expect("object");
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// Strategic merge patch, as far as our objects need it: a JSON merge patch
/// but for `metadata.finalizers`, a list with patchStrategy "merge" (the
/// patch's entries are added, `$deleteFromPrimitiveList/finalizers` removes),
/// and `$` directives, which are dropped. Every other list is replaced, as
/// for lists without a merge key.
fn strategic_merge_patch(target: &mut Value, patch: &Value) {
    let mut patch = patch.clone();
    let before: Vec<Value> = target
        .pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let meta_patch = patch.get_mut("metadata").and_then(Value::as_object_mut);
    let (added, deleted) = match meta_patch {
        Some(m) => {
            let added = m.remove("finalizers");
            let deleted = m.remove("$deleteFromPrimitiveList/finalizers");
            m.retain(|k, _| !k.starts_with('$'));
            (added, deleted)
        }
        None => (None, None),
    };
    if let Some(o) = patch.as_object_mut() {
        o.retain(|k, _| !k.starts_with('$'));
    }
    merge_patch(target, &patch);
    if added.is_none() && deleted.is_none() {
        return;
    }
    let mut list = match &added {
        Some(Value::Null) => vec![],
        _ => before,
    };
    for f in added.iter().filter_map(Value::as_array).flatten() {
        if !list.contains(f) {
            list.push(f.clone());
        }
    }
    if let Some(gone) = deleted.as_ref().and_then(Value::as_array) {
        list.retain(|f| !gone.contains(f));
    }
    if list.is_empty() {
        meta_mut(target).remove("finalizers");
    } else {
        meta_mut(target).insert("finalizers".into(), Value::Array(list));
    }
}

/// RFC 6902 JSON patch as the real server applies it (evanphx/json-patch):
/// a failed operation is a 422 whose cause carries the library's message.
fn json_patch(doc: &Value, ops: &[Value]) -> ApiResult<Value> {
    let mut doc = doc.clone();
    for op in ops {
        let kind = op.get("op").and_then(Value::as_str).unwrap_or("");
        let path = op.get("path").and_then(Value::as_str).unwrap_or("");
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| patch_failed(format!("{kind} operation missing value")))
        };
        match kind {
            "add" => pointer_add(&mut doc, path, value()?)?,
            "remove" => {
                pointer_remove(&mut doc, path)?;
            }
            "replace" => {
                let v = value()?;
                let slot = doc.pointer_mut(path).ok_or_else(|| {
                    patch_failed(format!(
                        "replace operation does not apply: doc is missing key: {path}: missing value"
                    ))
                })?;
                *slot = v;
            }
            "test" => {
                let v = value()?;
                match doc.pointer(path) {
                    Some(actual) if *actual == v => {}
                    None if v.is_null() => {}
                    _ => return Err(patch_failed(format!("testing value {path} failed: test failed"))),
                }
            }
            "move" | "copy" => {
                let from = op.get("from").and_then(Value::as_str).unwrap_or("");
                let v = if kind == "move" {
                    pointer_remove(&mut doc, from)?
                } else {
                    doc.pointer(from).cloned().ok_or_else(|| {
                        patch_failed(format!(
                            "copy operation does not apply: doc is missing from path: {from}: missing value"
                        ))
                    })?
                };
                pointer_add(&mut doc, path, v)?;
            }
            other => return Err(ApiError::bad_request(format!("Unexpected kind: {other}"))),
        }
    }
    Ok(doc)
}

/// NewGenericServerResponse(422, ...): what a JSON patch that does not apply
/// answers.
fn patch_failed(cause: String) -> ApiError {
    let mut e = ApiError::new(
        422,
        "Invalid",
        "the server rejected our request due to an error in our request",
    );
    e.details = Some(Box::new(StatusDetails {
        causes: Some(vec![StatusCause {
            reason: Some("UnexpectedServerResponse".into()),
            message: Some(cause),
            field: None,
        }]),
        ..Default::default()
    }));
    e
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(path: &str) -> Option<(&str, String)> {
    let (parent, last) = path.rsplit_once('/')?;
    Some((parent, last.replace("~1", "/").replace("~0", "~")))
}

fn pointer_add(doc: &mut Value, path: &str, v: Value) -> ApiResult<()> {
    if path.is_empty() {
        *doc = v;
        return Ok(());
    }
    let missing = || {
        patch_failed(format!(
            "add operation does not apply: doc is missing path: {path:?}: missing value"
        ))
    };
    let (parent, key) = split_pointer(path).ok_or_else(missing)?;
    match doc.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(m) => {
            m.insert(key, v);
        }
        Value::Array(a) => {
            let i = if key == "-" {
                a.len()
            } else {
                key.parse().map_err(|_| missing())?
            };
            if i > a.len() {
                return Err(patch_failed(format!(
                    "Unable to access invalid index: {i}: invalid index referenced"
                )));
            }
            a.insert(i, v);
        }
        _ => return Err(missing()),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &str) -> ApiResult<Value> {
    let missing = || {
        patch_failed(format!(
            "remove operation does not apply: doc is missing path: {path:?}: missing value"
        ))
    };
    let (parent, key) = split_pointer(path).ok_or_else(missing)?;
    match doc.pointer_mut(parent).ok_or_else(missing)? {
        Value::Object(m) => m
            .remove(&key)
            .ok_or_else(|| patch_failed(format!("unable to remove nonexistent key: {key}: missing value"))),
        Value::Array(a) => {
            let i: usize = key.parse().map_err(|_| missing())?;
            if i >= a.len() {
                return Err(patch_failed(format!(
                    "Unable to remove invalid index: {i}: invalid index referenced"
                )));
            }
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}
fn is_dns_label(s: &str) -> bool {
    s.len() <= 63 && !s.contains('.') && is_dns_subdomain(s)
}
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

fn pod_ready(pod: &Value) -> bool {
    pod.pointer("/status/conditions")
        .and_then(Value::as_array)
        .is_some_and(|cs| cs.iter().any(|c| c["type"] == "Ready" && c["status"] == "True"))
}
fn pod_phase(pod: &Value) -> &str {
    pod.pointer("/status/phase").and_then(Value::as_str).unwrap_or("")
}
fn controller_ref(obj: &Value) -> Option<&Value> {
    obj.pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .and_then(|refs| {
            refs.iter()
                .find(|r| r.get("controller").and_then(Value::as_bool) == Some(true))
        })
}

/// intstr value: ints as is, "N%" scaled against `total`, rounding up.
fn int_or_percent(v: &Value, total: i64) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64(),
        Value::String(s) => {
            let p: i64 = s.strip_suffix('%')?.parse().ok()?;
            Some((p * total + 99) / 100)
        }
        _ => None,
    }
}

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------

type Key = (Res, String, String); // (resource, namespace or "", name)

#[derive(Clone, Debug)]
struct HistEvent {
    rv: u64,
    res: Res,
    ns: String,
    /// Object after the change (None: deleted).
    obj: Option<Value>,
    /// Object before the change (None: created).
    prev: Option<Value>,
}

enum WMsg {
    Event(Value),
    Abort,
}

struct Watcher {
    id: u64,
    res: Res,
    ns: Option<String>,
    fsel: FieldSelector,
    lsel: LabelSelector,
    tx: mpsc::UnboundedSender<WMsg>,
}

impl Watcher {
    fn passes(&self, obj: &Value) -> bool {
        if let Some(ns) = &self.ns
            && meta_str(obj, "namespace").unwrap_or("") != ns
        {
            return false;
        }
        self.fsel.matches(self.res, obj) && self.lsel.matches(obj)
    }
    /// The cacher's convertToWatchEvent: an object that stops matching is a
    /// DELETED (previous content, event's resourceVersion), one that starts
    /// matching is an ADDED.
    fn convert(&self, ev: &HistEvent) -> Option<Value> {
        if ev.res != self.res {
            return None;
        }
        let cur = ev.obj.as_ref().is_some_and(|o| self.passes(o));
        let old = ev.prev.as_ref().is_some_and(|o| self.passes(o));
        let (typ, obj) = match (cur, old) {
            (true, false) => ("ADDED", ev.obj.clone()?),
            (true, true) => ("MODIFIED", ev.obj.clone()?),
            (false, true) => {
                let mut o = ev.prev.clone()?;
                meta_mut(&mut o).insert("resourceVersion".into(), json!(ev.rv.to_string()));
                ("DELETED", o)
            }
            (false, false) => return None,
        };
        Some(json!({"type": typ, "object": obj}))
    }
}

struct PodSide {
    created: Instant,
    delete_requested: Option<Instant>,
    /// The kubelet has stopped the containers (and kept the pod only
    /// because of its finalizers).
    terminated: bool,
}

struct State {
    rv: u64,
    /// Watches need a resourceVersion >= this (history floor).
    floor: u64,
    objects: BTreeMap<Key, Value>,
    history: VecDeque<HistEvent>,
    watchers: Vec<Watcher>,
    next_watcher: u64,
    events_log: Vec<Value>,
    requests: Vec<(String, String)>,
    kubelet: bool,
    disruption_controller: bool,
    bookmark_interval: Duration,
    pod_side: HashMap<String, PodSide>, // by uid
    /// (PDB uid, reason) of the disruption controller's events so far.
    pdb_events: HashSet<(String, &'static str)>,
    /// The current request's `fieldValidation` (Ignore, Warn, Strict).
    field_validation: String,
    /// Warnings for the current request (`Warning: 299` headers).
    warnings: Vec<String>,
    /// The current request is a server-side apply patch.
    applying: bool,
    /// How long after a namespace's deletion its content is first deleted
    /// ([`KubeApi::set_namespace_deletion_grace`]).
    namespace_deletion_grace: Duration,
    /// When each namespace's DELETE was accepted (by uid).
    namespace_deleted_at: HashMap<String, Instant>,
}

/// What a stored CRD serves: its storage version (the only one served, see
/// the module doc) and what the handlers need from it.
#[derive(Clone, Debug)]
struct CrdInfo {
    res: Res,
    singular: String,
    short_names: Vec<Value>,
    categories: Vec<Value>,
    schema: Value,
    status: bool,
    columns: Vec<Value>,
    /// `selectableFields`' paths without the leading dot (`spec.nodeName`).
    selectable: Vec<String>,
    terminating: bool,
}

impl CrdInfo {
    /// The CRD's served storage version, if it has one.
    fn of(crd: &Value) -> Option<CrdInfo> {
        let spec = crd.get("spec")?;
        let names = spec.get("names")?;
        let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let version = spec.get("versions")?.as_array()?.iter().find(|v| {
            v.get("storage").and_then(Value::as_bool) == Some(true)
                && v.get("served").and_then(Value::as_bool) == Some(true)
        })?;
        let kind = s(names, "kind");
        let list_kind = Some(s(names, "listKind"))
            .filter(|k| !k.is_empty())
            .unwrap_or_else(|| format!("{kind}List"));
        let group = s(spec, "group");
        let vname = s(version, "name");
        let res = intern_custom_kind(CustomKind {
            api_version: format!("{group}/{vname}"),
            group,
            version: vname,
            plural: s(names, "plural"),
            kind: kind.clone(),
            list_kind,
            namespaced: s(spec, "scope") == "Namespaced",
        });
        let arr = |v: &Value, k: &str| v.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
        Some(CrdInfo {
            res,
            singular: Some(s(names, "singular"))
                .filter(|k| !k.is_empty())
                .unwrap_or_else(|| kind.to_lowercase()),
            short_names: arr(names, "shortNames"),
            categories: arr(names, "categories"),
            schema: version.pointer("/schema/openAPIV3Schema").cloned().unwrap_or(json!({})),
            status: version.pointer("/subresources/status").is_some_and(|v| !v.is_null()),
            columns: arr(version, "additionalPrinterColumns"),
            selectable: arr(version, "selectableFields")
                .iter()
                .filter_map(|f| f.get("jsonPath")?.as_str())
                .map(|path| path.trim_start_matches('.').to_string())
                .collect(),
            terminating: meta_str(crd, "deletionTimestamp").is_some(),
        })
    }
}

impl State {
    fn new() -> Self {
        let mut s = State {
            rv: 1,
            floor: 1,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            watchers: vec![],
            next_watcher: 0,
            events_log: vec![],
            requests: vec![],
            kubelet: true,
            disruption_controller: true,
            bookmark_interval: Duration::from_secs(5),
            pod_side: HashMap::new(),
            pdb_events: HashSet::new(),
            field_validation: String::new(),
            warnings: vec![],
            applying: false,
            namespace_deletion_grace: NAMESPACE_DELETION_GRACE,
            namespace_deleted_at: HashMap::new(),
        };
        for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
            s.create(Res::Namespace, "", json!({"metadata": {"name": ns}}), false)
                .expect("namespace");
        }
        s
    }

    /// Every stored CRD's served resource.
    fn crd_infos(&self) -> Vec<CrdInfo> {
        self.list_objs(Res::Crd, None).iter().filter_map(CrdInfo::of).collect()
    }
    fn custom_lookup(&self, group: &str, version: &str, plural: &str) -> Option<CrdInfo> {
        let crd = self.get(Res::Crd, "", &format!("{plural}.{group}"))?;
        CrdInfo::of(crd).filter(|i| custom_kind_of(i.res).is_some_and(|k| k.version == version))
    }
    /// The CRD serving a custom resource (None for built-in kinds, or once
    /// the CRD is gone).
    fn crd_info(&self, res: Res) -> Option<CrdInfo> {
        let k = custom_kind_of(res)?;
        self.custom_lookup(&k.group, &k.version, &k.plural)
            .filter(|i| i.res == res)
    }
    fn has_status(&self, res: Res) -> bool {
        match res {
            Res::Custom(_) => self.crd_info(res).is_some_and(|i| i.status),
            _ => res.has_status(),
        }
    }

    fn get(&self, res: Res, ns: &str, name: &str) -> Option<&Value> {
        self.objects.get(&(res, ns.to_string(), name.to_string()))
    }
    fn get_or_404(&self, res: Res, ns: &str, name: &str) -> ApiResult<Value> {
        self.get(res, ns, name)
            .cloned()
            .ok_or_else(|| ApiError::not_found(res, name))
    }
    fn list_objs(&self, res: Res, ns: Option<&str>) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|((r, n, _), _)| *r == res && ns.is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Stores (or deletes, with `new == None`) an object at a new revision,
    /// records it in the history and fans it out to the watchers.
    fn commit(&mut self, res: Res, ns: &str, name: &str, new: Option<Value>) -> Option<Value> {
        self.rv += 1;
        let rv = self.rv;
        let key = (res, ns.to_string(), name.to_string());
        let prev = self.objects.get(&key).cloned();
        let stored = new.map(|mut o| {
            meta_mut(&mut o).insert("resourceVersion".into(), json!(rv.to_string()));
            self.objects.insert(key.clone(), o.clone());
            o
        });
        if stored.is_none() {
            self.objects.remove(&key);
        }
        let ev = HistEvent {
            rv,
            res,
            ns: ns.to_string(),
            obj: stored.clone(),
            prev,
        };
        self.watchers.retain(|w| match w.convert(&ev) {
            Some(line) => w.tx.send(WMsg::Event(line)).is_ok(),
            None => !w.tx.is_closed(),
        });
        self.history.push_back(ev);
        while self.history.len() > HISTORY {
            let old = self.history.pop_front().expect("non-empty");
            self.floor = old.rv;
        }
        stored.or_else(|| {
            let mut p = self.history.back().and_then(|e| e.prev.clone())?;
            meta_mut(&mut p).insert("resourceVersion".into(), json!(rv.to_string()));
            Some(p)
        })
    }

    /// State of `res` at revision `rv` (for Exact lists and continue tokens).
    fn snapshot_at(&self, res: Res, rv: u64) -> ApiResult<Vec<Value>> {
        if rv < self.floor {
            return Err(ApiError::expired(format!(
                "too old resource version: {rv} ({})",
                self.floor
            )));
        }
        let mut map: BTreeMap<(String, String), Option<Value>> = self
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == res)
            .map(|((_, ns, n), v)| ((ns.clone(), n.clone()), Some(v.clone())))
            .collect();
        for ev in self.history.iter().rev().take_while(|e| e.rv > rv) {
            if ev.res != res {
                continue;
            }
            let o = ev.obj.as_ref().or(ev.prev.as_ref()).expect("event has an object");
            map.insert((ev.ns.clone(), name_of(o).to_string()), ev.prev.clone());
        }
        Ok(map.into_values().flatten().collect())
    }

    /// A bearer token of [`KubeApi::service_account_token`] is accepted while
    /// its ServiceAccount exists with the same uid, and for 60 s after that
    /// ServiceAccount's deletion began (the leeway of kube-apiserver's
    /// `serviceaccount` token validator). Any other token is refused; requests
    /// without one are the cluster admin's.
    fn authenticates(&self, token: &str) -> bool {
        let mut parts = token.strip_prefix(SA_TOKEN_PREFIX).unwrap_or("").split(':');
        let (Some(ns), Some(name), Some(uid)) = (parts.next(), parts.next(), parts.next()) else {
            return false;
        };
        let Some(account) = self.get(Res::ServiceAccount, ns, name) else {
            return false;
        };
        let deleted_long_ago = meta_str(account, "deletionTimestamp")
            .and_then(parse_ts)
            .is_some_and(|at| jiff::Timestamp::now().as_second() - at.as_second() > SA_TOKEN_LEEWAY_SECONDS);
        meta_str(account, "uid") == Some(uid) && !deleted_long_ago
    }

    fn ensure_namespace(&self, res: Res, ns: &str) -> ApiResult<()> {
        if res.namespaced() && self.get(Res::Namespace, "", ns).is_none() {
            return Err(ApiError::not_found(Res::Namespace, ns));
        }
        Ok(())
    }

    // ---------------- create ----------------

    fn create(&mut self, res: Res, ns: &str, body: Value, dry_run: bool) -> ApiResult<Value> {
        let mut obj = prepare_body(res, body)?;
        // etcd3 store.Create refuses an object with a resourceVersion (a
        // Go uint other than 0): modelled for Leases only, the other kinds
        // drop it.
        let rv_set = res == Res::Lease
            && meta_str(&obj, "resourceVersion").is_some_and(|rv| {
                !rv.is_empty() && rv.bytes().all(|b| b.is_ascii_digit()) && rv.bytes().any(|b| b != b'0')
            });
        let m = meta_mut(&mut obj);
        if res.namespaced() {
            match m.get("namespace").and_then(Value::as_str) {
                Some(n) if !n.is_empty() && n != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                _ => {
                    m.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            m.remove("namespace");
        }
        let name = match m.get("name").and_then(Value::as_str).filter(|n| !n.is_empty()) {
            Some(n) => n.to_string(),
            None => match m.get("generateName").and_then(Value::as_str).filter(|n| !n.is_empty()) {
                Some(g) => {
                    let n = format!("{g}{}", random_suffix());
                    m.insert("name".into(), json!(n));
                    n
                }
                None => {
                    return Err(ApiError::invalid(
                        res,
                        "",
                        vec![(
                            "metadata.name".into(),
                            "Required value: name or generateName is required".into(),
                            "FieldValueRequired",
                        )],
                    ));
                }
            },
        };
        for f in [
            "uid",
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            m.remove(f);
        }
        m.insert("uid".into(), json!(new_uid()));
        m.insert("creationTimestamp".into(), json!(now_ts()));
        if res.tracks_generation() {
            m.insert("generation".into(), json!(1));
        } else {
            m.remove("generation");
        }
        let ns_key = if res.namespaced() { ns } else { "" };
        self.ensure_namespace(res, ns_key)?;
        if res.namespaced()
            && self
                .get(Res::Namespace, "", ns_key)
                .is_some_and(|n| meta_str(n, "deletionTimestamp").is_some())
        {
            return Err(ApiError::namespace_terminating(res, &name, ns_key));
        }
        if let Res::Custom(_) = res {
            let info = self.crd_info(res).ok_or_else(ApiError::not_found_path)?;
            if info.terminating {
                let mut e = ApiError::method_not_allowed();
                e.message = "create not allowed while custom resource definition is terminating".into();
                return Err(e);
            }
            // customResourceStrategy.PrepareForCreate: create cannot set status.
            if info.status {
                obj.as_object_mut().expect("object").remove("status");
            }
            self.admit_custom(res, &info, &mut obj)?;
        } else {
            default_and_reset_status(res, &mut obj, None);
        }
        if res == Res::Lease {
            lease_prepare(&mut obj, None);
        }
        let obj = res.canonical(obj).map_err(ApiError::bad_request)?;
        validate(res, &obj, None)?;
        let obj = storage_form(res, obj);
        if rv_set {
            // Not an API status: a 500 with no reason.
            return Err(ApiError::new(
                500,
                "",
                "resourceVersion should not be set on objects to be created",
            ));
        }
        if self.get(res, ns_key, &name).is_some() {
            return Err(ApiError::already_exists(res, &name));
        }
        if dry_run {
            return Ok(obj);
        }
        let stored = self.commit(res, ns_key, &name, Some(obj)).expect("stored");
        if res == Res::Pod {
            let uid = meta_str(&stored, "uid").unwrap_or("").to_string();
            self.pod_side.insert(
                uid,
                PodSide {
                    created: Instant::now(),
                    delete_requested: None,
                    terminated: false,
                },
            );
        }
        if matches!(res, Res::Event | Res::CoreEvent) {
            self.events_log.push(stored.clone());
        }
        Ok(stored)
    }

    /// The custom resource handler's decoding and the strategy's schema
    /// validation: unknown fields are pruned (a warning each with
    /// `fieldValidation=Warn`, the default; a 400 with `Strict`), defaults
    /// applied, then the object is checked against the version's
    /// openAPIV3Schema (422 with one cause per error).
    fn admit_custom(&mut self, res: Res, info: &CrdInfo, obj: &mut Value) -> ApiResult<()> {
        let mut check = SchemaCheck::default();
        check_schema(obj, &info.schema, "", true, &mut check);
        if !check.unknown.is_empty() && self.applying {
            // Apply patches are typed against the schema: unknown fields are
            // an error whatever fieldValidation says.
            let k = custom_kind_of(res).expect("custom kind");
            let fields: Vec<String> = check
                .unknown
                .iter()
                .map(|f| format!(".{f}: field not declared in schema"))
                .collect();
            return Err(ApiError::bad_request(format!(
                "failed to create typed patch object ({}, Kind={}): {}",
                k.api_version,
                k.kind,
                fields.join("\n")
            )));
        }
        if !check.unknown.is_empty() {
            let unknown: Vec<String> = check.unknown.iter().map(|f| format!("unknown field \"{f}\"")).collect();
            match self.field_validation.as_str() {
                "Strict" => {
                    let kind = res.kind();
                    let version = custom_kind_of(res).map_or("", |k| k.version.as_str());
                    return Err(ApiError::bad_request(format!(
                        "{kind} in version \"{version}\" cannot be handled as a {kind}: strict decoding error: {}",
                        unknown.join(", ")
                    )));
                }
                "Ignore" => {}
                _ => self.warnings.extend(unknown),
            }
        }
        if check.errs.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(res, name_of(obj), check.errs))
        }
    }

    // ---------------- update ----------------

    /// Replaces `name` with `new` (already merged for patches). `status_sub`:
    /// the request is on the `/status` subresource. `check_rv`: the body's
    /// resourceVersion, if any, must equal the stored one.
    fn update(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        new: Value,
        status_sub: bool,
        dry_run: bool,
    ) -> ApiResult<Value> {
        let old = self.get_or_404(res, ns, name)?;
        let mut obj = prepare_body(res, new)?;
        let body_name = meta_str(&obj, "name").unwrap_or("").to_string();
        if body_name.is_empty() {
            meta_mut(&mut obj).insert("name".into(), json!(name));
        } else if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        if res.namespaced() {
            let body_ns = meta_str(&obj, "namespace").unwrap_or("").to_string();
            if !body_ns.is_empty() && body_ns != ns {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            meta_mut(&mut obj).insert("namespace".into(), json!(ns));
        }
        // An empty resourceVersion is an unconditional update: allowed for
        // the other built-in kinds we store (AllowUnconditionalUpdate), not
        // for CRDs, custom resources and Leases.
        let body_rv = meta_str(&obj, "resourceVersion").filter(|rv| !rv.is_empty());
        if body_rv.is_none() && matches!(res, Res::Crd | Res::Custom(_) | Res::Lease) {
            return Err(ApiError::rv_required(res, name));
        }
        if body_rv.is_some() && body_rv != meta_str(&old, "resourceVersion") {
            return Err(ApiError::stale(res, name));
        }
        // Fields the server owns.
        {
            let om = old["metadata"].as_object().cloned().unwrap_or_default();
            let m = meta_mut(&mut obj);
            for f in [
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "deletionGracePeriodSeconds",
                "generation",
            ] {
                match om.get(f) {
                    Some(v) => m.insert(f.into(), v.clone()),
                    None => m.remove(f),
                };
            }
        }
        if res == Res::Lease {
            lease_prepare(&mut obj, Some(&old));
        }
        if self.has_status(res) {
            if status_sub {
                // Status strategy: only status changes.
                let status = obj.get("status").cloned();
                let mut o = old.clone();
                match status {
                    Some(s) => o["status"] = s,
                    None => {
                        o.as_object_mut().expect("object").remove("status");
                    }
                }
                meta_mut(&mut o).insert("resourceVersion".into(), json!(meta_str(&obj, "resourceVersion")));
                obj = o;
            } else {
                default_and_reset_status(res, &mut obj, Some(&old));
            }
        }
        let info = self.crd_info(res);
        if let Some(info) = &info {
            self.admit_custom(res, info, &mut obj)?;
            let mut errs = Vec::new();
            transition_rules(&obj, &old, &info.schema, "", &mut errs);
            if !errs.is_empty() {
                return Err(ApiError::invalid(res, name_of(&obj), errs));
            }
        }
        if res == Res::Crd && !status_sub {
            crd_accept_names(&mut obj);
        }
        // customResourceStrategy.PrepareForUpdate: anything but metadata
        // (status too, without a status subresource) is a new generation.
        let spec_changed = match res {
            Res::Custom(_) => !status_sub && non_metadata(&obj) != non_metadata(&old),
            _ => obj.get("spec") != old.get("spec"),
        };
        if res.tracks_generation() && spec_changed {
            let g = old.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0) + 1;
            meta_mut(&mut obj).insert("generation".into(), json!(g));
        }
        let obj = res.canonical(obj).map_err(ApiError::bad_request)?;
        validate(res, &obj, Some(&old))?;
        let obj = storage_form(res, obj);
        // Store.Update's shouldDeleteDuringUpdate: the last finalizer of an
        // object being deleted with no grace left is gone, and so is it.
        let emptied = !has_finalizers(&obj)
            && has_finalizers(&old)
            && meta_str(&old, "deletionTimestamp").is_some()
            && deletion_grace(&old).is_none_or(|g| g == 0);
        if dry_run {
            return Ok(obj);
        }
        if emptied {
            // deleteWithoutFinalizers answers the deleted object.
            return Ok(self.remove(res, ns, name));
        }
        let mut cmp_new = obj.clone();
        let mut cmp_old = old.clone();
        meta_mut(&mut cmp_new).remove("resourceVersion");
        meta_mut(&mut cmp_old).remove("resourceVersion");
        if cmp_new == cmp_old {
            // No-op updates do not bump the resourceVersion (real behaviour).
            return Ok(old);
        }
        let stored = self.commit(res, ns, name, Some(obj)).expect("stored");
        if matches!(res, Res::Event | Res::CoreEvent) {
            self.events_log.push(stored.clone());
        }
        Ok(stored)
    }

    /// PUT: the update handler's checkName (the body must name the object
    /// of the URL), a uid in the body is a precondition (rest's
    /// defaultUpdatedObjectInfo), and, for Leases (AllowCreateOnUpdate),
    /// a missing object is created (201) whatever resourceVersion the body
    /// carries; other kinds answer 404.
    fn put(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        body: Value,
        status_sub: bool,
        dry_run: bool,
    ) -> ApiResult<(u16, Value)> {
        let mut body = prepare_body(res, body)?;
        let body_name = meta_str(&body, "name").unwrap_or("");
        if body_name.is_empty() {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({name} based on URL) was undeterminable: name must be provided"
            )));
        }
        if body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(&body, "namespace").unwrap_or("");
        if res.namespaced() && !body_ns.is_empty() && body_ns != ns {
            return Err(ApiError::bad_request(format!(
                "the namespace of the object ({body_ns}) does not match the namespace on the URL ({ns})"
            )));
        }
        let existing = self.get(res, ns, name);
        if let Some(uid) = meta_str(&body, "uid").filter(|u| !u.is_empty()) {
            let actual = existing.and_then(|o| meta_str(o, "uid")).unwrap_or("");
            if uid != actual {
                return Err(ApiError::conflict(
                    res,
                    name,
                    &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
                ));
            }
        }
        if existing.is_none() && res == Res::Lease && !status_sub {
            // The storage's PrepareObjectForStorage clears the resourceVersion.
            meta_mut(&mut body).remove("resourceVersion");
            return self.create(res, ns, body, dry_run).map(|o| (201, o));
        }
        self.update(res, ns, name, body, status_sub, dry_run).map(|o| (200, o))
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        res: Res,
        ns: &str,
        name: &str,
        content_type: &str,
        body: &[u8],
        q: &Query,
        status_sub: bool,
    ) -> ApiResult<(u16, Value)> {
        let ct = content_type.split(';').next().unwrap_or("").trim();
        let is_apply = ct == "application/apply-patch+yaml";
        if !is_apply && q.get("force").is_some() {
            return Err(ApiError::invalid(
                res,
                name,
                vec![(
                    "force".into(),
                    "Forbidden: may not be specified for non-apply patch".into(),
                    "FieldValueForbidden",
                )],
            ));
        }
        if let Res::Custom(_) = res
            && !matches!(ct, "application/json-patch+json" | "application/merge-patch+json")
            && !is_apply
        {
            // Custom resources have no Go struct, hence no strategic merge patch.
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {ct:?})"
                ),
            ));
        }
        if !matches!(
            ct,
            "application/json-patch+json" | "application/merge-patch+json" | "application/strategic-merge-patch+json"
        ) && !is_apply
        {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {ct:?})"
                ),
            ));
        }
        if ct == "application/json-patch+json" {
            let old = self.get_or_404(res, ns, name)?;
            let ops: Vec<Value> = serde_json::from_slice(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
            let patched = json_patch(&old, &ops)?;
            // A resourceVersion left in the patched object is a precondition.
            return self
                .update(res, ns, name, patched, status_sub, q.get("dryRun").is_some())
                .map(|o| (200, o));
        }
        let patch: Value =
            serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding patch: {e}")))?;
        if !patch.is_object() {
            return Err(ApiError::bad_request(
                "error decoding patch: patch is not a JSON object",
            ));
        }
        let dry_run = q.get("dryRun").is_some();
        if is_apply {
            self.applying = true;
            if q.get("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::invalid(
                    res,
                    name,
                    vec![(
                        "fieldManager".into(),
                        "Required value: is required for apply patch".into(),
                        "FieldValueRequired",
                    )],
                ));
            }
            if patch.get("apiVersion").and_then(Value::as_str) != Some(res.api_version())
                || patch.get("kind").and_then(Value::as_str) != Some(res.kind())
            {
                return Err(ApiError::bad_request(format!(
                    "apply patch must specify apiVersion {} and kind {}",
                    res.api_version(),
                    res.kind()
                )));
            }
            if name_of(&patch) != name {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({}) does not match the name on the URL ({name})",
                    name_of(&patch)
                )));
            }
            if self.get(res, ns, name).is_none() {
                if status_sub {
                    return Err(ApiError::not_found(res, name));
                }
                // Server-side apply creates missing objects.
                return self.create(res, ns, patch, dry_run).map(|o| (201, o));
            }
        }
        let old = self.get_or_404(res, ns, name)?;
        let mut merged = old.clone();
        if ct == "application/strategic-merge-patch+json" {
            strategic_merge_patch(&mut merged, &patch);
        } else {
            merge_patch(&mut merged, &patch);
        }
        // A patch carrying a resourceVersion is a precondition; otherwise
        // patches apply to the latest version.
        if patch.pointer("/metadata/resourceVersion").is_none() {
            meta_mut(&mut merged).insert("resourceVersion".into(), old["metadata"]["resourceVersion"].clone());
        }
        self.update(res, ns, name, merged, status_sub, dry_run)
            .map(|o| (200, o))
    }

    // ---------------- delete ----------------

    /// DELETE as the generic registry store does it (rest.BeforeDelete and
    /// updateForGracefulDeletionAndFinalizers): a pod is deleted gracefully
    /// (deletionTimestamp = now + grace, kept for the kubelet) unless its
    /// grace is 0; an object with finalizers is only marked as being deleted
    /// (deletionTimestamp, deletionGracePeriodSeconds) and kept until its
    /// finalizers are gone, also on `--force --grace-period=0`.
    fn delete(&mut self, res: Res, ns: &str, name: &str, opts: &Value) -> ApiResult<(u16, Value)> {
        let obj = self.get_or_404(res, ns, name)?;
        if let Some(pre) = opts.get("preconditions") {
            if let Some(uid) = pre.get("uid").and_then(Value::as_str) {
                let actual = meta_str(&obj, "uid").unwrap_or("");
                if uid != actual {
                    return Err(ApiError::conflict(
                        res,
                        name,
                        &format!("Precondition failed: UID in precondition: {uid}, UID in object meta: {actual}"),
                    ));
                }
            }
            if let Some(rv) = pre.get("resourceVersion").and_then(Value::as_str) {
                let actual = meta_str(&obj, "resourceVersion").unwrap_or("");
                if rv != actual {
                    return Err(ApiError::conflict(
                        res,
                        name,
                        &format!(
                            "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {actual}"
                        ),
                    ));
                }
            }
        }
        let dry_run = opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if res == Res::Namespace {
            return Ok((200, self.delete_namespace(name, obj, dry_run)));
        }
        if res == Res::Crd {
            return self.delete_crd(name, obj, dry_run).map(|o| (200, o));
        }
        let finalizers = has_finalizers(&obj);
        let requested = opts.get("gracePeriodSeconds").and_then(Value::as_i64);
        let now = jiff::Timestamp::now().as_second();
        let mut o = obj.clone();
        let keep = match (
            meta_str(&obj, "deletionTimestamp").and_then(parse_ts),
            deletion_grace(&obj),
        ) {
            // Already being deleted with a grace period: only a shorter one
            // changes anything (the deletion timestamp moves earlier).
            (Some(ts), Some(g)) if g > 0 => match requested {
                Some(p) if p < g => {
                    let mut p = p.max(0);
                    let mut at = ts.as_second() - g + p;
                    if at < now {
                        at = now;
                        if p != 0 {
                            p = 1;
                        }
                    }
                    set_deletion(&mut o, at, p);
                    p > 0 || finalizers
                }
                _ => return Ok((200, obj)),
            },
            // Being deleted with no grace left: gone unless finalizers remain.
            (Some(ts), _) => {
                set_deletion(&mut o, ts.as_second().min(now), 0);
                finalizers
            }
            (None, _) if res == Res::Pod => {
                // podStrategy.CheckGracefulDelete.
                let mut period = requested
                    .or_else(|| {
                        obj.pointer("/spec/terminationGracePeriodSeconds")
                            .and_then(Value::as_i64)
                    })
                    .unwrap_or(0);
                let unscheduled = obj
                    .pointer("/spec/nodeName")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .is_empty();
                if unscheduled || matches!(pod_phase(&obj), "Succeeded" | "Failed") {
                    period = 0;
                }
                if period < 0 {
                    period = 1;
                }
                set_deletion(&mut o, now + period, period);
                bump_generation(&mut o);
                period > 0 || finalizers
            }
            // No graceful deletion for other kinds: markAsDeleting.
            (None, _) => {
                set_deletion(&mut o, now, 0);
                bump_generation(&mut o);
                finalizers
            }
        };
        if dry_run {
            return Ok((200, if keep { o } else { obj }));
        }
        if keep {
            let stored = if o == obj {
                obj
            } else {
                self.commit(res, ns, name, Some(o)).expect("stored")
            };
            if res == Res::Pod {
                let uid = meta_str(&stored, "uid").unwrap_or("").to_string();
                let side = self.pod_side.entry(uid).or_insert(PodSide {
                    created: Instant::now(),
                    delete_requested: None,
                    terminated: false,
                });
                side.delete_requested.get_or_insert(Instant::now());
            }
            return Ok((200, stored));
        }
        let gone = self.remove(res, ns, name);
        // A DELETE answers pods with the deleted pod, everything else with a
        // Status (the stores' ReturnDeletedObject).
        Ok((
            200,
            if res == Res::Pod {
                gone
            } else {
                success_status(res, &obj, 200)
            },
        ))
    }

    /// A namespace is never removed by its DELETE: the `kubernetes` finalizer
    /// of its spec keeps it, `Terminating`, until the namespace controller
    /// ([`State::namespace_tick`]) has deleted everything in it; objects whose
    /// finalizers hold them keep it Terminating for as long (observed on
    /// kube-apiserver 1.36, reference.md). The answer is the namespace.
    fn delete_namespace(&mut self, name: &str, obj: Value, dry_run: bool) -> Value {
        if meta_str(&obj, "deletionTimestamp").is_some() {
            return obj;
        }
        let mut o = obj;
        set_deletion(&mut o, jiff::Timestamp::now().as_second(), 0);
        o["status"] = json!({"phase": "Terminating"});
        if dry_run {
            return o;
        }
        let uid = meta_str(&o, "uid").unwrap_or("").to_string();
        self.namespace_deleted_at.insert(uid, Instant::now());
        self.commit(Res::Namespace, "", name, Some(o)).expect("stored")
    }

    /// The CRD registry's DELETE (its own, not the generic store's): the CRD
    /// gets a deletionTimestamp (no grace period, no new generation), the
    /// cleanup finalizer and a Terminating condition, and is answered;
    /// [`State::crd_tick`] (the CRD finalizer controller) deletes its
    /// instances, then the CRD.
    fn delete_crd(&mut self, name: &str, obj: Value, dry_run: bool) -> ApiResult<Value> {
        let mut o = obj.clone();
        let m = meta_mut(&mut o);
        if !m.get("deletionTimestamp").is_some_and(Value::is_string) {
            m.insert("deletionTimestamp".into(), json!(now_ts()));
        }
        if !m.get("finalizers").is_some_and(Value::is_array) {
            m.insert("finalizers".into(), json!([]));
        }
        let fins = m
            .get_mut("finalizers")
            .and_then(Value::as_array_mut)
            .expect("finalizers");
        if !fins.iter().any(|f| f == CRD_CLEANUP_FINALIZER) {
            fins.push(json!(CRD_CLEANUP_FINALIZER));
        }
        set_crd_condition(
            &mut o,
            "Terminating",
            "True",
            "InstanceDeletionPending",
            "CustomResourceDefinition marked for deletion; CustomResource deletion will begin soon",
        );
        let o = Res::Crd.canonical(o).map_err(ApiError::bad_request)?;
        if dry_run || o == obj {
            return Ok(o);
        }
        Ok(self.commit(Res::Crd, "", name, Some(o)).expect("stored"))
    }

    /// The CRD finalizer controller: deletes every instance of a CRD being
    /// deleted (their finalizers hold them), then drops its finalizer, and
    /// the CRD goes once no finalizer is left.
    fn crd_tick(&mut self) {
        let deleting: Vec<Value> = self
            .list_objs(Res::Crd, None)
            .into_iter()
            .filter(|c| meta_str(c, "deletionTimestamp").is_some() && finalizers(c).contains(&CRD_CLEANUP_FINALIZER))
            .collect();
        for crd in deleting {
            let name = name_of(&crd).to_string();
            let instances: Vec<(Res, String, String, bool)> = match CrdInfo::of(&crd) {
                Some(info) => self
                    .objects
                    .iter()
                    .filter(|((r, _, _), _)| *r == info.res)
                    .map(|((r, ns, n), o)| (*r, ns.clone(), n.clone(), meta_str(o, "deletionTimestamp").is_some()))
                    .collect(),
                None => vec![],
            };
            if instances.is_empty() {
                let mut c = crd.clone();
                let left: Vec<Value> = finalizers(&crd)
                    .into_iter()
                    .filter(|f| *f != CRD_CLEANUP_FINALIZER)
                    .map(|f| json!(f))
                    .collect();
                if left.is_empty() {
                    self.remove(Res::Crd, "", &name);
                    // Its storage is gone: open watches on it end.
                    if let Some(info) = CrdInfo::of(&crd) {
                        self.watchers.retain(|w| w.res != info.res);
                    }
                } else {
                    meta_mut(&mut c).insert("finalizers".into(), Value::Array(left));
                    if let Ok(c) = Res::Crd.canonical(c) {
                        self.commit(Res::Crd, "", &name, Some(c));
                    }
                }
                continue;
            }
            let mut c = crd.clone();
            set_crd_condition(
                &mut c,
                "Terminating",
                "True",
                "InstanceDeletionInProgress",
                "CustomResource deletion is in progress",
            );
            if let Ok(c) = Res::Crd.canonical(c)
                && c != crd
            {
                self.commit(Res::Crd, "", &name, Some(c));
            }
            for (res, ns, n, deleting) in instances {
                if !deleting {
                    let _ = self.delete(res, &ns, &n, &json!({}));
                }
            }
        }
    }

    /// kube-controller-manager's namespace controller: in each namespace being
    /// deleted, deletes every object (background propagation; pods gracefully,
    /// so the kubelet stops them; finalizers hold theirs), and removes the
    /// namespace once nothing is left in it.
    fn namespace_tick(&mut self) {
        let grace = self.namespace_deletion_grace;
        let terminating: Vec<String> = self
            .list_objs(Res::Namespace, None)
            .iter()
            .filter(|n| meta_str(n, "deletionTimestamp").is_some())
            .filter(|n| {
                self.namespace_deleted_at
                    .get(meta_str(n, "uid").unwrap_or(""))
                    .is_none_or(|at| at.elapsed() >= grace)
            })
            .map(|n| name_of(n).to_string())
            .collect();
        for ns in terminating {
            let content: Vec<(Res, String, bool)> = self
                .objects
                .iter()
                .filter(|((r, n, _), _)| r.namespaced() && *n == ns)
                .map(|((r, _, name), o)| (*r, name.clone(), meta_str(o, "deletionTimestamp").is_some()))
                .collect();
            if content.is_empty() {
                self.remove(Res::Namespace, "", &ns);
                continue;
            }
            for (res, name, deleting) in content {
                if !deleting {
                    let _ = self.delete(res, &ns, &name, &json!({"propagationPolicy": "Background"}));
                }
            }
        }
    }

    /// Removes an object from storage: the object as deleted.
    fn remove(&mut self, res: Res, ns: &str, name: &str) -> Value {
        let gone = self.commit(res, ns, name, None).expect("deleted object");
        if res == Res::Pod {
            self.pod_side.remove(meta_str(&gone, "uid").unwrap_or(""));
        }
        gone
    }

    // ---------------- eviction ----------------

    fn evict(&mut self, ns: &str, name: &str, body: &Value) -> ApiResult<(u16, Value)> {
        if let Some(av) = body.get("apiVersion").and_then(Value::as_str)
            && av != "policy/v1"
            && av != "policy/v1beta1"
        {
            return Err(ApiError::bad_request(format!("unsupported Eviction apiVersion {av:?}")));
        }
        if let Some(k) = body.get("kind").and_then(Value::as_str)
            && k != "Eviction"
        {
            return Err(ApiError::bad_request(format!("not a Eviction object: {k}")));
        }
        if name_of(body) != name {
            return Err(ApiError::bad_request(
                "name in URL does not match name in Eviction object",
            ));
        }
        let del_opts = body
            .get("deleteOptions")
            .cloned()
            .filter(|v| v.is_object())
            .unwrap_or(json!({}));
        let pod = self.get_or_404(Res::Pod, ns, name)?;
        let deleting = meta_str(&pod, "deletionTimestamp").is_some();
        if matches!(pod_phase(&pod), "Succeeded" | "Failed" | "Pending") || deleting {
            self.evict_delete(ns, name, &del_opts)?;
            return Ok((201, success_status_plain(201)));
        }
        let pdbs: Vec<Value> = self
            .list_objs(Res::Pdb, Some(ns))
            .into_iter()
            .filter(|p| object_selector_matches(p.pointer("/spec/selector"), &pod))
            .collect();
        if pdbs.len() > 1 {
            // Real: a Status with code 500 returned by the eviction REST handler.
            let mut e = ApiError::new(
                500,
                "",
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            );
            e.reason = "";
            return Err(e);
        }
        if let Some(pdb) = pdbs.into_iter().next() {
            let pdb_name = name_of(&pdb).to_string();
            let st = |k: &str| {
                pdb.pointer(&format!("/status/{k}"))
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
            };
            let mut decrement = true;
            if !pod_ready(&pod) {
                let always =
                    pdb.pointer("/spec/unhealthyPodEvictionPolicy").and_then(Value::as_str) == Some("AlwaysAllow");
                if always || (st("currentHealthy") >= st("desiredHealthy") && st("desiredHealthy") > 0) {
                    decrement = false;
                }
            }
            if decrement {
                let generation = pdb.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
                if st("observedGeneration") < generation {
                    return Err(too_many_requests(
                        10,
                        format!("The disruption budget {pdb_name} is still being processed by the server."),
                    ));
                }
                if st("disruptionsAllowed") < 0 {
                    let mut e = ApiError::new(
                        403,
                        "Forbidden",
                        format!(
                            "poddisruptionbudgets.policy \"{pdb_name}\" is forbidden: pdb disruptions allowed is negative"
                        ),
                    );
                    e.details = Some(Box::new(ApiError::details_for(Res::Pdb, &pdb_name)));
                    return Err(e);
                }
                if st("disruptionsAllowed") == 0 {
                    return Err(too_many_requests(
                        0,
                        format!(
                            "The disruption budget {pdb_name} needs {} healthy pods and has {} currently",
                            st("desiredHealthy"),
                            st("currentHealthy")
                        ),
                    ));
                }
                let mut p = pdb.clone();
                let allowed = st("disruptionsAllowed") - 1;
                p["status"]["disruptionsAllowed"] = json!(allowed);
                if allowed == 0 {
                    set_pdb_allowed_condition(&mut p);
                }
                if !p["status"]["disruptedPods"].is_object() {
                    p["status"]["disruptedPods"] = json!({});
                }
                p["status"]["disruptedPods"][name] = json!(now_ts());
                let p = Res::Pdb.canonical(p).map_err(ApiError::bad_request)?;
                self.commit(Res::Pdb, ns, &pdb_name, Some(p));
            } else {
                // Unready pod with a healthy budget: delete with an RV precondition.
                let mut o = del_opts.clone();
                o["preconditions"]["resourceVersion"] = json!(meta_str(&pod, "resourceVersion"));
                return match self.evict_delete(ns, name, &o) {
                    Ok(()) => Ok((201, success_status_plain(201))),
                    Err(e) if e.code == 409 => Err(too_many_requests(
                        10,
                        format!("The disruption budget {pdb_name} is still being processed by the server."),
                    )),
                    Err(e) => Err(e),
                };
            }
        }
        self.evict_delete(ns, name, &del_opts)?;
        Ok((201, success_status_plain(201)))
    }

    /// addConditionAndDeletePod: DisruptionTarget condition, then delete.
    fn evict_delete(&mut self, ns: &str, name: &str, opts: &Value) -> ApiResult<()> {
        let dry = opts
            .get("dryRun")
            .and_then(Value::as_array)
            .is_some_and(|a| !a.is_empty());
        if !dry {
            let mut pod = self.get_or_404(Res::Pod, ns, name)?;
            if let Some(rv) = opts.pointer("/preconditions/resourceVersion").and_then(Value::as_str)
                && Some(rv) != meta_str(&pod, "resourceVersion")
            {
                return Err(ApiError::conflict(Res::Pod, name, "the object has been modified"));
            }
            set_pod_condition(
                &mut pod,
                "DisruptionTarget",
                "True",
                "EvictionByEvictionAPI",
                "Eviction API: evicting",
            );
            let updated = Res::Pod.canonical(pod).map_err(ApiError::bad_request)?;
            let stored = self.commit(Res::Pod, ns, name, Some(updated)).expect("stored");
            let mut o = opts.clone();
            if o.pointer("/preconditions/resourceVersion").is_some() {
                o["preconditions"]["resourceVersion"] = json!(meta_str(&stored, "resourceVersion"));
            }
            self.delete(Res::Pod, ns, name, &o)?;
        }
        Ok(())
    }

    // ---------------- simulated components ----------------

    fn kubelet_tick(&mut self) {
        if !self.kubelet {
            return;
        }
        let now = Instant::now();
        let pods = self.list_objs(Res::Pod, None);
        for pod in pods {
            let node = pod.pointer("/spec/nodeName").and_then(Value::as_str).unwrap_or("");
            if node.is_empty() || self.get(Res::Node, "", node).is_none() {
                continue;
            }
            let ns = meta_str(&pod, "namespace").unwrap_or("").to_string();
            let name = name_of(&pod).to_string();
            let uid = meta_str(&pod, "uid").unwrap_or("").to_string();
            let side = self.pod_side.entry(uid.clone()).or_insert(PodSide {
                created: now,
                delete_requested: None,
                terminated: false,
            });
            if let Some(dts) = meta_str(&pod, "deletionTimestamp") {
                if side.terminated {
                    continue;
                }
                let requested = *side.delete_requested.get_or_insert(now);
                let grace = deletion_grace(&pod).unwrap_or(0).max(0) as u64;
                let due_cap = requested + KUBELET_MAX_GRACE.min(Duration::from_secs(grace));
                let due_ts = parse_ts(dts).is_some_and(|t| t <= jiff::Timestamp::now());
                if now < due_cap && !due_ts {
                    continue;
                }
                if !has_finalizers(&pod) {
                    // The kubelet's final DELETE with grace 0.
                    self.commit(Res::Pod, &ns, &name, None);
                    self.pod_side.remove(&uid);
                    continue;
                }
                // Containers stopped: the terminal status update, then the
                // DELETE with grace 0 that leaves the pod to its finalizers.
                side.terminated = true;
                let mut p = pod.clone();
                make_terminated(&mut p);
                let at = parse_ts(dts)
                    .map_or(0, |t| t.as_second())
                    .min(jiff::Timestamp::now().as_second());
                set_deletion(&mut p, at, 0);
                if let Ok(p) = Res::Pod.canonical(p) {
                    self.commit(Res::Pod, &ns, &name, Some(p));
                }
                continue;
            }
            if pod_phase(&pod) == "Pending" && now.duration_since(side.created) >= KUBELET_START_DELAY {
                let mut p = pod.clone();
                make_running(&mut p);
                if let Ok(p) = Res::Pod.canonical(p) {
                    self.commit(Res::Pod, &ns, &name, Some(p));
                }
            }
        }
    }

    fn disruption_tick(&mut self) {
        if !self.disruption_controller {
            return;
        }
        let pdbs = self.list_objs(Res::Pdb, None);
        for pdb in pdbs {
            let ns = meta_str(&pdb, "namespace").unwrap_or("").to_string();
            let name = name_of(&pdb).to_string();
            let pods: Vec<Value> = self
                .list_objs(Res::Pod, Some(&ns))
                .into_iter()
                .filter(|p| object_selector_matches(pdb.pointer("/spec/selector"), p))
                .collect();
            let (new, events) = compute_pdb(&pdb, &pods);
            if let Ok(new) = Res::Pdb.canonical(new)
                && new != pdb
            {
                self.commit(Res::Pdb, &ns, &name, Some(new));
            }
            for (reason, message) in events {
                self.record_pdb_event(&pdb, reason, message);
            }
        }
    }

    /// A Warning Event about a PDB from the controller manager's (core/v1)
    /// recorder, written once per PDB and reason. Not in `events_log`, which
    /// holds what clients wrote.
    fn record_pdb_event(&mut self, pdb: &Value, reason: &'static str, message: String) {
        let uid = meta_str(pdb, "uid").unwrap_or("").to_string();
        if !self.pdb_events.insert((uid.clone(), reason)) {
            return;
        }
        let ns = meta_str(pdb, "namespace").unwrap_or("").to_string();
        let event_name = format!("{}.{}", name_of(pdb), &new_uid().replace('-', "")[..16]);
        let now = now_ts();
        let event = json!({
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": event_name, "namespace": ns, "uid": new_uid(), "creationTimestamp": now},
            "involvedObject": {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "namespace": ns,
                               "name": name_of(pdb), "uid": uid, "resourceVersion": meta_str(pdb, "resourceVersion")},
            "reason": reason, "message": message, "type": "Warning", "count": 1,
            "source": {"component": "controllermanager"}, "reportingComponent": "controllermanager", "reportingInstance": "",
            "firstTimestamp": now, "lastTimestamp": now,
        });
        if let Ok(event) = Res::CoreEvent.canonical(event) {
            self.commit(Res::CoreEvent, &ns, &event_name, Some(event));
        }
    }
}

/// SetCRDCondition: the transition time moves only with the status.
fn set_crd_condition(crd: &mut Value, typ: &str, status: &str, reason: &str, message: &str) {
    if !crd["status"]["conditions"].is_array() {
        crd["status"]["conditions"] = json!([]);
    }
    let conds = crd["status"]["conditions"].as_array_mut().expect("array");
    let mut c =
        json!({"type": typ, "status": status, "reason": reason, "message": message, "lastTransitionTime": now_ts()});
    match conds.iter_mut().find(|x| x["type"] == typ) {
        Some(x) => {
            if x["status"] == status {
                c["lastTransitionTime"] = x["lastTransitionTime"].clone();
            }
            *x = c;
        }
        None => conds.push(c),
    }
}

fn too_many_requests(retry_after: u32, cause: String) -> ApiError {
    let mut e = ApiError::new(
        429,
        "TooManyRequests",
        "Cannot evict pod as it would violate the pod's disruption budget.",
    );
    e.details = Some(Box::new(StatusDetails {
        causes: Some(vec![StatusCause {
            reason: Some("DisruptionBudget".into()),
            message: Some(cause),
            field: None,
        }]),
        retry_after_seconds: Some(retry_after as i32).filter(|s| *s > 0),
        ..Default::default()
    }));
    e.retry_after = Some(retry_after).filter(|s| *s > 0);
    e
}

fn success_status_plain(code: i32) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code})
}

fn success_status(res: Res, obj: &Value, code: i32) -> Value {
    let mut details = json!({"name": name_of(obj), "kind": res.plural(), "uid": meta_str(obj, "uid")});
    if !res.group().is_empty() {
        details["group"] = json!(res.group());
    }
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details, "code": code})
}

fn set_pod_condition(pod: &mut Value, typ: &str, status: &str, reason: &str, message: &str) {
    if !pod["status"]["conditions"].is_array() {
        pod["status"]["conditions"] = json!([]);
    }
    let conds = pod["status"]["conditions"].as_array_mut().expect("array");
    let mut c = json!({"type": typ, "status": status, "lastProbeTime": null, "lastTransitionTime": now_ts()});
    if !reason.is_empty() {
        c["reason"] = json!(reason);
        c["message"] = json!(message);
    }
    match conds.iter_mut().find(|x| x["type"] == typ) {
        Some(x) => {
            if x["status"] == status {
                c["lastTransitionTime"] = x["lastTransitionTime"].clone();
            }
            *x = c;
        }
        None => conds.push(c),
    }
}

fn make_running(pod: &mut Value) {
    let now = now_ts();
    pod["status"]["phase"] = json!("Running");
    pod["status"]["startTime"] = json!(now);
    pod["status"]["hostIP"] = json!("127.0.0.1");
    pod["status"]["podIP"] = json!("10.0.0.1");
    for t in [
        "PodReadyToStartContainers",
        "Initialized",
        "Ready",
        "ContainersReady",
        "PodScheduled",
    ] {
        set_pod_condition(pod, t, "True", "", "");
    }
    let containers = pod
        .pointer("/spec/containers")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    pod["status"]["containerStatuses"] = Value::Array(
        containers
            .iter()
            .map(|c| {
                json!({
                    "name": c["name"], "image": c["image"], "imageID": "", "ready": true,
                    "restartCount": 0, "started": true, "containerID": format!("containerd://{}", new_uid()),
                    "state": {"running": {"startedAt": now}}, "lastState": {}
                })
            })
            .collect(),
    );
}

/// The kubelet's last status of a pod it stopped: containers terminated by
/// SIGTERM, so the pod is Failed and no longer Ready.
fn make_terminated(pod: &mut Value) {
    let now = now_ts();
    pod["status"]["phase"] = json!("Failed");
    for t in ["Ready", "ContainersReady"] {
        set_pod_condition(pod, t, "False", "PodCompleted", "");
    }
    if let Some(cs) = pod["status"]["containerStatuses"].as_array_mut() {
        for c in cs {
            c["ready"] = json!(false);
            c["started"] = json!(false);
            c["state"] = json!({"terminated": {"exitCode": 143, "reason": "Error", "startedAt": c["state"]["running"]["startedAt"], "finishedAt": now}});
        }
    }
}

/// metav1 SetStatusCondition on the PDB's `DisruptionAllowed` condition:
/// the transition time only moves when the status changes.
fn set_pdb_condition(pdb: &mut Value, status: &str, reason: &str, message: &str) {
    let og = pdb.pointer("/status/observedGeneration").cloned().unwrap_or(json!(0));
    let old_ltt = pdb
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .and_then(|cs| {
            cs.iter()
                .find(|c| c["type"] == "DisruptionAllowed" && c["status"] == status)
        })
        .map(|c| c["lastTransitionTime"].clone());
    let c = json!({
        "type": "DisruptionAllowed", "status": status, "reason": reason, "message": message,
        "observedGeneration": og, "lastTransitionTime": old_ltt.unwrap_or(json!(now_ts())),
    });
    pdb["status"]["conditions"] = json!([c]);
}

/// pdbhelper.UpdateDisruptionAllowedCondition.
fn set_pdb_allowed_condition(pdb: &mut Value) {
    if pdb
        .pointer("/status/disruptionsAllowed")
        .and_then(Value::as_i64)
        .unwrap_or(0)
        > 0
    {
        set_pdb_condition(pdb, "True", "SufficientPods", "");
    } else {
        set_pdb_condition(pdb, "False", "InsufficientPods", "");
    }
}

/// What the controller manager's RESTMapper and scale client make of a
/// controller owner reference (the disruption controller's getScaleController):
/// the scale of the controller, or the sync error. No workload controller
/// (ReplicaSet, StatefulSet, Deployment, ReplicationController) is ever
/// stored here, so a scalable kind is always "not found", as on a real server
/// whose controller object is missing.
fn controller_scale(pod: &Value, owner: &Value) -> Result<i64, String> {
    let api_version = owner["apiVersion"].as_str().unwrap_or("");
    let kind = owner["kind"].as_str().unwrap_or("");
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    let resource = match (group, kind) {
        ("apps", "ReplicaSet" | "StatefulSet" | "Deployment") | ("", "ReplicationController") => {
            return Err(format!("found no controllers for pod {:?}", name_of(pod)));
        }
        ("", "Node") => "nodes",
        ("", "Pod") => "pods",
        ("", "Namespace") => "namespaces",
        ("", "Service") => "services",
        ("", "ConfigMap") => "configmaps",
        ("", "Secret") => "secrets",
        ("apps", "DaemonSet") => "daemonsets.apps",
        ("batch", "Job") => "jobs.batch",
        ("batch", "CronJob") => "cronjobs.batch",
        _ => return Err(format!("no matches for kind {kind:?} in version {api_version:?}")),
    };
    Err(format!("{resource} does not implement the scale subresource"))
}

/// The disruption controller's getExpectedPodCount: `(expectedPods,
/// desiredHealthy, unmanaged pods)`, or the error that makes it fail safe.
fn expected_pod_count(pdb: &Value, pods: &[Value]) -> Result<(i64, i64, Vec<String>), String> {
    let expected_scale = || -> Result<(i64, Vec<String>), String> {
        let mut unmanaged = vec![];
        let mut total = 0;
        for pod in pods {
            match controller_ref(pod) {
                None => unmanaged.push(name_of(pod).to_string()),
                Some(owner) => total += controller_scale(pod, owner)?,
            }
        }
        Ok((total, unmanaged))
    };
    let spec = &pdb["spec"];
    if let Some(mu) = spec.get("maxUnavailable").filter(|v| !v.is_null()) {
        let (expected, unmanaged) = expected_scale()?;
        let mu = int_or_percent(mu, expected).unwrap_or(0);
        Ok((expected, (expected - mu).max(0), unmanaged))
    } else if let Some(ma) = spec.get("minAvailable").filter(|v| !v.is_null()) {
        if let Some(n) = ma.as_i64() {
            // Integer minAvailable: the selected pods alone, no controllers.
            Ok((pods.len() as i64, n, vec![]))
        } else {
            let (expected, unmanaged) = expected_scale()?;
            Ok((expected, int_or_percent(ma, expected).unwrap_or(0), unmanaged))
        }
    } else {
        Ok((0, 0, vec![]))
    }
}

/// The disruption controller's sync of one PDB: its new content and the
/// Warning events (reason, message) it records about it.
fn compute_pdb(pdb: &Value, pods: &[Value]) -> (Value, Vec<(&'static str, String)>) {
    let mut out = pdb.clone();
    let (expected, desired, unmanaged) = match expected_pod_count(pdb, pods) {
        Ok(counts) => counts,
        Err(e) => {
            // failSafe: nothing but disruptionsAllowed and the condition
            // changes, not even observedGeneration.
            out["status"]["disruptionsAllowed"] = json!(0);
            set_pdb_condition(&mut out, "False", "SyncFailed", &e);
            let event = format!("Failed to calculate the number of expected pods: {e}");
            return (out, vec![("CalculateExpectedPodCountFailed", event)]);
        }
    };
    let mut events = vec![];
    if !unmanaged.is_empty() {
        let selector = pdb["spec"]["selector"].to_string();
        events.push((
            "UnmanagedPods",
            format!(
                "Pods selected by this PodDisruptionBudget (selector: {selector}) were found to be unmanaged. As a result, the status of the PDB cannot be calculated correctly, which may result in undefined behavior. To account for these pods please set \".spec.minAvailable\" field of the PDB to an integer value."
            ),
        ));
    }
    let now = jiff::Timestamp::now();
    // disruptedPods: drop entries for pods gone or terminating, and expired ones.
    let mut disrupted = Map::new();
    if let Some(d) = pdb.pointer("/status/disruptedPods").and_then(Value::as_object) {
        for (k, v) in d {
            let pod = pods.iter().find(|p| name_of(p) == k);
            let alive = pod.is_some_and(|p| meta_str(p, "deletionTimestamp").is_none());
            let fresh = v
                .as_str()
                .and_then(parse_ts)
                .is_some_and(|t| t + jiff::SignedDuration::try_from(DISRUPTED_POD_TIMEOUT).expect("dur") > now);
            if alive && fresh {
                disrupted.insert(k.clone(), v.clone());
            }
        }
    }
    // countHealthyPods: Ready, not terminating, not just disrupted.
    let healthy = pods
        .iter()
        .filter(|p| meta_str(p, "deletionTimestamp").is_none())
        .filter(|p| !disrupted.contains_key(name_of(p)))
        .filter(|p| pod_ready(p))
        .count() as i64;
    let mut allowed = healthy - desired;
    if expected <= 0 || allowed <= 0 {
        allowed = 0;
    }
    let generation = pdb.pointer("/metadata/generation").cloned().unwrap_or(json!(0));
    out["status"]["observedGeneration"] = generation;
    out["status"]["currentHealthy"] = json!(healthy);
    out["status"]["desiredHealthy"] = json!(desired);
    out["status"]["expectedPods"] = json!(expected);
    out["status"]["disruptionsAllowed"] = json!(allowed);
    if disrupted.is_empty() {
        out["status"].as_object_mut().expect("status").remove("disruptedPods");
    } else {
        out["status"]["disruptedPods"] = Value::Object(disrupted);
    }
    set_pdb_allowed_condition(&mut out);
    (out, events)
}

/// Injects apiVersion/kind when missing (the real decoder defaults them from
/// the endpoint) and rejects a different one.
fn prepare_body(res: Res, mut body: Value) -> ApiResult<Value> {
    let Some(o) = body.as_object_mut() else {
        return Err(ApiError::bad_request("the body of the request is not a JSON object"));
    };
    match o.get("apiVersion").and_then(Value::as_str) {
        None | Some("") => {
            o.insert("apiVersion".into(), json!(res.api_version()));
        }
        Some(v) if v == res.api_version() => {}
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "the API version in the data ({v}) does not match the expected API version ({})",
                res.api_version()
            )));
        }
    }
    match o.get("kind").and_then(Value::as_str) {
        None | Some("") => {
            o.insert("kind".into(), json!(res.kind()));
        }
        Some(k) if k == res.kind() => {}
        Some(k) => {
            return Err(ApiError::bad_request(format!(
                "the kind in the data ({k}) does not match the expected kind ({})",
                res.kind()
            )));
        }
    }
    Ok(body)
}

/// Defaulting on create (old == None) and the "status is ignored on the main
/// resource" rule on update (only called for kinds with a status subresource).
fn default_and_reset_status(res: Res, obj: &mut Value, old: Option<&Value>) {
    if let Some(old) = old {
        // Only called for kinds with a status subresource.
        match old.get("status") {
            Some(s) => obj["status"] = s.clone(),
            None => {
                obj.as_object_mut().expect("object").remove("status");
            }
        }
        return;
    }
    match res {
        Res::Pod => {
            let spec = &mut obj["spec"];
            if spec.is_object() {
                let d = |spec: &mut Value, k: &str, v: Value| {
                    if spec.get(k).is_none_or(Value::is_null) {
                        spec[k] = v;
                    }
                };
                d(spec, "restartPolicy", json!("Always"));
                d(spec, "terminationGracePeriodSeconds", json!(30));
                d(spec, "dnsPolicy", json!("ClusterFirst"));
                d(spec, "schedulerName", json!("default-scheduler"));
                d(spec, "securityContext", json!({}));
                d(spec, "enableServiceLinks", json!(true));
                d(spec, "preemptionPolicy", json!("PreemptLowerPriority"));
                d(spec, "priority", json!(0));
                if let Some(cs) = spec.get_mut("containers").and_then(Value::as_array_mut) {
                    for c in cs {
                        let image = c.get("image").and_then(Value::as_str).unwrap_or("").to_string();
                        let last = image.rsplit('/').next().unwrap_or("");
                        let policy = if !last.contains(':') || image.ends_with(":latest") {
                            "Always"
                        } else {
                            "IfNotPresent"
                        };
                        d(c, "imagePullPolicy", json!(policy));
                        d(c, "terminationMessagePath", json!("/dev/termination-log"));
                        d(c, "terminationMessagePolicy", json!("File"));
                        d(c, "resources", json!({}));
                    }
                }
                // DefaultTolerationSeconds admission plugin.
                let tols = spec
                    .get("tolerations")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                let mut tols = tols;
                for key in ["node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"] {
                    if !tols.iter().any(|t| t["key"] == key) {
                        tols.push(
                            json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300}),
                        );
                    }
                }
                spec["tolerations"] = Value::Array(tols);
            }
            obj["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
        }
        Res::Pdb | Res::DaemonSet => {
            obj.as_object_mut().expect("object").remove("status");
        }
        Res::Namespace => {
            let name = name_of(obj).to_string();
            obj["status"] = json!({"phase": "Active"});
            obj["spec"] = json!({"finalizers": ["kubernetes"]});
            let m = meta_mut(obj);
            if !m.get("labels").is_some_and(Value::is_object) {
                m.insert("labels".into(), json!({}));
            }
            m.get_mut("labels").expect("labels")["kubernetes.io/metadata.name"] = json!(name);
        }
        Res::Node if obj.get("status").is_none() => {
            obj["status"] = json!({});
        }
        Res::Crd => {
            // SetDefaults_CustomResourceDefinitionSpec, then what the naming
            // and establishing controllers write at once on a real server.
            let spec = &mut obj["spec"];
            if spec.is_object() {
                if let Some(names) = spec.get_mut("names").filter(|n| n.is_object()) {
                    let kind = names.get("kind").and_then(Value::as_str).unwrap_or("").to_string();
                    if names.get("singular").and_then(Value::as_str).unwrap_or("").is_empty() {
                        names["singular"] = json!(kind.to_lowercase());
                    }
                    if names.get("listKind").and_then(Value::as_str).unwrap_or("").is_empty() && !kind.is_empty() {
                        names["listKind"] = json!(format!("{kind}List"));
                    }
                }
                if spec.get("conversion").is_none_or(Value::is_null) {
                    spec["conversion"] = json!({"strategy": "None"});
                }
            }
            let now = now_ts();
            obj["status"] = json!({
                "conditions": [
                    {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "message": "no conflicts found", "lastTransitionTime": now},
                    {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": "the initial names have been accepted", "lastTransitionTime": now},
                ],
                "acceptedNames": {},
                "storedVersions": [],
            });
            crd_accept_names(obj);
        }
        _ => {}
    }
}

/// The naming controller's `acceptedNames` (the spec's names: no conflict
/// checks) and the storage version added to `storedVersions`.
fn crd_accept_names(crd: &mut Value) {
    let names = crd.pointer("/spec/names").cloned().unwrap_or(json!({}));
    if !crd["status"].is_object() {
        crd["status"] = json!({});
    }
    crd["status"]["acceptedNames"] = names;
    let storage = crd
        .pointer("/spec/versions")
        .and_then(Value::as_array)
        .and_then(|vs| {
            vs.iter()
                .find(|v| v.get("storage").and_then(Value::as_bool) == Some(true))
        })
        .and_then(|v| v.get("name").cloned());
    if let Some(storage) = storage {
        if !crd["status"]["storedVersions"].is_array() {
            crd["status"]["storedVersions"] = json!([]);
        }
        let stored = crd["status"]["storedVersions"].as_array_mut().expect("array");
        if !stored.contains(&storage) {
            stored.push(storage);
        }
    }
}

/// An object without its metadata (copyNonMetadata).
fn non_metadata(obj: &Value) -> Value {
    let mut o = obj.clone();
    if let Some(m) = o.as_object_mut() {
        m.remove("metadata");
    }
    o
}

fn validate(res: Res, obj: &Value, old: Option<&Value>) -> ApiResult<()> {
    let name = name_of(obj).to_string();
    let mut errs: Vec<(String, String, &'static str)> = vec![];
    // apiextensions validates ObjectMeta with apimachinery's rules: any
    // qualified finalizer name (the domain-less ones only warn).
    let any_qualified = matches!(res, Res::Crd | Res::Custom(_));
    validate_finalizers(obj, old, any_qualified, &mut errs);
    let name_ok = match res {
        Res::Namespace => is_dns_label(&name),
        _ => is_dns_subdomain(&name),
    };
    if !name_ok {
        errs.push((
            "metadata.name".into(),
            invalid_value(&name, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            "FieldValueInvalid",
        ));
    }
    match res {
        Res::Pod => {
            let cs = obj.pointer("/spec/containers").and_then(Value::as_array);
            match cs {
                None => errs.push(("spec.containers".into(), "Required value".into(), "FieldValueRequired")),
                Some(cs) if cs.is_empty() => {
                    errs.push(("spec.containers".into(), "Required value".into(), "FieldValueRequired"))
                }
                Some(cs) => {
                    for (i, c) in cs.iter().enumerate() {
                        let n = c.get("name").and_then(Value::as_str).unwrap_or("");
                        if !is_dns_label(n) {
                            errs.push((
                                format!("spec.containers[{i}].name"),
                                invalid_value(n, "must be a DNS label"),
                                "FieldValueInvalid",
                            ));
                        }
                        if c.get("image").and_then(Value::as_str).unwrap_or("").is_empty() {
                            errs.push((
                                format!("spec.containers[{i}].image"),
                                "Required value".into(),
                                "FieldValueRequired",
                            ));
                        }
                    }
                }
            }
            if let Some(old) = old {
                // Pod spec is immutable but for images (and a few we do not model).
                let strip = |v: &Value| {
                    let mut s = v.get("spec").cloned().unwrap_or(json!({}));
                    for k in ["containers", "initContainers"] {
                        if let Some(cs) = s.get_mut(k).and_then(Value::as_array_mut) {
                            for c in cs {
                                c.as_object_mut().map(|c| c.remove("image"));
                            }
                        }
                    }
                    s.as_object_mut().map(|s| s.remove("activeDeadlineSeconds"));
                    s
                };
                if strip(obj) != strip(old) {
                    errs.push((
                        "spec".into(),
                        "Forbidden: pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)".into(),
                        "FieldValueForbidden",
                    ));
                }
            }
        }
        Res::Pdb => {
            let spec = &obj["spec"];
            let has = |k: &str| spec.get(k).is_some_and(|v| !v.is_null());
            if has("minAvailable") && has("maxUnavailable") {
                errs.push((
                    "spec".into(),
                    "Invalid value: \"{...}\": minAvailable and maxUnavailable cannot be both set".into(),
                    "FieldValueInvalid",
                ));
            }
            for k in ["minAvailable", "maxUnavailable"] {
                if let Some(v) = spec.get(k) {
                    let bad = match v {
                        Value::Number(n) => n.as_i64().is_none_or(|n| n < 0),
                        Value::String(s) => s
                            .strip_suffix('%')
                            .and_then(|p| p.parse::<i64>().ok())
                            .is_none_or(|p| !(0..=100).contains(&p)),
                        _ => false,
                    };
                    if bad {
                        errs.push((
                            format!("spec.{k}"),
                            invalid_value(&v.to_string(), "must be greater than or equal to 0 / a valid percent"),
                            "FieldValueInvalid",
                        ));
                    }
                }
            }
        }
        Res::Event | Res::CoreEvent => validate_event(res, obj, old, &mut errs),
        Res::Lease => validate_lease_spec(obj, &mut errs),
        Res::ConfigMap => validate_config_map(obj, old, &mut errs),
        Res::Crd => {
            validate_crd(obj, &mut errs);
            if let Some(old) = old
                && obj.pointer("/spec/scope") != old.pointer("/spec/scope")
            {
                let scope = obj.pointer("/spec/scope").and_then(Value::as_str).unwrap_or("");
                errs.push((
                    "spec.scope".into(),
                    invalid_value(scope, "field is immutable"),
                    "FieldValueInvalid",
                ));
            }
        }
        _ => {}
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(res, &name, errs))
    }
}

/// ValidateLeaseSpec (pkg/apis/coordination/validation). Its `strategy` and
/// `preferredHolder` rules never apply: [`lease_prepare`] drops both fields.
fn validate_lease_spec(lease: &Value, errs: &mut Vec<(String, String, &'static str)>) {
    let spec = &lease["spec"];
    if let Some(d) = spec.get("leaseDurationSeconds").and_then(Value::as_i64)
        && d <= 0
    {
        errs.push((
            "spec.leaseDurationSeconds".into(),
            format!("Invalid value: {d}: must be greater than 0"),
            "FieldValueInvalid",
        ));
    }
    if let Some(t) = spec.get("leaseTransitions").and_then(Value::as_i64)
        && t < 0
    {
        errs.push((
            "spec.leaseTransitions".into(),
            format!("Invalid value: {t}: must be greater than or equal to 0"),
            "FieldValueInvalid",
        ));
    }
}

/// leaseStrategy's PrepareForCreate/PrepareForUpdate with the
/// CoordinatedLeaderElection feature gate off (its default, beta in 1.33):
/// `spec.strategy` and `spec.preferredHolder` are dropped unless the stored
/// Lease has them (it never does).
fn lease_prepare(lease: &mut Value, old: Option<&Value>) {
    let Some(spec) = lease.get_mut("spec").and_then(Value::as_object_mut) else {
        return;
    };
    for field in ["strategy", "preferredHolder"] {
        let kept = old
            .and_then(|o| o.pointer(&format!("/spec/{field}")))
            .is_some_and(|v| !v.is_null());
        if !kept {
            spec.remove(field);
        }
    }
}

/// ValidateConfigMap's limit on the values of `data` and `binaryData`
/// together (core.MaxSecretSize).
const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024;

/// What Go's encoding/json (kube-apiserver's typed decoder) makes of a
/// ConfigMap's fields before k8s-openapi decodes it: a `null` in `data` or
/// `binaryData` is the element's zero value (`""`, no bytes); anything but a
/// string there (or a non-bool `immutable`) is Go's UnmarshalTypeError. The
/// caller prefixes the "cannot be handled as a ConfigMap" of the 400.
/// `binaryData` is then base64-decoded by k8s-openapi: padding and canonical
/// trailing bits are required and line breaks refused (Go's StdEncoding skips
/// `\r`/`\n` and ignores trailing bits: stricter, never more lenient).
fn config_map_decode(mut cm: Value) -> Result<Value, String> {
    for (field, go_type) in [("data", "string"), ("binaryData", "[]uint8")] {
        let entries = match cm.get_mut(field) {
            None | Some(Value::Null) => continue,
            Some(Value::Object(entries)) => entries,
            Some(other) => return Err(go_unmarshal_error(other, field, &format!("map[string]{go_type}"))),
        };
        for value in entries.values_mut() {
            match value {
                Value::String(_) => {}
                Value::Null => *value = json!(""),
                other => return Err(go_unmarshal_error(other, field, go_type)),
            }
        }
    }
    if let Some(i) = cm.get("immutable").filter(|i| !i.is_null() && !i.is_boolean()) {
        return Err(go_unmarshal_error(i, "immutable", "bool"));
    }
    Ok(cm)
}

/// Go's `json: cannot unmarshal KIND into Go struct field ConfigMap.FIELD of type T`.
fn go_unmarshal_error(v: &Value, field: &str, go_type: &str) -> String {
    let kind = match v {
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        _ => "object",
    };
    format!("json: cannot unmarshal {kind} into Go struct field ConfigMap.{field} of type {go_type}")
}

/// ValidateConfigMapUpdate and ValidateConfigMap (pkg/apis/core/validation)
/// on a decoded ConfigMap: once `immutable: true`, `data`, `binaryData` and
/// `immutable` itself may not change (Go's reflect.DeepEqual: an empty map
/// differs from none); keys must be config keys, none in both maps; the
/// values may total [`CONFIG_MAP_MAX_BYTES`] (binaryData counted decoded).
fn validate_config_map(cm: &Value, old: Option<&Value>, errs: &mut Vec<(String, String, &'static str)>) {
    let immutable = |o: &Value| o.get("immutable").and_then(Value::as_bool) == Some(true);
    if let Some(old) = old.filter(|o| immutable(o)) {
        const WHY: &str = "Forbidden: field is immutable when `immutable` is set";
        if !immutable(cm) {
            errs.push(("immutable".into(), WHY.into(), "FieldValueForbidden"));
        }
        for field in ["data", "binaryData"] {
            if cm.get(field) != old.get(field) {
                errs.push((field.into(), WHY.into(), "FieldValueForbidden"));
            }
        }
    }
    let entries = |field: &str| cm.get(field).and_then(Value::as_object);
    let (data, binary) = (entries("data"), entries("binaryData"));
    let invalid_key = |field: &str, key: &str, why: &str| {
        (
            format!("{field}[{key}]"),
            format!("Invalid value: {}: {why}", go_quote(key)),
            "FieldValueInvalid",
        )
    };
    let mut total = 0;
    for (key, value) in data.into_iter().flatten() {
        errs.extend(config_key_errors(key).iter().map(|why| invalid_key("data", key, why)));
        if binary.is_some_and(|b| b.contains_key(key)) {
            errs.push(invalid_key("data", key, "duplicate of key present in binaryData"));
        }
        total += value.as_str().map_or(0, str::len);
    }
    for (key, value) in binary.into_iter().flatten() {
        errs.extend(
            config_key_errors(key)
                .iter()
                .map(|why| invalid_key("binaryData", key, why)),
        );
        total += value.as_str().map_or(0, base64_decoded_len);
    }
    if total > CONFIG_MAP_MAX_BYTES {
        // field.TooLong on the root path (shown as `[]`), in its 1.32+ words.
        errs.push((
            "[]".into(),
            format!("Too long: may not be more than {CONFIG_MAP_MAX_BYTES} bytes"),
            "FieldValueTooLong",
        ));
    }
}

/// apimachinery's IsConfigMapKey: its messages, in its order.
fn config_key_errors(key: &str) -> Vec<String> {
    let mut errs = vec![];
    if key.len() > 253 {
        errs.push("must be no more than 253 characters".to_string());
    }
    let charset = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
    if key.is_empty() || !key.bytes().all(charset) {
        errs.push(
            "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
                .to_string(),
        );
    }
    match key {
        "." => errs.push("must not be '.'".to_string()),
        ".." => errs.push("must not be '..'".to_string()),
        k if k.starts_with("..") => errs.push("must not start with '..'".to_string()),
        _ => {}
    }
    errs
}

/// The byte length of canonical (padded) base64, as k8s-openapi writes it.
fn base64_decoded_len(b64: &str) -> usize {
    let padding = b64.bytes().rev().take_while(|b| *b == b'=').count();
    (b64.len() / 4 * 3).saturating_sub(padding)
}

/// Go's `%q` (strconv.Quote) of a string, for the values of field errors.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// An object as storage gives it back: protobuf keeps no empty map, and
/// Go's `omitempty` then writes none, so a ConfigMap's empty `data` and
/// `binaryData` are gone (after validation, which sees them).
fn storage_form(res: Res, mut obj: Value) -> Value {
    if res == Res::ConfigMap
        && let Some(o) = obj.as_object_mut()
    {
        o.retain(|k, v| !(matches!(k.as_str(), "data" | "binaryData") && v.as_object().is_some_and(Map::is_empty)));
    }
    obj
}

#[derive(Default)]
struct SchemaCheck {
    errs: Vec<(String, String, &'static str)>,
    /// Paths of pruned fields (`spec.foo`).
    unknown: Vec<String>,
}

/// The JSON type name kube-openapi reports for a value.
fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_f64() => "number",
        Value::Number(_) => "integer",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn is_true(s: &Value, k: &str) -> bool {
    s.get(k).and_then(Value::as_bool) == Some(true)
}

/// kube-openapi strfmt's IsDateTime: a date, `T` (any case), then
/// `HH:MM:SS`, optional fraction, `Z` or `±HH:MM` (RFC 3339 full-time).
fn is_date_time(s: &str) -> bool {
    let lower = s.to_ascii_lowercase();
    let Some((date, time)) = lower.split_once('t') else {
        return false;
    };
    if jiff::civil::Date::strptime("%Y-%m-%d", date).is_err() {
        return false;
    }
    let b = time.as_bytes();
    let two = |i: usize| b.get(i..i + 2).filter(|d| d.iter().all(u8::is_ascii_digit));
    let (Some(h), Some(m), Some(sec)) = (two(0), two(3), two(6)) else {
        return false;
    };
    if b.get(2) != Some(&b':') || b.get(5) != Some(&b':') || h > &b"23"[..] || m > &b"59"[..] || sec > &b"59"[..] {
        return false;
    }
    let mut rest = &time[8..];
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return false;
        }
        rest = &frac[digits..];
    }
    let z = rest.as_bytes();
    rest == "z"
        || (z.len() == 6
            && matches!(z[0], b'+' | b'-')
            && z[1..3].iter().all(u8::is_ascii_digit)
            && z[3] == b':'
            && z[4..6].iter().all(u8::is_ascii_digit))
}

/// Structural pruning, defaulting and kube-openapi validation of `v` against
/// schema `s` at `path` (`spec.maxParallel`, `spec.items[0]`).
fn check_schema(v: &mut Value, s: &Value, path: &str, root: bool, out: &mut SchemaCheck) {
    let child = |k: &str| {
        if path.is_empty() {
            k.to_string()
        } else {
            format!("{path}.{k}")
        }
    };
    if v.is_null() && is_true(s, "nullable") {
        return;
    }
    let typ = s.get("type").and_then(Value::as_str).unwrap_or("");
    let actual = json_type(v);
    let type_ok = if is_true(s, "x-kubernetes-int-or-string") {
        matches!(actual, "integer" | "string") || (actual == "number" && v.as_f64().is_some_and(|f| f.fract() == 0.0))
    } else {
        match typ {
            "" => true,
            "number" => matches!(actual, "integer" | "number"),
            // IsFloat64AJSONInteger: 1.0 is an integer.
            "integer" => actual == "integer" || (actual == "number" && v.as_f64().is_some_and(|f| f.fract() == 0.0)),
            t => actual == t,
        }
    };
    if !type_ok {
        let want = if is_true(s, "x-kubernetes-int-or-string") {
            "integer,string"
        } else {
            typ
        };
        out.errs.push((
            path.to_string(),
            format!("Invalid value: \"{actual}\": {path} in body must be of type {want}: \"{actual}\""),
            "FieldValueTypeInvalid",
        ));
        return;
    }
    if let Some(allowed) = s.get("enum").and_then(Value::as_array)
        && !allowed.contains(v)
    {
        let values: Vec<String> = allowed
            .iter()
            .map(|a| match a {
                Value::String(x) => format!("{x:?}"),
                other => format!("{:?}", other.to_string()),
            })
            .collect();
        out.errs.push((
            path.to_string(),
            format!("Unsupported value: {v}: supported values: {}", values.join(", ")),
            "FieldValueNotSupported",
        ));
    }
    match v {
        Value::String(x) => {
            let bad_format = match s.get("format").and_then(Value::as_str) {
                Some("date-time") => !is_date_time(x),
                Some("date") => jiff::civil::Date::strptime("%Y-%m-%d", x).is_err(),
                _ => false,
            };
            if bad_format {
                let f = s["format"].as_str().unwrap_or("");
                out.errs.push((
                    path.to_string(),
                    format!("Invalid value: {v}: {path} in body must be of type {f}: {v}"),
                    "FieldValueTypeInvalid",
                ));
            }
        }
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(0.0);
            let num = |k: &str| s.get(k).and_then(Value::as_f64);
            let show = |f: f64| {
                if f.fract() == 0.0 {
                    format!("{}", f as i64)
                } else {
                    f.to_string()
                }
            };
            if let Some(min) = num("minimum") {
                let excl = is_true(s, "exclusiveMinimum");
                if x < min || (excl && x == min) {
                    let how = if excl {
                        "greater than"
                    } else {
                        "greater than or equal to"
                    };
                    out.errs.push((
                        path.to_string(),
                        format!("Invalid value: {n}: {path} in body should be {how} {}", show(min)),
                        "FieldValueInvalid",
                    ));
                }
            }
            if let Some(max) = num("maximum") {
                let excl = is_true(s, "exclusiveMaximum");
                if x > max || (excl && x == max) {
                    let how = if excl { "less than" } else { "less than or equal to" };
                    out.errs.push((
                        path.to_string(),
                        format!("Invalid value: {n}: {path} in body should be {how} {}", show(max)),
                        "FieldValueInvalid",
                    ));
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = s.get("items").filter(|i| i.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    check_schema(item, item_schema, &format!("{path}[{i}]"), false, out);
                }
            }
        }
        Value::Object(m) => {
            let props = s.get("properties").and_then(Value::as_object);
            let additional = s.get("additionalProperties");
            let preserve = is_true(s, "x-kubernetes-preserve-unknown-fields");
            let keys: Vec<String> = m.keys().cloned().collect();
            for k in keys {
                if root && matches!(k.as_str(), "apiVersion" | "kind" | "metadata") {
                    continue;
                }
                let sub = props.and_then(|p| p.get(&k)).or(additional.filter(|a| a.is_object()));
                let Some(sub) = sub else {
                    if !preserve && additional != Some(&Value::Bool(true)) {
                        m.remove(&k);
                        out.unknown.push(child(&k));
                    }
                    continue;
                };
                let value = m.get_mut(&k).expect("key");
                if value.is_null() && !is_true(sub, "nullable") {
                    // PruneNonNullableNullsWithoutDefaults (or the default, below).
                    m.remove(&k);
                    continue;
                }
                check_schema(value, sub, &child(&k), false, out);
            }
            for (k, sub) in props.into_iter().flatten() {
                if !m.contains_key(k)
                    && let Some(d) = sub.get("default")
                {
                    m.insert(k.clone(), d.clone());
                }
            }
            for req in s.get("required").and_then(Value::as_array).into_iter().flatten() {
                if let Some(req) = req.as_str()
                    && !m.contains_key(req)
                {
                    out.errs
                        .push((child(req), "Required value".into(), "FieldValueRequired"));
                }
            }
        }
        _ => {}
    }
}

/// The essentials of ValidateCustomResourceDefinition.
fn validate_crd(crd: &Value, errs: &mut Vec<(String, String, &'static str)>) {
    let spec = crd.get("spec").cloned().unwrap_or(json!({}));
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let names = spec.get("names").cloned().unwrap_or(json!({}));
    let (group, plural, kind) = (s(&spec, "group"), s(&names, "plural"), s(&names, "kind"));
    let name = name_of(crd);
    if name != format!("{plural}.{group}") {
        errs.push((
            "metadata.name".into(),
            invalid_value(name, "must be spec.names.plural+\".\"+spec.group"),
            "FieldValueInvalid",
        ));
    }
    if group.is_empty() {
        errs.push(("spec.group".into(), "Required value".into(), "FieldValueRequired"));
    } else if !group.contains('.') {
        errs.push((
            "spec.group".into(),
            invalid_value(&group, "should be a domain with at least one dot"),
            "FieldValueInvalid",
        ));
    } else if !is_dns_subdomain(&group) {
        errs.push((
            "spec.group".into(),
            invalid_value(&group, "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character"),
            "FieldValueInvalid",
        ));
    }
    for (field, value) in [("plural", &plural), ("kind", &kind)] {
        if value.is_empty() {
            errs.push((
                format!("spec.names.{field}"),
                "Required value".into(),
                "FieldValueRequired",
            ));
        }
    }
    if !plural.is_empty() && !is_dns_label(&plural) {
        errs.push((
            "spec.names.plural".into(),
            invalid_value(
                &plural,
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-'",
            ),
            "FieldValueInvalid",
        ));
    }
    match s(&spec, "scope").as_str() {
        "Cluster" | "Namespaced" => {}
        "" => errs.push(("spec.scope".into(), "Required value".into(), "FieldValueRequired")),
        other => errs.push((
            "spec.scope".into(),
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
            "FieldValueNotSupported",
        )),
    }
    let versions = spec
        .get("versions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if versions.is_empty() {
        errs.push((
            "spec.versions".into(),
            "Invalid value: \"null\": must have exactly one version marked as storage version".into(),
            "FieldValueInvalid",
        ));
    } else if versions.iter().filter(|v| is_true(v, "storage")).count() != 1 {
        errs.push((
            "spec.versions".into(),
            "Invalid value: \"[...]\": must have exactly one version marked as storage version".into(),
            "FieldValueInvalid",
        ));
    }
    for (i, v) in versions.iter().enumerate() {
        let vpath = format!("spec.versions[{i}]");
        let vname = s(v, "name");
        if !is_dns_label(&vname) {
            errs.push((
                format!("{vpath}.name"),
                invalid_value(
                    &vname,
                    "a DNS-1035 label must consist of lower case alphanumeric characters or '-'",
                ),
                "FieldValueInvalid",
            ));
        }
        match v.pointer("/schema/openAPIV3Schema").filter(|s| s.is_object()) {
            None => errs.push((
                format!("{vpath}.schema.openAPIV3Schema"),
                "Required value: schemas are required".into(),
                "FieldValueRequired",
            )),
            Some(schema) => structural(schema, &format!("{vpath}.schema.openAPIV3Schema"), true, errs),
        }
        for (j, c) in v
            .get("additionalPrinterColumns")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            let cpath = format!("{vpath}.additionalPrinterColumns[{j}]");
            if s(c, "name").is_empty() {
                errs.push((format!("{cpath}.name"), "Required value".into(), "FieldValueRequired"));
            }
            let t = s(c, "type");
            if !matches!(t.as_str(), "integer" | "number" | "string" | "boolean" | "date") {
                errs.push((
                    format!("{cpath}.type"),
                    format!("Unsupported value: {t:?}: supported values: \"boolean\", \"date\", \"integer\", \"number\", \"string\""),
                    "FieldValueNotSupported",
                ));
            }
            if s(c, "jsonPath").is_empty() {
                errs.push((
                    format!("{cpath}.jsonPath"),
                    "Required value".into(),
                    "FieldValueRequired",
                ));
            }
        }
    }
}

/// The structural schema rules we check: every node has a type unless it
/// is int-or-string or preserves unknown fields; the root is an object.
fn structural(s: &Value, path: &str, root: bool, errs: &mut Vec<(String, String, &'static str)>) {
    let typ = s.get("type").and_then(Value::as_str).unwrap_or("");
    let exempt = is_true(s, "x-kubernetes-int-or-string") || is_true(s, "x-kubernetes-preserve-unknown-fields");
    if root && typ != "object" {
        if typ.is_empty() {
            errs.push((
                format!("{path}.type"),
                "Required value: must not be empty at the root".into(),
                "FieldValueRequired",
            ));
        } else {
            errs.push((
                format!("{path}.type"),
                format!("Unsupported value: {typ:?}: supported values: \"object\""),
                "FieldValueNotSupported",
            ));
        }
    } else if typ.is_empty() && !exempt {
        errs.push((
            format!("{path}.type"),
            "Required value: must not be empty for specified object fields".into(),
            "FieldValueRequired",
        ));
    }
    for (j, rule) in validations(s).enumerate() {
        // Only the immutability rule is evaluated here; a CRD with any
        // other CEL rule is refused, so that no rule is silently ignored.
        if rule.get("rule").and_then(Value::as_str) != Some(IMMUTABLE_RULE) {
            errs.push((
                format!("{path}.x-kubernetes-validations[{j}].rule"),
                format!("Forbidden: this test server evaluates only `{IMMUTABLE_RULE}`"),
                "FieldValueForbidden",
            ));
        }
    }
    for (k, sub) in s.get("properties").and_then(Value::as_object).into_iter().flatten() {
        structural(sub, &format!("{path}.properties[{k}]"), false, errs);
    }
    if let Some(items) = s.get("items").filter(|i| i.is_object()) {
        structural(items, &format!("{path}.items"), false, errs);
    }
    if let Some(a) = s.get("additionalProperties").filter(|a| a.is_object()) {
        structural(a, &format!("{path}.additionalProperties"), false, errs);
    }
}

/// A schema's CEL rules (`x-kubernetes-validations`).
fn validations(schema: &Value) -> impl Iterator<Item = &Value> {
    schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// The one CEL rule this server evaluates: a transition rule that keeps a
/// field as it was once set.
const IMMUTABLE_RULE: &str = "self == oldSelf";

/// The schema's `self == oldSelf` rules on an update: like the real server,
/// a field present in both the old and the new object must keep its value
/// (an error with the rule's message, or the real default message).
fn transition_rules(new: &Value, old: &Value, s: &Value, path: &str, errs: &mut Vec<(String, String, &'static str)>) {
    for rule in validations(s) {
        if rule.get("rule").and_then(Value::as_str) == Some(IMMUTABLE_RULE) && new != old {
            let message = rule
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| format!("failed rule: {IMMUTABLE_RULE}"), str::to_string);
            errs.push((
                path.to_string(),
                invalid_value(json_type(new), &message),
                "FieldValueInvalid",
            ));
        }
    }
    for (k, sub) in s.get("properties").and_then(Value::as_object).into_iter().flatten() {
        if let (Some(n), Some(o)) = (new.get(k), old.get(k)) {
            let child = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            transition_rules(n, o, sub, &child, errs);
        }
    }
}

fn finalizers(obj: &Value) -> Vec<&str> {
    obj.pointer("/metadata/finalizers")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}
fn has_finalizers(obj: &Value) -> bool {
    !finalizers(obj).is_empty()
}
fn deletion_grace(obj: &Value) -> Option<i64> {
    obj.pointer("/metadata/deletionGracePeriodSeconds")
        .and_then(Value::as_i64)
}
fn set_deletion(obj: &mut Value, at_second: i64, grace: i64) {
    let ts = jiff::Timestamp::from_second(at_second).expect("timestamp");
    let m = meta_mut(obj);
    m.insert("deletionTimestamp".into(), json!(ts.to_string()));
    m.insert("deletionGracePeriodSeconds".into(), json!(grace));
}
/// The first deletion request bumps a tracked generation.
fn bump_generation(obj: &mut Value) {
    let m = meta_mut(obj);
    let g = m.get("generation").and_then(Value::as_i64).unwrap_or(0);
    if g > 0 {
        m.insert("generation".into(), json!(g + 1));
    }
}

/// ValidateObjectMeta's finalizer rules: each name qualified (or a standard
/// one), and ValidateNoNewFinalizers once the object is being deleted.
fn validate_finalizers(
    obj: &Value,
    old: Option<&Value>,
    any_qualified: bool,
    errs: &mut Vec<(String, String, &'static str)>,
) {
    for (i, f) in finalizers(obj).into_iter().enumerate() {
        let field = format!("metadata.finalizers[{i}]");
        if !is_qualified_name(f) {
            errs.push((field, invalid_value(f, "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"), "FieldValueInvalid"));
        } else if !any_qualified && !f.contains('/') && !matches!(f, "kubernetes" | "orphan" | "foregroundDeletion") {
            errs.push((
                field,
                invalid_value(f, "name is neither a standard finalizer name nor is it fully qualified"),
                "FieldValueInvalid",
            ));
        }
    }
    let Some(old) = old.filter(|o| meta_str(o, "deletionTimestamp").is_some()) else {
        return;
    };
    let before = finalizers(old);
    let mut extra: Vec<&str> = finalizers(obj).into_iter().filter(|f| !before.contains(f)).collect();
    extra.sort_unstable();
    extra.dedup();
    if !extra.is_empty() {
        let list: Vec<String> = extra.iter().map(|f| format!("{f:?}")).collect();
        errs.push((
            "metadata.finalizers".into(),
            format!(
                "Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers []string{{{}}}",
                list.join(", ")
            ),
            "FieldValueForbidden",
        ));
    }
}

/// k8s.io/kubernetes/pkg/apis/core/validation/events.go (legacy + strict v1).
fn validate_event(res: Res, ev: &Value, old: Option<&Value>, errs: &mut Vec<(String, String, &'static str)>) {
    let v1 = res == Res::Event;
    let s = |p: &str| ev.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    let ns = s("/metadata/namespace");
    let (inv, event_time, controller, controller_field, instance, action, reason, note) = if v1 {
        (
            "/regarding",
            s("/eventTime"),
            s("/reportingController"),
            "reportingController",
            s("/reportingInstance"),
            s("/action"),
            s("/reason"),
            s("/note"),
        )
    } else {
        (
            "/involvedObject",
            s("/eventTime"),
            s("/reportingComponent"),
            "reportingComponent",
            s("/reportingInstance"),
            s("/action"),
            s("/reason"),
            s("/message"),
        )
    };
    let inv_ns = s(&format!("{inv}/namespace"));
    let ns_err = |errs: &mut Vec<_>| {
        errs.push((
            "involvedObject.namespace".to_string(),
            invalid_value(&inv_ns, "does not match event.namespace"),
            "FieldValueInvalid",
        ))
    };
    if event_time.is_empty() {
        if inv_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                ns_err(errs);
            }
        } else if ns != inv_ns {
            ns_err(errs);
        }
    } else {
        if inv_ns.is_empty() && ns != "default" && ns != "kube-system" {
            ns_err(errs);
        }
        if controller.is_empty() {
            errs.push((controller_field.into(), "Required value".into(), "FieldValueRequired"));
        } else if !is_qualified_name(&controller) {
            errs.push((
                controller_field.into(),
                invalid_value(&controller, "must be a qualified name"),
                "FieldValueInvalid",
            ));
        }
        for (field, value) in [
            ("reportingInstance", &instance),
            ("action", &action),
            ("reason", &reason),
        ] {
            if value.is_empty() {
                errs.push((field.into(), "Required value".into(), "FieldValueRequired"));
            } else if value.len() > 128 {
                errs.push((
                    field.into(),
                    "Invalid value: \"\": can have at most 128 characters".into(),
                    "FieldValueInvalid",
                ));
            }
        }
        if note.len() > 1024 {
            errs.push((
                "message".into(),
                "Invalid value: \"\": can have at most 1024 characters".into(),
                "FieldValueInvalid",
            ));
        }
    }
    if !ns.is_empty() && !is_dns_subdomain(&ns) {
        errs.push((
            "metadata.namespace".into(),
            invalid_value(&ns, "must be a DNS subdomain"),
            "FieldValueInvalid",
        ));
    }
    if !v1 {
        return;
    }
    match old {
        None => {
            if event_time.is_empty() {
                errs.push(("eventTime".into(), "Required value".into(), "FieldValueRequired"));
            }
            let typ = s("/type");
            if typ != "Normal" && typ != "Warning" {
                errs.push((
                    "type".into(),
                    format!("Invalid value: \"\": has invalid value: {typ}"),
                    "FieldValueInvalid",
                ));
            }
            for f in [
                "deprecatedFirstTimestamp",
                "deprecatedLastTimestamp",
                "deprecatedSource",
                "deprecatedCount",
            ] {
                if ev
                    .get(f)
                    .is_some_and(|v| !v.is_null() && *v != json!({}) && *v != json!(0))
                {
                    errs.push((
                        f.into(),
                        "Invalid value: \"\": needs to be unset".into(),
                        "FieldValueInvalid",
                    ));
                }
            }
            if let Some(series) = ev.get("series").filter(|v| !v.is_null()) {
                if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
                    errs.push((
                        "series.count".into(),
                        "Invalid value: \"\": should be at least 2".into(),
                        "FieldValueInvalid",
                    ));
                }
                if series.get("lastObservedTime").is_none_or(Value::is_null) {
                    errs.push((
                        "series.lastObservedTime".into(),
                        "Required value".into(),
                        "FieldValueRequired",
                    ));
                }
            }
        }
        Some(old) => {
            for f in [
                "regarding",
                "reason",
                "note",
                "deprecatedSource",
                "deprecatedFirstTimestamp",
                "deprecatedLastTimestamp",
                "deprecatedCount",
                "type",
                "action",
                "related",
                "reportingController",
                "reportingInstance",
            ] {
                if ev.get(f) != old.get(f) {
                    errs.push((
                        f.into(),
                        "Invalid value: \"\": field is immutable".into(),
                        "FieldValueInvalid",
                    ));
                }
            }
            let t = |v: &Value| {
                v.get("eventTime")
                    .and_then(Value::as_str)
                    .and_then(parse_ts)
                    .map(|t| t.as_microsecond())
            };
            if t(ev) != t(old) {
                errs.push((
                    "eventTime".into(),
                    "Invalid value: \"\": field is immutable".into(),
                    "FieldValueInvalid",
                ));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------

struct Shared {
    state: Mutex<State>,
    url: String,
    watch_events_sent: AtomicU64,
    bookmarks_sent: AtomicU64,
    /// [`KubeApi::set_unreachable`]: (on, how many times it was turned on).
    unreachable: tokio::sync::watch::Sender<(bool, u64)>,
}

/// The server's listener: while [`KubeApi::set_unreachable`] is on, a new
/// connection is reset at once (no HTTP response), like a kube-apiserver
/// that crashed or is cut off.
struct CutListener {
    inner: tokio::net::TcpListener,
    cut: tokio::sync::watch::Receiver<(bool, u64)>,
}

impl axum::serve::Listener for CutListener {
    type Io = CutIo;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (CutIo, std::net::SocketAddr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(accepted) => accepted,
                Err(_) => {
                    // EMFILE and the like: what axum's own listener does.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let (on, epoch) = *self.cut.borrow();
            if on {
                // An RST: the client sees a reset, not an answer.
                let _ = stream.set_zero_linger();
                drop(stream);
                continue;
            }
            let mut rx = self.cut.clone();
            let cut = Box::pin(async move {
                // Ends at the next set_unreachable(true), even one turned
                // off again before this connection was next polled.
                let _ = rx.wait_for(|&(on, e)| on || e != epoch).await;
            });
            return (
                CutIo {
                    inner: stream,
                    cut,
                    dead: false,
                },
                addr,
            );
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.inner.local_addr()
    }
}

/// An accepted connection that [`KubeApi::set_unreachable`] breaks: once it
/// is turned on, every read and write fails and the socket is reset (hyper
/// reads while it answers, to notice a client hanging up, so open watch
/// streams end at once without their final chunk).
struct CutIo {
    inner: tokio::net::TcpStream,
    cut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    dead: bool,
}

impl CutIo {
    fn check(&mut self, cx: &mut std::task::Context<'_>) -> std::io::Result<()> {
        if !self.dead && self.cut.as_mut().poll(cx).is_ready() {
            self.dead = true;
            let _ = self.inner.set_zero_linger();
        }
        if self.dead {
            Err(std::io::ErrorKind::ConnectionReset.into())
        } else {
            Ok(())
        }
    }
}

impl tokio::io::AsyncRead for CutIo {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for CutIo {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return std::task::Poll::Ready(Err(e));
        }
        std::pin::Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Default, Debug)]
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(q: Option<&str>) -> Self {
        Query(
            url::form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .filter(|(k, _)| !k.is_empty())
                .collect(),
        )
    }
    fn get(&self, k: &str) -> Option<&str> {
        self.0.iter().rev().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
    }
    fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1" | "True"))
    }
}

fn json_response(code: u16, v: &Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::to_vec(v).expect("json")))
        .expect("response")
}

fn error_response(e: &ApiError) -> Response<Body> {
    let mut r = json_response(e.code, &e.to_value());
    if let Some(s) = e.retry_after {
        r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
    }
    r
}

async fn handle(AxState(shared): AxState<Arc<Shared>>, req: Request<Body>) -> Response<Body> {
    if shared.unreachable.borrow().0 {
        // A request that raced set_unreachable: never answered, its
        // connection is being reset.
        std::future::pending::<()>().await;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| path.clone());
    if std::env::var_os("KUBE_API_DEBUG").is_some() {
        eprintln!("fake kube-apiserver: {method} {pq}");
    }
    shared.lock().requests.push((method.to_string(), pq));
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start_matches("Bearer ").to_string());
    if std::env::var_os("KUBE_API_DEBUG").is_some() {
        eprintln!("fake kube-apiserver:   token {token:?}");
    }
    if let Some(token) = token
        && !shared.lock().authenticates(&token)
    {
        return error_response(&ApiError::unauthorized());
    }
    let query = Query::parse(req.uri().query());
    let accept = req
        .headers()
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = match axum::body::to_bytes(req.into_body(), 16 << 20).await {
        Ok(b) => b,
        Err(e) => return error_response(&ApiError::bad_request(e.to_string())),
    };
    if std::env::var_os("KUBE_API_DEBUG").is_some() && !body.is_empty() {
        eprintln!("fake kube-apiserver:   {content_type}: {body:?}");
    }
    match route(&shared, &method, &path, &query, &content_type, &accept, &body) {
        Ok(Routed::Json(code, v)) => json_response(code, &v),
        Ok(Routed::Warned(code, v, warnings)) => {
            let mut r = json_response(code, &v);
            for w in warnings {
                let text = format!("299 - {:?}", w);
                if let Ok(h) = HeaderValue::from_str(&text) {
                    r.headers_mut().append("warning", h);
                }
            }
            r
        }
        Ok(Routed::Watch(resp)) => resp,
        Err(e) => error_response(&e),
    }
}

enum Routed {
    Json(u16, Value),
    /// With `Warning` headers.
    Warned(u16, Value, Vec<String>),
    Watch(Response<Body>),
}

impl State {
    /// Before a create/update/patch: its `fieldValidation`, no warnings yet.
    fn begin_write(&mut self, q: &Query) {
        self.field_validation = q.get("fieldValidation").unwrap_or("").to_string();
        self.warnings.clear();
        self.applying = false;
    }
    /// After it: the answer with the warnings it produced.
    fn end_write(&mut self, r: ApiResult<(u16, Value)>) -> ApiResult<Routed> {
        self.field_validation.clear();
        self.applying = false;
        let warnings = std::mem::take(&mut self.warnings);
        r.map(|(c, v)| Routed::Warned(c, v, warnings))
    }
}

fn include_object(q: &Query) -> &str {
    q.get("includeObject").unwrap_or("Metadata")
}

/// `Accept: application/json;as=Table;v=v1;g=meta.k8s.io` (kubectl get).
fn wants_table(accept: &str) -> bool {
    accept.split(',').any(|part| {
        let params: Vec<&str> = part.split(';').map(str::trim).collect();
        params.contains(&"as=Table") && params.contains(&"g=meta.k8s.io") && params.contains(&"v=v1")
    })
}

/// A simple JSONPath (`.a.b`, `.a[0].b`) of a printer column.
fn json_path<'a>(obj: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    let mut cur = obj;
    for seg in path.split('.').filter(|s| !s.is_empty()) {
        let (key, idx) = match seg.split_once('[') {
            Some((k, rest)) => (k, Some(rest.trim_end_matches(']').parse::<usize>().ok()?)),
            None => (seg, None),
        };
        if !key.is_empty() {
            cur = cur.get(key)?;
        }
        if let Some(i) = idx {
            cur = cur.get(i)?;
        }
    }
    Some(cur)
}

/// duration.HumanDuration.
fn human_duration(secs: i64) -> String {
    if secs < -1 {
        return "<invalid>".into();
    }
    let s = secs.max(0);
    let (m, h, d) = (s / 60, s / 3600, s / 86400);
    if s < 120 {
        format!("{s}s")
    } else if m < 10 {
        if s % 60 == 0 {
            format!("{m}m")
        } else {
            format!("{m}m{}s", s % 60)
        }
    } else if h < 3 {
        format!("{m}m")
    } else if h < 8 {
        if m % 60 == 0 {
            format!("{h}h")
        } else {
            format!("{h}h{}m", m % 60)
        }
    } else if h < 48 {
        format!("{h}h")
    } else if h < 24 * 8 {
        if h % 24 == 0 {
            format!("{d}d")
        } else {
            format!("{d}d{}h", h % 24)
        }
    } else if d < 365 * 2 {
        format!("{d}d")
    } else if d < 365 * 8 {
        let y = d / 365;
        if d % 365 == 0 {
            format!("{y}y")
        } else {
            format!("{y}y{}d", d % 365)
        }
    } else {
        format!("{}y", d / 365)
    }
}

/// The CRD table convertor: a Name column, then the version's
/// additionalPrinterColumns (Age from creationTimestamp when it declares
/// none); rows carry PartialObjectMetadata unless `includeObject` says
/// otherwise.
fn to_table(info: &CrdInfo, list: &Value, include_object: &str) -> Value {
    let mut columns = info.columns.clone();
    if columns.is_empty() {
        columns.push(json!({"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp",
            "description": "CreationTimestamp is a timestamp representing the server time when this object was created. It is not guaranteed to be set in happens-before order across separate operations. Clients may not set this value. It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"}));
    }
    let mut defs = vec![
        json!({"name": "Name", "type": "string", "format": "name", "description": "Name must be unique within a namespace. Is required when creating resources, although some resources may allow a client to request the generation of an appropriate name automatically. Name is primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names", "priority": 0}),
    ];
    for c in &columns {
        defs.push(json!({
            "name": c["name"], "type": c["type"], "format": c.get("format").cloned().unwrap_or(json!("")),
            "description": c.get("description").cloned().unwrap_or(json!("")),
            "priority": c.get("priority").cloned().unwrap_or(json!(0)),
        }));
    }
    let now = jiff::Timestamp::now().as_second();
    let rows: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|o| {
            let mut cells = vec![json!(name_of(o))];
            for c in &columns {
                let v = json_path(o, c["jsonPath"].as_str().unwrap_or(""));
                let cell = match (c["type"].as_str().unwrap_or(""), v) {
                    (_, None) => Value::Null,
                    ("string", Some(Value::String(x))) => json!(x),
                    ("string", Some(x)) => json!(x.to_string()),
                    ("integer", Some(x)) if x.is_i64() || x.is_u64() => x.clone(),
                    ("number", Some(x)) if x.is_number() => x.clone(),
                    ("boolean", Some(x)) if x.is_boolean() => x.clone(),
                    ("date", Some(Value::String(x))) => match parse_ts(x) {
                        Some(t) => json!(human_duration(now - t.as_second())),
                        None => json!("<invalid>"),
                    },
                    _ => Value::Null,
                };
                cells.push(cell);
            }
            let object = match include_object {
                "None" => Value::Null,
                "Object" => {
                    let mut full = o.clone();
                    full["apiVersion"] = json!(info.res.api_version());
                    full["kind"] = json!(info.res.kind());
                    full
                }
                _ => {
                    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]})
                }
            };
            let mut row = json!({"cells": cells});
            if !object.is_null() {
                row["object"] = object;
            }
            row
        })
        .collect();
    json!({"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": list["metadata"], "columnDefinitions": defs, "rows": rows})
}

struct Target {
    res: Res,
    ns: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

fn parse_target(segs: &[&str], st: &State) -> ApiResult<Target> {
    let (group, version, rest) = match segs {
        ["api", v, rest @ ..] => ("", *v, rest),
        ["apis", g, v, rest @ ..] => (*g, *v, rest),
        _ => return Err(ApiError::not_found_path()),
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, plural, rest @ ..] => (Some(ns.to_string()), {
            let mut v = vec![*plural];
            v.extend_from_slice(rest);
            v
        }),
        _ => (None, rest.to_vec()),
    };
    let Some((plural, rest)) = rest.split_first() else {
        return Err(ApiError::not_found_path());
    };
    let custom = Res::lookup(group, version, plural)
        .is_none()
        .then(|| st.custom_lookup(group, version, plural))
        .flatten();
    let res = match &custom {
        Some(info) => info.res,
        None => Res::lookup(group, version, plural).ok_or_else(ApiError::not_found_path)?,
    };
    if ns.is_some() && !res.namespaced() {
        return Err(ApiError::not_found_path());
    }
    let (name, sub) = match rest {
        [] => (None, None),
        [n] => (Some(n.to_string()), None),
        [n, s] => (Some(n.to_string()), Some(s.to_string())),
        _ => return Err(ApiError::not_found_path()),
    };
    if let Some(s) = &sub {
        let ok = match (res, s.as_str()) {
            (Res::Pod, "eviction") => true,
            (Res::Custom(_), "status") => custom.as_ref().is_some_and(|i| i.status),
            (r, "status") => r.has_status(),
            _ => false,
        };
        if !ok {
            return Err(ApiError::not_found_path());
        }
    }
    if name.is_some() && res.namespaced() && ns.is_none() {
        return Err(ApiError::not_found_path());
    }
    Ok(Target { res, ns, name, sub })
}

fn parse_json(body: &[u8]) -> ApiResult<Value> {
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("error decoding body: {e}")))
}

#[allow(clippy::too_many_arguments)]
fn route(
    shared: &Arc<Shared>,
    method: &Method,
    path: &str,
    q: &Query,
    content_type: &str,
    accept: &str,
    body: &Bytes,
) -> ApiResult<Routed> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    let customs = if matches!(segs.as_slice(), ["apis"] | ["apis", _] | ["apis", _, _]) {
        shared.lock().crd_infos()
    } else {
        vec![]
    };
    if method == Method::GET
        && let Some(v) = discovery(&segs, &shared.url, &customs)
    {
        return Ok(Routed::Json(200, v));
    }
    let t = parse_target(&segs, &shared.lock())?;
    let ns = t.ns.clone().unwrap_or_default();
    let dry_run = q.get("dryRun").is_some();
    // Server-side printing (kubectl get) for custom resources.
    let table = matches!(t.res, Res::Custom(_)) && wants_table(accept);
    match (&t.name, method.clone()) {
        (None, Method::GET) => {
            if q.flag("watch") {
                let table = table.then(|| shared.lock().crd_info(t.res)).flatten();
                return watch(shared, &t, q, table).map(Routed::Watch);
            }
            let st = shared.lock();
            let v = list(&st, &t, q)?;
            match st.crd_info(t.res).filter(|_| table) {
                Some(info) => Ok(Routed::Json(200, to_table(&info, &v, include_object(q)))),
                None => Ok(Routed::Json(200, v)),
            }
        }
        (None, Method::POST) => {
            if t.ns.is_none() && t.res.namespaced() {
                return Err(ApiError::method_not_allowed());
            }
            let obj = parse_object(t.res, content_type, body)?;
            let mut st = shared.lock();
            st.begin_write(q);
            let r = st.create(t.res, &ns, obj, dry_run);
            st.end_write(r.map(|v| (201, v)))
        }
        (None, _) => Err(ApiError::method_not_allowed()),
        (Some(name), m) => {
            let mut st = shared.lock();
            match (t.sub.as_deref(), m) {
                (None | Some("status"), Method::GET) => {
                    let v = st.get_or_404(t.res, &ns, name)?;
                    match st.crd_info(t.res).filter(|_| table) {
                        Some(info) => {
                            let list =
                                json!({"metadata": {"resourceVersion": meta_str(&v, "resourceVersion")}, "items": [v]});
                            Ok(Routed::Json(200, to_table(&info, &list, include_object(q))))
                        }
                        None => Ok(Routed::Json(200, v)),
                    }
                }
                (None | Some("status"), Method::PUT) => {
                    let obj = parse_object(t.res, content_type, body)?;
                    st.begin_write(q);
                    let r = st.put(t.res, &ns, name, obj, t.sub.is_some(), dry_run);
                    st.end_write(r)
                }
                (None | Some("status"), Method::PATCH) => {
                    st.begin_write(q);
                    let r = st.patch(t.res, &ns, name, content_type, body, q, t.sub.is_some());
                    st.end_write(r)
                }
                (None, Method::DELETE) => {
                    let mut opts = if body.is_empty() {
                        json!({})
                    } else if content_type.starts_with("application/vnd.kubernetes.protobuf") {
                        delete_options_from_protobuf(body)?
                    } else {
                        parse_json(body)?
                    };
                    if let Some(g) = q.get("gracePeriodSeconds").and_then(|g| g.parse::<i64>().ok()) {
                        opts["gracePeriodSeconds"] = json!(g);
                    }
                    if dry_run {
                        opts["dryRun"] = json!(["All"]);
                    }
                    st.delete(t.res, &ns, name, &opts).map(|(c, v)| Routed::Json(c, v))
                }
                (Some("eviction"), Method::POST) => {
                    let obj = parse_json(body)?;
                    st.evict(&ns, name, &obj).map(|(c, v)| Routed::Json(c, v))
                }
                _ => Err(ApiError::method_not_allowed()),
            }
        }
    }
}

/// One protobuf field value: a varint (`Ok`) or length-delimited bytes (`Err`).
type ProtoValue<'a> = Result<u64, &'a [u8]>;

/// Protobuf wire format: the `(number, value)` fields of one message.
fn protobuf_fields(mut b: &[u8]) -> Option<Vec<(u64, ProtoValue<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = vec![];
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let value = match key & 7 {
            0 => Ok(varint(&mut b)?),
            2 => {
                let len = usize::try_from(varint(&mut b)?).ok()?;
                let (data, rest) = (b.get(..len)?, b.get(len..)?);
                b = rest;
                Err(data)
            }
            _ => return None,
        };
        out.push((key >> 3, value));
    }
    Some(out)
}

/// DeleteOptions sent as protobuf (kubectl 1.37's typed client does): the
/// `k8s\0` runtime.Unknown envelope around a metav1.DeleteOptions.
fn delete_options_from_protobuf(body: &[u8]) -> ApiResult<Value> {
    let bad = || ApiError::bad_request("error decoding DeleteOptions: not a protobuf runtime.Unknown");
    let envelope = body.strip_prefix(b"k8s\0").ok_or_else(bad)?;
    let raw = protobuf_fields(envelope)
        .ok_or_else(bad)?
        .into_iter()
        .find_map(|(n, v)| (n == 2).then_some(v).and_then(Result::err))
        .unwrap_or_default();
    let text = |d: &[u8]| json!(String::from_utf8_lossy(d));
    let mut opts = json!({});
    for (n, v) in protobuf_fields(raw).ok_or_else(bad)? {
        match (n, v) {
            (1, Ok(g)) => opts["gracePeriodSeconds"] = json!(g as i64),
            (2, Err(pre)) => {
                for (m, w) in protobuf_fields(pre).ok_or_else(bad)? {
                    match (m, w) {
                        (1, Err(d)) => opts["preconditions"]["uid"] = text(d),
                        (2, Err(d)) => opts["preconditions"]["resourceVersion"] = text(d),
                        _ => {}
                    }
                }
            }
            (3, Ok(o)) => opts["orphanDependents"] = json!(o != 0),
            (4, Err(d)) => opts["propagationPolicy"] = text(d),
            (5, Err(d)) => {
                if !opts["dryRun"].is_array() {
                    opts["dryRun"] = json!([]);
                }
                opts["dryRun"].as_array_mut().expect("array").push(text(d));
            }
            _ => {}
        }
    }
    Ok(opts)
}

/// The object of a POST or PUT: JSON, or protobuf for the kinds decoded
/// here (ConfigMaps: `kubectl create configmap`'s typed client sends them so);
/// other kinds in protobuf are a 415 (the real server decodes them all).
fn parse_object(res: Res, content_type: &str, body: &[u8]) -> ApiResult<Value> {
    if !content_type.starts_with("application/vnd.kubernetes.protobuf") {
        return parse_json(body);
    }
    match res {
        Res::ConfigMap => config_map_from_protobuf(body),
        _ => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json (this fake decodes protobuf {} only for ConfigMaps)",
                res.kind()
            ),
        )),
    }
}

/// The `raw` of a `k8s\0` runtime.Unknown envelope whose TypeMeta names
/// `api_version`/`kind`.
fn protobuf_unknown_raw<'a>(body: &'a [u8], api_version: &str, kind: &str) -> Option<&'a [u8]> {
    let fields = protobuf_fields(body.strip_prefix(b"k8s\0")?)?;
    let mut raw = None;
    let mut type_ok = false;
    for (n, v) in fields {
        match (n, v) {
            (1, Err(type_meta)) => {
                let tm = protobuf_fields(type_meta)?;
                let text = |f: u64| {
                    tm.iter()
                        .find_map(|(n, v)| (*n == f).then_some(*v).and_then(Result::err))
                };
                type_ok = text(1) == Some(api_version.as_bytes()) && text(2) == Some(kind.as_bytes());
            }
            (2, Err(r)) => raw = Some(r),
            _ => {}
        }
    }
    type_ok.then_some(raw).flatten()
}

/// One entry of a protobuf `map<string, string|bytes>`: key and value.
fn protobuf_map_entry(entry: &[u8]) -> Option<(String, &[u8])> {
    let (mut key, mut value) = (String::new(), &[][..]);
    for (n, v) in protobuf_fields(entry)? {
        match (n, v) {
            (1, Err(k)) => key = String::from_utf8_lossy(k).into_owned(),
            (2, Err(d)) => value = d,
            _ => return None,
        }
    }
    Some((key, value))
}

/// A core/v1 ConfigMap in protobuf, as JSON (binaryData base64-encoded).
fn config_map_from_protobuf(body: &[u8]) -> ApiResult<Value> {
    let bad = || ApiError::bad_request("error decoding ConfigMap: not a protobuf v1 ConfigMap");
    let raw = protobuf_unknown_raw(body, "v1", "ConfigMap").ok_or_else(bad)?;
    let mut cm = json!({"apiVersion": "v1", "kind": "ConfigMap"});
    for (n, v) in protobuf_fields(raw).ok_or_else(bad)? {
        match (n, v) {
            (1, Err(meta)) => cm["metadata"] = object_meta_from_protobuf(meta)?,
            (2, Err(entry)) => {
                let (k, v) = protobuf_map_entry(entry).ok_or_else(bad)?;
                cm["data"][k] = json!(String::from_utf8_lossy(v));
            }
            (3, Err(entry)) => {
                let (k, v) = protobuf_map_entry(entry).ok_or_else(bad)?;
                let b64 = serde_json::to_value(k8s_openapi::ByteString(v.to_vec())).expect("base64");
                cm["binaryData"][k] = b64;
            }
            (4, Ok(b)) => cm["immutable"] = json!(b != 0),
            _ => return Err(bad()),
        }
    }
    Ok(cm)
}

/// A metav1.ObjectMeta in protobuf: what a client sets on a create (name,
/// generateName, namespace, uid, resourceVersion, labels, annotations,
/// finalizers; empty strings are unset, as in Go); what the server owns
/// (selfLink, generation, timestamps, deletion grace) is dropped, as the
/// server would overwrite it. Other fields (ownerReferences, managedFields)
/// are not decoded by this fake: a 400 rather than dropping them.
fn object_meta_from_protobuf(raw: &[u8]) -> ApiResult<Value> {
    let bad = |what: String| ApiError::bad_request(format!("error decoding ObjectMeta: {what}"));
    let fields = protobuf_fields(raw).ok_or_else(|| bad("not protobuf".into()))?;
    let text = |d: &[u8]| String::from_utf8_lossy(d).into_owned();
    let mut m = json!({});
    for (n, v) in fields {
        match (n, v) {
            (1 | 2 | 3 | 5 | 6, Err(d)) if !d.is_empty() => {
                let key = ["name", "generateName", "namespace", "", "uid", "resourceVersion"][n as usize - 1];
                m[key] = json!(text(d));
            }
            (1..=6 | 8 | 9, Err(_)) | (7 | 10, Ok(_)) => {}
            (11 | 12, Err(entry)) => {
                let (k, v) = protobuf_map_entry(entry).ok_or_else(|| bad("bad map entry".into()))?;
                m[if n == 11 { "labels" } else { "annotations" }][k] = json!(text(v));
            }
            (14, Err(d)) => {
                if !m["finalizers"].is_array() {
                    m["finalizers"] = json!([]);
                }
                m["finalizers"].as_array_mut().expect("array").push(json!(text(d)));
            }
            (n, _) => return Err(bad(format!("field {n} is not decoded by this fake"))),
        }
    }
    Ok(m)
}

fn discovery(segs: &[&str], url: &str, customs: &[CrdInfo]) -> Option<Value> {
    let addr = url.trim_start_matches("http://");
    let resources = |gv: &str| -> Value {
        let rs: Vec<Value> = Res::ALL
            .iter()
            .filter(|r| r.api_version() == gv)
            .flat_map(|r| {
                let mut v = vec![json!({
                    "name": r.plural(), "singularName": r.kind().to_lowercase(), "namespaced": r.namespaced(),
                    "kind": r.kind(), "verbs": ["create","delete","get","list","patch","update","watch"],
                })];
                if *r == Res::Crd {
                    v[0]["shortNames"] = json!(["crd", "crds"]);
                    v[0]["categories"] = json!(["api-extensions"]);
                }
                if *r == Res::ConfigMap {
                    v[0]["shortNames"] = json!(["cm"]);
                }
                if r.has_status() {
                    v.push(json!({"name": format!("{}/status", r.plural()), "singularName": "", "namespaced": r.namespaced(), "kind": r.kind(), "verbs": ["get","patch","update"]}));
                }
                if *r == Res::Pod {
                    v.push(json!({"name": "pods/eviction", "singularName": "", "namespaced": true, "group": "policy", "version": "v1", "kind": "Eviction", "verbs": ["create"]}));
                }
                v
            })
            .collect();
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
    };
    Some(match segs {
        ["version"] => json!({
            "major": "1", "minor": "36", "gitVersion": "v1.36.2-fake", "gitCommit": "0000000000000000000000000000000000000000",
            "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24.0", "compiler": "gc", "platform": "linux/amd64"
        }),
        ["api"] => {
            json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": addr}]})
        }
        ["apis"] => {
            let mut groups: Vec<Value> = BUILTIN_GROUPS
                .iter()
                .map(|g| {
                    let gv = format!("{g}/v1");
                    json!({"name": g, "versions": [{"groupVersion": gv, "version": "v1"}], "preferredVersion": {"groupVersion": gv, "version": "v1"}})
                })
                .collect();
            // One group per CRD group (each CRD serves its storage version).
            let mut seen: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
            for info in customs {
                let k = custom_kind(match info.res {
                    Res::Custom(i) => i,
                    _ => continue,
                });
                let versions = seen.entry(&k.group).or_default();
                if !versions.contains(&k.version.as_str()) {
                    versions.push(&k.version);
                }
            }
            for (g, versions) in seen {
                let vs: Vec<Value> = versions
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
                    .collect();
                groups.push(json!({"name": g, "versions": vs, "preferredVersion": vs[0]}));
            }
            json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        }
        // The APIGroup of one group.
        ["apis", g] => {
            let versions: Vec<Value> = if BUILTIN_GROUPS.contains(g) {
                vec![json!({"groupVersion": format!("{g}/v1"), "version": "v1"})]
            } else {
                let mut vs: Vec<Value> = vec![];
                for k in customs.iter().filter_map(|i| custom_kind_of(i.res)) {
                    let v = json!({"groupVersion": k.api_version, "version": k.version});
                    if k.group == *g && !vs.contains(&v) {
                        vs.push(v);
                    }
                }
                vs
            };
            let preferred = versions.first()?.clone();
            json!({"kind": "APIGroup", "apiVersion": "v1", "name": g, "versions": versions, "preferredVersion": preferred})
        }
        ["api", "v1"] => resources("v1"),
        ["apis", g, "v1"] if BUILTIN_GROUPS.contains(g) => resources(&format!("{g}/v1")),
        ["apis", g, v] => {
            let gv = format!("{g}/{v}");
            let rs: Vec<Value> = customs
                .iter()
                .filter(|i| i.res.api_version() == gv)
                .flat_map(|i| {
                    let r = i.res;
                    let mut main = json!({
                        "name": r.plural(), "singularName": i.singular, "namespaced": r.namespaced(),
                        "kind": r.kind(), "verbs": ["delete","get","list","patch","create","update","watch"],
                    });
                    if !i.short_names.is_empty() {
                        main["shortNames"] = json!(i.short_names);
                    }
                    if !i.categories.is_empty() {
                        main["categories"] = json!(i.categories);
                    }
                    let mut v = vec![main];
                    if i.status {
                        v.push(json!({"name": format!("{}/status", r.plural()), "singularName": "", "namespaced": r.namespaced(), "kind": r.kind(), "verbs": ["get","patch","update"]}));
                    }
                    v
                })
                .collect();
            if rs.is_empty() {
                return None;
            }
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": rs})
        }
        _ => return None,
    })
}

fn list(st: &State, t: &Target, q: &Query) -> ApiResult<Value> {
    let selectable = st.crd_info(t.res).map(|i| i.selectable).unwrap_or_default();
    let fsel = FieldSelector::parse(t.res, q.get("fieldSelector").unwrap_or(""), &selectable)?;
    let lsel = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let rv_match = q.get("resourceVersionMatch").unwrap_or("");
    let cont = q.get("continue").unwrap_or("");
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    if !rv_match.is_empty() && rv_param.is_empty() {
        return Err(list_invalid(
            t.res,
            "resourceVersionMatch",
            "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
        ));
    }
    if !cont.is_empty() && !rv_param.is_empty() && rv_param != "0" {
        return Err(list_invalid(
            t.res,
            "resourceVersion",
            "Forbidden: specifying resource version is not allowed when using continue",
        ));
    }
    if rv_match == "Exact" && rv_param == "0" {
        return Err(list_invalid(
            t.res,
            "resourceVersionMatch",
            "Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\"",
        ));
    }
    if !rv_match.is_empty() && rv_match != "Exact" && rv_match != "NotOlderThan" {
        return Err(list_invalid(
            t.res,
            "resourceVersionMatch",
            &format!("Unsupported value: \"{rv_match}\""),
        ));
    }
    let (snap_rv, start_after) = if !cont.is_empty() {
        let (rv, key) = decode_continue(cont)?;
        if rv < st.floor {
            return Err(ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
            ));
        }
        (rv, Some(key))
    } else if rv_param.is_empty() || rv_param == "0" {
        (st.rv, None)
    } else {
        let rv: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param}")))?;
        if rv > st.rv {
            return Err(too_large(rv, st.rv));
        }
        if rv_match == "Exact" { (rv, None) } else { (st.rv, None) }
    };
    let items = if snap_rv == st.rv {
        st.list_objs(t.res, None)
    } else {
        st.snapshot_at(t.res, snap_rv)?
    };
    let mut matching: Vec<(String, Value)> = items
        .into_iter()
        .filter(|o| t.ns.as_deref().is_none_or(|ns| meta_str(o, "namespace") == Some(ns)))
        .filter(|o| fsel.matches(t.res, o) && lsel.matches(o))
        .map(|o| {
            (
                format!("{}/{}", meta_str(&o, "namespace").unwrap_or(""), name_of(&o)),
                o,
            )
        })
        .collect();
    matching.sort_by(|a, b| a.0.cmp(&b.0));
    if let Some(after) = &start_after {
        matching.retain(|(k, _)| k > after);
    }
    let total = matching.len();
    let page: Vec<(String, Value)> = matching.into_iter().take(limit).collect();
    let mut meta = json!({"resourceVersion": snap_rv.to_string()});
    if page.len() < total {
        let last = page.last().map(|(k, _)| k.clone()).unwrap_or_default();
        meta["continue"] = json!(encode_continue(snap_rv, &last));
        if fsel.is_empty() && lsel.0.is_empty() {
            meta["remainingItemCount"] = json!(total - page.len());
        }
    }
    let items: Vec<Value> = page
        .into_iter()
        .map(|(_, mut o)| {
            // Real list items of built-in kinds carry no apiVersion/kind
            // (typed lists); those of custom resources (unstructured) do.
            if !matches!(t.res, Res::Custom(_)) {
                let m = o.as_object_mut().expect("object");
                m.remove("apiVersion");
                m.remove("kind");
            }
            o
        })
        .collect();
    Ok(json!({"kind": t.res.list_kind(), "apiVersion": t.res.api_version(), "metadata": meta, "items": items}))
}

fn list_invalid(res: Res, field: &str, msg: &str) -> ApiError {
    let _ = res;
    let mut e = ApiError::new(
        422,
        "Invalid",
        format!("ListOptions.meta.k8s.io \"\" is invalid: {field}: {msg}"),
    );
    e.details = Some(Box::new(StatusDetails {
        group: Some("meta.k8s.io".into()),
        kind: Some("ListOptions".into()),
        causes: Some(vec![StatusCause {
            field: Some(field.into()),
            message: Some(msg.into()),
            reason: Some("FieldValueForbidden".into()),
        }]),
        ..Default::default()
    }));
    e
}

fn too_large(rv: u64, cur: u64) -> ApiError {
    let mut e = ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {cur}"),
    );
    e.details = Some(Box::new(StatusDetails {
        causes: Some(vec![StatusCause {
            reason: Some("ResourceVersionTooLarge".into()),
            message: Some("Too large resource version".into()),
            field: None,
        }]),
        retry_after_seconds: Some(1),
        ..Default::default()
    }));
    e.retry_after = Some(1);
    e
}

fn encode_continue(rv: u64, key: &str) -> String {
    // Opaque to clients; real tokens are base64 JSON. Hex keeps it URL-safe.
    let raw = json!({"v": "meta.k8s.io/v1", "rv": rv, "start": format!("{key}\u{0}")}).to_string();
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(s: &str) -> ApiResult<(u64, String)> {
    let bad = || {
        ApiError::bad_request(
            "continue key is not valid: incorrect encoded start resourceVersion (version meta.k8s.io/v1)",
        )
    };
    if !s.len().is_multiple_of(2) {
        return Err(bad());
    }
    let bytes: Option<Vec<u8>> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect();
    let v: Value = serde_json::from_slice(&bytes.ok_or_else(bad)?).map_err(|_| bad())?;
    let rv = v["rv"].as_u64().ok_or_else(bad)?;
    let key = v["start"]
        .as_str()
        .ok_or_else(bad)?
        .trim_end_matches('\u{0}')
        .to_string();
    Ok((rv, key))
}

// ---------------------------------------------------------------------------
// Watch
// ---------------------------------------------------------------------------

struct WatchStream {
    shared: Arc<Shared>,
    pending: VecDeque<(Value, bool)>,
    rx: mpsc::UnboundedReceiver<WMsg>,
    deadline: tokio::time::Instant,
    bookmark_every: Option<Duration>,
    next_bookmark: tokio::time::Instant,
    res: Res,
    end_when_empty: bool,
    done: bool,
    /// Events as Tables (kubectl get -w): the CRD, includeObject, and
    /// whether the column definitions went out with a first event already.
    table: Option<(CrdInfo, String, bool)>,
}

impl WatchStream {
    /// The watch encoder's table transform: one row per event, column
    /// definitions only in the first.
    fn as_table(&mut self, mut ev: Value) -> Value {
        let Some((info, include, headers_sent)) = &mut self.table else {
            return ev;
        };
        if !matches!(ev["type"].as_str(), Some("ADDED" | "MODIFIED" | "DELETED")) {
            return ev;
        }
        let obj = ev["object"].take();
        let list = json!({"metadata": {"resourceVersion": meta_str(&obj, "resourceVersion")}, "items": [obj]});
        let mut t = to_table(info, &list, include);
        if *headers_sent {
            t.as_object_mut().expect("table").remove("columnDefinitions");
        }
        *headers_sent = true;
        ev["object"] = t;
        ev
    }
}

fn watch(shared: &Arc<Shared>, t: &Target, q: &Query, table: Option<CrdInfo>) -> ApiResult<Response<Body>> {
    let selectable = shared.lock().crd_info(t.res).map(|i| i.selectable).unwrap_or_default();
    let fsel = FieldSelector::parse(t.res, q.get("fieldSelector").unwrap_or(""), &selectable)?;
    let lsel = LabelSelector::parse(q.get("labelSelector").unwrap_or(""))?;
    if q.flag("sendInitialEvents") {
        // WatchList feature gate off: the real server rejects the parameter.
        return Err(list_invalid(
            t.res,
            "sendInitialEvents",
            "Forbidden: sendInitialEvents is forbidden for watch unless the WatchList feature gate is enabled",
        ));
    }
    let rv_param = q.get("resourceVersion").unwrap_or("");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|s| s.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let (tx, rx) = mpsc::unbounded_channel();
    let mut st = shared.lock();
    let w = Watcher {
        id: st.next_watcher,
        res: t.res,
        ns: t.ns.clone(),
        fsel,
        lsel,
        tx,
    };
    st.next_watcher += 1;
    let mut pending = VecDeque::new();
    let mut end_when_empty = false;
    if rv_param.is_empty() || rv_param == "0" {
        let mut objs = st.list_objs(t.res, None);
        objs.retain(|o| w.passes(o));
        for o in objs {
            pending.push_back((json!({"type": "ADDED", "object": o}), false));
        }
    } else {
        let rv: u64 = rv_param
            .parse()
            .map_err(|_| ApiError::bad_request(format!("invalid resource version: {rv_param}")))?;
        if rv > st.rv {
            return Err(too_large(rv, st.rv));
        }
        if rv < st.floor {
            let e = ApiError::expired(format!("too old resource version: {rv} ({})", st.floor));
            pending.push_back((json!({"type": "ERROR", "object": e.to_value()}), false));
            end_when_empty = true;
        } else {
            for ev in st.history.iter().filter(|e| e.rv > rv) {
                if let Some(line) = w.convert(ev) {
                    pending.push_back((line, false));
                }
            }
        }
    }
    let bookmark_every = q.flag("allowWatchBookmarks").then_some(st.bookmark_interval);
    if !end_when_empty {
        st.watchers.push(w);
    }
    drop(st);
    let now = tokio::time::Instant::now();
    let ws = WatchStream {
        shared: shared.clone(),
        pending,
        rx,
        deadline: now + timeout,
        bookmark_every,
        next_bookmark: now + bookmark_every.unwrap_or(Duration::from_secs(3600)),
        res: t.res,
        end_when_empty,
        done: false,
        table: table.map(|info| (info, include_object(q).to_string(), false)),
    };
    let stream = futures::stream::unfold(ws, |mut ws| async move {
        loop {
            if ws.done {
                return None;
            }
            if let Some((v, bookmark)) = ws.pending.pop_front() {
                let v = if bookmark { v } else { ws.as_table(v) };
                let counter = if bookmark {
                    &ws.shared.bookmarks_sent
                } else {
                    &ws.shared.watch_events_sent
                };
                counter.fetch_add(1, Ordering::SeqCst);
                let mut line = serde_json::to_vec(&v).expect("json");
                line.push(b'\n');
                return Some((Ok::<Bytes, std::io::Error>(Bytes::from(line)), ws));
            }
            if ws.end_when_empty {
                return None;
            }
            let bm = ws.bookmark_every.is_some();
            tokio::select! {
                msg = ws.rx.recv() => match msg {
                    Some(WMsg::Event(v)) => ws.pending.push_back((v, false)),
                    Some(WMsg::Abort) => {
                        ws.done = true;
                        return Some((Err(std::io::Error::other("watch dropped by test")), ws));
                    }
                    None => return None,
                },
                _ = tokio::time::sleep_until(ws.deadline) => return None,
                _ = tokio::time::sleep_until(ws.next_bookmark), if bm => {
                    // Under the lock every event up to the current revision is
                    // already queued: drain them first so the bookmark never
                    // overtakes an event.
                    let st = ws.shared.lock();
                    while let Ok(m) = ws.rx.try_recv() {
                        match m {
                            WMsg::Event(v) => ws.pending.push_back((v, false)),
                            WMsg::Abort => { ws.done = true; }
                        }
                    }
                    let rv = st.rv;
                    drop(st);
                    if ws.done {
                        return Some((Err(std::io::Error::other("watch dropped by test")), ws));
                    }
                    let obj = json!({"kind": ws.res.kind(), "apiVersion": ws.res.api_version(), "metadata": {"resourceVersion": rv.to_string()}});
                    ws.pending.push_back((json!({"type": "BOOKMARK", "object": obj}), true));
                    ws.next_bookmark = tokio::time::Instant::now() + ws.bookmark_every.unwrap_or_default();
                }
            }
        }
    });
    Ok(Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CACHE_CONTROL, "no-cache, private")
        .body(Body::from_stream(stream))
        .expect("response"))
}

// ---------------------------------------------------------------------------
// Test handle
// ---------------------------------------------------------------------------

pub struct KubeApi {
    shared: Arc<Shared>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        self.drop_watches();
    }
}

impl KubeApi {
    /// Binds 127.0.0.1:0 and serves on the current tokio runtime.
    pub fn start() -> KubeApi {
        let std_listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("addr");
        let (unreachable, cut) = tokio::sync::watch::channel((false, 0));
        let listener = CutListener {
            inner: tokio::net::TcpListener::from_std(std_listener).expect("tokio listener"),
            cut,
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new()),
            url: format!("http://{addr}"),
            watch_events_sent: AtomicU64::new(0),
            bookmarks_sent: AtomicU64::new(0),
            unreachable,
        });
        let app = axum::Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let bg_shared = shared.clone();
        let background = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tick.tick().await;
                let mut st = bg_shared.lock();
                st.kubelet_tick();
                st.disruption_tick();
                st.namespace_tick();
                st.crd_tick();
            }
        });
        KubeApi {
            shared,
            tasks: vec![server, background],
        }
    }

    pub fn url(&self) -> String {
        self.shared.url.clone()
    }

    /// A kube config for the server: plain HTTP, no auth, namespace
    /// `default`, kube's defaults otherwise. NB: kube 5 defaults to
    /// `default_retry: true`, which retries 429/503/504 up to 15 times with
    /// exponential backoff (honouring Retry-After): an eviction refused by a
    /// PDB then takes minutes to come back as an error.
    pub fn kube_config(&self) -> kube::Config {
        kube::Config::new(self.url().parse().expect("url"))
    }

    /// A kube client from [`Self::kube_config`] (kube's defaults, retries on).
    pub fn kube_client(&self) -> kube::Client {
        kube::Client::try_from(self.kube_config()).expect("kube client")
    }

    /// A kube client with `default_retry: false`: 429s come back at once.
    pub fn kube_client_no_retry(&self) -> kube::Client {
        let mut config = self.kube_config();
        config.default_retry = false;
        kube::Client::try_from(config).expect("kube client")
    }

    /// Writes a kubeconfig pointing at the server (for a separate process).
    pub fn write_kubeconfig(&self, path: impl AsRef<std::path::Path>) {
        self.write_kubeconfig_as(path, "{}");
    }

    /// Writes a kubeconfig that authenticates with `token` (for a separate process).
    pub fn write_kubeconfig_with_token(&self, path: impl AsRef<std::path::Path>, token: &str) {
        self.write_kubeconfig_as(path, &format!("\n    token: {token}"));
    }

    /// A kubeconfig whose one user is `user` (YAML after `user:`).
    fn write_kubeconfig_as(&self, path: impl AsRef<std::path::Path>, user: &str) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\nusers:\n- name: fake\n  user: {user}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.url()
        );
        std::fs::write(path, text).expect("write kubeconfig");
    }

    /// A token of ServiceAccount `ns/name` (created if missing), as `kubectl
    /// create token` gives: refused once the ServiceAccount is gone.
    pub fn service_account_token(&self, ns: &str, name: &str) -> String {
        let mut st = self.lock();
        let account = match st.get(Res::ServiceAccount, ns, name) {
            Some(a) => a.clone(),
            None => st
                .create(Res::ServiceAccount, ns, json!({"metadata": {"name": name}}), false)
                .expect("create serviceaccount"),
        };
        format!(
            "{SA_TOKEN_PREFIX}{ns}:{name}:{}",
            meta_str(&account, "uid").unwrap_or("")
        )
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.lock()
    }

    /// Creates a Ready node (through the create path: watchers see ADDED).
    pub fn add_node(&self, name: &str) -> Node {
        let mut st = self.lock();
        let node = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
            "spec": {},
            "status": {
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                                "lastHeartbeatTime": now_ts(), "lastTransitionTime": now_ts()}],
                "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}, {"type": "Hostname", "address": name}],
            }
        });
        let v = st.create(Res::Node, "", node, false).expect("create node");
        serde_json::from_value(v).expect("node")
    }

    pub fn add_namespace(&self, name: &str) {
        self.lock()
            .create(Res::Namespace, "", json!({"metadata": {"name": name}}), false)
            .expect("create namespace");
    }

    /// Creates a DaemonSet (so kubectl drain's DaemonSet check finds it).
    pub fn add_daemonset(&self, ns: &str, name: &str) -> Value {
        let ds = json!({
            "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}}, "spec": {"containers": [{"name": name, "image": "busybox"}]}}}
        });
        self.lock()
            .create(Res::DaemonSet, ns, ds, false)
            .expect("create daemonset")
    }

    /// `kubectl cordon/uncordon`: a strategic merge PATCH of spec.unschedulable.
    pub fn set_unschedulable(&self, name: &str, unschedulable: bool) -> Node {
        let body = json!({"spec": {"unschedulable": if unschedulable { json!(true) } else { Value::Null }}});
        let v = self
            .lock()
            .patch(
                Res::Node,
                "",
                name,
                "application/strategic-merge-patch+json",
                body.to_string().as_bytes(),
                &Query::default(),
                false,
            )
            .unwrap_or_else(|e| panic!("patch node {name}: {}", e.message))
            .1;
        serde_json::from_value(v).expect("node")
    }

    /// A JSON patch (RFC 6902) of a pod, through the same code path as HTTP
    /// (`test` operations, finalizer rules and all).
    pub fn json_patch_pod(&self, ns: &str, name: &str, ops: Value) -> Result<Pod, ApiError> {
        let (_, v) = self.lock().patch(
            Res::Pod,
            ns,
            name,
            "application/json-patch+json",
            ops.to_string().as_bytes(),
            &Query::default(),
            false,
        )?;
        // Removing the last finalizer of a terminating pod answers the deleted pod.
        Ok(serde_json::from_value(v).expect("pod"))
    }

    pub fn node(&self, name: &str) -> Node {
        let v = self
            .lock()
            .get_or_404(Res::Node, "", name)
            .unwrap_or_else(|e| panic!("{}", e.message));
        serde_json::from_value(v).expect("node")
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Pod> {
        self.lock()
            .get(Res::Pod, ns, name)
            .map(|v| serde_json::from_value(v.clone()).expect("pod"))
    }

    /// Creates a CustomResourceDefinition (e.g. `serde_json::to_value(T::crd())`)
    /// through the create path: validated, status filled in, served at once.
    pub fn add_crd(&self, crd: Value) -> Result<Value, ApiError> {
        self.lock().create(Res::Crd, "", crd, false)
    }

    /// Every stored object of a resource, built-in or custom
    /// (`("nova-kubernetes-drain.io/v1alpha1", "evacuations")`), in all
    /// namespaces, as stored (empty if the resource is not served).
    pub fn objects(&self, api_version: &str, plural: &str) -> Vec<Value> {
        let st = self.lock();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let res =
            Res::lookup(group, version, plural).or_else(|| st.custom_lookup(group, version, plural).map(|i| i.res));
        res.map(|r| st.list_objs(r, None)).unwrap_or_default()
    }

    pub fn pdbs(&self, ns: &str) -> Vec<PodDisruptionBudget> {
        self.lock()
            .list_objs(Res::Pdb, Some(ns))
            .into_iter()
            .map(|v| serde_json::from_value(v).expect("pdb"))
            .collect()
    }

    /// Every Event created or patched (events.k8s.io/v1 and core/v1), in
    /// order, as stored by the server.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events_log.clone()
    }

    /// A kubelet status update: sets `status.phase` (Running also sets the
    /// Ready condition, anything else clears it).
    pub fn set_pod_phase(&self, ns: &str, name: &str, phase: &str) {
        let mut st = self.lock();
        let mut pod = st
            .get_or_404(Res::Pod, ns, name)
            .unwrap_or_else(|e| panic!("{}", e.message));
        if phase == "Running" {
            make_running(&mut pod);
        } else {
            pod["status"]["phase"] = json!(phase);
            set_pod_condition(&mut pod, "Ready", "False", "PodCompleted", "");
        }
        let pod = Res::Pod.canonical(pod).expect("pod");
        st.commit(Res::Pod, ns, name, Some(pod));
    }

    pub fn set_kubelet(&self, auto_running: bool) {
        self.lock().kubelet = auto_running;
    }

    /// How long the namespace controller waits after a namespace's DELETE
    /// before deleting its content. Default 5 s, as the real controller's
    /// `namespaceDeletionGracePeriod`, so a `kubectl delete -k` that deletes a
    /// namespace before its content reaches every object before the
    /// controller does; with 0 it may get a 404 for the last ones.
    pub fn set_namespace_deletion_grace(&self, grace: Duration) {
        self.lock().namespace_deletion_grace = grace;
    }

    pub fn set_disruption_controller(&self, on: bool) {
        self.lock().disruption_controller = on;
    }

    /// How often a watch with allowWatchBookmarks=true gets a BOOKMARK
    /// (default 5 s; the real server sends one about every minute). Applies
    /// to watches opened afterwards.
    pub fn set_bookmark_interval(&self, every: Duration) {
        self.lock().bookmark_interval = every;
    }

    /// Aborts every open watch connection (the client sees a broken stream).
    pub fn drop_watches(&self) {
        let mut st = self.lock();
        for w in st.watchers.drain(..) {
            let _ = w.tx.send(WMsg::Abort);
        }
    }

    /// Makes the server unreachable, as a crashed or partitioned
    /// kube-apiserver looks to a client (`on`), or reachable again. While
    /// on, every connection, open or new, is reset without an HTTP response
    /// (requests fail with a connection error, open watches end abruptly,
    /// without the final chunk of a clean end); the stored objects, the
    /// history and the simulated controllers carry on, so once off it serves
    /// as before.
    pub fn set_unreachable(&self, on: bool) {
        self.shared.unreachable.send_modify(|(was, epoch)| {
            if on && !*was {
                *epoch += 1;
            }
            *was = on;
        });
        if on {
            // Their connections are reset already; this unregisters them.
            self.drop_watches();
        }
    }

    /// Every Lease of namespace `ns`, as stored (by name).
    pub fn leases(&self, ns: &str) -> Vec<Value> {
        self.lock().list_objs(Res::Lease, Some(ns))
    }

    /// Every ConfigMap of namespace `ns`, as stored (by name).
    pub fn config_maps(&self, ns: &str) -> Vec<Value> {
        self.lock().list_objs(Res::ConfigMap, Some(ns))
    }

    /// Forgets the watch history: every resourceVersion handed out so far is
    /// now too old to watch from (410 Expired, sent in-stream as an ERROR
    /// event). The global revision is bumped by one so a fresh list returns a
    /// watchable resourceVersion. Open watches are not affected.
    pub fn compact(&self) {
        let mut st = self.lock();
        st.rv += 1;
        st.history.clear();
        st.floor = st.rv;
    }

    /// Watch events (ADDED/MODIFIED/DELETED/ERROR) written to all streams.
    pub fn watch_events_sent(&self) -> u64 {
        self.shared.watch_events_sent.load(Ordering::SeqCst)
    }

    pub fn bookmarks_sent(&self) -> u64 {
        self.shared.bookmarks_sent.load(Ordering::SeqCst)
    }

    /// Number of watches currently registered.
    pub fn open_watches(&self) -> usize {
        let mut st = self.lock();
        st.watchers.retain(|w| !w.tx.is_closed());
        st.watchers.len()
    }

    /// `(method, path?query)` of every request so far.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.lock().requests.clone()
    }

    /// Current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.lock().rv
    }
}
