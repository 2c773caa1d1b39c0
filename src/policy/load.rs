//! Reading `policies/*.yaml`: strict parsing with key paths, merging, and validation that reports
//! every problem at once as `file:line: key path: message`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;

use super::lines::LineIndex;
use super::raw::{RawBreaker, RawCandidate, RawPolicyFile, RawTenant};
use super::{Limits, Map, ModelRoute, Policy, Principal, Tenant};
use crate::backends::remote::{EndpointUris, Remote};
use crate::backends::{Backend, Registry};
use crate::routing::{BreakerSettings, Candidate, DEFAULT_FIRST_TOKEN_TIMEOUT};
use crate::rules::RuleSet;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub path: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one load; non-empty by construction.
#[derive(Debug, Clone, thiserror::Error)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

struct Source {
    file: PathBuf,
    lines: LineIndex,
    raw: RawPolicyFile,
}

struct Report<'a> {
    sources: &'a [Source],
    problems: Vec<Problem>,
}

impl Report<'_> {
    fn len(&self) -> usize {
        self.problems.len()
    }

    fn add(&mut self, src: usize, path: String, message: impl Into<String>) {
        let s = &self.sources[src];
        self.problems.push(Problem {
            file: s.file.clone(),
            line: s.lines.line_of(&path),
            path,
            message: message.into(),
        });
    }
}

/// Loads and validates every `*.yaml`/`*.yml` file in `dir` into one policy. Nothing is returned
/// unless everything is valid.
pub fn load_dir(dir: &Path, version: u64, backends: &Registry) -> Result<Policy, Problems> {
    let mut problems = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "yaml" || x == "yml")
                    && p.is_file()
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(e) => {
            return Err(Problems(vec![Problem {
                file: dir.to_path_buf(),
                line: None,
                path: String::new(),
                message: format!("cannot read policy directory: {e}"),
            }]));
        }
    };
    files.sort();

    let mut sources = Vec::new();
    for file in files {
        let text = match std::fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) => {
                problems.push(Problem {
                    file,
                    line: None,
                    path: String::new(),
                    message: format!("cannot read: {e}"),
                });
                continue;
            }
        };
        match parse(&text) {
            Ok(raw) => sources.push(Source {
                lines: LineIndex::build(&text),
                file,
                raw,
            }),
            Err((line, path, message)) => problems.push(Problem {
                file,
                line,
                path,
                message,
            }),
        }
    }
    if sources.is_empty() && problems.is_empty() {
        problems.push(Problem {
            file: dir.to_path_buf(),
            line: None,
            path: String::new(),
            message: "no policy files (*.yaml) found".into(),
        });
    }

    let mut report = Report {
        sources: &sources,
        problems,
    };
    let policy = validate(&mut report, version, backends);
    if report.problems.is_empty() {
        // Only a policy that is accepted as a whole changes breaker settings.
        for route in policy.models.values() {
            for c in &route.candidates {
                c.health.configure(c.breaker);
            }
        }
        Ok(policy)
    } else {
        Err(Problems(report.problems))
    }
}

fn parse(text: &str) -> Result<RawPolicyFile, (Option<usize>, String, String)> {
    if text.trim().is_empty() {
        return Ok(RawPolicyFile::default());
    }
    deserialize_yaml(text)
}

/// Strict YAML deserialization; on error: line, key path and a message without either.
pub(crate) fn deserialize_yaml<T: serde::de::DeserializeOwned>(
    text: &str,
) -> Result<T, (Option<usize>, String, String)> {
    let de = serde_yaml::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        let inner = e.into_inner();
        let line = inner.location().map(|l| l.line());
        // serde_yaml writes "<path>: <message> at line N column M"; both ends are reported
        // separately already.
        let msg = inner.to_string();
        let msg = msg.split(" at line ").next().unwrap_or_default();
        let msg = match msg.split_once(": ") {
            Some((head, rest)) if !head.contains(' ') => rest,
            _ => msg,
        };
        (line, path, msg.to_string())
    })
}

