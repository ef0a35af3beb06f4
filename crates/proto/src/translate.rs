//! Translation between OpenAI Chat Completions and Anthropic Messages, so a Chat
//! Completions client can be served by an Anthropic deployment.
//!
//! The rule: what can be carried across is carried exactly; a field with no equivalent is
//! handled by its [`FieldPolicy`]: dropped (and named in [`Translated::dropped`], which the
//! gateway reports in `x-tollgate-warning`), mapped where a mapping exists (reasoning controls,
//! structured output), or refused with a `TranslateError` naming the field and the target
//! dialect. Never a silent drop, except for fields that change nothing about the answer
//! (`store`, `stream_options`, `cache_control` hints).
//!
//! The built-in defaults let real agents through a cross-vendor alias: Claude Code sends
//! `thinking`, `context_management` and `output_config` on every request, and a gateway that
//! refused them could not fall back from Anthropic to anyone else.

use crate::sse::SseEvent;
use crate::usage::AnthropicUsage;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// Anthropic requires `max_tokens`; Chat Completions does not. Used when the client gave none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The dialect a translation writes, as error messages name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Anthropic's Messages API.
    Messages,
    /// OpenAI's Chat Completions API (and every OpenAI-compatible provider).
    ChatCompletions,
}

impl Target {
    pub fn describe(self) -> &'static str {
        match self {
            Target::Messages => "an Anthropic deployment (Messages API)",
            Target::ChatCompletions => "an OpenAI-compatible deployment (Chat Completions API)",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranslateError {
    /// The request field that cannot be carried, as a JSON path (`messages[2].content[0].type`).
    pub field: String,
    pub reason: String,
    pub target: Target,
}

impl std::fmt::Display for TranslateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "'{}' cannot be translated for {}: {}",
            self.field,
            self.target.describe(),
            self.reason
        )
    }
}

impl std::error::Error for TranslateError {}

/// An error whose target is filled in by the public function that returns it.
fn err(field: impl Into<String>, reason: impl Into<String>) -> TranslateError {
    TranslateError {
        field: field.into(),
        reason: reason.into(),
        target: Target::Messages,
    }
}

fn for_target(target: Target) -> impl Fn(TranslateError) -> TranslateError {
    move |e| TranslateError { target, ..e }
}

/// What to do with a request field that the target dialect has no direct equivalent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldPolicy {
    /// Leave it out and say so (`Translated::dropped`).
    Drop,
    /// Carry it over with its nearest equivalent (only fields in [`MAPPABLE`]).
    Map,
    /// Refuse the request with a 400 naming the field.
    Reject,
}

/// Fields that have a mapping, and what it is.
pub const MAPPABLE: &[(&str, &str)] = &[
    (
        "thinking",
        "Messages -> Chat: budget_tokens < 4096 is reasoning_effort low, < 16384 medium, else high; adaptive is medium",
    ),
    (
        "output_config.effort",
        "Messages -> Chat: reasoning_effort of the same level (max is high)",
    ),
    (
        "output_config.format",
        "Messages -> Chat: response_format json_schema",
    ),
    (
        "reasoning_effort",
        "Chat -> Messages: thinking with budget_tokens 2048 (low), 8192 (medium), 24576 (high), kept below max_tokens",
    ),
    (
        "response_format",
        "Chat -> Messages: json_schema becomes output_config.format",
    ),
];

/// The built-in policy of fields whose effect is known: reasoning controls are dropped by
/// default because a mapped `reasoning_effort` is refused by OpenAI models that do not
/// reason (gpt-4o, gpt-4.1); `map` is one line of configuration away.
pub const DEFAULTS: &[(&str, FieldPolicy)] = &[
    ("thinking", FieldPolicy::Drop),
    ("output_config.effort", FieldPolicy::Drop),
    ("output_config.format", FieldPolicy::Map),
    ("context_management", FieldPolicy::Drop),
    ("top_k", FieldPolicy::Drop),
    ("service_tier", FieldPolicy::Drop),
    ("reasoning_effort", FieldPolicy::Drop),
    ("response_format", FieldPolicy::Map),
    ("seed", FieldPolicy::Drop),
    ("prompt_cache_key", FieldPolicy::Drop),
    ("safety_identifier", FieldPolicy::Drop),
    ("verbosity", FieldPolicy::Drop),
];

