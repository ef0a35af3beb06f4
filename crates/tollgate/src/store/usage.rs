//! The usage table: rows in (one statement per batch), reports and raw records out.

use super::*;
use std::collections::HashMap;

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReportRow {
    pub group: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    pub cost_micros: u64,
}

/// What `usage --by` groups on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Team,
    Project,
    Model,
    Day,
    /// The agent run (`x-tollgate-run`) a request drew on.
    Run,
    /// The endpoint: chat, messages, embeddings, responses, or a tool route.
    Endpoint,
    Tag(String),
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "key" | "agent" => GroupBy::Key,
            "team" => GroupBy::Team,
            "project" => GroupBy::Project,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "run" => GroupBy::Run,
            "endpoint" => GroupBy::Endpoint,
            _ => match s.strip_prefix("tag:") {
                Some(t) if !t.is_empty() => GroupBy::Tag(t.to_string()),
                _ => {
                    return Err(format!(
                        "cannot group by \"{s}\": use key, team, project, model, day, run, endpoint or tag:NAME"
                    ))
                }
            },
        })
    }
}

/// What the request log is filtered by; `None` is "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordFilter {
    pub since_ms: i64,
    pub until_ms: Option<i64>,
    /// A key id or an agent name.
    pub key: Option<String>,
    pub team: Option<String>,
    /// The model asked for or the one that served.
    pub model: Option<String>,
    /// Inclusive status range: (429, 429), or (400, 499) for `4xx`.
    pub status: Option<(u16, u16)>,
    pub endpoint: Option<String>,
    pub run: Option<String>,
    pub error_kind: Option<String>,
    pub request_id: Option<String>,
    pub limit: u32,
    /// Records strictly after this one in the log's order (newest first): a page's cursor.
    pub before: Option<(i64, String)>,
}

/// Where a report reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportSource {
    /// Rollups for whole hours and days, records for the partial hour at the start.
    Auto,
    /// Records only (slow on a large store; the reference the rollups are checked against).
    Records,
}

