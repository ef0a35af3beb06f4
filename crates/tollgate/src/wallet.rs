//! Wallets and their ledger: prepaid balances an agent cannot overdraw.
//!
//! Every movement of money is an append-only ledger entry in integer micro-USD, signed by its
//! effect on the wallet's available balance, with an idempotency key unique per wallet. The
//! wallet row carries the balance as a projection that every operation updates in the same
//! transaction as its entry, so `balance == sum(entries)` always (checked by `verify`, by the
//! property test and by the integration tests).
//!
//! A request holds its estimated maximum cost before the upstream call (`hold`: an atomic
//! conditional decrement that cannot pass the floor, so concurrent requests cannot overdraw),
//! and settles after (`settle`: the hold is released and the actual cost captured, in the
//! same transaction as the request's usage record). Holds expire, so a crash never freezes
//! money.
//!
//! Entries per request: `hold -H`, then `release +H` and `capture -C`. The sum of a request's
//! entries is what it cost.

use crate::db::{Db, Row};
pub use crate::money::{parse_usd, usd, MAX_MICROS, MAX_TOKENS};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OwnerKind {
    Org,
    Team,
    Key,
}

impl OwnerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OwnerKind::Org => "org",
            OwnerKind::Team => "team",
            OwnerKind::Key => "key",
        }
    }

    pub fn parse(s: &str) -> Option<OwnerKind> {
        match s {
            "org" => Some(OwnerKind::Org),
            "team" => Some(OwnerKind::Team),
            "key" => Some(OwnerKind::Key),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wallet {
    pub id: String,
    pub owner_kind: OwnerKind,
    pub owner: String,
    /// Available: top-ups and grants, minus captures and open holds.
    pub balance_micros: i64,
    /// The balance never goes below this (0: strictly prepaid).
    pub floor_micros: i64,
    /// Money held by requests in flight.
    #[serde(default)]
    pub held_micros: i64,
    /// A `wallet.low_balance` webhook fires when a capture takes the balance below this.
    #[serde(default)]
    pub low_balance_micros: Option<i64>,
    pub created_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: i64,
    pub wallet_id: String,
    pub kind: String,
    pub amount_micros: i64,
    pub idempotency_key: String,
    pub request_id: Option<String>,
    pub expires_ms: Option<i64>,
    pub note: Option<String>,
    pub ts_ms: i64,
}

/// Money put into a wallet (or, for an adjustment, taken out) by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credit {
    Topup,
    /// Free credit that expires; spent before top-ups.
    Grant {
        expires_ms: i64,
    },
    Refund,
    /// Signed; a negative adjustment cannot take the balance below the floor.
    Adjustment,
}

impl Credit {
    fn kind(self) -> &'static str {
        match self {
            Credit::Topup => "topup",
            Credit::Grant { .. } => "grant",
            Credit::Refund => "refund",
            Credit::Adjustment => "adjustment",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalletError {
    #[error("no wallet \"{0}\"")]
    NotFound(String),
    #[error("no run \"{0}\": no request has carried x-tollgate-run: {0} (a run is created by the first request that names it)")]
    RunNotFound(String),
    #[error("a wallet for {0} already exists")]
    Exists(String),
    #[error("idempotency key \"{0}\" was already used for a different entry")]
    IdempotencyConflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Sql(#[from] crate::db::DbError),
}

pub type Result<T> = std::result::Result<T, WalletError>;

pub const MIGRATION: &str = "
    CREATE TABLE wallets (
        id TEXT PRIMARY KEY,
        owner_kind TEXT NOT NULL,
        owner TEXT NOT NULL,
        balance_micros INTEGER NOT NULL DEFAULT 0,
        floor_micros INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL,
        UNIQUE (owner_kind, owner)
    );
    CREATE TABLE ledger (
        -- The rowid: monotonic because nothing is ever deleted from the ledger, and without
        -- AUTOINCREMENT's extra write to sqlite_sequence on every entry.
        seq INTEGER PRIMARY KEY,
        wallet_id TEXT NOT NULL REFERENCES wallets(id),
        kind TEXT NOT NULL,
        amount_micros INTEGER NOT NULL,
        idempotency_key TEXT NOT NULL,
        request_id TEXT,
        expires_ms INTEGER,
        note TEXT,
        ts_ms INTEGER NOT NULL,
        UNIQUE (wallet_id, idempotency_key)
    );
    CREATE INDEX ledger_request ON ledger(request_id);
    CREATE TABLE holds (
        id TEXT PRIMARY KEY,
        wallet_id TEXT NOT NULL REFERENCES wallets(id),
        amount_micros INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        captured_micros INTEGER,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX holds_open ON holds(state, expires_ms);
    CREATE TABLE grants (
        id TEXT PRIMARY KEY,
        wallet_id TEXT NOT NULL REFERENCES wallets(id),
        amount_micros INTEGER NOT NULL,
        remaining_micros INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL
    );
    CREATE INDEX grants_wallet ON grants(wallet_id, expires_ms);
    ALTER TABLE keys ADD COLUMN org TEXT;
";

/// Applied after `MIGRATION` (a later schema version).
pub const MIGRATION_LOW_BALANCE: &str =
    "ALTER TABLE wallets ADD COLUMN low_balance_micros INTEGER;";

/// Counts every change of a wallet's balance, so Redis can tell a newer balance from an older
/// one whatever order they arrive in (hot wallets, ADR 0013).
pub const MIGRATION_VERSION: &str =
    "ALTER TABLE wallets ADD COLUMN version INTEGER NOT NULL DEFAULT 0;";

const WALLET_COLUMNS: &str = "id, owner_kind, owner, balance_micros, floor_micros, created_ms,
    CAST((SELECT COALESCE(SUM(amount_micros), 0) FROM holds h
          WHERE h.wallet_id = wallets.id AND h.state = 'held') AS BIGINT),
    low_balance_micros";

fn wallet_from_row(r: &Row) -> Result<Wallet> {
    let kind: String = r.get(1)?;
    Ok(Wallet {
        id: r.get(0)?,
        owner_kind: OwnerKind::parse(&kind).unwrap_or(OwnerKind::Org),
        owner: r.get(2)?,
        balance_micros: r.get(3)?,
        floor_micros: r.get(4)?,
        created_ms: r.get(5)?,
        held_micros: r.get(6)?,
        low_balance_micros: r.get(7)?,
    })
}

const ENTRY_COLUMNS: &str =
    "seq, wallet_id, kind, amount_micros, idempotency_key, request_id, expires_ms, note, ts_ms";

fn entry_from_row(r: &Row) -> Result<Entry> {
    Ok(Entry {
        seq: r.get(0)?,
        wallet_id: r.get(1)?,
        kind: r.get(2)?,
        amount_micros: r.get(3)?,
        idempotency_key: r.get(4)?,
        request_id: r.get(5)?,
        expires_ms: r.get(6)?,
        note: r.get(7)?,
        ts_ms: r.get(8)?,
    })
}

pub fn new_wallet_id() -> String {
    format!("wal_{:016x}", rand::random::<u64>())
}

/// Sets a wallet's floor and low-balance alert (None leaves the alert off).
pub fn configure(
    tx: &mut Db,
    id: &str,
    floor_micros: i64,
    low_balance_micros: Option<i64>,
) -> Result<Wallet> {
    let w = get(tx, id)?;
    if w.balance_micros < floor_micros {
        return Err(WalletError::Invalid(format!(
            "the balance ({}) is below that floor ({})",
            usd(w.balance_micros),
            usd(floor_micros)
        )));
    }
    tx.exec(
        "UPDATE wallets SET floor_micros = ?2, low_balance_micros = ?3 WHERE id = ?1",
        &[&id, &floor_micros, &low_balance_micros],
    )?;
    get(tx, id)
}

pub fn create(
    tx: &mut Db,
    owner_kind: OwnerKind,
    owner: &str,
    floor_micros: i64,
    now_ms: i64,
) -> Result<Wallet> {
    let id = new_wallet_id();
    let n = tx.exec(
        "INSERT INTO wallets (id, owner_kind, owner, floor_micros, created_ms)
         VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT DO NOTHING",
        &[&id, &owner_kind.as_str(), &owner, &floor_micros, &now_ms],
    )?;
    if n == 0 {
        return Err(WalletError::Exists(format!(
            "{}:{owner}",
            owner_kind.as_str()
        )));
    }
    get(tx, &id)
}

pub fn get(db: &mut Db, id: &str) -> Result<Wallet> {
    db.row(
        &format!("SELECT {WALLET_COLUMNS} FROM wallets WHERE id = ?1"),
        &[&id],
    )?
    .map(|r| wallet_from_row(&r))
    .transpose()?
    .ok_or_else(|| WalletError::NotFound(id.to_string()))
}

/// (balance, floor, low-balance alert): what settling needs, without summing the open holds.
fn balance_and_floor(db: &mut Db, id: &str) -> Result<(i64, i64, Option<i64>)> {
    let r = db
        .row(
            "SELECT balance_micros, floor_micros, low_balance_micros FROM wallets WHERE id = ?1",
            &[&id],
        )?
        .ok_or_else(|| WalletError::NotFound(id.to_string()))?;
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// By id, or by `kind:owner` (e.g. `team:search`).
pub fn find(db: &mut Db, id_or_owner: &str) -> Result<Wallet> {
    if let Some((kind, owner)) = id_or_owner.split_once(':') {
        if let Some(kind) = OwnerKind::parse(kind) {
            return db
                .row(
                    &format!(
                        "SELECT {WALLET_COLUMNS} FROM wallets WHERE owner_kind = ?1 AND owner = ?2"
                    ),
                    &[&kind.as_str(), &owner],
                )?
                .map(|r| wallet_from_row(&r))
                .transpose()?
                .ok_or_else(|| WalletError::NotFound(id_or_owner.to_string()));
        }
    }
    get(db, id_or_owner)
}

pub fn list(db: &mut Db) -> Result<Vec<Wallet>> {
    db.rows(
        &format!("SELECT {WALLET_COLUMNS} FROM wallets ORDER BY created_ms, id"),
        &[],
    )?
    .iter()
    .map(wallet_from_row)
    .collect()
}

pub fn entries(db: &mut Db, wallet_id: &str, limit: u32) -> Result<Vec<Entry>> {
    db.rows(
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM ledger WHERE wallet_id = ?1 ORDER BY seq DESC LIMIT ?2"
        ),
        &[&wallet_id, &limit],
    )?
    .iter()
    .map(entry_from_row)
    .collect()
}

/// Appends an entry and moves the balance by its amount; `false` if an entry with this
/// idempotency key exists already (then nothing changes).
#[allow(clippy::too_many_arguments)]
fn append(
    tx: &mut Db,
    wallet_id: &str,
    kind: &str,
    amount: i64,
    idem: &str,
    request_id: Option<&str>,
    expires_ms: Option<i64>,
    note: Option<&str>,
    now_ms: i64,
) -> Result<bool> {
    let n = tx.exec(
        "INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key,
                             request_id, expires_ms, note, ts_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
        &[
            &wallet_id,
            &kind,
            &amount,
            &idem,
            &request_id,
            &expires_ms,
            &note,
            &now_ms,
        ],
    )?;
    if n == 0 {
        return Ok(false);
    }
    tx.exec(
        "UPDATE wallets SET balance_micros = balance_micros + ?2, version = version + 1
         WHERE id = ?1",
        &[&wallet_id, &amount],
    )?;
    Ok(true)
}

fn entry_by_key(tx: &mut Db, wallet_id: &str, idem: &str) -> Result<Option<Entry>> {
    tx.row(
        &format!(
            "SELECT {ENTRY_COLUMNS} FROM ledger WHERE wallet_id = ?1 AND idempotency_key = ?2"
        ),
        &[&wallet_id, &idem],
    )?
    .map(|r| entry_from_row(&r))
    .transpose()
}

/// An operator's credit (or adjustment). Replaying the same idempotency key returns the
/// first entry and changes nothing; the same key with another amount or kind is refused.
pub fn credit(
    tx: &mut Db,
    wallet_id: &str,
    credit: Credit,
    amount: i64,
    idem: &str,
    note: Option<&str>,
    now_ms: i64,
) -> Result<(Entry, bool)> {
    let w = get(tx, wallet_id)?;
    if amount == 0 || (credit != Credit::Adjustment && amount < 0) {
        return Err(WalletError::Invalid(
            "the amount must be positive (an adjustment: non-zero)".into(),
        ));
    }
    if amount.unsigned_abs() > MAX_MICROS as u64 {
        return Err(WalletError::Invalid(format!(
            "the amount is larger than the ledger takes (at most ${})",
            usd(MAX_MICROS)
        )));
    }
    // Open holds come back to the balance when they settle, so they count as held money.
    let held = if amount > 0 {
        tx.one(
            "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM holds
             WHERE wallet_id = ?1 AND state = 'held'",
            &[&wallet_id],
        )?
        .get::<i64>(0)?
    } else {
        0
    };
    if amount > 0 && w.balance_micros.saturating_add(held).saturating_add(amount) > MAX_MICROS {
        if let Some(e) = entry_by_key(tx, wallet_id, idem)? {
            return replayed(e, credit.kind(), amount);
        }
        return Err(WalletError::Invalid(format!(
            "a credit of ${} would take the balance (${}) past the most a wallet holds (${})",
            usd(amount),
            usd(w.balance_micros),
            usd(MAX_MICROS)
        )));
    }
    if amount < 0 && w.balance_micros + amount < w.floor_micros {
        if let Some(e) = entry_by_key(tx, wallet_id, idem)? {
            return replayed(e, credit.kind(), amount);
        }
        return Err(WalletError::Invalid(format!(
            "an adjustment of {amount} would take the balance ({}) below the floor ({})",
            w.balance_micros, w.floor_micros
        )));
    }
    let expires = match credit {
        Credit::Grant { expires_ms } => Some(expires_ms),
        _ => None,
    };
    let applied = append(
        tx,
        wallet_id,
        credit.kind(),
        amount,
        idem,
        None,
        expires,
        note,
        now_ms,
    )?;
    let entry = entry_by_key(tx, wallet_id, idem)?
        .ok_or_else(|| WalletError::Invalid("the entry vanished".into()))?;
    if !applied {
        return replayed(entry, credit.kind(), amount);
    }
    if let Credit::Grant { expires_ms } = credit {
        tx.exec(
            "INSERT INTO grants (id, wallet_id, amount_micros, remaining_micros, expires_ms)
             VALUES (?1, ?2, ?3, ?3, ?4)",
            &[
                &format!("grant:{}", entry.seq),
                &wallet_id,
                &amount,
                &expires_ms,
            ],
        )?;
    }
    Ok((entry, true))
}

fn replayed(e: Entry, kind: &str, amount: i64) -> Result<(Entry, bool)> {
    if e.kind != kind || e.amount_micros != amount {
        return Err(WalletError::IdempotencyConflict(e.idempotency_key));
    }
    Ok((e, false))
}

/// The result of trying to hold money for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// Held; the available balance after it.
    Held { balance_micros: i64 },
    /// The wallet cannot cover it without passing its floor.
    Insufficient {
        balance_micros: i64,
        floor_micros: i64,
    },
}

/// Holds `amount` for `request_id` until `expires_ms`, or refuses. One conditional UPDATE:
/// two concurrent holds can never both pass the floor. Holding twice for one request id
/// returns the first hold.
pub fn hold(
    tx: &mut Db,
    wallet_id: &str,
    request_id: &str,
    amount: i64,
    expires_ms: i64,
    now_ms: i64,
) -> Result<Hold> {
    hold_amount_in_range(amount)?;
    if tx
        .row("SELECT 1 FROM holds WHERE id = ?1", &[&request_id])?
        .is_some()
    {
        let (balance_micros, _, _) = balance_and_floor(tx, wallet_id)?;
        return Ok(Hold::Held { balance_micros });
    }
    let after = tx.row(
        "UPDATE wallets SET balance_micros = balance_micros - ?2, version = version + 1
         WHERE id = ?1 AND balance_micros - ?2 >= floor_micros
         RETURNING balance_micros",
        &[&wallet_id, &amount],
    )?;
    let Some(after) = after else {
        let (balance_micros, floor_micros, _) = balance_and_floor(tx, wallet_id)?;
        return Ok(Hold::Insufficient {
            balance_micros,
            floor_micros,
        });
    };
    let balance: i64 = after.get(0)?;
    tx.exec(
        "INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key, request_id,
                             expires_ms, ts_ms)
         VALUES (?1, 'hold', ?2, ?3, ?4, ?5, ?6)",
        &[
            &wallet_id,
            &-amount,
            &format!("hold:{request_id}"),
            &request_id,
            &expires_ms,
            &now_ms,
        ],
    )?;
    tx.exec(
        "INSERT INTO holds (id, wallet_id, amount_micros, expires_ms, state, created_ms)
         VALUES (?1, ?2, ?3, ?4, 'held', ?5)",
        &[&request_id, &wallet_id, &amount, &expires_ms, &now_ms],
    )?;
    Ok(Hold::Held {
        balance_micros: balance,
    })
}

pub(crate) fn hold_amount_in_range(amount: i64) -> Result<()> {
    if !(0..=MAX_MICROS).contains(&amount) {
        return Err(WalletError::Invalid(format!(
            "a hold of {amount} micro-USD is outside what the ledger takes (0 to {MAX_MICROS})"
        )));
    }
    Ok(())
}

/// One hold of a group placed by `hold_group`.
pub struct HoldArgs<'a> {
    pub wallet_id: &'a str,
    pub request_id: &'a str,
    pub amount: i64,
    pub expires_ms: i64,
}

/// `hold` for each of a group, in order, with the same decisions. On PostgreSQL each hold
/// is one statement (the idempotency check, the conditional UPDATE and both inserts as
/// data-modifying CTEs) and the group is pipelined: one round trip for all of them instead
/// of four per hold. Statements in a pipeline run one after another in the transaction, so
/// each sees the balance the previous one left and two holds still cannot both pass a floor.
/// A database error fails the whole group (the transaction is rolled back by the caller).
pub fn hold_group(tx: &mut Db, holds: &[HoldArgs], now_ms: i64) -> Result<Vec<Result<Hold>>> {
    if tx.dialect() != crate::db::Dialect::Postgres {
        return Ok(holds
            .iter()
            .map(|h| {
                hold(
                    tx,
                    h.wallet_id,
                    h.request_id,
                    h.amount,
                    h.expires_ms,
                    now_ms,
                )
            })
            .collect());
    }
    const SQL: &str = "WITH dup AS (SELECT 1 FROM holds WHERE id = ?2::text),
         upd AS (UPDATE wallets SET balance_micros = balance_micros - ?3::int8,
                                    version = version + 1
                 WHERE id = ?1::text AND balance_micros - ?3::int8 >= floor_micros
                   AND NOT EXISTS (SELECT 1 FROM dup)
                 RETURNING balance_micros),
         led AS (INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key,
                                     request_id, expires_ms, ts_ms)
                 SELECT ?1::text, 'hold', -?3::int8, 'hold:' || ?2::text, ?2::text,
                        ?4::int8, ?5::int8 FROM upd),
         ins AS (INSERT INTO holds (id, wallet_id, amount_micros, expires_ms, state, created_ms)
                 SELECT ?2::text, ?1::text, ?3::int8, ?4::int8, 'held', ?5::int8 FROM upd)
         SELECT (SELECT balance_micros FROM upd), EXISTS (SELECT 1 FROM dup),
                w.balance_micros, w.floor_micros
         FROM wallets w WHERE w.id = ?1::text";
    let mut out: Vec<Option<Result<Hold>>> = Vec::with_capacity(holds.len());
    let mut sets = Vec::with_capacity(holds.len());
    for h in holds {
        match hold_amount_in_range(h.amount) {
            Ok(()) => {
                out.push(None);
                sets.push(vec![
                    crate::db::Value::Text(h.wallet_id.to_string()),
                    crate::db::Value::Text(h.request_id.to_string()),
                    crate::db::Value::Int(h.amount),
                    crate::db::Value::Int(h.expires_ms),
                    crate::db::Value::Int(now_ms),
                ]);
            }
            Err(e) => out.push(Some(Err(e))),
        }
    }
    let mut answers = tx.pipeline(SQL, &sets)?.into_iter();
    for (slot, h) in out.iter_mut().zip(holds) {
        if slot.is_some() {
            continue;
        }
        let rows = answers.next().unwrap_or_default();
        let decided = match rows.first() {
            None => Err(WalletError::NotFound(h.wallet_id.to_string())),
            Some(r) => (|| -> Result<Hold> {
                let (after, dup): (Option<i64>, bool) = (r.get(0)?, r.get(1)?);
                let (balance_micros, floor_micros): (i64, i64) = (r.get(2)?, r.get(3)?);
                Ok(match after {
                    Some(balance_micros) => Hold::Held { balance_micros },
                    None if dup => Hold::Held { balance_micros },
                    None => Hold::Insufficient {
                        balance_micros,
                        floor_micros,
                    },
                })
            })(),
        };
        *slot = Some(decided);
    }
    Ok(out.into_iter().flatten().collect())
}

/// (balance, floor, version) of one wallet: what Redis loads.
pub fn state(db: &mut Db, id: &str) -> Result<(i64, i64, i64)> {
    let r = db
        .row(
            "SELECT balance_micros, floor_micros, version FROM wallets WHERE id = ?1",
            &[&id],
        )?
        .ok_or_else(|| WalletError::NotFound(id.to_string()))?;
    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
}

/// (id, balance, floor, version) of every wallet: what reconciliation pushes to Redis.
pub fn states(db: &mut Db) -> Result<Vec<(String, i64, i64, i64)>> {
    db.rows(
        "SELECT id, balance_micros, floor_micros, version FROM wallets",
        &[],
    )?
    .iter()
    .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
    .collect()
}

/// What settling a hold did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Settled {
    pub captured_micros: i64,
    /// Cost the wallet could not pay without passing its floor (never captured).
    pub shortfall_micros: i64,
    /// This capture took the balance below the wallet's low-balance alert: (wallet, balance).
    pub low_balance: Option<(String, i64)>,
}

