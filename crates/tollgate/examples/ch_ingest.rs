#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ClickHouse sink's ingest rate (bench/RESULTS.md, run P): N synthetic usage records
//! offered to the sink as the store's writer offers them (batches of 512), timed until
//! ClickHouse holds them all; then the spend queries over what is there, from the daily rollup
//! and from the raw table.
//!
//!   cargo run --release --example ch_ingest -- http://127.0.0.1:8123 1000000 [DATABASE]

use std::sync::Arc;
use std::time::{Duration, Instant};
use tollgate::analytics::Analytics;
use tollgate::config::{AnalyticsBackend, AnalyticsConfig};
use tollgate::records::UsageRecord;
use tollgate::store::GroupBy;

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (url, n) = match (
        args.get(1),
        args.get(2).and_then(|s| s.parse::<usize>().ok()),
    ) {
        (Some(u), Some(n)) => (u.clone(), n),
        _ => {
            eprintln!("usage: ch_ingest CLICKHOUSE_URL RECORDS [DATABASE]");
            std::process::exit(2);
        }
    };
    let database = args.get(3).cloned().unwrap_or_else(|| "bench".into());
    let cfg = AnalyticsConfig {
        backend: AnalyticsBackend::Clickhouse,
        url: Some(url.clone()),
        database: database.clone(),
        queue_capacity: 1_000_000,
        batch_max: 10_000,
        flush_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(60),
        ..AnalyticsConfig::default()
    };
    let dir = std::env::temp_dir().join(format!("ch-ingest-{}", std::process::id()));
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let a = Analytics::start(&cfg, &dir, metrics.clone()).await.unwrap();
    let http = reqwest::Client::new();
    let count = || async {
        let r = http
            .post(format!("{url}/"))
            .body(format!("SELECT count() FROM {database}.usage"))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap().trim().parse::<u64>().unwrap()
    };
    let before = count().await;
    let now = tollgate::clock::now_ms();
    let span = 30 * 86_400_000i64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ before;
    let mut next = move |m: u64| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x % m
    };
    let mut made = 0usize;
    let mut gen_secs = 0.0;
    let started = Instant::now();
    while made < n {
        let t = Instant::now();
        let batch: Vec<UsageRecord> = (0..512.min(n - made))
            .map(|i| {
                let k = next(200);
                UsageRecord {
                    id: format!("req_{:011x}{:013x}", now, before as usize + made + i),
                    ts_ms: now - next(span as u64) as i64,
                    endpoint: "chat".into(),
                    key_id: format!("key{k}"),
                    agent: format!("agent-{k}"),
                    team: Some(format!("team-{}", k % 12)),
                    model_requested: Some(["gpt-4o", "claude-sonnet"][(k % 2) as usize].into()),
                    model_served: Some(["gpt-4o", "claude-sonnet"][(k % 2) as usize].into()),
                    provider: Some("openai".into()),
                    status: 200,
                    input_tokens: next(4_000),
                    output_tokens: next(600),
                    usage_source: "provider".into(),
                    cost_micros: next(50_000),
                    latency_ms: next(3_000),
                    attempts: 1,
                    ..UsageRecord::default()
                }
            })
            .collect();
        gen_secs += t.elapsed().as_secs_f64();
        made += batch.len();
        a.sink.offer(&batch);
    }
    let offered = started.elapsed().as_secs_f64() - gen_secs;
    assert!(a.sink.flush(Duration::from_secs(600)).await, "flush");
    let want = before + n as u64;
    while count().await < want {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let total = started.elapsed().as_secs_f64() - gen_secs;
    println!(
        "ingest: {n} records in {total:.2} s = {:.0} records/s (offering took {offered:.2} s; spilled {})",
        n as f64 / total,
        metrics.analytics_records_spilled.get()
    );
    let have = count().await;
    for by in ["team", "key", "model", "day"] {
        let by: GroupBy = by.parse().unwrap();
        let t = Instant::now();
        let rows = a
            .clickhouse
            .usage_report(&by, now - 30 * 86_400_000, now)
            .await
            .unwrap();
        println!(
            "report by {by:?} over {have} records, 30 days: {} rows in {:.1} ms",
            rows.len(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
