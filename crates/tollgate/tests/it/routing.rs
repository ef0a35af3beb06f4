use crate::harness::*;
use serde_json::{json, Value};

fn two_providers(primary: &str, primary_model: &str, secondary: &str) -> String {
    format!(
        r#"
        [routing]
        max_attempts = 3
        backoff_base = "5ms"
        backoff_max = "20ms"
        [[providers]]
        name = "primary"
        kind = "openai"
        base_url = "{primary}"
        connect_timeout = "500ms"
        [[providers]]
        name = "secondary"
        kind = "openai"
        base_url = "{secondary}"
        [[models]]
        name = "smart"
        deployments = [
          {{ provider = "primary", model = "{primary_model}", priority = 0 }},
          {{ provider = "secondary", model = "mock", priority = 1 }},
        ]
        "#
    )
}

#[tokio::test]
async fn retry_then_success_is_one_record_with_its_attempts() {
    let gw = TestGateway::start(
        "[routing]\nmax_attempts = 3\nbackoff_base = \"5ms\"\nbackoff_max = \"20ms\"\n",
    )
    .await;
    let key = gw.key().await;
    let resp = gw
        .chat(
            &key,
            json!({"model": "mock-flaky-2", "messages": user("hi")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let rec = gw.record_for(resp.headers()).await;
    assert_eq!(rec.attempts, 3);
    assert_eq!(rec.status, 200);
    assert_eq!(rec.output_tokens, 16);
    assert_eq!(gw.records().await.len(), 1);
}

#[tokio::test]
async fn falls_back_to_a_second_provider_on_connect_error_and_on_5xx() {
    for (primary, model) in [
        (dead_url().await, "mock"),
        (spawn_mock(None).await, "mock-500"),
    ] {
        let secondary = spawn_mock(None).await;
        let gw = TestGateway::start(&two_providers(&primary, model, &secondary)).await;
        let key = gw.key().await;
        for stream in [false, true] {
            let resp = gw
                .chat(
                    &key,
                    json!({"model": "smart", "stream": stream, "messages": user("hi")}),
                )
                .await;
            assert_eq!(resp.status(), 200);
            let headers = resp.headers().clone();
            let _ = resp.bytes().await.unwrap();
            let rec = gw
                .wait_records(if stream { 2 } else { 1 })
                .await
                .into_iter()
                .find(|r| r.id == headers["x-request-id"].to_str().unwrap())
                .unwrap();
            assert_eq!(rec.provider.as_deref(), Some("secondary"), "{rec:?}");
            assert_eq!(rec.attempts, 2);
            assert_eq!(rec.usage_source, "provider");
            assert_eq!(rec.output_tokens, 16);
        }
        assert_eq!(gw.records().await.len(), 2);
    }
}

#[tokio::test]
async fn upstream_failure_is_a_502_in_openai_shape_and_one_record() {
    let gw = TestGateway::start(
        "[routing]\nmax_attempts = 2\nbackoff_base = \"5ms\"\nbackoff_max = \"10ms\"\n",
    )
    .await;
    let key = gw.key().await;
    let resp = gw
        .chat(&key, json!({"model": "mock-500", "messages": user("hi")}))
        .await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    assert_openai_error(resp, 502, "upstream_error").await;
    let recs = gw.records().await;
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0].id, id);
    assert_eq!((recs[0].status, recs[0].attempts), (502, 2));
    assert_eq!(recs[0].error_kind.as_deref(), Some("upstream_error"));
    assert_eq!(recs[0].cost_micros, 0);
}

#[tokio::test]
async fn upstream_429_honours_retry_after_or_passes_it_back() {
    // The upstream asks for 1 s, more than we are willing to wait: the client gets the 429.
    let gw = TestGateway::start("[routing]\nmax_retry_wait = \"100ms\"\n").await;
    let key = gw.key().await;
    let resp = gw
        .chat(&key, json!({"model": "mock-429", "messages": user("hi")}))
        .await;
    assert_eq!(resp.headers()["retry-after"], "1");
    assert_openai_error(resp, 429, "upstream_rate_limited").await;
    // The deployment is now cooling down for the second the upstream asked for.
    let resp = gw
        .chat(&key, json!({"model": "mock-429", "messages": user("hi")}))
        .await;
    assert!(resp.headers().contains_key("retry-after"));
    assert_openai_error(resp, 503, "no_healthy_deployment").await;
    let recs = gw.records().await;
    assert_eq!(recs.len(), 2);
    assert_eq!(recs.iter().find(|r| r.status == 429).unwrap().attempts, 1);
}

#[tokio::test]
async fn failing_deployment_cools_down_and_traffic_skips_it() {
    let bad = spawn_mock(None).await;
    let good = spawn_mock(None).await;
    let cfg = two_providers(&bad, "mock-500", &good).replace(
        "max_attempts = 3",
        "max_attempts = 3\ncooldown_failures = 2\ncooldown = \"60s\"",
    );
    let gw = TestGateway::start(&cfg).await;
    let key = gw.key().await;
    // Distinct prompts: six identical ones would (rightly) trip the loop guard.
    for i in 0..6 {
        assert_eq!(
            gw.chat(
                &key,
                json!({"model": "smart", "messages": user(&format!("hi {i}"))})
            )
            .await
            .status(),
            200
        );
    }
    let recs = gw.records().await;
    let attempts: u32 = recs.iter().map(|r| r.attempts).sum();
    // Two requests pay a failed attempt on the bad deployment; after that it is skipped.
    assert_eq!(attempts, 6 + 2, "{recs:?}");
    assert_eq!(mock_stats(&bad).await["requests"], 2);
}

#[tokio::test]
async fn first_byte_timeout_is_a_504() {
    let up = spawn_mock(None).await;
    let cfg = format!(
        r#"
        [routing]
        max_attempts = 2
        backoff_base = "5ms"
        backoff_max = "10ms"
        [[providers]]
        name = "up"
        kind = "openai"
        base_url = "{up}"
        first_byte_timeout = "300ms"
        models = ["mock*"]
        "#
    );
    let gw = TestGateway::start(&cfg).await;
    let key = gw.key().await;
    let started = std::time::Instant::now();
    let resp = gw
        .chat(&key, json!({"model": "mock-stall", "messages": user("hi")}))
        .await;
    assert_openai_error(resp, 504, "upstream_timeout").await;
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    let recs = gw.records().await;
    assert_eq!((recs[0].status, recs[0].attempts), (504, 2));
}

#[tokio::test]
async fn provider_key_comes_from_env_and_a_rejected_key_is_not_the_clients_fault() {
    // CARGO_PKG_NAME is set by cargo for every test process: an env var we need not set.
    let expected = std::env::var("CARGO_PKG_NAME").unwrap();
    let up = spawn_mock(Some(&expected)).await;
    let cfg = |env: &str| {
        format!(
            "[routing]\nmax_attempts = 1\n[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\napi_key_env = \"{env}\"\nmodels = [\"mock*\"]\n"
        )
    };
    let gw = TestGateway::start(&cfg("CARGO_PKG_NAME")).await;
    let key = gw.key().await;
    assert_eq!(
        gw.chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        200
    );

    let gw = TestGateway::start(&cfg("CARGO_MANIFEST_DIR")).await;
    let key = gw.key().await;
    assert_openai_error(
        gw.chat(&key, json!({"model": "mock", "messages": user("hi")}))
            .await,
        502,
        "upstream_auth",
    )
    .await;
}

#[tokio::test]
async fn upstream_4xx_passes_through_unchanged_and_is_not_retried() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n"
    ))
    .await;
    let key = gw.key().await;
    // The mock refuses an embeddings request without input with OpenAI's own 400.
    let resp = gw
        .client
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-embed"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["code"], "invalid_value");
    assert_eq!(mock_stats(&up).await["requests"], 1);
}

