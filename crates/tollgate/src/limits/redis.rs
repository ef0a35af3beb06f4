//! Limits shared by every replica through Redis.
//!
//! Each admission is one Lua script that checks and takes every limit of the request at once,
//! on the Redis server's clock (replicas' clocks never disagree about a TAT). Settling tokens
//! is a second script; releasing concurrency leases is a plain `ZREM`. Concurrency is a sorted
//! set of leases scored by their expiry, so the slots of a replica that died come back after
//! `lease_ttl` instead of never.
//!
//! Versioning: the scripts are called by their SHA1 (`EVALSHA`), so two versions of tollgate
//! running side by side during a rolling upgrade each run their own; the state's layout is
//! versioned in the key prefix (`tg:lim:v1:`), so a new layout starts new keys rather than
//! misreading old ones.
//!
//! Every call has a deadline (`timeout`). When Redis errs or is late, the request is decided
//! per limit class by its policy: `fail_closed` refuses, `fail_open` falls back to this
//! process's own limiter with each limit divided by the expected replica count. After a
//! failure the replica stops asking Redis for `retry_interval`, so an outage costs one timeout
//! per interval, not one per request.

use super::{tighter, Admission, Check, Class, Decision, LocalLimiter, Refusal, MINUTE_US};
use crate::config::{FailPolicy, RedisLimitsConfig};
use crate::metrics::{FallbackLabels, Metrics};
use redis::aio::ConnectionManager;
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Bumped when the layout of the state in Redis changes.
pub const STATE_VERSION: u32 = 1;

const ADMIT_LUA: &str = r#"
-- tollgate limits v1: admit one request against all of its checks, atomically.
-- KEYS: per check, 3 keys: requests TAT, tokens TAT, concurrency leases.
-- ARGV: n, token estimate, lease id, lease ttl ms, then per check: rpm, tpm, concurrency.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local now_ms = math.floor(now / 1000)
local P = 60000000
local n = tonumber(ARGV[1])
local est = tonumber(ARGV[2])
local lease = ARGV[3]
local ttl = tonumber(ARGV[4])
local function rem(limit, tat)
  local free = P - math.max(tat - now, 0)
  if free < 0 then free = 0 end
  return math.floor(free * limit / P)
end
local function tat_of(k)
  local v = tonumber(redis.call('GET', k) or '0')
  if v < now then v = now end
  return v
