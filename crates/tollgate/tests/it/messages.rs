//! Anthropic Messages: native passthrough, metering with cache token classes, errors in
//! Anthropic's shape.

use crate::harness::*;
use serde_json::{json, Value};

/// A standalone mock behind an `anthropic`-kind provider whose key must arrive as x-api-key,
/// with every token class priced differently.
async fn anthropic_gateway() -> (TestGateway, String) {
    let expected = std::env::var("CARGO_PKG_NAME").unwrap();
    let up = spawn_mock(Some(&expected)).await;
    let gw = TestGateway::start(&format!(
        r#"
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        api_key_env = "CARGO_PKG_NAME"
        idle_timeout = "300ms"
        models = ["mock*"]
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        api_key_env = "CARGO_PKG_NAME"
        [[models]]
        name = "gpt-only"
        deployments = [{{ provider = "oai", model = "mock" }}]
        [[prices]]
        model = "mock*"
        version = "test-1"
        input = 1000000
        cached_input = 100000
        cache_write_5m = 1250000
        cache_write_1h = 2000000
        output = 5000000
        "#
    ))
    .await;
    (gw, up)
}

async fn post_messages(gw: &TestGateway, key: &str, body: Value) -> reqwest::Response {
    gw.client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

async fn assert_anthropic_error(resp: reqwest::Response, status: u16, kind: &str) -> Value {
    assert_eq!(resp.status(), status);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], kind, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    v
}