use crate::ledger::pricing::{Price, Pricing, parse_price};
use crate::policy::raw::RawPricing;

fn validate(report: &mut Report<'_>, version: u64, backends: &Registry) -> Policy {
    let sources = report.sources;
    let mut upstreams: Upstreams<'_> = HashMap::new();
    for (si, src) in sources.iter().enumerate() {
        for (name, up) in &src.raw.upstreams {
            let path = format!("upstreams.{name}");
            if upstreams.contains_key(name.as_str()) {
                report.add(si, path, "defined in more than one policy file");
                continue;
            }
            let base_url = up.base_url.trim_end_matches('/').to_string();
            let uris = match base_url.parse::<http::Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http" | "https"))
                        && u.authority().is_some() =>
                {
                    EndpointUris::new(&base_url).ok()
                }
                _ => None,
            };
            let Some(uris) = uris else {
                report.add(
                    si,
                    format!("{path}.base_url"),
                    "must be an http:// or https:// URL with a host",
                );
                continue;
            };
            let api_key = match &up.api_key_env {
                None => None,
                Some(var) => match std::env::var(var) {
                    Ok(v) if !v.is_empty() => match HeaderValue::from_str(&format!("Bearer {v}")) {
                        Ok(mut hv) => {
                            hv.set_sensitive(true);
                            Some(hv)
                        }
                        Err(_) => {
                            report.add(
                                    si,
                                    format!("{path}.api_key_env"),
                                    format!("environment variable {var} holds characters not allowed in a header"),
                                );
                            continue;
                        }
                    },
                    _ => {
                        report.add(
                            si,
                            format!("{path}.api_key_env"),
                            format!("environment variable {var} is not set"),
                        );
                        continue;
                    }
                },
            };
            let ca = match &up.ca_file {
                None => Vec::new(),
                Some(f) => match std::fs::read(f) {
                    Ok(b) => b,
                    Err(e) => {
                        report.add(
                            si,
                            format!("{path}.ca_file"),
                            format!("cannot read {}: {e}", f.display()),
                        );
                        continue;
                    }
                },
            };
            let Some(breaker) = validate_breaker(report, si, &path, &up.breaker) else {
                continue;
            };
            let connect = Duration::from_millis(up.connect_timeout_ms.unwrap_or(2_000));
            let client = match backends.clients.get(&ca, connect) {
                Ok(c) => c,
                Err(e) => {
                    report.add(si, format!("{path}.ca_file"), e);
                    continue;
                }
            };
            let remote = Remote {
                name: name.clone(),
                base_url,
                uris,
                api_key,
                client,
                first_byte_timeout: Duration::from_millis(
                    up.first_byte_timeout_ms.unwrap_or(60_000),
                ),
                idle_timeout: Duration::from_millis(up.idle_timeout_ms.unwrap_or(60_000)),
            };
            upstreams.insert(name, (Arc::new(remote), breaker));
        }
    }

    let mut rule_sets: HashMap<&str, Arc<RuleSet>> = HashMap::new();
    for (si, src) in sources.iter().enumerate() {
        for (name, raw) in &src.raw.rules {
            let path = format!("rules.{name}");
            if rule_sets.contains_key(name.as_str()) {
                report.add(si, path, "defined in more than one policy file");
                continue;
            }
            match RuleSet::compile(name, raw) {
                Ok(set) => {
                    rule_sets.insert(name, Arc::new(set));
                }
                Err(problems) => {
                    for (at, message) in problems {
                        let p = if at.is_empty() {
                            path.clone()
                        } else {
                            format!("{path}.{at}")
                        };
                        report.add(si, p, message);
                    }
                }
            }
        }
    }

    let mut models: Map<Arc<str>, ModelRoute> = Map::default();
    for (si, src) in sources.iter().enumerate() {
        for (alias, m) in &src.raw.models {
            let path = format!("models.{alias}");
            if models.contains_key(alias.as_str()) {
                report.add(si, path, "defined in more than one policy file");
                continue;
            }
            let raw: Vec<(String, RawCandidate)> = match (&m.candidates, m.single()) {
                (Some(list), None) if !list.is_empty() => list
                    .iter()
                    .enumerate()
                    .map(|(i, c)| (format!("{path}.candidates[{i}]"), c.clone()))
                    .collect(),
                (Some(_), None) => {
                    report.add(
                        si,
                        format!("{path}.candidates"),
                        "must list at least one candidate",
                    );
                    continue;
                }
                (None, Some(single)) => vec![(path.clone(), single)],
                (Some(_), Some(_)) => {
                    report.add(
                        si,
                        path,
                        "set either `candidates` or one `upstream`/`local`, not both",
                    );
                    continue;
                }
                (None, None) => {
                    report.add(
                        si,
                        path,
                        "needs `upstream` (a remote), `local` (a local model) or `candidates`",
                    );
                    continue;
                }
            };
            let mut candidates = Vec::with_capacity(raw.len());
            let mut tier = 0u32;
            for (i, (cpath, c)) in raw.iter().enumerate() {
                let Some(cand) =
                    validate_candidate(report, si, cpath, alias, c, &upstreams, backends, sources)
                else {
                    continue;
                };
                let cand_tier = match c.tier {
                    Some(t) if i > 0 && t < tier => {
                        report.add(
                            si,
                            format!("{cpath}.tier"),
                            format!(
                                "tiers must not decrease down the list (the one before is {tier})"
                            ),
                        );
                        continue;
                    }
                    Some(t) => t,
                    None if i == 0 => 0,
                    None => tier + 1,
                };
                tier = cand_tier;
                if candidates.iter().any(|o: &Candidate| o.name == cand.name) {
                    report.add(
                        si,
                        cpath.clone(),
                        format!("candidate name `{}` is used twice (set `name`)", cand.name),
                    );
                    continue;
                }
                candidates.push(Candidate {
                    tier: cand_tier,
                    ..cand
                });
            }
            let rules = resolve_rules(report, si, &path, &m.rules, &rule_sets, sources);
            if candidates.len() != raw.len() {
                continue;
            }
            if let Some(set) = rules.iter().find(|s| s.local_only)
                && !candidates.iter().any(|c| c.backend.is_local())
            {
                report.add(
                    si,
                    format!("{path}.rules"),
                    format!(
                        "rule set `{}` keeps requests on local models, and this alias has none",
                        set.name
                    ),
                );
            }
            let alias: Arc<str> = alias.as_str().into();
            models.insert(
                alias.clone(),
                ModelRoute {
                    alias,
                    candidates,
                    rules,
                },
            );
        }
    }

    let mut tenants = Map::default();
    let mut keys = Map::default();
    let mut key_ids: HashMap<String, ()> = HashMap::new();
    for (si, src) in sources.iter().enumerate() {
        for (name, t) in &src.raw.tenants {
            let path = format!("tenants.{name}");
            if tenants.contains_key(name.as_str()) {
                report.add(si, path, "defined in more than one policy file");
                continue;
            }
            let mut tenant = validate_tenant(report, si, name, t, &models, sources, backends);
            tenant.rules = resolve_rules(report, si, &path, &t.rules, &rule_sets, sources);
            for (ki, key) in t.keys.iter().enumerate() {
                let kpath = format!("{path}.keys[{ki}]");
                if key.id.is_empty() {
                    report.add(si, format!("{kpath}.id"), "must not be empty");
                    continue;
                }
                if key_ids.insert(key.id.clone(), ()).is_some() {
                    report.add(
                        si,
                        format!("{kpath}.id"),
                        format!("key id `{}` is used twice", key.id),
                    );
                    continue;
                }
                let mut hash = [0u8; 32];
                if key.sha256.len() != 64 || hex::decode_to_slice(&key.sha256, &mut hash).is_err() {
                    report.add(
                        si,
                        format!("{kpath}.sha256"),
                        "must be 64 hex digits (the SHA-256 that `fuke keygen` prints)",
                    );
                    continue;
                }
                let key_limits = validate_limits(report, si, &kpath, &key.limits);
                let key_id: Arc<str> = key.id.as_str().into();
                if !key_limits.is_empty() {
                    tenant.key_limits.insert(key_id.clone(), key_limits);
                }
                let principal = Principal {
                    tenant: tenant.name.clone(),
                    key_id,
                    role: key.role,
                    limits: key_limits,
                };
                if keys.insert(hash, (principal, hash)).is_some() {
                    report.add(
                        si,
                        format!("{kpath}.sha256"),
                        "the same key hash is listed twice",
                    );
                }
            }
            tenants.insert(tenant.name.clone(), tenant);
        }
    }

    let pricing = validate_pricing(report);
    Policy {
        version,
        keys,
        tenants,
        models,
        pricing,
    }
}

