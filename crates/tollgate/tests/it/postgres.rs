//! The same scenarios on PostgreSQL (`[store] url = "postgres://…"`): a real server the test
//! starts, one fresh database per scenario.

use crate::harness::*;
use crate::{metering, wallets};

/// Runs every wallet scenario, each in a database of its own, on one PostgreSQL server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wallets_budgets_runs_and_webhooks_behave_identically_on_postgres() {
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let store = |url: String| TestStore::Postgres(url);
    let dollar = pg.database("dollar").await;
    wallets::a_dollar_buys_a_hundred_cent_requests_out_of_a_thousand_concurrent_ones_on(&store(
        dollar.clone(),
    ))
    .await;
    // The books are in PostgreSQL itself (not in a SQLite file beside it).
    let (captures, records) = tokio::task::spawn_blocking(move || {
        let mut db = tollgate::db::Location::Postgres(dollar).connect().unwrap();
        let n = |db: &mut tollgate::db::Db, sql: &str| -> i64 {
            db.one(sql, &[]).unwrap().get(0).unwrap()
        };
        (
            n(
                &mut db,
                "SELECT COUNT(*) FROM ledger WHERE kind = 'capture'",
            ),
            n(&mut db, "SELECT COUNT(*) FROM usage"),
        )
    })
    .await
    .unwrap();
    assert_eq!((captures, records), (100, 1000));
    wallets::wallets_by_cli_and_api_with_idempotent_topups_grants_and_refusals_in_both_dialects_on(
        &store(pg.database("cli").await),
    )
    .await;
    wallets::spend_caps_quotes_and_clamping_on(&store(pg.database("caps").await)).await;
    wallets::a_stream_that_uses_up_its_hold_is_cut_and_billed_for_what_was_delivered_on(&store(
        pg.database("stream").await,
    ))
    .await;
    wallets::spending_stops_at_the_parent_runs_cap_across_its_sub_runs_on(&store(
        pg.database("runs").await,
    ))
    .await;
    wallets::a_teams_monthly_budget_refuses_past_its_hard_limit_on(&store(
        pg.database("budgets").await,
    ))
    .await;
    wallets::a_request_retried_upstream_is_held_and_captured_once_on(&store(
        pg.database("retried").await,
    ))
    .await;
    wallets::low_balance_and_refused_wallets_reach_the_webhook_on(&store(pg.database("low").await))
        .await;
    metering::usage_report_groups_by_key_team_model_tag_and_day_on(&store(
        pg.database("report").await,
    ))
    .await;
}

/// Three gateway processes, one PostgreSQL database: a dollar still buys a hundred cents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_sharing_postgres_cannot_overdraw_a_wallet() {
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let url = pg.database("replicas").await;
    wallets::three_replicas_sharing_the_store_cannot_overdraw_a_wallet_on(&TestStore::Postgres(
        url,
    ))
    .await;
}

/// `tollgate migrate` creates the schema; a second run finds it current; the CLI and a
/// gateway share keys through the database alone.
#[tokio::test]
async fn migrate_and_the_cli_work_against_postgres() {
    let Some(pg) = PgServer::start().await else {
        return;
    };
    let url = pg.database("migrate").await;
    let dir = TempDir::new("pgcli");
    let d = dir.path().to_str().unwrap().to_string();
    let u = url.clone();
    let (first, second, key) = tokio::task::spawn_blocking(move || {
        let run = |args: &[&str]| {
            std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
                .args(args)
                .args(["--data-dir", &d])
                .env("TOLLGATE_STORE_URL", &u)
                .env("TOLLGATE_SECRET", "shared-test-secret")
                .output()
                .unwrap()
        };
        let first = run(&["migrate"]);
        let second = run(&["migrate"]);
        let key = run(&["keys", "create", "--name", "from-cli", "--format", "json"]);
        (first, second, key)
    })
    .await
    .unwrap();
    for out in [&first, &second, &key] {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let first = String::from_utf8_lossy(&first.stdout).to_string();
    assert!(first.contains("schema at version"), "{first}");
    assert!(first.contains("tollgate:***@"), "{first}");
    assert!(
        !first.contains(PG_PASSWORD),
        "no credentials in output: {first}"
    );
    assert_eq!(first, String::from_utf8_lossy(&second.stdout));
    let created: serde_json::Value = serde_json::from_slice(&key.stdout).unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();

    // A gateway on the same database (and secret) accepts the CLI's key.
    let listen = format!("127.0.0.1:{}", free_port());
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(&cfg, format!("[store]\nurl = \"{url}\"\n")).unwrap();
    let _gw = spawn_gateway(
        &[
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            &listen,
        ],
        &listen,
    )
    .await;
    let r = reqwest::Client::new()
        .post(format!("http://{listen}/v1/chat/completions"))
        .bearer_auth(&secret)
        .json(&serde_json::json!({"model": "mock", "messages": user("hello from the cli's key")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
