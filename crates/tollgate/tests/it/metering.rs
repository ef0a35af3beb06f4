use crate::harness::*;
use serde_json::{json, Value};
use tollgate::prices::PriceTable;
use tollgate_proto::Usage;

fn mock_cost(u: &Usage) -> u64 {
    PriceTable::new(&[]).lookup("mock", "mock").unwrap().cost(u)
}

#[tokio::test]
async fn json_request_gets_one_record_with_the_providers_numbers() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = gw.chat(&key, json!({"model": "mock-cached-reasoning", "messages": user("What is the weather like in Paris today?")})).await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    let u = &body["usage"];
    let expected = Usage {
        input: u["prompt_tokens"].as_u64().unwrap(),
        cached_input: u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap(),
        output: u["completion_tokens"].as_u64().unwrap(),
        reasoning: u["completion_tokens_details"]["reasoning_tokens"]
            .as_u64()
            .unwrap(),
        ..Usage::default()
    };
    assert!(
        expected.cached_input > 0 && expected.reasoning > 0,
        "the mock reports every token class: {u}"
    );

    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.status, 200);
    assert_eq!(rec.usage_source, "provider");
    assert_eq!(
        (
            rec.input_tokens,
            rec.cached_input_tokens,
            rec.output_tokens,
            rec.reasoning_tokens
        ),
        (
            expected.input,
            expected.cached_input,
            expected.output,
            expected.reasoning
        )
    );
    assert_eq!(rec.cost_micros, mock_cost(&expected));
    assert!(rec.cost_micros > 0);
    assert_eq!(
        headers["x-tollgate-cost"].to_str().unwrap(),
        rec.cost_micros.to_string()
    );
    assert!(rec.price_version.as_deref().unwrap().starts_with("mock*@"));
    assert_eq!(rec.agent, "agent-1");
    assert_eq!(rec.team.as_deref(), Some("team-a"));
    assert_eq!(rec.project.as_deref(), Some("proj-x"));
    assert_eq!(
        rec.model_requested.as_deref(),
        Some("mock-cached-reasoning")
    );
    assert_eq!(rec.provider.as_deref(), Some("mock"));
    assert_eq!(rec.attempts, 1);
    assert!(!rec.stream && !rec.client_disconnected);
    assert!(rec.error_kind.is_none());
    assert_eq!(gw.records().await.len(), 1);
}

#[tokio::test]
async fn provider_without_usage_is_estimated_and_flagged() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = gw
        .chat(
            &key,
            json!({"model": "mock-nousage", "messages": user("Count these words for me please")}),
        )
        .await;
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert!(body.get("usage").is_none());
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.usage_source, "estimated");
    assert!(rec.input_tokens >= 6, "{rec:?}");
    // 16 mock words, tokenized locally.
    assert!((14..=20).contains(&rec.output_tokens), "{rec:?}");
    assert!(rec.cost_micros > 0);
}

