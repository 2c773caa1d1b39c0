//! The policy files exactly as written: strict serde types, no cross-references resolved yet.

use std::path::PathBuf;

use indexmap::IndexMap;
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPolicyFile {
    #[serde(default)]
    pub upstreams: IndexMap<String, RawUpstream>,
    #[serde(default)]
    pub models: IndexMap<String, RawModel>,
    #[serde(default)]
    pub tenants: IndexMap<String, RawTenant>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpstream {
    /// OpenAI-compatible base URL, including the version prefix (`https://api.openai.com/v1`).
    pub base_url: String,
    /// Name of the environment variable that holds the upstream's API key (never the key).
    pub api_key_env: Option<String>,
    /// Extra PEM CA bundle trusted for this upstream, beside the webpki roots.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout_ms: Option<u64>,
    /// Time allowed until the response headers arrive.
    pub first_byte_timeout_ms: Option<u64>,
    /// Longest silence allowed between two frames of a response body.
    pub idle_timeout_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// A remote upstream by name…
    pub upstream: Option<String>,
    /// …or a local model of `fuke.yaml` (`local_models`) by name.
    pub local: Option<String>,
    /// The model name the upstream knows; defaults to the alias.
    pub model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTenant {
    /// Aliases this tenant may call; `"*"` means all.
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default)]
    pub keys: Vec<RawKey>,
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    /// Lower-case hex SHA-256 of the key (`fuke keygen` prints it).
    pub sha256: String,
    #[serde(default)]
    pub role: Role,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u32>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Tenant,
    Finance,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Tenant => "tenant",
            Role::Finance => "finance",
            Role::Admin => "admin",
        }
    }
}
