//! Usage reports from the ledger: totals per tenant, optionally per day, model or key, for a
//! time range; as JSON, CSV or an aligned table. `GET /v1/usage` and `fuke usage` share this.

use std::fmt::Write as _;

use serde::Serialize;
use sqlx::Row as _;

use super::Db;
use super::pricing::format_usd;

const DAY_MS: i64 = 86_400_000;

/// How rows are grouped within a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBy {
    Tenant,
    Day,
    Model,
    Key,
}

impl GroupBy {
    pub fn parse(s: &str) -> Option<GroupBy> {
        Some(match s {
            "tenant" => GroupBy::Tenant,
            "day" => GroupBy::Day,
            "model" => GroupBy::Model,
            "key" => GroupBy::Key,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            GroupBy::Tenant => "tenant",
            GroupBy::Day => "day",
            GroupBy::Model => "model",
            GroupBy::Key => "key",
        }
    }
}

/// What to report: `[from_ms, to_ms)`, one tenant or all.
#[derive(Debug, Clone)]
pub struct Query {
    pub from_ms: i64,
    pub to_ms: i64,
    pub tenant: Option<String>,
    pub group_by: GroupBy,
}

/// One line of a report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Line {
    pub tenant: String,
    /// The day (`2026-11-27`), model alias or key id; absent when grouped by tenant only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub requests: i64,
    pub prompt_tokens: i64,
    pub completion_tokens: i64,
    pub cached_tokens: i64,
    pub total_tokens: i64,
    pub cache_hits: i64,
    pub tokens_saved: i64,
    /// Exact decimal USD (9 places).
    pub cost_usd: String,
    pub cost_nanousd: i64,
    /// Requests whose served model had no price in the pricing table.
    pub unpriced_requests: i64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub object: &'static str,
    pub from: String,
    pub to: String,
    pub group_by: &'static str,
    pub data: Vec<Line>,
    pub total: Line,
}

/// Runs a report against the ledger.
pub async fn run(db: &Db, q: &Query) -> Result<Report, sqlx::Error> {
    let group = match q.group_by {
        GroupBy::Tenant => "''",
        GroupBy::Day => "CAST(ts_ms / 86400000 AS BIGINT)",
        GroupBy::Model => "model",
        GroupBy::Key => "key_id",
    };
    let mut sql = format!(
        "SELECT tenant, {group} AS grp, COUNT(*) AS requests,
            CAST(COALESCE(SUM(prompt_tokens), 0) AS BIGINT),
            CAST(COALESCE(SUM(completion_tokens), 0) AS BIGINT),
            CAST(COALESCE(SUM(cached_tokens), 0) AS BIGINT),
            CAST(COALESCE(SUM(CASE WHEN cache = 'hit' THEN 1 ELSE 0 END), 0) AS BIGINT),
            CAST(COALESCE(SUM(tokens_saved), 0) AS BIGINT),
            CAST(COALESCE(SUM(cost_nanousd), 0) AS BIGINT),
            CAST(COALESCE(SUM(CASE WHEN cost_nanousd IS NULL THEN 1 ELSE 0 END), 0) AS BIGINT)
         FROM usage_ledger WHERE ts_ms >= $1 AND ts_ms < $2"
    );
    if q.tenant.is_some() {
        sql.push_str(" AND tenant = $3");
    }
    sql.push_str(" GROUP BY tenant, grp ORDER BY tenant, grp");
    // Built from fixed fragments only; every value is a bound parameter.
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql.as_str()))
        .bind(q.from_ms)
        .bind(q.to_ms);
    if let Some(t) = &q.tenant {
        query = query.bind(t.as_str());
    }
    let rows = query.fetch_all(&db.pool).await?;
    let mut data = Vec::with_capacity(rows.len());
    let mut total = Line {
        tenant: q.tenant.clone().unwrap_or_else(|| "*".into()),
        ..Line::default()
    };
    for r in rows {
        let group = match q.group_by {
            GroupBy::Tenant => None,
            GroupBy::Day => Some(format_day(r.try_get::<i64, _>(1)?)),
            GroupBy::Model | GroupBy::Key => Some(r.try_get::<String, _>(1)?),
        };
        let prompt: i64 = r.try_get(3)?;
        let completion: i64 = r.try_get(4)?;
        let cost: i64 = r.try_get(8)?;
        let line = Line {
            tenant: r.try_get(0)?,
            group,
            requests: r.try_get(2)?,
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached_tokens: r.try_get(5)?,
            total_tokens: prompt.saturating_add(completion),
            cache_hits: r.try_get(6)?,
            tokens_saved: r.try_get(7)?,
            cost_usd: format_usd(cost),
            cost_nanousd: cost,
            unpriced_requests: r.try_get(9)?,
        };
        total.requests = total.requests.saturating_add(line.requests);
        total.prompt_tokens = total.prompt_tokens.saturating_add(line.prompt_tokens);
        total.completion_tokens = total
            .completion_tokens
            .saturating_add(line.completion_tokens);
        total.cached_tokens = total.cached_tokens.saturating_add(line.cached_tokens);
        total.total_tokens = total.total_tokens.saturating_add(line.total_tokens);
        total.cache_hits = total.cache_hits.saturating_add(line.cache_hits);
        total.tokens_saved = total.tokens_saved.saturating_add(line.tokens_saved);
        total.cost_nanousd = total.cost_nanousd.saturating_add(line.cost_nanousd);
        total.unpriced_requests = total
            .unpriced_requests
            .saturating_add(line.unpriced_requests);
        data.push(line);
    }
    total.cost_usd = format_usd(total.cost_nanousd);
    Ok(Report {
        object: "usage.report",
        from: format_time(q.from_ms),
        to: format_time(q.to_ms),
        group_by: q.group_by.as_str(),
        data,
        total,
    })
}

