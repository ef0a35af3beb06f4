//! Usage analytics in ClickHouse (`[analytics] backend = "clickhouse"`, ADR 0032): every usage
//! record the store commits is also sent to ClickHouse, and usage reports are answered from
//! there. The ledger and wallets stay in the store; nothing here decides money.
//!
//! The path of a record: the store's writer commits a batch, then hands its rows (already
//! written as TabSeparated lines, which ClickHouse parses 2.5 times as fast as JSON) to the sink's bounded queue without waiting (`Sink::offer`).
//! The sink task gathers up to `batch_max` rows or `flush_interval`, and inserts them over
//! ClickHouse's HTTP interface. When an insert fails, the rows go to a spill file in the data
//! dir (bounded by `spill_max_bytes`) and so does everything after, until ClickHouse answers
//! again; then the spill file is replayed. A full queue spills too, so neither a slow
//! ClickHouse nor a dead one ever holds up the writer.
//!
//! Exactly once: an insert whose outcome is unknown (a timeout, a connection cut after the
//! rows were sent) may have landed. So every retry and every replay first asks which of its
//! request ids ClickHouse already has, and inserts only the others. That works on every
//! ClickHouse version (18.16 has neither insert deduplication tokens nor deduplication on
//! non-replicated tables), and keeps the rollup views exact, which a replacing engine would
//! not: a view sums every insert, duplicates included.
//!
//! Schema: versioned migrations owned by tollgate (`MIGRATIONS`), applied on start and by
//! `tollgate migrate`, recorded in `tollgate_migrations`. `usage` is a MergeTree partitioned
//! by month and ordered by (day, team, key_id, id); `usage_daily` a SummingMergeTree fed by
//! a materialized view. Money is integer micro-USD throughout. The SQL is what ClickHouse
//! 18.16 (Debian's) and current releases both accept: no `LowCardinality`, no `DateTime64`,
//! no JSON functions (tags are two parallel arrays).

use crate::config::AnalyticsConfig;
use crate::metrics::Metrics;
use crate::records::UsageRecord;
use crate::store::{GroupBy, ReportRow};
use serde::Deserialize;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

const DAY_MS: i64 = 86_400_000;

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
const HOUR_MS: i64 = 3_600_000;

/// The first hour `usage_hourly` holds in full, given when its view was created (`applied`,
/// 0 when `usage` was still empty then): rows written before the view are only in `usage`.
/// The ten minutes cover an insert in flight while the view was created, and clocks apart.
fn hourly_from(applied_ms: i64) -> i64 {
    if applied_ms == 0 {
        return i64::MIN;
    }
    (applied_ms + 10 * 60_000).div_euclid(HOUR_MS) * HOUR_MS + HOUR_MS
}

/// The columns rows are sent in (`INSERT ... (COLUMNS) FORMAT TabSeparated`): named, so a
/// later migration that adds a column does not shift them.
const COLUMNS: &str = "id, ts_ms, day, endpoint, key_id, agent, team, org, project, model, \
    model_requested, model_served, provider, status, error, error_kind, run_id, tag_keys, \
    tag_values, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, \
    cache_write_tokens, cost_micros, saved_micros, latency_ms, ttft_ms, stream, cache, \
    usage_source, price_version, wallet_id";
const N_COLUMNS: usize = 33;

/// One usage row as ClickHouse keeps it, borrowed from the record.
struct Row<'a> {
    id: &'a str,
    ts_ms: i64,
    /// (year, month, day), UTC.
    day: (i64, i64, i64),
    endpoint: &'a str,
    key_id: &'a str,
    agent: &'a str,
    team: &'a str,
    org: &'a str,
    project: &'a str,
    /// What reports group a model by: the one that served, else the one asked for.
    model: &'a str,
    model_requested: &'a str,
    model_served: &'a str,
    provider: &'a str,
    status: u16,
    error: u8,
    error_kind: &'a str,
    run_id: &'a str,
    tag_keys: Vec<&'a str>,
    tag_values: Vec<&'a str>,
    input_tokens: u64,
    cached_input_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cache_write_tokens: u64,
    cost_micros: u64,
    saved_micros: u64,
    latency_ms: u64,
    ttft_ms: u64,
    stream: u8,
    cache: &'a str,
    usage_source: &'a str,
    price_version: &'a str,
    wallet_id: &'a str,
}

