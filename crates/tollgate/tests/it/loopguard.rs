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
    let v = assert_openai_error(r, 429, "loop_detected").await;
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
            assert_eq!(r.status(), 429);
            assert_eq!(
                r.json::<Value>().await.unwrap()["error"]["type"],
                "rate_limit_error"
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
    let v = assert_openai_error(r, 429, "loop_detected").await;
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