/// Per-field policies: configured ones first, then [`DEFAULTS`], then `unknown`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub fields: std::collections::BTreeMap<String, FieldPolicy>,
    /// For a field with neither a configured nor a built-in policy; `None` is reject.
    pub unknown: Option<FieldPolicy>,
}

impl Policy {
    pub fn of(&self, field: &str) -> FieldPolicy {
        if let Some(p) = self.fields.get(field) {
            return *p;
        }
        DEFAULTS
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, p)| *p)
            .unwrap_or(self.unknown.unwrap_or(FieldPolicy::Reject))
    }
}

/// A translated request and the fields its policy dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Translated {
    pub body: Vec<u8>,
    pub dropped: Vec<String>,
}

/// Applies `field`'s policy when it has no mapping here: drop (noted) or refuse.
fn unmapped(
    policy: &Policy,
    field: &str,
    dropped: &mut Vec<String>,
    reason: &str,
) -> Result<(), TranslateError> {
    match policy.of(field) {
        FieldPolicy::Drop => {
            dropped.push(field.to_string());
            Ok(())
        }
        FieldPolicy::Map | FieldPolicy::Reject => Err(err(field, reason)),
    }
}

/// Chat Completions request → Messages request for `model`, with the built-in policy.
pub fn chat_request_to_messages(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    chat_request_to_messages_with(body, model, &Policy::default()).map(|t| t.body)
}

/// Chat Completions request → Messages request for `model`, under `policy`.
pub fn chat_request_to_messages_with(
    body: &[u8],
    model: &str,
    policy: &Policy,
) -> Result<Translated, TranslateError> {
    chat_to_messages(body, model, policy).map_err(for_target(Target::Messages))
}

fn chat_to_messages(
    body: &[u8],
    model: &str,
    policy: &Policy,
) -> Result<Translated, TranslateError> {
    let req: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| err("$", e.to_string()))?;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let mut system: Vec<Value> = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    let mut max_tokens = None;
    let mut tool_choice: Option<Value> = None;
    let mut parallel_tool_calls = None;
    let mut dropped = Vec::new();
    let mut effort: Option<&str> = None;

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
            _ if v.is_null() => {}
            "reasoning_effort" if policy.of(k) == FieldPolicy::Map => {
                effort = Some(
                    v.as_str()
                        .ok_or_else(|| err(k.as_str(), "must be a string"))?,
                );
            }
            "response_format" if policy.of(k) == FieldPolicy::Map => {
                match v.get("type").and_then(Value::as_str) {
                    Some("text") => {}
                    Some("json_schema") => {
                        let schema = v.pointer("/json_schema/schema").ok_or_else(|| {
                            err("response_format.json_schema.schema", "is required")
                        })?;
                        out.insert(
                            "output_config".into(),
                            json!({"format": {"type": "json_schema", "schema": schema}}),
                        );
                    }
                    _ => {
                        return Err(err(
                            "response_format.type",
                            "only text and json_schema have an Anthropic equivalent",
                        ))
                    }
                }
            }
            other => unmapped(
                policy,
                other,
                &mut dropped,
                "Anthropic's Messages API has no equivalent",
            )?,
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
    let max_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    out.insert("max_tokens".into(), json!(max_tokens));
    if let Some(level) = effort {
        // Anthropic wants budget_tokens >= 1024 and below max_tokens, and no temperature
        // other than 1 with thinking on; where that cannot hold, thinking stays off.
        let budget = match level {
            "low" => Some(2048u64),
            "medium" => Some(8192),
            "high" | "xhigh" => Some(24576),
            _ => None,
        }
        .map(|b| b.min(max_tokens.saturating_sub(1)));
        let sampling = out
            .get("temperature")
            .is_some_and(|t| t.as_f64() != Some(1.0))
            || out.contains_key("top_p");
        match budget {
            Some(b) if b >= 1024 && !sampling => {
                out.insert(
                    "thinking".into(),
                    json!({"type": "enabled", "budget_tokens": b}),
                );
            }
            Some(_) => dropped.push("reasoning_effort".into()),
            None => {}
        }
    }
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
    let body = serde_json::to_vec(&Value::Object(out)).map_err(|e| err("$", e.to_string()))?;
    Ok(Translated { body, dropped })
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

// ---------------------------------------------------------------------------------------
// Messages client → OpenAI-compatible provider

