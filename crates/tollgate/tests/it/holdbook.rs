//! Holds decided in the gateway's memory (`[wallets] backend = "memory"`, ADR 0036): the same
//! books as holds in the store, and a store no other gateway may share.

use crate::harness::*;
use crate::wallets;
use tollgate::config::Config;
use tollgate::server::{Gateway, ServeOptions};

/// Every wallet scenario, unchanged, with holds decided in memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallet_scenarios_behave_identically_with_holds_in_memory() {
    wallets::every_scenario_on(&TestStore::SqliteMemory).await;
}

async fn second_gateway(config: &str, dir: &std::path::Path) -> anyhow::Result<Gateway> {
    let mut cfg = Config::from_toml(config).unwrap();
    cfg.server.data_dir = dir.to_path_buf();
    Gateway::start(ServeOptions {
        config: cfg,
        config_path: None,
        listener: Some(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()),
        admin_key: Some(ADMIN_KEY.into()),
        secret: None,
        provider_keys: Default::default(),
    })
    .await
}

/// A gateway deciding holds in memory has its SQLite file to itself: a second gateway on it
/// is refused, whichever of the two modes either runs, with a message that says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_in_memory_need_the_store_to_themselves() {
    let memory = TestStore::SqliteMemory.config("");
    let gw = TestGateway::start(&memory).await;
    let refused = |config: String, dir: std::path::PathBuf, why: &'static str| async move {
        let err = second_gateway(&config, &dir).await.err().expect("refused");
        assert!(err.to_string().contains(why), "{err:#}");
    };
    refused(
        String::new(),
        gw.dir.path().into(),
        "backend = \"memory\" serves",
    )
    .await;
    refused(
        memory.clone(),
        gw.dir.path().into(),
        "another gateway serves",
    )
    .await;
    let shared = TestGateway::start("").await;
    refused(
        memory.clone(),
        shared.dir.path().into(),
        "another gateway serves",
    )
    .await;
    // Gateways sharing a file in the store's mode still may.
    let again = second_gateway("", shared.dir.path()).await;
    assert!(again.is_ok(), "{:#}", again.err().unwrap());

    let problems = Config::from_toml(
        "[store]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n[wallets]\nbackend = \"memory\"\n",
    )
    .unwrap()
    .validate();
    assert!(
        problems.iter().any(|p| p.contains("needs a SQLite store")),
        "{problems:?}"
    );
}

/// A store that stops taking writes (here another connection's exclusive lock; a stalled
/// disk in production): holds in memory would go on admitting what the writer cannot
/// record, so new money is refused with 503 before the queue can drop a capture; once the
/// store is back every admitted request is recorded and the books balance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_stops_new_money_before_records_are_lost() {
    let gw = TestGateway::start(&TestStore::SqliteMemory.config(
        "[metering]\nqueue_capacity = 16\n[wallets]\nhold_timeout = \"500ms\"\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 0\noutput = 625000000\n",
    ))
    .await;
    let (payer, payer_id) = gw.create_key(serde_json::json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{payer_id}"), "1.00").await;
    let ask = |i: usize| {
        let (gw, key) = (&gw, payer.clone());
        async move {
            let body = serde_json::json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("s{i}"))});
            let r = gw.chat(&key, body).await;
            let s = r.status().as_u16();
            (s, r.json::<serde_json::Value>().await.unwrap_or_default())
        }
    };
    assert_eq!(ask(0).await.0, 200);
    gw.wait_records(1).await;

    let mut lock = tollgate::db::Location::Sqlite(gw.dir.path().join("tollgate.db"))
        .connect()
        .unwrap();
    lock.batch("BEGIN EXCLUSIVE").unwrap();
    let mut admitted = 0;
    let mut refused = None;
    for i in 1..=40 {
        let (s, v) = ask(i).await;
        if s == 200 {
            admitted += 1;
        } else {
            refused = Some((s, v));
            break;
        }
    }
    let (s, v) = refused.expect("new money kept being admitted while nothing was recorded");
    eprintln!("stalled store: {admitted} admitted, then {v}");
    assert_eq!(s, 503, "{v}");
    assert_eq!(v["error"]["code"], "wallet_unavailable", "{v}");
    assert!(
        admitted <= 16,
        "at most a queue's worth admitted: {admitted}"
    );
    lock.batch("ROLLBACK").unwrap();

    let recs = gw.wait_records(admitted + 1).await;
    assert_eq!(recs.len(), admitted + 1);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_usage_records_dropped_total 0"),
        "{metrics}"
    );
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/wallets/verify", None)
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let (_, w) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/wallets/{wallet}"),
            None,
        )
        .await;
    let spent = 10_000 * (admitted as i64 + 1);
    assert_eq!(w["balance_micros"].as_i64(), Some(1_000_000 - spent), "{w}");
    assert_eq!(w["held_micros"], 0, "{w}");
}
