//! The knowledge base: `kb/<collection>/` documents chunked, embedded and indexed, then searched
//! with each question so that the answer's context comes from the company's own documents.
//!
//! - Each collection serves one immutable [`Generation`] (chunks, vectors, keyword index) behind
//!   an `ArcSwap`; an index run builds the next one aside and switches atomically, so queries
//!   see the old generation until the new one is complete.
//! - Index runs are incremental: vectors are keyed by the chunk's content hash, so only new or
//!   changed chunks are embedded; chunks of deleted files are simply not in the next generation.
//! - Generations are persisted under the data directory (`kb/<collection>.json`) and loaded at
//!   start without embedding anything.
//! - Retrieval is hybrid: cosine similarity of the question's embedding plus a BM25 keyword
//!   score ([`lexical`]) that works for Chinese without spaces (BENCHMARKS.md, "Knowledge base").
//! - With `kb.qdrant_url`, vectors are also kept in Qdrant (one collection per KB collection)
//!   and the vector candidates come from there ([`qdrant`]).

pub mod chunk;
pub mod inject;
pub mod lexical;
mod qdrant;
mod store;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::embed::Embedder;
use crate::vectors::FlatIndex;
use chunk::{Budget, Chunk, Format};

/// `fuke.yaml` `kb:`.
#[derive(Debug, Clone)]
pub struct KbConfig {
    /// Holds one directory per collection.
    pub dir: PathBuf,
    /// Where generations are persisted (`<data_dir>/kb/`).
    pub data_dir: PathBuf,
    pub budget: Budget,
    /// Weight of the keyword score in the hybrid score, 0..=1 (0: vectors only).
    pub keyword_weight: f32,
    /// The same for questions in Chinese, Japanese or Korean (the default English embedder
    /// cannot rank those; a multilingual one can take the same weight as other text).
    pub keyword_weight_cjk: f32,
    /// Re-index a collection when its files change.
    pub watch: bool,
    /// The local embedding model (by name) of the knowledge base.
    pub embedder: String,
    /// Keep vectors in Qdrant (gRPC URL, e.g. `http://127.0.0.1:6334`).
    pub qdrant_url: Option<String>,
    /// Name of the environment variable holding Qdrant's API key.
    pub qdrant_api_key_env: Option<String>,
    /// Qdrant collection names are this prefix plus the KB collection's name.
    pub qdrant_prefix: String,
}

/// Default excerpts per question.
pub const DEFAULT_TOP_K: usize = 3;
/// Default least hybrid score of an excerpt, for multilingual-e5-small, whose cosines are high
/// even for unrelated text (BENCHMARKS.md, "Knowledge base"; with MiniLM, 0.3).
pub const DEFAULT_MIN_SCORE: f32 = 0.8;
/// Default keyword weights, for the multilingual-e5-small embedder the demo ships: its cosines
/// already rank Chinese and English well, and keywords add little (BENCHMARKS.md, "Knowledge
/// base", has the sweep; with the English MiniLM, 0.3 and 0.7 are best).
pub const DEFAULT_KEYWORD_WEIGHT: f32 = 0.05;
pub const DEFAULT_KEYWORD_WEIGHT_CJK: f32 = 0.05;
/// BM25 scores become `s / (s + LEX_HALF)` in 0..1: a score of `LEX_HALF` counts half.
pub const LEX_HALF: f32 = 8.0;
/// Vector candidates considered per collection before fusion.
const VECTOR_CANDIDATES: usize = 50;
/// Inputs per embedding call while indexing.
const EMBED_BATCH: usize = 16;
/// Largest document indexed.
const MAX_FILE_BYTES: u64 = 8 << 20;

/// One complete, immutable state of a collection.
#[derive(Debug)]
pub struct Generation {
    pub collection: Arc<str>,
    /// Derived from the content (same documents, same embedder: same id on every replica).
    pub id: u64,
    pub chunks: Vec<Chunk>,
    /// Content hash of each source file.
    pub files: BTreeMap<String, [u8; 32]>,
    /// Vectors by chunk position.
    vectors: FlatIndex,
    lexical: lexical::Bm25,
    /// Qdrant point id -> chunk position, built on first use.
    points: std::sync::OnceLock<HashMap<u64, usize>>,
}

