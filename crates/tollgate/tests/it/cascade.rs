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

/// A request for each validator, the alias whose cheap tier fails it, and why it fails.
fn failures() -> Vec<(&'static str, Value, &'static str)> {
    let schema = json!({"type": "object", "required": ["city", "days"],
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}});
    let tools = json!([{"type": "function", "function": {"name": "book",
        "parameters": {"type": "object", "required": ["city"],
                       "properties": {"city": {"type": "string"}}}}}]);
    vec![
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
    ]
}

/// Each validator, failed by the cheap tier: the request escalates, both answers are paid.
#[tokio::test]
async fn every_validator_escalates_what_fails_it() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up)).await;
    let key = gw.key().await;
    let cases = failures();
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

/// `config` with every alias reading the streams of the key named `buffered` whole.
fn buffered_config(up: &str) -> String {
    let mut c = String::new();
    for section in config(up).split_inclusive('\n') {
        c.push_str(section);
        if section.starts_with("cascade = ") {
            c.push_str("[models.validate]\nbuffer_streams = true\nbuffer_keys = [\"buffered\"]\n");
        }
    }
    // Each alias has one validate table: merge the ones `config` already wrote.
    let c = c.replace(
        "buffer_keys = [\"buffered\"]\n[models.validate]\n",
        "buffer_keys = [\"buffered\"]\n",
    );
    format!(
        "{c}[[models]]\nname = \"auto-errorevent\"\ncascade = [\"mock-small-errorevent\", \"mock-large\"]\n\
         [models.validate]\nbuffer_streams = true\nbuffer_keys = [\"buffered\"]\n\
         [[models]]\nname = \"auto-long\"\ncascade = [\"mock-small-badjson\", \"mock-large\"]\n\
         [models.validate]\nbuffer_streams = true\nbuffer_max_bytes = 200\n"
    )
}

/// The text a Chat stream carries, and whether it ended with `[DONE]`.
async fn streamed_text(r: reqwest::Response) -> (String, bool) {
    let events = sse_data(r).await;
    let mut text = String::new();
    for e in &events {
        if let Ok(v) = serde_json::from_str::<Value>(e) {
            if let Some(t) = v
                .pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
            {
                text.push_str(t);
            }
            if let Some(t) = v
                .pointer("/choices/0/delta/refusal")
                .and_then(Value::as_str)
            {
                text.push_str(t);
            }
            if let Some(calls) = v
                .pointer("/choices/0/delta/tool_calls")
                .and_then(Value::as_array)
            {
                for c in calls {
                    text.push_str(c["function"]["arguments"].as_str().unwrap_or(""));
                }
            }
        }
    }
    (text, events.last().map(String::as_str) == Some("[DONE]"))
}

