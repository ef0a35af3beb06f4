//! The loop guard: identical requests, and the same tool call over and over.

use crate::harness::*;
use serde_json::{json, Value};

fn looping_conversation(times: usize) -> Value {
    let mut messages = vec![json!({"role": "user", "content": "find the file"})];
    for i in 0..times {
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": [
            {"id": format!("call_{i}"), "type": "function", "function": {"name": "ls", "arguments": "{\"path\": \"/tmp\"}"}}]}));
        messages.push(
            json!({"role": "tool", "tool_call_id": format!("call_{i}"), "content": "nothing here"}),
        );
    }
    json!(messages)
}

#[tokio::test]
async fn the_fifth_identical_request_trips_the_guard_not_the_fourth() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let body = json!({"model": "mock", "messages": user("are we there yet?")});
    for _ in 0..4 {
        assert_eq!(gw.chat(&key, body.clone()).await.status(), 200);
    }
    let r = gw.chat(&key, body.clone()).await;
    assert!(r.headers().contains_key("retry-after"));
    let v = assert_openai_error(r, 400, "loop_detected").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("repeating yourself"),
        "{v}"
    );
    // A different request, or the same one from another key, is unaffected.
    assert_eq!(
        gw.chat(
            &key,
            json!({"model": "mock", "messages": user("something new")})
        )
        .await
        .status(),
        200
    );
    let other = gw.key().await;
    assert_eq!(gw.chat(&other, body.clone()).await.status(), 200);
    // Anthropic clients get it in their dialect.
    let mb = json!({"model": "mock", "max_tokens": 10, "messages": [{"role": "user", "content": "again"}]});
    for i in 0..5 {
        let r = gw
            .client
            .post(format!("{}/v1/messages", gw.url))
            .header("x-api-key", &key)
            .json(&mb)
            .send()
            .await
            .unwrap();
        if i < 4 {
            assert_eq!(r.status(), 200);
        } else {
            assert_eq!(r.status(), 400);
            assert_eq!(
                r.json::<Value>().await.unwrap()["error"]["type"],
                "invalid_request_error"
            );
        }
    }
}

#[tokio::test]
async fn the_third_identical_tool_call_in_a_conversation_trips_the_guard() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let tools = json!([{"type": "function", "function": {"name": "ls", "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]);
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "tools": tools, "messages": looping_conversation(2)}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "tools": tools, "messages": looping_conversation(3)}),
        )
        .await;
    let v = assert_openai_error(r, 400, "loop_detected").await;
    assert!(
        v["error"]["message"].as_str().unwrap().contains("'ls'"),
        "{v}"
    );
}

#[tokio::test]
async fn warn_mode_serves_with_a_warning_header() {
    let gw = TestGateway::start("[loop_guard]\naction = \"warn\"\nmax_repeats = 2\n").await;
    let key = gw.key().await;
    let body = json!({"model": "mock", "messages": user("again")});
    let r = gw.chat(&key, body.clone()).await;
    assert!(!r.headers().contains_key("x-tollgate-warning"));
    let r = gw.chat(&key, body).await;
    assert_eq!(r.status(), 200);
    assert!(r.headers()["x-tollgate-warning"]
        .to_str()
        .unwrap()
        .starts_with("loop detected"));
}

/// `action = "nudge"`: the repeat is answered 200 in the caller's own dialect, JSON or
/// stream, with text telling the model it is looping; nothing goes upstream, nothing is
/// billed, and the record says loop_detected.
#[tokio::test]
async fn nudge_answers_in_each_dialect_and_costs_nothing() {
    let gw = TestGateway::start("[loop_guard]\naction = \"nudge\"\nmax_repeats = 2\n").await;
    let key = gw.key().await;
    let post = |path: &'static str, body: Value| {
        let (gw, key) = (&gw, key.clone());
        async move {
            gw.client
                .post(format!("{}{path}", gw.url))
                .bearer_auth(&key)
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .unwrap()
        }
    };
    let cases = [
        (
            "/v1/chat/completions",
            json!({"model": "mock", "messages": user("again")}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "mock", "stream": true,
            "stream_options": {"include_usage": true}, "messages": user("again, streamed")}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock", "max_tokens": 20, "messages": [{"role": "user", "content": "again"}]}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock", "max_tokens": 20, "stream": true, "messages": [{"role": "user", "content": "again"}]}),
        ),
        ("/v1/responses", json!({"model": "mock", "input": "again"})),
        (
            "/v1/responses",
            json!({"model": "mock", "input": "again", "stream": true}),
        ),
    ];
    for (path, body) in cases {
        assert_eq!(post(path, body.clone()).await.status(), 200);
        let r = post(path, body.clone()).await;
        assert_eq!(r.status(), 200, "{path} {body}");
        assert_eq!(r.headers()["x-tollgate-loop"], "nudge");
        assert_eq!(r.headers()["x-tollgate-cost"], "0");
        let headers = r.headers().clone();
        let streamed = body["stream"] == true;
        let text = if streamed {
            let data = sse_data(r).await;
            // Each event is JSON of the endpoint's own stream (and Chat ends with [DONE]).
            let mut text = String::new();
            for d in data.iter().filter(|d| *d != "[DONE]") {
                let v: Value = serde_json::from_str(d).unwrap();
                for p in ["/choices/0/delta/content", "/delta/text", "/delta"] {
                    if let Some(t) = v.pointer(p).and_then(Value::as_str) {
                        text.push_str(t);
                    }
                }
            }
            if path == "/v1/chat/completions" {
                assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
                assert!(data.iter().any(|d| d.contains("\"usage\"")), "{data:?}");
            }
            text
        } else {
            let v: Value = r.json().await.unwrap();
            [
                "/choices/0/message/content",
                "/content/0/text",
                "/output/0/content/0/text",
            ]
            .iter()
            .find_map(|p| v.pointer(p).and_then(Value::as_str))
            .unwrap_or_default()
            .to_string()
        };
        assert!(
            text.starts_with("[tollgate]") && text.contains("repeat"),
            "{path}: {text}"
        );
        let rec = gw.record_for(&headers).await;
        assert_eq!(rec.error_kind.as_deref(), Some("loop_detected"));
        assert_eq!(rec.cost_micros, 0);
        assert_eq!(rec.provider, None, "nothing went upstream");
    }
}
