//! What redaction looks for: built-in detectors (a regex finds candidates, a check confirms them:
//! digit boundaries, the Luhn sum of card numbers, the checksum of Chinese resident ID numbers,
//! the mod-97 check of IBANs) and custom regexes from policy.

use regex::Regex;

/// A built-in detector by its policy name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    Email,
    /// Mainland China mobile numbers: `138 1234 5678`, `+86 13812345678`, `138-1234-5678`.
    CnMobile,
    /// Phone numbers with a country code (`+44 20 7946 0958`) or in the North American form
    /// (`(415) 555-2671`, `415-555-2671`).
    Phone,
    /// Payment card numbers: 13 to 19 digits, spaces or dashes between, valid Luhn sum.
    Card,
    /// The 18-character Chinese resident ID number, with a valid date and check character.
    CnId,
    /// International bank account numbers with a valid mod-97 check.
    Iban,
}

impl Builtin {
    pub const ALL: &'static [(&'static str, Builtin)] = &[
        ("email", Builtin::Email),
        ("cn_mobile", Builtin::CnMobile),
        ("phone", Builtin::Phone),
        ("card", Builtin::Card),
        ("cn_id", Builtin::CnId),
        ("iban", Builtin::Iban),
    ];

    pub fn parse(name: &str) -> Option<Builtin> {
        Self::ALL.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
    }

    pub fn name(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, b)| *b == self)
            .map_or("?", |(n, _)| n)
    }

    /// The token that replaces a match unless the rule names its own.
    pub fn token(self) -> &'static str {
        match self {
            Builtin::Email => "[EMAIL]",
            Builtin::CnMobile | Builtin::Phone => "[PHONE]",
            Builtin::Card => "[CARD]",
            Builtin::CnId => "[ID]",
            Builtin::Iban => "[IBAN]",
        }
    }

    /// Which runs first when a rule set lists several: the more specific digit patterns first,
    /// so that an ID number is not taken for a card or a phone number.
    pub fn order(self) -> u8 {
        match self {
            Builtin::CnId => 0,
            Builtin::Card => 1,
            Builtin::Iban => 2,
            Builtin::Email => 3,
            Builtin::CnMobile => 4,
            Builtin::Phone => 5,
        }
    }

    fn pattern(self) -> &'static str {
        match self {
            Builtin::Email => {
                r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,24}"
            }
            Builtin::CnMobile => r"(?:\+?86[ \-]?)?1[3-9][0-9][ \-]?[0-9]{4}[ \-]?[0-9]{4}",
            Builtin::Phone => {
                r"\+[0-9]{1,3}(?:[ .\-]?\(?[0-9]{1,5}\)?){2,5}|\(?[0-9]{3}\)?[ .\-]?[0-9]{3}[ .\-][0-9]{4}"
            }
            Builtin::Card => r"[0-9](?:[ \-]?[0-9]){12,18}",
            Builtin::CnId => {
                r"[1-9][0-9]{5}(?:18|19|20)[0-9]{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12][0-9]|3[01])[0-9]{3}[0-9Xx]"
            }
            Builtin::Iban => r"[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}",
        }
    }
}

/// A compiled detector: a regex and, for built-ins, the check that confirms a candidate.
#[derive(Debug, Clone)]
pub struct Detector {
    regex: Regex,
    builtin: Option<Builtin>,
}

/// Largest compiled program a policy regex may have: big enough for any sensible rule, small
/// enough that a rule set cannot eat memory or make matching slow.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Compiles a policy regex, or says why it is refused. The `regex` crate matches in linear time
/// (no backtracking), so the remaining dangers are size, and a pattern that matches the empty
/// string (it would redact or block everything).
pub fn compile(pattern: &str, case_insensitive: bool) -> Result<Regex, String> {
    let regex = regex::RegexBuilder::new(pattern)
        .case_insensitive(case_insensitive)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .nest_limit(64)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(_) => format!(
                "the pattern compiles to more than {REGEX_SIZE_LIMIT} bytes; simplify it (e.g. smaller repetition counts)"
            ),
            other => {
                let text = other.to_string();
                let last = text.lines().last().unwrap_or_default().trim();
                format!("not a valid regex (Rust `regex` syntax, no look-around or backreferences): {last}")
            }
        })?;
    if regex.is_match("") {
        return Err("the pattern matches the empty string, so it would match every text".into());
    }
    Ok(regex)
}

