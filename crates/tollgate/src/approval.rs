//! Human approval of tool calls a policy marks `require_approval`. An approval is bound to a
//! digest of (key, tool, canonical arguments): the call the approver saw is the only call it
//! lets through, once, before it expires; a changed argument is another call and needs its
//! own. A call waiting for approval is parked here, not sent; the agent's retry of the same
//! call finds the decision.

use crate::db::Db;
use crate::wallet::{Result, WalletError};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub const MIGRATION: &str = "CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        key_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        tool TEXT NOT NULL,
        digest TEXT NOT NULL,
        arguments TEXT NOT NULL,
        policy TEXT NOT NULL,
        reason TEXT NOT NULL,
        state TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        decided_ms INTEGER,
        decided_by TEXT,
        note TEXT,
        used_request TEXT
    );
    CREATE INDEX approvals_digest ON approvals(digest, created_ms);
    CREATE INDEX approvals_state ON approvals(state, created_ms);";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Approval {
    pub id: String,
    pub key_id: String,
    pub agent: String,
    /// `server__tool`, `route:<name>`, or the tool name a model asked for.
    pub tool: String,
    pub digest: String,
    pub arguments: Value,
    pub policy: String,
    pub reason: String,
    /// `pending`, `approved`, `denied` or `used`.
    pub state: String,
    pub created_ms: i64,
    pub expires_ms: i64,
    pub decided_ms: Option<i64>,
    pub decided_by: Option<String>,
    pub note: Option<String>,
    pub used_request: Option<String>,
}

/// What a call that needs approval may do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Gate {
    /// An approver let exactly this call through; the approval is now used.
    Proceed(Approval),
    /// Waiting for an approver (created now, or earlier for the same call).
    Pending(Approval),
    Denied(Approval),
}

/// The digest an approval is bound to. Arguments are compared as canonical JSON (object keys
/// sorted, no whitespace), so formatting does not matter and any changed value does.
pub fn digest(key_id: &str, tool: &str, arguments: &Value) -> String {
    let mut h = Sha256::new();
    for part in [key_id, tool, &arguments.to_string()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part.as_bytes());
    }
    hex::encode(h.finalize())
}

/// One call that needs approval.
pub struct Request<'a> {
    pub key_id: &'a str,
    pub agent: &'a str,
    pub tool: &'a str,
    pub arguments: &'a Value,
    pub policy: &'a str,
    pub reason: &'a str,
    pub request_id: &'a str,
}

const COLUMNS: &str = "id, key_id, agent, tool, digest, arguments, policy, reason, state, created_ms, expires_ms, decided_ms, decided_by, note, used_request";

fn from_row(r: &crate::db::Row) -> Result<Approval> {
    let args: String = r.get(5)?;
    Ok(Approval {
        id: r.get(0)?,
        key_id: r.get(1)?,
        agent: r.get(2)?,
        tool: r.get(3)?,
        digest: r.get(4)?,
        arguments: serde_json::from_str(&args).unwrap_or(Value::String(args)),
        policy: r.get(6)?,
        reason: r.get(7)?,
        state: r.get(8)?,
        created_ms: r.get(9)?,
        expires_ms: r.get(10)?,
        decided_ms: r.get(11)?,
        decided_by: r.get(12)?,
        note: r.get(13)?,
        used_request: r.get(14)?,
    })
}

fn new_id() -> String {
    use rand::RngCore;
    let mut b = [0u8; 9];
    rand::rng().fill_bytes(&mut b);
    format!("apr_{}", hex::encode(b))
}

