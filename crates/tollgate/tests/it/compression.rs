//! Tool-output compression, end to end: real tool outputs from the corpus
//! (bench/corpus/tool-outputs) in a conversation, what the provider was sent (the mock's
//! `echoall` answers with it), the savings on the record priced at the input price, and the
//! same result compressing to the same text on a later turn.

use crate::harness::*;
use serde_json::{json, Value};
use tollgate::metering::UsageRecord;

const CARGO_TEST: &str = include_str!("../../../../bench/corpus/tool-outputs/cargo-test-color.txt");
const API_JSON: &str = include_str!("../../../../bench/corpus/tool-outputs/api-metadata.json");
const SERVICE_LOG: &str = include_str!("../../../../bench/corpus/tool-outputs/service-log.txt");
const LS: &str = include_str!("../../../../bench/corpus/tool-outputs/ls-la.txt");

fn config(up: &str, compression: &str) -> String {
    format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n\
         [[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{up}\"\nmodels = [\"claude*\"]\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 2000000\noutput = 8000000\n\
         [compression]\nenabled = true\nkeys = [\"squeezed*\"]\n{compression}"
    )
}

fn call(id: &str) -> Value {
    json!({"id": id, "type": "function", "function": {"name": "run", "arguments": "{}"}})
}

/// A Chat conversation whose last turn hands back four tool results.
fn chat_turn() -> Vec<Value> {
    vec![
        json!({"role": "user", "content": "run the tests, fetch the metadata, read the log"}),
        json!({"role": "assistant", "content": null,
               "tool_calls": [call("c1"), call("c2"), call("c3"), call("c4")]}),
        json!({"role": "tool", "tool_call_id": "c1", "content": CARGO_TEST}),
        json!({"role": "tool", "tool_call_id": "c2", "content": API_JSON}),
        json!({"role": "tool", "tool_call_id": "c3", "content": [{"type": "text", "text": SERVICE_LOG}]}),
        json!({"role": "tool", "tool_call_id": "c4", "content": API_JSON}),
    ]
}

/// What the provider was sent: the conversation the mock echoes back.
fn seen(answer: &Value) -> Vec<Value> {
    let text = answer["choices"][0]["message"]["content"].as_str().unwrap();
    serde_json::from_str(text).unwrap()
}

fn tool_text(m: &Value) -> String {
    match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts[0]["text"].as_str().unwrap().to_string(),
        other => panic!("{other}"),
    }
}

