//! Usage analytics in ClickHouse (`[analytics] backend = "clickhouse"`, ADR 0032): every usage
//! record the store commits, every ledger capture its settle made and every outcome recorded
//! is also sent to ClickHouse, and usage reports, the request log and the ROI report are
//! answered from there. The ledger and wallets stay in the store; nothing here decides money.
//!
//! The path of a record: the store's writer commits a batch, then hands its rows (already
//! written in ClickHouse's RowBinary format, `rows.rs`) to the sink's bounded queue without
//! waiting (`Sink::offer`, `sink.rs`). The sink task gathers up to `batch_max` rows or
//! `flush_interval`, and inserts them over ClickHouse's HTTP interface. When an insert fails,
//! the rows go to a spill file in the data dir (bounded by `spill_max_bytes`) and so does
//! everything after, until ClickHouse answers again; then the spill file is replayed. A full
//! queue spills too, so neither a slow ClickHouse nor a dead one ever holds up the writer.
//!
//! Exactly once: an insert whose outcome is unknown (a timeout, a connection cut after the
//! rows were sent) may have landed. So every retry and every replay first asks which of its
//! ids ClickHouse already has, and inserts only the others. That works on every ClickHouse
//! version (18.16 has neither insert deduplication tokens nor deduplication on
//! non-replicated tables), and keeps the rollup views exact, which a replacing engine would
//! not: a view sums every insert, duplicates included.
//!
//! Schema: versioned migrations owned by tollgate (`MIGRATIONS`), applied on start and by
//! `tollgate migrate`, recorded in `tollgate_migrations`. `usage` is a MergeTree partitioned
//! by month and ordered by (day, team, key_id, id); `usage_daily` and `usage_hourly`
//! SummingMergeTrees fed by materialized views; `outcomes` and `ledger` MergeTrees by month.
//! Money is integer micro-USD throughout. The SQL is what ClickHouse 18.16 (Debian's) and
//! current releases both accept: no `LowCardinality`, no `DateTime64`, no JSON functions
//! (tags are two parallel arrays), no `IF NOT EXISTS` on a column.

mod read;
mod rows;
mod sink;

pub use sink::{Analytics, Sink};

use crate::config::AnalyticsConfig;
use crate::store::{GroupBy, ReportRow};
use rows::{day_text, Chunk, Table, DAY_MS, HOUR_MS};
use serde::Deserialize;
use std::time::Duration;

