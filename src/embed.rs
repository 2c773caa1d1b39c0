//! Local embeddings: a GGUF embedding model (e.g. all-MiniLM-L6-v2 as `bert`, mean pooling) run
//! by llama.cpp on a dedicated thread. [`Embedder`] serves `/v1/embeddings` for a local alias and
//! gives the rest of Fuke (semantic cache, knowledge base) L2-normalised vectors.
//!
//! Requests that arrive while the thread is busy are embedded together: inputs of several
//! requests share one batch, one sequence each.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError};
use std::time::Duration;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::backends::BackendResponse;
use crate::backends::local::{LocalModelConfig, llama_backend, load_model, refused, unavailable};
use crate::body;
use crate::error::Error;

type Vectors = Result<Vec<Vec<f32>>, String>;

struct Job {
    inputs: Vec<Vec<LlamaToken>>,
    reply: oneshot::Sender<Vectors>,
}

pub struct Embedder {
    name: String,
    model: Arc<LlamaModel>,
    jobs: SyncSender<Job>,
    dims: usize,
    /// Most tokens in one input (the model's trained context, or the configured one if smaller).
    max_tokens: usize,
    /// Name, dimensions and file size: stored vectors from another model are not reused.
    fingerprint: String,
    query_prefix: String,
    document_prefix: String,
}

/// Most inputs in one `/v1/embeddings` request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