/// `YYYY-MM-DD` of a UTC millisecond timestamp.
fn utc_day(ts_ms: i64) -> String {
    let (y, m, d) = civil_day(ts_ms);
    format!("{y:04}-{m:02}-{d:02}")
}

/// (year, month, day) of a UTC millisecond timestamp.
fn civil_day(ts_ms: i64) -> (i64, i64, i64) {
    crate::clock::civil(ts_ms.div_euclid(DAY_MS))
}

fn row(r: &UsageRecord) -> Row<'_> {
    fn s(o: &Option<String>) -> &str {
        o.as_deref().unwrap_or("")
    }
    let model = r
        .model_served
        .as_deref()
        .or(r.model_requested.as_deref())
        .filter(|m| !m.is_empty())
        .unwrap_or("-");
    Row {
        id: &r.id,
        ts_ms: r.ts_ms,
        day: civil_day(r.ts_ms),
        endpoint: &r.endpoint,
        key_id: &r.key_id,
        agent: &r.agent,
        team: s(&r.team),
        org: r.org.as_deref().unwrap_or("default"),
        project: s(&r.project),
        model,
        model_requested: s(&r.model_requested),
        model_served: s(&r.model_served),
        provider: s(&r.provider),
        status: r.status,
        error: u8::from(r.status >= 400 || r.error_kind.is_some()),
        error_kind: s(&r.error_kind),
        run_id: r.run_id.as_deref().unwrap_or("-"),
        tag_keys: r.tags.keys().map(String::as_str).collect(),
        tag_values: r.tags.values().map(String::as_str).collect(),
        input_tokens: r.input_tokens,
        cached_input_tokens: r.cached_input_tokens,
        output_tokens: r.output_tokens,
        reasoning_tokens: r.reasoning_tokens,
        cache_write_tokens: r
            .cache_write_5m_tokens
            .saturating_add(r.cache_write_1h_tokens),
        cost_micros: r.cost_micros,
        saved_micros: r
            .savings
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.micros)),
        latency_ms: r.latency_ms,
        ttft_ms: r.ttft_ms.unwrap_or(0),
        stream: u8::from(r.stream),
        cache: s(&r.cache),
        usage_source: &r.usage_source,
        price_version: s(&r.price_version),
        wallet_id: s(&r.wallet_id),
    }
}

/// One byte of a TabSeparated string, escaped as ClickHouse reads it back.
fn tsv_byte(out: &mut Vec<u8>, b: u8) {
    match b {
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\t' => out.extend_from_slice(b"\\t"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        0 => out.extend_from_slice(b"\\0"),
        b => out.push(b),
    }
}

/// A string as a TabSeparated field.
fn tsv_str(out: &mut Vec<u8>, v: &str) {
    for b in v.bytes() {
        tsv_byte(out, b);
    }
}

/// An array of strings as a TabSeparated field: `['a','b']`, each item quoted, with the
/// same backslash escapes (and `\'`).
fn tsv_array(out: &mut Vec<u8>, items: &[&str]) {
    out.push(b'[');
    for (i, v) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.push(b'\'');
        for b in v.bytes() {
            match b {
                b'\'' => out.extend_from_slice(b"\\'"),
                b => tsv_byte(out, b),
            }
        }
        out.push(b'\'');
    }
    out.push(b']');
}

impl Row<'_> {
    /// The row as one TabSeparated line, in `COLUMNS` order.
    fn tsv(&self, out: &mut Vec<u8>) {
        use std::io::Write as _;
        let strs = |out: &mut Vec<u8>, vs: &[&str]| {
            for v in vs {
                tsv_str(out, v);
                out.push(b'\t');
            }
        };
        strs(out, &[self.id]);
        let (y, m, d) = self.day;
        let _ = write!(out, "{}\t{y:04}-{m:02}-{d:02}\t", self.ts_ms);
        strs(
            out,
            &[
                self.endpoint,
                self.key_id,
                self.agent,
                self.team,
                self.org,
                self.project,
                self.model,
                self.model_requested,
                self.model_served,
                self.provider,
            ],
        );
        let _ = write!(out, "{}\t{}\t", self.status, self.error);
        strs(out, &[self.error_kind, self.run_id]);
        tsv_array(out, &self.tag_keys);
        out.push(b'\t');
        tsv_array(out, &self.tag_values);
        let _ = write!(
            out,
            "\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t",
            self.input_tokens,
            self.cached_input_tokens,
            self.output_tokens,
            self.reasoning_tokens,
            self.cache_write_tokens,
            self.cost_micros,
            self.saved_micros,
            self.latency_ms,
            self.ttft_ms,
            self.stream
        );
        strs(out, &[self.cache, self.usage_source, self.price_version]);
        tsv_str(out, self.wallet_id);
        out.push(b'\n');
    }
}

