//! Hot wallets in Redis: with `[wallets] backend = "redis"` every replica decides holds on
//! the same balances, one Lua script per decision, and the store keeps the ledger (ADR 0013).
//!
//! Per wallet Redis keeps `base`, `floor`, and the open holds (`held`, their sum, and one field
//! per request). A hold is admitted when `base - held - amount >= floor`. The request's ledger
//! entries (hold, release, capture) are written to the store with its usage record, as in
//! store mode; after that commit the writer acknowledges each request with its capture and
//! the commit's wallet version: Redis forgets the hold and, unless its balance already
//! reflects that version, subtracts the capture — remembering it as a *delta* at that
//! version. A sync (reconciliation, a first load, an admin change) sets `base` to the store's
//! balance at version `v` minus the deltas newer than `v`. Acks from several replicas and
//! syncs can therefore arrive in any order and the balance is still exact: every capture is
//! counted once, either in a synced balance or as a delta, never both (a simpler "newest
//! balance wins" counted another replica's captures twice until its own ack came, and turned
//! requests away in a burst).
//!
//! Reconciliation runs every `reconcile_interval` on every replica: balances from the store
//! (top-ups made by the CLI, acks lost to a crash), and expired holds released (a replica that
//! died mid-request). When Redis does not answer, money fails closed: 503
//! `wallet_unavailable`.

use crate::store::Store;
use redis::aio::ConnectionManager;
use redis::Script;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Bumped when the layout of the state in Redis changes.
pub const STATE_VERSION: u32 = 1;

fn wallet_key(w: &str) -> String {
    format!("tg:wal:v{STATE_VERSION}:{w}")
}
fn holds_key(w: &str) -> String {
    format!("tg:wal:v{STATE_VERSION}:{w}:holds")
}
fn deltas_key(w: &str) -> String {
    format!("tg:wal:v{STATE_VERSION}:{w}:deltas")
}
fn expiry_key() -> String {
    format!("tg:wal:v{STATE_VERSION}:expiry")
}

const HOLD_LUA: &str = r#"
-- tollgate hot wallets v1: hold ARGV[2] for request ARGV[1] unless that passes the floor.
-- KEYS: wallet hash, holds hash, expiry zset. ARGV: request id, amount, expires ms, wallet id.
-- Returns {status, available after, floor}: status 1 held, 0 refused, -1 not loaded.
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1, 0, 0} end
local base = tonumber(redis.call('HGET', KEYS[1], 'base'))
local floor = tonumber(redis.call('HGET', KEYS[1], 'floor'))
local held = tonumber(redis.call('HGET', KEYS[1], 'held') or '0')
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return {1, base - held, floor} end
local amount = tonumber(ARGV[2])
if base - held - amount < floor then return {0, base - held, floor} end
redis.call('HINCRBY', KEYS[1], 'held', amount)
redis.call('HSET', KEYS[2], ARGV[1], amount)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[4] .. '|' .. ARGV[1])
return {1, base - held - amount, floor}
"#;

/// Shared by the sync scripts: the store's balance `b` at version `v` for the wallet at
/// prefix `p` .. id, if newer than what Redis has, less the captures acknowledged at later
/// versions (which that balance does not include yet).
const SYNC_ONE_LUA: &str = r#"
local function sync(k, d, b, floor, v)
  local cur = tonumber(redis.call('HGET', k, 'ver') or '-1')
  if v > cur then
    local later = 0
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', d, '(' .. v, '+inf')) do
      later = later + tonumber(string.sub(m, string.find(m, '|', 1, true) + 1))
    end
    redis.call('HSET', k, 'base', string.format('%d', b - later), 'ver', string.format('%d', v))
    redis.call('ZREMRANGEBYSCORE', d, '-inf', v)
  end
  redis.call('HSET', k, 'floor', floor)
  redis.call('HSETNX', k, 'held', 0)
end
"#;

const LOAD_LUA: &str = r#"
-- tollgate hot wallets v1: a wallet from the store (created if Redis does not have it).
-- KEYS: wallet hash, deltas zset. ARGV: balance, floor, version.
@SYNC@
sync(KEYS[1], KEYS[2], tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]))
return 1
"#;

const ACK_LUA: &str = r#"
-- tollgate hot wallets v1: the store committed these requests at wallet version ARGV[1]
-- (-1: nothing committed, only forget the holds). Forget each hold; subtract each capture
-- unless the balance already reflects that version, and remember it as a delta (once).
-- KEYS: wallet hash, holds hash, expiry zset, deltas zset.
-- ARGV: version, wallet id, then (request id, capture)...
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local v = tonumber(ARGV[1])
local cur = tonumber(redis.call('HGET', KEYS[1], 'ver') or '-1')
for i = 3, #ARGV, 2 do
  local rid, captured = ARGV[i], tonumber(ARGV[i + 1])
  local amount = redis.call('HGET', KEYS[2], rid)
  if amount then
    redis.call('HINCRBY', KEYS[1], 'held', -tonumber(amount))
    redis.call('HDEL', KEYS[2], rid)
  end
  redis.call('ZREM', KEYS[3], ARGV[2] .. '|' .. rid)
  if v > cur then
    local m = rid .. '|' .. captured
    if not redis.call('ZSCORE', KEYS[4], m) then
      redis.call('ZADD', KEYS[4], v, m)
      redis.call('HINCRBY', KEYS[1], 'base', -captured)
    end
  end
