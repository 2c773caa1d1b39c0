//! Local models: GGUF files run in-process by llama.cpp (`llama-cpp-2`), answering through the same
//! [`Backend`] trait as remote upstreams, in OpenAI's wire format, so relaying, metering and the
//! usage-chunk handling are shared with remote answers.
//!
//! A chat model is one [`ChatEngine`]: a dedicated OS thread owning one llama.cpp context with
//! `parallel` sequences. Requests wait in a bounded queue (429 when full); every decode step puts
//! the next token of each running sequence (or a chunk of a new prompt) into one batch, as
//! llama-server's slots do. Tokens go back to the request's task over a channel; a dropped
//! receiver (client gone) frees the sequence at the next step.
//!
//! Embedding models are served by [`crate::embed::Embedder`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::{LlamaChatMessage, LlamaChatTemplate, LlamaModel};
use llama_cpp_2::sampling::LlamaSampler;
use llama_cpp_2::token::LlamaToken;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::mpsc;

use super::{Backend, BackendRequest, BackendResponse, BoxFuture, gguf};
use crate::body::{self, Body};
use crate::embed::Embedder;
use crate::error::Error;
use crate::openai::Endpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalKind {
    Chat,
    Embedding,
}

/// One `local_models` entry of `fuke.yaml`.
#[derive(Debug, Clone)]
pub struct LocalModelConfig {
    pub name: String,
    pub path: PathBuf,
    pub kind: LocalKind,
    /// Tokens per sequence (chat: prompt + answer; embedding: longest input).
    pub context: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Requests that may wait for a free sequence (at least 1).
    pub queue: u32,
    /// llama.cpp CPU threads. The default is half the cores (at least 1): on a shared machine
    /// llama.cpp's workers wait for each other at every step, and one descheduled worker stalls
    /// them all, so using every core collapses throughput as soon as anything else runs.
    pub threads: u32,
    pub gpu_layers: u32,
    /// Embedding models trained with instructions (E5: `"query: "`, `"passage: "`): what the
    /// cache and knowledge base put before questions and before documents.
    pub query_prefix: String,
    pub document_prefix: String,
}

impl LocalModelConfig {
    pub fn defaults(name: &str, path: PathBuf, kind: LocalKind) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let (context, parallel) = match kind {
            LocalKind::Chat => (2048, 4),
            LocalKind::Embedding => (512, 16),
        };
        LocalModelConfig {
            name: name.to_string(),
            path,
            kind,
            context,
            parallel,
            queue: 64,
            threads: (cores / 2).max(1),
            gpu_layers: 0,
            query_prefix: String::new(),
            document_prefix: String::new(),
        }
    }
}

/// llama.cpp's process-wide backend, initialised once.
pub(crate) fn llama_backend() -> Result<&'static LlamaBackend, String> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| format!("llama.cpp backend: {e}"))
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// Checks a model file without loading it: a readable GGUF whose architecture fits the kind.
/// Returns the architecture.
pub fn check_file(cfg: &LocalModelConfig) -> Result<String, String> {
    let arch = gguf::architecture(&cfg.path)?;
    let encoder_only = matches!(
        arch.as_str(),
        "bert" | "nomic-bert" | "nomic-bert-moe" | "jina-bert-v2" | "jina-bert-v3" | "neo-bert"
    );
    match cfg.kind {
        LocalKind::Chat if encoder_only => {
            return Err(format!(
                "{} has architecture `{arch}`, an embedding model; set `kind: embedding`",
                cfg.path.display()
            ));
        }
        LocalKind::Embedding if !encoder_only => tracing::warn!(
            model = %cfg.name, %arch,
            "embedding model with a decoder architecture; its last-token or mean pooling must be set in the GGUF"
        ),
        _ => {}
    }
    Ok(arch)
}

/// Loads a GGUF model after checking its header, with errors that say what is wrong.
pub(crate) fn load_model(cfg: &LocalModelConfig) -> Result<LlamaModel, String> {
    let arch = check_file(cfg)?;
    let backend = llama_backend()?;
    let params = LlamaModelParams::default().with_n_gpu_layers(cfg.gpu_layers);
    LlamaModel::load_from_file(backend, &cfg.path, &params).map_err(|e| {
        format!(
            "llama.cpp could not load {} (architecture `{arch}`): {e}",
            cfg.path.display()
        )
    })
}

/// A local model that cannot serve now; `detail` goes to the log only.
pub(crate) fn unavailable(model: &str, detail: &str) -> Error {
    Error::Unavailable {
        message: format!("The local model `{model}` is not available."),
        detail: detail.to_string(),
    }
}

/// Why a local model's queue did not take a request: full (429, retry) or its thread is gone.
pub(crate) fn refused<T>(model: &str, e: TrySendError<T>) -> Error {
    match e {
        TrySendError::Full(_) => Error::RateLimited {
            message: format!(
                "The local model `{model}` is busy; its queue is full. Retry shortly."
            ),
            retry_after_secs: 1,
            unit: "requests",
            limit: None,
        },
        TrySendError::Disconnected(_) => unavailable(model, "its worker thread stopped"),
    }
}

/// What a configured local model became at start.
enum Loaded {
    Chat(Box<ChatEngine>),
    Embedding(Arc<Embedder>),
    /// Not loaded (load failed, or `fuke check` which loads nothing): why.
    Failed(String),
}

