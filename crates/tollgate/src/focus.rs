//! FinOps FOCUS Cost and Usage rows: what tollgate metered and charged, in the columns
//! finance tools read. The mandatory columns and their types are listed, with their source,
//! in `docs/focus/columns.tsv`; a test checks every export against that list.
//!
//! One Usage row per (charge period, key, provider, model, run, token class): `SkuMeter`
//! names the class, `ConsumedQuantity` its tokens. A group's cost is exact (the sum of its
//! records); it is split across token classes in proportion to their list price, with the
//! rounding remainder on the largest, so every group's rows add up to the cent-exact total.
//! Tool-route calls are Usage rows in `Requests`; wallet top-ups are `Purchase`, grants
//! `Credit`, adjustments `Adjustment`. tollgate's own attribution is in `x_` columns.

use crate::prices::PriceTable;
use crate::records::UsageRecord;
use crate::store::{RecordFilter, Store, StoreError};
use std::collections::BTreeMap;

/// The columns every row has, in order.
pub const COLUMNS: &[&str] = &[
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "EffectiveCost",
    "HostProviderName",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ServiceCategory",
    "ServiceName",
    "ServiceProviderName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SubAccountId",
    "SubAccountName",
    "x_KeyId",
    "x_Agent",
    "x_Team",
    "x_Project",
    "x_Model",
    "x_RunId",
    "x_OutcomeIds",
    "x_Requests",
];

/// A cell: a decimal in micro-USD (or a count), a time, text, or null.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Micros(i64),
    Count(u64),
    Time(i64),
    Text(String),
    Null,
}

pub type Row = Vec<Cell>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hourly,
    Daily,
}

impl Granularity {
    fn span_ms(self) -> i64 {
        match self {
            Granularity::Hourly => 3_600_000,
            Granularity::Daily => 86_400_000,
        }
    }
}

/// A record's tokens in `prices::TOKEN_CLASSES`, split as `Price::cost` prices them.
fn classes(r: &UsageRecord) -> [u64; 6] {
    crate::prices::token_classes(&tollgate_proto::usage::Usage {
        input: r.input_tokens,
        cached_input: r.cached_input_tokens,
        cache_write_5m: r.cache_write_5m_tokens,
        cache_write_1h: r.cache_write_1h_tokens,
        output: r.output_tokens,
        reasoning: r.reasoning_tokens,
    })
}

#[derive(Default)]
struct Group {
    agent: String,
    team: Option<String>,
    project: Option<String>,
    org: String,
    tool: bool,
    requests: u64,
    tokens: [u64; 6],
    list: i64,
    billed: i64,
}

/// Splits `total` over `weights` exactly: proportional shares rounded down, the remainder
/// on the largest weight (on the first class when every weight is zero).
fn split(total: i64, weights: &[u128]) -> Vec<i64> {
    let sum: u128 = weights.iter().sum();
    let mut out: Vec<i64> = if sum == 0 {
        let mut v = vec![0; weights.len()];
        v[0] = total;
        return v;
    } else {
        weights
            .iter()
            .map(|w| (i128::from(total) * (*w as i128) / sum as i128) as i64)
            .collect()
    };
    let rest = total - out.iter().sum::<i64>();
    let largest = (0..weights.len()).max_by_key(|i| weights[*i]).unwrap_or(0);
    out[largest] += rest;
    out
}

fn month_bounds(ms: i64) -> (i64, i64) {
    use crate::clock::{civil, days_from_civil};
    let (y, m, _) = civil(ms.div_euclid(86_400_000));
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    (
        days_from_civil(y, m, 1) * 86_400_000,
        days_from_civil(ny, nm, 1) * 86_400_000,
    )
}

