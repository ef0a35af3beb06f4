//! Spend you can act on: the request log (filters, cursor, why each request ended), and the
//! rollups that reports read.

use crate::harness::*;
use serde_json::{json, Value};

async fn log(gw: &TestGateway, query: &str) -> (u16, Value, Option<String>) {
    let r = gw
        .client
        .get(format!("{}/admin/usage/records?{query}", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let cursor = r
        .headers()
        .get("x-tollgate-next-cursor")
        .map(|v| v.to_str().unwrap().to_string());
    (status, r.json().await.unwrap(), cursor)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_log_filters_pages_and_says_why() {
    the_request_log_filters_pages_and_says_why_on(&TestStore::Sqlite).await;
}

pub async fn the_request_log_filters_pages_and_says_why_on(store: &TestStore) {
    let gw = TestGateway::start(&store.config("")).await;
    let (slow, _) = gw
        .create_key(json!({"name": "tight", "team": "ops", "rpm": 2}))
        .await;
    let (other, _) = gw
        .create_key(json!({"name": "roomy", "team": "research"}))
        .await;
    for i in 0..3 {
        gw.chat(
            &slow,
            json!({"model": "mock", "messages": user(&format!("q{i}"))}),
        )
        .await;
    }
    let r = gw
        .chat(
            &other,
            json!({"model": "mock", "stream": true, "messages": user("stream it")}),
        )
        .await;
    let _ = r.text().await;
    gw.chat(
        &other,
        json!({"model": "mock-long", "messages": user("long")}),
    )
    .await;
    gw.client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &other)
        .json(&json!({"model": "mock", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();

    // Status and why, in words, with the refusal's own message.
    let (s, v, _) = log(&gw, "status=429").await;
    assert_eq!(s, 200, "{v}");
    let recs = v.as_array().unwrap();
    assert_eq!(recs.len(), 1, "{v}");
    assert_eq!(recs[0]["agent"], "tight");
    let why = recs[0]["why"].as_str().unwrap();
    assert!(why.starts_with("refused: rate limit"), "{why}");
    assert!(
        recs[0]["detail"].as_str().is_some_and(|d| !d.is_empty()),
        "{v}"
    );
    // Each filter narrows; they combine.
    let count = |v: &Value| v.as_array().unwrap().len();
    assert_eq!(count(&log(&gw, "key=tight").await.1), 3);
    assert_eq!(count(&log(&gw, "team=research").await.1), 3);
    assert_eq!(count(&log(&gw, "model=mock-long").await.1), 1);
    assert_eq!(count(&log(&gw, "endpoint=messages").await.1), 1);
    assert_eq!(count(&log(&gw, "status=2xx&team=ops").await.1), 2);
    assert_eq!(count(&log(&gw, "error_kind=rate_limited").await.1), 1);
    assert_eq!(count(&log(&gw, "until=1h").await.1), 0);
    // Model calls carry their sizes, JSON and streams.
    for r in log(&gw, "status=200").await.1.as_array().unwrap() {
        assert!(r["request_bytes"].as_u64().unwrap() > 0, "{r}");
        assert!(r["response_bytes"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["why"], "served");
    }
    // Pages: a full page names its cursor; following it visits every record once.
    let mut ids = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let (s, v, cursor) = log(&gw, &query).await;
        assert_eq!(s, 200);
        ids.extend(
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| r["id"].as_str().unwrap().to_string()),
        );
        match cursor {
            Some(c) => query = format!("limit=2&cursor={c}"),
            None => break,
        }
    }
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!((ids.len(), unique.len()), (6, 6), "{ids:?}");
    // The CLI reads the same log, through the admin API or the store.
    let out = crate::cli::tollgate_async(&[
        "logs",
        "--status",
        "4xx",
        "--format",
        "json",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["status"], 429);
    let table = crate::cli::tollgate_async(&[
        "logs",
        "--key",
        "tight",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("refused: rate limit") && table.contains("why"),
        "{table}"
    );

    // Reports read rollups; they say what the records say, grouping by grouping.
    for by in ["key", "team", "project", "model", "day", "endpoint"] {
        let get = |q: String| {
            let gw = &gw;
            async move {
                let r = gw
                    .client
                    .get(format!("{}/admin/usage?{q}", gw.url))
                    .bearer_auth(&gw.admin_key)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                r.json::<Value>().await.unwrap()
            }
        };
        let rolled = get(format!("by={by}")).await;
        let raw = get(format!("by={by}&source=records")).await;
        assert_eq!(rolled, raw, "{by}");
        assert!(!rolled.as_array().unwrap().is_empty());
    }

    // A filter nobody knows, a bad value, a repeated one: 400s that say so.
    for (q, want) in [
        ("tem=ops", "unknown filter \"tem\""),
        ("status=4x", "status"),
        ("limit=0", "limit"),
        ("team=a&team=b", "twice"),
        ("cursor=nope", "cursor"),
    ] {
        let (s, v, _) = log(&gw, q).await;
        assert_eq!(s, 400, "{q}: {v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{q}: {v}"
        );
    }
}

/// Records past their retention go; the rollups stay, so the spend still adds up.
#[tokio::test]
async fn pruned_records_leave_their_rollups() {
    let gw = TestGateway::start("[metering]\nretain_records = \"90d\"\n").await;
    let key = gw.key().await;
    for i in 0..4 {
        gw.chat(
            &key,
            json!({"model": "mock", "messages": user(&format!("p{i}"))}),
        )
        .await;
    }
    let before = gw
        .admin(reqwest::Method::GET, "/admin/usage?by=key", None)
        .await
        .1;
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let (s, v) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/usage/prune?older_than=1s",
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["deleted"], 4);
    assert!(gw.records().await.is_empty());
    let after = gw
        .admin(reqwest::Method::GET, "/admin/usage?by=key", None)
        .await
        .1;
    assert_eq!(after, before);
    assert_eq!(after[0]["requests"], 4, "{after}");
    // A report from rollups says where it starts: on the hour; from records it does not.
    let start = |q: &'static str| {
        let gw = &gw;
        async move {
            let r = gw
                .client
                .get(format!("{}/admin/usage?{q}", gw.url))
                .bearer_auth(&gw.admin_key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.headers()
                .get("x-tollgate-report-since")
                .map(|v| v.to_str().unwrap().to_string())
        }
    };
    let since = start("by=team&since=90m").await.unwrap();
    assert!(since.ends_with(":00:00Z"), "{since}");
    assert_eq!(start("by=team&since=90m&source=records").await, None);
    assert_eq!(start("by=run&since=90m").await, None);
}

async fn post_outcome(gw: &TestGateway, key: &str, body: Value) -> (u16, Value) {
    let r = gw
        .client
        .post(format!("{}/v1/outcomes", gw.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_give_cost_per_outcome_once_each() {
    outcomes_give_cost_per_outcome_once_each_on(&TestStore::Sqlite).await;
}

/// A run (with a sub-run), another run and a lone request each buy an outcome; another
/// agent's spend buys none. Cost per outcome and per success come from the records, each run
/// counted with its sub-runs and once, an outcome is recorded once, and what no outcome
/// accounts for is shown as such.
pub async fn outcomes_give_cost_per_outcome_once_each_on(store: &TestStore) {
    let gw = TestGateway::start(&store.config("")).await;
    let (solver, _) = gw
        .create_key(json!({"name": "solver", "team": "support"}))
        .await;
    let (idle, _) = gw.create_key(json!({"name": "idle", "team": "ops"})).await;
    let call =
        |key: String, run: Option<(&'static str, Option<&'static str>)>, text: &'static str| {
            let gw = &gw;
            async move {
                let mut r = gw
                    .client
                    .post(format!("{}/v1/chat/completions", gw.url))
                    .bearer_auth(&key)
                    .json(&json!({"model": "mock", "messages": user(text)}));
                if let Some((run, parent)) = run {
                    r = r.header("x-tollgate-run", run);
                    if let Some(p) = parent {
                        r = r.header("x-tollgate-parent-run", p);
                    }
                }
                let r = r.send().await.unwrap();
                assert_eq!(r.status(), 200);
                r.headers()["x-request-id"].to_str().unwrap().to_string()
            }
        };
    call(solver.clone(), Some(("t1", None)), "one").await;
    call(solver.clone(), Some(("t1", None)), "two").await;
    call(solver.clone(), Some(("t1a", Some("t1"))), "sub").await;
    call(solver.clone(), Some(("t2", None)), "three").await;
    let lone = call(solver.clone(), None, "lone").await;
    call(idle.clone(), None, "nothing to show").await;
    let recs = gw.records().await;
    let cost = |f: &dyn Fn(&tollgate::metering::UsageRecord) -> bool| -> u64 {
        recs.iter().filter(|r| f(r)).map(|r| r.cost_micros).sum()
    };
    let t1 = cost(&|r| matches!(r.run_id.as_deref(), Some("t1" | "t1a")));
    let t2 = cost(&|r| r.run_id.as_deref() == Some("t2"));
    let lone_cost = cost(&|r| r.id == lone);
    let idle_cost = cost(&|r| r.agent == "idle");
    assert!(t1 > 0 && t2 > 0 && lone_cost > 0 && idle_cost > 0);

    let o1 =
        json!({"id": "o1", "run_id": "t1", "type": "ticket", "success": true, "value": "5.00"});
    let (s, v) = post_outcome(&gw, &solver, o1.clone()).await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["agent"].as_str(), v["team"].as_str()),
        (Some("solver"), Some("support"))
    );
    // Again: the same outcome, nothing new. Different content under the same id: refused.
    assert_eq!(post_outcome(&gw, &solver, o1.clone()).await.0, 200);
    let mut changed = o1.clone();
    changed["success"] = json!(false);
    let (s, v) = post_outcome(&gw, &solver, changed).await;
    assert_eq!(s, 400, "{v}");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("already recorded"));
    assert_eq!(
        post_outcome(
            &gw,
            &solver,
            json!({"id": "o2", "run_id": "t2", "type": "ticket", "success": false})
        )
        .await
        .0,
        201
    );
    assert_eq!(
        post_outcome(&gw, &solver, json!({"id": "o3", "request_id": lone, "type": "answer", "success": true, "value": "0.01"})).await.0,
        201
    );
    // Another agent cannot claim this agent's request; unknown runs and both-or-neither fail.
    for (key, body) in [
        (
            &idle,
            json!({"id": "x1", "request_id": lone, "type": "answer", "success": true}),
        ),
        (
            &solver,
            json!({"id": "x2", "run_id": "nope", "type": "t", "success": true}),
        ),
        (&solver, json!({"id": "x3", "type": "t", "success": true})),
        (
            &solver,
            json!({"id": "x4", "run_id": "t1", "request_id": lone, "type": "t", "success": true}),
        ),
        (
            &solver,
            json!({"id": "x5", "run_id": "t1", "type": "t", "success": true, "value": "-1"}),
        ),
        (
            &solver,
            json!({"id": "x6", "run_id": "t1", "type": "t", "success": true, "bogus": 1}),
        ),
    ] {
        let (s, v) = post_outcome(&gw, key, body.clone()).await;
        assert_eq!(s, 400, "{body}: {v}");
    }

    let roi = |by: &'static str| {
        let gw = &gw;
        async move {
            let (s, v) = gw
                .admin(reqwest::Method::GET, &format!("/admin/roi?by={by}"), None)
                .await;
            assert_eq!(s, 200, "{v}");
            v.as_array().unwrap().clone()
        }
    };
    let by_type = roi("type").await;
    let row = |rows: &[Value], g: &str| rows.iter().find(|r| r["group"] == g).cloned().unwrap();
    let ticket = row(&by_type, "ticket");
    assert_eq!(
        (ticket["outcomes"].as_u64(), ticket["successes"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(ticket["spend_micros"].as_u64(), Some(t1 + t2));
    assert_eq!(
        ticket["cost_per_outcome_micros"].as_u64(),
        Some((t1 + t2) / 2)
    );
    assert_eq!(ticket["cost_per_success_micros"].as_u64(), Some(t1 + t2));
    assert_eq!(ticket["value_micros"].as_u64(), Some(5_000_000));
    let answer = row(&by_type, "answer");
    assert_eq!(answer["spend_micros"].as_u64(), Some(lone_cost));
    let none = row(&by_type, "(no outcome)");
    assert_eq!(none["spend_micros"].as_u64(), Some(idle_cost));
    // By team: everything bought was the support team's.
    let by_team = roi("team").await;
    assert_eq!(row(&by_team, "support")["outcomes"].as_u64(), Some(3));
    assert_eq!(
        row(&by_team, "support")["spend_micros"].as_u64(),
        Some(t1 + t2 + lone_cost)
    );
    // By model: the mock served it all.
    assert_eq!(
        row(&roi("model").await, "mock")["spend_micros"].as_u64(),
        Some(t1 + t2 + lone_cost)
    );

    // The CLI says the same.
    let out = crate::cli::tollgate_async(&[
        "roi",
        "--by",
        "type",
        "--format",
        "json",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(cli.as_array().unwrap(), &by_type);
}

/// The FOCUS export has every mandatory column of the spec's list (docs/focus/columns.tsv),
/// each value of its type and never null where the spec forbids it, and its BilledCost adds
/// up to what the ledger captured; top-ups come out as Purchase rows of their amount.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_focus_export_has_the_mandatory_columns_and_adds_up_to_the_ledger() {
    let gw = TestGateway::start(
        "[[prices]]\nmodel = \"mock*\"\ninput = 3000000\ncached_input = 300000\noutput = 15000000\nreasoning = 15000000\n",
    )
    .await;
    let (key, _) = gw
        .create_key(json!({"name": "fin", "org": "acme", "team": "t"}))
        .await;
    gw.wallet("org:acme", "10").await;
    let wallet_id = gw.wallet_view("org:acme").await["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/wallets/{wallet_id}/grant"),
            Some(json!({"amount": "0.25", "expires": "30d", "idempotency_key": "promo"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    for (i, model) in ["mock", "mock-cached", "mock-reasoning", "mock-long"]
        .iter()
        .enumerate()
    {
        let r = gw
            .client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("x-tollgate-run", if i < 2 { "r1" } else { "r2" })
            .json(&json!({"model": model, "messages": user(&format!("focus {i}"))}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock", "stream": true, "messages": user("streamed")}))
        .send()
        .await
        .unwrap();
    let _ = r.text().await;
    post_outcome(
        &gw,
        &key,
        json!({"id": "f1", "run_id": "r1", "type": "report", "success": true}),
    )
    .await;

    let spec: Vec<(String, String, bool)> = include_str!("../../../../docs/focus/columns.tsv")
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_string(), f[1].to_string(), f[2] == "True")
        })
        .collect();
    assert_eq!(spec.len(), 21);
    let r = gw
        .client
        .get(format!(
            "{}/admin/export/focus?format=jsonl&granularity=hourly",
            gw.url
        ))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let rows: Vec<Value> = r
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(rows.len() >= 6, "{rows:#?}");
    let iso = |s: &str| {
        s.len() == 20
            && s.ends_with('Z')
            && s.as_bytes()[10] == b'T'
            && s[..4].parse::<u32>().is_ok()
    };
    for row in &rows {
        for (col, ty, nulls) in &spec {
            let v = row
                .get(col)
                .unwrap_or_else(|| panic!("{col} missing: {row}"));
            if v.is_null() {
                assert!(nulls, "{col} is null: {row}");
                continue;
            }
            match ty.as_str() {
                "Decimal" => assert!(v.is_number(), "{col}: {v}"),
                "Date/Time" => assert!(iso(v.as_str().unwrap()), "{col}: {v}"),
                _ => assert!(v.is_string(), "{col}: {v}"),
            }
        }
        assert!(["Usage", "Purchase", "Credit", "Adjustment", "Tax"]
            .contains(&row["ChargeCategory"].as_str().unwrap()));
        assert_eq!(row["BillingCurrency"], "USD");
        assert_eq!(row["ServiceCategory"], "AI and Machine Learning");
    }
    // Money: usage rows add up to the ledger's captures, in micro-USD exactly.
    let micros = |v: &Value| (v.as_f64().unwrap() * 1e6).round() as i64;
    let usage: i64 = rows
        .iter()
        .filter(|r| r["ChargeCategory"] == "Usage")
        .map(|r| micros(&r["BilledCost"]))
        .sum();
    let recs = gw.records().await;
    let metered: i64 = recs.iter().map(|r| r.cost_micros as i64).sum();
    let wallet = gw.wallet_view("org:acme").await;
    let (_, ledger) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/wallets/{}/ledger", wallet["id"].as_str().unwrap()),
            None,
        )
        .await;
    let captured: i64 = ledger
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "capture")
        .map(|e| -e["amount_micros"].as_i64().unwrap())
        .sum();
    assert!(captured > 0);
    assert_eq!(usage, captured, "export vs ledger");
    assert_eq!(metered, captured);
    // Token classes are separate rows; a run's rows name its outcome.
    let meters: std::collections::BTreeSet<&str> =
        rows.iter().filter_map(|r| r["SkuMeter"].as_str()).collect();
    for m in ["Input", "Cached Input", "Output", "Reasoning"] {
        assert!(meters.contains(m), "{meters:?}");
    }
    assert!(rows
        .iter()
        .any(|r| r["x_RunId"] == "r1" && r["x_OutcomeIds"] == "f1"));
    let purchases: Vec<&Value> = rows
        .iter()
        .filter(|r| r["ChargeCategory"] == "Purchase")
        .collect();
    assert_eq!(purchases.len(), 1);
    assert_eq!(micros(&purchases[0]["BilledCost"]), 10_000_000);
    // A grant is a Credit: negative, as FOCUS writes what lowers the amount owed.
    let credits: Vec<&Value> = rows
        .iter()
        .filter(|r| r["ChargeCategory"] == "Credit")
        .collect();
    assert_eq!(credits.len(), 1, "{credits:#?}");
    assert_eq!(micros(&credits[0]["BilledCost"]), -250_000);
    assert_eq!(credits[0]["ChargeDescription"], "wallet grant");

    // CSV: the same columns in the header, the same number of rows.
    let out = crate::cli::tollgate_async(&[
        "export",
        "focus",
        "--granularity",
        "hourly",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let csv = String::from_utf8(out.stdout).unwrap();
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for (col, _, _) in &spec {
        assert!(header.contains(&col.as_str()), "{col}");
    }
    assert_eq!(csv.lines().count(), rows.len() + 1);
}

/// A mixed workload through an OpenAI-kind and an Anthropic-kind provider (JSON and streams,
/// Chat, Responses, Messages, cached and cache-write classes, a fallback past a failing
/// deployment, an upstream retry, clients that leave mid-stream with `on_client_disconnect =
/// "finish"`): what tollgate metered and charged equals what the providers' usage and cost
/// report APIs say, row by row. Then a provider that bills more than it reported, and a price
/// table that is not the provider's, are caught.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_finds_no_drift_then_catches_an_overbilling_provider() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        r#"
        [metering]
        on_client_disconnect = "finish"
        [routing]
        backoff_base = "5ms"
        backoff_max = "10ms"
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        [[models]]
        name = "o-mock"
        deployments = [{{ provider = "oai", model = "mock" }}]
        [[models]]
        name = "o-cached"
        deployments = [{{ provider = "oai", model = "mock-cached-reasoning" }}]
        [[models]]
        name = "c-mock"
        deployments = [{{ provider = "claude", model = "mock" }}]
        [[models]]
        name = "c-cw"
        deployments = [{{ provider = "claude", model = "mock-cachewrite" }}]
        [[models]]
        name = "smart"
        deployments = [{{ provider = "oai", model = "mock-500", priority = 0 }}, {{ provider = "oai", model = "mock", priority = 1 }}]
        [[models]]
        name = "flaky"
        deployments = [{{ provider = "oai", model = "mock-flaky-1" }}]
        [[models]]
        name = "o-over"
        deployments = [{{ provider = "oai", model = "mock-overbill" }}]
        [[models]]
        name = "o-slow"
        deployments = [{{ provider = "oai", model = "mock-slow" }}]
        [[models]]
        name = "c-slow"
        deployments = [{{ provider = "claude", model = "mock-slow" }}]
        [[models]]
        name = "o-stale"
        deployments = [{{ provider = "oai", model = "mock-stale" }}]
        # A price table that is not the provider's: tollgate charges twice the list price.
        [[prices]]
        model = "mock-stale"
        input = 2000000
        output = 4000000
        "#
    ))
    .await;
    let key = gw.key().await;
    let post = |path: &'static str, body: Value| {
        let (gw, key) = (&gw, key.clone());
        async move {
            let r = gw
                .client
                .post(format!("{}{path}", gw.url))
                .bearer_auth(&key)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200, "{path} {body}");
            let _ = r.text().await;
        }
    };
    for (i, model) in ["o-mock", "o-cached", "smart", "flaky"].iter().enumerate() {
        post(
            "/v1/chat/completions",
            json!({"model": model, "messages": user(&format!("json {i}"))}),
        )
        .await;
        post(
            "/v1/chat/completions",
            json!({"model": model, "stream": true, "messages": user(&format!("stream {i}"))}),
        )
        .await;
    }
    post(
        "/v1/responses",
        json!({"model": "o-mock", "input": "responses json"}),
    )
    .await;
    post(
        "/v1/responses",
        json!({"model": "o-mock", "input": "responses stream", "stream": true}),
    )
    .await;
    for model in ["c-mock", "c-cw"] {
        post("/v1/messages", json!({"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "messages json"}]})).await;
        post("/v1/messages", json!({"model": model, "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "messages stream"}]})).await;
    }
    // Clients that leave mid-stream: read to the end for the provider's usage.
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "o-slow", "stream": true, "messages": user("leave")}),
        ),
        (
            "/v1/messages",
            json!({"model": "c-slow", "max_tokens": 64, "stream": true, "messages": [{"role": "user", "content": "leave"}]}),
        ),
    ] {
        let mut r = gw
            .client
            .post(format!("{}{path}", gw.url))
            .bearer_auth(&key)
            .header("anthropic-version", "2023-06-01")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let _ = r.chunk().await.unwrap();
        drop(r);
        let rec = crate::harness::wait_record(&gw, &id).await;
        assert!(
            rec.client_disconnected && rec.usage_source == "provider",
            "{rec:?}"
        );
    }
    let reconcile = |provider: &'static str| {
        let gw = &gw;
        async move {
            let (s, v) = gw
                .admin(
                    reqwest::Method::GET,
                    &format!("/admin/reconcile?provider={provider}&since=1d&threshold=0"),
                    None,
                )
                .await;
            assert_eq!(s, 200, "{v}");
            v
        }
    };
    for provider in ["oai", "claude"] {
        let r = reconcile(provider).await;
        assert_eq!(r["ok"], true, "{r:#}");
        let rows = r["rows"].as_array().unwrap();
        assert!(rows.iter().all(|d| d["drift"] == 0), "{r:#}");
        assert!(rows
            .iter()
            .any(|d| d["class"] == "output" && d["provider"].as_u64() > Some(0)));
        // What tollgate charged is what the provider's cost report says, model by model.
        assert!(r.get("cost_error").is_none(), "{r:#}");
        assert!(rows
            .iter()
            .any(|d| d["class"] == "cost_micros" && d["provider"].as_u64() > Some(0)));
    }
    let classes: Vec<Value> = reconcile("claude").await["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["class"].clone())
        .collect();
    assert!(classes.contains(&json!("cache_write")), "{classes:?}");

    // The provider bills 10% more output than it reported for one request: caught, named,
    // and the CLI exits non-zero.
    post(
        "/v1/chat/completions",
        json!({"model": "o-over", "messages": user("overbilled")}),
    )
    .await;
    let r = reconcile("oai").await;
    assert_eq!(r["ok"], false, "{r:#}");
    let bad: Vec<&Value> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["drift"] != 0)
        .collect();
    // The extra output, and what it cost.
    let named: Vec<(&str, &str)> = bad
        .iter()
        .map(|d| (d["model"].as_str().unwrap(), d["class"].as_str().unwrap()))
        .collect();
    assert_eq!(
        named,
        [
            ("mock-overbill", "output"),
            ("mock-overbill", "cost_micros")
        ],
        "{r:#}"
    );
    assert!(bad.iter().all(|d| d["drift"].as_i64().unwrap() > 0));

    // A stale price table: the tokens agree, the money does not (tollgate charged more).
    post(
        "/v1/chat/completions",
        json!({"model": "o-stale", "messages": user("priced by us")}),
    )
    .await;
    let r = reconcile("oai").await;
    let stale: Vec<&Value> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["model"] == "mock-stale" && d["drift"] != 0)
        .collect();
    assert_eq!(stale.len(), 1, "{r:#}");
    assert_eq!(stale[0]["class"], "cost_micros");
    assert!(stale[0]["drift"].as_i64().unwrap() < 0, "{r:#}");
    let out = crate::cli::tollgate_async(&[
        "reconcile",
        "--provider",
        "oai",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("DRIFT"));
    // An unknown provider is a 404 that says so.
    let (s, _) = gw
        .admin(reqwest::Method::GET, "/admin/reconcile?provider=nope", None)
        .await;
    assert_eq!(s, 404);
}

/// `[reconcile]` on a schedule: a drift reaches the webhook as `reconcile.drift`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_reconciliation_sends_drift_to_the_webhook() {
    let (hook, got) = crate::wallets::spawn_receiver().await;
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        r#"
        [reconcile]
        providers = ["oai"]
        every = "1s"
        window = "1d"
        threshold_pct = 0.5
        [[webhooks]]
        url = "{hook}"
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[models]]
        name = "o-over"
        deployments = [{{ provider = "oai", model = "mock-overbill" }}]
        "#
    ))
    .await;
    let key = gw.key().await;
    let r = gw
        .chat(
            &key,
            json!({"model": "o-over", "messages": user("billed twice over")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let events = crate::wallets::wait_events(&got, 1).await;
    let (_, e) = &events[0];
    assert_eq!(e["type"], "reconcile.drift", "{e}");
    assert_eq!(e["data"]["provider"], "oai");
    assert_eq!(e["data"]["rows"][0]["class"], "output");
}

/// `[logging] bodies = true` keeps each request's and answer's body with its record, cut at
/// `max_body_bytes`; by default nothing is kept.
#[tokio::test]
async fn bodies_are_kept_only_when_asked_and_cut_to_size() {
    let gw = TestGateway::start("[logging]\nbodies = true\nmax_body_bytes = 900\n").await;
    let key = gw.key().await;
    let body_of = |headers: reqwest::header::HeaderMap| {
        let gw = &gw;
        async move {
            let id = headers["x-request-id"].to_str().unwrap().to_string();
            gw.admin(
                reqwest::Method::GET,
                &format!("/admin/usage/records/{id}/body"),
                None,
            )
            .await
        }
    };
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("keep me")}))
        .await;
    let (s, b) = body_of(r.headers().clone()).await;
    assert_eq!(s, 200, "{b}");
    assert!(b["request"].as_str().unwrap().contains("keep me"), "{b}");
    assert!(
        b["response"]
            .as_str()
            .unwrap()
            .contains("The mock provider"),
        "{b}"
    );
    assert_eq!(b["truncated"], false);
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "stream": true, "messages": user(&"long ".repeat(200))}),
        )
        .await;
    let headers = r.headers().clone();
    let _ = r.text().await;
    let (s, b) = body_of(headers).await;
    assert_eq!(s, 200, "{b}");
    assert_eq!(b["truncated"], true);
    assert!(b["request"].as_str().unwrap().len() <= 900);
    assert!(b["response"].as_str().unwrap().starts_with("data: "), "{b}");
    assert!(b["response"].as_str().unwrap().len() <= 900);

    let plain = TestGateway::start("").await;
    let key = plain.key().await;
    let r = plain
        .chat(
            &key,
            json!({"model": "mock", "messages": user("forget me")}),
        )
        .await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (s, v) = plain
        .admin(
            reqwest::Method::GET,
            &format!("/admin/usage/records/{id}/body"),
            None,
        )
        .await;
    assert_eq!(s, 404, "{v}");
}

