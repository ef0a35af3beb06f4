//! The loop guard: an agent that sends the same request again and again, or calls the same
//! tool with the same arguments over and over, is told so instead of being served (and billed)
//! indefinitely.

use crate::genmap::GenMap;
use std::collections::VecDeque;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

const SHARDS: usize = 16;
/// Fingerprints tracked per shard and generation: 16 × 2 × 64 Ki at most, whatever the load.
const SHARD_CAP: usize = 65_536;

/// Recent sightings of each (key, fingerprint), in microseconds of the limiter's clock.
pub struct LoopGuard {
    shards: Vec<Mutex<GenMap<VecDeque<u64>>>>,
}

impl Default for LoopGuard {
    fn default() -> Self {
        LoopGuard {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(GenMap::new(SHARD_CAP)))
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
    /// included, and when the oldest of them leaves the window.
    pub fn sighting(&self, fp: u64, now: u64, window_us: u64) -> (usize, u64) {
        let shard = &self.shards[(fp as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        let seen = map.entry(fp, now, window_us, VecDeque::new);
        while seen
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= window_us)
        {
            seen.pop_front();
        }
        seen.push_back(now);
        let oldest = seen.front().copied().unwrap_or(now);
        (seen.len(), (oldest + window_us).saturating_sub(now))
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
            assert_eq!(g.sighting(fp, i * 1_000_000, 60_000_000).0, i as usize);
        }
        // 61 s after the first: it has left the window.
        let (n, _) = g.sighting(fp, 61_000_000, 60_000_000);
        assert_eq!(n, 4);
        assert_ne!(fp, fingerprint("k2", "m", &[Some("[1]")]));
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
