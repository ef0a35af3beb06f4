#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Golden tests: each fixture translated, one snapshot per direction (insta). Review a changed
//! snapshot with `cargo insta review`, or `INSTA_UPDATE=always cargo test` and `git diff`.

use serde_json::Value;
use tollgate_proto::translate::{
    chat_request_to_messages, chat_request_to_messages_with, chat_response_to_messages,
    messages_request_to_chat, messages_request_to_chat_with, messages_response_to_chat,
    ChatToMessagesStream, FieldPolicy, MessagesToChatStream, Policy,
};
use tollgate_proto::SseSplitter;

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/translate/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

fn pretty(bytes: &[u8]) -> String {
    serde_json::to_string_pretty(&serde_json::from_slice::<Value>(bytes).unwrap()).unwrap()
}

#[test]
fn chat_request_to_messages_golden() {
    for name in ["chat_basic", "chat_tools", "chat_images"] {
        let out = chat_request_to_messages(&fixture(&format!("{name}.json")), "claude-sonnet-4-5")
            .unwrap();
        insta::assert_snapshot!(format!("{name}.to_messages"), pretty(&out));
    }
}

#[test]
fn messages_response_to_chat_golden() {
    for name in ["messages_text", "messages_tool_use"] {
        let out =
            messages_response_to_chat(&fixture(&format!("{name}.json")), 1_700_000_000).unwrap();
        insta::assert_snapshot!(format!("{name}.to_chat"), pretty(&out));
    }
}

/// The stream translation does not depend on how the network chunks the upstream stream.
#[test]
fn messages_stream_to_chat_golden() {
    for name in ["messages_stream_text", "messages_stream_tools"] {
        let bytes = fixture(&format!("{name}.sse"));
        let mut outputs = Vec::new();
        for chunk_size in [bytes.len(), 7, 1] {
            let mut splitter = SseSplitter::new();
            let mut t = MessagesToChatStream::new(1_700_000_000, true);
            let mut events = Vec::new();
            let mut out = String::new();
            for chunk in bytes.chunks(chunk_size) {
                splitter.push(chunk, &mut events);
                for ev in events.drain(..) {
                    out.push_str(&t.on_event(&ev));
                }
            }
            outputs.push(out);
        }
        assert!(outputs.windows(2).all(|w| w[0] == w[1]));
        assert!(outputs[0].ends_with("data: [DONE]\n\n"));
        insta::assert_snapshot!(format!("{name}.to_chat"), outputs[0]);
    }
}

#[test]
fn messages_request_to_chat_golden() {
    for name in ["messages_basic", "messages_tools"] {
        let out = messages_request_to_chat(&fixture(&format!("{name}.json")), "gpt-4.1").unwrap();
        insta::assert_snapshot!(format!("{name}.to_chat"), pretty(&out));
    }
}

#[test]
fn chat_response_to_messages_golden() {
    for name in ["chat_text", "chat_tool_calls"] {
        let out = chat_response_to_messages(&fixture(&format!("{name}.json"))).unwrap();
        insta::assert_snapshot!(format!("{name}.to_messages"), pretty(&out));
    }
}

#[test]
fn chat_stream_to_messages_golden() {
    let bytes = fixture("chat_stream_tools.sse");
    let mut outputs = Vec::new();
    for chunk_size in [bytes.len(), 5, 1] {
        let mut splitter = SseSplitter::new();
        let mut t = ChatToMessagesStream::new();
        let mut events = Vec::new();
        let mut out = String::new();
        for chunk in bytes.chunks(chunk_size) {
            splitter.push(chunk, &mut events);
            for ev in events.drain(..) {
                out.push_str(&t.on_event(&ev));
            }
        }
        outputs.push(out);
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    assert!(outputs[0].ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n"));
    insta::assert_snapshot!("chat_stream_tools.to_messages", outputs[0]);
}

#[test]
fn untranslatable_messages_fields_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"model":"m","max_tokens":5,"container":"c1","messages":[{"role":"user","content":"x"}]}"#,
            "container",
        ),
        (
            r#"{"model":"m","max_tokens":5,"mcp_servers":[{"type":"url","url":"https://x"}],"messages":[{"role":"user","content":"x"}]}"#,
            "mcp_servers",
        ),
        (
            r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"document","source":{}}]}]}"#,
            "messages[0].content[0].type",
        ),
        (
            r#"{"model":"m","max_tokens":5,"tools":[{"type":"web_search_20250305","name":"web_search"}],"messages":[{"role":"user","content":"x"}]}"#,
            "tools[0].type",
        ),
        (
            r#"{"model":"m","max_tokens":5,"stop_sequences":["a","b","c","d","e"],"messages":[{"role":"user","content":"x"}]}"#,
            "stop_sequences",
        ),
    ];
    for (body, field) in cases {
        let e = messages_request_to_chat(body.as_bytes(), "gpt").unwrap_err();
        assert_eq!(e.field, *field, "{body}");
        // The message names the dialect it was translating for.
        assert!(e.to_string().contains("Chat Completions"), "{e}");
    }
}

