//! The audit log: every tool-policy decision, approval, and admin change to keys and wallets,
//! appended to a hash chain. Each entry's hash covers its own fields and the previous entry's
//! hash, so changing or removing an entry breaks every hash after it (`verify`). Entries are
//! appended inside the transaction that does what they record: the usage writer's batch for
//! policy decisions, the admin operation's for the rest.

use crate::db::{Db, Dialect};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

pub const MIGRATION: &str = "CREATE TABLE audit (
        seq INTEGER NOT NULL PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        subject TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    );
    CREATE INDEX audit_action ON audit(action, ts_ms);
    CREATE INDEX audit_subject ON audit(subject);";

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub seq: i64,
    pub ts_ms: i64,
    /// Who did it: `key:<id>` for an agent's call, `admin:<name>` or a person for the rest.
    pub actor: String,
    /// `policy.allow`, `policy.deny`, `policy.require_approval`, `approval.requested`,
    /// `approval.approved`, `approval.denied`, `approval.used`, `key.created`, …
    pub action: String,
    pub subject: String,
    pub detail: Value,
    pub prev_hash: String,
    pub hash: String,
}

fn entry_hash(
    seq: i64,
    ts_ms: i64,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
    prev: &str,
) -> String {
    let mut h = Sha256::new();
    // Length-prefixed, so no two different entries hash the same bytes.
    for field in [
        &seq.to_string(),
        &ts_ms.to_string(),
        actor,
        action,
        subject,
        detail,
        prev,
    ] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    hex::encode(h.finalize())
}

/// Appends one entry in `tx`. On PostgreSQL the transaction first takes an advisory lock, so
/// two replicas' appends cannot both link to the same predecessor; SQLite's write
/// transaction is exclusive already.
pub fn append(
    tx: &mut Db,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &Value,
    now_ms: i64,
) -> crate::db::Result<()> {
    if tx.dialect() == Dialect::Postgres {
        tx.exec("SELECT pg_advisory_xact_lock(7366)", &[])?;
    }
    let last = tx.row("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?;
    let (seq, prev) = match last {
        Some(r) => (r.get::<i64>(0)? + 1, r.get::<String>(1)?),
        None => (1, GENESIS.to_string()),
    };
    let detail = detail.to_string();
    let hash = entry_hash(seq, now_ms, actor, action, subject, &detail, &prev);
    tx.exec(
        "INSERT INTO audit (seq, ts_ms, actor, action, subject, detail, prev_hash, hash)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        &[
            &seq, &now_ms, &actor, &action, &subject, &detail, &prev, &hash,
        ],
    )?;
    Ok(())
}

/// The policy decisions on one request's tool calls, once: a record the writer commits again
/// (a replayed batch) adds nothing.
pub fn append_decisions(
    tx: &mut Db,
    key_id: &str,
    request_id: &str,
    verdicts: &[crate::records::Verdict],
    now_ms: i64,
) -> crate::db::Result<()> {
    let entries = verdicts.iter().map(|v| {
        (
            format!("policy.{}", v.decision.as_str()),
            serde_json::json!({ "tool": v.tool, "policy": v.policy, "rule": v.rule, "reason": v.reason }),
        )
    });
    append_once(tx, key_id, request_id, "policy.", entries, now_ms)
}

/// What redaction found in one request, once (as `append_decisions`): counts by detector,
/// action and place, never the values.
pub fn append_redactions(
    tx: &mut Db,
    key_id: &str,
    request_id: &str,
    found: &[crate::records::Redacted],
    now_ms: i64,
) -> crate::db::Result<()> {
    let entries = found.iter().map(|r| {
        (
            format!("redaction.{}", r.action.as_str()),
            serde_json::json!({ "detector": r.detector, "count": r.count, "place": r.place }),
        )
    });
    append_once(tx, key_id, request_id, "redaction.", entries, now_ms)
}