impl Generation {
    fn empty(collection: Arc<str>, dims: usize) -> Generation {
        Generation::new(
            collection,
            Vec::new(),
            BTreeMap::new(),
            FlatIndex::new(dims),
        )
    }

    fn new(
        collection: Arc<str>,
        chunks: Vec<Chunk>,
        files: BTreeMap<String, [u8; 32]>,
        vectors: FlatIndex,
    ) -> Generation {
        let texts: Vec<String> = chunks.iter().map(Chunk::embed_text).collect();
        let lexical = lexical::Bm25::build(texts.iter().map(String::as_str));
        let mut h = Sha256::new();
        h.update(collection.as_bytes());
        for c in &chunks {
            h.update([0]);
            h.update(c.source.as_bytes());
            h.update(c.ordinal.to_le_bytes());
            h.update(c.hash);
        }
        let digest = h.finalize();
        Generation {
            id: u64::from_le_bytes(digest[..8].try_into().unwrap_or_default()),
            collection,
            chunks,
            files,
            vectors,
            lexical,
            points: std::sync::OnceLock::new(),
        }
    }

    fn vector(&self, i: usize) -> Option<&[f32]> {
        self.vectors.get(i as u64)
    }
}

/// What one index run did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub collection: String,
    pub files_added: usize,
    pub files_changed: usize,
    pub files_removed: usize,
    pub files_unchanged: usize,
    pub chunks: usize,
    /// Chunks embedded in this run (new or changed text).
    pub embedded: usize,
    /// Chunks whose vector was reused.
    pub reused: usize,
    pub generation: u64,
    /// Files left out, and why (not UTF-8, too large, unreadable).
    pub skipped: Vec<(String, String)>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} files added, {} changed, {} removed, {} unchanged; {} chunks ({} embedded, {} reused); generation {:016x}",
            self.collection,
            self.files_added,
            self.files_changed,
            self.files_removed,
            self.files_unchanged,
            self.chunks,
            self.embedded,
            self.reused,
            self.generation
        )?;
        for (path, why) in &self.skipped {
            write!(f, "\n  skipped {path}: {why}")?;
        }
        Ok(())
    }
}

/// Progress of an index run, for the CLI's bar.
#[derive(Debug, Clone, Copy)]
pub enum Progress {
    /// `n` chunks need embedding.
    Embedding { total: usize },
    /// `done` of them are embedded.
    Embedded { done: usize },
}

/// One chunk found for a question.
#[derive(Debug, Clone)]
pub struct Hit {
    pub collection: Arc<str>,
    pub chunk: Chunk,
    /// The hybrid score that ranks hits and is compared with `min_score`.
    pub score: f32,
    /// Cosine similarity of the question and the chunk.
    pub vector: f32,
    /// Keyword score, squashed into 0..1.
    pub keyword: f32,
}

impl Hit {
    /// `collection/source#ordinal`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.collection, self.chunk.id())
    }
}

struct Collection {
    name: Arc<str>,
    current: ArcSwap<Generation>,
    /// One index run at a time per collection.
    indexing: tokio::sync::Mutex<()>,
    /// Whether Qdrant holds this process's current generation (checked once per start).
    qdrant_synced: std::sync::atomic::AtomicBool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct KbCounters {
    pub embedded: AtomicU64,
    pub index_runs: AtomicU64,
    pub index_failures: AtomicU64,
    pub searches: AtomicU64,
    pub search_failures: AtomicU64,
    pub qdrant_failures: AtomicU64,
}

pub struct KnowledgeBase {
    cfg: KbConfig,
    embedder: Arc<Embedder>,
    collections: RwLock<BTreeMap<String, Arc<Collection>>>,
    qdrant: Option<qdrant::Remote>,
    pub counters: KbCounters,
}

impl std::fmt::Debug for KnowledgeBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KnowledgeBase")
            .field("dir", &self.cfg.dir)
            .finish_non_exhaustive()
    }
}

/// A collection name doubles as a file name and a Qdrant collection name.
pub fn valid_collection_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
}

