//! Translation between OpenAI Chat Completions and Anthropic Messages, so a Chat
//! Completions client can be served by an Anthropic deployment.
//!
//! The rule: what can be carried across is carried exactly; what cannot is a
//! `TranslateError` naming the field, never a silent drop. Fields that change nothing about
//! the answer (`store`, `metadata`, `stream_options`) are dropped knowingly.

use crate::sse::SseEvent;
use crate::usage::AnthropicUsage;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Anthropic requires `max_tokens`; Chat Completions does not. Used when the client gave none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateError {
    /// The request field that cannot be carried, as a JSON path (`messages[2].content[0].type`).
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "'{}' cannot be translated for an Anthropic deployment: {}",
            self.field, self.reason
        )
    }
}

impl std::error::Error for TranslateError {}

fn err(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    TranslateError {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Chat Completions request → Messages request for `model`.
pub fn chat_request_to_messages(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    let req: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| err("$", e.to_string()))?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut max_tokens = None;
    let mut tool_choice: Option<Value> = None;
    let mut parallel_tool_calls = None;

    for (k, v) in &req {
        match k.as_str() {
            "model" | "store" | "metadata" | "stream_options" => {}
            "messages" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err("messages", "must be an array"))?;
                for (i, m) in list.iter().enumerate() {
                    translate_message(i, m, &mut system, &mut messages)?;
                }
            }
            "max_tokens" | "max_completion_tokens" => {
                if !v.is_null() {
                    let n = v
                        .as_u64()
                        .ok_or_else(|| err(k.as_str(), "must be a non-negative integer"))?;
                    // max_completion_tokens wins, as at OpenAI.
                    if k == "max_completion_tokens" || max_tokens.is_none() {
                        max_tokens = Some(n);
                    }
                }
            }
            "temperature" | "top_p" => {
                if !v.is_null() {
                    let x = v
                        .as_f64()
                        .ok_or_else(|| err(k.as_str(), "must be a number"))?;
                    // OpenAI allows temperature up to 2, Anthropic up to 1.
                    if k == "temperature" && x > 1.0 {
                        return Err(err("temperature", "Anthropic accepts 0 to 1"));
                    }
                    out.insert(k.clone(), v.clone());
                }
            }
            "stop" => match v {
                Value::Null => {}
                Value::String(s) => {
                    out.insert("stop_sequences".into(), json!([s]));
                }
                Value::Array(a) if a.iter().all(Value::is_string) => {
                    out.insert("stop_sequences".into(), v.clone());
                }
                _ => return Err(err("stop", "must be a string or an array of strings")),
            },
            "stream" => {
                out.insert("stream".into(), v.clone());
            }
            "tools" => {
                if !v.is_null() {
                    out.insert("tools".into(), translate_tools(v)?);
                }
            }
            "tool_choice" => tool_choice = Some(v.clone()),
            "parallel_tool_calls" => parallel_tool_calls = v.as_bool(),
            "user" => {
                if let Some(u) = v.as_str() {
                    out.insert("metadata".into(), json!({ "user_id": u }));
                }
            }
            "n" if v.is_null() || v.as_u64() == Some(1) => {}
            "frequency_penalty" | "presence_penalty" if v.is_null() || v.as_f64() == Some(0.0) => {}
            "logprobs" if v.is_null() || v == &Value::Bool(false) => {}
            "service_tier"
                if v.is_null() || v.as_str().is_some_and(|s| s == "auto" || s == "default") => {}
            other => {
                return Err(err(other, "Anthropic's Messages API has no equivalent"));
            }
        }
    }
    if messages.is_empty() {
        return Err(err(
            "messages",
            "needs at least one user or assistant message",
        ));
    }
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    out.insert("messages".into(), Value::Array(messages));
    out.insert(
        "max_tokens".into(),
        json!(max_tokens.unwrap_or(DEFAULT_MAX_TOKENS)),
    );
    if let Some(choice) = tool_choice {
        let mut c = match &choice {
            Value::Null => None,
            Value::String(s) if s == "auto" => Some(json!({"type": "auto"})),
            Value::String(s) if s == "none" => Some(json!({"type": "none"})),
            Value::String(s) if s == "required" => Some(json!({"type": "any"})),
            Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("function") => {
                let name = choice
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err("tool_choice.function.name", "is required"))?;
                Some(json!({"type": "tool", "name": name}))
            }
            _ => {
                return Err(err(
                    "tool_choice",
                    "must be auto, none, required or a function",
                ))
            }
        };
        if let (Some(c), Some(false)) = (c.as_mut(), parallel_tool_calls) {
            if c["type"] != "none" {
                c["disable_parallel_tool_use"] = json!(true);
            }
        }
        if let Some(c) = c {
            out.insert("tool_choice".into(), c);
        }
    } else if parallel_tool_calls == Some(false) && out.contains_key("tools") {
        out.insert(
            "tool_choice".into(),
            json!({"type": "auto", "disable_parallel_tool_use": true}),
        );
    }
    serde_json::to_vec(&Value::Object(out)).map_err(|e| err("$", e.to_string()))
}

