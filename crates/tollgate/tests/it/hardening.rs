//! Hostile input against money, connections and errors: each test here is a finding from a
//! hostile-agent pass that used to overdraw, crash or escape, and must not again.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

/// 16 output tokens (the mock's default answer) cost exactly $0.01; input is free.
const PRICED: &str = r#"
[[prices]]
model = "mock*"
input = 0
output = 625000000
"#;

async fn verify_ok(gw: &TestGateway) {
    let (s, v) = gw
        .admin(reqwest::Method::GET, "/admin/wallets/verify", None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
}

#[tokio::test]
async fn a_huge_max_tokens_is_refused_not_admitted_for_free() {
    let gw = TestGateway::start(PRICED).await;
    let (key, _) = gw.create_key(json!({"name": "a", "team": "zero"})).await;
    let wallet = gw.wallet("team:zero", "0.000001").await;
    // An 8-token cap does not fit a $0.000001 wallet: 402, as before.
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "max_tokens": 8, "messages": user("hi")}),
        )
        .await;
    assert_openai_error(r, 402, "insufficient_funds").await;
    for (field, n) in [
        ("max_tokens", json!(1_000_000_000_000_000_000u64)),
        ("max_tokens", json!(u64::MAX)),
        ("max_completion_tokens", json!(24_000_000_000_000_000u64)),
    ] {
        let mut body = json!({"model": "mock", "messages": user("hi")});
        body[field] = n.clone();
        let r = gw.chat(&key, body.clone()).await;
        let e = assert_openai_error(r, 400, "bad_request").await;
        assert_eq!(e["error"]["param"], field, "{e}");
        let r = gw
            .client
            .post(format!("{}/v1/quote", gw.url))
            .bearer_auth(&key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "quote for {field}={n}");
    }
    // Above the integer range entirely: still a 400 naming the field.
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(r#"{"model":"mock","max_tokens":1e300,"messages":[{"role":"user","content":"x"}]}"#)
        .send()
        .await
        .unwrap();
    let e = assert_openai_error(r, 400, "bad_request").await;
    assert_eq!(e["error"]["param"], "max_tokens");
    // Responses' own field is bounded (and quoted) too.
    let r = gw
        .client
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock", "input": "hi", "max_output_tokens": u64::MAX}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    gw.wait_records(0).await;
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(w["balance_micros"], 1, "{w}");
    verify_ok(&gw).await;
}

/// The stream that used to push a $0.05 wallet's available balance past $1 000 000 while in
/// flight: now refused, and the ordinary requests sent meanwhile get exactly what $0.05 buys.
#[tokio::test]
async fn concurrent_spenders_with_huge_caps_cannot_overdraw() {
    let gw = TestGateway::start(PRICED).await;
    let (key, _) = gw.create_key(json!({"name": "a", "team": "t"})).await;
    let wallet = gw.wallet("team:t", "0.05").await;
    let huge = gw
        .chat(
            &key,
            json!({"model": "mock-stall", "stream": true, "max_tokens": 24_000_000_000_000_000u64, "messages": user("go")}),
        )
        .await;
    assert_eq!(huge.status(), 400);
    // The largest cap allowed, streamed to a model that stalls: more than $0.05 can hold.
    let big = gw
        .chat(
            &key,
            json!({"model": "mock-stall", "stream": true, "max_tokens": 1_000_000, "messages": user("go")}),
        )
        .await;
    assert_eq!(big.status(), 402);
    let statuses: Vec<u16> = futures_util::stream::iter(0..100)
        .map(|i| {
            let (gw, key) = (&gw, key.clone());
            async move {
                let body = if i % 10 == 0 {
                    json!({"model": "mock", "max_tokens": u64::MAX / 3, "messages": user(&format!("h{i}"))})
                } else {
                    json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("n{i}"))})
                };
                gw.chat(&key, body).await.status().as_u16()
            }
        })
        .buffer_unordered(100)
        .collect()
        .await;
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, 5, "$0.05 buys five $0.01 requests: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 400).count(), 10);
    gw.wait_records(0).await;
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(w["balance_micros"], 0, "{w}");
    verify_ok(&gw).await;
}

#[tokio::test]
async fn a_topup_past_the_ledger_bound_is_a_400_and_poisons_nothing() {
    let gw = TestGateway::start(PRICED).await;
    let (key, _) = gw.create_key(json!({"name": "a", "team": "rich"})).await;
    let wallet = gw.wallet("team:rich", "1.00").await;
    for amount in [
        "9223372036854.775807",
        "999999999999999999999999",
        "1000000000",
    ] {
        let (s, v) = gw
            .admin(
                reqwest::Method::POST,
                &format!("/admin/wallets/{wallet}/topup"),
                Some(json!({"amount": amount, "idempotency_key": format!("big-{amount}")})),
            )
            .await;
        assert_eq!(s, 400, "{amount}: {v}");
        assert!(v["error"]["message"].as_str().is_some(), "{v}");
    }
    verify_ok(&gw).await;
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(w["balance_micros"], 1_000_000, "{w}");
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "max_tokens": 16, "messages": user("still works")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let _: Value = r.json().await.unwrap();
}
