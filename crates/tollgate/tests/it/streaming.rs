use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn stream_is_metered_and_the_injected_usage_chunk_is_removed() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let body = json!({"model": "mock", "stream": true, "messages": user("Tell me a story about a gateway")});
    let resp = gw.chat(&key, body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let headers = resp.headers().clone();
    let data = sse_data(resp).await;
    assert_eq!(data.last().unwrap(), "[DONE]");
    let chunks: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    // The client did not ask for usage, so no chunk carries it.
    assert!(chunks.iter().all(|c| c["usage"].is_null()), "{data:?}");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(text.split_whitespace().count(), 16);

    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert!(rec.stream);
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(rec.output_tokens, 16);
    assert!(rec.ttft_ms.is_some());

    // The same request as JSON bills the same prompt: the stream carried the provider's numbers.
    let mut json_body = body.clone();
    json_body["stream"] = json!(false);
    let resp = gw.chat(&key, json_body).await;
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        rec.input_tokens,
        v["usage"]["prompt_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn stream_usage_reaches_clients_that_ask_for_it() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = gw
        .chat(&key, json!({"model": "mock-long", "stream": true, "stream_options": {"include_usage": true}, "messages": user("hi")}))
        .await;
    let headers = resp.headers().clone();
    let data = sse_data(resp).await;
    let usage_chunk: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
    assert_eq!(usage_chunk["choices"], json!([]));
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(
        rec.output_tokens,
        usage_chunk["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(rec.output_tokens, 200);
    assert_eq!(
        rec.input_tokens,
        usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap()
    );
}

#[tokio::test]
async fn client_disconnect_mid_stream_cancels_upstream_and_meters_what_was_sent() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    // 200 words, 50 ms apart: ten seconds of stream; we leave after a few words.
    let mut resp = gw
        .chat(
            &key,
            json!({"model": "mock-slow-long", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let mut got = Vec::new();
    while got.len() < 400 {
        got.extend_from_slice(&resp.chunk().await.unwrap().unwrap());
    }
    drop(resp);

    let rec = wait_record(&gw, &id).await;
    assert!(rec.client_disconnected);
    assert_eq!(rec.status, 200);
    assert_eq!(rec.error_kind.as_deref(), Some("client_disconnected"));
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.output_tokens >= 1 && rec.output_tokens < 200, "{rec:?}");
    assert!(rec.cost_micros > 0);
    // The upstream saw the cancellation rather than generating all 200 words.
    wait_streams_cancelled(&up, 1).await;
    assert_eq!(mock_stats(&up).await["streams_completed"], 0);
    assert_eq!(gw.records().await.len(), 1);
}

#[tokio::test]
async fn truncated_stream_ends_with_an_error_event_and_is_estimated() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = gw
        .chat(
            &key,
            json!({"model": "mock-truncate", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let data = sse_data(resp).await;
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_stream_error");
    assert!(!data.iter().any(|d| d == "[DONE]"));
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_stream_error"));
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.output_tokens > 0 && rec.output_tokens < 16, "{rec:?}");
}

#[tokio::test]
async fn stalled_stream_is_cut_after_the_idle_timeout() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nidle_timeout = \"300ms\"\nmodels = [\"mock*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    let started = std::time::Instant::now();
    let resp = gw
        .chat(
            &key,
            json!({"model": "mock-stall", "stream": true, "messages": user("hi")}),
        )
        .await;
    let headers = resp.headers().clone();
    let data = tokio::time::timeout(Duration::from_secs(10), sse_data(resp))
        .await
        .expect("the gateway must not hang");
    assert!(started.elapsed() < Duration::from_secs(5));
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "upstream_idle_timeout");
    gw.wait_records(1).await;
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.error_kind.as_deref(), Some("upstream_idle_timeout"));
    // The stalled upstream connection was closed.
    wait_streams_cancelled(&up, 1).await;
}

#[tokio::test]
async fn streamed_tool_calls_pass_through() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let tools = json!([{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]);
    let resp = gw
        .chat(
            &key,
            json!({"model": "mock", "stream": true, "messages": user("find it with lookup"), "tools": tools}),
        )
        .await;
    let data = sse_data(resp).await;
    let mut args = String::new();
    let mut name = None;
    let mut finish = None;
    for d in &data[..data.len() - 1] {
        let v: Value = serde_json::from_str(d).unwrap();
        let choice = &v["choices"][0];
        if let Some(tc) = choice["delta"]["tool_calls"].get(0) {
            if let Some(n) = tc["function"]["name"].as_str() {
                name = Some(n.to_string());
            }
            args.push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = Some(f.to_string());
        }
    }
    assert_eq!(name.as_deref(), Some("lookup"));
    assert_eq!(
        serde_json::from_str::<Value>(&args).unwrap(),
        json!({"query": "mock"})
    );
    assert_eq!(finish.as_deref(), Some("tool_calls"));
}

/// `[metering] on_client_disconnect = "finish"`: the client leaves, the gateway reads the
/// provider's stream to its end in the background, and the record carries the provider's
/// exact usage (what the provider bills) while saying the client left.
#[tokio::test]
async fn with_finish_a_client_disconnect_is_metered_from_the_providers_usage() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[metering]\non_client_disconnect = \"finish\"\n[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    let mut resp = gw
        .chat(
            &key,
            json!({"model": "mock-slow", "stream": true, "messages": user("hi")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    // 16 words, 50 ms apart: we leave after the first.
    let got = resp.chunk().await.unwrap().unwrap();
    drop(resp);

    let rec = wait_record(&gw, &id).await;
    assert!(rec.client_disconnected, "{rec:?}");
    assert_eq!(rec.error_kind.as_deref(), Some("client_disconnected"));
    assert_eq!(rec.usage_source, "provider", "{rec:?}");
    assert_eq!(rec.output_tokens, 16, "{rec:?}");
    // Only what reached the client is counted as sent.
    assert!(
        rec.response_bytes >= got.len() as u64 && rec.response_bytes < 1_000,
        "{rec:?}"
    );
    assert_eq!(mock_stats(&up).await["streams_completed"], 1);
    assert_eq!(gw.records().await.len(), 1);
}