fn text_of(path: &str, content: &Value) -> Result<String, TranslateError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut out = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        out.push_str(p.get("text").and_then(Value::as_str).unwrap_or(""))
                    }
                    other => {
                        return Err(err(
                            format!("{path}[{j}].type"),
                            format!("{other:?} parts are not allowed here, only text"),
                        ))
                    }
                }
            }
            Ok(out)
        }
        Value::Null => Ok(String::new()),
        _ => Err(err(path, "must be a string or an array of parts")),
    }
}

fn content_blocks(path: &str, content: &Value) -> Result<Vec<Value>, TranslateError> {
    match content {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Null => Ok(Vec::new()),
        Value::Array(parts) => {
            let mut out = Vec::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("text") => out.push(json!({"type": "text", "text": p.get("text").cloned().unwrap_or(json!(""))})),
                    Some("image_url") => {
                        let url = p
                            .pointer("/image_url/url")
                            .and_then(Value::as_str)
                            .ok_or_else(|| err(format!("{path}[{j}].image_url.url"), "is required"))?;
                        out.push(image_block(&format!("{path}[{j}].image_url.url"), url)?);
                    }
                    other => {
                        return Err(err(format!("{path}[{j}].type"), format!("{other:?} content has no Anthropic equivalent")))
                    }
                }
            }
            Ok(out)
        }
        _ => Err(err(path, "must be a string or an array of parts")),
    }
}

/// `data:` URLs become base64 sources; http(s) URLs become URL sources.
fn image_block(path: &str, url: &str) -> Result<Value, TranslateError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let (meta, data) = rest
            .split_once(',')
            .ok_or_else(|| err(path, "malformed data URL"))?;
        let media_type = meta
            .strip_suffix(";base64")
            .ok_or_else(|| err(path, "only base64 data URLs are supported"))?;
        if !matches!(
            media_type,
            "image/jpeg" | "image/png" | "image/gif" | "image/webp"
        ) {
            return Err(err(
                path,
                format!("image type {media_type} is not supported by Anthropic"),
            ));
        }
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media_type, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(err(path, "must be a data: URL or an http(s) URL"))
}

/// Appends to the last message when it has the same role, because Anthropic requires
/// user and assistant turns to alternate (several tool results form one user turn).
fn push_turn(messages: &mut Vec<Value>, role: &str, blocks: Vec<Value>) {
    if let Some(last) = messages.last_mut() {
        if last["role"] == role {
            if let Some(arr) = last["content"].as_array_mut() {
                arr.extend(blocks);
                return;
            }
        }
    }
    messages.push(json!({"role": role, "content": blocks}));
}

