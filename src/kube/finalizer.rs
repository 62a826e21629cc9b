//! One finalizer of ours on any object, put on and taken off without touching
//! anyone else's: both writes are conditional on what was read, so a
//! concurrent change makes them fail and be read again, never overwritten.

use std::fmt::Debug;

use kube::api::{Patch, PatchParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Why a finalizer could not be put on or taken off.
#[derive(Debug, thiserror::Error)]
pub enum FinalizerError {
    #[error(transparent)]
    Api(#[from] kube::Error),
    #[error("the finalizers of {0} kept changing while ours was being removed")]
    Contended(String),
}

/// How many times a removal that met a concurrent change is read and tried again.
const ROUNDS: usize = 4;

/// Puts `finalizer` on object `name` if it is missing; `Ok(false)`: the
/// object is gone, or already carries it.
pub async fn add<K>(api: &Api<K>, name: &str, finalizer: &str) -> Result<bool, FinalizerError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    let Some(object) = api.get_opt(name).await? else {
        return Ok(false);
    };
    let mut finalizers = object.meta().finalizers.clone().unwrap_or_default();
    if finalizers.iter().any(|f| f == finalizer) {
        return Ok(false);
    }
    finalizers.push(finalizer.to_string());
    // The resourceVersion makes it a conditional update: a lost race answers 409.
    let patch = json!({"metadata": {
        "finalizers": finalizers,
        "resourceVersion": object.meta().resource_version,
    }});
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(true)
}

/// Takes `finalizer` off object `name`, leaving any other: a JSON patch that
/// first tests the list it read. `Ok(false)`: gone, or it did not carry it.
pub async fn remove<K>(api: &Api<K>, name: &str, finalizer: &str) -> Result<bool, FinalizerError>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    for _ in 0..ROUNDS {
        let Some(object) = api.get_opt(name).await? else {
            return Ok(false);
        };
        let finalizers = object.meta().finalizers.clone().unwrap_or_default();
        if !finalizers.iter().any(|f| f == finalizer) {
            return Ok(false);
        }
        let kept: Vec<&String> = finalizers.iter().filter(|f| *f != finalizer).collect();
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": finalizers},
            {"op": "replace", "path": "/metadata/finalizers", "value": kept},
        ]))
        .map_err(kube::Error::SerdeError)?;
        match api
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(false),
            // The list changed under us (422 from the failed test, 409 on a conflict): read again.
            Err(kube::Error::Api(status)) if matches!(status.code, 409 | 422) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(FinalizerError::Contended(name.to_string()))
}
