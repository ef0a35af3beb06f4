//! The mock provider: OpenAI's wire format with deterministic content, realistic usage
//! blocks, and every failure a test needs, chosen by the model name (or the
//! `x-mock-behavior` header, which wins) so tests drive each path through the real gateway:
//!
//! | flag in the name  | behaviour                                                          |
//! |-------------------|--------------------------------------------------------------------|
//! | `429`             | 429 with `Retry-After` (seconds from `x-mock-retry-after`, else 1) |
//! | `500`             | 500 with an OpenAI error body                                      |
//! | `flaky-N`         | the first N requests for this model name get 500, then success    |
//! | `slow`            | 200 ms before a JSON answer, 50 ms between stream chunks           |
//! | `stall`           | JSON: never answers; stream: two chunks, then silence              |
//! | `truncate`        | the connection drops half way (no usage, no `[DONE]`)              |
//! | `nousage`         | no usage block anywhere                                            |
//! | `long`            | 200 output tokens instead of 16                                    |
//! | `cached`          | half the prompt reported as cached                                 |
//! | `cachewrite`      | Messages: a quarter of the prompt to the 5-minute cache, an eighth to the 1-hour one |
//! | `errorevent`      | a stream that reports an in-band error event after a few events   |
//! | `reasoning`       | 8 reasoning tokens on top of the output                            |
//! | `overrun`         | ignores `max_tokens` (a provider that writes past the cap)         |
//! | `lag`             | a stream's first event comes 300 ms after the head                 |
//!
//! Output is one token per word, so the usage it reports is exact for what it sends.

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::HeaderValue;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tollgate_proto::error::{anthropic_error_body, openai_error_body};

const WORDS: &[&str] = &[
    "The",
    "mock",
    "provider",
    "answers",
    "every",
    "request",
    "with",
    "the",
    "same",
    "calm",
    "and",
    "predictable",
    "words",
    "so",
    "tests",
    "can",
    "count",
    "each",
    "token",
    "it",
    "bills",
];
const DEFAULT_OUTPUT_TOKENS: u64 = 16;
const LONG_OUTPUT_TOKENS: u64 = 200;
pub const MOCK_MODELS: &[&str] = &[
    "mock",
    "mock-long",
    "mock-slow",
    "mock-stall",
    "mock-truncate",
    "mock-nousage",
    "mock-429",
    "mock-500",
    "mock-embed",
    "mock-cached",
    "mock-cachewrite",
];

#[derive(Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_cancelled: AtomicU64,
}

#[derive(Default)]
struct MockState {
    /// When set, requests must carry `Authorization: Bearer <api_key>`.
    api_key: Option<String>,
    flaky_seen: Mutex<HashMap<String, u64>>,
    stats: MockStats,
}

pub fn router(api_key: Option<String>) -> Router {
    let state = Arc::new(MockState {
        api_key,
        ..MockState::default()
    });
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(messages))
        .route("/v1/responses", post(responses))
        .route("/v1/messages/count_tokens", post(count_tokens))
        .route("/v1/models", get(models))
        .route("/mock/stats", get(stats))
        .with_state(state)
}

/// Serves the mock on a listener until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    api_key: Option<String>,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // Without TCP_NODELAY, small SSE writes wait for the peer's delayed ACK (~40 ms each).
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, router(api_key)).await
}

struct Behaviour {
    flags: String,
    retry_after: u64,
}

