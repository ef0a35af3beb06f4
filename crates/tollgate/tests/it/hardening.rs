//! Hostile input against money, connections and errors: each test here is a finding from a
//! hostile-agent pass that used to overdraw, crash or escape, and must not again.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::wallets::{verify as verify_ok, PRICED};

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

/// A stream whose `max_tokens` is exactly what the model sends fits its hold: it completes
/// (the byte-based guess used to cut every such stream), in both dialects.
#[tokio::test]
async fn streams_that_fit_their_hold_complete() {
    let gw = TestGateway::start(PRICED).await;
    let (key, key_id) = gw.create_key(json!({"name": "streamer"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
    for (model, max) in [("mock", 16), ("mock-long", 64), ("mock-long", 200)] {
        let r = gw
            .chat(
                &key,
                json!({"model": model, "stream": true, "max_tokens": max,
                       "stream_options": {"include_usage": true}, "messages": user("go")}),
            )
            .await;
        assert_eq!(r.status(), 200);
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let events = sse_data(r).await;
        assert_eq!(
            events.last().map(String::as_str),
            Some("[DONE]"),
            "{model} {max}: {events:?}"
        );
        let rec = wait_record(&gw, &id).await;
        assert_eq!(rec.error_kind, None, "{model} {max}");
        assert_eq!(rec.output_tokens, max, "{model}");
    }
    let r = gw
        .client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "mock-long", "stream": true, "max_tokens": 64, "messages": user("go")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let body = r.text().await.unwrap();
    assert!(body.contains("message_stop"), "{body}");
    assert!(!body.contains("billing_error"), "{body}");
    assert_eq!(wait_record(&gw, &id).await.output_tokens, 64);
    verify_ok(&gw).await;
    let _ = wallet;
}

/// A provider that writes past the cap is cut within one event of the hold: 40 tokens held,
/// one token per event, so at most 41 delivered.
#[tokio::test]
async fn a_stream_past_its_hold_is_cut_within_one_event() {
    let gw = TestGateway::start(PRICED).await;
    let (key, key_id) = gw.create_key(json!({"name": "streamer"})).await;
    gw.wallet(&format!("key:{key_id}"), "1.00").await;
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-long-overrun", "stream": true, "max_tokens": 40, "messages": user("go")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let events = sse_data(r).await;
    let last: Value = serde_json::from_str(events.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "insufficient_funds", "{last}");
    let rec = wait_record(&gw, &id).await;
    assert_eq!(rec.error_kind.as_deref(), Some("insufficient_funds"));
    assert!(
        (40..=41).contains(&rec.output_tokens),
        "{}",
        rec.output_tokens
    );
}

/// A 1 MB single-word prompt to a provider that reports no usage used to overflow the
/// tokenizer's stack: the connection dropped and the upstream call went unmetered.
#[tokio::test]
async fn a_megabyte_word_is_estimated_and_metered_in_both_dialects() {
    let gw = TestGateway::start("[server]\nmax_body_bytes = 4000000\n").await;
    let key = gw.key().await;
    let word = "x".repeat(1 << 20);
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-nousage", "messages": user(&word)}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let chat = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let _: Value = r.json().await.unwrap();
    let r = gw
        .client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "mock-nousage", "max_tokens": 32, "messages": user(&word)}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let msgs = r.headers()["x-request-id"].to_str().unwrap().to_string();
    for id in [chat, msgs] {
        let rec = wait_record(&gw, &id).await;
        assert_eq!(rec.usage_source, "estimated");
        // At least one token per 64-byte piece, at most one per byte.
        assert!(
            rec.input_tokens >= (1 << 20) / 64 && rec.input_tokens < 1 << 20,
            "{}",
            rec.input_tokens
        );
        assert!(rec.output_tokens > 0);
    }
}

/// A panic on a settlement path (injected, debug builds) still writes the request's record,
/// marked, and the client gets a 500 in its own dialect instead of a dropped connection.
#[cfg(debug_assertions)]
#[tokio::test]
async fn a_panicking_settlement_still_meters_and_answers_in_dialect() {
    tollgate::fault::arm("settle", "mock-nousage-panicsettle");
    tollgate::fault::arm("estimate", "PANIC-IN-ESTIMATE-7f3a");
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    // Inside the estimator: caught there, counted by bytes, the answer goes out.
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-nousage", "messages": user("PANIC-IN-ESTIMATE-7f3a and more")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(r.headers()).await;
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.input_tokens > 0);
    // Outside it: the handler unwinds, the record is written while it does.
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-nousage-panicsettle", "messages": user("boom")}),
        )
        .await;
    let e = assert_openai_error(r, 500, "internal_error").await;
    assert!(e["error"]["message"].as_str().is_some());
    let r = gw
        .client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &key)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "mock-nousage-panicsettle", "max_tokens": 16, "messages": user("boom")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "api_error", "{v}");
    let recs = gw.wait_records(3).await;
    let panicked: Vec<_> = recs
        .iter()
        .filter(|r| r.error_kind.as_deref() == Some("internal_panic"))
        .collect();
    assert_eq!(panicked.len(), 2, "{recs:?}");
    for r in panicked {
        assert_eq!(r.status, 500);
        assert_eq!(
            r.usage_source, "estimated",
            "the upstream was called: {r:?}"
        );
        assert!(r.input_tokens > 0);
    }
    let r = gw
        .client
        .get(format!("{}/healthz", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// The router's own refusals and the extractors' rejections, in the caller's dialect.
#[tokio::test]
async fn every_refusal_comes_in_the_callers_dialect() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let anthropic = |v: &Value| v["type"] == "error" && v["error"]["type"].is_string();
    let openai = |v: &Value| v["error"]["message"].is_string() && v["error"]["type"].is_string();
    let send = |m: reqwest::Method, path: &str, body: Option<Vec<u8>>| {
        let mut r = gw
            .client
            .request(m, format!("{}{path}", gw.url))
            .bearer_auth(if path.starts_with("/admin") {
                ADMIN_KEY
            } else {
                key.as_str()
            })
            .header("content-type", "application/json");
        if let Some(b) = body {
            r = r.body(b);
        }
        r.send()
    };
    type Case = (reqwest::Method, String, Option<Vec<u8>>, u16, bool);
    let cases: Vec<Case> = vec![
        (reqwest::Method::PUT, "/v1/messages".into(), None, 405, true),
        (reqwest::Method::GET, "/v1/messages".into(), None, 405, true),
        (
            reqwest::Method::PUT,
            "/v1/chat/completions".into(),
            None,
            405,
            false,
        ),
        (
            reqwest::Method::GET,
            "/v1/messages/nope".into(),
            None,
            404,
            true,
        ),
        (reqwest::Method::GET, "/v1/nope".into(), None, 404, false),
        (
            reqwest::Method::POST,
            "/v1/quote?endpoint=chat&endpoint=messages".into(),
            Some(b"{}".to_vec()),
            400,
            false,
        ),
        (
            reqwest::Method::GET,
            "/admin/wallets/x/ledger?limit=abc".into(),
            None,
            400,
            false,
        ),
        (
            reqwest::Method::GET,
            "/admin/wallets/x/ledger?limit=-5".into(),
            None,
            400,
            false,
        ),
        (
            reqwest::Method::GET,
            "/admin/wallets/%FF%FE".into(),
            None,
            400,
            false,
        ),
        (
            reqwest::Method::POST,
            "/admin/keys".into(),
            Some(vec![b' '; 3 << 20]),
            413,
            false,
        ),
        (
            reqwest::Method::POST,
            "/admin/keys".into(),
            Some(br#"["x"]"#.to_vec()),
            400,
            false,
        ),
        (
            reqwest::Method::POST,
            "/admin/keys".into(),
            Some(br#""x""#.to_vec()),
            400,
            false,
        ),
    ];
    for (m, path, body, status, is_anthropic) in cases {
        let r = send(m.clone(), &path, body).await.unwrap();
        assert_eq!(r.status(), status, "{m} {path}");
        if status == 413 {
            // The unread body is still on the wire: the client must not reuse the connection.
            assert_eq!(r.headers()["connection"], "close", "{m} {path}");
        }
        let ct = r.headers()["content-type"].to_str().unwrap().to_string();
        assert!(ct.starts_with("application/json"), "{m} {path}: {ct}");
        let v: Value = r.json().await.unwrap();
        if is_anthropic {
            assert!(anthropic(&v), "{m} {path}: {v}");
        } else {
            assert!(openai(&v), "{m} {path}: {v}");
            if status == 405 {
                assert_eq!(v["error"]["code"], "method_not_allowed", "{v}");
            }
        }
    }
    let (_, keys) = gw.admin(reqwest::Method::GET, "/admin/keys", None).await;
    assert!(
        !keys.as_array().unwrap().iter().any(|k| k["name"] == "x"),
        "an array made a key: {keys}"
    );
}

async fn rotate(gw: &TestGateway, key_id: &str, grace: &str) -> (u16, Value) {
    gw.admin(
        reqwest::Method::POST,
        &format!("/admin/keys/{key_id}/rotate"),
        Some(json!({"grace": grace})),
    )
    .await
}

/// Rotation used to mint a new key id, leaving the wallet, budget and limits on the old one:
/// the new secret spent freely. Now the key keeps its id and everything bound to it.
#[tokio::test]
async fn rotation_keeps_the_wallet_budget_limits_and_attribution() {
    let gw = TestGateway::start(PRICED).await;
    let (old, key_id) = gw
        .create_key(json!({"name": "rotating", "team": "ops", "tags": {"env": "prod"}, "rpm": 5}))
        .await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
    let (s, b) = gw
        .admin(
            reqwest::Method::PUT,
            "/admin/budgets",
            Some(json!({"scope": format!("key:{key_id}"), "period": "daily", "hard": "0.02"})),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    for i in 0..2 {
        let r = gw
            .chat(
                &old,
                json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("a{i}"))}),
            )
            .await;
        assert_eq!(r.status(), 200);
        assert!(r.headers().contains_key("x-tollgate-balance"));
    }
    let r = gw
        .chat(
            &old,
            json!({"model": "mock", "max_tokens": 16, "messages": user("a2")}),
        )
        .await;
    assert_openai_error(r, 402, "budget_exceeded").await;

    let (s, rotated) = rotate(&gw, &key_id, "1h").await;
    assert_eq!(s, 201, "{rotated}");
    assert_eq!(
        rotated["key"]["id"],
        key_id.as_str(),
        "the key keeps its id"
    );
    assert_eq!(rotated["key"]["live_secrets"], 2);
    assert!(rotated["key"]["rotating_until_ms"].as_i64().is_some());
    assert_eq!(
        rotated["key"]["expires_ms"],
        Value::Null,
        "the key's own expiry is untouched"
    );
    let new = rotated["secret"].as_str().unwrap().to_string();
    // The budget follows: the new secret is refused like the old one.
    let r = gw
        .chat(
            &new,
            json!({"model": "mock", "max_tokens": 16, "messages": user("b0")}),
        )
        .await;
    assert_openai_error(r, 402, "budget_exceeded").await;
    // Raise the budget: the wallet and limits follow too.
    gw.admin(
        reqwest::Method::PUT,
        "/admin/budgets",
        Some(json!({"scope": format!("key:{key_id}"), "period": "daily", "hard": "100"})),
    )
    .await;
    let r = gw
        .chat(
            &new,
            json!({"model": "mock", "max_tokens": 16, "messages": user("b1")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let balance = r.headers()["x-tollgate-balance"]
        .to_str()
        .unwrap()
        .to_string();
    let rec = gw.record_for(r.headers()).await;
    assert_eq!(rec.key_id, key_id);
    assert_eq!(rec.team.as_deref(), Some("ops"));
    assert_eq!(rec.tags.get("env").map(String::as_str), Some("prod"));
    assert_eq!(rec.wallet_id.as_deref(), Some(wallet.as_str()));
    assert!(balance.parse::<i64>().unwrap() < 1_000_000);
    // rpm = 5 per key, shared by both secrets: once one is limited, so is the other.
    let mut limited = None;
    for i in 0..10 {
        let k = if i % 2 == 0 { &new } else { &old };
        let r = gw
            .chat(
                k,
                json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("c{i}"))}),
            )
            .await;
        if r.status() == 429 {
            limited = Some(i);
            break;
        }
        assert_eq!(r.status(), 200);
    }
    let i = limited.expect("the key's rpm applies across its secrets");
    let other = if i % 2 == 0 { &old } else { &new };
    let r = gw
        .chat(
            other,
            json!({"model": "mock", "max_tokens": 16, "messages": user("d")}),
        )
        .await;
    assert_eq!(r.status(), 429);
}

/// Rotating during a grace period, rotating with no grace, and what the list says.
#[tokio::test]
async fn rotating_twice_is_defined_and_each_secret_keeps_its_own_expiry() {
    let gw = TestGateway::start("").await;
    let (first, key_id) = gw
        .create_key(json!({"name": "twice", "expires": "30d"}))
        .await;
    let (_, k) = gw.admin(reqwest::Method::GET, "/admin/keys", None).await;
    let expires = k
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == key_id.as_str())
        .unwrap()["expires_ms"]
        .as_i64()
        .unwrap();
    let (_, r1) = rotate(&gw, &key_id, "1h").await;
    let second = r1["secret"].as_str().unwrap().to_string();
    let (s, r2) = rotate(&gw, &key_id, "0s").await;
    assert_eq!(s, 201, "{r2}");
    let third = r2["secret"].as_str().unwrap().to_string();
    // A zero grace retires every earlier secret now; the key, and its expiry, stay.
    assert_eq!(r2["key"]["id"], key_id.as_str());
    assert_eq!(
        r2["key"]["expires_ms"], expires,
        "the new secret is not cut short"
    );
    assert_eq!(r2["key"]["live_secrets"], 1);
    for (secret, want) in [(&first, 401), (&second, 401), (&third, 200)] {
        let r = gw
            .chat(secret, json!({"model": "mock", "messages": user("who")}))
            .await;
        assert_eq!(r.status(), want);
    }
    let (_, list) = gw.admin(reqwest::Method::GET, "/admin/keys", None).await;
    let mine: Vec<_> = list
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["name"] == "twice")
        .collect();
    assert_eq!(mine.len(), 1, "one key, not one per rotation: {list}");
    assert_eq!(mine[0]["secrets"].as_array().unwrap().len(), 3);
    // A revoked key cannot be rotated back to life.
    gw.admin(
        reqwest::Method::POST,
        &format!("/admin/keys/{key_id}/revoke"),
        None,
    )
    .await;
    let (s, _) = rotate(&gw, &key_id, "1h").await;
    assert_eq!(s, 400);
}

