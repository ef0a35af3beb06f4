//! The life of a request, top to bottom.
//!
//! accept → authenticate → peek → authorize → route → forward → settle
//!
//! Each phase is a function with one job. `Settlement` is created as soon as the caller is
//! known and records exactly one usage record however the request ends: success, upstream
//! failure, client disconnect (its `Drop`), or a stream cut short.

use crate::clock::{new_request_id, now_ms, now_us};
use crate::config::ProviderKind;
use crate::error::{ApiError, Dialect, ErrorKind};
use crate::estimate;
use crate::keys::{KeyRecord, KeyStatus};
use crate::limits::{Admission, Check, Class, Decision, Limits, Refusal, Scope};
use crate::metrics::{RefusalLabels, RequestLabels, ReuseLabels, ScopeLabels, UpstreamLabels};
use crate::prices::PriceTable;
use crate::records::UsageRecord;
use crate::state::AppState;
use crate::upstream::{self, Deployment, Runtime};
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::BodyExt;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tollgate_proto::error::anthropic_error_event;
use tollgate_proto::error::openai_error_event;
use tollgate_proto::sse::EventKind;
use tollgate_proto::translate;
use tollgate_proto::{
    ChatStreamObserver, MessagesStreamObserver, RequestDoc, ResponsesStreamObserver, SseSplitter,
    Usage,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Messages,
    CountTokens,
    Responses,
}

impl Endpoint {
    fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "messages.count_tokens",
        }
    }
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::ChatCompletions | Endpoint::Embeddings | Endpoint::Responses => {
                Dialect::OpenAi
            }
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
        }
    }
    /// Whether a provider of this kind can serve the endpoint, natively or through translation.
    fn served_by(self, kind: ProviderKind) -> bool {
        match kind {
            ProviderKind::Mock => true,
            // Chat Completions and Messages reach each other's providers through translation.
            ProviderKind::Openai => self.dialect() == Dialect::OpenAi || self == Endpoint::Messages,
            ProviderKind::Anthropic => {
                self.dialect() == Dialect::Anthropic || self == Endpoint::ChatCompletions
            }
        }
    }
    /// The endpoint to call on a provider of this kind.
    fn for_provider(self, kind: ProviderKind) -> Endpoint {
        match (self, kind) {
            (Endpoint::ChatCompletions, ProviderKind::Anthropic) => Endpoint::Messages,
            (Endpoint::Messages, ProviderKind::Openai) => Endpoint::ChatCompletions,
            _ => self,
        }
    }
    fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses
        )
    }
    fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Messages => "/messages",
            Endpoint::CountTokens => "/messages/count_tokens",
        }
    }
}

pub async fn chat_completions(State(app): State<Arc<AppState>>, req: Request) -> Response {
    handle(app, Endpoint::ChatCompletions, req).await
}

pub async fn embeddings(State(app): State<Arc<AppState>>, req: Request) -> Response {
    handle(app, Endpoint::Embeddings, req).await
}

pub async fn messages(State(app): State<Arc<AppState>>, req: Request) -> Response {
    handle(app, Endpoint::Messages, req).await
}

pub async fn responses(State(app): State<Arc<AppState>>, req: Request) -> Response {
    handle(app, Endpoint::Responses, req).await
}

pub async fn count_tokens(State(app): State<Arc<AppState>>, req: Request) -> Response {
    handle(app, Endpoint::CountTokens, req).await
}

async fn handle(app: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    let started = Instant::now();
    let request_id = new_request_id();
    let (parts, body) = req.into_parts();

    // authenticate: before reading the body, so unknown callers cost nothing.
    let key = match authenticate(&app, &parts.headers) {
        Ok(k) => k,
        Err(e) => return respond_unmetered(&app, endpoint, &request_id, e),
    };
    let mut settle = Settlement::new(app.clone(), &key, endpoint, &request_id, started);

    let mut response = match run(&app, endpoint, &parts.headers, body, &key, &mut settle).await {
        Ok(resp) => resp,
        Err(e) => {
            if let Some(fp) = settle.lead.take() {
                app.damper.finish_lead(
                    fp,
                    Some(crate::damping::Outcome::Error(
                        e.clone(),
                        request_id.clone(),
                    )),
                );
            }
            settle.finish_error(&e);
            e.into_dialect_response(endpoint.dialect())
        }
    };
    response
        .headers_mut()
        .extend(std::mem::take(&mut settle.rate_headers));
    finish_response(&app, endpoint, &request_id, started, response)
}

async fn run(
    app: &Arc<AppState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    key: &KeyRecord,
    settle: &mut Settlement,
) -> Result<Response, ApiError> {
    // accept
    let body = read_body(body, headers, app.server.max_body_bytes).await?;
    settle.body = body.clone();

    // peek
    let (mut doc, model) = parse_with_model(&body)?;
    settle.rec_mut().model_requested = Some(model.clone());
    let stream = endpoint.streams()
        && doc
            .stream()
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()).param("stream"))?;
    settle.rec_mut().stream = stream;
    let runtime = settle.runtime.clone();
    if endpoint.streams() {
        check_output_cap(&doc, &runtime.limits)?;
    }
    let tags = collect_tags(key, headers, &doc)?;
    settle.rec_mut().tags = tags;

    // authorize
    if !key.allows_model(&model) {
        return Err(ApiError::new(
            ErrorKind::ModelNotAllowed,
            format!("this key may not use model '{model}'"),
        )
        .param("model"));
    }

    // damp: replays, retry budgets
    let reuse_ok = !no_cache(headers) && endpoint != Endpoint::CountTokens;
    if let Some(answer) = damp(app, &runtime.retries, key, endpoint, headers, &body, settle)? {
        return Ok(settle.reuse(&answer, "replayed"));
    }

    // admit: loop guard, limits
    let (verdict, loop_fp) = loop_check(
        app,
        &runtime.loop_guard,
        key,
        endpoint,
        &model,
        &doc,
        stream,
    )?;
    match verdict {
        LoopVerdict::Pass => {}
        LoopVerdict::Warn(warning) => {
            if let Ok(v) = HeaderValue::from_str(&warning) {
                settle.rate_headers.insert("x-tollgate-warning", v);
            }
        }
        LoopVerdict::Replay(answer) => return Ok(settle.reuse(&answer, "loop_replay")),
    }
    if let (Some(fp), crate::config::LoopAction::Replay, false) =
        (loop_fp, runtime.loop_guard.action, stream)
    {
        settle
            .keep
            .push((fp, now_us() + runtime.loop_guard.window.as_micros() as u64));
    }
    let estimate = token_estimate(endpoint, &doc, body.len(), &runtime.limits);
    let checks = limit_checks(app, key, &runtime, &model);
    let admission = app
        .limiter
        .admit(&checks, estimate)
        .await
        .map_err(|r| refusal(app, r))?;
    settle
        .rate_headers
        .extend(rate_limit_headers(admission.requests, admission.tokens));
    settle.admission = Some(admission);

    // coalesce: one upstream call for identical requests in flight
    if !stream && reuse_ok && runtime.retries.coalesce {
        let fp = settle.idempotency_fp.unwrap_or(settle.request_fp);
        loop {
            match app.damper.coalesce(fp) {
                crate::damping::Coalesce::Lead => {
                    settle.lead = Some(fp);
                    break;
                }
                crate::damping::Coalesce::Follow(mut rx) => {
                    let outcome = rx
                        .wait_for(Option::is_some)
                        .await
                        .ok()
                        .and_then(|o| o.clone());
                    match outcome {
                        Some(crate::damping::Outcome::Answer(a)) => {
                            return Ok(settle.reuse(&a, "coalesced"))
                        }
                        Some(crate::damping::Outcome::Error(e, from)) => {
                            let rec = settle.rec_mut();
                            rec.reused = Some("coalesced".into());
                            rec.reused_from = Some(from);
                            return Err(e);
                        }
                        // The leader went away without an answer: lead, or follow another.
                        None => continue,
                    }
                }
            }
        }
    }

    // route
    let mut deployments = runtime.resolve(&model).ok_or_else(|| {
        ApiError::new(
            ErrorKind::ModelNotFound,
            format!("the model '{model}' does not exist or is not served here"),
        )
        .param("model")
    })?;
    deployments.retain(|d| endpoint.served_by(d.provider.kind));
    if deployments.is_empty() {
        if endpoint == Endpoint::CountTokens {
            return Ok(settle.finish_local_count());
        }
        return Err(ApiError::new(
            ErrorKind::DialectMismatch,
            format!(
                "the model '{model}' is served by providers that do not speak this API ({}); \
                 translation between dialects is not available yet",
                endpoint.upstream_path()
            ),
        )
        .param("model"));
    }
    let candidates =
        upstream::order_candidates(&deployments, now_ms(), &runtime.routing).map_err(|until| {
            let secs = ((until - now_ms()).max(0) as u64).div_ceil(1000).max(1);
            ApiError::new(
                ErrorKind::NoHealthyDeployment,
                format!("every deployment of '{model}' is cooling down after failures"),
            )
            .retry_after(secs)
        })?;

    // hold: spend caps, and the wallet's hold for the request's maximum cost
    if endpoint != Endpoint::CountTokens {
        hold(
            app,
            &runtime,
            key,
            endpoint,
            headers,
            &mut doc,
            &deployments,
            settle,
        )
        .await?;
    }

    // forward
    let client_wants_usage = doc.client_wants_stream_usage();
    if stream && endpoint == Endpoint::ChatCompletions {
        doc.force_stream_usage()
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
    }
    let mut attempt = 0u32;
    let mut idx = 0usize;
    let mut over_quota = 0usize;
    loop {
        let dep = candidates[idx % candidates.len()].clone();
        if !dep.limits.is_unlimited() {
            let check = Check {
                scope: Scope::Deployment,
                subject: format!("{}/{}", dep.provider.name, dep.model),
                limits: dep.limits,
            };
            match app
                .limiter
                .admit(std::slice::from_ref(&check), estimate)
                .await
            {
                Ok(a) => settle.admission.get_or_insert_default().absorb(a),
                // A deployment at its provider quota is skipped, not tried.
                Err(r) => {
                    over_quota += 1;
                    if over_quota >= candidates.len() {
                        return Err(refusal(app, r));
                    }
                    idx += 1;
                    continue;
                }
            }
        }
        attempt += 1;
        if attempt == 1 {
            let r = &runtime.retries;
            dep.health.retry_budget.admit(
                now_us(),
                r.window.as_micros() as u64,
                false,
                r.budget_ratio,
                r.budget_min,
            );
        }
        {
            let rec = settle.rec_mut();
            rec.attempts = attempt;
            rec.provider = Some(dep.provider.name.clone());
            rec.model_served = Some(dep.model.clone());
        }
        doc.set_str("model", &dep.model)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        // The endpoint the provider is called on: the client's, or its counterpart in the
        // provider's dialect when the request must be translated.
        let up_endpoint = endpoint.for_provider(dep.provider.kind);
        let translated = up_endpoint != endpoint;
        let upstream_body = if translated {
            let body = match up_endpoint {
                Endpoint::Messages => {
                    translate::chat_request_to_messages(&doc.to_vec(), &dep.model)
                }
                _ => translate::messages_request_to_chat(&doc.to_vec(), &dep.model),
            };
            Bytes::from(body.map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?)
        } else {
            Bytes::from(doc.to_vec())
        };
        let extra_headers = anthropic_headers(up_endpoint, headers);
        settle.upstream_started = true;
        let outcome = forward_once(&dep, up_endpoint, &extra_headers, upstream_body, stream).await;
        let label = match &outcome {
            Ok(_) => "ok",
            Err(f) => f.error.kind.as_str(),
        };
        app.metrics
            .upstream_attempts
            .get_or_create(&UpstreamLabels {
                provider: dep.provider.name.clone(),
                outcome: label,
            })
            .inc();
        match outcome {
            Ok(Upstream::Json(answer)) => {
                dep.health.success(now_ms(), &runtime.routing);
                let client_body = if translated {
                    let back = match up_endpoint {
                        Endpoint::Messages => translate::messages_response_to_chat(
                            &answer.body,
                            (now_ms() / 1000) as u64,
                        ),
                        _ => translate::chat_response_to_messages(&answer.body),
                    };
                    match back {
                        Ok(b) => Some(Bytes::from(b)),
                        Err(e) => {
                            return Err(ApiError::new(
                                ErrorKind::UpstreamError,
                                format!("could not translate the provider's answer: {e}"),
                            ))
                        }
                    }
                } else {
                    None
                };
                return Ok(settle.finish_json(&runtime, &dep, up_endpoint, answer, client_body));
            }
            Ok(Upstream::Stream { first, rest }) => {
                dep.health.success(now_ms(), &runtime.routing);
                let view = StreamView {
                    client: endpoint.dialect(),
                    upstream: up_endpoint,
                    filter_usage: endpoint == Endpoint::ChatCompletions && !client_wants_usage,
                    translator: match (translated, up_endpoint) {
                        (false, _) => None,
                        (true, Endpoint::Messages) => {
                            Some(Translator::ToChat(translate::MessagesToChatStream::new(
                                (now_ms() / 1000) as u64,
                                client_wants_usage,
                            )))
                        }
                        (true, _) => Some(Translator::ToMessages(
                            translate::ChatToMessagesStream::new(),
                        )),
                    },
                };
                return Ok(stream_response(app, settle, &dep, view, first, rest));
            }
            Err(mut failure) => {
                // A request the provider refused as malformed says nothing about the
                // deployment's health: counting it would let one agent's bad requests open
                // the circuit for every agent.
                if failure.error.kind == ErrorKind::UpstreamRejected {
                    dep.health.success(now_ms(), &runtime.routing);
                } else {
                    dep.health
                        .failure(now_ms(), failure.retry_after, &runtime.routing);
                }
                if let Some(partial) = failure.reached.take() {
                    settle.bill_broken_attempt(&runtime, &dep, &partial);
                }
                tracing::debug!(provider = %dep.provider.name, model = %dep.model, attempt, error = %failure.error, "upstream attempt failed");
                if !failure.retryable || attempt >= runtime.routing.max_attempts {
                    return Err(failure.error);
                }
                idx += 1;
                let next = &candidates[idx % candidates.len()];
                let r = &runtime.retries;
                if !next.health.retry_budget.admit(
                    now_us(),
                    r.window.as_micros() as u64,
                    true,
                    r.budget_ratio,
                    r.budget_min,
                ) {
                    // Failover must not multiply load on providers already in trouble.
                    app.metrics
                        .retries_suppressed
                        .get_or_create(&ScopeLabels {
                            scope: "deployment",
                        })
                        .inc();
                    return Err(failure.error);
                }
                let mut wait = upstream::backoff(attempt, &runtime.routing);
                if Arc::ptr_eq(next, &dep) {
                    if let Some(ra) = failure.retry_after {
                        if ra > runtime.routing.max_retry_wait {
                            return Err(failure.error);
                        }
                        wait = wait.max(ra);
                    }
                }
                tokio::time::sleep(wait).await;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// accept / authenticate / peek helpers

pub(crate) async fn read_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::new(
            ErrorKind::BodyTooLarge,
            format!("request body is larger than the limit of {limit} bytes"),
        )
    };
    if let Some(len) = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(too_large())
        }
        Err(e) if crate::error::is_body_timeout(e.as_ref()) => {
            Err(ApiError::new(ErrorKind::RequestTimeout, e.to_string()))
        }
        Err(e) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("could not read the request body: {e}"),
        )),
    }
}

