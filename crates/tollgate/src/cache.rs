//! The exact response cache: a complete, successful answer kept under a digest of who asked
//! (the key, or its team), what endpoint, what model and the request's canonical body, and
//! given again to the same request for a while instead of an upstream call.
//!
//! "Canonical": the body parsed and written again with its object keys sorted, without the
//! fields that name the caller but do not change the answer (`user`, `metadata`, ...), so two
//! SDKs serialising one request differently share an entry. Anything else that differs
//! (a temperature, one more message, `stream`) is another entry.
//!
//! Bounded by entries and bytes (the oldest go first) and by a TTL; one entry is at most
//! `max_entry_bytes`. In this process: replicas each keep their own.

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Fields that say who is asking or how to bill it, never what the answer is.
const VOLATILE: [&str; 5] = [
    "user",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
];

/// A kept answer, as its client got it (JSON body or SSE bytes), and what it cost.
#[derive(Debug)]
pub struct Entry {
    pub body: Bytes,
    pub content_type: HeaderValue,
    pub stream: bool,
    /// The request that paid for it.
    pub request_id: String,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// Tokens the provider counted for it: what a hit does not spend again.
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cost_micros: u64,
    /// When it was kept (ms since the epoch).
    pub stored_ms: i64,
}

impl Entry {
    pub fn tokens(&self) -> u64 {
        self.input_tokens.saturating_add(self.output_tokens)
    }
}

/// The digest a request is kept under; `None` when its body is not a JSON object (nothing
/// the cache can canonicalise, so nothing it answers).
pub fn key(scope: &str, endpoint: &str, model: &str, body: &[u8]) -> Option<[u8; 32]> {
    let serde_json::Value::Object(mut doc) = serde_json::from_slice(body).ok()? else {
        return None;
    };
    for f in VOLATILE {
        doc.remove(f);
    }
    // serde_json's map is ordered by key: written out, it is canonical.
    let canonical = serde_json::to_vec(&doc).ok()?;
    let mut h = Sha256::new();
    for part in [scope.as_bytes(), endpoint.as_bytes(), model.as_bytes()] {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    h.update(&canonical);
    Some(h.finalize().into())
}

/// Whether an answer asks for a tool call, in any dialect. Read from the bytes, so a text
/// that merely mentions one of the markers is not kept either: when in doubt, not cached.
pub fn has_tool_calls(body: &[u8]) -> bool {
    const MARKERS: [&[u8]; 3] = [b"\"tool_calls\"", b"\"tool_use\"", b"\"function_call\""];
    MARKERS
        .iter()
        .any(|m| body.windows(m.len()).any(|w| w == *m))
}

/// The bounds in force when an answer is kept (from the reloadable config).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_entries: usize,
    pub max_bytes: usize,
}

#[derive(Default)]
struct Inner {
    /// key → (expiry, insertion number, entry).
    map: HashMap<[u8; 32], (i64, u64, Arc<Entry>)>,
    /// Insertion order, for eviction; a key replaced since is skipped when it comes up.
    order: VecDeque<([u8; 32], u64)>,
    bytes: usize,
    next: u64,
}

#[derive(Default)]
pub struct ResponseCache {
    inner: Mutex<Inner>,
}

impl ResponseCache {
    /// The answer kept under `key`, unless it has expired (`now_ms`).
    pub fn get(&self, key: &[u8; 32], now_ms: i64) -> Option<Arc<Entry>> {
        let inner = self.lock();
        inner
            .map
            .get(key)
            .filter(|(expires, _, _)| *expires > now_ms)
            .map(|(_, _, e)| e.clone())
    }

