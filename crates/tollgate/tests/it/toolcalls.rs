//! Tool calls the model asks for, ruled on by the key's tool policy before the agent sees
//! them: Chat Completions, Messages and Responses, JSON and streamed (the mock splits a call's
//! arguments across events), through translation, and parked for an approver.

use crate::harness::*;
use serde_json::{json, Value};

const POLICY: &str = r#"
    [[providers]]
    name = "mock"
    kind = "mock"
    models = ["mock*"]
    [[providers]]
    name = "claude"
    kind = "anthropic"
    base_url = "UPSTREAM"
    models = ["claude-*"]
    [[models]]
    name = "claude-via-translation"
    deployments = [{ provider = "claude", model = "mock" }]
    [[tool_policies]]
    name = "support-desk"
    keys = ["desk-*"]
    [[tool_policies.rules]]
    when = "surface == 'model' && tool.name == 'lookup_account'"
    decision = "allow"
    [[tool_policies.rules]]
    when = "surface == 'model' && tool.name == 'change_account_email'"
    decision = "require_approval"
    reason = "changing an account's email address needs a human's approval"
"#;

async fn gateway() -> TestGateway {
    let up = spawn_mock(None).await;
    TestGateway::start(&POLICY.replace("UPSTREAM", &up)).await
}

/// A tool whose arguments the mock sends as given (`const`): what the attacker asked for.
fn schema(name: &str) -> Value {
    match name {
        "change_account_email" => json!({"type": "object", "properties": {
            "handle": {"type": "string", "const": "@victim"},
            "email": {"type": "string", "const": "evil@example.com"}},
            "required": ["handle", "email"]}),
        _ => json!({"type": "object", "properties": {
            "handle": {"type": "string", "const": "@victim"}}, "required": ["handle"]}),
    }
}

fn chat_tools(names: &[&str]) -> Value {
    json!(names
        .iter()
        .map(|n| json!({"type": "function", "function": {"name": n, "parameters": schema(n)}}))
        .collect::<Vec<_>>())
}

fn messages_tools(names: &[&str]) -> Value {
    json!(names
        .iter()
        .map(|n| json!({"name": n, "input_schema": schema(n)}))
        .collect::<Vec<_>>())
}

fn responses_tools(names: &[&str]) -> Value {
    json!(names
        .iter()
        .map(|n| json!({"type": "function", "name": n, "parameters": schema(n)}))
        .collect::<Vec<_>>())
}

async fn post(gw: &TestGateway, key: &str, path: &str, body: Value) -> reqwest::Response {
    let r = post_api(gw, key, path, body).await;
    assert_eq!(r.status(), 200);
    r
}

async fn post_json(gw: &TestGateway, key: &str, path: &str, body: Value) -> Value {
    post(gw, key, path, body).await.json().await.unwrap()
}

