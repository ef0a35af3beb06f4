//! The loop guard: an agent that sends the same request again and again, or calls the same
//! tool with the same arguments over and over, is told so instead of being served (and billed)
//! indefinitely.

use crate::genmap::{GenMap, SeenTable};
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

const SHARDS: usize = 16;
/// First sightings remembered: 512 Ki fingerprints in 4 MiB, whatever the load. That is a
/// full default window (60 s) of unique requests at 8 700 requests/s; beyond it the oldest
/// first sightings are forgotten first, so a loop slower than the table's turnover goes
/// unseen (a loop repeating every few seconds is always seen).
const FIRST_SIGHTINGS: usize = 512 * 1024;
/// Fingerprints seen again within the window, per shard and generation: 16 × 2 × 2 Ki at most.
const REPEATS_CAP: usize = 2048;

/// Most fingerprints are seen once (every new conversation turn is a new body), so their one
/// sighting goes into a fixed-size table: 8 bytes a fingerprint and no allocation. Only a
/// fingerprint seen again within the window gets an exact list of its latest sightings, in
/// microseconds of the limiter's clock, in a shard of `repeats`. A map entry per fingerprint
/// was ~40 bytes with its hash-table slack, and the largest piece of the gateway's memory under
/// unique-body traffic.
pub struct LoopGuard {
    first: SeenTable,
    /// Oldest first; never more than the guard needs to decide (`keep`).
    repeats: Vec<Mutex<GenMap<VecDeque<u64>>>>,
}

impl Default for LoopGuard {
    fn default() -> Self {
        LoopGuard {
            first: SeenTable::new(FIRST_SIGHTINGS),
            repeats: (0..SHARDS)
                .map(|_| Mutex::new(GenMap::new(REPEATS_CAP)))
                .collect(),
        }
    }
}

