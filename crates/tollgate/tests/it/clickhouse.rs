//! Usage analytics in a real `clickhouse-server`: the same reports from ClickHouse as from the
//! store, over whole days and partial ones; a ClickHouse killed under load and started again
//! with every record there once; a spill replayed twice without double counting.

use crate::harness::*;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tollgate::analytics::Analytics;
use tollgate::config::{AnalyticsBackend, AnalyticsConfig};
use tollgate::records::UsageRecord;
use tollgate::store::{GroupBy, ReportSource, Store};

fn analytics_config(url: &str, database: &str) -> AnalyticsConfig {
    AnalyticsConfig {
        backend: AnalyticsBackend::Clickhouse,
        url: Some(url.to_string()),
        database: database.to_string(),
        batch_max: 400,
        flush_interval: Duration::from_millis(50),
        retry_interval: Duration::from_millis(200),
        timeout: Duration::from_secs(5),
        ..AnalyticsConfig::default()
    }
}

/// `n` records over the last ten days: three agents (two in one team; names with tabs,
/// quotes, backslashes, newlines and accents), served and
/// unserved models, two endpoints, tags, runs, failures and cached tokens.
fn records(n: usize, now: i64) -> Vec<UsageRecord> {
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    (0..n)
        .map(|i| {
            let k = (next() % 3) as usize;
            let ts = now - (next() % (10 * 86_400_000)) as i64;
            let mut tags = std::collections::BTreeMap::new();
            if i % 4 != 0 {
                // Values that need escaping on their way: quotes, backslashes, tabs, accents.
                tags.insert(
                    "feature".to_string(),
                    ["sé'arch\\x", "chat\tbot"][i % 2].to_string(),
                );
            }
            let status = [200, 200, 200, 200, 429, 502][(next() % 6) as usize];
            UsageRecord {
                id: format!("req_{ts:011x}{i:013x}"),
                ts_ms: ts,
                endpoint: ["chat", "messages"][i % 2].into(),
                key_id: format!("key{k}"),
                agent: ["plan\tner", "co'der\\", "lône\nwolf"][k].into(),
                team: (k < 2).then(|| "research".to_string()),
                project: (k == 1).then(|| "atlas".to_string()),
                tags,
                model_requested: Some(["gpt-x", "claude-y"][i % 2].into()),
                model_served: (status == 200).then(|| ["gpt-x-1", "claude-y-2"][i % 2].into()),
                provider: Some("up".into()),
                status,
                error_kind: (status != 200).then(|| "upstream_error".to_string()),
                input_tokens: next() % 5_000,
                cached_input_tokens: next() % 100,
                output_tokens: next() % 800,
                reasoning_tokens: next() % 10,
                cache_write_5m_tokens: next() % 7,
                usage_source: "provider".into(),
                cost_micros: next() % 90_000,
                latency_ms: next() % 2_000,
                run_id: (i % 5 == 0).then(|| format!("run-{}", i % 3)),
                attempts: 1,
                ..UsageRecord::default()
            }
        })
        .collect()
}

