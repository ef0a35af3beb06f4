//! Rate limits: requests per minute (GCRA), tokens per minute (an estimate reserved at
//! admission, settled with the provider's count) and concurrent requests, on any number of
//! scopes at once (key, team, model, deployment, tool route).
//!
//! A request is admitted only if every check admits it; a refusal by one undoes what the
//! others took. The state lives in this process (`LocalLimiter`) or in Redis (`redis.rs`),
//! where one Lua script decides all of a request's checks atomically on the server's clock.

pub mod gcra;
pub mod redis;

pub use gcra::{Decision, Gcra, MINUTE_US};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

/// Limits of one subject (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub tpm: u64,
    pub concurrency: u32,
}

impl Limits {
    pub fn is_unlimited(&self) -> bool {
        *self == Limits::default()
    }
}

/// What a limit is counted per.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Key,
    Team,
    /// A model name as clients send it, across all keys.
    Model,
    /// One provider + upstream model: a provider account's quota.
    Deployment,
    /// A key's calls through one tool route.
    Route,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Key => "key",
            Scope::Team => "team",
            Scope::Model => "model",
            Scope::Deployment => "deployment",
            Scope::Route => "route",
        }
    }
}

/// One limit a request must pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub scope: Scope,
    /// The key id, team name, model name, `provider/model`, or `route/key id`.
    pub subject: String,
    pub limits: Limits,
}

impl Check {
    fn state_key(&self) -> String {
        format!("{}:{}", self.scope.as_str(), self.subject)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Requests,
    Tokens,
    Concurrency,
}

impl Class {
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Requests => "requests",
            Class::Tokens => "tokens",
            Class::Concurrency => "concurrency",
        }
    }
}

/// Which limit refused a request, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub scope: Scope,
    pub subject: String,
    pub class: Class,
    pub decision: Decision,
    /// The shared limiter (Redis) could not be asked and this class fails closed.
    pub backend_unavailable: bool,
}

impl Refusal {
    fn new(check: &Check, class: Class, decision: Decision) -> Refusal {
        Refusal {
            scope: check.scope,
            subject: check.subject.clone(),
            class,
            decision,
            backend_unavailable: false,
        }
    }

    fn concurrency(check: &Check) -> Refusal {
        let limit = u64::from(check.limits.concurrency);
        Refusal::new(
            check,
            Class::Concurrency,
            Decision {
                allowed: false,
                limit,
                remaining: 0,
                reset_us: 0,
                // A slot frees when any in-flight request ends; a second is a fair hint.
                retry_after_us: 1_000_000,
            },
        )
    }
}

/// Live state of one subject in this process.
#[derive(Debug, Default)]
pub struct SubjectState {
    pub requests: Gcra,
    pub tokens: Gcra,
    pub in_flight: AtomicU32,
}

/// What one check took in this process: the concurrency slot is released on drop.
struct LocalPart {
    state: Arc<SubjectState>,
    limits: Limits,
    reserved_tokens: u64,
}

impl LocalPart {
    /// Gives back what a request that was not admitted after all had taken.
    fn undo(self, now: u64) {
        if self.limits.rpm > 0 {
            self.state
                .requests
                .adjust(now, self.limits.rpm, MINUTE_US, -1);
        }
        if self.limits.tpm > 0 && self.reserved_tokens > 0 {
            self.state.tokens.adjust(
                now,
                self.limits.tpm,
                MINUTE_US,
                -(self.reserved_tokens as i64),
            );
        }
    }
}

