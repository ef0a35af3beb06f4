//! What the request log and the ROI report read from ClickHouse: records as the store gives
//! them (`Store::find_records`), outcomes, and the spend each outcome is set against.

use super::rows::absent;
use super::{quote, utc_day, ClickHouse};
use crate::records::{Saving, UsageRecord};
use crate::store::{ModelSpend, Outcome, RecordFilter};
use serde::Deserialize;
use std::collections::BTreeMap;

const LOG_COLUMNS: &str = "id, ts_ms, endpoint, key_id, agent, team, org, project, \
    model_requested, model_served, provider, status, error_kind, run_id, tag_keys, tag_values, \
    input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, cost_micros, \
    latency_ms, ttft_ms, stream, cache, usage_source, price_version, wallet_id, attempts, \
    client_disconnected, cache_write_5m_tokens, cache_write_1h_tokens, request_bytes, \
    response_bytes, reused, reused_from, shortfall_micros, detail, cascade, saving_savers, \
    saving_tokens, saving_micros, absent";

#[derive(Deserialize)]
struct LogRow {
    id: String,
    ts_ms: i64,
    endpoint: String,
    key_id: String,
    agent: String,
    team: String,
    org: String,
    project: String,
    model_requested: String,
    model_served: String,
    provider: String,
    status: u16,
    error_kind: String,
    run_id: String,
    tag_keys: Vec<String>,
    tag_values: Vec<String>,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost_micros: u64,
    latency_ms: u64,
    ttft_ms: u64,
    stream: u8,
    cache: String,
    usage_source: String,
    price_version: String,
    wallet_id: String,
    attempts: u32,
    client_disconnected: u8,
    cache_write_5m_tokens: u64,
    cache_write_1h_tokens: u64,
    request_bytes: u64,
    response_bytes: u64,
    reused: String,
    reused_from: String,
    shortfall_micros: u64,
    detail: String,
    cascade: String,
    saving_savers: Vec<String>,
    saving_tokens: Vec<u64>,
    saving_micros: Vec<u64>,
    absent: u32,
}

impl LogRow {
    /// The record of a row with the `absent` mask (written by version 8 or later).
    fn record(self) -> UsageRecord {
        let mask = self.absent;
        let opt = |v: String, bit: u32| (mask & bit == 0).then_some(v);
        let ttft_gone = mask & absent::TTFT != 0;
        let savings = self
            .saving_savers
            .into_iter()
            .zip(self.saving_tokens)
            .zip(self.saving_micros)
            .map(|((saver, tokens), micros)| Saving {
                saver,
                tokens,
                micros,
            })
            .collect();
        UsageRecord {
            id: self.id,
            ts_ms: self.ts_ms,
            endpoint: self.endpoint,
            key_id: self.key_id,
            agent: self.agent,
            team: opt(self.team, absent::TEAM),
            project: opt(self.project, absent::PROJECT),
            org: opt(self.org, absent::ORG),
            tags: self.tag_keys.into_iter().zip(self.tag_values).collect(),
            model_requested: opt(self.model_requested, absent::MODEL_REQUESTED),
            provider: opt(self.provider, absent::PROVIDER),
            model_served: opt(self.model_served, absent::MODEL_SERVED),
            attempts: self.attempts,
            status: self.status,
            error_kind: opt(self.error_kind, absent::ERROR_KIND),
            input_tokens: self.input_tokens,
            cached_input_tokens: self.cached_input_tokens,
            output_tokens: self.output_tokens,
            reasoning_tokens: self.reasoning_tokens,
            cache_write_5m_tokens: self.cache_write_5m_tokens,
            cache_write_1h_tokens: self.cache_write_1h_tokens,
            usage_source: self.usage_source,
            cost_micros: self.cost_micros,
            price_version: opt(self.price_version, absent::PRICE_VERSION),
            latency_ms: self.latency_ms,
            ttft_ms: (!ttft_gone).then_some(self.ttft_ms),
            stream: self.stream != 0,
            client_disconnected: self.client_disconnected != 0,
            request_bytes: self.request_bytes,
            response_bytes: self.response_bytes,
            reused: opt(self.reused, absent::REUSED),
            reused_from: opt(self.reused_from, absent::REUSED_FROM),
            wallet_id: opt(self.wallet_id, absent::WALLET),
            shortfall_micros: self.shortfall_micros,
            run_id: opt(self.run_id, absent::RUN),
            cache: opt(self.cache, absent::CACHE),
            cascade: opt(self.cascade, absent::CASCADE),
            savings,
            detail: opt(self.detail, absent::DETAIL),
            ..UsageRecord::default()
        }
    }
}

