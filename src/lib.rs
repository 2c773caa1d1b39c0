//! Fuke: an OpenAI-compatible inference gateway.
//!
//! Request flow (the order is written once, in [`app`]):
//!
//! ```text
//! TLS accept (rustls) -> hyper (HTTP/1.1 + h2)                         server
//!   -> request-id, catch-panic                                         app (tower layers)
//!   -> auth: bearer key -> Principal under one pinned Arc<Policy>      auth, policy
//!   -> policy: model allowed? token/request limits, budgets            app, limits, ledger
//!   -> body: size cap, parse only what we act on, rewrite model        proxy, openai
//!   -> rules: caps, blocks, redaction, residency (tenant + alias sets)  rules
//!   -> cache: exact, then semantic, in the tenant's scope --hit--> replay  cache, vectors
//!   -> knowledge base: granted collections searched, excerpts injected   kb
//!   -> route: candidates in order; breakers; first-token deadline       routing
//!   -> backend: remote OpenAI-compatible server (pooled, rustls),       backends
//!      or a local GGUF model in-process (llama.cpp, batched)            backends::local, embed
//!   -> relay: JSON whole / SSE frames as they arrived; usage sniffed    relay, sse
//!      (response rules: answers redacted, streams with a bounded hold-back)  rules::stream
//!   -> metering: UsageEvent recorded before the last bytes go out       metering
//!      (ledger row committed, group commit; spooled if the database fails)  ledger
//! ```
//!
//! Modules:
//! - [`server`] — accept loop, TLS, HTTP/1.1 + h2, graceful shutdown.
//! - [`app`] — the service and its stage order; health, readiness, metrics routes.
//! - [`proxy`] — model endpoints and `/v1/models`.
//! - [`relay`] — answer relaying and metering of JSON and SSE.
//! - [`sse`] — the zero-copy SSE scanner.
//! - [`openai`] — wire types (requests kept as raw JSON fields).
//! - [`error`] — the one error type and its OpenAI-shaped response.
//! - [`auth`] — API keys to principals.
//! - [`policy`] — policy files, validation, hot reload.
//! - [`config`] — `fuke.yaml`.
//! - [`routing`] — candidates, first-token deadline, circuit breakers, fallback.
//! - [`backends`] — the backend trait, remote upstreams and local llama.cpp models.
//! - [`rules`] — policy content rules: redaction, blocking, caps, residency, answer redaction.
//! - [`cache`] — the exact and semantic answer cache (moka, per tenant).
//! - [`vectors`] — exact vector search shared by the cache and the knowledge base.
//! - [`kb`] — the knowledge base: chunking, incremental index, hybrid retrieval, injection.
//! - [`embed`] — local embeddings (`/v1/embeddings` and the vectors cache and KB use).
//! - [`limits`] — request and token rate limits per tenant and key (in process or Redis).
//! - [`metering`] — usage events and sinks.
//! - [`ledger`] — the durable usage ledger (SQLite/PostgreSQL), pricing, budgets' totals, reports.
//! - [`dashboard`] — the embedded finance dashboard page.
//! - [`telemetry`] — logging and Prometheus metrics.
//! - [`trace`] — OpenTelemetry spans over OTLP.
//! - [`tls`] — rustls server configs with certificate hot reload.
//! - [`reload`] — file watching for hot reload.
//! - [`redis_link`] — the background-connected Redis link the cache and limits share.
//! - [`devcerts`] — development certificates.

pub mod app;
pub mod auth;
pub mod backends;
pub mod body;
pub mod cache;
pub mod config;
pub mod dashboard;
pub mod devcerts;
pub mod embed;
pub mod error;
pub mod kb;
pub mod ledger;
pub mod limits;
pub mod logwriter;
pub mod metering;
pub mod openai;
pub mod policy;
pub mod proxy;
pub mod redis_link;
pub mod relay;
pub mod reload;
pub mod routing;
pub mod rules;
pub mod server;
pub mod sse;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod vectors;