impl GroupBy {
    /// The group's expression over records, and over rollup rows (None: not rolled up).
    fn exprs(&self, pg: bool) -> (&'static str, Option<&'static str>) {
        match self {
            GroupBy::Key => (
                "agent || ' (' || key_id || ')'",
                Some("agent || ' (' || key_id || ')'"),
            ),
            GroupBy::Team => (
                "COALESCE(team, '-')",
                Some("COALESCE(NULLIF(team, ''), '-')"),
            ),
            GroupBy::Project => (
                "COALESCE(project, '-')",
                Some("COALESCE(NULLIF(project, ''), '-')"),
            ),
            GroupBy::Model => (
                "COALESCE(model_served, model_requested, '-')",
                Some("COALESCE(NULLIF(model, ''), '-')"),
            ),
            GroupBy::Day if pg => (
                "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                Some("to_char(to_timestamp(start_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"),
            ),
            GroupBy::Day => (
                "date(ts_ms / 1000, 'unixepoch')",
                Some("date(start_ms / 1000, 'unixepoch')"),
            ),
            GroupBy::Run => ("COALESCE(run_id, '-')", None),
            GroupBy::Endpoint => ("endpoint", Some("endpoint")),
            // Tags are not rolled up, so a tag report is records only: ?1, ?2, and the tag.
            GroupBy::Tag(_) if pg => ("COALESCE(CAST(tags AS JSONB) ->> ?3, '-')", None),
            GroupBy::Tag(_) => (
                "COALESCE(json_extract(tags, '$.' || json_quote(?3)), '-')",
                None,
            ),
        }
    }
}

impl Store {
    pub fn usage_report(&self, by: &GroupBy, since_ms: i64) -> Result<Vec<ReportRow>> {
        self.usage_report_from(by, since_ms, crate::clock::now_ms(), ReportSource::Auto)
    }

    /// The report over `[since_ms, now]`. With rollups, the time it takes depends on the
    /// number of groups and buckets, not of records: records are read only for the partial
    /// hour at the window's start (and the whole window when the grouping is not rolled up).
    pub fn usage_report_from(
        &self,
        by: &GroupBy,
        since_ms: i64,
        now_ms: i64,
        source: ReportSource,
    ) -> Result<Vec<ReportRow>> {
        self.with(|db| {
            let pg = db.dialect() == Dialect::Postgres;
            let (raw_group, rollup_group) = by.exprs(pg);
            // Records in [since, h1); hourly rollups in [h1, d1) and [d2, ...); daily in [d1, d2).
            // Each part is one range on the rollup key's prefix (bucket, start_ms): an OR of
            // two ranges made SQLite scan every hourly row of all time.
            let ceil = |t: i64, span: i64| t.div_euclid(span) * span + if t.rem_euclid(span) == 0 { 0 } else { span };
            let (h1, d1, d2) = match (rollup_group, source) {
                (Some(_), ReportSource::Auto) => {
                    let h1 = ceil(since_ms, HOUR_MS);
                    let d1 = ceil(h1, DAY_MS);
                    let d2 = now_ms.div_euclid(DAY_MS) * DAY_MS;
                    if d1 < d2 {
                        (h1, d1, d2)
                    } else {
                        (h1, i64::MAX, i64::MAX)
                    }
                }
                _ => (i64::MAX, i64::MAX, i64::MAX),
            };
            let raw = format!(
                "SELECT {raw_group} AS g, 1 AS n,
                        CASE WHEN status >= 400 OR error_kind IS NOT NULL THEN 1 ELSE 0 END AS e,
                        input_tokens AS i, cached_input_tokens AS c, output_tokens AS o,
                        reasoning_tokens AS r, cost_micros AS m,
                        cache_write_5m_tokens + cache_write_1h_tokens AS w
                 FROM usage WHERE ts_ms >= ?1 AND ts_ms < ?2"
            );
            let sql = match rollup_group {
                Some(rg) if h1 != i64::MAX => {
                    let sums = "requests AS n, errors AS e, input_tokens AS i, cached_input_tokens AS c,
                        output_tokens AS o, reasoning_tokens AS r, cost_micros AS m, cache_write_tokens AS w";
                    format!(
                        "{raw}
                         UNION ALL SELECT {rg} AS g, {sums} FROM usage_rollup
                           WHERE bucket = 'h' AND start_ms >= ?2 AND start_ms < ?3
                         UNION ALL SELECT {rg} AS g, {sums} FROM usage_rollup
                           WHERE bucket = 'h' AND start_ms >= ?4
                         UNION ALL SELECT {rg} AS g, {sums} FROM usage_rollup
                           WHERE bucket = 'd' AND start_ms >= ?3 AND start_ms < ?4"
                    )
                }
                _ => raw,
            };
            // SUM over BIGINT is NUMERIC in PostgreSQL: cast back, identically on both.
            let sql = format!(
                "SELECT g, CAST(SUM(n) AS BIGINT), CAST(SUM(e) AS BIGINT), CAST(SUM(i) AS BIGINT),
                        CAST(SUM(c) AS BIGINT), CAST(SUM(o) AS BIGINT), CAST(SUM(r) AS BIGINT),
                        CAST(SUM(m) AS BIGINT), CAST(SUM(w) AS BIGINT)
                 FROM ({sql}) AS parts GROUP BY g ORDER BY SUM(m) DESC, g"
            );
            let rows = match by {
                GroupBy::Tag(t) => db.rows(&sql, &[&since_ms, &h1, t])?,
                _ if h1 != i64::MAX => db.rows(&sql, &[&since_ms, &h1, &d1, &d2])?,
                _ => db.rows(&sql, &[&since_ms, &h1])?,
            };
            rows.iter()
                .map(|r| {
                    Ok(ReportRow {
                        group: r.get(0)?,
                        requests: r.get(1)?,
                        errors: r.get(2)?,
                        input_tokens: r.get(3)?,
                        cached_input_tokens: r.get(4)?,
                        output_tokens: r.get(5)?,
                        reasoning_tokens: r.get(6)?,
                        cost_micros: r.get(7)?,
                        cache_write_tokens: r.get(8)?,
                    })
                })
                .collect()
        })
    }

    /// Raw records, newest first; `request_id` narrows to one.
    pub fn usage_records(
        &self,
        since_ms: i64,
        request_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>> {
        self.find_records(&RecordFilter {
            since_ms,
            request_id: request_id.map(str::to_string),
            limit,
            ..RecordFilter::default()
        })
    }

    /// The request log: records matching every filter that is set, newest first, at most
    /// `limit`, after the `before` cursor.
    pub fn find_records(&self, f: &RecordFilter) -> Result<Vec<UsageRecord>> {
        let (cursor_ts, cursor_id) = match &f.before {
            Some((ts, id)) => (Some(*ts), Some(id.as_str())),
            None => (None, None),
        };
        let (status_lo, status_hi) = f.status.unwrap_or((0, 999));
        self.with(|db| {
            db.rows(
                &format!(
                    "SELECT {USAGE_COLUMNS} FROM usage
                     WHERE ts_ms >= ?1
                       AND (CAST(?2 AS BIGINT) IS NULL OR ts_ms < ?2)
                       AND (CAST(?3 AS TEXT) IS NULL OR key_id = ?3 OR agent = ?3)
                       AND (CAST(?4 AS TEXT) IS NULL OR team = ?4)
                       AND (CAST(?5 AS TEXT) IS NULL OR model_requested = ?5 OR model_served = ?5)
                       AND status >= ?6 AND status <= ?7
                       AND (CAST(?8 AS TEXT) IS NULL OR endpoint = ?8)
                       AND (CAST(?9 AS TEXT) IS NULL OR run_id = ?9)
                       AND (CAST(?10 AS TEXT) IS NULL OR error_kind = ?10)
                       AND (CAST(?11 AS TEXT) IS NULL OR id = ?11)
                       AND (CAST(?12 AS BIGINT) IS NULL OR ts_ms < ?12 OR (ts_ms = ?12 AND id > ?13))
                     ORDER BY ts_ms DESC, id LIMIT ?14"
                ),
                &[
                    &f.since_ms,
                    &f.until_ms,
                    &f.key,
                    &f.team,
                    &f.model,
                    &i64::from(status_lo),
                    &i64::from(status_hi),
                    &f.endpoint,
                    &f.run,
                    &f.error_kind,
                    &f.request_id,
                    &cursor_ts,
                    &cursor_id,
                    &f.limit,
                ],
            )?
            .iter()
            .map(usage_from_row)
            .collect()
        })
    }

    /// The bodies kept with a record (`[logging] bodies`), if any.
    pub fn record_bodies(&self, id: &str) -> Result<Option<crate::records::Bodies>> {
        self.with(|db| {
            db.row(
                "SELECT request, response, truncated FROM usage_bodies WHERE id = ?1",
                &[&id],
            )?
            .map(|r| {
                Ok(crate::records::Bodies {
                    request: r.get(0)?,
                    response: r.get(1)?,
                    truncated: r.get(2)?,
                    room: 0,
                })
            })
            .transpose()
        })
    }

    /// Deletes records older than `before_ms` (and their bodies), a slice at a time so the
    /// writer is never kept waiting long; rollups are left as they are. Returns how many went.
    pub fn prune_records(&self, before_ms: i64) -> Result<u64> {
        let mut total = 0;
        loop {
            let n = lock(&self.db).write(|tx| {
                tx.exec(
                    "DELETE FROM usage_bodies WHERE id IN
                        (SELECT id FROM usage WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT 5000)",
                    &[&before_ms],
                )?;
                tx.exec(
                    "DELETE FROM usage WHERE id IN
                        (SELECT id FROM usage WHERE ts_ms < ?1 ORDER BY ts_ms LIMIT 5000)",
                    &[&before_ms],
                )
            })?;
            total += n;
            if n < 5000 {
                return Ok(total);
            }
        }
    }

    /// Writes records the way the metering writer does (one transaction, their rollups
    /// with them), for imports and the scale benchmark; no wallet is touched.
    pub fn insert_usage_batch(&self, batch: &[UsageRecord]) -> Result<()> {
        let zeros = vec![0; batch.len()];
        lock(&self.db).write(|tx| insert_usage_rows(tx, batch, &zeros))
    }

    /// Tokens metered for `provider` by (UTC day start, served model): every prompt token,
    /// the cached ones, cache writes, output, for the generation endpoints the providers'
    /// completions/messages reports cover (embeddings have reports of their own). Answers
    /// reused from another request (which no provider saw twice) are left out.
    pub fn provider_usage_by_day(
        &self,
        provider: &str,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(i64, String, [u64; 4])>> {
        self.with(|db| {
            db.rows(
                "SELECT (ts_ms / 86400000) * 86400000, COALESCE(model_served, model_requested, '-'),
                        CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(cached_input_tokens) AS BIGINT),
                        CAST(SUM(cache_write_5m_tokens + cache_write_1h_tokens) AS BIGINT),
                        CAST(SUM(output_tokens) AS BIGINT)
                 FROM usage WHERE provider = ?1 AND ts_ms >= ?2 AND ts_ms < ?3 AND reused IS NULL
                   AND endpoint NOT IN ('embeddings', 'messages.count_tokens')
                 GROUP BY 1, 2 ORDER BY 1, 2",
                &[&provider, &since_ms, &until_ms],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?],
                ))
            })
            .collect()
        })
    }

    pub fn count_usage(&self) -> Result<u64> {
        self.with(|db| Ok(db.one("SELECT COUNT(*) FROM usage", &[])?.get(0)?))
    }
}

