//! Tool routes: a path prefix proxied to any HTTP service, behind the same virtual keys,
//! limits, loop guard and metering as model calls, so one runaway agent cannot take down
//! the service behind.
//!
//! The life of a call is the model calls' pipeline with its own forward phase: match the
//! route → authenticate → the `Settlement` (the same one model calls use) → read the body →
//! loop guard → admit (per-key and route-wide limits) → hold (`proxy::place_hold`) → forward
//! → stream the answer back, counting its bytes → `finish_route` (status, bytes, latency,
//! price per call) when the body ends; a client that leaves at any point is recorded by the
//! settlement's `Drop`, as for a model call.

use crate::clock::{new_request_id, now_ms};
use crate::error::{ApiError, Dialect, ErrorKind};
use crate::keys::KeyRecord;
use crate::limits::{now_us, Check, Scope};
use crate::metrics::RequestLabels;
use crate::proxy::{authenticate, insufficient_funds, place_hold, read_body, refusal, Settlement};
use crate::state::AppState;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, HeaderName, HeaderValue};

pub use crate::toolroute::ToolRoute;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

/// Headers that belong to one hop, or to the caller's relation with the gateway.
fn forwardable(name: &HeaderName) -> bool {
    !matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
    )
}

/// Everything no other route claimed: a tool route, or 404.
pub async fn fallback(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let runtime = app.runtime.load_full();
    let path = req.uri().path();
    // Longest prefix first (the runtime keeps them sorted so).
    let Some(route) = runtime
        .routes
        .iter()
        .find(|r| r.rest(path).is_some())
        .cloned()
    else {
        return ApiError::new(ErrorKind::NotFound, format!("no route for {path}"))
            .into_dialect_response(crate::error::dialect_for_path(path));
    };
    let started = Instant::now();
    let request_id = new_request_id();
    let mut resp = match call(&app, runtime.clone(), &route, req, &request_id, started).await {
        Ok(r) => r,
        Err(e) => e.into_dialect_response(Dialect::OpenAi),
    };
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: "route",
            status: resp.status().as_u16(),
        })
        .inc();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// A tool call goes through the model calls' pipeline with its own forward phase: the same
/// `Settlement` owns its record (so a client that leaves mid-call is recorded, and a panic
/// still meters), it is held through the same `place_hold`, and it is committed by the same
/// `commit` when the answer's body ends.
async fn call(
    app: &Arc<AppState>,
    runtime: Arc<crate::upstream::Runtime>,
    route: &Arc<ToolRoute>,
    req: Request,
    request_id: &str,
    started: Instant,
) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let key = authenticate(app, &parts.headers)?;
    let mut settle = Settlement::for_route(
        app.clone(),
        runtime.clone(),
        &key,
        route,
        request_id,
        started,
    );
    settle.begin_trace(&parts.headers);
    match forward(app, route, parts, body, &key, &mut settle, &runtime).await {
        Ok((status, headers, upstream)) => {
            let body = CountingBody {
                inner: Box::pin(upstream.bytes_stream()),
                bytes: 0,
                status: status.as_u16(),
                settle,
                done: false,
            };
            let mut resp = Response::new(Body::from_stream(body));
            *resp.status_mut() = status;
            *resp.headers_mut() = headers;
            resp.extensions_mut().insert(crate::error::Passthrough);
            Ok(resp)
        }
        Err(e) => {
            settle.finish_error(&e);
            Err(e)
        }
    }
}

