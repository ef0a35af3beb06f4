//! A map that forgets: entries live in the current generation or the previous one, and the
//! generations turn over after a time span or a size cap. Every operation is O(1); there is
//! never a sweep over all entries on the request path (a `retain` over a full map on every
//! insert is what a naive "prune when large" does under sustained unique traffic).

use std::collections::HashMap;

pub struct GenMap<V> {
    cur: HashMap<u64, V>,
    prev: HashMap<u64, V>,
    started: u64,
    cap: usize,
}

impl<V> GenMap<V> {
    /// `cap`: entries per generation; beyond it the generation turns over early (entries
    /// then live shorter than the span, the price of bounded memory).
    pub fn new(cap: usize) -> Self {
        GenMap {
            cur: HashMap::new(),
            prev: HashMap::new(),
            started: 0,
            cap: cap.max(1),
        }
    }

    fn turn(&mut self, now: u64, span: u64) {
        if now.saturating_sub(self.started) >= span || self.cur.len() >= self.cap {
            // Older than two spans is gone; one span back is still readable.
            let keep_prev = now.saturating_sub(self.started) < span.saturating_mul(2);
            self.prev = std::mem::take(&mut self.cur);
            if !keep_prev {
                self.prev.clear();
            }
            self.started = now;
        }
    }

    /// The entry for `k`, created with `make` if absent from both generations. Entries are
    /// guaranteed to survive at least `span` (under the size cap).
    pub fn entry(&mut self, k: u64, now: u64, span: u64, make: impl FnOnce() -> V) -> &mut V {
        self.turn(now, span);
        if !self.cur.contains_key(&k) {
            let v = self.prev.remove(&k).unwrap_or_else(make);
            self.cur.insert(k, v);
        }
        self.cur.get_mut(&k).unwrap_or_else(|| unreachable!())
    }

    /// Forgets `k` in both generations.
    pub fn remove(&mut self, k: u64) {
        self.cur.remove(&k);
        self.prev.remove(&k);
    }

    pub fn len(&self) -> usize {
        self.cur.len() + self.prev.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_survive_one_span_and_are_gone_after_two() {
        let mut m = GenMap::new(1000);
        *m.entry(1, 0, 10, || 0) += 1;
        *m.entry(1, 9, 10, || 0) += 1;
        // The generation turns at 10; the entry moves back into the current one when used.
        assert_eq!(*m.entry(1, 15, 10, || 0), 2);
        m.entry(2, 15, 10, || 7);
        // 15 + 2 spans later everything from then is gone.
        assert_eq!(*m.entry(2, 40, 10, || 0), 0);
    }

    #[test]
    fn memory_stays_bounded_under_unique_traffic() {
        let mut m = GenMap::new(100);
        for i in 0..10_000u64 {
            m.entry(i, 0, u64::MAX, || ());
        }
        assert!(m.len() <= 200, "{}", m.len());
    }
}