#[tokio::test]
async fn tags_come_from_metadata_header_and_key_and_the_key_wins() {
    let gw = TestGateway::start("").await;
    let (key, _) = gw
        .create_key(json!({"name": "tagged", "tags": {"env": "prod"}}))
        .await;
    let resp = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("x-tollgate-tags", "run=r-42, env=dev")
        .json(&json!({"model": "mock", "messages": user("hi"), "metadata": {"feature": "search", "n": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rec = gw.record_for(resp.headers()).await;
    assert_eq!(rec.tags.get("run").map(String::as_str), Some("r-42"));
    assert_eq!(rec.tags.get("env").map(String::as_str), Some("prod"));
    assert_eq!(rec.tags.get("feature").map(String::as_str), Some("search"));
    assert!(!rec.tags.contains_key("n"));

    let bad = gw
        .client
        .post(format!("{}/v1/chat/completions", gw.url))
        .bearer_auth(&key)
        .header("x-tollgate-tags", "no-equals-sign")
        .json(&json!({"model": "mock", "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_openai_error(bad, 400, "bad_request").await;
}

#[tokio::test]
async fn embeddings_are_metered() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let resp = gw
        .client
        .post(format!("{}/v1/embeddings", gw.url))
        .bearer_auth(&key)
        .json(&json!({"model": "mock-embed", "input": ["first text", "second, longer text"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let headers = resp.headers().clone();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let rec = gw.record_for(&headers).await;
    assert_eq!(rec.endpoint, "embeddings");
    assert_eq!(
        rec.input_tokens,
        body["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert_eq!(rec.output_tokens, 0);
}

#[tokio::test]
async fn usage_report_groups_by_key_team_model_tag_and_day() {
    usage_report_groups_by_key_team_model_tag_and_day_on(&TestStore::Sqlite).await;
}

pub async fn usage_report_groups_by_key_team_model_tag_and_day_on(store: &TestStore) {
    let gw = TestGateway::start(&store.config("")).await;
    let (a, _) = gw.create_key(json!({"name": "a", "team": "t1"})).await;
    let (b, _) = gw
        .create_key(json!({"name": "b", "team": "t2", "tags": {"cc": "eng"}}))
        .await;
    for _ in 0..3 {
        assert_eq!(
            gw.chat(&a, json!({"model": "mock", "messages": user("x")}))
                .await
                .status(),
            200
        );
    }
    assert_eq!(
        gw.chat(&b, json!({"model": "mock-long", "messages": user("x")}))
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.chat(&b, json!({"model": "mock-500", "messages": user("x")}))
            .await
            .status(),
        502
    );
    let get = |by: &str| {
        let gw = &gw;
        let by = by.to_string();
        async move {
            let r = gw
                .client
                .get(format!("{}/admin/usage?by={by}&since=1h", gw.url))
                .bearer_auth(&gw.admin_key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Vec<Value>>().await.unwrap()
        }
    };
    let by_team = get("team").await;
    let t1 = by_team.iter().find(|r| r["group"] == "t1").unwrap();
    let t2 = by_team.iter().find(|r| r["group"] == "t2").unwrap();
    assert_eq!(
        (t1["requests"].as_u64(), t1["errors"].as_u64()),
        (Some(3), Some(0))
    );
    assert_eq!(
        (t2["requests"].as_u64(), t2["errors"].as_u64()),
        (Some(2), Some(1))
    );
    assert_eq!(t1["output_tokens"].as_u64(), Some(48));
    let records = gw.records().await;
    let total: u64 = records.iter().map(|r| r.cost_micros).sum();
    let by_model = get("model").await;
    assert_eq!(
        by_model
            .iter()
            .map(|r| r["cost_micros"].as_u64().unwrap())
            .sum::<u64>(),
        total
    );
    let by_tag = get("tag:cc").await;
    assert_eq!(
        by_tag.iter().find(|r| r["group"] == "eng").unwrap()["requests"].as_u64(),
        Some(2)
    );
    let by_day = get("day").await;
    assert_eq!(by_day.len(), 1);
    assert_eq!(by_day[0]["requests"].as_u64(), Some(5));
    let day = by_day[0]["group"].as_str().unwrap();
    assert!(
        day.len() == 10 && &day[4..5] == "-" && &day[7..8] == "-" && day.starts_with("20"),
        "a UTC date, YYYY-MM-DD: {day}"
    );
    let bad = gw
        .client
        .get(format!("{}/admin/usage?by=colour", gw.url))
        .bearer_auth(&gw.admin_key)
        .send()
        .await
        .unwrap();
    assert_openai_error(bad, 400, "bad_request").await;
}

/// The writer gathers records for `[metering] linger` before it commits them, but a hold
/// never waits for that: with a 30 s linger, wallet-backed requests are still admitted (a hold
/// waiting out the linger would give 503 after `hold_timeout`, 2 s), their records are not yet
/// committed, and a graceful shutdown commits them with their captures.
#[tokio::test]
async fn holds_do_not_wait_for_the_writers_linger_and_shutdown_commits_what_it_gathered() {
    let gw = TestGateway::start(
        "[metering]\nlinger = \"30s\"\n[wallets]\nsweep_interval = \"1h\"\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 0\noutput = 625000000\n",
    )
    .await;
    let (key, key_id) = gw.create_key(json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
    // The wallet's creation and top-up went through the writer too; from here on it lingers.
    for i in 0..3 {
        let r = gw
            .chat(
                &key,
                json!({"model": "mock", "max_tokens": 16, "messages": user(&format!("n{i}"))}),
            )
            .await;
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    // Not through /admin/usage: admin reads flush the writer first (read your writes).
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("tollgate_usage_records_written_total 0"),
        "records wait for the linger (or a flush) before they are committed: {metrics}"
    );
    let dir = gw.stop().await;
    let gw = TestGateway::start_in("[metering]\nlinger = \"0s\"\n", dir, None).await;
    let recs = gw.records().await;
    assert_eq!(recs.len(), 3);
    assert!(recs.iter().all(|r| r.cost_micros == 10_000), "{recs:?}");
    assert_eq!(
        gw.wallet_view(&wallet).await["balance_micros"],
        1_000_000 - 30_000
    );
}