/// A configured local model, usable as a [`Backend`] whatever its load result.
pub struct LocalModel {
    model: String,
    backend_name: String,
    kind: LocalKind,
    loaded: Loaded,
}

/// The local models of `fuke.yaml`, by name. Cloning shares the loaded models.
#[derive(Default, Clone)]
pub struct LocalModels {
    models: HashMap<String, Arc<LocalModel>>,
}

impl LocalModels {
    /// Names and kinds only, nothing loaded (for `fuke check` and policy validation).
    pub fn configured(configs: &[LocalModelConfig]) -> Self {
        Self::build(configs, |_| Loaded::Failed("not loaded".into()))
    }

    /// Loads every model; one that fails is logged and answers 503, the rest keep serving.
    pub fn load(configs: &[LocalModelConfig]) -> Self {
        Self::build(configs, |cfg| {
            let started = std::time::Instant::now();
            let loaded = match cfg.kind {
                LocalKind::Chat => ChatEngine::start(cfg).map(|c| Loaded::Chat(Box::new(c))),
                LocalKind::Embedding => {
                    Embedder::start(cfg).map(|e| Loaded::Embedding(Arc::new(e)))
                }
            };
            match loaded {
                Ok(l) => {
                    tracing::info!(model = %cfg.name, path = %cfg.path.display(), threads = cfg.threads,
                        parallel = cfg.parallel, ms = started.elapsed().as_millis() as u64, "local model loaded");
                    l
                }
                Err(e) => {
                    tracing::error!(model = %cfg.name, error = %e, "local model not loaded; its routes answer 503");
                    Loaded::Failed(e)
                }
            }
        })
    }

    fn build(
        configs: &[LocalModelConfig],
        mut load: impl FnMut(&LocalModelConfig) -> Loaded,
    ) -> Self {
        let models = configs
            .iter()
            .map(|cfg| {
                let model = LocalModel {
                    model: cfg.name.clone(),
                    backend_name: format!("local:{}", cfg.name),
                    kind: cfg.kind,
                    loaded: load(cfg),
                };
                (cfg.name.clone(), Arc::new(model))
            })
            .collect();
        LocalModels { models }
    }

    pub fn get(&self, name: &str) -> Option<Arc<LocalModel>> {
        self.models.get(name).cloned()
    }