const HOUR: i64 = 3_600_000;

/// A fresh SQLite store and, where PostgreSQL is installed, a fresh database: the places a
/// store-level test runs against (keep the first two alive for the test's length).
async fn both_stores(name: &str) -> (TempDir, Option<PgServer>, Vec<tollgate::db::Location>) {
    use tollgate::db::Location;
    let pg = PgServer::start().await;
    let dir = TempDir::new(name);
    let mut locations = vec![Location::Sqlite(dir.path().join("tollgate.db"))];
    if let Some(pg) = &pg {
        locations.push(Location::from_config(
            Some(&pg.database(name).await),
            dir.path(),
        ));
    }
    (dir, pg, locations)
}

/// The dashboard's runs list: the runs active most recently first (a run at its newest
/// hour, once), at most the limit, each with what it did inside the window only; the same on
/// SQLite and PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runs_list_is_newest_first_bounded_and_windowed() {
    use tollgate::db::Location;
    use tollgate::store::Store;
    let (_dir, _pg, locations) = both_stores("recentruns").await;
    let now = tollgate::clock::now_ms().div_euclid(HOUR) * HOUR;
    // (run, hours ago, cost): "old" spent 4 days ago and 1 hour ago; "mid" 3 hours ago;
    // "new" in this hour, twice; "gone" 9 days ago only.
    let spend = [
        ("old", 96, 1_000),
        ("old", 1, 10),
        ("mid", 3, 200),
        ("new", 0, 5),
        ("new", 0, 7),
        ("gone", 216, 9_999),
    ];
    // One thread writes to both stores, one after the other, as a copy between them would:
    // the statements each store's writer prepares must not mix (they once did).
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for location in locations {
            let store = Store::open_at(&location).unwrap();
            let recs: Vec<_> = spend
                .iter()
                .enumerate()
                .map(|(i, (run, ago, cost))| tollgate::metering::UsageRecord {
                    id: format!("req_rr_{i}"),
                    ts_ms: now - ago * HOUR + 1_000,
                    endpoint: "chat".into(),
                    key_id: "key_rr".into(),
                    agent: "rr".into(),
                    run_id: Some(run.to_string()),
                    model_requested: Some("mock".into()),
                    status: if i == 2 { 502 } else { 200 },
                    cost_micros: *cost,
                    usage_source: "provider".into(),
                    attempts: 1,
                    ..Default::default()
                })
                .collect();
            store.insert_usage_batch(&recs).unwrap();
            let week = now - 7 * 24 * HOUR;
            out.push((
                matches!(store.location(), Location::Postgres(_)),
                store.recent_runs(week, 10).unwrap(),
                store.recent_runs(week, 2).unwrap(),
                store.recent_runs(now - 2 * HOUR, 10).unwrap(),
            ));
        }
        out
    })
    .await
    .unwrap();
    for got in results {
        let store = if got.0 { "postgres" } else { "sqlite" };
        let got = (got.1, got.2, got.3);
        let line = |r: &tollgate::store::RecentRun| {
            (
                r.run.clone(),
                (now - r.last_hour_ms) / HOUR,
                r.requests,
                r.errors,
                r.cost_micros,
            )
        };
        let all: Vec<_> = got.0.iter().map(line).collect();
        assert_eq!(
            all,
            vec![
                ("new".to_string(), 0, 2, 0, 12),
                ("old".to_string(), 1, 2, 0, 1_010),
                ("mid".to_string(), 3, 1, 1, 200),
            ],
            "{store}"
        );
        let two: Vec<_> = got.1.iter().map(line).collect();
        assert_eq!(two, all[..2].to_vec(), "{store}");
        // Two hours back: "old" counts only its spend of an hour ago, "mid" is not there.
        let short: Vec<_> = got.2.iter().map(line).collect();
        assert_eq!(
            short,
            vec![
                ("new".to_string(), 0, 2, 0, 12),
                ("old".to_string(), 1, 1, 0, 10)
            ],
            "{store}"
        );
    }
}