pub(super) const USAGE_COLUMNS: &str =
    "id, ts_ms, endpoint, key_id, agent, team, project, tags, model_requested, provider,
    model_served, attempts, status, error_kind, input_tokens, cached_input_tokens, output_tokens,
    reasoning_tokens, usage_source, cost_micros, price_version, latency_ms, ttft_ms, stream,
    client_disconnected, cache_write_5m_tokens, cache_write_1h_tokens, request_bytes,
    response_bytes, reused, reused_from, wallet_id, shortfall_micros, run_id, detail";

pub(super) const USAGE_COLUMN_COUNT: usize = 35;

fn usage_from_row(r: &Row) -> Result<UsageRecord> {
    let tags: String = r.get(7)?;
    Ok(UsageRecord {
        id: r.get(0)?,
        ts_ms: r.get(1)?,
        endpoint: r.get(2)?,
        key_id: r.get(3)?,
        agent: r.get(4)?,
        team: r.get(5)?,
        project: r.get(6)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        model_requested: r.get(8)?,
        provider: r.get(9)?,
        model_served: r.get(10)?,
        attempts: r.get(11)?,
        status: r.get(12)?,
        error_kind: r.get(13)?,
        input_tokens: r.get(14)?,
        cached_input_tokens: r.get(15)?,
        output_tokens: r.get(16)?,
        reasoning_tokens: r.get(17)?,
        usage_source: r.get(18)?,
        cost_micros: r.get(19)?,
        price_version: r.get(20)?,
        latency_ms: r.get(21)?,
        ttft_ms: r.get(22)?,
        stream: r.get(23)?,
        client_disconnected: r.get(24)?,
        cache_write_5m_tokens: r.get(25)?,
        cache_write_1h_tokens: r.get(26)?,
        request_bytes: r.get(27)?,
        response_bytes: r.get(28)?,
        reused: r.get(29)?,
        reused_from: r.get(30)?,
        wallet_id: r.get(31)?,
        shortfall_micros: r.get(32)?,
        run_id: r.get(33)?,
        detail: r.get(34)?,
        bodies: None,
        enveloped: false,
        hot_hold_micros: None,
    })
}