fn translate_message(
    i: usize,
    m: &Value,
    system: &mut Vec<Value>,
    messages: &mut Vec<Value>,
) -> Result<(), TranslateError> {
    let path = format!("messages[{i}]");
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{path}.role"), "is required"))?;
    let content = m.get("content").unwrap_or(&Value::Null);
    match role {
        "system" | "developer" => {
            let text = text_of(&format!("{path}.content"), content)?;
            system.push(json!({"type": "text", "text": text}));
        }
        "user" => {
            let blocks = content_blocks(&format!("{path}.content"), content)?;
            push_turn(messages, "user", blocks);
        }
        "assistant" => {
            let mut blocks = content_blocks(&format!("{path}.content"), content)?;
            blocks.retain(|b| {
                b["type"] != "text" || b["text"].as_str().is_some_and(|t| !t.is_empty())
            });
            for (j, call) in m
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .enumerate()
            {
                let cpath = format!("{path}.tool_calls[{j}]");
                let id = call
                    .get("id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(format!("{cpath}.id"), "is required"))?;
                let name = call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| err(format!("{cpath}.function.name"), "is required"))?;
                let args = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or("{}");
                let input: Value =
                    serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
                        .map_err(|_| {
                            err(format!("{cpath}.function.arguments"), "is not valid JSON")
                        })?;
                blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
            }
            if m.get("function_call").is_some_and(|f| !f.is_null()) {
                return Err(err(
                    format!("{path}.function_call"),
                    "the deprecated function_call is not supported; use tool_calls",
                ));
            }
            push_turn(messages, "assistant", blocks);
        }
        "tool" => {
            let id = m
                .get("tool_call_id")
                .and_then(Value::as_str)
                .ok_or_else(|| err(format!("{path}.tool_call_id"), "is required"))?;
            let text = text_of(&format!("{path}.content"), content)?;
            push_turn(
                messages,
                "user",
                vec![json!({"type": "tool_result", "tool_use_id": id, "content": text})],
            );
        }
        other => {
            return Err(err(
                format!("{path}.role"),
                format!("role {other:?} has no Anthropic equivalent"),
            ))
        }
    }
    Ok(())
}

fn translate_tools(v: &Value) -> Result<Value, TranslateError> {
    let list = v
        .as_array()
        .ok_or_else(|| err("tools", "must be an array"))?;
    let mut out = Vec::new();
    for (i, t) in list.iter().enumerate() {
        if t.get("type").and_then(Value::as_str) != Some("function") {
            return Err(err(
                format!("tools[{i}].type"),
                "only function tools can be translated",
            ));
        }
        let f = t
            .get("function")
            .ok_or_else(|| err(format!("tools[{i}].function"), "is required"))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| err(format!("tools[{i}].function.name"), "is required"))?;
        let schema = match f.get("parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p) if p.get("type").and_then(Value::as_str) == Some("object") => p.clone(),
            Some(_) => {
                return Err(err(
                    format!("tools[{i}].function.parameters"),
                    "Anthropic needs an object schema (\"type\": \"object\")",
                ))
            }
        };
        let mut tool = json!({"name": name, "input_schema": schema});
        if let Some(d) = f.get("description").and_then(Value::as_str) {
            tool["description"] = json!(d);
        }
        out.push(tool);
    }
    Ok(Value::Array(out))
}

/// Anthropic `stop_reason` → OpenAI `finish_reason`.
pub fn finish_reason(stop_reason: &str) -> &'static str {
    match stop_reason {
        "max_tokens" | "model_context_window_exceeded" => "length",
        "tool_use" => "tool_calls",
        "refusal" => "content_filter",
        _ => "stop",
    }
}

fn chat_usage(u: &AnthropicUsage) -> Value {
    let n = u.normalise();
    json!({
        "prompt_tokens": n.input,
        "completion_tokens": n.output,
        "total_tokens": n.input + n.output,
        "prompt_tokens_details": {"cached_tokens": n.cached_input},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

/// Messages response → Chat Completions response.
pub fn messages_response_to_chat(body: &[u8], created: u64) -> Result<Vec<u8>, TranslateError> {
    let m: Value = serde_json::from_slice(body).map_err(|e| err("$", e.to_string()))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in m
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {
                    "name": block.get("name").cloned().unwrap_or(Value::Null),
                    "arguments": block.get("input").map_or_else(|| "{}".to_string(), Value::to_string),
                },
            })),
            // Thinking is billed as output but has no place in a chat message.
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) }, "refusal": null});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let stop = m
        .get("stop_reason")
        .and_then(Value::as_str)
        .unwrap_or("end_turn");
    let mut out = json!({
        "id": format!("chatcmpl-{}", m.get("id").and_then(Value::as_str).unwrap_or("")),
        "object": "chat.completion",
        "created": created,
        "model": m.get("model").cloned().unwrap_or(Value::Null),
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason(stop)}],
    });
    if let Some(u) = m
        .get("usage")
        .and_then(|u| serde_json::from_value::<AnthropicUsage>(u.clone()).ok())
    {
        out["usage"] = chat_usage(&u);
    }
    serde_json::to_vec(&out).map_err(|e| err("$", e.to_string()))
}

