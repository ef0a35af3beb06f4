//! The generic cell rate algorithm over one atomic, on a caller-supplied clock (microseconds),
//! so property tests can drive any interleaving. `redis.rs` runs the same maths in Lua.
//!
//! GCRA keeps one number per limit: the theoretical arrival time (TAT). A request of cost `n`
//! moves it forward by `n × period / limit`; it is admitted while the TAT stays within one
//! period of now. Tokens are reserved at admission from an estimate and settled with the
//! provider's count afterwards by moving the TAT back or forth.

use std::sync::atomic::{AtomicU64, Ordering};

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

    proptest! {
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