/// The gate for `req` at `now_ms`: uses a granted approval of exactly this call, or reports
/// the one pending or denied, or parks the call as a new pending approval (queuing the
/// `approval.requested` webhook and an audit entry with it).
pub fn gate(tx: &mut Db, req: &Request, ttl_ms: i64, now_ms: i64) -> Result<Gate> {
    let digest = digest(req.key_id, req.tool, req.arguments);
    let live = tx.row(
        &format!(
            "SELECT {COLUMNS} FROM approvals
             WHERE digest = ?1 AND state IN ('pending', 'approved', 'denied') AND expires_ms > ?2
             ORDER BY created_ms DESC LIMIT 1"
        ),
        &[&digest, &now_ms],
    )?;
    if let Some(row) = live {
        let mut a = from_row(&row)?;
        match a.state.as_str() {
            "approved" => {
                let used = tx.exec(
                    "UPDATE approvals SET state = 'used', used_request = ?2
                     WHERE id = ?1 AND state = 'approved'",
                    &[&a.id, &req.request_id],
                )?;
                if used == 1 {
                    crate::audit::append(
                        tx,
                        &format!("key:{}", req.key_id),
                        "approval.used",
                        &a.id,
                        &json!({ "tool": a.tool, "request_id": req.request_id }),
                        now_ms,
                    )?;
                    a.state = "used".into();
                    a.used_request = Some(req.request_id.to_string());
                    return Ok(Gate::Proceed(a));
                }
            }
            "pending" => return Ok(Gate::Pending(a)),
            _ => return Ok(Gate::Denied(a)),
        }
    }
    let a = Approval {
        id: new_id(),
        key_id: req.key_id.to_string(),
        agent: req.agent.to_string(),
        tool: req.tool.to_string(),
        digest,
        arguments: req.arguments.clone(),
        policy: req.policy.to_string(),
        reason: req.reason.to_string(),
        state: "pending".into(),
        created_ms: now_ms,
        expires_ms: now_ms.saturating_add(ttl_ms),
        decided_ms: None,
        decided_by: None,
        note: None,
        used_request: None,
    };
    tx.exec(
        "INSERT INTO approvals (id, key_id, agent, tool, digest, arguments, policy, reason, state,
                                created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, 'pending', ?9, ?10)",
        &[
            &a.id,
            &a.key_id,
            &a.agent,
            &a.tool,
            &a.digest,
            &a.arguments.to_string(),
            &a.policy,
            &a.reason,
            &a.created_ms,
            &a.expires_ms,
        ],
    )?;
    let view = json!({
        "approval": a.id, "agent": a.agent, "key_id": a.key_id, "tool": a.tool,
        "arguments": a.arguments, "reason": a.reason, "expires_ms": a.expires_ms,
    });
    crate::outbox::enqueue(
        tx,
        &format!("approval:{}", a.id),
        "approval.requested",
        view.clone(),
        now_ms,
    )?;
    crate::audit::append(
        tx,
        &format!("key:{}", req.key_id),
        "approval.requested",
        &a.id,
        &view,
        now_ms,
    )?;
    Ok(Gate::Pending(a))
}

/// An approver's decision on a pending approval. A granted one lasts `ttl_ms` from now.
pub fn decide(
    tx: &mut Db,
    id: &str,
    approve: bool,
    by: &str,
    note: Option<&str>,
    ttl_ms: i64,
    now_ms: i64,
) -> Result<Approval> {
    let a = get(tx, id)?;
    if a.state != "pending" || a.expires_ms <= now_ms {
        let state = if a.state == "pending" {
            "expired"
        } else {
            a.state.as_str()
        };
        return Err(WalletError::Invalid(format!(
            "approval {id} is {state}; only a pending approval can be decided"
        )));
    }
    let state = if approve { "approved" } else { "denied" };
    let expires = if approve {
        now_ms.saturating_add(ttl_ms)
    } else {
        a.expires_ms
    };
    tx.exec(
        "UPDATE approvals SET state = ?2, decided_ms = ?3, decided_by = ?4, note = ?5, expires_ms = ?6
         WHERE id = ?1 AND state = 'pending'",
        &[&id, &state, &now_ms, &by, &note, &expires],
    )?;
    crate::audit::append(
        tx,
        by,
        &format!("approval.{state}"),
        id,
        &json!({ "tool": a.tool, "arguments": a.arguments, "agent": a.agent, "note": note }),
        now_ms,
    )?;
    get(tx, id)
}

pub fn get(db: &mut Db, id: &str) -> Result<Approval> {
    let row = db
        .row(
            &format!("SELECT {COLUMNS} FROM approvals WHERE id = ?1"),
            &[&id],
        )?
        .ok_or_else(|| WalletError::Invalid(format!("no approval \"{id}\"")))?;
    from_row(&row)
}

/// Newest first; `state` = `None` lists all.
pub fn list(db: &mut Db, state: Option<&str>, limit: u32) -> Result<Vec<Approval>> {
    let rows = db.rows(
        &format!(
            "SELECT {COLUMNS} FROM approvals WHERE (?1 = '' OR state = ?1)
             ORDER BY created_ms DESC LIMIT ?2"
        ),
        &[&state.unwrap_or(""), &i64::from(limit.clamp(1, 10_000))],
    )?;
    rows.iter().map(from_row).collect()
}