/// `pricing:` (in at most one file): every price exact to $0.001 per million tokens.
fn validate_pricing(report: &mut Report<'_>) -> Option<Arc<Pricing>> {
    let sources = report.sources;
    let mut found: Option<(usize, &RawPricing)> = None;
    for (si, src) in sources.iter().enumerate() {
        if let Some(p) = &src.raw.pricing {
            if found.is_some() {
                report.add(si, "pricing".into(), "defined in more than one policy file");
                continue;
            }
            found = Some((si, p));
        }
    }
    let (si, raw) = found?;
    if raw.version.as_deref().is_some_and(|v| v.trim().is_empty()) {
        report.add(
            si,
            "pricing.version".into(),
            "must not be empty (leave it out for a hash of the table)",
        );
    }
    let mut models = Vec::with_capacity(raw.models.len());
    for (name, p) in &raw.models {
        let path = format!("pricing.models.{name}");
        let mut field = |key: &str, t: &crate::policy::raw::PriceText| match parse_price(&t.text())
        {
            Ok(v) => Some(v),
            Err(e) => {
                report.add(si, format!("{path}.{key}"), e);
                None
            }
        };
        let input = field("input", &p.input);
        let output = field("output", &p.output);
        let cached = match &p.cached_input {
            Some(c) => field("cached_input", c),
            None => input,
        };
        if let (Some(input), Some(output), Some(cached_input)) = (input, output, cached) {
            models.push((
                name.clone(),
                Price {
                    input,
                    cached_input,
                    output,
                },
            ));
        }
    }
    Some(Arc::new(Pricing::new(raw.version.clone(), models)))
}

