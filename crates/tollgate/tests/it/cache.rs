//! The exact response cache: hits, misses and bypasses for JSON and streams, scope between
//! keys and teams, what is never kept, zero-cost hit records with what they saved, and a
//! hit's fee through the wallet.

use crate::harness::*;
use serde_json::{json, Value};

fn config(up: &str, cache: &str) -> String {
    format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 1000000\noutput = 2000000\n\
         [cache]\nenabled = true\n{cache}"
    )
}

async fn upstream_requests(url: &str) -> u64 {
    mock_stats(url).await["requests"].as_u64().unwrap()
}

async fn send(
    gw: &TestGateway,
    key: &str,
    path: &str,
    body: &Value,
    headers: &[(&str, &str)],
) -> reqwest::Response {
    let mut r = gw
        .client
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .json(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap()
}

fn verdict(r: &reqwest::Response) -> Option<String> {
    r.headers()
        .get("x-tollgate-cache")
        .map(|v| v.to_str().unwrap().to_string())
}

#[tokio::test]
async fn a_repeated_json_request_is_answered_from_the_cache_at_no_cost_with_its_savings() {
    a_repeated_json_request_is_answered_from_the_cache_at_no_cost_with_its_savings_on(
        &TestStore::Sqlite,
    )
    .await;
}

/// Also run on PostgreSQL (postgres.rs): the savings column, rollup and report.
pub async fn a_repeated_json_request_is_answered_from_the_cache_at_no_cost_with_its_savings_on(
    store: &TestStore,
) {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&store.config(&config(&up, ""))).await;
    let key = gw.key().await;
    let body = json!({"model": "mock-1", "messages": user("what is the capital of France"), "temperature": 0});
    let first = send(&gw, &key, "/v1/chat/completions", &body, &[]).await;
    assert_eq!(first.status(), 200);
    assert_eq!(verdict(&first).as_deref(), Some("miss"));
    let first_rec = gw.record_for(first.headers()).await;
    let first_body = first.text().await.unwrap();

    // The same request, its keys in another order and with caller-only fields: a hit.
    let same = json!({"temperature": 0, "user": "someone", "metadata": {"a": "b"},
                      "messages": user("what is the capital of France"), "model": "mock-1"});
    let hit = send(&gw, &key, "/v1/chat/completions", &same, &[]).await;
    assert_eq!(hit.status(), 200);
    assert_eq!(verdict(&hit).as_deref(), Some("hit"));
    assert_eq!(hit.headers()["x-tollgate-cost"], "0");
    assert_eq!(
        hit.headers()["x-tollgate-reused-from"],
        first_rec.id.as_str()
    );
    assert!(hit.headers().contains_key("age"));
    let hit_rec = gw.record_for(hit.headers()).await;
    assert_eq!(hit.text().await.unwrap(), first_body, "the same answer");
    assert_eq!(
        upstream_requests(&up).await,
        1,
        "one upstream call for two requests"
    );

    assert!(first_rec.cost_micros > 0 && first_rec.input_tokens > 0);
    assert_eq!(first_rec.cache.as_deref(), Some("miss"));
    assert!(first_rec.savings.is_empty());
    assert_eq!(hit_rec.cache.as_deref(), Some("hit"));
    assert_eq!(hit_rec.reused.as_deref(), Some("cache"));
    assert_eq!(hit_rec.status, 200);
    assert_eq!(hit_rec.cost_micros, 0);
    assert_eq!(
        (hit_rec.input_tokens, hit_rec.output_tokens),
        (0, 0),
        "a hit spends no tokens"
    );
    assert_eq!(hit_rec.model_served, first_rec.model_served);
    assert_eq!(hit_rec.savings.len(), 1);
    assert_eq!(hit_rec.savings[0].saver, "cache");
    assert_eq!(
        hit_rec.savings[0].tokens,
        first_rec.input_tokens + first_rec.output_tokens
    );
    assert_eq!(hit_rec.savings[0].micros, first_rec.cost_micros);

    // Token rollups count the tokens once: the hit's were not consumed.
    let (s, report) = gw
        .admin(reqwest::Method::GET, "/admin/usage?by=key", None)
        .await;
    assert_eq!(s, 200, "{report}");
    let row = &report[0];
    assert_eq!(row["requests"], 2, "{report}");
    assert_eq!(row["input_tokens"], first_rec.input_tokens, "{report}");
    assert_eq!(row["cost_micros"], first_rec.cost_micros, "{report}");

    // The savings report, by saver and by key, next to the spend.
    let (s, by_saver) = gw
        .admin(reqwest::Method::GET, "/admin/savings?by=saver", None)
        .await;
    assert_eq!(s, 200, "{by_saver}");
    assert_eq!(by_saver[0]["group"], "cache", "{by_saver}");
    assert_eq!(by_saver[0]["saved_micros"], first_rec.cost_micros);
    assert_eq!(by_saver[0]["spend_micros"], Value::Null);
    let (_, by_key) = gw
        .admin(reqwest::Method::GET, "/admin/savings?by=key&since=1d", None)
        .await;
    let row = &by_key[0];
    assert_eq!(row["spend_micros"], first_rec.cost_micros, "{by_key}");
    assert_eq!(row["saved_micros"], first_rec.cost_micros);
    assert_eq!(row["saved_share"], 0.5, "saved as much as it spent");
    assert_eq!(row["savers"]["cache"]["requests"], 1);
    let (s, bad) = gw
        .admin(reqwest::Method::GET, "/admin/savings?by=day", None)
        .await;
    assert_eq!(s, 400, "{bad}");
    let out = crate::cli::tollgate_async(&[
        "savings",
        "--by",
        "team",
        "--format",
        "csv",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    let csv = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{csv}");
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("team,spend_usd,saved_usd,saved_tokens,saved_share,by_saver")
    );
    let line = lines.next().unwrap();
    assert!(
        line.starts_with("team-a,") && line.contains(",50.0%,cache="),
        "{csv}"
    );

    // Anything else that differs is another entry.
    let other = json!({"model": "mock-1", "messages": user("what is the capital of France"), "temperature": 1});
    let r = send(&gw, &key, "/v1/chat/completions", &other, &[]).await;
    assert_eq!(verdict(&r).as_deref(), Some("miss"));
    assert_eq!(upstream_requests(&up).await, 2);

    let m = gw.metrics().await;
    assert!(
        m.contains("tollgate_cache_lookups_total{result=\"hit\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_saved_micros_total{saver=\"cache\"}"),
        "{m}"
    );
}

#[tokio::test]
async fn no_store_bypasses_and_refresh_fetches_again() {
    let up = spawn_mock(None).await;
    // Six times the same request: the loop guard still judges repeats the cache answers.
    let gw = TestGateway::start(&format!(
        "{}[loop_guard]\nmax_repeats = 20\n",
        config(&up, "")
    ))
    .await;
    let key = gw.key().await;
    let body = json!({"model": "mock-1", "messages": user("control headers")});
    let path = "/v1/chat/completions";
    let r = send(&gw, &key, path, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(verdict(&r).as_deref(), Some("bypass"));
    assert_eq!(
        gw.record_for(r.headers()).await.cache.as_deref(),
        Some("bypass")
    );
    // Nothing was kept: the next one is a miss, the one after a hit.
    let r = send(&gw, &key, path, &body, &[]).await;
    assert_eq!(verdict(&r).as_deref(), Some("miss"));
    let r = send(&gw, &key, path, &body, &[]).await;
    assert_eq!(verdict(&r).as_deref(), Some("hit"));
    assert_eq!(upstream_requests(&up).await, 2);
    // A refresh goes upstream and keeps what it got; so does `no-cache`.
    let r = send(&gw, &key, path, &body, &[("x-tollgate-cache", "refresh")]).await;
    assert_eq!(verdict(&r).as_deref(), Some("refresh"));
    let r = send(
        &gw,
        &key,
        path,
        &body,
        &[("cache-control", "max-age=0, no-cache")],
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(verdict(&r).as_deref(), Some("refresh"));
    assert_eq!(upstream_requests(&up).await, 4);
    let r = send(&gw, &key, path, &body, &[]).await;
    assert_eq!(verdict(&r).as_deref(), Some("hit"));
    assert_eq!(upstream_requests(&up).await, 4);
}

#[tokio::test]
async fn answers_are_kept_per_key_unless_the_team_shares_them() {
    let up = spawn_mock(None).await;
    let body = json!({"model": "mock-1", "messages": user("shared question")});
    let path = "/v1/chat/completions";

    let gw = TestGateway::start(&config(&up, "")).await;
    let (a, _) = gw.create_key(json!({"name": "a", "team": "red"})).await;
    let (b, _) = gw.create_key(json!({"name": "b", "team": "red"})).await;
    assert_eq!(
        verdict(&send(&gw, &a, path, &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        verdict(&send(&gw, &b, path, &body, &[]).await).as_deref(),
        Some("miss"),
        "another key never gets a key-scoped answer"
    );
    assert_eq!(
        verdict(&send(&gw, &a, path, &body, &[]).await).as_deref(),
        Some("hit")
    );
    drop(gw);

    let gw = TestGateway::start(&config(&up, "scope = \"team\"\n")).await;
    let (a, _) = gw.create_key(json!({"name": "a", "team": "red"})).await;
    let (b, _) = gw.create_key(json!({"name": "b", "team": "red"})).await;
    let (c, _) = gw.create_key(json!({"name": "c", "team": "blue"})).await;
    let (d, _) = gw.create_key(json!({"name": "d"})).await;
    assert_eq!(
        verdict(&send(&gw, &a, path, &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        verdict(&send(&gw, &b, path, &body, &[]).await).as_deref(),
        Some("hit"),
        "the team shares"
    );
    assert_eq!(
        verdict(&send(&gw, &c, path, &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        verdict(&send(&gw, &d, path, &body, &[]).await).as_deref(),
        Some("miss"),
        "a key without a team keeps its own"
    );
}

#[tokio::test]
async fn the_cache_answers_only_the_keys_and_models_it_names() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(
        &up,
        "keys = [\"cached-*\"]\nmodels = [\"mock-c*\"]\n",
    ))
    .await;
    let (yes, _) = gw.create_key(json!({"name": "cached-1"})).await;
    let (no, _) = gw.create_key(json!({"name": "plain"})).await;
    let path = "/v1/chat/completions";
    let body = json!({"model": "mock-c1", "messages": user("named")});
    for _ in 0..2 {
        let r = send(&gw, &no, path, &body, &[]).await;
        assert_eq!(r.status(), 200);
        assert_eq!(verdict(&r), None, "not a key it names");
    }
    let other_model = json!({"model": "mock-1", "messages": user("named")});
    assert_eq!(
        verdict(&send(&gw, &yes, path, &other_model, &[]).await),
        None
    );
    assert_eq!(
        verdict(&send(&gw, &yes, path, &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        verdict(&send(&gw, &yes, path, &body, &[]).await).as_deref(),
        Some("hit")
    );
}

#[tokio::test]
async fn a_stream_is_replayed_as_the_same_events_and_never_shares_with_json() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let key = gw.key().await;
    for (path, body) in [
        (
            "/v1/chat/completions",
            json!({"model": "mock-1", "stream": true, "stream_options": {"include_usage": true},
                   "messages": user("stream me")}),
        ),
        (
            "/v1/messages",
            json!({"model": "mock-1", "stream": true, "max_tokens": 64, "messages": user("stream me")}),
        ),
        (
            "/v1/responses",
            json!({"model": "mock-1", "stream": true, "input": "stream me"}),
        ),
    ] {
        let before = upstream_requests(&up).await;
        let first = send(&gw, &key, path, &body, &[]).await;
        assert_eq!(verdict(&first).as_deref(), Some("miss"), "{path}");
        let first_id = first.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_string();
        let first_events = sse_data(first).await;
        let first_rec = wait_record(&gw, &first_id).await;
        assert!(first_rec.output_tokens > 0, "{path}");
        // The stream is kept once it has ended whole.
        let mut hit = None;
        for _ in 0..50 {
            let r = send(&gw, &key, path, &body, &[]).await;
            if verdict(&r).as_deref() == Some("hit") {
                hit = Some(r);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let hit = hit.unwrap_or_else(|| panic!("{path}: never a hit"));
        assert!(hit.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream"));
        let id = hit.headers()["x-request-id"].to_str().unwrap().to_string();
        let events = sse_data(hit).await;
        assert_eq!(events, first_events, "{path}: the same events");
        let rec = wait_record(&gw, &id).await;
        assert!(rec.stream);
        assert_eq!(rec.cost_micros, 0);
        assert_eq!(
            rec.savings[0].tokens,
            first_rec.input_tokens + first_rec.output_tokens,
            "{path}"
        );
        assert_eq!(upstream_requests(&up).await, before + 1, "{path}");

        // The same request without `stream` is another entry.
        let mut json_body = body.clone();
        json_body.as_object_mut().unwrap().remove("stream");
        json_body.as_object_mut().unwrap().remove("stream_options");
        let r = send(&gw, &key, path, &json_body, &[]).await;
        assert_eq!(verdict(&r).as_deref(), Some("miss"), "{path}");
        assert!(r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"));
    }
}

#[tokio::test]
async fn failures_cut_streams_and_tool_calls_are_never_kept() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let key = gw.key().await;
    let path = "/v1/chat/completions";
    // A provider error, a truncated stream, a stream with an in-band error.
    for body in [
        json!({"model": "mock-500", "messages": user("fails")}),
        json!({"model": "mock-truncate", "stream": true, "messages": user("cut")}),
        json!({"model": "mock-errorevent", "stream": true, "messages": user("errs")}),
    ] {
        for _ in 0..2 {
            let r = send(&gw, &key, path, &body, &[]).await;
            assert_ne!(verdict(&r).as_deref(), Some("hit"), "{body}");
            let _ = r.bytes().await;
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    // An answer that calls a tool: the tool must run again next time.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let body =
        json!({"model": "mock-1", "messages": user("use the get_weather tool"), "tools": tools});
    let first = send(&gw, &key, path, &body, &[]).await;
    let answer: Value = first.json().await.unwrap();
    assert!(
        answer["choices"][0]["message"]["tool_calls"].is_array(),
        "{answer}"
    );
    let again = send(&gw, &key, path, &body, &[]).await;
    assert_eq!(verdict(&again).as_deref(), Some("miss"));
    drop(gw);

    // Unless the operator allows it.
    let gw = TestGateway::start(&config(&up, "tool_calls = true\n")).await;
    let key = gw.key().await;
    assert_eq!(
        verdict(&send(&gw, &key, path, &body, &[]).await).as_deref(),
        Some("miss")
    );
    assert_eq!(
        verdict(&send(&gw, &key, path, &body, &[]).await).as_deref(),
        Some("hit")
    );
}

#[tokio::test]
async fn a_hit_with_a_fee_is_held_and_captured_from_the_wallet() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "fee_micros = 7\n")).await;
    let (key, key_id) = gw.create_key(json!({"name": "payer"})).await;
    let wallet = gw.wallet(&format!("key:{key_id}"), "5").await;
    let body = json!({"model": "mock-1", "messages": user("worth paying for")});
    let path = "/v1/chat/completions";
    let first = send(&gw, &key, path, &body, &[]).await;
    let first_rec = gw.record_for(first.headers()).await;
    let hit = send(&gw, &key, path, &body, &[]).await;
    assert_eq!(verdict(&hit).as_deref(), Some("hit"));
    assert_eq!(hit.headers()["x-tollgate-cost"], "7");
    let rec = gw.record_for(hit.headers()).await;
    assert_eq!(rec.cost_micros, 7);
    assert_eq!(rec.wallet_id.as_deref(), Some(wallet.as_str()));
    assert_eq!(rec.savings[0].micros, first_rec.cost_micros - 7);
    assert_eq!(upstream_requests(&up).await, 1);
    let w = gw.wallet_view(&wallet).await;
    assert_eq!(
        w["balance_micros"].as_i64().unwrap(),
        5_000_000 - first_rec.cost_micros as i64 - 7,
        "{w}"
    );
    assert_eq!(w["held_micros"], 0, "{w}");
}

/// A raw Redis command, for looking at what the gateways keep there.
async fn redis_cmd<T: redis::FromRedisValue>(url: &str, args: &[&str]) -> T {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

async fn post_to(url: &str, key: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_answers_through_redis_and_an_outage_only_costs_the_hits() {
    tollgate::server::init_tls();
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let up = spawn_mock(None).await;
    // Limits stay local: a `[limits.redis]` URL is enough for the cache to live there.
    let r = start_replicas(&format!(
        "{}\nttl = \"60s\"\n[limits.redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nretry_interval = \"700ms\"\n[loop_guard]\nenabled = false\n",
        config(&up, ""),
        redis.url()
    ))
    .await;
    let key = shared_key(&r, json!({"name": "shared"})).await;
    let body = json!({"model": "mock-1", "messages": user("shared answer"), "temperature": 0});

    let first = post_to(&r.urls[0], &key, &body).await;
    assert_eq!(verdict(&first).as_deref(), Some("miss"));
    let first_id = first.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    let first_body = first.text().await.unwrap();
    // Kept in the background once answered: one entry, expiring with the TTL.
    let mut kept: Vec<String> = Vec::new();
    for _ in 0..100 {
        kept = redis_cmd(&redis.url(), &["KEYS", "tg:cache:v1:*"]).await;
        if !kept.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(kept.len(), 1, "{kept:?}");
    let pttl: i64 = redis_cmd(&redis.url(), &["PTTL", &kept[0]]).await;
    assert!(pttl > 0 && pttl <= 60_000, "{pttl}");

    // Every other replica answers it from there.
    for url in &r.urls[1..] {
        let hit = post_to(url, &key, &body).await;
        assert_eq!(verdict(&hit).as_deref(), Some("hit"), "{url}");
        assert_eq!(hit.headers()["x-tollgate-reused-from"], first_id.as_str());
        assert_eq!(hit.headers()["x-tollgate-cost"], "0");
        assert_eq!(hit.text().await.unwrap(), first_body);
    }
    assert_eq!(upstream_requests(&up).await, 1);

    // A stream is kept there too and replayed as the same events by another replica.
    let streamed = json!({"model": "mock-1", "stream": true, "messages": user("shared stream")});
    let first_events = sse_data(post_to(&r.urls[0], &key, &streamed).await).await;
    // The entry is written in the background after the last byte went out: asking another
    // replica before it lands would be a miss that goes upstream and keeps its own answer.
    for _ in 0..100 {
        let keys: Vec<String> = redis_cmd(&redis.url(), &["KEYS", "tg:cache:v1:*"]).await;
        if keys.len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let resp = post_to(&r.urls[2], &key, &streamed).await;
    assert_eq!(verdict(&resp).as_deref(), Some("hit"));
    assert_eq!(sse_data(resp).await, first_events);
    assert_eq!(upstream_requests(&up).await, 2);

    // Redis hangs: the lookup waits out its deadline once, answers from upstream, and the
    // next request does not ask Redis at all.
    redis.process.signal("STOP");
    for n in 3..=4 {
        let resp = post_to(&r.urls[1], &key, &body).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(verdict(&resp).as_deref(), Some("miss"));
        assert_eq!(resp.text().await.unwrap().len(), first_body.len());
        assert_eq!(upstream_requests(&up).await, n);
    }
    let m = reqwest::get(format!("{}/metrics", r.urls[1]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("tollgate_cache_redis_errors_total 1\n"), "{m}");

    // Back, and past the retry interval: the shared entry answers again.
    redis.process.signal("CONT");
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    let hit = post_to(&r.urls[1], &key, &body).await;
    assert_eq!(verdict(&hit).as_deref(), Some("hit"));
    assert_eq!(hit.text().await.unwrap(), first_body);
    assert_eq!(upstream_requests(&up).await, 4);

    // Whatever else sits under the key is not an answer: a miss, fetched and kept again.
    let _: () = redis_cmd(
        &redis.url(),
        &["SET", &kept[0], "TGC1\u{ff}\u{ff}\u{ff}\u{ff}junk"],
    )
    .await;
    let resp = post_to(&r.urls[0], &key, &body).await;
    assert_eq!(verdict(&resp).as_deref(), Some("miss"));
    assert_eq!(upstream_requests(&up).await, 5);
}
