//! Rate limits: GCRA for requests and tokens per minute, with reserve-then-settle for tokens,
//! and a concurrency gate. Pure state machines over a caller-supplied clock (microseconds), so
//! the property tests can drive any interleaving; `Limiter` holds one state per key.
//!
//! GCRA keeps one number per limit: the theoretical arrival time (TAT). A request of cost `n`
//! moves it forward by `n × period / limit`; it is admitted while the TAT stays within one
//! period of now. Tokens are reserved at admission from an estimate and settled with the
//! provider's count afterwards by moving the TAT back or forth.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub const MINUTE_US: u64 = 60_000_000;

/// What a limit said, for the `x-ratelimit-*` headers and for a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u64,
    pub remaining: u64,
    /// Until the limit is fully replenished.
    pub reset_us: u64,
    /// When refused: until this request could be admitted.
    pub retry_after_us: u64,
}

/// A GCRA limit of `limit` units per `period_us`, over an atomic TAT.
#[derive(Debug, Default)]
pub struct Gcra {
    tat_us: AtomicU64,
}

fn increment(limit: u64, period_us: u64, cost: u64) -> u64 {
    u64::try_from(u128::from(period_us) * u128::from(cost) / u128::from(limit.max(1)))
        .unwrap_or(u64::MAX)
}

fn remaining(limit: u64, period_us: u64, now: u64, tat: u64) -> u64 {
    let used = tat.saturating_sub(now);
    let free = period_us.saturating_sub(used);
    u64::try_from(u128::from(free) * u128::from(limit) / u128::from(period_us.max(1))).unwrap_or(0)
}

impl Gcra {
    /// Admits `cost` units now, or refuses without changing anything.
    pub fn take(&self, now: u64, limit: u64, period_us: u64, cost: u64) -> Decision {
        let inc = increment(limit, period_us, cost);
        let mut current = self.tat_us.load(Ordering::Acquire);
        loop {
            let tat = current.max(now);
            let new_tat = tat.saturating_add(inc);
            let allow_at = new_tat.saturating_sub(period_us);
            if now < allow_at || cost > limit {
                return Decision {
                    allowed: false,
                    limit,
                    remaining: remaining(limit, period_us, now, tat),
                    reset_us: tat - now,
                    // A request larger than the whole limit is never admitted: say a period.
                    retry_after_us: if cost > limit {
                        period_us
                    } else {
                        allow_at - now
                    },
                };
            }
            match self.tat_us.compare_exchange_weak(
                current,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Decision {
                        allowed: true,
                        limit,
                        remaining: remaining(limit, period_us, now, new_tat),
                        reset_us: new_tat - now,
                        retry_after_us: 0,
                    }
                }
                Err(actual) => current = actual,
            }
        }
    }

    /// Settles a reservation: `delta` units more (positive) or fewer (negative) than reserved.
    /// A refund never moves the TAT before now (unused capacity in the past is gone).
    pub fn adjust(&self, now: u64, limit: u64, period_us: u64, delta: i64) {
        let inc = increment(limit, period_us, delta.unsigned_abs());
        let mut current = self.tat_us.load(Ordering::Acquire);
        loop {
            let new_tat = if delta >= 0 {
                current.max(now).saturating_add(inc)
            } else {
                current.saturating_sub(inc).max(now.min(current))
            };
            match self.tat_us.compare_exchange_weak(
                current,
                new_tat,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return,
                Err(actual) => current = actual,
            }
        }
    }

    /// The state without taking anything, for response headers.
    pub fn peek(&self, now: u64, limit: u64, period_us: u64) -> Decision {
        let tat = self.tat_us.load(Ordering::Acquire).max(now);
        Decision {
            allowed: true,
            limit,
            remaining: remaining(limit, period_us, now, tat),
            reset_us: tat - now,
            retry_after_us: 0,
        }
    }
}

/// Limits for one key (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub rpm: u64,
    pub tpm: u64,
    pub concurrency: u32,
}

/// Live state for one key.
#[derive(Debug, Default)]
pub struct KeyState {
    pub requests: Gcra,
    pub tokens: Gcra,
    pub in_flight: AtomicU32,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Requests(Decision),
    Tokens(Decision),
    Concurrency { limit: u32 },
}

