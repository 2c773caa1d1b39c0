//! Documents to chunks. Markdown, HTML and plain text are first read into blocks (paragraphs and
//! list items, each under its heading trail); the blocks of one section are then packed into
//! chunks up to a token budget, with the last blocks (or sentences) of a chunk repeated at the
//! start of the next as overlap. A chunk never spans two sections, so it has one heading trail.

use sha2::{Digest, Sha256};

/// Which reader a file gets, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Html,
    Text,
}

impl Format {
    pub fn of(path: &std::path::Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "md" | "markdown" => Some(Format::Markdown),
            "html" | "htm" => Some(Format::Html),
            "txt" | "text" => Some(Format::Text),
            _ => None,
        }
    }
}

/// Budget and overlap, in the embedder's tokens.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_tokens: usize,
    pub overlap_tokens: usize,
}

impl Default for Budget {
    fn default() -> Self {
        // MiniLM was trained on 256-token inputs; the heading trail takes a few of them.
        Budget {
            max_tokens: 200,
            overlap_tokens: 40,
        }
    }
}

/// One piece of a document, as indexed and as injected.
#[derive(Debug, Clone, PartialEq)]
pub struct Chunk {
    /// Path below the collection's directory, `/`-separated.
    pub source: String,
    /// Ordinal within its file.
    pub ordinal: u32,
    /// Headings above the text, outermost first.
    pub headings: Vec<String>,
    pub text: String,
    /// SHA-256 of what is embedded ([`Chunk::embed_text`]): equal hash, equal vector.
    pub hash: [u8; 32],
}

impl Chunk {
    /// What the embedder and the keyword index see: the heading trail, then the text.
    pub fn embed_text(&self) -> String {
        embed_text(&self.headings, &self.text)
    }

    /// `source#ordinal`, as in `x-fuke-kb-sources`.
    pub fn id(&self) -> String {
        format!("{}#{}", self.source, self.ordinal)
    }
}

fn embed_text(headings: &[String], text: &str) -> String {
    if headings.is_empty() {
        text.to_string()
    } else {
        format!("{}\n{}", headings.join(" > "), text)
    }
}

#[derive(Debug, Clone, PartialEq)]
struct Block {
    headings: Vec<String>,
    text: String,
}

/// Chunks of one file. `count` gives a text's length in tokens.
pub fn chunk_file(
    source: &str,
    format: Format,
    content: &str,
    budget: Budget,
    count: &dyn Fn(&str) -> usize,
) -> Vec<Chunk> {
    let blocks = match format {
        Format::Markdown => markdown_blocks(content),
        Format::Html => html_blocks(content),
        Format::Text => text_blocks(content),
    };
    let mut chunks = Vec::new();
    let mut i = 0;
    while i < blocks.len() {
        let headings = blocks[i].headings.clone();
        let mut section = Vec::new();
        while i < blocks.len() && blocks[i].headings == headings {
            section.push(blocks[i].text.as_str());
            i += 1;
        }
        let heading_cost = if headings.is_empty() {
            0
        } else {
            count(&headings.join(" > ")) + 1
        };
        let budget = Budget {
            max_tokens: budget.max_tokens.saturating_sub(heading_cost).max(16),
            overlap_tokens: budget.overlap_tokens,
        };
        for text in pack(&section, budget, count) {
            let hash: [u8; 32] = Sha256::digest(embed_text(&headings, &text).as_bytes()).into();
            chunks.push(Chunk {
                source: source.to_string(),
                ordinal: chunks.len() as u32,
                headings: headings.clone(),
                text,
                hash,
            });
        }
    }
    chunks
}

