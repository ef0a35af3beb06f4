//! The checks a cascade tier's answer must pass to be returned instead of escalating
//! (`[[models]] cascade`, ADR 0030): what a cheap model gets wrong in ways a gateway can see.
//!
//! - `json_schema`: the request asked for JSON (`response_format` in Chat, `text.format` in
//!   Responses): the answer is JSON, and valid against the schema when one was given;
//! - `tool_arguments`: every tool call names a declared tool and its arguments are valid
//!   against that tool's schema;
//! - `not_truncated`: the answer did not stop at its token limit;
//! - `not_empty`: it has text or a tool call;
//! - `not_refusal`: the provider did not mark it a refusal;
//! - `must_match`: its text matches a regex.
//!
//! Answers are read in the client's dialect (after any translation). Schemas are checked for
//! the keywords structured outputs use: `type`, `properties`, `required`,
//! `additionalProperties`, `items`, `enum`, `const`, `anyOf`/`oneOf`/`allOf`, string and array
//! lengths, numeric bounds; others (`$ref`, `pattern`, `format`) are not checked.

use serde_json::Value;

/// Which checks a tier's answer must pass.
#[derive(Debug, Clone)]
pub struct Validators {
    pub json_schema: bool,
    pub tool_arguments: bool,
    pub not_truncated: bool,
    pub not_empty: bool,
    pub not_refusal: bool,
    pub must_match: Option<fancy_regex::Regex>,
}

/// The text, tool calls and ending of an answer, from any dialect.
#[derive(Debug, Default)]
struct Reading {
    text: String,
    /// (tool name, arguments).
    calls: Vec<(String, Result<Value, String>)>,
    truncated: bool,
    refusal: bool,
}

fn read(answer: &Value) -> Reading {
    let mut r = Reading::default();
    let s = |v: &Value| v.as_str().map(str::to_string);
    if let Some(choice) = answer.pointer("/choices/0") {
        // Chat Completions.
        let m = &choice["message"];
        r.text = s(&m["content"]).unwrap_or_default();
        r.refusal = m.get("refusal").is_some_and(|x| !x.is_null());
        r.truncated = choice["finish_reason"] == "length";
        for c in m["tool_calls"].as_array().into_iter().flatten() {
            let args = c["function"]["arguments"].as_str().unwrap_or("");
            r.calls.push((
                s(&c["function"]["name"]).unwrap_or_default(),
                serde_json::from_str(args).map_err(|e| e.to_string()),
            ));
        }
    } else if answer.get("type").and_then(Value::as_str) == Some("message") {
        // Anthropic Messages.
        for b in answer["content"].as_array().into_iter().flatten() {
            match b["type"].as_str() {
                Some("text") => r.text.push_str(b["text"].as_str().unwrap_or("")),
                Some("tool_use") => r
                    .calls
                    .push((s(&b["name"]).unwrap_or_default(), Ok(b["input"].clone()))),
                _ => {}
            }
        }
        r.truncated = answer["stop_reason"] == "max_tokens";
        r.refusal = answer["stop_reason"] == "refusal";
    } else if let Some(items) = answer.get("output").and_then(Value::as_array) {
        // Responses.
        for item in items {
            match item["type"].as_str() {
                Some("message") => {
                    for part in item["content"].as_array().into_iter().flatten() {
                        match part["type"].as_str() {
                            Some("output_text") => {
                                r.text.push_str(part["text"].as_str().unwrap_or(""))
                            }
                            Some("refusal") => r.refusal = true,
                            _ => {}
                        }
                    }
                }
                Some("function_call") => {
                    let args = item["arguments"].as_str().unwrap_or("");
                    r.calls.push((
                        s(&item["name"]).unwrap_or_default(),
                        serde_json::from_str(args).map_err(|e| e.to_string()),
                    ));
                }
                _ => {}
            }
        }
        r.truncated = answer["status"] == "incomplete";
    }
    r
}