/// The collections under `dir`: its subdirectories with valid names, sorted.
pub fn collection_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| valid_collection_name(n))
        .collect();
    names.sort();
    names
}

impl KnowledgeBase {
    /// Opens the knowledge base: every collection's persisted generation is loaded (nothing is
    /// embedded here; call [`Self::index_all`] to bring it up to date with the files).
    pub async fn open(cfg: KbConfig, embedder: Arc<Embedder>) -> Result<Arc<Self>, String> {
        let qdrant = match &cfg.qdrant_url {
            Some(url) => Some(qdrant::Remote::connect(
                url,
                cfg.qdrant_api_key_env.as_deref(),
                &cfg.qdrant_prefix,
            )?),
            None => None,
        };
        let kb = Arc::new(KnowledgeBase {
            cfg,
            embedder,
            collections: RwLock::new(BTreeMap::new()),
            qdrant,
            counters: KbCounters::default(),
        });
        for name in collection_names(&kb.cfg.dir) {
            let generation = match store::load(
                &kb.store_path(&name),
                &name,
                kb.embedder.fingerprint(),
                kb.embedder.dims(),
            ) {
                Ok(Some(g)) => g,
                Ok(None) => Generation::empty(name.as_str().into(), kb.embedder.dims()),
                Err(e) => {
                    tracing::warn!(collection = %name, error = %e, "stored knowledge-base index not usable; it will be rebuilt");
                    Generation::empty(name.as_str().into(), kb.embedder.dims())
                }
            };
            kb.collection_or_insert(&name, Some(generation));
        }
        Ok(kb)
    }

    pub fn config(&self) -> &KbConfig {
        &self.cfg
    }

    fn store_path(&self, name: &str) -> PathBuf {
        self.cfg.data_dir.join("kb").join(format!("{name}.json"))
    }

