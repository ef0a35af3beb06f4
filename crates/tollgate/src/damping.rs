//! Retry-storm damping. Agents retry on every hiccup, and a retry storm from fifty agents is
//! how a provider's blip becomes an outage and a bill. Four tools:
//!
//! - **Recognising retries**: a request carrying an `Idempotency-Key` seen before, or the
//!   same request (byte for byte, same key) again within a few seconds.
//! - **Retry budgets**: a key's retries may be at most a share (20%) of its recent requests,
//!   with a small floor; the gateway's own upstream retries spend from a per-deployment
//!   budget the same way, so failover cannot multiply load on a struggling provider.
//! - **Coalescing**: identical concurrent non-streaming requests from one key make one
//!   upstream call; the others get its answer, recorded as `coalesced` at zero cost.
//! - **Replay**: the answer to a request with an `Idempotency-Key` is kept for a while and
//!   a retry gets it again instead of paying twice (`replayed`); the loop guard's `replay`
//!   action answers a repeated request from its previous answer (`loop_replay`).

use crate::error::ApiError;
use crate::genmap::{GenMap, SeenTable};
use bytes::Bytes;
use http::{HeaderValue, StatusCode};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// A finished JSON answer, as the client got it.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: HeaderValue,
    pub body: Bytes,
    /// The request that paid for it.
    pub request_id: String,
    /// The request it answered, to refuse an `Idempotency-Key` reused for another request.
    pub request_fp: u64,
}

/// What a coalescing leader hands its followers.
#[derive(Debug, Clone)]
pub enum Outcome {
    Answer(Arc<Answer>),
    Error(ApiError, String),
}

/// Requests and retries over a sliding window, approximated by two fixed buckets (the
/// previous bucket's count weighted by how much of it is still inside the window).
#[derive(Debug, Default, Clone, Copy)]
pub struct RetryWindow {
    start_us: u64,
    requests: u32,
    retries: u32,
    prev_requests: u32,
    prev_retries: u32,
}

impl RetryWindow {
    fn roll(&mut self, now: u64, window_us: u64) {
        let window_us = window_us.max(1);
        if now < self.start_us + window_us {
            return;
        }
        if now < self.start_us + 2 * window_us {
            self.prev_requests = self.requests;
            self.prev_retries = self.retries;
        } else {
            self.prev_requests = 0;
            self.prev_retries = 0;
        }
        self.requests = 0;
        self.retries = 0;
        self.start_us = now - (now - self.start_us) % window_us;
    }

    fn weighted(&self, now: u64, window_us: u64, prev: u32, cur: u32) -> f64 {
        let into = (now.saturating_sub(self.start_us)) as f64 / window_us.max(1) as f64;
        f64::from(prev) * (1.0 - into).max(0.0) + f64::from(cur)
    }

    /// Counts a request; if it is a retry, admits it only within the budget.
    pub fn admit(&mut self, now: u64, window_us: u64, retry: bool, ratio: f64, floor: u32) -> bool {
        self.roll(now, window_us);
        if retry {
            let requests = self.weighted(now, window_us, self.prev_requests, self.requests) + 1.0;
            let retries = self.weighted(now, window_us, self.prev_retries, self.retries);
            if retries + 1.0 > (requests * ratio).max(f64::from(floor)) {
                return false;
            }
            self.retries += 1;
        }
        self.requests += 1;
        true
    }
}

/// A per-deployment budget for the gateway's own upstream retries.
#[derive(Debug, Default)]
pub struct DeploymentBudget(Mutex<RetryWindow>);

impl DeploymentBudget {
    pub fn admit(&self, now: u64, window_us: u64, retry: bool, ratio: f64, floor: u32) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(now, window_us, retry, ratio, floor)
    }
}

/// Answers kept by a 64-bit request fingerprint until they expire, bounded in count and
/// bytes (oldest first out).
#[derive(Default)]
struct AnswerCache {
    map: HashMap<u64, (u64, Arc<Answer>)>,
    order: VecDeque<u64>,
    bytes: usize,
}

const CACHE_MAX_ENTRIES: usize = 10_000;
const CACHE_MAX_BYTES: usize = 64 << 20;
/// Larger answers are not kept: replaying them is rare and memory is not.
pub const CACHE_MAX_ANSWER: usize = 1 << 20;

impl AnswerCache {
    fn get(&self, fp: u64, now: u64) -> Option<Arc<Answer>> {
        self.map
            .get(&fp)
            .filter(|(exp, _)| *exp > now)
            .map(|(_, a)| a.clone())
    }

    fn put(&mut self, fp: u64, expires: u64, answer: Arc<Answer>) {
        self.bytes += answer.body.len();
        if let Some((_, old)) = self.map.insert(fp, (expires, answer)) {
            self.bytes -= old.body.len();
        } else {
            self.order.push_back(fp);
        }
        while self.map.len() > CACHE_MAX_ENTRIES || self.bytes > CACHE_MAX_BYTES {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            if let Some((_, a)) = self.map.remove(&old) {
                self.bytes -= a.body.len();
            }
        }
    }
}

/// Where a request stands with respect to identical ones in flight.
pub enum Coalesce {
    /// Make the call; others will wait for it.
    Lead,
    /// Wait for the leader's outcome.
    Follow(watch::Receiver<Option<Outcome>>),
}

pub struct Damper {
    budgets: Mutex<HashMap<String, RetryWindow>>,
    /// Request fingerprint → when it was last seen, for the same-request window: every
    /// request has one, so a fixed-size table.
    recent: SeenTable,
    /// `Idempotency-Key` fingerprint → when it was last seen, for the idempotency TTL.
    idempotency: Mutex<GenMap<u64>>,
    inflight: Mutex<HashMap<u64, watch::Sender<Option<Outcome>>>>,
    answers: Mutex<AnswerCache>,
}

