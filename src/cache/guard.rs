//! Facts two questions must share before one may be answered with the other's answer, however
//! similar their embeddings: the numbers in them, whether they are negated, and the days and
//! times they name. Sentence embeddings place "I was charged $50" next to "I was charged $500"
//! and "I received my order" next to "I did not receive my order"; these checks are what keep
//! such near-misses apart (BENCHMARKS.md, "Semantic cache", shows the sweep with and without).

/// What [`agree`] compares, extracted from a normalized question.
#[derive(Debug, PartialEq, Eq)]
pub struct Facts {
    numbers: Vec<String>,
    negated: bool,
    times: Vec<&'static str>,
}

/// Whether two normalized questions agree on numbers, negation and time words, and do not look
/// like one sentence with a word swapped or its parts reordered ([`lexically_distinct`]).
pub fn agree(a: &str, b: &str) -> bool {
    facts(a) == facts(b) && !lexically_distinct(a, b)
}

/// Whether a question is mostly Chinese, Japanese or Korean text (which the default, English
/// embedding model cannot tell apart: BENCHMARKS.md, "Semantic cache").
pub fn is_cjk(q: &str) -> bool {
    let (mut cjk, mut latin) = (0usize, 0usize);
    for c in q.chars() {
        if is_cjk_char(c) {
            cjk += 1;
        } else if c.is_ascii_alphabetic() {
            latin += 1;
        }
    }
    cjk >= 2 && cjk * 4 >= latin
}

/// A full-width ASCII form (U+FF01–FF5E, as Chinese and Japanese input methods type them) as
/// its ASCII twin, and the ideographic space as a space; any other character as it is. Shared by
/// the cache keys, the knowledge base's terms and the content rules.
pub fn narrow_char(c: char) -> char {
    match c {
        '\u{FF01}'..='\u{FF5E}' => char::from_u32(c as u32 - 0xFEE0).unwrap_or(c),
        '\u{3000}' => ' ',
        c => c,
    }
}