const HEADER: [&str; 11] = [
    "tenant",
    "group",
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "total_tokens",
    "cache_hits",
    "tokens_saved",
    "cost_usd",
    "unpriced_requests",
];

fn cells(l: &Line, group_by: GroupBy) -> Vec<String> {
    let mut c = vec![l.tenant.clone()];
    if group_by != GroupBy::Tenant {
        c.push(l.group.clone().unwrap_or_default());
    }
    c.extend([
        l.requests.to_string(),
        l.prompt_tokens.to_string(),
        l.completion_tokens.to_string(),
        l.cached_tokens.to_string(),
        l.total_tokens.to_string(),
        l.cache_hits.to_string(),
        l.tokens_saved.to_string(),
        l.cost_usd.clone(),
        l.unpriced_requests.to_string(),
    ]);
    c
}

fn header(group_by: GroupBy) -> Vec<&'static str> {
    HEADER
        .iter()
        .filter_map(|&h| match h {
            "group" if group_by == GroupBy::Tenant => None,
            "group" => Some(group_by.as_str()),
            h => Some(h),
        })
        .collect()
}

/// RFC 4180 CSV, one line per report line (no total line: spreadsheets sum).
pub fn csv(r: &Report) -> String {
    let g = GroupBy::parse(r.group_by).unwrap_or(GroupBy::Tenant);
    let mut out = header(g).join(",");
    out.push_str("\r\n");
    for l in &r.data {
        let row: Vec<String> = cells(l, g).iter().map(|c| csv_field(c)).collect();
        out.push_str(&row.join(","));
        out.push_str("\r\n");
    }
    out
}