/// The rule sets a tenant or alias names, in order; unknown names are reported.
fn resolve_rules(
    report: &mut Report<'_>,
    si: usize,
    path: &str,
    names: &[String],
    sets: &HashMap<&str, Arc<RuleSet>>,
    sources: &[Source],
) -> Vec<Arc<RuleSet>> {
    let mut out: Vec<Arc<RuleSet>> = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        match sets.get(name.as_str()) {
            Some(set) if out.iter().any(|s| Arc::ptr_eq(s, set)) => report.add(
                si,
                format!("{path}.rules[{i}]"),
                format!("rule set `{name}` is listed twice"),
            ),
            Some(set) => out.push(set.clone()),
            // Defined but invalid: its own problems are reported already.
            None if sources.iter().any(|s| s.raw.rules.contains_key(name)) => {}
            None => report.add(
                si,
                format!("{path}.rules[{i}]"),
                format!("unknown rule set `{name}` (define it under `rules:`)"),
            ),
        }
    }
    out
}

/// Upstreams by name, with their breaker settings.
type Upstreams<'a> = HashMap<&'a str, (Arc<Remote>, BreakerSettings)>;

fn validate_breaker(
    report: &mut Report<'_>,
    si: usize,
    path: &str,
    b: &RawBreaker,
) -> Option<BreakerSettings> {
    let d = BreakerSettings::default();
    let before = report.problems.len();
    let at = |k: &str| format!("{path}.breaker.{k}");
    if let Some(r) = b.failure_rate
        && !(r > 0.0 && r <= 1.0)
    {
        report.add(si, at("failure_rate"), "must be above 0 and at most 1");
    }
    for (key, v, min) in [
        ("window_ms", b.window_ms, 10),
        ("cooldown_ms", b.cooldown_ms, 1),
        ("min_calls", b.min_calls.map(u64::from), 1),
        (
            "consecutive_failures",
            b.consecutive_failures.map(u64::from),
            1,
        ),
        ("probes", b.probes.map(u64::from), 1),
    ] {
        if v.is_some_and(|v| v < min) {
            report.add(si, at(key), format!("must be at least {min}"));
        }
    }
    (report.problems.len() == before).then(|| BreakerSettings {
        failure_rate: b.failure_rate.unwrap_or(d.failure_rate),
        window: b.window_ms.map_or(d.window, Duration::from_millis),
        min_calls: b.min_calls.unwrap_or(d.min_calls),
        consecutive_failures: b.consecutive_failures.unwrap_or(d.consecutive_failures),
        cooldown: b.cooldown_ms.map_or(d.cooldown, Duration::from_millis),
        probes: b.probes.unwrap_or(d.probes),
    })
}

