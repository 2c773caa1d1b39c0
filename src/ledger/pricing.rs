//! The pricing table (policy `pricing:`) and exact money arithmetic.
//!
//! Prices are written as decimal USD per million tokens with at most three decimal places
//! (`"0.15"`, `"2.5"`, `"0.075"`). A price `P` per 1M tokens is `P × 1000` nano-USD per token, so
//! with three decimals every cost is a whole number of nano-USD: costs are `i64` nano-USD,
//! computed and summed without floating point, and printed as decimal strings.

use std::collections::HashMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::openai::Usage;

/// Nano-USD per token for one served model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price {
    pub input: i64,
    /// Prompt tokens the provider served from its prompt cache (default: `input`).
    pub cached_input: i64,
    pub output: i64,
}

impl Price {
    /// The cost of one request's usage, in nano-USD (saturating: never wraps).
    pub fn cost(&self, usage: &Usage) -> i64 {
        let cached = usage.cached_tokens();
        let fresh = usage.prompt_tokens - cached;
        let part = |tokens: u64, price: i64| {
            i64::try_from(tokens)
                .unwrap_or(i64::MAX)
                .saturating_mul(price)
        };
        part(fresh, self.input)
            .saturating_add(part(cached, self.cached_input))
            .saturating_add(part(usage.completion_tokens, self.output))
    }
}

/// The prices of one policy version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pricing {
    /// `pricing.version`, or `sha256:` and 12 hex digits of the table when none is given, so a
    /// changed table always gets a new version.
    pub version: Arc<str>,
    models: HashMap<String, Price>,
    /// The `UPSTREAM` parts of `UPSTREAM/model` keys: only those backends need the second
    /// lookup (and the key built for it).
    backends: std::collections::HashSet<String>,
}

impl Pricing {
    pub fn new(version: Option<String>, models: Vec<(String, Price)>) -> Pricing {
        let version = version.unwrap_or_else(|| {
            let mut sorted: Vec<&(String, Price)> = models.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            let mut h = Sha256::new();
            for (name, p) in sorted {
                h.update(format!(
                    "{name}\0{}\0{}\0{}\n",
                    p.input, p.cached_input, p.output
                ));
            }
            format!("sha256:{}", &hex::encode(h.finalize())[..12])
        });
        let backends = models
            .iter()
            .filter_map(|(k, _)| k.split_once('/').map(|(b, _)| b.to_string()))
            .collect();
        Pricing {
            version: version.into(),
            models: models.into_iter().collect(),
            backends,
        }
    }

    /// The price of `model` as served by `backend`: an entry named `backend/model` wins over
    /// one named `model` (the same model may cost differently at two providers).
    pub fn price(&self, backend: &str, model: &str) -> Option<Price> {
        if self.backends.contains(backend) {
            let mut key = String::with_capacity(backend.len() + 1 + model.len());
            key.push_str(backend);
            key.push('/');
            key.push_str(model);
            if let Some(p) = self.models.get(&key) {
                return Some(*p);
            }
        }
        self.models.get(model).copied()
    }
}

/// Why a decimal was refused.
enum Decimal {
    Malformed,
    TooManyPlaces,
    TooLarge,
}

/// Parses `digits[.digits]` (at most `places` decimals, whole part at most 1e9) into an
/// integer count of 10^-places units: exact, no floats.
fn parse_fixed(text: &str, places: u32) -> Result<i64, Decimal> {
    let t = text.trim();
    let (whole, frac) = t.split_once('.').unwrap_or((t, ""));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || (t.contains('.') && !digits(frac)) {
        return Err(Decimal::Malformed);
    }
    if frac.len() > places as usize {
        return Err(Decimal::TooManyPlaces);
    }
    let whole: i64 = whole
        .parse()
        .ok()
        .filter(|w| *w <= 1_000_000_000)
        .ok_or(Decimal::TooLarge)?;
    let mut units = 0i64;
    for (i, b) in frac.bytes().enumerate() {
        units += i64::from(b - b'0') * 10i64.pow(places - 1 - i as u32);
    }
    Ok(whole * 10i64.pow(places) + units)
}

