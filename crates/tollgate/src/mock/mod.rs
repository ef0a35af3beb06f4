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
//! | `repeat`          | calls the same tool with the same arguments after every answer (an agent loop) |
//! | `overbill`        | its usage report bills 10% more output than its answer reported    |
//! | `badjson`         | Chat: prose where `response_format` asked for JSON                 |
//! | `badargs`         | tool calls with `{}` as arguments (a schema's required fields missing) |
//! | `length`          | Chat: `finish_reason: length`                                      |
//! | `refuse`          | Chat: a refusal (`content: null`, `refusal` set)                   |
//! | `empty`           | Chat: empty content                                                |
//! | `echoreq`         | answers with the whole request body it was sent, as JSON text      |
//!
//! Asked for JSON (`response_format` with a schema), Chat answers a document the schema
//! accepts, as a model with structured outputs does. The Chat flags apply to JSON answers
//! and streams alike.
//!
//! Tools are called when the conversation asks for one (see `tools.rs`), in all three dialects.
//!
//! Output is one token per word, so the usage it reports is exact for what it sends.
//!
//! `GET /mock/stats` counts requests and streams, and lists the `traceparent`/`tracestate`
//! of the latest 64 requests that carried one.

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

mod anthropic;
mod billing;
mod openai;
mod tools;

use anthropic::*;
use openai::*;
use tools::ToolAsk;

