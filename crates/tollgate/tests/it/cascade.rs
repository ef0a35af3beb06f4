//! Verified cascades: a cheap tier's answer is returned when it passes its checks and
//! escalated to the next tier when it fails any of them (each validator driven by a mock
//! model that fails it on demand); both tiers are paid under one wallet hold; the record says
//! which tier answered, why it escalated, and what answering cheaply saved.

use crate::harness::*;
use serde_json::{json, Value};

const SMALL_IN: u64 = 100_000; // micro-USD per million tokens
const SMALL_OUT: u64 = 400_000;
const LARGE_IN: u64 = 5_000_000;
const LARGE_OUT: u64 = 20_000_000;

fn config(up: &str) -> String {
    let mut c = format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n\
         [[prices]]\nmodel = \"mock-small*\"\ninput = {SMALL_IN}\noutput = {SMALL_OUT}\n\
         [[prices]]\nmodel = \"mock-large*\"\ninput = {LARGE_IN}\noutput = {LARGE_OUT}\n"
    );
    for (alias, small) in [
        ("auto", "mock-small"),
        ("auto-json", "mock-small-badjson"),
        ("auto-args", "mock-small-badargs"),
        ("auto-length", "mock-small-length"),
        ("auto-empty", "mock-small-empty"),
        ("auto-refuse", "mock-small-refuse"),
        ("auto-down", "mock-small-500"),
    ] {
        c.push_str(&format!(
            "[[models]]\nname = \"{alias}\"\ncascade = [\"{small}\", \"mock-large\"]\n"
        ));
    }
    c.push_str("[[models]]\nname = \"auto-regex\"\ncascade = [\"mock-small\", \"mock-large\"]\n[models.validate]\nmust_match = \"^NEVER$\"\n");
    c.push_str("[[models]]\nname = \"auto-unchecked\"\ncascade = [\"mock-small-length\", \"mock-large\"]\n[models.validate]\nnot_truncated = false\n");
    c
}

async fn upstream_requests(url: &str) -> u64 {
    mock_stats(url).await["requests"].as_u64().unwrap()
}

fn cost(input: u64, output: u64, price_in: u64, price_out: u64) -> u64 {
    (u128::from(input) * u128::from(price_in) + u128::from(output) * u128::from(price_out))
        .div_ceil(1_000_000) as u64
}

#[tokio::test]
async fn a_cheap_answer_that_passes_is_returned_and_the_saving_recorded() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up)).await;
    let key = gw.key().await;
    let r = gw
        .chat(
            &key,
            json!({"model": "auto", "messages": user("summarise the release notes")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-cascade"], "mock-small");
    let rec = gw.record_for(r.headers()).await;
    let answer: Value = r.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .len()
            > 10
    );
    assert_eq!(upstream_requests(&up).await, 1);
    assert_eq!(rec.model_requested.as_deref(), Some("auto"));
    assert_eq!(rec.model_served.as_deref(), Some("mock-small"));
    assert_eq!(rec.cascade.as_deref(), Some("mock-small"));
    let paid = cost(rec.input_tokens, rec.output_tokens, SMALL_IN, SMALL_OUT);
    assert_eq!(rec.cost_micros, paid);
    let saved = rec.savings.iter().find(|s| s.saver == "cascade").unwrap();
    assert_eq!(
        saved.micros,
        cost(rec.input_tokens, rec.output_tokens, LARGE_IN, LARGE_OUT) - paid,
        "what the last tier would have cost for the same tokens, less what was paid"
    );
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_cascade_answers_total{tier=\"first\"} 1"),
        "{m}"
    );
}

