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
    /// Named rule sets (redaction, blocking, caps, residency) that tenants and aliases attach.
    #[serde(default)]
    pub rules: IndexMap<String, RawRuleSet>,
    /// Prices per served model, for the ledger's cost column.
    pub pricing: Option<RawPricing>,
}

/// `pricing:`: USD per million tokens per served model (the upstream's model name, or
/// `UPSTREAM/model` for one provider's price; local models by their `local:` name).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPricing {
    /// Stored with every row's cost; default: a hash of the table.
    pub version: Option<String>,
    #[serde(default)]
    pub models: IndexMap<String, RawPrice>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPrice {
    pub input: PriceText,
    pub output: PriceText,
    /// Prompt tokens served from the provider's prompt cache (default: `input`).
    pub cached_input: Option<PriceText>,
}

/// A price as written: `"0.15"` or `0.15`; checked (at most 3 decimals) by the loader.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PriceText {
    Text(String),
    Int(u64),
    Float(f64),
}

impl PriceText {
    pub fn text(&self) -> String {
        match self {
            PriceText::Text(s) => s.clone(),
            PriceText::Int(n) => n.to_string(),
            PriceText::Float(f) => f.to_string(),
        }
    }
}

/// `rules.NAME`: content rules applied to requests before cache, knowledge base and routing.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRuleSet {
    /// What is replaced by a token, in requests (and in answers when `responses` is true).
    #[serde(default)]
    pub redact: Vec<RawRedact>,
    /// What refuses a request with a 400 naming the rule.
    #[serde(default)]
    pub block: Vec<RawBlock>,
    #[serde(default)]
    pub caps: RawCaps,
    /// `local`: requests under this set are only ever served by local models.
    pub residency: Option<Residency>,
    /// Also redact model answers (JSON and streamed). Default false.
    #[serde(default)]
    pub responses: bool,
}

/// One redaction: a built-in detector or a custom regex.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedact {
    /// `email`, `phone`, `cn_mobile`, `card`, `cn_id` or `iban`.
    pub builtin: Option<String>,
    /// A regex (Rust `regex` syntax) whose matches are replaced.
    pub pattern: Option<String>,
    /// The rule's name in metrics and usage (default: the built-in's name; required with
    /// `pattern`).
    pub name: Option<String>,
    /// What replaces a match (default: `[EMAIL]`, `[PHONE]`, `[CARD]`, `[ID]`, `[IBAN]`,
    /// `[REDACTED]`).
    pub replacement: Option<String>,
}

/// One block rule: keywords and/or a regex, matched case- and width-insensitively.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBlock {
    pub name: String,
    #[serde(default)]
    pub keywords: Vec<String>,
    pub pattern: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaps {
    /// Ceiling on `max_tokens` / `max_completion_tokens`: higher values are lowered to it, and
    /// requests without one get it.
    pub max_tokens: Option<u32>,
    /// Top-level request fields allowed (`model` always is); others are refused with a 400.
    pub allowed_params: Option<Vec<String>>,
    /// Most messages in a chat request.
    pub max_messages: Option<usize>,
    /// Most characters of text over all messages (or prompt, or embedding input).
    pub max_prompt_chars: Option<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Residency {
    /// Remote and local candidates alike (the default).
    Any,
    /// Local models only: nothing leaves the machine.
    Local,
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
    /// Circuit breaker thresholds for every model called on this upstream.
    #[serde(default)]
    pub breaker: RawBreaker,
}

/// Circuit breaker thresholds; each has a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBreaker {
    /// Open when this share of calls in the window failed (0 < rate <= 1; default 0.5)…
    pub failure_rate: Option<f64>,
    /// …over this rolling window (default 10000)…
    pub window_ms: Option<u64>,
    /// …once the window holds this many calls (default 10).
    pub min_calls: Option<u32>,
    /// Open after this many failures in a row (default 5).
    pub consecutive_failures: Option<u32>,
    /// How long an open breaker refuses calls (default 5000).
    pub cooldown_ms: Option<u64>,
    /// Probe calls while half-open; all must succeed to close (default 1).
    pub probes: Option<u32>,
}

