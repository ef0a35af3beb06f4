//! Tool routes: a path prefix proxied to an agent's tool service, behind keys, limits, the
//! loop guard and metering.

use crate::harness::*;
use axum::extract::{Request, State};
use axum::routing::any;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A tool service that echoes what reached it and counts calls.
async fn spawn_tool_service() -> (String, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new()
        .route(
            "/api/{*rest}",
            any(
                |State(calls): State<Arc<AtomicUsize>>, req: Request| async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    let (parts, body) = req.into_parts();
                    let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
                    let h = |n: &str| {
                        parts
                            .headers
                            .get(n)
                            .map(|v| v.to_str().unwrap().to_string())
                    };
                    axum::Json(json!({
                        "method": parts.method.as_str(),
                        "uri": parts.uri.to_string(),
                        "authorization": h("authorization"),
                        "x_api_key": h("x-api-key"),
                        "x_request_id": h("x-request-id"),
                        "body": String::from_utf8_lossy(&body),
                    }))
                },
            ),
        )
        .with_state(calls.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/api", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    (url, calls)
}

async fn post(gw: &TestGateway, key: &str, path: &str, body: &str) -> reqwest::Response {
    gw.client
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_tool_route_refuses_a_runaway_key_while_other_keys_keep_working() {
    let (tool_url, calls) = spawn_tool_service().await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nname = \"crm\"\npath = \"/tools/crm\"\nupstream = \"{tool_url}\"\nheaders = {{ authorization = \"Bearer service-secret\" }}\nrpm = 5\nprice_per_call = 250\n"
    ))
    .await;
    let runaway = gw.key().await;
    let polite = gw.key().await;

    let mut statuses = Vec::new();
    for i in 0..10 {
        let r = post(
            &gw,
            &runaway,
            "/tools/crm/customers/lookup?region=eu",
            &format!("{{\"id\": {i}}}"),
        )
        .await;
        statuses.push(r.status().as_u16());
        if i == 0 {
            let v: Value = r.json().await.unwrap();
            // The path below the prefix and the query reach the service; the agent's key
            // does not, the route's own credentials do.
            assert_eq!(v["uri"], "/api/customers/lookup?region=eu");
            assert_eq!(v["method"], "POST");
            assert_eq!(v["authorization"], "Bearer service-secret");
            assert_eq!(v["x_api_key"], Value::Null);
            assert_eq!(v["body"], "{\"id\": 0}");
            assert!(v["x_request_id"].as_str().unwrap().starts_with("req_"));
        } else if r.status() == 429 {
            assert_eq!(r.headers()["x-tollgate-limit"], "route:requests");
            let v = assert_openai_error(r, 429, "rate_limited").await;
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("this key on route 'crm'"));
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 200, 429, 429, 429, 429, 429]);
    for i in 0..3 {
        let r = post(&gw, &polite, "/tools/crm/x", &format!("{{\"n\": {i}}}")).await;
        assert_eq!(r.status(), 200, "another key is not held back");
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        8,
        "refused calls never reach the service"
    );

    // Metered: calls, bytes, latency, price per answered call; refusals at zero cost.
    let recs: Vec<_> = gw
        .wait_records(13)
        .await
        .into_iter()
        .filter(|r| r.endpoint == "route:crm")
        .collect();
    assert_eq!(recs.len(), 13);
    let ok: Vec<_> = recs.iter().filter(|r| r.status == 200).collect();
    assert_eq!(ok.len(), 8);
    assert!(ok.iter().all(|r| r.cost_micros == 250
        && r.request_bytes > 0
        && r.response_bytes > 0
        && r.provider.as_deref() == Some("crm")));
    assert!(recs
        .iter()
        .filter(|r| r.status == 429)
        .all(|r| r.cost_micros == 0 && r.error_kind.as_deref() == Some("rate_limited")));

    // Keys are required, and paths outside every route are 404 as before.
    let r = gw
        .client
        .post(format!("{}/tools/crm/x", gw.url))
        .send()
        .await
        .unwrap();
    assert_openai_error(r, 401, "invalid_api_key").await;
    let r = post(&gw, &polite, "/tools/crmx", "{}").await;
    assert_eq!(r.status(), 404);
}

#[tokio::test]
async fn a_tool_route_has_the_loop_guard_and_reports_a_dead_service() {
    let (tool_url, calls) = spawn_tool_service().await;
    let dead = dead_url().await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nname = \"search\"\npath = \"/tools/search/\"\nupstream = \"{tool_url}\"\n\n[[routes]]\nname = \"gone\"\npath = \"/tools/gone\"\nupstream = \"{dead}\"\n"
    ))
    .await;
    let key = gw.key().await;
    for _ in 0..4 {
        assert_eq!(
            post(&gw, &key, "/tools/search/q", "{\"q\": \"same\"}")
                .await
                .status(),
            200
        );
    }
    let v = assert_openai_error(
        post(&gw, &key, "/tools/search/q", "{\"q\": \"same\"}").await,
        400,
        "loop_detected",
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("repeating yourself"));
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // A different call goes through.
    assert_eq!(
        post(&gw, &key, "/tools/search/q", "{\"q\": \"other\"}")
            .await
            .status(),
        200
    );

    let r = post(&gw, &key, "/tools/gone/anything", "{}").await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_openai_error(r, 502, "upstream_unavailable").await;
    let rec = wait_record(&gw, &id).await;
    assert_eq!(rec.endpoint, "route:gone");
    assert_eq!(rec.cost_micros, 0);
}