    /// The embedder of a loaded embedding model.
    pub fn embedder(&self, name: &str) -> Option<Arc<Embedder>> {
        match &self.models.get(name)?.loaded {
            Loaded::Embedding(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// Sequences a local chat model is decoding now (0 for other models).
    pub fn active_sequences(&self, name: &str) -> usize {
        match self.models.get(name).map(|m| &m.loaded) {
            Some(Loaded::Chat(c)) => c.counters.active.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Prompt tokens a local chat model took from its cache so far (0 for other models).
    pub fn reused_prompt_tokens(&self, name: &str) -> u64 {
        match self.models.get(name).map(|m| &m.loaded) {
            Some(Loaded::Chat(c)) => c.counters.reused.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// Why a model is not serving, if it is not.
    pub fn failure(&self, name: &str) -> Option<&str> {
        match &self.models.get(name)?.loaded {
            Loaded::Failed(why) => Some(why),
            _ => None,
        }
    }
}

impl Backend for LocalModel {
    fn name(&self) -> &str {
        &self.backend_name
    }

    fn is_local(&self) -> bool {
        true
    }

    fn send(&self, req: BackendRequest) -> BoxFuture<'_, Result<BackendResponse, Error>> {
        Box::pin(async move {
            let body = req
                .body
                .collect()
                .await
                .map_err(|_| Error::invalid("The request body could not be read.", None))?
                .to_bytes();
            let id = String::from_utf8_lossy(req.request_id.as_bytes())
                .trim_start_matches("req_")
                .to_string();
            match (&self.loaded, req.endpoint) {
                (Loaded::Failed(why), _) => Err(unavailable(&self.model, why)),
                (Loaded::Chat(engine), Endpoint::ChatCompletions) => engine.chat(&body, &id).await,
                (Loaded::Embedding(embedder), Endpoint::Embeddings) => embedder.serve(&body).await,
                (_, endpoint) => Err(Error::InvalidRequest {
                    message: format!(
                        "The local {} model `{}` does not serve {}.",
                        match self.kind {
                            LocalKind::Chat => "chat",
                            LocalKind::Embedding => "embedding",
                        },
                        self.model,
                        endpoint.upstream_path()
                    ),
                    param: Some("model".into()),
                    code: Some("unsupported_endpoint"),
                }),
            }
        })
    }
}

// === chat engine ===

/// Sampling settings of one request.
#[derive(Debug, Clone)]
struct Sampling {
    temperature: f32,
    top_p: f32,
    top_k: i32,
    seed: u32,
    frequency_penalty: f32,
    presence_penalty: f32,
}

impl Sampling {
    fn sampler(&self, n_vocab: i32) -> LlamaSampler {
        let mut chain = Vec::new();
        if self.frequency_penalty != 0.0 || self.presence_penalty != 0.0 {
            chain.push(LlamaSampler::penalties(
                n_vocab,
                64,
                1.0,
                self.frequency_penalty,
                self.presence_penalty,
            ));
        }
        if self.temperature <= 0.0 {
            chain.push(LlamaSampler::greedy());
        } else {
            if self.top_k > 0 {
                chain.push(LlamaSampler::top_k(self.top_k));
            }
            if self.top_p < 1.0 {
                chain.push(LlamaSampler::top_p(self.top_p, 1));
            }
            chain.push(LlamaSampler::temp(self.temperature));
            chain.push(LlamaSampler::dist(self.seed));
        }
        LlamaSampler::chain_simple(chain)
    }
}

/// One queued generation.
struct Job {
    prompt: Vec<LlamaToken>,
    max_tokens: u32,
    ignore_eos: bool,
    stop: Vec<String>,
    sampling: Sampling,
    events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug)]
enum Event {
    Text(String),
    Done {
        finish_reason: &'static str,
        prompt_tokens: u32,
        completion_tokens: u32,
    },
    Failed(String),
}

pub struct ChatEngine {
    model: Arc<LlamaModel>,
    counters: Arc<Counters>,
    template: ChatTemplate,
    jobs: SyncSender<Job>,
    /// Tokens per sequence.
    context: u32,
    model_name: String,
}

impl ChatEngine {
    fn start(cfg: &LocalModelConfig) -> Result<Self, String> {
        let model = Arc::new(load_model(cfg)?);
        let template = ChatTemplate::of(&model, &cfg.name)?;
        // Waiting requests beyond those being decoded.
        let (jobs, rx) = std::sync::mpsc::sync_channel(cfg.queue as usize);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_model = model.clone();
        let worker_cfg = cfg.clone();
        let counters = Arc::new(Counters::default());
        let worker_counters = counters.clone();
        std::thread::Builder::new()
            .name(format!("llama-{}", cfg.name))
            .spawn(move || run_worker(&worker_model, &worker_cfg, rx, ready_tx, &worker_counters))
            .map_err(|e| format!("cannot start the generation thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the generation thread stopped".to_string())??;
        Ok(ChatEngine {
            model,
            counters,
            template,
            jobs,
            context: cfg.context,
            model_name: cfg.name.clone(),
        })
    }

    /// `POST /v1/chat/completions` for this model.
    async fn chat(&self, body: &[u8], id: &str) -> Result<BackendResponse, Error> {
        let req = ChatRequest::parse(body)?;
        let messages = req.messages()?;
        let prompt = self.template.apply(&self.model, &messages)?;
        // The template writes special tokens as text: parse them as special tokens, and add the
        // model's BOS only if the template did not write it.
        let vocab = self.model.vocab();
        let add_bos = !self.template.writes_bos(&prompt);
        let tokens = vocab.tokenize(prompt.as_bytes(), add_bos, true);
        let n_prompt = tokens.len() as u32;
        if n_prompt == 0 {
            return Err(Error::invalid(
                "The messages are empty.",
                Some("messages".into()),
            ));
        }
        if n_prompt >= self.context {
            return Err(Error::InvalidRequest {
                message: format!(
                    "This model's maximum context length is {} tokens. However, your messages resulted in {n_prompt} tokens.",
                    self.context
                ),
                param: Some("messages".into()),
                code: Some("context_length_exceeded"),
            });
        }
        let room = self.context - n_prompt;
        let max_tokens = req.max_tokens().map_or(room, |m| m.min(room));
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            prompt: tokens,
            max_tokens,
            ignore_eos: req.ignore_eos,
            stop: req.stop_sequences(),
            sampling: req.sampling(),
            events: tx,
        };
        // Counted before it can be taken, so the worker's decrement never comes first.
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.jobs.try_send(job) {
            self.counters.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(refused(&self.model_name, e));
        }
        let answer = Answer {
            id: format!("chatcmpl-{id}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            model: req.model.clone(),
        };
        let mut headers = HeaderMap::new();
        if req.stream {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
            Ok(BackendResponse {
                status: StatusCode::OK,
                headers,
                body: stream_body(answer, rx, include_usage),
                idle_timeout: IDLE_TIMEOUT,
                deadline: None,
            })
        } else {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            let json = json_answer(answer, rx).await?;
            Ok(BackendResponse {
                status: StatusCode::OK,
                headers,
                body: body::full(json),
                idle_timeout: IDLE_TIMEOUT,
                deadline: None,
            })
        }
    }
}

/// Longest pause between two frames of a local answer: a queued request waits for a free
/// sequence without sending anything.
const IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// What the generation thread reports to the rest of the process.
#[derive(Default)]
struct Counters {
    /// Sequences being decoded now.
    active: AtomicUsize,
    /// Requests waiting for a sequence.
    queued: AtomicUsize,
    /// Prompt tokens taken from a sequence's cache instead of being decoded again.
    reused: AtomicU64,
}

/// A sequence being decoded.
struct Slot {
    seq: i32,
    job: Job,
    /// Tokens in this sequence's KV cache.
    tokens: Vec<LlamaToken>,
    /// Prompt tokens already in the KV cache.
    fed: usize,
    /// Position of the next token.
    pos: i32,
    sampler: LlamaSampler,
    generated: u32,
    /// The last sampled token, fed at the next step.
    next: Option<LlamaToken>,
    /// Bytes of an incomplete UTF-8 character.
    utf8: Vec<u8>,
    /// Text held back because it could be the start of a stop sequence.
    held: String,
    /// Where this slot's logits are in the current batch.
    logits_at: Option<i32>,
}

fn run_worker(
    model: &LlamaModel,
    cfg: &LocalModelConfig,
    jobs: Receiver<Job>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    Counters {
        active,
        queued,
        reused,
    }: &Counters,
) {
    let setup = || -> Result<(LlamaContext<'_>, u32), String> {
        let backend = llama_backend()?;
        let n_batch = 512u32;
        let threads = cfg.threads as i32;
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(cfg.context * cfg.parallel))
            .with_n_seq_max(cfg.parallel)
            .with_n_batch(n_batch)
            .with_n_ubatch(n_batch)
            .with_n_threads(threads)
            .with_n_threads_batch(threads);
        let ctx = model
            .new_context(backend, params)
            .map_err(|e| format!("llama.cpp context: {e}"))?;
        Ok((ctx, n_batch))
    };
    let (mut ctx, n_batch) = match setup() {
        Ok(x) => {
            let _ = ready.send(Ok(()));
            x
        }
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let mut batch = LlamaBatch::new(n_batch as usize, 1);
    let mut slots: Vec<Option<Slot>> = (0..cfg.parallel).map(|_| None).collect();
    // The tokens each sequence's KV cache holds (left from its last request): a new prompt that
    // starts the same way (system prompt, earlier turns) is decoded only from where it differs.
    let mut cached: Vec<Vec<LlamaToken>> = vec![Vec::new(); slots.len()];
    let mut piece = Vec::new();
    loop {
        active.store(slots.iter().flatten().count(), Ordering::Relaxed);
        // Admit waiting requests into free sequences; sleep only when nothing runs.
        while slots.iter().any(Option::is_none) {
            let job = if slots.iter().all(Option::is_none) {
                match jobs.recv() {
                    Ok(j) => j,
                    Err(_) => return,
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        if slots.iter().all(Option::is_none) {
                            return;
                        }
                        break;
                    }
                }
            };
            queued.fetch_sub(1, Ordering::Relaxed);
            if job.events.is_closed() {
                continue;
            }
            // The free sequence whose cache shares the longest prefix with this prompt. At least
            // the last prompt token is decoded again: its logits give the first answer token.
            let (seq, reuse) = (0..slots.len())
                .filter(|&s| slots[s].is_none())
                .map(|s| {
                    (
                        s,
                        common_prefix(&cached[s], &job.prompt)
                            .min(job.prompt.len().saturating_sub(1)),
                    )
                })
                .max_by_key(|&(s, n)| (n, std::cmp::Reverse(s)))
                .unwrap_or_default();
            let mut tokens = std::mem::take(&mut cached[seq]);
            tokens.truncate(reuse);
            if ctx
                .clear_kv_cache_seq(Some(seq as u32), Some(reuse as u32), None)
                .is_err()
            {
                tokens.clear();
                let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
            }
            let reuse = tokens.len();
            reused.fetch_add(reuse as u64, Ordering::Relaxed);
            slots[seq] = Some(Slot {
                seq: seq as i32,
                sampler: job.sampling.sampler(model.n_vocab()),
                job,
                tokens,
                fed: reuse,
                pos: reuse as i32,
                generated: 0,
                next: None,
                utf8: Vec::new(),
                held: String::new(),
                logits_at: None,
            });
        }

        // Free the sequences whose client went away.
        for s in &mut slots {
            if s.as_ref().is_some_and(|s| s.job.events.is_closed()) {
                release(s, &mut cached);
            }
        }
        active.store(slots.iter().flatten().count(), Ordering::Relaxed);

        // One batch: each generating sequence's last token, then prompt chunks as room allows.
        batch.clear();
        let mut room = n_batch as usize;
        let mut add_failed = false;
        for s in slots.iter_mut().flatten() {
            s.logits_at = None;
            if let Some(t) = s.next.take() {
                add_failed |= batch.add(t, s.pos, &[s.seq], true).is_err();
                s.tokens.push(t);
                s.logits_at = Some(batch.n_tokens() - 1);
                s.pos += 1;
                room -= 1;
            }
        }
        for s in slots.iter_mut().flatten() {
            if s.fed < s.job.prompt.len() && room > 0 {
                let take = room.min(s.job.prompt.len() - s.fed);
                for i in 0..take {
                    let last = s.fed + i + 1 == s.job.prompt.len();
                    let t = s.job.prompt[s.fed + i];
                    add_failed |= batch.add(t, s.pos, &[s.seq], last).is_err();
                    s.tokens.push(t);
                    s.pos += 1;
                }
                s.fed += take;
                room -= take;
                if s.fed == s.job.prompt.len() {
                    s.logits_at = Some(batch.n_tokens() - 1);
                }
            }
        }
        if batch.n_tokens() == 0 {
            continue;
        }
        if add_failed {
            fail_all(&mut ctx, &mut slots, &mut cached, "internal batch error");
            continue;
        }
        if let Err(e) = ctx.decode(&mut batch) {
            tracing::error!(model = %cfg.name, error = %e, "llama.cpp decode failed");
            fail_all(
                &mut ctx,
                &mut slots,
                &mut cached,
                &format!("decode failed: {e}"),
            );
            continue;
        }

        // Sample the next token of every sequence that has logits in this batch.
        let vocab = model.vocab();
        for s in &mut slots {
            let Some(slot) = s.as_mut() else { continue };
            let Some(at) = slot.logits_at else { continue };
            let token = slot.sampler.sample(&ctx, at);
            let finish = if vocab.is_eog(token) && !slot.job.ignore_eos {
                Some("stop")
            } else {
                slot.generated += 1;
                piece.clear();
                vocab.token_to_piece_into(token, &mut piece, false, None);
                let stopped = slot.push_text(&piece);
                if stopped {
                    Some("stop")
                } else if slot.generated >= slot.job.max_tokens || slot.pos as u32 >= cfg.context {
                    Some("length")
                } else {
                    slot.next = Some(token);
                    None
                }
            };
            if let Some(reason) = finish {
                slot.flush();
                let _ = slot.job.events.send(Event::Done {
                    finish_reason: reason,
                    prompt_tokens: slot.job.prompt.len() as u32,
                    completion_tokens: slot.generated,
                });
                release(s, &mut cached);
            }
        }
    }
}

/// Ends a request; its sequence's cache stays for the next prompt with the same beginning.
fn release(slot: &mut Option<Slot>, cached: &mut [Vec<LlamaToken>]) {
    if let Some(s) = slot.take() {
        cached[s.seq as usize] = s.tokens;
    }
}

/// Fails every running request and empties the whole cache (after a failed decode its state is
/// unknown).
fn fail_all(
    ctx: &mut LlamaContext<'_>,
    slots: &mut [Option<Slot>],
    cached: &mut [Vec<LlamaToken>],
    why: &str,
) {
    for s in slots.iter_mut() {
        if let Some(slot) = s.take() {
            let _ = slot.job.events.send(Event::Failed(why.to_string()));
        }
    }
    ctx.clear_kv_cache();
    cached.iter_mut().for_each(Vec::clear);
}

/// Length of the common beginning of two token lists.
fn common_prefix(a: &[LlamaToken], b: &[LlamaToken]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Slot {
    /// Adds a token's bytes to the answer; sends what can no longer be part of a stop sequence.
    /// Returns whether a stop sequence was reached (the text before it is sent, the rest dropped).
    fn push_text(&mut self, bytes: &[u8]) -> bool {
        self.utf8.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.utf8) {
            Ok(s) => s.len(),
            Err(e) if e.error_len().is_some() => {
                // Invalid bytes, not merely incomplete ones: replace them.
                let text = String::from_utf8_lossy(&self.utf8).into_owned();
                self.utf8.clear();
                self.held.push_str(&text);
                return self.emit_decided();
            }
            Err(e) => e.valid_up_to(),
        };
        let rest = self.utf8.split_off(valid);
        let text = std::mem::replace(&mut self.utf8, rest);
        self.held
            .push_str(std::str::from_utf8(&text).unwrap_or_default());
        self.emit_decided()
    }

    /// Sends the held text that can no longer be the start of a stop sequence; returns whether
    /// a stop sequence was found (the text before it is sent, the rest dropped).
    fn emit_decided(&mut self) -> bool {
        let stops = &self.job.stop;
        if let Some(at) = stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            self.held.truncate(at);
            self.send_held(self.held.len());
            return true;
        }
        // Keep the longest tail that is a prefix of some stop sequence.
        let keep = stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n))
                    .map(move |n| &s[..n])
            })
            .filter(|p| self.held.ends_with(p))
            .map(str::len)
            .max()
            .unwrap_or(0);
        self.send_held(self.held.len() - keep);
        false
    }

