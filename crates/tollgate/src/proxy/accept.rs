//! Phases 1 and 3-5: accept (the body under its limit), authenticate (the key, from memory),
//! peek (the few top-level fields the gateway needs, with their bounds) and attribution tags.

use super::*;

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
        // Every API (models, MCP, tool routes, admin) authenticates here, so a dashboard
        // viewer's key, leaked or pasted into an agent, calls nothing and spends nothing.
        KeyStatus::Active if key.viewer => Err(ApiError::new(
            ErrorKind::DashboardOnly,
            "this is a read-only dashboard key: it signs in at /ui and calls no API",
        )),
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

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
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

pub(crate) const MAX_TAGS: usize = 32;

/// Tags from the request's `metadata`, then `x-tollgate-tags`, then the key; later sources
/// win, so an agent cannot relabel what its key says about it.
pub(crate) fn collect_tags(
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

/// The request's top level and its `model`, which every model endpoint requires.
pub(crate) fn parse_with_model(body: &Bytes) -> Result<(RequestDoc<'_>, String), ApiError> {
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

/// Refuses an output cap that is not a count or is above `[limits] max_output_tokens`, naming
/// the field the request used. Every later sum (quote, hold, token reservation) relies on it.
pub(crate) fn check_output_cap(
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

/// The peek phase's fields: whether it streams, its output cap (bounded), its tags.
pub(crate) fn peek(cx: &mut Ctx<'_>, doc: &RequestDoc) -> Result<(), ApiError> {
    let (endpoint, headers, key) = (cx.endpoint, cx.headers, cx.key);
    cx.settle.rec_mut().model_requested = Some(cx.model.clone());
    cx.stream = endpoint.streams()
        && doc
            .stream()
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()).param("stream"))?;
    cx.settle.rec_mut().stream = cx.stream;
    if endpoint.streams() {
        check_output_cap(doc, &cx.runtime.limits)?;
    }
    let tags = collect_tags(key, headers, doc)?;
    cx.settle.rec_mut().tags = tags;
    Ok(())
}

/// The authorize phase: the key's model list.
pub(crate) fn authorize(cx: &Ctx<'_>) -> Result<(), ApiError> {
    if !cx.key.allows_model(&cx.model) {
        return Err(ApiError::new(
            ErrorKind::ModelNotAllowed,
            format!("this key may not use model '{}'", cx.model),
        )
        .param("model"));
    }
    Ok(())
}
