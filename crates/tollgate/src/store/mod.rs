//! The embedded store: SQLite in WAL mode, shared safely by several processes (a gateway and
//! the CLI, or several gateways on one host).

mod outcomes;
mod usage;

pub use outcomes::{ModelSpend, Outcome, Recorded};
pub use usage::{
    insert_usage_rows, report_start, whole_days, GroupBy, RecentRun, RecordFilter, ReportRow,
    ReportSource, SavedRow,
};

use crate::db::{Db, DbError, Dialect, Location, Param, Row, Value};
use crate::records::UsageRecord;
use crate::records::{KeyLimits, KeyRecord};
use serde::Serialize;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] DbError),
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
    // 10: a version per wallet balance, for Redis hot wallets
    crate::wallet::MIGRATION_VERSION,
    // 11: several secrets per key, so rotation keeps the key (and everything bound to its
    // id); the existing digests become each key's first secret
    "CREATE TABLE key_secrets (
        digest BLOB PRIMARY KEY,
        key_id TEXT NOT NULL,
        prefix TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        expires_ms INTEGER
     );
     CREATE INDEX key_secrets_key ON key_secrets(key_id);
     INSERT INTO key_secrets (digest, key_id, prefix, created_ms, expires_ms)
        SELECT digest, id, prefix, created_ms, NULL FROM keys;",
    // 12: why a request ended, in words (the error's message), for the request log
    "ALTER TABLE usage ADD COLUMN detail TEXT;",
    // 13: hourly and daily rollups, written with the records
    usage::ROLLUP_MIGRATION,
    // 14: outcomes, and records findable by run
    outcomes::MIGRATION,
    // 15: request and response bodies, when [logging] bodies keeps them
    "CREATE TABLE usage_bodies (
        id TEXT PRIMARY KEY,
        request TEXT NOT NULL,
        response TEXT NOT NULL,
        truncated INTEGER NOT NULL
     );",
    // 16: organisations on records, rollups per dimension and per run
    usage::DIMENSION_MIGRATION,
    // 17: the MCP tools a key may use (JSON list of patterns; NULL: none)
    "ALTER TABLE keys ADD COLUMN tools TEXT;",
    // 18, 19: the audit chain and tool-call approvals
    crate::audit::MIGRATION,
    crate::approval::MIGRATION,
    // 20: the response cache's verdict and what each request saved
    usage::SAVINGS_MIGRATION,
    // 21: the path a cascade alias's request took through its tiers
    "ALTER TABLE usage ADD COLUMN cascade TEXT;",
    // 22: read-only dashboard keys
    "ALTER TABLE keys ADD COLUMN viewer INTEGER NOT NULL DEFAULT 0;",
    // 23: the dashboard's runs list walks the per-run rollup by hour, newest first
    "CREATE INDEX usage_run_rollup_hour ON usage_run_rollup(start_ms, run_id);",
    // 24: records without a run are not indexed by run (every query on it names a run):
    // one B-tree insert fewer per such record on the writer's path
    "DROP INDEX usage_run;
     CREATE INDEX usage_run ON usage(run_id) WHERE run_id IS NOT NULL;",
];