    fn send_held(&mut self, upto: usize) {
        if upto > 0 {
            let rest = self.held.split_off(upto);
            let text = std::mem::replace(&mut self.held, rest);
            let _ = self.job.events.send(Event::Text(text));
        }
    }

    /// At the end: whatever was held back is answer text after all.
    fn flush(&mut self) {
        if !self.utf8.is_empty() {
            let text = String::from_utf8_lossy(&self.utf8).into_owned();
            self.utf8.clear();
            self.held.push_str(&text);
        }
        self.send_held(self.held.len());
    }
}

// === chat template ===

/// One message as chat templates see it.
struct ChatTurn {
    role: &'static str,
    content: String,
}

/// How a model's conversation becomes its prompt. The GGUF's own jinja template, rendered as
/// Hugging Face renders it (trim/lstrip blocks, Python string methods, `raise_exception`); when
/// the GGUF has none or it does not compile, llama.cpp's built-in engine, which recognises
/// common templates by their markers (ChatML if the GGUF has no template at all).
struct ChatTemplate {
    jinja: Option<minijinja::Environment<'static>>,
    builtin: LlamaChatTemplate,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    fn of(model: &LlamaModel, name: &str) -> Result<Self, String> {
        let source = model.chat_template(None).ok();
        let builtin = match &source {
            Some(t) => LlamaChatTemplate::new(t.to_str().unwrap_or("chatml")),
            None => LlamaChatTemplate::new("chatml"),
        }
        .map_err(|e| format!("chat template: {e}"))?;
        let jinja = source
            .and_then(|t| t.to_string().ok())
            .and_then(|source| match jinja_env(source) {
                Ok(env) => Some(env),
                Err(e) => {
                    tracing::warn!(model = %name, error = %e,
                        "the GGUF's jinja chat template does not compile; using llama.cpp's template engine");
                    None
                }
            });
        let vocab = model.vocab();
        let piece = |t| String::from_utf8_lossy(&vocab.token_to_piece(t, true, None)).into_owned();
        Ok(ChatTemplate {
            jinja,
            builtin,
            bos: piece(vocab.bos()),
            eos: piece(vocab.eos()),
        })
    }