/// Parses a price per million tokens (`"0.15"`) into nano-USD per token.
pub fn parse_price(text: &str) -> Result<i64, String> {
    parse_fixed(text, 3).map_err(|e| match e {
        Decimal::Malformed => format!(
            "`{text}` is not a price: write USD per million tokens as a decimal, like \"0.15\""
        ),
        Decimal::TooManyPlaces => format!(
            "`{text}` has more than 3 decimal places (prices are exact to $0.001 per million tokens)"
        ),
        Decimal::TooLarge => format!("`{text}` is too large for a price per million tokens"),
    })
}

/// Parses an amount of USD (`"50"`, `"0.25"`, at most 9 decimals) into nano-USD.
pub fn parse_usd(text: &str) -> Result<i64, String> {
    parse_fixed(text, 9).map_err(|e| match e {
        Decimal::Malformed | Decimal::TooManyPlaces => format!(
            "`{text}` is not an amount: write USD as a decimal with at most 9 places, like \"25.50\""
        ),
        Decimal::TooLarge => format!("`{text}` is more than 1,000,000,000 USD"),
    })
}

/// Nano-USD as an exact decimal string with 9 places: `1234567` → `"0.001234567"`.
pub fn format_usd(nanos: i64) -> String {
    let sign = if nanos < 0 { "-" } else { "" };
    let n = nanos.unsigned_abs();
    format!("{sign}{}.{:09}", n / 1_000_000_000, n % 1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::PromptTokensDetails;

    #[test]
    fn prices_parse_exactly_and_refuse_what_they_cannot_hold() {
        assert_eq!(parse_price("0.15"), Ok(150));
        assert_eq!(parse_price("2.5"), Ok(2500));
        assert_eq!(parse_price("0.075"), Ok(75));
        assert_eq!(parse_price("10"), Ok(10_000));
        assert_eq!(parse_price("0"), Ok(0));
        assert_eq!(parse_usd("25.5"), Ok(25_500_000_000));
        assert_eq!(parse_usd("0.000000001"), Ok(1));
        assert!(parse_usd("0.0000000001").is_err());
        assert!(parse_usd("-3").is_err());
        for bad in [
            "",
            "-1",
            "0.0001",
            "1e3",
            "abc",
            "1.",
            ".5",
            "1.2.3",
            "99999999999",
        ] {
            assert!(parse_price(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn cost_splits_cached_prompt_tokens_and_is_exact() {
        let p = Price {
            input: parse_price("2.5").unwrap(),
            cached_input: parse_price("1.25").unwrap(),
            output: parse_price("10").unwrap(),
        };
        let usage = Usage {
            prompt_tokens: 1000,
            completion_tokens: 200,
            total_tokens: 1200,
            prompt_tokens_details: Some(PromptTokensDetails { cached_tokens: 400 }),
        };
        // 600 × 2.5/1M + 400 × 1.25/1M + 200 × 10/1M = 0.0015 + 0.0005 + 0.002 USD.
        assert_eq!(p.cost(&usage), 4_000_000);
        assert_eq!(format_usd(p.cost(&usage)), "0.004000000");
        assert_eq!(format_usd(1), "0.000000001");
        assert_eq!(format_usd(12_345_000_000), "12.345000000");
        // Saturates instead of wrapping.
        let huge = Usage {
            completion_tokens: u64::MAX,
            ..Usage::default()
        };
        assert_eq!(p.cost(&huge), i64::MAX);
    }

    #[test]
    fn backend_specific_price_wins_and_version_follows_the_table() {
        let a = Price {
            input: 1,
            cached_input: 1,
            output: 2,
        };
        let b = Price {
            input: 3,
            cached_input: 3,
            output: 4,
        };
        let t = Pricing::new(None, vec![("m".into(), a), ("azure/m".into(), b)]);
        assert_eq!(t.price("openai", "m"), Some(a));
        assert_eq!(t.price("azure", "m"), Some(b));
        assert_eq!(t.price("azure", "other"), None);
        let t2 = Pricing::new(None, vec![("m".into(), b)]);
        assert_ne!(t.version, t2.version);
        assert!(t.version.starts_with("sha256:"));
        let named = Pricing::new(Some("2026-11".into()), vec![("m".into(), a)]);
        assert_eq!(&*named.version, "2026-11");
    }
}