/// Messages request → Chat Completions request for `model`, with the built-in policy.
pub fn messages_request_to_chat(body: &[u8], model: &str) -> Result<Vec<u8>, TranslateError> {
    messages_request_to_chat_with(body, model, &Policy::default()).map(|t| t.body)
}

/// Messages request → Chat Completions request for `model`, under `policy`. Streams ask for
/// the usage chunk, which is how the provider's numbers reach the meter.
pub fn messages_request_to_chat_with(
    body: &[u8],
    model: &str,
    policy: &Policy,
) -> Result<Translated, TranslateError> {
    messages_to_chat(body, model, policy).map_err(for_target(Target::ChatCompletions))
}

/// `thinking` as a reasoning effort level.
fn thinking_effort(v: &Value) -> Option<&'static str> {
    match v.get("type").and_then(Value::as_str)? {
        "enabled" => Some(match v.get("budget_tokens").and_then(Value::as_u64) {
            Some(b) if b < 4096 => "low",
            Some(b) if b < 16384 => "medium",
            _ => "high",
        }),
        "adaptive" => Some("medium"),
        _ => None,
    }
}

fn messages_to_chat(
    body: &[u8],
    model: &str,
    policy: &Policy,
) -> Result<Translated, TranslateError> {
    let req: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| err("$", e.to_string()))?;
    let mut dropped = Vec::new();
    let mut effort: Option<&str> = None;
    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    let mut messages: Vec<Value> = Vec::new();
    if let Some(system) = req.get("system") {
        match system {
            Value::String(s) => messages.push(json!({"role": "system", "content": s})),
            Value::Array(blocks) => {
                let mut parts = Vec::new();
                for (i, b) in blocks.iter().enumerate() {
                    if b.get("type").and_then(Value::as_str) != Some("text") {
                        return Err(err(
                            format!("system[{i}].type"),
                            "only text blocks can be translated",
                        ));
                    }
                    parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))}));
                }
                messages.push(json!({"role": "system", "content": parts}));
            }
            Value::Null => {}
            _ => return Err(err("system", "must be a string or an array of text blocks")),
        }
    }
    let mut tool_choice = None;
    for (k, v) in &req {
        match k.as_str() {
            "model" | "system" => {}
            "messages" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err("messages", "must be an array"))?;
                for (i, m) in list.iter().enumerate() {
                    message_to_chat(i, m, &mut messages)?;
                }
            }
            // max_completion_tokens is what current OpenAI models accept (o-series refuse max_tokens).
            "max_tokens" => {
                out.insert("max_completion_tokens".into(), v.clone());
            }
            "temperature" | "top_p" => {
                out.insert(k.clone(), v.clone());
            }
            "stop_sequences" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err("stop_sequences", "must be an array"))?;
                if list.len() > 4 {
                    return Err(err(
                        "stop_sequences",
                        "OpenAI accepts at most 4 stop sequences",
                    ));
                }
                if !list.is_empty() {
                    out.insert("stop".into(), v.clone());
                }
            }
            "stream" => {
                out.insert("stream".into(), v.clone());
                if v.as_bool() == Some(true) {
                    out.insert("stream_options".into(), json!({"include_usage": true}));
                }
            }
            "tools" => {
                let list = v
                    .as_array()
                    .ok_or_else(|| err("tools", "must be an array"))?;
                let mut tools = Vec::new();
                for (i, t) in list.iter().enumerate() {
                    if t.get("type").is_some_and(|ty| ty != "custom") {
                        return Err(err(
                            format!("tools[{i}].type"),
                            "server tools have no OpenAI equivalent",
                        ));
                    }
                    let name = t
                        .get("name")
                        .ok_or_else(|| err(format!("tools[{i}].name"), "is required"))?;
                    let mut f = json!({"name": name, "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
                    if let Some(d) = t.get("description") {
                        f["description"] = d.clone();
                    }
                    tools.push(json!({"type": "function", "function": f}));
                }
                out.insert("tools".into(), Value::Array(tools));
            }
            "tool_choice" => tool_choice = Some(v.clone()),
            "metadata" => {
                if let Some(u) = v.get("user_id").and_then(Value::as_str) {
                    out.insert("user".into(), json!(u));
                }
            }
            "thinking" if v.get("type").and_then(Value::as_str) == Some("disabled") => {}
            "thinking" if policy.of(k) == FieldPolicy::Map => {
                // An explicit output_config.effort, read below, wins over this.
                effort = effort.or(thinking_effort(v));
            }
            "output_config" => {
                let o = v
                    .as_object()
                    .ok_or_else(|| err("output_config", "must be an object"))?;
                for (ok, ov) in o {
                    let path = format!("output_config.{ok}");
                    match ok.as_str() {
                        "effort" if policy.of(&path) == FieldPolicy::Map => {
                            effort = Some(match ov.as_str() {
                                Some("low") => "low",
                                Some("medium") => "medium",
                                Some("high" | "max") => "high",
                                _ => return Err(err(path, "must be low, medium, high or max")),
                            });
                        }
                        "format" if !ov.is_null() && policy.of(&path) == FieldPolicy::Map => {
                            if ov.get("type").and_then(Value::as_str) != Some("json_schema") {
                                return Err(err(
                                    format!("{path}.type"),
                                    "only json_schema has an OpenAI equivalent",
                                ));
                            }
                            let schema = ov
                                .get("schema")
                                .ok_or_else(|| err(format!("{path}.schema"), "is required"))?;
                            out.insert(
                                "response_format".into(),
                                json!({"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": true}}),
                            );
                        }
                        _ if ov.is_null() => {}
                        _ => unmapped(
                            policy,
                            &path,
                            &mut dropped,
                            "OpenAI's Chat Completions API has no equivalent",
                        )?,
                    }
                }
            }
            _ if v.is_null() => {}
            other => unmapped(
                policy,
                other,
                &mut dropped,
                "OpenAI's Chat Completions API has no equivalent",
            )?,
        }
    }
    if let Some(level) = effort {
        out.insert("reasoning_effort".into(), json!(level));
    }
    if let Some(c) = tool_choice {
        let (choice, parallel) = match c.get("type").and_then(Value::as_str) {
            Some("auto") => (json!("auto"), c.get("disable_parallel_tool_use")),
            Some("any") => (json!("required"), c.get("disable_parallel_tool_use")),
            Some("none") => (json!("none"), None),
            Some("tool") => {
                let name = c
                    .get("name")
                    .ok_or_else(|| err("tool_choice.name", "is required"))?;
                (
                    json!({"type": "function", "function": {"name": name}}),
                    c.get("disable_parallel_tool_use"),
                )
            }
            _ => return Err(err("tool_choice.type", "must be auto, any, tool or none")),
        };
        out.insert("tool_choice".into(), choice);
        if parallel.and_then(Value::as_bool) == Some(true) {
            out.insert("parallel_tool_calls".into(), json!(false));
        }
    }
    out.insert("messages".into(), Value::Array(messages));
    let body = serde_json::to_vec(&Value::Object(out)).map_err(|e| err("$", e.to_string()))?;
    Ok(Translated { body, dropped })
}