    fn apply(&self, model: &LlamaModel, turns: &[ChatTurn]) -> Result<String, Error> {
        if let Some(env) = &self.jinja {
            let messages: minijinja::Value = turns
                .iter()
                .map(|t| {
                    minijinja::Value::from_pairs([
                        ("role", minijinja::Value::from(t.role)),
                        ("content", minijinja::Value::from(t.content.as_str())),
                    ])
                })
                .collect();
            let rendered = env.get_template("chat").and_then(|t| {
                t.render(minijinja::context! {
                    messages => messages,
                    add_generation_prompt => true,
                    bos_token => &self.bos,
                    eos_token => &self.eos,
                })
            });
            match rendered {
                Ok(prompt) => return Ok(prompt),
                // The template refused the conversation (e.g. roles that do not alternate).
                Err(e) if e.kind() == minijinja::ErrorKind::InvalidOperation => {
                    return Err(Error::invalid(
                        format!(
                            "The local model's chat template refused the messages: {}",
                            e.detail().unwrap_or("invalid conversation")
                        ),
                        Some("messages".into()),
                    ));
                }
                Err(e) => {
                    tracing::debug!(error = %e, "jinja chat template failed; using llama.cpp's engine")
                }
            }
        }
        let messages = turns
            .iter()
            .map(|t| LlamaChatMessage::new(t.role.to_string(), t.content.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                Error::invalid(format!("Invalid message: {e}"), Some("messages".into()))
            })?;
        model
            .apply_chat_template(&self.builtin, &messages, true)
            .map_err(|e| {
                Error::invalid(
                    format!("The messages could not be formatted for the local model: {e}"),
                    Some("messages".into()),
                )
            })
    }

