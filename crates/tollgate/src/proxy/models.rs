//! `GET /v1/models` and the model lists in both dialects.

use super::*;

/// `GET /v1/models`: what this key may call.
pub async fn list_models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let key = match authenticate(&app, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_response(),
    };
    let runtime = app.runtime.load();
    let data: Vec<serde_json::Value> = runtime
        .model_names()
        .into_iter()
        .filter(|(name, _)| key.allows_model(name))
        .map(|(name, owner)| serde_json::json!({"id": name, "object": "model", "created": 0, "owned_by": owner}))
        .collect();
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}
