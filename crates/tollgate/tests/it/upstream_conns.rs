//! The upstream client's connections (`h1client`): reused across requests and streams, and
//! replaced when the provider closes one, without a failed request or a request sent twice.
//! A relay between the gateway and the mock counts the connections and closes them on cue.

use crate::harness::*;
use serde_json::json;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

struct Relay {
    url: String,
    accepted: Arc<AtomicUsize>,
    /// Connections accepted before this many are closed on the next byte the gateway
    /// sends (a server closing an idle connection as a request arrives); bumped by `poison`.
    poisoned_below: Arc<AtomicUsize>,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Relay {
    async fn start(upstream: &str) -> Relay {
        let target = upstream
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .to_string();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", l.local_addr().unwrap());
        let accepted = Arc::new(AtomicUsize::new(0));
        let poisoned_below = Arc::new(AtomicUsize::new(0));
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Default::default();
        let (acc, poison, t) = (accepted.clone(), poisoned_below.clone(), tasks.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = l.accept().await {
                let n = acc.fetch_add(1, Ordering::SeqCst);
                let poison = poison.clone();
                let target = target.clone();
                let task = tokio::spawn(async move {
                    let mut outbound = TcpStream::connect(&target).await.unwrap();
                    let (mut ir, mut iw) = inbound.split();
                    let (mut or, mut ow) = outbound.split();
                    let (mut a, mut b) = ([0u8; 16384], [0u8; 16384]);
                    loop {
                        tokio::select! {
                            r = ir.read(&mut a) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(k) => {
                                    if n < poison.load(Ordering::SeqCst) {
                                        return;
                                    }
                                    if ow.write_all(&a[..k]).await.is_err() { return; }
                                }
                            },
                            r = or.read(&mut b) => match r {
                                Ok(0) | Err(_) => return,
                                Ok(k) => if iw.write_all(&b[..k]).await.is_err() { return; },
                            },
                        }
                    }
                });
                t.lock().unwrap().push(task);
            }
        });
        Relay {
            url,
            accepted,
            poisoned_below,
            tasks,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Every connection open now closes on the gateway's next byte.
    fn poison(&self) {
        self.poisoned_below.store(self.accepted(), Ordering::SeqCst);
    }

    /// Closes every connection now.
    fn close_all(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }
}

fn config(base_url: &str) -> String {
    format!(
        r#"
        [[providers]]
        name = "local"
        kind = "openai"
        base_url = "{base_url}"
        [[models]]
        name = "m"
        deployments = [{{ provider = "local", model = "mock" }}]
        "#
    )
}

async fn ask(gw: &TestGateway, key: &str, i: usize, stream: bool) -> String {
    let resp = gw
        .chat(
            key,
            json!({"model": "m", "stream": stream, "messages": user(&format!("question {i}"))}),
        )
        .await;
    assert_eq!(resp.status(), 200, "request {i}");
    let text = resp.text().await.unwrap();
    assert!(
        if stream {
            text.trim_end().ends_with("data: [DONE]")
        } else {
            text.contains("\"choices\"")
        },
        "request {i}: {text}"
    );
    text
}

#[tokio::test]
async fn upstream_connections_are_reused_and_replaced_when_the_provider_closes_them() {
    let mock = spawn_mock(None).await;
    let relay = Relay::start(&mock).await;
    let gw = TestGateway::start(&config(&relay.url)).await;
    let key = gw.key().await;
    let mut n = 0;
    // One after another, JSON and streams alike: one connection carries them all.
    for stream in [false, true, false, true] {
        for _ in 0..5 {
            ask(&gw, &key, n, stream).await;
            n += 1;
        }
    }
    assert_eq!(
        relay.accepted(),
        1,
        "sequential requests share a connection"
    );

    // The provider closes the idle connection: the next request opens a new one.
    relay.close_all();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    ask(&gw, &key, n, false).await;
    n += 1;
    assert_eq!(relay.accepted(), 2);

    // The provider closes it as the request arrives (the request never reaches it): the
    // gateway sends it again on a new connection, and the provider sees it once.
    let before = mock_stats(&mock).await["requests"].as_u64().unwrap();
    for stream in [false, true] {
        relay.poison();
        ask(&gw, &key, n, stream).await;
        n += 1;
    }
    let after = mock_stats(&mock).await["requests"].as_u64().unwrap();
    assert_eq!(after - before, 2, "each request reached the provider once");
    assert_eq!(relay.accepted(), 4);

    // Concurrent requests each take a connection; they are pooled again afterwards.
    let base = relay.accepted();
    let asks = (0..8).map(|i| ask(&gw, &key, 1000 + i, i % 2 == 0));
    futures_util::future::join_all(asks).await;
    let opened = relay.accepted() - base;
    assert!(
        (1..=8).contains(&opened),
        "{opened} connections for 8 requests"
    );
    let base = relay.accepted();
    let asks = (0..8).map(|i| ask(&gw, &key, 2000 + i, i % 2 == 1));
    futures_util::future::join_all(asks).await;
    // 1 + `opened` are idle now; only requests beyond them need a new one.
    assert!(
        relay.accepted() - base <= 8usize.saturating_sub(1 + opened),
        "pooled connections were reused: {} more after {opened}",
        relay.accepted() - base
    );
    let records = gw.wait_records(n + 16).await;
    assert!(records.iter().all(|r| r.status == 200 && r.attempts == 1));
}