/// Each validator, failed by the cheap tier: the request escalates, both answers are paid.
#[tokio::test]
async fn every_validator_escalates_what_fails_it() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up)).await;
    let key = gw.key().await;
    let schema = json!({"type": "object", "required": ["city", "days"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}});
    let tools = json!([{"type": "function", "function": {"name": "book",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}}]);
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "auto-json",
            json!({"messages": user("plan a trip"), "response_format":
                {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}}}),
            "not the JSON asked for",
        ),
        (
            "auto-args",
            json!({"messages": user("use the book tool"), "tools": tools}),
            "do not match its schema",
        ),
        (
            "auto-length",
            json!({"messages": user("write a lot")}),
            "token limit",
        ),
        (
            "auto-empty",
            json!({"messages": user("say something")}),
            "empty",
        ),
        (
            "auto-refuse",
            json!({"messages": user("do the thing")}),
            "refused",
        ),
        (
            "auto-regex",
            json!({"messages": user("a number")}),
            "does not match /^NEVER$/",
        ),
        (
            "auto-down",
            json!({"messages": user("are you up")}),
            "failed with 500",
        ),
    ];
    for (alias, mut body, why) in cases {
        body["model"] = json!(alias);
        let before = upstream_requests(&up).await;
        let r = gw.chat(&key, body).await;
        assert_eq!(r.status(), 200, "{alias}");
        let trail = r.headers()["x-tollgate-cascade"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(trail.ends_with("-> mock-large"), "{alias}: {trail}");
        let rec = gw.record_for(r.headers()).await;
        let answer: Value = r.json().await.unwrap();
        assert_eq!(rec.model_served.as_deref(), Some("mock-large"), "{alias}");
        let path = rec.cascade.clone().unwrap();
        assert!(path.contains(why), "{alias}: {path}");
        assert!(path.ends_with("-> mock-large"), "{alias}: {path}");
        // What the large tier answered is what the client got: it passes where the small failed.
        if alias == "auto-json" {
            let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
            let doc: Value = serde_json::from_str(text).unwrap();
            assert!(doc["city"].is_string() && doc["days"].is_number(), "{doc}");
        }
        if alias == "auto-args" {
            let args = answer["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .unwrap();
            assert!(args.contains("city"), "{args}");
        }
        let calls = upstream_requests(&up).await - before;
        if alias == "auto-down" {
            // The failing tier was tried (with its retries) and billed nothing: no answer.
            assert!(calls >= 2, "{alias}: {calls}");
            assert!(rec.cost_micros > 0);
        } else {
            assert_eq!(calls, 2, "{alias}: both tiers called once");
            assert!(
                rec.cost_micros
                    > cost(
                        rec.input_tokens / 2,
                        rec.output_tokens / 2,
                        LARGE_IN,
                        LARGE_OUT
                    ) / 2,
                "{alias}: {rec:?}"
            );
        }
        assert!(
            !rec.savings.iter().any(|s| s.saver == "cascade"),
            "{alias}: escalating saves nothing"
        );
    }
    // A check the alias turns off is not applied: the truncated cheap answer is returned.
    let r = gw
        .chat(
            &key,
            json!({"model": "auto-unchecked", "messages": user("write a lot")}),
        )
        .await;
    assert_eq!(r.headers()["x-tollgate-cascade"], "mock-small-length");
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_cascade_answers_total{tier=\"escalated\"} 7"),
        "{m}"
    );
}

/// What the wallet would hold for `body` sent as `model` (`POST /v1/quote`).
async fn hold_for(gw: &TestGateway, key: &str, body: &Value, model: &str) -> u64 {
    let mut b = body.clone();
    b["model"] = json!(model);
    let r = post_api(gw, key, "/v1/quote", b).await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    v["hold_micros"].as_u64().unwrap()
}

#[tokio::test]
async fn both_tiers_are_held_at_once_and_captured_together() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up)).await;
    let (key, key_id) = gw.create_key(json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "5").await;
    let body = json!({"model": "auto-length", "max_tokens": 100, "messages": user("write a lot")});

    // The hold covers the request answered by every tier.
    let (all, small, large) = (
        hold_for(&gw, &key, &body, "auto-length").await,
        hold_for(&gw, &key, &body, "mock-small-length").await,
        hold_for(&gw, &key, &body, "mock-large").await,
    );
    assert_eq!(all, small + large, "one hold for both tiers");

    let r = gw.chat(&key, body.clone()).await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(r.headers()).await;
    assert!(rec.cascade.as_deref().unwrap().contains("token limit"));
    assert_eq!(rec.wallet_id.as_deref(), Some(wallet.as_str()));
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(
        w["balance_micros"].as_i64().unwrap(),
        5_000_000 - rec.cost_micros as i64,
        "both tiers captured: {w}"
    );
    assert_eq!(w["held_micros"], 0, "{w}");

    // A wallet that covers one tier's worst case but not both is refused before any call.
    let (poor, poor_id) = gw.create_key(json!({"name": "poor"})).await;
    let enough_for_one = format!("{:.6}", (large + small / 2) as f64 / 1e6);
    gw.wallet(&format!("key:{poor_id}"), &enough_for_one).await;
    let before = upstream_requests(&up).await;
    let r = gw.chat(&poor, body).await;
    assert_eq!(r.status(), 402, "{}", r.text().await.unwrap());
    assert_eq!(upstream_requests(&up).await, before);
}