end
local rq, tk, out = {}, {}, {1}
for i = 1, n do
  local b = 4 + (i - 1) * 3
  local rpm, tpm, conc = tonumber(ARGV[b + 1]), tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  if conc > 0 then
    local kc = KEYS[3 * i]
    redis.call('ZREMRANGEBYSCORE', kc, '-inf', now_ms)
    if redis.call('ZCARD', kc) >= conc then return {0, i, 3, conc, 0, 0, 1000000} end
  end
  local rl, rr, rs, tl, tr, ts = 0, 0, 0, 0, 0, 0
  if rpm > 0 then
    local tat = tat_of(KEYS[3 * i - 2])
    local nt = tat + math.floor(P / rpm)
    if nt - P > now then return {0, i, 1, rpm, rem(rpm, tat), tat - now, nt - P - now} end
    rq[i] = nt
    rl, rr, rs = rpm, rem(rpm, nt), nt - now
  end
  if tpm > 0 then
    local tat = tat_of(KEYS[3 * i - 1])
    if est > tpm then return {0, i, 2, tpm, rem(tpm, tat), tat - now, P} end
    local nt = tat + math.floor(P * est / tpm)
    if nt - P > now then return {0, i, 2, tpm, rem(tpm, tat), tat - now, nt - P - now} end
    tk[i] = nt
    tl, tr, ts = tpm, rem(tpm, nt), nt - now
  end
  for _, v in ipairs({rl, rr, rs, tl, tr, ts}) do out[#out + 1] = v end
end
for i = 1, n do
  if rq[i] then
    redis.call('SET', KEYS[3 * i - 2], string.format('%d', rq[i]), 'PX', math.floor((rq[i] - now) / 1000) + 1)
  end
  if tk[i] then
    redis.call('SET', KEYS[3 * i - 1], string.format('%d', tk[i]), 'PX', math.floor((tk[i] - now) / 1000) + 1)
  end
  if tonumber(ARGV[4 + (i - 1) * 3 + 3]) > 0 then
    redis.call('ZADD', KEYS[3 * i], now_ms + ttl, lease)
    redis.call('PEXPIRE', KEYS[3 * i], ttl)
  end
end
return out
"#;

const SETTLE_LUA: &str = r#"
-- tollgate limits v1: settle a token reservation by moving each TAT.
-- KEYS: tokens TATs. ARGV: delta (signed), then the tpm of each key.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local P = 60000000
local delta = tonumber(ARGV[1])
for i = 1, #KEYS do
  local inc = math.floor(P * math.abs(delta) / tonumber(ARGV[1 + i]))
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
  local nt
  if delta >= 0 then
    nt = math.max(tat, now) + inc
  else
    nt = math.max(tat - inc, math.min(now, tat))
  end
  if nt > now then
    redis.call('SET', KEYS[i], string.format('%d', nt), 'PX', math.floor((nt - now) / 1000) + 1)
  else
    redis.call('DEL', KEYS[i])
  end
end
return 1
"#;

struct Inner {
    conn: ConnectionManager,
    timeout: Duration,
    replicas: u64,
    lease_ttl_ms: u64,
    retry_interval_us: u64,
    policy: crate::config::OnRedisError,
    /// Until when (monotonic µs) Redis is not asked, after a failure.
    down_until_us: AtomicU64,
    fallback: LocalLimiter,
    metrics: Arc<Metrics>,
    admit: Script,
    settle: Script,
}

pub struct RedisLimiter {
    inner: Arc<Inner>,
}

/// What a request holds in Redis: token reservations to settle, leases to release.
pub struct RemoteGrant {
    inner: Arc<Inner>,
    /// (tokens TAT key, tpm) per check with a token limit.
    token_keys: Vec<(String, u64)>,
    lease_keys: Vec<String>,
    lease_id: String,
    reserved: u64,
}

fn keys_of(check: &Check) -> [String; 3] {
    let base = format!(
        "tg:lim:v{STATE_VERSION}:{}:{}",
        check.scope.as_str(),
        check.subject
    );
    [
        format!("{base}:r"),
        format!("{base}:t"),
        format!("{base}:c"),
    ]
}

/// A connection to Redis made on first use, each call bounded by `timeout` and retried once;
/// shared by the limiter, hot wallets and the response cache's way of talking to Redis.
pub(crate) fn connection(
    url: &str,
    timeout: Duration,
    max_delay: Option<Duration>,
) -> anyhow::Result<ConnectionManager> {
    let client = redis::Client::open(url)?;
    let mut cfg = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout))
        .set_number_of_retries(1);
    if let Some(d) = max_delay {
        cfg = cfg.set_max_delay(d);
    }
    Ok(ConnectionManager::new_lazy_with_config(client, cfg)?)
}

