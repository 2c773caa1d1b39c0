//! The model endpoints: read and check the request under the pinned policy, then hand it to
//! [`routing`], which calls the route's candidates, relays and meters the answer. Also
//! `/v1/models`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, Request, Response, header};
use http_body::Frame;
use http_body_util::{BodyExt, BodyStream, Limited, StreamBody};
use hyper::body::Incoming;

use crate::app::App;
use crate::body::{self, Body};
use crate::cache::{self, CacheUse};
use crate::error::Error;
use crate::openai::{Endpoint, JsonRequest, ModelList, ModelObject};
use crate::policy::{ModelRoute, Policy, Principal, RouteRefusal, Tenant};
use crate::routing::{self, Call, Payload};
use crate::trace;
use crate::trace::RequestTrace;
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, TraceContextExt as _};

/// `GET /v1/models` and `GET /v1/models/{id}`: only the aliases this tenant may use.
pub fn models(policy: &Policy, tenant: &Tenant, path: &str) -> Result<Response<Body>, Error> {
    let json = match path.strip_prefix("/v1/models/") {
        None => serde_json::to_vec(&ModelList {
            object: "list",
            data: tenant.models.iter().map(|m| ModelObject::new(m)).collect(),
        }),
        Some(id) => match policy.route_for(tenant, id) {
            Ok(route) => serde_json::to_vec(&ModelObject::new(&route.alias)),
            Err(_) => {
                // Unknown and forbidden look the same here: listing must not reveal aliases.
                return Err(Error::ModelNotFound {
                    model: id.to_string(),
                });
            }
        },
    }
    .map_err(|e| Error::Internal(e.to_string()))?;
    Ok(json_response(json))
}

fn json_response(json: Vec<u8>) -> Response<Body> {
    let mut resp = Response::new(body::full(json));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The route for `alias`, or the error the SDKs expect.
fn route<'p>(policy: &'p Policy, tenant: &Tenant, alias: &str) -> Result<&'p ModelRoute, Error> {
    policy.route_for(tenant, alias).map_err(|r| match r {
        RouteRefusal::Unknown => Error::ModelNotFound {
            model: alias.to_string(),
        },
        RouteRefusal::NotAllowed => Error::ModelNotAllowed {
            model: alias.to_string(),
        },
    })
}

fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// Who calls, under which policy version: pinned for the whole request.
pub struct Caller<'a> {
    pub policy: &'a Policy,
    pub principal: &'a Principal,
    pub tenant: &'a Tenant,
    /// When the gateway began handling the request (latency and overhead count from here).
    pub started: Instant,
}

