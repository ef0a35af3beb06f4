//! Provider prompt-cache affinity on the request path (`promptcache.rs`): the plan made once
//! per request, and what it does to each attempt's body and to the order of deployments.

use super::*;
use crate::promptcache::{deployment_id, Prefixes};

/// What `[prompt_cache]` does for one request.
pub(crate) struct PromptPlan {
    prefixes: Prefixes,
    /// The key reuses its prefixes enough for Anthropic cache writes to pay.
    breakpoints: bool,
    cache_key: String,
}

fn applies(cfg: &crate::config::PromptCacheConfig, key: &KeyRecord) -> bool {
    cfg.enabled && covers(&cfg.keys, &cfg.teams, key)
}

/// The plan, or `None` when `[prompt_cache]` does not cover the request.
pub(crate) fn prompt_plan(cx: &Ctx<'_>, doc: &RequestDoc<'_>) -> Option<PromptPlan> {
    let cfg = &cx.runtime.prompt_cache;
    let conversation = match cx.endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => "messages",
        Endpoint::Responses => "input",
        _ => return None,
    };
    if !applies(cfg, cx.key) {
        return None;
    }
    let raw = |f: &str| doc.raw(f).map(|r| r.get());
    let turns: Vec<&serde_json::value::RawValue> = raw(conversation)
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or_default();
    let turns: Vec<&str> = turns.iter().map(|t| t.get()).collect();
    let prefixes = crate::promptcache::prefixes(
        &cx.key.id,
        &cx.model,
        &[raw("tools"), raw("system"), raw("instructions")],
        &turns,
    );
    let reuse = cx
        .app
        .prompt_caches
        .observe(&cx.key.id, &prefixes, now_us());
    Some(PromptPlan {
        breakpoints: cfg.breakpoints && f64::from(reuse) >= cfg.min_reuse,
        cache_key: format!("tg-{:016x}", prefixes.stable),
        prefixes,
    })
}

impl PromptPlan {
    /// The candidates with the deployment that served this conversation's last turn first,
    /// when it is among the first priority's.
    pub(crate) fn order(
        &self,
        app: &AppState,
        runtime: &Runtime,
        candidates: &[Arc<Deployment>],
    ) -> Vec<Arc<Deployment>> {
        let mut out = candidates.to_vec();
        if !runtime.prompt_cache.affinity || out.len() < 2 {
            return out;
        }
        let Some(home) = app.prompt_caches.home(self.prefixes.conversation, now_us()) else {
            return out;
        };
        let first = out[0].priority;
        if let Some(i) = out
            .iter()
            .position(|d| d.priority == first && deployment_id(&d.provider.name, &d.model) == home)
        {
            let d = out.remove(i);
            out.insert(0, d);
        }
        out
    }

    /// The deployment answered: the conversation's next turn goes back to it.
    pub(crate) fn served(&self, app: &AppState, dep: &Deployment) {
        app.prompt_caches.remember(
            self.prefixes.conversation,
            deployment_id(&dep.provider.name, &dep.model),
            now_us(),
        );
    }

    /// One attempt's body: Anthropic breakpoints, or OpenAI's `prompt_cache_key`.
    pub(crate) fn body(
        &self,
        runtime: &Runtime,
        dep: &Deployment,
        endpoint: Endpoint,
        body: Bytes,
        headers: &mut HeaderMap,
    ) -> Bytes {
        let cfg = &runtime.prompt_cache;
        match endpoint {
            Endpoint::Messages if self.breakpoints => {
                let min = cfg
                    .min_tokens_by_model
                    .iter()
                    .find(|(p, _)| crate::keys::pattern_matches(p, &dep.model))
                    .map_or(cfg.min_tokens, |(_, n)| *n);
                match crate::promptcache::add_breakpoints(&body, min) {
                    Some((out, placed)) => {
                        if let Ok(v) = HeaderValue::from_str(&placed.join(",")) {
                            headers.insert("x-tollgate-cache-breakpoints", v);
                        }
                        Bytes::from(out)
                    }
                    None => body,
                }
            }
            Endpoint::ChatCompletions | Endpoint::Responses if cfg.cache_key => {
                let takes = match cfg.cache_key_providers.is_empty() {
                    true => reqwest::Url::parse(&dep.provider.base_url).is_ok_and(|u| {
                        u.host_str()
                            .is_some_and(|h| h == "openai.com" || h.ends_with(".openai.com"))
                    }),
                    false => cfg.cache_key_providers.contains(&dep.provider.name),
                };
                match takes
                    .then(|| crate::promptcache::add_cache_key(&body, &self.cache_key))
                    .flatten()
                {
                    Some(out) => Bytes::from(out),
                    None => body,
                }
            }
            _ => body,
        }
    }
}