/// Every FOCUS row for charges in `[since_ms, until_ms)`.
pub fn export(
    store: &Store,
    prices: &PriceTable,
    since_ms: i64,
    until_ms: i64,
    granularity: Granularity,
) -> Result<Vec<Row>, StoreError> {
    let span = granularity.span_ms();
    // Keyed by (period, key, provider, model, run).
    let mut groups: BTreeMap<(i64, String, String, String, String), Group> = BTreeMap::new();
    let mut before = None;
    loop {
        let page = store.find_records(&RecordFilter {
            since_ms,
            until_ms: Some(until_ms),
            limit: 10_000,
            before: before.clone(),
            ..RecordFilter::default()
        })?;
        for r in &page {
            let tool = r.endpoint.starts_with("route:");
            if r.cost_micros == 0 && !tool && r.input_tokens + r.output_tokens == 0 {
                continue;
            }
            let key = (
                r.ts_ms.div_euclid(span) * span,
                r.key_id.clone(),
                r.provider.clone().unwrap_or_else(|| r.endpoint.clone()),
                r.model_served
                    .clone()
                    .or_else(|| r.model_requested.clone())
                    .unwrap_or_default(),
                r.run_id.clone().unwrap_or_default(),
            );
            let g = groups.entry(key).or_default();
            g.agent.clone_from(&r.agent);
            g.team.clone_from(&r.team);
            g.project.clone_from(&r.project);
            g.org = r.wallet_id.clone().unwrap_or_else(|| "unattributed".into());
            g.tool = tool;
            g.requests += 1;
            for (t, n) in g.tokens.iter_mut().zip(classes(r)) {
                *t = t.saturating_add(n);
            }
            let cost = i64::try_from(r.cost_micros).unwrap_or(i64::MAX);
            g.list = g.list.saturating_add(cost);
            g.billed = g
                .billed
                .saturating_add(cost - i64::try_from(r.shortfall_micros).unwrap_or(0).min(cost));
        }
        match page.last() {
            Some(last) if page.len() == 10_000 => before = Some((last.ts_ms, last.id.clone())),
            _ => break,
        }
    }
    let outcomes = store.outcomes_since(0)?;
    let mut by_run: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for o in &outcomes {
        if let Some(run) = &o.run_id {
            by_run.entry(run.clone()).or_default().push(o.id.clone());
        }
    }
    let text = |s: &str| Cell::Text(s.to_string());
    let opt = |s: &Option<String>| s.as_deref().map_or(Cell::Null, text);
    let mut rows = Vec::new();
    for ((start, key_id, provider, model, run), g) in groups {
        let (bp_start, bp_end) = month_bounds(start);
        let unit_rows: Vec<(&str, u64, i64, i64)> = if g.tool {
            vec![("Requests", g.requests, g.list, g.billed)]
        } else {
            let names = [
                "Input",
                "Cached Input",
                "Cache Write 5m",
                "Cache Write 1h",
                "Output",
                "Reasoning",
            ];
            let p = prices.lookup(&provider, &model);
            let per = p.map_or([0u64; 6], |p| {
                [
                    p.input,
                    p.cached_input,
                    p.cache_write_5m,
                    p.cache_write_1h,
                    p.output,
                    p.reasoning,
                ]
            });
            let weights: Vec<u128> = (0..6)
                .map(|i| u128::from(g.tokens[i]) * u128::from(per[i].max(u64::from(p.is_none()))))
                .collect();
            let list = split(g.list, &weights);
            let billed = split(g.billed, &weights);
            (0..6)
                .filter(|i| g.tokens[*i] > 0 || (*i == 0 && g.list > 0))
                .map(|i| (names[i], g.tokens[i], list[i], billed[i]))
                .collect()
        };
        for (meter, quantity, list, billed) in unit_rows {
            let unit = if g.tool { "Requests" } else { "Tokens" };
            rows.push(vec![
                Cell::Micros(billed),
                text(&g.org),
                text(&g.org),
                text("USD"),
                Cell::Time(bp_end),
                Cell::Time(bp_start),
                text("Usage"),
                Cell::Null,
                text(&format!(
                    "{quantity} {meter} {} of {model} via {provider}",
                    unit.to_lowercase()
                )),
                Cell::Time(start + span),
                Cell::Time(start),
                Cell::Count(quantity),
                text(unit),
                Cell::Micros(list),
                Cell::Micros(billed),
                text(&provider),
                text("tollgate"),
                Cell::Micros(list),
                Cell::Count(quantity),
                text(unit),
                text("AI and Machine Learning"),
                text(if g.tool {
                    "Agent Tools"
                } else {
                    "LLM Inference"
                }),
                text(&provider),
                text(if g.tool {
                    "Other (AI and Machine Learning)"
                } else {
                    "Generative AI"
                }),
                text(&format!("{provider}/{model}")),
                text(if g.tool { "Requests" } else { meter }),
                opt(&g.team),
                opt(&g.team),
                text(&key_id),
                text(&g.agent),
                opt(&g.team),
                opt(&g.project),
                text(&model),
                if run.is_empty() {
                    Cell::Null
                } else {
                    text(&run)
                },
                by_run
                    .get(&run)
                    .map_or(Cell::Null, |ids| text(&ids.join(","))),
                Cell::Count(g.requests),
            ]);
        }
    }
    // Money into wallets: top-ups are purchases, grants credits, adjustments adjustments.
    for (wallet, kind, amount, ts) in store.ledger_credits(since_ms, until_ms)? {
        let category = match kind.as_str() {
            "topup" => "Purchase",
            "grant" => "Credit",
            _ => "Adjustment",
        };
        let start = ts.div_euclid(span) * span;
        let (bp_start, bp_end) = month_bounds(start);
        // A credit lowers what is owed: negative, as FOCUS writes credits.
        let billed = if category == "Credit" {
            -amount
        } else {
            amount
        };
        rows.push(vec![
            Cell::Micros(billed),
            text(&wallet),
            text(&wallet),
            text("USD"),
            Cell::Time(bp_end),
            Cell::Time(bp_start),
            text(category),
            Cell::Null,
            text(&format!("wallet {kind}")),
            Cell::Time(start + span),
            Cell::Time(start),
            Cell::Null,
            Cell::Null,
            Cell::Micros(billed),
            Cell::Micros(billed),
            text("tollgate"),
            text("tollgate"),
            Cell::Micros(billed),
            Cell::Null,
            Cell::Null,
            text("AI and Machine Learning"),
            text("Wallet"),
            text("tollgate"),
            text("Other (AI and Machine Learning)"),
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
            Cell::Null,
        ]);
    }
    Ok(rows)
}