/// Releases the request's hold and captures its actual cost, at most down to the floor.
/// Idempotent: a settled hold is left alone (`None`), so a replayed usage batch or a retried
/// settle never captures twice. A hold that already expired is not released again.
pub fn settle(
    tx: &mut Db,
    request_id: &str,
    cost_micros: i64,
    now_ms: i64,
) -> Result<Option<Settled>> {
    let Some(hold) = tx.row(
        "SELECT wallet_id, amount_micros, state FROM holds WHERE id = ?1",
        &[&request_id],
    )?
    else {
        return Ok(None);
    };
    let (wallet_id, amount, state): (String, i64, String) =
        (hold.get(0)?, hold.get(1)?, hold.get(2)?);
    if state == "settled" {
        return Ok(None);
    }
    let release = (state == "held").then_some(amount);
    let s = book(
        tx,
        &wallet_id,
        request_id,
        None,
        release,
        cost_micros,
        now_ms,
    )?;
    tx.exec(
        "UPDATE holds SET state = 'settled', captured_micros = ?2 WHERE id = ?1",
        &[&request_id, &s.captured_micros],
    )?;
    Ok(Some(s))
}

/// Settles a hold that Redis admitted (hot wallets), recording it at the same time: the same
/// ledger entries as `hold` + `settle` (hold, release, capture) and the same hold row, with
/// no floor check of the hold's own — Redis made that decision, and the capture still never
/// passes the floor. Idempotent through the hold row.
pub fn settle_hot(
    tx: &mut Db,
    wallet_id: &str,
    request_id: &str,
    amount: i64,
    cost_micros: i64,
    now_ms: i64,
) -> Result<Option<Settled>> {
    let new = tx.exec(
        "INSERT INTO holds (id, wallet_id, amount_micros, expires_ms, state, created_ms)
         VALUES (?1, ?2, ?3, ?4, 'settled', ?4) ON CONFLICT DO NOTHING",
        &[&request_id, &wallet_id, &amount, &now_ms],
    )?;
    if new == 0 {
        return settle(tx, request_id, cost_micros, now_ms);
    }
    let s = book(
        tx,
        wallet_id,
        request_id,
        Some(amount),
        None,
        cost_micros,
        now_ms,
    )?;
    tx.exec(
        "UPDATE holds SET captured_micros = ?2 WHERE id = ?1",
        &[&request_id, &s.captured_micros],
    )?;
    Ok(Some(s))
}