/// Copies the WAL back into the database every `every`, off the request and writer paths
/// (passive: it never blocks a writer). Stops when `stop` is set. A process that exits
/// checkpoints on close anyway, so the CLI needs none. PostgreSQL needs nothing like it.
///
/// Passive checkpoints alone never shrink the WAL while writes keep coming: SQLite only
/// starts the file over when a checkpoint completes with no writer in between, and under
/// load the WAL grew by gigabytes a minute (every small transaction appends whole pages).
/// So the checkpointer publishes the WAL's length, and past `WAL_RESTART_FRAMES` the writer
/// restarts it itself between two transactions (`restart_wal_if_long`): the passive
/// checkpoints have copied nearly everything by then, and the writer waits on no lock (a
/// restart from this thread had the writer sleeping in SQLite's busy handler, tens of ms).
/// Restarted, not truncated: the file keeps its size (about `WAL_RESTART_FRAMES` pages) and
/// is written again from its start; truncating it paused the writer, and every hold waiting
/// on it, 10-15 ms more each time (bench/RESULTS.md run L).
pub fn start_checkpointer(
    location: &Location,
    every: Duration,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<()> {
    if !matches!(location, Location::Sqlite(_)) {
        return Ok(());
    }
    let mut db = location.connect()?;
    std::thread::Builder::new()
        .name("tollgate-checkpoint".into())
        .spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(every);
                match db.checkpoint(false) {
                    Ok(frames) => WAL_FRAMES.store(frames, std::sync::atomic::Ordering::Relaxed),
                    Err(e) => tracing::warn!(error = %e, "WAL checkpoint failed; will retry"),
                }
            }
        })?;
    Ok(())
}

/// About 16 MiB of 4 KiB pages: restarting copies what is left of that with the writer
/// paused (holds wait for it), so smaller pauses, more often; at 64 MiB a pause was ~100 ms.
const WAL_RESTART_FRAMES: i64 = 4_096;

/// The WAL's length in frames at the last passive checkpoint (SQLite).
static WAL_FRAMES: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Called by the writer between transactions: restarts the WAL once it is longer than
/// `WAL_RESTART_FRAMES`.
pub fn restart_wal_if_long(db: &mut Db) {
    if WAL_FRAMES.load(std::sync::atomic::Ordering::Relaxed) <= WAL_RESTART_FRAMES {
        return;
    }
    WAL_FRAMES.store(0, std::sync::atomic::Ordering::Relaxed);
    if let Err(e) = db.checkpoint(true) {
        tracing::warn!(error = %e, "WAL restart failed; will retry");
    }
}

pub struct Store {
    location: Location,
    db: Mutex<Db>,
}

fn lock(db: &Mutex<Db>) -> std::sync::MutexGuard<'_, Db> {
    // A panic while holding the lock cannot leave the store inconsistent (an open
    // transaction is rolled back before the next use), so a poisoned lock is still safe.
    db.lock().unwrap_or_else(|p| p.into_inner())
}

