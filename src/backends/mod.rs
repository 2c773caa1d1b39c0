//! Backends answer model requests. One trait; `remote` speaks to any OpenAI-compatible server,
//! `local` runs GGUF models in-process with llama.cpp.

pub(crate) mod gguf;
pub mod local;
pub mod remote;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use http::{HeaderMap, HeaderValue, StatusCode};

use crate::body::Body;
use crate::error::Error;
use crate::openai::Endpoint;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Boxes the future that `make` returns, built in its heap slot. `Box::pin(f())` builds `f`'s
/// future on the stack at the size of its largest state (kilobytes for the request handler,
/// whose nested awaits are all inline) and then copies all of it, although only the arguments
/// are set; allocating first lets the compiler write those straight into the box.
#[inline(always)]
pub fn pin_in_place<F>(make: impl FnOnce() -> F) -> Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// What the gateway asks of a backend: the body is already rewritten for it.
pub struct BackendRequest {
    pub endpoint: Endpoint,
    pub body: Body,
    pub content_type: HeaderValue,
    pub content_length: Option<u64>,
    pub request_id: HeaderValue,
    /// W3C `traceparent` of the call's span, when tracing is on.
    pub traceparent: Option<HeaderValue>,
}

/// The backend's answer, body still streaming.
pub struct BackendResponse {
    pub status: StatusCode,
    /// Headers worth relaying to the client (content type, retry-after, rate-limit hints).
    pub headers: HeaderMap,
    pub body: Body,
    /// Longest silence allowed between two body frames.
    pub idle_timeout: Duration,
    /// When the whole answer must be done (the candidate's total timeout), if ever.
    pub deadline: Option<tokio::time::Instant>,
}

/// What policies resolve backend names against: pooled HTTP clients for remote upstreams and
/// the local models of `fuke.yaml`.
#[derive(Default)]
pub struct Registry {
    pub clients: remote::ClientPool,
    pub local: local::LocalModels,
    /// Circuit breakers and in-flight counts per backend + model, kept across reloads.
    pub health: std::sync::Arc<crate::routing::Board>,
    /// The local embedding model (fuke.yaml `embedder:`) the cache and knowledge base use.
    pub embedder: Option<String>,
    /// Every tenant's answer cache, kept across reloads.
    pub cache: std::sync::Arc<crate::cache::Store>,
    /// Collections policies may grant (fuke.yaml `kb:`); `None` without a knowledge base.
    pub kb_collections: Option<Vec<String>>,
    /// The knowledge base, when serving with one.
    pub kb: Option<std::sync::Arc<crate::kb::KnowledgeBase>>,
}

impl Registry {
    /// The configured embedder, if it loaded.
    pub fn embedder(&self) -> Option<std::sync::Arc<crate::embed::Embedder>> {
        self.embedder
            .as_deref()
            .and_then(|n| self.local.embedder(n))
    }
}

pub trait Backend: Send + Sync {
    /// Stable name used in metrics, logs and usage events.
    fn name(&self) -> &str;

    /// Whether it runs on this machine (data-residency rules keep some tenants here).
    fn is_local(&self) -> bool {
        false
    }

    fn send(&self, req: BackendRequest) -> BoxFuture<'_, Result<BackendResponse, Error>>;
}

impl std::fmt::Debug for dyn Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
