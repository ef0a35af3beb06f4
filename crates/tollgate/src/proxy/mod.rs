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

mod accept;
mod admit;
mod damp;
mod endpoint;
mod forward;
mod hold;
mod models;
mod quote;
mod settle;
mod stream;

pub(crate) use accept::*;
pub(crate) use admit::*;
pub(crate) use damp::*;
pub(crate) use endpoint::*;
pub(crate) use forward::*;
pub(crate) use hold::*;
pub(crate) use models::*;
pub(crate) use quote::*;
pub(crate) use settle::*;
pub(crate) use stream::*;

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