impl Drop for LocalPart {
    fn drop(&mut self) {
        if self.limits.concurrency > 0 {
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Admission granted: holds the concurrency slots and token reservations until settled (or
/// dropped, which releases the slots and keeps the reservations: the safe side).
#[derive(Default)]
pub struct Admission {
    local: Vec<LocalPart>,
    remote: Vec<redis::RemoteGrant>,
    /// The tightest requests and tokens limits that applied, for `x-ratelimit-*`.
    pub requests: Option<Decision>,
    pub tokens: Option<Decision>,
    settled: bool,
}

/// Keeps the decision with the fewest remaining units: the one a client must watch.
fn tighter(a: Option<Decision>, b: Option<Decision>) -> Option<Decision> {
    match (a, b) {
        (Some(x), Some(y)) => Some(if y.remaining < x.remaining { y } else { x }),
        (x, None) => x,
        (None, y) => y,
    }
}

impl Admission {
    /// Replaces every token reservation with what was actually used.
    pub fn settle(&mut self, now: u64, actual_tokens: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        for p in &self.local {
            if p.limits.tpm > 0 {
                let delta = actual_tokens as i64 - p.reserved_tokens as i64;
                if delta != 0 {
                    p.state.tokens.adjust(now, p.limits.tpm, MINUTE_US, delta);
                }
            }
        }
        for r in &mut self.remote {
            r.settle(actual_tokens);
        }
    }

    /// Takes over another admission's holds (a deployment's, granted after the key's).
    pub fn absorb(&mut self, mut other: Admission) {
        self.local.append(&mut other.local);
        self.remote.append(&mut other.remote);
        self.requests = tighter(self.requests, other.requests);
        self.tokens = tighter(self.tokens, other.tokens);
        other.settled = true;
    }

    #[cfg(test)]
    fn reserved_tokens(&self) -> u64 {
        self.local
            .iter()
            .map(|p| p.reserved_tokens)
            .max()
            .unwrap_or(0)
    }
}

/// Limit state in this process, created on first use per subject.
#[derive(Default)]
pub struct LocalLimiter {
    states: RwLock<HashMap<String, Arc<SubjectState>>>,
}

impl LocalLimiter {
    fn state(&self, key: String) -> Arc<SubjectState> {
        if let Some(s) = self
            .states
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            return s.clone();
        }
        self.states
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone()
    }

    /// Every check, each in the order concurrency (cheapest to undo), requests, tokens. A
    /// refusal anywhere undoes everything taken before it.
    pub fn admit(&self, checks: &[Check], now: u64, estimate: u64) -> Result<Admission, Refusal> {
        let mut adm = Admission::default();
        for c in checks {
            match self.admit_one(c, now, estimate) {
                Ok((part, requests, tokens)) => {
                    adm.local.push(part);
                    adm.requests = tighter(adm.requests, requests);
                    adm.tokens = tighter(adm.tokens, tokens);
                }
                Err(r) => {
                    for p in adm.local.drain(..) {
                        p.undo(now);
                    }
                    return Err(r);
                }
            }
        }
        Ok(adm)
    }

    #[allow(clippy::type_complexity)]
    fn admit_one(
        &self,
        c: &Check,
        now: u64,
        estimate: u64,
    ) -> Result<(LocalPart, Option<Decision>, Option<Decision>), Refusal> {
        let state = self.state(c.state_key());
        let limits = c.limits;
        if limits.concurrency > 0 {
            let prev = state.in_flight.fetch_add(1, Ordering::AcqRel);
            if prev >= limits.concurrency {
                state.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::concurrency(c));
            }
        }
        // From here, dropping `part` releases the concurrency slot.
        let mut part = LocalPart {
            state: state.clone(),
            limits: Limits {
                rpm: 0,
                tpm: 0,
                ..limits
            },
            reserved_tokens: 0,
        };
        let mut requests = None;
        if limits.rpm > 0 {
            let d = state.requests.take(now, limits.rpm, MINUTE_US, 1);
            if !d.allowed {
                return Err(Refusal::new(c, Class::Requests, d));
            }
            part.limits.rpm = limits.rpm;
            requests = Some(d);
        }
        let mut tokens = None;
        if limits.tpm > 0 {
            let d = state.tokens.take(now, limits.tpm, MINUTE_US, estimate);
            if !d.allowed {
                part.undo(now);
                return Err(Refusal::new(c, Class::Tokens, d));
            }
            part.limits.tpm = limits.tpm;
            part.reserved_tokens = estimate;
            tokens = Some(d);
        }
        Ok((part, requests, tokens))
    }
}

/// The gateway's limiter: in this process, or shared through Redis.
pub enum Limiter {
    Local(LocalLimiter),
    Redis(redis::RedisLimiter),
}

impl Default for Limiter {
    fn default() -> Self {
        Limiter::Local(LocalLimiter::default())
    }
}

impl Limiter {
    pub async fn admit(&self, checks: &[Check], estimate: u64) -> Result<Admission, Refusal> {
        // The common case, nothing limited, takes no lock and makes no call.
        if checks.is_empty() {
            return Ok(Admission::default());
        }
        match self {
            Limiter::Local(l) => l.admit(checks, now_us(), estimate),
            Limiter::Redis(r) => r.admit(checks, estimate).await,
        }
    }
}

pub use crate::clock::now_us;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn check(scope: Scope, subject: &str, limits: Limits) -> Check {
        Check {
            scope,
            subject: subject.into(),
            limits,
        }
    }

    fn key(limits: Limits) -> Vec<Check> {
        vec![check(Scope::Key, "k", limits)]
    }

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let l = LocalLimiter::default();
        let c = key(Limits {
            concurrency: 2,
            ..Limits::default()
        });
        let a = l.admit(&c, 0, 0).unwrap();
        let _b = l.admit(&c, 0, 0).unwrap();
        let r = l.admit(&c, 0, 0).err().unwrap();
        assert_eq!((r.class, r.decision.limit), (Class::Concurrency, 2));
        drop(a);
        assert!(l.admit(&c, 0, 0).is_ok());
    }