/// The JSON the request asked for: `Some(None)` for any JSON object, `Some(Some(schema))`
/// for one schema.
fn wanted_json(request: &Value) -> Option<Option<&Value>> {
    let format = request
        .get("response_format")
        .or_else(|| request.pointer("/text/format"))?;
    match format["type"].as_str()? {
        "json_object" => Some(None),
        // Chat nests the schema under `json_schema`; Responses puts it beside `type`.
        "json_schema" => Some(
            format
                .pointer("/json_schema/schema")
                .or_else(|| format.get("schema")),
        ),
        _ => None,
    }
}

/// The declared tools' schemas by name, in any dialect.
fn tool_schemas(request: &Value) -> Vec<(&str, Option<&Value>)> {
    request["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| {
            let (name, schema) = match t.get("function") {
                Some(f) => (f["name"].as_str()?, f.get("parameters")),
                None => (
                    t["name"].as_str()?,
                    t.get("input_schema").or_else(|| t.get("parameters")),
                ),
            };
            Some((name, schema))
        })
        .collect()
}

/// Tool calls kept from one streamed answer; a provider's stream naming more is cut there.
const MAX_STREAM_CALLS: usize = 256;

/// The text, tool calls and ending of a whole streamed answer, from its events in any
/// dialect (each event says which by its shape, as whole answers do in `read`).
fn read_stream(events: &[tollgate_proto::SseEvent]) -> Reading {
    let docs = events.iter().filter_map(|e| {
        let data = e.data()?;
        serde_json::from_str::<Value>(&data).ok()
    });
    let mut r = Reading::default();
    // (name, arguments as streamed) by the index the stream gives each call.
    let mut calls: Vec<(u64, String, String)> = Vec::new();
    let call = |calls: &mut Vec<(u64, String, String)>, i: u64| -> Option<usize> {
        match calls.iter().position(|c| c.0 == i) {
            Some(p) => Some(p),
            None if calls.len() < MAX_STREAM_CALLS => {
                calls.push((i, String::new(), String::new()));
                Some(calls.len() - 1)
            }
            None => None,
        }
    };
    let mut messages = false;
    for doc in docs {
        if let Some(choice) = doc.pointer("/choices/0") {
            // Chat Completions chunks.
            let d = &choice["delta"];
            if let Some(t) = d["content"].as_str() {
                r.text.push_str(t);
            }
            r.refusal |= d["refusal"].as_str().is_some_and(|x| !x.is_empty());
            r.truncated |= choice["finish_reason"] == "length";
            for c in d["tool_calls"].as_array().into_iter().flatten() {
                let Some(p) = call(&mut calls, c["index"].as_u64().unwrap_or(0)) else {
                    continue;
                };
                if let Some(n) = c["function"]["name"].as_str() {
                    calls[p].1.push_str(n);
                }
                if let Some(a) = c["function"]["arguments"].as_str() {
                    calls[p].2.push_str(a);
                }
            }
            continue;
        }
        match doc["type"].as_str() {
            // Anthropic Messages events.
            Some("content_block_start") => {
                messages = true;
                let b = &doc["content_block"];
                if b["type"] == "tool_use" {
                    if let Some(p) = call(&mut calls, doc["index"].as_u64().unwrap_or(0)) {
                        calls[p].1 = b["name"].as_str().unwrap_or("").to_string();
                    }
                } else if let Some(t) = b["text"].as_str() {
                    r.text.push_str(t);
                }
            }
            Some("content_block_delta") => {
                let d = &doc["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => r.text.push_str(d["text"].as_str().unwrap_or("")),
                    Some("input_json_delta") => {
                        let i = doc["index"].as_u64().unwrap_or(0);
                        if let Some(p) = calls.iter().position(|c| c.0 == i) {
                            calls[p]
                                .2
                                .push_str(d["partial_json"].as_str().unwrap_or(""));
                        }
                    }
                    _ => {}
                }
            }
            Some("message_delta") => {
                let stop = &doc["delta"]["stop_reason"];
                r.truncated |= stop == "max_tokens";
                r.refusal |= stop == "refusal";
            }
            // Responses: the terminal event carries the whole response.
            Some("response.completed" | "response.incomplete") => return read(&doc["response"]),
            _ => {}
        }
    }
    for (_, name, args) in calls {
        // Anthropic streams a call without arguments as no deltas at all.
        let args = if args.trim().is_empty() && messages {
            Ok(Value::Object(Default::default()))
        } else {
            serde_json::from_str(&args).map_err(|e| e.to_string())
        };
        r.calls.push((name, args));
    }
    r
}