/// The phases of a tool call up to the service's answer head: accept, loop guard, admit,
/// hold, forward.
async fn forward(
    app: &Arc<AppState>,
    route: &Arc<ToolRoute>,
    parts: http::request::Parts,
    body: Body,
    key: &KeyRecord,
    settle: &mut Settlement,
    runtime: &crate::upstream::Runtime,
) -> Result<(http::StatusCode, HeaderMap, reqwest::Response), ApiError> {
    let body = read_body(body, &parts.headers, app.server.max_body_bytes).await?;
    settle.rec_mut().request_bytes = body.len() as u64;
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");

    // govern: the key's tool policy sees the call as (method, path, body). Keys no policy
    // names skip it, so ungoverned route calls do not parse their bodies.
    if runtime.policies.governs(key) {
        let rest = route.rest(parts.uri.path()).unwrap_or_default();
        let args = serde_json::json!({
            "method": parts.method.as_str(),
            "path": rest,
            "query": parts.uri.query(),
            "body": serde_json::from_slice::<serde_json::Value>(&body).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
            }),
        });
        let call = crate::policy::Call {
            surface: "route",
            server: &route.name,
            tool: &route.name,
            args: &args,
            model: None,
            run: None,
        };
        let request_id = settle.request_id.clone();
        crate::proxy::govern(app, runtime, key, settle.rec_mut(), &call, &request_id)
            .await
            .map_err(|stop| stop.error)?;
    }

    // redact (proxy/scrub.rs): what the key's redaction keeps from the service
    let body = match crate::proxy::redact_body(app, runtime, key, settle.rec_mut(), &body)? {
        Some(redacted) => redacted,
        None => body,
    };

    // loop guard
    if route.loop_guard {
        let body_text = String::from_utf8_lossy(&body);
        repeated_call(
            app,
            &runtime.loop_guard,
            &key.id,
            &format!("route:{}", route.name),
            &[
                Some(parts.method.as_str()),
                Some(path_and_query),
                Some(&body_text),
            ],
            &format!("this exact call to '{}'", route.name),
        )?;
    }

    // admit
    let mut checks = Vec::with_capacity(2);
    if !route.per_key.is_unlimited() {
        checks.push(Check {
            scope: Scope::Route,
            subject: format!("{}/{}", route.name, key.id),
            limits: route.per_key,
        });
    }
    if !route.total.is_unlimited() {
        checks.push(Check {
            scope: Scope::Route,
            subject: route.name.clone(),
            limits: route.total,
        });
    }
    let admission = app
        .limiter
        .admit(&checks, 0)
        .await
        .map_err(|r| refusal(app, r))?;
    settle.admission = Some(admission);

    // hold: a priced call from a key with a wallet pays like a model call
    hold_call_price(
        app,
        runtime,
        key,
        settle,
        route.price_per_call,
        &format!("a call to '{}' costs that much; top it up", route.name),
    )
    .await?;

    // forward
    let rest = route.rest(parts.uri.path()).unwrap_or_default().to_string();
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let url = format!("{}{rest}{query}", route.upstream);
    let mut headers: HeaderMap = parts
        .headers
        .iter()
        .filter(|(n, _)| forwardable(n))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    headers.extend(route.headers.clone());
    if let Ok(v) = HeaderValue::from_str(&settle.request_id) {
        headers.insert("x-request-id", v);
    }
    // Traced, the service's parent is the call's own span; untraced, the caller's
    // trace context went on with its other headers.
    let span = settle.rec.trace.get().map(|t| {
        let attrs: crate::otel::Attrs = if t.recording() {
            vec![
                ("gen_ai.operation.name", "execute_tool".into()),
                ("gen_ai.tool.name", route.name.as_str().into()),
                ("http.request.method", parts.method.as_str().into()),
            ]
        } else {
            Vec::new()
        };
        let id = t.child(
            format!("execute_tool {}", route.name),
            crate::otel::Kind::Client,
            attrs,
        );
        headers.insert("traceparent", t.traceparent(&id));
        id
    });
    let sent = route
        .client
        .request(parts.method.clone(), &url)
        .headers(headers)
        .body(body)
        .timeout(route.timeout)
        .send()
        .await;
    if let (Some(id), Some(t)) = (span, settle.rec.trace.get()) {
        match &sent {
            Ok(r) => t.end_child(
                id,
                (r.status().as_u16() >= 500).then_some("http_5xx"),
                vec![("http.response.status_code", r.status().as_u16().into())],
            ),
            Err(_) => t.end_child(id, Some("unreachable"), Vec::new()),
        }
    }
    let upstream = match sent {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.is_timeout() {
                ErrorKind::UpstreamTimeout
            } else {
                ErrorKind::UpstreamUnavailable
            };
            return Err(ApiError::new(
                kind,
                format!(
                    "the tool service behind '{}' did not answer: {e}",
                    route.name
                ),
            ));
        }
    };
    let status = upstream.status();
    let mut resp_headers = HeaderMap::new();
    for (n, v) in upstream.headers() {
        if forwardable(n) {
            resp_headers.append(n.clone(), v.clone());
        }
    }
    Ok((status, resp_headers, upstream))
}

