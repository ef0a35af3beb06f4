#![allow(clippy::unwrap_used, clippy::expect_used)]
//! How fast the store's writer settles wallet holds (issue 17, item 4; bench/RESULTS.md): one
//! wallet, N holds placed in groups as the request path places them, then N usage records
//! settled through the writer's own batch commit (`metering::commit_batch`) in chunks of
//! CHUNK, timed. Every settle captures: a release, a capture and the record in one transaction
//! per chunk.
//!
//!   cargo run --release --example settle_rate -- sqlite:/tmp/settle 20000 [CHUNK]
//!   cargo run --release --example settle_rate -- postgres://… 20000 [CHUNK]

use std::time::Instant;
use tollgate::db::Location;
use tollgate::metering::UsageRecord;
use tollgate::wallet::{self, Credit, HoldArgs, OwnerKind};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (target, n) = match (
        args.get(1),
        args.get(2).and_then(|s| s.parse::<usize>().ok()),
    ) {
        (Some(t), Some(n)) => (t.clone(), n),
        _ => {
            eprintln!("usage: settle_rate sqlite:DIR|postgres://URL SETTLES [CHUNK]");
            std::process::exit(2);
        }
    };
    let chunk: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(64);
    let location = match target.strip_prefix("sqlite:") {
        Some(dir) => {
            std::fs::create_dir_all(dir).expect("data dir");
            Location::Sqlite(std::path::Path::new(dir).join("tollgate.db"))
        }
        None => Location::from_config(Some(&target), std::path::Path::new(".")),
    };
    drop(tollgate::store::Store::open_at(&location).expect("store"));
    let mut db = location.connect().expect("connect");
    let now = tollgate::clock::now_ms();
    let wallet_id = db
        .write(|tx| {
            let w = wallet::create(tx, OwnerKind::Team, "bench", 0, now)?;
            let idem = format!("bench-{now}");
            wallet::credit(
                tx,
                &w.id,
                Credit::Topup,
                1_000_000_000_000,
                &idem,
                None,
                now,
            )?;
            Ok::<_, wallet::WalletError>(w.id)
        })
        .unwrap();
    let ids: Vec<String> = (0..n).map(|_| tollgate::clock::new_request_id()).collect();
    let started = Instant::now();
    for group in ids.chunks(chunk) {
        let holds: Vec<HoldArgs> = group
            .iter()
            .map(|id| HoldArgs {
                wallet_id: &wallet_id,
                request_id: id,
                amount: 20_000,
                expires_ms: now + 600_000,
            })
            .collect();
        db.write(|tx| wallet::hold_group(tx, &holds, now)).unwrap();
    }
    let hold_secs = started.elapsed().as_secs_f64();
    let records_only = std::env::var("SETTLE_RATE_RECORDS_ONLY").is_ok_and(|v| v == "1");
    let mut records: Vec<UsageRecord> = ids
        .iter()
        .map(|id| UsageRecord {
            id: id.clone(),
            ts_ms: now,
            endpoint: "chat.completions".into(),
            key_id: "key_bench".into(),
            agent: "bench".into(),
            model_requested: Some("gpt-4o-mini".into()),
            provider: Some("openai".into()),
            status: 200,
            input_tokens: 1_000,
            output_tokens: 200,
            usage_source: "provider".into(),
            cost_micros: 1_234,
            attempts: 1,
            // SETTLE_RATE_RECORDS_ONLY=1: the same records without a wallet, for the
            // writer's cost without settles.
            wallet_id: (!records_only).then(|| wallet_id.clone()),
            ..UsageRecord::default()
        })
        .collect();
    let started = Instant::now();
    for batch in records.chunks_mut(chunk) {
        tollgate::metering::commit_batch(&mut db, batch).expect("settle");
    }
    let settle_secs = started.elapsed().as_secs_f64();
    let (balance, _, _) = wallet::state(&mut db, &wallet_id).unwrap();
    if !records_only {
        assert_eq!(
            balance,
            1_000_000_000_000 - 1_234 * n as i64,
            "every hold released and captured once"
        );
    }
    println!(
        "{{\"store\":\"{}\",\"records_only\":{records_only},\"settles\":{n},\"chunk\":{chunk},\"holds_per_s\":{:.0},\"settles_per_s\":{:.0}}}",
        if target.starts_with("sqlite:") { "sqlite" } else { "postgres" },
        n as f64 / hold_secs,
        n as f64 / settle_secs
    );
}
