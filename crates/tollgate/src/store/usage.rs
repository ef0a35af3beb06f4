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

/// What one saver saved for one group (`savings_report`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedRow {
    pub group: String,
    pub saver: String,
    pub requests: u64,
    pub tokens: u64,
    pub micros: u64,
}

/// What `usage --by` groups on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Team,
    /// The key's organisation.
    Org,
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
            "org" => GroupBy::Org,
            "project" => GroupBy::Project,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "run" => GroupBy::Run,
            "endpoint" => GroupBy::Endpoint,
            _ => match s.strip_prefix("tag:") {
                Some(t) if !t.is_empty() => GroupBy::Tag(t.to_string()),
                _ => {
                    return Err(format!(
                        "cannot group by \"{s}\": use key, team, org, project, model, day, run, endpoint, tag:NAME or outcome"
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
    /// The group's expression over records, and the rollup dimension that holds it with the
    /// expression over that dimension's rows (None: not rolled up, read from records).
    fn exprs(&self, pg: bool) -> (&'static str, Option<(&'static str, &'static str)>) {
        match self {
            GroupBy::Key => ("agent || ' (' || key_id || ')'", Some(("key", "label"))),
            GroupBy::Team => ("COALESCE(NULLIF(team, ''), '-')", Some(("team", "label"))),
            GroupBy::Org => ("COALESCE(org, 'default')", Some(("org", "label"))),
            GroupBy::Project => (
                "COALESCE(NULLIF(project, ''), '-')",
                Some(("project", "label")),
            ),
            GroupBy::Model => (
                "COALESCE(NULLIF(COALESCE(model_served, model_requested), ''), '-')",
                Some(("model", "label")),
            ),
            GroupBy::Day if pg => (
                "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                Some((
                    "all",
                    "to_char(to_timestamp(start_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
                )),
            ),
            GroupBy::Day => (
                "date(ts_ms / 1000, 'unixepoch')",
                Some(("all", "date(start_ms / 1000, 'unixepoch')")),
            ),
            GroupBy::Run => ("COALESCE(run_id, '-')", None),
            GroupBy::Endpoint => ("endpoint", Some(("endpoint", "label"))),
            // Tags are not rolled up, so a tag report is records only: ?1, ?2, and the tag.
            GroupBy::Tag(_) if pg => ("COALESCE(CAST(tags AS JSONB) ->> ?2, '-')", None),
            GroupBy::Tag(_) => (
                "COALESCE(json_extract(tags, '$.' || json_quote(?2)), '-')",
                None,
            ),
        }
    }

    /// The `savings_rollup` dimension a savings report by this grouping reads, if it has one
    /// (every rolled-up grouping but day).
    pub fn savings_dim(&self) -> Option<&'static str> {
        match self.exprs(false).1 {
            Some((dim, "label")) => Some(dim),
            _ => None,
        }
    }

    /// Whether reports by this grouping read rollups (and so start on the hour).
    pub fn rolled_up(&self) -> bool {
        self.exprs(false).1.is_some()
    }
}

impl Store {
    pub fn usage_report(&self, by: &GroupBy, since_ms: i64) -> Result<Vec<ReportRow>> {
        self.usage_report_from(by, since_ms, crate::clock::now_ms(), ReportSource::Auto)
    }

