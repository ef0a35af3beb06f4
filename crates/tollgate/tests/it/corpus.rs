//! A hostile-input corpus against the real binary: a few hundred malformed, truncated,
//! mistyped, huge, deep, non-UTF-8 and oddly addressed requests across every endpoint. For
//! client input the gateway must never answer 5xx, must answer errors in the caller's
//! dialect, must stay up without a panic, must meter every authenticated model request
//! exactly once, and must give back the memory the big bodies took.

use crate::harness::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MODEL_PATHS: &[&str] = &[
    "/v1/chat/completions",
    "/v1/messages",
    "/v1/responses",
    "/v1/embeddings",
    "/v1/messages/count_tokens",
];

#[derive(Clone, Copy, PartialEq)]
enum Auth {
    Agent,
    Admin,
    Nobody,
    Garbage,
}

struct Case {
    name: String,
    method: reqwest::Method,
    path: String,
    auth: Auth,
    headers: Vec<(&'static str, Vec<u8>)>,
    body: Option<Vec<u8>>,
}

fn case(
    name: impl Into<String>,
    method: reqwest::Method,
    path: &str,
    body: Option<Vec<u8>>,
) -> Case {
    Case {
        name: name.into(),
        method,
        path: path.to_string(),
        auth: Auth::Agent,
        headers: Vec::new(),
        body,
    }
}

/// Bodies a model endpoint must refuse cleanly (or serve), whatever its dialect.
fn hostile_bodies() -> Vec<(String, Vec<u8>)> {
    let msg = |content: Value| json!({"model": "mock", "max_tokens": 8, "messages": [{"role": "user", "content": content}]});
    let with = |field: &str, v: Value| {
        let mut b = msg(json!("hi"));
        b[field] = v;
        b
    };
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), vec![]),
        ("null".into(), b"null".to_vec()),
        ("array".into(), b"[]".to_vec()),
        ("string".into(), b"\"hello\"".to_vec()),
        ("number".into(), b"42".to_vec()),
        ("open brace".into(), b"{".to_vec()),
        (
            "truncated".into(),
            br#"{"model":"mock","messages":[{"role":"user","content":"hi"#.to_vec(),
        ),
        (
            "trailing garbage".into(),
            br#"{"model":"mock","messages":[]} xyz"#.to_vec(),
        ),
        (
            "bom".into(),
            b"\xEF\xBB\xBF{\"model\":\"mock\",\"messages\":[]}".to_vec(),
        ),
        (
            "invalid utf8".into(),
            b"{\"model\":\"mock\",\"messages\":[{\"role\":\"user\",\"content\":\"\xFF\xFE\"}]}"
                .to_vec(),
        ),
        ("nul bytes".into(), b"{\"model\":\"mo\x00ck\"}".to_vec()),
        ("deep arrays".into(), {
            let mut v = b"{\"model\":\"mock\",\"messages\":".to_vec();
            v.extend(std::iter::repeat_n(b'[', 100_000));
            v
        }),
        ("deep objects".into(), {
            let mut v = b"{\"model\":\"mock\",\"metadata\":".to_vec();
            for _ in 0..50_000 {
                v.extend_from_slice(b"{\"a\":");
            }
            v
        }),
        (
            "duplicate model".into(),
            br#"{"model":"mock","model":"other","messages":[{"role":"user","content":"x"}]}"#
                .to_vec(),
        ),
    ];
    let typed: Vec<(&str, Value)> = vec![
        ("model number", json!({"model": 1, "messages": []})),
        ("model null", json!({"model": null, "messages": []})),
        ("model object", json!({"model": {"a": 1}, "messages": []})),
        ("model empty", json!({"model": "", "messages": []})),
        (
            "model huge",
            json!({"model": "m".repeat(100_000), "messages": []}),
        ),
        (
            "model control chars",
            json!({"model": "mock\n\r\t\u{1b}[31m", "messages": []}),
        ),
        (
            "model unknown",
            json!({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}),
        ),
        ("no messages", json!({"model": "mock"})),
        (
            "messages string",
            json!({"model": "mock", "messages": "hi"}),
        ),
        (
            "messages object",
            json!({"model": "mock", "messages": {"role": "user"}}),
        ),
        (
            "messages numbers",
            json!({"model": "mock", "messages": [1, 2, 3]}),
        ),
        ("content number", msg(json!(12345))),
        ("content null", msg(Value::Null)),
        (
            "content nested",
            msg(json!([{"type": "text", "text": {"deep": [1, 2]}}])),
        ),
        ("content huge", msg(json!("word ".repeat(400_000)))),
        ("content one huge word", msg(json!("z".repeat(1_500_000)))),
        ("max_tokens negative", with("max_tokens", json!(-1))),
        ("max_tokens float", with("max_tokens", json!(1.5))),
        ("max_tokens string", with("max_tokens", json!("10"))),
        ("max_tokens 1e300", with("max_tokens", json!(1e300))),
        ("max_tokens u64 max", with("max_tokens", json!(u64::MAX))),
        (
            "max_tokens 2^63",
            with("max_tokens", json!(9_223_372_036_854_775_808u64)),
        ),
        ("max_tokens zero", with("max_tokens", json!(0))),
        (
            "max_completion_tokens huge",
            with("max_completion_tokens", json!(u64::MAX / 7)),
        ),
        (
            "max_output_tokens huge",
            with("max_output_tokens", json!(u64::MAX)),
        ),
        ("stream string", with("stream", json!("yes"))),
        ("stream number", with("stream", json!(1))),
        ("stream true", with("stream", json!(true))),
        ("temperature huge", with("temperature", json!(1e308))),
        ("n huge", with("n", json!(u64::MAX))),
        (
            "tools garbage",
            with("tools", json!([{"type": "function"}, 7, null])),
        ),
        (
            "tools huge",
            with(
                "tools",
                json!(vec![
                    json!({"type": "function", "function": {"name": "f"}});
                    5000
                ]),
            ),
        ),
        (
            "metadata huge",
            with(
                "metadata",
                json!((0..2000)
                    .map(|i| (format!("k{i}"), json!("v".repeat(300))))
                    .collect::<serde_json::Map<_, _>>()),
            ),
        ),
        ("metadata wrong", with("metadata", json!([1, 2]))),
        ("input number", json!({"model": "mock", "input": 5})),
        (
            "input huge array",
            json!({"model": "mock-embed", "input": vec!["x"; 100_000]}),
        ),
        (
            "input nested",
            json!({"model": "mock", "input": [[[[["deep"]]]]]}),
        ),
        (
            "system weird",
            with("system", json!({"x": [1, {"y": null}]})),
        ),
        ("stream_options wrong", with("stream_options", json!("all"))),
    ];
    for (name, v) in typed {
        out.push((name.to_string(), serde_json::to_vec(&v).unwrap()));
    }
    out
}