/// Packs a section's blocks into texts of at most `budget.max_tokens`, splitting blocks that are
/// too long at sentence ends (and, failing that, at characters).
fn pack(blocks: &[&str], budget: Budget, count: &dyn Fn(&str) -> usize) -> Vec<String> {
    let mut pieces: Vec<(String, usize)> = Vec::new();
    for b in blocks {
        let n = count(b);
        if n <= budget.max_tokens {
            pieces.push((b.to_string(), n));
        } else {
            for s in split_long(b, budget.max_tokens, count) {
                let n = count(&s);
                pieces.push((s, n));
            }
        }
    }
    let mut out = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut used = 0;
    let mut fresh = 0; // pieces in `current` not carried over from the previous chunk
    for (idx, (_, n)) in pieces.iter().enumerate() {
        if !current.is_empty() && used + n + 1 > budget.max_tokens {
            out.push(join(&pieces, &current));
            // Overlap: the last pieces of the chunk just emitted, as many as fit.
            let mut carried = Vec::new();
            let mut carried_tokens = 0;
            for &p in current.iter().rev() {
                let c = pieces[p].1;
                if carried_tokens + c > budget.overlap_tokens || carried.len() + 1 >= current.len()
                {
                    break;
                }
                carried_tokens += c + 1;
                carried.push(p);
            }
            carried.reverse();
            if carried_tokens + n > budget.max_tokens {
                carried.clear();
                carried_tokens = 0;
            }
            current = carried;
            used = carried_tokens;
            fresh = 0;
        }
        current.push(idx);
        used += n + 1;
        fresh += 1;
    }
    if !current.is_empty() && fresh > 0 {
        out.push(join(&pieces, &current));
    }
    out
}

fn join(pieces: &[(String, usize)], idx: &[usize]) -> String {
    let mut s = String::new();
    for &i in idx {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&pieces[i].0);
    }
    s
}

fn is_sentence_end(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '。' | '！' | '？' | '；' | ';' | '\n')
}

/// Sentences of `text` grouped up to `max` tokens; a sentence longer than that is cut by chars.
fn split_long(text: &str, max: usize, count: &dyn Fn(&str) -> usize) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut start = 0;
    for (i, c) in text.char_indices() {
        if is_sentence_end(c) {
            let end = i + c.len_utf8();
            let s = text[start..end].trim();
            if !s.is_empty() {
                sentences.push(s.to_string());
            }
            start = end;
        }
    }
    let tail = text[start..].trim();
    if !tail.is_empty() {
        sentences.push(tail.to_string());
    }
    let mut out: Vec<String> = Vec::new();
    let mut cur = String::new();
    for s in sentences {
        let pieces = if count(&s) > max {
            cut_chars(&s, max, count)
        } else {
            vec![s]
        };
        for p in pieces {
            let joined = if cur.is_empty() {
                p.clone()
            } else if cur.ends_with(|c: char| c.is_ascii()) {
                format!("{cur} {p}")
            } else {
                format!("{cur}{p}")
            };
            if !cur.is_empty() && count(&joined) > max {
                out.push(std::mem::take(&mut cur));
                cur = p;
            } else {
                cur = joined;
            }
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Cuts at char boundaries (binary search on length) so each piece fits `max` tokens.
fn cut_chars(s: &str, max: usize, count: &dyn Fn(&str) -> usize) -> Vec<String> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut start = 0;
    while start < chars.len() {
        let (mut lo, mut hi) = (start + 1, chars.len());
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            let piece: String = chars[start..mid].iter().collect();
            if count(&piece) <= max {
                lo = mid;
            } else {
                hi = mid - 1;
            }
        }
        out.push(chars[start..lo].iter().collect());
        start = lo;
    }
    out
}

/// A token estimate for tests and for texts no embedder sees: one per CJK character, four per
/// three other words.
pub fn approx_tokens(text: &str) -> usize {
    let mut cjk = 0usize;
    let mut words = 0usize;
    let mut in_word = false;
    for c in text.chars() {
        if crate::cache::guard::is_cjk_char(c) {
            cjk += 1;
            in_word = false;
        } else if c.is_alphanumeric() {
            if !in_word {
                words += 1;
            }
            in_word = true;
        } else {
            in_word = false;
            if !c.is_whitespace() {
                words += 1; // punctuation is a token of its own
            }
        }
    }
    cjk + (words * 4).div_ceil(3)
}

// --- readers ---

struct Sections {
    trail: Vec<(usize, String)>,
    blocks: Vec<Block>,
}

impl Sections {
    fn new() -> Self {
        Sections {
            trail: Vec::new(),
            blocks: Vec::new(),
        }
    }

    fn heading(&mut self, level: usize, text: &str) {
        let text = collapse(text);
        if text.is_empty() {
            return;
        }
        self.trail.retain(|(l, _)| *l < level);
        self.trail.push((level, text));
    }