    /// The report from `since_ms` on. From rollups (`Auto`, for every grouping but run and
    /// tag) the window starts at `report_start(since_ms)`, the hour `since_ms` falls in, and
    /// no record is read: the time it takes depends on the dimension's cardinality and the
    /// buckets in the window. Whole days come from daily rows, the hours around them from
    /// hourly rows; each part is one range on the key's prefix (an OR of two ranges made
    /// SQLite scan every hourly row of all time).
    pub fn usage_report_from(
        &self,
        by: &GroupBy,
        since_ms: i64,
        now_ms: i64,
        source: ReportSource,
    ) -> Result<Vec<ReportRow>> {
        self.with(|db| {
            let pg = db.dialect() == Dialect::Postgres;
            let (raw_group, rollup) = by.exprs(pg);
            let sums = "SELECT g, CAST(SUM(n) AS BIGINT), CAST(SUM(e) AS BIGINT), CAST(SUM(i) AS BIGINT),
                        CAST(SUM(c) AS BIGINT), CAST(SUM(o) AS BIGINT), CAST(SUM(r) AS BIGINT),
                        CAST(SUM(m) AS BIGINT), CAST(SUM(w) AS BIGINT)";
            let rows = match (rollup, source) {
                (Some((dim, group)), ReportSource::Auto) => {
                    let h1 = report_start(since_ms);
                    let (d1, d2) = whole_days(h1, now_ms).unwrap_or((i64::MAX, i64::MAX));
                    let part = |cond: &str| {
                        format!(
                            "SELECT {group} AS g, requests AS n, errors AS e, input_tokens AS i,
                                cached_input_tokens AS c, output_tokens AS o, reasoning_tokens AS r,
                                cost_micros AS m, cache_write_tokens AS w
                             FROM usage_rollup_dim WHERE dim = ?1 AND {cond}"
                        )
                    };
                    // SUM over BIGINT is NUMERIC in PostgreSQL: cast back, identically on both.
                    let sql = format!(
                        "{sums} FROM ({} UNION ALL {} UNION ALL {}) AS parts
                         GROUP BY g ORDER BY SUM(m) DESC, g",
                        part("bucket = 'h' AND start_ms >= ?2 AND start_ms < ?3"),
                        part("bucket = 'h' AND start_ms >= ?4"),
                        part("bucket = 'd' AND start_ms >= ?3 AND start_ms < ?4"),
                    );
                    db.rows(&sql, &[&dim, &h1, &d1, &d2])?
                }
                _ => {
                    let sql = format!(
                        "{sums} FROM (SELECT {raw_group} AS g, 1 AS n,
                            CASE WHEN status >= 400 OR error_kind IS NOT NULL THEN 1 ELSE 0 END AS e,
                            input_tokens AS i, cached_input_tokens AS c, output_tokens AS o,
                            reasoning_tokens AS r, cost_micros AS m,
                            cache_write_5m_tokens + cache_write_1h_tokens AS w
                         FROM usage WHERE ts_ms >= ?1) AS parts
                         GROUP BY g ORDER BY SUM(m) DESC, g"
                    );
                    match by {
                        GroupBy::Tag(t) => db.rows(&sql, &[&since_ms, t])?,
                        _ => db.rows(&sql, &[&since_ms])?,
                    }
                }
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

    /// What was saved from `since_ms` on (its hour, as every rollup report): one row per group
    /// and saver, from `savings_rollup`. `by` is a grouping with a rollup dimension
    /// (`GroupBy::savings_dim`), or `None` for the savers alone.
    pub fn savings_report(
        &self,
        by: Option<&GroupBy>,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<SavedRow>> {
        let (dim, group) = match by.map(GroupBy::savings_dim) {
            None => ("all", "saver"),
            Some(Some(dim)) => (dim, "label"),
            Some(None) => return Ok(Vec::new()),
        };
        self.with(|db| {
            let h1 = report_start(since_ms);
            let ceil_day = |t: i64| {
                t.div_euclid(DAY_MS) * DAY_MS + if t.rem_euclid(DAY_MS) == 0 { 0 } else { DAY_MS }
            };
            let (d1, d2) = match (ceil_day(h1), now_ms.div_euclid(DAY_MS) * DAY_MS) {
                (d1, d2) if d1 < d2 => (d1, d2),
                _ => (i64::MAX, i64::MAX),
            };
            let part = |cond: &str| {
                format!(
                    "SELECT {group} AS g, saver AS s, requests AS n, tokens AS t, micros AS m
                     FROM savings_rollup WHERE dim = ?1 AND {cond}"
                )
            };
            let sql = format!(
                "SELECT g, s, CAST(SUM(n) AS BIGINT), CAST(SUM(t) AS BIGINT), CAST(SUM(m) AS BIGINT)
                 FROM ({} UNION ALL {} UNION ALL {}) AS parts GROUP BY g, s ORDER BY g, s",
                part("bucket = 'h' AND start_ms >= ?2 AND start_ms < ?3"),
                part("bucket = 'h' AND start_ms >= ?4"),
                part("bucket = 'd' AND start_ms >= ?3 AND start_ms < ?4"),
            );
            db.rows(&sql, &[&dim, &h1, &d1, &d2])?
                .iter()
                .map(|r| {
                    Ok(SavedRow {
                        group: r.get(0)?,
                        saver: r.get(1)?,
                        requests: r.get(2)?,
                        tokens: r.get(3)?,
                        micros: r.get(4)?,
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

    /// Spend and requests per hour from `since_ms` on (the hour it falls in), from the hourly
    /// rollup of all traffic: `(hour start, cost, requests)`, oldest first, hours without
    /// traffic absent.
    pub fn hourly_spend(&self, since_ms: i64) -> Result<Vec<(i64, u64, u64)>> {
        let start = report_start(since_ms);
        self.with(|db| {
            db.rows(
                "SELECT start_ms, CAST(SUM(cost_micros) AS BIGINT), CAST(SUM(requests) AS BIGINT)
                 FROM usage_rollup_dim WHERE dim = 'all' AND bucket = 'h' AND start_ms >= ?1
                 GROUP BY start_ms ORDER BY start_ms",
                &[&start],
            )?
            .iter()
            .map(|r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<i64>(1)?.max(0) as u64,
                    r.get::<i64>(2)?.max(0) as u64,
                ))
            })
            .collect()
        })
    }

    /// The `limit` runs last active most recently from `since_ms` on (the hour it falls in),
    /// newest first, with what they did in that window: `(run, last hour, requests, errors,
    /// cost)`. Walks the per-run rollup's hours newest first on its `(start_ms, run_id)`
    /// index and stops once it has `limit` runs, then sums just those runs on the primary
    /// key: bounded by the page, not by the number of runs in the window (a GROUP BY over
    /// every run of 30 days took 1.4 s at 10 M records).
    pub fn recent_runs(&self, since_ms: i64, limit: u32) -> Result<Vec<RecentRun>> {
        let start = report_start(since_ms);
        let limit = limit as usize;
        let mut order: Vec<(String, i64)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        self.with(|db| {
            let mut hour: Option<i64> = None;
            while order.len() < limit {
                // The newest hour with activity below the last one looked at.
                let next = db
                    .row(
                        "SELECT MAX(start_ms) FROM usage_run_rollup
                         WHERE start_ms >= ?1 AND (CAST(?2 AS BIGINT) IS NULL OR start_ms < ?2)",
                        &[&start, &hour],
                    )?
                    .map(|r| r.get::<Option<i64>>(0))
                    .transpose()?
                    .flatten();
                let Some(h) = next else { break };
                for r in db.rows(
                    "SELECT DISTINCT run_id FROM usage_run_rollup WHERE start_ms = ?1
                     ORDER BY run_id DESC",
                    &[&h],
                )? {
                    let run: String = r.get(0)?;
                    if order.len() < limit && seen.insert(run.clone()) {
                        order.push((run, h));
                    }
                }
                hour = Some(h);
            }
            Ok(())
        })?;
        let runs: Vec<&str> = order.iter().map(|(r, _)| r.as_str()).collect();
        // `start` is an i64 of ours, so it goes into the text as a literal.
        let rows = self.rows_in(
            &runs,
            |list| {
                format!(
                    "SELECT run_id, CAST(SUM(requests) AS BIGINT), CAST(SUM(errors) AS BIGINT),
                            CAST(SUM(cost_micros) AS BIGINT)
                     FROM usage_run_rollup WHERE run_id IN ({list}) AND start_ms >= {start}
                     GROUP BY run_id"
                )
            },
            "?{}",
        )?;
        let mut sums: HashMap<String, (u64, u64, u64)> = HashMap::new();
        for r in rows {
            sums.insert(
                r.get(0)?,
                (
                    r.get::<i64>(1)?.max(0) as u64,
                    r.get::<i64>(2)?.max(0) as u64,
                    r.get::<i64>(3)?.max(0) as u64,
                ),
            );
        }
        Ok(order
            .into_iter()
            .map(|(run, last_hour_ms)| {
                let (requests, errors, cost_micros) = sums.get(&run).copied().unwrap_or_default();
                RecentRun {
                    run,
                    last_hour_ms,
                    requests,
                    errors,
                    cost_micros,
                }
            })
            .collect())
    }

    /// The status and error kind of the newest `limit` records since `since_ms`, newest
    /// first: what the dashboard's refusal shares are taken over (bounded whatever the
    /// traffic, by the `ts_ms` index).
    pub fn recent_statuses(&self, since_ms: i64, limit: u32) -> Result<Vec<(u16, Option<String>)>> {
        self.with(|db| {
            db.rows(
                "SELECT status, error_kind FROM usage WHERE ts_ms >= ?1 ORDER BY ts_ms DESC LIMIT ?2",
                &[&since_ms, &limit],
            )?
            .iter()
            .map(|r| Ok((r.get::<i64>(0)?.clamp(0, 999) as u16, r.get::<Option<String>>(1)?)))
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
    ) -> Result<Vec<(i64, String, [u64; 5])>> {
        self.with(|db| {
            db.rows(
                "SELECT (ts_ms / 86400000) * 86400000, COALESCE(model_served, model_requested, '-'),
                        CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(cached_input_tokens) AS BIGINT),
                        CAST(SUM(cache_write_5m_tokens + cache_write_1h_tokens) AS BIGINT),
                        CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(cost_micros) AS BIGINT)
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
                    [r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?],
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
    response_bytes, reused, reused_from, wallet_id, shortfall_micros, run_id, detail, org,
    cache, savings, cascade";

pub(super) const USAGE_COLUMN_COUNT: usize = 39;

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
        org: r.get(35)?,
        cache: r.get(36)?,
        savings: r
            .get::<Option<String>>(37)?
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default(),
        cascade: r.get(38)?,
        bodies: None,
        enveloped: false,
        trace: Default::default(),
        genai_provider: None,
        hot_hold_micros: None,
        captured_micros: None,
        policy: Vec::new(),
        redactions: Vec::new(),
    })
}

/// Inserts a batch's usage records in one statement (one round trip on PostgreSQL), inside
/// the caller's transaction; `shortfalls[i]` is what record `i`'s wallet could not pay.
/// `ON CONFLICT DO NOTHING` on the request id makes a replayed batch (a retry after a failed
/// commit) harmless.
pub fn insert_usage_rows(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
    if tx.dialect() == crate::db::Dialect::Sqlite {
        return insert_usage_one_by_one(tx, batch, shortfalls);
    }
    // SQLite binds at most 32 766 parameters in a statement: 256 rows of 39 stay well below.
    let mut at = 0;
    for n in statement_sizes(batch.len().min(shortfalls.len())) {
        insert_usage_statement(tx, &batch[at..at + n], &shortfalls[at..at + n])?;
        at += n;
    }
    Ok(())
}

/// A record's column values, in `USAGE_COLUMNS` order.
fn usage_values(u: &UsageRecord, shortfall: u64, out: &mut Vec<Value>) {
    let savings = (!u.savings.is_empty()).then(|| json(&u.savings));
    {
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
            &shortfall,
            &u.run_id,
            &u.detail,
            &u.org,
            &u.cache,
            &savings,
            &u.cascade,
        ];
        out.extend(row.iter().map(|p| p.value()));
    }
}

/// SQLite: one prepared one-row INSERT per record. Its statement is parsed once; a multi-row
/// statement (one round trip, what PostgreSQL needs) costs SQLite more per row, and its
/// statement-cache key is tens of kilobytes of SQL to hash and compare (bench/RESULTS.md,
/// run J). A record already there (a replayed batch) changes nothing and is not rolled up.
fn insert_usage_one_by_one(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
    let sql = multi_row_sql(
        "usage one by one",
        &format!("INSERT INTO usage ({USAGE_COLUMNS}) VALUES "),
        " ON CONFLICT DO NOTHING",
        USAGE_COLUMN_COUNT,
        1,
    );
    let mut values: Vec<Value> = Vec::with_capacity(USAGE_COLUMN_COUNT);
    let mut fresh: Vec<&UsageRecord> = Vec::with_capacity(batch.len());
    for (u, shortfall) in batch.iter().zip(shortfalls) {
        values.clear();
        usage_values(u, *shortfall, &mut values);
        if tx.exec_values(&sql, &values)? == 1 {
            fresh.push(u);
        }
    }
    insert_fresh(tx, &fresh)
}

/// The rollups and kept bodies of the records a batch inserted.
fn insert_fresh(tx: &mut Db, fresh: &[&UsageRecord]) -> Result<()> {
    upsert_rollups(tx, fresh)?;
    upsert_savings(tx, fresh)?;
    for u in fresh.iter().filter(|u| u.bodies.is_some()) {
        if let Some(b) = &u.bodies {
            tx.exec(
                "INSERT INTO usage_bodies (id, request, response, truncated) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT DO NOTHING",
                &[&u.id, &b.request, &b.response, &b.truncated],
            )?;
        }
    }
    Ok(())
}

fn insert_usage_statement(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
    let mut rows: Vec<Value> = Vec::with_capacity(batch.len() * USAGE_COLUMN_COUNT);
    for (u, shortfall) in batch.iter().zip(shortfalls) {
        usage_values(u, *shortfall, &mut rows);
    }
    if !rows.is_empty() {
        let n = rows.len() / USAGE_COLUMN_COUNT;
        let sql = multi_row_sql(
            "usage returning ids",
            &format!("INSERT INTO usage ({USAGE_COLUMNS}) VALUES "),
            " ON CONFLICT DO NOTHING RETURNING id",
            USAGE_COLUMN_COUNT,
            n,
        );
        // A replayed batch (a retry after a failed commit) inserts nothing twice, and only
        // what was inserted is rolled up.
        let params: Vec<&dyn Param> = rows.iter().map(|v| v as &dyn Param).collect();
        let inserted: std::collections::HashSet<String> = tx
            .rows(&sql, &params)?
            .iter()
            .map(|r| r.get::<String>(0))
            .collect::<std::result::Result<_, _>>()?;
        let fresh: Vec<&UsageRecord> = batch.iter().filter(|u| inserted.contains(&u.id)).collect();
        insert_fresh(tx, &fresh)?;
    }
    Ok(())
}

pub(crate) const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;

/// The start of a report that reads rollups: `since` rounded down to its hour, so that no
/// record is read and the report's time depends on how many groups there are, never on how
/// many records (ADR 0021). Reports say which start they used.
pub fn report_start(since_ms: i64) -> i64 {
    since_ms.div_euclid(HOUR_MS) * HOUR_MS
}

/// The whole UTC days between `start_ms` and `now_ms`, `[first midnight, last midnight)`,
/// which reports read from daily rollups; `None` when there are none.
pub fn whole_days(start_ms: i64, now_ms: i64) -> Option<(i64, i64)> {
    let ceil = start_ms.div_euclid(DAY_MS) * DAY_MS
        + if start_ms.rem_euclid(DAY_MS) == 0 {
            0
        } else {
            DAY_MS
        };
    let floor = now_ms.div_euclid(DAY_MS) * DAY_MS;
    (ceil < floor).then_some((ceil, floor))
}

/// What a full rollup row is keyed by: a bucket, and the record's attribution and outcome class.
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

/// What every rollup row sums.
#[derive(Default, Clone, Copy)]
struct Sums {
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

const SUM_COLUMNS: [&str; 9] = [
    "requests",
    "errors",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_write_tokens",
    "cost_micros",
    "latency_ms_sum",
];

impl Sums {
    fn add(&mut self, u: &UsageRecord) {
        self.requests += 1;
        self.errors += i64::from(u.status >= 400 || u.error_kind.is_some());
        self.input = self.input.saturating_add(u.input_tokens);
        self.cached = self.cached.saturating_add(u.cached_input_tokens);
        self.output = self.output.saturating_add(u.output_tokens);
        self.reasoning = self.reasoning.saturating_add(u.reasoning_tokens);
        self.cache_write = self.cache_write.saturating_add(
            u.cache_write_5m_tokens
                .saturating_add(u.cache_write_1h_tokens),
        );
        self.cost = self.cost.saturating_add(u.cost_micros);
        self.latency = self.latency.saturating_add(u.latency_ms);
    }

    fn values(&self) -> [Value; 9] {
        [
            self.requests.value(),
            self.errors.value(),
            self.input.value(),
            self.cached.value(),
            self.output.value(),
            self.reasoning.value(),
            self.cache_write.value(),
            self.cost.value(),
            self.latency.value(),
        ]
    }
}

/// The columns a full rollup row is keyed by, in the primary key's order.
const ROLLUP_KEY: &str =
    "bucket, start_ms, key_id, team, project, model, provider, endpoint, status_class, error_kind";

/// The dimensions a report can group by, each summed on its own (`usage_rollup_dim`): a
/// report reads one dimension's rows, so its cost is that dimension's cardinality times the
/// buckets in the window, not the product of every dimension's. `all` is the total, for `by day`.
const DIMENSIONS: [&str; 7] = ["key", "team", "org", "project", "model", "endpoint", "all"];

/// A record's value in one dimension: what it is keyed by, and what a report shows for it.
fn dimension_value(u: &UsageRecord, dim: &str) -> (String, String) {
    let or_dash = |v: &Option<String>| {
        v.clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "-".into())
    };
    match dim {
        "key" => (u.key_id.clone(), format!("{} ({})", u.agent, u.key_id)),
        "team" => (or_dash(&u.team), or_dash(&u.team)),
        "org" => {
            let org = u.org.clone().unwrap_or_else(|| "default".into());
            (org.clone(), org)
        }
        "project" => (or_dash(&u.project), or_dash(&u.project)),
        "model" => {
            let m = or_dash(&u.model_served.clone().or_else(|| u.model_requested.clone()));
            (m.clone(), m)
        }
        "endpoint" => (u.endpoint.clone(), u.endpoint.clone()),
        _ => ("*".into(), "*".into()),
    }
}

/// Adds the batch's records to their rollups, in the writer's transaction: rollups and
/// records can never disagree. Three tables: the full rollup (every attribution dimension
/// and the outcome class, hourly, for drill-down with filters), one row per dimension value
/// (hourly and daily, what reports read) and per run and hour (what outcomes are set
/// against). One statement per up to 256 groups.
fn upsert_rollups(tx: &mut Db, recs: &[&UsageRecord]) -> Result<()> {
    let mut full: HashMap<RollupKey, (String, String, Sums)> = HashMap::new();
    let mut dims: HashMap<(&'static str, &'static str, i64, String), (String, Sums)> =
        HashMap::new();
    let mut runs: HashMap<(String, i64, String), Sums> = HashMap::new();
    for u in recs {
        let model = u
            .model_served
            .clone()
            .or_else(|| u.model_requested.clone())
            .unwrap_or_default();
        let hour = u.ts_ms.div_euclid(HOUR_MS) * HOUR_MS;
        let key = RollupKey {
            bucket: "h",
            start_ms: hour,
            key_id: u.key_id.clone(),
            team: u.team.clone().unwrap_or_default(),
            project: u.project.clone().unwrap_or_default(),
            model: model.clone(),
            provider: u.provider.clone().unwrap_or_default(),
            endpoint: u.endpoint.clone(),
            status_class: i64::from(u.status / 100),
            error_kind: u.error_kind.clone().unwrap_or_default(),
        };
        let g = full.entry(key).or_default();
        g.0.clone_from(&u.agent);
        g.1 = u.org.clone().unwrap_or_else(|| "default".into());
        g.2.add(u);
        for (bucket, span) in [("h", HOUR_MS), ("d", DAY_MS)] {
            let start_ms = u.ts_ms.div_euclid(span) * span;
            for dim in DIMENSIONS {
                let (value, label) = dimension_value(u, dim);
                let g = dims.entry((dim, bucket, start_ms, value)).or_default();
                g.0 = label;
                g.1.add(u);
            }
        }
        if let Some(run) = &u.run_id {
            runs.entry((run.clone(), u.ts_ms.div_euclid(HOUR_MS) * HOUR_MS, model))
                .or_default()
                .add(u);
        }
    }
    let full: Vec<(Vec<Value>, Vec<Value>, Sums)> = full
        .into_iter()
        .map(|(k, (agent, org, sums))| {
            (
                vec![
                    k.bucket.value(),
                    k.start_ms.value(),
                    k.key_id.value(),
                    k.team.value(),
                    k.project.value(),
                    k.model.value(),
                    k.provider.value(),
                    k.endpoint.value(),
                    k.status_class.value(),
                    k.error_kind.value(),
                ],
                vec![agent.value(), org.value()],
                sums,
            )
        })
        .collect();
    upsert_sums(tx, "usage_rollup", ROLLUP_KEY, &["agent", "org"], full)?;
    let dims = dims
        .into_iter()
        .map(|((dim, bucket, start, value), (label, sums))| {
            (
                vec![dim.value(), bucket.value(), start.value(), value.value()],
                vec![label.value()],
                sums,
            )
        })
        .collect();
    upsert_sums(
        tx,
        "usage_rollup_dim",
        "dim, bucket, start_ms, value",
        &["label"],
        dims,
    )?;
    let runs = runs
        .into_iter()
        .map(|((run, start, model), sums)| {
            (
                vec![run.value(), start.value(), model.value()],
                vec![],
                sums,
            )
        })
        .collect();
    upsert_sums(tx, "usage_run_rollup", "run_id, start_ms, model", &[], runs)
}

/// Adds what the batch's records saved to `savings_rollup`: per dimension value (as in
/// `usage_rollup_dim`) and saver, hourly and daily. Nothing to do for most batches.
fn upsert_savings(tx: &mut Db, recs: &[&UsageRecord]) -> Result<()> {
    type Group = (&'static str, &'static str, i64, String, String);
    let mut groups: HashMap<Group, (String, u64, u64, u64)> = HashMap::new();
    for u in recs.iter().filter(|u| !u.savings.is_empty()) {
        for (bucket, span) in [("h", HOUR_MS), ("d", DAY_MS)] {
            let start_ms = u.ts_ms.div_euclid(span) * span;
            for dim in DIMENSIONS {
                let (value, label) = dimension_value(u, dim);
                for sv in &u.savings {
                    let g = groups
                        .entry((dim, bucket, start_ms, value.clone(), sv.saver.clone()))
                        .or_default();
                    g.0.clone_from(&label);
                    g.1 += 1;
                    g.2 = g.2.saturating_add(sv.tokens);
                    g.3 = g.3.saturating_add(sv.micros);
                }
            }
        }
    }
    let rows = groups
        .into_iter()
        .map(
            |((dim, bucket, start, value, saver), (label, n, tokens, micros))| {
                (
                    vec![
                        dim.value(),
                        bucket.value(),
                        start.value(),
                        value.value(),
                        saver.value(),
                    ],
                    vec![label.value()],
                    vec![n.value(), tokens.value(), micros.value()],
                )
            },
        )
        .collect();
    upsert_columns(
        tx,
        "savings_rollup",
        "dim, bucket, start_ms, value, saver",
        &["label"],
        &["requests", "tokens", "micros"],
        rows,
    )
}

/// Inserts rollup rows, adding their sums to rows already there; `latest` columns take the
/// newest value (an agent's current name).
fn upsert_sums(
    tx: &mut Db,
    table: &'static str,
    key: &str,
    latest: &[&str],
    rows: Vec<(Vec<Value>, Vec<Value>, Sums)>,
) -> Result<()> {
    let rows = rows
        .into_iter()
        .map(|(k, l, s)| (k, l, s.values().to_vec()))
        .collect();
    upsert_columns(tx, table, key, latest, &SUM_COLUMNS, rows)
}

/// `upsert_sums` with any summed columns (`sum_columns`, in the order of each row's third part).
fn upsert_columns(
    tx: &mut Db,
    table: &'static str,
    key: &str,
    latest: &[&str],
    sum_columns: &[&str],
    rows: Vec<(Vec<Value>, Vec<Value>, Vec<Value>)>,
) -> Result<()> {
    let Some(first) = rows.first() else {
        return Ok(());
    };
    let cols = first.0.len() + first.1.len() + sum_columns.len();
    let mut head = format!("INSERT INTO {table} ({key}");
    for c in latest.iter().chain(sum_columns.iter()) {
        head.push_str(", ");
        head.push_str(c);
    }
    head.push_str(") VALUES ");
    let mut tail = format!(" ON CONFLICT ({key}) DO UPDATE SET ");
    for c in latest {
        tail.push_str(&format!("{c} = excluded.{c}, "));
    }
    let sums: Vec<String> = sum_columns
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    tail.push_str(&sums.join(", "));
    let mut at = 0;
    for n in statement_sizes(rows.len()) {
        let chunk = &rows[at..at + n];
        at += n;
        let mut values: Vec<Value> = Vec::with_capacity(n * cols);
        for (k, l, s) in chunk {
            values.extend(k.iter().cloned());
            values.extend(l.iter().cloned());
            values.extend(s.iter().cloned());
        }
        let sql = multi_row_sql(table, &head, &tail, cols, n);
        let params: Vec<&dyn Param> = values.iter().map(|v| v as &dyn Param).collect();
        tx.exec(&sql, &params)?;
    }
    Ok(())
}

/// Statement sizes for `n` rows, from a fixed set: each size's statement is parsed once and
/// then comes from the statement cache. (One statement of exactly `n` rows was parsed anew
/// for nearly every batch, since batches vary: ~18 000 placeholders of SQL each time, a
/// third of the writer's time.) At most 256 rows: 256 × 39 columns is under SQLite's
/// 32 766 bound parameters.
fn statement_sizes(mut n: usize) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        let size = [256, 64, 16, 4, 1].into_iter().find(|s| *s <= n)?;
        n -= size;
        Some(size)
    })
}

/// The text of a multi-row INSERT of `rows` rows of `cols` placeholders between `head` and
/// `tail`, made once per (statement, rows) per thread: formatting thousands of placeholders
/// per statement showed in the writer's profile. `id` names the statement, so two
/// statements must never share one: the SQLite insert (no RETURNING) and PostgreSQL's (which
/// returns the ids it inserted) once did, and a thread that wrote to both stores rolled up
/// nothing of PostgreSQL's one-row statements.
fn multi_row_sql(
    id: &'static str,
    head: &str,
    tail: &str,
    cols: usize,
    rows: usize,
) -> std::rc::Rc<str> {
    use std::fmt::Write;
    thread_local! {
        static MEMO: std::cell::RefCell<HashMap<(&'static str, usize), std::rc::Rc<str>>> =
            std::cell::RefCell::new(HashMap::new());
    }
    MEMO.with(|m| {
        m.borrow_mut()
            .entry((id, rows))
            .or_insert_with(|| {
                let mut sql = String::with_capacity(head.len() + tail.len() + rows * cols * 7);
                sql.push_str(head);
                for r in 0..rows {
                    sql.push_str(if r > 0 { ", (" } else { "(" });
                    for c in 0..cols {
                        if c > 0 {
                            sql.push_str(", ");
                        }
                        let _ = write!(sql, "?{}", r * cols + c + 1);
                    }
                    sql.push(')');
                }
                sql.push_str(tail);
                sql.into()
            })
            .clone()
    })
}

/// One line of the dashboard's runs list (`Store::recent_runs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentRun {
    pub run: String,
    /// The start of the newest hour the run was active in.
    pub last_hour_ms: i64,
    pub requests: u64,
    pub errors: u64,
    pub cost_micros: u64,
}

/// Migration 16: records name their key's organisation; reports read one rollup row per
/// dimension value; outcomes are set against per-run rollups. All three are filled from what
/// is already there, so an upgraded store reports what it reported before. The full rollup
/// keeps its hourly rows only: its daily rows cost a quarter of the writer's time and no
/// report needs them any more.
pub(super) const DIMENSION_MIGRATION: &str = "ALTER TABLE usage ADD COLUMN org TEXT;
     UPDATE usage SET org = (SELECT k.org FROM keys k WHERE k.id = usage.key_id);
     ALTER TABLE usage_rollup ADD COLUMN org TEXT NOT NULL DEFAULT 'default';
     UPDATE usage_rollup SET org = COALESCE((SELECT k.org FROM keys k WHERE k.id = usage_rollup.key_id), 'default');
     CREATE TABLE usage_rollup_dim (
        dim TEXT NOT NULL,
        bucket TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        value TEXT NOT NULL,
        label TEXT NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        latency_ms_sum INTEGER NOT NULL,
        PRIMARY KEY (dim, bucket, start_ms, value)
     ) WITHOUT ROWID;
     CREATE TABLE usage_run_rollup (
        run_id TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        model TEXT NOT NULL,
        requests INTEGER NOT NULL,
        errors INTEGER NOT NULL,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cache_write_tokens INTEGER NOT NULL,
        cost_micros INTEGER NOT NULL,
        latency_ms_sum INTEGER NOT NULL,
        PRIMARY KEY (run_id, start_ms, model)
     ) WITHOUT ROWID;
     INSERT INTO usage_run_rollup
        SELECT run_id, (ts_ms / 3600000) * 3600000, COALESCE(model_served, model_requested, ''),
               COUNT(*), SUM(CASE WHEN status >= 400 OR error_kind IS NOT NULL THEN 1 ELSE 0 END),
               SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
               SUM(reasoning_tokens), SUM(cache_write_5m_tokens + cache_write_1h_tokens),
               SUM(cost_micros), SUM(latency_ms)
        FROM usage WHERE run_id IS NOT NULL
        GROUP BY run_id, (ts_ms / 3600000) * 3600000, COALESCE(model_served, model_requested, '');
     INSERT INTO usage_rollup_dim
        SELECT 'key', bucket, start_ms, key_id, MAX(agent) || ' (' || key_id || ')', SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, key_id;
     INSERT INTO usage_rollup_dim
        SELECT 'team', bucket, start_ms, COALESCE(NULLIF(team, ''), '-'), COALESCE(NULLIF(team, ''), '-'), SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, COALESCE(NULLIF(team, ''), '-');
     INSERT INTO usage_rollup_dim
        SELECT 'org', bucket, start_ms, org, org, SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, org;
     INSERT INTO usage_rollup_dim
        SELECT 'project', bucket, start_ms, COALESCE(NULLIF(project, ''), '-'), COALESCE(NULLIF(project, ''), '-'), SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, COALESCE(NULLIF(project, ''), '-');
     INSERT INTO usage_rollup_dim
        SELECT 'model', bucket, start_ms, COALESCE(NULLIF(model, ''), '-'), COALESCE(NULLIF(model, ''), '-'), SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, COALESCE(NULLIF(model, ''), '-');
     INSERT INTO usage_rollup_dim
        SELECT 'endpoint', bucket, start_ms, endpoint, endpoint, SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms, endpoint;
     INSERT INTO usage_rollup_dim
        SELECT 'all', bucket, start_ms, '*', '*', SUM(requests), SUM(errors), SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens), SUM(reasoning_tokens), SUM(cache_write_tokens), SUM(cost_micros), SUM(latency_ms_sum)
        FROM usage_rollup GROUP BY bucket, start_ms;
     DELETE FROM usage_rollup WHERE bucket = 'd';";

/// Migration 13: the rollup table, filled from the records already there.
/// Migration 20: what the response cache did, what each request saved, and its rollup.
pub(super) const SAVINGS_MIGRATION: &str = "ALTER TABLE usage ADD COLUMN cache TEXT;
     ALTER TABLE usage ADD COLUMN savings TEXT;
     CREATE TABLE savings_rollup (
        dim TEXT NOT NULL,
        bucket TEXT NOT NULL,
        start_ms INTEGER NOT NULL,
        value TEXT NOT NULL,
        saver TEXT NOT NULL,
        label TEXT NOT NULL,
        requests INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        micros INTEGER NOT NULL,
        PRIMARY KEY (dim, bucket, start_ms, value, saver)
     ) WITHOUT ROWID;";

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