#[tokio::test]
async fn tools_and_unknown_fields_pass_through() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]}}}]);
    let resp = gw.chat(&key, json!({"model": "mock", "messages": user("use get_weather"), "tools": tools, "x_vendor_field": {"a": 1}})).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "mock", "days": 1}));
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
}

#[tokio::test]
async fn reload_adds_an_alias_without_a_restart() {
    let up = spawn_mock(None).await;
    let dir = TempDir::new("reload");
    let path = dir.path().join("tollgate.toml");
    let base = format!("[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\n");
    std::fs::write(&path, &base).unwrap();
    let gw = TestGateway::start_in(&base, dir, Some(path.clone())).await;
    let key = gw.key().await;
    assert_eq!(
        gw.chat(&key, json!({"model": "fast", "messages": user("hi")}))
            .await
            .status(),
        404
    );
    std::fs::write(&path, format!("{base}[[models]]\nname = \"fast\"\ndeployments = [{{ provider = \"up\", model = \"mock\" }}]\n")).unwrap();
    let r = gw
        .client
        .post(format!("{}/admin/reload", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        gw.chat(&key, json!({"model": "fast", "messages": user("hi")}))
            .await
            .status(),
        200
    );
    // A broken file is refused and the running configuration stays.
    std::fs::write(
        &path,
        format!("{base}[[models]]\nname = \"fast\"\ndeployments = [{{ provider = \"nope\" }}]\n"),
    )
    .unwrap();
    let r = gw
        .client
        .post(format!("{}/admin/reload", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    let v = assert_openai_error(r, 400, "bad_request").await;
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("models[0].deployments[0].provider"),
        "{v}"
    );
    assert_eq!(
        gw.chat(&key, json!({"model": "fast", "messages": user("hi")}))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn a_circuit_opens_on_a_failing_deployment_and_closes_after_it_recovers() {
    let flaky = spawn_mock(None).await;
    let good = spawn_mock(None).await;
    // The primary fails its first 4 requests, then recovers.
    let cfg = two_providers(&flaky, "mock-flaky-4", &good).replace(
        "max_attempts = 3",
        "max_attempts = 2\ncooldown_failures = 2\ncooldown = \"300ms\"",
    );
    let gw = TestGateway::start(&cfg).await;
    let key = gw.key().await;
    let mut n = 0;
    let mut ask = || {
        n += 1;
        let body = json!({"model": "smart", "messages": user(&format!("request {n}"))});
        let gw = &gw;
        let key = key.clone();
        async move {
            let r = gw.chat(&key, body).await;
            assert_eq!(r.status(), 200);
            let rec = gw.record_for(r.headers()).await;
            (rec.provider.unwrap(), rec.attempts)
        }
    };
    let pause = || tokio::time::sleep(std::time::Duration::from_millis(350));
    // Two failures open the circuit; traffic moves to the healthy deployment.
    assert_eq!(ask().await, ("secondary".into(), 2));
    assert_eq!(ask().await, ("secondary".into(), 2));
    assert_eq!(
        ask().await,
        ("secondary".into(), 1),
        "open: the primary is not tried"
    );
    // Half-open probes fail twice more (the primary's 3rd and 4th failures).
    pause().await;
    assert_eq!(ask().await, ("secondary".into(), 2));
    assert_eq!(
        ask().await,
        ("secondary".into(), 1),
        "open again after the failed probe"
    );
    pause().await;
    assert_eq!(ask().await, ("secondary".into(), 2));
    // The next probe succeeds and the circuit closes: traffic comes back.
    pause().await;
    assert_eq!(ask().await, ("primary".into(), 1));
    assert_eq!(ask().await, ("primary".into(), 1));
    assert_eq!(mock_stats(&flaky).await["requests"], 6);
}

/// One request sees one configuration: a reload while it is in flight (after routing, before
/// the provider's first event) changes neither the deployment it was sent to nor the price
/// it is billed at; the next request sees the new ones.
#[tokio::test]
async fn a_reload_mid_request_changes_nothing_for_that_request() {
    let up = spawn_mock(None).await;
    let dir = TempDir::new("reload-mid");
    let path = dir.path().join("tollgate.toml");
    let version = |model: &str, output_price: u64| {
        format!(
            "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\n\
             [[models]]\nname = \"agent\"\ndeployments = [{{ provider = \"up\", model = \"{model}\" }}]\n\
             [[prices]]\nmodel = \"up/{model}\"\ninput = 0\noutput = {output_price}\n"
        )
    };
    let v1 = version("mock-lag", 1_000_000);
    std::fs::write(&path, &v1).unwrap();
    let gw = TestGateway::start_in(&v1, dir, Some(path.clone())).await;
    let key = gw.key().await;
    let body = json!({"model": "agent", "stream": true, "messages": user("in flight")});
    let in_flight = {
        let (client, url, key, body) =
            (gw.client.clone(), gw.url.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            let r = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
            let _ = r.text().await.unwrap();
            id
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    std::fs::write(&path, version("mock-lag-long", 50_000_000)).unwrap();
    let r = gw
        .client
        .post(format!("{}/admin/reload", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let id = in_flight.await.unwrap();
    let rec = wait_record(&gw, &id).await;
    assert_eq!(rec.model_served.as_deref(), Some("mock-lag"));
    assert_eq!(rec.output_tokens, 16);
    assert_eq!(
        rec.cost_micros, 16,
        "16 tokens at $1 per million: the price it started with"
    );
    assert!(
        rec.price_version
            .as_deref()
            .unwrap_or("")
            .starts_with("up/mock-lag@"),
        "{rec:?}"
    );
    let r = gw
        .chat(
            &key,
            json!({"model": "agent", "stream": true, "messages": user("after")}),
        )
        .await;
    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
    let _ = r.text().await.unwrap();
    let rec = wait_record(&gw, &id).await;
    assert_eq!(rec.model_served.as_deref(), Some("mock-lag-long"));
    assert_eq!(
        rec.cost_micros,
        200 * 50,
        "the new price for the next request"
    );
}