    fn block(&mut self, text: &str) {
        let text = text.trim();
        if text.is_empty() {
            return;
        }
        self.blocks.push(Block {
            headings: self.trail.iter().map(|(_, h)| h.clone()).collect(),
            text: text.to_string(),
        });
    }
}

fn collapse(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn markdown_heading(line: &str) -> Option<(usize, &str)> {
    let hashes = line.bytes().take_while(|b| *b == b'#').count();
    if (1..=6).contains(&hashes) {
        let rest = &line[hashes..];
        if rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\t') {
            return Some((hashes, rest.trim().trim_end_matches('#').trim()));
        }
    }
    None
}

fn list_item_start(line: &str) -> bool {
    let t = line.trim_start();
    if t.starts_with("- ") || t.starts_with("* ") || t.starts_with("+ ") {
        return true;
    }
    let digits = t.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && (t[digits..].starts_with(". ") || t[digits..].starts_with(") "))
}

fn markdown_blocks(content: &str) -> Vec<Block> {
    let mut s = Sections::new();
    let mut para = String::new();
    let mut fence: Option<&str> = None;
    let mut lines = content.lines().peekable();
    // Front matter is metadata, not content.
    if content.starts_with("---\n") {
        lines.next();
        for l in lines.by_ref() {
            if l.trim() == "---" {
                break;
            }
        }
    }
    while let Some(line) = lines.next() {
        if let Some(f) = fence {
            para.push('\n');
            para.push_str(line);
            if line.trim_start().starts_with(f) {
                fence = None;
                s.block(&std::mem::take(&mut para));
            }
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            s.block(&std::mem::take(&mut para));
            fence = Some(&trimmed[..3]);
            para.push_str(line);
            continue;
        }
        if let Some((level, text)) = markdown_heading(trimmed) {
            s.block(&std::mem::take(&mut para));
            s.heading(level, text);
            continue;
        }
        // Setext headings: a line underlined with === or ---.
        if !trimmed.is_empty()
            && para.is_empty()
            && let Some(next) = lines.peek()
        {
            let n = next.trim();
            if n.len() >= 3 && (n.bytes().all(|b| b == b'=') || n.bytes().all(|b| b == b'-')) {
                let level = if n.starts_with('=') { 1 } else { 2 };
                s.heading(level, trimmed);
                lines.next();
                continue;
            }
        }
        if trimmed.is_empty() {
            s.block(&std::mem::take(&mut para));
            continue;
        }
        if list_item_start(line) && !para.is_empty() {
            s.block(&std::mem::take(&mut para));
        }
        if !para.is_empty() {
            para.push('\n');
        }
        para.push_str(trimmed);
    }
    s.block(&para);
    s.blocks
}

/// Plain text: paragraphs separated by blank lines; a line `== Title ==` (more `=` for deeper
/// levels) is a heading, and so is a short first line standing alone (the document's title).
fn text_blocks(content: &str) -> Vec<Block> {
    let mut s = Sections::new();
    let mut para = String::new();
    let mut lines = content
        .lines()
        .skip_while(|l| l.trim().is_empty())
        .peekable();
    if let Some(first) = lines.peek().map(|l| l.trim().to_string()) {
        let mut ahead = content.lines().skip_while(|l| l.trim().is_empty()).skip(1);
        let alone = ahead.next().is_none_or(|l| l.trim().is_empty());
        if alone
            && !first.starts_with('=')
            && first.chars().count() <= 80
            && !first.ends_with(|c: char| is_sentence_end(c) || c == ',' || c == '，')
        {
            s.heading(1, &first);
            lines.next();
        }
    }
    for line in lines {
        let t = line.trim();
        let eq = t.bytes().take_while(|b| *b == b'=').count();
        if eq >= 1 && t.len() > 2 * eq && t.ends_with(&"=".repeat(eq)) {
            s.block(&std::mem::take(&mut para));
            s.heading(eq, t[eq..t.len() - eq].trim());
            continue;
        }
        if t.is_empty() {
            s.block(&std::mem::take(&mut para));
            continue;
        }
        if !para.is_empty() {
            para.push('\n');
        }
        para.push_str(t);
    }
    s.block(&para);
    s.blocks
}