#[tokio::test]
async fn route_paths_may_not_shadow_the_gateway() {
    let cfg = tollgate::config::Config::from_toml(
        "[[routes]]\nname = \"x\"\npath = \"/v1/chat\"\nupstream = \"http://127.0.0.1:1\"\n[[routes]]\nname = \"x\"\npath = \"tools\"\nupstream = \"ftp://a\"\n",
    )
    .unwrap();
    let problems = cfg.validate().join("\n");
    for expected in [
        "routes[0].path: \"/v1/chat\" is served by the gateway itself",
        "routes[1].name: must be non-empty and unique",
        "routes[1].path: must start with '/'",
        "routes[1].upstream: not an http(s) URL",
    ] {
        assert!(problems.contains(expected), "{expected} not in {problems}");
    }
}

#[tokio::test]
async fn a_priced_tool_call_is_paid_from_the_wallet_and_refused_without_money() {
    let (tool_url, calls) = spawn_tool_service().await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nname = \"paid\"\npath = \"/tools/paid\"\nupstream = \"{tool_url}\"\nprice_per_call = 4000\n"
    ))
    .await;
    let (key, key_id) = gw.create_key(json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "0.01").await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(
            post(&gw, &key, "/tools/paid/x", &format!("{{\"n\": {i}}}"))
                .await
                .status()
                .as_u16(),
        );
    }
    // $0.01 pays two calls at $0.004; the third needs $0.004 of the $0.002 left.
    assert_eq!(statuses, [200, 200, 402, 402]);
    // The refusal has the same shape as a model call's.
    let v = assert_openai_error(
        post(&gw, &key, "/tools/paid/x", "{\"n\": 9}").await,
        402,
        "insufficient_funds",
    )
    .await;
    assert_eq!(v["error"]["wallet"], wallet.as_str());
    assert_eq!(v["error"]["hold_micros"], 4_000);
    assert_eq!(v["error"]["balance_micros"], 2_000);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    gw.wait_records(5).await;
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(w["balance_micros"], 2_000);
    assert_eq!(w["held_micros"], 0);
}

/// A tool call goes through the model calls' settlement: a client that gives up while the
/// service is still thinking is recorded (the old per-route record had no such ending), and
/// a priced call's hold is released, not left to expire.
#[tokio::test]
async fn a_client_that_leaves_mid_call_is_still_recorded_and_its_hold_released() {
    let app = axum::Router::new().route(
        "/slow/{*rest}",
        any(|| async {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            "late"
        }),
    );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/slow", l.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    let gw = TestGateway::start(&format!(
        "[[routes]]\nname = \"slow\"\npath = \"/tools/slow\"\nupstream = \"{url}\"\nprice_per_call = 5000\n"
    ))
    .await;
    let (key, key_id) = gw.create_key(json!({"name": "impatient"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(300))
        .build()
        .unwrap();
    let r = client
        .post(format!("{}/tools/slow/x", gw.url))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await;
    assert!(r.is_err(), "the client timed out");
    let recs = gw.wait_records(1).await;
    let rec = &recs[0];
    assert_eq!(rec.endpoint, "route:slow");
    assert!(rec.client_disconnected, "{rec:?}");
    assert_eq!(rec.status, 499);
    assert_eq!(rec.cost_micros, 0, "the service never answered");
    assert_eq!(rec.wallet_id.as_deref(), Some(wallet.as_str()));
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(w["balance_micros"], 1_000_000, "the hold came back: {w}");
}

/// Redaction on a tool route: the service gets the body masked (JSON and plain text), a
/// refused value is never sent.
#[tokio::test]
async fn a_tool_routes_body_is_redacted_before_the_service_sees_it() {
    let (tool_url, calls) = spawn_tool_service().await;
    let gw = TestGateway::start(&format!(
        "[[routes]]\nname = \"crm\"\npath = \"/tools/crm\"\nupstream = \"{tool_url}\"\n[redaction]\n[redaction.detectors]\nemail = \"mask\"\nsecret = \"reject\"\n"
    ))
    .await;
    let key = gw.key().await;
    let r = post(
        &gw,
        &key,
        "/tools/crm/notes",
        "{\"note\": \"reach ann@example.org\"}",
    )
    .await;
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body"], "{\"note\":\"reach <EMAIL_1>\"}", "{v}");
    let r = gw
        .client
        .post(format!("{}/tools/crm/raw", gw.url))
        .bearer_auth(&key)
        .header("content-type", "text/plain")
        .body("from bob@example.net")
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["body"], "from <EMAIL_1>", "{v}");
    let before = calls.load(Ordering::SeqCst);
    let r = post(
        &gw,
        &key,
        "/tools/crm/deploy",
        "{\"key\": \"AKIAIOSFODNN7EXAMPLE\"}",
    )
    .await;
    assert_openai_error(r, 400, "sensitive_data").await;
    assert_eq!(calls.load(Ordering::SeqCst), before, "nothing sent");
}