pub(crate) const WORDS: &[&str] = &[
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

pub(crate) const DEFAULT_OUTPUT_TOKENS: u64 = 16;

pub(crate) const LONG_OUTPUT_TOKENS: u64 = 200;

pub use crate::providers::mock::MODELS as MOCK_MODELS;

#[derive(Default)]
pub struct MockStats {
    pub requests: AtomicU64,
    pub streams_completed: AtomicU64,
    pub streams_cancelled: AtomicU64,
}

#[derive(Default)]
pub(crate) struct MockState {
    /// When set, requests must carry `Authorization: Bearer <api_key>`.
    pub(crate) api_key: Option<String>,
    pub(crate) flaky_seen: Mutex<HashMap<String, u64>>,
    pub(crate) stats: MockStats,
    /// What it billed, for the usage report APIs (`billing.rs`).
    pub(crate) billed: billing::Ledger,
    /// The `traceparent` (and `tracestate`) of the latest requests, newest last, as a
    /// provider's own tracing would see them.
    pub(crate) traces: Mutex<std::collections::VecDeque<Value>>,
}

impl MockState {
    /// Counts a request, and notes the trace context it came with.
    pub(crate) fn arrived(&self, headers: &HeaderMap) {
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
        if let Some(tp) = header("traceparent") {
            let mut t = self.traces.lock().unwrap_or_else(|p| p.into_inner());
            if t.len() >= 64 {
                t.pop_front();
            }
            t.push_back(json!({"traceparent": tp, "tracestate": header("tracestate")}));
        }
    }
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
        .route(
            "/v1/organization/usage/completions",
            get(billing::openai_usage),
        )
        .route(
            "/v1/organizations/usage_report/messages",
            get(billing::anthropic_usage_report),
        )
        .route("/v1/organization/costs", get(billing::openai_costs))
        .route(
            "/v1/organizations/cost_report",
            get(billing::anthropic_cost_report),
        )
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

pub(crate) struct Behaviour {
    pub(crate) flags: String,
    pub(crate) retry_after: u64,
}

impl Behaviour {
    pub(crate) fn from(model: &str, headers: &HeaderMap) -> Behaviour {
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
    pub(crate) fn has(&self, flag: &str) -> bool {
        self.flags.split('-').any(|f| f == flag)
    }
    pub(crate) fn flaky(&self) -> Option<u64> {
        let mut parts = self.flags.split('-');
        while let Some(p) = parts.next() {
            if p == "flaky" {
                return parts.next().and_then(|n| n.parse().ok());
            }
        }
        None
    }
    /// `stall`: never answer; `slow`: answer after 200 ms.
    pub(crate) async fn json_delay(&self) {
        if self.has("stall") {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.has("slow") {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `overrun`: a misbehaving provider that writes past the request's `max_tokens`.
    pub(crate) fn cap(&self, max: u64) -> u64 {
        if self.has("overrun") {
            u64::MAX
        } else {
            max
        }
    }

    pub(crate) fn output_tokens(&self) -> u64 {
        if self.has("long") {
            LONG_OUTPUT_TOKENS
        } else {
            DEFAULT_OUTPUT_TOKENS
        }
    }
}

pub(crate) fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    json_response(status, openai_error_body(message, kind, None, Some(code)))
}

pub(crate) fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

/// An OpenAI-shaped error answer re-shaped for Anthropic's dialect, as Anthropic writes it.
pub(crate) fn to_anthropic(r: Response) -> Response {
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
    pub(crate) async fn failure(&self, b: &Behaviour, headers: &HeaderMap) -> Option<Response> {
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
pub(crate) async fn openai_preamble(
    state: &MockState,
    headers: &HeaderMap,
    body: &[u8],
    default_model: &str,
) -> Result<(Value, String, Behaviour), Response> {
    state.arrived(headers);
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

pub(crate) fn prompt_tokens(req: &Value) -> u64 {
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

pub(crate) fn collect_text(v: &Value, out: &mut String) {
    match v {
        Value::String(s) => out.push_str(s),
        Value::Array(a) => a.iter().for_each(|x| collect_text(x, out)),
        Value::Object(m) => m.values().for_each(|x| collect_text(x, out)),
        _ => {}
    }
}

pub(crate) fn usage_json(prompt: u64, completion: u64, b: &Behaviour) -> Value {
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

/// What the mock answers, in the pieces a stream sends: `n` words; with the `echo` flag the
/// latest user text; with `echoall` the whole conversation as JSON (what the provider was
/// sent); with `pii` a sentence full of personal data and secrets. All but words are cut
/// every 5 characters, so a value is split across events as a real model's tokens split it.
pub(crate) fn answer_pieces(b: &Behaviour, req: &Value, user_text: &str, n: u64) -> Vec<String> {
    const PII: &str = "Reach Jane at jane.doe@example.com or +1 415 555 2671; card 4111 1111 1111 1111, IBAN DE89 3704 0044 0532 0130 00, key AKIAIOSFODNN7EXAMPLE.";
    let all;
    let text = if b.has("echoreq") {
        all = req.to_string();
        &all
    } else if b.has("echoall") {
        all = [req.get("system"), req.get("messages"), req.get("input")]
            .into_iter()
            .flatten()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n");
        &all
    } else if b.has("echo") {
        user_text
    } else if b.has("pii") {
        PII
    } else {
        return words(n);
    };
    let chars: Vec<char> = text.chars().collect();
    chars.chunks(5).map(|c| c.iter().collect()).collect()
}

pub(crate) fn words(n: u64) -> Vec<String> {
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

pub(crate) async fn models() -> Response {
    let data: Vec<Value> = MOCK_MODELS
        .iter()
        .map(|m| json!({"id": m, "object": "model", "created": 1_700_000_000u64, "owned_by": "tollgate-mock"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

pub(crate) async fn stats(State(state): State<Arc<MockState>>) -> Response {
    axum::Json(json!({
        "requests": state.stats.requests.load(Ordering::Relaxed),
        "streams_completed": state.stats.streams_completed.load(Ordering::Relaxed),
        "streams_cancelled": state.stats.streams_cancelled.load(Ordering::Relaxed),
        "traces": *state.traces.lock().unwrap_or_else(|p| p.into_inner()),
    }))
    .into_response()
}

/// Sends prepared SSE events with the behaviour's pacing and failures, counting completed and
/// cancelled streams so tests can see what the gateway did to the upstream connection.
pub(crate) fn stream_events(
    state: &Arc<MockState>,
    b: &Behaviour,
    events: Vec<String>,
) -> Response {
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
