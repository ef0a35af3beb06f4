//! The forward phase: one upstream attempt, up to a stream's first event or a whole JSON
//! answer, and how its failures are classified for retry.

use super::*;

/// `anthropic-version` (the client's, or the current one) and `anthropic-beta` for the
/// Anthropic dialect; nothing for OpenAI's.
pub(crate) fn anthropic_headers(endpoint: Endpoint, client: &HeaderMap) -> HeaderMap {
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

/// A complete JSON answer from the provider.
pub(crate) struct JsonAnswer {
    pub(crate) status: StatusCode,
    pub(crate) headers: reqwest::header::HeaderMap,
    pub(crate) body: Bytes,
}

pub(crate) enum Upstream {
    Json(JsonAnswer),
    Stream { first: Bytes, rest: Answer },
}

/// A provider's response, from whichever client called it.
pub(crate) enum Answer {
    Reqwest(reqwest::Response),
    H1(crate::h1client::H1Response),
}

pub(crate) type BoxError = crate::h1client::BoxError;

/// A response body as a stream of chunks.
pub(crate) type BodyStream =
    Pin<Box<dyn futures_util::Stream<Item = Result<Bytes, BoxError>> + Send>>;

impl Answer {
    fn status(&self) -> StatusCode {
        match self {
            Answer::Reqwest(r) => r.status(),
            Answer::H1(r) => r.status,
        }
    }

    fn headers(&self) -> &HeaderMap {
        match self {
            Answer::Reqwest(r) => r.headers(),
            Answer::H1(r) => &r.headers,
        }
    }

    async fn chunk(&mut self) -> Result<Option<Bytes>, BoxError> {
        match self {
            Answer::Reqwest(r) => r.chunk().await.map_err(BoxError::from),
            Answer::H1(r) => r.chunk().await,
        }
    }

    async fn bytes(self) -> Result<Bytes, BoxError> {
        match self {
            Answer::Reqwest(r) => r.bytes().await.map_err(BoxError::from),
            Answer::H1(r) => r.bytes().await,
        }
    }

    pub(crate) fn into_stream(self) -> BodyStream {
        use futures_util::TryStreamExt;
        match self {
            Answer::Reqwest(r) => Box::pin(r.bytes_stream().map_err(BoxError::from)),
            Answer::H1(r) => Box::pin(r.into_stream()),
        }
    }
}

pub(crate) struct Failure {
    pub(crate) error: ApiError,
    pub(crate) retryable: bool,
    pub(crate) retry_after: Option<Duration>,
    /// The provider accepted the request (a 2xx head arrived) and then the answer broke
    /// off: what arrived of it. The provider did the work, so the attempt is billed.
    pub(crate) reached: Option<Bytes>,
}

impl Failure {
    pub(crate) fn retry(kind: ErrorKind, message: String) -> Failure {
        Failure {
            error: ApiError::new(kind, message),
            retryable: true,
            retry_after: None,
            reached: None,
        }
    }

    pub(crate) fn after_answer(kind: ErrorKind, message: String, partial: Bytes) -> Failure {
        Failure {
            reached: Some(partial),
            ..Failure::retry(kind, message)
        }
    }
}

/// The trace context the provider is sent, and the attempt's span when the request is
/// traced: the attempt names itself as the provider's parent. Untraced, a caller's valid
/// `traceparent` (and `tracestate`) goes on as it came, so the provider stays in its trace.
fn propagate(
    settle: &mut Settlement,
    client: &HeaderMap,
    dep: &Deployment,
    up_endpoint: Endpoint,
    attempt: u32,
    out: &mut HeaderMap,
) -> Option<crate::otel::SpanId> {
    let Some(t) = settle.rec.trace.get() else {
        if let Some(v) = client
            .get("traceparent")
            .filter(|v| crate::otel::parse_traceparent(v.as_bytes()).is_some())
        {
            out.insert("traceparent", v.clone());
            if let Some(state) = crate::otel::tracestate(client) {
                out.insert("tracestate", state.clone());
            }
        }
        return None;
    };
    let (name, attrs) = if t.recording() {
        let operation = crate::metering::genai_operation(up_endpoint.name());
        let mut attrs: crate::otel::Attrs = vec![
            ("gen_ai.operation.name", operation.into()),
            (
                "gen_ai.provider.name",
                crate::providers::kind(dep.provider.kind).genai_name.into(),
            ),
            ("gen_ai.request.model", dep.model.as_str().into()),
            ("tollgate.provider", dep.provider.name.as_str().into()),
            ("tollgate.attempt", attempt.into()),
        ];
        if let Ok(url) = dep.provider.url(up_endpoint.upstream_path()) {
            if let Some(host) = url.host_str() {
                attrs.push(("server.address", host.into()));
            }
            if let Some(port) = url.port_or_known_default() {
                attrs.push(("server.port", port.into()));
            }
        }
        (format!("{operation} {}", dep.model), attrs)
    } else {
        (String::new(), Vec::new())
    };
    let id = t.child(name, crate::otel::Kind::Client, attrs);
    out.insert("traceparent", t.traceparent(&id));
    if let Some(v) = t
        .tracestate
        .as_deref()
        .and_then(|s| HeaderValue::from_str(s).ok())
    {
        out.insert("tracestate", v);
    }
    Some(id)
}

/// One upstream attempt, up to the first byte of a stream or the whole of a JSON answer.
/// Anything that fails here can still be retried: the client has seen nothing yet.
pub(crate) async fn forward_once(
    dep: &Deployment,
    endpoint: Endpoint,
    extra_headers: &HeaderMap,
    body: Bytes,
    stream: bool,
) -> Result<Upstream, Failure> {
    let p = &dep.provider;
    let url = p.url(endpoint.upstream_path()).map_err(|e| {
        Failure::retry(
            ErrorKind::UpstreamUnavailable,
            format!("provider '{}' has no usable URL: {e}", p.name),
        )
    })?;
    let deadline = tokio::time::Instant::now() + p.first_byte_timeout;
    let send = async {
        match &p.h1 {
            Some(pool) => {
                let with_query;
                let path = match url.query() {
                    Some(q) => {
                        with_query = format!("{}?{q}", url.path());
                        &with_query
                    }
                    None => url.path(),
                };
                pool.post(path, [&p.headers, extra_headers], body)
                    .await
                    .map(Answer::H1)
            }
            None => p
                .client
                .post(url)
                .headers(p.headers.clone())
                .headers(extra_headers.clone())
                .header(http::header::CONTENT_TYPE, "application/json")
                .body(body)
                .send()
                .await
                .map(Answer::Reqwest)
                .map_err(BoxError::from),
        }
    };
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
                format!("provider '{}' unreachable: {}", p.name, error_chain(&*e)),
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
                format!("provider '{}' stream failed: {}", p.name, error_chain(&*e)),
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
                        error_chain(&*e)
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
pub(crate) fn partial_answer_text(body: &[u8]) -> String {
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

pub(crate) fn classify_status(
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

pub(crate) use crate::error::error_chain;

/// What the forward phase ended with.
pub(crate) enum Forwarded {
    Answer(Response),
    /// A cascade tier's answer (JSON, or a stream read whole) failed its checks (why):
    /// billed on the record, not sent.
    Rejected(String),
}

/// What a cascade tier's answer is checked against before it may be returned.
pub(crate) struct TierCheck<'a> {
    pub(crate) validators: &'a crate::cascade::Validators,
    /// The request as the client sent it (its schemas and tools).
    pub(crate) request: &'a serde_json::Value,
    /// For a stream: read whole up to this many bytes, checked, then replayed (0: JSON only).
    pub(crate) max_stream_bytes: usize,
}

/// A cascade tier's stream, read whole before any of it goes out.
enum Buffered {
    /// It ended properly: its bytes, its events, and what its observer read.
    Whole(Bytes, Vec<tollgate_proto::SseEvent>, Observer),
    /// Longer than the buffer: what was read; the rest is still upstream.
    TooLong(Bytes),
    /// It broke off, stalled or reported an error: what arrived, and why.
    Broke(Bytes, String),
}

/// Reads a stream to its end under the provider's idle and total timeouts and `max` bytes.
async fn buffer_stream(
    dep: &Deployment,
    up_endpoint: Endpoint,
    first: Bytes,
    rest: &mut Answer,
    max: usize,
) -> Buffered {
    let mut buf = bytes::BytesMut::from(&first[..]);
    let deadline = tokio::time::Instant::now() + dep.provider.total_timeout;
    loop {
        if buf.len() > max {
            return Buffered::TooLong(buf.freeze());
        }
        let next = (tokio::time::Instant::now() + dep.provider.idle_timeout).min(deadline);
        match tokio::time::timeout_at(next, rest.chunk()).await {
            Ok(Ok(Some(c))) => buf.extend_from_slice(&c),
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                let why = format!("the provider's stream broke off: {}", error_chain(&*e));
                return Buffered::Broke(buf.freeze(), why);
            }
            Err(_) => {
                let why = format!(
                    "the provider's stream stalled or ran past {:?}",
                    dep.provider.total_timeout
                );
                return Buffered::Broke(buf.freeze(), why);
            }
        }
    }
    let buf = buf.freeze();
    let mut observer = Observer::for_endpoint(up_endpoint);
    let mut events = Vec::new();
    tollgate_proto::SseSplitter::new().push(&buf, &mut events);
    for ev in &events {
        observer.observe(ev);
    }
    if observer.saw_error() {
        return Buffered::Broke(buf, "the provider reported an error in the stream".into());
    }
    if !observer.ended_properly() {
        return Buffered::Broke(
            buf,
            "the provider's stream ended before its last event".into(),
        );
    }
    Buffered::Whole(buf, events, observer)
}

/// The forward phase: attempts over the candidates (a deployment at its own limit is skipped,
/// a retryable failure is retried on the next one within the retry budget, after a backoff),
/// translating to and from the provider's dialect; the answer goes to `finish_json` or
/// `stream_response`. With `check` (a cascade tier before the last), a JSON answer (or a
/// stream read whole, when `max_stream_bytes` allows) that fails it is billed and `Rejected`
/// instead.
pub(crate) async fn forward(
    cx: &mut Ctx<'_>,
    doc: &mut RequestDoc<'_>,
    candidates: &[Arc<Deployment>],
    estimate: u64,
    check: Option<TierCheck<'_>>,
) -> Result<Forwarded, ApiError> {
    let (app, endpoint, headers, stream, key) =
        (cx.app, cx.endpoint, cx.headers, cx.stream, cx.key);
    let model: &str = &cx.model;
    let runtime = cx.runtime.clone();
    // Provider prompt caches (affinity.rs): decided once, applied to every attempt.
    let plan = prompt_plan(cx, doc);
    // The key's tool policy over the calls in this deployment's answer (`toolcalls.rs`).
    let judge = |settle: &Settlement, dep: &Deployment| {
        Judge::for_key(
            app,
            &runtime,
            key,
            &dep.provider.name,
            model,
            settle.rec.run_id.as_deref(),
            &settle.request_id,
        )
    };
    let settle = &mut *cx.settle;
    let client_wants_usage = doc.client_wants_stream_usage();
    if stream && endpoint == Endpoint::ChatCompletions {
        doc.force_stream_usage()
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
    }
    let ordered;
    let candidates = match &plan {
        Some(p) => {
            ordered = p.order(app, &runtime, candidates);
            &ordered[..]
        }
        None => candidates,
    };
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
            rec.genai_provider = Some(crate::providers::kind(dep.provider.kind).genai_name);
            rec.model_served = Some(dep.model.clone());
        }
        doc.set_str("model", &dep.model)
            .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
        // The endpoint the provider is called on: the client's, or its counterpart in the
        // provider's dialect when the request must be translated.
        let up_endpoint = endpoint.for_provider(dep.provider.kind);
        let translated = up_endpoint != endpoint;
        let upstream_body = if translated {
            let policy = &runtime.translation;
            let t = match up_endpoint {
                Endpoint::Messages => {
                    translate::chat_request_to_messages_with(&doc.to_vec(), &dep.model, policy)
                }
                _ => translate::messages_request_to_chat_with(&doc.to_vec(), &dep.model, policy),
            }
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
            if !t.dropped.is_empty() {
                let note = format!(
                    "dropped {} (no equivalent at {}; see [translation] to map or reject)",
                    t.dropped.join(", "),
                    dep.provider.name
                );
                if let Ok(v) = HeaderValue::from_str(&note) {
                    // Once, however many attempts went to this deployment.
                    let h = &mut settle.rate_headers;
                    if !h.get_all("x-tollgate-warning").iter().any(|x| *x == v) {
                        h.append("x-tollgate-warning", v);
                    }
                }
            }
            Bytes::from(t.body)
        } else {
            Bytes::from(doc.to_vec())
        };
        let upstream_body = match &plan {
            Some(p) => p.body(
                &runtime,
                &dep,
                up_endpoint,
                upstream_body,
                &mut settle.rate_headers,
            ),
            None => upstream_body,
        };
        let mut extra_headers = anthropic_headers(up_endpoint, headers);
        let span = propagate(
            settle,
            headers,
            &dep,
            up_endpoint,
            attempt,
            &mut extra_headers,
        );
        settle.upstream_started = true;
        let outcome = forward_once(&dep, up_endpoint, &extra_headers, upstream_body, stream).await;
        if let (Some(id), Some(t)) = (span, settle.rec.trace.get()) {
            match &outcome {
                Ok(Upstream::Json(a)) => t.end_child(
                    id,
                    None,
                    vec![("http.response.status_code", a.status.as_u16().into())],
                ),
                // Open while the stream lasts: the root's end closes it.
                Ok(Upstream::Stream { .. }) => {
                    t.annotate(id, vec![("http.response.status_code", 200u16.into())])
                }
                Err(f) => {
                    let kind = f.error.kind.as_str();
                    t.end_child(id, Some(kind), vec![("error.type", kind.into())]);
                }
            }
        }
        let end_span = |settle: &mut Settlement, why: &str| {
            if let (Some(id), Some(t)) = (span, settle.rec.trace.get()) {
                t.end_child(
                    id,
                    Some(why),
                    vec![("error.type", "tollgate.rejected".into())],
                );
            }
        };
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
                if let Some(p) = &plan {
                    p.served(app, &dep);
                }
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
                if let Some(c) = &check {
                    let shown = client_body.as_ref().unwrap_or(&answer.body);
                    let verdict = if answer.status.is_success() {
                        crate::cascade::check(c.validators, c.request, shown)
                    } else {
                        Err(format!("the provider answered {}", answer.status))
                    };
                    if let Err(why) = verdict {
                        settle.bill_rejected_tier(&runtime, &dep, up_endpoint, &answer.body);
                        return Ok(Forwarded::Rejected(why));
                    }
                }
                let judge = judge(settle, &dep);
                let client_body = match judge {
                    Some(j) => {
                        let shown = client_body.as_ref().unwrap_or(&answer.body).clone();
                        match govern_answer(&j, settle.rec_mut(), endpoint, &shown).await {
                            Some(r) => {
                                settle.parked |= r.parked;
                                Some(Bytes::from(r.body))
                            }
                            None => client_body,
                        }
                    }
                    None => client_body,
                };
                // redact (scrub.rs): what the agent is not to see of the answer
                let shown = client_body.as_ref().unwrap_or(&answer.body);
                let client_body = match redact_answer(app, &runtime, key, settle.rec_mut(), shown) {
                    Some(b) => Some(Bytes::from(b)),
                    None => client_body,
                };
                return Ok(Forwarded::Answer(settle.finish_json(
                    &runtime,
                    &dep,
                    up_endpoint,
                    answer,
                    client_body,
                )));
            }
            Ok(Upstream::Stream { first, mut rest }) => {
                dep.health.success(now_ms(), &runtime.routing);
                if let Some(p) = &plan {
                    p.served(app, &dep);
                }
                let (first, rest): (Bytes, BodyStream) = match &check {
                    Some(c) if stream && c.max_stream_bytes > 0 => {
                        match buffer_stream(&dep, up_endpoint, first, &mut rest, c.max_stream_bytes)
                            .await
                        {
                            Buffered::Whole(sse, events, observer) => {
                                let verdict =
                                    crate::cascade::check_stream(c.validators, c.request, &events);
                                if let Err(why) = verdict {
                                    settle.bill_rejected_stream(&runtime, &dep, &observer);
                                    end_span(settle, &why);
                                    return Ok(Forwarded::Rejected(why));
                                }
                                (sse, Box::pin(futures_util::stream::empty()))
                            }
                            Buffered::TooLong(read) => {
                                if let Some(trail) = settle.rec_mut().cascade.as_mut() {
                                    trail.push_str(" (unchecked: longer than buffer_max_bytes)");
                                }
                                (read, rest.into_stream())
                            }
                            Buffered::Broke(partial, why) => {
                                settle.bill_broken_attempt(&runtime, &dep, &partial);
                                end_span(settle, &why);
                                return Ok(Forwarded::Rejected(why));
                            }
                        }
                    }
                    _ => (first, rest.into_stream()),
                };
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
                    guard: judge(settle, &dep).and_then(|j| ToolGuard::new(j, endpoint)),
                    scrub: StreamScrub::new(app, &runtime, key, endpoint),
                };
                return Ok(Forwarded::Answer(stream_response(
                    app, settle, &dep, view, first, rest,
                )));
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