impl Store {
    /// The embedded SQLite store in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<Store> {
        std::fs::create_dir_all(data_dir)?;
        Store::open_at(&Location::Sqlite(data_dir.join("tollgate.db")))
    }

    /// Opens (and migrates) the store at `location`.
    pub fn open_at(location: &Location) -> Result<Store> {
        let mut db = location.connect()?;
        migrate(&mut db)?;
        Ok(Store {
            location: location.clone(),
            db: Mutex::new(db),
        })
    }

    /// The schema version (the number of migrations applied).
    pub fn schema_version(&self) -> Result<i64> {
        schema_version(&mut lock(&self.db))
    }

    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Runs `f` on the store's connection outside any transaction.
    fn with<T>(&self, f: impl FnOnce(&mut Db) -> Result<T>) -> Result<T> {
        let mut db = lock(&self.db);
        db.ensure_connected()?;
        f(&mut db)
    }

    pub fn keys_rev(&self) -> Result<i64> {
        self.with(|db| {
            Ok(db
                .one("SELECT v FROM meta WHERE k = 'keys_rev'", &[])?
                .get(0)?)
        })
    }

    pub fn insert_key(&self, key: &KeyRecord, digest: &[u8; 32]) -> Result<()> {
        lock(&self.db).write(|tx| {
            insert_key_row(tx, key, digest)?;
            crate::audit::append(
                tx,
                "admin",
                "key.created",
                &key.id,
                &serde_json::json!({
                    "name": key.name, "team": key.team, "admin": key.admin, "models": key.models,
                    "tools": key.tools, "limits": key.limits,
                }),
                key.created_ms,
            )?;
            bump_keys_rev(tx)
        })
    }

    /// Every key with its digest and every team, for the gateway's cache, and the revision
    /// they reflect.
    pub fn load_keys(&self) -> Result<KeySnapshot> {
        // One snapshot, so the revision matches the rows.
        lock(&self.db).snapshot(|tx| {
            let rev = tx
                .one("SELECT v FROM meta WHERE k = 'keys_rev'", &[])?
                .get(0)?;
            let mut keys = Vec::new();
            let columns = KEY_COLUMNS
                .split(',')
                .map(|c| format!("k.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ");
            // One cache entry per secret: the key as that secret opens it, with the secret's
            // prefix and the earlier of the two expiries.
            for r in tx.rows(
                &format!(
                    "SELECT {columns}, s.digest, s.prefix, s.expires_ms
                     FROM key_secrets s JOIN keys k ON k.id = s.key_id"
                ),
                &[],
            )? {
                let mut key = key_from_row(&r)?;
                let digest: Vec<u8> = r.get(KEY_COLUMN_COUNT)?;
                let digest: [u8; 32] = digest
                    .try_into()
                    .map_err(|_| StoreError::Corrupt(format!("key {} has a bad digest", key.id)))?;
                key.prefix = r.get(KEY_COLUMN_COUNT + 1)?;
                let secret_expires: Option<i64> = r.get(KEY_COLUMN_COUNT + 2)?;
                key.expires_ms = match (key.expires_ms, secret_expires) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                keys.push((digest, key));
            }
            Ok(KeySnapshot {
                rev,
                keys,
                teams: teams_in(tx)?,
                wallets: crate::wallet::owners(tx)?,
                budgets: crate::envelope::budgets(tx)?,
            })
        })
    }

    /// Runs `f` in one write transaction (taken up front, so it never fails half-way on a
    /// lock upgrade) and commits it.
    pub fn write<T>(
        &self,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, crate::wallet::WalletError>,
    ) -> Result<T> {
        lock(&self.db).write(|tx| f(tx).map_err(StoreError::from))
    }

    /// Runs `f` on the store's connection, for reads.
    pub fn read<T>(
        &self,
        f: impl FnOnce(&mut Db) -> std::result::Result<T, crate::wallet::WalletError>,
    ) -> Result<T> {
        self.with(|db| Ok(f(db)?))
    }

    /// Queues a webhook event outside the usage writer (an event with this id is queued once).
    pub fn enqueue_event(
        &self,
        id: &str,
        event: &str,
        data: serde_json::Value,
        now_ms: i64,
    ) -> Result<()> {
        lock(&self.db).write(|tx| Ok(crate::outbox::enqueue(tx, id, event, data, now_ms)?))
    }

    /// Money put into wallets in `[since_ms, until_ms)`: (wallet, kind, amount, time) for
    /// top-ups, grants, adjustments and refunds, in ledger order.
    pub fn ledger_credits(
        &self,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<(String, String, i64, i64)>> {
        self.with(|db| {
            db.rows(
                "SELECT wallet_id, kind, amount_micros, ts_ms FROM ledger
                 WHERE kind IN ('topup', 'grant', 'adjustment', 'refund') AND ts_ms >= ?1 AND ts_ms < ?2
                 ORDER BY seq",
                &[&since_ms, &until_ms],
            )?
            .iter()
            .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .collect()
        })
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
            crate::audit::append(
                tx,
                "admin",
                "wallet.created",
                &w.id,
                &serde_json::json!({ "owner": format!("{}:{owner}", owner_kind.as_str()), "floor_micros": floor_micros }),
                now_ms,
            )?;
            tx.exec("UPDATE meta SET v = v + 1 WHERE k = 'keys_rev'", &[])?;
            Ok(w)
        })
    }

    pub fn list_teams(&self) -> Result<Vec<TeamRecord>> {
        self.with(teams_in)
    }

    /// Creates the team or replaces its limit overrides.
    pub fn set_team_limits(&self, name: &str, limits: &KeyLimits, now_ms: i64) -> Result<()> {
        lock(&self.db).write(|tx| {
            tx.exec(
                "INSERT INTO teams (name, limits, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?3)
                 ON CONFLICT(name) DO UPDATE SET limits = excluded.limits, updated_ms = excluded.updated_ms",
                &[&name, &json(limits), &now_ms],
            )?;
            crate::audit::append(
                tx,
                "admin",
                "team.limits",
                name,
                &serde_json::json!(limits),
                now_ms,
            )?;
            bump_keys_rev(tx)
        })
    }

    /// Replaces a key's limit overrides.
    pub fn set_key_limits(&self, id: &str, limits: &KeyLimits) -> Result<()> {
        lock(&self.db).write(|tx| {
            let n = tx.exec(
                "UPDATE keys SET limits = ?2 WHERE id = ?1",
                &[&id, &json(limits)],
            )?;
            if n == 0 {
                return Err(StoreError::KeyNotFound(id.to_string()));
            }
            crate::audit::append(
                tx,
                "admin",
                "key.limits",
                id,
                &serde_json::json!(limits),
                crate::clock::now_ms(),
            )?;
            bump_keys_rev(tx)
        })
    }

    /// Replaces the MCP tool patterns a key may use (empty: none).
    pub fn set_key_tools(&self, id: &str, tools: &[String]) -> Result<()> {
        lock(&self.db).write(|tx| {
            let n = tx.exec(
                "UPDATE keys SET tools = ?2 WHERE id = ?1",
                &[&id, &(!tools.is_empty()).then(|| json(&tools))],
            )?;
            if n == 0 {
                return Err(StoreError::KeyNotFound(id.to_string()));
            }
            crate::audit::append(
                tx,
                "admin",
                "key.tools",
                id,
                &serde_json::json!({ "tools": tools }),
                crate::clock::now_ms(),
            )?;
            bump_keys_rev(tx)
        })
    }

    pub fn list_keys(&self) -> Result<Vec<KeyRecord>> {
        self.with(|db| {
            let mut keys = db
                .rows(
                    &format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY created_ms, id"),
                    &[],
                )?
                .iter()
                .map(key_from_row)
                .collect::<Result<Vec<_>>>()?;
            let mut secrets: std::collections::HashMap<String, Vec<crate::records::KeySecret>> =
                std::collections::HashMap::new();
            for r in db.rows(
                "SELECT key_id, prefix, created_ms, expires_ms FROM key_secrets
                 ORDER BY created_ms DESC, digest",
                &[],
            )? {
                secrets
                    .entry(r.get(0)?)
                    .or_default()
                    .push(crate::records::KeySecret {
                        prefix: r.get(1)?,
                        created_ms: r.get(2)?,
                        expires_ms: r.get(3)?,
                    });
            }
            for k in &mut keys {
                k.secrets = secrets.remove(&k.id).unwrap_or_default();
            }
            Ok(keys)
        })
    }

    fn with_secrets(db: &mut Db, mut key: KeyRecord) -> Result<KeyRecord> {
        key.secrets = db
            .rows(
                "SELECT prefix, created_ms, expires_ms FROM key_secrets WHERE key_id = ?1
                 ORDER BY created_ms DESC, digest",
                &[&key.id],
            )?
            .iter()
            .map(|r| {
                Ok(crate::records::KeySecret {
                    prefix: r.get(0)?,
                    created_ms: r.get(1)?,
                    expires_ms: r.get(2)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(key)
    }

    /// By id, or by name when exactly one live key has it.
    pub fn find_key(&self, id_or_name: &str, now_ms: i64) -> Result<KeyRecord> {
        self.with(|db| {
            if let Some(r) = db.row(
                &format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?1"),
                &[&id_or_name],
            )? {
                return Self::with_secrets(db, key_from_row(&r)?);
            }
            let mut found: Vec<KeyRecord> = db
                .rows(
                    &format!(
                        "SELECT {KEY_COLUMNS} FROM keys WHERE name = ?1 AND revoked_ms IS NULL
                           AND (expires_ms IS NULL OR expires_ms > ?2)"
                    ),
                    &[&id_or_name, &now_ms],
                )?
                .iter()
                .map(key_from_row)
                .collect::<Result<_>>()?;
            match found.len() {
                0 => Err(StoreError::KeyNotFound(id_or_name.to_string())),
                1 => Self::with_secrets(db, found.remove(0)),
                _ => Err(StoreError::Ambiguous(id_or_name.to_string())),
            }
        })
    }

    pub fn revoke_key(&self, id: &str, now_ms: i64) -> Result<()> {
        lock(&self.db).write(|tx| {
            let n = tx.exec(
                "UPDATE keys SET revoked_ms = ?2 WHERE id = ?1 AND revoked_ms IS NULL",
                &[&id, &now_ms],
            )?;
            if n == 0
                && tx
                    .row("SELECT 1 FROM keys WHERE id = ?1", &[&id])?
                    .is_none()
            {
                return Err(StoreError::KeyNotFound(id.to_string()));
            }
            if n > 0 {
                crate::audit::append(
                    tx,
                    "admin",
                    "key.revoked",
                    id,
                    &serde_json::json!({}),
                    now_ms,
                )?;
            }
            bump_keys_rev(tx)
        })
    }

    /// Adds a secret to a key and retires the live ones at `retire_at` (or their own
    /// earlier expiry), atomically: at no moment does the key have no working secret.
    pub fn rotate_key(
        &self,
        key_id: &str,
        now_ms: i64,
        retire_at: i64,
        prefix: &str,
        digest: &[u8; 32],
    ) -> Result<()> {
        lock(&self.db).write(|tx| {
            tx.exec(
                "UPDATE key_secrets SET expires_ms = ?2
                 WHERE key_id = ?1 AND (expires_ms IS NULL OR expires_ms > ?2)",
                &[&key_id, &retire_at],
            )?;
            tx.exec(
                "INSERT INTO key_secrets (digest, key_id, prefix, created_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, NULL)",
                &[&&digest[..], &key_id, &prefix, &now_ms],
            )?;
            tx.exec(
                "UPDATE keys SET prefix = ?2 WHERE id = ?1",
                &[&key_id, &prefix],
            )?;
            crate::audit::append(
                tx,
                "admin",
                "key.rotated",
                key_id,
                &serde_json::json!({ "new_prefix": prefix, "old_secrets_until_ms": retire_at }),
                now_ms,
            )?;
            bump_keys_rev(tx)
        })
    }

    pub fn has_admin_key(&self) -> Result<bool> {
        self.with(|db| {
            Ok(db
                .row(
                    "SELECT 1 FROM keys WHERE admin = 1 AND revoked_ms IS NULL LIMIT 1",
                    &[],
                )?
                .is_some())
        })
    }

    pub fn key_with_digest_exists(&self, digest: &[u8; 32]) -> Result<bool> {
        self.with(|db| {
            Ok(db
                .row(
                    "SELECT 1 FROM key_secrets WHERE digest = ?1",
                    &[&&digest[..]],
                )?
                .is_some())
        })
    }
}

/// PostgreSQL keeps the schema version in a table (SQLite in `PRAGMA user_version`).
const PG_VERSION_TABLE: &str = "CREATE TABLE IF NOT EXISTS tollgate_schema (version BIGINT NOT NULL);
     INSERT INTO tollgate_schema (version) SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM tollgate_schema);";

fn schema_version(db: &mut Db) -> Result<i64> {
    Ok(match db.dialect() {
        Dialect::Sqlite => db.one("PRAGMA user_version", &[])?.get(0)?,
        Dialect::Postgres => db
            .row("SELECT version FROM tollgate_schema", &[])?
            .map(|r| r.get(0))
            .transpose()?
            .unwrap_or(0),
    })
}

/// Applies the migrations this binary knows, in one write transaction (so replicas
/// starting together migrate once). The same list serves both stores; PostgreSQL gets it
/// through `db::pg_ddl`.
fn migrate(db: &mut Db) -> Result<()> {
    db.write(|tx| {
        if tx.dialect() == Dialect::Postgres {
            tx.batch(PG_VERSION_TABLE)?;
        }
        let version = schema_version(tx)?;
        if version > MIGRATIONS.len() as i64 {
            // A rolled-back binary must not write into a schema it does not know.
            return Err(StoreError::Corrupt(format!(
                "the store is at schema version {version}, newer than this tollgate knows ({}); run the newer tollgate",
                MIGRATIONS.len()
            )));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let v = (i + 1) as i64;
            match tx.dialect() {
                Dialect::Sqlite => {
                    tx.batch(sql)?;
                    tx.batch(&format!("PRAGMA user_version = {v}"))?;
                }
                Dialect::Postgres => {
                    tx.batch(&crate::db::pg_ddl(sql))?;
                    tx.exec("UPDATE tollgate_schema SET version = ?1", &[&v])?;
                }
            }
        }
        Ok(())
    })
}

/// The one INSERT for a key row, shared by creation and rotation.
fn insert_key_row(tx: &mut Db, key: &KeyRecord, digest: &[u8; 32]) -> Result<()> {
    tx.exec(
        "INSERT INTO keys (id, digest, prefix, name, team, project, models, tags, admin,
                           created_ms, expires_ms, revoked_ms, rotated_from, limits, org, tools, viewer)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
        &[
            &key.id,
            &&digest[..],
            &key.prefix,
            &key.name,
            &key.team,
            &key.project,
            &json(&key.models),
            &json(&key.tags),
            &key.admin,
            &key.created_ms,
            &key.expires_ms,
            &key.revoked_ms,
            &key.rotated_from,
            &json(&key.limits),
            &key.org,
            &(!key.tools.is_empty()).then(|| json(&key.tools)),
            &key.viewer,
        ],
    )?;
    tx.exec(
        "INSERT INTO key_secrets (digest, key_id, prefix, created_ms, expires_ms)
         VALUES (?1, ?2, ?3, ?4, NULL)",
        &[&&digest[..], &key.id, &key.prefix, &key.created_ms],
    )?;
    Ok(())
}

fn bump_keys_rev(tx: &mut Db) -> Result<()> {
    tx.exec("UPDATE meta SET v = v + 1 WHERE k = 'keys_rev'", &[])?;
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

fn teams_in(db: &mut Db) -> Result<Vec<TeamRecord>> {
    db.rows(
        "SELECT name, limits, created_ms, updated_ms FROM teams ORDER BY name",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(TeamRecord {
            name: r.get(0)?,
            limits: serde_json::from_str(&r.get::<String>(1)?).unwrap_or_default(),
            created_ms: r.get(2)?,
            updated_ms: r.get(3)?,
        })
    })
    .collect()
}

const KEY_COLUMNS: &str =
    "id, prefix, name, team, project, models, tags, admin, created_ms, expires_ms, revoked_ms, rotated_from, limits, org, tools, viewer";
const KEY_COLUMN_COUNT: usize = 16;

fn key_from_row(r: &Row) -> Result<KeyRecord> {
    let models: String = r.get(5)?;
    let tags: String = r.get(6)?;
    Ok(KeyRecord {
        id: r.get(0)?,
        prefix: r.get(1)?,
        name: r.get(2)?,
        team: r.get(3)?,
        project: r.get(4)?,
        models: serde_json::from_str(&models).unwrap_or_default(),
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        admin: r.get(7)?,
        created_ms: r.get(8)?,
        expires_ms: r.get(9)?,
        revoked_ms: r.get(10)?,
        rotated_from: r.get(11)?,
        limits: serde_json::from_str(&r.get::<String>(12)?).unwrap_or_default(),
        org: r.get(13)?,
        tools: r
            .get::<Option<String>>(14)?
            .and_then(|t| serde_json::from_str(&t).ok())
            .unwrap_or_default(),
        viewer: r.get(15)?,
        secrets: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_wal_is_restarted_not_left_to_grow() {
        let dir = std::env::temp_dir().join(format!("tollgate-wal-{}", rand::random::<u64>()));
        let store = Store::open(&dir).unwrap();
        let wal = dir.join("tollgate.db-wal");
        let mut db = Location::Sqlite(dir.join("tollgate.db")).connect().unwrap();
        let writes = |n: i64| {
            for i in 0..n {
                store
                    .write(|tx| {
                        tx.exec("UPDATE meta SET v = ?1 WHERE k = 'keys_rev'", &[&i])?;
                        Ok(())
                    })
                    .unwrap();
            }
        };
        let len = || std::fs::metadata(&wal).unwrap().len();
        writes(200);
        let long = len();
        assert!(long > 0);
        // Short (as the checkpointer last saw it): left alone, and the WAL grows on.
        WAL_FRAMES.store(10, std::sync::atomic::Ordering::Relaxed);
        restart_wal_if_long(&mut db);
        writes(50);
        let grown = len();
        assert!(grown > long, "{grown} after {long}");
        // Long: restarted; fewer writes than it holds go over its start, so it keeps its size.
        WAL_FRAMES.store(WAL_RESTART_FRAMES + 1, std::sync::atomic::Ordering::Relaxed);
        restart_wal_if_long(&mut db);
        writes(200);
        assert_eq!(len(), grown, "a restarted WAL is written from its start");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Rollups written by the writer's own insert path equal the records they summarise, for
    /// every rolled-up grouping, at windows that start mid-hour, on a day boundary and at
    /// zero; a replayed batch adds nothing to either.
    #[test]
    fn rollups_equal_the_records_they_summarise() {
        use super::usage::ReportSource;
        let dir = std::env::temp_dir().join(format!("tollgate-rollup-{}", rand::random::<u64>()));
        let store = Store::open(&dir).unwrap();
        let day = 86_400_000i64;
        let now = 1_790_000_000_000i64 - 1_790_000_000_000i64 % day + 13 * 3_600_000 + 1_234;
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        let mut recs = Vec::new();
        for i in 0..3_000u64 {
            let status = [200u16, 200, 200, 429, 402, 502, 400][next(7) as usize];
            recs.push(UsageRecord {
                id: format!("req_{i}"),
                ts_ms: now - (next(40 * day as u64) as i64),
                endpoint: ["chat", "messages", "responses"][next(3) as usize].into(),
                key_id: format!("key_{}", next(5)),
                agent: String::new(),
                team: [None, Some("a".to_string()), Some("b".to_string())][next(3) as usize]
                    .clone(),
                project: [None, Some("p".to_string())][next(2) as usize].clone(),
                org: [None, Some("acme".to_string())][next(2) as usize].clone(),
                run_id: [None, Some("r1".to_string()), Some("r2".to_string())][next(3) as usize]
                    .clone(),
                model_requested: Some(["m1", "m2"][next(2) as usize].into()),
                model_served: (next(2) == 0).then(|| "served".to_string()),
                provider: Some("prov".into()),
                status,
                error_kind: (status >= 400).then(|| "rate_limited".to_string()),
                input_tokens: next(5_000),
                cached_input_tokens: next(100),
                output_tokens: next(2_000),
                reasoning_tokens: next(50),
                cache_write_5m_tokens: next(10),
                cost_micros: next(100_000),
                latency_ms: next(3_000),
                usage_source: "provider".into(),
                ..UsageRecord::default()
            });
            let last = recs.last_mut().unwrap();
            last.agent = format!("agent-{}", last.key_id);
        }
        for chunk in recs.chunks(256) {
            store
                .with(|db| db.write(|tx| insert_usage_rows(tx, chunk, &vec![0; chunk.len()])))
                .unwrap();
        }
        // The same batch again (a replay after a failed commit): nothing twice.
        store
            .with(|db| db.write(|tx| insert_usage_rows(tx, &recs[..256], &[0; 256])))
            .unwrap();
        for by in ["key", "team", "org", "project", "model", "day", "endpoint"] {
            let by: GroupBy = by.parse().unwrap();
            for since in [
                0,
                now - 30 * day,
                now - 7 * day - 1_800_000,
                now - 3_600_000,
                now - 1,
            ] {
                // Rollups start on the hour: the records from that hour are the reference.
                let want = store
                    .usage_report_from(
                        &by,
                        super::usage::report_start(since),
                        now,
                        ReportSource::Records,
                    )
                    .unwrap();
                assert!(since > now - day || !want.is_empty());
                let got = store
                    .usage_report_from(&by, since, now, ReportSource::Auto)
                    .unwrap();
                assert_eq!(got, want, "by {by:?} since {since}");
            }
        }
        let total: u64 = store
            .usage_report_from(&GroupBy::Endpoint, 0, now, ReportSource::Auto)
            .unwrap()
            .iter()
            .map(|r| r.requests)
            .sum();
        assert_eq!(total, 3_000);
        // The full hourly rollup, for drill-down: cost and requests per (team, status class).
        let drill = |sql: &str| {
            store
                .with(|db| {
                    db.rows(sql, &[])?
                        .iter()
                        .map(|r| {
                            Ok((
                                r.get::<String>(0)?,
                                r.get::<i64>(1)?,
                                r.get::<u64>(2)?,
                                r.get::<u64>(3)?,
                            ))
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .unwrap()
        };
        assert_eq!(
            drill(
                "SELECT team, status_class, CAST(SUM(requests) AS BIGINT), CAST(SUM(cost_micros) AS BIGINT)
                 FROM usage_rollup GROUP BY 1, 2 ORDER BY 1, 2"
            ),
            drill(
                "SELECT COALESCE(team, ''), status / 100, COUNT(*), CAST(SUM(cost_micros) AS BIGINT)
                 FROM usage GROUP BY 1, 2 ORDER BY 1, 2"
            )
        );
        // The per-run rollups hold each run's spend, from any hour on.
        for since in [0, now - 7 * day - 1_800_000] {
            let from = super::usage::report_start(since);
            for run in ["r1", "r2"] {
                let mut want: Vec<(String, u64)> = Vec::new();
                for r in recs
                    .iter()
                    .filter(|r| r.run_id.as_deref() == Some(run) && r.ts_ms >= from)
                {
                    let m = r
                        .model_served
                        .clone()
                        .or_else(|| r.model_requested.clone())
                        .unwrap();
                    match want.iter_mut().find(|(n, _)| *n == m) {
                        Some((_, c)) => *c += r.cost_micros,
                        None => want.push((m, r.cost_micros)),
                    }
                }
                want.sort();
                let got = store
                    .with(|db| {
                        db.rows(
                            "SELECT model, CAST(SUM(cost_micros) AS BIGINT) FROM usage_run_rollup
                             WHERE run_id = ?1 AND start_ms >= ?2 GROUP BY model ORDER BY model",
                            &[&run, &from],
                        )?
                        .iter()
                        .map(|r| Ok((r.get::<String>(0)?, r.get::<u64>(1)?)))
                        .collect::<Result<Vec<_>>>()
                    })
                    .unwrap();
                assert_eq!(got, want, "run {run} since {since}");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_usage_insert_binds_every_column() {
        use super::usage::{USAGE_COLUMNS, USAGE_COLUMN_COUNT};
        assert_eq!(USAGE_COLUMNS.split(',').count(), USAGE_COLUMN_COUNT);
    }
}