/// Applied in order, each once. Never edit one that has shipped: add the next.
const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        "CREATE TABLE IF NOT EXISTS {db}.usage (
            id String, ts_ms Int64, day Date, endpoint String,
            key_id String, agent String, team String, org String, project String,
            model String, model_requested String, model_served String, provider String,
            status UInt16, error UInt8, error_kind String, run_id String,
            tag_keys Array(String), tag_values Array(String),
            input_tokens UInt64, cached_input_tokens UInt64, output_tokens UInt64,
            reasoning_tokens UInt64, cache_write_tokens UInt64,
            cost_micros UInt64, saved_micros UInt64, latency_ms UInt64, ttft_ms UInt64,
            stream UInt8, cache String, usage_source String, price_version String,
            wallet_id String
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (day, team, key_id, id)",
    ),
    (
        2,
        "CREATE TABLE IF NOT EXISTS {db}.usage_daily (
            day Date, key_id String, agent String, team String, org String, project String,
            model String, endpoint String,
            requests UInt64, errors UInt64, input_tokens UInt64, cached_input_tokens UInt64,
            output_tokens UInt64, reasoning_tokens UInt64, cache_write_tokens UInt64,
            cost_micros UInt64, saved_micros UInt64
        ) ENGINE = SummingMergeTree PARTITION BY toYYYYMM(day)
          ORDER BY (day, key_id, agent, team, org, project, model, endpoint)",
    ),
    (
        3,
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_daily_mv TO {db}.usage_daily AS
         SELECT day, key_id, agent, team, org, project, model, endpoint,
                count() AS requests, sum(toUInt64(error)) AS errors,
                sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
                sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens,
                sum(cache_write_tokens) AS cache_write_tokens, sum(cost_micros) AS cost_micros,
                sum(saved_micros) AS saved_micros
         FROM {db}.usage GROUP BY day, key_id, agent, team, org, project, model, endpoint",
    ),
    (
        4,
        "CREATE TABLE IF NOT EXISTS {db}.usage_hourly (
            day Date, hour_ms Int64, key_id String, agent String, team String, org String,
            project String, model String, endpoint String,
            requests UInt64, errors UInt64, input_tokens UInt64, cached_input_tokens UInt64,
            output_tokens UInt64, reasoning_tokens UInt64, cache_write_tokens UInt64,
            cost_micros UInt64, saved_micros UInt64
        ) ENGINE = SummingMergeTree PARTITION BY toYYYYMM(day)
          ORDER BY (hour_ms, key_id, agent, team, org, project, model, endpoint)",
    ),
    (
        5,
        "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.usage_hourly_mv TO {db}.usage_hourly AS
         SELECT day, intDiv(ts_ms, 3600000) * 3600000 AS hour_ms, key_id, agent, team, org,
                project, model, endpoint,
                count() AS requests, sum(toUInt64(error)) AS errors,
                sum(input_tokens) AS input_tokens, sum(cached_input_tokens) AS cached_input_tokens,
                sum(output_tokens) AS output_tokens, sum(reasoning_tokens) AS reasoning_tokens,
                sum(cache_write_tokens) AS cache_write_tokens, sum(cost_micros) AS cost_micros,
                sum(saved_micros) AS saved_micros
         FROM {db}.usage
         GROUP BY day, hour_ms, key_id, agent, team, org, project, model, endpoint",
    ),
    (
        6,
        "CREATE TABLE IF NOT EXISTS {db}.rollup_suspects (hour_ms Int64, noted_ms Int64)
         ENGINE = MergeTree ORDER BY hour_ms",
    ),
    (
        7,
        "CREATE TABLE IF NOT EXISTS {db}.rollup_repaired (hour_ms Int64, repaired_ms Int64)
         ENGINE = MergeTree ORDER BY hour_ms",
    ),
    // What the request log shows of a record beyond what reports sum, and which optional
    // fields were absent (`rows::absent`). Rows from before read as empty.
    (
        8,
        "ALTER TABLE {db}.usage
            ADD COLUMN attempts UInt32, ADD COLUMN client_disconnected UInt8,
            ADD COLUMN cache_write_5m_tokens UInt64, ADD COLUMN cache_write_1h_tokens UInt64,
            ADD COLUMN request_bytes UInt64, ADD COLUMN response_bytes UInt64,
            ADD COLUMN reused String, ADD COLUMN reused_from String,
            ADD COLUMN shortfall_micros UInt64, ADD COLUMN detail String,
            ADD COLUMN cascade String, ADD COLUMN saving_savers Array(String),
            ADD COLUMN saving_tokens Array(UInt64), ADD COLUMN saving_micros Array(UInt64),
            ADD COLUMN absent UInt32",
    ),
    (
        9,
        "CREATE TABLE IF NOT EXISTS {db}.outcomes (
            id String, occurred_ms Int64, day Date, key_id String, agent String,
            team String, project String, run_id String, request_id String, kind String,
            success UInt8, value_micros Int64, tag_keys Array(String), tag_values Array(String),
            created_ms Int64, absent UInt32
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (day, id)",
    ),
    // The captures of the store's ledger (its other entries are operators' and net zero
    // per request), with what the spend is attributed to.
    (
        10,
        "CREATE TABLE IF NOT EXISTS {db}.ledger (
            id String, ts_ms Int64, day Date, wallet_id String, kind String,
            amount_micros Int64, request_id String, key_id String, agent String, team String,
            org String, project String, model String
        ) ENGINE = MergeTree PARTITION BY toYYYYMM(day) ORDER BY (day, wallet_id, id)",
    ),
];

/// The rollups' columns after their keys, and how each is summed from `usage`.
const ROLLUP_SUMS: &[(&str, &str)] = &[
    ("requests", "count()"),
    ("errors", "sum(toUInt64(error))"),
    ("input_tokens", "sum(input_tokens)"),
    ("cached_input_tokens", "sum(cached_input_tokens)"),
    ("output_tokens", "sum(output_tokens)"),
    ("reasoning_tokens", "sum(reasoning_tokens)"),
    ("cache_write_tokens", "sum(cache_write_tokens)"),
    ("cost_micros", "sum(cost_micros)"),
    ("saved_micros", "sum(saved_micros)"),
];
const ROLLUP_DIMS: &str = "key_id, agent, team, org, project, model, endpoint";

/// How long after a day ends its suspect hours are repaired: late inserts of its rows (an
/// insert in flight, clocks apart) are done by then.
const REPAIR_AFTER_MS: i64 = 10 * 60_000;
/// How often the sink looks for suspect hours due for repair.
const REPAIR_EVERY: Duration = Duration::from_secs(60);

