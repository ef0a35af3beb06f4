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
//! `max_entry_bytes`. In this process by default (replicas each keep their own), or in Redis
//! (`[cache] backend`), where every replica shares the entries, each a self-contained value
//! with the TTL as its expiry and Redis's own `maxmemory` policy as the size bound. The cache
//! saves money but never decides any: when Redis fails or is slow a lookup is a miss and a
//! keep is skipped, and after a failure Redis is left alone for `retry_interval`, so an
//! outage costs the requests in flight one timeout at most.

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
pub struct MemoryCache {
    inner: Mutex<Inner>,
}

impl MemoryCache {
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

/// Bumped when the layout of an entry in Redis changes: old entries are then never read.
const REDIS_VERSION: u32 = 1;
const MAGIC: &[u8; 4] = b"TGC1";

/// An entry's fields other than its body, as kept in Redis (the body follows them raw).
#[derive(serde::Serialize, serde::Deserialize)]
struct Meta {
    content_type: String,
    stream: bool,
    request_id: String,
    provider: Option<String>,
    model: Option<String>,
    input_tokens: u64,
    output_tokens: u64,
    cost_micros: u64,
    stored_ms: i64,
}

/// `TGC1`, the metadata's length (u32, little-endian), the metadata as JSON, the body.
fn encode(e: &Entry) -> Vec<u8> {
    let meta = Meta {
        content_type: e.content_type.to_str().unwrap_or("application/json").into(),
        stream: e.stream,
        request_id: e.request_id.clone(),
        provider: e.provider.clone(),
        model: e.model.clone(),
        input_tokens: e.input_tokens,
        output_tokens: e.output_tokens,
        cost_micros: e.cost_micros,
        stored_ms: e.stored_ms,
    };
    let meta = serde_json::to_vec(&meta).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + meta.len() + e.body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&meta);
    out.extend_from_slice(&e.body);
    out
}

/// The entry in a Redis value; `None` for anything else (another version, a value written by
/// something other than tollgate), which is then a miss.
fn decode(v: Vec<u8>) -> Option<Entry> {
    let rest = v.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = u32::from_le_bytes(*len) as usize;
    if len > rest.len() {
        return None;
    }
    let meta: Meta = serde_json::from_slice(&rest[..len]).ok()?;
    let start = 8 + len;
    Some(Entry {
        body: Bytes::from(v).slice(start..),
        content_type: HeaderValue::from_str(&meta.content_type).ok()?,
        stream: meta.stream,
        request_id: meta.request_id,
        provider: meta.provider,
        model: meta.model,
        input_tokens: meta.input_tokens,
        output_tokens: meta.output_tokens,
        cost_micros: meta.cost_micros,
        stored_ms: meta.stored_ms,
    })
}

fn redis_key(key: &[u8; 32]) -> String {
    format!("tg:cache:v{REDIS_VERSION}:{}", hex::encode(key))
}

pub struct RedisCache {
    conn: redis::aio::ConnectionManager,
    timeout: Duration,
    retry_interval_ms: i64,
    /// Until when (ms since the epoch) Redis is not asked, after a failure; 0 when it answers.
    down_until_ms: AtomicI64,
    metrics: Arc<crate::metrics::Metrics>,
}

impl RedisCache {
    /// Counts a failure and leaves Redis alone for a while; says so once per outage.
    fn failed(&self, what: &str, e: &str) {
        self.metrics.cache_redis_errors.inc();
        let until = crate::clock::now_ms().saturating_add(self.retry_interval_ms);
        if self.down_until_ms.swap(until, Ordering::AcqRel) == 0 {
            tracing::warn!(error = %e, "response cache: redis {what} failed; answering without the cache until it is back");
        }
    }

    fn up(&self, now_ms: i64) -> bool {
        let until = self.down_until_ms.load(Ordering::Acquire);
        until == 0 || now_ms >= until
    }

    fn answered(&self) {
        if self.down_until_ms.swap(0, Ordering::AcqRel) != 0 {
            tracing::info!("response cache: redis answers again");
        }
    }

    async fn get(&self, key: &[u8; 32], now_ms: i64) -> Option<Entry> {
        if !self.up(now_ms) {
            return None;
        }
        let mut conn = self.conn.clone();
        let mut cmd = redis::cmd("GET");
        cmd.arg(redis_key(key));
        let get = cmd.query_async::<Option<Vec<u8>>>(&mut conn);
        match tokio::time::timeout(self.timeout, get).await {
            Ok(Ok(v)) => {
                self.answered();
                v.and_then(decode)
            }
            Ok(Err(e)) => {
                self.failed("read", &e.to_string());
                None
            }
            Err(_) => {
                self.failed("read", &format!("no answer within {:?}", self.timeout));
                None
            }
        }
    }

