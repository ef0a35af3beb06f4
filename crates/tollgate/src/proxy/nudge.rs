//! The loop guard's `nudge`: instead of an error the agent's SDK may retry or its framework
//! may swallow, an ordinary, well-formed answer in the caller's dialect (JSON or stream) whose
//! text tells the model it is repeating itself. The agent's own loop reads it as the model's
//! turn, and the model sees it in its context on the next one. No upstream call, no cost.

use super::endpoint::Endpoint;
use axum::body::Bytes;
use serde_json::{json, Value};

/// What the model is told, after the guard's own finding.
pub(crate) fn text(finding: &str) -> String {
    format!(
        "[tollgate] This request was not sent to the model: {finding} Do not repeat the same call; take a different approach, or stop and report what is blocking you."
    )
}

/// The answer's content type and body for `endpoint`, as its provider would have sent it.
pub(crate) fn answer(
    endpoint: Endpoint,
    model: &str,
    id: &str,
    created: u64,
    stream: bool,
    include_usage: bool,
    text: &str,
) -> (&'static str, Bytes) {
    let body = match (endpoint, stream) {
        (Endpoint::Messages, false) => messages_json(model, id, text).to_string(),
        (Endpoint::Messages, true) => messages_stream(model, id, text),
        (Endpoint::Responses, false) => responses_json(model, id, created, text).to_string(),
        (Endpoint::Responses, true) => responses_stream(model, id, created, text),
        (_, false) => chat_json(model, id, created, text).to_string(),
        (_, true) => chat_stream(model, id, created, include_usage, text),
    };
    let content_type = if stream {
        "text/event-stream; charset=utf-8"
    } else {
        "application/json"
    };
    (content_type, Bytes::from(body))
}

fn chat_json(model: &str, id: &str, created: u64, text: &str) -> Value {
    json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})
}

fn chat_stream(model: &str, id: &str, created: u64, include_usage: bool, text: &str) -> String {
    let chunk = |delta: Value, finish: Value| {
        let c = json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]});
        format!("data: {c}\n\n")
    };
    let mut out = chunk(json!({"role": "assistant", "content": text}), Value::Null);
    out.push_str(&chunk(json!({}), json!("stop")));
    if include_usage {
        let u = json!({"id": format!("chatcmpl-{id}"), "object": "chat.completion.chunk", "created": created,
            "model": model, "choices": [],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}});
        out.push_str(&format!("data: {u}\n\n"));
    }
    out.push_str("data: [DONE]\n\n");
    out
}

fn messages_json(model: &str, id: &str, text: &str) -> Value {
    json!({"id": format!("msg_{id}"), "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 0, "output_tokens": 0}})
}

fn messages_stream(model: &str, id: &str, text: &str) -> String {
    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut start = messages_json(model, id, "");
    start["content"] = json!([]);
    start["stop_reason"] = Value::Null;
    [
        ev(
            "message_start",
            json!({"type": "message_start", "message": start}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ),
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}),
        ),
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        ev(
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
                "usage": {"input_tokens": 0, "output_tokens": 0}}),
        ),
        ev("message_stop", json!({"type": "message_stop"})),
    ]
    .concat()
}

fn responses_item(id: &str, text: &str) -> Value {
    json!({"type": "message", "id": format!("msg_{id}"), "status": "completed", "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}]})
}

fn responses_json(model: &str, id: &str, created: u64, text: &str) -> Value {
    json!({"id": format!("resp_{id}"), "object": "response", "created_at": created, "status": "completed",
        "model": model, "output": [responses_item(id, text)], "error": null, "incomplete_details": null,
        "usage": {"input_tokens": 0, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 0}})
}

fn responses_stream(model: &str, id: &str, created: u64, text: &str) -> String {
    let mut out = String::new();
    let item_id = format!("msg_{id}");
    let mut in_progress = responses_json(model, id, created, text);
    in_progress["status"] = json!("in_progress");
    in_progress["output"] = json!([]);
    in_progress["usage"] = Value::Null;
    let part = |t: &str| json!({"type": "output_text", "text": t, "annotations": []});
    let events = [
        ("response.created", json!({"response": in_progress})),
        (
            "response.output_item.added",
            json!({"output_index": 0, "item": {"type": "message", "id": item_id, "status": "in_progress",
                "role": "assistant", "content": []}}),
        ),
        (
            "response.content_part.added",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part("")}),
        ),
        (
            "response.output_text.delta",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": text}),
        ),
        (
            "response.output_text.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": text}),
        ),
        (
            "response.content_part.done",
            json!({"item_id": item_id, "output_index": 0, "content_index": 0, "part": part(text)}),
        ),
        (
            "response.output_item.done",
            json!({"output_index": 0, "item": responses_item(id, text)}),
        ),
        (
            "response.completed",
            json!({"response": responses_json(model, id, created, text)}),
        ),
    ];
    for (seq, (name, mut data)) in events.into_iter().enumerate() {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq);
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }
    out
}