impl Behaviour {
    fn from(model: &str, headers: &HeaderMap) -> Behaviour {
        let header = headers.get("x-mock-behavior").and_then(|v| v.to_str().ok());
        let retry_after = headers
            .get("x-mock-retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        Behaviour {
            flags: header.unwrap_or(model).to_string(),
            retry_after,
        }
    }
    fn has(&self, flag: &str) -> bool {
        self.flags.split('-').any(|f| f == flag)
    }
    fn flaky(&self) -> Option<u64> {
        let mut parts = self.flags.split('-');
        while let Some(p) = parts.next() {
            if p == "flaky" {
                return parts.next().and_then(|n| n.parse().ok());
            }
        }
        None
    }
    /// `stall`: never answer; `slow`: answer after 200 ms.
    async fn json_delay(&self) {
        if self.has("stall") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.has("slow") {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `overrun`: a misbehaving provider that writes past the request's `max_tokens`.
    fn cap(&self, max: u64) -> u64 {
        if self.has("overrun") {
            u64::MAX
        } else {
            max
        }
    }

    fn output_tokens(&self) -> u64 {
        if self.has("long") {
            LONG_OUTPUT_TOKENS
        } else {
            DEFAULT_OUTPUT_TOKENS
        }
    }
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    json_response(status, openai_error_body(message, kind, None, Some(code)))
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// An OpenAI-shaped error answer re-shaped for Anthropic's dialect, as Anthropic writes it.
fn to_anthropic(r: Response) -> Response {
    let status = r.status();
    let kind = match status.as_u16() {
        401 => "authentication_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        400 => "invalid_request_error",
        _ => "api_error",
    };
    let retry = r.headers().get("retry-after").cloned();
    let mut out = json_response(status, anthropic_error_body(kind, "mock failure"));
    if let Some(v) = retry {
        out.headers_mut().insert("retry-after", v);
    }
    out
}

impl MockState {
    /// The failures every endpoint shares. `None` means: answer normally.
    async fn failure(&self, b: &Behaviour, headers: &HeaderMap) -> Option<Response> {
        if let Some(key) = &self.api_key {
            let bearer = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            let x_api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
            let ok = bearer.or(x_api_key).is_some_and(|v| v == key);
            if !ok {
                return Some(error(
                    StatusCode::UNAUTHORIZED,
                    "Incorrect API key provided.",
                    "invalid_request_error",
                    "invalid_api_key",
                ));
            }
        }
        if b.has("429") {
            let mut r = error(
                StatusCode::TOO_MANY_REQUESTS,
                "Rate limit reached for requests. Please try again later.",
                "requests",
                "rate_limit_exceeded",
            );
            r.headers_mut().insert("retry-after", b.retry_after.into());
            r.headers_mut()
                .insert("x-ratelimit-remaining-requests", 0.into());
            return Some(r);
        }
        if b.has("500") {
            return Some(error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error processing your request.",
                "server_error",
                "internal_error",
            ));
        }
        if let Some(n) = b.flaky() {
            let mut seen = self.flaky_seen.lock().unwrap_or_else(|p| p.into_inner());
            let count = seen.entry(b.flags.clone()).or_insert(0);
            *count += 1;
            if *count <= n {
                return Some(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "Flaky mock failure.",
                    "server_error",
                    "internal_error",
                ));
            }
        }
        None
    }
}

/// What every OpenAI-dialect endpoint does first: count the request, parse it, pick the
/// behaviour from the model name, and fail if the behaviour says so.
async fn openai_preamble(
    state: &MockState,
    headers: &HeaderMap,
    body: &[u8],
    default_model: &str,
) -> Result<(Value, String, Behaviour), Response> {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "We could not parse the JSON body of your request.",
            "invalid_request_error",
            "invalid_json",
        ));
    };
    let model = req
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(default_model)
        .to_string();
    let b = Behaviour::from(&model, headers);
    if let Some(r) = state.failure(&b, headers).await {
        return Err(r);
    }
    Ok((req, model, b))
}

fn prompt_tokens(req: &Value) -> u64 {
    let mut text = String::new();
    collect_text(req.get("messages").unwrap_or(&Value::Null), &mut text);
    collect_text(req.get("input").unwrap_or(&Value::Null), &mut text);
    collect_text(req.get("tools").unwrap_or(&Value::Null), &mut text);
    let messages = req
        .get("messages")
        .and_then(Value::as_array)
        .map_or(0, Vec::len) as u64;
    (text.len() as u64).div_ceil(4) + 3 * messages + 1
}

fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(a) => a.iter().for_each(|x| collect_text(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_text(x, out)),
        _ => {}
    }
}

fn usage_json(prompt: u64, completion: u64, b: &Behaviour) -> Value {
    let cached = if b.has("cached") { prompt / 2 } else { 0 };
    let reasoning = if b.has("reasoning") { 8 } else { 0 };
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion + reasoning,
        "total_tokens": prompt + completion + reasoning,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}
    })
}