/// HTML: headings `h1`–`h6`; block elements end a block; `script`, `style` and `head` are
/// skipped; character references decoded. Lenient: broken markup degrades to text.
fn html_blocks(content: &str) -> Vec<Block> {
    let mut s = Sections::new();
    let mut text = String::new();
    let mut heading: Option<usize> = None;
    let mut skip: Option<String> = None;
    let mut rest = content;
    while !rest.is_empty() {
        let Some(lt) = rest.find('<') else {
            if skip.is_none() {
                text.push_str(&decode_entities(rest));
            }
            break;
        };
        if skip.is_none() {
            text.push_str(&decode_entities(&rest[..lt]));
        }
        rest = &rest[lt..];
        if rest.starts_with("<!--") {
            rest = rest.find("-->").map_or("", |e| &rest[e + 3..]);
            continue;
        }
        let Some(gt) = rest.find('>') else {
            break;
        };
        let tag = &rest[1..gt];
        rest = &rest[gt + 1..];
        let closing = tag.starts_with('/');
        let name: String = tag
            .trim_start_matches('/')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .collect::<String>()
            .to_ascii_lowercase();
        if let Some(sk) = &skip {
            if closing && *sk == name {
                skip = None;
            }
            continue;
        }
        let is_heading = matches!(name.as_str(), "h1" | "h2" | "h3" | "h4" | "h5" | "h6");
        match name.as_str() {
            "script" | "style" | "head" | "template" | "noscript"
                if !closing && !tag.ends_with('/') =>
            {
                skip = Some(name);
            }
            _ if is_heading && closing => {
                if let Some(level) = heading.take() {
                    s.heading(level, &text);
                    text.clear();
                }
            }
            _ if is_heading => {
                s.block(&collapse(&text));
                text.clear();
                heading = Some((name.as_bytes()[1] - b'0') as usize);
            }
            "br" => text.push('\n'),
            "p" | "li" | "div" | "section" | "article" | "tr" | "table" | "ul" | "ol" | "dl"
            | "dt" | "dd" | "blockquote" | "pre" | "main" | "header" | "footer" | "body"
            | "html" | "title"
                if heading.is_none() =>
            {
                s.block(&collapse_keep_lines(&text));
                text.clear();
            }
            _ => {
                // Inline elements separate words only where the markup had space.
            }
        }
    }
    s.block(&collapse_keep_lines(&text));
    s.blocks
}