async fn count(ch: &ClickHouseServer, db: &str) -> (u64, u64) {
    let out = ch
        .query(&format!("SELECT count(), uniqExact(id) FROM {db}.usage"))
        .await;
    let mut it = out.split('\t').map(|v| v.parse::<u64>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

async fn wait_count(ch: &ClickHouseServer, db: &str, want: u64) -> (u64, u64) {
    let mut last = (0, 0);
    for _ in 0..300 {
        last = count(ch, db).await;
        if last.0 >= want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

/// A SQLite store in a fresh directory, and a connection to write records the way the
/// writer does.
fn store_in(tag: &str) -> (TempDir, Store, tollgate::db::Db) {
    let dir = TempDir::new(tag);
    let location = tollgate::db::Location::Sqlite(dir.path().join("tollgate.db"));
    let store = Store::open_at(&location).unwrap();
    let db = location.connect().unwrap();
    (dir, store, db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reports_come_from_the_store_and_from_clickhouse() {
    if let Some(ch) = ClickHouseServer::start().await {
        same_reports_on(ch).await;
    }
}

/// The same on ClickHouse 26.9 (chDB), so the SQL stays what current versions accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reports_come_from_current_clickhouse_too() {
    if let Some(ch) = ClickHouseServer::chdb().await {
        same_reports_on(ch).await;
    }
}

async fn same_reports_on(ch: ClickHouseServer) {
    let (dir, store, mut db) = store_in("ch-reports");
    let now = tollgate::clock::now_ms();
    let mut recs = records(3_000, now);
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let a = Analytics::start(&analytics_config(&ch.url(), "reports"), dir.path(), metrics)
        .await
        .unwrap();
    // As the writer does: each committed batch is offered to the sink.
    for batch in recs.chunks_mut(250) {
        tollgate::metering::commit_batch(&mut db, batch).unwrap();
        a.sink.offer(batch);
    }
    assert!(a.sink.flush(Duration::from_secs(20)).await);
    assert_eq!(count(&ch, "reports").await, (3_000, 3_000));

    let groupings = [
        "key",
        "team",
        "org",
        "project",
        "model",
        "day",
        "endpoint",
        "run",
        "tag:feature",
    ];
    // A window of whole days and partial ones, one inside today's hours, and all of it.
    let windows = [
        now - 3 * 86_400_000 - 3_600_000 - 17 * 60_000,
        now - 2 * 3_600_000,
        now - 30 * 86_400_000,
    ];
    // Three states of the hourly rollup: it saw every row (a fresh database), it started
    // two days ago (an upgrade then: older hours from `usage`), it starts now (an upgrade
    // today: only days come from a rollup). The reports must not change.
    for applied in [None, Some(now - 50 * 3_600_000), Some(now)] {
        if let Some(at) = applied {
            ch.query(&format!(
                "INSERT INTO reports.tollgate_migrations VALUES (5, {at})"
            ))
            .await;
            a.clickhouse.migrate().await.unwrap();
        }
        for g in groupings {
            let by: GroupBy = g.parse().unwrap();
            for since in windows {
                let from_store = store
                    .usage_report_from(&by, since, now, ReportSource::Auto)
                    .unwrap();
                let from_ch = a.clickhouse.usage_report(&by, since, now).await.unwrap();
                assert!(!from_store.is_empty(), "{g} since {since}");
                assert_eq!(
                    from_ch, from_store,
                    "{g} since {since}, view applied {applied:?}"
                );
            }
        }
    }
    let hourly = ch
        .query("SELECT sum(requests), sum(cost_micros) FROM reports.usage_hourly")
        .await;
    let cost: u64 = recs.iter().map(|r| r.cost_micros).sum();
    assert_eq!(hourly, format!("3000\t{cost}"));
    // The daily rollup holds every record once.
    let daily = ch
        .query("SELECT sum(requests), sum(cost_micros) FROM reports.usage_daily")
        .await;
    assert_eq!(daily, format!("3000\t{cost}"));
    // `tollgate migrate` with a config naming ClickHouse migrates its schema too.
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[analytics]\nbackend = \"clickhouse\"\nurl = \"{}\"\ndatabase = \"cli\"\n",
            ch.url()
        ),
    )
    .unwrap();
    let data = dir.path().join("cli-data");
    let out = crate::cli::tollgate(&[
        "migrate",
        "--data-dir",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("clickhouse cli: schema at version 10"),
        "{text}"
    );
    assert_eq!(ch.query("EXISTS TABLE cli.usage_daily").await, "1");
    // Migrations are recorded and applied once (version 5's extra rows are the test's).
    let again = a.clickhouse.migrate().await.unwrap();
    assert_eq!(
        ch.query(
            "SELECT countIf(version != 5), countIf(version = 5), max(version) FROM reports.tollgate_migrations"
        )
        .await,
        format!("{}\t3\t{again}", again - 1)
    );
}

/// A spill replayed, and then replayed again (a crash after the rows went in but before the
/// file was removed): every record in ClickHouse once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spill_is_replayed_once_even_when_replayed_twice() {
    let Some(ch) = ClickHouseServer::start().await else {
        return;
    };
    let dir = TempDir::new("ch-spill");
    let now = tollgate::clock::now_ms();
    let recs = records(1_200, now);
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    // Nothing listens there: everything is spilled.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let down = Analytics::start(
        &analytics_config(&nowhere, "spill"),
        dir.path(),
        metrics.clone(),
    )
    .await
    .unwrap();
    for batch in recs.chunks(300) {
        down.sink.offer(batch);
    }
    assert!(down.sink.flush(Duration::from_secs(10)).await);
    drop(down);
    let spill = dir.path().join("analytics").join("spill.bin");
    let kept = std::fs::read(&spill).unwrap();
    assert!(
        metrics
            .encode()
            .contains("tollgate_analytics_records_spilled_total 1200"),
        "{}",
        metrics.encode()
    );

    // ClickHouse is there now: the spill is replayed on start.
    let cfg = analytics_config(&ch.url(), "spill");
    let up = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    assert_eq!(wait_count(&ch, "spill", 1_200).await, (1_200, 1_200));
    for _ in 0..100 {
        if !spill.exists() && !dir.path().join("analytics/replay.bin").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!spill.exists(), "the spill file is gone once replayed");
    drop(up);

    // The same file again, as if the process died before removing it: nothing doubles.
    std::fs::write(dir.path().join("analytics/replay.bin"), &kept).unwrap();
    let again = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    for _ in 0..100 {
        if !dir.path().join("analytics/replay.bin").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(again.sink.flush(Duration::from_secs(10)).await);
    assert_eq!(count(&ch, "spill").await, (1_200, 1_200));
    let daily = ch
        .query("SELECT sum(requests) FROM spill.usage_daily")
        .await;
    assert_eq!(daily, "1200", "the rollup counted each record once");
    drop(again);

    // A spill file of version 7 (TabSeparated lines), left by an older tollgate: replayed
    // once, its rows already there (the first) left alone.
    let line = |id: &str, ts: i64, day: String| {
        format!(
            "{id}\t{ts}\t{day}\tchat\tkeyL\tleg\\tacy\tteamL\tdefault\t\tm\tm\tm\tup\t200\t0\t\t-\t['a']\t['b\\'c']\t1\t0\t2\t0\t0\t777\t0\t5\t0\t0\t\tprovider\t\t\n"
        )
    };
    let day = |ts: i64| {
        let ch = &ch;
        async move {
            ch.query(&format!("SELECT toDate({})", ts / 86_400_000))
                .await
        }
    };
    let (old_ts, new_ts) = (recs[0].ts_ms, 1_764_000_000_000i64);
    let legacy = format!(
        "{}{}{}",
        line(&recs[0].id, old_ts, day(old_ts).await),
        line("req_legacy", new_ts, day(new_ts).await),
        "req_cut\t1"
    );
    std::fs::write(dir.path().join("analytics/replay.jsonl"), legacy).unwrap();
    let legacy_up = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    for _ in 0..100 {
        if !dir.path().join("analytics/replay.jsonl").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(legacy_up.sink.flush(Duration::from_secs(10)).await);
    assert!(!dir.path().join("analytics/replay.jsonl").exists());
    assert_eq!(count(&ch, "spill").await, (1_201, 1_201));
    assert_eq!(
        ch.query("SELECT agent, cost_micros, tag_values FROM spill.usage WHERE id = 'req_legacy'")
            .await,
        "leg\\tacy\t777\t['b\\'c']"
    );
    // The log does not answer from a row that predates the columns it shows; rows written
    // since do.
    let page = |id: &str| tollgate::store::RecordFilter {
        request_id: Some(id.to_string()),
        limit: 10,
        ..Default::default()
    };
    let ch_api = &legacy_up.clickhouse;
    assert_eq!(
        ch_api.find_records(&page("req_legacy")).await.unwrap(),
        None
    );
    let fresh = ch_api
        .find_records(&page(&recs[7].id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(fresh.len(), 1);
    assert_eq!(fresh[0].cost_micros, recs[7].cost_micros);
}

/// A gateway writing to ClickHouse while ClickHouse is killed and started again: every
/// record the store has is in ClickHouse once, and reports answer from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_killed_under_load_loses_and_doubles_nothing() {
    let Some(mut ch) = ClickHouseServer::start().await else {
        return;
    };
    let gw = TestGateway::start(&format!(
        "[analytics]\nbackend = \"clickhouse\"\nurl = \"{}\"\ndatabase = \"gw\"\nbatch_max = 50\nflush_interval = \"50ms\"\nretry_interval = \"300ms\"\ntimeout = \"2s\"\n[loop_guard]\nenabled = false\n",
        ch.url()
    ))
    .await;
    let key = gw.key().await;
    let send = |n: usize, tag: &'static str| {
        let gw = &gw;
        let key = &key;
        async move {
            for i in 0..n {
                let r = gw
                    .chat(
                        key,
                        json!({"model": "mock", "messages": user(&format!("{tag} {i}"))}),
                    )
                    .await;
                assert_eq!(r.status(), 200);
            }
        }
    };
    send(60, "before").await;
    assert_eq!(wait_count(&ch, "gw", 60).await.0, 60);

    // Killed while requests keep coming: they are answered, and their rows spilled.
    let load = send(80, "during");
    let kill = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ch.kill();
    };
    tokio::join!(load, kill);
    send(20, "after").await;
    // The sink retries a failed insert twice before it spills.
    let mut m = String::new();
    for _ in 0..100 {
        m = gw.metrics().await;
        if !m.contains("tollgate_analytics_records_spilled_total 0\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !m.contains("tollgate_analytics_records_spilled_total 0\n"),
        "{m}"
    );

    ch.restart().await;
    let store_count = gw.wait_records(160).await.len() as u64;
    assert_eq!(store_count, 160);
    assert_eq!(wait_count(&ch, "gw", 160).await, (160, 160));
    // Nothing more arrives later either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&ch, "gw").await, (160, 160));
    let m = gw.metrics().await;
    assert!(
        !m.contains("tollgate_analytics_records_replayed_total 0\n"),
        "{m}"
    );
    assert!(m.contains("tollgate_analytics_spill_bytes 0\n"), "{m}");

    // Reports answer from ClickHouse, with what the store says.
    for by in ["key", "model", "day", "endpoint"] {
        let r = gw
            .client
            .get(format!("{}/admin/usage?by={by}&since=1d", gw.url))
            .bearer_auth(&gw.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.headers()["x-tollgate-report-source"], "clickhouse");
        let from_ch: Value = r.json().await.unwrap();
        let (s, from_store) = gw
            .admin(
                reqwest::Method::GET,
                &format!("/admin/usage?by={by}&since=1d&source=store"),
                None,
            )
            .await;
        assert_eq!(s, 200);
        assert_eq!(from_ch, from_store, "{by}");
        assert_eq!(from_ch[0]["requests"], 160, "{by}: {from_ch}");
    }
}

/// A queue too small for what the writer hands over: the rows spill at once, and are
/// replayed while ClickHouse is up, each once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_spills_and_the_spill_is_replayed_while_clickhouse_is_up() {
    let Some(ch) = ClickHouseServer::start().await else {
        return;
    };
    let dir = TempDir::new("ch-full");
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let cfg = AnalyticsConfig {
        queue_capacity: 50,
        batch_max: 50,
        ..analytics_config(&ch.url(), "full")
    };
    let a = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    let recs = records(1_000, tollgate::clock::now_ms());
    for batch in recs.chunks(100) {
        a.sink.offer(batch);
    }
    assert_eq!(metrics.analytics_records_spilled.get(), 1_000);
    assert_eq!(wait_count(&ch, "full", 1_000).await, (1_000, 1_000));
    assert!(a.sink.flush(Duration::from_secs(10)).await);
    assert_eq!(count(&ch, "full").await, (1_000, 1_000));
    assert_eq!(metrics.analytics_records_replayed.get(), 1_000);
}

/// Rows that landed in `usage` while the rollups' views did not run (ClickHouse killed
/// between the table and its views), then found there by a replay: their hours are suspect,
/// reports read them from `usage` and stay exact, and the repair puts what the rollups lack
/// into them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_missing_rows_are_read_around_then_repaired() {
    if let Some(ch) = ClickHouseServer::start().await {
        repair_on(ch).await;
    }
}

/// The same on ClickHouse 26.9 (chDB), so the SQL stays what current versions accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_are_read_around_and_repaired_on_current_clickhouse_too() {
    if let Some(ch) = ClickHouseServer::chdb().await {
        repair_on(ch).await;
    }
}

async fn repair_on(ch: ClickHouseServer) {
    let (dir, store, mut db) = store_in("ch-repair");
    let now = tollgate::clock::now_ms();
    let mut recs = records(900, now);
    for batch in recs.chunks_mut(300) {
        tollgate::metering::commit_batch(&mut db, batch).unwrap();
    }
    // The rows as the sink spills them, from a sink that cannot reach ClickHouse.
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let spilled = TempDir::new("ch-repair-spill");
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let down = Analytics::start(
        &analytics_config(&nowhere, "repair"),
        spilled.path(),
        metrics.clone(),
    )
    .await
    .unwrap();
    down.sink.offer(&recs);
    assert!(down.sink.flush(Duration::from_secs(10)).await);
    drop(down);
    let lines = std::fs::read(spilled.path().join("analytics/spill.bin")).unwrap_or_else(|e| {
        panic!(
            "{e}: {:?} {}",
            std::fs::read_dir(spilled.path().join("analytics"))
                .map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>()),
            metrics.encode()
        )
    });

    // The rows go in with the views detached: in `usage`, not in the rollups.
    let cfg = analytics_config(&ch.url(), "repair");
    let a = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    for v in ["usage_daily_mv", "usage_hourly_mv"] {
        ch.query(&format!("DETACH TABLE repair.{v}")).await;
    }
    a.sink.offer(&recs);
    assert!(a.sink.flush(Duration::from_secs(10)).await);
    assert_eq!(count(&ch, "repair").await, (900, 900));
    for v in ["usage_daily_mv", "usage_hourly_mv"] {
        ch.query(&format!("ATTACH TABLE repair.{v}")).await;
    }
    let rolled = |t: &'static str| {
        let ch = &ch;
        async move {
            ch.query(&format!("SELECT sum(requests) FROM repair.{t}"))
                .await
        }
    };
    assert_eq!(rolled("usage_daily").await, "0");
    drop(a);

    // As after a crash: the same rows replayed. They are there, so nothing is inserted,
    // and their hours become suspect.
    std::fs::create_dir_all(dir.path().join("analytics")).unwrap();
    std::fs::write(dir.path().join("analytics/replay.bin"), &lines).unwrap();
    let a = Analytics::start(&cfg, dir.path(), metrics.clone())
        .await
        .unwrap();
    for _ in 0..100 {
        if !dir.path().join("analytics/replay.bin").exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(a.sink.flush(Duration::from_secs(10)).await);
    assert_eq!(count(&ch, "repair").await, (900, 900));
    let compare = |when: &'static str| {
        let (a, store) = (&a, &store);
        async move {
            for g in ["key", "team", "model", "day"] {
                let by: GroupBy = g.parse().unwrap();
                for since in [now - 3 * 86_400_000 - 3_600_000, now - 30 * 86_400_000] {
                    let from_store = store
                        .usage_report_from(&by, since, now, ReportSource::Auto)
                        .unwrap();
                    let from_ch = a.clickhouse.usage_report(&by, since, now).await.unwrap();
                    assert_eq!(from_ch, from_store, "{when}: {g} since {since}");
                }
            }
        }
    };
    compare("suspect, not repaired").await;

    // Due once their days are over: the rollups get what they lack, once.
    let repaired = a.clickhouse.repair_due(now + 2 * 86_400_000).await.unwrap();
    assert!(repaired > 0);
    assert_eq!(rolled("usage_daily").await, "900");
    assert_eq!(rolled("usage_hourly").await, "900");
    assert_eq!(
        a.clickhouse.repair_due(now + 2 * 86_400_000).await.unwrap(),
        0
    );
    compare("repaired").await;
    // A restart finds nothing left to repair, and reads the rollups again.
    drop(a);
    let a = Analytics::start(&cfg, dir.path(), metrics).await.unwrap();
    assert_eq!(
        a.clickhouse.repair_due(now + 2 * 86_400_000).await.unwrap(),
        0
    );
    assert_eq!(rolled("usage_daily").await, "900");
}