/// One candidate of `alias`, its tier still to be decided.
#[allow(clippy::too_many_arguments)]
fn validate_candidate(
    report: &mut Report<'_>,
    si: usize,
    path: &str,
    alias: &str,
    c: &RawCandidate,
    upstreams: &Upstreams<'_>,
    backends: &Registry,
    sources: &[Source],
) -> Option<Candidate> {
    let (backend, model, settings, default_name): (Arc<dyn Backend>, String, _, String) =
        match (&c.upstream, &c.local) {
            (Some(name), None) => {
                let Some((upstream, settings)) = upstreams.get(name.as_str()) else {
                    if !sources.iter().any(|s| s.raw.upstreams.contains_key(name)) {
                        report.add(
                            si,
                            format!("{path}.upstream"),
                            format!("unknown upstream `{name}`"),
                        );
                    }
                    return None;
                };
                let model = c.model.clone().unwrap_or_else(|| alias.to_string());
                let default_name = format!("{name}/{model}");
                (upstream.clone(), model, *settings, default_name)
            }
            (None, Some(name)) => {
                let Some(local) = backends.local.get(name) else {
                    report.add(
                    si,
                    format!("{path}.local"),
                    format!(
                        "unknown local model `{name}` (define it under local_models in fuke.yaml)"
                    ),
                );
                    return None;
                };
                if c.model.is_some() {
                    report.add(
                        si,
                        format!("{path}.model"),
                        "a local model answers as itself; leave `model` out",
                    );
                    return None;
                }
                // A local model answers with its own name as `model`.
                (
                    local,
                    name.clone(),
                    BreakerSettings::default(),
                    format!("local/{name}"),
                )
            }
            (Some(_), Some(_)) => {
                report.add(
                    si,
                    path.to_string(),
                    "set either `upstream` or `local`, not both",
                );
                return None;
            }
            (None, None) => {
                report.add(
                    si,
                    path.to_string(),
                    "needs `upstream` (a remote) or `local` (a local model)",
                );
                return None;
            }
        };
    if c.weight == Some(0) {
        report.add(si, format!("{path}.weight"), "must be at least 1");
        return None;
    }
    if c.max_in_flight == Some(0) {
        report.add(
            si,
            format!("{path}.max_in_flight"),
            "must be at least 1 (leave it out for no limit)",
        );
        return None;
    }
    if c.timeout_ms == Some(0) {
        report.add(
            si,
            format!("{path}.timeout_ms"),
            "must be at least 1 (leave it out for none)",
        );
        return None;
    }
    let name = c.name.clone().unwrap_or(default_name);
    let header = match HeaderValue::from_str(&name) {
        Ok(h) if !name.is_empty() => h,
        _ => {
            report.add(
                si,
                format!("{path}.name"),
                "must be non-empty printable ASCII (it is sent as a header)",
            );
            return None;
        }
    };
    let health = backends.health.entry(backend.name(), &model, settings);
    Some(Candidate {
        name: name.into(),
        header,
        backend_name: backend.name().into(),
        backend,
        model: model.into(),
        tier: 0,
        weight: c.weight.unwrap_or(1),
        first_token_timeout: match c.first_token_timeout_ms {
            None => Some(DEFAULT_FIRST_TOKEN_TIMEOUT),
            Some(0) => None,
            Some(ms) => Some(Duration::from_millis(ms)),
        },
        timeout: c.timeout_ms.map(Duration::from_millis),
        max_in_flight: c.max_in_flight,
        breaker: settings,
        health,
    })
}

