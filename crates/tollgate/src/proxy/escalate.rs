//! The cascade phase, for a `[[models]] cascade` alias: its tiers tried cheapest first, each
//! JSON answer checked (`cascade.rs`) before it may be returned; one that fails is billed and
//! the next tier asked. The last tier's answer is returned as it is. Streams are held back for
//! checks only for the keys `[models.validate] buffer_*` names: the tier's stream is read
//! whole, checked, then replayed or billed and escalated. Otherwise a tier answers a stream if
//! it starts one, and only a failure before the first byte moves to the next tier. One wallet
//! hold covers every tier (`quote_model`).

use super::*;

/// A cascade alias and its tiers, each routed: (model name, its deployments in the order to
/// try them).
pub(crate) type Tiers = (
    Arc<crate::upstream::Cascade>,
    Vec<(String, Vec<Arc<Deployment>>)>,
);

/// The tiers of a cascade alias; `None` when the model is not a cascade.
pub(crate) fn cascade_tiers(cx: &Ctx<'_>) -> Result<Option<Tiers>, ApiError> {
    let runtime = &*cx.runtime;
    let Some(cascade) = runtime.cascades.get(&cx.model).cloned() else {
        return Ok(None);
    };
    let mut tiers = Vec::with_capacity(cascade.tiers.len());
    for name in &cascade.tiers {
        let mut deps = runtime.resolve_deployments(name).ok_or_else(|| {
            ApiError::new(
                ErrorKind::ModelNotFound,
                format!(
                    "the cascade '{}' names '{name}', which is not served here",
                    cx.model
                ),
            )
        })?;
        deps.retain(|d| cx.endpoint.served_by(d.provider.kind));
        if deps.is_empty() {
            continue;
        }
        // A tier whose deployments are all cooling down is skipped, not waited for.
        if let Ok(ordered) = upstream::order_candidates(&deps, now_ms(), &runtime.routing) {
            tiers.push((name.clone(), ordered));
        }
    }
    if tiers.is_empty() {
        return Err(ApiError::new(
            ErrorKind::NoHealthyDeployment,
            format!(
                "no tier of the cascade '{}' can serve this request now",
                cx.model
            ),
        )
        .retry_after(1));
    }
    Ok(Some((cascade, tiers)))
}

/// Whether a tier's failure sends the request on to the next tier: the provider failed, not
/// the request (one the provider refused as malformed would be refused by every tier).
fn escalates(e: &ApiError) -> bool {
    matches!(
        e.kind,
        ErrorKind::UpstreamError
            | ErrorKind::UpstreamTimeout
            | ErrorKind::UpstreamUnavailable
            | ErrorKind::UpstreamRateLimited
            | ErrorKind::UpstreamAuth
            | ErrorKind::NoHealthyDeployment
    )
}

/// The cascade phase.
pub(crate) async fn escalate(
    cx: &mut Ctx<'_>,
    doc: &mut RequestDoc<'_>,
    cascade: &crate::upstream::Cascade,
    tiers: Vec<(String, Vec<Arc<Deployment>>)>,
    estimate: u64,
) -> Result<Response, ApiError> {
    let request: serde_json::Value = serde_json::from_slice(&cx.body).unwrap_or_default();
    let last_dep = tiers.last().and_then(|(_, deps)| deps.first().cloned());
    let n = tiers.len();
    let buffered = cascade
        .buffer
        .as_ref()
        .filter(|b| cx.stream && covers(&b.keys, &b.teams, cx.key))
        .map(|b| b.max_bytes);
    let mut path: Vec<String> = Vec::new();
    for (i, (name, candidates)) in tiers.into_iter().enumerate() {
        let last = i + 1 == n;
        path.push(name.clone());
        let trail = path.join(" -> ");
        cx.settle.rec_mut().cascade = Some(trail.clone());
        if let Ok(v) = HeaderValue::from_str(&trail) {
            cx.settle.rate_headers.insert("x-tollgate-cascade", v);
        }
        cx.settle.cascade_reference = if last { None } else { last_dep.clone() };
        let check = (!last && (!cx.stream || buffered.is_some())).then_some(TierCheck {
            validators: &cascade.validators,
            request: &request,
            max_stream_bytes: buffered.unwrap_or(0),
        });
        let outcome = forward(cx, doc, &candidates, estimate, check).await;
        let why = match outcome {
            Ok(Forwarded::Answer(resp)) => {
                let label = if i == 0 { "first" } else { "escalated" };
                cx.app.metrics.count_cascade(label);
                return Ok(resp);
            }
            Ok(Forwarded::Rejected(why)) => why,
            Err(e) if !last && escalates(&e) => e.message.clone(),
            Err(e) => {
                cx.settle.cascade_reference = None;
                return Err(e);
            }
        };
        if let Some(p) = path.last_mut() {
            p.push_str(&format!(" ({})", super::settle::detail(&why)));
        }
        cx.settle.cascade_reference = None;
    }
    // Unreachable: the last tier always answers or fails above.
    Err(ApiError::new(
        ErrorKind::Internal,
        "the cascade ended without an answer",
    ))
}