fn corpus(wallet: &str) -> Vec<Case> {
    use reqwest::Method as M;
    let mut cases = Vec::new();
    for path in MODEL_PATHS {
        for (name, body) in hostile_bodies() {
            cases.push(case(format!("{path} {name}"), M::POST, path, Some(body)));
        }
        for m in [M::GET, M::PUT, M::DELETE, M::PATCH] {
            cases.push(case(format!("{m} {path}"), m, path, None));
        }
        let ok = serde_json::to_vec(&json!({"model": "mock", "max_tokens": 8, "input": "x", "messages": [{"role": "user", "content": "hi"}]})).unwrap();
        for (h, v) in [
            ("x-tollgate-tags", b"no-equals-sign".to_vec()),
            ("x-tollgate-tags", "k=v,".repeat(500).into_bytes()),
            ("x-tollgate-tags", b"k=\xFF\xFE".to_vec()),
            ("x-tollgate-max-cost", b"-1".to_vec()),
            ("x-tollgate-max-cost", b"abc".to_vec()),
            ("x-tollgate-max-cost", b"99999999999999999999999".to_vec()),
            ("x-tollgate-run", "r".repeat(10_000).into_bytes()),
            ("x-tollgate-run", b"\xC3\x28".to_vec()),
            ("x-tollgate-run-budget", b"cost=1e99".to_vec()),
            (
                "x-tollgate-run-budget",
                b"tokens=99999999999999999999".to_vec(),
            ),
            ("x-tollgate-run-budget", b"calls=-5,cost=abc".to_vec()),
            ("idempotency-key", "i".repeat(8_000).into_bytes()),
            ("content-type", b"text/plain".to_vec()),
            ("anthropic-version", b"\x01\x02".to_vec()),
        ] {
            let mut c = case(
                format!("{path} header {h}"),
                M::POST,
                path,
                Some(ok.clone()),
            );
            if h == "x-tollgate-run-budget" {
                c.headers.push(("x-tollgate-run", b"corpus-run".to_vec()));
            }
            c.headers.push((h, v));
            cases.push(c);
        }
        for auth in [Auth::Nobody, Auth::Garbage] {
            let mut c = case(
                format!("{path} unauthenticated"),
                M::POST,
                path,
                Some(ok.clone()),
            );
            c.auth = auth;
            cases.push(c);
        }
    }
    let admin = |name: &str, m: M, path: &str, body: Option<Vec<u8>>| Case {
        auth: Auth::Admin,
        ..case(name, m, path, body)
    };
    for (name, body) in [
        ("keys array", br#"["x"]"#.to_vec()),
        ("keys string", br#""x""#.to_vec()),
        ("keys null", b"null".to_vec()),
        ("keys name number", br#"{"name":5}"#.to_vec()),
        (
            "keys name huge",
            serde_json::to_vec(&json!({"name": "n".repeat(10_000)})).unwrap(),
        ),
        ("keys unknown field", br#"{"name":"a","bogus":1}"#.to_vec()),
        ("keys rpm negative", br#"{"name":"a","rpm":-1}"#.to_vec()),
        ("keys rpm huge", br#"{"name":"a","rpm":1e400}"#.to_vec()),
        (
            "keys expires nonsense",
            br#"{"name":"a","expires":"yesterday"}"#.to_vec(),
        ),
        (
            "keys expires huge",
            br#"{"name":"a","expires":"99999999999999d"}"#.to_vec(),
        ),
        ("keys 3 MB", vec![b' '; 3 << 20]),
        ("keys invalid utf8", b"{\"name\":\"\xFF\"}".to_vec()),
    ] {
        cases.push(admin(name, M::POST, "/admin/keys", Some(body)));
    }
    for amount in [
        "9223372036854.775807",
        "-5",
        "0",
        "1e3",
        "0.0000001",
        "abc",
        "99999999999999999999999999",
        "",
        "$",
        "1.2.3",
    ] {
        cases.push(admin(
            &format!("topup {amount}"),
            M::POST,
            &format!("/admin/wallets/{wallet}/topup"),
            Some(
                serde_json::to_vec(
                    &json!({"amount": amount, "idempotency_key": format!("c-{amount}")}),
                )
                .unwrap(),
            ),
        ));
    }
    for body in [
        json!({"amount": 5}),
        json!({"amount": "1", "idempotency_key": 7}),
        json!({"amount": "1"}),
        json!([]),
    ] {
        cases.push(admin(
            "topup typed",
            M::POST,
            &format!("/admin/wallets/{wallet}/topup"),
            Some(serde_json::to_vec(&body).unwrap()),
        ));
    }
    for body in [
        json!({"scope": "key:nope", "period": "daily", "hard": "1"}),
        json!({"scope": "team:t", "period": "hourly", "hard": "1"}),
        json!({"scope": "team:t", "period": "daily", "hard": "9223372036854.775807"}),
        json!({"scope": "weird", "period": "daily"}),
        json!({"scope": 1}),
    ] {
        cases.push(admin(
            "budget",
            M::PUT,
            "/admin/budgets",
            Some(serde_json::to_vec(&body).unwrap()),
        ));
    }
    for path in [
        "/admin/usage?by=nonsense",
        "/admin/usage?by=team&since=99999999999999999d",
        "/admin/usage?by=team&since=-1h",
        "/admin/usage/records?limit=abc",
        "/admin/usage/records?limit=-5",
        "/admin/usage/records?limit=99999999999999999999",
        "/admin/usage/records?since=%FF",
        "/admin/wallets/nope",
        "/admin/wallets/%FF%FE",
        "/admin/wallets/x/ledger?limit=abc",
        "/admin/runs/%00",
        "/admin/keys/nope/rotate",
        "/admin/nope",
    ] {
        let m = if path.ends_with("rotate") {
            M::POST
        } else {
            M::GET
        };
        cases.push(admin(path, m, path, None));
    }
    for path in [
        "/v1/quote?endpoint=chat&endpoint=messages",
        "/v1/quote?endpoint=%FF",
        "/v1/quote?endpoint=nope",
        "/v1/models?x=%ZZ",
        "/v1/models/..%2F..%2Fadmin",
        "/v1/nope",
        "/nope",
        &format!("/v1/{}", "a".repeat(6000)),
        "/v1/chat/completions?a=1&a=2&a=3",
    ] {
        let m = if path.starts_with("/v1/quote") || path.starts_with("/v1/chat") {
            M::POST
        } else {
            M::GET
        };
        cases.push(case(path, m, path, Some(b"{\"model\":\"mock\"}".to_vec())));
    }
    cases
}

/// `GET` an admin path of the gateway under test, as JSON.
async fn admin_get(client: &reqwest::Client, url: &str, path: &str) -> Value {
    client
        .get(format!("{url}{path}"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        .unwrap_or(0)
}

fn dialect_ok(path: &str, v: &Value) -> bool {
    if path == "/v1/messages"
        || path.starts_with("/v1/messages/")
        || path.starts_with("/v1/messages?")
    {
        v["type"] == "error" && v["error"]["type"].is_string() && v["error"]["message"].is_string()
    } else {
        v["error"]["message"].is_string() && v["error"]["type"].is_string()
    }
}

/// Raw requests no client library would send: each must get an answer or a close, never a
/// hang, and leave the gateway up.
async fn raw_cases(addr: &str) -> usize {
    let raws: Vec<Vec<u8>> = vec![
        b"GARBAGE\r\n\r\n".to_vec(),
        b"GET / HTTP/9.9\r\n\r\n".to_vec(),
        b"GET /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n".to_vec(),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n".to_vec(),
        b"GET /v1/../admin/keys HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /v1/models%00 HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        b"GET /admin/wallets/\xFF\xFE HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        [b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec(), vec![b'a'; 200_000], b"\r\n\r\n".to_vec()].concat(),
        [b"GET /healthz HTTP/1.1\r\n".to_vec(), (0..500).flat_map(|i| format!("X-H{i}: v\r\n").into_bytes()).collect(), b"\r\n".to_vec()].concat(),
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xFF\xFF\r\n\r\n".to_vec(),
    ];
    let n = raws.len();
    for raw in raws {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = s.write_all(&raw).await;
        let mut buf = vec![0u8; 65536];
        let r = tokio::time::timeout(Duration::from_secs(15), s.read(&mut buf)).await;
        assert!(
            r.is_ok(),
            "a raw request hung: {:?}",
            String::from_utf8_lossy(&raw[..raw.len().min(80)])
        );
        if let Ok(Ok(n)) = r {
            let head = String::from_utf8_lossy(&buf[..n]);
            assert!(!head.starts_with("HTTP/1.1 5"), "{head}");
        }
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_corpus_gets_clean_refusals_and_leaves_the_gateway_whole() {
    tollgate::server::init_tls();
    let dir = TempDir::new("corpus");
    let log = dir.path().join("stderr.log");
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(
        &cfg,
        "[server]\nmax_body_bytes = 4000000\n[[prices]]\nmodel = \"mock*\"\ninput = 1000000\noutput = 2000000\n",
    )
    .unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "serve",
            "--config",
            cfg.to_str().unwrap(),
            "--data-dir",
            dir.path().join("data").to_str().unwrap(),
            "--listen",
            &listen,
        ])
        .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = KillOnDrop(Some(child));
    let url = format!("http://{listen}");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut up = false;
    for _ in 0..400 {
        if client.get(format!("{url}/healthz")).send().await.is_ok() {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        up,
        "gateway did not start: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let admin_post = |path: &str, body: Value| {
        client
            .post(format!("{url}{path}"))
            .bearer_auth(ADMIN_KEY)
            .json(&body)
            .send()
    };
    let created: Value = admin_post("/admin/keys", json!({"name": "hostile", "team": "red"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = created["secret"].as_str().unwrap().to_string();
    let key_id = created["key"]["id"].as_str().unwrap().to_string();
    let w: Value = admin_post("/admin/wallets", json!({"owner": format!("key:{key_id}")}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let wallet = w["id"].as_str().unwrap().to_string();
    let r = admin_post(
        &format!("/admin/wallets/{wallet}/topup"),
        json!({"amount": "5.00", "idempotency_key": "seed"}),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);

    // Warm up, then measure.
    for i in 0..20 {
        let r = client
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(&key)
            .json(
                &json!({"model": "mock", "max_tokens": 8, "messages": user(&format!("warm {i}"))}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let mut metered: HashMap<String, String> = HashMap::new();
    let mut warm_ids = 0;
    warm_ids += 20;
    let rss_before = rss_kb(child.pid());

    // CORPUS_FILTER=a|b runs the cases whose names contain a or b, CORPUS_ROUNDS=n runs them
    // n times: for finding which input holds memory, and whether it plateaus.
    let filt = std::env::var("CORPUS_FILTER").unwrap_or_default();
    let cases: Vec<Case> = corpus(&wallet)
        .into_iter()
        .filter(|c| filt.is_empty() || filt.split('|').any(|f| c.name.contains(f)))
        .collect();
    let total = cases.len();
    assert!(
        total >= 300 || !filt.is_empty(),
        "the corpus has {total} cases"
    );
    let mut failures = Vec::new();
    let rounds: usize = std::env::var("CORPUS_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    for round in 0..rounds {
        if round > 0 {
            eprintln!("round {round}: RSS {} kB", rss_kb(child.pid()));
        }
        for c in &cases {
            let mut rb = client.request(c.method.clone(), format!("{url}{}", c.path));
            rb = match c.auth {
                Auth::Agent => rb.bearer_auth(&key),
                Auth::Admin => rb.bearer_auth(ADMIN_KEY),
                Auth::Nobody => rb,
                Auth::Garbage => rb.header("authorization", "Bearer tg_definitely_not_a_key"),
            };
            if !c.headers.iter().any(|(h, _)| *h == "content-type") {
                rb = rb.header("content-type", "application/json");
            }
            for (h, v) in &c.headers {
                match reqwest::header::HeaderValue::from_bytes(v) {
                    Ok(v) => rb = rb.header(*h, v),
                    Err(_) => continue,
                }
            }
            if let Some(b) = &c.body {
                rb = rb.body(b.clone());
            }
            let resp = match rb.send().await {
                Ok(r) => r,
                Err(e) => {
                    failures.push(format!("{}: no answer: {e}", c.name));
                    continue;
                }
            };
            let status = resp.status().as_u16();
            let path = c.path.split('?').next().unwrap_or("").to_string();
            if c.auth == Auth::Agent
                && MODEL_PATHS.contains(&path.as_str())
                && c.method == reqwest::Method::POST
            {
                if let Some(id) = resp
                    .headers()
                    .get("x-request-id")
                    .and_then(|v| v.to_str().ok())
                {
                    metered.insert(id.to_string(), c.name.clone());
                } else {
                    failures.push(format!("{}: no x-request-id", c.name));
                }
            }
            let body = resp.bytes().await.unwrap_or_default();
            if status >= 500 {
                failures.push(format!(
                    "{}: {status} {}",
                    c.name,
                    String::from_utf8_lossy(&body[..body.len().min(300)])
                ));
                continue;
            }
            if status >= 400 {
                match serde_json::from_slice::<Value>(&body) {
                    Ok(v) if dialect_ok(&c.path, &v) => {}
                    _ => failures.push(format!(
                        "{}: {status} not in the {} dialect: {}",
                        c.name,
                        if c.path.starts_with("/v1/messages") {
                            "Anthropic"
                        } else {
                            "OpenAI"
                        },
                        String::from_utf8_lossy(&body[..body.len().min(300)])
                    )),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );

    // Concurrent spenders with huge caps: nothing overdraws.
    let statuses: Vec<u16> = futures_util::stream::iter(0..40)
        .map(|i| {
            let (client, url, key) = (&client, &url, &key);
            async move {
                let max = if i % 2 == 0 { json!(1_000_000) } else { json!(u64::MAX - i) };
                client
                    .post(format!("{url}/v1/chat/completions"))
                    .bearer_auth(key)
                    .json(&json!({"model": "mock-slow", "stream": true, "max_tokens": max, "messages": user(&format!("spend {i}"))}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            }
        })
        .buffer_unordered(40)
        .collect()
        .await;
    assert!(
        statuses.iter().all(|s| *s == 400 || *s == 402 || *s == 200),
        "{statuses:?}"
    );

    let n_raw = raw_cases(&listen).await;
    let r = client.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "alive after {total} cases and {n_raw} raw ones"
    );

    // Metered exactly once: every authenticated model request has one record.
    let expected = metered.len() + warm_ids + statuses.len();
    let mut records: Vec<Value> = Vec::new();
    for _ in 0..100 {
        records = serde_json::from_value(
            admin_get(&client, &url, "/admin/usage/records?limit=100000").await,
        )
        .unwrap();
        if records.len() >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &records {
        *count
            .entry(r["id"].as_str().unwrap_or("").to_string())
            .or_default() += 1;
    }
    for (id, name) in &metered {
        assert_eq!(
            count.get(id),
            Some(&1),
            "{name} ({id}) metered {:?} times",
            count.get(id)
        );
    }
    assert_eq!(
        records.len(),
        expected,
        "one record per authenticated model request"
    );
    let verify = admin_get(&client, &url, "/admin/wallets/verify").await;
    assert_eq!(verify["ok"], true, "{verify}");
    let w = admin_get(&client, &url, &format!("/admin/wallets/{wallet}")).await;
    assert!(w["balance_micros"].as_i64().unwrap() >= 0, "{w}");

    let metrics = client
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("tollgate_panics_total 0\n"),
        "panics counted"
    );
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !log_text.contains("panic"),
        "a panic in the log:\n{log_text}"
    );

    // Memory: the big bodies are given back (glibc keeps some; a leak would keep it all).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kb(child.pid());
    eprintln!("corpus: {total} cases + {n_raw} raw, RSS {rss_before} kB -> {rss_after} kB");
    assert!(
        rss_after < rss_before + 64 * 1024,
        "RSS grew from {rss_before} kB to {rss_after} kB"
    );
}