/// The migration whose view feeds `usage_hourly`: the hours it covers start from when it was
/// applied.
const HOURLY_VIEW: u32 = 5;

/// The first hour `usage_hourly` holds in full, given when its view was created (`applied`,
/// 0 when `usage` was still empty then): rows written before the view are only in `usage`.
/// The ten minutes cover an insert in flight while the view was created, and clocks apart.
fn hourly_from(applied_ms: i64) -> i64 {
    if applied_ms == 0 {
        return i64::MIN;
    }
    (applied_ms + 10 * 60_000).div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS
}

/// `YYYY-MM-DD` of a UTC millisecond timestamp.
fn utc_day(ts_ms: i64) -> String {
    day_text(rows::day_number(ts_ms))
}

/// ClickHouse over HTTP.
pub struct ClickHouse {
    http: reqwest::Client,
    url: String,
    database: String,
    user: String,
    password: Option<String>,
    /// Where reports may read `usage_hourly` (`hourly_from`); `i64::MAX` until the
    /// migrations have been read.
    hourly_since: std::sync::atomic::AtomicI64,
    /// Hours whose rows landed in an insert that failed or timed out: the views may have
    /// missed them, so reports read them from `usage` until `repair_due` has fixed the
    /// rollups.
    suspects: std::sync::RwLock<std::collections::BTreeSet<i64>>,
}

#[derive(Deserialize)]
struct IdRow {
    id: String,
}

impl ClickHouse {
    pub fn new(cfg: &AnalyticsConfig) -> anyhow::Result<ClickHouse> {
        let url = cfg
            .url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("[analytics] url is required"))?;
        let password = match &cfg.password_env {
            Some(var) => Some(std::env::var(var).map_err(|_| {
                anyhow::anyhow!("[analytics] password_env names {var}, which is not set")
            })?),
            None => None,
        };
        crate::tls::init_tls();
        Ok(ClickHouse {
            http: reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                .build()?,
            url: url.trim_end_matches('/').to_string(),
            database: cfg.database.clone(),
            user: cfg.user.clone(),
            password,
            hourly_since: std::sync::atomic::AtomicI64::new(i64::MAX),
            suspects: Default::default(),
        })
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs `sql` (with `{db}` as the database) and returns what ClickHouse answered.
    async fn run(&self, sql: &str, query: Option<&str>, body: Vec<u8>) -> Result<String, String> {
        let mut req = self
            .http
            .post(format!("{}/", self.url))
            .basic_auth(&self.user, self.password.as_deref())
            .query(&[("output_format_json_quote_64bit_integers", "0")]);
        let body = match query {
            // An insert: the statement in the URL, the rows as the body.
            Some(q) => {
                req = req.query(&[("query", q.replace("{db}", &self.database))]);
                body
            }
            // Id lists (`present_in`) run past the default 256 KiB.
            None => {
                req = req.query(&[("max_query_size", "4194304")]);
                sql.replace("{db}", &self.database).into_bytes()
            }
        };
        let resp = req
            .body(body)
            .send()
            .await
            .map_err(|e| format!("clickhouse: {}", crate::error::error_chain(&e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| format!("clickhouse: {}", crate::error::error_chain(&e)))?;
        if !status.is_success() {
            let first = text.lines().next().unwrap_or("").trim();
            return Err(format!("clickhouse answered {status}: {first}"));
        }
        Ok(text)
    }

    async fn exec(&self, sql: &str) -> Result<String, String> {
        self.run(sql, None, Vec::new()).await
    }

    async fn rows<T: serde::de::DeserializeOwned>(&self, sql: &str) -> Result<Vec<T>, String> {
        let text = self.exec(&format!("{sql} FORMAT JSONEachRow")).await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| format!("clickhouse: {e} in {l}")))
            .collect()
    }

    async fn insert(&self, chunk: &Chunk) -> Result<(), String> {
        if chunk.len() == 0 {
            return Ok(());
        }
        let t = chunk.table;
        self.run(
            "",
            Some(&format!(
                "INSERT INTO {{db}}.{} ({}) FORMAT RowBinary",
                t.name(),
                t.columns()
            )),
            chunk.body().to_vec(),
        )
        .await
        .map(|_| ())
    }

