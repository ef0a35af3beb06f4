//! The OTLP/HTTP exporter: finished traces wait in a bounded queue, off the request path,
//! and leave in batches as protobuf `POST <endpoint>/v1/traces`. Traces are diagnostics,
//! not money: a full queue or a collector that stays down drops spans (counted), it never
//! slows a request or holds memory without bound.

use super::proto::{export_request, Resource};
use super::{Counters, RequestTrace, Value};
use crate::config::OtelConfig;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

enum Msg {
    Trace(Box<RequestTrace>),
    Flush(oneshot::Sender<()>),
}

pub(super) struct Exporter {
    tx: mpsc::Sender<Msg>,
    metrics: Counters,
}

/// Retries of one batch after its first try, for the statuses OTLP calls retryable.
const RETRIES: u32 = 2;

struct Target {
    http: reqwest::Client,
    url: String,
    headers: HeaderMap,
    resource: Resource,
    metrics: Counters,
}

impl Exporter {
    pub(super) fn start(
        cfg: &OtelConfig,
        endpoint: &str,
        metrics: Counters,
    ) -> anyhow::Result<Exporter> {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        for (name, var) in &cfg.headers_env {
            let value = std::env::var(var).map_err(|_| {
                anyhow::anyhow!("[otel] headers_env: environment variable {var} is not set")
            })?;
            headers.insert(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(&value).map_err(|_| {
                    anyhow::anyhow!("[otel] headers_env: {var} is not a header value")
                })?,
            );
        }
        let mut attributes = vec![(
            "service.name".to_string(),
            Value::Str(cfg.service_name.clone()),
        )];
        attributes.push((
            "service.version".into(),
            Value::Str(env!("CARGO_PKG_VERSION").into()),
        ));
        for (k, v) in &cfg.resource {
            attributes.push((k.clone(), Value::Str(v.clone())));
        }
        let target = Target {
            http: reqwest::Client::builder()
                .timeout(cfg.timeout)
                .connect_timeout(cfg.timeout.min(Duration::from_secs(5)))
                .build()?,
            url: format!("{}/v1/traces", endpoint.trim_end_matches('/')),
            headers,
            resource: Resource {
                attributes,
                scope_version: env!("CARGO_PKG_VERSION"),
            },
            metrics: metrics.clone(),
        };
        let (tx, rx) = mpsc::channel(cfg.queue_capacity.max(1));
        tokio::spawn(run(rx, target, cfg.batch_max.max(1), cfg.flush_interval));
        Ok(Exporter { tx, metrics })
    }

    pub(super) fn offer(&self, t: Box<RequestTrace>) {
        if let Err(mpsc::error::TrySendError::Full(Msg::Trace(t))) = self.tx.try_send(Msg::Trace(t))
        {
            self.metrics.dropped.inc_by(1 + t.children.len() as u64);
        }
    }

    pub(super) async fn flush(&self, grace: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        tokio::time::timeout(grace, async {
            self.tx.send(Msg::Flush(tx)).await.is_ok() && rx.await.is_ok()
        })
        .await
        .unwrap_or(false)
    }
}

async fn run(mut rx: mpsc::Receiver<Msg>, target: Target, batch_max: usize, every: Duration) {
    let mut batch: Vec<RequestTrace> = Vec::new();
    loop {
        let msg = if batch.is_empty() {
            rx.recv().await
        } else {
            match tokio::time::timeout(every, rx.recv()).await {
                Ok(m) => m,
                Err(_) => {
                    send(&target, std::mem::take(&mut batch)).await;
                    continue;
                }
            }
        };
        match msg {
            None => {
                send(&target, batch).await;
                return;
            }
            Some(Msg::Trace(t)) => {
                batch.push(*t);
                if batch.len() >= batch_max {
                    send(&target, std::mem::take(&mut batch)).await;
                }
            }
            Some(Msg::Flush(done)) => {
                while let Ok(m) = rx.try_recv() {
                    match m {
                        Msg::Trace(t) => batch.push(*t),
                        Msg::Flush(other) => drop(other.send(())),
                    }
                    if batch.len() >= batch_max {
                        send(&target, std::mem::take(&mut batch)).await;
                    }
                }
                send(&target, std::mem::take(&mut batch)).await;
                let _ = done.send(());
            }
        }
    }
}

/// One batch, tried until the collector takes it, refuses it for good, or `RETRIES` run out.
async fn send(t: &Target, batch: Vec<RequestTrace>) {
    if batch.is_empty() {
        return;
    }
    let spans: u64 = batch.iter().map(|t| 1 + t.children.len() as u64).sum();
    let body = bytes::Bytes::from(export_request(&t.resource, &batch));
    drop(batch);
    let mut wait = Duration::from_millis(200);
    for attempt in 0..=RETRIES {
        let resp = t
            .http
            .post(&t.url)
            .headers(t.headers.clone())
            .body(body.clone())
            .send()
            .await;
        let retry_after = match resp {
            Ok(r) if r.status().is_success() => {
                t.metrics.exported.inc_by(spans);
                return;
            }
            Ok(r) => {
                let s = r.status();
                let retryable = matches!(
                    s,
                    StatusCode::TOO_MANY_REQUESTS
                        | StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                );
                t.metrics.errors.inc();
                tracing::warn!(status = %s, url = %t.url, attempt, "OTLP collector refused a trace export");
                if !retryable {
                    break;
                }
                r.headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .map(Duration::from_secs)
            }
            Err(e) => {
                t.metrics.errors.inc();
                tracing::warn!(error = %e, url = %t.url, attempt, "OTLP trace export failed");
                None
            }
        };
        if attempt < RETRIES {
            // A collector's Retry-After is honoured up to a few seconds: the queue behind
            // this batch keeps filling meanwhile.
            tokio::time::sleep(retry_after.unwrap_or(wait).min(Duration::from_secs(5))).await;
            wait *= 2;
        }
    }
    t.metrics.dropped.inc_by(spans);
}
