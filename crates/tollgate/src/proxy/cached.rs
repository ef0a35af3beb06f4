//! The cache phase: a request the exact response cache applies to is answered from a kept
//! answer (`cache.rs`) when there is one, and otherwise marked so that its complete,
//! successful answer is kept (`Settlement::keep_cached`, and the stream's `CacheFill`).
//!
//! After damping (a repeated request is still the agent repeating itself, and the loop guard
//! and retry budget still judge it) and before admission: a hit spends no tokens, so it
//! takes nothing from the key's limits. A hit with a fee goes on through admission and the
//! wallet's hold like any charge, and is answered in place of the upstream call.

use super::*;
use crate::cache::Entry;

/// Whether `[cache]` covers this key and model.
fn applies(cfg: &crate::config::CacheConfig, key: &KeyRecord, model: &str) -> bool {
    use crate::keys::pattern_matches;
    if !cfg.enabled {
        return false;
    }
    let by_key = covers(&cfg.keys, &cfg.teams, key);
    let by_model = cfg.models.is_empty() || cfg.models.iter().any(|p| pattern_matches(p, model));
    by_key && by_model
}

/// The request asks for a fresh answer (`Cache-Control: no-cache`, `x-tollgate-cache:
/// refresh`), or for none to be kept either (`Cache-Control: no-store`).
fn control(headers: &HeaderMap) -> (bool, bool) {
    let mut refresh = headers
        .get("x-tollgate-cache")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("refresh"));
    let mut no_store = false;
    for v in headers
        .get_all(http::header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        for d in v.split(',').map(str::trim) {
            refresh |= d.eq_ignore_ascii_case("no-cache");
            no_store |= d.eq_ignore_ascii_case("no-store");
        }
    }
    (refresh, no_store)
}

/// The cache phase. `Some` is the answer (a free hit).
pub(crate) async fn cache_phase(cx: &mut Ctx<'_>) -> Result<Option<Response>, ApiError> {
    let cfg = &cx.runtime.cache;
    if cx.endpoint == Endpoint::CountTokens
        || !applies(cfg, cx.key, &cx.model)
        || (cx.stream && !cfg.streams)
    {
        return Ok(None);
    }
    let (refresh, no_store) = control(cx.headers);
    let verdict = if no_store {
        "bypass"
    } else {
        let scope = match (cfg.scope, &cx.key.team) {
            (crate::config::CacheScope::Team, Some(team)) => format!("team:{team}"),
            _ => format!("key:{}", cx.key.id),
        };
        match crate::cache::key(&scope, cx.endpoint.name(), &cx.model, &cx.settle.body) {
            // Not a JSON object: nothing to key it by (it will be refused further on).
            None => "bypass",
            Some(digest) => {
                let hit = match refresh {
                    true => None,
                    false => cx.app.cache.get(&digest, now_ms()).await,
                };
                match hit {
                    Some(entry) => {
                        cx.app.metrics.count_cache("hit");
                        if cfg.fee_micros == 0 {
                            return Ok(Some(cx.settle.cached(&entry, 0)));
                        }
                        // Paid for through the wallet: answered after the hold (`run`).
                        cx.settle.cache_hit = Some(entry);
                        cx.settle.rec_mut().cache = Some("hit".into());
                        return Ok(None);
                    }
                    None => {
                        cx.settle.cache_key = Some(digest);
                        if refresh {
                            "refresh"
                        } else {
                            "miss"
                        }
                    }
                }
            }
        }
    };
    cx.app.metrics.count_cache(verdict);
    cx.settle.rec_mut().cache = Some(verdict.into());
    cx.settle
        .rate_headers
        .insert("x-tollgate-cache", HeaderValue::from_static(verdict));
    Ok(None)
}

/// Whether an answer may be kept: the cache applies and was not told otherwise, the answer
/// succeeded whole, no tool policy refused or parked anything in it, and it asks for no
/// tool call unless `[cache] tool_calls` allows it.
pub(crate) fn keepable(cfg: &crate::config::CacheConfig, rec: &UsageRecord, body: &[u8]) -> bool {
    rec.status == 200
        && rec.error_kind.is_none()
        && !rec.client_disconnected
        && body.len() <= cfg.max_entry_bytes
        && rec
            .policy
            .iter()
            .all(|v| v.decision == crate::config::ToolDecision::Allow)
        && (cfg.tool_calls || !crate::cache::has_tool_calls(body))
}

/// What a kept answer is stored as, from the record of the request that paid for it.
pub(crate) fn entry_of(rec: &UsageRecord, body: Bytes, content_type: HeaderValue) -> Entry {
    Entry {
        body,
        content_type,
        stream: rec.stream,
        request_id: rec.id.clone(),
        provider: rec.provider.clone(),
        model: rec.model_served.clone(),
        input_tokens: rec.input_tokens,
        output_tokens: rec.output_tokens,
        cost_micros: rec.cost_micros,
        stored_ms: now_ms(),
    }
}

/// Keeps `entry` for `[cache] ttl` under the bounds in force.
pub(crate) fn keep(app: &AppState, cfg: &crate::config::CacheConfig, key: [u8; 32], entry: Entry) {
    let ttl_ms = i64::try_from(cfg.ttl.as_millis()).unwrap_or(i64::MAX);
    let bounds = crate::cache::Bounds {
        max_entries: cfg.max_entries,
        max_bytes: cfg.max_bytes,
    };
    let expires = entry.stored_ms.saturating_add(ttl_ms);
    app.cache.put(key, expires, Arc::new(entry), bounds);
}

impl Settlement {
    /// Answers from the cache: no upstream call, `fee` the whole cost, and the tokens and
    /// cost the kept answer took recorded as saved.
    pub(crate) fn cached(&mut self, entry: &Entry, fee: u64) -> Response {
        if let Some(mut rec) = self.take() {
            rec.status = 200;
            rec.cache = Some("hit".into());
            rec.reused = Some("cache".into());
            rec.reused_from = Some(entry.request_id.clone());
            rec.provider.clone_from(&entry.provider);
            rec.model_served.clone_from(&entry.model);
            rec.stream = entry.stream;
            rec.cost_micros = fee;
            rec.price_version = (fee > 0).then(|| format!("cache-fee:{fee}"));
            rec.response_bytes = entry.body.len() as u64;
            // Nothing was sent, so nothing was compressed either: the cache saved it all.
            rec.savings.retain(|s| !s.saver.starts_with("compress."));
            rec.savings.push(crate::records::Saving {
                saver: "cache".into(),
                tokens: entry.tokens(),
                micros: entry.cost_micros.saturating_sub(fee),
            });
            if let Some(b) = rec.bodies.as_mut() {
                b.push_response(&entry.body);
            }
            self.commit(rec);
        }
        self.app
            .metrics
            .answers_reused
            .get_or_create(&ReuseLabels { kind: "cache" })
            .inc();
        let mut resp = Response::new(Body::from(entry.body.clone()));
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, entry.content_type.clone());
        if entry.stream {
            h.insert(
                http::header::CACHE_CONTROL,
                HeaderValue::from_static("no-cache"),
            );
        }
        h.insert("x-tollgate-cache", HeaderValue::from_static("hit"));
        h.insert("x-tollgate-cost", HeaderValue::from(fee));
        h.insert("x-tollgate-reused", HeaderValue::from_static("cache"));
        let age = (now_ms() - entry.stored_ms).max(0) / 1000;
        h.insert(http::header::AGE, HeaderValue::from(age));
        if let Ok(v) = HeaderValue::from_str(&entry.request_id) {
            h.insert("x-tollgate-reused-from", v);
        }
        resp
    }
}
