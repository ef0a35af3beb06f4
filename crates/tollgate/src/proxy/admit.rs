//! The admit phase: limits per key, team, model and deployment (requests, tokens,
//! concurrency), and how a refusal reads.

use super::*;

/// Tokens a request may use, reserved against token limits at admission: bytes / 4 over the
/// whole body (cheap, and biased up: JSON syntax counts too) plus the output cap.
pub(crate) fn token_estimate(
    endpoint: Endpoint,
    doc: &RequestDoc,
    body_len: usize,
    defaults: &crate::config::LimitsConfig,
) -> u64 {
    let output = if endpoint.spec().generates {
        doc.max_output_tokens()
            .ok()
            .flatten()
            .unwrap_or(defaults.output_estimate)
    } else {
        0
    };
    (body_len as u64).div_ceil(4) + output
}

/// Overrides where they are set, the configured defaults elsewhere.
pub(crate) fn merge_limits(o: crate::keys::KeyLimits, d: crate::config::ScopeLimits) -> Limits {
    Limits {
        rpm: o.rpm.unwrap_or(d.rpm),
        tpm: o.tpm.unwrap_or(d.tpm),
        concurrency: o.concurrency.unwrap_or(d.concurrency),
    }
}

/// The limits a request to `model` with `key` must pass: the key's, its team's, the model's.
/// Unlimited scopes are left out, so a gateway without limits checks nothing.
pub(crate) fn limit_checks(
    app: &AppState,
    key: &KeyRecord,
    runtime: &Runtime,
    model: &str,
) -> Vec<Check> {
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
pub(crate) fn rate_limit_headers(
    requests: Option<Decision>,
    tokens: Option<Decision>,
) -> HeaderMap {
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
pub(crate) fn reset_text(us: u64) -> String {
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

/// The admit phase: every limit the request must pass (key, team, model), its token
/// estimate reserved; the grant is the settlement's to settle. Returns the estimate, which
/// deployments' own limits reserve too.
pub(crate) async fn admit(cx: &mut Ctx<'_>, doc: &RequestDoc<'_>) -> Result<u64, ApiError> {
    let (app, key, endpoint) = (cx.app, cx.key, cx.endpoint);
    let runtime = &*cx.runtime;
    let settle = &mut *cx.settle;
    let (body, model) = (&cx.body, &cx.model);
    let estimate = token_estimate(endpoint, doc, body.len(), &runtime.limits);
    let checks = limit_checks(app, key, runtime, model);
    let admission = app
        .limiter
        .admit(&checks, estimate)
        .await
        .map_err(|r| refusal(app, r))?;
    settle
        .rate_headers
        .extend(rate_limit_headers(admission.requests, admission.tokens));
    settle.admission = Some(admission);

    Ok(estimate)
}
