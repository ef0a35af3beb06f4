//! Wallet holds decided in memory, for a SQLite store (ADR 0036).
//!
//! A SQLite store has one writer, and it is this process's: every change of a balance goes
//! through the usage writer, except operators' credits and settings, which commit on other
//! connections. So the gateway can know each wallet's balance exactly and decide a hold
//! with one locked subtraction on the request's own task, instead of a round trip to the
//! writer thread and a write transaction of four statements. The hold is written to the
//! ledger (hold, release and capture, the entries it always had) with the request's settle,
//! the way a hot wallet's is (ADR 0013).
//!
//! What a hold in memory gives up is only what a hold in the store never bought: a hold is
//! worth nothing once its request is gone, and a crash ends both. What keeps it exact:
//! - the writer reads each wallet it holds for from the store, and again after every commit
//!   that settled against it;
//! - commits by other connections are seen through `PRAGMA data_version`: the writer checks
//!   it after each of its commits and before each hold it is asked for, and reloads every
//!   balance when it moved; a decision in memory is only taken within `FRESH_MS` of such a
//!   check, otherwise the request asks the writer, which checks first; the gateway's own
//!   operator endpoints make the book stale as they answer, so a top-up is seen by the next
//!   request.
//!
//! A change made by another process (the CLI on the same file) can go unseen for up to
//! `FRESH_MS`: a top-up refuses a little longer, a debit can admit a little longer; a
//! capture never takes a wallet past its floor either way.

use crate::db::Db;
use crate::wallet::Hold;
use std::collections::HashMap;
use std::sync::Mutex;

/// How long a check of the store's commits vouches for the balances in memory.
const FRESH_MS: i64 = 100;

#[derive(Default)]
pub struct HoldBook {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Decisions in memory are taken before this (ms); after it the writer checks first.
    fresh_until_ms: i64,
    /// `PRAGMA data_version` at the last check (the writer's connection).
    data_version: Option<i64>,
    wallets: HashMap<String, Book>,
}

struct Book {
    /// The store's balance: every entry committed, none of the holds in memory.
    balance: i64,
    floor: i64,
    /// The wallet is gone from the store: holds on it are refused as not found.
    missing: bool,
    open: i64,
    /// Request id → (amount, expires_ms).
    holds: HashMap<String, (i64, i64)>,
    /// The soonest expiry among `holds` (i64::MAX without holds).
    next_expiry_ms: i64,
}

impl Book {
    fn expire(&mut self, now_ms: i64) {
        if now_ms < self.next_expiry_ms {
            return;
        }
        let mut open = 0i64;
        let mut next = i64::MAX;
        self.holds.retain(|_, (amount, expires)| {
            let keep = *expires > now_ms;
            if keep {
                open = open.saturating_add(*amount);
                next = next.min(*expires);
            }
            keep
        });
        self.open = open;
        self.next_expiry_ms = next;
    }

    fn available(&self) -> i64 {
        self.balance.saturating_sub(self.open)
    }
}

impl HoldBook {
    /// A decision in memory, or `None`: the wallet is not in the book or the book is not
    /// fresh, and the writer must decide (`decide`, after `refresh`).
    pub fn try_hold(
        &self,
        wallet_id: &str,
        request_id: &str,
        amount: i64,
        expires_ms: i64,
        now_ms: i64,
    ) -> Option<crate::wallet::Result<Hold>> {
        let mut inner = self.lock();
        if now_ms >= inner.fresh_until_ms || !inner.wallets.contains_key(wallet_id) {
            return None;
        }
        Some(decide_in(
            &mut inner, wallet_id, request_id, amount, expires_ms, now_ms,
        ))
    }

    /// The writer's decision, after `refresh` loaded the wallet.
    pub fn decide(
        &self,
        wallet_id: &str,
        request_id: &str,
        amount: i64,
        expires_ms: i64,
        now_ms: i64,
    ) -> crate::wallet::Result<Hold> {
        let mut inner = self.lock();
        decide_in(
            &mut inner, wallet_id, request_id, amount, expires_ms, now_ms,
        )
    }

    /// The next hold asks the writer, which reads the store first: called when an operator
    /// changed a wallet on another connection of this process.
    pub fn stale(&self) {
        self.lock().fresh_until_ms = 0;
    }

    /// Money held in memory for a wallet (what `held_micros` adds to the store's holds).
    pub fn open_micros(&self, wallet_id: &str, now_ms: i64) -> i64 {
        let mut inner = self.lock();
        inner.wallets.get_mut(wallet_id).map_or(0, |b| {
            b.expire(now_ms);
            b.open
        })
    }