/// POST to a model endpoint, under the policy version and tenant the caller pinned.
pub async fn model_call(
    app: &App,
    caller: Caller<'_>,
    endpoint: Endpoint,
    req: Request<Incoming>,
    model_label: &mut Option<Arc<str>>,
    trace: Option<&Arc<RequestTrace>>,
) -> Result<Response<Body>, Error> {
    let Caller {
        policy,
        principal,
        tenant,
        started,
    } = caller;
    let request_id = req
        .headers()
        .get(crate::app::X_REQUEST_ID)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("-"));
    let cache_control = req.headers().get(header::CACHE_CONTROL).cloned();

    let limit = if endpoint == Endpoint::AudioTranscriptions {
        app.settings.max_upload_bytes
    } else {
        app.settings.max_body_bytes
    };
    if declared_length(&req).is_some_and(|n| n > limit as u64) {
        return Err(Error::BodyTooLarge { limit });
    }

    // The alias is only known once the body has been read as far as its `model`.
    let bytes;
    let parsed;
    let kb_bytes;
    let kb_parsed;
    let ruled_bytes;
    let ruled_parsed;
    let (route, mut payload, stream, include_usage) = if endpoint == Endpoint::AudioTranscriptions {
        let upload = read_multipart_head(req, limit).await?;
        let route = route(policy, tenant, &upload.model)?;
        let payload = Payload::Upload {
            body: Some(upload.body),
            content_type: upload.content_type,
            length: upload.length,
        };
        (route, payload, false, false)
    } else {
        bytes = read_body(req.into_body(), limit).await?;
        parsed = JsonRequest::parse(endpoint, &bytes)?;
        let route = route(policy, tenant, &parsed.model)?;
        (
            route,
            Payload::Json(&parsed),
            parsed.stream,
            parsed.include_usage,
        )
    };
    *model_label = Some(route.alias.clone());

    // Content rules: before the cache, the knowledge base and routing see the request.
    let sets = crate::rules::for_request(&tenant.rules, &route.rules);
    let mut call = Call {
        app,
        principal,
        route,
        endpoint,
        request_id,
        started,
        stream,
        include_usage,
        trace: trace.cloned(),
        cache: CacheUse::Off,
        fill: std::sync::Mutex::new(None),
        kb_chunks: 0,
        answer_rules: crate::rules::for_answers(&sets),
        rules: crate::rules::Hits::default(),
        local_only: crate::rules::local_only(&sets),
        pricing: policy.pricing.clone(),
        metered: std::sync::atomic::AtomicBool::new(false),
    };
    if let Some(rule) = call.local_only.clone() {
        if !route.candidates.iter().any(|c| c.backend.is_local()) {
            let e = Error::Residency {
                model: route.alias.to_string(),
                rule: rule.to_string(),
            };
            return Err(routing::refuse(&call, Some(&rule), e).await);
        }
        if route.candidates.iter().any(|c| !c.backend.is_local()) {
            call.rules.add(&rule);
        }
    }
    if let Payload::Json(req) = &payload
        && !sets.is_empty()
    {
        match crate::rules::apply(&sets, req) {
            Err(refusal) => {
                if let Some(rule) = &refusal.rule {
                    tracing::info!(tenant = %tenant.name, rule = %rule, "request refused by a policy rule");
                }
                return Err(routing::refuse(&call, refusal.rule.as_ref(), refusal.error).await);
            }
            Ok(applied) => {
                for h in &applied.hits.0 {
                    call.rules.add(h);
                }
                if let Some(body) = applied.body {
                    ruled_bytes = body;
                    ruled_parsed = JsonRequest::parse(endpoint, &ruled_bytes)?;
                    payload = Payload::Json(&ruled_parsed);
                }
            }
        }
    }

    let backends = app.policy.backends();
    let kb = match (&tenant.kb, &backends.kb) {
        (Some(grant), Some(kb)) if endpoint == Endpoint::ChatCompletions => Some((grant, kb)),
        _ => None,
    };

    // The answer cache: chat requests of tenants that have one.
    if let (Payload::Json(parsed), Some(settings)) = (&payload, &tenant.cache)
        && endpoint == Endpoint::ChatCompletions
    {
        let span = trace.map(|t| t.child(None, "cache lookup", SpanKind::Internal, Vec::new()));
        // Answers depend on the knowledge base they were given: a new generation, a new scope.
        let kb_generation = kb.map_or(0, |(grant, kb)| kb.generation_of(&grant.collections));
        call.cache = match cache::plan(
            parsed,
            &tenant.name,
            &route.alias,
            kb_generation,
            settings.sampled,
            cache_control.as_ref(),
        ) {
            Err(reason) => CacheUse::Bypass(reason),
            Ok(plan) => {
                match backends
                    .cache
                    .lookup(&tenant.name, settings, plan, backends.embedder())
                    .await
                {
                    cache::Lookup::Hit {
                        entry,
                        exact,
                        similarity,
                    } => {
                        let used = CacheUse::Hit {
                            exact,
                            similarity,
                            saved: entry.answer.usage,
                        };
                        end_cache_span(span.as_ref(), used);
                        let mut resp = routing::serve_cached(&call, &entry.answer, used).await;
                        cache::label(&mut resp, used);
                        return Ok(resp);
                    }
                    cache::Lookup::Miss(fill) => {
                        call.fill = std::sync::Mutex::new(Some(fill));
                        CacheUse::Miss
                    }
                }
            }
        };
        end_cache_span(span.as_ref(), call.cache);
    }

    // Knowledge-base context: the best excerpts of the tenant's collections for the question.
    let mut sources = None;
    if let (Payload::Json(req), Some((grant, kb))) = (&payload, kb)
        && let Some(question) = crate::kb::inject::question(req, grant.turns)
    {
        let span = trace.map(|t| t.child(None, "kb retrieval", SpanKind::Internal, Vec::new()));
        let context = retrieve(kb, grant, &question).await;
        if let Some(cx) = &span {
            cx.span().set_attribute(KeyValue::new(
                "fuke.kb.chunks",
                context.as_ref().map_or(0, |c| c.1.len() as i64),
            ));
            trace::end(cx, None);
        }
        if let Some((system, hits)) = context {
            kb_bytes = crate::kb::inject::with_context(req, &system)?;
            kb_parsed = JsonRequest::parse(endpoint, &kb_bytes)?;
            payload = Payload::Json(&kb_parsed);
            call.kb_chunks = hits.len() as u32;
            sources = Some(kb_sources_header(&hits));
        }
    }

    let used = call.cache;
    let mut resp = crate::backends::pin_in_place(|| routing::serve(call, payload)).await?;
    cache::label(&mut resp, used);
    if let Some(v) = sources {
        resp.headers_mut().insert(X_FUKE_KB_SOURCES, v);
    }
    Ok(resp)
}

/// `x-fuke-kb-sources`: the excerpts injected, as `collection/path#chunk`, comma-separated.
pub const X_FUKE_KB_SOURCES: http::HeaderName = http::HeaderName::from_static("x-fuke-kb-sources");

/// The rendered context and the hits in it; `None` when nothing scored high enough, or when
/// retrieval failed (the request then goes on without context, and the failure is logged).
async fn retrieve(
    kb: &crate::kb::KnowledgeBase,
    grant: &crate::policy::KbGrant,
    question: &str,
) -> Option<(String, Vec<crate::kb::Hit>)> {
    let hits = match kb
        .search(&grant.collections, question, grant.top_k, grant.min_score)
        .await
    {
        Ok(h) => h,
        Err(e) => {
            kb.counters
                .search_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "knowledge-base retrieval failed; answering without context");
            return None;
        }
    };
    if hits.is_empty() {
        return None;
    }
    match crate::kb::inject::render(&grant.template, question, &hits) {
        Ok(system) => Some((system, hits)),
        Err(e) => {
            kb.counters
                .search_failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(error = %e, "knowledge-base template failed to render; answering without context");
            None
        }
    }
}

