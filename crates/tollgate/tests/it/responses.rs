//! OpenAI Responses: passthrough to OpenAI-compatible providers, metered from the usage the
//! provider reports (in `response.completed` when streaming).

use crate::harness::*;
use serde_json::{json, Value};

async fn post_responses(gw: &TestGateway, key: &str, body: Value) -> reqwest::Response {
    gw.client
        .post(format!("{}/v1/responses", gw.url))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn responses_json_and_stream_are_metered_from_the_providers_usage() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = post_responses(
        &gw,
        &key,
        json!({"model": "mock-cached-reasoning", "instructions": "Be brief.",
        "input": [{"role": "user", "content": "Tell me about gateways"}]}),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "response");
    let u = &v["usage"];
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.endpoint, "responses");
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(rec.input_tokens, u["input_tokens"].as_u64().unwrap());
    assert_eq!(
        rec.cached_input_tokens,
        u["input_tokens_details"]["cached_tokens"].as_u64().unwrap()
    );
    assert_eq!(rec.output_tokens, u["output_tokens"].as_u64().unwrap());
    assert_eq!(rec.reasoning_tokens, 8);
    assert!(rec.cached_input_tokens > 0 && rec.cost_micros > 0);

    let resp = post_responses(
        &gw,
        &key,
        json!({"model": "mock-long", "stream": true, "input": "Stream it"}),
    )
    .await;
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"response.created"));
    assert_eq!(names.last(), Some(&"response.completed"));
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "response.output_text.delta")
            .count(),
        200
    );
    gw.wait_records(2).await;
    let rec = gw.record_for(&headers).await;
    assert!(rec.stream);
    assert_eq!(
        (rec.usage_source.as_str(), rec.output_tokens),
        ("provider", 200)
    );
}

#[tokio::test]
async fn responses_stream_cut_short_is_estimated_and_flagged() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = post_responses(
        &gw,
        &key,
        json!({"model": "mock-truncate", "stream": true, "input": "x"}),
    )
    .await;
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let last = text.trim_end().lines().last().unwrap();
    let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(v["error"]["code"], "upstream_stream_error");
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.output_tokens > 0 && rec.output_tokens < 16, "{rec:?}");
}

#[tokio::test]
async fn responses_cannot_reach_an_anthropic_deployment() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{up}\"\nmodels = [\"claude-*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    let r = post_responses(&gw, &key, json!({"model": "claude-x", "input": "hi"})).await;
    assert_openai_error(r, 400, "dialect_mismatch").await;
    assert_eq!(mock_stats(&up).await["requests"], 0);
}