    /// Creates the database and applies the migrations it has not seen; returns the version.
    pub async fn migrate(&self) -> Result<u32, String> {
        self.exec("CREATE DATABASE IF NOT EXISTS {db}").await?;
        self.exec(
            "CREATE TABLE IF NOT EXISTS {db}.tollgate_migrations (version UInt32, applied_ms Int64)
             ENGINE = MergeTree ORDER BY version",
        )
        .await?;
        #[derive(Deserialize)]
        struct V {
            version: u32,
        }
        let done: Vec<V> = self
            .rows("SELECT version FROM {db}.tollgate_migrations")
            .await?;
        let newest = MIGRATIONS.last().map_or(0, |m| m.0);
        if let Some(v) = done.iter().map(|v| v.version).max().filter(|v| *v > newest) {
            return Err(format!(
                "the ClickHouse schema is at version {v}, newer than this tollgate ({newest})"
            ));
        }
        for (version, sql) in MIGRATIONS {
            if done.iter().any(|d| d.version == *version) {
                continue;
            }
            match self.exec(sql).await {
                Ok(_) => {}
                // 18.16 has no `ADD COLUMN IF NOT EXISTS`: an ALTER that was applied before
                // its version could be recorded (a crash between them) is done already.
                Err(e) if sql.starts_with("ALTER") && e.contains("already exists") => {}
                Err(e) => return Err(e),
            }
            // A view sees only what is inserted after it exists: when `usage` is still
            // empty once the hourly view is there, the rollup holds every row, else only
            // the rows from now on.
            let mut applied = crate::clock::now_ms();
            if *version == HOURLY_VIEW {
                #[derive(Deserialize)]
                struct N {
                    n: u64,
                }
                let n: Vec<N> = self.rows("SELECT count() AS n FROM {db}.usage").await?;
                if n.first().is_some_and(|n| n.n == 0) {
                    applied = 0;
                }
            }
            self.exec(&format!(
                "INSERT INTO {{db}}.tollgate_migrations VALUES ({version}, {applied})"
            ))
            .await?;
        }
        #[derive(Deserialize)]
        struct A {
            applied_ms: i64,
        }
        let a: Vec<A> = self
            .rows(&format!(
                "SELECT applied_ms FROM {{db}}.tollgate_migrations WHERE version = {HOURLY_VIEW}"
            ))
            .await?;
        if let Some(a) = a.iter().map(|a| a.applied_ms).max() {
            self.hourly_since
                .store(hourly_from(a), std::sync::atomic::Ordering::Relaxed);
        }
        #[derive(Deserialize)]
        struct H {
            hour_ms: i64,
        }
        let open: Vec<H> = self
            .rows(
                "SELECT DISTINCT hour_ms FROM {db}.rollup_suspects
                 WHERE hour_ms NOT IN (SELECT hour_ms FROM {db}.rollup_repaired)",
            )
            .await?;
        *self.suspects.write().unwrap_or_else(|p| p.into_inner()) =
            open.into_iter().map(|h| h.hour_ms).collect();
        Ok(newest)
    }

    /// Which of `rows` (id, day) `table` already has.
    async fn present_in(
        &self,
        table: &str,
        rows: &[(&str, u16)],
    ) -> Result<std::collections::HashSet<String>, String> {
        let mut found = std::collections::HashSet::new();
        // Each statement scans the ids of its days: few and large (about 350 KiB of ids,
        // under the max_query_size `run` sets, and the default 50 000 AST elements).
        for part in rows.chunks(10_000) {
            let lo = part.iter().map(|e| e.1).min().unwrap_or(0);
            let hi = part.iter().map(|e| e.1).max().unwrap_or(u16::MAX);
            let list = part
                .iter()
                .map(|(id, _)| quote(id))
                .collect::<Vec<_>>()
                .join(",");
            let rows: Vec<IdRow> = self
                .rows(&format!(
                    "SELECT id FROM {{db}}.{table} WHERE day >= '{}' AND day <= '{}' AND id IN ({list})",
                    day_text(lo),
                    day_text(hi)
                ))
                .await?;
            found.extend(rows.into_iter().map(|r| r.id));
        }
        Ok(found)
    }

    /// Inserts what of `chunk` ClickHouse does not have yet: safe to repeat.
    async fn insert_once(&self, chunk: &Chunk) -> Result<usize, String> {
        let (sent, present) = self.insert_missing(chunk).await?;
        if !present.is_empty() && chunk.table == Table::Usage {
            // They landed in an insert whose answer never came: the rows are in `usage`,
            // but the views that feed the rollups may not have run.
            let hours = chunk.hours_of(&present);
            self.note_suspects(&hours).await?;
        }
        Ok(sent)
    }