/// Chunk ids, percent-encoded where a header value could not carry them (non-ASCII paths).
fn kb_sources_header(hits: &[crate::kb::Hit]) -> HeaderValue {
    let mut out = String::new();
    for (i, h) in hits.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        for b in h.id().bytes() {
            if b.is_ascii_graphic() && b != b',' && b != b'%' {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
    }
    HeaderValue::from_str(&out).unwrap_or_else(|_| HeaderValue::from_static("-"))
}

fn end_cache_span(span: Option<&opentelemetry::Context>, used: CacheUse) {
    if let Some(cx) = span {
        cx.span()
            .set_attribute(KeyValue::new("fuke.cache", used.as_str()));
        trace::end(cx, None);
    }
}

async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, Error> {
    match Limited::new(body, limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(Error::BodyTooLarge { limit }),
        Err(_) => Err(Error::invalid("The request body could not be read.", None)),
    }
}

/// A multipart upload whose head has been read far enough to know the model.
struct Upload {
    model: String,
    content_type: HeaderValue,
    length: Option<u64>,
    /// The upload exactly as received: the frames read so far, then the rest as it arrives.
    body: Body,
}

/// Reads a `multipart/form-data` body only until its `model` field is complete, then hands on the
/// whole body unchanged and still streaming.
async fn read_multipart_head(req: Request<Incoming>, limit: usize) -> Result<Upload, Error> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .ok_or_else(|| Error::invalid("Expected a multipart/form-data body.", None))?;
    let boundary = multipart_boundary(content_type.as_bytes()).ok_or_else(|| {
        Error::invalid("Expected a multipart/form-data body with a boundary.", None)
    })?;
    let length = declared_length(&req);
    let mut body = req.into_body();

    let mut head: Vec<Bytes> = Vec::new();
    let mut seen = Vec::new();
    let model = loop {
        if let Some(model) = multipart_field(&seen, &boundary, b"model") {
            break model;
        }
        match body.frame().await {
            None => {
                return Err(Error::invalid(
                    "Missing required parameter: 'model'.",
                    Some("model".into()),
                ));
            }
            Some(Err(_)) => {
                return Err(Error::invalid("The request body could not be read.", None));
            }
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    if seen.len() + data.len() > limit {
                        return Err(Error::BodyTooLarge { limit });
                    }
                    seen.extend_from_slice(&data);
                    head.push(data);
                }
            }
        }
    };
    let model = String::from_utf8(model)
        .map_err(|_| Error::invalid("Invalid 'model': not UTF-8.", Some("model".into())))?;
    let rest = Limited::new(body, limit.saturating_sub(seen.len()));
    let frames = futures_util::stream::iter(head.into_iter().map(|b| Ok(Frame::data(b))))
        .chain(BodyStream::new(rest));
    Ok(Upload {
        model: model.trim().to_string(),
        content_type,
        length,
        body: StreamBody::new(frames).boxed_unsync(),
    })
}

fn multipart_boundary(content_type: &[u8]) -> Option<Vec<u8>> {
    let ct = std::str::from_utf8(content_type).ok()?;
    let mut parts = ct.split(';');
    if !parts
        .next()?
        .trim()
        .eq_ignore_ascii_case("multipart/form-data")
    {
        return None;
    }
    parts.find_map(|p| {
        let (k, v) = p.split_once('=')?;
        k.trim()
            .eq_ignore_ascii_case("boundary")
            .then(|| v.trim().trim_matches('"').as_bytes().to_vec())
            .filter(|b| !b.is_empty())
    })
}

/// The value of form field `name` if it is complete in `buf`.
fn multipart_field(buf: &[u8], boundary: &[u8], name: &[u8]) -> Option<Vec<u8>> {
    let mut needle = b"name=\"".to_vec();
    needle.extend_from_slice(name);
    needle.push(b'"');
    let at = memchr::memmem::find(buf, &needle)?;
    let after = &buf[at + needle.len()..];
    let start = memchr::memmem::find(after, b"\r\n\r\n")? + 4;
    let value = &after[start..];
    let mut delim = b"\r\n--".to_vec();
    delim.extend_from_slice(boundary);
    let end = memchr::memmem::find(value, &delim)?;
    Some(value[..end].to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_model_in_multipart_head() {
        let ct = b"multipart/form-data; boundary=\"XyZ\"";
        let b = multipart_boundary(ct).unwrap();
        assert_eq!(b, b"XyZ");
        let body = b"--XyZ\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nwhisper-1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\nRIFF";
        assert_eq!(multipart_field(body, &b, b"model").unwrap(), b"whisper-1");
        assert!(multipart_field(&body[..60], &b, b"model").is_none());
    }
}