/// Requests remembered for the same-request window: 256 Ki in 2 MiB, a full default window
/// (10 s) at 26 000 requests/s; beyond that the oldest are forgotten first.
const RECENT_SLOTS: usize = 256 * 1024;
/// `Idempotency-Key`s remembered per generation (two generations are kept).
const IDEMPOTENCY_CAP: usize = 200_000;

impl Default for Damper {
    fn default() -> Self {
        Damper {
            budgets: Mutex::default(),
            recent: SeenTable::new(RECENT_SLOTS),
            idempotency: Mutex::new(GenMap::new(IDEMPOTENCY_CAP)),
            inflight: Mutex::default(),
            answers: Mutex::default(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn sighting(map: &Mutex<GenMap<u64>>, fp: u64, now: u64, within_us: u64) -> bool {
    let mut map = lock(map);
    // u64::MAX marks "never seen": a fresh entry.
    let last = map.entry(fp, now, within_us.max(1), || u64::MAX);
    let seen = *last != u64::MAX && now.saturating_sub(*last) < within_us;
    *last = now;
    seen
}

/// One 64-bit fingerprint of parts that identify a request.
pub fn fingerprint(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

impl Damper {
    /// Records a sighting of a request; true if it was seen within `within_us` before.
    pub fn seen_recently(&self, fp: u64, now: u64, within_us: u64) -> bool {
        self.recent.swap(fp, now).is_some_and(|ago| ago < within_us)
    }

    /// Forgets a request's sighting: the next identical request is not a retry of it.
    pub fn forget(&self, fp: u64) {
        self.recent.remove(fp);
    }

    /// Records a sighting of an `Idempotency-Key`; true if it was seen within `ttl_us`.
    pub fn idempotency_seen(&self, fp: u64, now: u64, ttl_us: u64) -> bool {
        sighting(&self.idempotency, fp, now, ttl_us)
    }

    /// Counts a key's request against its retry budget.
    pub fn admit(
        &self,
        key_id: &str,
        now: u64,
        window_us: u64,
        retry: bool,
        ratio: f64,
        floor: u32,
    ) -> bool {
        let mut budgets = lock(&self.budgets);
        if let Some(w) = budgets.get_mut(key_id) {
            return w.admit(now, window_us, retry, ratio, floor);
        }
        let mut w = RetryWindow {
            start_us: now,
            ..RetryWindow::default()
        };
        let ok = w.admit(now, window_us, retry, ratio, floor);
        budgets.insert(key_id.to_string(), w);
        ok
    }

    pub fn answer(&self, fp: u64, now: u64) -> Option<Arc<Answer>> {
        lock(&self.answers).get(fp, now)
    }

    pub fn keep_answer(&self, fp: u64, expires: u64, answer: Arc<Answer>) {
        if answer.body.len() <= CACHE_MAX_ANSWER {
            lock(&self.answers).put(fp, expires, answer);
        }
    }

    pub fn coalesce(&self, fp: u64) -> Coalesce {
        let mut inflight = lock(&self.inflight);
        if let Some(tx) = inflight.get(&fp) {
            return Coalesce::Follow(tx.subscribe());
        }
        inflight.insert(fp, watch::channel(None).0);
        Coalesce::Lead
    }

    /// The leader is done: followers get `outcome` (or, with `None`, are released to make
    /// their own calls).
    pub fn finish_lead(&self, fp: u64, outcome: Option<Outcome>) {
        let tx = lock(&self.inflight).remove(&fp);
        if let (Some(tx), Some(o)) = (tx, outcome) {
            let _ = tx.send(Some(o));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 60_000_000;

    #[test]
    fn retries_stay_within_the_share_of_requests_with_a_floor() {
        let mut w = RetryWindow::default();
        // The floor: 3 retries even with no other traffic.
        let admitted = (0..10).filter(|_| w.admit(0, W, true, 0.2, 3)).count();
        assert_eq!(admitted, 3);
        // After 100 first attempts, retries may be 20% of all requests.
        let mut w = RetryWindow::default();
        for _ in 0..100 {
            assert!(w.admit(0, W, false, 0.2, 3));
        }
        let admitted = (0..100).filter(|_| w.admit(0, W, true, 0.2, 3)).count();
        // r + 1 <= 0.2 * (100 + r + 1)  →  r <= 24
        assert_eq!(admitted, 25);
    }

    #[test]
    fn the_window_slides() {
        let mut w = RetryWindow::default();
        assert_eq!((0..5).filter(|_| w.admit(0, W, true, 0.2, 2)).count(), 2);
        // Half a window later the old retries weigh half; two windows later, nothing.
        assert!(!w.admit(W / 2, W, true, 0.2, 2));
        assert!(w.admit(3 * W, W, true, 0.2, 2));
        assert!(w.admit(3 * W, W, true, 0.2, 2));
        assert!(!w.admit(3 * W, W, true, 0.2, 2));
    }

    #[test]
    fn the_answer_cache_expires_and_stays_bounded() {
        let mut c = AnswerCache::default();
        let a = |n: usize| {
            Arc::new(Answer {
                status: StatusCode::OK,
                content_type: HeaderValue::from_static("application/json"),
                body: Bytes::from(vec![b'x'; n]),
                request_id: "r".into(),
                request_fp: 0,
            })
        };
        c.put(1, 100, a(10));
        assert!(c.get(1, 99).is_some());
        assert!(c.get(1, 100).is_none());
        for i in 0..(CACHE_MAX_ENTRIES as u64 + 10) {
            c.put(i + 10, 1000, a(1));
        }
        assert_eq!(c.map.len(), CACHE_MAX_ENTRIES);
        assert!(c.get(10, 0).is_none(), "the oldest went first");
    }
}
