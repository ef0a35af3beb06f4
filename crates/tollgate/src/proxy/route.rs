//! The route phase: the deployments that can serve the model on this endpoint, ordered by
//! health, priority and weight (`upstream::order_candidates`).

use super::*;

/// Where a request goes.
pub(crate) enum Routed {
    /// Answered here: a token count no deployment can make.
    Local(Response),
    /// Every deployment of the model that speaks this API, and the order to try them in.
    To(Vec<Arc<Deployment>>, Vec<Arc<Deployment>>),
}

/// The route phase.
pub(crate) fn route(cx: &mut Ctx<'_>) -> Result<Routed, ApiError> {
    let endpoint = cx.endpoint;
    let runtime = &*cx.runtime;
    let settle = &mut *cx.settle;
    let model = &cx.model;
    let mut deployments = runtime.resolve(model).ok_or_else(|| {
        ApiError::new(
            ErrorKind::ModelNotFound,
            format!("the model '{model}' does not exist or is not served here; GET /v1/models lists the ones this key may use"),
        )
        .param("model")
    })?;
    deployments.retain(|d| endpoint.served_by(d.provider.kind));
    if deployments.is_empty() {
        if endpoint == Endpoint::CountTokens {
            return Ok(Routed::Local(settle.finish_local_count()));
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

    Ok(Routed::To(deployments, candidates))
}