    /// Inserts the rows of `chunk` whose ids ClickHouse lacks; returns how many, and the
    /// ids it had.
    async fn insert_missing(
        &self,
        chunk: &Chunk,
    ) -> Result<(usize, std::collections::HashSet<String>), String> {
        let ids: Vec<(&str, u16)> = chunk.entries().map(|e| (e.id, e.day)).collect();
        let present = self.present_in(chunk.table.name(), &ids).await?;
        let rest = chunk.without(&present);
        self.insert(&rest).await?;
        Ok((rest.len(), present))
    }

    /// A piece of a version 7 spill file (TabSeparated), as `insert_once` inserts a chunk.
    async fn insert_legacy_once(&self, piece: &rows::LegacyPiece) -> Result<usize, String> {
        let ids: Vec<(&str, u16)> = piece
            .rows
            .iter()
            .map(|(id, ts)| (id.as_str(), rows::day_number(*ts)))
            .collect();
        let present = self.present_in("usage", &ids).await?;
        let mut lines = Vec::new();
        let mut sent = 0;
        let mut hours = std::collections::BTreeSet::new();
        for ((id, ts), line) in piece
            .rows
            .iter()
            .zip(piece.lines.split_inclusive(|b| *b == b'\n'))
        {
            if present.contains(id) {
                hours.insert(ts.div_euclid(HOUR_MS) * HOUR_MS);
            } else {
                lines.extend_from_slice(line);
                sent += 1;
            }
        }
        if sent > 0 {
            self.run(
                "",
                Some(&format!(
                    "INSERT INTO {{db}}.usage ({}) FORMAT TabSeparated",
                    rows::LEGACY_COLUMNS
                )),
                lines,
            )
            .await?;
        }
        if !hours.is_empty() {
            self.note_suspects(&hours).await?;
        }
        Ok(sent)
    }

    /// Sends ClickHouse the store's records of `[since, until)` it lacks, with their ledger
    /// captures and the outcomes of the window, asking first as a replay does: after a
    /// `kill -9` (the sink's queue lost) or to load a history. Rows already there are left
    /// alone and raise no suspicion: the sink sent them, whole. Returns (rows read, rows
    /// inserted), over the three tables.
    pub async fn backfill(
        &self,
        store: &crate::store::Store,
        since_ms: i64,
        until_ms: Option<i64>,
    ) -> Result<(u64, u64), String> {
        let store_err = |e: crate::store::StoreError| format!("reading the store: {e}");
        let mut before: Option<(i64, String)> = None;
        let (mut read, mut inserted) = (0u64, 0u64);
        loop {
            let mut page = store
                .find_records(&crate::store::RecordFilter {
                    since_ms,
                    until_ms,
                    limit: 10_000,
                    before: before.clone(),
                    ..Default::default()
                })
                .map_err(store_err)?;
            let Some(last) = page.last() else {
                break;
            };
            before = Some((last.ts_ms, last.id.clone()));
            let paid: Vec<&str> = page
                .iter()
                .filter(|r| r.wallet_id.is_some())
                .map(|r| r.id.as_str())
                .collect();
            let captures = store.captures(&paid).map_err(store_err)?;
            for r in &mut page {
                r.captured_micros = captures.get(&r.id).copied();
            }
            let ledger = Chunk::captures(&page);
            read += (page.len() + ledger.len()) as u64;
            inserted += self.insert_missing(&Chunk::usage(&page)).await?.0 as u64;
            inserted += self.insert_missing(&ledger).await?.0 as u64;
        }
        let outcomes: Vec<crate::store::Outcome> = store
            .outcomes_since(since_ms)
            .map_err(store_err)?
            .into_iter()
            .filter(|o| until_ms.is_none_or(|u| o.occurred_ms < u))
            .collect();
        for part in outcomes.chunks(10_000) {
            read += part.len() as u64;
            inserted += self.insert_missing(&Chunk::outcomes(part)).await?.0 as u64;
        }
        Ok((read, inserted))
    }

    async fn note_suspects(&self, hours: &std::collections::BTreeSet<i64>) -> Result<(), String> {
        self.note_hours("rollup_suspects", hours.iter()).await?;
        let mut s = self.suspects.write().unwrap_or_else(|p| p.into_inner());
        s.extend(hours.iter().copied());
        tracing::warn!(
            hours = hours.len(),
            "rows of an insert that failed are in clickhouse; their rollups are read from usage until repaired"
        );
        Ok(())
    }