/// The virtual key from `Authorization: Bearer` (or `x-api-key`), looked up by digest in
/// memory.
pub fn authenticate(app: &AppState, headers: &HeaderMap) -> Result<Arc<KeyRecord>, ApiError> {
    let secret = bearer(headers).ok_or_else(|| {
        ApiError::new(
            ErrorKind::InvalidApiKey,
            "missing API key: send it as 'Authorization: Bearer tg_…'",
        )
    })?;
    let key = app
        .keys
        .get(&app.secret.digest(secret))
        .ok_or_else(|| ApiError::new(ErrorKind::InvalidApiKey, "invalid API key"))?;
    match key.status_at(now_ms()) {
        KeyStatus::Active => Ok(key),
        KeyStatus::Expired => Err(ApiError::new(
            ErrorKind::KeyExpired,
            "this API key has expired",
        )),
        KeyStatus::Revoked => Err(ApiError::new(
            ErrorKind::KeyRevoked,
            "this API key has been revoked",
        )),
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let v = v.trim();
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .unwrap_or(v)
            .trim();
        if !token.is_empty() {
            return Some(token);
        }
    }
    headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
}

const MAX_TAGS: usize = 32;

/// Tags from the request's `metadata`, then `x-tollgate-tags`, then the key; later sources
/// win, so an agent cannot relabel what its key says about it.
fn collect_tags(
    key: &KeyRecord,
    headers: &HeaderMap,
    doc: &RequestDoc,
) -> Result<BTreeMap<String, String>, ApiError> {
    let mut tags: BTreeMap<String, String> = doc
        .metadata_tags()
        .into_iter()
        .filter(|(k, v)| k.len() <= 64 && v.len() <= 256)
        .take(MAX_TAGS)
        .collect();
    for value in headers.get_all("x-tollgate-tags") {
        let bad = || {
            ApiError::new(ErrorKind::BadRequest, "x-tollgate-tags must be k=v pairs separated by commas (keys up to 64 bytes, values up to 256)")
        };
        let text = value.to_str().map_err(|_| bad())?;
        for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(bad)?;
            let (k, v) = (k.trim(), v.trim());
            if k.is_empty() || k.len() > 64 || v.len() > 256 {
                return Err(bad());
            }
            tags.insert(k.to_string(), v.to_string());
        }
    }
    if tags.len() > MAX_TAGS {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("at most {MAX_TAGS} tags per request"),
        ));
    }
    for (k, v) in &key.tags {
        tags.insert(k.clone(), v.clone());
    }
    Ok(tags)
}