/// Turns a Messages event stream into Chat Completions chunks, event by event.
pub struct MessagesToChatStream {
    id: String,
    model: Value,
    created: u64,
    include_usage: bool,
    usage: AnthropicUsage,
    /// Anthropic content-block index → OpenAI tool-call index.
    tool_index: HashMap<u64, usize>,
    finish: Option<&'static str>,
}

impl MessagesToChatStream {
    /// `include_usage`: the client asked for the final usage chunk.
    pub fn new(created: u64, include_usage: bool) -> Self {
        MessagesToChatStream {
            id: String::new(),
            model: Value::Null,
            created,
            include_usage,
            usage: AnthropicUsage::default(),
            tool_index: HashMap::new(),
            finish: None,
        }
    }

    fn chunk(&self, delta: Value, finish: Option<&str>) -> String {
        let c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        format!("data: {c}\n\n")
    }

    /// The chunks (zero or more SSE events, already framed) for one upstream event.
    pub fn on_event(&mut self, ev: &SseEvent) -> String {
        let Some(data) = ev.data() else {
            return String::new();
        };
        let Ok(v) = serde_json::from_str::<Value>(data.trim()) else {
            return String::new();
        };
        match v.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let m = &v["message"];
                self.id = format!(
                    "chatcmpl-{}",
                    m.get("id").and_then(Value::as_str).unwrap_or("")
                );
                self.model = m.get("model").cloned().unwrap_or(Value::Null);
                if let Some(u) = m
                    .get("usage")
                    .and_then(|u| serde_json::from_value::<AnthropicUsage>(u.clone()).ok())
                {
                    self.usage.merge(&u);
                }
                self.chunk(json!({"role": "assistant", "content": ""}), None)
            }
            Some("content_block_start") => {
                let block = &v["content_block"];
                if block.get("type").and_then(Value::as_str) != Some("tool_use") {
                    return String::new();
                }
                let idx = self.tool_index.len();
                self.tool_index
                    .insert(v.get("index").and_then(Value::as_u64).unwrap_or(0), idx);
                self.chunk(
                    json!({"tool_calls": [{"index": idx, "id": block.get("id"), "type": "function",
                        "function": {"name": block.get("name"), "arguments": ""}}]}),
                    None,
                )
            }
            Some("content_block_delta") => {
                let d = &v["delta"];
                match d.get("type").and_then(Value::as_str) {
                    Some("text_delta") => self.chunk(json!({"content": d.get("text")}), None),
                    Some("input_json_delta") => {
                        let block = v.get("index").and_then(Value::as_u64).unwrap_or(0);
                        let idx = self.tool_index.get(&block).copied().unwrap_or(0);
                        self.chunk(json!({"tool_calls": [{"index": idx, "function": {"arguments": d.get("partial_json")}}]}), None)
                    }
                    _ => String::new(),
                }
            }
            Some("message_delta") => {
                if let Some(u) = v
                    .get("usage")
                    .and_then(|u| serde_json::from_value::<AnthropicUsage>(u.clone()).ok())
                {
                    self.usage.merge(&u);
                }
                let stop = v
                    .pointer("/delta/stop_reason")
                    .and_then(Value::as_str)
                    .unwrap_or("end_turn");
                self.finish = Some(finish_reason(stop));
                self.chunk(json!({}), self.finish)
            }
            Some("message_stop") => {
                let mut out = String::new();
                if self.include_usage {
                    let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [], "usage": chat_usage(&self.usage)});
                    out.push_str(&format!("data: {c}\n\n"));
                }
                out.push_str("data: [DONE]\n\n");
                out
            }
            Some("error") => {
                let message = v
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("upstream error");
                let kind = v
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                let e = json!({"error": {"message": message, "type": kind, "param": null, "code": kind}});
                format!("data: {e}\n\n")
            }
            _ => String::new(),
        }
    }
}