impl Embedder {
    pub(crate) fn start(cfg: &LocalModelConfig) -> Result<Self, String> {
        let model = Arc::new(load_model(cfg)?);
        let max_tokens = (cfg.context as usize).min(model.n_ctx_train() as usize);
        // One batch holds one input of the longest length, or several short ones. (Larger would
        // exceed the trained context, which llama.cpp warns about even for separate sequences.)
        let n_batch = max_tokens as u32;
        let (jobs, rx) = std::sync::mpsc::sync_channel(cfg.queue as usize);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let worker_model = model.clone();
        let (threads, parallel) = (cfg.threads as i32, cfg.parallel);
        std::thread::Builder::new()
            .name(format!("embed-{}", cfg.name))
            .spawn(move || {
                // Unified: an encoder keeps no KV cache, so the whole context is one batch
                // (split per sequence, llama.cpp would round each share up to 256 tokens).
                let params = LlamaContextParams::default()
                    .with_embeddings(true)
                    .with_kv_unified(true)
                    .with_n_ctx(NonZeroU32::new(n_batch))
                    .with_n_batch(n_batch)
                    .with_n_ubatch(n_batch)
                    .with_n_seq_max(parallel)
                    .with_n_threads(threads)
                    .with_n_threads_batch(threads);
                let ctx = llama_backend().and_then(|b| {
                    worker_model
                        .new_context(b, params)
                        .map_err(|e| format!("llama.cpp context: {e}"))
                });
                match ctx {
                    Ok(mut ctx) => {
                        let _ = ready_tx.send(Ok(()));
                        run_worker(&mut ctx, n_batch as usize, parallel as usize, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            })
            .map_err(|e| format!("cannot start the embedding thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the embedding thread stopped".to_string())??;
        let file_len = std::fs::metadata(&cfg.path).map_or(0, |m| m.len());
        Ok(Embedder {
            fingerprint: format!(
                "{}:{}:{file_len}:{}:{}",
                cfg.name,
                model.n_embd(),
                cfg.query_prefix,
                cfg.document_prefix
            ),
            query_prefix: cfg.query_prefix.clone(),
            document_prefix: cfg.document_prefix.clone(),
            name: cfg.name.clone(),
            dims: model.n_embd() as usize,
            model,
            jobs,
            max_tokens,
        })
    }

    /// Length of the vectors.
    pub fn dims(&self) -> usize {
        self.dims
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Embeddings of questions (the model's query prefix put first): what the cache compares
    /// and the knowledge base searches with.
    pub async fn embed_queries(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        self.embed_prefixed(&self.query_prefix, texts).await
    }

    /// Embeddings of documents (the model's document prefix put first).
    pub async fn embed_documents(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        self.embed_prefixed(&self.document_prefix, texts).await
    }

    async fn embed_prefixed(&self, prefix: &str, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        if prefix.is_empty() {
            return self.embed(texts).await;
        }
        let owned: Vec<String> = texts.iter().map(|t| format!("{prefix}{t}")).collect();
        let refs: Vec<&str> = owned.iter().map(String::as_str).collect();
        self.embed(&refs).await
    }

    /// What identifies this model's vectors: name, dimensions, model file size and prefixes.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Tokens of `text` as the model sees it (special tokens included).
    pub fn tokenize(&self, text: &str) -> Vec<LlamaToken> {
        self.model.vocab().tokenize(text.as_bytes(), true, false)
    }

    /// Normalised embeddings of `texts`, in order. Inputs longer than the model's context are
    /// cut to it (the cache and knowledge base embed bounded text; `/v1/embeddings` refuses
    /// overlong inputs instead).
    pub async fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let inputs = texts
            .iter()
            .map(|t| {
                let mut tokens = self.tokenize(t);
                if tokens.len() > self.max_tokens {
                    // Keep the closing separator token the model was trained with.
                    let last = tokens[tokens.len() - 1];
                    tokens.truncate(self.max_tokens - 1);
                    tokens.push(last);
                }
                tokens
            })
            .collect();
        self.embed_tokens(inputs).await
    }

    async fn embed_tokens(&self, inputs: Vec<Vec<LlamaToken>>) -> Result<Vec<Vec<f32>>, Error> {
        if inputs.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.jobs
            .try_send(Job { inputs, reply })
            .map_err(|e| refused(&self.name, e))?;
        match rx.await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(Error::Internal(format!("embedding failed: {e}"))),
            Err(_) => Err(unavailable(&self.name, "the embedding thread stopped")),
        }
    }

    /// `POST /v1/embeddings` for this model.
    pub(crate) async fn serve(&self, body: &[u8]) -> Result<BackendResponse, Error> {
        let req: EmbeddingRequest = serde_json::from_slice(body).map_err(|e| {
            Error::invalid(
                format!("Invalid embeddings request: {e}"),
                Some("input".to_string()),
            )
        })?;
        if let Some(d) = req.dimensions
            && d as usize != self.dims
        {
            return Err(Error::invalid(
                format!(
                    "The local model `{}` has {} dimensions; 'dimensions' cannot change that.",
                    self.name, self.dims
                ),
                Some("dimensions".to_string()),
            ));
        }
        let base64 = match req.encoding_format.as_deref() {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(Error::invalid(
                    format!("Invalid 'encoding_format': '{other}'. Supported: float, base64."),
                    Some("encoding_format".to_string()),
                ));
            }
        };
        let n_vocab = self.model.n_vocab();
        let inputs: Vec<Vec<LlamaToken>> = match req.input {
            Input::Text(t) => vec![self.text_input(&t, 0)?],
            Input::Texts(ts) => ts
                .iter()
                .enumerate()
                .map(|(i, t)| self.text_input(t, i))
                .collect::<Result<_, _>>()?,
            Input::Tokens(ids) => vec![self.token_input(&ids, n_vocab)?],
            Input::TokenLists(lists) => lists
                .iter()
                .map(|ids| self.token_input(ids, n_vocab))
                .collect::<Result<_, _>>()?,
        };
        if inputs.is_empty() || inputs.len() > MAX_INPUTS {
            return Err(Error::invalid(
                format!("'input' must hold between 1 and {MAX_INPUTS} inputs."),
                Some("input".to_string()),
            ));
        }
        let prompt_tokens: usize = inputs.iter().map(Vec::len).sum();
        let vectors = self.embed_tokens(inputs).await?;
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| EmbeddingObject {
                object: "embedding",
                index,
                embedding: if base64 {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    Vector::Base64(base64::engine::general_purpose::STANDARD.encode(bytes))
                } else {
                    Vector::Float(v)
                },
            })
            .collect();
        let json = serde_json::to_vec(&EmbeddingList {
            object: "list",
            data,
            model: &req.model,
            usage: EmbeddingUsage {
                prompt_tokens,
                total_tokens: prompt_tokens,
            },
        })
        .map_err(|e| Error::Internal(e.to_string()))?;
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(BackendResponse {
            status: StatusCode::OK,
            headers,
            body: body::full(json),
            idle_timeout: Duration::from_secs(60),
            deadline: None,
        })
    }

    fn text_input(&self, text: &str, i: usize) -> Result<Vec<LlamaToken>, Error> {
        if text.is_empty() {
            return Err(Error::invalid(
                format!("'input[{i}]' is empty."),
                Some("input".to_string()),
            ));
        }
        let tokens = self.tokenize(text);
        self.check_length(tokens.len())?;
        Ok(tokens)
    }

    fn token_input(&self, ids: &[i64], n_vocab: i32) -> Result<Vec<LlamaToken>, Error> {
        self.check_length(ids.len())?;
        ids.iter()
            .map(|&id| match i32::try_from(id) {
                Ok(id) if (0..n_vocab).contains(&id) => Ok(LlamaToken::new(id)),
                _ => Err(Error::invalid(
                    format!("Token id {id} is outside the model's vocabulary."),
                    Some("input".to_string()),
                )),
            })
            .collect()
    }

    fn check_length(&self, n: usize) -> Result<(), Error> {
        if n == 0 || n > self.max_tokens {
            return Err(Error::InvalidRequest {
                message: format!(
                    "This model's maximum context length is {} tokens; an input has {n}.",
                    self.max_tokens
                ),
                param: Some("input".to_string()),
                code: Some("context_length_exceeded"),
            });
        }
        Ok(())
    }
}

fn run_worker(
    ctx: &mut llama_cpp_2::context::LlamaContext<'_>,
    n_batch: usize,
    n_seq: usize,
    jobs: Receiver<Job>,
) {
    let mut batch = LlamaBatch::new(n_batch, 1);
    loop {
        let Ok(first) = jobs.recv() else { return };
        // Everything already waiting is embedded with it.
        let mut pending = vec![first];
        let mut queued: usize = pending[0].inputs.len();
        while queued < n_seq * 4 {
            match jobs.try_recv() {
                Ok(j) => {
                    queued += j.inputs.len();
                    pending.push(j);
                }
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
            }
        }
        let items: Vec<(usize, usize)> = pending
            .iter()
            .enumerate()
            .flat_map(|(j, job)| (0..job.inputs.len()).map(move |i| (j, i)))
            .collect();
        let mut results: Vec<Vectors> = pending
            .iter()
            .map(|j| Ok(vec![Vec::new(); j.inputs.len()]))
            .collect();
        let mut at = 0;
        while at < items.len() {
            // Fill one batch: as many inputs as fit, one sequence each.
            batch.clear();
            let mut group = Vec::new();
            while at < items.len() && group.len() < n_seq {
                let (j, i) = items[at];
                let tokens = &pending[j].inputs[i];
                if batch.n_tokens() as usize + tokens.len() > n_batch {
                    break;
                }
                let seq = group.len() as i32;
                let added = tokens
                    .iter()
                    .enumerate()
                    .try_for_each(|(pos, &t)| batch.add(t, pos as i32, &[seq], true).map(|_| ()));
                if added.is_err() {
                    break;
                }
                group.push((j, i));
                at += 1;
            }
            if group.is_empty() {
                // Cannot happen: inputs are checked against the context, which fits one batch.
                let (j, _) = items[at];
                results[j] = Err("input longer than the batch".into());
                at += 1;
                continue;
            }
            ctx.clear_kv_cache();
            let decoded = ctx.decode(&mut batch).map_err(|e| e.to_string());
            for (seq, &(j, i)) in group.iter().enumerate() {
                let vector = decoded.clone().and_then(|()| {
                    ctx.embeddings_seq_ith(seq as i32)
                        .map(normalized)
                        .map_err(|e| format!("no pooled embedding ({e}); is pooling set?"))
                });
                match (&mut results[j], vector) {
                    (Ok(vs), Ok(v)) => vs[i] = v,
                    (r @ Ok(_), Err(e)) => *r = Err(e),
                    (Err(_), _) => {}
                }
            }
        }
        for (job, result) in pending.into_iter().zip(results) {
            let _ = job.reply.send(result);
        }
    }
}

/// `v / |v|` (a zero vector stays zero).
fn normalized(v: &[f32]) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter().map(|x| x / norm).collect()
    } else {
        v.to_vec()
    }
}

#[derive(Deserialize)]
struct EmbeddingRequest {
    model: String,
    input: Input,
    encoding_format: Option<String>,
    dimensions: Option<u32>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Input {
    Text(String),
    Texts(Vec<String>),
    Tokens(Vec<i64>),
    TokenLists(Vec<Vec<i64>>),
}

#[derive(Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: Vector,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Vector {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Serialize)]
struct EmbeddingUsage {
    prompt_tokens: usize,
    total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_to_unit_length() {
        let v = normalized(&[3.0, 4.0]);
        assert_eq!(v, vec![0.6, 0.8]);
        assert_eq!(normalized(&[0.0, 0.0]), vec![0.0, 0.0]);
    }
}