/// One settle of a group settled by `settle_group`.
pub struct SettleArgs<'a> {
    pub request_id: &'a str,
    pub cost_micros: i64,
    /// A hold Redis admitted (hot wallets): its wallet and amount, recorded as it settles.
    pub hot: Option<(&'a str, i64)>,
}

/// `settle` (or `settle_hot`) for each of a group, in order, with the same outcome. On
/// PostgreSQL each settle is one statement and the group is pipelined, instead of five round
/// trips per settle; the statements run one after another, so each sees the balance the one
/// before it left and a capture still never passes the floor. Grants are drawn on after the
/// group, in the same order: only grants change what drawing on them does, so the result is
/// the one a settle-by-settle loop gives. A database error (or a hold whose wallet is gone)
/// fails the whole group, as it fails the batch it belongs to.
pub fn settle_group(
    tx: &mut Db,
    settles: &[SettleArgs],
    now_ms: i64,
) -> Result<Vec<Option<Settled>>> {
    if tx.dialect() != crate::db::Dialect::Postgres {
        if settles.len() > 1 && settles.iter().all(|s| s.hot.is_some()) {
            if let Some(done) = settle_hot_set(tx, settles, now_ms)? {
                return Ok(done);
            }
        }
        return settles
            .iter()
            .map(|s| match s.hot {
                Some((wallet, amount)) => {
                    settle_hot(tx, wallet, s.request_id, amount, s.cost_micros, now_ms)
                }
                None => settle(tx, s.request_id, s.cost_micros, now_ms),
            })
            .collect();
    }
    if settles.iter().all(|s| s.hot.is_none()) {
        if let Some(done) = settle_set(tx, settles, now_ms)? {
            return Ok(done);
        }
    }
    // `src` is what settling does (a hot hold recorded now, or a store hold's release), `k`
    // what it captures; the ledger insert's RETURNING moves the balance, so an entry that
    // somehow existed already is not counted twice (as in `book`).
    const SQL: &str = "WITH old AS (SELECT wallet_id, amount_micros, state FROM holds
                     WHERE id = ?1::text),
         src AS (SELECT ?2::text AS wallet_id, ?3::int8 AS hot, NULL::int8 AS rel
                 WHERE ?3::int8 IS NOT NULL AND NOT EXISTS (SELECT 1 FROM old)
                 UNION ALL
                 SELECT wallet_id, NULL::int8,
                        CASE WHEN state = 'held' THEN amount_micros END
                 FROM old WHERE state <> 'settled'),
         k AS (SELECT s.wallet_id, s.hot, s.rel,
                      w.balance_micros + COALESCE(s.rel, 0) AS before,
                      w.low_balance_micros AS low,
                      LEAST(?4::int8, GREATEST(w.balance_micros + COALESCE(s.rel, 0)
                                               - w.floor_micros, 0)) AS captured,
                      EXISTS (SELECT 1 FROM grants g WHERE g.wallet_id = w.id
                              AND g.remaining_micros > 0 AND g.expires_ms > ?5::int8) AS grants
               FROM src s JOIN wallets w ON w.id = s.wallet_id),
         hi AS (INSERT INTO holds (id, wallet_id, amount_micros, expires_ms, state,
                                   created_ms, captured_micros)
                SELECT ?1::text, wallet_id, hot, ?5::int8, 'settled', ?5::int8, captured
                FROM k WHERE hot IS NOT NULL),
         hu AS (UPDATE holds SET state = 'settled', captured_micros = k.captured FROM k
                WHERE holds.id = ?1::text AND k.hot IS NULL),
         e AS (SELECT 1 AS ord, wallet_id, 'hold' AS kind, -hot AS amount,
                      'hold:' || ?1::text AS idem FROM k WHERE hot IS NOT NULL
               UNION ALL SELECT 2, wallet_id, 'release', hot, 'release:' || ?1::text
                         FROM k WHERE hot IS NOT NULL
               UNION ALL SELECT 2, wallet_id, 'release', rel, 'release:' || ?1::text
                         FROM k WHERE rel IS NOT NULL
               UNION ALL SELECT 3, wallet_id, 'capture', -captured, 'capture:' || ?1::text
                         FROM k WHERE captured > 0),
         ins AS (INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key,
                                     request_id, ts_ms)
                 SELECT wallet_id, kind, amount, idem, ?1::text, ?5::int8 FROM e ORDER BY ord
                 ON CONFLICT DO NOTHING RETURNING amount_micros),
         d AS (SELECT CAST(COALESCE(SUM(amount_micros), 0) AS int8) AS delta FROM ins),
         wu AS (UPDATE wallets SET balance_micros = balance_micros + d.delta,
                                   version = version + 1
                FROM d, k WHERE wallets.id = k.wallet_id AND d.delta <> 0)
         SELECT s.wallet_id, k.captured, k.before, k.low, k.grants
         FROM src s LEFT JOIN k ON true";
    use crate::db::Value;
    let sets: Vec<Vec<Value>> = settles
        .iter()
        .map(|s| {
            vec![
                Value::Text(s.request_id.to_string()),
                s.hot
                    .map_or(Value::Null, |(w, _)| Value::Text(w.to_string())),
                s.hot.map_or(Value::Null, |(_, a)| Value::Int(a)),
                Value::Int(s.cost_micros.clamp(0, MAX_MICROS)),
                Value::Int(now_ms),
            ]
        })
        .collect();
    let answers = tx.pipeline(SQL, &sets)?;
    let mut out = Vec::with_capacity(settles.len());
    for (rows, s) in answers.iter().zip(settles) {
        let Some(r) = rows.first() else {
            out.push(None);
            continue;
        };
        let wallet_id: String = r.get(0)?;
        let Some(captured) = r.get::<Option<i64>>(1)? else {
            return Err(WalletError::NotFound(wallet_id));
        };
        out.push(Some(BookedRow {
            wallet_id,
            cost: s.cost_micros.clamp(0, MAX_MICROS),
            captured,
            before: r.get(2)?,
            low: r.get(3)?,
            grants: r.get(4)?,
        }));
    }
    finish_group(tx, out, now_ms)
}