impl RedisLimiter {
    /// Does not connect: the first request does, so a gateway starts while Redis is down.
    pub fn new(cfg: &RedisLimitsConfig, metrics: Arc<Metrics>) -> anyhow::Result<RedisLimiter> {
        let url = cfg
            .url
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("[limits.redis] url is required"))?;
        let conn = connection(url, cfg.timeout, Some(cfg.retry_interval))?;
        Ok(RedisLimiter {
            inner: Arc::new(Inner {
                conn,
                timeout: cfg.timeout,
                replicas: cfg.replicas.max(1),
                lease_ttl_ms: cfg.lease_ttl.as_millis() as u64,
                retry_interval_us: cfg.retry_interval.as_micros() as u64,
                policy: cfg.on_error,
                down_until_us: AtomicU64::new(0),
                fallback: LocalLimiter::default(),
                metrics,
                admit: Script::new(ADMIT_LUA),
                settle: Script::new(SETTLE_LUA),
            }),
        })
    }

    pub async fn admit(&self, checks: &[Check], estimate: u64) -> Result<Admission, Refusal> {
        let inner = &self.inner;
        let now = super::now_us();
        if now >= inner.down_until_us.load(Ordering::Acquire) {
            let started = std::time::Instant::now();
            let lease_id = format!("{:016x}", rand::random::<u64>());
            let result =
                tokio::time::timeout(inner.timeout, self.call_admit(checks, estimate, &lease_id))
                    .await
                    .map_err(|_| format!("no answer within {:?}", inner.timeout))
                    .and_then(|r| r.map_err(|e| e.to_string()));
            inner
                .metrics
                .limiter_redis_seconds
                .observe(started.elapsed().as_secs_f64());
            match result {
                Ok(reply) => {
                    if inner.down_until_us.swap(0, Ordering::AcqRel) != 0 {
                        tracing::info!("redis limiter reachable again");
                    }
                    return self.grant(checks, estimate, lease_id, &reply);
                }
                Err(e) => {
                    inner.metrics.limiter_redis_errors.inc();
                    let was = inner
                        .down_until_us
                        .swap(now + inner.retry_interval_us, Ordering::AcqRel);
                    // Once per outage, not once per request in flight when it began.
                    if was == 0 {
                        tracing::warn!(error = %e, "redis limiter unavailable; applying the fail policies until it answers");
                    } else {
                        tracing::debug!(error = %e, "redis limiter still unavailable");
                    }
                }
            }
        }
        self.degraded(checks, estimate, now)
    }

    async fn call_admit(
        &self,
        checks: &[Check],
        estimate: u64,
        lease_id: &str,
    ) -> redis::RedisResult<Vec<i64>> {
        let mut inv = self.inner.admit.prepare_invoke();
        for c in checks {
            for k in keys_of(c) {
                inv.key(k);
            }
        }
        inv.arg(checks.len())
            .arg(estimate)
            .arg(lease_id)
            .arg(self.inner.lease_ttl_ms);
        for c in checks {
            inv.arg(c.limits.rpm)
                .arg(c.limits.tpm)
                .arg(c.limits.concurrency);
        }
        let mut conn = self.inner.conn.clone();
        inv.invoke_async(&mut conn).await
    }

    fn grant(
        &self,
        checks: &[Check],
        estimate: u64,
        lease_id: String,
        reply: &[i64],
    ) -> Result<Admission, Refusal> {
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        if reply.first() != Some(&1) {
            let idx = at(1).saturating_sub(1) as usize;
            let check = checks.get(idx).unwrap_or(&checks[0]);
            let class = match at(2) {
                1 => Class::Requests,
                2 => Class::Tokens,
                _ => Class::Concurrency,
            };
            return Err(Refusal::new(
                check,
                class,
                Decision {
                    allowed: false,
                    limit: at(3),
                    remaining: at(4),
                    reset_us: at(5),
                    retry_after_us: at(6),
                },
            ));
        }
        let mut adm = Admission::default();
        let mut grant = RemoteGrant {
            inner: self.inner.clone(),
            token_keys: Vec::new(),
            lease_keys: Vec::new(),
            lease_id,
            reserved: estimate,
        };
        for (i, c) in checks.iter().enumerate() {
            let b = 1 + i * 6;
            let decision = |o: usize| {
                (at(b + o) > 0).then(|| Decision {
                    allowed: true,
                    limit: at(b + o),
                    remaining: at(b + o + 1),
                    reset_us: at(b + o + 2),
                    retry_after_us: 0,
                })
            };
            adm.requests = tighter(adm.requests, decision(0));
            adm.tokens = tighter(adm.tokens, decision(3));
            let [_, tokens, leases] = keys_of(c);
            if c.limits.tpm > 0 {
                grant.token_keys.push((tokens, c.limits.tpm));
            }
            if c.limits.concurrency > 0 {
                grant.lease_keys.push(leases);
            }
        }
        adm.remote.push(grant);
        Ok(adm)
    }

    /// Redis could not be asked: each class follows its policy.
    fn degraded(&self, checks: &[Check], estimate: u64, now: u64) -> Result<Admission, Refusal> {
        let inner = &self.inner;
        let share = |limit: u64| limit.div_ceil(inner.replicas).max(1);
        let mut local = Vec::with_capacity(checks.len());
        for c in checks {
            let mut l = c.limits;
            for (class, limit, policy) in [
                (Class::Requests, c.limits.rpm, inner.policy.requests),
                (Class::Tokens, c.limits.tpm, inner.policy.tokens),
                (
                    Class::Concurrency,
                    u64::from(c.limits.concurrency),
                    inner.policy.concurrency,
                ),
            ] {
                if limit == 0 {
                    continue;
                }
                match policy {
                    FailPolicy::FailClosed => {
                        inner
                            .metrics
                            .limiter_fallbacks
                            .get_or_create(&FallbackLabels {
                                policy: "fail_closed",
                            })
                            .inc();
                        let mut r = Refusal::new(
                            c,
                            class,
                            Decision {
                                allowed: false,
                                limit,
                                remaining: 0,
                                reset_us: 0,
                                retry_after_us: inner.retry_interval_us.max(1_000_000),
                            },
                        );
                        r.backend_unavailable = true;
                        return Err(r);
                    }
                    FailPolicy::FailOpen => match class {
                        Class::Requests => l.rpm = share(limit),
                        Class::Tokens => l.tpm = share(limit),
                        Class::Concurrency => {
                            l.concurrency = u32::try_from(share(limit)).unwrap_or(u32::MAX)
                        }
                    },
                }
            }
            local.push(Check {
                limits: l,
                ..c.clone()
            });
        }
        inner
            .metrics
            .limiter_fallbacks
            .get_or_create(&FallbackLabels {
                policy: "fail_open",
            })
            .inc();
        inner.fallback.admit(&local, now, estimate)
    }
}