    /// Keeps `entry` under `key` until `expires_ms`, evicting the oldest past the bounds.
    pub fn put(&self, key: [u8; 32], expires_ms: i64, entry: Arc<Entry>, bounds: Bounds) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.bytes += entry.body.len();
        inner.next += 1;
        let stamp = inner.next;
        if let Some((_, _, old)) = inner.map.insert(key, (expires_ms, stamp, entry)) {
            inner.bytes -= old.body.len();
        }
        inner.order.push_back((key, stamp));
        while inner.map.len() > bounds.max_entries || inner.bytes > bounds.max_bytes {
            let Some((old, stamp)) = inner.order.pop_front() else {
                break;
            };
            // Only the entry this position was queued for: a newer one under the same key
            // has its own, later position.
            if inner.map.get(&old).is_some_and(|(_, s, _)| *s == stamp) {
                if let Some((_, _, e)) = inner.map.remove(&old) {
                    inner.bytes -= e.body.len();
                }
            }
        }
        // Positions of replaced entries would otherwise pile up under steady replacement.
        if inner.order.len() > 2 * inner.map.len() + 64 {
            let map = &inner.map;
            inner
                .order
                .retain(|(k, s)| map.get(k).is_some_and(|(_, n, _)| n == s));
        }
    }

    /// (entries, bytes) kept now.
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.map.len(), inner.bytes)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize, stored_ms: i64) -> Arc<Entry> {
        Arc::new(Entry {
            body: Bytes::from(vec![b'x'; n]),
            content_type: HeaderValue::from_static("application/json"),
            stream: false,
            request_id: "req_1".into(),
            provider: None,
            model: None,
            input_tokens: 1,
            output_tokens: 1,
            cost_micros: 1,
            stored_ms,
        })
    }

    #[test]
    fn the_key_ignores_order_and_caller_fields_but_nothing_else() {
        let a = key(
            "k",
            "chat",
            "m",
            br#"{"model":"m","messages":[1],"user":"u1"}"#,
        );
        let b = key(
            "k",
            "chat",
            "m",
            br#"{ "messages": [1], "model": "m", "metadata": {"x": 1} }"#,
        );
        assert!(a.is_some());
        assert_eq!(a, b);
        assert_ne!(a, key("k", "chat", "m", br#"{"model":"m","messages":[2]}"#));
        assert_ne!(
            a,
            key("k2", "chat", "m", br#"{"model":"m","messages":[1]}"#)
        );
        assert_ne!(
            a,
            key(
                "k",
                "chat",
                "m",
                br#"{"model":"m","messages":[1],"stream":true}"#
            )
        );
        // Parts are length-prefixed: moving a byte between scope and endpoint changes it.
        assert_ne!(key("ab", "c", "m", b"{}"), key("a", "bc", "m", b"{}"));
        assert_eq!(key("k", "chat", "m", b"[1]"), None);
        assert_eq!(key("k", "chat", "m", b"not json"), None);
    }

    #[test]
    fn entries_expire_and_the_oldest_go_first() {
        let c = ResponseCache::default();
        let bounds = Bounds {
            max_entries: 3,
            max_bytes: 100,
        };
        c.put([1; 32], 50, entry(10, 1), bounds);
        assert!(c.get(&[1; 32], 49).is_some());
        assert!(c.get(&[1; 32], 50).is_none());
        for i in 2..=4u8 {
            c.put([i; 32], 1000, entry(10, i64::from(i)), bounds);
        }
        assert!(
            c.get(&[1; 32], 0).is_none(),
            "over max_entries, the oldest went"
        );
        assert_eq!(c.size(), (3, 30));
        c.put([5; 32], 1000, entry(80, 5), bounds);
        assert_eq!(c.size(), (3, 100), "over max_bytes, the oldest went");
        // Replaced: the entry's old position must not evict its new self.
        c.put([4; 32], 1000, entry(5, 6), bounds);
        assert_eq!(c.size(), (3, 95));
        c.put([6; 32], 1000, entry(50, 7), bounds);
        assert_eq!(c.size(), (2, 55));
        assert!(c.get(&[4; 32], 0).is_some());
    }

    #[test]
    fn tool_calls_are_seen_in_every_dialect() {
        assert!(has_tool_calls(
            br#"{"choices":[{"message":{"tool_calls":[]}}]}"#
        ));
        assert!(has_tool_calls(br#"data: {"type":"tool_use"}"#));
        assert!(has_tool_calls(br#"{"output":[{"type":"function_call"}]}"#));
        assert!(!has_tool_calls(
            br#"{"choices":[{"message":{"content":"hi"}}]}"#
        ));
    }
}