fn decimal(micros: i64) -> String {
    let sign = if micros < 0 { "-" } else { "" };
    let m = micros.unsigned_abs();
    format!("{sign}{}.{:06}", m / 1_000_000, m % 1_000_000)
}

/// The rows as CSV with a header (RFC 4180 quoting).
pub fn csv(rows: &[Row]) -> String {
    let mut out = COLUMNS.join(",");
    out.push('\n');
    for r in rows {
        let cells: Vec<String> = r
            .iter()
            .map(|c| match c {
                Cell::Micros(m) => decimal(*m),
                Cell::Count(n) => n.to_string(),
                Cell::Time(t) => crate::clock::rfc3339(*t),
                Cell::Null => String::new(),
                Cell::Text(s) if s.contains([',', '"', '\n']) => {
                    format!("\"{}\"", s.replace('"', "\"\""))
                }
                Cell::Text(s) => s.clone(),
            })
            .collect();
        out.push_str(&cells.join(","));
        out.push('\n');
    }
    out
}

/// The rows as JSON lines, decimals as JSON numbers with six places.
pub fn jsonl(rows: &[Row]) -> String {
    let mut out = String::new();
    for r in rows {
        let fields: Vec<String> = COLUMNS
            .iter()
            .zip(r)
            .map(|(name, c)| {
                let v = match c {
                    Cell::Micros(m) => decimal(*m),
                    Cell::Count(n) => n.to_string(),
                    Cell::Time(t) => format!("\"{}\"", crate::clock::rfc3339(*t)),
                    Cell::Null => "null".into(),
                    Cell::Text(s) => serde_json::Value::String(s.clone()).to_string(),
                };
                format!("\"{name}\":{v}")
            })
            .collect();
        out.push('{');
        out.push_str(&fields.join(","));
        out.push_str("}\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_exact_and_times_are_utc() {
        for (total, w) in [
            (1_000_001i64, vec![1u128, 1, 1]),
            (7, vec![0, 0]),
            (5, vec![3, 0, 9]),
        ] {
            assert_eq!(split(total, &w).iter().sum::<i64>(), total);
        }
        assert_eq!(crate::clock::rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(
            crate::clock::rfc3339(1_796_083_200_000),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(decimal(-1_500_000), "-1.500000");
        let (s, e) = month_bounds(1_796_083_200_000 + 5 * 86_400_000);
        assert_eq!(
            (crate::clock::rfc3339(s), crate::clock::rfc3339(e)),
            ("2026-12-01T00:00:00Z".into(), "2027-01-01T00:00:00Z".into())
        );
    }
}
