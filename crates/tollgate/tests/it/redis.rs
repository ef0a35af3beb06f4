//! Limits shared by three real gateway processes through a real `redis-server`, and what
//! happens when Redis hangs or dies.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn start_redis_replicas(redis: &RedisServer, extra: &str) -> Replicas {
    start_replicas(&format!(
        "[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nreplicas = 3\nretry_interval = \"500ms\"\n{extra}\n[loop_guard]\nenabled = false\n",
        redis.url()
    ))
    .await
}

struct Outcome {
    statuses: Vec<u16>,
    kinds: Vec<String>,
    slowest: Duration,
    elapsed: Duration,
}

impl Outcome {
    fn count(&self, status: u16) -> usize {
        self.statuses.iter().filter(|s| **s == status).count()
    }
}

/// `n` chat requests spread round-robin over the replicas, 48 in flight at a time.
async fn spray(r: &Replicas, key: &str, n: usize) -> Outcome {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let results: Vec<(u16, String, Duration)> = futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let url = r.urls[i % r.urls.len()].clone();
            let key = key.to_string();
            async move {
                let t = Instant::now();
                let resp = client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(&key)
                    .json(&json!({"model": "mock", "messages": user(&format!("request {i}"))}))
                    .send()
                    .await
                    .unwrap();
                let status = resp.status().as_u16();
                let v: Value = resp.json().await.unwrap_or(Value::Null);
                let kind = v["error"]["code"].as_str().unwrap_or("").to_string();
                (status, kind, t.elapsed())
            }
        })
        .buffer_unordered(48)
        .collect()
        .await;
    Outcome {
        statuses: results.iter().map(|r| r.0).collect(),
        kinds: results.iter().map(|r| r.1.clone()).collect(),
        slowest: results.iter().map(|r| r.2).max().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_limit_and_follow_the_policy_when_redis_fails() {
    tollgate::server::init_tls();
    let Some(redis) = RedisServer::start().await else {
        return;
    };
    let replicas = start_redis_replicas(
        &redis,
        "[limits.redis.on_error]\nrequests = \"fail_open\"\nconcurrency = \"fail_closed\"",
    )
    .await;

    // Ten times the limit, spread over three processes.
    const LIMIT: usize = 300;
    let key = shared_key(&replicas, json!({"name": "shared", "rpm": LIMIT})).await;
    let out = spray(&replicas, &key, LIMIT * 10).await;
    let admitted = out.count(200);
    // GCRA admits the burst (the limit) plus what the rate refills while the run lasts.
    let refill = (out.elapsed.as_secs_f64() * LIMIT as f64 / 60.0).ceil() as usize;
    assert!(
        admitted * 100 >= LIMIT * 99 && admitted * 100 <= (LIMIT + refill) * 101,
        "admitted {admitted} of {} (limit {LIMIT}, refill {refill} over {:?})",
        out.statuses.len(),
        out.elapsed
    );
    eprintln!(
        "redis: {admitted} of {} admitted across 3 replicas (limit {LIMIT}, refill {refill}) in {:?}",
        out.statuses.len(),
        out.elapsed
    );
    assert_eq!(admitted + out.count(429), LIMIT * 10, "only 200s and 429s");
    assert!(out
        .kinds
        .iter()
        .all(|k| k.is_empty() || k == "rate_limited"));

    // Redis hangs (SIGSTOP): nobody waits much longer than the 200 ms timeout; requests fail
    // open to a third of the limit on each replica, concurrency fails closed.
    redis.process.signal("STOP");
    let open_key = shared_key(&replicas, json!({"name": "open", "rpm": 30})).await;
    let out = spray(&replicas, &open_key, 90).await;
    assert!(
        out.slowest < Duration::from_millis(200 + 800),
        "slowest {:?}",
        out.slowest
    );
    let admitted = out.count(200);
    assert!(
        (27..=33).contains(&admitted),
        "fail_open admits about rpm/replicas on each of 3 replicas: {admitted}"
    );
    let closed_key = shared_key(&replicas, json!({"name": "closed", "concurrency": 8})).await;
    let out = spray(&replicas, &closed_key, 12).await;
    assert_eq!(out.count(503), 12, "{:?}", out.statuses);
    assert!(out.kinds.iter().all(|k| k == "limiter_unavailable"));
    assert!(out.slowest < Duration::from_millis(200 + 800));

    // Redis dies (SIGKILL): the same policies, answered at once.
    redis.process.signal("CONT");
    redis.process.signal("KILL");
    let out = spray(&replicas, &closed_key, 12).await;
    assert_eq!(out.count(503), 12, "{:?}", out.statuses);
    assert!(out.slowest < Duration::from_millis(200 + 800));
    let fresh = shared_key(&replicas, json!({"name": "fresh", "rpm": 60})).await;
    let out = spray(&replicas, &fresh, 120).await;
    let admitted = out.count(200);
    assert!((57..=63).contains(&admitted), "{admitted}");

    // The operator can see it happened.
    let metrics = reqwest::get(format!("{}/metrics", replicas.urls[0]))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("tollgate_limiter_fallbacks_total{policy=\"fail_open\"}"));
    assert!(metrics.contains("tollgate_limiter_fallbacks_total{policy=\"fail_closed\"}"));
    assert!(!metrics.contains("tollgate_limiter_redis_errors_total 0\n"));
}