/// Kana, CJK ideographs (with extension A and compatibility ideographs) and Hangul syllables.
pub fn is_cjk_char(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

/// Function words: they carry no intent of their own.
const EN_STOPWORDS: &[&str] = &[
    "a", "an", "the", "i", "im", "ive", "id", "me", "my", "mine", "we", "our", "us", "you", "your",
    "it", "its", "is", "are", "was", "were", "be", "been", "am", "do", "does", "did", "can",
    "could", "would", "should", "will", "shall", "may", "might", "must", "have", "has", "had",
    "of", "at", "for", "by", "about", "as", "and", "or", "but", "if", "so", "that", "this",
    "these", "those", "there", "here", "what", "whats", "how", "why", "when", "where", "wheres",
    "which", "who", "just", "still", "any", "some", "get", "got", "then", "than", "also", "too",
    "very", "really", "need", "want", "like", "know", "tell", "let", "help",
];

/// Greetings and courtesy: words people add around the same question.
const EN_FILLERS: &[&str] = &[
    "please",
    "pls",
    "plz",
    "kindly",
    "hi",
    "hello",
    "hey",
    "hiya",
    "dear",
    "team",
    "thanks",
    "thank",
    "thx",
    "cheers",
    "sorry",
    "bother",
    "wondering",
    "quick",
    "question",
    "advance",
    "many",
    "ok",
    "okay",
    "guys",
    "folks",
    "sir",
    "madam",
];

fn is_negation(w: &str) -> bool {
    EN_NEGATIONS.contains(&w)
        || w.len() > 3
            && w.ends_with("nt")
            && [
                "do", "did", "does", "ca", "wo", "is", "are", "was", "were", "have", "has", "had",
                "could", "would", "should",
            ]
            .contains(&&w[..w.len() - 2])
}

/// The words of a question without greetings and courtesy, apostrophes dropped, plurals folded.
fn words(q: &str) -> Vec<String> {
    q.split(|c: char| !(c.is_ascii_alphanumeric() || c == '\'' || c == '’' || is_han(c)))
        .flat_map(|w| {
            // Chinese characters are words of their own.
            let mut parts = Vec::new();
            let mut latin = String::new();
            for c in w.chars() {
                if is_han(c) {
                    if !latin.is_empty() {
                        parts.push(std::mem::take(&mut latin));
                    }
                    parts.push(c.to_string());
                } else if c != '\'' && c != '’' {
                    latin.push(c);
                }
            }
            if !latin.is_empty() {
                parts.push(latin);
            }
            parts
        })
        .filter(|w| !EN_FILLERS.contains(&w.as_str()))
        .map(|mut w| {
            if w.len() > 3 && w.ends_with('s') && !w.ends_with("ss") && w.is_ascii() {
                w.pop();
            }
            w
        })
        .collect()
}

fn is_han(c: char) -> bool {
    matches!(c as u32, 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xF900..=0xFAFF)
}

/// The same question up to greetings, courtesy and one typo per long word: word for word,
/// in order, with the same numbers, negation and time words ("How do I chnage the email adress
/// on my acount?"). Sentence embeddings score such typos low; this is the exact level made
/// tolerant, applied to the nearest cached questions.
pub fn near_repeat(a: &str, b: &str) -> bool {
    let (wa, wb) = (words(a), words(b));
    wa.len() == wb.len()
        && !wa.is_empty()
        && wa.iter().zip(&wb).all(|(x, y)| same_word(x, y))
        && facts(a) == facts(b)
}

const ZH_FUNCTION_CHARS: &str = "的了吗嗎呢吧啊呀么麼我你您们們是在有和与與就都也还還要想请請问問怎样樣如何什个個这這那哪吗能可以会會到给給把被一下";

/// The intent-bearing words of a question, in order: English words less function words (with
/// a crude plural fold), and Chinese characters less function characters.
fn content_words(q: &str) -> Vec<String> {
    words(q)
        .into_iter()
        .filter(|w| {
            let zh_function = w.chars().count() == 1
                && w.chars()
                    .next()
                    .is_some_and(|c| ZH_FUNCTION_CHARS.contains(c));
            // Negation is compared by `facts`.
            !(EN_STOPWORDS.contains(&w.as_str()) || is_negation(w) || zh_function)
        })
        .collect()
}

/// Two questions that share most of their content words but differ in a few ("reset my
/// password" / "reset my router"), or have the same content words in another order ("from
/// standard to express" / "from express to standard"), usually ask different things; real
/// paraphrases reword more than that. Such pairs are never semantic hits: when the shared content
/// words are at least as many as the substituted ones. Light rewordings ("how long does it take"
/// / "how long until") are missed by this too; a miss costs a model call, a wrong hit a wrong answer.
pub fn lexically_distinct(a: &str, b: &str) -> bool {
    let (wa, wb) = (content_words(a), content_words(b));
    if wa == wb {
        return false;
    }
    // Each word's first match on the other side (typos tolerated).
    let in_b: Vec<Option<usize>> = wa
        .iter()
        .map(|x| wb.iter().position(|y| same_word(x, y)))
        .collect();
    let shared_a = in_b.iter().flatten().count();
    let shared_b = wb
        .iter()
        .filter(|y| wa.iter().any(|x| same_word(x, y)))
        .count();
    // Words one side has and the other lacks, counted as substitutions.
    let substituted = (wa.len() - shared_a).max(wb.len() - shared_b);
    if substituted == 0 {
        // The same words up to typos: distinct only if reordered.
        let order: Vec<usize> = in_b.into_iter().flatten().collect();
        return !order.is_sorted();
    }
    shared_a.min(shared_b) >= substituted
}

/// Equal, or one typo apart (an insertion, deletion, substitution or swap of neighbours) when
/// both words have at least five letters: "adress" is "address", "card" is not "cart".
fn same_word(a: &str, b: &str) -> bool {
    if a == b {
        return true;
    }
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().min(b.len()) < 5 || a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    let prefix = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let (ra, rb) = (&a[prefix..], &b[prefix..]);
    match ra.len().cmp(&rb.len()) {
        std::cmp::Ordering::Equal => {
            ra[1..] == rb[1..]
                || (ra.len() >= 2 && ra[0] == rb[1] && ra[1] == rb[0] && ra[2..] == rb[2..])
        }
        std::cmp::Ordering::Greater => ra[1..] == *rb,
        std::cmp::Ordering::Less => *ra == rb[1..],
    }
}

const EN_NEGATIONS: &[&str] = &[
    "not", "no", "never", "cannot", "nothing", "none", "nobody", "nor", "neither", "without",
    "unable", "dont", "didnt", "doesnt", "cant", "wont", "isnt", "arent", "wasnt", "werent",
    "havent", "hasnt", "hadnt", "couldnt", "wouldnt", "shouldnt", "aint",
];

/// Chinese negation characters, and words that contain one without negating.
const ZH_NEGATIONS: &[char] = &[
    '不', '没', '沒', '未', '别', '別', '无', '無', '非', '勿', '莫',
];
const ZH_NOT_NEGATING: &[&str] = &[
    "非常",
    "不错",
    "不錯",
    "无线",
    "無線",
    "别人",
    "別人",
    "别的",
    "別的",
    "未来",
    "未來",
    "没错",
    "沒錯",
    "差不多",
    "不久",
    "并非常",
    "无论",
    "無論",
    "不管",
];

const EN_TIMES: &[&str] = &[
    "today",
    "tonight",
    "tomorrow",
    "yesterday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "weekend",
    "morning",
    "afternoon",
    "evening",
    "january",
    "february",
    "march",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
];

const ZH_TIMES: &[&str] = &[
    "今天",
    "明天",
    "后天",
    "後天",
    "昨天",
    "前天",
    "今晚",
    "明晚",
    "昨晚",
    "上午",
    "下午",
    "晚上",
    "早上",
    "中午",
    "周末",
    "週末",
    "本周",
    "这周",
    "下周",
    "上周",
    "本月",
    "这个月",
    "下个月",
    "上个月",
    "月底",
    "月初",
    "今年",
    "明年",
    "去年",
    "周一",
    "周二",
    "周三",
    "周四",
    "周五",
    "周六",
    "周日",
    "周天",
    "星期一",
    "星期二",
    "星期三",
    "星期四",
    "星期五",
    "星期六",
    "星期日",
    "星期天",
];

const ZH_NUMERALS: &str = "零〇一二两兩三四五六七八九十百千万萬亿億";
/// Units after which a run of Chinese numerals is a quantity (一下, 一直 are not).
const ZH_UNITS: &str = "元块塊角分个個件天月号號日年点點周次张張台部箱瓶斤公克米位份倍小";

pub fn facts(q: &str) -> Facts {
    let mut numbers = Vec::new();
    let mut times = Vec::new();
    let mut negated = false;

    // Digit runs (thousands separators dropped, decimals kept).
    let chars: Vec<char> = q.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_ascii_digit() {
            let mut n = String::new();
            while i < chars.len() {
                let d = chars[i];
                let joins = (d == ',' || d == '.')
                    && chars.get(i + 1).is_some_and(char::is_ascii_digit)
                    && !n.is_empty();
                if d.is_ascii_digit() {
                    n.push(d);
                } else if joins {
                    if d == '.' {
                        n.push('.');
                    }
                } else {
                    break;
                }
                i += 1;
            }
            numbers.push(n);
            continue;
        }
        if ZH_NUMERALS.contains(c) {
            let start = i;
            while i < chars.len() && ZH_NUMERALS.contains(chars[i]) {
                i += 1;
            }
            if chars.get(i).is_some_and(|u| ZH_UNITS.contains(*u)) {
                numbers.push(chars[start..i].iter().collect());
            }
            continue;
        }
        i += 1;
    }
    numbers.sort();

    // English words (apostrophes dropped: "didn't" is "didnt"; "mondays" is "monday").
    for w in words(q) {
        if is_negation(&w) {
            negated = true;
        }
        if let Some(t) = EN_TIMES.iter().find(|t| **t == w) {
            times.push(*t);
        }
    }

    // Chinese: negation characters outside the non-negating words; time words.
    let mut masked = q.to_string();
    for w in ZH_NOT_NEGATING {
        masked = masked.replace(w, "");
    }
    if masked.chars().any(|c| ZH_NEGATIONS.contains(&c)) {
        negated = true;
    }
    for t in ZH_TIMES {
        if q.contains(t) {
            times.push(t);
        }
    }
    times.sort_unstable();
    times.dedup();
    Facts {
        numbers,
        negated,
        times,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paraphrases_agree() {
        assert!(agree("where is my parcel", "where's my package"));
        assert!(agree(
            "i was charged $1,200 twice",
            "why did you bill me 1200 two times"
        ));
        assert!(agree("我的快递到哪了", "包裹现在在哪里"));
        assert!(agree("this is very good", "非常好"));
    }

    #[test]
    fn detects_cjk_questions() {
        assert!(is_cjk("我的快递到哪了"));
        assert!(is_cjk("iPhone 15 的保修期多久"));
        assert!(!is_cjk("where is my parcel"));
        assert!(!is_cjk("what does 退款 mean in your emails to me"));
    }

    #[test]
    fn word_swaps_and_reorderings_are_distinct() {
        // Character overlap also rejects light Chinese rewordings: a miss, never a wrong answer.
        assert!(lexically_distinct("帮我看一下订单", "帮我查查订单"));
        assert!(lexically_distinct("我要退货", "我要换货"));
        assert!(lexically_distinct(
            "how do i reset my password",
            "how do i reset my router"
        ));
        assert!(lexically_distinct(
            "change shipping from standard to express",
            "change shipping from express to standard"
        ));
        assert!(!lexically_distinct(
            "how do i reset my password",
            "how can i reset my password"
        ));
        // Typos are the same word; short words are not forgiven.
        assert!(!lexically_distinct(
            "how do i chnage the email adress on my acount",
            "how do i change the email address on my account"
        ));
        assert!(lexically_distinct("add it to my cart", "add it to my card"));
        assert!(!lexically_distinct(
            "where is my parcel",
            "i'm trying to figure out where my package is right now"
        ));
    }

    #[test]
    fn near_repeats_are_typos_and_courtesy_only() {
        assert!(near_repeat(
            "how do i chnage the email adress on my acount",
            "hi, how do i change the email address on my account? thanks"
        ));
        assert!(!near_repeat("how do i sign up", "how do i sign in"));
        assert!(!near_repeat(
            "move money to my savings",
            "move money from my savings"
        ));
        assert!(!near_repeat("add it to my cart", "add it to my card"));
        assert!(!near_repeat(
            "i received my order",
            "i didnt receive my order"
        ));
        assert!(!near_repeat(
            "how do i reset my password",
            "how do i reset my passwords now"
        ));
    }

    #[test]
    fn near_misses_disagree() {
        assert!(!agree("refund of $50", "refund of $500"));
        assert!(!agree("i received my order", "i didn't receive my order"));
        assert!(!agree(
            "i received my order",
            "i have not received my order"
        ));
        assert!(!agree(
            "can i get delivery tomorrow",
            "can i get delivery today"
        ));
        assert!(!agree("退款50元", "退款500元"));
        assert!(!agree("我收到货了", "我没收到货"));
        assert!(!agree("明天能发货吗", "今天能发货吗"));
        assert!(!agree("买了三件", "买了五件"));
    }
}