    /// Whether the rendered prompt already starts with the BOS token.
    fn writes_bos(&self, prompt: &str) -> bool {
        !self.bos.is_empty() && prompt.starts_with(&self.bos)
    }
}

fn jinja_env(source: String) -> Result<minijinja::Environment<'static>, minijinja::Error> {
    let mut env = minijinja::Environment::new();
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template_owned("chat", source)?;
    Ok(env)
}

// === request ===

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<Message>,
    #[serde(default)]
    stream: bool,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: Option<i64>,
    stop: Option<Stop>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    /// llama-server's extension: keep generating past end-of-generation tokens.
    #[serde(default)]
    ignore_eos: bool,
    n: Option<u32>,
    tools: Option<Value>,
    tool_choice: Option<Value>,
    functions: Option<Value>,
    function_call: Option<Value>,
    logprobs: Option<bool>,
    logit_bias: Option<Value>,
    response_format: Option<Value>,
    audio: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
    tool_calls: Option<Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
struct Part {
    #[serde(rename = "type")]
    kind: String,
    text: Option<String>,
}

fn unsupported(what: &str, param: &str) -> Error {
    Error::InvalidRequest {
        message: format!("{what} is not supported by local models."),
        param: Some(param.into()),
        code: Some("unsupported_parameter"),
    }
}

fn out_of_range(param: &str, range: &str) -> Error {
    Error::invalid(
        format!("Invalid '{param}': must be {range}."),
        Some(param.to_string()),
    )
}