/// `anthropic-version` (the client's, or the current one) and `anthropic-beta` for the
/// Anthropic dialect; nothing for OpenAI's.
fn anthropic_headers(endpoint: Endpoint, client: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    if endpoint.dialect() == Dialect::Anthropic {
        let version = client
            .get("anthropic-version")
            .cloned()
            .unwrap_or(HeaderValue::from_static("2023-06-01"));
        out.insert("anthropic-version", version);
        for beta in client.get_all("anthropic-beta") {
            out.append("anthropic-beta", beta.clone());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// forward

/// A complete JSON answer from the provider.
struct JsonAnswer {
    status: StatusCode,
    headers: reqwest::header::HeaderMap,
    body: Bytes,
}

enum Upstream {
    Json(JsonAnswer),
    Stream {
        first: Bytes,
        rest: reqwest::Response,
    },
}

struct Failure {
    error: ApiError,
    retryable: bool,
    retry_after: Option<Duration>,
    /// The provider accepted the request (a 2xx head arrived) and then the answer broke
    /// off: what arrived of it. The provider did the work, so the attempt is billed.
    reached: Option<Bytes>,
}

impl Failure {
    fn retry(kind: ErrorKind, message: String) -> Failure {
        Failure {
            error: ApiError::new(kind, message),
            retryable: true,
            retry_after: None,
            reached: None,
        }
    }

    fn after_answer(kind: ErrorKind, message: String, partial: Bytes) -> Failure {
        Failure {
            reached: Some(partial),
            ..Failure::retry(kind, message)
        }
    }
}

/// One upstream attempt, up to the first byte of a stream or the whole of a JSON answer.
/// Anything that fails here can still be retried: the client has seen nothing yet.
async fn forward_once(
    dep: &Deployment,
    endpoint: Endpoint,
    extra_headers: &HeaderMap,
    body: Bytes,
    stream: bool,
) -> Result<Upstream, Failure> {
    let p = &dep.provider;
    let url = format!("{}{}", p.base_url, endpoint.upstream_path());
    let deadline = tokio::time::Instant::now() + p.first_byte_timeout;
    let send = p
        .client
        .post(url)
        .headers(p.headers.clone())
        .headers(extra_headers.clone())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .send();
    let resp = match tokio::time::timeout_at(deadline, send).await {
        Err(_) => {
            return Err(Failure::retry(
                ErrorKind::UpstreamTimeout,
                format!(
                    "provider '{}' did not answer within {:?}",
                    p.name, p.first_byte_timeout
                ),
            ))
        }
        Ok(Err(e)) => {
            return Err(Failure::retry(
                ErrorKind::UpstreamUnavailable,
                format!("provider '{}' unreachable: {}", p.name, error_chain(&e)),
            ))
        }
        Ok(Ok(r)) => r,
    };
    let status = resp.status();
    if !status.is_success() {
        let retry_after = upstream::retry_after(resp.headers());
        let body = tokio::time::timeout_at(deadline, resp.bytes())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        return Err(classify_status(&p.name, status, retry_after, body));
    }
    if stream {
        let mut resp = resp;
        return match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => Err(Failure::after_answer(
                ErrorKind::UpstreamTimeout,
                format!(
                    "provider '{}' sent no stream data within {:?}",
                    p.name, p.first_byte_timeout
                ),
                Bytes::new(),
            )),
            Ok(Err(e)) => Err(Failure::after_answer(
                ErrorKind::UpstreamError,
                format!("provider '{}' stream failed: {}", p.name, error_chain(&e)),
                Bytes::new(),
            )),
            Ok(Ok(None)) => Err(Failure::after_answer(
                ErrorKind::UpstreamError,
                format!("provider '{}' closed the stream before any data", p.name),
                Bytes::new(),
            )),
            Ok(Ok(Some(first))) => Ok(Upstream::Stream { first, rest: resp }),
        };
    }
    let headers = resp.headers().clone();
    let total_deadline = tokio::time::Instant::now() + p.total_timeout;
    // Read chunk by chunk, so that what arrived before a break is kept for billing.
    let mut resp = resp;
    let mut body = bytes::BytesMut::new();
    loop {
        match tokio::time::timeout_at(total_deadline, resp.chunk()).await {
            Err(_) => {
                return Err(Failure::after_answer(
                    ErrorKind::UpstreamTimeout,
                    format!(
                        "provider '{}' did not finish within {:?}",
                        p.name, p.total_timeout
                    ),
                    body.freeze(),
                ))
            }
            Ok(Err(e)) => {
                return Err(Failure::after_answer(
                    ErrorKind::UpstreamError,
                    format!(
                        "provider '{}' response broke off: {}",
                        p.name,
                        error_chain(&e)
                    ),
                    body.freeze(),
                ))
            }
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            Ok(Ok(None)) => break,
        }
    }
    Ok(Upstream::Json(JsonAnswer {
        status,
        headers,
        body: body.freeze(),
    }))
}

/// The text of a JSON answer cut off mid-way: the string values of its `content` and
/// `text` fields up to where it ends. Best effort, for an estimate of output delivered.
fn partial_answer_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out = String::new();
    for field in ["\"content\":", "\"text\":"] {
        let mut rest = &text[..];
        while let Some(i) = rest.find(field) {
            rest = rest[i + field.len()..].trim_start();
            let Some(inner) = rest.strip_prefix('"') else {
                continue;
            };
            let mut escaped = false;
            let mut end = inner.len();
            for (j, c) in inner.char_indices() {
                match c {
                    _ if escaped => escaped = false,
                    '\\' => escaped = true,
                    '"' => {
                        end = j;
                        break;
                    }
                    _ => {}
                }
            }
            out.push_str(&inner[..end]);
            out.push('\n');
            rest = &inner[end..];
        }
    }
    out
}

fn classify_status(
    provider: &str,
    status: StatusCode,
    retry_after: Option<Duration>,
    body: Bytes,
) -> Failure {
    // Which dialect the provider's error body speaks, so it can be passed through verbatim
    // to clients of that dialect.
    let body_dialect = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v)
            if v.get("type").and_then(|t| t.as_str()) == Some("error")
                && v.get("error").is_some_and(|e| e.is_object()) =>
        {
            Some(Dialect::Anthropic)
        }
        Ok(v) if v.get("error").is_some_and(|e| e.is_object()) => Some(Dialect::OpenAi),
        _ => None,
    };
    if status == StatusCode::TOO_MANY_REQUESTS {
        let mut error = ApiError::new(
            ErrorKind::UpstreamRateLimited,
            format!("provider '{provider}' is rate limiting requests"),
        );
        error.retry_after_secs = Some(
            retry_after
                .map_or(1, |d| d.as_secs_f64().ceil() as u64)
                .max(1),
        );
        return Failure {
            error,
            retryable: true,
            retry_after,
            reached: None,
        };
    }
    if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
        tracing::error!(provider, %status, "provider rejected tollgate's credentials; check its api_key_env");
        return Failure::retry(
            ErrorKind::UpstreamAuth,
            format!("provider '{provider}' rejected the gateway's credentials ({status})"),
        );
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        return Failure::retry(
            ErrorKind::UpstreamError,
            format!("provider '{provider}' failed with {status}"),
        );
    }
    // The request itself is at fault: pass the provider's answer through unchanged.
    let mut error = ApiError::new(
        ErrorKind::UpstreamRejected,
        format!("provider '{provider}' refused the request ({status})"),
    );
    error.status = Some(status);
    if body_dialect.is_some() {
        error.upstream_body = Some(body);
        error.upstream_dialect = body_dialect;
    }
    Failure {
        error,
        retryable: false,
        retry_after: None,
        reached: None,
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

// ---------------------------------------------------------------------------------------
// settle

/// Owns the request's usage record until it is handed to the meter, exactly once.
struct Settlement {
    app: Arc<AppState>,
    /// The configuration the request started with (see `Settlement::new`).
    runtime: Arc<Runtime>,
    rec: UsageRecord,
    /// Set once the record has been handed on (to the meter, or to a stream that settles it).
    done: bool,
    /// Refused because the ledger writer is behind: its record would only lengthen the queue.
    shed: bool,
    started: Instant,
    body: Bytes,
    upstream_started: bool,
    /// The limiter's grant: its token reservation is settled with the real count, and its
    /// concurrency slot is released, when the record is committed.
    admission: Option<Admission>,
    /// `x-ratelimit-*` for the response.
    rate_headers: HeaderMap,
    /// Identifies the request (key, endpoint, body) for retry recognition and coalescing.
    request_fp: u64,
    /// Key, endpoint and `Idempotency-Key`, when the request carries one.
    idempotency_fp: Option<u64>,
    /// Set while identical requests wait for this one's answer.
    lead: Option<u64>,
    request_id: String,
    /// The quote held in the key's wallet, for a stream's running cost.
    money: Option<Quote>,
    /// Fingerprints under which a successful JSON answer is kept, and until when (µs).
    keep: Vec<(u64, u64)>,
    /// Attempts the provider answered but that broke off: added to the record whatever the
    /// request's ending.
    broken: Broken,
}

/// Tokens and cost (estimated) of upstream attempts that broke off after the provider
/// accepted them.
#[derive(Debug, Default)]
struct Broken {
    usage: Usage,
    cost: u64,
    price: Option<String>,
}

impl Broken {
    /// Adds them to the record that leaves (after its own usage is applied), marking its
    /// usage as (partly) estimated.
    fn fold(&mut self, rec: &mut UsageRecord) {
        let Some(price) = self.price.take() else {
            return;
        };
        rec.input_tokens = rec.input_tokens.saturating_add(self.usage.input);
        rec.output_tokens = rec.output_tokens.saturating_add(self.usage.output);
        rec.cost_micros = rec
            .cost_micros
            .saturating_add(self.cost)
            .min(crate::money::MAX_MICROS as u64);
        rec.usage_source = match rec.usage_source.as_str() {
            "provider" => "provider+estimated".into(),
            _ => "estimated".into(),
        };
        if rec.price_version.is_none() {
            rec.price_version = Some(price);
        }
    }
}

impl Settlement {
    fn new(
        app: Arc<AppState>,
        key: &KeyRecord,
        endpoint: Endpoint,
        request_id: &str,
        started: Instant,
    ) -> Settlement {
        // The one configuration this request sees, from admission to settlement: a reload
        // in the middle changes neither its prices, its deployments nor its limits.
        let runtime = app.runtime.load_full();
        let rec = UsageRecord {
            id: request_id.to_string(),
            ts_ms: now_ms(),
            endpoint: endpoint.name().to_string(),
            key_id: key.id.clone(),
            agent: key.name.clone(),
            team: key.team.clone(),
            project: key.project.clone(),
            tags: key.tags.clone(),
            usage_source: "none".into(),
            ..UsageRecord::default()
        };
        Settlement {
            app,
            runtime,
            rec,
            done: false,
            shed: false,
            started,
            body: Bytes::new(),
            upstream_started: false,
            admission: None,
            rate_headers: HeaderMap::new(),
            request_fp: 0,
            idempotency_fp: None,
            lead: None,
            request_id: request_id.to_string(),
            money: None,
            keep: Vec::new(),
            broken: Broken::default(),
        }
    }

    /// An attempt whose answer broke off after the provider accepted it: the provider bills
    /// its input and whatever it wrote, so the request does too (estimated), even when a
    /// later attempt succeeds.
    fn bill_broken_attempt(&mut self, runtime: &Runtime, dep: &Deployment, partial: &[u8]) {
        let usage = Usage {
            input: estimate::request_tokens(&self.body).min(crate::money::MAX_TOKENS),
            output: estimate::tokens(&partial_answer_text(partial)).min(crate::money::MAX_TOKENS),
            ..Usage::default()
        };
        let price = runtime.prices.lookup(&dep.provider.name, &dep.model);
        let cost = price.map_or(0, |p| p.cost(&usage));
        let b = &mut self.broken;
        b.usage.input = b.usage.input.saturating_add(usage.input);
        b.usage.output = b.usage.output.saturating_add(usage.output);
        b.cost = b
            .cost
            .saturating_add(cost)
            .min(crate::money::MAX_MICROS as u64);
        if b.price.is_none() {
            b.price = Some(price.map_or_else(|| "unpriced".into(), |p| p.version.clone()));
        }
        self.app.metrics.attempts_billed_broken.inc();
    }

    /// Answers with another request's answer: no upstream call, no cost.
    fn reuse(&mut self, answer: &crate::damping::Answer, kind: &'static str) -> Response {
        if let Some(mut rec) = self.take() {
            rec.status = answer.status.as_u16();
            rec.reused = Some(kind.to_string());
            rec.reused_from = Some(answer.request_id.clone());
            self.commit(rec);
        }
        self.app
            .metrics
            .answers_reused
            .get_or_create(&ReuseLabels { kind })
            .inc();
        let mut resp = Response::new(Body::from(answer.body.clone()));
        *resp.status_mut() = answer.status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, answer.content_type.clone());
        h.insert("x-tollgate-cost", HeaderValue::from(0));
        h.insert("x-tollgate-reused", HeaderValue::from_static(kind));
        if let Ok(v) = HeaderValue::from_str(&answer.request_id) {
            h.insert("x-tollgate-reused-from", v);
        }
        resp
    }

    /// Hands a finished JSON answer to the requests waiting on this one, and keeps it for
    /// idempotent retries and the loop guard.
    fn share(&mut self, status: StatusCode, content_type: &HeaderValue, body: &Bytes) {
        if self.lead.is_none() && self.keep.is_empty() && self.idempotency_fp.is_none() {
            return;
        }
        let answer = Arc::new(crate::damping::Answer {
            status,
            content_type: content_type.clone(),
            body: body.clone(),
            request_id: self.request_id.clone(),
            request_fp: self.request_fp,
        });
        if let Some(fp) = self.lead.take() {
            self.app
                .damper
                .finish_lead(fp, Some(crate::damping::Outcome::Answer(answer.clone())));
        }
        if !status.is_success() {
            return;
        }
        let ttl = self.runtime.retries.idempotency_ttl.as_micros() as u64;
        if let Some(fp) = self.idempotency_fp {
            self.app
                .damper
                .keep_answer(fp, now_us() + ttl, answer.clone());
        }
        for (fp, until) in std::mem::take(&mut self.keep) {
            self.app.damper.keep_answer(fp, until, answer.clone());
        }
    }

    fn rec_mut(&mut self) -> &mut UsageRecord {
        &mut self.rec
    }

    /// The record, once; `None` if it was already handed on.
    fn take(&mut self) -> Option<UsageRecord> {
        if self.done {
            return None;
        }
        self.done = true;
        Some(std::mem::take(&mut self.rec))
    }

    fn commit(&mut self, mut rec: UsageRecord) {
        self.broken.fold(&mut rec);
        rec.latency_ms = self.started.elapsed().as_millis() as u64;
        if let Some(mut a) = self.admission.take() {
            a.settle(now_us(), rec.input_tokens + rec.output_tokens);
        }
        if self.shed {
            self.app.metrics.usage_records_shed.inc();
            return;
        }
        self.app.meter.record(rec);
    }

    fn finish_error(&mut self, e: &ApiError) {
        if let Some(mut rec) = self.take() {
            rec.status = e.status().as_u16();
            rec.error_kind = Some(e.kind.as_str().to_string());
            self.commit(rec);
        }
    }

    /// Settles a JSON answer. `endpoint` is what the provider was called on (its dialect
    /// decides how usage is read); `client_body`, when set, is the answer translated into the
    /// client's dialect.
    fn finish_json(
        &mut self,
        runtime: &Runtime,
        dep: &Deployment,
        endpoint: Endpoint,
        answer: JsonAnswer,
        client_body: Option<Bytes>,
    ) -> Response {
        let JsonAnswer {
            status,
            headers: up_headers,
            body,
        } = answer;
        if self.done {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        let reported = match endpoint.dialect() {
            Dialect::OpenAi => Usage::from_openai_response(&body),
            Dialect::Anthropic => Usage::from_anthropic_response(&body),
        };
        let (usage, source) = match (endpoint, reported) {
            // Counting tokens is free at the provider: nothing to bill.
            (Endpoint::CountTokens, _) => (Usage::default(), "none"),
            (_, Some(u)) => (u, "provider"),
            (_, None) => (
                Usage {
                    input: estimate::request_tokens(&self.body),
                    output: estimate_output_json(&body),
                    ..Usage::default()
                },
                "estimated",
            ),
        };
        // Filled in place and taken only to commit: if anything here panics, `Drop` still
        // finds the record and writes it.
        #[cfg(debug_assertions)]
        crate::fault::check("settle", &dep.model);
        apply_usage(
            &mut self.rec,
            &runtime.prices,
            &dep.provider.name,
            &dep.model,
            usage,
            source,
        );
        self.rec.status = status.as_u16();
        self.rec.ttft_ms = Some(self.started.elapsed().as_millis() as u64);
        let cost = self.rec.cost_micros;
        if let Some(rec) = self.take() {
            self.commit(rec);
        }
        let content_type = match client_body {
            Some(_) => HeaderValue::from_static("application/json"),
            None => up_headers
                .get(http::header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/json")),
        };
        let body = client_body.unwrap_or(body);
        self.share(status, &content_type, &body);
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, content_type);
        h.insert("x-tollgate-cost", HeaderValue::from(cost));
        resp
    }

    /// `count_tokens` for a model no provider can count: a local estimate, marked as such.
    fn finish_local_count(&mut self) -> Response {
        let n = estimate::request_tokens(&self.body);
        if let Some(mut rec) = self.take() {
            rec.status = 200;
            self.commit(rec);
        }
        let mut resp = axum::Json(serde_json::json!({ "input_tokens": n })).into_response();
        resp.headers_mut().insert(
            "x-tollgate-usage-source",
            HeaderValue::from_static("estimated"),
        );
        resp
    }
}

impl Drop for Settlement {
    /// The handler future was dropped: the client went away before an answer.
    fn drop(&mut self) {
        if let Some(fp) = self.lead.take() {
            // Whoever waits on this request makes its own call.
            self.app.damper.finish_lead(fp, None);
        }
        if let Some(mut rec) = self.take() {
            let panicked = std::thread::panicking();
            if panicked {
                // A bug, not the client: the record says so, and keeps what was measured.
                rec.status = 500;
                rec.error_kind = Some("internal_panic".into());
                if rec.usage_source == "provider" || !self.upstream_started {
                    self.commit(rec);
                    return;
                }
            } else {
                rec.client_disconnected = true;
                rec.status = 499;
            }
            if self.upstream_started {
                // The provider may have started work; its input is the best bound we have.
                let usage = Usage {
                    input: estimate::request_tokens(&self.body),
                    ..Usage::default()
                };
                let (p, m) = (
                    rec.provider.clone().unwrap_or_default(),
                    rec.model_served.clone().unwrap_or_default(),
                );
                apply_usage(&mut rec, &self.runtime.prices, &p, &m, usage, "estimated");
            }
            if !panicked {
                rec.error_kind = Some("client_disconnected".into());
                self.app.metrics.client_disconnects.inc();
            }
            self.commit(rec);
        }
    }
}

/// Tokens, source and cost into the record, under the price of what was actually served.
fn apply_usage(
    rec: &mut UsageRecord,
    prices: &PriceTable,
    provider: &str,
    model: &str,
    usage: Usage,
    source: &str,
) {
    // A provider's numbers are client input too: bounded, so no sum, price or column
    // (SQLite integers are i64) can overflow.
    let bound = |n: u64| n.min(crate::money::MAX_TOKENS);
    let usage = Usage {
        input: bound(usage.input),
        cached_input: bound(usage.cached_input),
        cache_write_5m: bound(usage.cache_write_5m),
        cache_write_1h: bound(usage.cache_write_1h),
        output: bound(usage.output),
        reasoning: bound(usage.reasoning),
    };
    rec.input_tokens = usage.input;
    rec.cached_input_tokens = usage.cached_input;
    rec.cache_write_5m_tokens = usage.cache_write_5m;
    rec.cache_write_1h_tokens = usage.cache_write_1h;
    rec.output_tokens = usage.output;
    rec.reasoning_tokens = usage.reasoning;
    rec.usage_source = source.to_string();
    match prices.lookup(provider, model) {
        Some(price) => {
            rec.cost_micros = price.cost(&usage);
            rec.price_version = Some(price.version.clone());
        }
        None => {
            rec.cost_micros = 0;
            rec.price_version = Some("unpriced".into());
        }
    }
}

/// Output tokens of a JSON answer that came without usage, in either dialect.
fn estimate_output_json(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut text = String::new();
    let mut push = |s: Option<&str>| {
        if let Some(s) = s {
            text.push_str(s);
        }
    };
    for choice in v
        .get("choices")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(choice.pointer("/message/content").and_then(|c| c.as_str()));
        for call in choice
            .pointer("/message/tool_calls")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            push(call.pointer("/function/name").and_then(|s| s.as_str()));
            push(call.pointer("/function/arguments").and_then(|s| s.as_str()));
        }
    }
    for block in v
        .get("content")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(block.get("text").and_then(|s| s.as_str()));
        push(block.get("thinking").and_then(|s| s.as_str()));
        if let Some(input) = block.get("input") {
            push(Some(&input.to_string()));
        }
    }
    // Responses API: output items hold content parts or function-call arguments.
    for item in v
        .get("output")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(item.get("arguments").and_then(|s| s.as_str()));
        for part in item
            .get("content")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            push(part.get("text").and_then(|s| s.as_str()));
        }
    }
    estimate::tokens(&text)
}

