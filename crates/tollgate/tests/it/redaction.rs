//! Redaction end to end: what the provider receives (the mock echoes it back), what the agent
//! receives of an answer full of personal data (JSON and streamed, values split across
//! events), MCP tool arguments and results, refusals in each dialect, the audit log.

use crate::harness::*;
use serde_json::{json, Value};

const DETECTORS: &str = r#"
    [redaction.detectors]
    email = "mask"
    phone = "mask"
    card = "hash"
    iban = "mask"
    ssn = "reject"
    secret = "reject"
"#;

async fn gateway(responses: bool) -> TestGateway {
    TestGateway::start(&format!(
        "[redaction]\nkeys = [\"pii-*\"]\nresponses = {responses}\n{DETECTORS}"
    ))
    .await
}

use crate::harness::post_api as post;

fn chat_text(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_provider_never_sees_what_redaction_masks_and_refuses() {
    let gw = gateway(false).await;
    let (key, _) = gw.create_key(json!({"name": "pii-agent"})).await;
    let (plain, _) = gw.create_key(json!({"name": "other"})).await;
    // Everything in the conversation: the user's text, a tool call's arguments, its result,
    // and an escaped `@` (JSON-decoded before scanning).
    let messages = json!([
        {"role": "system", "content": "Support desk. Escalations: boss@corp.example"},
        {"role": "user", "content": "Email bob@example.org, call +1 415 555 2671, card 4111 1111 1111 1111"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function",
            "function": {"name": "lookup", "arguments": "{\"email\":\"bob@example.org\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "found: IBAN DE89 3704 0044 0532 0130 00, alt carol@example.net"},
        {"role": "user", "content": "go on"},
    ]);
    let body = json!({"model": "mock-echoall", "messages": messages})
        .to_string()
        .replace("carol@", "carol\\u0040");
    assert!(body.contains("carol\\u0040example"));
    let r = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let seen = chat_text(&r.json().await.unwrap());
    for raw in [
        "boss@corp.example",
        "bob@example.org",
        "415 555 2671",
        "4111 1111",
        "DE89",
        "carol@example.net",
    ] {
        assert!(!seen.contains(raw), "the provider saw {raw}: {seen}");
    }
    for mask in [
        "<EMAIL_1>",
        "<EMAIL_2>",
        "<EMAIL_3>",
        "<PHONE_1>",
        "<IBAN_1>",
        "<CARD_",
    ] {
        assert!(seen.contains(mask), "{mask} missing: {seen}");
    }
    // The same value is the same placeholder everywhere in the request.
    assert_eq!(seen.matches("<EMAIL_2>").count(), 2, "{seen}");
    // Hashes are keyed per gateway and stable across requests.
    let card_tag = |s: &str| s.split("<CARD_").nth(1).unwrap()[..8].to_string();
    let r = post(&gw, &key, "/v1/chat/completions",
        json!({"model": "mock-echo", "messages": user("again 4111-1111-1111-1111? no: 4111 1111 1111 1111")})).await;
    let again = chat_text(&r.json().await.unwrap());
    assert_eq!(card_tag(&again), card_tag(&seen), "{again}");
    // A key the redaction does not name is not touched.
    let r = post(
        &gw,
        &plain,
        "/v1/chat/completions",
        json!({"model": "mock-echo", "messages": user("mail bob@example.org")}),
    )
    .await;
    assert!(chat_text(&r.json().await.unwrap()).contains("bob@example.org"));

    // Refused: an SSN, a secret; in each dialect, nothing sent upstream.
    let before = mock_requests(&gw).await;
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        json!({"model": "mock", "messages": user("my ssn is 123-45-6789")}),
    )
    .await;
    let e = assert_openai_error(r, 400, "sensitive_data").await;
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("social security number") && !msg.contains("6789"),
        "{msg}"
    );
    let r = post(
        &gw,
        &key,
        "/v1/messages",
        json!({"model": "mock", "max_tokens": 16,
        "messages": user("deploy with AKIAIOSFODNN7EXAMPLE")}),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["type"], "error", "{e}");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("a secret"),
        "{e}"
    );
    let r = post(
        &gw,
        &key,
        "/v1/responses",
        json!({"model": "mock",
        "input": "key: -----BEGIN RSA PRIVATE KEY-----\nMIIE\n-----END RSA PRIVATE KEY-----"}),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(
        mock_requests(&gw).await,
        before,
        "nothing refused reached the provider"
    );

    // The audit log has the counts, never the values.
    wait_record(&gw, &id).await;
    let (_, log) = gw
        .admin(reqwest::Method::GET, "/admin/audit?action=redaction.", None)
        .await;
    let entries = log.as_array().unwrap();
    assert!(
        entries.iter().any(|e| e["action"] == "redaction.mask"
            && e["detail"]["detector"] == "email"
            && e["detail"]["count"] == 4
            && e["subject"] == id.as_str()),
        "{log}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "redaction.reject" && e["detail"]["detector"] == "ssn"),
        "{log}"
    );
    assert!(!log.to_string().contains("bob@example.org") && !log.to_string().contains("6789"));
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(
            "tollgate_redactions_total{detector=\"email\",action=\"mask\",place=\"request\"}"
        ),
        "{metrics}"
    );
}

