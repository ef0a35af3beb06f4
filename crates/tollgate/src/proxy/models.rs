//! `GET /v1/models` and `GET /v1/models/{id}`, in the caller's dialect: Anthropic's shape
//! when the request carries `anthropic-version` (as the Anthropic SDKs always do), OpenAI's
//! otherwise.

use super::*;

/// The models this key may call, as (id, owner).
fn allowed(app: &AppState, key: &KeyRecord) -> Vec<(String, String)> {
    let runtime = app.runtime.load();
    let mut names: Vec<(String, String)> = runtime
        .model_names()
        .into_iter()
        .filter(|(name, _)| key.allows_model(name))
        .collect();
    names.sort();
    names
}

fn anthropic_dialect(headers: &HeaderMap) -> bool {
    headers.contains_key("anthropic-version")
}

/// One model in the caller's dialect. tollgate knows no release dates: the epoch stands in.
fn model_json(anthropic: bool, id: &str, owner: &str) -> serde_json::Value {
    if anthropic {
        serde_json::json!({"type": "model", "id": id, "display_name": id, "created_at": "1970-01-01T00:00:00Z"})
    } else {
        serde_json::json!({"id": id, "object": "model", "created": 0, "owned_by": owner})
    }
}

/// `GET /v1/models`: what this key may call.
pub async fn list_models(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    let anthropic = anthropic_dialect(&headers);
    let dialect = if anthropic {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    };
    let key = match authenticate(&app, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_dialect_response(dialect),
    };
    let data: Vec<serde_json::Value> = allowed(&app, &key)
        .iter()
        .map(|(id, owner)| model_json(anthropic, id, owner))
        .collect();
    let body = if anthropic {
        serde_json::json!({
            "data": data,
            "has_more": false,
            "first_id": data.first().map(|m| m["id"].clone()),
            "last_id": data.last().map(|m| m["id"].clone()),
        })
    } else {
        serde_json::json!({"object": "list", "data": data})
    };
    axum::Json(body).into_response()
}

/// `GET /v1/models/{id}`: one model this key may call, or 404 in the caller's dialect.
pub async fn get_model(
    State(app): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
    headers: HeaderMap,
) -> Response {
    let anthropic = anthropic_dialect(&headers);
    let dialect = if anthropic {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    };
    let key = match authenticate(&app, &headers) {
        Ok(k) => k,
        Err(e) => return e.into_dialect_response(dialect),
    };
    match allowed(&app, &key)
        .into_iter()
        .find(|(name, _)| *name == id)
    {
        Some((name, owner)) => axum::Json(model_json(anthropic, &name, &owner)).into_response(),
        None => ApiError::new(
            ErrorKind::ModelNotFound,
            format!("the model '{id}' does not exist or this key may not use it"),
        )
        .param("model")
        .into_dialect_response(dialect),
    }
}
