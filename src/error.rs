//! The one `Error` type of the request path, its classification, and the only place an error
//! becomes an HTTP response (OpenAI's `{"error":{"message","type","param","code"}}`).

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use serde::Serialize;

use crate::body::{self, Body};

/// Where an error comes from; decides logging level and whether another candidate may be tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The caller sent something we refuse.
    Client,
    /// The upstream model server failed, lied or hung.
    Upstream,
    /// A bug or resource problem inside the gateway.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("missing or invalid API key")]
    InvalidApiKey { provided: bool },
    #[error("model `{model}` is not allowed for this key")]
    ModelNotAllowed { model: String },
    #[error("model `{model}` does not exist")]
    ModelNotFound { model: String },
    /// A data-residency rule keeps the tenant on local models, and the alias has none that can
    /// answer.
    #[error("rule `{rule}` keeps requests for `{model}` on local models")]
    Residency { model: String, rule: String },
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
        code: Option<&'static str>,
    },
    #[error("request body larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// A 429: a tenant's or key's limit (`unit`: requests, tokens), a spent budget (`unit`:
    /// budget), or a local model's full queue (requests, no `limit`).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after_secs: u64,
        unit: &'static str,
        /// The limit per minute, for the `x-ratelimit-*` headers.
        limit: Option<u64>,
    },
    #[error("role `{role}` may not call {what}")]
    Forbidden { role: &'static str, what: String },
    #[error("unknown route {method} {path}")]
    UnknownRoute { method: String, path: String },
    #[error("method {method} not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("upstream `{upstream}` unreachable: {detail}")]
    UpstreamConnect { upstream: String, detail: String },
    #[error("upstream `{upstream}` timed out after {after_ms} ms")]
    UpstreamTimeout { upstream: String, after_ms: u64 },
    #[error("upstream `{upstream}` sent an invalid response: {detail}")]
    UpstreamProtocol { upstream: String, detail: String },
    /// A model that cannot serve now (a local model that failed to load, or stopped).
    #[error("{message} ({detail})")]
    Unavailable { message: String, detail: String },
    /// The usage ledger is off, or its database cannot be read (reports, budget checks).
    #[error("{message} ({detail})")]
    LedgerUnavailable { message: String, detail: String },
    /// Every candidate of a route refused the call (breaker open, at capacity).
    #[error("no backend of `{model}` is available")]
    NoBackend {
        model: String,
        retry_after_secs: u64,
    },
    #[error("the gateway is shutting down")]
    ShuttingDown,
    #[error("internal error: {0}")]
    Internal(String),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorFields<'a>,
}

#[derive(Serialize)]
struct ErrorFields<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

// === impl Error ===

impl Error {
    pub fn invalid(message: impl Into<String>, param: impl Into<Option<String>>) -> Self {
        Error::InvalidRequest {
            message: message.into(),
            param: param.into(),
            code: None,
        }
    }

    pub fn source_kind(&self) -> ErrorSource {
        match self {
            Error::UpstreamConnect { .. }
            | Error::UpstreamTimeout { .. }
            | Error::UpstreamProtocol { .. }
            | Error::NoBackend { .. } => ErrorSource::Upstream,
            Error::Internal(_)
            | Error::ShuttingDown
            | Error::Unavailable { .. }
            | Error::LedgerUnavailable { .. } => ErrorSource::Internal,
            _ => ErrorSource::Client,
        }
    }