impl ChatRequest {
    fn parse(body: &[u8]) -> Result<Self, Error> {
        let de = &mut serde_json::Deserializer::from_slice(body);
        let req: ChatRequest = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            Error::invalid(
                format!(
                    "Invalid request for a local model at '{path}': {}",
                    e.inner()
                ),
                (path != ".").then_some(path),
            )
        })?;
        let present = |v: &Option<Value>| v.as_ref().is_some_and(|v| !v.is_null());
        if present(&req.tools)
            && req
                .tools
                .as_ref()
                .and_then(Value::as_array)
                .is_none_or(|a| !a.is_empty())
        {
            return Err(unsupported("Tool calling", "tools"));
        }
        if present(&req.tool_choice)
            && req.tool_choice.as_ref().and_then(Value::as_str) != Some("none")
        {
            return Err(unsupported("Tool calling", "tool_choice"));
        }
        if present(&req.functions) || present(&req.function_call) {
            return Err(unsupported("Function calling", "functions"));
        }
        if req.n.is_some_and(|n| n != 1) {
            return Err(unsupported("More than one choice (n > 1)", "n"));
        }
        if req.logprobs == Some(true) {
            return Err(unsupported("Log probabilities", "logprobs"));
        }
        if req
            .logit_bias
            .as_ref()
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
        {
            return Err(unsupported("Logit bias", "logit_bias"));
        }
        if let Some(rf) = &req.response_format
            && !rf.is_null()
            && rf.get("type").and_then(Value::as_str) != Some("text")
        {
            return Err(unsupported(
                "A structured response_format",
                "response_format",
            ));
        }
        if present(&req.audio) {
            return Err(unsupported("Audio output", "audio"));
        }
        if req.messages.is_empty() {
            return Err(Error::invalid(
                "'messages' must contain at least one message.",
                Some("messages".into()),
            ));
        }
        if req.temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
            return Err(out_of_range("temperature", "between 0 and 2"));
        }
        if req.top_p.is_some_and(|p| !(0.0..=1.0).contains(&p)) {
            return Err(out_of_range("top_p", "between 0 and 1"));
        }
        for (name, v) in [
            ("frequency_penalty", req.frequency_penalty),
            ("presence_penalty", req.presence_penalty),
        ] {
            if v.is_some_and(|v| !(-2.0..=2.0).contains(&v)) {
                return Err(out_of_range(name, "between -2 and 2"));
            }
        }
        if req.max_tokens() == Some(0) {
            return Err(out_of_range("max_tokens", "at least 1"));
        }
        if let Some(Stop::Many(s)) = &req.stop
            && s.len() > 4
        {
            return Err(out_of_range("stop", "at most 4 sequences"));
        }
        Ok(req)
    }

    fn max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    fn stop_sequences(&self) -> Vec<String> {
        match &self.stop {
            None => Vec::new(),
            Some(Stop::One(s)) => vec![s.clone()],
            Some(Stop::Many(v)) => v.clone(),
        }
        .into_iter()
        .filter(|s| !s.is_empty())
        .collect()
    }

    fn sampling(&self) -> Sampling {
        Sampling {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k: self.top_k.unwrap_or(0),
            // Without a seed, each request samples differently.
            seed: self.seed.map_or_else(rand::random, |s| s as u32),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
        }
    }

    /// The conversation as the chat template takes it.
    fn messages(&self) -> Result<Vec<ChatTurn>, Error> {
        self.messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let param = format!("messages[{i}]");
                let role = match m.role.as_str() {
                    "system" | "developer" => "system",
                    "user" => "user",
                    "assistant" => "assistant",
                    "tool" | "function" => return Err(unsupported("Tool results", &format!("{param}.role"))),
                    other => {
                        return Err(Error::invalid(
                            format!("Invalid value for '{param}.role': '{other}'. Supported: system, developer, user, assistant."),
                            Some(format!("{param}.role")),
                        ));
                    }
                };
                if m.tool_calls.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(unsupported("Tool calls", &format!("{param}.tool_calls")));
                }
                let text = match &m.content {
                    None => String::new(),
                    Some(Content::Text(t)) => t.clone(),
                    Some(Content::Parts(parts)) => {
                        let mut text = String::new();
                        for (j, p) in parts.iter().enumerate() {
                            match (p.kind.as_str(), &p.text) {
                                ("text", Some(t)) => text.push_str(t),
                                ("text", None) => {
                                    return Err(Error::invalid(
                                        format!("Missing '{param}.content[{j}].text'."),
                                        Some(format!("{param}.content[{j}].text")),
                                    ));
                                }
                                (kind, _) => {
                                    return Err(unsupported(
                                        &format!("Content of type '{kind}' (images, audio, files)"),
                                        &format!("{param}.content[{j}]"),
                                    ));
                                }
                            }
                        }
                        text
                    }
                };
                if text.contains('\0') {
                    return Err(Error::invalid(
                        format!("'{param}.content' contains a NUL character."),
                        Some(format!("{param}.content")),
                    ));
                }
                Ok(ChatTurn {
                    role,
                    content: text,
                })
            })
            .collect()
    }
}

// === answer ===

/// The fields every chunk or answer repeats.
struct Answer {
    id: String,
    created: u64,
    model: String,
}

#[derive(Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
}

impl Usage {
    fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: Vec<ChunkChoice<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize, Default)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

impl Answer {
    fn chunk(&self, delta: Delta<'_>, finish_reason: Option<&'static str>) -> Bytes {
        self.sse(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason,
            }],
            usage: None,
        })
    }

    fn usage_chunk(&self, usage: Usage) -> Bytes {
        self.sse(&Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            choices: Vec::new(),
            usage: Some(usage),
        })
    }

    fn sse(&self, chunk: &Chunk<'_>) -> Bytes {
        let mut out = b"data: ".to_vec();
        // Serializing these plain structs cannot fail.
        let _ = serde_json::to_writer(&mut out, chunk);
        out.extend_from_slice(b"\n\n");
        Bytes::from(out)
    }
}