// ---------------------------------------------------------------------------------------
// streams

/// The observer for the stream's dialect.
enum Observer {
    Chat(ChatStreamObserver),
    Messages(MessagesStreamObserver),
    Responses(ResponsesStreamObserver),
}

impl Observer {
    fn observe(&mut self, ev: &tollgate_proto::SseEvent) -> EventKind {
        match self {
            Observer::Chat(o) => o.observe(ev),
            Observer::Messages(o) => o.observe(ev),
            Observer::Responses(o) => o.observe(ev),
        }
    }
    fn usage(&self) -> Option<Usage> {
        match self {
            Observer::Chat(o) => o.usage,
            Observer::Messages(o) => o.usage(),
            Observer::Responses(o) => o.usage,
        }
    }
    /// The provider reported an error inside the stream.
    fn saw_error(&self) -> bool {
        match self {
            Observer::Chat(o) => o.saw_error,
            Observer::Messages(o) => o.saw_error,
            Observer::Responses(o) => o.saw_error,
        }
    }
    /// The stream reached its proper end, or the provider reported an error in-band.
    fn ended_properly(&self) -> bool {
        match self {
            Observer::Chat(o) => o.done || o.saw_error,
            Observer::Messages(o) => o.done || o.saw_error,
            Observer::Responses(o) => o.done || o.saw_error,
        }
    }
    fn output_text(&self) -> &str {
        match self {
            Observer::Chat(o) => &o.output_text,
            Observer::Messages(o) => &o.output_text,
            Observer::Responses(o) => &o.output_text,
        }
    }
    /// Exact input-side counts the provider gave before the stream ended early, if any.
    fn input_usage(&self) -> Option<Usage> {
        match self {
            Observer::Chat(_) | Observer::Responses(_) => None,
            Observer::Messages(o) => o.input_usage(),
        }
    }
}

/// How a stream is read and what the client sees of it.
struct StreamView {
    /// The client's dialect: decides the shape of a final error event.
    client: Dialect,
    /// The provider's dialect: decides how usage is observed.
    upstream: Endpoint,
    /// Drop the usage-only chunk tollgate asked for on the client's behalf.
    filter_usage: bool,
    /// Rewrites each upstream event into the client's dialect.
    translator: Option<Translator>,
}

