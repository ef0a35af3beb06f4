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
mod affinity;
mod cached;
mod damp;
mod endpoint;
mod escalate;
mod forward;
mod govern;
mod hold;
mod models;
mod nudge;
mod quote;
mod route;
mod scrub;
mod settle;
mod shrink;
mod stream;
mod toolcalls;

pub(crate) use accept::*;
pub(crate) use admit::*;
pub(crate) use affinity::*;
pub(crate) use cached::*;
pub(crate) use damp::*;
pub(crate) use endpoint::*;
pub(crate) use escalate::*;
pub(crate) use forward::*;
pub(crate) use govern::*;
pub(crate) use hold::*;
pub(crate) use models::*;
pub(crate) use quote::*;
pub(crate) use route::*;
pub(crate) use scrub::*;
pub(crate) use settle::*;
pub(crate) use shrink::*;
pub(crate) use stream::*;
pub(crate) use toolcalls::*;

/// Whether a `keys`/`teams` selection (`prefix*` patterns) covers `key`: a key it names, a
/// key of a team it names, or every key when it names none.
pub(crate) fn covers(keys: &[String], teams: &[String], key: &KeyRecord) -> bool {
    use crate::keys::pattern_matches;
    keys.is_empty() && teams.is_empty()
        || keys.iter().any(|p| pattern_matches(p, &key.name))
        || key
            .team
            .as_deref()
            .is_some_and(|t| teams.iter().any(|p| pattern_matches(p, t)))
}

/// The handler of a model endpoint (the router mounts one per row of the endpoint table).
pub async fn model_call(app: Arc<AppState>, endpoint: Endpoint, req: Request) -> Response {
    handle(app, endpoint, req).await
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
    let runtime = app.runtime.load_full();
    let mut settle = Settlement::new(
        app.clone(),
        runtime,
        &key,
        endpoint.name().to_string(),
        &request_id,
        started,
    );
    settle.begin_trace(&parts.headers);

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
            // Refused for money before any provider saw it: resending it once the wallet is
            // topped up (or the budget reset) is a new attempt, not a retry to count against
            // the key's retry budget.
            if !settle.upstream_started && e.status() == http::StatusCode::PAYMENT_REQUIRED {
                app.damper.forget(settle.request_fp);
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

/// The phases of a model call, in order. Each is a function of the request's context in its
/// own file; a phase that answers by itself (a replay, a refusal, a local count) ends the
/// request there, and the `Settlement` records it whichever phase that is.
async fn run(
    app: &Arc<AppState>,
    endpoint: Endpoint,
    headers: &HeaderMap,
    body: Body,
    key: &KeyRecord,
    settle: &mut Settlement,
) -> Result<Response, ApiError> {
    // accept (accept.rs)
    let body = read_body(body, headers, app.server.max_body_bytes).await?;
    settle.body = body.clone();
    settle.rec_mut().request_bytes = body.len() as u64;
    if settle.runtime.logging.bodies {
        let max = settle.runtime.logging.max_body_bytes;
        settle.rec_mut().bodies = Some(Box::new(crate::records::Bodies::new(&body, max)));
    }
    // peek (accept.rs)
    let (mut doc, model) = parse_with_model(&body)?;
    let mut cx = Ctx {
        app,
        runtime: settle.runtime.clone(),
        endpoint,
        headers,
        key,
        settle,
        body: body.clone(),
        model,
        stream: false,
    };
    peek(&mut cx, &doc)?;
    // authorize (accept.rs)
    authorize(&cx)?;
    // redact (scrub.rs): personal data and secrets masked, or the request refused
    redact_request(&mut cx, &mut doc)?;
    // compress (shrink.rs): tool output in the conversation made smaller
    compress_request(&mut cx, &mut doc)?;
    // damp (damp.rs): replays of answered retries, retry budgets, the loop guard
    if let Some(answer) = damp_phase(&mut cx, &doc)? {
        return Ok(answer);
    }
    // cache (cached.rs): an answer kept for this very request
    if let Some(answer) = cache_phase(&mut cx).await? {
        return Ok(answer);
    }
    // admit (admit.rs): limits per key, team and model
    let estimate = admit(&mut cx, &doc).await?;
    // coalesce (damp.rs): one upstream call for identical requests in flight
    if let Some(answer) = coalesce(&mut cx).await? {
        return answer;
    }
    // route (route.rs): the deployments that can serve it, healthy ones first
    let (deployments, candidates) = match route(&mut cx)? {
        Routed::Local(answer) => return Ok(answer),
        Routed::To(deployments, candidates) => (deployments, candidates),
    };
    // cascade (escalate.rs): a cascade alias's tiers, each routed
    let tiers = cascade_tiers(&cx)?;
    // hold (hold.rs): spend caps, and the wallet's hold for the request's maximum cost
    if endpoint != Endpoint::CountTokens {
        let span = cx
            .settle
            .rec
            .trace
            .get()
            .map(|t| t.child("tollgate.hold", crate::otel::Kind::Internal, Vec::new()));
        let held = hold(&mut cx, &mut doc, &deployments).await;
        if let Some(span) = span {
            let s = &mut *cx.settle;
            let mut attrs: crate::otel::Attrs = Vec::new();
            if let Some(q) = &s.money {
                attrs.push(("tollgate.hold_micros", q.cost_micros.into()));
            }
            if let Some(w) = &s.rec.wallet_id {
                attrs.push(("tollgate.wallet_id", w.as_str().into()));
            }
            let error = held.as_ref().err().map(|e| e.kind.as_str());
            if let Some(e) = error {
                attrs.push(("error.type", e.into()));
            }
            if let Some(t) = s.rec.trace.get() {
                t.end_child(span, error, attrs);
            }
        }
        held?;
    }
    // A cache hit with a fee, now held for: answered instead of the upstream call.
    if let Some(entry) = cx.settle.cache_hit.take() {
        let fee = cx.runtime.cache.fee_micros;
        return Ok(cx.settle.cached(&entry, fee));
    }
    if let Some((cascade, tiers)) = tiers {
        return escalate(&mut cx, &mut doc, &cascade, tiers, estimate).await;
    }
    // forward (forward.rs), then settle (settle.rs) or stream (stream.rs)
    match forward(&mut cx, &mut doc, &candidates, estimate, None).await? {
        Forwarded::Answer(resp) => Ok(resp),
        // Only a cascade tier's answer is checked.
        Forwarded::Rejected(why) => Err(ApiError::new(ErrorKind::Internal, why)),
    }
}

/// One request on its way through the phases: what each phase reads, and the settlement
/// that owns its record. `runtime` is the configuration the request started with.
pub(crate) struct Ctx<'a> {
    pub(crate) app: &'a Arc<AppState>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) endpoint: Endpoint,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) key: &'a KeyRecord,
    pub(crate) settle: &'a mut Settlement,
    pub(crate) body: Bytes,
    pub(crate) model: String,
    pub(crate) stream: bool,
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
