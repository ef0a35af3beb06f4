//! Provider prompt caches: Anthropic breakpoints only above the model's minimum and only
//! while the key reuses its prefixes, byte-stable prefixes across turns, OpenAI's
//! `prompt_cache_key`, a conversation kept on the deployment that holds its cache, and the
//! provider's cached tokens recorded as a saving.

use crate::harness::*;
use serde_json::{json, Value};

fn config(up: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n\
         [[providers]]\nname = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{up}\"\nmodels = [\"claude*\"]\n\
         [prompt_cache]\nenabled = true\ncache_key_providers = [\"up\"]\n{extra}"
    )
}

/// What the provider was sent (the mock's `echoreq` answers with the request's body).
async fn sent_messages(
    gw: &TestGateway,
    key: &str,
    body: Value,
) -> (Value, reqwest::header::HeaderMap) {
    let r = post_api(gw, key, "/v1/messages", body).await;
    assert_eq!(r.status(), 200);
    let headers = r.headers().clone();
    let answer: Value = r.json().await.unwrap();
    let text = answer["content"][0]["text"].as_str().unwrap();
    (serde_json::from_str(text).unwrap(), headers)
}

fn conversation(turns: usize) -> Vec<Value> {
    (0..turns)
        .map(|i| {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            json!({"role": role, "content": format!("turn {i} of the conversation")})
        })
        .collect()
}

fn strip_breakpoints(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.remove("cache_control");
            m.values_mut().for_each(strip_breakpoints);
        }
        Value::Array(a) => a.iter_mut().for_each(strip_breakpoints),
        _ => {}
    }
}

#[tokio::test]
async fn anthropic_breakpoints_go_above_the_minimum_and_keep_the_prefix_stable() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let key = gw.key().await;
    let system = "You are the billing agent. Follow the policy below exactly.\n".repeat(120); // ~7 KB
    let body = |model: &str, turns: usize| {
        json!({"model": model, "max_tokens": 64, "system": system,
               "messages": conversation(turns)})
    };

    let (sent, headers) = sent_messages(&gw, &key, body("claude-echoreq", 3)).await;
    assert_eq!(headers["x-tollgate-cache-breakpoints"], "system,turn");
    assert_eq!(sent["system"][0]["text"], system.as_str());
    assert_eq!(sent["system"][0]["cache_control"]["type"], "ephemeral");
    assert_eq!(
        sent["messages"][1]["content"][0]["cache_control"]["type"],
        "ephemeral"
    );
    assert!(
        sent["messages"][2]["content"][0]
            .get("cache_control")
            .is_none(),
        "the newest turn has no breakpoint"
    );

    // The next turn: the prefix the provider saw before is the same, breakpoints aside.
    let (next, _) = sent_messages(&gw, &key, body("claude-echoreq", 5)).await;
    assert_eq!(
        next["system"], sent["system"],
        "the cached system prompt did not move"
    );
    let (mut before, mut after) = (sent["messages"].clone(), next["messages"].clone());
    strip_breakpoints(&mut before);
    strip_breakpoints(&mut after);
    let after_prefix: Vec<Value> = after.as_array().unwrap()[..3].to_vec();
    let before_prefix: Vec<Value> = before.as_array().unwrap().to_vec();
    assert_eq!(
        serde_json::to_string(&after_prefix).unwrap(),
        serde_json::to_string(&before_prefix).unwrap(),
        "byte-stable turns"
    );
    assert_eq!(
        next["messages"][3]["content"][0]["cache_control"]["type"],
        "ephemeral"
    );

    // A model whose minimum (4 096) the same ~1 800-token prefix does not reach: nothing.
    let (sent, headers) = sent_messages(&gw, &key, body("claude-haiku-4-5-echoreq", 3)).await;
    assert!(!headers.contains_key("x-tollgate-cache-breakpoints"));
    assert!(sent["system"].is_string());
    // A short prompt: nothing either.
    let short = json!({"model": "claude-echoreq", "max_tokens": 64, "system": "Be brief.",
                       "messages": conversation(3)});
    let (sent, _) = sent_messages(&gw, &key, short).await;
    assert!(!sent.to_string().contains("cache_control"));
    // The client's own breakpoints are left as they are.
    let own = json!({"model": "claude-echoreq", "max_tokens": 64,
        "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
        "messages": conversation(3)});
    let (sent, headers) = sent_messages(&gw, &key, own).await;
    assert!(!headers.contains_key("x-tollgate-cache-breakpoints"));
    assert_eq!(sent["system"][0]["cache_control"]["ttl"], "1h");
    assert_eq!(sent.to_string().matches("cache_control").count(), 1);
}

