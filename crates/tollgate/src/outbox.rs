//! The webhook outbox: events written in the same transaction as the spending that caused
//! them, so an event is never lost nor invented by a rolled-back write. Ids are deterministic
//! (`budget:…:80%`), so a crossing is enqueued once. Delivery is `webhooks.rs`.

use crate::db::Db;
use crate::envelope::Crossing;

pub fn enqueue(
    tx: &mut Db,
    id: &str,
    event: &str,
    data: serde_json::Value,
    now_ms: i64,
) -> crate::db::Result<()> {
    let payload = serde_json::json!({
        "id": id,
        "type": event,
        "created_ms": now_ms,
        "data": data,
    });
    tx.exec(
        "INSERT INTO webhook_outbox (id, event, payload, created_ms, next_attempt_ms)
         VALUES (?1, ?2, ?3, ?4, ?4) ON CONFLICT DO NOTHING",
        &[&id, &event, &payload.to_string(), &now_ms],
    )?;
    Ok(())
}

pub fn enqueue_crossing(tx: &mut Db, c: &Crossing, now_ms: i64) -> crate::db::Result<()> {
    let event = match (c.kind.as_str(), c.threshold.as_str()) {
        ("run", "100%") => "run.exhausted",
        ("run", _) => "run.threshold",
        (_, "soft") => "budget.soft_limit",
        _ => "budget.threshold",
    };
    enqueue(
        tx,
        &format!("{}:{}", c.envelope, c.threshold),
        event,
        serde_json::json!({
            "envelope": c.envelope,
            "threshold": c.threshold,
            "spent_micros": c.spent_cost_micros,
            "cap_micros": c.cap_cost_micros,
        }),
        now_ms,
    )
}
