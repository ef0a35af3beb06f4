//! The usage table: rows in (one statement per batch), reports and raw records out.

use super::*;

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

impl Store {
    pub fn usage_report(&self, by: &GroupBy, since_ms: i64) -> Result<Vec<ReportRow>> {
        self.with(|db| {
            let pg = db.dialect() == Dialect::Postgres;
            let group = match by {
                GroupBy::Key => "agent || ' (' || key_id || ')'",
                GroupBy::Team => "COALESCE(team, '-')",
                GroupBy::Project => "COALESCE(project, '-')",
                GroupBy::Model => "COALESCE(model_served, model_requested, '-')",
                GroupBy::Day if pg => {
                    "to_char(to_timestamp(ts_ms / 1000) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
                }
                GroupBy::Day => "date(ts_ms / 1000, 'unixepoch')",
                GroupBy::Run => "COALESCE(run_id, '-')",
                GroupBy::Endpoint => "endpoint",
                GroupBy::Tag(_) if pg => "COALESCE(CAST(tags AS JSONB) ->> ?2, '-')",
                GroupBy::Tag(_) => "COALESCE(json_extract(tags, '$.' || json_quote(?2)), '-')",
            };
            // SUM over BIGINT is NUMERIC in PostgreSQL: cast back, identically on both.
            let sql = format!(
                "SELECT {group} AS g, COUNT(*),
                        CAST(SUM(CASE WHEN status >= 400 OR error_kind IS NOT NULL THEN 1 ELSE 0 END) AS BIGINT),
                        CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(cached_input_tokens) AS BIGINT),
                        CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(reasoning_tokens) AS BIGINT),
                        CAST(SUM(cost_micros) AS BIGINT),
                        CAST(SUM(cache_write_5m_tokens + cache_write_1h_tokens) AS BIGINT)
                 FROM usage WHERE ts_ms >= ?1 GROUP BY g ORDER BY SUM(cost_micros) DESC, g"
            );
            let rows = match by {
                GroupBy::Tag(t) => db.rows(&sql, &[&since_ms, t])?,
                _ => db.rows(&sql, &[&since_ms])?,
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
        enveloped: false,
        hot_hold_micros: None,
    })
}

/// Inserts a batch's usage records in one statement (one round trip on PostgreSQL), inside
/// the caller's transaction; `shortfalls[i]` is what record `i`'s wallet could not pay.
/// `ON CONFLICT DO NOTHING` on the request id makes a replayed batch (a retry after a failed
/// commit) harmless.
pub fn insert_usage_rows(tx: &mut Db, batch: &[UsageRecord], shortfalls: &[u64]) -> Result<()> {
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
        // A replayed batch (a retry after a failed commit) inserts nothing twice.
        sql.push_str(" ON CONFLICT DO NOTHING");
        let params: Vec<&dyn Param> = rows.iter().map(|v| v as &dyn Param).collect();
        tx.exec(&sql, &params)?;
    }
    Ok(())
}
