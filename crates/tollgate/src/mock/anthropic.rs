//! The mock's Anthropic side: Messages (JSON and stream, tool use, cache classes) and
//! `count_tokens`.

use super::*;

pub(crate) fn anthropic_usage(prompt: u64, output: u64, b: &Behaviour) -> Value {
    let read = if b.has("cached") { prompt / 2 } else { 0 };
    let (w5, w1) = if b.has("cachewrite") {
        (prompt / 4, prompt / 8)
    } else {
        (0, 0)
    };
    json!({
        "input_tokens": prompt - read - w5 - w1,
        "output_tokens": output,
        "cache_read_input_tokens": read,
        "cache_creation_input_tokens": w5 + w1,
        "cache_creation": {"ephemeral_5m_input_tokens": w5, "ephemeral_1h_input_tokens": w1},
    })
}

pub(crate) fn anthropic_prompt_tokens(req: &Value) -> u64 {
    let mut text = String::new();
    for f in ["system", "messages", "tools"] {
        collect_text(req.get(f).unwrap_or(&Value::Null), &mut text);
    }
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, Vec::len) as u64;
    (text.len() as u64).div_ceil(4) + 3 * messages + 1
}

pub(crate) async fn messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.arrived(&headers);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            anthropic_error_body("invalid_request_error", "invalid JSON body"),
        );
    };
    if headers.get("anthropic-version").is_none() {
        return json_response(
            StatusCode::BAD_REQUEST,
            anthropic_error_body(
                "invalid_request_error",
                "anthropic-version: header is required",
            ),
        );
    }
    let Some(max) = req.get("max_tokens").and_then(Value::as_u64) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            anthropic_error_body("invalid_request_error", "max_tokens: Field required"),
        );
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let b = Behaviour::from(&model, &headers);
    if let Some(r) = state.failure(&b, &headers).await {
        return to_anthropic(r);
    }
    let prompt = anthropic_prompt_tokens(&req);
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let id = format!("msg_mock{:x}", state.stats.requests.load(Ordering::Relaxed));
    let ask = ToolAsk::messages(&req);
    let tool = ask.decide(&b);
    // Unique per call, as at Anthropic: agents key their tool results by it.
    let tool_id = id.replace("msg_", "toolu_");
    let n = b.output_tokens().min(b.cap(max));
    let pieces = answer_pieces(&b, &req, ask.user_text, n);
    let (output, stop) = match &tool {
        Some((name, input)) => (
            (name.len() + input.to_string().len()).div_ceil(4) as u64,
            "tool_use",
        ),
        None => (
            n,
            if n < b.output_tokens() {
                "max_tokens"
            } else {
                "end_turn"
            },
        ),
    };
    let usage = anthropic_usage(prompt, output, &b);
    let field = |f: &str| usage[f].as_u64().unwrap_or(0);
    state.bill(
        "anthropic",
        &model,
        &b,
        billing::Billed {
            input: prompt,
            cached: field("cache_read_input_tokens"),
            write_5m: usage["cache_creation"]["ephemeral_5m_input_tokens"]
                .as_u64()
                .unwrap_or(0),
            write_1h: usage["cache_creation"]["ephemeral_1h_input_tokens"]
                .as_u64()
                .unwrap_or(0),
            output: field("output_tokens"),
            ..Default::default()
        },
    );

    if !stream {
        b.json_delay().await;
        let content = match &tool {
            Some((name, input)) => {
                json!([{"type": "tool_use", "id": tool_id, "name": name, "input": input}])
            }
            None => json!([{"type": "text", "text": pieces.concat()}]),
        };
        let mut resp = json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop, "stop_sequence": null});
        if !b.has("nousage") {
            resp["usage"] = usage;
        }
        return json_response(StatusCode::OK, resp.to_string().into_bytes());
    }

    let ev = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut start_usage = usage.clone();
    start_usage["output_tokens"] = json!(1);
    let mut message = json!({"id": id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null});
    if !b.has("nousage") {
        message["usage"] = start_usage;
    }
    let mut events = vec![ev(
        "message_start",
        json!({"type": "message_start", "message": message}),
    )];
    match &tool {
        Some((name, input)) => {
            events.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": tool_id, "name": name, "input": {}}}),
            ));
            events.push(ev("ping", json!({"type": "ping"})));
            let chars: Vec<char> = input.to_string().chars().collect();
            for part in chars.chunks(8) {
                let part: String = part.iter().collect();
                events.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "input_json_delta", "partial_json": part}}),
                ));
            }
        }
        None => {
            events.push(ev(
                "content_block_start",
                json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "text", "text": ""}}),
            ));
            events.push(ev("ping", json!({"type": "ping"})));
            for p in &pieces {
                events.push(ev(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": p}}),
                ));
            }
        }
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut delta =
        json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null}});
    if !b.has("nousage") {
        // As the API sends it: cumulative, the input side repeated from `message_start`.
        delta["usage"] = json!({"input_tokens": usage["input_tokens"], "output_tokens": output,
            "cache_creation_input_tokens": usage["cache_creation_input_tokens"],
            "cache_read_input_tokens": usage["cache_read_input_tokens"]});
    }
    events.push(ev("message_delta", delta));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    if b.has("errorevent") {
        events.truncate(5);
        let e = json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}});
        events.push(format!("event: error\ndata: {e}\n\n"));
    }
    stream_events(&state, &b, events)
}

pub(crate) async fn count_tokens(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.arrived(&headers);
    let Ok(req) = serde_json::from_slice::<Value>(&body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            anthropic_error_body("invalid_request_error", "invalid JSON body"),
        );
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock")
        .to_string();
    let b = Behaviour::from(&model, &headers);
    if let Some(r) = state.failure(&b, &headers).await {
        return to_anthropic(r);
    }
    json_response(
        StatusCode::OK,
        json!({"input_tokens": anthropic_prompt_tokens(&req)})
            .to_string()
            .into_bytes(),
    )
}

// ---------------------------------------------------------------------------------------
// OpenAI Responses