/// SQLite: a group of settles of holds admitted outside the store (hot wallets, the hold
/// book) with each wallet read and updated once instead of once per settle, when the outcome
/// is plainly the one settling one by one reaches: no request id twice, every wallet exists
/// and has no grant to draw on, and none of the holds is recorded yet. The captures are
/// clamped at each wallet's floor in the group's order, and the ledger gets each request's
/// hold, release and capture in that order, as one by one. Rows go in as one-row statements,
/// each prepared once: SQLite runs them faster per row than multi-row ones (bench/RESULTS.md,
/// runs J and U). `None` (nothing written) otherwise: the caller settles one by one.
fn settle_hot_set(
    tx: &mut Db,
    settles: &[SettleArgs],
    now_ms: i64,
) -> Result<Option<Vec<Option<Settled>>>> {
    use crate::db::Value;
    let mut ids = std::collections::HashSet::with_capacity(settles.len());
    if !settles.iter().all(|s| ids.insert(s.request_id)) {
        return Ok(None);
    }
    let Some(hot): Option<Vec<(&str, i64)>> = settles.iter().map(|s| s.hot).collect() else {
        return Ok(None);
    };
    // (balance as the group goes, floor, low-balance alert) per wallet.
    let mut wallets: Vec<(&str, i64, i64, Option<i64>)> = Vec::new();
    for &(w, amount) in &hot {
        hold_amount_in_range(amount)?;
        if wallets.iter().any(|x| x.0 == w) {
            continue;
        }
        let Some(r) = tx.row(
            "SELECT balance_micros, floor_micros, low_balance_micros,
                    EXISTS (SELECT 1 FROM grants g WHERE g.wallet_id = w.id
                            AND g.remaining_micros > 0 AND g.expires_ms > ?2)
             FROM wallets w WHERE id = ?1",
            &[&w, &now_ms],
        )?
        else {
            return Ok(None);
        };
        if r.get::<bool>(3)? {
            return Ok(None);
        }
        wallets.push((w, r.get(0)?, r.get(1)?, r.get(2)?));
    }
    let mut booked = Vec::with_capacity(settles.len());
    let mut holds: Vec<[Value; 7]> = Vec::with_capacity(settles.len());
    // Each ledger row with the wallet and amount it moves.
    let mut entries: Vec<([Value; 6], &str, i64)> = Vec::with_capacity(settles.len() * 3);
    for (s, &(w, amount)) in settles.iter().zip(&hot) {
        let Some(at) = wallets.iter_mut().find(|x| x.0 == w) else {
            return Ok(None);
        };
        let cost = s.cost_micros.clamp(0, MAX_MICROS);
        let before = at.1;
        let captured = cost.min((before - at.2).max(0));
        at.1 = before - captured;
        holds.push([
            Value::Text(s.request_id.to_string()),
            Value::Text(w.to_string()),
            Value::Int(amount),
            Value::Int(captured),
            Value::Int(now_ms),
            Value::Int(now_ms),
            Value::Text("settled".into()),
        ]);
        let mut entry = |kind: &str, amount: i64| {
            let row = [
                Value::Text(w.to_string()),
                Value::Text(kind.to_string()),
                Value::Int(amount),
                Value::Text(format!("{kind}:{}", s.request_id)),
                Value::Text(s.request_id.to_string()),
                Value::Int(now_ms),
            ];
            entries.push((row, w, amount));
        };
        entry("hold", -amount);
        entry("release", amount);
        if captured > 0 {
            entry("capture", -captured);
        }
        booked.push(Some(BookedRow {
            wallet_id: w.to_string(),
            cost,
            captured,
            before,
            low: at.3,
            grants: false,
        }));
    }
    let written = tx.savepoint(
        |sp| -> Result<bool> {
            for h in &holds {
                // A hold recorded already (a replayed batch, a store hold of an earlier
                // mode) needs `settle`'s care: then this group goes one by one instead.
                if sp.exec_values(
                    "INSERT INTO holds (id, wallet_id, amount_micros, captured_micros,
                                        expires_ms, created_ms, state)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT DO NOTHING",
                    h,
                )? != 1
                {
                    return Ok(false);
                }
            }
            let mut deltas: Vec<(&str, i64)> = Vec::new();
            for (e, w, amount) in &entries {
                // What was inserted moves the balance, as in `book`.
                if sp.exec_values(
                    "INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key,
                                         request_id, ts_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                    e,
                )? == 1
                {
                    match deltas.iter_mut().find(|d| d.0 == *w) {
                        Some(d) => d.1 += amount,
                        None => deltas.push((w, *amount)),
                    }
                }
            }
            for (w, delta) in deltas.iter().filter(|d| d.1 != 0) {
                sp.exec(
                    "UPDATE wallets SET balance_micros = balance_micros + ?2,
                                        version = version + 1
                     WHERE id = ?1",
                    &[w, delta],
                )?;
            }
            Ok(true)
        },
        |written| *written,
    )?;
    if !written {
        return Ok(None);
    }
    // No grants in the group: `finish_group` only works out each settle's outcome.
    finish_group(tx, booked, now_ms).map(Some)
}