#[tokio::test]
async fn breakpoints_stop_when_a_key_never_reuses_its_prefixes() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let key = gw.key().await;
    let mut placed = Vec::new();
    for i in 0..30 {
        // Every request a new system prompt and a single turn: nothing is ever read back.
        let system = format!("Case {i}. ").repeat(1500);
        let body = json!({"model": "claude-echoreq", "max_tokens": 64, "system": system,
                          "messages": [{"role": "user", "content": format!("question {i}")}]});
        let (_, headers) = sent_messages(&gw, &key, body).await;
        placed.push(headers.contains_key("x-tollgate-cache-breakpoints"));
    }
    assert!(placed[0], "a new key is given the benefit of the doubt");
    assert!(
        !placed[20..].iter().any(|p| *p),
        "writes that are never read cost more than they save: {placed:?}"
    );
}

#[tokio::test]
async fn openai_requests_get_a_stable_prompt_cache_key() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&config(&up, "")).await;
    let key = gw.key().await;
    let other = gw.create_key(json!({"name": "other"})).await.0;
    let seen_key = |k: String, text: &'static str, system: &'static str| {
        let gw = &gw;
        async move {
            let r = gw
                .chat(
                    &k,
                    json!({"model": "mock-echoreq", "messages": [
                    {"role": "system", "content": system}, {"role": "user", "content": text}]}),
                )
                .await;
            let answer: Value = r.json().await.unwrap();
            let sent: Value =
                serde_json::from_str(answer["choices"][0]["message"]["content"].as_str().unwrap())
                    .unwrap();
            sent["prompt_cache_key"].as_str().unwrap().to_string()
        }
    };
    let a = seen_key(key.clone(), "first", "You are terse.").await;
    assert!(a.starts_with("tg-"), "{a}");
    // Same key, same static prefix: the same cache key, whatever the newest turn says.
    let b = seen_key(key.clone(), "second", "You are terse.").await;
    assert_eq!(a, b);
    let c = seen_key(other, "first", "You are terse.").await;
    assert_ne!(a, c, "another key, another cache");
    // A client's own key is kept.
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-echoreq", "prompt_cache_key": "mine",
                           "messages": [{"role": "user", "content": "x"}]}),
        )
        .await;
    let answer: Value = r.json().await.unwrap();
    assert!(answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .contains("\"prompt_cache_key\":\"mine\""));
}

#[tokio::test]
async fn a_conversation_stays_on_the_deployment_that_holds_its_cache() {
    let up = spawn_mock(None).await;
    let cfg = format!(
        "{}[[providers]]\nname = \"up2\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = []\n\
         [[models]]\nname = \"balanced\"\ndeployments = [{{ provider = \"up\", model = \"mock-1\" }}, {{ provider = \"up2\", model = \"mock-1\" }}]\n",
        config(&up, "")
    );
    let gw = TestGateway::start(&cfg).await;
    let key = gw.key().await;
    let mut messages = vec![json!({"role": "user", "content": "start of a long task"})];
    let mut served = Vec::new();
    for turn in 0..10 {
        let r = gw
            .chat(&key, json!({"model": "balanced", "messages": messages}))
            .await;
        assert_eq!(r.status(), 200);
        served.push(gw.record_for(r.headers()).await.provider.unwrap());
        messages.push(json!({"role": "assistant", "content": format!("done step {turn}")}));
        messages.push(json!({"role": "user", "content": format!("now step {}", turn + 1)}));
    }
    assert!(
        served.iter().all(|p| *p == served[0]),
        "every turn on one deployment: {served:?}"
    );
}

#[tokio::test]
async fn the_providers_cached_tokens_are_recorded_as_a_saving() {
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        "[[providers]]\nname = \"up\"\nkind = \"openai\"\nbase_url = \"{up}\"\nmodels = [\"mock*\"]\n\
         [[prices]]\nmodel = \"mock*\"\ninput = 2000000\ncached_input = 200000\noutput = 8000000\n"
    ))
    .await;
    let key = gw.key().await;
    let r = gw
        .chat(
            &key,
            json!({"model": "mock-cached", "messages": user(&"a long shared prefix ".repeat(200))}),
        )
        .await;
    let rec = gw.record_for(r.headers()).await;
    assert!(rec.cached_input_tokens > 0);
    let s = rec
        .savings
        .iter()
        .find(|s| s.saver == "provider_cache")
        .unwrap();
    assert_eq!(s.tokens, rec.cached_input_tokens);
    // $2.00 against $0.20 per million: 1.8 micro-USD a cached token.
    assert_eq!(s.micros, rec.cached_input_tokens * 18 / 10);
    let (_, report) = gw
        .admin(reqwest::Method::GET, "/admin/savings?by=model", None)
        .await;
    assert_eq!(
        report[0]["savers"]["provider_cache"]["tokens"],
        rec.cached_input_tokens
    );
    // The cached-token share per model, next to the counts.
    let out = crate::cli::tollgate_async(&[
        "usage",
        "--by",
        "model",
        "--format",
        "csv",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    let csv = String::from_utf8(out.stdout).unwrap();
    let share = format!(
        ",{},{:.1}%,",
        rec.cached_input_tokens,
        rec.cached_input_tokens as f64 * 100.0 / rec.input_tokens as f64
    );
    assert!(
        csv.lines().nth(1).unwrap().contains(&share),
        "{csv} {share}"
    );
}