fn cost_of(u: &Value) -> u64 {
    // micro-USD per million tokens, as configured above; rounded up per request.
    let w5 = u["cache_creation"]["ephemeral_5m_input_tokens"]
        .as_u64()
        .unwrap();
    let w1 = u["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_u64()
        .unwrap();
    let pico = u["input_tokens"].as_u64().unwrap() * 1_000_000
        + u["cache_read_input_tokens"].as_u64().unwrap() * 100_000
        + w5 * 1_250_000
        + w1 * 2_000_000
        + u["output_tokens"].as_u64().unwrap() * 5_000_000;
    pico.div_ceil(1_000_000)
}

#[tokio::test]
async fn messages_json_is_metered_with_every_cache_class() {
    let (gw, _) = anthropic_gateway().await;
    let key = gw.key().await;
    let long = "Explain prompt caching in detail, please. ".repeat(40);
    let resp = post_messages(
        &gw,
        &key,
        json!({"model": "mock-cached-cachewrite", "max_tokens": 64,
        "system": "You are terse.", "messages": [{"role": "user", "content": long}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["type"], "message");
    let u = &body["usage"];
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.endpoint, "messages");
    assert_eq!(rec.usage_source, "provider");
    let read = u["cache_read_input_tokens"].as_u64().unwrap();
    let w5 = u["cache_creation"]["ephemeral_5m_input_tokens"]
        .as_u64()
        .unwrap();
    let w1 = u["cache_creation"]["ephemeral_1h_input_tokens"]
        .as_u64()
        .unwrap();
    assert!(read > 0 && w5 > 0 && w1 > 0, "{u}");
    assert_eq!(
        rec.input_tokens,
        u["input_tokens"].as_u64().unwrap() + read + w5 + w1
    );
    assert_eq!(
        (
            rec.cached_input_tokens,
            rec.cache_write_5m_tokens,
            rec.cache_write_1h_tokens
        ),
        (read, w5, w1)
    );
    assert_eq!(rec.output_tokens, u["output_tokens"].as_u64().unwrap());
    assert_eq!(rec.cost_micros, cost_of(u));
    assert_eq!(rec.price_version.as_deref(), Some("mock*@test-1"));
    assert_eq!(
        headers["x-tollgate-cost"].to_str().unwrap(),
        rec.cost_micros.to_string()
    );
}

#[tokio::test]
async fn messages_stream_passes_events_through_and_is_metered_once() {
    let (gw, _) = anthropic_gateway().await;
    let key = gw.key().await;
    let resp = post_messages(
        &gw,
        &key,
        json!({"model": "mock-cached", "max_tokens": 100, "stream": true,
        "messages": [{"role": "user", "content": "Stream me something"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(names.last(), Some(&"message_stop"));
    assert!(names.contains(&"ping") && names.contains(&"message_delta"));
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        16
    );
    let start: Value = serde_json::from_str(
        text.lines()
            .find(|l| l.contains("\"message_start\""))
            .unwrap()
            .strip_prefix("data: ")
            .unwrap(),
    )
    .unwrap();
    let su = &start["message"]["usage"];
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert!(rec.stream);
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(rec.output_tokens, 16);
    assert_eq!(
        rec.cached_input_tokens,
        su["cache_read_input_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        rec.input_tokens,
        su["input_tokens"].as_u64().unwrap() + rec.cached_input_tokens
    );
    assert_eq!(gw.records().await.len(), 1);
}

#[tokio::test]
async fn messages_disconnect_keeps_the_providers_input_and_estimates_output() {
    let (gw, up) = anthropic_gateway().await;
    let key = gw.key().await;
    let mut resp = post_messages(
        &gw,
        &key,
        json!({"model": "mock-slow-long", "max_tokens": 500, "stream": true,
        "messages": [{"role": "user", "content": "a long story"}]}),
    )
    .await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut got = Vec::new();
    while got.len() < 1200 {
        got.extend_from_slice(&resp.chunk().await.unwrap().unwrap());
    }
    drop(resp);
    let rec = wait_record(&gw, &id).await;
    assert!(rec.client_disconnected);
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.input_tokens > 0);
    assert!(rec.output_tokens >= 1 && rec.output_tokens < 200, "{rec:?}");
    wait_streams_cancelled(&up, 1).await;
}

#[tokio::test]
async fn messages_errors_speak_anthropics_dialect() {
    let (gw, _) = anthropic_gateway().await;
    let key = gw.key().await;
    let ok =
        json!({"model": "mock", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]});
    assert_anthropic_error(
        post_messages(&gw, "tg_wrong", ok.clone()).await,
        401,
        "authentication_error",
    )
    .await;
    assert_anthropic_error(
        post_messages(
            &gw,
            &key,
            json!({"model": "claude-nope", "max_tokens": 1, "messages": []}),
        )
        .await,
        404,
        "not_found_error",
    )
    .await;
    let malformed = gw
        .client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_anthropic_error(malformed, 400, "invalid_request_error").await;
    // The provider's own 400 (max_tokens missing) comes back as Anthropic wrote it.
    let v = assert_anthropic_error(
        post_messages(&gw, &key, json!({"model": "mock", "messages": []})).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens"),
        "{v}"
    );
    assert_anthropic_error(
        post_messages(
            &gw,
            &key,
            json!({"model": "mock-500", "max_tokens": 5, "messages": []}),
        )
        .await,
        502,
        "api_error",
    )
    .await;
    let (narrow, _) = gw
        .create_key(json!({"name": "narrow", "models": ["mock-long"]}))
        .await;
    assert_anthropic_error(
        post_messages(&gw, &narrow, ok.clone()).await,
        403,
        "permission_error",
    )
    .await;

    // A model served only by an OpenAI-compatible deployment is reached through translation;
    // what cannot be translated is refused in Anthropic's shape, naming the field.
    let r = post_messages(&gw, &key, json!({"model": "gpt-only", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["type"], "message");
    let v = assert_anthropic_error(
        post_messages(&gw, &key, json!({"model": "gpt-only", "max_tokens": 5, "container": "c1", "messages": [{"role": "user", "content": "hi"}]})).await,
        400,
        "invalid_request_error",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("'container'"),
        "{v}"
    );
    // The other way round, a Chat Completions client reaches the Anthropic deployment through
    // translation (see translation.rs).
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap()["object"],
        "chat.completion"
    );
}

#[tokio::test]
async fn count_tokens_asks_the_provider_or_estimates_and_says_so() {
    let (gw, _) = anthropic_gateway().await;
    let key = gw.key().await;
    let body = json!({"model": "mock", "messages": [{"role": "user", "content": "How many tokens is this sentence?"}]});
    let r = gw
        .client
        .post(format!("{}/v1/messages/count_tokens", gw.url))
        .header("x-api-key", &key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("x-tollgate-usage-source").is_none());
    let v: Value = r.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0);

    let mut body = body;
    body["model"] = json!("gpt-only");
    let r = gw
        .client
        .post(format!("{}/v1/messages/count_tokens", gw.url))
        .header("x-api-key", &key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-tollgate-usage-source"], "estimated");
    let v: Value = r.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 5);
    // Counting is free: recorded for attribution, at zero cost.
    let recs = gw.records().await;
    assert_eq!(recs.len(), 2);
    assert!(recs
        .iter()
        .all(|r| r.cost_micros == 0 && r.endpoint == "messages.count_tokens"));
}