end
return 1
"#;

const SYNC_LUA: &str = r#"
-- tollgate hot wallets v1: many wallets from the store; wallets Redis does not have are left
-- to load on their first hold. ARGV: key prefix, then (wallet id, balance, floor, version)...
@SYNC@
local n = 0
for i = 2, #ARGV, 4 do
  local k = ARGV[1] .. ARGV[i]
  if redis.call('EXISTS', k) == 1 then
    sync(k, k .. ':deltas', tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3]))
    n = n + 1
  end
end
return n
"#;

const EXPIRE_LUA: &str = r#"
-- tollgate hot wallets v1: release holds past their expiry (their replica died).
-- KEYS: expiry zset. ARGV: now ms, key prefix.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1000)
for _, m in ipairs(due) do
  local sep = string.find(m, '|', 1, true)
  local w, rid = string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
  local wk, hk = ARGV[2] .. w, ARGV[2] .. w .. ':holds'
  local amount = redis.call('HGET', hk, rid)
  if amount and redis.call('EXISTS', wk) == 1 then
    redis.call('HINCRBY', wk, 'held', -tonumber(amount))
  end
  redis.call('HDEL', hk, rid)
  redis.call('ZREM', KEYS[1], m)
end
return #due
"#;

/// What the writer tells Redis after committing a batch: per wallet, its balance and version
/// after the commit and the requests whose holds the commit settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    pub wallet_id: String,
    /// The wallet's version after the commit (-1: nothing was committed).
    pub version: i64,
    /// (request id, amount captured) per settled request.
    pub settled: Vec<(String, i64)>,
}

/// The outcome of a hot hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotHold {
    Held {
        balance_micros: i64,
    },
    Insufficient {
        balance_micros: i64,
        floor_micros: i64,
    },
}

pub struct HotWallets {
    conn: ConnectionManager,
    timeout: Duration,
    hold: Script,
    load: Script,
    ack: Script,
    sync: Script,
    expire: Script,
    store: Arc<Store>,
}

impl HotWallets {
    /// Does not connect: the first hold does.
    pub fn new(url: &str, timeout: Duration, store: Arc<Store>) -> anyhow::Result<HotWallets> {
        Ok(HotWallets {
            conn: crate::limits::redis::connection(url, timeout, None)?,
            timeout,
            hold: Script::new(HOLD_LUA),
            load: Script::new(&LOAD_LUA.replace("@SYNC@", SYNC_ONE_LUA)),
            ack: Script::new(ACK_LUA),
            sync: Script::new(&SYNC_LUA.replace("@SYNC@", SYNC_ONE_LUA)),
            expire: Script::new(EXPIRE_LUA),
            store,
        })
    }