/// A model alias: one backend (`upstream` or `local`, with its settings), or `candidates`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Ordered candidates: tried tier by tier, weighted inside a tier.
    pub candidates: Option<Vec<RawCandidate>>,
    pub name: Option<String>,
    pub upstream: Option<String>,
    pub local: Option<String>,
    pub model: Option<String>,
    pub timeout_ms: Option<u64>,
    pub max_in_flight: Option<u32>,
    /// Rule sets applied to every request for this alias (after the tenant's).
    #[serde(default)]
    pub rules: Vec<String>,
}

impl RawModel {
    /// The one-backend form as a candidate list (empty when no backend is named).
    pub fn single(&self) -> Option<RawCandidate> {
        (self.upstream.is_some() || self.local.is_some()).then(|| RawCandidate {
            name: self.name.clone(),
            upstream: self.upstream.clone(),
            local: self.local.clone(),
            model: self.model.clone(),
            timeout_ms: self.timeout_ms,
            max_in_flight: self.max_in_flight,
            ..RawCandidate::default()
        })
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCandidate {
    /// Shown in `x-fuke-backend`; default `upstream/model` or `local/name`.
    pub name: Option<String>,
    /// A remote upstream by name…
    pub upstream: Option<String>,
    /// …or a local model of `fuke.yaml` (`local_models`) by name.
    pub local: Option<String>,
    /// The model name the upstream knows; defaults to the alias.
    pub model: Option<String>,
    /// Candidates of one tier share the load by weight (default 1).
    pub weight: Option<u32>,
    /// Lower tiers are tried first; default: the candidate's position in the list.
    pub tier: Option<u32>,
    /// Move on when no content token came within this (default 200; 0: wait).
    pub first_token_timeout_ms: Option<u64>,
    /// Longest a whole answer may take (default: only the upstream's own timeouts).
    pub timeout_ms: Option<u64>,
    /// Calls in flight to this candidate beyond which it is passed over.
    pub max_in_flight: Option<u32>,
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
    /// The answer cache; off when absent.
    pub cache: Option<RawCache>,
    /// Knowledge-base context added to chat requests; off when absent.
    pub kb: Option<RawKb>,
    /// Rule sets (names under `rules:`) applied to this tenant's requests, in order.
    #[serde(default)]
    pub rules: Vec<String>,
}

/// `tenants.NAME.kb`: which collections this tenant's questions are answered from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKb {
    /// Collections (directories under fuke.yaml `kb.dir`) this tenant may read.
    pub collections: Vec<String>,
    /// Most excerpts injected (default 3).
    pub top_k: Option<usize>,
    /// Least hybrid score of an excerpt, in [0, 1] (default: BENCHMARKS.md, "Knowledge base").
    pub min_score: Option<f32>,
    /// User turns that form the retrieval question (default 1: the last user message).
    pub turns: Option<usize>,
    /// minijinja template of the injected system message (sees `excerpts` and `question`).
    pub template: Option<String>,
}

/// `tenants.NAME.cache`: each setting has a default (BENCHMARKS.md, "Semantic cache").
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCache {
    /// Default true: writing the block turns the cache on.
    pub enabled: Option<bool>,
    /// Semantic level (default: on when fuke.yaml names an `embedder`).
    pub semantic: Option<bool>,
    /// Least cosine similarity for a semantic hit, in (0, 1].
    pub threshold: Option<f32>,
    pub ttl_secs: Option<u64>,
    /// Bytes of answers, questions and vectors kept for the tenant (default 64 MiB).
    pub capacity_bytes: Option<u64>,
    /// Also cache answers to sampled requests (temperature absent or above 0). Default false.
    pub sampled: Option<bool>,
    /// Semantic matching of Chinese/Japanese/Korean questions (needs a multilingual embedder).
    /// Default false: they use the exact level only.
    pub semantic_cjk: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    pub id: String,
    /// Lower-case hex SHA-256 of the key (`fuke keygen` prints it).
    pub sha256: String,
    #[serde(default)]
    pub role: Role,
    /// This key's own limits, on top of its tenant's.
    #[serde(default)]
    pub limits: RawLimits,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub requests_per_minute: Option<u32>,
    /// Prompt + completion tokens per minute, as the upstream reported them.
    pub tokens_per_minute: Option<u32>,
    /// Spending limits in USD, checked against the ledger's running totals.
    pub budget: Option<RawBudget>,
}

/// `limits.budget`: USD per UTC day and per UTC calendar month.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    pub daily_usd: Option<PriceText>,
    pub monthly_usd: Option<PriceText>,
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