enum Translator {
    ToChat(translate::MessagesToChatStream),
    ToMessages(translate::ChatToMessagesStream),
}

impl Translator {
    fn on_event(&mut self, ev: &tollgate_proto::SseEvent) -> String {
        match self {
            Translator::ToChat(t) => t.on_event(ev),
            Translator::ToMessages(t) => t.on_event(ev),
        }
    }
}

fn stream_response(
    app: &Arc<AppState>,
    settle: &mut Settlement,
    dep: &Deployment,
    view: StreamView,
    first: Bytes,
    rest: reqwest::Response,
) -> Response {
    let mut rec = settle.take();
    let broken = std::mem::take(&mut settle.broken);
    let admission = settle.admission.take();
    if let Some(r) = rec.as_mut() {
        r.status = 200;
        r.ttft_ms = Some(settle.started.elapsed().as_millis() as u64);
    }
    let observer = match view.upstream {
        Endpoint::Messages => Observer::Messages(MessagesStreamObserver::new()),
        Endpoint::Responses => Observer::Responses(ResponsesStreamObserver::new()),
        _ => Observer::Chat(ChatStreamObserver::new()),
    };
    let mut s = GatewayStream {
        app: app.clone(),
        upstream: Box::pin(rest.bytes_stream()),
        splitter: SseSplitter::new(),
        observer,
        dialect: view.client,
        translator: view.translator,
        out: VecDeque::new(),
        filter_usage: view.filter_usage,
        idle: dep.provider.idle_timeout,
        idle_timer: Box::pin(tokio::time::sleep(dep.provider.idle_timeout)),
        deadline: Box::pin(tokio::time::sleep(dep.provider.total_timeout)),
        rec,
        broken,
        admission,
        runtime: settle.runtime.clone(),
        provider: dep.provider.name.clone(),
        model: dep.model.clone(),
        body: settle.body.clone(),
        started: settle.started,
        finished: false,
        events: Vec::new(),
        budget: settle.money.map(|q| StreamBudget {
            limit_micros: q.cost_micros.saturating_add(
                q.cost_micros * settle.runtime.wallets.stream_overrun_percent.min(1000) / 100,
            ),
            input_micros: q.input_micros(),
            output_price: q.output_price,
        }),
        delivered_tokens: 0,
        counted_bytes: 0,
    };
    s.ingest(&first);
    let mut resp = Response::new(Body::from_stream(s));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    // Tells nginx-style proxies in front of tollgate not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Forwards an upstream SSE stream event by event as it arrives, while the observer reads a
/// copy for usage. Settles when the stream ends, fails, stalls, or is dropped.
struct GatewayStream {
    app: Arc<AppState>,
    upstream: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    splitter: SseSplitter,
    observer: Observer,
    /// The client's dialect.
    dialect: Dialect,
    translator: Option<Translator>,
    out: VecDeque<Bytes>,
    filter_usage: bool,
    idle: Duration,
    idle_timer: Pin<Box<tokio::time::Sleep>>,
    deadline: Pin<Box<tokio::time::Sleep>>,
    rec: Option<UsageRecord>,
    /// Earlier attempts that broke off, added to the record when the stream settles.
    broken: Broken,
    /// Held for the stream's whole life: the concurrency slot is the stream's.
    admission: Option<Admission>,
    runtime: Arc<Runtime>,
    provider: String,
    model: String,
    body: Bytes,
    started: Instant,
    finished: bool,
    events: Vec<tollgate_proto::SseEvent>,
    /// The wallet's hold: a stream whose running cost passes it is cut.
    budget: Option<StreamBudget>,
    /// Output tokens delivered so far, and how much of the output text they cover.
    delivered_tokens: u64,
    counted_bytes: usize,
}

#[derive(Debug, Clone, Copy)]
struct StreamBudget {
    limit_micros: u64,
    input_micros: u64,
    output_price: u64,
}

impl StreamBudget {
    /// The cost so far: the held input plus the output tokens delivered, counted with the
    /// tokenizer as the text arrives (a byte-based guess cut streams that fit their hold).
    fn spent(&self, delivered_tokens: u64) -> u64 {
        let output = (u128::from(delivered_tokens) * u128::from(self.output_price))
            .div_ceil(1_000_000)
            .min(crate::money::MAX_MICROS as u128) as u64;
        self.input_micros.saturating_add(output)
    }
}

impl GatewayStream {
    fn ingest(&mut self, chunk: &[u8]) {
        self.splitter.push(chunk, &mut self.events);
        // Taken out of `self` for the loop (and put back, to keep its allocation).
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            let kind = self.observer.observe(&ev);
            if let Some(t) = self.translator.as_mut() {
                let translated = t.on_event(&ev);
                if !translated.is_empty() {
                    self.out.push_back(Bytes::from(translated));
                }
                if self.over_budget() {
                    break;
                }
                continue;
            }
            if kind == EventKind::UsageOnly && self.filter_usage {
                continue;
            }
            self.out.push_back(ev.raw);
            if self.over_budget() {
                break;
            }
        }
        events.clear();
        self.events = events;
    }

    /// Cuts the stream once its running cost passes the wallet's hold: the event that
    /// crossed it is delivered (and billed), nothing after it.
    fn over_budget(&mut self) -> bool {
        let Some(b) = self.budget else { return false };
        if self.finished {
            return false;
        }
        // Only the text added since the last event is counted: linear in the stream.
        let text = self.observer.output_text();
        if text.len() > self.counted_bytes {
            self.delivered_tokens += estimate::tokens(&text[self.counted_bytes..]);
            self.counted_bytes = text.len();
        }
        if b.spent(self.delivered_tokens) <= b.limit_micros {
            return false;
        }
        self.end(Some((
            "insufficient_funds",
            format!(
                "the wallet's hold for this request (${}) is used up; the stream was cut",
                crate::money::usd(b.limit_micros as i64)
            ),
        )));
        true
    }

    /// Ends the stream, telling the client why when the upstream did not finish cleanly.
    fn end(&mut self, error: Option<(&str, String)>) {
        self.finished = true;
        if let Some((kind, message)) = &error {
            self.app.metrics.streams_cut.inc();
            let money = *kind == "insufficient_funds";
            let event = match self.dialect {
                Dialect::OpenAi => openai_error_event(
                    message,
                    if money {
                        "insufficient_funds"
                    } else {
                        "upstream_error"
                    },
                    Some(kind),
                ),
                Dialect::Anthropic => anthropic_error_event(
                    if money { "billing_error" } else { "api_error" },
                    &format!("{kind}: {message}"),
                ),
            };
            self.out.push_back(Bytes::from(event));
        }
        let kind = match error {
            Some((k, _)) => Some(k.to_string()),
            None if self.observer.saw_error() => Some("provider_error_event".to_string()),
            None => None,
        };
        self.settle(kind, false);
    }

    fn settle(&mut self, error_kind: Option<String>, disconnected: bool) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        let (usage, source) = match self.observer.usage() {
            Some(u) => (u, "provider"),
            None => {
                let input = self.observer.input_usage().unwrap_or_else(|| Usage {
                    input: estimate::request_tokens(&self.body),
                    ..Usage::default()
                });
                (
                    Usage {
                        output: estimate::tokens(self.observer.output_text()),
                        ..input
                    },
                    "estimated",
                )
            }
        };
        apply_usage(
            &mut rec,
            &self.runtime.prices,
            &self.provider,
            &self.model,
            usage,
            source,
        );
        self.broken.fold(&mut rec);
        rec.error_kind = error_kind;
        rec.client_disconnected = disconnected;
        rec.latency_ms = self.started.elapsed().as_millis() as u64;
        if disconnected {
            self.app.metrics.client_disconnects.inc();
        }
        if let Some(mut a) = self.admission.take() {
            a.settle(now_us(), rec.input_tokens + rec.output_tokens);
        }
        self.app.meter.record(rec);
    }
}

impl Stream for GatewayStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.out.pop_front() {
                return Poll::Ready(Some(Ok(b)));
            }
            if this.finished {
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(next);
                    this.ingest(&chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!("the provider's stream broke off: {}", error_chain(&e));
                    this.end(Some(("upstream_stream_error", msg)));
                }
                Poll::Ready(None) => {
                    if this.observer.ended_properly() {
                        this.end(None);
                    } else {
                        this.end(Some((
                            "stream_truncated",
                            "the provider ended the stream before it was complete".into(),
                        )));
                    }
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        let msg = format!("the provider sent nothing for {:?}", this.idle);
                        this.end(Some(("upstream_idle_timeout", msg)));
                        continue;
                    }
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        this.end(Some((
                            "upstream_timeout",
                            "the stream exceeded the provider's total timeout".into(),
                        )));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for GatewayStream {
    fn drop(&mut self) {
        if self.rec.is_some() {
            // Dropping `upstream` closes the provider connection, which cancels generation.
            self.settle(Some("client_disconnected".into()), true);
        }
    }
}

// ---------------------------------------------------------------------------------------
// responses

fn respond_unmetered(
    app: &AppState,
    endpoint: Endpoint,
    request_id: &str,
    e: ApiError,
) -> Response {
    let status = e.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: endpoint.name(),
            status,
        })
        .inc();
    let mut resp = e.into_dialect_response(endpoint.dialect());
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