/// Why `answer` (the client's dialect) fails the checks for `request`, or `Ok`.
pub fn check(v: &Validators, request: &Value, answer: &[u8]) -> Result<(), String> {
    let answer: Value =
        serde_json::from_slice(answer).map_err(|e| format!("the answer is not JSON: {e}"))?;
    check_reading(v, request, &read(&answer))
}

/// Why a whole streamed answer (its events, in any dialect) fails the checks, or `Ok`.
pub fn check_stream(
    v: &Validators,
    request: &Value,
    events: &[tollgate_proto::SseEvent],
) -> Result<(), String> {
    check_reading(v, request, &read_stream(events))
}

fn check_reading(v: &Validators, request: &Value, r: &Reading) -> Result<(), String> {
    if v.not_refusal && r.refusal {
        return Err("the model refused".into());
    }
    if v.not_truncated && r.truncated {
        return Err("the answer stopped at its token limit".into());
    }
    if v.not_empty && r.text.trim().is_empty() && r.calls.is_empty() {
        return Err("the answer is empty".into());
    }
    if v.json_schema && r.calls.is_empty() {
        if let Some(schema) = wanted_json(request) {
            let doc: Value = serde_json::from_str(r.text.trim())
                .map_err(|e| format!("the answer is not the JSON asked for: {e}"))?;
            match schema {
                Some(s) => valid(s, &doc, "$", 0)
                    .map_err(|e| format!("the answer does not match the schema: {e}"))?,
                None if !doc.is_object() => {
                    return Err("the answer is not a JSON object".into());
                }
                None => {}
            }
        }
    }
    if v.tool_arguments && !r.calls.is_empty() {
        let tools = tool_schemas(request);
        for (name, args) in &r.calls {
            let Some((_, schema)) = tools.iter().find(|(n, _)| n == name) else {
                return Err(format!(
                    "the answer calls '{name}', which the request does not declare"
                ));
            };
            let args = args
                .as_ref()
                .map_err(|e| format!("the arguments of '{name}' are not JSON: {e}"))?;
            if let Some(s) = schema {
                valid(s, args, "$", 0).map_err(|e| {
                    format!("the arguments of '{name}' do not match its schema: {e}")
                })?;
            }
        }
    }
    if let Some(re) = &v.must_match {
        if !re.is_match(&r.text).unwrap_or(false) {
            return Err(format!("the answer does not match /{}/", re.as_str()));
        }
    }
    Ok(())
}

/// Schemas nest; a hostile one cannot recurse without end.
const MAX_DEPTH: usize = 64;

fn type_ok(ty: &str, v: &Value) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        "number" => v.is_number(),
        "integer" => v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.fract() == 0.0),
        _ => true,
    }
}