/// The SSE body: frames as tokens arrive; usage chunk when asked; `[DONE]` last.
fn stream_body(answer: Answer, rx: mpsc::UnboundedReceiver<Event>, include_usage: bool) -> Body {
    enum State {
        Start,
        Tokens,
        End,
    }
    let frames = futures_util::stream::unfold(
        (answer, rx, State::Start),
        move |(answer, mut rx, state)| async move {
            let (frame, next) = match state {
                State::End => return None,
                State::Start => {
                    let role = Delta {
                        role: Some("assistant"),
                        content: Some(""),
                    };
                    (Ok(answer.chunk(role, None)), State::Tokens)
                }
                State::Tokens => match rx.recv().await {
                    Some(Event::Text(t)) => {
                        let delta = Delta {
                            role: None,
                            content: Some(&t),
                        };
                        (Ok(answer.chunk(delta, None)), State::Tokens)
                    }
                    Some(Event::Done {
                        finish_reason,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        // The end in one frame: finish reason, usage if asked, [DONE].
                        let mut end = answer.chunk(Delta::default(), Some(finish_reason)).to_vec();
                        if include_usage {
                            let usage = Usage::new(prompt_tokens, completion_tokens);
                            end.extend_from_slice(&answer.usage_chunk(usage));
                        }
                        end.extend_from_slice(b"data: [DONE]\n\n");
                        (Ok(Bytes::from(end)), State::End)
                    }
                    Some(Event::Failed(why)) => {
                        tracing::error!(error = %why, "local generation failed mid-stream");
                        (Err(std::io::Error::other(why)), State::End)
                    }
                    None => (
                        Err(std::io::Error::other("the generation thread stopped")),
                        State::End,
                    ),
                },
            };
            Some((frame.map(Frame::data), (answer, rx, next)))
        },
    );
    StreamBody::new(frames)
        .map_err(crate::body::BoxError::from)
        .boxed_unsync()
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [CompletionChoice<'a>; 1],
    usage: Usage,
}

#[derive(Serialize)]
struct CompletionChoice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<()>,
}

/// Waits for the whole answer and writes the `chat.completion` object.
async fn json_answer(
    answer: Answer,
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<Vec<u8>, Error> {
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let c = Completion {
                    id: &answer.id,
                    object: "chat.completion",
                    created: answer.created,
                    model: &answer.model,
                    choices: [CompletionChoice {
                        index: 0,
                        message: AssistantMessage {
                            role: "assistant",
                            content: &text,
                            refusal: None,
                        },
                        logprobs: None,
                        finish_reason,
                    }],
                    usage: Usage::new(prompt_tokens, completion_tokens),
                };
                return serde_json::to_vec(&c).map_err(|e| Error::Internal(e.to_string()));
            }
            Some(Event::Failed(why)) => {
                return Err(Error::Internal(format!("local generation failed: {why}")));
            }
            None => return Err(Error::Internal("the generation thread stopped".into())),
        }
    }
}

// === metrics ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModelLabels {
    model: String,
}

impl std::fmt::Debug for LocalModels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.models.keys()).finish()
    }
}

type GaugeOf = fn(&LocalModel) -> Option<i64>;

/// Read at each scrape: whether each local model serves, and each chat model's running and
/// waiting requests.
impl Collector for LocalModels {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut names: Vec<&String> = self.models.keys().collect();
        names.sort();
        let gauges: [(&str, &str, GaugeOf); 3] = [
            (
                "local_model_up",
                "1 if the local model loaded and serves, else 0",
                |m| Some(i64::from(!matches!(m.loaded, Loaded::Failed(_)))),
            ),
            (
                "local_active_sequences",
                "Sequences a local chat model is decoding",
                |m| match &m.loaded {
                    Loaded::Chat(c) => Some(c.counters.active.load(Ordering::Relaxed) as i64),
                    _ => None,
                },
            ),
            (
                "local_queued_requests",
                "Requests waiting for a local chat model's sequence",
                |m| match &m.loaded {
                    Loaded::Chat(c) => Some(c.counters.queued.load(Ordering::Relaxed) as i64),
                    _ => None,
                },
            ),
        ];
        for (name, help, value) in gauges {
            let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for n in &names {
                if let Some(v) = value(&self.models[*n]) {
                    let labels = ModelLabels {
                        model: (*n).clone(),
                    };
                    ConstGauge::new(v).encode(metric.encode_family(&labels)?)?;
                }
            }
        }
        let mut metric = encoder.encode_descriptor(
            "local_prompt_tokens_reused",
            "Prompt tokens a local chat model took from a sequence's cache instead of decoding",
            None,
            MetricType::Counter,
        )?;
        for n in &names {
            if let Loaded::Chat(c) = &self.models[*n].loaded {
                let labels = ModelLabels {
                    model: (*n).clone(),
                };
                ConstCounter::new(c.counters.reused.load(Ordering::Relaxed))
                    .encode(metric.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str, turns: &[(&'static str, &str)]) -> Result<String, minijinja::Error> {
        let env = jinja_env(template.to_string())?;
        let messages: minijinja::Value = turns
            .iter()
            .map(|(role, content)| {
                minijinja::Value::from_pairs([
                    ("role", minijinja::Value::from(*role)),
                    ("content", minijinja::Value::from(*content)),
                ])
            })
            .collect();
        env.get_template("chat")?.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => "<s>",
        })
    }

    #[test]
    fn jinja_templates_render_as_hugging_face_does() {
        // Block tags on their own lines leave no blank lines (trim/lstrip blocks), Python string
        // methods work, and the generation prompt is added.
        let t = "{{ bos_token }}{% for m in messages %}\n  {% if m['role'] == 'user' %}\n[U] {{ m['content'].strip() }}\n  {% else %}\n[{{ m['role'].upper() }}] {{ m['content'] }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}[A]{% endif %}";
        let out = render(t, &[("system", "be brief"), ("user", "  hi  ")]).unwrap();
        assert_eq!(out, "<s>[SYSTEM] be brief\n[U] hi\n[A]");
    }

    #[test]
    fn raise_exception_refuses_the_conversation() {
        let t = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be from the user') }}{% endif %}ok";
        let e = render(t, &[("assistant", "x")]).unwrap_err();
        assert_eq!(e.kind(), minijinja::ErrorKind::InvalidOperation);
        assert_eq!(e.detail(), Some("first message must be from the user"));
        assert_eq!(render(t, &[("user", "x")]).unwrap(), "ok");
    }
}