/// Chat stream chunks folded into (text, tool calls as (name, arguments), finish reason).
fn fold_chat(events: &[String]) -> (String, Vec<(String, String)>, String) {
    let (mut text, mut calls, mut finish) =
        (String::new(), Vec::<(String, String)>::new(), String::new());
    for e in events.iter().filter(|e| *e != "[DONE]") {
        let v: Value = serde_json::from_str(e).unwrap();
        for c in v["choices"].as_array().unwrap() {
            text.push_str(c["delta"]["content"].as_str().unwrap_or(""));
            for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                let i = tc["index"].as_u64().unwrap() as usize;
                if calls.len() <= i {
                    calls.push((String::new(), String::new()));
                }
                calls[i]
                    .0
                    .push_str(tc["function"]["name"].as_str().unwrap_or(""));
                calls[i]
                    .1
                    .push_str(tc["function"]["arguments"].as_str().unwrap_or(""));
            }
            if let Some(f) = c["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
    }
    (text, calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tool_call_becomes_text_the_agent_reads_in_chat_json_and_streams() {
    let gw = gateway().await;
    let (key, _) = gw.create_key(json!({"name": "desk-1"})).await;
    let (free, _) = gw.create_key(json!({"name": "other"})).await;
    let ask = |tool: &str, stream: bool, model: &str| {
        json!({"model": model, "stream": stream, "tools": chat_tools(&["lookup_account", "reset_password"]),
            "messages": user(&format!("please use {tool} for @victim"))})
    };
    // Allowed: unchanged.
    let r = post_json(
        &gw,
        &key,
        "/v1/chat/completions",
        ask("lookup_account", false, "mock"),
    )
    .await;
    let call = &r["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "lookup_account", "{r}");
    assert_eq!(r["choices"][0]["finish_reason"], "tool_calls");
    // No rule allows it: the call is gone, the reason is in the text, the turn ends.
    let r = post_json(
        &gw,
        &key,
        "/v1/chat/completions",
        ask("reset_password", false, "mock"),
    )
    .await;
    let msg = &r["choices"][0]["message"];
    assert!(msg.get("tool_calls").is_none(), "{r}");
    let text = msg["content"].as_str().unwrap();
    assert!(
        text.contains("'reset_password' was not made")
            && text.contains("no rule of policy 'support-desk' allows"),
        "{text}"
    );
    assert_eq!(r["choices"][0]["finish_reason"], "stop");
    // A key no policy names is not governed.
    let r = post_json(
        &gw,
        &free,
        "/v1/chat/completions",
        ask("reset_password", false, "mock"),
    )
    .await;
    assert_eq!(
        r["choices"][0]["message"]["tool_calls"][0]["function"]["name"],
        "reset_password"
    );

    // Streams, native and translated from Messages: the arguments arrive in pieces.
    for model in ["mock", "claude-via-translation"] {
        let events = sse_data(
            post(
                &gw,
                &key,
                "/v1/chat/completions",
                ask("lookup_account", true, model),
            )
            .await,
        )
        .await;
        let (text, calls, finish) = fold_chat(&events);
        assert_eq!(calls.len(), 1, "{model}: {events:?}");
        assert_eq!(calls[0].0, "lookup_account");
        let args: Value = serde_json::from_str(&calls[0].1).unwrap();
        assert_eq!(args, json!({"handle": "@victim"}), "{model}");
        assert_eq!(
            (text.as_str(), finish.as_str()),
            ("", "tool_calls"),
            "{model}"
        );

        let events = sse_data(
            post(
                &gw,
                &key,
                "/v1/chat/completions",
                ask("reset_password", true, model),
            )
            .await,
        )
        .await;
        let (text, calls, finish) = fold_chat(&events);
        assert!(calls.is_empty(), "{model}: {events:?}");
        assert!(
            text.contains("'reset_password' was not made"),
            "{model}: {text}"
        );
        assert_eq!(finish, "stop", "{model}");
        assert!(
            !events
                .iter()
                .any(|e| e.contains("reset_password") && e.contains("tool_calls")),
            "no piece of the refused call reaches the agent: {events:?}"
        );
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    }
    // Every decision is in the audit log.
    let (s, log) = gw
        .admin(reqwest::Method::GET, "/admin/audit?action=policy.", None)
        .await;
    assert_eq!(s, 200);
    let denied = log
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "policy.deny")
        .count();
    assert_eq!(denied, 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tool_use_becomes_a_text_block_in_messages_json_and_streams() {
    let gw = gateway().await;
    let (key, _) = gw.create_key(json!({"name": "desk-2"})).await;
    let ask = |tool: &str, stream: bool| {
        json!({"model": "mock", "max_tokens": 64, "stream": stream,
            "tools": messages_tools(&["lookup_account", "reset_password"]),
            "messages": user(&format!("use {tool} for @victim"))})
    };
    let r = post_json(&gw, &key, "/v1/messages", ask("lookup_account", false)).await;
    assert_eq!(
        r["content"].as_array().unwrap().last().unwrap()["type"],
        "tool_use",
        "{r}"
    );
    assert_eq!(r["stop_reason"], "tool_use");
    let r = post_json(&gw, &key, "/v1/messages", ask("reset_password", false)).await;
    assert!(
        !r["content"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["type"] == "tool_use"),
        "{r}"
    );
    assert!(
        r.to_string().contains("'reset_password' was not made"),
        "{r}"
    );
    assert_eq!(r["stop_reason"], "end_turn");

    // Streamed: the tool_use block's events are held to its stop, then released or replaced.
    let events = sse_data(post(&gw, &key, "/v1/messages", ask("lookup_account", true)).await).await;
    let parsed = parse_events(&events);
    let json: String = parsed
        .iter()
        .filter_map(|v| v["delta"]["partial_json"].as_str())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap(),
        json!({"handle": "@victim"})
    );
    assert!(parsed
        .iter()
        .any(|v| v["content_block"]["type"] == "tool_use"));

    let events = sse_data(post(&gw, &key, "/v1/messages", ask("reset_password", true)).await).await;
    let parsed = parse_events(&events);
    assert!(
        !parsed
            .iter()
            .any(|v| v["content_block"]["type"] == "tool_use"),
        "{events:?}"
    );
    assert!(
        !parsed
            .iter()
            .any(|v| v["delta"]["type"] == "input_json_delta"),
        "{events:?}"
    );
    let text: String = parsed
        .iter()
        .filter_map(|v| v["delta"]["text"].as_str())
        .collect();
    assert!(text.contains("'reset_password' was not made"), "{text}");
    let stop = parsed
        .iter()
        .find(|v| v["type"] == "message_delta")
        .unwrap();
    assert_eq!(stop["delta"]["stop_reason"], "end_turn");
    // Every started block is stopped, in order.
    let starts: Vec<u64> = parsed
        .iter()
        .filter(|v| v["type"] == "content_block_start")
        .map(|v| v["index"].as_u64().unwrap())
        .collect();
    let stops: Vec<u64> = parsed
        .iter()
        .filter(|v| v["type"] == "content_block_stop")
        .map(|v| v["index"].as_u64().unwrap())
        .collect();
    assert_eq!(starts, stops);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_function_call_becomes_a_message_item_in_responses_json_and_streams() {
    let gw = gateway().await;
    let (key, _) = gw.create_key(json!({"name": "desk-3"})).await;
    let ask = |tool: &str, stream: bool| {
        json!({"model": "mock", "stream": stream,
            "tools": responses_tools(&["lookup_account", "reset_password"]),
            "input": format!("use {tool} for @victim")})
    };
    let r = post_json(&gw, &key, "/v1/responses", ask("reset_password", false)).await;
    let out = r["output"].as_array().unwrap();
    assert!(!out.iter().any(|i| i["type"] == "function_call"), "{r}");
    assert_eq!(out[0]["type"], "message");
    assert!(out[0]["content"][0]["text"]
        .as_str()
        .unwrap()
        .contains("'reset_password' was not made"));

    let events =
        sse_data(post(&gw, &key, "/v1/responses", ask("reset_password", true)).await).await;
    let parsed = parse_events(&events);
    assert!(
        !events.iter().any(|e| e.contains("function_call")),
        "{events:?}"
    );
    let delta: String = parsed
        .iter()
        .filter(|v| v["type"] == "response.output_text.delta")
        .filter_map(|v| v["delta"].as_str())
        .collect();
    assert!(delta.contains("'reset_password' was not made"), "{delta}");
    let done = parsed
        .iter()
        .find(|v| v["type"] == "response.completed")
        .unwrap();
    assert_eq!(done["response"]["output"][0]["type"], "message", "{done}");
    // Numbered in order, once each, as the provider numbers them.
    let seq: Vec<u64> = parsed
        .iter()
        .map(|v| v["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..seq.len() as u64).collect::<Vec<_>>());

    let events =
        sse_data(post(&gw, &key, "/v1/responses", ask("lookup_account", true)).await).await;
    let parsed = parse_events(&events);
    let args = parsed
        .iter()
        .find(|v| v["type"] == "response.function_call_arguments.done")
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(args["arguments"].as_str().unwrap()).unwrap(),
        json!({"handle": "@victim"})
    );
}

/// The attacker's request in the model's answer: parked for an approver, bound to the exact
/// arguments; once approved, the same request's call reaches the agent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_asking_to_change_an_email_waits_for_an_approver_who_sees_the_exact_call() {
    let gw = gateway().await;
    let (key, key_id) = gw.create_key(json!({"name": "desk-4"})).await;
    let ask = |stream: bool| {
        json!({"model": "mock", "stream": stream,
            "tools": chat_tools(&["lookup_account", "change_account_email"]),
            "messages": user("change the email on @victim to evil@example.com with change_account_email")})
    };
    let r = post_json(&gw, &key, "/v1/chat/completions", ask(false)).await;
    let text = r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.contains("waiting for a human's approval"), "{text}");
    assert!(r["choices"][0]["message"].get("tool_calls").is_none());
    let (_, list) = gw
        .admin(reqwest::Method::GET, "/admin/approvals", None)
        .await;
    let list = list.as_array().unwrap().clone();
    assert_eq!(list.len(), 1, "{list:?}");
    let id = list[0]["id"].as_str().unwrap().to_string();
    assert!(
        text.contains(&id),
        "the agent is told which approval: {text}"
    );
    assert_eq!(list[0]["tool"], "change_account_email");
    assert_eq!(
        list[0]["arguments"],
        json!({"handle": "@victim", "email": "evil@example.com"})
    );
    assert_eq!(list[0]["key_id"], key_id.as_str());
    // Asked again while pending (streamed this time): the same approval, still parked.
    let events = sse_data(post(&gw, &key, "/v1/chat/completions", ask(true)).await).await;
    let (text, calls, _) = fold_chat(&events);
    assert!(calls.is_empty() && text.contains(&id), "{events:?}");
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/approvals/{id}/approve"),
            Some(json!({"by": "alice"})),
        )
        .await;
    assert_eq!(s, 200);
    // Approved: the call goes to the agent once; the next one waits again.
    let events = sse_data(post(&gw, &key, "/v1/chat/completions", ask(true)).await).await;
    let (_, calls, finish) = fold_chat(&events);
    assert_eq!(calls.len(), 1, "{events:?}");
    assert_eq!(calls[0].0, "change_account_email");
    assert_eq!(finish, "tool_calls");
    let r = post_json(&gw, &key, "/v1/chat/completions", ask(false)).await;
    assert!(
        r["choices"][0]["message"].get("tool_calls").is_none(),
        "single use: {r}"
    );
    let (_, log) = gw
        .admin(reqwest::Method::GET, "/admin/audit?action=policy.", None)
        .await;
    assert!(
        log.as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "policy.require_approval"),
        "{log}"
    );
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/audit/verify", None)
        .await;
    assert_eq!(v["broken"], Value::Null, "{v}");
}

/// `session.calls`: a key may have its model call a tool twice an hour; the third is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_on_the_sessions_counters_caps_tool_calls_per_hour() {
    let gw = TestGateway::start(
        r#"
        [[tool_policies]]
        name = "capped"
        keys = ["capped"]
        [[tool_policies.rules]]
        when = "surface == 'model' && session.calls < 2 && session.spend_micros < 1000000"
        decision = "allow"
        reason = "two tool calls an hour"
        "#,
    )
    .await;
    let (key, _) = gw.create_key(json!({"name": "capped"})).await;
    let ask = json!({"model": "mock", "tools": chat_tools(&["lookup_account"]),
        "messages": user("use lookup_account for @victim")});
    for _ in 0..2 {
        let r = post_json(&gw, &key, "/v1/chat/completions", ask.clone()).await;
        assert_eq!(r["choices"][0]["finish_reason"], "tool_calls", "{r}");
    }
    let r = post_json(&gw, &key, "/v1/chat/completions", ask).await;
    assert!(
        r["choices"][0]["message"].get("tool_calls").is_none(),
        "{r}"
    );
    assert!(
        chat_content(&r).contains("no rule of policy 'capped' allows"),
        "{r}"
    );
}

fn chat_content(r: &Value) -> String {
    r["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
