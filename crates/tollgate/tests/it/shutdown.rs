//! SIGTERM under load, against the real binary.

use crate::harness::*;
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_loses_no_usage_record() {
    tollgate::server::init_tls();
    let dir = TempDir::new("shutdown");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut child = spawn_gateway(
        &[
            "serve",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--data-dir",
            dir.path().to_str().unwrap(),
        ],
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let r = client
        .post(format!("{url}/admin/keys"))
        .bearer_auth(ADMIN_KEY)
        .json(&json!({"name": "load"}))
        .send()
        .await
        .unwrap();
    let key: String = r.json::<serde_json::Value>().await.unwrap()["secret"]
        .as_str()
        .unwrap()
        .to_string();

    // 1 000 requests launched over about half a second, each taking 200 ms (JSON) or 800 ms
    // (stream) upstream; SIGTERM lands while many are in flight and more are arriving.
    let key = Arc::new(key);
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let client = client.clone();
        let key = key.clone();
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_micros(u64::from(i) * 500)).await;
            let stream = i % 4 == 0;
            let resp = client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(key.as_str())
                .json(&json!({"model": "mock-slow", "stream": stream, "messages": [{"role": "user", "content": format!("request {i}")}]}))
                .send()
                .await;
            match resp {
                Ok(r) if r.status() == 200 => {
                    let id = r.headers()["x-request-id"].to_str().unwrap().to_string();
                    let body = r.text().await.unwrap_or_default();
                    Some((id, stream, body))
                }
                _ => None,
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(250)).await;
    child.signal("TERM");

    let mut ok_ids = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await.unwrap() {
            Some((id, stream, body)) => {
                if stream {
                    assert!(
                        body.trim_end().ends_with("data: [DONE]"),
                        "a stream in flight at SIGTERM must finish: {body}"
                    );
                }
                ok_ids.push(id);
            }
            None => failed += 1,
        }
    }
    let mut proc = child.0.take().unwrap();
    let status = tokio::task::spawn_blocking(move || proc.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "gateway exit status {status}");
    eprintln!(
        "shutdown test: {} answered 200, {failed} refused after SIGTERM",
        ok_ids.len()
    );
    assert!(!ok_ids.is_empty());

    let store = tollgate::store::Store::open(dir.path()).unwrap();
    let records = store.usage_records(0, None, 1_000_000).unwrap();
    let mut recorded: Vec<String> = records
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.id.clone())
        .collect();
    recorded.sort();
    ok_ids.sort();
    assert_eq!(recorded.len(), ok_ids.len());
    assert_eq!(recorded, ok_ids);
    assert!(records
        .iter()
        .filter(|r| r.status == 200)
        .all(|r| r.usage_source == "provider" && r.output_tokens == 16));
}

#[tokio::test]
async fn shutdown_lets_an_in_flight_stream_finish_and_records_it() {
    let gw = TestGateway::start("").await;
    let key = gw.key().await;
    let mut resp = gw.chat(&key, json!({"model": "mock-slow", "stream": true, "messages": [{"role": "user", "content": "hi"}]})).await;
    let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    let reader = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Some(c) = resp.chunk().await.unwrap() {
            rest.extend_from_slice(&c);
        }
        String::from_utf8(rest).unwrap()
    });
    // Shut down while the stream still has most of its 800 ms to go.
    let url = gw.url.clone();
    let dir = gw.stop().await;
    let rest = reader.await.unwrap();
    assert!(rest.trim_end().ends_with("data: [DONE]"), "{rest}");
    assert!(
        reqwest::get(format!("{url}/healthz")).await.is_err(),
        "the listener is closed"
    );
    let store = tollgate::store::Store::open(dir.path()).unwrap();
    let recs = store.usage_records(0, Some(&id), 10).unwrap();
    assert_eq!(recs.len(), 1);
    assert_eq!((recs[0].status, recs[0].output_tokens), (200, 16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_config_file_in_the_real_binary() {
    tollgate::server::init_tls();
    let dir = TempDir::new("sighup");
    let port = free_port();
    let cfg_path = dir.path().join("tollgate.toml");
    let base = format!(
        "[server]\nlisten = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\n[[providers]]\nname = \"mock\"\nkind = \"mock\"\nmodels = [\"mock*\"]\n",
        dir.path().join("data").display()
    );
    std::fs::write(&cfg_path, &base).unwrap();
    let child = spawn_gateway(
        &["serve", "--config", cfg_path.to_str().unwrap()],
        &format!("127.0.0.1:{port}"),
    )
    .await;
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let chat = |model: &'static str| {
        let client = client.clone();
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(ADMIN_KEY)
                .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(chat("fast").await, 404);
    std::fs::write(&cfg_path, format!("{base}[[models]]\nname = \"fast\"\ndeployments = [{{ provider = \"mock\", model = \"mock\" }}]\n")).unwrap();
    child.signal("HUP");
    let mut status = 0;
    for _ in 0..100 {
        status = chat("fast").await;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        status, 200,
        "the alias added to the file is served after SIGHUP"
    );
}