/// Inserts a batch's usage records in one statement (one round trip on PostgreSQL), inside
/// the caller's transaction; `shortfalls[i]` is what record `i`'s wallet could not pay.
/// `ON CONFLICT DO NOTHING` on the request id makes a replayed batch (a retry after a failed
/// commit) harmless.
pub fn insert_usage_rows(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
    // SQLite binds at most 32 766 parameters in a statement: 500 rows of 35 stay well below.
    const ROWS_PER_STATEMENT: usize = 500;
    for (recs, falls) in batch
        .chunks(ROWS_PER_STATEMENT)
        .zip(shortfalls.chunks(ROWS_PER_STATEMENT))
    {
        insert_usage_statement(tx, recs, falls)?;
    }
    Ok(())
}

fn insert_usage_statement(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
    let mut rows: Vec<Value> = Vec::with_capacity(batch.len() * USAGE_COLUMN_COUNT);
    for (u, shortfall) in batch.iter().zip(shortfalls) {
        let row: [&dyn Param; USAGE_COLUMN_COUNT] = [
            &u.id,
            &u.ts_ms,
            &u.endpoint,
            &u.key_id,
            &u.agent,
            &u.team,
            &u.project,
            &json(&u.tags),
            &u.model_requested,
            &u.provider,
            &u.model_served,
            &u.attempts,
            &u.status,
            &u.error_kind,
            &u.input_tokens,
            &u.cached_input_tokens,
            &u.output_tokens,
            &u.reasoning_tokens,
            &u.usage_source,
            &u.cost_micros,
            &u.price_version,
            &u.latency_ms,
            &u.ttft_ms,
            &u.stream,
            &u.client_disconnected,
            &u.cache_write_5m_tokens,
            &u.cache_write_1h_tokens,
            &u.request_bytes,
            &u.response_bytes,
            &u.reused,
            &u.reused_from,
            &u.wallet_id,
            shortfall,
            &u.run_id,
            &u.detail,
        ];
        rows.extend(row.iter().map(|p| p.value()));
    }
    if !rows.is_empty() {
        let n = rows.len() / USAGE_COLUMN_COUNT;
        let mut sql = format!("INSERT INTO usage ({USAGE_COLUMNS}) VALUES ");
        for r in 0..n {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..USAGE_COLUMN_COUNT {
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("?{}", r * USAGE_COLUMN_COUNT + c + 1));
            }
            sql.push(')');
        }
        // A replayed batch (a retry after a failed commit) inserts nothing twice, and only
        // what was inserted is rolled up.
        sql.push_str(" ON CONFLICT DO NOTHING RETURNING id");
        let params: Vec<&dyn Param> = rows.iter().map(|v| v as &dyn Param).collect();
        let inserted: std::collections::HashSet<String> = tx
            .rows(&sql, &params)?
            .iter()
            .map(|r| r.get::<String>(0))
            .collect::<std::result::Result<_, _>>()?;
        let fresh: Vec<&UsageRecord> = batch.iter().filter(|u| inserted.contains(&u.id)).collect();
        upsert_rollups(tx, &fresh)?;
        for u in fresh.iter().filter(|u| u.bodies.is_some()) {
            if let Some(b) = &u.bodies {
                tx.exec(
                    "INSERT INTO usage_bodies (id, request, response, truncated) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT DO NOTHING",
                    &[&u.id, &b.request, &b.response, &b.truncated],
                )?;
            }
        }
    }
    Ok(())
}

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// What a rollup row is keyed by: a bucket, and the record's attribution and outcome class.
#[derive(Hash, PartialEq, Eq)]
struct RollupKey {
    bucket: &'static str,
    start_ms: i64,
    key_id: String,
    team: String,
    project: String,
    model: String,
    provider: String,
    endpoint: String,
    status_class: i64,
    error_kind: String,
}