    fn collection_or_insert(&self, name: &str, g: Option<Generation>) -> Arc<Collection> {
        if let Some(c) = self.collection(name) {
            return c;
        }
        let mut map = self.collections.write().unwrap_or_else(|e| e.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(Collection {
                    name: name.into(),
                    current: ArcSwap::from_pointee(
                        g.unwrap_or_else(|| Generation::empty(name.into(), self.embedder.dims())),
                    ),
                    indexing: tokio::sync::Mutex::new(()),
                    qdrant_synced: std::sync::atomic::AtomicBool::new(false),
                })
            })
            .clone()
    }

    fn collection(&self, name: &str) -> Option<Arc<Collection>> {
        self.collections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }

    /// Names of the collections being served.
    pub fn collections(&self) -> Vec<String> {
        self.collections
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The generation a collection serves now.
    pub fn generation(&self, name: &str) -> Option<Arc<Generation>> {
        self.collection(name).map(|c| c.current.load_full())
    }

    /// One number for the generations of `names` together (the answer cache keys on it).
    pub fn generation_of(&self, names: &[Arc<str>]) -> u64 {
        let mut h = Sha256::new();
        for n in names {
            h.update(n.as_bytes());
            h.update([0]);
            let id = self.generation(n).map_or(0, |g| g.id);
            h.update(id.to_le_bytes());
        }
        let d = h.finalize();
        u64::from_le_bytes(d[..8].try_into().unwrap_or_default())
    }

    /// Re-indexes every collection directory (new ones included; collections whose directory
    /// is gone are emptied).
    pub async fn index_all(&self, progress: &(dyn Fn(&str, Progress) + Sync)) -> Vec<Summary> {
        let mut names = collection_names(&self.cfg.dir);
        for known in self.collections() {
            if !names.contains(&known) {
                names.push(known);
            }
        }
        let mut out = Vec::new();
        for name in names {
            match self.index(&name, &|p| progress(&name, p)).await {
                Ok(s) => out.push(s),
                Err(e) => {
                    tracing::error!(collection = %name, error = %e, "knowledge-base index run failed; the previous generation keeps serving")
                }
            }
        }
        out
    }

    /// Brings one collection up to date with its directory, embedding only what changed, then
    /// switches queries to the new generation.
    pub async fn index(
        &self,
        name: &str,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Summary, String> {
        if !valid_collection_name(name) {
            return Err(format!("`{name}` is not a valid collection name"));
        }
        let coll = self.collection_or_insert(name, None);
        let _running = coll.indexing.lock().await;
        self.counters.index_runs.fetch_add(1, Ordering::Relaxed);
        let result = self.index_locked(&coll, progress).await;
        if result.is_err() {
            self.counters.index_failures.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    async fn index_locked(
        &self,
        coll: &Collection,
        progress: &(dyn Fn(Progress) + Sync),
    ) -> Result<Summary, String> {
        let old = coll.current.load_full();
        let dir = self.cfg.dir.join(&*coll.name);
        let mut summary = Summary {
            collection: coll.name.to_string(),
            ..Summary::default()
        };
        // Read and chunk every document (cheap next to embedding).
        let budget = self.cfg.budget;
        let embedder = self.embedder.clone();
        let (files, chunks, skipped) = tokio::task::spawn_blocking(move || {
            let count = |t: &str| embedder.tokenize(t).len();
            read_collection(&dir, budget, &count)
        })
        .await
        .map_err(|e| e.to_string())?;
        summary.skipped = skipped;
        for (source, hash) in &files {
            match old.files.get(source) {
                None => summary.files_added += 1,
                Some(h) if h == hash => summary.files_unchanged += 1,
                Some(_) => summary.files_changed += 1,
            }
        }
        summary.files_removed = old.files.keys().filter(|s| !files.contains_key(*s)).count();

        // Vectors of unchanged text are reused; the rest is embedded.
        let mut known: HashMap<[u8; 32], usize> = HashMap::new();
        for (i, c) in old.chunks.iter().enumerate() {
            known.entry(c.hash).or_insert(i);
        }
        let dims = self.embedder.dims();
        let mut vectors = FlatIndex::new(dims);
        // Chunks without a stored vector, and the first chunk of each distinct text among them
        // (the same text twice in one run is embedded once).
        let mut missing: Vec<usize> = Vec::new();
        let mut unique: Vec<usize> = Vec::new();
        let mut seen: std::collections::HashSet<[u8; 32]> = std::collections::HashSet::new();
        for (i, c) in chunks.iter().enumerate() {
            match known.get(&c.hash).and_then(|&j| old.vector(j)) {
                Some(v) => {
                    vectors.insert(i as u64, v);
                    summary.reused += 1;
                }
                None => {
                    missing.push(i);
                    if seen.insert(c.hash) {
                        unique.push(i);
                    }
                }
            }
        }
        progress(Progress::Embedding {
            total: unique.len(),
        });
        let mut done = 0;
        let mut embedded: HashMap<[u8; 32], Vec<f32>> = HashMap::new();
        for batch in unique.chunks(EMBED_BATCH) {
            let texts: Vec<String> = batch.iter().map(|&i| chunks[i].embed_text()).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let vs = self
                .embedder
                .embed_documents(&refs)
                .await
                .map_err(|e| format!("embedding failed: {e}"))?;
            for (&i, v) in batch.iter().zip(vs) {
                embedded.insert(chunks[i].hash, v);
            }
            done += batch.len();
            self.counters
                .embedded
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            progress(Progress::Embedded { done });
        }
        summary.embedded = unique.len();
        for &i in &missing {
            if let Some(v) = embedded.get(&chunks[i].hash) {
                vectors.insert(i as u64, v);
            }
        }
        summary.reused += missing.len() - unique.len();
        summary.chunks = chunks.len();

        let next = Generation::new(coll.name.clone(), chunks, files, vectors);
        summary.generation = next.id;
        let qdrant_synced = coll.qdrant_synced.load(Ordering::Relaxed);
        if next.id == old.id && next.files == old.files && (self.qdrant.is_none() || qdrant_synced)
        {
            return Ok(summary);
        }
        let mut upserted = false;
        if let Some(q) = &self.qdrant {
            // New points first; queries only accept points of the generation they hold, so the
            // old generation keeps answering correctly until the switch. Qdrant being down does
            // not stop the index: the local copy answers until a later run gets through.
            match q.upsert(&next, dims).await {
                Ok(()) => upserted = true,
                Err(e) => {
                    coll.qdrant_synced.store(false, Ordering::Relaxed);
                    tracing::warn!(collection = %coll.name, error = %e, "writing to Qdrant failed; searching the local copy until a later index run succeeds");
                }
            }
        }
        store::save(
            &self.store_path(&coll.name),
            &next,
            self.embedder.fingerprint(),
        )
        .map_err(|e| format!("saving the index: {e}"))?;
        coll.current.store(Arc::new(next));
        if let Some(q) = self.qdrant.as_ref().filter(|_| upserted) {
            coll.qdrant_synced.store(true, Ordering::Relaxed);
            let current = coll.current.load_full();
            if let Err(e) = q.remove_stale(&old, &current).await {
                tracing::warn!(collection = %coll.name, error = %e, "removing stale Qdrant points failed; they are ignored by queries");
            }
        }
        tracing::info!(summary = %summary, "knowledge base indexed");
        Ok(summary)
    }

    /// The best chunks of `collections` for `question`: at most `top_k`, each scoring at least
    /// `min_score`, best first.
    pub async fn search(
        &self,
        collections: &[Arc<str>],
        question: &str,
        top_k: usize,
        min_score: f32,
    ) -> Result<Vec<Hit>, crate::error::Error> {
        let weight = if crate::cache::guard::is_cjk(question) {
            self.cfg.keyword_weight_cjk
        } else {
            self.cfg.keyword_weight
        };
        self.search_weighted(collections, question, top_k, min_score, weight)
            .await
    }

    /// [`Self::search`] with an explicit keyword weight (the evaluation sweeps it).
    pub async fn search_weighted(
        &self,
        collections: &[Arc<str>],
        question: &str,
        top_k: usize,
        min_score: f32,
        keyword_weight: f32,
    ) -> Result<Vec<Hit>, crate::error::Error> {
        self.counters.searches.fetch_add(1, Ordering::Relaxed);
        let query = if keyword_weight < 1.0 {
            self.embedder
                .embed_queries(&[question])
                .await?
                .pop()
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut hits = Vec::new();
        for name in collections {
            let Some(coll) = self.collection(name) else {
                continue;
            };
            let g = coll.current.load_full();
            if g.chunks.is_empty() {
                continue;
            }
            let mut candidates: Vec<usize> = Vec::new();
            if !query.is_empty() {
                // Qdrant answers once it holds this generation; until then, and whenever it
                // fails, the local copy does.
                let mut from_qdrant = None;
                if let Some(q) = &self.qdrant
                    && coll.qdrant_synced.load(Ordering::Relaxed)
                {
                    match q.search(&g, &query, VECTOR_CANDIDATES).await {
                        Ok(found) => from_qdrant = Some(found),
                        Err(e) => {
                            self.counters
                                .qdrant_failures
                                .fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(collection = %coll.name, error = %e, "Qdrant search failed; using the local copy");
                        }
                    }
                }
                match from_qdrant {
                    Some(found) => candidates.extend(found),
                    None => candidates.extend(
                        g.vectors
                            .search(&query, VECTOR_CANDIDATES, -1.0)
                            .into_iter()
                            .map(|(id, _)| id as usize),
                    ),
                }
            }
            let keyword = if keyword_weight > 0.0 {
                g.lexical.scores(question)
            } else {
                HashMap::new()
            };
            candidates.extend(keyword.keys().map(|&d| d as usize));
            candidates.sort_unstable();
            candidates.dedup();
            for i in candidates {
                let Some(chunk) = g.chunks.get(i) else {
                    continue;
                };
                let vector = match (query.is_empty(), g.vector(i)) {
                    (false, Some(v)) => crate::vectors::dot(&query, v),
                    _ => 0.0,
                };
                let k = keyword.get(&(i as u32)).copied().unwrap_or(0.0);
                let keyword = k / (k + LEX_HALF);
                let score = (1.0 - keyword_weight) * vector.max(0.0) + keyword_weight * keyword;
                if score >= min_score {
                    hits.push(Hit {
                        collection: g.collection.clone(),
                        chunk: chunk.clone(),
                        score,
                        vector,
                        keyword,
                    });
                }
            }
        }
        hits.sort_by(|a, b| b.score.total_cmp(&a.score));
        hits.truncate(top_k);
        Ok(hits)
    }

    /// Re-indexes on every change below the knowledge-base directory (debounced), until the
    /// handle is dropped. Must be called inside a tokio runtime.
    pub fn watch(self: &Arc<Self>) -> notify::Result<crate::reload::WatchHandle> {
        let kb = self.clone();
        let rt = tokio::runtime::Handle::current();
        crate::reload::watch_trees("knowledge base", vec![self.cfg.dir.clone()], move || {
            rt.block_on(kb.index_all(&|_, _| {}));
        })
    }

    /// Per collection: chunks, files, generation.
    pub fn stats(&self) -> Vec<(String, usize, usize, u64)> {
        self.collections()
            .into_iter()
            .filter_map(|n| {
                let g = self.generation(&n)?;
                Some((n, g.chunks.len(), g.files.len(), g.id))
            })
            .collect()
    }
}

/// Every supported document below `dir`: per-file content hashes, chunks in file order, and
/// the files that were left out with the reason.
type Read = (
    BTreeMap<String, [u8; 32]>,
    Vec<Chunk>,
    Vec<(String, String)>,
);

fn read_collection(dir: &Path, budget: Budget, count: &dyn Fn(&str) -> usize) -> Read {
    let mut paths = Vec::new();
    walk(dir, dir, &mut paths);
    paths.sort_by(|a, b| a.0.cmp(&b.0));
    let mut files = BTreeMap::new();
    let mut chunks = Vec::new();
    let mut skipped = Vec::new();
    for (source, path, format) in paths {
        match std::fs::metadata(&path) {
            Ok(m) if m.len() > MAX_FILE_BYTES => {
                skipped.push((source, format!("larger than {MAX_FILE_BYTES} bytes")));
                continue;
            }
            Err(e) => {
                skipped.push((source, e.to_string()));
                continue;
            }
            Ok(_) => {}
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                skipped.push((source, e.to_string()));
                continue;
            }
        };
        let Ok(text) = String::from_utf8(bytes) else {
            skipped.push((source, "not UTF-8".into()));
            continue;
        };
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        files.insert(source.clone(), Sha256::digest(text.as_bytes()).into());
        chunks.extend(chunk::chunk_file(&source, format, text, budget, count));
    }
    (files, chunks, skipped)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf, Format)>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        // Hidden files and editors' temporary files are not documents.
        if name.starts_with('.') || name.ends_with('~') || name.starts_with('#') {
            continue;
        }
        let path = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            walk(root, &path, out);
        } else if let Some(format) = Format::of(&path)
            && let Ok(rel) = path.strip_prefix(root)
        {
            let source = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push((source, path, format));
        }
    }
}