/// The loop guard for a tool call: the same call (`scope` and `parts`, from one key)
/// `max_repeats` times within the window is refused unless the action is `warn`. `what`
/// names the call in the refusal.
pub(crate) fn repeated_call(
    app: &AppState,
    lg: &crate::config::LoopGuardConfig,
    key_id: &str,
    scope: &str,
    parts: &[Option<&str>],
    what: &str,
) -> Result<(), ApiError> {
    if !lg.enabled || lg.max_repeats == 0 {
        return Ok(());
    }
    let fp = crate::loopguard::fingerprint(key_id, scope, parts);
    let window_us = lg.window.as_micros() as u64;
    let (seen, clears_in) = app
        .loop_guard
        .sighting(fp, now_us(), window_us, lg.max_repeats);
    if seen >= lg.max_repeats && lg.action != crate::config::LoopAction::Warn {
        return Err(ApiError::new(
            ErrorKind::LoopDetected,
            format!(
                "loop detected: {what} was made {seen} times or more in the last {}s. You appear to be repeating yourself; change the call or stop.",
                lg.window.as_secs()
            ),
        )
        .retry_after(clears_in.div_ceil(1_000_000).max(1)));
    }
    Ok(())
}

/// Holds a tool call's price in the key's wallet, if it has one and the call has a price:
/// a call pays like a model call, on the same ledger. `why` ends the refusal's message.
pub(crate) async fn hold_call_price(
    app: &Arc<AppState>,
    runtime: &crate::upstream::Runtime,
    key: &KeyRecord,
    settle: &mut Settlement,
    price: u64,
    why: &str,
) -> Result<(), ApiError> {
    if price == 0 {
        return Ok(());
    }
    let Some(wallet_id) = app.keys.wallet_for(key) else {
        return Ok(());
    };
    let req = crate::metering::HoldRequest {
        wallet_id: Some(wallet_id.clone()),
        envelopes: Vec::new(),
        request_id: settle.request_id.clone(),
        amount: price as i64,
        tokens: 0,
        expires_ms: now_ms() + runtime.wallets.hold_ttl.as_millis() as i64,
    };
    match place_hold(app, runtime, settle, req).await? {
        crate::metering::Held::Insufficient {
            balance_micros,
            floor_micros,
        } => Err(insufficient_funds(
            &wallet_id,
            balance_micros,
            floor_micros,
            price,
            why,
        )),
        crate::metering::Held::Ok { .. }
        | crate::metering::Held::Exhausted(_)
        | crate::metering::Held::BadRun(_) => Ok(()),
    }
}

/// The service's answer on its way to the client, counted; it settles the call when it
/// ends, fails or is dropped (the client left).
struct CountingBody {
    inner: Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>,
    bytes: u64,
    status: u16,
    settle: Settlement,
    done: bool,
}

impl Stream for CountingBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        match this.inner.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.bytes += chunk.len() as u64;
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = true;
                let bytes = this.bytes;
                this.settle
                    .finish_route(this.status, Some("upstream_error"), bytes, false);
                Poll::Ready(Some(Err(std::io::Error::other(e))))
            }
            Poll::Ready(None) => {
                this.done = true;
                let (status, bytes) = (this.status, this.bytes);
                this.settle.finish_route(status, None, bytes, false);
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for CountingBody {
    fn drop(&mut self) {
        // The client left before the end.
        let (status, bytes) = (self.status, self.bytes);
        self.settle.finish_route(status, None, bytes, true);
    }
}