fn validate_tenant(
    report: &mut Report<'_>,
    si: usize,
    name: &str,
    t: &RawTenant,
    models: &Map<Arc<str>, ModelRoute>,
    sources: &[Source],
    backends: &Registry,
) -> Tenant {
    let path = format!("tenants.{name}");
    let mut allowed: Vec<Arc<str>> = Vec::new();
    for (i, m) in t.models.iter().enumerate() {
        if m == "*" {
            allowed.extend(models.keys().cloned());
        } else if let Some((alias, _)) = models.get_key_value(m.as_str()) {
            allowed.push(alias.clone());
        } else if !sources.iter().any(|s| s.raw.models.contains_key(m)) {
            report.add(
                si,
                format!("{path}.models[{i}]"),
                format!("unknown model alias `{m}`"),
            );
        }
    }
    allowed.sort();
    allowed.dedup();
    let limits = validate_limits(report, si, &path, &t.limits);
    let cache = t
        .cache
        .as_ref()
        .and_then(|c| validate_cache(report, si, &path, c, backends));
    let kb =
        t.kb.as_ref()
            .and_then(|k| validate_kb(report, si, &path, k, backends));
    Tenant {
        cache,
        kb,
        rules: Vec::new(),
        name: name.into(),
        models: allowed,
        limits,
        key_limits: HashMap::new(),
    }
}

/// `limits:` of a tenant or key: rates of at least 1, budgets in exact USD.
fn validate_limits(
    report: &mut Report<'_>,
    si: usize,
    owner: &str,
    l: &crate::policy::raw::RawLimits,
) -> Limits {
    let path = format!("{owner}.limits");
    for (name, v) in [
        ("requests_per_minute", l.requests_per_minute),
        ("tokens_per_minute", l.tokens_per_minute),
    ] {
        if v == Some(0) {
            report.add(
                si,
                format!("{path}.{name}"),
                "must be at least 1 (leave it out for no limit)",
            );
        }
    }
    let mut budget = |name: &str, v: Option<&crate::policy::raw::PriceText>| {
        let text = v?.text();
        match crate::ledger::pricing::parse_usd(&text) {
            Ok(n) if n > 0 => Some(n),
            Ok(_) => {
                report.add(
                    si,
                    format!("{path}.budget.{name}"),
                    "must be more than 0 (leave it out for no budget)",
                );
                None
            }
            Err(e) => {
                report.add(si, format!("{path}.budget.{name}"), e);
                None
            }
        }
    };
    let b = l.budget.as_ref();
    Limits {
        requests_per_minute: l.requests_per_minute.filter(|n| *n > 0),
        tokens_per_minute: l.tokens_per_minute.filter(|n| *n > 0),
        daily_budget: budget("daily_usd", b.and_then(|b| b.daily_usd.as_ref())),
        monthly_budget: budget("monthly_usd", b.and_then(|b| b.monthly_usd.as_ref())),
    }
}

