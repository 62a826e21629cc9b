//! What the Nova client needs to reach a cloud: Keystone credentials and the
//! catalog choices. The client owns this type; `config` fills it from the
//! config file, `clouds.yaml` and the `OS_*` environment. Secrets stay in
//! [`SecretString`], so `Debug` never shows them.

use std::path::PathBuf;

use secrecy::SecretString;

/// Keystone credentials and how to reach the cloud.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub auth_url: String,
    pub username: Option<String>,
    pub user_id: Option<String>,
    pub password: Option<SecretString>,
    pub user_domain_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub application_credential_id: Option<String>,
    pub application_credential_name: Option<String>,
    pub application_credential_secret: Option<SecretString>,
    pub region_name: Option<String>,
    /// Catalog interface: public, internal or admin.
    pub interface: String,
    pub cacert: Option<PathBuf>,
    pub insecure: bool,
}