/// What the store said one settle of a group did.
struct BookedRow {
    wallet_id: String,
    cost: i64,
    captured: i64,
    before: i64,
    low: Option<i64>,
    grants: bool,
}

/// The group's outcome from what the store did; grants drawn on in the group's order.
fn finish_group(
    tx: &mut Db,
    rows: Vec<Option<BookedRow>>,
    now_ms: i64,
) -> Result<Vec<Option<Settled>>> {
    let mut out = Vec::with_capacity(rows.len());
    for b in rows {
        let Some(b) = b else {
            out.push(None);
            continue;
        };
        if b.grants && b.captured > 0 {
            spend_grants(tx, &b.wallet_id, b.captured, now_ms)?;
        }
        let after = b.before - b.captured;
        out.push(Some(Settled {
            captured_micros: b.captured,
            shortfall_micros: b.cost - b.captured,
            low_balance: b
                .low
                .filter(|l| b.before >= *l && after < *l)
                .map(|_| (b.wallet_id, after)),
        }));
    }
    Ok(out)
}

/// PostgreSQL: a group of store-hold settles as one set-based statement, when the outcome
/// is plainly the one settles one by one would reach: no settle is clamped at its wallet's
/// floor (every running balance, in order, stays at or above it), no ledger entry of theirs
/// exists already, every wallet exists, no request id twice. Then every capture is the full
/// cost and the order only matters for the ledger's sequence, which the insert keeps.
/// `None` (nothing written) when any of that does not hold: the caller settles one by one.
fn settle_set(
    tx: &mut Db,
    settles: &[SettleArgs],
    now_ms: i64,
) -> Result<Option<Vec<Option<Settled>>>> {
    let mut seen = std::collections::HashSet::with_capacity(settles.len());
    if settles.len() < 2 || !settles.iter().all(|s| seen.insert(s.request_id)) {
        return Ok(None);
    }
    const SQL: &str = "WITH r AS (SELECT e->>0 AS id, CAST(e->>1 AS int8) AS cost, ord
               FROM jsonb_array_elements(CAST(?1 AS text)::jsonb) WITH ORDINALITY AS t(e, ord)),
         h AS (SELECT r.ord, r.id, r.cost, h.wallet_id, h.state = 'held' AS held,
                      CASE WHEN h.state = 'held' THEN h.amount_micros ELSE 0 END AS rel
               FROM r JOIN holds h ON h.id = r.id WHERE h.state <> 'settled'),
         w AS (SELECT h.*, CAST(wl.balance_micros + SUM(h.rel - h.cost)
                               OVER (PARTITION BY h.wallet_id ORDER BY h.ord) AS int8) AS after,
                      wl.floor_micros AS floor, wl.low_balance_micros AS low,
                      EXISTS (SELECT 1 FROM grants g WHERE g.wallet_id = wl.id
                              AND g.remaining_micros > 0 AND g.expires_ms > ?2::int8) AS grants
               FROM h JOIN wallets wl ON wl.id = h.wallet_id),
         e AS (SELECT ord, 1 AS sub, wallet_id, id, 'release' AS kind, rel AS amount,
                      'release:' || id AS idem FROM w WHERE held
               UNION ALL SELECT ord, 2, wallet_id, id, 'capture', -cost, 'capture:' || id
                         FROM w WHERE cost > 0),
         ok AS (SELECT (SELECT COUNT(*) FROM h) = (SELECT COUNT(*) FROM w)
                   AND NOT EXISTS (SELECT 1 FROM w WHERE after < floor)
                   AND NOT EXISTS (SELECT 1 FROM e JOIN ledger l ON l.wallet_id = e.wallet_id
                                   AND l.idempotency_key = e.idem) AS ok),
         ins AS (INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key,
                                     request_id, ts_ms)
                 SELECT wallet_id, kind, amount, idem, id, ?2::int8 FROM e
                 WHERE (SELECT ok FROM ok) ORDER BY ord, sub
                 ON CONFLICT DO NOTHING RETURNING wallet_id, request_id, amount_micros),
         d AS (SELECT wallet_id, CAST(SUM(delta) AS int8) AS delta,
                      COUNT(*) FILTER (WHERE delta <> 0) AS n
               FROM (SELECT wallet_id, request_id, SUM(amount_micros) AS delta
                     FROM ins GROUP BY wallet_id, request_id) x
               GROUP BY wallet_id),
         wu AS (UPDATE wallets SET balance_micros = balance_micros + d.delta,
                                   version = version + d.n
                FROM d WHERE wallets.id = d.wallet_id AND d.n > 0),
         hu AS (UPDATE holds SET state = 'settled', captured_micros = w.cost FROM w
                WHERE holds.id = w.id AND (SELECT ok FROM ok))
         SELECT ok.ok, w.ord, w.wallet_id, w.after + w.cost, w.cost, w.low, w.grants
         FROM ok LEFT JOIN w ON true ORDER BY w.ord";
    let group: Vec<(&str, i64)> = settles
        .iter()
        .map(|s| (s.request_id, s.cost_micros.clamp(0, MAX_MICROS)))
        .collect();
    let group = serde_json::to_string(&group).map_err(|e| WalletError::Invalid(e.to_string()))?;
    let rows = tx.rows(SQL, &[&group, &now_ms])?;
    if !rows.first().map_or(Ok(false), |r| r.get::<bool>(0))? {
        return Ok(None);
    }
    let mut out: Vec<Option<BookedRow>> = (0..settles.len()).map(|_| None).collect();
    for r in &rows {
        let Some(ord) = r.get::<Option<i64>>(1)? else {
            continue;
        };
        let cost: i64 = r.get(4)?;
        let slot = usize::try_from(ord - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| WalletError::Invalid(format!("settle {ord} out of the group")))?;
        *slot = Some(BookedRow {
            wallet_id: r.get(2)?,
            cost,
            captured: cost,
            before: r.get(3)?,
            low: r.get(5)?,
            grants: r.get(6)?,
        });
    }
    finish_group(tx, out, now_ms).map(Some)
}

