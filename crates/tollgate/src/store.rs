//! The embedded store: SQLite in WAL mode, shared safely by several processes (a gateway and
//! the CLI, or several gateways on one host).

use crate::keys::{KeyLimits, KeyRecord};
use crate::metering::UsageRecord;
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("no key matches \"{0}\"")]
    KeyNotFound(String),
    #[error("\"{0}\" matches more than one key; use the key id")]
    Ambiguous(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Wallet(#[from] crate::wallet::WalletError),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// A key with the HMAC digest it is looked up by.
pub type DigestedKey = ([u8; 32], KeyRecord);

const MIGRATIONS: &[&str] = &[
    // 1: keys, usage, meta
    "CREATE TABLE meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
     INSERT INTO meta (k, v) VALUES ('keys_rev', 0);
     CREATE TABLE keys (
        id TEXT PRIMARY KEY,
        digest BLOB NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        name TEXT NOT NULL,
        team TEXT,
        project TEXT,
        models TEXT NOT NULL,
        tags TEXT NOT NULL,
        admin INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER,
        revoked_ms INTEGER,
        rotated_from TEXT
     );
     CREATE INDEX keys_name ON keys(name);
     CREATE TABLE usage (
        id TEXT PRIMARY KEY,
        ts_ms INTEGER NOT NULL,
        endpoint TEXT NOT NULL,
        key_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        team TEXT,
        project TEXT,
        tags TEXT NOT NULL,
        model_requested TEXT,
        provider TEXT,
        model_served TEXT,
        attempts INTEGER NOT NULL,
        status INTEGER NOT NULL,
        error_kind TEXT,
        input_tokens INTEGER NOT NULL,
        cached_input_tokens INTEGER NOT NULL,
        output_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        usage_source TEXT NOT NULL,
        cost_micros INTEGER NOT NULL,
        price_version TEXT,
        latency_ms INTEGER NOT NULL,
        ttft_ms INTEGER,
        stream INTEGER NOT NULL,
        client_disconnected INTEGER NOT NULL
     ) WITHOUT ROWID;
     CREATE INDEX usage_ts ON usage(ts_ms);",
    // 2: Anthropic prompt-cache writes
    "ALTER TABLE usage ADD COLUMN cache_write_5m_tokens INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;",
    // 3: per-key limit overrides
    "ALTER TABLE keys ADD COLUMN limits TEXT NOT NULL DEFAULT '{}';",
    // 4: teams and their limit overrides (loaded with the keys, under the same revision)
    "CREATE TABLE teams (
        name TEXT PRIMARY KEY,
        limits TEXT NOT NULL DEFAULT '{}',
        created_ms INTEGER NOT NULL,
        updated_ms INTEGER NOT NULL
     );",
    // 5: tool-route traffic, and answers reused from another request
    "ALTER TABLE usage ADD COLUMN request_bytes INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage ADD COLUMN response_bytes INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE usage ADD COLUMN reused TEXT;
     ALTER TABLE usage ADD COLUMN reused_from TEXT;",
    // 6: wallets, the ledger, holds and grants; keys get an org
    crate::wallet::MIGRATION,
    // 7: which wallet paid for a request, and what it could not pay
    "ALTER TABLE usage ADD COLUMN wallet_id TEXT;
     ALTER TABLE usage ADD COLUMN shortfall_micros INTEGER NOT NULL DEFAULT 0;",
    // 8: run envelopes, budgets, the webhook outbox; usage records name their run
    crate::envelope::MIGRATION,
    // 9: low-balance alerts
    crate::wallet::MIGRATION_LOW_BALANCE,
];

/// Opens a connection with the settings every tollgate connection needs.
pub fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    // Other processes (the CLI, sibling gateways) may hold the write lock briefly.
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // WAL + NORMAL survives process crashes; only an OS crash can lose the last commits.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    // Holds, settles and usage inserts reuse a few dozen statements per request.
    conn.set_prepared_statement_cache_capacity(128);
    // Checkpoints (and their fsync) run on the checkpointer thread, not inside whichever
    // commit happens to fill the WAL: that was the writer, and every hold waited for it.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    Ok(conn)
}

