//! The keyword signal of hybrid retrieval: BM25 over terms that work without spaces. Latin text
//! gives lower-cased, lightly stemmed words (stop words dropped); Chinese, Japanese and Korean
//! runs give their characters and overlapping character bigrams, the usual dictionary-free
//! indexing for languages written without spaces.

use std::collections::HashMap;

use crate::cache::guard::is_cjk_char;

const STOPWORDS: &[&str] = &[
    "a", "an", "the", "i", "im", "ive", "me", "my", "mine", "we", "our", "us", "you", "your", "it",
    "its", "is", "are", "was", "were", "be", "been", "am", "do", "does", "did", "can", "could",
    "would", "should", "will", "shall", "may", "might", "have", "has", "had", "of", "at", "by",
    "as", "and", "or", "but", "if", "so", "that", "this", "these", "those", "there", "here",
    "what", "how", "why", "which", "who", "just", "any", "some", "get", "got", "then", "than",
    "also", "too", "very", "really", "to", "in", "on", "for", "with", "from", "into", "about",
    "please", "hi", "hello", "hey", "thanks", "thank", "wanna", "gonna", "s", "t", "don", "dont",
    "cant", "ll", "re", "ve", "d", "m",
];

/// Chinese function characters: a bigram made only of these says nothing about the topic.
const CJK_FUNCTION: &str =
    "的了吗呢吧啊呀么是我你您他她它们在有和与或就都也还要会能可以这那个怎什么哪请问";

/// A light English stemmer: plural and verb endings, so "refunds"/"refund" and
/// "shipped"/"shipping"/"ship" meet.
fn stem(w: &str) -> String {
    let mut s = w.to_string();
    if s.len() > 4 && s.ends_with("ies") {
        s.truncate(s.len() - 3);
        s.push('y');
        return s;
    }
    if s.len() > 4 && (s.ends_with("ing") || s.ends_with("ed")) {
        let cut = if s.ends_with("ing") { 3 } else { 2 };
        let base = &s[..s.len() - cut];
        if base.len() >= 3 && base.bytes().any(|b| b"aeiouy".contains(&b)) {
            let b = base.as_bytes();
            let n = b.len();
            // shipp -> ship, but keep "ll"/"ss" (billed -> bill, passed -> pass)
            if n >= 2 && b[n - 1] == b[n - 2] && !b"lsz".contains(&b[n - 1]) {
                return base[..n - 1].to_string();
            }
            return base.to_string();
        }
    }
    if s.len() > 4 && (s.ends_with("sses") || s.ends_with("xes") || s.ends_with("ches")) {
        s.truncate(s.len() - 2);
        return s;
    }
    if s.len() > 3 && s.ends_with('s') && !s.ends_with("ss") && !s.ends_with("us") {
        s.truncate(s.len() - 1);
    }
    s
}

/// The terms of `text`, in order (repeats kept: term frequency counts).
pub fn terms(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut run: Vec<char> = Vec::new();
    let flush_word = |word: &mut String, out: &mut Vec<String>| {
        if !word.is_empty() {
            let w = std::mem::take(word);
            if !STOPWORDS.contains(&w.as_str()) {
                out.push(stem(&w));
            }
        }
    };
    let flush_run = |run: &mut Vec<char>, out: &mut Vec<String>| {
        match run.len() {
            0 => {}
            1 => {
                if !CJK_FUNCTION.contains(run[0]) {
                    out.push(run[0].to_string());
                }
            }
            _ => {
                // Characters as well as bigrams: colloquial questions share single characters
                // with the documents more often than whole words (BENCHMARKS.md).
                for c in run.iter() {
                    if !CJK_FUNCTION.contains(*c) {
                        out.push(c.to_string());
                    }
                }
                for pair in run.windows(2) {
                    if CJK_FUNCTION.contains(pair[0]) && CJK_FUNCTION.contains(pair[1]) {
                        continue;
                    }
                    out.push(pair.iter().collect());
                }
            }
        }
        run.clear();
    };
    for c in text.chars() {
        // Full-width forms fold to ASCII (ＡＢＣ１２３ -> abc123).
        let c = crate::cache::guard::narrow_char(c);
        if is_cjk_char(c) {
            flush_word(&mut word, &mut out);
            run.push(c);
        } else if c.is_alphanumeric() {
            flush_run(&mut run, &mut out);
            word.extend(c.to_lowercase());
        } else {
            flush_word(&mut word, &mut out);
            flush_run(&mut run, &mut out);
        }
    }
    flush_word(&mut word, &mut out);
    flush_run(&mut run, &mut out);
    out
}