    /// `(hour_ms, now)` rows into `table` (`rollup_suspects` or `rollup_repaired`).
    async fn note_hours(
        &self,
        table: &str,
        hours: impl Iterator<Item = &i64>,
    ) -> Result<(), String> {
        let now = crate::clock::now_ms();
        let values = hours
            .map(|h| format!("({h}, {now})"))
            .collect::<Vec<_>>()
            .join(",");
        self.exec(&format!("INSERT INTO {{db}}.{table} VALUES {values}"))
            .await
            .map(|_| ())
    }

    /// Repairs the rollups of suspect hours whose day ended more than `REPAIR_AFTER_MS`
    /// ago: for each day, what `usage` sums to minus what the rollup holds is inserted into
    /// `usage_daily`, and the same per suspect hour into `usage_hourly` (Summing tables add
    /// it). The views only ever miss rows, never add them, so a difference is never
    /// negative.
    pub async fn repair_due(&self, now_ms: i64) -> Result<usize, String> {
        let due: Vec<i64> = self
            .suspects
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .filter(|h| h.div_euclid(DAY_MS) * DAY_MS + DAY_MS + REPAIR_AFTER_MS <= now_ms)
            .collect();
        let mut days: Vec<i64> = due.iter().map(|h| h.div_euclid(DAY_MS) * DAY_MS).collect();
        days.dedup();
        // Two statements per day: its daily rows, and its suspect hours' hourly rows.
        for day in &days {
            let d = utc_day(*day);
            self.exec(&repair_sql(
                "usage_daily",
                "day",
                "day",
                &format!("day = '{d}'"),
                &format!("day = '{d}'"),
            ))
            .await?;
            let hours = due
                .iter()
                .filter(|h| h.div_euclid(DAY_MS) * DAY_MS == *day)
                .map(i64::to_string)
                .collect::<Vec<_>>()
                .join(",");
            self.exec(&repair_sql(
                "usage_hourly",
                "day, intDiv(ts_ms, 3600000) * 3600000 AS hour_ms",
                "day, hour_ms",
                &format!("day = '{d}' AND intDiv(ts_ms, 3600000) * 3600000 IN ({hours})"),
                &format!("day = '{d}' AND hour_ms IN ({hours})"),
            ))
            .await?;
        }
        if due.is_empty() {
            return Ok(0);
        }
        self.note_hours("rollup_repaired", due.iter()).await?;
        let mut s = self.suspects.write().unwrap_or_else(|p| p.into_inner());
        for h in &due {
            s.remove(h);
        }
        tracing::info!(hours = due.len(), "repaired the rollups of suspect hours");
        Ok(due.len())
    }