/// `Ok` when `v` is valid against `schema` (the subset above), else where and why not.
pub fn valid(schema: &Value, v: &Value, at: &str, depth: usize) -> Result<(), String> {
    if depth > MAX_DEPTH {
        return Err(format!("{at}: the schema nests deeper than {MAX_DEPTH}"));
    }
    let Some(s) = schema.as_object() else {
        // `true`/`false` schemas.
        return match schema.as_bool() {
            Some(false) => Err(format!("{at}: nothing is allowed here")),
            _ => Ok(()),
        };
    };
    match s.get("type") {
        Some(Value::String(t)) if !type_ok(t, v) => return Err(format!("{at}: not a {t}")),
        Some(Value::Array(ts)) if !ts.iter().filter_map(Value::as_str).any(|t| type_ok(t, v)) => {
            return Err(format!("{at}: not any of the types allowed"))
        }
        _ => {}
    }
    if let Some(options) = s.get("enum").and_then(Value::as_array) {
        if !options.contains(v) {
            return Err(format!("{at}: not one of the values allowed"));
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            return Err(format!("{at}: not the value required"));
        }
    }
    let len_bound = |key: &str| s.get(key).and_then(Value::as_u64);
    if let Some(text) = v.as_str() {
        let n = text.chars().count() as u64;
        if len_bound("minLength").is_some_and(|m| n < m)
            || len_bound("maxLength").is_some_and(|m| n > m)
        {
            return Err(format!("{at}: a string of the wrong length"));
        }
    }
    if let Some(x) = v.as_f64() {
        let bound = |key: &str| s.get(key).and_then(Value::as_f64);
        if bound("minimum").is_some_and(|m| x < m)
            || bound("maximum").is_some_and(|m| x > m)
            || bound("exclusiveMinimum").is_some_and(|m| x <= m)
            || bound("exclusiveMaximum").is_some_and(|m| x >= m)
        {
            return Err(format!("{at}: out of range"));
        }
    }
    if let Some(obj) = v.as_object() {
        let props = s.get("properties").and_then(Value::as_object);
        for name in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(name) = name.as_str() {
                if !obj.contains_key(name) {
                    return Err(format!("{at}: '{name}' is required"));
                }
            }
        }
        for (k, x) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(p) => valid(p, x, &format!("{at}.{k}"), depth + 1)?,
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => {
                        return Err(format!("{at}: '{k}' is not allowed"));
                    }
                    Some(extra @ Value::Object(_)) => {
                        valid(extra, x, &format!("{at}.{k}"), depth + 1)?
                    }
                    _ => {}
                },
            }
        }
    }
    if let Some(items) = v.as_array() {
        let n = items.len() as u64;
        if len_bound("minItems").is_some_and(|m| n < m)
            || len_bound("maxItems").is_some_and(|m| n > m)
        {
            return Err(format!("{at}: an array of the wrong length"));
        }
        if let Some(item) = s.get("items") {
            for (i, x) in items.iter().enumerate() {
                valid(item, x, &format!("{at}[{i}]"), depth + 1)?;
            }
        }
    }
    let branches = |key: &str| s.get(key).and_then(Value::as_array);
    if let Some(all) = branches("allOf") {
        for b in all {
            valid(b, v, at, depth + 1)?;
        }
    }
    if let Some(any) = branches("anyOf") {
        if !any.iter().any(|b| valid(b, v, at, depth + 1).is_ok()) {
            return Err(format!("{at}: matches none of anyOf"));
        }
    }
    if let Some(one) = branches("oneOf") {
        if one
            .iter()
            .filter(|b| valid(b, v, at, depth + 1).is_ok())
            .count()
            != 1
        {
            return Err(format!("{at}: does not match exactly one of oneOf"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn all() -> Validators {
        Validators {
            json_schema: true,
            tool_arguments: true,
            not_truncated: true,
            not_empty: true,
            not_refusal: true,
            must_match: None,
        }
    }

    fn chat(message: Value, finish: &str) -> Vec<u8> {
        json!({"choices": [{"index": 0, "message": message, "finish_reason": finish}]})
            .to_string()
            .into_bytes()
    }

    fn sse(events: &[Value]) -> Vec<tollgate_proto::SseEvent> {
        let mut out = String::new();
        for e in events {
            out.push_str(&format!(
                "event: {}\ndata: {e}\n\n",
                e["type"].as_str().unwrap_or("x")
            ));
        }
        out.push_str("data: [DONE]\n\n");
        let mut evs = Vec::new();
        tollgate_proto::SseSplitter::new().push(out.as_bytes(), &mut evs);
        evs
    }

    #[test]
    fn a_streamed_answer_is_read_whole_in_every_shape() {
        let tools = json!({"tools": [{"name": "book", "input_schema": {"type": "object",
            "required": ["city"], "properties": {"city": {"type": "string"}}}}]});
        // Messages: text blocks, a tool_use whose input arrives in pieces, the stop reason.
        let messages = |parts: &[&str], stop: &str| {
            let mut ev = vec![
                json!({"type": "message_start", "message": {"content": []}}),
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Booking."}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "t", "name": "book", "input": {}}}),
            ];
            for p in parts {
                ev.push(json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": p}}));
            }
            ev.push(json!({"type": "message_delta", "delta": {"stop_reason": stop}}));
            sse(&ev)
        };
        let v = all();
        assert!(check_stream(
            &v,
            &tools,
            &messages(&["{\"ci", "ty\": \"Oslo\"}"], "tool_use")
        )
        .is_ok());
        let e = check_stream(&v, &tools, &messages(&["{\"town\": 1}"], "tool_use")).unwrap_err();
        assert!(e.contains("do not match its schema"), "{e}");
        let e = check_stream(&v, &tools, &messages(&["{\"ci"], "tool_use")).unwrap_err();
        assert!(e.contains("not JSON"), "{e}");
        let e = check_stream(
            &v,
            &tools,
            &messages(&["{\"city\": \"Oslo\"}"], "max_tokens"),
        )
        .unwrap_err();
        assert!(e.contains("token limit"), "{e}");
        let e = check_stream(&v, &tools, &messages(&["{}"], "refusal")).unwrap_err();
        assert!(e.contains("refused"), "{e}");

        // Chat: content and tool-call arguments by index, the finish reason.
        let chat = sse(&[
            json!({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "{\"city\": "}}]}),
            json!({"choices": [{"index": 0, "delta": {"content": "\"Oslo\", \"days\": 2}"}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
            json!({"choices": [], "usage": {"prompt_tokens": 1}}),
        ]);
        let wants = json!({"response_format": {"type": "json_schema", "json_schema": {"schema":
            {"type": "object", "required": ["city", "days"]}}}});
        assert!(check_stream(&v, &wants, &chat).is_ok());
        let strict = json!({"response_format": {"type": "json_schema", "json_schema": {"schema":
            {"type": "object", "required": ["weather"]}}}});
        assert!(check_stream(&v, &strict, &chat).is_err());
        let calls = sse(&[
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "id": "c", "function": {"name": "book", "arguments": ""}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Rome\"}"}}]}}]}),
            json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}),
        ]);
        let chat_tools = json!({"tools": [{"type": "function", "function": {"name": "book",
            "parameters": {"type": "object", "required": ["city"]}}}]});
        assert!(check_stream(&v, &chat_tools, &calls).is_ok());
        let e = check_stream(&v, &json!({}), &calls).unwrap_err();
        assert!(e.contains("does not declare"), "{e}");
        assert!(check_stream(&v, &json!({}), &sse(&[]))
            .unwrap_err()
            .contains("empty"));

        // Responses: the terminal event carries the whole response.
        let responses = |status: &str| {
            sse(&[
                json!({"type": "response.created", "response": {"status": "in_progress", "output": []}}),
                json!({"type": "response.output_text.delta", "delta": "hi"}),
                json!({"type": if status == "completed" { "response.completed" } else { "response.incomplete" },
                       "response": {"status": status, "output": [{"type": "message",
                           "content": [{"type": "output_text", "text": "hi there"}]}]}}),
            ])
        };
        assert!(check_stream(&v, &json!({}), &responses("completed")).is_ok());
        let e = check_stream(&v, &json!({}), &responses("incomplete")).unwrap_err();
        assert!(e.contains("token limit"), "{e}");
    }

    #[test]
    fn the_schema_subset_finds_what_structured_outputs_get_wrong() {
        let schema = json!({"type": "object", "additionalProperties": false,
            "required": ["city", "days"],
            "properties": {"city": {"type": "string", "minLength": 1},
                           "days": {"type": "integer", "minimum": 1, "maximum": 14},
                           "units": {"enum": ["c", "f"]},
                           "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}});
        assert!(valid(&schema, &json!({"city": "Oslo", "days": 3}), "$", 0).is_ok());
        for (bad, why) in [
            (json!({"city": "Oslo"}), "'days' is required"),
            (json!({"city": "Oslo", "days": 30}), "$.days: out of range"),
            (
                json!({"city": "Oslo", "days": 1.5}),
                "$.days: not a integer",
            ),
            (
                json!({"city": "", "days": 1}),
                "$.city: a string of the wrong length",
            ),
            (
                json!({"city": "Oslo", "days": 1, "units": "k"}),
                "$.units: not one of",
            ),
            (
                json!({"city": "Oslo", "days": 1, "x": 1}),
                "'x' is not allowed",
            ),
            (
                json!({"city": "Oslo", "days": 1, "tags": ["a", 2]}),
                "$.tags[1]: not a string",
            ),
            (json!([1]), "$: not a object"),
        ] {
            let e = valid(&schema, &bad, "$", 0).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let any = json!({"anyOf": [{"type": "string"}, {"type": "null"}]});
        assert!(valid(&any, &json!(null), "$", 0).is_ok());
        assert!(valid(&any, &json!(1), "$", 0).is_err());
        // A schema nested past the bound is refused, not followed.
        let mut deep = json!({"type": "object"});
        for _ in 0..100 {
            deep = json!({"properties": {"a": deep}});
        }
        let mut doc = json!(1);
        for _ in 0..100 {
            doc = json!({"a": doc});
        }
        assert!(valid(&deep, &doc, "$", 0).unwrap_err().contains("deeper"));
    }

    #[test]
    fn each_check_fails_its_own_answer() {
        let v = all();
        let req = json!({"response_format": {"type": "json_schema", "json_schema":
            {"name": "w", "schema": {"type": "object", "required": ["ok"]}}}});
        assert!(check(
            &v,
            &req,
            &chat(json!({"content": "{\"ok\": true}"}), "stop")
        )
        .is_ok());
        let fails = |answer: Vec<u8>, request: &Value| check(&v, request, &answer).unwrap_err();
        assert!(fails(chat(json!({"content": "sure!"}), "stop"), &req).contains("not the JSON"));
        assert!(fails(chat(json!({"content": "{}"}), "stop"), &req).contains("'ok' is required"));
        let plain = json!({});
        assert!(fails(chat(json!({"content": "a b"}), "length"), &plain).contains("token limit"));
        assert!(fails(chat(json!({"content": " "}), "stop"), &plain).contains("empty"));
        assert!(fails(
            chat(json!({"content": null, "refusal": "I can't"}), "stop"),
            &plain
        )
        .contains("refused"));
        let tools = json!({"tools": [{"type": "function", "function": {"name": "get",
            "parameters": {"type": "object", "required": ["id"]}}}]});
        let call = |name: &str, args: &str| {
            chat(
                json!({"content": null, "tool_calls": [{"id": "c", "type": "function",
                    "function": {"name": name, "arguments": args}}]}),
                "tool_calls",
            )
        };
        assert!(check(&v, &tools, &call("get", "{\"id\": 1}")).is_ok());
        assert!(fails(call("get", "{}"), &tools).contains("do not match its schema"));
        assert!(fails(call("get", "{"), &tools).contains("not JSON"));
        assert!(fails(call("put", "{}"), &tools).contains("does not declare"));
        let re = Validators {
            must_match: Some(fancy_regex::Regex::new(r"^\d+$").unwrap()),
            ..all()
        };
        assert!(check(&re, &plain, &chat(json!({"content": "42"}), "stop")).is_ok());
        assert!(check(&re, &plain, &chat(json!({"content": "forty"}), "stop")).is_err());
        // Messages and Responses read the same way.
        let messages = json!({"type": "message", "content": [{"type": "text", "text": "x"}],
                              "stop_reason": "max_tokens"});
        assert!(fails(messages.to_string().into_bytes(), &plain).contains("token limit"));
        let responses = json!({"output": [{"type": "message", "content":
            [{"type": "refusal", "refusal": "no"}]}], "status": "completed"});
        assert!(fails(responses.to_string().into_bytes(), &plain).contains("refused"));
    }
}