    /// Written in the background: the answer has already gone to its client.
    fn put(self: &Arc<Self>, key: [u8; 32], expires_ms: i64, entry: &Entry) {
        let now = crate::clock::now_ms();
        let ttl_ms = expires_ms.saturating_sub(now);
        if ttl_ms <= 0 || !self.up(now) {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let value = encode(entry);
        let this = self.clone();
        rt.spawn(async move {
            let mut conn = this.conn.clone();
            let mut cmd = redis::cmd("SET");
            cmd.arg(redis_key(&key)).arg(value).arg("PX").arg(ttl_ms);
            let set = cmd.query_async::<()>(&mut conn);
            match tokio::time::timeout(this.timeout, set).await {
                Ok(Ok(())) => this.answered(),
                Ok(Err(e)) => this.failed("write", &e.to_string()),
                Err(_) => this.failed("write", &format!("no answer within {:?}", this.timeout)),
            }
        });
    }
}

/// The response cache of a gateway: in this process, or in Redis.
pub enum ResponseCache {
    Memory(MemoryCache),
    Redis(Arc<RedisCache>),
}

impl ResponseCache {
    pub fn in_memory() -> ResponseCache {
        ResponseCache::Memory(MemoryCache::default())
    }

    /// Does not connect: the first lookup does, so a gateway starts while Redis is down.
    pub fn in_redis(
        url: &str,
        timeout: Duration,
        retry_interval: Duration,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> anyhow::Result<ResponseCache> {
        Ok(ResponseCache::Redis(Arc::new(RedisCache {
            conn: crate::limits::redis::connection(url, timeout, None)?,
            timeout,
            retry_interval_ms: i64::try_from(retry_interval.as_millis()).unwrap_or(i64::MAX),
            down_until_ms: AtomicI64::new(0),
            metrics,
        })))
    }

    pub async fn get(&self, key: &[u8; 32], now_ms: i64) -> Option<Arc<Entry>> {
        match self {
            ResponseCache::Redis(r) => r.get(key, now_ms).await.map(Arc::new),
            ResponseCache::Memory(m) => m.get(key, now_ms),
        }
    }

    /// `bounds` apply in this process; Redis bounds itself by its `maxmemory` policy.
    pub fn put(&self, key: [u8; 32], expires_ms: i64, entry: Arc<Entry>, bounds: Bounds) {
        match self {
            ResponseCache::Redis(r) => r.put(key, expires_ms, &entry),
            ResponseCache::Memory(m) => m.put(key, expires_ms, entry, bounds),
        }
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
        let c = MemoryCache::default();
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
    fn an_entry_survives_its_redis_encoding_and_anything_else_is_a_miss() {
        let mut e = Entry {
            body: Bytes::from_static(b"data: {}\n\n"),
            content_type: HeaderValue::from_static("text/event-stream"),
            stream: true,
            request_id: "req_9".into(),
            provider: Some("up".into()),
            model: Some("m".into()),
            input_tokens: 3,
            output_tokens: 4,
            cost_micros: 5,
            stored_ms: 6,
        };
        let v = encode(&e);
        let back = decode(v.clone()).unwrap();
        assert_eq!(back.body, e.body);
        assert_eq!(back.content_type, e.content_type);
        assert!(back.stream);
        assert_eq!(back.request_id, "req_9");
        assert_eq!(
            (back.provider.as_deref(), back.model.as_deref()),
            (Some("up"), Some("m"))
        );
        assert_eq!(
            (
                back.input_tokens,
                back.output_tokens,
                back.cost_micros,
                back.stored_ms
            ),
            (3, 4, 5, 6)
        );
        e.body = Bytes::new();
        assert!(decode(encode(&e)).unwrap().body.is_empty());
        assert!(decode(b"TGC0rest".to_vec()).is_none());
        assert!(decode(v[..6].to_vec()).is_none(), "cut in the length");
        let mut long = v[..8].to_vec();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(long).is_none(), "a length past the value");
        assert!(
            decode(b"TGC1\x02\x00\x00\x00{}".to_vec()).is_none(),
            "not the fields"
        );
        assert!(decode(Vec::new()).is_none());
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