/// A canonical fingerprint of what makes a request the same request: the key, the model, and
/// the exact bytes of the conversation and tools.
pub fn fingerprint(key_id: &str, model: &str, parts: &[Option<&str>]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key_id.hash(&mut h);
    model.hash(&mut h);
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

impl LoopGuard {
    /// Records a sighting and returns how many there were within `window_us`, this one
    /// included and counted up to `keep` (the threshold the caller compares with: only the
    /// latest `keep` sightings are remembered), and, when that reached `keep`, how long until
    /// a repeat would count fewer. `keep` = 0 records nothing.
    pub fn sighting(&self, fp: u64, now: u64, window_us: u64, keep: usize) -> (usize, u64) {
        if keep == 0 {
            return (0, 0);
        }
        let inside = |t: u64| now.saturating_sub(t) < window_us;
        let shard = &self.repeats[(fp as usize) % SHARDS];
        let mut repeats = shard.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = repeats.get_mut(fp, now, window_us) {
            while q.front().is_some_and(|t| !inside(*t)) {
                q.pop_front();
            }
            while q.len() >= keep {
                q.pop_front();
            }
            if !q.is_empty() {
                q.push_back(now);
                // The next request counts itself and the sightings still inside the window;
                // it stays under `keep` once the (keep-1)-th latest has left.
                let clears = match q.len().checked_sub(keep - 1) {
                    Some(i) if keep > 1 => (q[i] + window_us).saturating_sub(now),
                    _ => 0,
                };
                return (q.len(), clears);
            }
            // A loop that stopped gives its list back.
            repeats.remove(fp);
        }
        match self.first.swap(fp, now) {
            Some(ago) if ago < window_us && keep > 1 => {
                let q = repeats.entry(fp, now, window_us, VecDeque::new);
                q.clear();
                q.push_back(now - ago.min(now));
                q.push_back(now);
                (2, if keep == 2 { window_us } else { 0 })
            }
            _ => (1, if keep == 1 { window_us } else { 0 }),
        }
    }
}

/// How many times the most recent tool call in the conversation (same name, same arguments)
/// appears among its calls, and the tool's name. `calls` are `(name, canonical arguments)` in
/// conversation order.
pub fn repeated_tool_call(calls: &[(String, String)]) -> Option<(usize, &str)> {
    let last = calls.last()?;
    let n = calls.iter().filter(|c| *c == last).count();
    Some((n, last.0.as_str()))
}

/// Tool calls made by the assistant in a Chat Completions or Messages conversation (or a
/// Responses `input` list), with
/// arguments re-serialised so that formatting differences do not hide a repeat.
pub fn tool_calls(messages: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let canonical = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s)
            .map(|v| v.to_string())
            .unwrap_or_else(|_| s.to_string())
    };
    for m in messages.as_array().into_iter().flatten() {
        // A Responses `input` item: the call is the item itself.
        if m.get("type").and_then(|t| t.as_str()) == Some("function_call") {
            let name = m.get("name").and_then(|n| n.as_str()).unwrap_or("");
            let args = m.get("arguments").and_then(|a| a.as_str()).unwrap_or("");
            out.push((name.to_string(), canonical(args)));
            continue;
        }
        if m.get("role").and_then(|r| r.as_str()) != Some("assistant") {
            continue;
        }
        for c in m
            .get("tool_calls")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            let name = c
                .pointer("/function/name")
                .and_then(|n| n.as_str())
                .unwrap_or("");
            let args = c
                .pointer("/function/arguments")
                .and_then(|a| a.as_str())
                .unwrap_or("");
            out.push((name.to_string(), canonical(args)));
        }
        for b in m
            .get("content")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            if b.get("type").and_then(|t| t.as_str()) == Some("tool_use") {
                let name = b.get("name").and_then(|n| n.as_str()).unwrap_or("");
                out.push((
                    name.to_string(),
                    b.get("input").map(|i| i.to_string()).unwrap_or_default(),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_sightings_within_the_window() {
        let g = LoopGuard::default();
        let fp = fingerprint("k", "m", &[Some("[1]")]);
        for i in 1..=4 {
            assert_eq!(g.sighting(fp, i * 1_000_000, 60_000_000, 10).0, i as usize);
        }
        // 61 s after the first: it has left the window.
        let (n, _) = g.sighting(fp, 61_000_000, 60_000_000, 10);
        assert_eq!(n, 4);
        assert_ne!(fp, fingerprint("k2", "m", &[Some("[1]")]));
        // Counted up to the threshold, however many there were.
        for i in 62..100 {
            assert!(g.sighting(fp, i * 1_000_000, 60_000_000, 10).0 <= 10);
        }
        assert_eq!(g.sighting(fp, 100_000_000, 60_000_000, 10).0, 10);
        // A fingerprint seen once and then after the window starts again.
        let other = fingerprint("k", "m", &[Some("[2]")]);
        assert_eq!(g.sighting(other, 0, 10_000, 3).0, 1);
        assert_eq!(g.sighting(other, 5_000, 10_000, 3).0, 2);
        assert_eq!(g.sighting(other, 100_000, 10_000, 3).0, 1);
        assert_eq!(g.sighting(other, 101_000, 10_000, 3).0, 2);
        // Nothing is recorded when repeats are not counted.
        assert_eq!(g.sighting(fp, 100_000_000, 60_000_000, 0).0, 0);
    }

    #[test]
    fn says_when_a_repeat_would_pass_again() {
        let g = LoopGuard::default();
        let fp = 7;
        let ms = 1000;
        // Sightings at 0, 10, 20, 30 ms with a threshold of 3 and a window of 100 ms.
        for t in [0, 10, 20] {
            g.sighting(fp, t * ms, 100 * ms, 3);
        }
        let (n, clears) = g.sighting(fp, 30 * ms, 100 * ms, 3);
        assert_eq!(n, 3);
        // A repeat passes once at most one earlier sighting is inside the window: after the
        // one at 20 leaves, at 120.
        assert_eq!(clears, 90 * ms);
        assert_eq!(g.sighting(fp, 119 * ms, 100 * ms, 3).0, 3);
        assert_eq!(g.sighting(fp + 1, 0, 100 * ms, 3), (1, 0));
        // Threshold 2: the second sighting refuses; the next passes when this one leaves.
        g.sighting(fp + 2, 0, 100 * ms, 2);
        assert_eq!(g.sighting(fp + 2, 40 * ms, 100 * ms, 2), (2, 100 * ms));
        assert_eq!(g.sighting(fp + 2, 141 * ms, 100 * ms, 2).0, 1);
    }

    #[test]
    fn unique_traffic_does_not_hide_a_loop_or_grow_the_guard() {
        let g = LoopGuard::default();
        let window = 60_000_000;
        let looping = fingerprint("k", "m", &[Some("again")]);
        let mut refused = 0;
        // 1 000 unique requests a second for a minute, and a loop every 10 s among them.
        for i in 0..60_000u64 {
            let now = i * 1000;
            g.sighting(
                fingerprint("k", "m", &[Some(&i.to_string())]),
                now,
                window,
                5,
            );
            if i % 10_000 == 0 && g.sighting(looping, now, window, 5).0 >= 5 {
                refused += 1;
            }
        }
        assert_eq!(refused, 2, "the 5th and 6th repeats are refused");
        assert!(g.repeats.iter().all(|m| m.lock().unwrap().len() <= 1));
        assert_eq!(g.first.slots(), FIRST_SIGHTINGS);
    }

    #[test]
    fn finds_repeated_tool_calls_in_either_dialect() {
        let chat = json!([
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "search", "arguments": "{\"q\": \"x\"}"}}]},
            {"role": "tool", "content": "nothing"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "search", "arguments": "{\"q\":\"x\"}"}}]},
        ]);
        assert_eq!(repeated_tool_call(&tool_calls(&chat)), Some((2, "search")));
        let messages = json!([
            {"role": "assistant", "content": [{"type": "tool_use", "name": "ls", "input": {"p": "/"}}]},
            {"role": "assistant", "content": [{"type": "tool_use", "name": "ls", "input": {"p": "/tmp"}}]},
        ]);
        assert_eq!(repeated_tool_call(&tool_calls(&messages)), Some((1, "ls")));
        // Responses input: calls are items, arguments compared after re-serialising.
        let input = json!([
            {"role": "user", "content": "run it"},
            {"type": "function_call", "call_id": "a", "name": "exec", "arguments": "{\"cmd\": \"x\"}"},
            {"type": "function_call_output", "call_id": "a", "output": "no"},
            {"type": "function_call", "call_id": "b", "name": "exec", "arguments": "{\"cmd\":\"x\"}"},
        ]);
        assert_eq!(repeated_tool_call(&tool_calls(&input)), Some((2, "exec")));
    }
}