/// Metrics read at scrape time: chunks per collection and the index counters.
#[derive(Clone)]
pub struct KbMetrics(pub Arc<KnowledgeBase>);

impl std::fmt::Debug for KbMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KbMetrics")
    }
}

impl prometheus_client::collector::Collector for KbMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::MetricType;
        use prometheus_client::metrics::counter::ConstCounter;
        use prometheus_client::metrics::gauge::ConstGauge;
        let stats = self.0.stats();
        let mut chunks = encoder.encode_descriptor(
            "kb_chunks",
            "Chunks a knowledge-base collection serves",
            None,
            MetricType::Gauge,
        )?;
        for (name, n, _, _) in &stats {
            ConstGauge::new(*n as i64)
                .encode(chunks.encode_family(&[("collection", name.as_str())])?)?;
        }
        let c = &self.0.counters;
        for (name, help, value) in [
            (
                "kb_chunks_embedded",
                "Chunks embedded by index runs",
                &c.embedded,
            ),
            ("kb_index_runs", "Knowledge-base index runs", &c.index_runs),
            (
                "kb_index_failures",
                "Index runs that failed (the previous generation kept serving)",
                &c.index_failures,
            ),
            ("kb_searches", "Knowledge-base searches", &c.searches),
            (
                "kb_search_failures",
                "Retrievals that failed (answered without context)",
                &c.search_failures,
            ),
        ] {
            let m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            ConstCounter::new(value.load(Ordering::Relaxed)).encode(m)?;
        }
        Ok(())
    }
}