fn finish_response(
    app: &AppState,
    endpoint: Endpoint,
    request_id: &str,
    started: Instant,
    mut resp: Response,
) -> Response {
    let status = resp.status().as_u16();
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: endpoint.name(),
            status,
        })
        .inc();
    app.metrics
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    if let Ok(v) = HeaderValue::from_str(request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Refuses (or flags, or answers from the last response) a request that repeats an earlier
/// one, or whose conversation keeps calling the same tool with the same arguments. Also
/// returns the request's fingerprint when the guard looked at it.
#[allow(clippy::too_many_arguments)]
fn loop_check(
    app: &AppState,
    cfg: &crate::config::LoopGuardConfig,
    key: &KeyRecord,
    endpoint: Endpoint,
    model: &str,
    doc: &RequestDoc,
    stream: bool,
) -> Result<(LoopVerdict, Option<u64>), ApiError> {
    use crate::loopguard::{fingerprint, repeated_tool_call, tool_calls};
    if !cfg.enabled {
        return Ok((LoopVerdict::Pass, None));
    }
    let fields: &[&str] = match endpoint {
        Endpoint::ChatCompletions => &["messages", "tools"],
        Endpoint::Messages => &["system", "messages", "tools"],
        Endpoint::Responses => &["instructions", "input", "tools"],
        // Re-embedding or re-counting the same text is not an agent stuck in a loop.
        Endpoint::Embeddings | Endpoint::CountTokens => return Ok((LoopVerdict::Pass, None)),
    };
    let parts: Vec<Option<&str>> = fields.iter().map(|f| doc.raw(f).map(|r| r.get())).collect();
    let fp = fingerprint(&key.id, model, &parts);
    let window_us = cfg.window.as_micros() as u64;
    let (seen, clears_in) = app.loop_guard.sighting(fp, now_us(), window_us);
    let mut problem = None;
    if cfg.max_repeats > 0 && seen >= cfg.max_repeats {
        problem = Some((
            format!(
                "loop detected: this exact request was sent {seen} times in the last {}s. You appear to be repeating yourself; change the request or stop.",
                cfg.window.as_secs()
            ),
            clears_in,
        ));
    } else if cfg.max_tool_repeats > 0 && doc.raw("tools").is_some() {
        if let Some(history) = doc
            .raw("messages")
            .and_then(|m| serde_json::from_str::<serde_json::Value>(m.get()).ok())
        {
            let calls = tool_calls(&history);
            if let Some((n, tool)) = repeated_tool_call(&calls) {
                if n >= cfg.max_tool_repeats {
                    problem = Some((
                        format!(
                            "loop detected: the tool '{tool}' was called with the same arguments {n} times in this conversation. You appear to be stuck; try something different or stop."
                        ),
                        window_us,
                    ));
                }
            }
        }
    }
    use crate::config::LoopAction;
    let reject = |message: String, retry_us: u64| {
        Err(ApiError::new(ErrorKind::LoopDetected, message)
            .retry_after(retry_us.div_ceil(1_000_000).max(1)))
    };
    match (problem, cfg.action) {
        (None, _) => Ok((LoopVerdict::Pass, Some(fp))),
        (Some((message, retry_us)), LoopAction::Reject) => reject(message, retry_us),
        (Some((message, _)), LoopAction::Warn) => Ok((LoopVerdict::Warn(message), Some(fp))),
        (Some((message, retry_us)), LoopAction::Replay) => {
            match (!stream).then(|| app.damper.answer(fp, now_us())).flatten() {
                Some(answer) => Ok((LoopVerdict::Replay(answer), Some(fp))),
                None => reject(message, retry_us),
            }
        }
    }
}

enum LoopVerdict {
    Pass,
    Warn(String),
    /// Answer with this earlier response to the same request.
    Replay(Arc<crate::damping::Answer>),
}

/// The most a request can cost on any of its deployments: its input (body bytes / 3, biased
/// up) at the highest input-side price (cache writes can cost more than input), plus its
/// output cap (`max_tokens`, or `[wallets] default_max_output`) at the highest output price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quote {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub input_price: u64,
    pub output_price: u64,
    pub cost_micros: u64,
}

impl Quote {
    pub fn new(
        input_tokens: u64,
        output_tokens: u64,
        input_price: u64,
        output_price: u64,
    ) -> Quote {
        // u64 × u64 fits u128 but their sum may not; the result is capped where the
        // ledger's arithmetic is still exact, which no wallet can cover.
        let pico = (u128::from(input_tokens) * u128::from(input_price))
            .saturating_add(u128::from(output_tokens) * u128::from(output_price));
        let cost = pico
            .div_ceil(1_000_000)
            .min(crate::money::MAX_MICROS as u128) as u64;
        Quote {
            input_tokens,
            output_tokens,
            input_price,
            output_price,
            cost_micros: cost,
        }
    }

    fn input_micros(&self) -> u64 {
        Quote::new(self.input_tokens, 0, self.input_price, 0).cost_micros
    }
}

pub fn quote(
    runtime: &Runtime,
    deployments: &[Arc<Deployment>],
    endpoint: Endpoint,
    doc: &RequestDoc,
    body_len: usize,
) -> Quote {
    let input = (body_len as u64).div_ceil(3);
    let output = match endpoint {
        Endpoint::Embeddings | Endpoint::CountTokens => 0,
        _ => doc
            .max_output_tokens()
            .ok()
            .flatten()
            .unwrap_or(runtime.wallets.default_max_output),
    };
    let (mut ip, mut op) = (0, 0);
    for d in deployments {
        if let Some(p) = runtime.prices.lookup(&d.provider.name, &d.model) {
            ip = ip.max(p.input).max(p.cache_write_5m).max(p.cache_write_1h);
            op = op.max(p.output).max(p.reasoning);
        }
    }
    Quote::new(input, output, ip, op)
}

/// A request's cap from `x-tollgate-max-cost` (USD) and the key's (or its team's) setting:
/// the lower one.
fn cost_cap(app: &AppState, key: &KeyRecord, headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    let header = match headers.get("x-tollgate-max-cost") {
        None => None,
        Some(v) => {
            let text = v.to_str().unwrap_or("");
            let micros = crate::money::parse_usd(text)
                .ok()
                .and_then(|m| u64::try_from(m).ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::BadRequest,
                        format!("x-tollgate-max-cost must be an amount in USD, e.g. 0.25 (got \"{text}\")"),
                    )
                })?;
            Some(micros)
        }
    };
    let configured = key_setting(app, key, |l| l.max_cost_micros);
    Ok(match (header, configured) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// A per-key setting, else the key's team's.
fn key_setting<T>(
    app: &AppState,
    key: &KeyRecord,
    field: impl Fn(&crate::keys::KeyLimits) -> Option<T>,
) -> Option<T> {
    field(&key.limits).or_else(|| {
        key.team
            .as_deref()
            .and_then(|t| app.keys.team_limits(t))
            .and_then(|l| field(&l))
    })
}

/// The request's top level and its `model`, which every model endpoint requires.
fn parse_with_model(body: &Bytes) -> Result<(RequestDoc<'_>, String), ApiError> {
    let doc =
        RequestDoc::parse(body).map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
    let model = doc
        .model()
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()).param("model"))?
        .ok_or_else(|| {
            ApiError::new(ErrorKind::BadRequest, "you must provide a model parameter")
                .param("model")
        })?;
    Ok((doc, model))
}

/// Hot wallets: the wallet's hold in Redis, then any envelopes through the writer; a hold
/// whose envelopes refuse (or that may have landed after a timeout) is dropped again.
pub(crate) async fn hold_hot(
    app: &AppState,
    hot: &Arc<crate::hotwallet::HotWallets>,
    req: crate::metering::HoldRequest,
    within: std::time::Duration,
) -> Result<crate::metering::Held, String> {
    use crate::metering::Held;
    let Some(wallet) = req.wallet_id.clone() else {
        return app.meter.hold(req, within).await;
    };
    if app.meter.backlogged() {
        return Err("the ledger writer is behind".into());
    }
    let rid = req.request_id.clone();
    let cancel = |hot: &Arc<crate::hotwallet::HotWallets>| {
        let (hot, wallet, rid) = (hot.clone(), wallet.clone(), rid.clone());
        tokio::spawn(async move { hot.cancel(&wallet, &rid).await });
    };
    let balance = match hot.hold(&wallet, &rid, req.amount, req.expires_ms).await {
        Ok(crate::hotwallet::HotHold::Held { balance_micros }) => balance_micros,
        Ok(crate::hotwallet::HotHold::Insufficient {
            balance_micros,
            floor_micros,
        }) => {
            let refused = Held::Insufficient {
                balance_micros,
                floor_micros,
            };
            app.meter.refused(req, refused.clone());
            return Ok(refused);
        }
        Err(e) => {
            cancel(hot);
            return Err(e);
        }
    };
    if req.envelopes.is_empty() {
        return Ok(Held::Ok {
            balance_micros: Some(balance),
        });
    }
    let envelopes = crate::metering::HoldRequest {
        wallet_id: None,
        ..req
    };
    match app.meter.hold(envelopes, within).await {
        Ok(Held::Ok { .. }) => Ok(Held::Ok {
            balance_micros: Some(balance),
        }),
        other => {
            cancel(hot);
            other
        }
    }
}

/// The ledger did not answer: refuse before any upstream call (money fails closed).
pub(crate) fn wallet_unavailable(why: &str) -> ApiError {
    // Once per 10 s: during an outage every request would log this.
    static LAST_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = now_ms();
    let last = LAST_MS.load(std::sync::atomic::Ordering::Relaxed);
    if now - last >= 10_000
        && LAST_MS
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(error = %why, "wallet holds failing; refusing requests that need money (fail closed)");
    }
    ApiError::new(
        ErrorKind::WalletUnavailable,
        "the wallet ledger is unavailable right now; no upstream call was made, retry shortly",
    )
}

/// The 402 for a wallet that cannot cover a hold, the same for model calls and tool routes.
pub(crate) fn insufficient_funds(
    wallet_id: &str,
    balance_micros: i64,
    floor_micros: i64,
    hold_micros: u64,
    advice: &str,
) -> ApiError {
    ApiError::new(
        ErrorKind::InsufficientFunds,
        format!(
            "insufficient funds: this request needs a hold of ${} and wallet {wallet_id} has ${} available (floor ${}); {advice}",
            crate::money::usd(hold_micros as i64),
            crate::money::usd(balance_micros),
            crate::money::usd(floor_micros)
        ),
    )
    .details(money_details(&[
        ("wallet", wallet_id.into()),
        ("balance_micros", balance_micros.into()),
        ("hold_micros", hold_micros.into()),
        ("floor_micros", floor_micros.into()),
    ]))
}

fn money_details(
    pairs: &[(&str, serde_json::Value)],
) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[derive(serde::Deserialize)]
pub struct QuoteQuery {
    /// `chat` (default), `messages`, `responses` or `embeddings`: the body's dialect.
    endpoint: Option<String>,
}