#[derive(Default)]
struct RollupSums {
    agent: String,
    requests: i64,
    errors: i64,
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
    cache_write: u64,
    cost: u64,
    latency: u64,
}

/// The columns a rollup row is keyed by, in the primary key's order.
const ROLLUP_KEY: &str =
    "bucket, start_ms, key_id, team, project, model, provider, endpoint, status_class, error_kind";

/// Adds the batch's records to their hourly and daily rollups, in the writer's transaction:
/// rollups and records can never disagree. One statement per few hundred groups.
fn upsert_rollups(tx: &mut Db, recs: &[&UsageRecord]) -> Result<()> {
    let mut groups: HashMap<RollupKey, RollupSums> = HashMap::new();
    for u in recs {
        for (bucket, span) in [("h", HOUR_MS), ("d", DAY_MS)] {
            let key = RollupKey {
                bucket,
                start_ms: u.ts_ms.div_euclid(span) * span,
                key_id: u.key_id.clone(),
                team: u.team.clone().unwrap_or_default(),
                project: u.project.clone().unwrap_or_default(),
                model: u
                    .model_served
                    .clone()
                    .or_else(|| u.model_requested.clone())
                    .unwrap_or_default(),
                provider: u.provider.clone().unwrap_or_default(),
                endpoint: u.endpoint.clone(),
                status_class: i64::from(u.status / 100),
                error_kind: u.error_kind.clone().unwrap_or_default(),
            };
            let g = groups.entry(key).or_default();
            g.agent.clone_from(&u.agent);
            g.requests += 1;
            g.errors += i64::from(u.status >= 400 || u.error_kind.is_some());
            g.input = g.input.saturating_add(u.input_tokens);
            g.cached = g.cached.saturating_add(u.cached_input_tokens);
            g.output = g.output.saturating_add(u.output_tokens);
            g.reasoning = g.reasoning.saturating_add(u.reasoning_tokens);
            g.cache_write = g.cache_write.saturating_add(
                u.cache_write_5m_tokens
                    .saturating_add(u.cache_write_1h_tokens),
            );
            g.cost = g.cost.saturating_add(u.cost_micros);
            g.latency = g.latency.saturating_add(u.latency_ms);
        }
    }
    const COLS: usize = 20;
    let groups: Vec<(RollupKey, RollupSums)> = groups.into_iter().collect();
    for chunk in groups.chunks(500) {
        let mut values: Vec<Value> = Vec::with_capacity(chunk.len() * COLS);
        for (k, g) in chunk {
            let row: [&dyn Param; COLS] = [
                &k.bucket,
                &k.start_ms,
                &k.key_id,
                &k.team,
                &k.project,
                &k.model,
                &k.provider,
                &k.endpoint,
                &k.status_class,
                &k.error_kind,
                &g.agent,
                &g.requests,
                &g.errors,
                &g.input,
                &g.cached,
                &g.output,
                &g.reasoning,
                &g.cache_write,
                &g.cost,
                &g.latency,
            ];
            values.extend(row.iter().map(|p| p.value()));
        }
        let mut sql = format!(
            "INSERT INTO usage_rollup ({ROLLUP_KEY}, agent, requests, errors, input_tokens,
                cached_input_tokens, output_tokens, reasoning_tokens, cache_write_tokens,
                cost_micros, latency_ms_sum) VALUES "
        );
        for r in 0..chunk.len() {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..COLS {
                if c > 0 {
                    sql.push_str(", ");
                }
                sql.push_str(&format!("?{}", r * COLS + c + 1));
            }
            sql.push(')');
        }
        sql.push_str(&format!(
            " ON CONFLICT ({ROLLUP_KEY}) DO UPDATE SET agent = excluded.agent"
        ));
        for c in [
            "requests",
            "errors",
            "input_tokens",
            "cached_input_tokens",
            "output_tokens",
            "reasoning_tokens",
            "cache_write_tokens",
            "cost_micros",
            "latency_ms_sum",
        ] {
            sql.push_str(&format!(", {c} = usage_rollup.{c} + excluded.{c}"));
        }
        let params: Vec<&dyn Param> = values.iter().map(|v| v as &dyn Param).collect();
        tx.exec(&sql, &params)?;
    }
    Ok(())
}

