//! Connection hygiene: slow heads, slow bodies, idle keep-alive connections, the connection
//! limit, and shutdown with half-sent requests. Raw TCP, since a well-behaved client cannot
//! misbehave on purpose.

use crate::harness::*;
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(gw: &TestGateway) -> TcpStream {
    TcpStream::connect(gw.url.trim_start_matches("http://"))
        .await
        .unwrap()
}

/// Reads until the gateway closes the connection (or `within` passes: then `None`).
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Option<String> {
    let mut out = Vec::new();
    let read = tokio::time::timeout(within, async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    read.ok()
        .map(|_| String::from_utf8_lossy(&out).into_owned())
}

async fn metrics(gw: &TestGateway) -> String {
    gw.metrics().await
}

#[tokio::test]
async fn slow_heads_idle_connections_and_slow_bodies_are_timed_out() {
    let gw = TestGateway::start(
        "[server]\nheader_read_timeout = \"300ms\"\nidle_timeout = \"600ms\"\nbody_read_timeout = \"300ms\"\n",
    )
    .await;
    let key = gw.key().await;
    // Slowloris: a head that never ends.
    let mut slow = connect(&gw).await;
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-A: ")
        .await
        .unwrap();
    // Silent: connects and sends nothing.
    let mut silent = connect(&gw).await;
    // Idle keep-alive: one request, then nothing.
    let mut idle = connect(&gw).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // A body that stops halfway.
    let mut body = connect(&gw).await;
    body.write_all(
        format!("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"model\":").as_bytes(),
    )
    .await
    .unwrap();

    let slow_out = read_until_closed(&mut slow, Duration::from_secs(5)).await;
    assert_eq!(
        slow_out.as_deref(),
        Some(""),
        "a slow head is closed unanswered"
    );
    let silent_out = read_until_closed(&mut silent, Duration::from_secs(5)).await;
    assert_eq!(silent_out.as_deref(), Some(""));
    let idle_out = read_until_closed(&mut idle, Duration::from_secs(5))
        .await
        .expect("an idle keep-alive connection is closed");
    assert!(idle_out.starts_with("HTTP/1.1 200"), "{idle_out}");
    let body_out = read_until_closed(&mut body, Duration::from_secs(5))
        .await
        .expect("a stalled body is answered and closed");
    assert!(body_out.starts_with("HTTP/1.1 408"), "{body_out}");
    assert!(body_out.contains("request_timeout"), "{body_out}");

    let m = metrics(&gw).await;
    assert!(
        m.contains("tollgate_connection_timeouts_total{reason=\"header\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("tollgate_connection_timeouts_total{reason=\"idle\"}"),
        "{m}"
    );
    // An ordinary request is unaffected.
    let r = gw
        .chat(&key, json!({"model": "mock", "messages": user("hi")}))
        .await;
    assert_eq!(r.status(), 200);
}

/// 1 100 idle connections used to make every ordinary request time out, with nothing logged.
/// At the limit the idle and half-sent ones make room; when every slot is busy, new
/// connections are refused and counted.
#[tokio::test]
async fn at_the_connection_limit_idle_connections_make_room_and_busy_ones_refuse() {
    let gw = TestGateway::start(
        "[server]\nmax_connections = 20\nshutdown_grace = \"1s\"\nheader_read_timeout = \"60s\"\nidle_timeout = \"60s\"\n",
    )
    .await;
    let key = gw.key().await;
    let mut hogs = Vec::new();
    for i in 0..40 {
        let mut s = connect(&gw).await;
        if i % 2 == 0 {
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                .await
                .unwrap();
        }
        hogs.push(s);
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    for i in 0..3 {
        let r = client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&key)
            .json(&json!({"model": "mock", "messages": user(&format!("room {i}"))}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    drop(hogs);
    // Every slot busy with a request in flight (the mock never answers `stall`).
    let mut busy = Vec::new();
    for i in 0..20 {
        let mut s = connect(&gw).await;
        let body = format!(
            r#"{{"model":"mock-stall","messages":[{{"role":"user","content":"busy {i}"}}]}}"#
        );
        s.write_all(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        busy.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut late = connect(&gw).await;
    let _ = late
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let out = read_until_closed(&mut late, Duration::from_secs(5))
        .await
        .expect("refused, not left hanging");
    assert_eq!(out, "", "a connection over the limit is closed unserved");
    drop(busy);
    // Busy connections dropped by their clients free their slots.
    let mut m = String::new();
    for _ in 0..50 {
        if let Ok(r) = client.get(format!("{}/metrics", gw.url)).send().await {
            m = r.text().await.unwrap_or_default();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.contains("tollgate_connections_refused_total"), "{m}");
    assert!(!m.contains("tollgate_connections_refused_total 0\n"), "{m}");
    assert!(
        m.contains("tollgate_connection_timeouts_total{reason=\"pressure\"}"),
        "{m}"
    );
}

/// SIGTERM used to wait the whole grace period for connections that never sent a full head.
#[tokio::test]
async fn shutdown_does_not_wait_for_half_sent_heads() {
    let gw = TestGateway::start("[server]\nshutdown_grace = \"30s\"\n").await;
    let mut half = Vec::new();
    for _ in 0..5 {
        let mut s = connect(&gw).await;
        s.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        half.push(s);
    }
    let mut idle = connect(&gw).await;
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 512];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(n > 0);
    tokio::time::timeout(Duration::from_secs(5), gw.stop())
        .await
        .expect("shutdown closes idle and half-sent connections at once");
    for mut s in half {
        assert_eq!(
            read_until_closed(&mut s, Duration::from_secs(2))
                .await
                .as_deref(),
            Some("")
        );
    }
}
