//! The damp phase: the loop guard (an agent repeating itself) and retry-storm damping
//! (replays of answered retries, retry budgets, coalescing), before anything is spent.

use super::*;

/// Refuses (or flags, or answers from the last response) a request that repeats an earlier
/// one, or whose conversation keeps calling the same tool with the same arguments. Also
/// returns the request's fingerprint when the guard looked at it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn loop_check(
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
    let fields = endpoint.spec().loop_fields;
    if fields.is_empty() {
        return Ok((LoopVerdict::Pass, None));
    }
    let parts: Vec<Option<&str>> = fields.iter().map(|f| doc.raw(f).map(|r| r.get())).collect();
    let fp = fingerprint(&key.id, model, &parts);
    let window_us = cfg.window.as_micros() as u64;
    let (seen, clears_in) = app
        .loop_guard
        .sighting(fp, now_us(), window_us, cfg.max_repeats);
    let mut problem = None;
    if cfg.max_repeats > 0 && seen >= cfg.max_repeats {
        problem = Some((
            format!(
                "loop detected: this exact request was sent {seen} times or more in the last {}s. You appear to be repeating yourself; change the request or stop.",
                cfg.window.as_secs()
            ),
            clears_in,
        ));
    } else if cfg.max_tool_repeats > 0 && doc.raw("tools").is_some() {
        // Chat and Messages keep the conversation in `messages`, Responses in `input`.
        if let Some(history) = doc
            .raw("messages")
            .or_else(|| doc.raw("input"))
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
        (Some((message, _)), LoopAction::Nudge) => Ok((LoopVerdict::Nudge(message), Some(fp))),
        (Some((message, retry_us)), LoopAction::Replay) => {
            match (!stream).then(|| app.damper.answer(fp, now_us())).flatten() {
                Some(answer) => Ok((LoopVerdict::Replay(answer), Some(fp))),
                None => reject(message, retry_us),
            }
        }
    }
}

pub(crate) enum LoopVerdict {
    Pass,
    Warn(String),
    /// Answer with this earlier response to the same request.
    Replay(Arc<crate::damping::Answer>),
    /// Answer with a message telling the model it is looping.
    Nudge(String),
}

/// `Cache-Control: no-cache` or `no-store`: the client wants its own upstream call, never
/// another request's answer.
pub(crate) fn no_cache(headers: &HeaderMap) -> bool {
    headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("no-cache") || v.contains("no-store"))
}

/// Recognises client retries and holds them to the key's retry budget; returns the kept
/// answer when this is a retry of an `Idempotency-Key` request that already succeeded.
pub(crate) fn damp(
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

/// The damp phase: a retry of an answered request gets the kept answer; the loop guard
/// refuses, warns about or replays an agent repeating itself. `Some` is the answer.
pub(crate) fn damp_phase(cx: &mut Ctx<'_>, doc: &RequestDoc) -> Result<Option<Response>, ApiError> {
    let (app, key, endpoint, headers, stream) =
        (cx.app, cx.key, cx.endpoint, cx.headers, cx.stream);
    let runtime = &*cx.runtime;
    let settle = &mut *cx.settle;
    let (body, model) = (&cx.body, &cx.model);
    if let Some(answer) = damp(app, &runtime.retries, key, endpoint, headers, body, settle)? {
        return Ok(Some(settle.reuse(&answer, "replayed")));
    }

    // admit: loop guard, limits
    let (verdict, loop_fp) =
        loop_check(app, &runtime.loop_guard, key, endpoint, model, doc, stream)?;
    match verdict {
        LoopVerdict::Pass => {}
        LoopVerdict::Warn(warning) => {
            if let Ok(v) = HeaderValue::from_str(&warning) {
                settle.rate_headers.insert("x-tollgate-warning", v);
            }
        }
        LoopVerdict::Replay(answer) => return Ok(Some(settle.reuse(&answer, "loop_replay"))),
        LoopVerdict::Nudge(finding) => {
            let include_usage = doc.client_wants_stream_usage();
            let finding = finding.trim_start_matches("loop detected: ");
            let (content_type, body) = super::nudge::answer(
                endpoint,
                model,
                settle.request_id.trim_start_matches("req_"),
                (crate::clock::now_ms() / 1000) as u64,
                stream,
                include_usage,
                &super::nudge::text(finding),
            );
            return Ok(Some(settle.nudge(finding, content_type, body)));
        }
    }
    if let (Some(fp), crate::config::LoopAction::Replay, false) =
        (loop_fp, runtime.loop_guard.action, stream)
    {
        settle
            .keep
            .push((fp, now_us() + runtime.loop_guard.window.as_micros() as u64));
    }
    Ok(None)
}

/// The coalesce phase: one upstream call for identical JSON requests in flight; the others
/// wait for its answer (or its error). `Some` is the answer.
pub(crate) async fn coalesce(
    cx: &mut Ctx<'_>,
) -> Result<Option<Result<Response, ApiError>>, ApiError> {
    let reuse_ok = !no_cache(cx.headers) && cx.endpoint != Endpoint::CountTokens;
    let (app, stream) = (cx.app, cx.stream);
    let runtime = &*cx.runtime;
    let settle = &mut *cx.settle;
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
                            return Ok(Some(Ok(settle.reuse(&a, "coalesced"))))
                        }
                        Some(crate::damping::Outcome::Error(e, from)) => {
                            let rec = settle.rec_mut();
                            rec.reused = Some("coalesced".into());
                            rec.reused_from = Some(from);
                            return Ok(Some(Err(e)));
                        }
                        // The leader went away without an answer: lead, or follow another.
                        None => continue,
                    }
                }
            }
        }
    }

    Ok(None)
}