fn validate_kb(
    report: &mut Report<'_>,
    si: usize,
    tenant_path: &str,
    k: &crate::policy::raw::RawKb,
    backends: &Registry,
) -> Option<crate::policy::KbGrant> {
    let path = format!("{tenant_path}.kb");
    let before = report.len();
    let Some(known) = &backends.kb_collections else {
        report.add(
            si,
            path,
            "the knowledge base needs `kb:` and `embedder:` in fuke.yaml",
        );
        return None;
    };
    if k.collections.is_empty() {
        report.add(
            si,
            format!("{path}.collections"),
            "name at least one collection",
        );
    }
    for (i, c) in k.collections.iter().enumerate() {
        if !known.contains(c) {
            report.add(
                si,
                format!("{path}.collections[{i}]"),
                format!("no collection `{c}` (a directory under the knowledge-base directory)"),
            );
        }
    }
    if let Some(n) = k.top_k
        && !(1..=20).contains(&n)
    {
        report.add(si, format!("{path}.top_k"), "must be between 1 and 20");
    }
    if let Some(n) = k.turns
        && !(1..=20).contains(&n)
    {
        report.add(si, format!("{path}.turns"), "must be between 1 and 20");
    }
    if let Some(m) = k.min_score
        && !(0.0..=1.0).contains(&m)
    {
        report.add(si, format!("{path}.min_score"), "must be between 0 and 1");
    }
    let template = crate::kb::inject::compile(
        k.template
            .as_deref()
            .unwrap_or(crate::kb::inject::DEFAULT_TEMPLATE),
    );
    let template = match template {
        Ok(t) => Some(t),
        Err(e) => {
            report.add(si, format!("{path}.template"), e);
            None
        }
    };
    if report.len() != before {
        return None;
    }
    let mut collections: Vec<Arc<str>> = k
        .collections
        .iter()
        .map(|c| Arc::from(c.as_str()))
        .collect();
    collections.sort();
    collections.dedup();
    Some(crate::policy::KbGrant {
        collections,
        top_k: k.top_k.unwrap_or(crate::kb::DEFAULT_TOP_K),
        min_score: k.min_score.unwrap_or(crate::kb::DEFAULT_MIN_SCORE),
        turns: k.turns.unwrap_or(1),
        template: template?,
    })
}

fn validate_cache(
    report: &mut Report<'_>,
    si: usize,
    tenant_path: &str,
    c: &crate::policy::raw::RawCache,
    backends: &Registry,
) -> Option<crate::cache::Settings> {
    use crate::cache;
    let path = format!("{tenant_path}.cache");
    let mut ok = true;
    let has_embedder = backends.embedder.is_some();
    if c.semantic == Some(true) && !has_embedder {
        report.add(
            si,
            format!("{path}.semantic"),
            "the semantic level needs `embedder:` (a local embedding model) in fuke.yaml",
        );
        ok = false;
    }
    if let Some(t) = c.threshold
        && !(t > 0.0 && t <= 1.0)
    {
        report.add(
            si,
            format!("{path}.threshold"),
            "must be above 0 and at most 1",
        );
        ok = false;
    }
    if c.ttl_secs == Some(0) {
        report.add(si, format!("{path}.ttl_secs"), "must be at least 1");
        ok = false;
    }
    if let Some(b) = c.capacity_bytes
        && b < 4096
    {
        report.add(
            si,
            format!("{path}.capacity_bytes"),
            "must be at least 4096",
        );
        ok = false;
    }
    (ok && c.enabled != Some(false)).then(|| cache::Settings {
        semantic: c.semantic.unwrap_or(has_embedder),
        threshold: c.threshold.unwrap_or(cache::DEFAULT_THRESHOLD),
        ttl: c
            .ttl_secs
            .map_or(cache::DEFAULT_TTL, std::time::Duration::from_secs),
        capacity_bytes: c.capacity_bytes.unwrap_or(cache::DEFAULT_CAPACITY_BYTES),
        sampled: c.sampled.unwrap_or(false),
        semantic_cjk: c.semantic_cjk.unwrap_or(false),
    })
}