fn message_to_chat(i: usize, m: &Value, out: &mut Vec<Value>) -> Result<(), TranslateError> {
    let path = format!("messages[{i}]");
    let role = m
        .get("role")
        .and_then(Value::as_str)
        .ok_or_else(|| err(format!("{path}.role"), "is required"))?;
    let blocks: Vec<Value> = match m.get("content") {
        Some(Value::String(s)) => {
            out.push(json!({"role": role, "content": s}));
            return Ok(());
        }
        Some(Value::Array(a)) => a.clone(),
        _ => {
            return Err(err(
                format!("{path}.content"),
                "must be a string or an array of blocks",
            ))
        }
    };
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    let mut text = String::new();
    for (j, b) in blocks.iter().enumerate() {
        let bpath = format!("{path}.content[{j}]");
        match (role, b.get("type").and_then(Value::as_str)) {
            ("user", Some("text")) => parts.push(json!({"type": "text", "text": b.get("text").cloned().unwrap_or(json!(""))})),
            // Claude Code sends system turns mid-conversation; Chat Completions has them too.
            ("system", Some("text")) => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            ("assistant", Some("text")) => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
            ("user", Some("image")) => {
                let src = b.get("source").ok_or_else(|| err(format!("{bpath}.source"), "is required"))?;
                let url = match src.get("type").and_then(Value::as_str) {
                    Some("base64") => format!(
                        "data:{};base64,{}",
                        src.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
                        src.get("data").and_then(Value::as_str).unwrap_or("")
                    ),
                    Some("url") => src.get("url").and_then(Value::as_str).unwrap_or("").to_string(),
                    _ => return Err(err(format!("{bpath}.source.type"), "only base64 and url images can be translated")),
                };
                parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
            }
            ("user", Some("tool_result")) => {
                let id = b.get("tool_use_id").ok_or_else(|| err(format!("{bpath}.tool_use_id"), "is required"))?;
                let content = match b.get("content") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.clone(),
                    Some(Value::Array(inner)) => {
                        let mut s = String::new();
                        for (k, x) in inner.iter().enumerate() {
                            if x.get("type").and_then(Value::as_str) != Some("text") {
                                return Err(err(format!("{bpath}.content[{k}].type"), "only text tool results can be translated"));
                            }
                            s.push_str(x.get("text").and_then(Value::as_str).unwrap_or(""));
                        }
                        s
                    }
                    Some(_) => return Err(err(format!("{bpath}.content"), "must be a string or text blocks")),
                };
                // Tool answers must directly follow the assistant's tool calls in OpenAI's API.
                out.push(json!({"role": "tool", "tool_call_id": id, "content": content}));
            }
            ("assistant", Some("tool_use")) => calls.push(json!({
                "id": b.get("id"),
                "type": "function",
                "function": {"name": b.get("name"), "arguments": b.get("input").map_or_else(|| "{}".to_string(), Value::to_string)},
            })),
            // The model's earlier reasoning cannot be replayed to another vendor's model.
            ("assistant", Some("thinking" | "redacted_thinking")) => {}
            (_, other) => return Err(err(format!("{bpath}.type"), format!("{other:?} blocks have no OpenAI equivalent here"))),
        }
    }
    match role {
        "user" if !parts.is_empty() => out.push(json!({"role": "user", "content": parts})),
        "user" => {}
        "system" => out.push(json!({"role": "system", "content": text})),
        "assistant" => {
            let mut msg = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
            if !calls.is_empty() {
                msg["tool_calls"] = Value::Array(calls);
            }
            out.push(msg);
        }
        other => {
            return Err(err(
                format!("{path}.role"),
                format!("role {other:?} is not a Messages role"),
            ))
        }
    }
    Ok(())
}