    /// The usage report `Store::usage_report_from` gives, from ClickHouse, read where `plan`
    /// says: whole UTC days from `usage_daily`, other hours from `usage_hourly`, and from
    /// `usage` what the rollups may not hold (and every grouping they do not carry).
    pub async fn usage_report(
        &self,
        by: &GroupBy,
        since_ms: i64,
        now_ms: i64,
    ) -> Result<Vec<ReportRow>, String> {
        // The same window as the store's: rollup groupings start on the hour.
        let start = if by.rolled_up() {
            crate::store::report_start(since_ms)
        } else {
            since_ms
        };
        let (raw, daily) = match by {
            GroupBy::Key => (
                "concat(agent, ' (', key_id, ')')",
                Some("concat(agent, ' (', key_id, ')')"),
            ),
            GroupBy::Team => ("if(team = '', '-', team)", Some("if(team = '', '-', team)")),
            GroupBy::Org => ("org", Some("org")),
            GroupBy::Project => (
                "if(project = '', '-', project)",
                Some("if(project = '', '-', project)"),
            ),
            GroupBy::Model => ("model", Some("model")),
            GroupBy::Day => ("toString(day)", Some("toString(day)")),
            GroupBy::Endpoint => ("endpoint", Some("endpoint")),
            GroupBy::Run => ("run_id", None),
            GroupBy::Tag(_) => ("", None),
        };
        let raw = match by {
            GroupBy::Tag(t) => format!(
                "if(has(tag_keys, {q}), tag_values[indexOf(tag_keys, {q})], '-')",
                q = quote(t)
            ),
            _ => raw.to_string(),
        };
        let cols = |n: &str, e: &str, w: &str| {
            format!(
                "toUInt64({n}) AS n, toUInt64({e}) AS e, toUInt64(input_tokens) AS i,
                 toUInt64(cached_input_tokens) AS c, toUInt64(output_tokens) AS o,
                 toUInt64(reasoning_tokens) AS r, toUInt64(cost_micros) AS m, toUInt64({w}) AS w"
            )
        };
        // Each bound also names its day, so ClickHouse prunes months and index granules by
        // the tables' `day` (and `hour_ms`) keys instead of reading every row's timestamp.
        let after =
            |col: &str, from: i64| format!("day >= '{}' AND {col} >= {from}", utc_day(from));
        let before = |col: &str, to: i64| {
            if to == i64::MAX {
                String::new()
            } else {
                format!(" AND day <= '{}' AND {col} < {to}", utc_day(to))
            }
        };
        let from_raw = |a: i64, b: i64| {
            format!(
                "SELECT {raw} AS g, {} FROM {{db}}.usage WHERE {}{}",
                cols("1", "error", "cache_write_tokens"),
                after("ts_ms", a),
                before("ts_ms", b)
            )
        };
        let rolled = |table: &str, g: &str, cond: String| {
            format!(
                "SELECT {g} AS g, {} FROM {{db}}.{table} WHERE {cond}",
                cols("requests", "errors", "cache_write_tokens")
            )
        };
        let hourly_since = self.hourly_since.load(std::sync::atomic::Ordering::Relaxed);
        let mut parts = Vec::new();
        match daily {
            Some(g) => {
                let suspects = self.suspects.read().unwrap_or_else(|p| p.into_inner());
                for (src, a, b) in plan(start, now_ms, hourly_since, &suspects) {
                    parts.push(match src {
                        Src::Raw => from_raw(a, b),
                        Src::Hourly => rolled(
                            "usage_hourly",
                            g,
                            format!("{}{}", after("hour_ms", a), before("hour_ms", b)),
                        ),
                        Src::Daily => rolled(
                            "usage_daily",
                            g,
                            format!("day >= '{}' AND day < '{}'", utc_day(a), utc_day(b)),
                        ),
                    });
                }
            }
            None => parts.push(from_raw(start, i64::MAX)),
        }
        let sql = format!(
            "SELECT g AS `group`, sum(n) AS requests, sum(e) AS errors, sum(i) AS input_tokens,
                    sum(c) AS cached_input_tokens, sum(o) AS output_tokens,
                    sum(r) AS reasoning_tokens, sum(w) AS cache_write_tokens,
                    sum(m) AS cost_micros
             FROM ({}) GROUP BY g ORDER BY cost_micros DESC, g",
            parts.join(" UNION ALL ")
        );
        self.rows(&sql).await
    }
}

