//! Hot wallets: holds decided in Redis, shared by every replica; the ledger in the store.

use crate::harness::*;
use crate::wallets;
use serde_json::{json, Value};

/// Every wallet scenario, unchanged, with holds decided in Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_scenarios_behave_identically_with_hot_wallets_in_redis() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    wallets::every_scenario_on(&TestStore::SqliteHotRedis(redis.url())).await;
}

/// The acceptance test: three gateway processes, one Redis, one dollar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_redis_cannot_overdraw_a_wallet() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    wallets::three_replicas_sharing_the_store_cannot_overdraw_a_wallet_on(
        &TestStore::SqliteHotRedis(redis.url()),
    )
    .await;
}

/// Polls until Redis admits against exactly `want` (and returns the wallet), or fails.
async fn wait_hot(gw: &TestGateway, wallet: &str, want: i64, why: &str) -> Value {
    let mut w = Value::Null;
    for _ in 0..200 {
        w = gw.wallet_view(wallet).await;
        if w["hot_balance_micros"].as_i64() == Some(want) {
            return w;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{why}: Redis never showed {want}: {w}");
}

/// Redis learns what only the store was told (a CLI top-up), a replica that died holding money
/// gets it back by expiry, and with Redis stalled money fails closed while requests without a
/// wallet keep going; afterwards the books and Redis agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_wallets_reconcile_release_dead_holds_and_fail_closed() {
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let gw = TestGateway::start(&TestStore::SqliteHotRedis(redis.url()).config(
        "[[prices]]\nmodel = \"mock*\"\ninput = 0\noutput = 625000000\n\
         [wallets]\nreconcile_interval = \"200ms\"\nhold_timeout = \"1s\"\n",
    ))
    .await;
    let (payer, payer_id) = gw.create_key(json!({"name": "payer"})).await;
    let (free, _) = gw.create_key(json!({"name": "free"})).await;
    let wallet = gw.wallet(&format!("key:{payer_id}"), "0.05").await;
    let mut n = 0;
    let mut ask = |key: &str| {
        n += 1;
        let (gw, key) = (&gw, key.to_string());
        let body = json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("h{n}"))});
        async move {
            let started = std::time::Instant::now();
            let r = gw.chat(&key, body).await;
            let status = r.status().as_u16();
            let balance = r
                .headers()
                .get("x-tollgate-balance")
                .map(|v| v.to_str().unwrap().to_string());
            let v: Value = r.json().await.unwrap_or(Value::Null);
            (status, v, balance, started.elapsed())
        }
    };
    let (s, _, balance, _) = ask(&payer).await;
    assert_eq!(s, 200);
    assert_eq!(
        balance.as_deref(),
        Some("40000"),
        "what Redis admitted against"
    );
    gw.wait_records(1).await;
    wait_hot(&gw, &wallet, 40_000, "after the first capture").await;

    // A top-up written to the store by the CLI alone reaches Redis by reconciliation.
    let dir = gw.dir.path().to_str().unwrap().to_string();
    let w2 = wallet.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "wallet",
                "topup",
                &w2,
                "--amount",
                "0.10",
                "--data-dir",
                &dir,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_hot(&gw, &wallet, 140_000, "after a CLI top-up").await;

    // Another replica held money and died: Redis has the hold, the store never hears of it.
    let store = tollgate::store::Store::open(gw.dir.path()).unwrap();
    let ghost = tollgate::hotwallet::HotWallets::new(
        &redis.url(),
        std::time::Duration::from_secs(1),
        std::sync::Arc::new(store),
    )
    .unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 400;
    let held = ghost
        .hold(&wallet, "req-of-a-dead-replica", 120_000, expires)
        .await;
    assert_eq!(
        held,
        Ok(tollgate::hotwallet::HotHold::Held {
            balance_micros: 20_000
        })
    );
    // What is left covers two requests, not three.
    let (s1, _, _, _) = ask(&payer).await;
    let (s2, _, _, _) = ask(&payer).await;
    let (s3, v3, _, _) = ask(&payer).await;
    assert_eq!((s1, s2, s3), (200, 200, 402), "{v3}");
    assert_eq!(v3["error"]["code"], "insufficient_funds");
    // The dead replica's hold expires and its money comes back.
    gw.wait_records(4).await;
    wait_hot(
        &gw,
        &wallet,
        120_000,
        "after the dead replica's hold expired",
    )
    .await;

    // Redis stalls: money fails closed, quickly; a key without a wallet is not affected.
    redis.process.signal("STOP");
    let (s, v, _, took) = ask(&payer).await;
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "wallet_unavailable");
    assert!(took < std::time::Duration::from_secs(5), "{took:?}");
    let (s, v, _, _) = ask(&free).await;
    assert_eq!(s, 200, "{v}");
    redis.process.signal("CONT");
    let mut back = false;
    for _ in 0..100 {
        if ask(&payer).await.0 == 200 {
            back = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(back, "hot wallets did not come back after Redis did");

    // The books: the ledger balances, Redis agrees with it, and the balance is what was put
    // in minus what the recorded requests cost.
    let recs = gw.wait_records(n).await;
    assert_eq!(recs.len(), n);
    let paid: u64 = recs
        .iter()
        .filter(|r| r.wallet_id.is_some())
        .map(|r| r.cost_micros)
        .sum();
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/wallets/verify", None)
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let w = wait_hot(&gw, &wallet, 150_000 - paid as i64, "at the end").await;
    assert_eq!(w["balance_micros"].as_i64(), Some(150_000 - paid as i64));
    assert!(recs
        .iter()
        .filter(|r| r.status == 503)
        .all(|r| r.cost_micros == 0 && r.attempts == 0));
}

/// Redis admits faster than the store records: when the ledger writer falls behind (here:
/// PostgreSQL stalled under it), new money is refused with 503 before the usage queue can
/// overflow and drop captures; once the store is back everything is recorded and the books
/// and Redis agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ledger_writer_that_falls_behind_stops_new_money_before_records_are_lost() {
    let (Some(redis), Some(pg)) = (RedisServer::start().await, PgServer::start().await) else {
        return;
    };
    let url = pg.database("behind").await;
    let gw = TestGateway::start(&TestStore::SqliteHotRedis(redis.url()).config(&format!(
        "[store]\nurl = \"{url}\"\n[metering]\nqueue_capacity = 16\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 0\noutput = 625000000\n"
    )))
    .await;
    let (payer, payer_id) = gw.create_key(json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{payer_id}"), "1.00").await;
    let ask = |i: usize| {
        let (gw, key) = (&gw, payer.clone());
        async move {
            let r = gw
                .chat(
                    &key,
                    json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("b{i}"))}),
                )
                .await;
            let s = r.status().as_u16();
            (s, r.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    assert_eq!(ask(0).await.0, 200);
    gw.wait_records(1).await;
    pg.signal_all("STOP");
    let mut admitted = 0;
    let mut refused = None;
    for i in 1..=16 {
        let (s, v) = ask(i).await;
        if s == 200 {
            admitted += 1;
        } else {
            refused = Some((s, v));
            break;
        }
    }
    let (s, v) = refused.expect("new money kept being admitted while nothing was recorded");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "wallet_unavailable");
    assert!(admitted >= 1, "the queue had room for some");
    pg.signal_all("CONT");

    // Nothing was dropped: every admitted request is recorded once the store is back (the
    // refused one is counted as shed: it would only have lengthened the queue), and Redis
    // ends where the ledger does.
    let recs = gw.wait_records(admitted + 1).await;
    assert_eq!(recs.len(), admitted + 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_usage_records_dropped_total 0")
            && metrics.contains("tollgate_usage_records_shed_total 1"),
        "{metrics}"
    );
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/wallets/verify", None)
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let spent = 10_000 * (admitted as i64 + 1);
    let w = wait_hot(&gw, &wallet, 1_000_000 - spent, "after the store came back").await;
    assert_eq!(w["balance_micros"].as_i64(), Some(1_000_000 - spent));
}