#[derive(Deserialize)]
struct OutcomeRow {
    id: String,
    occurred_ms: i64,
    key_id: String,
    agent: String,
    team: String,
    project: String,
    run_id: String,
    request_id: String,
    kind: String,
    success: u8,
    value_micros: i64,
    tag_keys: Vec<String>,
    tag_values: Vec<String>,
    created_ms: i64,
    absent: u32,
}

#[derive(Deserialize)]
struct Spend {
    target: String,
    model: String,
    cost: u64,
}

#[derive(Deserialize)]
struct Found {
    id: String,
    ts_ms: i64,
}

/// The window of days the log looks at first, in days; each next look doubles it.
const FIRST_SPAN_DAYS: i64 = 1;

impl ClickHouse {
    /// The request log from `usage`, as `Store::find_records` gives it: newest first, the
    /// same filters and cursor. Recent days are looked at first, and only ids and times are
    /// sorted: the page's rows are read whole once they are known. `None` when the page holds
    /// a row written before migration 8: it lacks columns the log shows (attempts, bytes,
    /// savings), so the store, which has them, should answer.
    pub async fn find_records(&self, f: &RecordFilter) -> Result<Option<Vec<UsageRecord>>, String> {
        let mut conds = Vec::new();
        if let Some(k) = &f.key {
            conds.push(format!("(key_id = {q} OR agent = {q})", q = quote(k)));
        }
        if let Some(t) = &f.team {
            conds.push(format!("team = {}", quote(t)));
        }
        if let Some(m) = &f.model {
            conds.push(format!(
                "(model_requested = {q} OR model_served = {q})",
                q = quote(m)
            ));
        }
        if let Some((lo, hi)) = f.status {
            conds.push(format!("status >= {lo} AND status <= {hi}"));
        }
        if let Some(e) = &f.endpoint {
            conds.push(format!("endpoint = {}", quote(e)));
        }
        if let Some(r) = &f.run {
            conds.push(format!("run_id = {}", quote(r)));
        }
        if let Some(e) = &f.error_kind {
            conds.push(format!("error_kind = {}", quote(e)));
        }
        if let Some(id) = &f.request_id {
            conds.push(format!("id = {}", quote(id)));
        }
        if let Some((ts, id)) = &f.before {
            conds.push(format!(
                "(ts_ms < {ts} OR (ts_ms = {ts} AND id > {}))",
                quote(id)
            ));
        }
        let filters: String = conds.iter().map(|c| format!(" AND {c}")).collect();
        let limit = f.limit as usize;
        let mut hi = match (f.until_ms, &f.before) {
            (Some(u), Some((ts, _))) => u.min(ts.saturating_add(1)),
            (Some(u), None) => u,
            (None, Some((ts, _))) => ts.saturating_add(1),
            (None, None) => crate::clock::now_ms().saturating_add(super::DAY_MS),
        };
        let mut span = FIRST_SPAN_DAYS * super::DAY_MS;
        let mut found: Vec<Found> = Vec::new();
        while found.len() < limit && hi > f.since_ms {
            let lo = hi.saturating_sub(span).max(f.since_ms);
            let rows: Vec<Found> = self
                .rows(&format!(
                    "SELECT id, ts_ms FROM {{db}}.usage
                     WHERE day >= '{}' AND day <= '{}' AND ts_ms >= {lo} AND ts_ms < {hi}{filters}
                     ORDER BY ts_ms DESC, id LIMIT {}",
                    utc_day(lo),
                    utc_day(hi - 1),
                    limit - found.len()
                ))
                .await?;
            found.extend(rows);
            hi = lo;
            span = span.saturating_mul(2);
        }
        if found.is_empty() {
            return Ok(Some(Vec::new()));
        }
        // The page's rows whole, a few thousand ids per statement (under max_query_size).
        let mut rows: Vec<LogRow> = Vec::with_capacity(found.len());
        for part in found.chunks(2_000) {
            let mut days: Vec<String> = part.iter().map(|r| utc_day(r.ts_ms)).collect();
            days.sort();
            days.dedup();
            let ids = part
                .iter()
                .map(|r| quote(&r.id))
                .collect::<Vec<_>>()
                .join(",");
            let days = days
                .iter()
                .map(|d| format!("'{d}'"))
                .collect::<Vec<_>>()
                .join(",");
            rows.extend(
                self.rows::<LogRow>(&format!(
                    "SELECT {LOG_COLUMNS} FROM {{db}}.usage WHERE day IN ({days}) AND id IN ({ids})"
                ))
                .await?,
            );
        }
        if rows.iter().any(|r| r.absent & absent::KNOWN == 0) {
            return Ok(None);
        }
        let mut by_id: BTreeMap<String, UsageRecord> = rows
            .into_iter()
            .map(|r| (r.id.clone(), r.record()))
            .collect();
        Ok(Some(
            found.iter().filter_map(|r| by_id.remove(&r.id)).collect(),
        ))
    }