fn csv_field(s: &str) -> String {
    // A name a spreadsheet would run as a formula is shown as text.
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) && s.parse::<f64>().is_err() {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// An aligned text table with a total line, for terminals.
pub fn table(r: &Report) -> String {
    let g = GroupBy::parse(r.group_by).unwrap_or(GroupBy::Tenant);
    let head: Vec<String> = header(g).iter().map(|s| s.to_string()).collect();
    let mut rows: Vec<Vec<String>> = vec![head];
    rows.extend(r.data.iter().map(|l| cells(l, g)));
    let mut total = cells(&r.total, g);
    total[0] = "TOTAL".into();
    if g != GroupBy::Tenant {
        total[1] = String::new();
    }
    rows.push(total);
    let width: Vec<usize> = (0..rows[0].len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let textual = if g == GroupBy::Tenant { 1 } else { 2 };
    let mut out = format!("usage {} .. {}\n", r.from, r.to);
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            if i < textual {
                let _ = write!(line, "{cell:<w$}", w = width[i]);
            } else {
                let _ = write!(line, "{cell:>w$}", w = width[i]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// (year, month, day) → days since 1970-01-01.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = i64::from((m + 9) % 12);
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The first ms of the month after the one holding `day` (days since the epoch).
pub fn next_month_start_ms(day: i64) -> i64 {
    let (y, m, _) = civil(day);
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * DAY_MS
}

pub fn format_day(day: i64) -> String {
    let (y, m, d) = civil(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// `2026-11-27T10:00:00Z` (UTC, to the second).
pub fn format_time(ms: i64) -> String {
    let day = ms.div_euclid(DAY_MS);
    let s = ms.rem_euclid(DAY_MS) / 1000;
    format!(
        "{}T{:02}:{:02}:{:02}Z",
        format_day(day),
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The range a report covers, `[from, to)` in ms: as given (see [`parse_time`]), by default
/// the 30 days before now. The error names the parameter (`from` or `to`).
pub fn range(from: Option<&str>, to: Option<&str>) -> Result<(i64, i64), (&'static str, String)> {
    let to = match to {
        Some(t) => parse_time(t, End::To).map_err(|e| ("to", e))?,
        None => super::now_ms(),
    };
    let from = match from {
        Some(f) => parse_time(f, End::From).map_err(|e| ("from", e))?,
        None => to - 30 * DAY_MS,
    };
    if from >= to {
        return Err(("from", "`from` must be before `to`".into()));
    }
    Ok((from, to))
}

/// Which end of a range a time is for: a bare date means the start of that day for `from`
/// and the end of it (the next day's start) for `to`, so `--from 2026-11-01 --to 2026-11-30`
/// is all of November.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    From,
    To,
}

/// Parses `2026-11-27`, `2026-11-27T10:00:00Z` (or with `+hh:mm`) or unix seconds into ms.
pub fn parse_time(s: &str, end: End) -> Result<i64, String> {
    let bad =
        || format!("`{s}` is not a time: use 2026-11-27, 2026-11-27T10:00:00Z or unix seconds");
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let secs: i64 = s.parse().map_err(|_| bad())?;
        return secs.checked_mul(1000).ok_or_else(bad);
    }
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, String> {
        let t = s.get(r).ok_or_else(bad)?;
        if t.bytes().all(|c| c.is_ascii_digit()) {
            t.parse().map_err(|_| bad())
        } else {
            Err(bad())
        }
    };
    let (y, m, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&m) || d < 1 || d > days_in_month(y, m as u32) {
        return Err(bad());
    }
    let day = days_from_civil(y, m as u32, d as u32);
    if b.len() == 10 {
        let day = if end == End::To { day + 1 } else { day };
        return Ok(day * DAY_MS);
    }
    if b.len() < 20 || !matches!(b[10], b'T' | b' ') || b[13] != b':' || b[16] != b':' {
        return Err(bad());
    }
    let (hh, mm, ss) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if hh > 23 || mm > 59 || ss > 60 {
        return Err(bad());
    }
    // Fractional seconds (`.123`, as JavaScript's toISOString writes): milliseconds kept.
    let mut at = 19;
    let mut ms = 0;
    if b.get(at) == Some(&b'.') {
        let digits = b[at + 1..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        if digits == 0 {
            return Err(bad());
        }
        for (i, c) in b[at + 1..at + 1 + digits.min(3)].iter().enumerate() {
            ms += i64::from(c - b'0') * [100, 10, 1][i];
        }
        at += 1 + digits;
    }
    let o = &b[at..];
    let offset = match o {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2]
            if [h1, h2, m1, m2].iter().all(|c| c.is_ascii_digit()) =>
        {
            let n = |a: &u8, b: &u8| i64::from(a - b'0') * 10 + i64::from(b - b'0');
            let sign = if *sign == b'-' { -1 } else { 1 };
            sign * (n(h1, h2) * 3600 + n(m1, m2) * 60)
        }
        _ => return Err(bad()),
    };
    Ok((day * 86_400 + hh * 3600 + mm * 60 + ss - offset) * 1000 + ms)
}

fn days_in_month(y: i64, m: u32) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_round_trip_and_bad_ones_are_refused() {
        assert_eq!(parse_time("1970-01-01", End::From), Ok(0));
        assert_eq!(parse_time("1970-01-01", End::To), Ok(DAY_MS));
        let t = parse_time("2026-11-27T10:20:30Z", End::From).unwrap();
        assert_eq!(format_time(t), "2026-11-27T10:20:30Z");
        assert_eq!(parse_time("2026-11-27T12:20:30+02:00", End::From), Ok(t));
        assert_eq!(
            parse_time("2026-11-27T10:20:30.250Z", End::From),
            Ok(t + 250)
        );
        // Multi-byte text where an offset would be: an error, not a panic.
        assert!(parse_time("2026-11-27T10:00:00€000", End::From).is_err());
        assert!(parse_time("2026-11-27T10:00:00.Z", End::From).is_err());
        assert_eq!(parse_time("1764238830", End::From), Ok(1_764_238_830_000));
        assert_eq!(format_day(days_from_civil(2024, 2, 29)), "2024-02-29");
        assert_eq!(format_day(days_from_civil(2000, 12, 31)), "2000-12-31");
        for bad in [
            "",
            "2026-13-01",
            "2026-02-30",
            "2026-11-27T25:00:00Z",
            "27/11/2026",
            "2026-11-27T10:00:00",
            "x",
        ] {
            assert!(parse_time(bad, End::From).is_err(), "{bad}");
        }
    }

    #[test]
    fn csv_escapes_and_table_aligns() {
        let r = Report {
            object: "usage.report",
            from: "a".into(),
            to: "b".into(),
            group_by: "model",
            data: vec![Line {
                tenant: "acme".into(),
                group: Some("gpt,4\"o".into()),
                requests: 2,
                cost_usd: format_usd(1500),
                ..Line::default()
            }],
            total: Line {
                tenant: "*".into(),
                requests: 2,
                cost_usd: format_usd(1500),
                ..Line::default()
            },
        };
        let c = csv(&r);
        assert!(c.starts_with("tenant,model,requests,"), "{c}");
        assert!(c.contains("acme,\"gpt,4\"\"o\",2,"), "{c}");
        let t = table(&r);
        assert!(t.contains("TOTAL"), "{t}");
        assert!(t.contains("0.000001500"), "{t}");
    }
}
