use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn unknown_missing_revoked_and_expired_keys_get_401() {
    let gw = TestGateway::start("").await;
    let body = json!({"model": "mock", "messages": user("hi")});

    assert_openai_error(
        gw.chat("tg_not_a_real_key", body.clone()).await,
        401,
        "invalid_api_key",
    )
    .await;
    let no_key = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_openai_error(no_key, 401, "invalid_api_key").await;

    let (key, id) = gw.create_key(json!({"name": "soon-revoked"})).await;
    assert_eq!(gw.chat(&key, body.clone()).await.status(), 200);
    let r = gw
        .client
        .post(format!("{}/admin/keys/{id}/revoke", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["status"], "revoked");
    assert_openai_error(gw.chat(&key, body.clone()).await, 401, "key_revoked").await;

    let (short, _) = gw
        .create_key(json!({"name": "short-lived", "expires": "1s"}))
        .await;
    assert_eq!(gw.chat(&short, body.clone()).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_openai_error(gw.chat(&short, body.clone()).await, 401, "key_expired").await;

    // Unauthenticated requests are not metered; the two that got through are.
    assert_eq!(gw.records().await.len(), 2);
}

#[tokio::test]
async fn model_allowlist_unknown_model_and_admin_scope() {
    let gw = TestGateway::start("").await;
    let (key, _) = gw
        .create_key(json!({"name": "narrow", "models": ["mock", "mock-l*"]}))
        .await;
    assert_eq!(
        gw.chat(&key, json!({"model": "mock-long", "messages": user("hi")}))
            .await
            .status(),
        200
    );
    let v = assert_openai_error(
        gw.chat(&key, json!({"model": "mock-slow", "messages": user("hi")}))
            .await,
        403,
        "model_not_allowed",
    )
    .await;
    assert_eq!(v["error"]["param"], "model");

    let wide = gw.key().await;
    assert_openai_error(
        gw.chat(
            &wide,
            json!({"model": "gpt-nonexistent", "messages": user("hi")}),
        )
        .await,
        404,
        "model_not_found",
    )
    .await;

    // /v1/models lists only what the key may use.
    let models: Value = gw
        .client
        .get(format!("{}/v1/models", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, vec!["mock", "mock-long"]);

    // A virtual key is not an admin key.
    let r = gw
        .client
        .get(format!("{}/admin/keys", gw.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_openai_error(r, 403, "admin_only").await;
}

#[tokio::test]
async fn bad_bodies_get_clear_errors() {
    let gw = TestGateway::start("[server]\nmax_body_bytes = 2048\n").await;
    let key = gw.key().await;
    let post = |body: Vec<u8>| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    assert_openai_error(
        post(b"{\"model\": \"mock\", \"messages\": [".to_vec())
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert_openai_error(post(b"[1,2,3]".to_vec()).await.unwrap(), 400, "bad_request").await;
    let v = assert_openai_error(
        post(br#"{"messages":[]}"#.to_vec()).await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert_eq!(v["error"]["param"], "model");
    assert_openai_error(
        post(br#"{"model":"mock","stream":"yes"}"#.to_vec())
            .await
            .unwrap(),
        400,
        "bad_request",
    )
    .await;
    let huge = format!(
        r#"{{"model":"mock","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "x".repeat(4096)
    );
    assert_openai_error(
        post(huge.clone().into_bytes()).await.unwrap(),
        413,
        "request_too_large",
    )
    .await;

    // Without a Content-Length (chunked), the limit still holds.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = huge
        .as_bytes()
        .chunks(512)
        .map(|c| Ok(c.to_vec()))
        .collect();
    let chunked = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_openai_error(chunked, 413, "request_too_large").await;

    let r = gw
        .client
        .get(format!("{}/v1/nothing-here", gw.url))
        .send()
        .await
        .unwrap();
    assert_openai_error(r, 404, "not_found").await;
    let r = gw
        .client
        .get(format!("{}/v1/chat/completions", gw.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    // Every failed authenticated request is recorded with its status.
    let recs = gw.records().await;
    let mut statuses: Vec<u16> = recs.iter().map(|r| r.status).collect();
    statuses.sort();
    assert_eq!(statuses, vec![400, 400, 400, 400, 413, 413]);
}
