//! The mock's OpenAI side: Chat Completions (JSON and stream, tool calls), Responses and
//! Embeddings.

use super::*;
use base64::Engine as _;

pub(crate) async fn chat(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, model, b) = match openai_preamble(&state, &headers, &body, "mock").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let max = req
        .get("max_completion_tokens")
        .or_else(|| req.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let prompt = prompt_tokens(&req);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = req
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let id = format!(
        "chatcmpl-mock{:x}",
        state.stats.requests.load(Ordering::Relaxed)
    );
    let created = 1_700_000_000u64;
    let call_id = id.replace("chatcmpl-", "call_");
    let ask = ToolAsk::chat(&req);
    let call = ask.decide(&b).map(|(name, args)| (name, args.to_string()));
    let n = b.output_tokens().min(b.cap(max));
    let pieces = answer_pieces(&b, &req, ask.user_text, n);
    let (completion, finish) = match &call {
        Some((name, args)) => ((name.len() + args.len()).div_ceil(4) as u64, "tool_calls"),
        None => (
            n,
            if n < b.output_tokens() {
                "length"
            } else {
                "stop"
            },
        ),
    };
    let usage = usage_json(prompt, completion, &b);
    state.bill(
        "openai",
        &model,
        &b,
        billing::Billed {
            input: prompt,
            cached: usage["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0),
            output: usage["completion_tokens"].as_u64().unwrap_or(0),
            ..Default::default()
        },
    );

    // Asked for JSON: a document the schema accepts (`badjson`: prose instead).
    let wanted = req.pointer("/response_format/json_schema/schema");
    let text = match (call.is_none(), wanted, b.has("badjson")) {
        (true, _, true) => "Sure! Here is the JSON you asked for: {oops".to_string(),
        (true, Some(schema), false) => super::tools::arguments(Some(schema)).to_string(),
        _ if b.has("empty") => String::new(),
        _ => pieces.concat(),
    };
    let finish = if b.has("length") { "length" } else { finish };
    const REFUSAL: &str = "I can't help with that request.";
    if !stream {
        b.json_delay().await;
        let message = match &call {
            Some((name, args)) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}]}),
            None if b.has("refuse") => json!({"role": "assistant", "content": null,
                "refusal": REFUSAL}),
            None => json!({"role": "assistant", "content": text, "refusal": null}),
        };
        let mut resp = json!({
            "id": id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish}],
            "system_fingerprint": "fp_mock",
        });
        if !b.has("nousage") {
            resp["usage"] = usage;
        }
        let bytes = resp.to_string().into_bytes();
        if b.has("truncate") {
            let half = Bytes::from(bytes[..bytes.len() / 2].to_vec());
            // The head and the first half go out before the break, as from a provider that
            // died mid-answer (an error in the same poll would reset before the head).
            let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(2);
            tokio::spawn(async move {
                let _ = tx.send(Ok(half)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = tx.send(Err(std::io::Error::other("mock truncation"))).await;
            });
            let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
            let mut r = Response::new(Body::from_stream(body));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return r;
        }
        let mut r = (StatusCode::OK, bytes).into_response();
        r.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/json"));
        return r;
    }

    // Stream: build the whole event list, then send it with the behaviour's pacing.
    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock",
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        if include_usage {
            c["usage"] = Value::Null;
        }
        format!("data: {c}\n\n")
    };
    let mut events = Vec::new();
    match &call {
        Some((name, args)) => {
            events.push(chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": call_id,
                    "type": "function", "function": {"name": name, "arguments": ""}}]}),
                None,
            ));
            let chars: Vec<char> = args.chars().collect();
            for part in chars.chunks(8) {
                let part: String = part.iter().collect();
                events.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}),
                    None,
                ));
            }
        }
        None if b.has("refuse") => {
            events.push(chunk(
                json!({"role": "assistant", "content": null, "refusal": ""}),
                None,
            ));
            events.push(chunk(json!({"refusal": REFUSAL}), None));
        }
        None => {
            events.push(chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ));
            // The text above, in the pieces the answer is counted in unless a flag changed it.
            if text == pieces.concat() {
                for p in &pieces {
                    events.push(chunk(json!({"content": p}), None));
                }
            } else {
                for p in text.split_inclusive(' ') {
                    events.push(chunk(json!({"content": p}), None));
                }
            }
        }
    }
    events.push(chunk(json!({}), Some(finish)));
    if include_usage && !b.has("nousage") {
        let c = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": "fp_mock", "choices": [], "usage": usage});
        events.push(format!("data: {c}\n\n"));
    }
    events.push("data: [DONE]\n\n".to_string());

    if b.has("errorevent") {
        events.truncate(4);
        let e = json!({"error": {"message": "The server is overloaded.", "type": "server_error", "param": null, "code": "overloaded"}});
        events.push(format!("data: {e}\n\n"));
    }
    stream_events(&state, &b, events)
}