    /// Writer only: reads from the store what the book must know before deciding for
    /// `wallets` — every balance again if another connection committed since the last
    /// check, else only the wallets not in the book yet — and vouches for the book for
    /// `FRESH_MS`.
    pub fn refresh(&self, db: &mut Db, wallets: &[&str], now_ms: i64) -> crate::db::Result<()> {
        let version: i64 = db.one("PRAGMA data_version", &[])?.get(0)?;
        let load: Vec<String> = {
            let inner = self.lock();
            let mut load: Vec<String> = if inner.data_version != Some(version) {
                inner.wallets.keys().cloned().collect()
            } else {
                Vec::new()
            };
            for w in wallets {
                if !inner.wallets.contains_key(*w) && !load.iter().any(|l| l == w) {
                    load.push(w.to_string());
                }
            }
            load
        };
        let read = read_balances(db, &load)?;
        let mut inner = self.lock();
        for (id, found) in load.into_iter().zip(read) {
            set_balance(&mut inner, id, found);
        }
        inner.data_version = Some(version);
        inner.fresh_until_ms = now_ms.saturating_add(FRESH_MS);
        Ok(())
    }

    /// Writer only, after a commit that settled `done` (request id, wallet): their holds
    /// are over, and their wallets' balances are read again. The commit is this
    /// connection's own, so `PRAGMA data_version` does not show it.
    pub fn settled(&self, db: &mut Db, done: &[(&str, &str)]) -> crate::db::Result<()> {
        if done.is_empty() {
            return Ok(());
        }
        let mut wallets: Vec<String> = Vec::new();
        for (_, w) in done {
            if !wallets.iter().any(|x| x == w) {
                wallets.push(w.to_string());
            }
        }
        let read = read_balances(db, &wallets)?;
        let mut inner = self.lock();
        // One lock for both: the book never shows a capture without its hold released, nor
        // a hold released before its capture is in the balance.
        for (id, found) in wallets.into_iter().zip(read) {
            set_balance(&mut inner, id, found);
        }
        for (request_id, w) in done {
            if let Some(b) = inner.wallets.get_mut(*w) {
                if let Some((amount, _)) = b.holds.remove(*request_id) {
                    b.open = b.open.saturating_sub(amount);
                }
            }
        }
        Ok(())
    }

