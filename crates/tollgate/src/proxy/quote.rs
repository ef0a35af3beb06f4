//! `POST /v1/quote`: what a request would cost and whether it would be admitted, without
//! sending it.

use super::*;

#[derive(serde::Deserialize)]
pub struct QuoteQuery {
    /// `chat` (default), `messages`, `responses` or `embeddings`: the body's dialect.
    pub(crate) endpoint: Option<String>,
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
                format!("the model '{model}' does not exist or is not served here; GET /v1/models lists the ones this key may use"),
            )
            .param("model")
        })?;
        let quote = quote_model(&runtime, &model, &deployments, endpoint, &doc, body.len());
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