pub(crate) async fn embeddings(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, model, b) = match openai_preamble(&state, &headers, &body, "mock-embed").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let inputs: Vec<String> = match req.get("input") {
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::Array(a)) if a.iter().all(Value::is_number) => {
            vec![Value::Array(a.clone()).to_string()]
        }
        Some(Value::Array(a)) => a.iter().map(Value::to_string).collect(),
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "'input' is a required property",
                "invalid_request_error",
                "invalid_value",
            )
        }
    };
    // OpenAI's own bound on one request's inputs.
    if inputs.len() > 2048 {
        return error(
            StatusCode::BAD_REQUEST,
            "'$.input' is invalid: an array of at most 2048 inputs",
            "invalid_request_error",
            "invalid_value",
        );
    }
    let dims = req
        .get("dimensions")
        .and_then(Value::as_u64)
        .unwrap_or(8)
        .clamp(1, 4096) as usize;
    let base64 = match req.get("encoding_format").and_then(Value::as_str) {
        None | Some("float") => false,
        Some("base64") => true,
        Some(_) => {
            return error(
                StatusCode::BAD_REQUEST,
                "'encoding_format' must be 'float' or 'base64'",
                "invalid_request_error",
                "invalid_value",
            )
        }
    };
    let mut tokens = 0u64;
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            tokens += (text.len() as u64).div_ceil(4).max(1);
            let seed = text.bytes().fold(2166136261u32, |h, c| {
                (h ^ u32::from(c)).wrapping_mul(16777619)
            });
            let v: Vec<f64> = (0..dims)
                .map(|d| f64::from(seed.wrapping_mul(d as u32 + 1) % 2000) / 1000.0 - 1.0)
                .collect();
            // base64: the vector's little-endian f32 bytes, as OpenAI sends them (the SDKs
            // ask for this by default and decode it themselves).
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| (*x as f32).to_le_bytes()).collect();
                json!(base64::engine::general_purpose::STANDARD.encode(&bytes))
            } else {
                json!(v)
            };
            json!({"object": "embedding", "index": i, "embedding": embedding})
        })
        .collect();
    state.bill(
        "openai-embeddings",
        &model,
        &b,
        billing::Billed {
            input: tokens,
            ..Default::default()
        },
    );
    let mut resp = json!({"object": "list", "data": data, "model": model});
    if !b.has("nousage") {
        resp["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    axum::Json(resp).into_response()
}

pub(crate) async fn responses(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (req, model, b) = match openai_preamble(&state, &headers, &body, "mock").await {
        Ok(p) => p,
        Err(r) => return r,
    };
    let mut text = String::new();
    collect_text(req.get("input").unwrap_or(&Value::Null), &mut text);
    collect_text(req.get("instructions").unwrap_or(&Value::Null), &mut text);
    collect_text(req.get("tools").unwrap_or(&Value::Null), &mut text);
    let prompt = (text.len() as u64).div_ceil(4) + 4;
    let max = req
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let ask = ToolAsk::responses(&req);
    let call = ask.decide(&b);
    let n = b.output_tokens().min(b.cap(max));
    let pieces = answer_pieces(&b, &req, ask.user_text, n);
    let reasoning = if b.has("reasoning") { 8 } else { 0 };
    let cached = if b.has("cached") { prompt / 2 } else { 0 };
    let seq = state.stats.requests.load(Ordering::Relaxed);
    let id = format!("resp_mock{seq:x}");
    let item_id = format!("msg_mock{seq:x}");
    let output_tokens = match &call {
        Some((name, args)) => (name.len() + args.to_string().len()).div_ceil(4) as u64,
        None => n,
    };
    state.bill(
        "openai",
        &model,
        &b,
        billing::Billed {
            input: prompt,
            cached,
            output: output_tokens + reasoning,
            ..Default::default()
        },
    );
    let usage = json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens + reasoning, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output_tokens + reasoning});
    let status = if call.is_none() && n < b.output_tokens() {
        "incomplete"
    } else {
        "completed"
    };
    let tools = req.get("tools").cloned().unwrap_or_else(|| json!([]));
    let response = |status: &str, output: Value, usage: Value| {
        let mut r = json!({"id": id, "object": "response", "created_at": 1_700_000_000u64, "status": status, "model": model,
            "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": tools, "temperature": 1.0,
            "top_p": 1.0, "error": null, "incomplete_details": null, "instructions": req.get("instructions"),
            "metadata": {}, "usage": usage});
        if status == "incomplete" {
            r["incomplete_details"] = json!({"reason": "max_output_tokens"});
        }
        r
    };
    // The finished output item: a message, or the function call.
    let fc_id = format!("fc_mock{seq:x}");
    let call_id = format!("call_mock{seq:x}");
    let item = |text: &str| match &call {
        Some((name, args)) => json!({"type": "function_call", "id": fc_id, "call_id": call_id,
            "name": name, "arguments": args.to_string(), "status": "completed"}),
        None => {
            json!({"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
        }
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        b.json_delay().await;
        let usage = if b.has("nousage") { Value::Null } else { usage };
        return json_response(
            StatusCode::OK,
            response(status, json!([item(&pieces.concat())]), usage)
                .to_string()
                .into_bytes(),
        );
    }
    let mut events = Vec::new();
    let mut seq_no = 0u64;
    let mut ev = |name: &str, mut data: Value| {
        data["type"] = json!(name);
        data["sequence_number"] = json!(seq_no);
        seq_no += 1;
        events.push(format!("event: {name}\ndata: {data}\n\n"));
    };
    ev(
        "response.created",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    );
    ev(
        "response.in_progress",
        json!({"response": response("in_progress", json!([]), Value::Null)}),
    );
    let full = pieces.concat();
    match &call {
        Some((name, args)) => {
            ev(
                "response.output_item.added",
                json!({"output_index": 0, "item": {"type": "function_call", "id": fc_id,
                "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"}}),
            );
            let args = args.to_string();
            let chars: Vec<char> = args.chars().collect();
            for part in chars.chunks(8) {
                let part: String = part.iter().collect();
                ev(
                    "response.function_call_arguments.delta",
                    json!({"item_id": fc_id, "output_index": 0, "delta": part}),
                );
            }
            ev(
                "response.function_call_arguments.done",
                json!({"item_id": fc_id, "output_index": 0, "arguments": args}),
            );
        }
        None => {
            ev(
                "response.output_item.added",
                json!({"output_index": 0, "item": {"type": "message", "id": item_id,
                "status": "in_progress", "role": "assistant", "content": []}}),
            );
            ev(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            );
            for p in &pieces {
                ev(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": 0, "content_index": 0, "delta": p}),
                );
            }
            ev(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": full}),
            );
            ev(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": full, "annotations": []}}),
            );
        }
    }
    ev(
        "response.output_item.done",
        json!({"output_index": 0, "item": item(&full)}),
    );
    let usage = if b.has("nousage") { Value::Null } else { usage };
    let terminal = if status == "completed" {
        "response.completed"
    } else {
        "response.incomplete"
    };
    ev(
        terminal,
        json!({"response": response(status, json!([item(&full)]), usage)}),
    );
    if b.has("errorevent") {
        events.truncate(5);
        let e = json!({"type": "error", "code": "server_error", "message": "The server is overloaded.", "param": null});
        events.push(format!("event: error\ndata: {e}\n\n"));
    }
    stream_events(&state, &b, events)
}