impl Detector {
    pub fn builtin(b: Builtin) -> Detector {
        Detector {
            // The built-in patterns are constants; a failure is a bug caught by the unit tests.
            regex: Regex::new(b.pattern()).unwrap_or_else(|_| Regex::new("$^").expect("literal")),
            builtin: Some(b),
        }
    }

    pub fn custom(regex: Regex) -> Detector {
        Detector {
            regex,
            builtin: None,
        }
    }

    /// Confirmed matches in `text`, as byte ranges in order, not overlapping.
    pub fn find(&self, text: &str) -> Vec<(usize, usize)> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut refused: Vec<(usize, usize)> = Vec::new();
        let mut at = 0;
        while at <= text.len() {
            let Some(m) = self.regex.find_at(text, at) else {
                break;
            };
            if m.start() == m.end() {
                // Custom patterns that match empty are refused at load; never loop on one.
                at = next_char(text, m.end());
                continue;
            }
            // A match ending right here is replaced: it is a boundary, not a longer number.
            let joined = out.last().is_some_and(|&(_, e)| e == m.start());
            match self.confirm(text, m.start(), m.end(), joined, None) {
                Some(end) => {
                    out.push((m.start(), end));
                    at = end;
                }
                None => {
                    refused.push((m.start(), m.end()));
                    at = next_char(text, m.start());
                }
            }
        }
        // The same for a match right after a candidate: right to left, so that a chain of
        // numbers separated only by each other resolves in one pass. Redaction is thereby
        // idempotent (found by fuzzing: a second pass used to find numbers the first freed).
        if self.builtin.is_some() && !out.is_empty() {
            for &(s, e) in refused.iter().rev() {
                let i = out.partition_point(|&(ms, _)| ms < s);
                let Some(&(next, _)) = out.get(i) else {
                    continue;
                };
                let prev_end = i.checked_sub(1).map(|p| out[p].1);
                if prev_end.is_some_and(|pe| pe > s) {
                    continue;
                }
                let joined = prev_end == Some(s);
                if let Some(end) = self.confirm(text, s, e, joined, Some(next)) {
                    out.insert(i, (s, end));
                }
            }
        }
        out
    }

    /// The end of the confirmed match starting at `start` (perhaps shorter than the regex's).
    /// `joined`: a match ends at `start`; `follow`: a match starts there, so the candidate must
    /// end there at the latest, and may end there without a boundary.
    fn confirm(
        &self,
        text: &str,
        start: usize,
        end: usize,
        joined: bool,
        follow: Option<usize>,
    ) -> Option<usize> {
        let Some(b) = self.builtin else {
            return Some(end);
        };
        let bytes = text.as_bytes();
        let end = follow.map_or(end, |f| end.min(f));
        if end <= start {
            return None;
        }
        let before = start.checked_sub(1).map(|i| bytes[i]);
        let digit_ok = joined || digit_free(before);
        let alnum_ok = joined || alnum_free(before);
        let after_digit = |e: usize| follow == Some(e) || digit_free(bytes.get(e).copied());
        let after_alnum = |e: usize| follow == Some(e) || alnum_free(bytes.get(e).copied());
        match b {
            Builtin::Email => Some(end),
            Builtin::CnMobile | Builtin::Phone => {
                if !digit_ok {
                    return None;
                }
                // The longest prefix ending in a digit with 7 to 15 digits and a boundary.
                (start + 1..=end).rev().find(|&e| {
                    let digits = bytes[start..e]
                        .iter()
                        .filter(|c| c.is_ascii_digit())
                        .count();
                    bytes[e - 1].is_ascii_digit() && after_digit(e) && (7..=15).contains(&digits)
                })
            }
            Builtin::CnId => {
                // Not inside a longer run of digits (an `X` after a digit ends another ID: two
                // IDs glued together are one 36-character run, not two IDs; found by fuzzing).
                let x_tail = !joined
                    && start >= 2
                    && matches!(bytes[start - 1], b'X' | b'x')
                    && bytes[start - 2].is_ascii_digit();
                (digit_ok
                    && !x_tail
                    && end - start == 18
                    && after_digit(end)
                    && cn_id_valid(&bytes[start..end]))
                .then_some(end)
            }
            Builtin::Card => {
                if !digit_ok {
                    return None;
                }
                // The longest prefix ending in a digit that is a valid number with a boundary.
                (start + 1..=end).rev().find(|&e| {
                    bytes[e - 1].is_ascii_digit() && after_digit(e) && luhn_valid(&bytes[start..e])
                })
            }
            Builtin::Iban => {
                if !alnum_ok {
                    return None;
                }
                (start + 1..=end).rev().find(|&e| {
                    bytes[e - 1] != b' ' && after_alnum(e) && iban_valid(&bytes[start..e])
                })
            }
        }
    }
}