    /// Whether another attempt (same or next candidate) could succeed without the caller
    /// changing anything.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Error::UpstreamConnect { .. } | Error::UpstreamTimeout { .. } | Error::ShuttingDown
        )
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::InvalidApiKey { .. } => StatusCode::UNAUTHORIZED,
            Error::ModelNotAllowed { .. } | Error::Forbidden { .. } | Error::Residency { .. } => {
                StatusCode::FORBIDDEN
            }
            Error::ModelNotFound { .. } | Error::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            Error::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            Error::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::MethodNotAllowed { .. } => StatusCode::METHOD_NOT_ALLOWED,
            Error::UpstreamConnect { .. } | Error::UpstreamProtocol { .. } => {
                StatusCode::BAD_GATEWAY
            }
            Error::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Error::ShuttingDown
            | Error::Unavailable { .. }
            | Error::LedgerUnavailable { .. }
            | Error::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The JSON error body clients see. Internal details never leave the process: upstream and
    /// internal errors get a fixed message, the detail goes to the log.
    pub fn body_bytes(&self) -> Bytes {
        let owned;
        let (message, kind, param, code): (&str, &str, Option<&str>, Option<&str>) = match self {
            Error::InvalidApiKey { provided: false } => (
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            Error::InvalidApiKey { provided: true } => (
                "Incorrect API key provided.",
                "invalid_request_error",
                None,
                Some("invalid_api_key"),
            ),
            Error::ModelNotAllowed { model } => {
                owned = format!("This key is not allowed to use the model `{model}`.");
                (
                    &owned,
                    "invalid_request_error",
                    Some("model"),
                    Some("model_not_allowed"),
                )
            }
            Error::Residency { model, rule } => {
                owned = format!(
                    "Policy rule '{rule}' keeps this key's requests on local models, and the model `{model}` has no local backend."
                );
                (
                    &owned,
                    "invalid_request_error",
                    Some("model"),
                    Some("data_residency"),
                )
            }
            Error::ModelNotFound { model } => {
                owned =
                    format!("The model `{model}` does not exist or you do not have access to it.");
                (
                    &owned,
                    "invalid_request_error",
                    Some("model"),
                    Some("model_not_found"),
                )
            }
            Error::InvalidRequest {
                message,
                param,
                code,
            } => (message, "invalid_request_error", param.as_deref(), *code),
            Error::BodyTooLarge { limit } => {
                owned = format!("Request body is larger than the limit of {limit} bytes.");
                (
                    &owned,
                    "invalid_request_error",
                    None,
                    Some("request_too_large"),
                )
            }
            // OpenAI's shapes: `type` names what ran out; a spent budget is
            // `insufficient_quota`, which the SDKs do not retry.
            Error::RateLimited {
                message,
                unit: "budget",
                ..
            } => (
                message,
                "insufficient_quota",
                None,
                Some("insufficient_quota"),
            ),
            Error::RateLimited { message, unit, .. } => {
                (message, unit, None, Some("rate_limit_exceeded"))
            }
            Error::Forbidden { .. } => {
                owned = self.to_string();
                (
                    &owned,
                    "invalid_request_error",
                    None,
                    Some("permission_denied"),
                )
            }
            Error::UnknownRoute { method, path } => {
                owned = format!("Invalid URL ({method} {path})");
                (&owned, "invalid_request_error", None, Some("unknown_url"))
            }
            Error::MethodNotAllowed { method, path } => {
                owned = format!("Method {method} is not allowed on {path}.");
                (
                    &owned,
                    "invalid_request_error",
                    None,
                    Some("method_not_allowed"),
                )
            }
            Error::UpstreamConnect { .. } | Error::UpstreamProtocol { .. } => (
                "The model provider could not be reached or answered invalidly.",
                "server_error",
                None,
                Some("upstream_error"),
            ),
            Error::UpstreamTimeout { .. } => (
                "The model provider did not answer in time.",
                "server_error",
                None,
                Some("upstream_timeout"),
            ),
            Error::Unavailable { message, .. } => {
                (message, "server_error", None, Some("model_unavailable"))
            }
            Error::LedgerUnavailable { message, .. } => {
                (message, "server_error", None, Some("ledger_unavailable"))
            }
            Error::NoBackend { model, .. } => {
                owned = format!(
                    "Every backend of the model `{model}` is unavailable right now (circuit open or at capacity). Retry shortly."
                );
                (&owned, "server_error", None, Some("backends_unavailable"))
            }
            Error::ShuttingDown => (
                "The gateway is shutting down; retry on another instance.",
                "server_error",
                None,
                Some("shutting_down"),
            ),
            Error::Internal(_) => (
                "The gateway had an internal error.",
                "server_error",
                None,
                Some("internal_error"),
            ),
        };
        let body = ErrorBody {
            error: ErrorFields {
                message,
                kind,
                param,
                code,
            },
        };
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
    }

    /// The only mapping from an error to an HTTP response.
    pub fn into_response(self) -> Response<Body> {
        match self.source_kind() {
            ErrorSource::Client => tracing::debug!(error = %self, "request refused"),
            ErrorSource::Upstream => tracing::warn!(error = %self, "upstream failure"),
            ErrorSource::Internal => tracing::error!(error = %self, "internal error"),
        }
        let mut resp = Response::new(body::full(self.body_bytes()));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Error::RateLimited { unit: "budget", .. } = &self {
            // The OpenAI SDKs retry every 429 unless told not to; a spent budget does not come
            // back in seconds.
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Error::RateLimited {
            unit: unit @ ("requests" | "tokens"),
            limit: Some(limit),
            retry_after_secs,
            ..
        } = &self
        {
            let h = resp.headers_mut();
            let name = |what: &str| {
                http::HeaderName::from_bytes(format!("x-ratelimit-{what}-{unit}").as_bytes())
            };
            if let Ok(n) = name("limit") {
                h.insert(n, HeaderValue::from(*limit));
            }
            if let Ok(n) = name("remaining") {
                h.insert(n, HeaderValue::from(0u64));
            }
            if let (Ok(n), Ok(v)) = (
                name("reset"),
                HeaderValue::from_str(&format!("{retry_after_secs}s")),
            ) {
                h.insert(n, v);
            }
        }
        if let Error::RateLimited {
            retry_after_secs, ..
        }
        | Error::NoBackend {
            retry_after_secs, ..
        } = &self
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification_status_and_body_shape() {
        let cases = [
            (
                Error::InvalidApiKey { provided: true },
                401,
                ErrorSource::Client,
                false,
            ),
            (
                Error::ModelNotFound { model: "m".into() },
                404,
                ErrorSource::Client,
                false,
            ),
            (
                Error::BodyTooLarge { limit: 1 },
                413,
                ErrorSource::Client,
                false,
            ),
            (
                Error::UpstreamConnect {
                    upstream: "u".into(),
                    detail: "10.0.0.7:443 refused".into(),
                },
                502,
                ErrorSource::Upstream,
                true,
            ),
            (
                Error::UpstreamTimeout {
                    upstream: "u".into(),
                    after_ms: 5,
                },
                504,
                ErrorSource::Upstream,
                true,
            ),
            (
                Error::Internal("secret detail".into()),
                500,
                ErrorSource::Internal,
                false,
            ),
        ];
        for (err, status, source, retryable) in cases {
            assert_eq!(err.status().as_u16(), status, "{err}");
            assert_eq!(err.source_kind(), source, "{err}");
            assert_eq!(err.is_retryable(), retryable, "{err}");
            let body: serde_json::Value = serde_json::from_slice(&err.body_bytes()).unwrap();
            let e = &body["error"];
            assert!(e["message"].is_string() && e["type"].is_string(), "{body}");
            assert!(
                e.get("param").is_some() && e.get("code").is_some(),
                "{body}"
            );
            // Internal details (addresses, messages) never reach the client.
            let text = body.to_string();
            assert!(
                !text.contains("10.0.0.7") && !text.contains("secret detail"),
                "{text}"
            );
        }
        let resp = Error::RateLimited {
            message: "slow down".into(),
            retry_after_secs: 7,
            unit: "requests",
            limit: None,
        }
        .into_response();
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "7");
    }
}