/// A JSON answer cut off mid-way was metered as nothing, on every attempt; the provider did
/// the work each time. Each attempt that reached it is billed (estimated) and captured.
#[tokio::test]
async fn attempts_that_broke_off_after_the_provider_answered_are_billed() {
    const PRICED_INPUT: &str = r#"
[[prices]]
model = "mock*"
input = 1000000
output = 2000000
"#;
    let gw = TestGateway::start(PRICED_INPUT).await;
    let (key, key_id) = gw.create_key(json!({"name": "cut"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-truncate", "max_tokens": 16, "messages": user("a question that costs")}),
        )
        .await;
    assert_eq!(r.status(), 502);
    let rec = gw.record_for(r.headers()).await;
    assert!(rec.attempts >= 2, "retried: {rec:?}");
    assert_eq!(rec.usage_source, "estimated", "{rec:?}");
    assert!(rec.input_tokens > 0, "{rec:?}");
    assert!(
        rec.output_tokens > 0,
        "what arrived before the cut: {rec:?}"
    );
    assert!(rec.cost_micros > 0);
    let one = tollgate::estimate::request_tokens(
        &serde_json::to_vec(&json!({"model": "mock-truncate", "max_tokens": 16, "messages": user("a question that costs")})).unwrap(),
    );
    assert_eq!(
        rec.input_tokens,
        one * rec.attempts as u64,
        "each attempt's input"
    );
    gw.wait_records(0).await;
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(
        w["balance_micros"].as_i64().unwrap(),
        1_000_000 - rec.cost_micros as i64,
        "captured from the hold: {w}"
    );
    verify_ok(&gw).await;
}

/// An unknown model's 404 says where to look.
#[tokio::test]
async fn an_unknown_model_points_to_the_model_list() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let r = gw
        .chat(
            &key,
            json!({"model": "no-such-model", "messages": user("hi")}),
        )
        .await;
    let e = assert_openai_error(r, 404, "model_not_found").await;
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/v1/models"),
        "{e}"
    );
}