    /// Writer only: balances read again after the writer itself changed them outside a
    /// settle (expired grants, holds a store of an earlier version left).
    pub fn reload(&self, db: &mut Db) -> crate::db::Result<()> {
        let ids: Vec<String> = self.lock().wallets.keys().cloned().collect();
        let read = read_balances(db, &ids)?;
        let mut inner = self.lock();
        for (id, found) in ids.into_iter().zip(read) {
            set_balance(&mut inner, id, found);
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Nothing under this lock can panic half-way through a change; a poisoned lock
        // still holds consistent numbers.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn read_balances(db: &mut Db, ids: &[String]) -> crate::db::Result<Vec<Option<(i64, i64)>>> {
    ids.iter()
        .map(|id| {
            db.row(
                "SELECT balance_micros, floor_micros FROM wallets WHERE id = ?1",
                &[id],
            )?
            .map(|r| Ok((r.get(0)?, r.get(1)?)))
            .transpose()
        })
        .collect()
}

fn set_balance(inner: &mut Inner, id: String, found: Option<(i64, i64)>) {
    let b = inner.wallets.entry(id).or_insert_with(|| Book {
        balance: 0,
        floor: 0,
        missing: true,
        open: 0,
        holds: HashMap::new(),
        next_expiry_ms: i64::MAX,
    });
    match found {
        Some((balance, floor)) => {
            b.balance = balance;
            b.floor = floor;
            b.missing = false;
        }
        None => b.missing = true,
    }
}

fn decide_in(
    inner: &mut Inner,
    wallet_id: &str,
    request_id: &str,
    amount: i64,
    expires_ms: i64,
    now_ms: i64,
) -> crate::wallet::Result<Hold> {
    crate::wallet::hold_amount_in_range(amount)?;
    let Some(b) = inner.wallets.get_mut(wallet_id).filter(|b| !b.missing) else {
        return Err(crate::wallet::WalletError::NotFound(wallet_id.to_string()));
    };
    b.expire(now_ms);
    if b.holds.contains_key(request_id) {
        return Ok(Hold::Held {
            balance_micros: b.available(),
        });
    }
    // `amount` is at most MAX_MICROS and balances stay within the ledger's bound, so this
    // cannot overflow; checked anyway, as all money is.
    match b.available().checked_sub(amount) {
        Some(after) if after >= b.floor => {
            b.open = b.open.saturating_add(amount);
            b.holds.insert(request_id.to_string(), (amount, expires_ms));
            b.next_expiry_ms = b.next_expiry_ms.min(expires_ms);
            Ok(Hold::Held {
                balance_micros: after,
            })
        }
        _ => Ok(Hold::Insufficient {
            balance_micros: b.available(),
            floor_micros: b.floor,
        }),
    }
}

/// Held for the life of `serve`: a gateway that decides holds in memory must be the only one
/// on its SQLite file (another one's holds would not be in its book, nor its in theirs), so
/// it locks `<file>.gateways` exclusively, and every other gateway on SQLite locks it shared.
/// Either one finding the other's lock refuses to start and says why. PostgreSQL stores are
/// shared by design and take no lock; holds in memory are refused there.
pub fn lock_store(
    location: &crate::db::Location,
    in_memory: bool,
) -> anyhow::Result<Option<std::fs::File>> {
    let path = match location {
        crate::db::Location::Sqlite(p) => p,
        crate::db::Location::Postgres(_) if in_memory => anyhow::bail!(
            "[wallets] backend = \"memory\" needs a SQLite store: a PostgreSQL store is shared \
             by several gateways, whose holds must meet in it (use \"store\" or \"redis\")"
        ),
        crate::db::Location::Postgres(_) => return Ok(None),
    };
    let mut lock_path = path.clone().into_os_string();
    lock_path.push(".gateways");
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
    {
        Ok(f) => f,
        Err(e) if in_memory => {
            anyhow::bail!(
                "opening {}: {e}",
                std::path::Path::new(&lock_path).display()
            )
        }
        Err(e) => {
            tracing::warn!(error = %e, path = %std::path::Path::new(&lock_path).display(), "could not open the store's gateways file");
            return Ok(None);
        }
    };
    let taken = if in_memory {
        file.try_lock()
    } else {
        file.try_lock_shared()
    };
    match taken {
        Ok(()) => Ok(Some(file)),
        Err(std::fs::TryLockError::WouldBlock) if in_memory => anyhow::bail!(
            "another gateway serves {}: [wallets] backend = \"memory\" needs the store to \
             itself (gateways sharing a SQLite file decide holds in it: backend = \"store\")",
            path.display()
        ),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "a gateway with [wallets] backend = \"memory\" serves {}: it decides holds in its \
             own memory, so no other gateway may share its store",
            path.display()
        ),
        Err(std::fs::TryLockError::Error(e)) if in_memory => {
            anyhow::bail!(
                "locking {}: {e}",
                std::path::Path::new(&lock_path).display()
            )
        }
        // A gateway deciding holds in the store does not need the lock, only shows it to a
        // memory-mode one: a file system without locks (or a lock file it may not create)
        // costs it nothing.
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(error = %e, path = %std::path::Path::new(&lock_path).display(), "could not lock the store's gateways file");
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two connections to one file: the writer's, and an operator's.
    fn store() -> (Db, Db) {
        let dir = std::env::temp_dir().join(format!("tg-holdbook-{}", crate::keys::generate_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("t.db");
        let loc = crate::db::Location::Sqlite(path);
        let mut db = loc.connect().unwrap();
        db.batch("CREATE TABLE keys (id TEXT);").unwrap();
        db.batch(crate::wallet::MIGRATION).unwrap();
        db.batch(crate::wallet::MIGRATION_LOW_BALANCE).unwrap();
        db.batch(crate::wallet::MIGRATION_VERSION).unwrap();
        let other = loc.connect().unwrap();
        (db, other)
    }

    fn topup(db: &mut Db, w: &str, micros: i64, idem: &str) {
        db.write(|tx| {
            crate::wallet::credit(tx, w, crate::wallet::Credit::Topup, micros, idem, None, 1)
        })
        .unwrap();
    }

    #[test]
    fn holds_in_memory_never_pass_the_floor_and_see_other_connections() {
        let (mut db, mut other) = store();
        let w = db
            .write(|tx| crate::wallet::create(tx, crate::wallet::OwnerKind::Key, "k", 0, 1))
            .unwrap()
            .id;
        topup(&mut db, &w, 100, "t1");
        let book = HoldBook::default();
        assert!(
            book.try_hold(&w, "r0", 10, 1_000, 1).is_none(),
            "not loaded yet"
        );
        book.refresh(&mut db, &[&w], 1).unwrap();
        let held = |r: &str, a| book.try_hold(&w, r, a, 1_000, 2).unwrap().unwrap();
        assert_eq!(held("r1", 60), Hold::Held { balance_micros: 40 });
        assert_eq!(
            held("r1", 60),
            Hold::Held { balance_micros: 40 },
            "once per request"
        );
        assert_eq!(
            held("r2", 41),
            Hold::Insufficient {
                balance_micros: 40,
                floor_micros: 0
            }
        );
        assert_eq!(held("r3", 40), Hold::Held { balance_micros: 0 });
        assert!(book.try_hold(&w, "r4", 1, 1_000, 900).is_none(), "stale");
        // A top-up on another connection: seen at the next check.
        topup(&mut other, &w, 50, "t2");
        book.refresh(&mut db, &[&w], 900).unwrap();
        assert_eq!(
            book.decide(&w, "r4", 50, 2_000, 900).unwrap(),
            Hold::Held { balance_micros: 0 }
        );
        // Expired holds come back.
        assert_eq!(book.open_micros(&w, 950), 150);
        assert_eq!(book.open_micros(&w, 1_500), 50);
        assert_eq!(book.open_micros(&w, 2_500), 0);
        assert!(matches!(
            book.decide(&w, "r5", crate::wallet::MAX_MICROS + 1, 3_000, 2_500),
            Err(crate::wallet::WalletError::Invalid(_))
        ));
        assert!(matches!(
            book.decide("nope", "r6", 1, 3_000, 2_500),
            Err(crate::wallet::WalletError::NotFound(_))
        ));
    }
}
