//! Per-key limits: requests and tokens per minute, concurrency; refusals in the caller's
//! dialect with Retry-After and the x-ratelimit-* headers.

use crate::harness::*;
use serde_json::{json, Value};

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn requests_per_minute_with_headers_and_a_429_naming_the_limit() {
    let gw = TestGateway::start("[limits]\nrpm = 2\n").await;
    let (key, _) = gw.create_key(json!({"name": "limited", "rpm": 3})).await;
    for remaining in ["2", "1", "0"] {
        let r = gw
            .chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(
            header(&r, "x-ratelimit-limit-requests"),
            "3",
            "the key's own limit beats the default"
        );
        assert_eq!(header(&r, "x-ratelimit-remaining-requests"), remaining);
        assert!(!header(&r, "x-ratelimit-reset-requests").is_empty());
    }
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("hi")}))
        .await;
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!((1..=20).contains(&retry), "{retry}");
    assert_eq!(header(&r, "x-ratelimit-remaining-requests"), "0");
    let v = assert_openai_error(r, 429, "rate_limited").await;
    assert_eq!(v["error"]["param"], "requests");
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("3 requests per minute"));

    // Anthropic clients get Anthropic's shape.
    let r = gw.client.post(format!("{}/v1/messages", gw.url)).header("x-api-key", &key)
        .json(&json!({"model": "mock", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})).send().await.unwrap();
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["type"],
        "rate_limit_error"
    );

    // The default applies to keys without their own limit, independently per key.
    let other = gw.key().await;
    for _ in 0..2 {
        assert_eq!(
            gw.chat(&other, json!({"model": "mock", "messages": user("hi")}))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        gw.chat(&other, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        429
    );

    // Refusals are recorded too: the audit trail shows the agent hammering its limit.
    let recs = gw.records().await;
    assert_eq!(
        recs.iter()
            .filter(|r| r.status == 429 && r.error_kind.as_deref() == Some("rate_limited"))
            .count(),
        3
    );
}

#[tokio::test]
async fn concurrency_limit_counts_streams_until_they_end() {
    let gw = TestGateway::start("").await;
    let (key, _) = gw
        .create_key(json!({"name": "narrow", "concurrency": 2}))
        .await;
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut r = gw
            .chat(
                &key,
                json!({"model": "mock-slow", "stream": true, "messages": user("hi")}),
            )
            .await;
        assert_eq!(r.status(), 200);
        r.chunk().await.unwrap();
        streams.push(r);
    }
    let v = assert_openai_error(
        gw.chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(v["error"]["param"], "concurrency");
    for s in streams {
        assert!(s.text().await.unwrap().trim_end().ends_with("[DONE]"));
    }
    // Slots come back when the streams settle.
    let mut ok = false;
    for _ in 0..50 {
        if gw
            .chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status()
            == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(ok);
}

#[tokio::test]
async fn tokens_are_reserved_up_front_and_settled_with_the_real_count() {
    let gw = TestGateway::start("").await;
    let (key, _) = gw.create_key(json!({"name": "tokens", "tpm": 2000})).await;
    // A slow stream reserves its input estimate plus max_tokens while it runs.
    let mut first = gw.chat(&key, json!({"model": "mock-slow", "stream": true, "max_tokens": 1500, "messages": user("hi")})).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-ratelimit-limit-tokens"), "2000");
    let remaining: u64 = header(&first, "x-ratelimit-remaining-tokens")
        .parse()
        .unwrap();
    assert!(remaining < 500, "{remaining}");
    first.chunk().await.unwrap();
    let v = assert_openai_error(
        gw.chat(
            &key,
            json!({"model": "mock", "max_tokens": 1500, "messages": user("hi")}),
        )
        .await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(v["error"]["param"], "tokens");
    // Once the stream is settled at its real size (a few dozen tokens), the room comes back.
    assert!(first.text().await.unwrap().contains("[DONE]"));
    let mut status = 0;
    for _ in 0..50 {
        status = gw
            .chat(
                &key,
                json!({"model": "mock", "max_tokens": 1500, "messages": user("hi")}),
            )
            .await
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 200);
    // A request that could never fit is refused outright.
    let v = assert_openai_error(
        gw.chat(
            &key,
            json!({"model": "mock", "max_tokens": 5000, "messages": user("hi")}),
        )
        .await,
        429,
        "rate_limited",
    )
    .await;
    assert_eq!(v["error"]["param"], "tokens");
}

#[tokio::test]
async fn team_limits_are_shared_by_the_team_and_overridden_through_the_api() {
    let gw = TestGateway::start("[limits.team]\nrpm = 100\n").await;
    let (a, _) = gw.create_key(json!({"name": "a", "team": "search"})).await;
    let (b, _) = gw.create_key(json!({"name": "b", "team": "search"})).await;
    let (other, _) = gw.create_key(json!({"name": "c", "team": "ads"})).await;
    let (status, team) = gw
        .admin(
            reqwest::Method::PUT,
            "/admin/teams/search",
            Some(json!({"rpm": 3})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(team["limits"]["rpm"], 3);
    // Two keys of one team draw on one budget of 3.
    for k in [&a, &b, &a] {
        let r = gw
            .chat(k, json!({"model": "mock", "messages": user("hi")}))
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-ratelimit-limit-requests"), "3");
    }
    let r = gw
        .chat(&b, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(header(&r, "x-tollgate-limit"), "team:requests");
    let v = assert_openai_error(r, 429, "rate_limited").await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("team 'search'"));
    // Another team runs on the [limits.team] default.
    let r = gw
        .chat(&other, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "100");
    // Raising the override lets the team through again.
    let (status, _) = gw
        .admin(
            reqwest::Method::PUT,
            "/admin/teams/search",
            Some(json!({"rpm": 50})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, listed) = gw.admin(reqwest::Method::GET, "/admin/teams", None).await;
    assert_eq!(listed[0]["name"], "search");
    assert_eq!(listed[0]["limits"]["rpm"], 50);
    // The new limit applies at once; the share of the window already used stays used (GCRA
    // keeps time, not counts), so the team waits about one new interval, not a minute.
    let r = gw
        .chat(&b, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(header(&r, "x-ratelimit-limit-requests"), "50");
    let retry: u64 = header(&r, "retry-after").parse().unwrap();
    assert!(retry <= 2, "{retry}");
    // Unknown fields are refused, not ignored.
    let (status, _) = gw
        .admin(
            reqwest::Method::PUT,
            "/admin/teams/search",
            Some(json!({"rpn": 5})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_key_limit_set_after_creation_applies_within_the_request_that_follows() {
    let gw = TestGateway::start("").await;
    let (key, id) = gw.create_key(json!({"name": "later"})).await;
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert!(!r.headers().contains_key("x-ratelimit-limit-requests"));
    let (status, updated) = gw
        .admin(
            reqwest::Method::PUT,
            &format!("/admin/keys/{id}/limits"),
            Some(json!({"rpm": 1})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(updated["limits"]["rpm"], 1);
    assert_eq!(
        gw.chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        200
    );
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(header(&r, "x-tollgate-limit"), "key:requests");
    assert_eq!(r.status(), 429);
}

const SCOPED: &str = r#"
[[providers]]
name = "primary"
kind = "mock"
[[providers]]
name = "overflow"
kind = "mock"

[[models]]
name = "capped"
rpm = 4
deployments = [{ provider = "primary", model = "mock" }]

[[models]]
name = "quota"
deployments = [
  { provider = "primary", model = "mock", priority = 0, rpm = 2 },
  { provider = "overflow", model = "mock", priority = 1, rpm = 1 },
]
"#;

#[tokio::test]
async fn a_model_limit_holds_across_keys() {
    let gw = TestGateway::start(SCOPED).await;
    let keys = [gw.key().await, gw.key().await];
    let mut statuses = Vec::new();
    for i in 0..6 {
        let r = gw
            .chat(
                &keys[i % 2],
                json!({"model": "capped", "messages": user("hi")}),
            )
            .await;
        statuses.push(r.status().as_u16());
        if r.status() == 429 {
            assert_eq!(header(&r, "x-tollgate-limit"), "model:requests");
        }
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429]);
}

#[tokio::test]
async fn a_deployment_at_its_quota_is_skipped_for_the_next_one() {
    let gw = TestGateway::start(SCOPED).await;
    let key = gw.key().await;
    let mut served = Vec::new();
    for _ in 0..3 {
        let r = gw
            .chat(&key, json!({"model": "quota", "messages": user("hi")}))
            .await;
        assert_eq!(r.status(), 200);
        served.push(gw.record_for(r.headers()).await.provider.unwrap());
    }
    assert_eq!(served, ["primary", "primary", "overflow"]);
    // Every deployment at its quota: a 429 naming the deployment, no upstream call.
    let r = gw
        .chat(&key, json!({"model": "quota", "messages": user("hi")}))
        .await;
    assert_eq!(header(&r, "x-tollgate-limit"), "deployment:requests");
    let v = assert_openai_error(r, 429, "rate_limited").await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("deployment '"));
}
