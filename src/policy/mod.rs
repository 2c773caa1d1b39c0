//! Policy: tenants, keys, roles, model aliases and upstreams, read from `policies/*.yaml`,
//! validated as a whole into an indexed [`Policy`], and hot-swapped as a whole (see `watch`).

pub(crate) mod lines;
pub(crate) mod load;
pub mod raw;
pub mod store;

use std::collections::HashMap;
use std::sync::Arc;

use subtle::ConstantTimeEq;

pub use load::{Problem, Problems, load_dir};
pub use raw::Role;
pub use store::PolicyStore;

use crate::routing::Candidate;

/// Who is calling: resolved from the API key, carried through the whole request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub tenant: Arc<str>,
    pub key_id: Arc<str>,
    pub role: Role,
    /// The key's own limits (its tenant's apply too).
    pub limits: Limits,
}

#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    /// Sorted aliases this tenant may use.
    pub models: Vec<Arc<str>>,
    pub limits: Limits,
    /// Limits of its keys that have their own, by key id.
    pub key_limits: HashMap<Arc<str>, Limits>,
    /// The answer cache's settings; `None`: off.
    pub cache: Option<crate::cache::Settings>,
    /// Knowledge-base retrieval; `None`: off.
    pub kb: Option<KbGrant>,
    /// Content rule sets applied to its requests, in order.
    pub rules: Vec<Arc<crate::rules::RuleSet>>,
}

/// What a tenant retrieves from the knowledge base, and how the excerpts are injected.
#[derive(Debug)]
pub struct KbGrant {
    pub collections: Vec<Arc<str>>,
    pub top_k: usize,
    pub min_score: f32,
    pub turns: usize,
    pub template: minijinja::Environment<'static>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Nano-USD per UTC day.
    pub daily_budget: Option<i64>,
    /// Nano-USD per UTC calendar month.
    pub monthly_budget: Option<i64>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Limits::default()
    }

    pub fn has_budget(&self) -> bool {
        self.daily_budget.is_some() || self.monthly_budget.is_some()
    }
}

/// An alias clients name in `model`, and where it goes: candidates sorted by tier.
#[derive(Debug)]
pub struct ModelRoute {
    pub alias: Arc<str>,
    pub candidates: Vec<Candidate>,
    /// Content rule sets applied to every request for this alias (after the tenant's).
    pub rules: Vec<Arc<crate::rules::RuleSet>>,
}

/// The policy's lookup maps: aHash (keyed per process, fast on short keys) instead of SipHash;
/// every request does several lookups.
pub(crate) type Map<K, V> = HashMap<K, V, ahash::RandomState>;

/// One complete, validated policy version. Requests pin one `Arc<Policy>` for their lifetime.
#[derive(Debug)]
pub struct Policy {
    pub version: u64,
    keys: Map<[u8; 32], (Principal, [u8; 32])>,
    tenants: Map<Arc<str>, Tenant>,
    models: Map<Arc<str>, ModelRoute>,
    /// Prices for the ledger's cost column; `None` when the policy has no `pricing:`.
    pub pricing: Option<Arc<crate::ledger::pricing::Pricing>>,
}

// === impl Policy ===

impl Policy {
    /// Resolves a presented API key. The map is keyed by the key's SHA-256 (so lookups reveal
    /// nothing about stored hashes), and the stored hash is then compared in constant time.
    pub fn authenticate(&self, key: &[u8]) -> Option<&Principal> {
        let digest = sha256(key);
        let (principal, stored) = self.keys.get(&digest)?;
        bool::from(stored.ct_eq(&digest)).then_some(principal)
    }

    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.get(name)
    }

    /// Every tenant, by name.
    pub fn tenants(&self) -> Vec<&Tenant> {
        let mut all: Vec<&Tenant> = self.tenants.values().collect();
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// The route for `alias` if `tenant` may use it; the error says which of the two failed.
    pub fn route_for(&self, tenant: &Tenant, alias: &str) -> Result<&ModelRoute, RouteRefusal> {
        let route = self.models.get(alias).ok_or(RouteRefusal::Unknown)?;
        if tenant
            .models
            .binary_search_by(|m| m.as_ref().cmp(alias))
            .is_ok()
        {
            Ok(route)
        } else {
            Err(RouteRefusal::NotAllowed)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteRefusal {
    Unknown,
    NotAllowed,
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut out = [0u8; 32];
    out.copy_from_slice(&Sha256::digest(data));
    out
}