/// What `usage` sums to under `raw_cond` minus what `table` holds under `rollup_cond`, per
/// rollup key, inserted into `table` where it is short. `keys` are the table's key columns
/// before the dimensions as computed from `usage`, `keys_out` their names. The subqueries
/// are named: current ClickHouse (checked on 26.9 through chDB) refuses a join of unnamed
/// ones, which 18.16 accepts either way.
fn repair_sql(
    table: &str,
    keys: &str,
    keys_out: &str,
    raw_cond: &str,
    rollup_cond: &str,
) -> String {
    let raw_sums = ROLLUP_SUMS
        .iter()
        .map(|(c, e)| format!("{e} AS {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let have_sums = ROLLUP_SUMS
        .iter()
        .map(|(c, _)| format!("sum({c}) AS have_{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let deltas = ROLLUP_SUMS
        .iter()
        .map(|(c, _)| format!("{c} - have_{c} AS delta_{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let columns = ROLLUP_SUMS
        .iter()
        .map(|(c, _)| *c)
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "INSERT INTO {{db}}.{table} ({keys_out}, {ROLLUP_DIMS}, {columns})
         SELECT {keys_out}, {ROLLUP_DIMS}, {deltas}
         FROM (SELECT {keys}, {ROLLUP_DIMS}, {raw_sums} FROM {{db}}.usage WHERE {raw_cond}
               GROUP BY {keys_out}, {ROLLUP_DIMS}) AS raw
         ANY LEFT JOIN (SELECT {keys_out}, {ROLLUP_DIMS}, {have_sums} FROM {{db}}.{table}
                        WHERE {rollup_cond} GROUP BY {keys_out}, {ROLLUP_DIMS}) AS have
         USING ({keys_out}, {ROLLUP_DIMS})
         WHERE requests > have_requests"
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Src {
    Raw,
    Hourly,
    Daily,
}

/// Where a report over `[start, now]` reads each stretch of time: whole UTC days from
/// `usage_daily`, other hours from `usage_hourly` from `hourly_since` on, and from `usage`
/// the rest, and every suspect hour (a day with one is read hour by hour). Consecutive
/// stretches from one source are one; the last ends at `i64::MAX` (up to now).
fn plan(
    start: i64,
    now: i64,
    hourly_since: i64,
    suspects: &std::collections::BTreeSet<i64>,
) -> Vec<(Src, i64, i64)> {
    let mut out: Vec<(Src, i64, i64)> = Vec::new();
    let mut push = |src: Src, a: i64, b: i64| match out.last_mut() {
        Some(last) if last.0 == src && last.2 == a => last.2 = b,
        _ => out.push((src, a, b)),
    };
    let hour = |h: i64| {
        if suspects.contains(&h) || h < hourly_since {
            Src::Raw
        } else {
            Src::Hourly
        }
    };
    let (d1, d2) = crate::store::whole_days(start, now).unwrap_or((i64::MAX, i64::MAX));
    let last_hour = now.div_euclid(HOUR_MS) * HOUR_MS;
    let mut t = start.div_euclid(HOUR_MS) * HOUR_MS;
    // A window that does not start on the hour (groupings not rolled up) starts raw.
    if t < start {
        push(Src::Raw, start, t + HOUR_MS);
        t += HOUR_MS;
    }
    while t <= last_hour {
        if t >= d1 && t < d2 && t.rem_euclid(DAY_MS) == 0 {
            let day_suspect = suspects.range(t..t + DAY_MS).next().is_some();
            if !day_suspect {
                push(Src::Daily, t, t + DAY_MS);
                t += DAY_MS;
                continue;
            }
        }
        push(hour(t), t, t + HOUR_MS);
        t += HOUR_MS;
    }
    if let Some(last) = out.last_mut() {
        last.2 = i64::MAX;
    }
    out
}

/// A string literal for ClickHouse SQL.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const D: i64 = DAY_MS;
    const H: i64 = HOUR_MS;

    #[test]
    fn a_window_reads_days_then_hours_then_raw() {
        // From 19:00 on day 10 to 05:30 on day 13.
        let (start, now) = (10 * D + 19 * H, 13 * D + 5 * H + 30 * 60_000);
        let none = BTreeSet::new();
        use Src::*;
        assert_eq!(
            plan(start, now, i64::MIN, &none),
            vec![
                (Hourly, start, 11 * D),
                (Daily, 11 * D, 13 * D),
                (Hourly, 13 * D, i64::MAX)
            ]
        );
        // Before the hourly view existed: hours from `usage`.
        assert_eq!(
            plan(start, now, i64::MAX, &none),
            vec![
                (Raw, start, 11 * D),
                (Daily, 11 * D, 13 * D),
                (Raw, 13 * D, i64::MAX)
            ]
        );
        assert_eq!(
            plan(start, now, 13 * D + 2 * H, &none),
            vec![
                (Raw, start, 11 * D),
                (Daily, 11 * D, 13 * D),
                (Raw, 13 * D, 13 * D + 2 * H),
                (Hourly, 13 * D + 2 * H, i64::MAX)
            ]
        );
        // A suspect hour inside a whole day: that day hour by hour, the hour from `usage`.
        let suspect: BTreeSet<i64> = [12 * D + 7 * H].into();
        assert_eq!(
            plan(start, now, i64::MIN, &suspect),
            vec![
                (Hourly, start, 11 * D),
                (Daily, 11 * D, 12 * D),
                (Hourly, 12 * D, 12 * D + 7 * H),
                (Raw, 12 * D + 7 * H, 12 * D + 8 * H),
                (Hourly, 12 * D + 8 * H, i64::MAX)
            ]
        );
        // Not on the hour (groupings without rollups never get here, but the plan holds).
        let p = plan(start + 60_000, start + 2 * H, i64::MIN, &none);
        assert_eq!(p[0], (Raw, start + 60_000, start + H));
    }

    #[test]
    fn the_hourly_view_covers_from_the_hour_after_it_was_created() {
        assert_eq!(hourly_from(0), i64::MIN);
        assert_eq!(hourly_from(5 * H + 1), 6 * H);
        assert_eq!(hourly_from(5 * H + 55 * 60_000), 7 * H);
    }
}