fn next_char(text: &str, at: usize) -> usize {
    text[at..]
        .chars()
        .next()
        .map_or(text.len() + 1, |c| at + c.len_utf8())
}

fn digit_free(b: Option<u8>) -> bool {
    !b.is_some_and(|b| b.is_ascii_digit())
}

fn alnum_free(b: Option<u8>) -> bool {
    !b.is_some_and(|b| b.is_ascii_alphanumeric())
}

/// The Luhn sum of the digits in `s` (separators skipped), with 13 to 19 digits.
pub fn luhn_valid(s: &[u8]) -> bool {
    let (mut n, mut sum) = (0u32, 0u32);
    for c in s.iter().rev().filter(|c| c.is_ascii_digit()) {
        let d = u32::from(c - b'0');
        sum += if n % 2 == 1 {
            if d * 2 > 9 { d * 2 - 9 } else { d * 2 }
        } else {
            d
        };
        n += 1;
    }
    (13..=19).contains(&n) && sum.is_multiple_of(10)
}

/// GB 11643-1999: weights 2^(17-i) mod 11, check character from the sum mod 11.
pub fn cn_id_valid(s: &[u8]) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    if s.len() != 18 || !s[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = s[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(c, w)| u32::from(c - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == s[17].to_ascii_uppercase()
}

/// ISO 13616: 15 to 34 characters, country letters, check digits, mod 97 == 1.
pub fn iban_valid(s: &[u8]) -> bool {
    let compact: Vec<u8> = s.iter().copied().filter(|c| *c != b' ').collect();
    if !(15..=34).contains(&compact.len())
        || !compact[..2].iter().all(u8::is_ascii_uppercase)
        || !compact[2..4].iter().all(u8::is_ascii_digit)
        || !compact
            .iter()
            .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase())
    {
        return false;
    }
    let mut rem: u32 = 0;
    for &c in compact[4..].iter().chain(&compact[..4]) {
        let v = if c.is_ascii_digit() {
            u32::from(c - b'0')
        } else {
            u32::from(c - b'A') + 10
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(b: Builtin, text: &str) -> Vec<String> {
        Detector::builtin(b)
            .find(text)
            .into_iter()
            .map(|(s, e)| text[s..e].to_string())
            .collect()
    }

    #[test]
    fn builtin_patterns_compile() {
        for (_, b) in Builtin::ALL {
            assert!(Regex::new(b.pattern()).is_ok(), "{b:?}");
        }
    }

    #[test]
    fn cards_need_a_valid_luhn_sum() {
        assert_eq!(
            found(Builtin::Card, "card 4111 1111 1111 1111 exp"),
            ["4111 1111 1111 1111"]
        );
        assert_eq!(
            found(Builtin::Card, "4111-1111-1111-1111"),
            ["4111-1111-1111-1111"]
        );
        // One digit changed: not a card number.
        assert!(found(Builtin::Card, "4111 1111 1111 1112").is_empty());
        // Trailing CVV digits are not part of the number.
        assert_eq!(
            found(Builtin::Card, "5500 0000 0000 0004 123"),
            ["5500 0000 0000 0004"]
        );
        assert!(found(Builtin::Card, "order 12345 shipped").is_empty());
    }

    #[test]
    fn chinese_ids_need_their_check_character() {
        // 11010519491231002X: the example from GB 11643.
        assert_eq!(
            found(Builtin::CnId, "身份证号11010519491231002X谢谢"),
            ["11010519491231002X"]
        );
        assert!(found(Builtin::CnId, "110105194912310021").is_empty());
        assert_eq!(
            found(Builtin::CnId, "ID11010519491231002X"),
            ["11010519491231002X"]
        );
        assert!(found(Builtin::CnId, "11010519491231002X11010519491231002X").is_empty());
        // Numbers separated only by each other are each found, in one pass.
        assert_eq!(
            found(Builtin::Phone, "+87 138111+87 138(4111 11 +2"),
            ["+87 138111", "+87 138(4111 11"]
        );
        assert!(cn_id_valid(b"440308199901011234"));
        assert!(!cn_id_valid(b"440308199901011235"));
    }

    #[test]
    fn ibans_need_mod_97() {
        assert_eq!(
            found(Builtin::Iban, "IBAN DE89 3704 0044 0532 0130 00 THANKS"),
            ["DE89 3704 0044 0532 0130 00"]
        );
        assert_eq!(
            found(Builtin::Iban, "GB82WEST12345698765432"),
            ["GB82WEST12345698765432"]
        );
        assert!(found(Builtin::Iban, "GB82WEST12345698765433").is_empty());
    }

    #[test]
    fn phones_and_mobiles() {
        assert_eq!(
            found(Builtin::CnMobile, "电话13812345678，谢谢"),
            ["13812345678"]
        );
        assert_eq!(
            found(Builtin::CnMobile, "call +86 138-1234-5678"),
            ["+86 138-1234-5678"]
        );
        // Twelve digits: not a mobile number.
        assert!(found(Builtin::CnMobile, "138123456789").is_empty());
        assert_eq!(
            found(Builtin::Phone, "ring (415) 555-2671 now"),
            ["(415) 555-2671"]
        );
        assert_eq!(
            found(Builtin::Phone, "or +44 20 7946 0958."),
            ["+44 20 7946 0958"]
        );
        assert!(found(Builtin::Phone, "on 2026-11-27 at 10:30").is_empty());
        // More digits after the number: the longest valid prefix.
        assert_eq!(
            found(Builtin::Phone, "+44 20 7946 0958 12345 x"),
            ["+44 20 7946 0958"]
        );
    }

    #[test]
    fn emails() {
        assert_eq!(
            found(Builtin::Email, "mail jane.doe+x@mail.example.co.uk, ok"),
            ["jane.doe+x@mail.example.co.uk"]
        );
        assert!(found(Builtin::Email, "a@b is not one").is_empty());
    }

    #[test]
    fn pathological_patterns_are_refused() {
        assert!(compile("a*", false).unwrap_err().contains("empty string"));
        assert!(compile("(a)\\1", false).is_err());
        assert!(compile("(?=a)", false).is_err());
        assert!(
            compile("(?:\\w{1000}){1000}", false)
                .unwrap_err()
                .contains("more than")
        );
        assert!(compile("ACME-[0-9]{6}", false).is_ok());
    }
}