/// The tool call the mock makes: the chosen (or first) function, with every required string
/// argument set to "mock" and numbers to 1.
fn tool_call(req: &Value) -> Option<(String, String)> {
    let tools = req.get("tools")?.as_array()?;
    if tools.is_empty() || req.get("tool_choice").and_then(Value::as_str) == Some("none") {
        return None;
    }
    let last_role = req
        .get("messages")?
        .as_array()?
        .last()?
        .get("role")?
        .as_str()?;
    if last_role == "tool" {
        return None;
    }
    let wanted = req
        .pointer("/tool_choice/function/name")
        .and_then(Value::as_str);
    let func = tools
        .iter()
        .filter_map(|t| t.get("function"))
        .find(|f| wanted.is_none_or(|w| f.get("name").and_then(Value::as_str) == Some(w)))?;
    let name = func.get("name")?.as_str()?.to_string();
    let mut args = serde_json::Map::new();
    let props = func
        .pointer("/parameters/properties")
        .and_then(Value::as_object);
    for req_name in func
        .pointer("/parameters/required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(req_name) = req_name.as_str() else {
            continue;
        };
        let ty = props
            .and_then(|p| p.get(req_name))
            .and_then(|p| p.get("type"))
            .and_then(Value::as_str);
        let v = match ty {
            Some("number" | "integer") => json!(1),
            Some("boolean") => json!(true),
            Some("array") => json!([]),
            Some("object") => json!({}),
            _ => json!("mock"),
        };
        args.insert(req_name.to_string(), v);
    }
    Some((name, Value::Object(args).to_string()))
}

fn words(n: u64) -> Vec<String> {
    (0..n as usize)
        .map(|i| {
            format!(
                "{}{}",
                if i == 0 { "" } else { " " },
                WORDS[i % WORDS.len()]
            )
        })
        .collect()
}