fn collapse_keep_lines(s: &str) -> String {
    s.lines()
        .map(collapse)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn decode_entities(s: &str) -> String {
    if !s.contains('&') {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(amp) = rest.find('&') {
        out.push_str(&rest[..amp]);
        rest = &rest[amp..];
        let Some(semi) = rest[..rest.len().min(12)].find(';') else {
            out.push('&');
            rest = &rest[1..];
            continue;
        };
        let name = &rest[1..semi];
        let decoded = match name {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" | "#39" => Some('\''),
            "nbsp" => Some(' '),
            "yen" => Some('¥'),
            "euro" => Some('€'),
            "mdash" => Some('—'),
            "ndash" => Some('–'),
            _ => name.strip_prefix('#').and_then(|n| {
                let code = match n.strip_prefix(['x', 'X']) {
                    Some(h) => u32::from_str_radix(h, 16).ok(),
                    None => n.parse().ok(),
                };
                code.and_then(char::from_u32)
            }),
        };
        match decoded {
            Some(c) => {
                out.push(c);
                rest = &rest[semi + 1..];
            }
            None => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(format: Format, content: &str, budget: Budget) -> Vec<Chunk> {
        chunk_file("f", format, content, budget, &approx_tokens)
    }

    #[test]
    fn markdown_sections_lists_and_headings() {
        let md = "# Refunds\n\nIntro line.\n\n## Timing\nCards take 5 days.\nPayPal takes 1 day.\n\n- item one\n- item two\n  continued\n\n## Damaged items\n\nSend a photo.\n";
        let c = chunks(Format::Markdown, md, Budget::default());
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].headings, vec!["Refunds"]);
        assert_eq!(c[0].text, "Intro line.");
        assert_eq!(c[1].headings, vec!["Refunds", "Timing"]);
        assert_eq!(
            c[1].text,
            "Cards take 5 days.\nPayPal takes 1 day.\n- item one\n- item two\ncontinued"
        );
        assert_eq!(c[2].headings, vec!["Refunds", "Damaged items"]);
        assert_eq!(c[2].embed_text(), "Refunds > Damaged items\nSend a photo.");
        assert_eq!(c[2].ordinal, 2);
    }

    #[test]
    fn html_headings_blocks_entities_and_skipped_elements() {
        let html = "<html><head><title>x</title><style>p{}</style></head><body><h1>Pay &amp; bill</h1><p>We take <b>cards</b> &gt; 10&#20803;.</p><script>alert(1)</script><h2>Failed payments</h2><ul><li>Check the card</li><li>Retry</li></ul></body></html>";
        let c = chunks(Format::Html, html, Budget::default());
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].headings, vec!["Pay & bill"]);
        assert_eq!(c[0].text, "We take cards > 10元.");
        assert_eq!(c[1].headings, vec!["Pay & bill", "Failed payments"]);
        assert_eq!(c[1].text, "Check the card\nRetry");
    }

    #[test]
    fn text_headings() {
        let t =
            "Warranty\n\n== Coverage ==\nTwo years.\n\n== Claims ==\nEmail us.\nWith a receipt.\n";
        let c = chunks(Format::Text, t, Budget::default());
        assert_eq!(c.len(), 2, "{c:?}");
        assert_eq!(c[0].headings, vec!["Warranty", "Coverage"]);
        assert_eq!(c[1].text, "Email us.\nWith a receipt.");
        // A first line that is a sentence is text, not a title.
        let c = chunks(Format::Text, "Hello there.\n\nMore.", Budget::default());
        assert_eq!(c[0].headings, Vec::<String>::new());
        assert_eq!(c[0].text, "Hello there.\nMore.");
    }

    #[test]
    fn long_sections_split_within_budget_with_overlap() {
        let para: Vec<String> = (0..30)
            .map(|i| format!("Sentence number {i} talks about refunds."))
            .collect();
        let md = format!("## S\n\n{}\n", para.join("\n\n"));
        let budget = Budget {
            max_tokens: 60,
            overlap_tokens: 12,
        };
        let c = chunks(Format::Markdown, &md, budget);
        assert!(c.len() > 3, "{}", c.len());
        for ch in &c {
            assert!(approx_tokens(&ch.embed_text()) <= 60 + 2, "{}", ch.text);
        }
        // Overlap: each chunk after the first starts with the previous chunk's last paragraph.
        for w in c.windows(2) {
            let last = w[0].text.lines().last().unwrap();
            assert!(
                w[1].text.starts_with(last),
                "{:?} / {:?}",
                w[0].text,
                w[1].text
            );
        }
        // Nothing lost: every paragraph is in some chunk.
        for p in &para {
            assert!(c.iter().any(|ch| ch.text.contains(p.as_str())), "{p}");
        }
    }

    #[test]
    fn a_huge_chinese_paragraph_is_cut_at_sentences() {
        let zh = "退款会在七个工作日内原路退回。".repeat(40);
        let c = chunks(
            Format::Text,
            &zh,
            Budget {
                max_tokens: 50,
                overlap_tokens: 0,
            },
        );
        assert!(c.len() >= 10);
        for ch in &c {
            assert!(approx_tokens(&ch.text) <= 50);
            assert!(ch.text.ends_with('。'));
        }
        assert_eq!(c.iter().map(|c| c.text.as_str()).collect::<String>(), zh);
    }

    #[test]
    fn equal_text_equal_hash() {
        let a = chunks(Format::Markdown, "# A\n\nx y z\n", Budget::default());
        let b = chunks(Format::Markdown, "# A\n\n\nx y z\n\n", Budget::default());
        assert_eq!(a[0].hash, b[0].hash);
        let c = chunks(Format::Markdown, "# B\n\nx y z\n", Budget::default());
        assert_ne!(
            a[0].hash, c[0].hash,
            "the heading is part of what is embedded"
        );
    }
}
