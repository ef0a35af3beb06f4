//! Webhooks: budget thresholds (50/80/100% and the soft limit), exhausted run envelopes and
//! refused wallets, delivered at least once.
//!
//! Events are written to an outbox table in the same transaction as the spending that
//! caused them (so an event is never lost, nor invented by a rolled-back write); event ids
//! are deterministic (`budget:…:80%`), so the same crossing is enqueued once. A background
//! task posts due events to every configured endpoint, signed with HMAC-SHA256, and retries
//! with backoff until all endpoints answer 2xx.

use crate::config::WebhookConfig;
use crate::state::AppState;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Weak;
use std::time::Duration;

/// `sha256=<hex>` of the body under the endpoint's secret.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

fn backoff(attempts: i64) -> i64 {
    // 1 s, 2 s, 4 s … capped at 10 minutes.
    1000i64
        .saturating_mul(1 << attempts.clamp(0, 20))
        .min(600_000)
}

struct Due {
    id: String,
    event: String,
    payload: String,
    attempts: i64,
}

/// Delivers due events, forever (until the gateway is gone).
pub async fn deliver(app: Weak<AppState>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    loop {
        let Some(strong) = app.upgrade() else { return };
        let hooks: Vec<WebhookConfig> = strong.runtime.load().webhooks.clone();
        let every = Duration::from_millis(250);
        if hooks.is_empty() {
            drop(strong);
            tokio::time::sleep(every).await;
            continue;
        }
        let store = strong.store.clone();
        let now = crate::clock::now_ms();
        let due = tokio::task::spawn_blocking(move || {
            store.read(|c| {
                c.rows(
                    "SELECT id, event, payload, attempts FROM webhook_outbox
                     WHERE delivered_ms IS NULL AND next_attempt_ms <= ?1
                     ORDER BY created_ms LIMIT 100",
                    &[&now],
                )?
                .iter()
                .map(|r| {
                    Ok(Due {
                        id: r.get(0)?,
                        event: r.get(1)?,
                        payload: r.get(2)?,
                        attempts: r.get(3)?,
                    })
                })
                .collect::<Result<Vec<Due>, crate::wallet::WalletError>>()
            })
        })
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
        for d in due {
            let mut ok = true;
            for h in &hooks {
                if !h.events.is_empty() && !h.events.iter().any(|e| e == &d.event) {
                    continue;
                }
                let secret = h.secret().unwrap_or_default();
                let sent = client
                    .post(&h.url)
                    .header("content-type", "application/json")
                    .header("x-tollgate-event-id", &d.id)
                    .header("x-tollgate-event", &d.event)
                    .header(
                        "x-tollgate-signature",
                        signature(&secret, d.payload.as_bytes()),
                    )
                    .body(d.payload.clone())
                    .send()
                    .await;
                let delivered = matches!(&sent, Ok(r) if r.status().is_success());
                if !delivered {
                    tracing::warn!(event = %d.id, url = %h.url, attempt = d.attempts + 1, "webhook not delivered; will retry");
                }
                ok &= delivered;
            }
            let store = strong.store.clone();
            let (id, attempts) = (d.id.clone(), d.attempts);
            let _ = tokio::task::spawn_blocking(move || {
                let now = crate::clock::now_ms();
                store.write(|tx| {
                    if ok {
                        tx.exec(
                            "UPDATE webhook_outbox SET delivered_ms = ?2, attempts = attempts + 1 WHERE id = ?1",
                            &[&id, &now],
                        )?;
                    } else {
                        tx.exec(
                            "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt_ms = ?2 WHERE id = ?1",
                            &[&id, &(now + backoff(attempts))],
                        )?;
                    }
                    Ok(())
                })
            })
            .await;
        }
        drop(strong);
        tokio::time::sleep(every).await;
    }
}