/// BM25 (k1 = 1.2, b = 0.75) over a fixed set of documents.
#[derive(Debug, Clone, Default)]
pub struct Bm25 {
    postings: HashMap<String, Vec<(u32, u32)>>,
    lengths: Vec<u32>,
    avg_len: f32,
}

const K1: f32 = 1.2;
const B: f32 = 0.75;

impl Bm25 {
    pub fn build<'a>(docs: impl IntoIterator<Item = &'a str>) -> Bm25 {
        let mut postings: HashMap<String, Vec<(u32, u32)>> = HashMap::new();
        let mut lengths = Vec::new();
        for (i, doc) in docs.into_iter().enumerate() {
            let ts = terms(doc);
            lengths.push(ts.len() as u32);
            let mut tf: HashMap<String, u32> = HashMap::new();
            for t in ts {
                *tf.entry(t).or_default() += 1;
            }
            for (t, n) in tf {
                postings.entry(t).or_default().push((i as u32, n));
            }
        }
        let avg_len = if lengths.is_empty() {
            0.0
        } else {
            lengths.iter().map(|&l| l as f32).sum::<f32>() / lengths.len() as f32
        };
        Bm25 {
            postings,
            lengths,
            avg_len,
        }
    }

    pub fn len(&self) -> usize {
        self.lengths.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lengths.is_empty()
    }

    /// Score of every document that shares a term with `query` (others score 0).
    pub fn scores(&self, query: &str) -> HashMap<u32, f32> {
        let mut q = terms(query);
        q.sort();
        q.dedup();
        let n = self.lengths.len() as f32;
        let mut out: HashMap<u32, f32> = HashMap::new();
        for t in &q {
            let Some(list) = self.postings.get(t) else {
                continue;
            };
            let df = list.len() as f32;
            let idf = ((n - df + 0.5) / (df + 0.5) + 1.0).ln();
            for &(doc, tf) in list {
                let tf = tf as f32;
                let len = self.lengths[doc as usize] as f32;
                let norm =
                    tf * (K1 + 1.0) / (tf + K1 * (1.0 - B + B * len / self.avg_len.max(1.0)));
                *out.entry(doc).or_default() += idf * norm;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn english_terms_are_stemmed_and_stopwords_dropped() {
        assert_eq!(
            terms("How do I get my Refunds for shipped boxes?"),
            vec!["refund", "ship", "box"]
        );
        assert_eq!(terms("shipping"), terms("shipped"));
        assert_eq!(terms("billed"), vec!["bill"]);
        assert_eq!(terms("ＡＢＣ１２３"), vec!["abc123"]);
    }

    #[test]
    fn chinese_runs_give_bigrams() {
        assert_eq!(
            terms("退款多久"),
            vec!["退", "款", "多", "久", "退款", "款多", "多久"]
        );
        // Function characters and pure function-word bigrams are dropped; mixed text splits at
        // script changes.
        assert_eq!(
            terms("我的订单ID是123"),
            vec!["订", "单", "的订", "订单", "id", "123"]
        );
    }

    #[test]
    fn bm25_ranks_the_matching_document_first() {
        let docs = [
            "Refund timing: cards take 5 business days",
            "Cancel an order before it ships",
            "退款会在7个工作日内原路退回",
            "订单发货后无法取消",
        ];
        let idx = Bm25::build(docs.iter().copied());
        let best = |q: &str| {
            let s = idx.scores(q);
            s.into_iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(d, _)| d)
        };
        assert_eq!(best("when will my refund arrive"), Some(0));
        assert_eq!(best("cancelling orders"), Some(1));
        assert_eq!(best("钱什么时候退款到账"), Some(2));
        assert_eq!(best("已经发货的订单能取消吗"), Some(3));
        assert_eq!(best("weather in paris"), None);
    }
}
