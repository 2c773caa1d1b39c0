//! Semantic cache evaluation: how often a paraphrase hits and how often a near-miss (same words,
//! different intent) is wrongly answered, for a sweep of thresholds, with the real embedder
//! (all-MiniLM-L6-v2 through llama.cpp) and the cache's own guards and vector search.
//!
//!   cargo run --release --example cache_eval [-- --model models/all-MiniLM-L6-v2.gguf]
//!   [--query-prefix "query: "]   (for E5 models such as models/multilingual-e5-small.Q4_0.gguf)
//!
//! Data: `benches/cache_eval/pairs_{en,zh}.jsonl`, one pair per line: `a` (the cached question),
//! `b` (the new one), `kind` = paraphrase (must hit) or near_miss (must not).
//!
//! Two measures per threshold and language:
//! - *pairs*: b against its own a only (the definition);
//! - *index*: every `a` of the file is cached in one scope, and each `b` is looked up against
//!   all of them the way the cache does (top 4 above the threshold, first that passes the
//!   guards). A paraphrase counts as a hit only if it found its own `a`; finding another `a` is
//!   a wrong answer. A near-miss finding any `a` is a false hit.
//!
//! With `--time`: how long one question takes to embed (p50/p99 of 200), and nothing else.
//!
//! With `--external PATH`: the `fow-cache` pairs (benches/cache_eval.sh fetches them), pairs
//! measure per category.

use std::path::PathBuf;

use fuke::backends::local::{LocalKind, LocalModelConfig, LocalModels};
use fuke::cache::guard;
use fuke::cache::key::normalize;
use fuke::vectors::FlatIndex;
use serde::Deserialize;

#[derive(Deserialize)]
struct Pair {
    id: String,
    kind: String,
    a: String,
    b: String,
}

/// A row of the external set (`fow-cache` on PyPI, `fow_cache/data/pairs.jsonl`, CC BY 4.0).
#[derive(Deserialize)]
struct FowRow {
    category: String,
    a: String,
    b: String,
    same_answer: bool,
}

struct Set {
    lang: &'static str,
    pairs: Vec<Pair>,
    va: Vec<Vec<f32>>,
    vb: Vec<Vec<f32>>,
}

#[derive(Default, Clone, Copy)]
struct Counts {
    para: usize,
    para_hit: usize,
    para_wrong: usize,
    near: usize,
    near_hit: usize,
}

impl Counts {
    fn rate(n: usize, d: usize) -> f64 {
        if d == 0 {
            0.0
        } else {
            100.0 * n as f64 / d as f64
        }
    }
}

/// The cache's semantic lookup over `index` (ids are indexes into `questions`).
fn lookup(
    index: &FlatIndex,
    questions: &[String],
    v: &[f32],
    q: &str,
    t: f32,
    guards: bool,
) -> Option<usize> {
    index
        .search(v, 4, if guards { t.min(0.35) } else { t })
        .into_iter()
        .find(|&(i, s)| {
            let c = &questions[i as usize];
            !guards || s >= t && guard::agree(c, q) || guard::near_repeat(c, q)
        })
        .map(|(i, _)| i as usize)
}

fn evaluate(set: &Set, t: f32, guards: bool) -> (Counts, Counts) {
    let (mut pairs, mut idx) = (Counts::default(), Counts::default());
    let mut index = FlatIndex::new(set.va[0].len());
    let questions: Vec<String> = set.pairs.iter().map(|p| normalize(&p.a)).collect();
    for (i, v) in set.va.iter().enumerate() {
        index.insert(i as u64, v);
    }
    for (i, p) in set.pairs.iter().enumerate() {
        let nb = normalize(&p.b);
        let sim = fuke::vectors::dot(&set.va[i], &set.vb[i]);
        // The exact level first (equal after normalization), as in the cache.
        let pair_hit = questions[i] == nb
            || sim >= t && (!guards || guard::agree(&questions[i], &nb))
            || guards && sim >= 0.35 && guard::near_repeat(&questions[i], &nb);
        let found = questions
            .iter()
            .position(|q| *q == nb)
            .or_else(|| lookup(&index, &questions, &set.vb[i], &nb, t, guards));
        if p.kind == "paraphrase" {
            pairs.para += 1;
            idx.para += 1;
            pairs.para_hit += usize::from(pair_hit);
            match found {
                Some(j) if j == i => idx.para_hit += 1,
                Some(_) => idx.para_wrong += 1,
                None => {}
            }
        } else {
            pairs.near += 1;
            idx.near += 1;
            pairs.near_hit += usize::from(pair_hit);
            idx.near_hit += usize::from(found.is_some());
        }
    }
    (pairs, idx)
}