#[tokio::test]
async fn chat_tool_results_reach_the_provider_compressed_with_the_savings_priced() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let (squeezed, _) = gw.create_key(json!({"name": "squeezed-1"})).await;
    let (plain, _) = gw.create_key(json!({"name": "plain"})).await;
    let body = json!({"model": "mock-echoall", "messages": chat_turn()});

    let r = gw.chat(&squeezed, body.clone()).await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(r.headers()).await;
    let sent = seen(&r.json().await.unwrap());
    assert!(CARGO_TEST.contains('\u{1b}'));
    let c1 = tool_text(&sent[2]);
    assert!(!c1.contains('\u{1b}'), "escapes removed: {c1:?}");
    assert!(c1.contains("test result: ok."), "the text stays: {c1}");
    let c2 = tool_text(&sent[3]);
    assert!(c2.len() < API_JSON.len() * 3 / 4, "minified");
    assert_eq!(
        serde_json::from_str::<Value>(&c2).unwrap(),
        serde_json::from_str::<Value>(API_JSON).unwrap(),
        "the same JSON"
    );
    let c3 = tool_text(&sent[4]);
    assert!(
        c3.contains("[previous line repeated 119 more times]"),
        "{c3}"
    );
    assert_eq!(
        tool_text(&sent[5]),
        "[tollgate: this output is identical to the earlier tool result of call c2]"
    );
    assert_eq!(
        sent[0]["content"],
        chat_turn()[0]["content"],
        "user text untouched"
    );

    let by: std::collections::BTreeMap<_, _> = rec
        .savings
        .iter()
        .map(|s| (s.saver.as_str(), (s.tokens, s.micros)))
        .collect();
    let names: Vec<_> = by.keys().copied().collect();
    assert_eq!(
        names,
        [
            "compress.ansi",
            "compress.dedupe",
            "compress.json",
            "compress.repeats"
        ]
    );
    for (saver, (tokens, micros)) in &by {
        assert!(*tokens > 0, "{saver}");
        // $2 per million input tokens: 2 micro-USD a token.
        assert_eq!(*micros, tokens * 2, "{saver}");
    }

    // The same request from a key compression does not cover: sent whole, nothing saved.
    let r = gw.chat(&plain, body.clone()).await;
    let whole = gw.record_for(r.headers()).await;
    let sent_whole = seen(&r.json().await.unwrap());
    assert_eq!(tool_text(&sent_whole[2]), CARGO_TEST);
    assert!(whole.savings.is_empty());
    // Before and after, as the provider counted them.
    assert!(
        rec.input_tokens * 3 < whole.input_tokens * 2,
        "{} vs {}",
        rec.input_tokens,
        whole.input_tokens
    );

    // The next turn: the earlier results compress to exactly what the provider saw before,
    // so its prompt cache still matches them.
    let mut next = chat_turn();
    next.push(json!({"role": "assistant", "content": "Tests pass; the log shows retries."}));
    next.push(json!({"role": "user", "content": "and the listing?"}));
    next.push(json!({"role": "assistant", "content": null, "tool_calls": [call("c5")]}));
    next.push(json!({"role": "tool", "tool_call_id": "c5", "content": LS}));
    let r = gw
        .chat(
            &squeezed,
            json!({"model": "mock-echoall", "messages": next}),
        )
        .await;
    let sent_next = seen(&r.json().await.unwrap());
    for i in 0..6 {
        assert_eq!(sent_next[i], sent[i], "message {i} changed between turns");
    }
    assert_eq!(
        tool_text(&sent_next[9]),
        LS,
        "nothing lossless to do on a listing"
    );

    let (_, report) = gw
        .admin(reqwest::Method::GET, "/admin/savings?by=saver", None)
        .await;
    let savers: Vec<_> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["group"].as_str().unwrap().to_string())
        .collect();
    assert!(savers.contains(&"compress.json".to_string()), "{report}");
    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_saved_tokens_total{saver=\"compress.json\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn tool_results_are_compressed_in_messages_and_responses_too() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let (key, _) = gw.create_key(json!({"name": "squeezed-2"})).await;

    let messages = json!({"model": "claude-echoall", "max_tokens": 64, "messages": [
        {"role": "user", "content": "run them"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "run", "input": {}},
                                            {"type": "tool_use", "id": "t2", "name": "run", "input": {}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t1", "content": CARGO_TEST},
            {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": API_JSON}]}
        ]}
    ]});
    let r = post_api(&gw, &key, "/v1/messages", messages).await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(r.headers()).await;
    let answer: Value = r.json().await.unwrap();
    let text = answer["content"][0]["text"].as_str().unwrap();
    let sent: Value = serde_json::from_str(text).unwrap();
    let blocks = &sent[2]["content"];
    assert!(!blocks[0]["content"].as_str().unwrap().contains('\u{1b}'));
    let json_text = blocks[1]["content"][0]["text"].as_str().unwrap();
    assert!(json_text.len() < API_JSON.len() * 3 / 4);
    assert!(rec.savings.iter().any(|s| s.saver == "compress.ansi"));
    assert!(rec.savings.iter().any(|s| s.saver == "compress.json"));

    let responses = json!({"model": "mock-echoall", "input": [
        {"role": "user", "content": "run it"},
        {"type": "function_call", "call_id": "f1", "name": "run", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "f1", "output": SERVICE_LOG}
    ]});
    let r = post_api(&gw, &key, "/v1/responses", responses).await;
    assert_eq!(r.status(), 200);
    let rec = gw.record_for(r.headers()).await;
    let answer: Value = r.json().await.unwrap();
    let text = answer["output"][0]["content"][0]["text"].as_str().unwrap();
    let sent: Value = serde_json::from_str(text).unwrap();
    assert!(sent[2]["output"]
        .as_str()
        .unwrap()
        .contains("[previous line repeated 119 more times]"));
    assert_eq!(rec.savings[0].saver, "compress.repeats");
}

/// A directory listing as the last tool result: what the provider saw of it, and the record.
async fn listing(gw: &TestGateway, key: &str) -> (String, UsageRecord) {
    let body = json!({"model": "mock-echoall", "messages": [
        {"role": "user", "content": "list it"},
        {"role": "assistant", "content": null, "tool_calls": [call("c1")]},
        {"role": "tool", "tool_call_id": "c1", "content": LS}
    ]});
    let r = gw.chat(key, body).await;
    let rec = gw.record_for(r.headers()).await;
    (tool_text(&seen(&r.json().await.unwrap())[2]), rec)
}

#[tokio::test]
async fn truncation_cuts_the_middle_only_when_configured() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let (key, _) = gw.create_key(json!({"name": "squeezed-3"})).await;
    let (text, _) = listing(&gw, &key).await;
    assert_eq!(text, LS, "lossless only by default");
    drop(gw);

    let gw = TestGateway::start(&config(&up, "max_tool_tokens = 1000\n")).await;
    let (key, _) = gw.create_key(json!({"name": "squeezed-3"})).await;
    let (text, rec) = listing(&gw, &key).await;
    let first_line = LS.lines().next().unwrap();
    let last_line = LS.lines().last().unwrap();
    assert!(text.starts_with(first_line), "the head stays");
    assert!(text.contains(last_line), "the tail stays");
    assert!(text.contains("tollgate cut"), "{text}");
    assert!(text.len() < LS.len() / 3);
    let cut = rec
        .savings
        .iter()
        .find(|s| s.saver == "compress.truncate")
        .unwrap();
    assert!(cut.tokens > 5000, "{cut:?}");
}
