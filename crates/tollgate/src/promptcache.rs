//! Provider prompt-cache affinity (`[prompt_cache]`, ADR 0031): what a gateway can do so the
//! providers' own prefix caches (reads at a tenth of the input price) actually hit.
//!
//! - **Anthropic breakpoints**: Anthropic caches only up to `cache_control` markers. When a
//!   request has none, they are added after the tools, after the system prompt and on the
//!   last turn before the newest, each only where the prefix up to it reaches the model's
//!   minimum cacheable length, and only while the key's requests reuse their prefixes often
//!   enough to pay the write premium (a write costs 1.25× input, a read 0.1×: writes pay off
//!   once more than ~28 % of them are read again).
//! - **OpenAI `prompt_cache_key`**: a stable key per (virtual key, static prefix), so requests
//!   sharing a prefix land on the same cache.
//! - **Affinity**: a conversation goes back to the deployment that served its last turn, which
//!   holds its cache.

use crate::genmap::{GenMap, SeenTable};
use serde_json::Value;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;

/// How long a provider keeps a prefix (Anthropic's default TTL; OpenAI's is similar).
pub const CACHE_TTL_US: u64 = 5 * 60 * 1_000_000;

/// Anthropic accepts at most four breakpoints; tollgate uses up to three.
const MAX_BREAKPOINTS: usize = 3;

/// The identities of a request's prefixes, from its raw fields.
#[derive(Debug, Clone, Copy, Default)]
pub struct Prefixes {
    /// Key, model, tools and system: what every turn of a conversation shares.
    pub stable: u64,
    /// `stable` and the first turn: the conversation.
    pub conversation: u64,
    /// `stable` and every turn before the newest two: what the previous request sent whole.
    pub previous: Option<u64>,
    /// `stable` and every turn: what the next request will reuse.
    pub whole: u64,
}

fn hash_of(parts: &[&[u8]]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish()
}

/// The prefixes of a request: `fields` are its static fields' raw JSON (tools, system,
/// instructions), `turns` its conversation's elements' raw JSON in order.
pub fn prefixes(key_id: &str, model: &str, fields: &[Option<&str>], turns: &[&str]) -> Prefixes {
    let mut stable_parts: Vec<&[u8]> = vec![key_id.as_bytes(), model.as_bytes()];
    stable_parts.extend(fields.iter().map(|f| f.unwrap_or("").as_bytes()));
    let stable = hash_of(&stable_parts);
    let mut running = stable;
    let mut at: Vec<u64> = Vec::with_capacity(turns.len() + 1);
    at.push(running);
    for t in turns {
        running = hash_of(&[&running.to_le_bytes(), t.as_bytes()]);
        at.push(running);
    }
    Prefixes {
        stable,
        conversation: at.get(1).copied().unwrap_or(stable),
        previous: turns.len().checked_sub(2).map(|n| at[n]),
        whole: running,
    }
}

/// What tollgate remembers to decide: prefixes seen lately, each key's reuse, and where each
/// conversation was served.
pub struct PromptCaches {
    seen: SeenTable,
    /// Key id → how often its requests reuse a prefix seen within the TTL (moving average).
    reuse: Mutex<HashMap<String, f32>>,
    /// Conversation → the deployment that served it last (a hash of provider and model).
    homes: Mutex<GenMap<u64>>,
}