/// Rows on their way: TabSeparated lines, and what a deduplicating retry needs of each.
#[derive(Default)]
struct Chunk {
    lines: Vec<u8>,
    rows: usize,
    /// The oldest record's time, for the lag.
    oldest_ms: Option<i64>,
}

/// A TabSeparated field's value (the escapes `tsv_byte` writes, undone).
fn tsv_unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut it = field.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

impl Chunk {
    fn of(batch: &[UsageRecord]) -> Chunk {
        let mut c = Chunk {
            lines: Vec::with_capacity(batch.len() * 256),
            rows: 0,
            oldest_ms: None,
        };
        for r in batch {
            row(r).tsv(&mut c.lines);
            c.rows += 1;
            c.oldest_ms = Some(c.oldest_ms.map_or(r.ts_ms, |o| o.min(r.ts_ms)));
        }
        c
    }

    fn append(&mut self, other: Chunk) {
        self.lines.extend_from_slice(&other.lines);
        self.rows += other.rows;
        self.oldest_ms = match (self.oldest_ms, other.oldest_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    fn len(&self) -> usize {
        self.rows
    }

    /// Each line with its request id and UTC day (columns 1 and 3), read back from the line:
    /// only retries and replays need them, so the writer's path does not pay for them.
    fn entries(&self) -> impl Iterator<Item = (&[u8], String, &str)> {
        self.lines.split_inclusive(|b| *b == b'\n').map(|line| {
            let text = std::str::from_utf8(line).unwrap_or("");
            let mut f = text.split('\t');
            let id = tsv_unescape(f.next().unwrap_or(""));
            let day = f.nth(1).unwrap_or("");
            (line, id, day)
        })
    }

    /// The UTC hours (column 2, the record's time) of the lines whose ids are in `ids`.
    fn hours_of(&self, ids: &std::collections::HashSet<String>) -> std::collections::BTreeSet<i64> {
        self.entries()
            .filter(|(_, id, _)| ids.contains(id))
            .filter_map(|(line, _, _)| {
                let text = std::str::from_utf8(line).ok()?;
                let ts: i64 = text.split('\t').nth(1)?.parse().ok()?;
                Some(ts.div_euclid(HOUR_MS) * HOUR_MS)
            })
            .collect()
    }

    /// The lines whose ids are not in `present`.
    fn without(&self, present: &std::collections::HashSet<String>) -> Chunk {
        let mut out = Chunk::default();
        for (line, id, _) in self.entries() {
            if !present.contains(&id) {
                out.lines.extend_from_slice(line);
                out.rows += 1;
            }
        }
        out
    }
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
            None => sql.replace("{db}", &self.database).into_bytes(),
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
        self.run(
            "",
            Some(&format!(
                "INSERT INTO {{db}}.usage ({COLUMNS}) FORMAT TabSeparated"
            )),
            chunk.lines.clone(),
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
            self.exec(sql).await?;
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

    /// Which of the chunk's request ids ClickHouse already has.
    async fn present(&self, chunk: &Chunk) -> Result<std::collections::HashSet<String>, String> {
        let mut found = std::collections::HashSet::new();
        // Small enough that the statement stays under max_query_size (256 KiB).
        let entries: Vec<(String, String)> = chunk
            .entries()
            .map(|(_, id, day)| (id, day.to_string()))
            .collect();
        for part in entries.chunks(2_000) {
            let lo = part
                .iter()
                .map(|e| e.1.as_str())
                .min()
                .unwrap_or("1970-01-01");
            let hi = part
                .iter()
                .map(|e| e.1.as_str())
                .max()
                .unwrap_or("2200-01-01");
            let list = part
                .iter()
                .map(|(id, _)| quote(id))
                .collect::<Vec<_>>()
                .join(",");
            let rows: Vec<IdRow> = self
                .rows(&format!(
                    "SELECT id FROM {{db}}.usage WHERE day >= '{lo}' AND day <= '{hi}' AND id IN ({list})"
                ))
                .await?;
            found.extend(rows.into_iter().map(|r| r.id));
        }
        Ok(found)
    }

    /// Inserts what of `chunk` ClickHouse does not have yet: safe to repeat.
    async fn insert_once(&self, chunk: &Chunk) -> Result<usize, String> {
        let (sent, present) = self.insert_missing(chunk).await?;
        if !present.is_empty() {
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
        let present = self.present(chunk).await?;
        let rest = chunk.without(&present);
        self.insert(&rest).await?;
        Ok((rest.len(), present))
    }

    /// Sends ClickHouse the store's records of `[since, until)` it lacks, asking first as a
    /// replay does: after a `kill -9` (the sink's queue lost) or to load a history. Rows
    /// already there are left alone and raise no suspicion: the sink sent them, whole.
    /// Returns (records read, records inserted).
    pub async fn backfill(
        &self,
        store: &crate::store::Store,
        since_ms: i64,
        until_ms: Option<i64>,
    ) -> Result<(u64, u64), String> {
        let mut before: Option<(i64, String)> = None;
        let (mut read, mut inserted) = (0u64, 0u64);
        loop {
            let page = store
                .find_records(&crate::store::RecordFilter {
                    since_ms,
                    until_ms,
                    limit: 10_000,
                    before: before.clone(),
                    ..Default::default()
                })
                .map_err(|e| format!("reading the store: {e}"))?;
            let Some(last) = page.last() else {
                return Ok((read, inserted));
            };
            before = Some((last.ts_ms, last.id.clone()));
            read += page.len() as u64;
            inserted += self.insert_missing(&Chunk::of(&page)).await?.0 as u64;
        }
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

/// Rows ClickHouse did not take yet, in the data dir. New rows are appended to `spill.jsonl`;
/// a replay first renames it to `replay.jsonl`, so rows spilled meanwhile go to a new file.
struct Spill {
    dir: PathBuf,
    max_bytes: u64,
    bytes: u64,
}

impl Spill {
    fn path(&self) -> PathBuf {
        self.dir.join("spill.jsonl")
    }

    fn replay_path(&self) -> PathBuf {
        self.dir.join("replay.jsonl")
    }

    /// Appends the chunk; `false` (nothing written) past the bound or when the disk fails.
    fn write(&mut self, chunk: &Chunk) -> bool {
        let n = chunk.lines.len() as u64;
        if self.bytes.saturating_add(n) > self.max_bytes {
            return false;
        }
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path())
                .and_then(|mut f| f.write_all(&chunk.lines).and_then(|_| f.flush()))
                .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

/// Reads a spill file back in chunks of at most `max` rows.
fn read_spill(path: &Path, max: usize) -> std::io::Result<Vec<Chunk>> {
    let f = std::fs::File::open(path)?;
    let mut out = Vec::new();
    let mut cur = Chunk::default();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        // A line cut by a crash mid-write is not a row. Tabs inside values are escaped, so
        // a raw tab always separates columns.
        let fields: Vec<&str> = line.split('\t').collect();
        if fields.len() != N_COLUMNS {
            continue;
        }
        cur.rows += 1;
        cur.lines.extend_from_slice(line.as_bytes());
        cur.lines.push(b'\n');
        if cur.len() >= max {
            out.push(std::mem::take(&mut cur));
        }
    }
    if cur.len() > 0 {
        out.push(cur);
    }
    Ok(out)
}

enum Msg {
    Rows(Chunk),
    /// Send (or spill) what is pending now, then say so.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// What the store's writer hands rows to.
pub struct Sink {
    /// Unbounded as a channel: `queued` against `capacity` is the bound, in rows.
    tx: mpsc::UnboundedSender<Msg>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    spill: Arc<Mutex<Spill>>,
    metrics: Arc<Metrics>,
}

impl Sink {
    /// Hands a committed batch over without waiting: to the queue, or the spill file when
    /// the queue is full.
    pub fn offer(&self, batch: &[UsageRecord]) {
        if batch.is_empty() {
            return;
        }
        let chunk = Chunk::of(batch);
        let n = chunk.len();
        if self.queued.load(Ordering::Acquire) + n > self.capacity {
            spill(&self.spill, &self.metrics, &chunk);
            return;
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.metrics.analytics_queue_depth.inc_by(n as i64);
        if let Err(e) = self.tx.send(Msg::Rows(chunk)) {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.metrics.analytics_queue_depth.dec_by(n as i64);
            if let Msg::Rows(chunk) = e.0 {
                spill(&self.spill, &self.metrics, &chunk);
            }
        }
    }

    /// Waits (up to `within`) until what was offered before is in ClickHouse or spilled.
    pub async fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Msg::Flush(tx)).is_ok()
            && matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }
}

fn spill(s: &Mutex<Spill>, metrics: &Metrics, chunk: &Chunk) {
    let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
    if s.write(chunk) {
        metrics.analytics_records_spilled.inc_by(chunk.len() as u64);
        metrics.analytics_spill_bytes.set(s.bytes as i64);
    } else {
        metrics.analytics_records_dropped.inc_by(chunk.len() as u64);
        tracing::error!(
            records = chunk.len(),
            bound = s.max_bytes,
            "analytics spill file full or unwritable: these records are in the store but not in ClickHouse"
        );
    }
}

/// The running analytics backend: the client for reports and the sink for records.
pub struct Analytics {
    pub clickhouse: Arc<ClickHouse>,
    pub sink: Arc<Sink>,
}

impl Analytics {
    /// Starts the sink task; migrates ClickHouse first if it answers (the sink retries until
    /// it does, spilling meanwhile).
    pub async fn start(
        cfg: &AnalyticsConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Analytics> {
        let clickhouse = Arc::new(ClickHouse::new(cfg)?);
        let migrated = match clickhouse.migrate().await {
            Ok(v) => {
                tracing::info!(version = v, database = %cfg.database, "clickhouse analytics schema ready");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "clickhouse unavailable at start; usage is spilled until it answers");
                false
            }
        };
        let dir = data_dir.join("analytics");
        let spill = Spill {
            bytes: [dir.join("spill.jsonl"), dir.join("replay.jsonl")]
                .iter()
                .filter_map(|p| std::fs::metadata(p).ok())
                .map(|m| m.len())
                .sum(),
            dir,
            max_bytes: cfg.spill_max_bytes,
        };
        metrics.analytics_spill_bytes.set(spill.bytes as i64);
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            capacity: cfg.queue_capacity,
            spill: Arc::new(Mutex::new(spill)),
            metrics: metrics.clone(),
        });
        let task = SinkTask {
            ch: clickhouse.clone(),
            queued: sink.queued.clone(),
            spill: sink.spill.clone(),
            metrics,
            batch_max: cfg.batch_max,
            flush_interval: cfg.flush_interval,
            retry_interval: cfg.retry_interval,
            migrated,
        };
        tokio::spawn(task.run(rx));
        Ok(Analytics { clickhouse, sink })
    }
}

struct SinkTask {
    ch: Arc<ClickHouse>,
    queued: Arc<AtomicUsize>,
    spill: Arc<Mutex<Spill>>,
    metrics: Arc<Metrics>,
    batch_max: usize,
    flush_interval: Duration,
    retry_interval: Duration,
    migrated: bool,
}

impl SinkTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut pending = Chunk::default();
        let mut flushes: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        // While down, rows are spilled; ClickHouse is tried again at `retry_at`.
        let mut down = !self.migrated;
        let mut retry_at = tokio::time::Instant::now();
        let mut repair_at = tokio::time::Instant::now() + REPAIR_EVERY;
        let mut open = true;
        while open || pending.len() > 0 || !flushes.is_empty() {
            let deadline = tokio::time::Instant::now() + self.flush_interval;
            while open && pending.len() < self.batch_max && flushes.is_empty() {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(Msg::Rows(c)) => {
                            self.queued.fetch_sub(c.len(), Ordering::AcqRel);
                            self.metrics.analytics_queue_depth.dec_by(c.len() as i64);
                            pending.append(c);
                        }
                        Some(Msg::Flush(done)) => flushes.push(done),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.note_lag(&pending);
            if down && tokio::time::Instant::now() >= retry_at {
                down = !self.recover().await;
                if down {
                    retry_at = tokio::time::Instant::now() + self.retry_interval;
                }
            }
            // Rows spill while ClickHouse is down, and also when the queue was full.
            let replay_due = self.spill.lock().unwrap_or_else(|p| p.into_inner()).bytes > 0;
            if !down && replay_due {
                match self.replay().await {
                    Ok(()) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "replaying the analytics spill failed; retrying later");
                        down = true;
                        retry_at = tokio::time::Instant::now() + self.retry_interval;
                    }
                }
            }
            if !down && tokio::time::Instant::now() >= repair_at {
                repair_at = tokio::time::Instant::now() + REPAIR_EVERY;
                if let Err(e) = self.ch.repair_due(crate::clock::now_ms()).await {
                    tracing::warn!(error = %e, "repairing the clickhouse rollups failed; retrying later");
                }
            }
            if pending.len() > 0 {
                let chunk = std::mem::take(&mut pending);
                // Behind by more than a batch: a second insert goes with the first, so
                // ClickHouse parses on two cores (its parse of one insert is one thread).
                let mut second = Chunk::default();
                while open && !down && second.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(Msg::Rows(c)) => {
                            self.queued.fetch_sub(c.len(), Ordering::AcqRel);
                            self.metrics.analytics_queue_depth.dec_by(c.len() as i64);
                            second.append(c);
                        }
                        Ok(Msg::Flush(done)) => flushes.push(done),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                    }
                }
                let (a, b) = if down {
                    (Err("down".to_string()), Err("down".to_string()))
                } else if second.len() > 0 {
                    tokio::join!(self.send(&chunk), self.send(&second))
                } else {
                    (self.send(&chunk).await, Ok(()))
                };
                for (result, c) in [(a, &chunk), (b, &second)] {
                    let Err(e) = result else { continue };
                    if c.len() == 0 {
                        continue;
                    }
                    if !down {
                        tracing::warn!(error = %e, records = c.len(), "clickhouse insert failed; spilling until it answers");
                        down = true;
                        retry_at = tokio::time::Instant::now() + self.retry_interval;
                    }
                    spill(&self.spill, &self.metrics, c);
                }
                self.note_lag(&pending);
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            if !open && pending.len() == 0 {
                break;
            }
        }
    }