/// The ledger side of settling: one read of the wallet, the entries (`hot_hold`: a hold and
/// its release, recorded now; `release`: a store hold given back; the capture), one balance
/// update by what was actually inserted. PostgreSQL settles through `settle_group`'s one
/// statement per settle, not through here, so a statement per entry costs no round trips
/// where they matter.
fn book(
    tx: &mut Db,
    wallet_id: &str,
    request_id: &str,
    hot_hold: Option<i64>,
    release: Option<i64>,
    cost_micros: i64,
    now_ms: i64,
) -> Result<Settled> {
    let w = tx
        .row(
            "SELECT balance_micros, floor_micros, low_balance_micros,
                    CASE WHEN EXISTS (SELECT 1 FROM grants g WHERE g.wallet_id = w.id
                                      AND g.remaining_micros > 0 AND g.expires_ms > ?2)
                         THEN 1 ELSE 0 END
             FROM wallets w WHERE id = ?1",
            &[&wallet_id, &now_ms],
        )?
        .ok_or_else(|| WalletError::NotFound(wallet_id.to_string()))?;
    let (balance, floor, low, grants): (i64, i64, Option<i64>, bool) =
        (w.get(0)?, w.get(1)?, w.get(2)?, w.get(3)?);
    let cost_micros = cost_micros.clamp(0, MAX_MICROS);
    let before = balance + release.unwrap_or(0);
    let captured = cost_micros.min((before - floor).max(0));
    let mut entries: Vec<(&str, i64, String)> = Vec::with_capacity(3);
    if let Some(h) = hot_hold {
        entries.push(("hold", -h, format!("hold:{request_id}")));
        entries.push(("release", h, format!("release:{request_id}")));
    }
    if let Some(r) = release {
        entries.push(("release", r, format!("release:{request_id}")));
    }
    if captured > 0 {
        entries.push(("capture", -captured, format!("capture:{request_id}")));
    }
    if !entries.is_empty() {
        // One prepared one-row statement per entry (SQLite runs them faster than a multi-row
        // one, bench/RESULTS.md run J). What was actually inserted moves the balance: an
        // entry that somehow existed already is not counted twice.
        let mut delta = 0i64;
        for (kind, amount, idem) in &entries {
            if tx.exec(
                "INSERT INTO ledger (wallet_id, kind, amount_micros, idempotency_key, request_id,
                                     ts_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT DO NOTHING",
                &[&wallet_id, kind, amount, idem, &request_id, &now_ms],
            )? == 1
            {
                delta += amount;
            }
        }
        if delta != 0 {
            tx.exec(
                "UPDATE wallets SET balance_micros = balance_micros + ?2, version = version + 1
                 WHERE id = ?1",
                &[&wallet_id, &delta],
            )?;
        }
    }
    if captured > 0 && grants {
        spend_grants(tx, wallet_id, captured, now_ms)?;
    }
    let after = before - captured;
    Ok(Settled {
        captured_micros: captured,
        shortfall_micros: cost_micros.max(0) - captured,
        low_balance: low
            .filter(|l| before >= *l && after < *l)
            .map(|_| (wallet_id.to_string(), after)),
    })
}

/// Spending draws on grants first, the soonest to expire first.
fn spend_grants(tx: &mut Db, wallet_id: &str, mut amount: i64, now_ms: i64) -> Result<()> {
    let grants = tx.rows(
        "SELECT id, remaining_micros FROM grants
         WHERE wallet_id = ?1 AND remaining_micros > 0 AND expires_ms > ?2
         ORDER BY expires_ms, id",
        &[&wallet_id, &now_ms],
    )?;
    for g in grants {
        if amount == 0 {
            break;
        }
        let (id, remaining): (String, i64) = (g.get(0)?, g.get(1)?);
        let take = remaining.min(amount);
        tx.exec(
            "UPDATE grants SET remaining_micros = remaining_micros - ?2 WHERE id = ?1",
            &[&id, &take],
        )?;
        amount -= take;
    }
    Ok(())
}

/// Releases holds past their expiry and removes what is left of expired grants. Returns
/// (holds released, grants expired).
/// (id, wallet, amount) triples from a query.
fn triples(rows: Vec<Row>) -> Result<Vec<(String, String, i64)>> {
    rows.iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .collect()
}

pub fn expire(tx: &mut Db, now_ms: i64) -> Result<(usize, usize)> {
    let holds = triples(tx.rows(
        "SELECT id, wallet_id, amount_micros FROM holds
         WHERE state = 'held' AND expires_ms <= ?1",
        &[&now_ms],
    )?)?;
    for (id, wallet_id, amount) in &holds {
        append(
            tx,
            wallet_id,
            "release",
            *amount,
            &format!("release:{id}"),
            Some(id),
            None,
            Some("hold expired"),
            now_ms,
        )?;
        tx.exec("UPDATE holds SET state = 'expired' WHERE id = ?1", &[id])?;
    }
    let grants = triples(tx.rows(
        "SELECT id, wallet_id, remaining_micros FROM grants
         WHERE remaining_micros > 0 AND expires_ms <= ?1",
        &[&now_ms],
    )?)?;
    for (id, wallet_id, remaining) in &grants {
        let w = get(tx, wallet_id)?;
        // What is left of the grant, but never through the floor: money held right now may
        // be grant money, and the request holding it must still be able to pay.
        let amount = (*remaining).min((w.balance_micros - w.floor_micros).max(0));
        if amount > 0 {
            append(
                tx,
                wallet_id,
                "expire",
                -amount,
                &format!("expire:{id}"),
                None,
                None,
                Some("grant expired"),
                now_ms,
            )?;
        }
        tx.exec(
            "UPDATE grants SET remaining_micros = 0 WHERE id = ?1",
            &[id],
        )?;
    }
    Ok((holds.len(), grants.len()))
}

/// Wallets whose balance differs from the sum of their entries, or is below their floor:
/// (wallet id, balance, sum of entries, floor). Empty when the books are right.
pub fn verify(db: &mut Db) -> Result<Vec<(String, i64, i64, i64)>> {
    let mut out = Vec::new();
    for r in db.rows(
        "SELECT w.id, w.balance_micros,
                CAST((SELECT COALESCE(SUM(amount_micros), 0) FROM ledger l
                      WHERE l.wallet_id = w.id) AS BIGINT),
                w.floor_micros
         FROM wallets w",
        &[],
    )? {
        let (id, bal, sum, floor): (String, i64, i64, i64) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
        if bal != sum || bal < floor {
            out.push((id, bal, sum, floor));
        }
    }
    Ok(out)
}

