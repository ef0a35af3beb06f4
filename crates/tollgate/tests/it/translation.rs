//! Clients of one dialect served by deployments of the other, and fallback across dialects.

use crate::harness::*;
use serde_json::{json, Value};

async fn gateway(primary: (&str, &str), secondary: (&str, &str)) -> TestGateway {
    let up = spawn_mock(None).await;
    TestGateway::start(&format!(
        r#"
        [routing]
        backoff_base = "5ms"
        backoff_max = "10ms"
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[models]]
        name = "via-claude"
        deployments = [{{ provider = "claude", model = "mock-cached" }}]
        [[models]]
        name = "via-claude-error"
        deployments = [{{ provider = "claude", model = "mock-errorevent" }}]
        [[models]]
        name = "smart"
        deployments = [
          {{ provider = "{}", model = "{}", priority = 0 }},
          {{ provider = "{}", model = "{}", priority = 1 }},
        ]
        "#,
        primary.0, primary.1, secondary.0, secondary.1
    ))
    .await
}

#[tokio::test]
async fn chat_json_through_an_anthropic_deployment() {
    let gw = gateway(("claude", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    let resp = gw
        .chat(
            &key,
            json!({"model": "via-claude", "max_tokens": 50, "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    assert!(v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .starts_with("The mock provider"));
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.provider.as_deref(), Some("claude"));
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(
        rec.input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        rec.cached_input_tokens,
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    );
    assert!(rec.cached_input_tokens > 0);
    assert_eq!(rec.output_tokens, 16);

    // Tools cross over and come back as tool_calls.
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object",
        "properties": {"q": {"type": "string"}}, "required": ["q"]}}}]);
    let v: Value = gw.chat(&key, json!({"model": "via-claude", "messages": user("find"), "tools": tools, "tool_choice": "required"})).await.json().await.unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup");
    assert_eq!(
        serde_json::from_str::<Value>(call["function"]["arguments"].as_str().unwrap()).unwrap(),
        json!({"q": "mock"})
    );
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn chat_stream_through_an_anthropic_deployment() {
    let gw = gateway(("claude", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    let resp = gw
        .chat(
            &key,
            json!({"model": "via-claude", "stream": true, "stream_options": {"include_usage": true},
        "messages": user("Stream through Claude")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let data = sse_data(resp).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk"));
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split_whitespace().count(), 16);
    let usage = &chunks.last().unwrap()["usage"];
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(
        rec.output_tokens,
        usage["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(rec.input_tokens, usage["prompt_tokens"].as_u64().unwrap());

    // Without include_usage, no usage chunk reaches the client.
    let data = sse_data(
        gw.chat(
            &key,
            json!({"model": "via-claude", "stream": true, "messages": user("x")}),
        )
        .await,
    )
    .await;
    assert!(data[..data.len() - 1]
        .iter()
        .all(|d| serde_json::from_str::<Value>(d).unwrap()["usage"].is_null()));
}

#[tokio::test]
async fn fallback_crosses_dialects_both_ways() {
    for (primary, secondary, served_by) in [
        (("claude", "mock-500"), ("oai", "mock"), "oai"),
        (("oai", "mock-500"), ("claude", "mock"), "claude"),
    ] {
        let gw = gateway(primary, secondary).await;
        let key = gw.key().await;
        for stream in [false, true] {
            let resp = gw
                .chat(
                    &key,
                    json!({"model": "smart", "stream": stream, "messages": user("hi")}),
                )
                .await;
            assert_eq!(resp.status(), 200);
            let headers = resp.headers().clone();
            let body = resp.text().await.unwrap();
            if stream {
                assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
            } else {
                assert_eq!(
                    serde_json::from_str::<Value>(&body).unwrap()["object"],
                    "chat.completion"
                );
            }
            let id = headers["x-request-id"].to_str().unwrap();
            let rec = gw
                .wait_records(if stream { 2 } else { 1 })
                .await
                .into_iter()
                .find(|r| r.id == id)
                .unwrap();
            assert_eq!(
                (rec.provider.as_deref(), rec.attempts, rec.output_tokens),
                (Some(served_by), 2, 16),
                "{rec:?}"
            );
        }
        assert_eq!(gw.records().await.len(), 2);
    }
}

#[tokio::test]
async fn an_untranslatable_field_is_a_400_that_names_it() {
    let gw = gateway(("claude", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    let v = assert_openai_error(
        gw.chat(
            &key,
            json!({"model": "via-claude", "n": 3, "messages": user("x")}),
        )
        .await,
        400,
        "bad_request",
    )
    .await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("'n'"),
        "{v}"
    );
    let v = assert_openai_error(
        gw.chat(&key, json!({"model": "via-claude", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]})).await,
        400,
        "bad_request",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("messages[0].content[0].type"),
        "{v}"
    );
}

async fn post_messages(gw: &TestGateway, key: &str, body: Value) -> reqwest::Response {
    gw.client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn messages_client_through_an_openai_deployment() {
    let gw = gateway(("oai", "mock-cached"), ("oai", "mock")).await;
    let key = gw.key().await;
    let tools = json!([{"name": "lookup", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}}]);
    let resp = post_messages(&gw, &key, json!({"model": "smart", "max_tokens": 64, "system": "Be brief.",
        "messages": [{"role": "user", "content": "find it"}], "tools": tools, "tool_choice": {"type": "any"}})).await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        (v["type"].as_str(), v["stop_reason"].as_str()),
        (Some("message"), Some("tool_use"))
    );
    assert_eq!(v["content"][0]["input"], json!({"q": "mock"}));
    let rec = gw.record_for(&headers).await;
    assert_eq!(
        (rec.provider.as_deref(), rec.usage_source.as_str()),
        (Some("oai"), "provider")
    );
    let u = &v["usage"];
    assert_eq!(
        rec.input_tokens,
        u["input_tokens"].as_u64().unwrap() + u["cache_read_input_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        rec.cached_input_tokens,
        u["cache_read_input_tokens"].as_u64().unwrap()
    );
    assert!(rec.cached_input_tokens > 0);

    let resp = post_messages(
        &gw,
        &key,
        json!({"model": "smart", "max_tokens": 64, "stream": true,
        "messages": [{"role": "user", "content": "stream it"}]}),
    )
    .await;
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .collect();
    assert_eq!(names.first(), Some(&"message_start"));
    assert_eq!(
        &names[names.len() - 2..],
        &["message_delta", "message_stop"]
    );
    assert_eq!(
        names
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        16
    );
    let delta_line = text
        .lines()
        .find(|l| l.contains("\"message_delta\""))
        .unwrap();
    let delta: Value = serde_json::from_str(delta_line.strip_prefix("data: ").unwrap()).unwrap();
    gw.wait_records(2).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(
        rec.output_tokens,
        delta["usage"]["output_tokens"].as_u64().unwrap()
    );
    assert_eq!(rec.output_tokens, 16);
}

#[tokio::test]
async fn messages_fallback_crosses_dialects_both_ways() {
    for (primary, secondary, served_by) in [
        (("claude", "mock-500"), ("oai", "mock"), "oai"),
        (("oai", "mock-500"), ("claude", "mock"), "claude"),
    ] {
        let gw = gateway(primary, secondary).await;
        let key = gw.key().await;
        for stream in [false, true] {
            let resp = post_messages(
                &gw,
                &key,
                json!({"model": "smart", "max_tokens": 50, "stream": stream,
                "messages": [{"role": "user", "content": "hi"}]}),
            )
            .await;
            assert_eq!(resp.status(), 200);
            let headers = resp.headers().clone();
            let body = resp.text().await.unwrap();
            if stream {
                assert!(body.contains("event: message_stop"), "{body}");
            } else {
                assert_eq!(
                    serde_json::from_str::<Value>(&body).unwrap()["type"],
                    "message"
                );
            }
            let id = headers["x-request-id"].to_str().unwrap();
            let rec = gw
                .wait_records(if stream { 2 } else { 1 })
                .await
                .into_iter()
                .find(|r| r.id == id)
                .unwrap();
            assert_eq!(
                (rec.provider.as_deref(), rec.attempts, rec.output_tokens),
                (Some(served_by), 2, 16),
                "{rec:?}"
            );
        }
    }
}

#[tokio::test]
async fn translated_stream_disconnect_is_metered_once_and_cancels_upstream() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"claude\"\nkind = \"anthropic\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    let mut resp = gw
        .chat(
            &key,
            json!({"model": "mock-slow-long", "stream": true, "messages": user("long story")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut got = Vec::new();
    while got.len() < 600 {
        got.extend_from_slice(&resp.chunk().await.unwrap().unwrap());
    }
    assert!(String::from_utf8_lossy(&got).contains("chat.completion.chunk"));
    drop(resp);
    let rec = wait_record(&gw, &id).await;
    assert!(rec.client_disconnected);
    // The provider's input count from message_start is kept; only the output is estimated.
    assert_eq!(rec.usage_source, "estimated");
    assert!(
        rec.input_tokens > 0 && rec.output_tokens >= 1 && rec.output_tokens < 200,
        "{rec:?}"
    );
    wait_streams_cancelled(&up, 1).await;
    assert_eq!(gw.records().await.len(), 1);
}

#[tokio::test]
async fn provider_error_events_reach_the_client_in_its_dialect() {
    let gw = gateway(("claude", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    // Native Messages: the provider's own error event passes through.
    let resp = post_messages(
        &gw,
        &key,
        json!({"model": "claude/mock-errorevent", "max_tokens": 50, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]}),
    )
    .await;
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("event: error") && text.contains("overloaded_error"),
        "{text}"
    );
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.error_kind.as_deref(), Some("provider_error_event"));
    // Translated for a Chat client: an OpenAI-style error chunk.
    let resp = gw
        .chat(
            &key,
            json!({"model": "via-claude-error", "stream": true, "messages": user("hi")}),
        )
        .await;
    let data = sse_data(resp).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "overloaded_error", "{data:?}");
}

#[tokio::test]
async fn an_untranslatable_tool_schema_is_a_400_in_the_callers_dialect() {
    let gw = gateway(("claude", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "array", "items": {}}}}]);
    let v = assert_openai_error(
        gw.chat(
            &key,
            json!({"model": "via-claude", "messages": user("x"), "tools": tools}),
        )
        .await,
        400,
        "bad_request",
    )
    .await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("tools[0].function.parameters"),
        "{v}"
    );
}

/// A request shaped as Claude Code sends every one (2.1.x): adaptive thinking, context
/// management and an effort level. Through an OpenAI-compatible deployment it is served, the
/// dropped fields are named in `x-tollgate-warning`, and `[translation]` can make any of them
/// a 400 that names the field and the dialect it was translating for.
#[tokio::test]
async fn claude_code_requests_cross_vendors_under_the_translation_policy() {
    let body = json!({"model": "smart", "max_tokens": 32000, "stream": false,
        "thinking": {"type": "adaptive", "display": "omitted"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "metadata": {"user_id": "u1"},
        "system": [{"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>x</system-reminder>"},
            {"type": "text", "text": "say hello", "cache_control": {"type": "ephemeral"}}]},
            {"role": "system", "content": [{"type": "text", "text": "# Environment"}]}]});
    let gw = gateway(("oai", "mock"), ("oai", "mock")).await;
    let key = gw.key().await;
    let resp = post_messages(&gw, &key, body.clone()).await;
    assert_eq!(resp.status(), 200);
    let warning = resp.headers()["x-tollgate-warning"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        warning.contains("context_management, output_config.effort, thinking"),
        "{warning}"
    );
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "message");
    assert_eq!(v["stop_reason"], "end_turn");

    let up = spawn_mock(None).await;
    let strict = TestGateway::start(&format!(
        r#"
        [translation.fields]
        thinking = "reject"
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[models]]
        name = "smart"
        deployments = [{{ provider = "oai", model = "mock" }}]
        "#
    ))
    .await;
    let key = strict.key().await;
    let resp = post_messages(&strict, &key, body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("'thinking'") && msg.contains("OpenAI-compatible deployment"),
        "{msg}"
    );
}