/// OpenAI `finish_reason` → Anthropic `stop_reason`.
pub fn stop_reason(finish_reason: &str) -> &'static str {
    match finish_reason {
        "length" => "max_tokens",
        "tool_calls" | "function_call" => "tool_use",
        "content_filter" => "refusal",
        _ => "end_turn",
    }
}

fn messages_usage(u: Option<&Value>) -> Value {
    let get = |p: &str| {
        u.and_then(|u| u.pointer(p))
            .and_then(Value::as_u64)
            .unwrap_or(0)
    };
    let cached = get("/prompt_tokens_details/cached_tokens");
    json!({
        "input_tokens": get("/prompt_tokens").saturating_sub(cached),
        "output_tokens": get("/completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    })
}

/// Chat Completions response → Messages response.
pub fn chat_response_to_messages(body: &[u8]) -> Result<Vec<u8>, TranslateError> {
    let c: Value = serde_json::from_slice(body).map_err(|e| err("$", e.to_string()))?;
    let choice = c
        .pointer("/choices/0")
        .ok_or_else(|| err("choices", "the provider returned no choice"))?;
    let mut content = Vec::new();
    if let Some(t) = choice.pointer("/message/content").and_then(Value::as_str) {
        if !t.is_empty() {
            content.push(json!({"type": "text", "text": t}));
        }
    }
    for (i, call) in choice
        .pointer("/message/tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let args = call
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or("{}");
        let input: Value = serde_json::from_str(if args.trim().is_empty() { "{}" } else { args })
            .map_err(|_| {
            err(
                format!("choices[0].message.tool_calls[{i}].function.arguments"),
                "the provider sent invalid JSON",
            )
        })?;
        content.push(json!({"type": "tool_use", "id": call.get("id"), "name": call.pointer("/function/name"), "input": input}));
    }
    let finish = choice
        .get("finish_reason")
        .and_then(Value::as_str)
        .unwrap_or("stop");
    let id = c.get("id").and_then(Value::as_str).unwrap_or("");
    let out = json!({
        "id": format!("msg_{}", id.trim_start_matches("chatcmpl-")),
        "type": "message",
        "role": "assistant",
        "model": c.get("model"),
        "content": content,
        "stop_reason": stop_reason(finish),
        "stop_sequence": null,
        "usage": messages_usage(c.get("usage")),
    });
    serde_json::to_vec(&out).map_err(|e| err("$", e.to_string()))
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum OpenBlock {
    None,
    Text(usize),
    Tool(usize),
}

/// Turns a Chat Completions chunk stream into the Messages event sequence.
pub struct ChatToMessagesStream {
    started: bool,
    next_block: usize,
    open: OpenBlock,
    /// OpenAI tool-call index → Anthropic block index.
    tools: HashMap<u64, usize>,
    finish: Option<String>,
    usage: Option<Value>,
}

impl Default for ChatToMessagesStream {
    fn default() -> Self {
        Self::new()
    }
}

impl ChatToMessagesStream {
    pub fn new() -> Self {
        ChatToMessagesStream {
            started: false,
            next_block: 0,
            open: OpenBlock::None,
            tools: HashMap::new(),
            finish: None,
            usage: None,
        }
    }

    fn ev(out: &mut String, name: &str, data: Value) {
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    }

    fn close(&mut self, out: &mut String) {
        if let OpenBlock::Text(i) | OpenBlock::Tool(i) = self.open {
            Self::ev(
                out,
                "content_block_stop",
                json!({"type": "content_block_stop", "index": i}),
            );
        }
        self.open = OpenBlock::None;
    }

    pub fn on_event(&mut self, ev: &SseEvent) -> String {
        let mut out = String::new();
        let Some(data) = ev.data() else { return out };
        let data = data.trim();
        if data == "[DONE]" {
            self.close(&mut out);
            let stop = stop_reason(self.finish.as_deref().unwrap_or("stop"));
            Self::ev(
                &mut out,
                "message_delta",
                json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                    "usage": messages_usage(self.usage.as_ref())}),
            );
            Self::ev(&mut out, "message_stop", json!({"type": "message_stop"}));
            return out;
        }
        let Ok(c) = serde_json::from_str::<Value>(data) else {
            return out;
        };
        if let Some(e) = c.get("error") {
            let message = e
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or("upstream error");
            Self::ev(
                &mut out,
                "error",
                json!({"type": "error", "error": {"type": "api_error", "message": message}}),
            );
            return out;
        }
        if !self.started {
            self.started = true;
            let id = c.get("id").and_then(Value::as_str).unwrap_or("");
            Self::ev(
                &mut out,
                "message_start",
                json!({"type": "message_start", "message": {"id": format!("msg_{}", id.trim_start_matches("chatcmpl-")),
                    "type": "message", "role": "assistant", "model": c.get("model"), "content": [],
                    "stop_reason": null, "stop_sequence": null,
                    "usage": {"input_tokens": 0, "output_tokens": 0}}}),
            );
        }
        if let Some(u) = c.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        let Some(choice) = c.pointer("/choices/0") else {
            return out;
        };
        let delta = choice.get("delta").cloned().unwrap_or(Value::Null);
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            if !matches!(self.open, OpenBlock::Text(_)) {
                self.close(&mut out);
                let i = self.next_block;
                self.next_block += 1;
                self.open = OpenBlock::Text(i);
                Self::ev(
                    &mut out,
                    "content_block_start",
                    json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}),
                );
            }
            if let OpenBlock::Text(i) = self.open {
                Self::ev(
                    &mut out,
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": i, "delta": {"type": "text_delta", "text": text}}),
                );
            }
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let oi = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let block = match self.tools.get(&oi) {
                Some(b) => *b,
                None => {
                    self.close(&mut out);
                    let i = self.next_block;
                    self.next_block += 1;
                    self.tools.insert(oi, i);
                    self.open = OpenBlock::Tool(i);
                    Self::ev(
                        &mut out,
                        "content_block_start",
                        json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use",
                            "id": call.get("id"), "name": call.pointer("/function/name"), "input": {}}}),
                    );
                    i
                }
            };
            if let Some(args) = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                Self::ev(
                    &mut out,
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": block, "delta": {"type": "input_json_delta", "partial_json": args}}),
                );
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finish = Some(f.to_string());
            self.close(&mut out);
        }
        out
    }
}