/// Streams of a key that opts in are read whole and checked: a tier that fails any check is
/// billed and the next one streamed; one that passes is replayed as it came; keys that do
/// not opt in get the first tier that starts.
#[tokio::test]
async fn a_buffered_stream_is_checked_whole_then_replayed_or_escalated() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&buffered_config(&up)).await;
    let (key, key_id) = gw.create_key(json!({"name": "buffered"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "20").await;
    let (direct, _) = gw.create_key(json!({"name": "direct"})).await;
    let stream = |alias: &str, body: Value| {
        let mut b = body;
        b["model"] = json!(alias);
        b["stream"] = json!(true);
        b
    };
    let trip = json!({"messages": user("plan a trip"), "response_format": {"type": "json_schema",
        "json_schema": {"name": "trip", "schema": {"type": "object", "required": ["city"]}}}});
    // A tier that passes: replayed whole, one upstream call, and the saving recorded.
    let before = upstream_requests(&up).await;
    let r = gw
        .chat(
            &key,
            stream("auto", json!({"messages": user("summarise the notes")})),
        )
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-cascade"], "mock-small");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (text, done) = streamed_text(r).await;
    assert!(done && !text.is_empty(), "{text}");
    let rec = wait_record(&gw, &id).await;
    assert_eq!(rec.model_served.as_deref(), Some("mock-small"));
    assert!(
        rec.output_tokens > 0 && rec.usage_source == "provider",
        "{rec:?}"
    );
    assert!(rec.savings.iter().any(|s| s.saver == "cascade"), "{rec:?}");
    assert_eq!(upstream_requests(&up).await, before + 1);

    let mut cases = failures();
    cases.retain(|c| c.0 != "auto-down");
    cases.push((
        "auto-errorevent",
        json!({"messages": user("are you there")}),
        "error in the stream",
    ));
    for (alias, body, why) in cases {
        // What only the small tier would have said.
        let small_only = match alias {
            "auto-json" => "oops",
            "auto-args" => "{}",
            "auto-refuse" => "can't help",
            _ => "",
        };
        let before = upstream_requests(&up).await;
        let r = gw.chat(&key, stream(alias, body.clone())).await;
        assert_eq!(r.status(), 200, "{alias}");
        let trail = r.headers()["x-tollgate-cascade"]
            .to_str()
            .unwrap()
            .to_string();
        assert!(trail.ends_with("-> mock-large"), "{alias}: {trail}");
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let (text, done) = streamed_text(r).await;
        assert!(done, "{alias}: the large tier's stream, whole");
        if !small_only.is_empty() {
            assert!(
                !text.contains(small_only),
                "{alias}: nothing of the small tier: {text}"
            );
        }
        if alias == "auto-json" {
            let doc: Value = serde_json::from_str(&text).unwrap();
            assert!(doc["city"].is_string(), "{doc}");
        }
        if alias == "auto-args" {
            assert!(text.contains("city"), "{text}");
        }
        let rec = wait_record(&gw, &id).await;
        assert_eq!(rec.model_served.as_deref(), Some("mock-large"), "{alias}");
        assert!(
            rec.cascade.as_deref().unwrap().contains(why),
            "{alias}: {rec:?}"
        );
        assert_eq!(upstream_requests(&up).await - before, 2, "{alias}");
        assert!(
            !rec.savings.iter().any(|s| s.saver == "cascade"),
            "{alias}: escalating saves nothing"
        );
        assert!(rec.error_kind.is_none(), "{alias}: {rec:?}");
    }

    // Both tiers of a streamed escalation under the one hold, captured together.
    let r = gw
        .chat(
            &key,
            stream(
                "auto-length",
                json!({"max_tokens": 50, "messages": user("write")}),
            ),
        )
        .await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = r.text().await.unwrap();
    let rec = wait_record(&gw, &id).await;
    let small = cost(rec.input_tokens / 2, 50, SMALL_IN, SMALL_OUT);
    assert!(
        rec.cost_micros > small,
        "the small tier is on the bill: {rec:?}"
    );
    let mut spent = 0;
    for r in gw.records().await {
        if r.key_id == key_id {
            spent += r.cost_micros;
        }
    }
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(
        w["balance_micros"].as_u64().unwrap(),
        20_000_000 - spent,
        "{w}"
    );
    assert_eq!(w["held_micros"], 0, "{w}");

    // A key that does not opt in gets the first tier that starts, unchecked.
    let r = gw.chat(&direct, stream("auto-json", trip.clone())).await;
    assert_eq!(r.headers()["x-tollgate-cascade"], "mock-small-badjson");
    assert!(streamed_text(r).await.0.contains("oops"));

    // Longer than the buffer: what was read and the rest go out unchecked, and the record
    // says so.
    let r = gw.chat(&key, stream("auto-long", trip.clone())).await;
    assert_eq!(r.headers()["x-tollgate-cascade"], "mock-small-badjson");
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let (text, done) = streamed_text(r).await;
    assert!(done && text.contains("oops"), "{text}");
    let rec = wait_record(&gw, &id).await;
    assert!(
        rec.cascade.as_deref().unwrap().contains("unchecked"),
        "{rec:?}"
    );
}