/// `tollgate backfill`: what the sink never sent (its queue lost to a `kill -9`) goes from the
/// store to ClickHouse, once however often it runs, through the rollups.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_sends_what_clickhouse_lacks_once() {
    if let Some(ch) = ClickHouseServer::start().await {
        backfill_on(ch).await;
    }
}

/// The same on ClickHouse 26.9 (chDB), so the SQL stays what current versions accept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_works_on_current_clickhouse_too() {
    if let Some(ch) = ClickHouseServer::chdb().await {
        backfill_on(ch).await;
    }
}

async fn backfill_on(ch: ClickHouseServer) {
    let (dir, store, mut db) = store_in("ch-backfill");
    let now = tollgate::clock::now_ms();
    let mut recs = records(1_000, now);
    let metrics = Arc::new(tollgate::metrics::Metrics::new());
    let a = Analytics::start(&analytics_config(&ch.url(), "fill"), dir.path(), metrics)
        .await
        .unwrap();
    for (i, batch) in recs.chunks_mut(200).enumerate() {
        tollgate::metering::commit_batch(&mut db, batch).unwrap();
        // Only the first two batches reached the sink before the process died.
        if i < 2 {
            a.sink.offer(batch);
        }
    }
    assert!(a.sink.flush(Duration::from_secs(10)).await);
    assert_eq!(count(&ch, "fill").await, (400, 400));
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(
        &cfg,
        format!(
            "[analytics]\nbackend = \"clickhouse\"\nurl = \"{}\"\ndatabase = \"fill\"\n",
            ch.url()
        ),
    )
    .unwrap();
    let run = || {
        let out = crate::cli::tollgate(&[
            "backfill",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
            "--since",
            "30d",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let first = run();
    assert!(
        first.contains("1000 rows in the store's range (records, their captures, outcomes), 600 sent, 400 already there"),
        "{first}"
    );
    let again = run();
    assert!(again.contains("0 sent, 1000 already there"), "{again}");
    assert_eq!(count(&ch, "fill").await, (1_000, 1_000));
    let cost: u64 = recs.iter().map(|r| r.cost_micros).sum();
    assert_eq!(
        ch.query("SELECT sum(requests), sum(cost_micros) FROM fill.usage_daily")
            .await,
        format!("1000\t{cost}")
    );
    for g in ["key", "model", "tag:feature"] {
        let by: GroupBy = g.parse().unwrap();
        let since = now - 30 * 86_400_000;
        assert_eq!(
            a.clickhouse.usage_report(&by, since, now).await.unwrap(),
            store
                .usage_report_from(&by, since, now, ReportSource::Auto)
                .unwrap(),
            "{g}"
        );
    }
    // Without ClickHouse in the configuration there is nothing to do, and it says so.
    std::fs::write(&cfg, "").unwrap();
    let out = crate::cli::tollgate(&[
        "backfill",
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--since",
        "1d",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nothing to backfill"));
}

/// A gateway with ClickHouse: paid requests in runs and sub-runs, a stream, a refusal, other
/// agents' spend, outcomes. The request log (filters, pages) and the ROI report answer from
/// ClickHouse with exactly what the store answers; ClickHouse holds every capture the
/// ledger made and every outcome once; `tollgate backfill` fills an empty database with the
/// same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_and_roi_come_from_clickhouse_as_from_the_store() {
    let Some(ch) = ClickHouseServer::start().await else {
        return;
    };
    log_and_roi_on(&TestStore::Sqlite, &ch).await;
}

/// The same with the store in PostgreSQL (the run trees are read from there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_and_roi_come_from_clickhouse_as_from_postgres() {
    let (Some(ch), Some(pg)) = (ClickHouseServer::start().await, PgServer::start().await) else {
        return;
    };
    log_and_roi_on(&TestStore::Postgres(pg.database("chlog").await), &ch).await;
}

async fn log_and_roi_on(store_kind: &TestStore, ch: &ClickHouseServer) {
    let analytics = format!(
        "[analytics]\nbackend = \"clickhouse\"\nurl = \"{}\"\ndatabase = \"logs\"\nbatch_max = 50\nflush_interval = \"50ms\"\n",
        ch.url()
    );
    let gw = TestGateway::start(
        &store_kind.config(&format!("{analytics}[loop_guard]\nenabled = false\n")),
    )
    .await;
    let (solver, _) = gw
        .create_key(json!({"name": "sol'ver", "team": "support", "tags": {"tier": "gold"}}))
        .await;
    let (idle, _) = gw.create_key(json!({"name": "idle"})).await;
    let wallet = gw.wallet("team:support", "1.00").await;
    let call = |key: String, run: Option<(&'static str, Option<&'static str>)>, body: Value| {
        let gw = &gw;
        async move {
            let mut r = gw
                .client
                .post(format!("{}/v1/chat/completions", gw.url))
                .bearer_auth(&key)
                .json(&body);
            if let Some((run, parent)) = run {
                r = r.header("x-tollgate-run", run);
                if let Some(p) = parent {
                    r = r.header("x-tollgate-parent-run", p);
                }
            }
            let r = r.send().await.unwrap();
            let status = r.status().as_u16();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            let _ = r.bytes().await;
            (status, id)
        }
    };
    let chat = |text: &str| json!({"model": "mock", "messages": user(text)});
    for (i, run) in [
        Some(("t1", None)),
        Some(("t1", None)),
        Some(("t1a", Some("t1"))),
        Some(("t2", None)),
    ]
    .into_iter()
    .enumerate()
    {
        assert_eq!(
            call(solver.clone(), run, chat(&format!("run {i}"))).await.0,
            200
        );
    }
    let (_, lone) = call(solver.clone(), None, chat("lone")).await;
    let stream = json!({"model": "mock", "stream": true, "messages": user("a stream")});
    assert_eq!(
        call(solver.clone(), Some(("t2", None)), stream).await.0,
        200
    );
    let (refused, _) = call(solver.clone(), None, json!({"model": 5, "messages": []})).await;
    assert_eq!(refused, 400);
    for i in 0..3 {
        assert_eq!(
            call(idle.clone(), None, chat(&format!("idle {i}"))).await.0,
            200
        );
    }
    let recs = gw.wait_records(10).await;
    assert_eq!(recs.len(), 10);
    for (body, want) in [
        (
            json!({"id": "o1", "run_id": "t1", "type": "ticket", "success": true, "value": "5.00", "tags": {"q": "it's"}}),
            201,
        ),
        (
            json!({"id": "o2", "run_id": "t2", "type": "ticket", "success": false}),
            201,
        ),
        (
            json!({"id": "o3", "request_id": lone, "type": "answer", "success": true}),
            201,
        ),
        (
            json!({"id": "o1", "run_id": "t1", "type": "ticket", "success": true, "value": "5.00", "tags": {"q": "it's"}}),
            200,
        ),
    ] {
        let r = gw
            .client
            .post(format!("{}/v1/outcomes", gw.url))
            .bearer_auth(&solver)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), want, "{body}");
    }

    let location = match store_kind {
        TestStore::Postgres(url) => tollgate::db::Location::Postgres(url.clone()),
        _ => tollgate::db::Location::Sqlite(gw.dir.path().join("tollgate.db")),
    };
    let store = tokio::task::block_in_place(|| Store::open_at(&location).unwrap());
    // The store's own answers, off the runtime (PostgreSQL's client blocks).
    let on_store = |f: &dyn Fn(&Store) -> Value| tokio::task::block_in_place(|| f(&store));
    let get = |path: String| {
        let gw = &gw;
        async move {
            let r = gw
                .client
                .get(format!("{}{path}", gw.url))
                .bearer_auth(&gw.admin_key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path}");
            let source = r.headers()["x-tollgate-report-source"]
                .to_str()
                .unwrap()
                .to_string();
            let cursor = r
                .headers()
                .get("x-tollgate-next-cursor")
                .map(|c| c.to_str().unwrap().to_string());
            (source, cursor, r.json::<Value>().await.unwrap())
        }
    };
    let queries: &[&[(&str, &str)]] = &[
        &[],
        &[("key", "sol'ver")],
        &[("team", "support")],
        &[("status", "4xx")],
        &[("run", "t2")],
        &[("model", "mock"), ("since", "1h")],
        &[("request_id", &lone)],
        &[("endpoint", "chat.completions"), ("key", "idle")],
    ];
    for q in queries {
        let pairs: Vec<(String, String)> = q
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let from_store: Vec<UsageRecord> = serde_json::from_value(on_store(&|s| {
            json!(s
                .find_records(&tollgate::ops::record_filter(&pairs).unwrap())
                .unwrap())
        }))
        .unwrap();
        assert!(!from_store.is_empty(), "{q:?}");
        let query: String = q
            .iter()
            .map(|(k, v)| format!("&{k}={}", urlencode(v)))
            .collect();
        let (source, _, v) = get(format!("/admin/usage/records?limit=1000{query}")).await;
        assert_eq!(source, "clickhouse", "{q:?}");
        let from_ch: Vec<UsageRecord> = serde_json::from_value(v).unwrap();
        assert_eq!(from_ch, from_store, "{q:?}");
    }
    // Page by page, three at a time, the same pages.
    let (mut cursor, mut paged) = (None::<String>, Vec::new());
    loop {
        let after = cursor
            .as_ref()
            .map(|c| format!("&cursor={}", urlencode(c)))
            .unwrap_or_default();
        let (source, next, v) = get(format!("/admin/usage/records?limit=3{after}")).await;
        assert_eq!(source, "clickhouse");
        paged.extend(serde_json::from_value::<Vec<UsageRecord>>(v).unwrap());
        match next {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let all: Vec<UsageRecord> = serde_json::from_value(on_store(&|s| {
        json!(s
            .find_records(&tollgate::ops::record_filter(&[]).unwrap())
            .unwrap())
    }))
    .unwrap();
    assert_eq!(paged, all);
    // The records say what the store says, beyond what reports sum.
    let streamed = all.iter().find(|r| r.stream).unwrap();
    assert!(streamed.ttft_ms.is_some() && streamed.wallet_id.is_some());
    assert!(all.iter().any(|r| r.detail.is_some()));

    for by in ["agent", "team", "project", "model", "type"] {
        let (source, _, v) = get(format!("/admin/roi?by={by}")).await;
        assert_eq!(source, "clickhouse", "{by}");
        let from_store = on_store(&|s| json!(tollgate::ops::roi_report(s, by, None).unwrap()));
        assert_eq!(v, from_store, "{by}");
    }
    let (source, _, by_outcome) = get("/admin/usage?by=outcome".to_string()).await;
    assert_eq!(source, "clickhouse");
    let ticket = by_outcome
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["group"] == "ticket")
        .unwrap()
        .clone();
    let runs: u64 = all
        .iter()
        .filter(|r| matches!(r.run_id.as_deref(), Some("t1" | "t1a" | "t2")))
        .map(|r| r.cost_micros)
        .sum();
    assert_eq!(ticket["spend_micros"].as_u64(), Some(runs));

    // Every capture of the ledger, once; every outcome once.
    let (_, ledger) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/wallets/{wallet}/ledger?limit=1000"),
            None,
        )
        .await;
    let captures: Vec<&Value> = ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "capture")
        .collect();
    let captured: i64 = captures
        .iter()
        .map(|e| e["amount_micros"].as_i64().unwrap())
        .sum();
    assert!(captures.len() >= 6, "{ledger}");
    let want = format!("{}\t{captured}\t{}", captures.len(), captures.len());
    assert_eq!(
        ch.query("SELECT count(), sum(amount_micros), uniqExact(request_id) FROM logs.ledger")
            .await,
        want
    );
    assert_eq!(
        ch.query("SELECT count(), sum(success) FROM logs.outcomes")
            .await,
        "3\t2"
    );

    // The same from the store into an empty database.
    let cfg = gw.dir.path().join("fill.toml");
    std::fs::write(&cfg, analytics.replace("\"logs\"", "\"refill\"")).unwrap();
    let mut args = vec![
        "backfill".to_string(),
        "--config".into(),
        cfg.to_str().unwrap().into(),
        "--since".into(),
        "1d".into(),
    ];
    args.extend(match store_kind {
        TestStore::Postgres(_) => store_kind.cli_args(),
        _ => vec!["--data-dir".into(), gw.dir.path().to_str().unwrap().into()],
    });
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::cli::tollgate_async(&args).await;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent = 10 + captures.len() + 3;
    assert!(
        text.contains(&format!("{sent} sent, 0 already there")),
        "{text}"
    );
    for (table, cols) in [
        (
            "usage",
            "count(), sum(cost_micros), sum(attempts), sum(absent)",
        ),
        ("ledger", "count(), sum(amount_micros)"),
        ("outcomes", "count(), sum(value_micros), sum(absent)"),
    ] {
        assert_eq!(
            ch.query(&format!("SELECT {cols} FROM refill.{table}"))
                .await,
            ch.query(&format!("SELECT {cols} FROM logs.{table}")).await,
            "{table}"
        );
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}
