//! Reconciliation: what tollgate metered for a provider, per (UTC day, model, token class),
//! against what the provider's own usage report API says it billed, and what tollgate charged
//! per (day, model) against the provider's cost report. A drift is found the day after, not on
//! the invoice weeks later; a cost drift with no token drift is a price table that is not the
//! provider's.

use crate::providers::ProviderKind;
use crate::store::Store;
use crate::upstream::Provider;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

const DAY_MS: i64 = 86_400_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftRow {
    /// `YYYY-MM-DD`, UTC.
    pub day: String,
    pub model: String,
    /// `input` (every prompt token, cached included), `cached_input`, `cache_write`, `output`,
    /// or `cost_micros` (what tollgate charged against what the provider's cost report says).
    pub class: String,
    pub tollgate: u64,
    pub provider: u64,
    /// provider − tollgate.
    pub drift: i64,
    /// The drift as a share of the provider's count, in percent.
    pub drift_pct: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reconciliation {
    pub provider: String,
    pub since_ms: i64,
    pub until_ms: i64,
    pub threshold_pct: f64,
    /// Every (day, model, class) either side counted.
    pub rows: Vec<DriftRow>,
    /// True when no row drifts past the threshold.
    pub ok: bool,
    /// Why costs were not compared (the provider's cost report could not be read, e.g. the
    /// key lacks the admin scope): tokens still were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_error: Option<String>,
}

type Counts = BTreeMap<(i64, String), [u64; 5]>;
const CLASSES: [&str; 5] = [
    "input",
    "cached_input",
    "cache_write",
    "output",
    "cost_micros",
];

fn day_name(day_ms: i64) -> String {
    let (y, m, d) = crate::clock::civil(day_ms.div_euclid(DAY_MS));
    format!("{y:04}-{m:02}-{d:02}")
}

/// What tollgate metered for `provider`, by day and the model the provider served.
pub fn metered(
    store: &Store,
    provider: &str,
    since_ms: i64,
    until_ms: i64,
) -> Result<Counts, String> {
    let rows = store
        .provider_usage_by_day(provider, since_ms, until_ms)
        .map_err(|e| e.to_string())?;
    Ok(rows
        .into_iter()
        .map(|(day, model, c)| ((day, model), c))
        .collect())
}

/// Every result of one of the provider's organization reports over the window, with the UTC
/// day (ms) of its bucket, page after page. `report` names the OpenAI and the Anthropic
/// endpoint with their grouping; `what` names it in errors.
async fn report_results(
    p: &Provider,
    since_ms: i64,
    until_ms: i64,
    (openai, anthropic): (&str, &str),
    what: &str,
) -> Result<Vec<(i64, serde_json::Value)>, String> {
    let is_anthropic = matches!(p.kind, ProviderKind::Anthropic);
    let from = since_ms.div_euclid(DAY_MS) * DAY_MS;
    let url = if is_anthropic {
        format!(
            "{}/{anthropic}&starting_at={}&ending_at={}&bucket_width=1d&limit=31",
            p.base_url,
            crate::clock::rfc3339(from),
            crate::clock::rfc3339(until_ms)
        )
    } else {
        format!(
            "{}/{openai}&start_time={}&end_time={}&bucket_width=1d&limit=31",
            p.base_url,
            from / 1000,
            until_ms / 1000
        )
    };
    let mut out = Vec::new();
    let mut page: Option<String> = None;
    for _ in 0..100 {
        let url = match &page {
            Some(token) => format!("{url}&page={token}"),
            None => url.clone(),
        };
        let mut req = p.client.get(&url).headers(p.headers.clone());
        if is_anthropic {
            req = req.header("anthropic-version", "2023-06-01");
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("calling {}'s {what}: {e}", p.name))?;
        let status = resp.status();
        let body: serde_json::Value = resp
            .json()
            .await
            .map_err(|e| format!("{}'s {what} is not JSON: {e}", p.name))?;
        if !status.is_success() {
            return Err(format!("{}'s {what} answered {status}: {body}", p.name));
        }
        for bucket in body["data"].as_array().into_iter().flatten() {
            let day_ms = if is_anthropic {
                bucket["starting_at"]
                    .as_str()
                    .and_then(crate::clock::parse_rfc3339)
                    .unwrap_or(0)
            } else {
                bucket["start_time"].as_i64().unwrap_or(0) * 1000
            };
            for r in bucket["results"].as_array().into_iter().flatten() {
                out.push((day_ms, r.clone()));
            }
        }
        match body["next_page"].as_str() {
            Some(t) if body["has_more"] == true => page = Some(t.to_string()),
            _ => break,
        }
    }
    Ok(out)
}

/// What the provider's usage report says, by day and model.
pub async fn reported(p: &Provider, since_ms: i64, until_ms: i64) -> Result<Counts, String> {
    let anthropic = matches!(p.kind, ProviderKind::Anthropic);
    let results = report_results(
        p,
        since_ms,
        until_ms,
        (
            "organization/usage/completions?group_by=model",
            "organizations/usage_report/messages?group_by[]=model",
        ),
        "usage report",
    )
    .await?;
    let n = |v: &serde_json::Value, k: &str| v.get(k).and_then(|x| x.as_u64()).unwrap_or(0);
    let mut out = Counts::new();
    for (day_ms, r) in results {
        let model = r["model"].as_str().unwrap_or("-").to_string();
        let c = out.entry((day_ms, model)).or_default();
        let counts = if anthropic {
            let read = n(&r, "cache_read_input_tokens");
            // Nested as the API documents it; flat as some exports write it.
            let writes = n(&r["cache_creation"], "ephemeral_5m_input_tokens")
                + n(&r["cache_creation"], "ephemeral_1h_input_tokens")
                + n(&r, "cache_creation_5m_input_tokens")
                + n(&r, "cache_creation_1h_input_tokens");
            [
                n(&r, "uncached_input_tokens") + read + writes,
                read,
                writes,
                n(&r, "output_tokens"),
            ]
        } else {
            [
                n(&r, "input_tokens"),
                n(&r, "input_cached_tokens"),
                0,
                n(&r, "output_tokens"),
            ]
        };
        for i in 0..4 {
            c[i] += counts[i];
        }
    }
    Ok(out)
}

/// Both sides, row by row.
pub fn compare(
    provider: &str,
    since_ms: i64,
    until_ms: i64,
    threshold_pct: f64,
    ours: &Counts,
    theirs: &Counts,
    cost_error: Option<String>,
) -> Reconciliation {
    let mut keys: Vec<&(i64, String)> = ours.keys().chain(theirs.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut rows = Vec::new();
    for k in keys {
        let a = ours.get(k).copied().unwrap_or_default();
        let b = theirs.get(k).copied().unwrap_or_default();
        for i in 0..5 {
            if i == 4 && cost_error.is_some() {
                continue;
            }
            if a[i] == 0 && b[i] == 0 {
                continue;
            }
            let drift = b[i] as i64 - a[i] as i64;
            let drift_pct = if b[i] == 0 {
                100.0
            } else {
                drift as f64 * 100.0 / b[i] as f64
            };
            rows.push(DriftRow {
                day: day_name(k.0),
                model: k.1.clone(),
                class: CLASSES[i].to_string(),
                tollgate: a[i],
                provider: b[i],
                drift,
                drift_pct,
            });
        }
    }
    let ok = rows
        .iter()
        .all(|r| r.drift == 0 || r.drift_pct.abs() <= threshold_pct);
    Reconciliation {
        provider: provider.to_string(),
        since_ms,
        until_ms,
        threshold_pct,
        rows,
        ok,
        cost_error,
    }
}

/// `"123.4567"` cents (Anthropic's money) in micro-USD, exactly.
fn cents_to_micros(s: &str) -> Option<u64> {
    let (whole, frac) = s.split_once('.').unwrap_or((s, ""));
    let frac: String = frac.chars().chain(std::iter::repeat('0')).take(4).collect();
    whole
        .parse::<u64>()
        .ok()?
        .checked_mul(10_000)?
        .checked_add(frac.parse::<u64>().ok()?)
}

/// What the provider's cost report says it charged, by day and model, into `out[..][4]`.
pub async fn reported_costs(
    p: &Provider,
    since_ms: i64,
    until_ms: i64,
    out: &mut Counts,
) -> Result<(), String> {
    let anthropic = matches!(p.kind, ProviderKind::Anthropic);
    let results = report_results(
        p,
        since_ms,
        until_ms,
        (
            "organization/costs?group_by=line_item",
            "organizations/cost_report?group_by[]=description",
        ),
        "cost report",
    )
    .await?;
    for (day_ms, r) in results {
        let (model, micros) = if anthropic {
            if r["cost_type"].as_str().is_some_and(|t| t != "tokens") {
                continue;
            }
            (
                r["model"].as_str().unwrap_or("-").to_string(),
                r["amount"].as_str().and_then(cents_to_micros),
            )
        } else {
            // Line items are "<model>, <what>".
            let line = r["line_item"].as_str().unwrap_or("-");
            (
                line.split_once(", ").map_or(line, |(m, _)| m).to_string(),
                r["amount"]["value"]
                    .as_f64()
                    .filter(|v| v.is_finite() && *v >= 0.0)
                    .map(|v| (v * 1e6).round() as u64),
            )
        };
        let micros = micros.ok_or_else(|| {
            format!(
                "{}'s cost report has an amount that is not money: {r}",
                p.name
            )
        })?;
        let c = out.entry((day_ms, model)).or_default();
        c[4] = c[4].saturating_add(micros);
    }
    Ok(())
}