    #[test]
    fn a_token_refusal_gives_the_request_slot_back() {
        let l = LocalLimiter::default();
        let c = key(Limits {
            rpm: 2,
            tpm: 100,
            concurrency: 0,
        });
        assert_eq!(l.admit(&c, 0, 500).err().unwrap().class, Class::Tokens);
        assert!(l.admit(&c, 0, 10).is_ok());
        assert!(l.admit(&c, 0, 10).is_ok());
        assert_eq!(l.admit(&c, 0, 10).err().unwrap().class, Class::Requests);
    }

    #[test]
    fn a_refusal_by_a_later_scope_undoes_the_earlier_ones() {
        let l = LocalLimiter::default();
        let key_limits = Limits {
            rpm: 10,
            tpm: 1000,
            concurrency: 5,
        };
        let team = check(
            Scope::Team,
            "t",
            Limits {
                rpm: 1,
                ..Limits::default()
            },
        );
        let both = vec![check(Scope::Key, "k", key_limits), team.clone()];
        let first = l.admit(&both, 0, 100).unwrap();
        let r = l.admit(&both, 0, 100).err().unwrap();
        assert_eq!((r.scope, r.class), (Scope::Team, Class::Requests));
        drop(first);
        // The key's own state is as if the refused request never came: 9 requests, 900
        // tokens and 5 slots left (one request of 100 tokens was admitted).
        let only_key = key(key_limits);
        let held: Vec<_> = (0..5)
            .map(|_| l.admit(&only_key, 0, 100).unwrap())
            .collect();
        assert_eq!(held.last().unwrap().requests.unwrap().remaining, 4);
        assert_eq!(held.last().unwrap().tokens.unwrap().remaining, 400);
        assert_eq!(
            l.admit(&only_key, 0, 1).err().unwrap().class,
            Class::Concurrency
        );
    }

    #[test]
    fn headers_report_the_tightest_scope() {
        let l = LocalLimiter::default();
        let checks = vec![
            check(
                Scope::Key,
                "k",
                Limits {
                    rpm: 100,
                    ..Limits::default()
                },
            ),
            check(
                Scope::Model,
                "m",
                Limits {
                    rpm: 3,
                    ..Limits::default()
                },
            ),
        ];
        let a = l.admit(&checks, 0, 0).unwrap();
        assert_eq!(a.requests.unwrap().limit, 3);
        assert_eq!(a.requests.unwrap().remaining, 2);
    }

    proptest! {
        /// Frozen clock, one request at a time (reserve, then settle): however far actual usage
        /// strays from the estimate (by at most E), the total used never exceeds the limit plus
        /// one request's estimate error.
        #[test]
        fn sequential_reserve_settle_overshoots_by_at_most_one_error(
            reqs in prop::collection::vec((1u64..400, 0u64..=60, any::<bool>()), 1..100),
        ) {
            const LIMIT: u64 = 2_000;
            const E: u64 = 60;
            let l = LocalLimiter::default();
            let c = key(Limits { tpm: LIMIT, ..Limits::default() });
            let mut used = 0u64;
            for (estimate, err, over) in &reqs {
                if let Ok(mut adm) = l.admit(&c, 0, *estimate) {
                    let actual = if *over { estimate + err } else { estimate.saturating_sub(*err) };
                    adm.settle(0, actual);
                    used += actual;
                }
                prop_assert!(used <= LIMIT + E, "used {used}");
            }
        }

        /// Frozen clock, requests overlapping in any order, usage never above the estimate,
        /// limited by key and team at once: the total used never exceeds either limit.
        #[test]
        fn interleaved_reservations_never_exceed_the_limit(
            reqs in prop::collection::vec((1u64..400, 0u64..400), 1..100),
            order in prop::collection::vec(any::<prop::sample::Index>(), 100),
            team_limit in 500u64..3_000,
        ) {
            const LIMIT: u64 = 2_000;
            let l = LocalLimiter::default();
            let c = vec![
                check(Scope::Key, "k", Limits { tpm: LIMIT, ..Limits::default() }),
                check(Scope::Team, "t", Limits { tpm: team_limit, ..Limits::default() }),
            ];
            let mut pending: Vec<(Admission, u64)> = Vec::new();
            let mut used = 0u64;
            for (i, (estimate, under)) in reqs.iter().enumerate() {
                if !pending.is_empty() && order[i].index(3) == 0 {
                    let (mut adm, actual) = pending.swap_remove(order[i].index(pending.len()));
                    adm.settle(0, actual);
                    used += actual;
                }
                if let Ok(adm) = l.admit(&c, 0, *estimate) {
                    pending.push((adm, estimate.saturating_sub(*under)));
                }
                let reserved: u64 = pending.iter().map(|(a, _)| a.reserved_tokens()).sum();
                prop_assert!(used + reserved <= LIMIT.min(team_limit));
            }
            for (mut adm, actual) in pending.drain(..) {
                adm.settle(0, actual);
                used += actual;
            }
            prop_assert!(used <= LIMIT.min(team_limit));
        }
    }
}