/// Admission granted: holds the concurrency slot and the token reservation until settled
/// (or dropped, which releases the slot and keeps the reservation, the safe side).
pub struct Admission {
    /// `None` for a key without limits: nothing to take, settle or release.
    state: Option<Arc<KeyState>>,
    limits: Limits,
    reserved_tokens: u64,
    pub requests: Option<Decision>,
    pub tokens: Option<Decision>,
    settled: bool,
}

impl Admission {
    /// Replaces the token reservation with what was actually used.
    pub fn settle(&mut self, now: u64, actual_tokens: u64) {
        if self.settled {
            return;
        }
        self.settled = true;
        let Some(state) = &self.state else { return };
        if self.limits.tpm > 0 {
            let delta = actual_tokens as i64 - self.reserved_tokens as i64;
            if delta != 0 {
                state.tokens.adjust(now, self.limits.tpm, MINUTE_US, delta);
            }
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let (Some(state), true) = (&self.state, self.limits.concurrency > 0) {
            state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Per-key limiter state, created on first use.
#[derive(Default)]
pub struct Limiter {
    keys: RwLock<HashMap<String, Arc<KeyState>>>,
}

impl Limiter {
    pub fn state(&self, key_id: &str) -> Arc<KeyState> {
        if let Some(s) = self
            .keys
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key_id)
        {
            return s.clone();
        }
        self.keys
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key_id.to_string())
            .or_default()
            .clone()
    }

    /// Concurrency first (cheapest to undo), then requests, then the token estimate. A refusal
    /// by a later limit undoes what the earlier ones took.
    pub fn admit(
        &self,
        key_id: &str,
        limits: Limits,
        now: u64,
        estimated_tokens: u64,
    ) -> Result<Admission, Refusal> {
        // The common case, a key without limits, takes no lock and does no lookup.
        if limits == Limits::default() {
            return Ok(Admission {
                state: None,
                limits,
                reserved_tokens: 0,
                requests: None,
                tokens: None,
                settled: false,
            });
        }
        let state = self.state(key_id);
        if limits.concurrency > 0 {
            let prev = state.in_flight.fetch_add(1, Ordering::AcqRel);
            if prev >= limits.concurrency {
                state.in_flight.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::Concurrency {
                    limit: limits.concurrency,
                });
            }
        }
        // From here, dropping `adm` releases the concurrency slot.
        let mut adm = Admission {
            state: Some(state.clone()),
            limits,
            reserved_tokens: 0,
            requests: None,
            tokens: None,
            settled: false,
        };
        if limits.rpm > 0 {
            let d = state.requests.take(now, limits.rpm, MINUTE_US, 1);
            if !d.allowed {
                return Err(Refusal::Requests(d));
            }
            adm.requests = Some(d);
        }
        if limits.tpm > 0 {
            let d = state
                .tokens
                .take(now, limits.tpm, MINUTE_US, estimated_tokens);
            if !d.allowed {
                if limits.rpm > 0 {
                    // The request was not admitted: give its request slot back.
                    state.requests.adjust(now, limits.rpm, MINUTE_US, -1);
                }
                return Err(Refusal::Tokens(d));
            }
            adm.reserved_tokens = estimated_tokens;
            adm.tokens = Some(d);
        }
        Ok(adm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn requests_per_minute_admit_the_limit_then_refuse_with_retry_after() {
        let g = Gcra::default();
        for i in 0..5 {
            let d = g.take(0, 5, MINUTE_US, 1);
            assert!(d.allowed, "request {i}");
            assert_eq!(d.remaining, 4 - i);
        }
        let d = g.take(0, 5, MINUTE_US, 1);
        assert!(!d.allowed);
        // One slot frees every 12 s.
        assert_eq!(d.retry_after_us, 12_000_000);
        assert!(g.take(12_000_000, 5, MINUTE_US, 1).allowed);
        assert!(!g.take(12_000_000, 5, MINUTE_US, 1).allowed);
    }

    #[test]
    fn a_cost_above_the_limit_is_never_admitted() {
        let g = Gcra::default();
        let d = g.take(0, 1000, MINUTE_US, 1001);
        assert!(!d.allowed);
        assert_eq!(d.retry_after_us, MINUTE_US);
    }

    #[test]
    fn token_refunds_make_room_and_overruns_take_it() {
        let g = Gcra::default();
        assert!(g.take(0, 1000, MINUTE_US, 800).allowed);
        assert!(!g.take(0, 1000, MINUTE_US, 300).allowed);
        g.adjust(0, 1000, MINUTE_US, -600); // used 200 of the 800 reserved
        assert!(g.take(0, 1000, MINUTE_US, 300).allowed);
        g.adjust(0, 1000, MINUTE_US, 500); // used 800 of the 300 reserved
        assert!(!g.take(0, 1000, MINUTE_US, 1).allowed);
    }

    #[test]
    fn concurrency_slots_come_back_on_drop() {
        let l = Limiter::default();
        let lim = Limits {
            concurrency: 2,
            ..Limits::default()
        };
        let a = l.admit("k", lim, 0, 0).unwrap();
        let _b = l.admit("k", lim, 0, 0).unwrap();
        assert!(matches!(
            l.admit("k", lim, 0, 0),
            Err(Refusal::Concurrency { limit: 2 })
        ));
        drop(a);
        assert!(l.admit("k", lim, 0, 0).is_ok());
    }

    #[test]
    fn a_token_refusal_gives_the_request_slot_back() {
        let l = Limiter::default();
        let lim = Limits {
            rpm: 2,
            tpm: 100,
            concurrency: 0,
        };
        assert!(matches!(l.admit("k", lim, 0, 500), Err(Refusal::Tokens(_))));
        assert!(l.admit("k", lim, 0, 10).is_ok());
        assert!(l.admit("k", lim, 0, 10).is_ok());
        assert!(matches!(
            l.admit("k", lim, 0, 10),
            Err(Refusal::Requests(_))
        ));
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
            let l = Limiter::default();
            let lim = Limits { tpm: LIMIT, ..Limits::default() };
            let mut used = 0u64;
            for (estimate, err, over) in &reqs {
                if let Ok(mut adm) = l.admit("k", lim, 0, *estimate) {
                    let actual = if *over { estimate + err } else { estimate.saturating_sub(*err) };
                    adm.settle(0, actual);
                    used += actual;
                }
                prop_assert!(used <= LIMIT + E, "used {used}");
            }
        }

        /// Frozen clock, requests overlapping in any order, usage never above the estimate:
        /// the total used never exceeds the limit.
        #[test]
        fn interleaved_reservations_never_exceed_the_limit(
            reqs in prop::collection::vec((1u64..400, 0u64..400), 1..100),
            order in prop::collection::vec(any::<prop::sample::Index>(), 100),
        ) {
            const LIMIT: u64 = 2_000;
            let l = Limiter::default();
            let lim = Limits { tpm: LIMIT, ..Limits::default() };
            let mut pending: Vec<(Admission, u64)> = Vec::new();
            let mut used = 0u64;
            for (i, (estimate, under)) in reqs.iter().enumerate() {
                if !pending.is_empty() && order[i].index(3) == 0 {
                    let (mut adm, actual) = pending.swap_remove(order[i].index(pending.len()));
                    adm.settle(0, actual);
                    used += actual;
                }
                if let Ok(adm) = l.admit("k", lim, 0, *estimate) {
                    pending.push((adm, estimate.saturating_sub(*under)));
                }
                let reserved: u64 = pending.iter().map(|(a, _)| a.reserved_tokens).sum();
                prop_assert!(used + reserved <= LIMIT);
            }
            for (mut adm, actual) in pending.drain(..) {
                adm.settle(0, actual);
                used += actual;
            }
            prop_assert!(used <= LIMIT);
        }

        /// Requests per minute at a frozen clock: exactly the limit is admitted.
        #[test]
        fn gcra_admits_exactly_the_limit_at_once(limit in 1u64..500) {
            let g = Gcra::default();
            let admitted = (0..limit * 2).filter(|_| g.take(0, limit, MINUTE_US, 1).allowed).count() as u64;
            prop_assert_eq!(admitted, limit);
        }

        /// Over a long run at any offered rate, the admitted count stays within one burst of
        /// the rate: limit per minute, plus the initial burst.
        #[test]
        fn gcra_holds_the_rate_over_time(limit in 1u64..200, gap_us in 1_000u64..2_000_000) {
            let g = Gcra::default();
            let horizon = 5 * MINUTE_US;
            let mut now = 0;
            let mut admitted = 0u64;
            while now < horizon {
                if g.take(now, limit, MINUTE_US, 1).allowed {
                    admitted += 1;
                }
                now += gap_us;
            }
            prop_assert!(admitted <= limit * 5 + limit, "{admitted}");
        }
    }
}