    async fn call<T: redis::FromRedisValue>(
        &self,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<T, String> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.timeout, inv.invoke_async(&mut conn)).await {
            Ok(r) => r.map_err(|e| format!("redis: {e}")),
            Err(_) => Err(format!("redis: no answer within {:?}", self.timeout)),
        }
    }

    /// Holds `amount` for `request_id`, loading the wallet from the store first if Redis does
    /// not have it (first use, or Redis lost its data).
    pub async fn hold(
        &self,
        wallet_id: &str,
        request_id: &str,
        amount: i64,
        expires_ms: i64,
    ) -> Result<HotHold, String> {
        for _ in 0..2 {
            let mut inv = self.hold.prepare_invoke();
            inv.key(wallet_key(wallet_id))
                .key(holds_key(wallet_id))
                .key(expiry_key())
                .arg(request_id)
                .arg(amount)
                .arg(expires_ms)
                .arg(wallet_id);
            let r: Vec<i64> = self.call(inv).await?;
            match r.as_slice() {
                [1, balance, _] => {
                    return Ok(HotHold::Held {
                        balance_micros: *balance,
                    })
                }
                [0, balance, floor] => {
                    return Ok(HotHold::Insufficient {
                        balance_micros: *balance,
                        floor_micros: *floor,
                    })
                }
                [-1, ..] => self.load_from_store(wallet_id).await?,
                other => return Err(format!("redis: unexpected hold reply {other:?}")),
            }
        }
        Err("redis: the wallet did not load".into())
    }

    async fn load_from_store(&self, wallet_id: &str) -> Result<(), String> {
        let store = self.store.clone();
        let id = wallet_id.to_string();
        let (balance, floor, version) =
            tokio::task::spawn_blocking(move || store.read(|db| crate::wallet::state(db, &id)))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        self.push(wallet_id, balance, floor, version).await
    }

    /// Tells Redis a wallet's balance, floor and version from the store (creating the wallet
    /// in Redis if needed; a balance at an older version than Redis's is ignored).
    pub async fn push(
        &self,
        wallet_id: &str,
        balance: i64,
        floor: i64,
        version: i64,
    ) -> Result<(), String> {
        let mut inv = self.load.prepare_invoke();
        inv.key(wallet_key(wallet_id))
            .key(deltas_key(wallet_id))
            .arg(balance)
            .arg(floor)
            .arg(version);
        self.call::<i64>(inv).await.map(|_| ())
    }

    /// Forgets holds (settled, refused elsewhere, or given up on) and counts the captures of
    /// the settled ones.
    pub async fn acknowledge(&self, ack: &Ack) -> Result<(), String> {
        let mut inv = self.ack.prepare_invoke();
        inv.key(wallet_key(&ack.wallet_id))
            .key(holds_key(&ack.wallet_id))
            .key(expiry_key())
            .key(deltas_key(&ack.wallet_id))
            .arg(ack.version)
            .arg(&ack.wallet_id);
        for (r, captured) in &ack.settled {
            inv.arg(r).arg(captured);
        }
        self.call::<i64>(inv).await.map(|_| ())
    }

    /// Drops a hold that will never be settled through the store (its request was refused by
    /// an envelope, or gave up waiting). Best effort: an expired hold is released anyway.
    pub async fn cancel(&self, wallet_id: &str, request_id: &str) {
        let ack = Ack {
            wallet_id: wallet_id.to_string(),
            version: -1,
            settled: vec![(request_id.to_string(), 0)],
        };
        if let Err(e) = self.acknowledge(&ack).await {
            tracing::debug!(error = %e, wallet = wallet_id, "could not cancel a hot hold; it expires");
        }
    }

    /// One reconciliation: every wallet's balance and version from the store, then expired
    /// holds released. Returns the number of holds released.
    pub async fn reconcile(&self) -> Result<usize, String> {
        let store = self.store.clone();
        let wallets = tokio::task::spawn_blocking(move || store.read(crate::wallet::states))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let prefix = format!("tg:wal:v{STATE_VERSION}:");
        // A few hundred wallets per script call: one round trip each, none too long a script.
        for chunk in wallets.chunks(256) {
            let mut inv = self.sync.prepare_invoke();
            inv.arg(&prefix);
            for (id, balance, floor, version) in chunk {
                inv.arg(id).arg(balance).arg(floor).arg(version);
            }
            self.call::<i64>(inv).await?;
        }
        let mut inv = self.expire.prepare_invoke();
        inv.key(expiry_key())
            .arg(crate::clock::now_ms())
            .arg(format!("tg:wal:v{STATE_VERSION}:"));
        self.call::<i64>(inv).await.map(|n| n as usize)
    }

    /// The available balance Redis would admit against, if it has the wallet.
    pub async fn available(&self, wallet_id: &str) -> Result<Option<i64>, String> {
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(wallet_key(wallet_id)).arg("base").arg("held");
        let fut = cmd.query_async::<(Option<i64>, Option<i64>)>(&mut conn);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok((Some(base), held))) => Ok(Some(base - held.unwrap_or(0))),
            Ok(Ok((None, _))) => Ok(None),
            Ok(Err(e)) => Err(format!("redis: {e}")),
            Err(_) => Err(format!("redis: no answer within {:?}", self.timeout)),
        }
    }
}

/// Applies the writer's acknowledgements in order, retrying briefly; what cannot be applied
/// is left to reconciliation (balances) and expiry (holds).
pub async fn run_acks(hot: Arc<HotWallets>, mut rx: mpsc::UnboundedReceiver<Ack>) {
    while let Some(ack) = rx.recv().await {
        let mut delay = Duration::from_millis(20);
        for attempt in 1..=3 {
            match hot.acknowledge(&ack).await {
                Ok(()) => break,
                Err(e) if attempt == 3 => {
                    tracing::warn!(error = %e, wallet = %ack.wallet_id, "hot wallet ack failed; reconciliation will correct the balance");
                }
                Err(_) => {
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
            }
        }
    }
}

/// Reconciles every `every`, for as long as the gateway lives.
pub async fn run_reconciler(hot: std::sync::Weak<HotWallets>, every: Duration) {
    let mut failing = false;
    loop {
        tokio::time::sleep(every).await;
        let Some(hot) = hot.upgrade() else { return };
        match hot.reconcile().await {
            Ok(released) => {
                if failing {
                    tracing::info!("hot wallets reconcile again");
                    failing = false;
                }
                if released > 0 {
                    tracing::info!(released, "released expired hot-wallet holds");
                }
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(error = %e, "hot wallet reconciliation failing");
                    failing = true;
                }
            }
        }
    }
}
