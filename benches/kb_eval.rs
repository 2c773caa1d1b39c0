//! Retrieval quality and speed of the knowledge base over the example collection `kb/support`,
//! with the questions of `benches/kb_eval/questions.jsonl` (each labelled with the section(s)
//! that answer it, `path#heading`; out-of-scope questions have none).
//!
//! Prints, as Markdown tables: recall@1, recall@3 and MRR per language for a sweep of the
//! keyword weight (0 = vectors only, 1 = BM25 only); for the default weight, how `min_score`
//! trades answerable questions kept against out-of-scope questions given no context; and
//! retrieval throughput with the embedding included.
//!
//!     cargo run --release --example kb_eval [-- --embedder e5|minilm --threads N --queries N]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use fuke::backends::local::{LocalKind, LocalModelConfig, LocalModels};
use fuke::kb::{KbConfig, KnowledgeBase};

#[derive(serde::Deserialize)]
struct Question {
    id: String,
    lang: String,
    q: String,
    answers: Vec<String>,
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn label(h: &fuke::kb::Hit) -> String {
    format!(
        "{}#{}",
        h.chunk.source,
        h.chunk.headings.last().map_or("", String::as_str)
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let threads: u32 = arg("--threads").and_then(|t| t.parse().ok()).unwrap_or(1);
    let queries: usize = arg("--queries").and_then(|t| t.parse().ok()).unwrap_or(400);
    // `--embedder minilm` (English, the cache's default) or `e5` (multilingual-e5-small).
    let which = arg("--embedder").unwrap_or_else(|| "e5".into());
    let (file, query_prefix, document_prefix) = match which.as_str() {
        "minilm" => ("all-MiniLM-L6-v2.gguf", "", ""),
        "e5" => ("multilingual-e5-small.Q4_0.gguf", "query: ", "passage: "),
        other => panic!("unknown embedder {other}"),
    };
    let local = LocalModels::load(&[LocalModelConfig {
        threads,
        query_prefix: query_prefix.into(),
        document_prefix: document_prefix.into(),
        ..LocalModelConfig::defaults(&which, root.join("models").join(file), LocalKind::Embedding)
    }]);
    let embedder = local.embedder(&which).expect("run scripts/models.sh");
    let data = root.join("target/kb_eval");
    let _ = std::fs::remove_dir_all(&data);
    let kb = KnowledgeBase::open(
        KbConfig {
            dir: root.join("kb"),
            data_dir: data,
            budget: fuke::kb::chunk::Budget::default(),
            keyword_weight: fuke::kb::DEFAULT_KEYWORD_WEIGHT,
            keyword_weight_cjk: fuke::kb::DEFAULT_KEYWORD_WEIGHT_CJK,
            embedder: which.clone(),
            watch: false,
            qdrant_url: None,
            qdrant_api_key_env: None,
            qdrant_prefix: String::new(),
        },
        embedder,
    )
    .await
    .unwrap();
    let t = Instant::now();
    let summaries = kb.index_all(&|_, _| {}).await;
    let chunks: usize = summaries.iter().map(|s| s.chunks).sum();
    println!(
        "Indexed {chunks} chunks in {:.2} s (embedder {which}, threads: {threads}).\n",
        t.elapsed().as_secs_f64()
    );
    let questions: Vec<Question> =
        std::fs::read_to_string(root.join("benches/kb_eval/questions.jsonl"))
            .unwrap()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    let collections: Vec<Arc<str>> = vec![Arc::from("support")];
    if let Some(w) = arg("--show-misses").and_then(|w| w.parse::<f32>().ok()) {
        for q in &questions {
            let hits = kb
                .search_weighted(&collections, &q.q, 3, -1.0, w)
                .await
                .unwrap();
            if !q.answers.is_empty() && !hits.iter().any(|h| q.answers.contains(&label(h))) {
                println!("{} {:?} want {:?}", q.id, q.q, q.answers);
                for h in &hits {
                    println!(
                        "    {:.3} v{:.3} k{:.3} {}",
                        h.score,
                        h.vector,
                        h.keyword,
                        label(h)
                    );
                }
            }
        }
        return;
    }

    println!("| keyword weight | lang | questions | recall@1 | recall@3 | MRR |");
    println!("|---|---|---|---|---|---|");
    let weights = [
        Some(0.0f32),
        Some(0.05),
        Some(0.1),
        Some(0.2),
        Some(0.3),
        Some(0.4),
        Some(0.5),
        Some(0.6),
        Some(0.7),
        Some(0.8),
        Some(1.0),
        None,
    ];
    for weight in weights {
        for lang in ["en", "zh", "all"] {
            let (mut n, mut r1, mut r3, mut mrr) = (0usize, 0usize, 0usize, 0f64);
            let mut misses = Vec::new();
            for q in &questions {
                if q.answers.is_empty() || (lang != "all" && q.lang != lang) {
                    continue;
                }
                let hits = match weight {
                    Some(w) => kb.search_weighted(&collections, &q.q, 10, -1.0, w).await,
                    None => kb.search(&collections, &q.q, 10, -1.0).await,
                }
                .unwrap();
                n += 1;
                match hits.iter().position(|h| q.answers.contains(&label(h))) {
                    Some(rank) => {
                        if rank == 0 {
                            r1 += 1;
                        }
                        if rank < 3 {
                            r3 += 1;
                        }
                        mrr += 1.0 / (rank as f64 + 1.0);
                        if rank >= 3 {
                            misses.push(q.id.clone());
                        }
                    }
                    None => misses.push(q.id.clone()),
                }
            }
            let name = weight.map_or_else(
                || {
                    format!(
                        "**default** ({} / CJK {})",
                        fuke::kb::DEFAULT_KEYWORD_WEIGHT,
                        fuke::kb::DEFAULT_KEYWORD_WEIGHT_CJK
                    )
                },
                |w| format!("{w:.2}"),
            );
            println!(
                "| {name} | {lang} | {n} | {:.3} | {:.3} | {:.3} |",
                r1 as f64 / n as f64,
                r3 as f64 / n as f64,
                mrr / n as f64
            );
            if weight.is_none() && lang == "all" {
                println!(
                    "\nNot in the top 3 with the defaults: {}\n",
                    misses.join(", ")
                );
            }
        }
    }

    // min_score at the default weight: answerable questions whose answer is still injected
    // (in the top 3 and above the floor), and out-of-scope questions given no context at all.
    let mut top_scores = Vec::new();
    for q in &questions {
        let hits = kb.search(&collections, &q.q, 3, -1.0).await.unwrap();
        let best = hits.first().map_or(0.0, |h| h.score);
        let answer_score = hits
            .iter()
            .find(|h| q.answers.contains(&label(h)))
            .map(|h| h.score);
        top_scores.push((q.answers.is_empty(), best, answer_score));
    }
    let answerable = top_scores.iter().filter(|t| !t.0).count();
    let out_of_scope = top_scores.len() - answerable;
    println!(
        "| min_score | answer injected (of {answerable}) | out-of-scope with no context (of {out_of_scope}) |"
    );
    println!("|---|---|---|");
    for floor in (0..20).map(|i| i as f32 * 0.05) {
        let kept = top_scores
            .iter()
            .filter(|t| !t.0 && t.2.is_some_and(|s| s >= floor))
            .count();
        let rejected = top_scores.iter().filter(|t| t.0 && t.1 < floor).count();
        println!(
            "| {floor:.2} | {:.3} | {:.3} |",
            kept as f64 / answerable as f64,
            rejected as f64 / out_of_scope.max(1) as f64
        );
    }

    // Throughput: one search = embed the question + scan + BM25 + fuse.
    let texts: Vec<&str> = questions.iter().map(|q| q.q.as_str()).collect();
    for concurrency in [1usize, 2, 4] {
        let t = Instant::now();
        let mut lat = Vec::new();
        let per_task = queries / concurrency;
        let mut tasks = Vec::new();
        for w in 0..concurrency {
            let kb = kb.clone();
            let cols = collections.clone();
            let texts: Vec<String> = texts.iter().map(|s| s.to_string()).collect();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                for i in 0..per_task {
                    let q = &texts[(w * 7919 + i) % texts.len()];
                    let s = Instant::now();
                    kb.search(&cols, q, 3, 0.3).await.unwrap();
                    lat.push(s.elapsed().as_secs_f64() * 1e3);
                }
                lat
            }));
        }
        for t in tasks {
            lat.extend(t.await.unwrap());
        }
        let secs = t.elapsed().as_secs_f64();
        lat.sort_by(f64::total_cmp);
        println!(
            "concurrency {concurrency}: {:.0} searches/s, p50 {:.2} ms, p99 {:.2} ms ({} searches)",
            lat.len() as f64 / secs,
            lat[lat.len() / 2],
            lat[lat.len() * 99 / 100],
            lat.len()
        );
    }
}