/// Migration 13: the rollup table, filled from the records already there.
pub(super) const ROLLUP_MIGRATION: &str = "CREATE TABLE usage_rollup (
        bucket TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        team TEXT NOT NULL,
        project TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        status_class INTEGER NOT NULL,
        error_kind TEXT NOT NULL,
        agent TEXT NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        latency_ms_sum INTEGER NOT NULL,
        PRIMARY KEY (bucket, start_ms, key_id, team, project, model, provider, endpoint, status_class, error_kind)
     ) WITHOUT ROWID;
     INSERT INTO usage_rollup
        SELECT b.bucket, (u.ts_ms / b.span) * b.span, u.key_id, COALESCE(u.team, ''),
               COALESCE(u.project, ''), COALESCE(u.model_served, u.model_requested, ''),
               COALESCE(u.provider, ''), u.endpoint, u.status / 100, COALESCE(u.error_kind, ''),
               MAX(u.agent), COUNT(*),
               SUM(CASE WHEN u.status >= 400 OR u.error_kind IS NOT NULL THEN 1 ELSE 0 END),
               SUM(u.input_tokens), SUM(u.cached_input_tokens), SUM(u.output_tokens),
               SUM(u.reasoning_tokens), SUM(u.cache_write_5m_tokens + u.cache_write_1h_tokens),
               SUM(u.cost_micros), SUM(u.latency_ms)
        FROM usage u,
             (SELECT 'h' AS bucket, 3600000 AS span UNION ALL SELECT 'd', 86400000) b
        GROUP BY b.bucket, (u.ts_ms / b.span) * b.span, u.key_id, COALESCE(u.team, ''),
               COALESCE(u.project, ''), COALESCE(u.model_served, u.model_requested, ''),
               COALESCE(u.provider, ''), u.endpoint, u.status / 100, COALESCE(u.error_kind, '');";