    /// One insert, and twice more (each after asking what landed) if it fails.
    async fn send(&self, chunk: &Chunk) -> Result<(), String> {
        let mut err = match self.ch.insert(chunk).await {
            Ok(()) => {
                self.metrics
                    .analytics_records_sent
                    .inc_by(chunk.len() as u64);
                return Ok(());
            }
            Err(e) => e,
        };
        for wait in [100u64, 500] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match self.ch.insert_once(chunk).await {
                Ok(n) => {
                    self.metrics.analytics_records_sent.inc_by(n as u64);
                    return Ok(());
                }
                Err(e) => err = e,
            }
        }
        Err(err)
    }

    async fn recover(&mut self) -> bool {
        match self.ch.migrate().await {
            Ok(_) => {
                tracing::info!("clickhouse answers; replaying the spilled usage");
                self.migrated = true;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "clickhouse still unavailable");
                false
            }
        }
    }

    /// Sends what was spilled, each chunk only for the ids ClickHouse lacks. Rows spilled
    /// while it runs (a full queue) are taken in the next round, three rounds at most.
    async fn replay(&self) -> Result<(), String> {
        for _ in 0..3 {
            let replay = {
                let s = self.spill.lock().unwrap_or_else(|p| p.into_inner());
                let (path, replay) = (s.path(), s.replay_path());
                // A replay that did not finish is finished first; new rows start a new file.
                if !replay.exists() && path.exists() {
                    std::fs::rename(&path, &replay).map_err(|e| format!("spill file: {e}"))?;
                }
                replay
            };
            if !replay.exists() {
                return Ok(());
            }
            let chunks =
                read_spill(&replay, self.batch_max).map_err(|e| format!("spill file: {e}"))?;
            let mut sent = 0;
            for c in &chunks {
                sent += self.ch.insert_once(c).await?;
            }
            self.metrics.analytics_records_sent.inc_by(sent as u64);
            self.metrics.analytics_records_replayed.inc_by(sent as u64);
            let mut s = self.spill.lock().unwrap_or_else(|p| p.into_inner());
            let _ = std::fs::remove_file(&replay);
            s.bytes = std::fs::metadata(s.path()).map_or(0, |m| m.len());
            self.metrics.analytics_spill_bytes.set(s.bytes as i64);
            tracing::info!(
                records = sent,
                "replayed the analytics spill into clickhouse"
            );
        }
        Ok(())
    }

    fn note_lag(&self, pending: &Chunk) {
        let lag = pending.oldest_ms.map_or(0.0, |oldest| {
            (crate::clock::now_ms() - oldest).max(0) as f64 / 1000.0
        });
        self.metrics.analytics_lag_seconds.set(lag);
    }
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
