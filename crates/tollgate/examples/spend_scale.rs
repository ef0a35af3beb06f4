#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The spend-data scale benchmark (bench/RESULTS.md, run G): writes N synthetic usage
//! records over 30 days through the store's writer path (records and rollups in one
//! transaction per batch), then times the common spend queries from the rollups, and from the
//! records for comparison.
//!
//!   cargo run --release --example spend_scale -- sqlite:/tmp/scale 1000000
//!   cargo run --release --example spend_scale -- postgres://… 1000000

use std::time::Instant;
use tollgate::db::Location;
use tollgate::metering::UsageRecord;
use tollgate::store::{GroupBy, ReportSource, Store};

/// Requests per run; every other run reports an outcome.
const RUN_LEN: u64 = 50;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (target, n) = match (args.get(1), args.get(2).and_then(|s| s.parse::<u64>().ok())) {
        (Some(t), Some(n)) => (t.clone(), n),
        _ => {
            eprintln!("usage: spend_scale sqlite:DIR|postgres://URL RECORDS [BATCH]");
            std::process::exit(2);
        }
    };
    let batch: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2_000);
    let location = match target.strip_prefix("sqlite:") {
        Some(dir) => {
            std::fs::create_dir_all(dir).expect("data dir");
            Location::Sqlite(std::path::Path::new(dir).join("tollgate.db"))
        }
        None => Location::from_config(Some(&target), std::path::Path::new(".")),
    };
    let store = Store::open_at(&location).expect("store");
    let have = store.count_usage().expect("count");
    let now = tollgate::clock::now_ms();
    let span = 30 * 86_400_000i64;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ have;
    let mut next = |m: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % m
    };
    let gateway_ids = std::env::var("SPEND_SCALE_IDS").is_ok_and(|v| v == "gateway");
    if have < n {
        let started = Instant::now();
        let mut written = 0u64;
        let mut recs = Vec::with_capacity(batch);
        for i in have..n {
            let key = next(500);
            let status = if next(20) == 0 { 429 } else { 200 };
            recs.push(UsageRecord {
                // SPEND_SCALE_IDS=gateway: ids as the gateway makes them, else in write order.
                id: if gateway_ids {
                    tollgate::clock::new_request_id()
                } else {
                    format!("req_scale_{i:012}")
                },
                // Spread over 30 days, in order, as traffic arrives.
                ts_ms: now - span + (i as i64 * span / n as i64),
                endpoint: "chat.completions".into(),
                key_id: format!("key_{key:04}"),
                agent: format!("agent-{key}"),
                team: Some(format!("team-{}", key % 40)),
                project: Some(format!("project-{}", key % 7)),
                org: Some(format!("org-{}", key % 3)),
                // Runs of 50 consecutive requests, as an agent's task would make.
                run_id: Some(format!("run_{:010}", i / RUN_LEN)),
                model_requested: Some(
                    ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "o3"][next(4) as usize].into(),
                ),
                model_served: None,
                provider: Some("openai".into()),
                status,
                error_kind: (status == 429).then(|| "rate_limited".to_string()),
                input_tokens: next(8_000),
                cached_input_tokens: next(2_000),
                output_tokens: next(1_000),
                usage_source: "provider".into(),
                cost_micros: next(20_000),
                latency_ms: next(4_000),
                attempts: 1,
                ..UsageRecord::default()
            });
            if recs.len() == batch {
                store.insert_usage_batch(&recs).expect("insert");
                written += recs.len() as u64;
                recs.clear();
            }
        }
        if !recs.is_empty() {
            written += recs.len() as u64;
            store.insert_usage_batch(&recs).expect("insert");
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "{{\"phase\":\"write\",\"records\":{written},\"seconds\":{secs:.1},\"records_per_s\":{:.0}}}",
            written as f64 / secs
        );
    }
    let have_outcomes = store.outcomes_since(0).expect("outcomes").len() as u64;
    let runs = n.div_ceil(RUN_LEN);
    if have_outcomes < runs / 2 {
        let started = Instant::now();
        for run in (have_outcomes * 2..runs).step_by(2) {
            let last = (run + 1) * RUN_LEN - 1;
            let o = tollgate::store::Outcome {
                id: format!("out_{run:010}"),
                occurred_ms: now - span + ((last.min(n - 1)) as i64 * span / n as i64),
                key_id: "key_0000".into(),
                agent: "agent-0".into(),
                team: None,
                project: None,
                run_id: Some(format!("run_{run:010}")),
                request_id: None,
                kind: ["ticket_resolved", "pr_merged", "lead_qualified"][(run % 3) as usize].into(),
                success: run % 5 != 0,
                value_micros: Some(5_000_000),
                tags: Default::default(),
                created_ms: now,
            };
            store.record_outcome(&o, true).expect("outcome");
        }
        println!(
            "{{\"phase\":\"outcomes\",\"outcomes\":{},\"seconds\":{:.1}}}",
            runs / 2,
            started.elapsed().as_secs_f64()
        );
    }
    let total = store.count_usage().expect("count");
    {
        let started = Instant::now();
        let rows = tollgate::ops::roi_report(&store, "type", Some("30d")).expect("roi");
        println!(
            "{{\"phase\":\"query\",\"records\":{total},\"by\":\"outcome\",\"source\":\"rollups\",\"groups\":{},\"ms\":{:.1}}}",
            rows.len(),
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    for by in ["team", "key", "org", "model", "day"] {
        let g: GroupBy = by.parse().unwrap();
        // SPEND_SCALE_SOURCES=rollups skips the (minutes-long at 100 M) record scans.
        let sources: &[ReportSource] =
            if std::env::var("SPEND_SCALE_SOURCES").is_ok_and(|v| v == "rollups") {
                &[ReportSource::Auto]
            } else {
                &[ReportSource::Auto, ReportSource::Records]
            };
        for &source in sources {
            let started = Instant::now();
            let rows = store
                .usage_report_from(
                    &g,
                    tollgate::clock::now_ms() - span,
                    tollgate::clock::now_ms(),
                    source,
                )
                .expect("report");
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            println!(
                "{{\"phase\":\"query\",\"records\":{total},\"by\":\"{by}\",\"source\":\"{}\",\"groups\":{},\"ms\":{ms:.1}}}",
                if source == ReportSource::Auto { "rollups" } else { "records" },
                rows.len()
            );
        }
    }
}