/// `POST /v1/quote`: what a request would hold and whether it would be admitted, without
/// calling upstream or holding anything.
pub async fn quote_handler(
    State(app): State<Arc<AppState>>,
    axum::extract::Query(q): axum::extract::Query<QuoteQuery>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let result = async {
        let key = authenticate(&app, &parts.headers)?;
        let endpoint = match q.endpoint.as_deref().unwrap_or("chat") {
            "chat" => Endpoint::ChatCompletions,
            "messages" => Endpoint::Messages,
            "responses" => Endpoint::Responses,
            "embeddings" => Endpoint::Embeddings,
            other => {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "endpoint must be chat, messages, responses or embeddings, not \"{other}\""
                    ),
                ))
            }
        };
        let body = read_body(body, &parts.headers, app.server.max_body_bytes).await?;
        let (doc, model) = parse_with_model(&body)?;
        let runtime = app.runtime.load_full();
        if endpoint.streams() {
            check_output_cap(&doc, &runtime.limits)?;
        }
        let deployments = runtime.resolve(&model).ok_or_else(|| {
            ApiError::new(
                ErrorKind::ModelNotFound,
                format!("the model '{model}' does not exist or is not served here"),
            )
            .param("model")
        })?;
        let quote = quote(&runtime, &deployments, endpoint, &doc, body.len());
        let cap = cost_cap(&app, &key, &parts.headers)?;
        let (specs, _) = envelopes_for(&app, &key, &parts.headers)?;
        let envelope = if specs.is_empty() {
            Ok(())
        } else {
            let store = app.store.clone();
            let (cost, tokens) = (
                quote.cost_micros as i64,
                (quote.input_tokens + quote.output_tokens) as i64,
            );
            tokio::task::spawn_blocking(move || {
                store.read(|c| Ok(crate::envelope::would_fit(c, &specs, cost, tokens)?))
            })
            .await
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        };
        let wallet_id = app.keys.wallet_for(&key);
        let wallet = match &wallet_id {
            Some(id) => {
                let (store, id) = (app.store.clone(), id.clone());
                tokio::task::spawn_blocking(move || store.read(|c| crate::wallet::get(c, &id)))
                    .await
                    .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
                    .ok()
            }
            None => None,
        };
        // Hot wallets: Redis's figure (requests in flight held) is what a hold would face.
        let wallet = match (wallet, &app.hot) {
            (Some(mut w), Some(hot)) => {
                if let Ok(Some(avail)) = hot.available(&w.id).await {
                    w.balance_micros = avail;
                }
                Some(w)
            }
            (w, _) => w,
        };
        let reason = if !key.allows_model(&model) {
            Some("model_not_allowed")
        } else if cap.is_some_and(|c| quote.cost_micros > c) {
            Some("max_cost_exceeded")
        } else if let Err(e) = &envelope {
            Some(if e.envelope.starts_with("budget:") {
                "budget_exceeded"
            } else {
                "run_budget_exhausted"
            })
        } else if wallet
            .as_ref()
            .is_some_and(|w| w.balance_micros - (quote.cost_micros as i64) < w.floor_micros)
        {
            Some("insufficient_funds")
        } else {
            None
        };
        Ok(axum::Json(serde_json::json!({
            "model": model,
            "estimate": {
                "input_tokens": quote.input_tokens,
                "output_tokens": quote.output_tokens,
                "cost_micros": quote.cost_micros,
                "cost_usd": crate::money::usd(quote.cost_micros as i64),
            },
            "hold_micros": if wallet.is_some() { quote.cost_micros } else { 0 },
            "cap_micros": cap,
            "wallet": wallet,
            "envelope": envelope.err().map(|e| serde_json::json!({
                "envelope": e.envelope,
                "limit": e.what,
                "cap": e.cap,
                "used": e.used,
                "needed": e.needed,
            })),
            "admitted": reason.is_none(),
            "reason": reason,
        }))
        .into_response())
    }
    .await;
    match result {
        Ok(r) => r,
        Err(e) => e.into_dialect_response(Dialect::OpenAi),
    }
}

/// Refuses a request over its cost cap, and holds its maximum cost in the key's wallet (or
/// refuses with 402). With `clamp_max_tokens`, a request the wallet cannot cover in full is
/// sent with a `max_tokens` the wallet can pay instead.
#[allow(clippy::too_many_arguments)]
async fn hold(
    app: &Arc<AppState>,
    runtime: &Runtime,
    key: &KeyRecord,
    endpoint: Endpoint,
    headers: &HeaderMap,
    doc: &mut RequestDoc<'_>,
    deployments: &[Arc<Deployment>],
    settle: &mut Settlement,
) -> Result<(), ApiError> {
    let cap = cost_cap(app, key, headers)?;
    let (envelopes, run_id) = envelopes_for(app, key, headers)?;
    if run_id.is_some() {
        settle.rec_mut().run_id = run_id;
    }
    let wallet_id = app.keys.wallet_for(key);
    // Most requests have no cap, wallet or envelope: they skip the quote entirely.
    if cap.is_none() && wallet_id.is_none() && envelopes.is_empty() {
        return Ok(());
    }
    let mut q = quote(runtime, deployments, endpoint, doc, settle.body.len());
    if let Some(cap) = cap {
        if q.cost_micros > cap {
            return Err(ApiError::new(
                ErrorKind::MaxCostExceeded,
                format!(
                    "this request could cost up to ${} ({} input tokens estimated, {} output tokens allowed), above its cap of ${}; lower max_tokens or raise the cap",
                    crate::money::usd(q.cost_micros as i64),
                    q.input_tokens,
                    q.output_tokens,
                    crate::money::usd(cap as i64)
                ),
            )
            .details(money_details(&[
                ("estimate_micros", q.cost_micros.into()),
                ("cap_micros", cap.into()),
            ])));
        }
    }
    if wallet_id.is_none() && envelopes.is_empty() {
        return Ok(());
    }
    let ttl_ms = runtime.wallets.hold_ttl.as_millis() as i64;
    let clamp = key_setting(app, key, |l| l.clamp_max_tokens).unwrap_or(false);
    let mut clamped = false;
    loop {
        let started = Instant::now();
        let req = crate::metering::HoldRequest {
            wallet_id: wallet_id.clone(),
            envelopes: envelopes.clone(),
            request_id: settle.request_id.clone(),
            amount: q.cost_micros as i64,
            tokens: (q.input_tokens + q.output_tokens) as i64,
            expires_ms: now_ms() + ttl_ms,
        };
        let hot = app.hot.as_ref().filter(|_| wallet_id.is_some());
        if hot.is_some() && app.meter.backlogged() {
            settle.shed = true;
            return Err(wallet_unavailable("the ledger writer is behind"));
        }
        let outcome = match hot {
            Some(hot) => hold_hot(app, hot, req, runtime.wallets.hold_timeout).await,
            None => app.meter.hold(req, runtime.wallets.hold_timeout).await,
        };
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                // The hold may still land later: this record settles it (at cost 0).
                let rec = settle.rec_mut();
                rec.wallet_id = wallet_id.clone();
                rec.enveloped = !envelopes.is_empty();
                return Err(wallet_unavailable(&e));
            }
        };
        app.metrics
            .hold_seconds
            .observe(started.elapsed().as_secs_f64());
        match outcome {
            crate::metering::Held::BadRun(m) => {
                return Err(ApiError::new(ErrorKind::BadRequest, m).param("x-tollgate-run"));
            }
            crate::metering::Held::Ok { balance_micros } => {
                let rec = settle.rec_mut();
                rec.wallet_id = wallet_id.clone();
                rec.enveloped = !envelopes.is_empty();
                rec.hot_hold_micros = hot.map(|_| q.cost_micros as i64);
                settle.money = Some(q);
                if let Some(b) =
                    balance_micros.and_then(|b| HeaderValue::from_str(&b.to_string()).ok())
                {
                    settle.rate_headers.insert("x-tollgate-balance", b);
                }
                if clamped {
                    settle.rate_headers.insert(
                        "x-tollgate-clamped-max-tokens",
                        HeaderValue::from(q.output_tokens),
                    );
                }
                return Ok(());
            }
            crate::metering::Held::Exhausted(e) => {
                let budget = e.envelope.starts_with("budget:");
                let (kind, what) = if budget {
                    (ErrorKind::BudgetExceeded, "budget")
                } else {
                    (ErrorKind::RunBudgetExhausted, "run envelope")
                };
                let shown = |v: i64| {
                    if e.what == "cost" {
                        format!("${}", crate::money::usd(v))
                    } else {
                        v.to_string()
                    }
                };
                return Err(ApiError::new(
                    kind,
                    format!(
                        "the {what} {} is spent: {} {} of {} used, this request needs {}",
                        e.envelope.trim_start_matches("run:"),
                        shown(e.used),
                        e.what,
                        shown(e.cap),
                        shown(e.needed)
                    ),
                )
                .details(money_details(&[
                    ("envelope", e.envelope.clone().into()),
                    ("limit", e.what.into()),
                    ("cap", e.cap.into()),
                    ("used", e.used.into()),
                    ("needed", e.needed.into()),
                ])));
            }
            crate::metering::Held::Insufficient {
                balance_micros,
                floor_micros,
            } => {
                let wallet_id = wallet_id.clone().unwrap_or_default();
                let payable = (balance_micros - floor_micros).max(0) as u64;
                // What the wallet can pay for output once the input is paid for.
                let affordable = payable
                    .checked_sub(q.input_micros())
                    .map(|left| {
                        if q.output_price == 0 {
                            q.output_tokens
                        } else {
                            (u128::from(left) * 1_000_000 / u128::from(q.output_price)) as u64
                        }
                    })
                    .unwrap_or(0);
                const MIN_CLAMPED_OUTPUT: u64 = 16;
                if clamp
                    && !clamped
                    && affordable >= MIN_CLAMPED_OUTPUT
                    && affordable < q.output_tokens
                {
                    let field = match endpoint {
                        Endpoint::Messages => "max_tokens",
                        Endpoint::Responses => "max_output_tokens",
                        _ if doc.raw("max_completion_tokens").is_some() => "max_completion_tokens",
                        _ => "max_tokens",
                    };
                    doc.set_raw(field, affordable.to_string())
                        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
                    q = Quote::new(q.input_tokens, affordable, q.input_price, q.output_price);
                    clamped = true;
                    continue;
                }
                return Err(insufficient_funds(
                    &wallet_id,
                    balance_micros,
                    floor_micros,
                    q.cost_micros,
                    "top it up or lower max_tokens",
                ));
            }
        }
    }
}