/// Appends a request's entries whose actions start with `prefix`, unless it has some already.
fn append_once(
    tx: &mut Db,
    key_id: &str,
    request_id: &str,
    prefix: &str,
    entries: impl ExactSizeIterator<Item = (String, serde_json::Value)>,
    now_ms: i64,
) -> crate::db::Result<()> {
    if entries.len() == 0
        || tx
            .row(
                // The prefixes are `policy.` and `redaction.`: no LIKE wildcards in them.
                "SELECT 1 FROM audit WHERE subject = ?1 AND action LIKE ?2",
                &[&request_id, &format!("{prefix}%")],
            )?
            .is_some()
    {
        return Ok(());
    }
    let actor = format!("key:{key_id}");
    for (action, detail) in entries {
        append(tx, &actor, &action, request_id, &detail, now_ms)?;
    }
    Ok(())
}

/// Filters for `list`; `None` matches everything.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Filter {
    /// An action, or a prefix of one ending in `.` (`approval.`).
    pub action: Option<String>,
    pub subject: Option<String>,
    pub since_ms: Option<i64>,
    pub limit: Option<u32>,
}

fn entry_from(r: &crate::db::Row) -> crate::db::Result<Entry> {
    let detail: String = r.get(5)?;
    Ok(Entry {
        seq: r.get(0)?,
        ts_ms: r.get(1)?,
        actor: r.get(2)?,
        action: r.get(3)?,
        subject: r.get(4)?,
        detail: serde_json::from_str(&detail).unwrap_or(Value::String(detail)),
        prev_hash: r.get(6)?,
        hash: r.get(7)?,
    })
}

const COLUMNS: &str = "seq, ts_ms, actor, action, subject, detail, prev_hash, hash";

/// The newest entries first.
pub fn list(db: &mut Db, f: &Filter) -> crate::db::Result<Vec<Entry>> {
    let action = f.action.clone().unwrap_or_default();
    let prefix = action.ends_with('.');
    let limit = i64::from(f.limit.unwrap_or(100).clamp(1, 10_000));
    let rows = db.rows(
        &format!(
            "SELECT {COLUMNS} FROM audit
             WHERE (?1 = '' OR action = ?1 OR (?2 = 1 AND substr(action, 1, length(?1)) = ?1))
               AND (?3 = '' OR subject = ?3) AND ts_ms >= ?4
             ORDER BY seq DESC LIMIT ?5"
        ),
        &[
            &action,
            &i64::from(prefix),
            &f.subject.clone().unwrap_or_default(),
            &f.since_ms.unwrap_or(0),
            &limit,
        ],
    )?;
    rows.iter().map(entry_from).collect()
}

/// What `verify` found.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Verified {
    pub entries: u64,
    /// The last entry's hash: write it down somewhere else to notice the chain's end being
    /// cut off later (nothing inside the database can show that).
    pub head: String,
    /// The first entry that does not hold, and why.
    pub broken: Option<(i64, String)>,
}

/// Walks the whole chain in order: every entry's hash recomputed, every link to its
/// predecessor checked, every sequence number present.
pub fn verify(db: &mut Db) -> crate::db::Result<Verified> {
    let mut prev = GENESIS.to_string();
    let mut expected = 1i64;
    let mut entries = 0u64;
    let mut after = 0i64;
    loop {
        let rows = db.rows(
            &format!("SELECT {COLUMNS} FROM audit WHERE seq > ?1 ORDER BY seq LIMIT 1000"),
            &[&after],
        )?;
        if rows.is_empty() {
            break;
        }
        for r in &rows {
            let detail: String = r.get(5)?;
            let e = entry_from(r)?;
            after = e.seq;
            let bad = |why: String| {
                Ok(Verified {
                    entries,
                    head: prev.clone(),
                    broken: Some((e.seq, why)),
                })
            };
            if e.seq != expected {
                return bad(format!("entries {expected}..{} are missing", e.seq - 1));
            }
            if e.prev_hash != prev {
                return bad("it does not link to the entry before it".into());
            }
            let h = entry_hash(
                e.seq,
                e.ts_ms,
                &e.actor,
                &e.action,
                &e.subject,
                &detail,
                &e.prev_hash,
            );
            if h != e.hash {
                return bad("its contents do not match its hash (it was changed)".into());
            }
            prev = e.hash;
            expected += 1;
            entries += 1;
        }
    }
    Ok(Verified {
        entries,
        head: prev,
        broken: None,
    })
}