/// Copies the WAL back into the database every `every`, off the request and writer paths
/// (passive: it never blocks a writer). Stops when `stop` is set. A process that exits
/// checkpoints on close anyway, so the CLI needs none.
pub fn start_checkpointer(
    db_path: PathBuf,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    let conn = connect(&db_path)?;
    std::thread::Builder::new()
        .name("tollgate-checkpoint".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                    tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
                }
            }
        })?;
    Ok(())
}

pub struct Store {
    path: PathBuf,
    conn: Mutex<Connection>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReportRow {
    pub group: String,
    pub requests: u64,
    pub errors: u64,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    #[serde(default)]
    pub cache_write_tokens: u64,
    pub cost_micros: u64,
}

/// What `usage --by` groups on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupBy {
    Key,
    Team,
    Project,
    Model,
    Day,
    /// The agent run (`x-tollgate-run`) a request drew on.
    Run,
    /// The endpoint: chat, messages, embeddings, responses, or a tool route.
    Endpoint,
    Tag(String),
}

impl std::str::FromStr for GroupBy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "key" | "agent" => GroupBy::Key,
            "team" => GroupBy::Team,
            "project" => GroupBy::Project,
            "model" => GroupBy::Model,
            "day" => GroupBy::Day,
            "run" => GroupBy::Run,
            "endpoint" => GroupBy::Endpoint,
            _ => match s.strip_prefix("tag:") {
                Some(t) if !t.is_empty() => GroupBy::Tag(t.to_string()),
                _ => {
                    return Err(format!(
                        "cannot group by \"{s}\": use key, team, project, model, day, run, endpoint or tag:NAME"
                    ))
                }
            },
        })
    }
}