/// The external set, pairs measure only (its `a` questions repeat across rows), per category.
async fn external(embedder: &fuke::embed::Embedder, path: &PathBuf) {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rows: Vec<FowRow> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let mut sims = Vec::new();
    for chunk in rows.chunks(32) {
        let a: Vec<&str> = chunk.iter().map(|r| r.a.as_str()).collect();
        let b: Vec<&str> = chunk.iter().map(|r| r.b.as_str()).collect();
        let va = embedder.embed_queries(&a).await.expect("embeds");
        let vb = embedder.embed_queries(&b).await.expect("embeds");
        sims.extend(va.iter().zip(&vb).map(|(x, y)| fuke::vectors::dot(x, y)));
    }
    if std::env::var_os("CACHE_EVAL_MISSES").is_some() {
        let t = fuke::cache::DEFAULT_THRESHOLD;
        for (r, s) in rows.iter().zip(&sims) {
            let (a, b) = (normalize(&r.a), normalize(&r.b));
            let hit = a == b
                || *s >= t && guard::agree(&a, &b)
                || *s >= 0.35 && guard::near_repeat(&a, &b);
            if hit != r.same_answer {
                println!(
                    "{} {:.3} facts={} lexical={} | {} | {}",
                    r.category,
                    s,
                    guard::facts(&a) == guard::facts(&b),
                    !guard::lexically_distinct(&a, &b),
                    r.a,
                    r.b
                );
            }
        }
    }
    let mut categories: Vec<&str> = rows.iter().map(|r| r.category.as_str()).collect();
    categories.sort();
    categories.dedup();
    println!(
        "\nExternal set: {} ({} pairs), share of pairs served from the cache",
        path.display(),
        rows.len()
    );
    print!("| threshold | guards |");
    for c in &categories {
        let same = rows
            .iter()
            .find(|r| r.category == *c)
            .is_some_and(|r| r.same_answer);
        print!(" {c} ({}) |", if same { "should hit" } else { "must not" });
    }
    println!(" all should-hit | all must-not |");
    println!("|---|---|{}---|---|", "---|".repeat(categories.len()));
    for guards in [false, true] {
        for i in 0..=14 {
            let t = 0.70 + 0.02 * i as f32;
            print!("| {t:.2} | {} |", if guards { "on" } else { "off" });
            let hit = |r: &FowRow, s: f32| {
                let (a, b) = (normalize(&r.a), normalize(&r.b));
                a == b
                    || s >= t && (!guards || guard::agree(&a, &b))
                    || guards && s >= 0.35 && guard::near_repeat(&a, &b)
            };
            for c in &categories {
                let (n, h) = rows
                    .iter()
                    .zip(&sims)
                    .filter(|(r, _)| r.category == *c)
                    .fold((0, 0), |(n, h), (r, s)| {
                        (n + 1, h + usize::from(hit(r, *s)))
                    });
                print!(" {:.1}% |", Counts::rate(h, n));
            }
            for same in [true, false] {
                let (n, h) = rows
                    .iter()
                    .zip(&sims)
                    .filter(|(r, _)| r.same_answer == same)
                    .fold((0, 0), |(n, h), (r, s)| {
                        (n + 1, h + usize::from(hit(r, *s)))
                    });
                print!(" {:.1}% ({h}/{n}) |", Counts::rate(h, n));
            }
            println!();
        }
    }
}