/// Every wallet's owner, for the gateway's in-memory lookup.
pub fn owners(db: &mut Db) -> Result<Vec<(OwnerKind, String, String)>> {
    let mut out = Vec::new();
    for r in db.rows("SELECT owner_kind, owner, id FROM wallets", &[])? {
        if let Some(k) = OwnerKind::parse(&r.get::<String>(0)?) {
            out.push((k, r.get(1)?, r.get(2)?));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn db() -> Db {
        let mut db = Db::memory().unwrap();
        db.batch("CREATE TABLE keys (id TEXT);").unwrap();
        db.batch(MIGRATION).unwrap();
        db.batch(MIGRATION_LOW_BALANCE).unwrap();
        db.batch(MIGRATION_VERSION).unwrap();
        db
    }

    /// Runs `f` in a committed transaction, whatever it returns.
    fn tx<T>(db: &mut Db, f: impl FnOnce(&mut Db) -> T) -> T {
        db.write(|t| Ok::<_, crate::db::DbError>(f(t))).unwrap()
    }

    #[test]
    fn amounts_parse_exactly() {
        assert_eq!(parse_usd("12.50"), Ok(12_500_000));
        assert_eq!(parse_usd("$0.01"), Ok(10_000));
        assert_eq!(parse_usd("0.000001"), Ok(1));
        assert_eq!(parse_usd("-3"), Ok(-3_000_000));
        assert_eq!(parse_usd(".5"), Ok(500_000));
        assert!(parse_usd("0.0000001").is_err());
        assert!(parse_usd("1e3").is_err());
        assert!(parse_usd("").is_err());
        assert_eq!(usd(-1_500_001), "-1.500001");
    }

    #[test]
    fn a_replayed_topup_adds_once_and_a_conflicting_one_is_refused() {
        let mut c = db();
        let w = tx(&mut c, |t| create(t, OwnerKind::Team, "a", 0, 0)).unwrap();
        let (e1, applied) = tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, 5_000_000, "inv-1", None, 1)
        })
        .unwrap();
        assert!(applied);
        let (e2, applied) = tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, 5_000_000, "inv-1", None, 2)
        })
        .unwrap();
        assert!(!applied);
        assert_eq!(e1, e2);
        assert!(matches!(
            tx(&mut c, |t| credit(
                t,
                &w.id,
                Credit::Topup,
                7,
                "inv-1",
                None,
                3
            )),
            Err(WalletError::IdempotencyConflict(_))
        ));
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 5_000_000);
        assert!(verify(&mut c).unwrap().is_empty());
    }

    /// Settling a group of hot holds at once books what settling them one by one does: the
    /// same captures (one clamped at the floor, one with nothing left), the same ledger in
    /// the same order, the same balances; and a group with a hold already recorded, or a
    /// wallet with a grant, goes one by one.
    #[test]
    fn hot_settles_as_a_group_book_what_one_by_one_does() {
        let run = |grouped: bool, replay: bool, grant: bool| {
            let mut c = db();
            let a = tx(&mut c, |t| create(t, OwnerKind::Key, "a", 0, 0)).unwrap();
            let b = tx(&mut c, |t| create(t, OwnerKind::Team, "b", -5, 0)).unwrap();
            tx(&mut c, |t| {
                credit(t, &a.id, Credit::Topup, 100, "t", None, 1)
            })
            .unwrap();
            tx(&mut c, |t| {
                credit(t, &b.id, Credit::Topup, 30, "t", None, 1)
            })
            .unwrap();
            if grant {
                tx(&mut c, |t| {
                    credit(
                        t,
                        &a.id,
                        Credit::Grant {
                            expires_ms: 1_000_000,
                        },
                        10,
                        "g",
                        None,
                        1,
                    )
                })
                .unwrap();
            }
            if replay {
                tx(&mut c, |t| settle_hot(t, &a.id, "r2", 50, 20, 2)).unwrap();
            }
            let plan = [
                ("r1", &a.id, 50, 40),
                ("r2", &a.id, 50, 20),
                ("r3", &b.id, 40, 33),
                ("r4", &a.id, 50, 70),
                ("r5", &b.id, 10, 9),
                ("r6", &a.id, 10, 0),
            ];
            let args: Vec<SettleArgs> = plan
                .iter()
                .map(|(r, w, h, cost)| SettleArgs {
                    request_id: r,
                    cost_micros: *cost,
                    hot: Some((w.as_str(), *h)),
                })
                .collect();
            let done = if grouped {
                // The set path itself, so that falling back could not pass for it.
                let set = tx(&mut c, |t| settle_hot_set(t, &args, 3)).unwrap();
                assert_eq!(
                    set.is_some(),
                    !replay && !grant,
                    "replay {replay}, grant {grant}"
                );
                match set {
                    Some(done) => done,
                    None => tx(&mut c, |t| settle_group(t, &args, 3)).unwrap(),
                }
            } else {
                args.iter()
                    .map(|s| {
                        let (w, h) = s.hot.unwrap();
                        tx(&mut c, |t| {
                            settle_hot(t, w, s.request_id, h, s.cost_micros, 3)
                        })
                        .unwrap()
                    })
                    .collect()
            };
            let name = |w: String| if w == a.id { "a" } else { "b" };
            let ledger: Vec<(&str, String, i64, Option<String>)> = c
                .rows(
                    "SELECT wallet_id, kind, amount_micros, request_id FROM ledger ORDER BY seq",
                    &[],
                )
                .unwrap()
                .iter()
                .map(|r| {
                    (
                        name(r.get(0).unwrap()),
                        r.get(1).unwrap(),
                        r.get(2).unwrap(),
                        r.get(3).unwrap(),
                    )
                })
                .collect();
            let balances = (
                get(&mut c, &a.id).unwrap().balance_micros,
                get(&mut c, &b.id).unwrap().balance_micros,
            );
            assert!(verify(&mut c).unwrap().is_empty());
            (done, ledger, balances)
        };
        for (replay, grant) in [(false, false), (true, false), (false, true)] {
            let (one, set) = (run(false, replay, grant), run(true, replay, grant));
            assert_eq!(one, set, "replay {replay}, grant {grant}");
        }
        let (done, _, balances) = run(true, false, false);
        let captured: Vec<i64> = done
            .iter()
            .map(|d| d.as_ref().unwrap().captured_micros)
            .collect();
        assert_eq!(captured, vec![40, 20, 33, 40, 2, 0]);
        assert_eq!(balances, (0, -5));
    }

    #[test]
    fn hold_capture_release_and_the_floor() {
        let mut c = db();
        let w = tx(&mut c, |t| create(t, OwnerKind::Key, "k", 0, 0)).unwrap();
        tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, 100, "t", None, 0)
        })
        .unwrap();
        assert_eq!(
            tx(&mut c, |t| hold(t, &w.id, "r1", 60, 1000, 0)).unwrap(),
            Hold::Held { balance_micros: 40 }
        );
        assert_eq!(
            tx(&mut c, |t| hold(t, &w.id, "r2", 60, 1000, 0)).unwrap(),
            Hold::Insufficient {
                balance_micros: 40,
                floor_micros: 0
            }
        );
        let s = tx(&mut c, |t| settle(t, "r1", 25, 1)).unwrap().unwrap();
        assert_eq!(s.captured_micros, 25);
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 75);
        // Settling again changes nothing.
        assert_eq!(tx(&mut c, |t| settle(t, "r1", 25, 2)).unwrap(), None);
        // A cost above what the wallet holds is captured down to the floor, never past it.
        tx(&mut c, |t| hold(t, &w.id, "r3", 10, 1000, 3)).unwrap();
        let s = tx(&mut c, |t| settle(t, "r3", 500, 4)).unwrap().unwrap();
        assert_eq!((s.captured_micros, s.shortfall_micros), (75, 425));
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 0);
        assert!(verify(&mut c).unwrap().is_empty());
    }

    #[test]
    fn expired_holds_come_back_and_grants_run_out() {
        let mut c = db();
        let w = tx(&mut c, |t| create(t, OwnerKind::Org, "o", 0, 0)).unwrap();
        tx(&mut c, |t| {
            credit(
                t,
                &w.id,
                Credit::Grant { expires_ms: 100 },
                50,
                "g",
                None,
                0,
            )
        })
        .unwrap();
        tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, 50, "t", None, 0)
        })
        .unwrap();
        tx(&mut c, |t| hold(t, &w.id, "r1", 30, 10, 0)).unwrap();
        // The gateway died: the hold expires and the money comes back.
        assert_eq!(tx(&mut c, |t| expire(t, 10)).unwrap(), (1, 0));
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 100);
        // A late settle of an expired hold captures without releasing twice.
        tx(&mut c, |t| settle(t, "r1", 20, 11)).unwrap();
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 80);
        // The 20 spent came out of the grant; 30 of it is left to expire.
        assert_eq!(tx(&mut c, |t| expire(t, 100)).unwrap(), (0, 1));
        assert_eq!(get(&mut c, &w.id).unwrap().balance_micros, 50);
        assert!(verify(&mut c).unwrap().is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Hold(u8, i64),
        Settle(u8, i64),
        Topup(i64),
        Grant(i64, i64),
        Expire(i64),
        Adjust(i64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..16, 0i64..400).prop_map(|(r, a)| Op::Hold(r, a)),
            (0u8..16, 0i64..600).prop_map(|(r, a)| Op::Settle(r, a)),
            (1i64..300).prop_map(Op::Topup),
            (1i64..300, 0i64..50).prop_map(|(a, e)| Op::Grant(a, e)),
            (0i64..60).prop_map(Op::Expire),
            (-300i64..300).prop_map(Op::Adjust),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any interleaving of holds, settles (captures and releases), top-ups, grants,
        /// expiries and adjustments keeps the balance equal to the sum of the entries and
        /// never below the floor; and no request is captured twice.
        #[test]
        fn the_books_always_balance(
            ops in prop::collection::vec(op(), 1..80),
            floor in -200i64..=0,
        ) {
            let mut c = db();
            let w = tx(&mut c, |t| create(t, OwnerKind::Team, "p", floor, 0)).unwrap();
            let mut now = 0i64;
            for (i, o) in ops.iter().enumerate() {
                now += 1;
                if let Op::Expire(dt) = o {
                    now += dt;
                }
                let _ = tx(&mut c, |t| match o {
                    Op::Hold(r, a) => hold(t, &w.id, &format!("r{r}"), *a, now + 20, now).map(|_| ()),
                    Op::Settle(r, a) => settle(t, &format!("r{r}"), *a, now).map(|_| ()),
                    Op::Topup(a) => credit(t, &w.id, Credit::Topup, *a, &format!("t{i}"), None, now).map(|_| ()),
                    Op::Grant(a, e) => credit(t, &w.id, Credit::Grant { expires_ms: now + e }, *a, &format!("g{i}"), None, now).map(|_| ()),
                    Op::Expire(_) => expire(t, now).map(|_| ()),
                    Op::Adjust(a) => credit(t, &w.id, Credit::Adjustment, *a, &format!("a{i}"), None, now).map(|_| ()),
                });
                prop_assert!(verify(&mut c).unwrap().is_empty(), "after {o:?}: {:?}", get(&mut c, &w.id));
            }
            let captures: i64 = c.one(
                "SELECT COUNT(*) - COUNT(DISTINCT request_id) FROM ledger WHERE kind = 'capture'",
                &[]).unwrap().get(0).unwrap();
            prop_assert_eq!(captures, 0);
        }
    }

    /// Small amounts, the ledger's bounds and the integer extremes around them.
    fn amount() -> impl Strategy<Value = i64> {
        prop_oneof![
            0i64..1_000,
            Just(MAX_MICROS),
            Just(MAX_MICROS + 1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(i64::MIN + 1),
            any::<i64>(),
        ]
    }

    fn huge_u64() -> impl Strategy<Value = u64> {
        prop_oneof![
            0u64..10_000,
            Just(u64::MAX),
            Just(u64::MAX / 2),
            any::<u64>()
        ]
    }

    #[derive(Debug)]
    enum Big {
        /// A request quoted from hostile token counts and prices, then held.
        Quote(u8, u64, u64, u64, u64),
        Settle(u8, i64),
        Topup(i64),
        Adjust(i64),
        ParsedTopup(String),
    }

    fn big() -> impl Strategy<Value = Big> {
        prop_oneof![
            (0u8..8, huge_u64(), huge_u64(), huge_u64(), huge_u64())
                .prop_map(|(r, a, b, c, d)| Big::Quote(r, a, b, c, d)),
            (0u8..8, amount()).prop_map(|(r, a)| Big::Settle(r, a)),
            amount().prop_map(Big::Topup),
            amount().prop_map(Big::Adjust),
            prop_oneof![
                Just("9223372036854.775807".to_string()),
                Just("1000000000".to_string()),
                Just("1000000000.000001".to_string()),
                Just("99999999999999999999999".to_string()),
                "[0-9]{1,25}(\\.[0-9]{1,6})?",
            ]
            .prop_map(Big::ParsedTopup),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Hostile magnitudes through quote, hold, settle and top-up: every operation either
        /// applies or is refused as invalid (never an SQL overflow), the balance always equals
        /// the sum of its entries and never drops below the floor, and what is available never
        /// exceeds what was credited.
        #[test]
        fn huge_values_never_break_the_books(ops in prop::collection::vec(big(), 1..60)) {
            let mut c = db();
            let w = tx(&mut c, |t| create(t, OwnerKind::Team, "p", 0, 0)).unwrap();
            for (i, o) in ops.iter().enumerate() {
                let now = i as i64 + 1;
                let r = tx(&mut c, |t| match o {
                    Big::Quote(r, it, ot, ip, op) => {
                        let q = crate::proxy::Quote::new(*it, *ot, *ip, *op);
                        assert!(q.cost_micros <= MAX_MICROS as u64);
                        let amount = i64::try_from(q.cost_micros).expect("a quote fits i64");
                        hold(t, &w.id, &format!("r{r}"), amount, now + 1_000, now).map(|_| ())
                    }
                    Big::Settle(r, a) => settle(t, &format!("r{r}"), *a, now).map(|_| ()),
                    Big::Topup(a) => credit(t, &w.id, Credit::Topup, *a, &format!("t{i}"), None, now).map(|_| ()),
                    Big::Adjust(a) => credit(t, &w.id, Credit::Adjustment, *a, &format!("a{i}"), None, now).map(|_| ()),
                    Big::ParsedTopup(text) => match parse_usd(text) {
                        Ok(a) => credit(t, &w.id, Credit::Topup, a, &format!("p{i}"), None, now).map(|_| ()),
                        Err(_) => Ok(()),
                    },
                });
                if let Err(e) = &r {
                    prop_assert!(!matches!(e, WalletError::Sql(_)), "after {o:?}: {e}");
                }
                prop_assert!(verify(&mut c).unwrap().is_empty(), "after {o:?}: {:?}", get(&mut c, &w.id));
                let credited: i64 = c.one(
                    "SELECT CAST(COALESCE(SUM(amount_micros), 0) AS BIGINT) FROM ledger
                     WHERE kind IN ('topup', 'grant', 'adjustment') AND amount_micros > 0",
                    &[]).unwrap().get(0).unwrap();
                let wallet = get(&mut c, &w.id).unwrap();
                prop_assert!(wallet.balance_micros <= credited, "{wallet:?} credited {credited}");
                prop_assert!(wallet.balance_micros <= MAX_MICROS);
            }
        }
    }

    #[test]
    fn amounts_past_the_ledger_bound_are_refused() {
        assert!(parse_usd("9223372036854.775807").is_err());
        assert!(parse_usd("99999999999999999999").is_err());
        assert_eq!(parse_usd("1000000000"), Ok(MAX_MICROS));
        assert!(parse_usd("1000000000.000001").is_err());
        let mut c = db();
        let w = tx(&mut c, |t| create(t, OwnerKind::Team, "p", 0, 0)).unwrap();
        tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, 1_000_000, "a", None, 1)
        })
        .unwrap();
        let e = tx(&mut c, |t| {
            credit(t, &w.id, Credit::Topup, MAX_MICROS, "b", None, 2)
        })
        .unwrap_err();
        assert!(matches!(e, WalletError::Invalid(_)), "{e}");
        assert!(verify(&mut c).unwrap().is_empty());
    }
}