async fn mock_requests(gw: &TestGateway) -> u64 {
    let m = gw.metrics().await;
    m.lines()
        .filter(|l| l.starts_with("tollgate_upstream_attempts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

const RAW: [&str; 5] = [
    "jane.doe@example.com",
    "415 555 2671",
    "4111 1111 1111 1111",
    "DE89 3704",
    "AKIAIOSFODNN7EXAMPLE",
];

fn assert_masked(text: &str, what: &str) {
    for raw in RAW {
        assert!(
            !text.contains(raw),
            "{what}: {raw} reached the agent: {text}"
        );
    }
    // `reject` masks in answers: the text was generated and billed.
    for mask in ["<EMAIL_1>", "<PHONE_1>", "<CARD_", "<IBAN_1>", "<SECRET_1>"] {
        assert!(text.contains(mask), "{what}: {mask} missing: {text}");
    }
    assert!(
        text.starts_with("Reach Jane at ") && text.ends_with("."),
        "{what}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_full_of_personal_data_reaches_the_agent_masked_json_and_streamed() {
    let gw = gateway(true).await;
    let (key, _) = gw.create_key(json!({"name": "pii-reader"})).await;
    let r = post(
        &gw,
        &key,
        "/v1/chat/completions",
        json!({"model": "mock-pii", "messages": user("who?")}),
    )
    .await;
    assert_masked(&chat_text(&r.json().await.unwrap()), "chat json");

    // Chat stream: every value is split across events (the mock cuts every 5 characters).
    let events = sse_data(
        post(
            &gw,
            &key,
            "/v1/chat/completions",
            json!({"model": "mock-pii", "stream": true, "messages": user("who?")}),
        )
        .await,
    )
    .await;
    let text: String = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_masked(&text, "chat stream");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));

    // Messages stream.
    let events = sse_data(post(&gw, &key, "/v1/messages",
        json!({"model": "mock-pii", "max_tokens": 64, "stream": true, "messages": user("who?")})).await).await;
    let parsed = parse_events(&events);
    let text: String = parsed
        .iter()
        .filter_map(|v| v["delta"]["text"].as_str())
        .collect();
    assert_masked(&text, "messages stream");
    let stop = parsed
        .iter()
        .position(|v| v["type"] == "content_block_stop")
        .unwrap();
    let last_delta = parsed
        .iter()
        .rposition(|v| v["type"] == "content_block_delta")
        .unwrap();
    assert!(
        last_delta < stop,
        "the held text is sent before its block stops"
    );

    // Responses stream: deltas, the closing events that repeat the text, and numbering.
    let events = sse_data(
        post(
            &gw,
            &key,
            "/v1/responses",
            json!({"model": "mock-pii", "stream": true, "input": "who?"}),
        )
        .await,
    )
    .await;
    let parsed = parse_events(&events);
    let text: String = parsed
        .iter()
        .filter(|v| v["type"] == "response.output_text.delta")
        .filter_map(|v| v["delta"].as_str())
        .collect();
    assert_masked(&text, "responses stream");
    let done = parsed
        .iter()
        .find(|v| v["type"] == "response.completed")
        .unwrap();
    assert_eq!(
        done["response"]["output"][0]["content"][0]["text"],
        text.as_str()
    );
    for raw in RAW {
        assert!(!events.concat().contains(raw), "{raw} in {events:?}");
    }
    let seq: Vec<u64> = parsed
        .iter()
        .map(|v| v["sequence_number"].as_u64().unwrap())
        .collect();
    assert_eq!(seq, (0..seq.len() as u64).collect::<Vec<_>>());
    // And the counts are on the record's audit entries, once per finding.
    let id = {
        let r = post(
            &gw,
            &key,
            "/v1/responses",
            json!({"model": "mock-pii", "stream": true, "input": "who?"}),
        )
        .await;
        let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
        let _ = r.text().await;
        id
    };
    wait_record(&gw, &id).await;
    let (_, log) = gw
        .admin(
            reqwest::Method::GET,
            &format!("/admin/audit?subject={id}"),
            None,
        )
        .await;
    let email = log
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["detail"]["detector"] == "email")
        .unwrap_or_else(|| panic!("{log}"));
    assert_eq!(email["detail"]["count"], 1, "{log}");
    assert_eq!(email["detail"]["place"], "answer");
}

/// A model's tool call whose arguments carry personal data, streamed in pieces: the agent gets
/// the arguments masked and still valid JSON, in each dialect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_tool_calls_arguments_reach_the_agent_masked() {
    let gw = gateway(true).await;
    let (key, _) = gw.create_key(json!({"name": "pii-tools"})).await;
    let schema = json!({"type": "object", "required": ["to", "card"], "properties": {
        "to": {"type": "string", "const": "jane.doe@example.com"},
        "card": {"type": "string", "const": "4111 1111 1111 1111"}}});
    let check = |args: &str, what: &str| {
        let v: Value = serde_json::from_str(args).unwrap_or_else(|e| panic!("{what}: {e}: {args}"));
        assert_eq!(v["to"], "<EMAIL_1>", "{what}: {args}");
        assert!(
            v["card"].as_str().unwrap().starts_with("<CARD_"),
            "{what}: {args}"
        );
    };
    let events = sse_data(
        post(
            &gw,
            &key,
            "/v1/chat/completions",
            json!({"model": "mock", "stream": true,
        "tools": [{"type": "function", "function": {"name": "send", "parameters": schema}}],
        "messages": user("use send")}),
        )
        .await,
    )
    .await;
    let args: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    check(&args, "chat");
    let events = sse_data(
        post(
            &gw,
            &key,
            "/v1/messages",
            json!({"model": "mock", "stream": true, "max_tokens": 64,
        "tools": [{"name": "send", "input_schema": schema}], "messages": user("use send")}),
        )
        .await,
    )
    .await;
    let args: String = events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| v["delta"]["partial_json"].as_str().map(str::to_string))
        .collect();
    check(&args, "messages");
    let events = sse_data(post(&gw, &key, "/v1/responses", json!({"model": "mock", "stream": true,
        "tools": [{"type": "function", "name": "send", "parameters": schema}], "input": "use send"})).await).await;
    let parsed = parse_events(&events);
    let args: String = parsed
        .iter()
        .filter(|v| v["type"] == "response.function_call_arguments.delta")
        .filter_map(|v| v["delta"].as_str())
        .collect();
    check(&args, "responses deltas");
    let done = parsed
        .iter()
        .find(|v| v["type"] == "response.completed")
        .unwrap();
    check(
        done["response"]["output"][0]["arguments"].as_str().unwrap(),
        "responses completed",
    );
    assert!(!events.concat().contains("jane.doe"), "{events:?}");
}