/// ROI over a window: a run that began before the window counts only what it spent inside
/// it, a run inside it counts whole, a run with a sub-run counts the sub-run's spend too;
/// the same on SQLite and PostgreSQL, by every grouping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roi_sets_each_outcome_against_its_runs_spend_in_the_window() {
    use tollgate::db::Location;
    use tollgate::store::{Outcome, Store};
    let (_dir, _pg, locations) = both_stores("roiwindow").await;
    let now = tollgate::clock::now_ms().div_euclid(HOUR) * HOUR;
    let results = tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for location in locations {
            let pg = matches!(location, Location::Postgres(_));
            let store = Store::open_at(&location).unwrap();
            // (run, hours ago, cost)
            let spend = [
                ("crossing", 30, 1_000_000),
                ("crossing", 1, 300),
                ("inside", 2, 40),
                ("inside", 1, 2),
                ("parent", 1, 10),
                ("child", 1, 5),
                ("lonely", 1, 7),
            ];
            let recs: Vec<_> = spend
                .iter()
                .enumerate()
                .map(|(i, (run, ago, cost))| tollgate::metering::UsageRecord {
                    id: format!("req_roiw_{i}"),
                    ts_ms: now - ago * HOUR + 1_000,
                    endpoint: "chat".into(),
                    key_id: "key_w".into(),
                    agent: "w".into(),
                    run_id: Some(run.to_string()),
                    model_requested: Some("mock".into()),
                    status: 200,
                    cost_micros: *cost,
                    usage_source: "provider".into(),
                    attempts: 1,
                    ..Default::default()
                })
                .collect();
            store.insert_usage_batch(&recs).unwrap();
            store
                .write(|tx| {
                    tx.exec(
                        "INSERT INTO envelopes (id, kind, parent, org, created_ms)
                         VALUES ('run:parent', 'run', NULL, 'default', 0),
                                ('run:child', 'run', 'run:parent', 'default', 0)",
                        &[],
                    )?;
                    Ok(())
                })
                .unwrap();
            for (i, (run, kind, success)) in [
                ("crossing", "ticket", true),
                ("inside", "ticket", false),
                ("parent", "pr", true),
            ]
            .into_iter()
            .enumerate()
            {
                let o = Outcome {
                    id: format!("out_w_{i}"),
                    occurred_ms: now,
                    key_id: "key_w".into(),
                    agent: "w".into(),
                    team: Some(["a", "b", "a"][i].into()),
                    project: None,
                    run_id: Some(run.into()),
                    request_id: None,
                    kind: kind.into(),
                    success,
                    value_micros: Some(1_000),
                    tags: Default::default(),
                    created_ms: now,
                };
                store.record_outcome(&o, true).unwrap();
            }
            let since = (now - 5 * HOUR).to_string();
            let by = |g: &str| tollgate::ops::roi_report(&store, g, Some(&since)).unwrap();
            out.push((pg, by("type"), by("team"), by("agent")));
        }
        out
    })
    .await
    .unwrap();
    for (pg, by_type, by_team, by_agent) in results {
        let store = if pg { "postgres" } else { "sqlite" };
        fn line(rows: &[tollgate::ops::RoiRow]) -> Vec<(&str, u64, u64, u64)> {
            rows.iter()
                .map(|r| (r.group.as_str(), r.outcomes, r.successes, r.spend_micros))
                .collect()
        }
        // crossing: 300 of its 1 000 300 (the rest is before the window); inside: 42;
        // parent: 10 + its child's 5; "lonely" has no outcome.
        let none = ("(no outcome)", 0, 0, 7);
        let want = [
            (
                &by_type,
                vec![("ticket", 2, 1, 342), ("pr", 1, 1, 15), none],
            ),
            (&by_team, vec![("a", 2, 2, 315), ("b", 1, 0, 42), none]),
            (&by_agent, vec![("w", 3, 2, 357), none]),
        ];
        for (rows, expected) in want {
            assert_eq!(line(rows), expected, "{store}");
        }
        assert_eq!(by_agent[0].value_micros, 3_000, "{store}");
    }
}
