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

    /// The entry for `k` if either generation has it (moved into the current one).
    pub fn get_mut(&mut self, k: u64, now: u64, span: u64) -> Option<&mut V> {
        self.turn(now, span);
        if !self.cur.contains_key(&k) {
            let v = self.prev.remove(&k)?;
            self.cur.insert(k, v);
        }
        self.cur.get_mut(&k)
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

/// "When was this fingerprint last seen?" in a fixed amount of memory, whatever the traffic:
/// 8 bytes a slot, 8-way set-associative, the oldest sighting in a set giving way when the
/// set is full. Under more distinct fingerprints than slots within a window the oldest are
/// forgotten first, as a generation map's early turnover would, but the memory never grows
/// past its size and never needs a rehash. A slot is a 32-bit tag and a 32-bit time in
/// milliseconds of the limiter's clock (wrapping; ages are compared, never absolute times).
pub struct SeenTable {
    shards: Vec<std::sync::Mutex<Box<[u64]>>>,
    sets_per_shard: usize,
    /// Where a fingerprint lands is keyed per process, so traffic cannot be crafted to crowd
    /// one set.
    hasher: std::collections::hash_map::RandomState,
}

const WAYS: usize = 8;
const SEEN_SHARDS: usize = 16;

impl SeenTable {
    /// A table of at least `slots` slots (rounded up to whole sets in every shard). The pages
    /// are mapped when first used.
    pub fn new(slots: usize) -> Self {
        let sets_per_shard = slots.div_ceil(WAYS * SEEN_SHARDS).max(1);
        SeenTable {
            shards: (0..SEEN_SHARDS)
                .map(|_| {
                    std::sync::Mutex::new(vec![0u64; sets_per_shard * WAYS].into_boxed_slice())
                })
                .collect(),
            sets_per_shard,
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }

    pub fn slots(&self) -> usize {
        self.sets_per_shard * WAYS * SEEN_SHARDS
    }

    fn place(&self, fp: u64) -> (usize, usize, u64) {
        use std::hash::BuildHasher;
        let h = self.hasher.hash_one(fp);
        let shard = (h as usize) % SEEN_SHARDS;
        let set = ((h >> 8) as usize) % self.sets_per_shard;
        // Tag 0 never occurs, so an all-zero slot is an empty one.
        let tag = (h >> 32) | 1;
        (shard, set * WAYS, tag)
    }

    /// Records a sighting of `fp` at `now_us` and returns how long ago (µs, to the
    /// millisecond) it was last seen, if that is still remembered.
    pub fn swap(&self, fp: u64, now_us: u64) -> Option<u64> {
        let (shard, at, tag) = self.place(fp);
        let now_ms = (now_us / 1000) as u32;
        let mut slots = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        let set = &mut slots[at..at + WAYS];
        let stamp = (tag << 32) | u64::from(now_ms);
        let age = |slot: u64| now_ms.wrapping_sub(slot as u32);
        if let Some(slot) = set.iter_mut().find(|s| **s >> 32 == tag) {
            let ago = age(*slot);
            *slot = stamp;
            return Some(u64::from(ago) * 1000);
        }
        // An empty slot, else the one seen longest ago.
        let victim = set
            .iter_mut()
            .max_by_key(|s| {
                if **s == 0 {
                    u64::MAX
                } else {
                    u64::from(age(**s))
                }
            })
            .unwrap_or_else(|| unreachable!());
        *victim = stamp;
        None
    }

    /// Forgets `fp`.
    pub fn remove(&self, fp: u64) {
        let (shard, at, tag) = self.place(fp);
        let mut slots = self.shards[shard].lock().unwrap_or_else(|p| p.into_inner());
        for slot in &mut slots[at..at + WAYS] {
            if *slot >> 32 == tag {
                *slot = 0;
            }
        }
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
    fn a_seen_table_remembers_the_latest_and_forgets_the_oldest() {
        let t = SeenTable::new(1024);
        assert_eq!(t.slots(), 1024);
        assert_eq!(t.swap(1, 5_000), None);
        assert_eq!(t.swap(1, 12_345), Some(7_000));
        assert_eq!(t.swap(2, 12_345), None);
        t.remove(1);
        assert_eq!(t.swap(1, 20_000), None);
        // Far more fingerprints than slots: the latest are still there, most of the oldest
        // are not, and the table is the same size.
        for fp in 0..100_000u64 {
            t.swap(fp + 10, 1_000_000 + fp * 1000);
        }
        let now = 1_000_000 + 100_000 * 1000;
        let recent = (99_500..100_000u64)
            .filter(|fp| t.swap(fp + 10, now).is_some())
            .count();
        assert!(recent > 450, "{recent}");
        let old = (0..500u64)
            .filter(|fp| t.swap(fp + 10, now).is_some())
            .count();
        assert!(old < 10, "{old}");
        assert_eq!(t.slots(), 1024);
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