async fn chat(State(state): State<Arc<MockState>>, headers: HeaderMap, body: Bytes) -> Response {
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
    let call = tool_call(&req);
    let n = b.output_tokens().min(b.cap(max));
    let pieces = words(n);
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

    if !stream {
        b.json_delay().await;
        let message = match &call {
            Some((name, args)) => json!({"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_mock0", "type": "function", "function": {"name": name, "arguments": args}}]}),
            None => json!({"role": "assistant", "content": pieces.concat(), "refusal": null}),
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
                json!({"role": "assistant", "content": null, "tool_calls": [{"index": 0, "id": "call_mock0",
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
        None => {
            events.push(chunk(
                json!({"role": "assistant", "content": "", "refusal": null}),
                None,
            ));
            for p in &pieces {
                events.push(chunk(json!({"content": p}), None));
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

async fn embeddings(
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
            json!({"object": "embedding", "index": i, "embedding": v})
        })
        .collect();
    let mut resp = json!({"object": "list", "data": data, "model": model});
    if !b.has("nousage") {
        resp["usage"] = json!({"prompt_tokens": tokens, "total_tokens": tokens});
    }
    axum::Json(resp).into_response()
}

async fn models() -> Response {
    let data: Vec<Value> = MOCK_MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": "tollgate-mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn stats(State(state): State<Arc<MockState>>) -> Response {
    axum::Json(json!({
        "requests": state.stats.requests.load(Ordering::Relaxed),
        "streams_completed": state.stats.streams_completed.load(Ordering::Relaxed),
        "streams_cancelled": state.stats.streams_cancelled.load(Ordering::Relaxed),
    }))
    .into_response()
}

/// Sends prepared SSE events with the behaviour's pacing and failures, counting completed and
/// cancelled streams so tests can see what the gateway did to the upstream connection.
fn stream_events(state: &Arc<MockState>, b: &Behaviour, events: Vec<String>) -> Response {
    let (tx, mut rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let stall = b.has("stall");
    let truncate = b.has("truncate");
    let gap = if b.has("slow") {
        Duration::from_millis(50)
    } else {
        Duration::ZERO
    };
    let lag = b.has("lag");
    let stats = state.clone();
    tokio::spawn(async move {
        if lag {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        let total = events.len();
        for (i, ev) in events.into_iter().enumerate() {
            if (stall && i == 2) || (truncate && i == total / 2) {
                if truncate {
                    let _ = tx.send(Err(std::io::Error::other("mock truncation"))).await;
                    return;
                }
                // Silence until the client gives up.
                tx.closed().await;
                stats
                    .stats
                    .streams_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            if !gap.is_zero() && i > 0 {
                tokio::select! {
                    _ = tokio::time::sleep(gap) => {}
                    _ = tx.closed() => {}
                }
            }
            if tx.send(Ok(Bytes::from(ev))).await.is_err() {
                stats
                    .stats
                    .streams_cancelled
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
        }
        stats
            .stats
            .streams_completed
            .fetch_add(1, Ordering::Relaxed);
    });
    let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(
        "content-type",
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert("cache-control", HeaderValue::from_static("no-cache"));
    r
}

// ---------------------------------------------------------------------------------------
// Anthropic Messages

/// The tool_use the mock makes in Messages: the chosen (or first) tool, arguments built from
/// its `input_schema` as in the chat dialect.
fn anthropic_tool_use(req: &Value) -> Option<(String, Value)> {
    let tools = req.get("tools")?.as_array()?;
    if tools.is_empty() || req.pointer("/tool_choice/type").and_then(Value::as_str) == Some("none")
    {
        return None;
    }
    let last = req.get("messages")?.as_array()?.last()?;
    let answered = last
        .get("content")
        .and_then(Value::as_array)
        .is_some_and(|blocks| {
            blocks
                .iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    if answered {
        return None;
    }
    let wanted = req.pointer("/tool_choice/name").and_then(Value::as_str);
    let tool = tools
        .iter()
        .find(|t| wanted.is_none_or(|w| t.get("name").and_then(Value::as_str) == Some(w)))?;
    let as_chat =
        json!({"function": {"name": tool.get("name")?, "parameters": tool.get("input_schema")?}});
    let (name, args) = tool_call(&json!({"tools": [as_chat], "messages": [{"role": "user"}]}))?;
    Some((name, serde_json::from_str(&args).ok()?))
}

fn anthropic_usage(prompt: u64, output: u64, b: &Behaviour) -> Value {
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

fn anthropic_prompt_tokens(req: &Value) -> u64 {
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

async fn messages(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
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
    let tool = anthropic_tool_use(&req);
    let n = b.output_tokens().min(b.cap(max));
    let pieces = words(n);
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

    if !stream {
        b.json_delay().await;
        let content = match &tool {
            Some((name, input)) => {
                json!([{"type": "tool_use", "id": "toolu_mock0", "name": name, "input": input}])
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
            events.push(ev("content_block_start", json!({"type": "content_block_start", "index": 0,
                "content_block": {"type": "tool_use", "id": "toolu_mock0", "name": name, "input": {}}})));
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
        delta["usage"] = json!({"output_tokens": output});
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

async fn count_tokens(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    state.stats.requests.fetch_add(1, Ordering::Relaxed);
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

async fn responses(
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
    let prompt = (text.len() as u64).div_ceil(4) + 4;
    let max = req
        .get("max_output_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(u64::MAX);
    let n = b.output_tokens().min(b.cap(max));
    let pieces = words(n);
    let reasoning = if b.has("reasoning") { 8 } else { 0 };
    let cached = if b.has("cached") { prompt / 2 } else { 0 };
    let seq = state.stats.requests.load(Ordering::Relaxed);
    let id = format!("resp_mock{seq:x}");
    let item_id = format!("msg_mock{seq:x}");
    let usage = json!({"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": n + reasoning, "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + n + reasoning});
    let status = if n < b.output_tokens() {
        "incomplete"
    } else {
        "completed"
    };
    let response = |status: &str, output: Value, usage: Value| {
        json!({"id": id, "object": "response", "created_at": 1_700_000_000u64, "status": status, "model": model,
            "output": output, "parallel_tool_calls": true, "tool_choice": "auto", "tools": [], "temperature": 1.0,
            "top_p": 1.0, "error": null, "incomplete_details": null, "instructions": req.get("instructions"),
            "metadata": {}, "usage": usage})
    };
    let message = |text: &str| {
        json!({"type": "message", "id": item_id, "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}]})
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    if !stream {
        b.json_delay().await;
        let usage = if b.has("nousage") { Value::Null } else { usage };
        return json_response(
            StatusCode::OK,
            response(status, json!([message(&pieces.concat())]), usage)
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
    let full = pieces.concat();
    ev(
        "response.output_text.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0, "text": full}),
    );
    ev(
        "response.content_part.done",
        json!({"item_id": item_id, "output_index": 0, "content_index": 0,
        "part": {"type": "output_text", "text": full, "annotations": []}}),
    );
    ev(
        "response.output_item.done",
        json!({"output_index": 0, "item": message(&full)}),
    );
    let usage = if b.has("nousage") { Value::Null } else { usage };
    let terminal = if status == "completed" {
        "response.completed"
    } else {
        "response.incomplete"
    };
    ev(
        terminal,
        json!({"response": response(status, json!([message(&full)]), usage)}),
    );
    if b.has("errorevent") {
        events.truncate(5);
        let e = json!({"type": "error", "code": "server_error", "message": "The server is overloaded.", "param": null});
        events.push(format!("event: error\ndata: {e}\n\n"));
    }
    stream_events(&state, &b, events)
}