fn load(path: &PathBuf) -> Vec<Pair> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("models/all-MiniLM-L6-v2.gguf"));
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    // E5 models want `--query-prefix "query: "` (the cache embeds questions only).
    let query_prefix = args
        .iter()
        .position(|a| a == "--query-prefix")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_default();
    let models = LocalModels::load(&[LocalModelConfig {
        threads,
        query_prefix,
        ..LocalModelConfig::defaults("embed", model.clone(), LocalKind::Embedding)
    }]);
    let embedder = models.embedder("embed").expect("embedding model loads");
    println!("model: {}", model.display());
    if args.iter().any(|a| a == "--time") {
        // One question at a time, as a semantic lookup embeds it.
        for q in [
            "how can I reset my password",
            "Question 1-2: can you explain item 2 on my invoice?",
        ] {
            let _ = embedder.embed_queries(&[q]).await;
            let mut times = Vec::with_capacity(200);
            for _ in 0..200 {
                let t = std::time::Instant::now();
                embedder.embed_queries(&[q]).await.expect("embeds");
                times.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            times.sort_by(f64::total_cmp);
            println!(
                "embed {} tokens: p50 {:.2} ms, p99 {:.2} ms ({threads} threads)",
                embedder.tokenize(q).len(),
                times[100],
                times[198]
            );
        }
        // The index: one scope of 10,000 cached questions (unit vectors, 384 dims).
        let dims = embedder.dims();
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        };
        let mut index = FlatIndex::new(dims);
        for id in 0..10_000u64 {
            let mut v: Vec<f32> = (0..dims).map(|_| next()).collect();
            fuke::vectors::normalize(&mut v);
            index.insert(id, &v);
        }
        let q = embedder
            .embed_queries(&["how can I reset my password"])
            .await
            .expect("embeds");
        let mut times = Vec::with_capacity(200);
        for _ in 0..200 {
            let t = std::time::Instant::now();
            std::hint::black_box(index.search(&q[0], 4, 0.35));
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        println!(
            "search 10,000 x {dims}: p50 {:.3} ms, p99 {:.3} ms",
            times[100], times[198]
        );
        return;
    }

    let mut sets = Vec::new();
    for lang in ["en", "zh"] {
        let pairs = load(&root.join(format!("benches/cache_eval/pairs_{lang}.jsonl")));
        let mut va = Vec::new();
        let mut vb = Vec::new();
        for chunk in pairs.chunks(32) {
            let a: Vec<&str> = chunk.iter().map(|p| p.a.as_str()).collect();
            let b: Vec<&str> = chunk.iter().map(|p| p.b.as_str()).collect();
            va.extend(embedder.embed_queries(&a).await.expect("embeds"));
            vb.extend(embedder.embed_queries(&b).await.expect("embeds"));
        }
        sets.push(Set {
            lang,
            pairs,
            va,
            vb,
        });
    }

    println!(
        "\n| lang | threshold | guards | paraphrase hit (pairs) | near-miss false hit (pairs) | paraphrase hit (index) | wrong answer (index) | near-miss false hit (index) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let thresholds: Vec<f32> = (0..=14).map(|i| 0.70 + 0.02 * i as f32).collect();
    for set in &sets {
        for guards in [false, true] {
            for &t in &thresholds {
                let (p, x) = evaluate(set, t, guards);
                println!(
                    "| {} | {:.2} | {} | {:.1}% ({}/{}) | {:.1}% ({}/{}) | {:.1}% | {:.1}% | {:.1}% |",
                    set.lang,
                    t,
                    if guards { "on" } else { "off" },
                    Counts::rate(p.para_hit, p.para),
                    p.para_hit,
                    p.para,
                    Counts::rate(p.near_hit, p.near),
                    p.near_hit,
                    p.near,
                    Counts::rate(x.para_hit, x.para),
                    Counts::rate(x.para_wrong, x.para),
                    Counts::rate(x.near_hit, x.near),
                );
            }
        }
    }

    if args.iter().any(|a| a == "--misses") {
        let t = fuke::cache::DEFAULT_THRESHOLD;
        for set in &sets {
            for (i, p) in set.pairs.iter().enumerate() {
                let sim = fuke::vectors::dot(&set.va[i], &set.vb[i]);
                let agree = guard::agree(&normalize(&p.a), &normalize(&p.b));
                let hit = sim >= t && agree;
                if (p.kind == "paraphrase") != hit {
                    println!(
                        "{} {} {:.3} guards={} | {} | {}",
                        p.id, p.kind, sim, agree, p.a, p.b
                    );
                }
            }
        }
    }

    if let Some(path) = args
        .iter()
        .position(|a| a == "--external")
        .and_then(|i| args.get(i + 1))
    {
        external(&embedder, &PathBuf::from(path)).await;
    }
}