fn lock(conn: &Mutex<Connection>) -> std::sync::MutexGuard<'_, Connection> {
    // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
    // back), so a poisoned lock is still safe to use.
    conn.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    pub fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir)?;
        let path = data_dir.join("tollgate.db");
        let mut conn = connect(&path)?;
        migrate(&mut conn)?;
        Ok(Store {
            path,
            conn: Mutex::new(conn),
        })
    }

    /// The schema version (the number of migrations applied).
    pub fn schema_version(&self) -> Result<i64> {
        let conn = lock(&self.conn);
        Ok(conn.query_row("PRAGMA user_version", [], |r| r.get(0))?)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn keys_rev(&self) -> Result<i64> {
        let conn = lock(&self.conn);
        Ok(conn.query_row("SELECT v FROM meta WHERE k = 'keys_rev'", [], |r| r.get(0))?)
    }

    pub fn insert_key(&self, key: &KeyRecord, digest: &[u8; 32]) -> Result<()> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        insert_key_row(&tx, key, digest)?;
        bump_keys_rev(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Every key with its digest and every team, for the gateway's cache, and the revision
    /// they reflect.
    pub fn load_keys(&self) -> Result<KeySnapshot> {
        let mut conn = lock(&self.conn);
        // One read transaction, so the revision matches the rows.
        let tx = conn.transaction()?;
        let rev = tx.query_row("SELECT v FROM meta WHERE k = 'keys_rev'", [], |r| r.get(0))?;
        let mut stmt = tx.prepare(&format!("SELECT digest, {KEY_COLUMNS} FROM keys"))?;
        let rows = stmt.query_map([], |r| {
            let digest: Vec<u8> = r.get(0)?;
            Ok((digest, key_from_row(r, 1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (digest, key) = row?;
            let digest: [u8; 32] = digest
                .try_into()
                .map_err(|_| StoreError::Corrupt(format!("key {} has a bad digest", key.id)))?;
            out.push((digest, key));
        }
        drop(stmt);
        let teams = teams_in(&tx)?;
        let wallets = crate::wallet::owners(&tx)?;
        let budgets = crate::envelope::budgets(&tx)?;
        tx.commit()?;
        Ok(KeySnapshot {
            rev,
            keys: out,
            teams,
            wallets,
            budgets,
        })
    }

    /// Runs `f` in one write transaction (taken up front, so it never fails half-way on a
    /// lock upgrade) and commits it.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&rusqlite::Transaction) -> std::result::Result<T, crate::wallet::WalletError>,
    ) -> Result<T> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        tx.commit()?;
        Ok(out)
    }

    /// Runs `f` on the store's connection, for reads.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> std::result::Result<T, crate::wallet::WalletError>,
    ) -> Result<T> {
        let conn = lock(&self.conn);
        Ok(f(&conn)?)
    }

    /// Creates a wallet; bumps the key revision so gateways learn who now pays for whom.
    pub fn create_wallet(
        &self,
        owner_kind: crate::wallet::OwnerKind,
        owner: &str,
        floor_micros: i64,
        now_ms: i64,
    ) -> Result<crate::wallet::Wallet> {
        self.write(|tx| {
            let w = crate::wallet::create(tx, owner_kind, owner, floor_micros, now_ms)?;
            tx.execute("UPDATE meta SET v = v + 1 WHERE k = 'keys_rev'", [])?;
            Ok(w)
        })
    }

    pub fn list_teams(&self) -> Result<Vec<TeamRecord>> {
        let conn = lock(&self.conn);
        teams_in(&conn)
    }

    /// Creates the team or replaces its limit overrides.
    pub fn set_team_limits(&self, name: &str, limits: &KeyLimits, now_ms: i64) -> Result<()> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO teams (name, limits, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT(name) DO UPDATE SET limits = excluded.limits, updated_ms = excluded.updated_ms",
            params![name, json(limits), now_ms],
        )?;
        bump_keys_rev(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Replaces a key's limit overrides.
    pub fn set_key_limits(&self, id: &str, limits: &KeyLimits) -> Result<()> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE keys SET limits = ?2 WHERE id = ?1",
            params![id, json(limits)],
        )?;
        if n == 0 {
            return Err(StoreError::KeyNotFound(id.to_string()));
        }
        bump_keys_rev(&tx)?;
        tx.commit()?;
        Ok(())
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM keys ORDER BY created_ms, id"
        ))?;
        let rows = stmt.query_map([], |r| key_from_row(r, 0))?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    /// By id, or by name when exactly one live key has it.
    pub fn find_key(&self, id_or_name: &str, now_ms: i64) -> Result<KeyRecord> {
        let conn = lock(&self.conn);
        let by_id = conn
            .query_row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"),
                [id_or_name],
                |r| key_from_row(r, 0),
            )
            .optional()?;
        if let Some(k) = by_id {
            return Ok(k);
        }
        let mut stmt = conn.prepare(&format!(
            "SELECT {KEY_COLUMNS} FROM keys WHERE name = ?1 AND revoked_ms IS NULL
               AND (expires_ms IS NULL OR expires_ms > ?2)"
        ))?;
        let mut found: Vec<KeyRecord> = stmt
            .query_map(params![id_or_name, now_ms], |r| key_from_row(r, 0))?
            .collect::<std::result::Result<_, _>>()?;
        match found.len() {
            0 => Err(StoreError::KeyNotFound(id_or_name.to_string())),
            1 => Ok(found.remove(0)),
            _ => Err(StoreError::Ambiguous(id_or_name.to_string())),
        }
    }

    pub fn revoke_key(&self, id: &str, now_ms: i64) -> Result<()> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        let n = tx.execute(
            "UPDATE keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
            params![id, now_ms],
        )?;
        if n == 0
            && tx
                .query_row("SELECT 1 FROM keys WHERE id = ?1", [id], |_| Ok(()))
                .optional()?
                .is_none()
        {
            return Err(StoreError::KeyNotFound(id.to_string()));
        }
        bump_keys_rev(&tx)?;
        tx.commit()?;
        Ok(())
    }

    /// Inserts the new key and shortens the old one's life to the grace period, atomically.
    pub fn rotate_key(
        &self,
        old_id: &str,
        old_expires_ms: i64,
        new_key: &KeyRecord,
        digest: &[u8; 32],
    ) -> Result<()> {
        let mut conn = lock(&self.conn);
        let tx = conn.transaction()?;
        tx.execute(
            "UPDATE keys SET expires_ms = MIN(COALESCE(expires_ms, ?2), ?2) WHERE id = ?1",
            params![old_id, old_expires_ms],
        )?;
        insert_key_row(&tx, new_key, digest)?;
        bump_keys_rev(&tx)?;
        tx.commit()?;
        Ok(())
    }

    pub fn has_admin_key(&self) -> Result<bool> {
        let conn = lock(&self.conn);
        Ok(conn
            .query_row(
                "SELECT 1 FROM keys WHERE admin = 1 AND revoked_ms IS NULL LIMIT 1",
                [],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn key_with_digest_exists(&self, digest: &[u8; 32]) -> Result<bool> {
        let conn = lock(&self.conn);
        Ok(conn
            .query_row(
                "SELECT 1 FROM keys WHERE digest = ?1",
                [&digest[..]],
                |_| Ok(()),
            )
            .optional()?
            .is_some())
    }

    pub fn usage_report(&self, by: &GroupBy, since_ms: i64) -> Result<Vec<ReportRow>> {
        let conn = lock(&self.conn);
        let group = match by {
            GroupBy::Key => "agent || ' (' || key_id || ')'".to_string(),
            GroupBy::Team => "COALESCE(team, '-')".to_string(),
            GroupBy::Project => "COALESCE(project, '-')".to_string(),
            GroupBy::Model => "COALESCE(model_served, model_requested, '-')".to_string(),
            GroupBy::Day => "date(ts_ms / 1000, 'unixepoch')".to_string(),
            GroupBy::Run => "COALESCE(run_id, '-')".to_string(),
            GroupBy::Endpoint => "endpoint".to_string(),
            GroupBy::Tag(_) => {
                "COALESCE(json_extract(tags, '$.' || json_quote(?2)), '-')".to_string()
            }
        };
        let sql = format!(
            "SELECT {group} AS g, COUNT(*),
                    SUM(CASE WHEN status >= 400 OR error_kind IS NOT NULL THEN 1 ELSE 0 END),
                    SUM(input_tokens), SUM(cached_input_tokens), SUM(output_tokens),
                    SUM(reasoning_tokens), SUM(cost_micros),
                    SUM(cache_write_5m_tokens + cache_write_1h_tokens)
             FROM usage WHERE ts_ms >= ?1 GROUP BY g ORDER BY SUM(cost_micros) DESC, g"
        );
        let mut stmt = conn.prepare(&sql)?;
        let map = |r: &rusqlite::Row| {
            Ok(ReportRow {
                group: r.get(0)?,
                requests: r.get::<_, i64>(1)? as u64,
                errors: r.get::<_, i64>(2)? as u64,
                input_tokens: r.get::<_, i64>(3)? as u64,
                cached_input_tokens: r.get::<_, i64>(4)? as u64,
                output_tokens: r.get::<_, i64>(5)? as u64,
                reasoning_tokens: r.get::<_, i64>(6)? as u64,
                cost_micros: r.get::<_, i64>(7)? as u64,
                cache_write_tokens: r.get::<_, i64>(8)? as u64,
            })
        };
        let rows = match by {
            GroupBy::Tag(t) => stmt
                .query_map(params![since_ms, t], map)?
                .collect::<std::result::Result<Vec<_>, _>>()?,
            _ => stmt
                .query_map(params![since_ms], map)?
                .collect::<std::result::Result<Vec<_>, _>>()?,
        };
        Ok(rows)
    }

    /// Raw records, newest first; `request_id` narrows to one.
    pub fn usage_records(
        &self,
        since_ms: i64,
        request_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<UsageRecord>> {
        let conn = lock(&self.conn);
        let mut stmt = conn.prepare(&format!(
            "SELECT {USAGE_COLUMNS} FROM usage WHERE ts_ms >= ?1 AND (?2 IS NULL OR id = ?2)
             ORDER BY ts_ms DESC, id LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![since_ms, request_id, limit], usage_from_row)?;
        Ok(rows.collect::<std::result::Result<_, _>>()?)
    }

    pub fn count_usage(&self) -> Result<u64> {
        let conn = lock(&self.conn);
        Ok(conn.query_row("SELECT COUNT(*) FROM usage", [], |r| r.get::<_, i64>(0))? as u64)
    }
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > MIGRATIONS.len() as i64 {
        // A rolled-back binary must not write into a schema it does not know.
        return Err(StoreError::Corrupt(format!(
            "the store is at schema version {version}, newer than this tollgate knows ({}); run the newer tollgate",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
    }
    tx.commit()?;
    Ok(())
}

/// The one INSERT for a key row, shared by creation and rotation.
fn insert_key_row(tx: &rusqlite::Transaction, key: &KeyRecord, digest: &[u8; 32]) -> Result<()> {
    tx.execute(
        "INSERT INTO keys (id, digest, prefix, name, team, project, models, tags, admin,
                           created_ms, expires_ms, revoked_ms, rotated_from, limits, org)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            key.id,
            &digest[..],
            key.prefix,
            key.name,
            key.team,
            key.project,
            json(&key.models),
            json(&key.tags),
            key.admin,
            key.created_ms,
            key.expires_ms,
            key.revoked_ms,
            key.rotated_from,
            json(&key.limits),
            key.org
        ],
    )?;
    Ok(())
}

fn bump_keys_rev(tx: &rusqlite::Transaction) -> Result<()> {
    tx.execute("UPDATE meta SET v = v + 1 WHERE k = 'keys_rev'", [])?;
    Ok(())
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

/// What a gateway keeps in memory about who may call and who pays, at one revision.
pub struct KeySnapshot {
    pub rev: i64,
    pub keys: Vec<DigestedKey>,
    pub teams: Vec<TeamRecord>,
    /// (owner kind, owner, wallet id)
    pub wallets: Vec<(crate::wallet::OwnerKind, String, String)>,
    pub budgets: Vec<crate::envelope::Budget>,
}

/// A team and its limit overrides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TeamRecord {
    pub name: String,
    pub limits: KeyLimits,
    pub created_ms: i64,
    pub updated_ms: i64,
}

fn teams_in(conn: &Connection) -> Result<Vec<TeamRecord>> {
    let mut stmt =
        conn.prepare("SELECT name, limits, created_ms, updated_ms FROM teams ORDER BY name")?;
    let rows = stmt.query_map([], |r| {
        Ok(TeamRecord {
            name: r.get(0)?,
            limits: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or_default(),
            created_ms: r.get(2)?,
            updated_ms: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}

const KEY_COLUMNS: &str =
    "id, prefix, name, team, project, models, tags, admin, created_ms, expires_ms, revoked_ms, rotated_from, limits, org";

fn key_from_row(r: &rusqlite::Row, o: usize) -> rusqlite::Result<KeyRecord> {
    let models: String = r.get(o + 5)?;
    let tags: String = r.get(o + 6)?;
    Ok(KeyRecord {
        id: r.get(o)?,
        prefix: r.get(o + 1)?,
        name: r.get(o + 2)?,
        team: r.get(o + 3)?,
        project: r.get(o + 4)?,
        models: serde_json::from_str(&models).unwrap_or_default(),
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        admin: r.get(o + 7)?,
        created_ms: r.get(o + 8)?,
        expires_ms: r.get(o + 9)?,
        revoked_ms: r.get(o + 10)?,
        rotated_from: r.get(o + 11)?,
        limits: serde_json::from_str(&r.get::<_, String>(o + 12)?).unwrap_or_default(),
        org: r.get(o + 13)?,
    })
}

const USAGE_COLUMNS: &str =
    "id, ts_ms, endpoint, key_id, agent, team, project, tags, model_requested, provider,
    model_served, attempts, status, error_kind, input_tokens, cached_input_tokens, output_tokens,
    reasoning_tokens, usage_source, cost_micros, price_version, latency_ms, ttft_ms, stream,
    client_disconnected, cache_write_5m_tokens, cache_write_1h_tokens, request_bytes,
    response_bytes, reused, reused_from, wallet_id, shortfall_micros, run_id";

fn usage_from_row(r: &rusqlite::Row) -> rusqlite::Result<UsageRecord> {
    let tags: String = r.get(7)?;
    Ok(UsageRecord {
        id: r.get(0)?,
        ts_ms: r.get(1)?,
        endpoint: r.get(2)?,
        key_id: r.get(3)?,
        agent: r.get(4)?,
        team: r.get(5)?,
        project: r.get(6)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        model_requested: r.get(8)?,
        provider: r.get(9)?,
        model_served: r.get(10)?,
        attempts: r.get(11)?,
        status: r.get(12)?,
        error_kind: r.get(13)?,
        input_tokens: r.get::<_, i64>(14)? as u64,
        cached_input_tokens: r.get::<_, i64>(15)? as u64,
        output_tokens: r.get::<_, i64>(16)? as u64,
        reasoning_tokens: r.get::<_, i64>(17)? as u64,
        usage_source: r.get(18)?,
        cost_micros: r.get::<_, i64>(19)? as u64,
        price_version: r.get(20)?,
        latency_ms: r.get::<_, i64>(21)? as u64,
        ttft_ms: r.get::<_, Option<i64>>(22)?.map(|v| v as u64),
        stream: r.get(23)?,
        client_disconnected: r.get(24)?,
        cache_write_5m_tokens: r.get::<_, i64>(25)? as u64,
        cache_write_1h_tokens: r.get::<_, i64>(26)? as u64,
        request_bytes: r.get::<_, i64>(27)? as u64,
        response_bytes: r.get::<_, i64>(28)? as u64,
        reused: r.get(29)?,
        reused_from: r.get(30)?,
        wallet_id: r.get(31)?,
        shortfall_micros: r.get::<_, i64>(32)? as u64,
        run_id: r.get(33)?,
        enveloped: false,
    })
}

/// Writes a batch in one transaction. `INSERT OR IGNORE` on the request id makes a replayed
/// batch (a retry after a failed commit) harmless.
pub fn insert_usage_batch(conn: &mut Connection, batch: &[UsageRecord]) -> Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let now = crate::proxy::now_ms();
    {
        let mut stmt = tx.prepare_cached(&format!(
            "INSERT OR IGNORE INTO usage ({USAGE_COLUMNS}) VALUES
             (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19,
              ?20, ?21, ?22, ?23, ?24, ?25, ?26, ?27, ?28, ?29, ?30, ?31, ?32, ?33, ?34)"
        ))?;
        for u in batch {
            // The capture of the request's hold commits with its usage record, or neither
            // does: money and metering cannot disagree.
            let mut shortfall = 0;
            if u.wallet_id.is_some() {
                if let Some(s) = crate::wallet::settle(&tx, &u.id, u.cost_micros as i64, now)? {
                    shortfall = s.shortfall_micros as u64;
                    if let Some((wallet, balance)) = s.low_balance {
                        crate::webhooks::enqueue(
                            &tx,
                            &format!("wallet:{wallet}:low:{}", now / 3_600_000),
                            "wallet.low_balance",
                            serde_json::json!({"wallet": wallet, "balance_micros": balance}),
                            now,
                        )?;
                    }
                }
            }
            stmt.execute(params![
                u.id,
                u.ts_ms,
                u.endpoint,
                u.key_id,
                u.agent,
                u.team,
                u.project,
                json(&u.tags),
                u.model_requested,
                u.provider,
                u.model_served,
                u.attempts,
                u.status,
                u.error_kind,
                u.input_tokens as i64,
                u.cached_input_tokens as i64,
                u.output_tokens as i64,
                u.reasoning_tokens as i64,
                u.usage_source,
                u.cost_micros as i64,
                u.price_version,
                u.latency_ms as i64,
                u.ttft_ms.map(|v| v as i64),
                u.stream,
                u.client_disconnected,
                u.cache_write_5m_tokens as i64,
                u.cache_write_1h_tokens as i64,
                u.request_bytes as i64,
                u.response_bytes as i64,
                u.reused,
                u.reused_from,
                u.wallet_id,
                shortfall as i64,
                u.run_id
            ])?;
            if u.enveloped {
                let crossings = crate::envelope::settle(
                    &tx,
                    &u.id,
                    u.cost_micros as i64,
                    (u.input_tokens + u.output_tokens) as i64,
                )?;
                for c in crossings {
                    crate::webhooks::enqueue_crossing(&tx, &c, now)?;
                }
            }
        }
    }
    tx.commit()?;
    Ok(())
}