impl Default for PromptCaches {
    fn default() -> Self {
        PromptCaches {
            seen: SeenTable::new(64 * 1024),
            reuse: Mutex::default(),
            homes: Mutex::new(GenMap::new(64 * 1024)),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Identifies a deployment for `homes`.
pub fn deployment_id(provider: &str, model: &str) -> u64 {
    hash_of(&[provider.as_bytes(), model.as_bytes()])
}

impl PromptCaches {
    /// Records the request's prefixes and returns the key's reuse after it: whether writing
    /// its prefixes to a provider cache pays (`>= min_reuse`). A key's first requests count
    /// as reusing (a new agent's conversation is about to).
    pub fn observe(&self, key_id: &str, p: &Prefixes, now_us: u64) -> f32 {
        let recent = |ago: Option<u64>| ago.is_some_and(|a| a < CACHE_TTL_US);
        let stable_seen = recent(self.seen.swap(p.stable, now_us));
        let previous_seen = p
            .previous
            .is_some_and(|prev| recent(self.seen.swap(prev, now_us)));
        self.seen.swap(p.whole, now_us);
        let reused = if stable_seen || previous_seen {
            1.0
        } else {
            0.0
        };
        let mut reuse = lock(&self.reuse);
        let r = reuse.entry(key_id.to_string()).or_insert(1.0);
        *r = 0.9 * *r + 0.1 * reused;
        *r
    }

    /// The deployment that served the conversation's last turn, if within the TTL.
    pub fn home(&self, conversation: u64, now_us: u64) -> Option<u64> {
        lock(&self.homes)
            .get_mut(conversation, now_us, CACHE_TTL_US)
            .map(|d| *d)
    }

    pub fn remember(&self, conversation: u64, deployment: u64, now_us: u64) {
        *lock(&self.homes).entry(conversation, now_us, CACHE_TTL_US, || deployment) = deployment;
    }
}

/// Anthropic-ish tokens in raw JSON: about four bytes each. The minimum is a threshold, so a
/// cheap estimate that errs low (no breakpoint where it might not be cached) is enough.
fn approx_tokens(v: &Value) -> u64 {
    (v.to_string().len() as u64) / 4
}

/// A string content as the one text block it stands for. Every turn gets the same form on
/// every request, so the turn a breakpoint sat on last time has the same bytes now.
fn as_blocks(content: &mut Value) {
    if let Value::String(text) = content {
        *content = serde_json::json!([{"type": "text", "text": std::mem::take(text)}]);
    }
}

/// Marks the last block of `content` (a string becomes one text block), or returns false.
fn mark_last(content: &mut Value) -> bool {
    as_blocks(content);
    let Some(last) = content.as_array_mut().and_then(|a| a.last_mut()) else {
        return false;
    };
    let Some(block) = last.as_object_mut() else {
        return false;
    };
    block.insert(
        "cache_control".into(),
        serde_json::json!({"type": "ephemeral"}),
    );
    true
}

/// A Messages request body with breakpoints after the tools, the system prompt and the turn
/// before the newest, each where the prefix up to it has `min_tokens` or more, and every
/// string content written as its one text block; where they went. `None` when the request already places its own, or none reaches the minimum.
pub fn add_breakpoints(body: &[u8], min_tokens: u64) -> Option<(Vec<u8>, Vec<&'static str>)> {
    if body.windows(15).any(|w| w == b"\"cache_control\"") {
        return None;
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    let mut placed = Vec::new();
    let mut prefix = 0u64;
    if let Some(tools) = obj.get_mut("tools").and_then(Value::as_array_mut) {
        prefix += tools.iter().map(approx_tokens).sum::<u64>();
        if prefix >= min_tokens {
            if let Some(last) = tools.last_mut().and_then(Value::as_object_mut) {
                last.insert(
                    "cache_control".into(),
                    serde_json::json!({"type": "ephemeral"}),
                );
                placed.push("tools");
            }
        }
    }
    if let Some(system) = obj.get_mut("system") {
        prefix += approx_tokens(system);
        as_blocks(system);
        if prefix >= min_tokens && mark_last(system) {
            placed.push("system");
        }
    }
    if let Some(turns) = obj.get_mut("messages").and_then(Value::as_array_mut) {
        for t in turns.iter_mut() {
            if let Some(c) = t.get_mut("content") {
                as_blocks(c);
            }
        }
        if turns.len() >= 2 {
            let stable = turns.len() - 1;
            prefix += turns[..stable].iter().map(approx_tokens).sum::<u64>();
            if prefix >= min_tokens && mark_last(&mut turns[stable - 1]["content"]) {
                placed.push("turn");
            }
        }
    }
    debug_assert!(placed.len() <= MAX_BREAKPOINTS);
    if placed.is_empty() {
        return None;
    }
    Some((doc.to_string().into_bytes(), placed))
}

/// A Chat or Responses body with `prompt_cache_key` set, unless it has one.
pub fn add_cache_key(body: &[u8], key: &str) -> Option<Vec<u8>> {
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let obj = doc.as_object_mut()?;
    if obj.contains_key("prompt_cache_key") {
        return None;
    }
    obj.insert("prompt_cache_key".into(), Value::String(key.to_string()));
    Some(doc.to_string().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(system: &str, turns: usize) -> Vec<u8> {
        let mut messages = Vec::new();
        for i in 0..turns {
            let role = if i % 2 == 0 { "user" } else { "assistant" };
            messages.push(json!({"role": role, "content": format!("turn {i}")}));
        }
        json!({"model": "claude-x", "max_tokens": 10, "system": system,
               "tools": [{"name": "t", "input_schema": {"type": "object"}}],
               "messages": messages})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn breakpoints_go_only_where_the_prefix_reaches_the_minimum() {
        let long = "policy ".repeat(1000); // ~7 000 bytes: ~1 750 tokens
        let (out, placed) = add_breakpoints(&body(&long, 3), 1024).unwrap();
        assert_eq!(placed, ["system", "turn"], "the tools alone are too short");
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["system"][0]["text"], long.as_str());
        assert_eq!(v["system"][0]["cache_control"]["type"], "ephemeral");
        assert_eq!(
            v["messages"][1]["content"][0]["cache_control"]["type"],
            "ephemeral"
        );
        assert!(
            v["messages"][2]["content"][0]
                .get("cache_control")
                .is_none(),
            "the newest turn has no breakpoint"
        );
        assert_eq!(v["messages"][0]["content"][0]["text"], "turn 0");
        assert!(v["tools"][0].get("cache_control").is_none());
        // Under the minimum: nothing; the client's own breakpoints: nothing either.
        assert!(add_breakpoints(&body("short", 3), 1024).is_none());
        assert!(add_breakpoints(&out, 1024).is_none());
        // A single turn has no stable turn before it.
        let (_, placed) = add_breakpoints(&body(&long, 1), 1024).unwrap();
        assert_eq!(placed, ["system"]);
    }

    #[test]
    fn the_same_request_gets_the_same_bytes() {
        let long = "policy ".repeat(1000);
        let a = add_breakpoints(&body(&long, 3), 1024).unwrap().0;
        let b = add_breakpoints(&body(&long, 3), 1024).unwrap().0;
        assert_eq!(a, b);
    }

    #[test]
    fn reuse_is_seen_across_turns_and_falls_without_it() {
        let c = PromptCaches::default();
        let t = ["{\"u\":1}", "{\"a\":1}", "{\"u\":2}"];
        let turn1 = prefixes("k", "m", &[Some("tools")], &t[..1]);
        let turn2 = prefixes("k", "m", &[Some("tools")], &t);
        assert_eq!(turn2.previous, Some(turn1.whole), "turn 2 extends turn 1");
        assert_eq!(turn1.conversation, turn2.conversation);
        let first = c.observe("k", &turn1, 1);
        assert!(first < 1.0);
        assert!(c.observe("k", &turn2, 2) > first, "the next turn reuses");
        // A key whose every request is new falls under the break-even.
        let mut r = 1.0;
        for i in 0..40u64 {
            let p = prefixes("lonely", "m", &[Some(&i.to_string())], &["x"]);
            r = c.observe("lonely", &p, 10 + i);
        }
        assert!(r < 0.28, "{r}");
    }

    #[test]
    fn a_cache_key_is_added_once() {
        let b = br#"{"model":"gpt","messages":[]}"#;
        let out = add_cache_key(b, "tg-1").unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["prompt_cache_key"], "tg-1");
        assert!(add_cache_key(&out, "tg-2").is_none());
    }
}
