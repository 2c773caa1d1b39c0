//! Remote OpenAI-compatible upstreams over a pooled hyper-util client with rustls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, header};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnectorBuilder;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{Backend, BackendRequest, BackendResponse, BoxFuture};
use crate::body::Body;
use crate::error::Error;
use crate::openai::Endpoint;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Body>;

const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Headers of an upstream answer that the client should see.
fn relayed(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "content-type"
            | "retry-after"
            | "x-ratelimit-limit-requests"
            | "x-ratelimit-limit-tokens"
            | "x-ratelimit-remaining-requests"
            | "x-ratelimit-remaining-tokens"
            | "x-ratelimit-reset-requests"
            | "x-ratelimit-reset-tokens"
            | "openai-processing-ms"
    )
}

/// Clients shared across policy versions, keyed by what makes them differ, so a reload keeps
/// the warm connection pools.
#[derive(Default)]
pub struct ClientPool {
    clients: Mutex<HashMap<(Vec<u8>, u64), HttpClient>>,
}

impl ClientPool {
    /// A client trusting the webpki roots plus the PEM CAs in `extra_ca`.
    pub fn get(&self, extra_ca: &[u8], connect_timeout: Duration) -> Result<HttpClient, String> {
        let key = (extra_ca.to_vec(), connect_timeout.as_millis() as u64);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = build_client(extra_ca, connect_timeout)?;
        clients.insert(key, client.clone());
        Ok(client)
    }
}

fn build_client(extra_ca: &[u8], connect_timeout: Duration) -> Result<HttpClient, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if !extra_ca.is_empty() {
        let mut n = 0;
        for cert in CertificateDer::pem_slice_iter(extra_ca) {
            let cert = cert.map_err(|e| format!("invalid PEM certificate: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("unusable CA certificate: {e}"))?;
            n += 1;
        }
        if n == 0 {
            return Err("no certificate found in the CA file".into());
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(1024)
        .build(https))
}

/// One upstream from policy, ready to call.
pub struct Remote {
    pub name: String,
    /// Base URL without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// The endpoint URIs under `base_url`, parsed once.
    pub uris: EndpointUris,
    pub api_key: Option<HeaderValue>,
    pub client: HttpClient,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The API key stays out of every log line.
        f.debug_struct("Remote")
            .field("name", &self.name)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

/// Full URIs of the endpoints of one upstream.
#[derive(Debug, Clone)]
pub struct EndpointUris {
    chat: Uri,
    completions: Uri,
    embeddings: Uri,
    transcriptions: Uri,
}

impl EndpointUris {
    /// The URIs hold their text as `&'static` bytes (see [`interned`]): hyper clones a request's
    /// authority and path several times, and clones of shared bytes are atomic reference counts
    /// that every request on every core would otherwise write to.
    pub fn new(base_url: &str) -> Result<Self, http::uri::InvalidUri> {
        let uri = |e: Endpoint| {
            let text = format!("{base_url}{}", e.upstream_path());
            // Only valid URIs are kept for the life of the process.
            text.parse::<Uri>()?;
            Uri::from_maybe_shared(bytes::Bytes::from_static(interned(text).as_bytes()))
        };
        Ok(EndpointUris {
            chat: uri(Endpoint::ChatCompletions)?,
            completions: uri(Endpoint::Completions)?,
            embeddings: uri(Endpoint::Embeddings)?,
            transcriptions: uri(Endpoint::AudioTranscriptions)?,
        })
    }

    fn get(&self, endpoint: Endpoint) -> Uri {
        match endpoint {
            Endpoint::ChatCompletions => self.chat.clone(),
            Endpoint::Completions => self.completions.clone(),
            Endpoint::Embeddings => self.embeddings.clone(),
            Endpoint::AudioTranscriptions => self.transcriptions.clone(),
        }
    }
}

/// `text` as a string that lives as long as the process, kept once however often it is asked
/// for: the upstream URIs of every policy version, so memory grows only with the number of
/// distinct upstream URLs ever configured, not with reloads.
fn interned(text: String) -> &'static str {
    static TEXTS: std::sync::LazyLock<Mutex<std::collections::HashSet<&'static str>>> =
        std::sync::LazyLock::new(Default::default);
    let mut texts = TEXTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(t) = texts.get(text.as_str()) {
        return t;
    }
    let t: &'static str = Box::leak(text.into_boxed_str());
    texts.insert(t);
    t
}

// === impl Remote ===

impl Remote {
    async fn call(&self, req: BackendRequest) -> Result<BackendResponse, Error> {
        let mut request = Request::new(req.body);
        *request.method_mut() = Method::POST;
        *request.uri_mut() = self.uris.get(req.endpoint);
        let headers = request.headers_mut();
        headers.reserve(5);
        headers.insert(header::CONTENT_TYPE, req.content_type);
        headers.insert(header::USER_AGENT, HeaderValue::from_static("fuke/0.1"));
        headers.insert(crate::app::X_REQUEST_ID, req.request_id);
        if let Some(tp) = req.traceparent {
            headers.insert(TRACEPARENT, tp);
        }
        if let Some(len) = req.content_length {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        if let Some(key) = &self.api_key {
            headers.insert(header::AUTHORIZATION, key.clone());
        }

        let response = tokio::time::timeout(self.first_byte_timeout, self.client.request(request))
            .await
            .map_err(|_| Error::UpstreamTimeout {
                upstream: self.name.clone(),
                after_ms: self.first_byte_timeout.as_millis() as u64,
            })?
            .map_err(|e| {
                let detail = error_chain(&e);
                if e.is_connect() {
                    Error::UpstreamConnect {
                        upstream: self.name.clone(),
                        detail,
                    }
                } else {
                    Error::UpstreamProtocol {
                        upstream: self.name.clone(),
                        detail,
                    }
                }
            })?;

        let (parts, body) = response.into_parts();
        let mut headers = HeaderMap::new();
        for (name, value) in &parts.headers {
            if relayed(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        Ok(BackendResponse {
            status: parts.status,
            headers,
            body: body.map_err(Into::into).boxed_unsync(),
            idle_timeout: self.idle_timeout,
            deadline: None,
        })
    }
}

impl Backend for Remote {
    fn name(&self) -> &str {
        &self.name
    }

    fn send(&self, req: BackendRequest) -> BoxFuture<'_, Result<BackendResponse, Error>> {
        super::pin_in_place(|| self.call(req))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_uris_are_kept_once_however_often_a_policy_is_loaded() {
        let a = EndpointUris::new("http://127.0.0.1:9/v1").unwrap();
        let b = EndpointUris::new("http://127.0.0.1:9/v1").unwrap();
        let (ua, ub) = (
            a.get(Endpoint::ChatCompletions),
            b.get(Endpoint::Embeddings),
        );
        assert_eq!(ua.to_string(), "http://127.0.0.1:9/v1/chat/completions");
        assert_eq!(ub.to_string(), "http://127.0.0.1:9/v1/embeddings");
        // The same text, not a second copy: reloads do not add memory.
        let again = b.get(Endpoint::ChatCompletions);
        assert_eq!(ua.path().as_ptr(), again.path().as_ptr());
        assert!(EndpointUris::new("http://exa mple/v1").is_err());
    }
}