/// The envelopes a request must fit in: its run (`x-tollgate-run`, under
/// `x-tollgate-parent-run` when it is new, with `x-tollgate-run-budget` caps) and the budgets
/// of its key, team and org.
#[allow(clippy::type_complexity)]
fn envelopes_for(
    app: &AppState,
    key: &KeyRecord,
    headers: &HeaderMap,
) -> Result<(Vec<crate::envelope::Spec>, Option<String>), ApiError> {
    let org = key.org.clone().unwrap_or_else(|| "default".into());
    let now = now_ms();
    let mut specs: Vec<crate::envelope::Spec> = app
        .keys
        .budgets_for(key)
        .iter()
        .map(|b| b.spec(&org, now))
        .collect();
    let header = |name: &'static str| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => {
                let t = v.to_str().unwrap_or("").trim();
                if t.is_empty() || t.len() > 128 || t.chars().any(|c| c.is_control()) {
                    return Err(ApiError::new(
                        ErrorKind::BadRequest,
                        format!("{name} must be 1 to 128 printable characters"),
                    ));
                }
                Ok(Some(t.to_string()))
            }
        }
    };
    if let Some(run) = header("x-tollgate-run")? {
        let caps = match header("x-tollgate-run-budget")? {
            Some(text) => crate::envelope::parse_caps(&text).map_err(|e| {
                ApiError::new(ErrorKind::BadRequest, format!("x-tollgate-run-budget: {e}"))
            })?,
            None => crate::envelope::Caps::default(),
        };
        specs.push(crate::envelope::Spec {
            id: format!("run:{run}"),
            kind: "run",
            parent: header("x-tollgate-parent-run")?.map(|p| format!("run:{p}")),
            org,
            caps,
            soft_cost_micros: None,
        });
        return Ok((specs, Some(run)));
    }
    Ok((specs, None))
}

/// `Cache-Control: no-cache` or `no-store`: the client wants its own upstream call, never
/// another request's answer.
fn no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("no-cache") || v.contains("no-store"))
}

/// Recognises client retries and holds them to the key's retry budget; returns the kept
/// answer when this is a retry of an `Idempotency-Key` request that already succeeded.
fn damp(
    app: &AppState,
    cfg: &crate::config::RetriesConfig,
    key: &KeyRecord,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: &Bytes,
    settle: &mut Settlement,
) -> Result<Option<Arc<crate::damping::Answer>>, ApiError> {
    use crate::damping::fingerprint;
    let now = now_us();
    let scope = [key.id.as_bytes(), endpoint.name().as_bytes()];
    settle.request_fp = fingerprint(&[scope[0], scope[1], body]);
    let idempotency = match headers.get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 255 => Some(k.trim()),
            _ => {
                return Err(ApiError::new(
                    ErrorKind::BadRequest,
                    "Idempotency-Key must be 1 to 255 visible ASCII characters",
                ))
            }
        },
    };
    let ttl = cfg.idempotency_ttl.as_micros() as u64;
    let mut retry = false;
    if let Some(k) = idempotency {
        let fp = fingerprint(&[scope[0], scope[1], b"idempotency-key", k.as_bytes()]);
        settle.idempotency_fp = Some(fp);
        if !no_cache(headers) {
            if let Some(answer) = app.damper.answer(fp, now) {
                if answer.request_fp != settle.request_fp {
                    return Err(ApiError::new(
                        ErrorKind::BadRequest,
                        "this Idempotency-Key was used for a different request; use a new key for a new request",
                    ));
                }
                return Ok(Some(answer));
            }
        }
        retry |= app.damper.idempotency_seen(fp, now, ttl);
    }
    let within = cfg.same_request_within.as_micros() as u64;
    retry |= app.damper.seen_recently(settle.request_fp, now, within);
    let window = cfg.window.as_micros() as u64;
    if !app.damper.admit(
        &key.id,
        now,
        window,
        retry,
        cfg.budget_ratio,
        cfg.budget_min,
    ) {
        app.metrics
            .retries_suppressed
            .get_or_create(&ScopeLabels { scope: "key" })
            .inc();
        return Err(ApiError::new(
            ErrorKind::RetryBudgetExhausted,
            format!(
                "too many retries: retries may be at most {:.0}% of this key's requests (at least {}) per {}s. Back off before retrying again.",
                cfg.budget_ratio * 100.0,
                cfg.budget_min,
                cfg.window.as_secs()
            ),
        )
        .retry_after((within / 1_000_000).max(1)));
    }
    if retry {
        settle
            .rate_headers
            .insert("x-tollgate-retry", HeaderValue::from_static("true"));
    }
    Ok(None)
}

/// Refuses an output cap that is not a count or is above `[limits] max_output_tokens`, naming
/// the field the request used. Every later sum (quote, hold, token reservation) relies on it.
fn check_output_cap(
    doc: &RequestDoc,
    limits: &crate::config::LimitsConfig,
) -> Result<(), ApiError> {
    match doc.max_output_field() {
        Err(e) => {
            let field = match &e {
                tollgate_proto::PeekError::Field { field, .. } => field,
                _ => "max_tokens",
            };
            Err(ApiError::new(ErrorKind::BadRequest, e.to_string()).param(field))
        }
        Ok(Some((field, n))) if n > limits.max_output_tokens => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!(
                "{field} is {n}, above this gateway's ceiling of {} output tokens ([limits] max_output_tokens)",
                limits.max_output_tokens
            ),
        )
        .param(field)),
        Ok(_) => Ok(()),
    }
}

/// Tokens a request may use, reserved against token limits at admission: bytes / 4 over the
/// whole body (cheap, and biased up: JSON syntax counts too) plus the output cap.
fn token_estimate(
    endpoint: Endpoint,
    doc: &RequestDoc,
    body_len: usize,
    defaults: &crate::config::LimitsConfig,
) -> u64 {
    let output = match endpoint {
        Endpoint::Embeddings | Endpoint::CountTokens => 0,
        _ => doc
            .max_output_tokens()
            .ok()
            .flatten()
            .unwrap_or(defaults.output_estimate),
    };
    (body_len as u64).div_ceil(4) + output
}

/// Overrides where they are set, the configured defaults elsewhere.
fn merge_limits(o: crate::keys::KeyLimits, d: crate::config::ScopeLimits) -> Limits {
    Limits {
        rpm: o.rpm.unwrap_or(d.rpm),
        tpm: o.tpm.unwrap_or(d.tpm),
        concurrency: o.concurrency.unwrap_or(d.concurrency),
    }
}

/// The limits a request to `model` with `key` must pass: the key's, its team's, the model's.
/// Unlimited scopes are left out, so a gateway without limits checks nothing.
fn limit_checks(app: &AppState, key: &KeyRecord, runtime: &Runtime, model: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    let d = &runtime.limits;
    let key_limits = merge_limits(
        key.limits,
        crate::config::ScopeLimits {
            rpm: d.rpm,
            tpm: d.tpm,
            concurrency: d.concurrency,
        },
    );
    if !key_limits.is_unlimited() {
        checks.push(Check {
            scope: Scope::Key,
            subject: key.id.clone(),
            limits: key_limits,
        });
    }
    if let Some(team) = &key.team {
        let l = merge_limits(app.keys.team_limits(team).unwrap_or_default(), d.team);
        if !l.is_unlimited() {
            checks.push(Check {
                scope: Scope::Team,
                subject: team.clone(),
                limits: l,
            });
        }
    }
    if let Some(l) = runtime.model_limits.get(model) {
        checks.push(Check {
            scope: Scope::Model,
            subject: model.to_string(),
            limits: *l,
        });
    }
    checks
}

/// A refusal by a limit: 429 with `Retry-After` and a body naming the limit (or 503 when the
/// shared limiter is unreachable and the limit fails closed).
pub(crate) fn refusal(app: &AppState, r: Refusal) -> ApiError {
    app.metrics
        .limit_refusals
        .get_or_create(&RefusalLabels {
            scope: r.scope.as_str(),
            class: r.class.as_str(),
        })
        .inc();
    let whose = match r.scope {
        Scope::Key => "this key".to_string(),
        Scope::Team => format!("team '{}'", r.subject),
        Scope::Model => format!("model '{}' (all keys together)", r.subject),
        Scope::Deployment => format!("deployment '{}'", r.subject),
        Scope::Route => match r.subject.split_once('/') {
            Some((route, _)) => format!("this key on route '{route}'"),
            None => format!("route '{}' (all keys together)", r.subject),
        },
    };
    let d = r.decision;
    let retry_secs = d.retry_after_us.div_ceil(1_000_000).max(1);
    if r.backend_unavailable {
        return ApiError::new(
            ErrorKind::LimiterUnavailable,
            format!(
                "the shared rate limiter is unreachable and the {} limit of {whose} fails closed; try again shortly",
                r.class.as_str()
            ),
        )
        .retry_after(retry_secs);
    }
    let (message, headers) = match r.class {
        Class::Requests => (
            format!("rate limit reached: {} requests per minute for {whose}", d.limit),
            rate_limit_headers(Some(d), None),
        ),
        Class::Tokens => (
            format!("rate limit reached: {} tokens per minute for {whose} (a request reserves its input estimate plus max_tokens)", d.limit),
            rate_limit_headers(None, Some(d)),
        ),
        Class::Concurrency => (
            format!("too many concurrent requests: {whose} may have {} in flight", d.limit),
            HeaderMap::new(),
        ),
    };
    let mut e = ApiError::new(ErrorKind::RateLimited, message)
        .param(r.class.as_str())
        .retry_after(retry_secs);
    let mut headers = headers;
    if let Ok(v) = HeaderValue::from_str(&format!("{}:{}", r.scope.as_str(), r.class.as_str())) {
        headers.insert("x-tollgate-limit", v);
    }
    e.headers = Some(Box::new(headers));
    e
}

/// OpenAI's `x-ratelimit-*` headers for the limits that apply.
fn rate_limit_headers(requests: Option<Decision>, tokens: Option<Decision>) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (name, d) in [("requests", requests), ("tokens", tokens)] {
        let Some(d) = d else { continue };
        let pairs = [
            (format!("x-ratelimit-limit-{name}"), d.limit.to_string()),
            (
                format!("x-ratelimit-remaining-{name}"),
                d.remaining.to_string(),
            ),
            (format!("x-ratelimit-reset-{name}"), reset_text(d.reset_us)),
        ];
        for (k, v) in pairs {
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_str(&v),
            ) {
                h.insert(k, v);
            }
        }
    }
    h
}

/// `850ms`, `12s`, `1m30s`: the duration format OpenAI uses in reset headers.
fn reset_text(us: u64) -> String {
    let ms = us.div_ceil(1000);
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1000);
    match (secs / 60, secs % 60) {
        (0, s) => format!("{s}s"),
        (m, 0) => format!("{m}m"),
        (m, s) => format!("{m}m{s}s"),
    }
}

/// `GET /v1/models`: what this key may call.
pub async fn list_models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let key = match authenticate(&app, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let runtime = app.runtime.load();
    let data: Vec<serde_json::Value> = runtime
        .model_names()
        .into_iter()
        .filter(|(name, _)| key.allows_model(name))
        .map(|(name, owner)| serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}
