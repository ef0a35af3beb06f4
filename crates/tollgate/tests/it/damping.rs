//! Retry-storm damping: coalescing, idempotent replay, retry budgets, the loop guard's
//! replay action, and the per-deployment budget for the gateway's own retries.

use crate::harness::*;
use serde_json::json;

fn provider(url: &str) -> String {
    format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{url}\"\nmodels = [\"mock*\"]\n"
    )
}

async fn upstream_requests(url: &str) -> u64 {
    mock_stats(url).await["requests"].as_u64().unwrap()
}

#[tokio::test]
async fn identical_concurrent_requests_make_one_upstream_call_billed_once() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&provider(&up)).await;
    let key = gw.key().await;
    let body = json!({"model": "mock-slow", "messages": user("what is the weather")});
    let calls: Vec<_> = (0..4).map(|_| gw.chat(&key, body.clone())).collect();
    let resps = futures_util::future::join_all(calls).await;
    let mut bodies = Vec::new();
    let mut reused = 0;
    for r in resps {
        assert_eq!(r.status(), 200);
        if let Some(v) = r.headers().get("x-tollgate-reused") {
            assert_eq!(v, "coalesced");
            assert_eq!(r.headers()["x-tollgate-cost"], "0");
            reused += 1;
        }
        bodies.push(r.text().await.unwrap());
    }
    assert_eq!(reused, 3);
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one answer for all"
    );
    assert_eq!(upstream_requests(&up).await, 1);
    let recs = gw.wait_records(4).await;
    let paid: Vec<_> = recs.iter().filter(|r| r.reused.is_none()).collect();
    assert_eq!(paid.len(), 1);
    assert!(paid[0].cost_micros > 0);
    let followers: Vec<_> = recs.iter().filter(|r| r.reused.is_some()).collect();
    assert_eq!(followers.len(), 3);
    assert!(followers
        .iter()
        .all(|r| r.reused.as_deref() == Some("coalesced")
            && r.reused_from.as_deref() == Some(paid[0].id.as_str())
            && r.cost_micros == 0
            && r.status == 200));

    // `Cache-Control: no-cache` opts out: two concurrent calls, two upstream calls.
    let body = json!({"model": "mock-slow", "messages": user("fresh please")});
    let send = || {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("cache-control", "no-cache")
            .json(&body)
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    assert!(!a.unwrap().headers().contains_key("x-tollgate-reused"));
    assert!(!b.unwrap().headers().contains_key("x-tollgate-reused"));
    assert_eq!(upstream_requests(&up).await, 3);
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_gets_the_first_answer_without_paying_again() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&provider(&up)).await;
    let key = gw.key().await;
    let send = |idem: &'static str, text: &'static str| {
        gw.client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .header("idempotency-key", idem)
            .json(&json!({"model": "mock", "messages": user(text)}))
            .send()
    };
    let first = send("order-42", "book it").await.unwrap();
    assert_eq!(first.status(), 200);
    let first_id = first.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let first_body = first.text().await.unwrap();
    let again = send("order-42", "book it").await.unwrap();
    assert_eq!(again.status(), 200);
    assert_eq!(again.headers()["x-tollgate-reused"], "replayed");
    assert_eq!(again.headers()["x-tollgate-reused-from"], first_id.as_str());
    let again_id = again.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(again.text().await.unwrap(), first_body);
    assert_eq!(upstream_requests(&up).await, 1);
    let rec = wait_record(&gw, &again_id).await;
    assert_eq!(
        (rec.reused.as_deref(), rec.cost_micros),
        (Some("replayed"), 0)
    );
    // The same key for another request is a client bug, said so.
    let v = assert_openai_error(
        send("order-42", "book something else").await.unwrap(),
        400,
        "bad_request",
    )
    .await;
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("Idempotency-Key"));
    // A fresh key is a fresh request.
    let r = send("order-43", "book it").await.unwrap();
    assert!(!r.headers().contains_key("x-tollgate-reused"));
    assert_eq!(upstream_requests(&up).await, 2);
}

#[tokio::test]
async fn retries_beyond_the_budget_are_refused_and_new_requests_are_not() {
    let gw = TestGateway::start(
        "[retries]\nbudget_min = 2\nbudget_ratio = 0.2\ncoalesce = false\n[loop_guard]\nenabled = false\n",
    )
    .await;
    let key = gw.key().await;
    let same = json!({"model": "mock", "messages": user("did it work?")});
    let mut statuses = Vec::new();
    let mut flags = Vec::new();
    for _ in 0..4 {
        let r = gw.chat(&key, same.clone()).await;
        flags.push(r.headers().contains_key("x-tollgate-retry"));
        statuses.push(r.status().as_u16());
        if r.status() == 400 {
            assert!(r.headers().contains_key("retry-after"));
            let v = assert_openai_error(r, 400, "retry_budget_exhausted").await;
            assert!(v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("too many retries"));
        }
    }
    assert_eq!(statuses, [200, 200, 200, 400]);
    assert_eq!(flags, [false, true, true, false]);
    // Something new is not a retry.
    let r = gw
        .chat(
            &key,
            json!({"model": "mock", "messages": user("a new question")}),
        )
        .await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn the_loop_guard_can_answer_from_the_previous_response() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "{}[loop_guard]\nmax_repeats = 3\naction = \"replay\"\n[retries]\ncoalesce = false\n",
        provider(&up)
    ))
    .await;
    let key = gw.key().await;
    let body = json!({"model": "mock", "messages": user("are we there yet")});
    let mut last = String::new();
    for i in 0..3 {
        let r = gw.chat(&key, body.clone()).await;
        assert_eq!(r.status(), 200);
        let reused = r
            .headers()
            .get("x-tollgate-reused")
            .map(|v| v.to_str().unwrap().to_string());
        let text = r.text().await.unwrap();
        if i < 2 {
            assert_eq!(reused, None);
        } else {
            assert_eq!(reused.as_deref(), Some("loop_replay"));
            assert_eq!(text, last, "the previous answer, word for word");
        }
        last = text;
    }
    assert_eq!(upstream_requests(&up).await, 2);
    // Streams cannot be replayed: the guard rejects them instead.
    let stream = json!({"model": "mock", "stream": true, "messages": user("again and again")});
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let r = gw.chat(&key, stream.clone()).await;
        statuses.push(r.status().as_u16());
        let _ = r.text().await;
    }
    assert_eq!(statuses, [200, 200, 400]);
}

#[tokio::test]
async fn the_gateways_own_retries_spend_from_a_deployment_budget() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "{}[routing]\nmax_attempts = 5\nbackoff_base = \"1ms\"\nbackoff_max = \"2ms\"\ncooldown_failures = 100\n[retries]\nbudget_min = 1\nbudget_ratio = 0.0\n",
        provider(&up)
    ))
    .await;
    let key = gw.key().await;
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-500", "messages": user("will fail")}),
        )
        .await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(r.status(), 502);
    // One first attempt and the one retry the budget allows, not five attempts.
    assert_eq!(wait_record(&gw, &id).await.attempts, 2);
    assert_eq!(upstream_requests(&up).await, 2);
    let metrics: String = gw.metrics().await;
    assert!(metrics.contains("tollgate_retries_suppressed_total{scope=\"deployment\"} 1"));
}