    /// Outcomes that occurred at or after `since_ms`, oldest first (`Store::outcomes_since`).
    pub async fn outcomes_since(&self, since_ms: i64) -> Result<Vec<Outcome>, String> {
        let rows: Vec<OutcomeRow> = self
            .rows(&format!(
                "SELECT id, occurred_ms, key_id, agent, team, project, run_id, request_id, kind,
                        success, value_micros, tag_keys, tag_values, created_ms, absent
                 FROM {{db}}.outcomes WHERE day >= '{}' AND occurred_ms >= {since_ms}
                 ORDER BY occurred_ms, id",
                utc_day(since_ms)
            ))
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                let m = r.absent;
                let opt = |v: String, bit: u32| (m & bit == 0).then_some(v);
                Outcome {
                    id: r.id,
                    occurred_ms: r.occurred_ms,
                    key_id: r.key_id,
                    agent: r.agent,
                    team: opt(r.team, absent::TEAM),
                    project: opt(r.project, absent::PROJECT),
                    run_id: opt(r.run_id, absent::RUN),
                    request_id: opt(r.request_id, absent::REQUEST),
                    kind: r.kind,
                    success: r.success != 0,
                    value_micros: (m & absent::VALUE == 0).then_some(r.value_micros),
                    tags: r.tag_keys.into_iter().zip(r.tag_values).collect(),
                    created_ms: r.created_ms,
                }
            })
            .collect())
    }

    /// What `Store::outcome_spends` gives, summed from `usage`: each outcome's request, or its
    /// run with the runs under it (`trees`: a root run and each run of its tree, the root
    /// included, from the store's envelopes), counting spend from `since_ms` on (rounded down
    /// to its hour, as reports are).
    pub async fn outcome_spends(
        &self,
        outcomes: &[Outcome],
        trees: &[(String, String)],
        since_ms: i64,
    ) -> Result<BTreeMap<String, ModelSpend>, String> {
        let from = crate::store::report_start(since_ms);
        let window = format!("day >= '{}' AND ts_ms >= {from}", utc_day(from));
        let mut requests: Vec<&str> = outcomes
            .iter()
            .filter_map(|o| o.request_id.as_deref())
            .collect();
        requests.sort_unstable();
        requests.dedup();
        let mut runs: Vec<&str> = trees.iter().map(|(_, r)| r.as_str()).collect();
        runs.sort_unstable();
        runs.dedup();
        let mut sums: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (col, prefix, list) in [("id", "req:", &requests), ("run_id", "run:", &runs)] {
            for part in list.chunks(2_000) {
                let values = part.iter().map(|v| quote(v)).collect::<Vec<_>>().join(",");
                let rows: Vec<Spend> = self
                    .rows(&format!(
                        "SELECT {col} AS target, model, sum(cost_micros) AS cost FROM {{db}}.usage
                         WHERE {window} AND {col} IN ({values}) GROUP BY target, model"
                    ))
                    .await?;
                for r in rows {
                    *sums
                        .entry(format!("{prefix}{}", r.target))
                        .or_default()
                        .entry(r.model)
                        .or_default() += r.cost;
                }
            }
        }
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        for (k, v) in sums.iter().filter(|(k, _)| k.starts_with("req:")) {
            out.insert(k.clone(), v.clone());
        }
        // A run's spend is its tree's.
        for (root, run) in trees {
            if let Some(s) = sums.get(&format!("run:{run}")) {
                let acc = out.entry(format!("run:{root}")).or_default();
                for (model, cost) in s {
                    *acc.entry(model.clone()).or_default() += cost;
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|(k, v)| (k, v.into_iter().collect()))
            .collect())
    }
}