/// What Claude Code sends on every request (2.1.x): the built-in policy lets it through an
/// OpenAI-compatible deployment and names what it left out; `map` carries the reasoning
/// level; `reject` refuses with the field's name.
#[test]
fn claude_code_fields_follow_their_policy() {
    let body = br#"{"model":"m","max_tokens":32000,"stream":true,
        "thinking":{"type":"adaptive","display":"omitted"},
        "context_management":{"edits":[{"type":"clear_thinking_20251015","keep":"all"}]},
        "output_config":{"effort":"high"},
        "messages":[{"role":"user","content":[{"type":"text","text":"hi","cache_control":{"type":"ephemeral"}}]},
            {"role":"system","content":[{"type":"text","text":"be brief"}]}]}"#;
    let t = messages_request_to_chat_with(body, "gpt", &Policy::default()).unwrap();
    let v: Value = serde_json::from_slice(&t.body).unwrap();
    assert_eq!(
        t.dropped,
        ["context_management", "output_config.effort", "thinking"]
    );
    assert!(v.get("reasoning_effort").is_none(), "{v}");
    assert_eq!(
        v["messages"][1],
        serde_json::json!({"role": "system", "content": "be brief"})
    );

    let mut map = Policy::default();
    map.fields.insert("thinking".into(), FieldPolicy::Map);
    map.fields
        .insert("output_config.effort".into(), FieldPolicy::Map);
    let t = messages_request_to_chat_with(body, "gpt", &map).unwrap();
    let v: Value = serde_json::from_slice(&t.body).unwrap();
    assert_eq!(
        v["reasoning_effort"], "high",
        "explicit effort wins over adaptive thinking"
    );
    assert_eq!(t.dropped, ["context_management"]);

    let mut reject = Policy::default();
    reject
        .fields
        .insert("context_management".into(), FieldPolicy::Reject);
    let e = messages_request_to_chat_with(body, "gpt", &reject).unwrap_err();
    assert_eq!(e.field, "context_management");

    let drop_unknown = Policy {
        unknown: Some(FieldPolicy::Drop),
        ..Policy::default()
    };
    let body = br#"{"model":"m","max_tokens":5,"container":"c","messages":[{"role":"user","content":"x"}]}"#;
    let t = messages_request_to_chat_with(body, "gpt", &drop_unknown).unwrap();
    assert_eq!(t.dropped, ["container"]);
}

/// The other way: `reasoning_effort` becomes a thinking budget below `max_tokens`, or is
/// dropped (and said) where Anthropic could not take it.
#[test]
fn reasoning_effort_maps_to_a_thinking_budget() {
    let mut map = Policy::default();
    map.fields
        .insert("reasoning_effort".into(), FieldPolicy::Map);
    let ask = |extra: &str| {
        format!(
            r#"{{"model":"m","reasoning_effort":"medium"{extra},"messages":[{{"role":"user","content":"x"}}]}}"#
        )
    };
    let t = chat_request_to_messages_with(ask("").as_bytes(), "claude", &map).unwrap();
    let v: Value = serde_json::from_slice(&t.body).unwrap();
    assert_eq!(
        v["thinking"],
        serde_json::json!({"type": "enabled", "budget_tokens": 4095}),
        "{v}"
    );
    let t = chat_request_to_messages_with(
        ask(r#","max_completion_tokens":20000"#).as_bytes(),
        "claude",
        &map,
    )
    .unwrap();
    let v: Value = serde_json::from_slice(&t.body).unwrap();
    assert_eq!(v["thinking"]["budget_tokens"], 8192);
    let t = chat_request_to_messages_with(ask(r#","max_tokens":500"#).as_bytes(), "claude", &map)
        .unwrap();
    assert_eq!(t.dropped, ["reasoning_effort"]);
    let t =
        chat_request_to_messages_with(ask("").as_bytes(), "claude", &Policy::default()).unwrap();
    let v: Value = serde_json::from_slice(&t.body).unwrap();
    assert!(v.get("thinking").is_none());
    assert_eq!(t.dropped, ["reasoning_effort"]);
    let e = chat_request_to_messages(
        br#"{"model":"m","logit_bias":{"1":2},"messages":[{"role":"user","content":"x"}]}"#,
        "claude",
    )
    .unwrap_err();
    assert!(e.to_string().contains("an Anthropic deployment"), "{e}");
}

#[test]
fn untranslatable_fields_are_named() {
    let cases: &[(&str, &str)] = &[
        (
            r#"{"model":"m","n":2,"messages":[{"role":"user","content":"x"}]}"#,
            "n",
        ),
        (
            r#"{"model":"m","response_format":{"type":"json_object"},"messages":[{"role":"user","content":"x"}]}"#,
            "response_format.type",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"a"},{"type":"input_audio","input_audio":{}}]}]}"#,
            "messages[0].content[1].type",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f","parameters":{"type":"array"}}}]}"#,
            "tools[0].function.parameters",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"custom","custom":{}}]}"#,
            "tools[0].type",
        ),
        (
            r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{oops"}}]}]}"#,
            "messages[0].tool_calls[0].function.arguments",
        ),
        (
            r#"{"model":"m","temperature":1.5,"messages":[{"role":"user","content":"x"}]}"#,
            "temperature",
        ),
        (
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:image/tiff;base64,AAAA"}}]}]}"#,
            "messages[0].content[0].image_url.url",
        ),
        (r#"{"model":"m","messages":[]}"#, "messages"),
    ];
    for (body, field) in cases {
        let e = chat_request_to_messages(body.as_bytes(), "claude").unwrap_err();
        assert_eq!(e.field, *field, "{body}");
        assert!(e.to_string().contains(field));
    }
}