impl RemoteGrant {
    pub(super) fn settle(&mut self, actual_tokens: u64) {
        let delta = actual_tokens as i64 - self.reserved as i64;
        if delta == 0 || self.token_keys.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.token_keys);
        let inner = self.inner.clone();
        spawn(async move {
            let mut inv = inner.settle.prepare_invoke();
            inv.arg(delta);
            for (k, tpm) in &keys {
                inv.key(k);
                inv.arg(*tpm);
            }
            let mut conn = inner.conn.clone();
            let r: Result<redis::RedisResult<i64>, _> =
                tokio::time::timeout(inner.timeout * 4, inv.invoke_async(&mut conn)).await;
            if !matches!(r, Ok(Ok(_))) {
                inner.metrics.limiter_redis_errors.inc();
                tracing::debug!("could not settle a token reservation in redis");
            }
        });
    }
}

impl Drop for RemoteGrant {
    fn drop(&mut self) {
        if self.lease_keys.is_empty() {
            return;
        }
        let keys = std::mem::take(&mut self.lease_keys);
        let lease = std::mem::take(&mut self.lease_id);
        let inner = self.inner.clone();
        spawn(async move {
            let mut conn = inner.conn.clone();
            let mut pipe = redis::pipe();
            for k in &keys {
                pipe.zrem(k, &lease).ignore();
            }
            let r: Result<redis::RedisResult<()>, _> =
                tokio::time::timeout(inner.timeout * 4, pipe.query_async(&mut conn)).await;
            if !matches!(r, Ok(Ok(()))) {
                // The lease expires by itself after `lease_ttl`.
                inner.metrics.limiter_redis_errors.inc();
            }
        });
    }
}

fn spawn(fut: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(fut);
    }
}

const _: () = assert!(
    MINUTE_US == 60_000_000,
    "the Lua scripts hard-code the period"
);
