//! Providers, deployments and their health: what `route` chooses from.

use crate::config::{Config, ProviderConfig, ProviderKind, RoutingConfig};
use crate::keys::pattern_matches;
use crate::prices::PriceTable;
use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

pub struct Provider {
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing slash, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    pub client: reqwest::Client,
    /// Plain-`http` providers: connections driven by the request's task (`h1client`).
    pub h1: Option<Arc<crate::h1client::Pool>>,
    /// Authorization and configured extra headers, ready to send.
    pub headers: HeaderMap,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub total_timeout: Duration,
    pub models: Vec<String>,
    /// The URL of each upstream path called so far, parsed once: parsing (with its IDNA
    /// pass) per request showed in the request path's profile.
    urls: std::sync::RwLock<Vec<(&'static str, reqwest::Url)>>,
}

impl Provider {
    /// The provider's URL for an upstream path (`/chat/completions`).
    pub fn url(&self, path: &'static str) -> Result<reqwest::Url, String> {
        let known = |urls: &[(&'static str, reqwest::Url)]| {
            urls.iter()
                .find(|(p, _)| *p == path)
                .map(|(_, u)| u.clone())
        };
        if let Some(u) = self.urls.read().ok().and_then(|u| known(&u)) {
            return Ok(u);
        }
        let url = format!("{}{}", self.base_url, path);
        let parsed = reqwest::Url::parse(&url).map_err(|e| format!("{url}: {e}"))?;
        if let Ok(mut urls) = self.urls.write() {
            if known(&urls).is_none() {
                urls.push((path, parsed.clone()));
            }
        }
        Ok(parsed)
    }
}

pub struct Deployment {
    pub provider: Arc<Provider>,
    /// The model name sent upstream.
    pub model: String,
    pub weight: u32,
    pub priority: u32,
    pub health: Arc<Health>,
    /// The provider account's quota for this model (all zero: none).
    pub limits: crate::limits::Limits,
}

/// The circuit breaker of one deployment (provider + upstream model), kept across config
/// reloads so that a reload does not forgive a failing deployment.
///
/// Closed: traffic flows. `cooldown_failures` consecutive failures open it for `cooldown`
/// (an upstream `Retry-After` also cools it down, for as long as asked). After the cooldown it
/// is half-open: one request at a time is let through as a probe; a success closes it, a
/// failure opens it again.
#[derive(Default)]
pub struct Health {
    consecutive_failures: AtomicU32,
    cooldown_until_ms: AtomicI64,
    open: std::sync::atomic::AtomicBool,
    /// When the current probe was let through (0: none). A probe that never reports back
    /// (its request went to another deployment) frees the slot after one cooldown.
    probe_started_ms: AtomicI64,
    /// The gateway's own retries to this deployment spend from here.
    pub retry_budget: crate::damping::DeploymentBudget,
    /// Outcomes over the error-rate window: (window start ms, ok, failed, previous ok,
    /// previous failed).
    outcomes: Mutex<(i64, u32, u32, u32, u32)>,
}

/// Whether a deployment may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Availability {
    Closed,
    /// Half-open, and this request is the probe.
    Probe,
    /// Open (cooling down, or another request is probing) until this time.
    Unavailable(i64),
}

impl Health {
    /// Counts an outcome; returns the failure share over the window (the previous bucket
    /// weighted by how much of it is still inside) and the number of outcomes it covers.
    fn outcome(&self, now_ms: i64, failed: bool, routing: &RoutingConfig) -> (f64, f64) {
        let window = (routing.error_rate_window.as_millis() as i64).max(1);
        let mut o = self.outcomes.lock().unwrap_or_else(|p| p.into_inner());
        let (start, ok, err, prev_ok, prev_err) = &mut *o;
        if now_ms >= *start + window {
            (*prev_ok, *prev_err) = if now_ms < *start + 2 * window {
                (*ok, *err)
            } else {
                (0, 0)
            };
            (*ok, *err) = (0, 0);
            *start = now_ms - (now_ms - *start).rem_euclid(window);
        }
        if failed {
            *err += 1;
        } else {
            *ok += 1;
        }
        let weight = 1.0 - ((now_ms - *start) as f64 / window as f64).clamp(0.0, 1.0);
        let errs = f64::from(*err) + f64::from(*prev_err) * weight;
        let total = errs + f64::from(*ok) + f64::from(*prev_ok) * weight;
        (if total > 0.0 { errs / total } else { 0.0 }, total)
    }

    pub fn success(&self, now_ms: i64, routing: &RoutingConfig) {
        self.outcome(now_ms, false, routing);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.open.store(false, Ordering::Release);
        self.probe_started_ms.store(0, Ordering::Release);
    }

    /// Counts a failure; after `threshold` in a row the circuit opens for `cooldown`.
    pub fn failure(&self, now_ms: i64, retry_after: Option<Duration>, routing: &RoutingConfig) {
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let (rate, seen) = self.outcome(now_ms, true, routing);
        // A deployment failing a steady share of requests, with successes in between, never
        // trips the consecutive count: the error rate catches it.
        let too_many_errors = routing.error_rate > 0.0
            && seen >= f64::from(routing.error_rate_min_requests)
            && rate >= routing.error_rate;
        let mut until = 0i64;
        if n >= routing.cooldown_failures || too_many_errors {
            until = now_ms + routing.cooldown.as_millis() as i64;
            self.open.store(true, Ordering::Release);
        }
        if let Some(ra) = retry_after {
            until = until.max(now_ms + ra.as_millis() as i64);
        }
        if until > 0 {
            self.cooldown_until_ms.fetch_max(until, Ordering::Relaxed);
        }
        self.probe_started_ms.store(0, Ordering::Release);
    }

    pub fn cooling_until(&self, now_ms: i64) -> Option<i64> {
        let until = self.cooldown_until_ms.load(Ordering::Relaxed);
        (until > now_ms).then_some(until)
    }

    /// Decides for one request; in the half-open state only one caller gets `Probe`.
    pub fn availability(&self, now_ms: i64, routing: &RoutingConfig) -> Availability {
        if let Some(until) = self.cooling_until(now_ms) {
            return Availability::Unavailable(until);
        }
        if !self.open.load(Ordering::Acquire) {
            return Availability::Closed;
        }
        let started = self.probe_started_ms.load(Ordering::Acquire);
        let slot_free = started == 0 || now_ms - started >= routing.cooldown.as_millis() as i64;
        if slot_free
            && self
                .probe_started_ms
                .compare_exchange(started, now_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Availability::Probe;
        }
        Availability::Unavailable(started + routing.cooldown.as_millis() as i64)
    }
}

#[derive(Default)]
pub struct HealthRegistry {
    by_deployment: Mutex<HashMap<String, Arc<Health>>>,
}

impl HealthRegistry {
    fn get(&self, provider: &str, model: &str) -> Arc<Health> {
        let mut map = self.by_deployment.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(format!("{provider}/{model}"))
            .or_default()
            .clone()
    }
}

/// Everything that reloads: swapped whole, so a request sees one consistent version.
/// A cascade alias: its tiers (model names, cheapest first) and the checks an answer must
/// pass before a tier other than the last may return it.
#[derive(Debug)]
pub struct Cascade {
    pub tiers: Vec<String>,
    pub validators: crate::cascade::Validators,
    /// Whose streams are read whole and checked (`[models.validate] buffer_*`).
    pub buffer: Option<StreamBuffer>,
}

#[derive(Debug)]
pub struct StreamBuffer {
    pub keys: Vec<String>,
    pub teams: Vec<String>,
    pub max_bytes: usize,
}

pub struct Runtime {
    pub providers: Vec<Arc<Provider>>,
    pub aliases: HashMap<String, Vec<Arc<Deployment>>>,
    /// Limits on model names across all keys (`[[models]] rpm/tpm/concurrency`).
    pub model_limits: HashMap<String, crate::limits::Limits>,
    /// Deployments for names served directly by a provider's `models` patterns, built lazily.
    /// Read on every such request, written once per name: a read lock on the hot path.
    direct: RwLock<HashMap<String, Vec<Arc<Deployment>>>>,
    pub prices: PriceTable,
    pub routing: RoutingConfig,
    pub limits: crate::config::LimitsConfig,
    pub loop_guard: crate::config::LoopGuardConfig,
    pub retries: crate::config::RetriesConfig,
    pub wallets: crate::config::WalletsConfig,
    pub translation: tollgate_proto::translate::Policy,
    pub logging: crate::config::LoggingConfig,
    pub on_client_disconnect: crate::config::OnDisconnect,
    pub webhooks: Vec<crate::config::WebhookConfig>,
    /// Tool routes, longest prefix first.
    pub routes: Vec<Arc<crate::toolroute::ToolRoute>>,
    pub mcp: crate::config::McpConfig,
    /// Upstream MCP servers, in configuration order.
    pub mcp_servers: Vec<Arc<crate::mcpclient::McpUpstream>>,
    pub policies: crate::policy::Policies,
    pub approvals: crate::config::ApprovalsConfig,
    pub redaction: crate::config::RedactionConfig,
    pub cache: crate::config::CacheConfig,
    /// Aliases answered by a cascade of other models (`[[models]] cascade`).
    pub cascades: HashMap<String, Arc<Cascade>>,
    pub compression: crate::config::CompressionConfig,
    pub prompt_cache: crate::config::PromptCacheConfig,
    health: Arc<HealthRegistry>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("providers.{0}: {1}")]
    Provider(String, String),
    #[error("{0}")]
    Route(String),
}

impl Runtime {
    /// `mock_url` is where the in-process mock provider listens, if one was started.
    pub fn build(
        cfg: &Config,
        mock_url: Option<&str>,
        health: Arc<HealthRegistry>,
    ) -> Result<Runtime, BuildError> {
        let mut providers = Vec::new();
        for p in &cfg.providers {
            providers.push(Arc::new(build_provider(p, mock_url)?));
        }
        let by_name: HashMap<&str, Arc<Provider>> = providers
            .iter()
            .map(|p| (p.name.as_str(), p.clone()))
            .collect();
        let mut aliases = HashMap::new();
        let mut model_limits = HashMap::new();
        let mut cascades = HashMap::new();
        for m in cfg.models.iter().filter(|m| !m.cascade.is_empty()) {
            let v = &m.validate;
            let must_match = match &v.must_match {
                Some(re) => Some(fancy_regex::Regex::new(re).map_err(|e| {
                    BuildError::Route(format!("models \"{}\": validate.must_match: {e}", m.name))
                })?),
                None => None,
            };
            cascades.insert(
                m.name.clone(),
                Arc::new(Cascade {
                    tiers: m.cascade.clone(),
                    validators: crate::cascade::Validators {
                        json_schema: v.json_schema,
                        tool_arguments: v.tool_arguments,
                        not_truncated: v.not_truncated,
                        not_empty: v.not_empty,
                        not_refusal: v.not_refusal,
                        must_match,
                    },
                    buffer: v.buffer_streams.then(|| StreamBuffer {
                        keys: v.buffer_keys.clone(),
                        teams: v.buffer_teams.clone(),
                        max_bytes: v.buffer_max_bytes,
                    }),
                }),
            );
        }
        for m in cfg.models.iter().filter(|m| m.cascade.is_empty()) {
            let mut deps = Vec::new();
            for d in &m.deployments {
                let Some(provider) = by_name.get(d.provider.as_str()) else {
                    return Err(BuildError::Provider(
                        d.provider.clone(),
                        "unknown provider".into(),
                    ));
                };
                let model = d.model.clone().unwrap_or_else(|| m.name.clone());
                deps.push(Arc::new(Deployment {
                    health: health.get(&provider.name, &model),
                    provider: provider.clone(),
                    model,
                    weight: d.weight,
                    priority: d.priority,
                    limits: crate::limits::Limits {
                        rpm: d.rpm,
                        tpm: d.tpm,
                        concurrency: d.concurrency,
                    },
                }));
            }
            aliases.insert(m.name.clone(), deps);
            let limits = crate::limits::Limits {
                rpm: m.rpm,
                tpm: m.tpm,
                concurrency: m.concurrency,
            };
            if !limits.is_unlimited() {
                model_limits.insert(m.name.clone(), limits);
            }
        }
        let mut routes = Vec::new();
        for r in &cfg.routes {
            routes.push(Arc::new(
                crate::toolroute::ToolRoute::build(r).map_err(BuildError::Route)?,
            ));
        }
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        let mut mcp_servers = Vec::new();
        for m in &cfg.mcp_servers {
            mcp_servers.push(Arc::new(
                crate::mcpclient::McpUpstream::build(m).map_err(BuildError::Route)?,
            ));
        }
        Ok(Runtime {
            providers,
            routes,
            mcp: cfg.mcp.clone(),
            mcp_servers,
            policies: crate::policy::Policies::build(&cfg.tool_policies)
                .map_err(BuildError::Route)?,
            approvals: cfg.approvals.clone(),
            redaction: cfg.redaction.clone(),
            cache: cfg.cache.clone(),
            cascades,
            compression: cfg.compression.clone(),
            prompt_cache: cfg.prompt_cache.clone(),
            aliases,
            model_limits,
            direct: RwLock::new(HashMap::new()),
            prices: PriceTable::new(&cfg.prices),
            routing: cfg.routing.clone(),
            limits: cfg.limits.clone(),
            loop_guard: cfg.loop_guard.clone(),
            retries: cfg.retries.clone(),
            wallets: cfg.wallets.clone(),
            translation: cfg.translation.policy(),
            logging: cfg.logging.clone(),
            on_client_disconnect: cfg.metering.on_client_disconnect,
            webhooks: cfg.webhooks.clone(),
            health,
        })
    }

    /// The deployments that can serve `model`: an alias, `provider/model`, or a model name a
    /// provider's `models` patterns claim (the first such provider).
    pub fn resolve(&self, model: &str) -> Option<Vec<Arc<Deployment>>> {
        if let Some(c) = self.cascades.get(model) {
            // Every tier's: what can serve it at all (`run` picks by tier). Tiers are never
            // cascades themselves (config validation).
            let mut all = Vec::new();
            for tier in &c.tiers {
                all.extend(self.resolve_deployments(tier)?);
            }
            return Some(all);
        }
        self.resolve_deployments(model)
    }

    /// `resolve` for a name that is an alias with deployments or a provider's model.
    pub fn resolve_deployments(&self, model: &str) -> Option<Vec<Arc<Deployment>>> {
        if let Some(deps) = self.aliases.get(model) {
            return Some(deps.clone());
        }
        if let Some(deps) = self
            .direct
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(model)
        {
            return Some(deps.clone());
        }
        let (provider, upstream_model) = match model.split_once('/') {
            Some((p, m)) if !m.is_empty() => (self.providers.iter().find(|x| x.name == p)?, m),
            _ => (
                self.providers
                    .iter()
                    .find(|p| p.models.iter().any(|pat| pattern_matches(pat, model)))?,
                model,
            ),
        };
        let deps = vec![Arc::new(Deployment {
            health: self.health.get(&provider.name, upstream_model),
            provider: provider.clone(),
            model: upstream_model.to_string(),
            weight: 1,
            priority: 0,
            limits: crate::limits::Limits::default(),
        })];
        // Bounded: only names that resolved are remembered, and a reload starts afresh.
        let mut direct = self.direct.write().unwrap_or_else(|p| p.into_inner());
        if direct.len() < 10_000 {
            direct.insert(model.to_string(), deps.clone());
        }
        Some(deps)
    }

    /// Names a client may send, for `/v1/models`.
    pub fn model_names(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .aliases
            .keys()
            .map(|a| (a.clone(), "tollgate".to_string()))
            .collect();
        for p in &self.providers {
            let candidates: Vec<String> = match crate::providers::kind(p.kind).model_names {
                Some(names) => names.iter().map(|s| s.to_string()).collect(),
                None => self.prices.models().map(str::to_string).collect(),
            };
            for c in candidates {
                if p.models.iter().any(|pat| pattern_matches(pat, &c))
                    && !out.iter().any(|(n, _)| *n == c)
                {
                    out.push((c, p.name.clone()));
                }
            }
        }
        out.sort();
        out
    }
}

/// Orders candidates for one request: by priority, then a weighted shuffle within each
/// priority, skipping deployments that are cooling down. `Err` carries the earliest moment
/// (ms) a cooling deployment comes back when none is usable now.
pub fn order_candidates(
    deps: &[Arc<Deployment>],
    now_ms: i64,
    routing: &RoutingConfig,
) -> Result<Vec<Arc<Deployment>>, i64> {
    let mut healthy: Vec<Arc<Deployment>> = Vec::with_capacity(deps.len());
    let mut earliest = i64::MAX;
    for d in deps {
        match d.health.availability(now_ms, routing) {
            Availability::Unavailable(until) => earliest = earliest.min(until),
            Availability::Closed | Availability::Probe => healthy.push(d.clone()),
        }
    }
    if healthy.is_empty() {
        return Err(earliest);
    }
    healthy.sort_by_key(|d| d.priority);
    let mut rng = rand::rng();
    let mut out = Vec::with_capacity(healthy.len());
    let mut start = 0;
    while start < healthy.len() {
        let prio = healthy[start].priority;
        let end = healthy[start..]
            .iter()
            .position(|d| d.priority != prio)
            .map_or(healthy.len(), |i| start + i);
        let mut group: Vec<Arc<Deployment>> = healthy[start..end].to_vec();
        while !group.is_empty() {
            let total: u64 = group.iter().map(|d| u64::from(d.weight.max(1))).sum();
            let mut pick = rng.random_range(0..total);
            let idx = group
                .iter()
                .position(|d| {
                    let w = u64::from(d.weight.max(1));
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            out.push(group.remove(idx));
        }
        start = end;
    }
    Ok(out)
}

fn build_provider(p: &ProviderConfig, mock_url: Option<&str>) -> Result<Provider, BuildError> {
    let err = |m: String| BuildError::Provider(p.name.clone(), m);
    let kind = crate::providers::kind(p.kind);
    let base_url = if kind.needs_base_url {
        p.base_url
            .clone()
            .ok_or_else(|| err("base_url is required".into()))?
    } else {
        mock_url
            .ok_or_else(|| err("the mock provider is not running".into()))?
            .to_string()
    };
    let mut headers = HeaderMap::new();
    if let Some(var) = &p.api_key_env {
        match std::env::var(var) {
            Ok(key) if !key.is_empty() => {
                let (name, value) = (kind.auth)(&key);
                let mut v = HeaderValue::from_str(&value)
                    .map_err(|_| err(format!("the value of {var} is not a valid header value")))?;
                v.set_sensitive(true);
                headers.insert(name, v);
            }
            _ => {
                tracing::warn!(provider = %p.name, env = %var, "API key variable is not set; requests go unauthenticated")
            }
        }
    }
    for (k, v) in &p.headers {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| err(format!("bad header name {k}")))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| err(format!("bad value for header {k}")))?;
        headers.insert(name, value);
    }
    // reqwest panics when no rustls crypto provider is installed; installing is idempotent.
    crate::tls::init_tls();
    let client = reqwest::Client::builder()
        .connect_timeout(p.connect_timeout)
        // Shorter than common upstream keep-alives, so a pooled connection is not reused just
        // as the server closes it (which fails a POST that cannot be safely replayed).
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| err(format!("HTTP client: {e}")))?;
    let h1 = reqwest::Url::parse(&base_url)
        .ok()
        .filter(|_| crate::h1client::usable())
        .and_then(|u| crate::h1client::Pool::for_url(&u, p.connect_timeout))
        .map(Arc::new);
    Ok(Provider {
        name: p.name.clone(),
        kind: p.kind,
        base_url: base_url.trim_end_matches('/').to_string(),
        h1,
        urls: Default::default(),
        client,
        headers,
        first_byte_timeout: p.first_byte_timeout,
        idle_timeout: p.idle_timeout,
        total_timeout: p.total_timeout,
        models: p.models.clone(),
    })
}

/// Exponential backoff with full jitter, capped.
pub fn backoff(attempt: u32, routing: &RoutingConfig) -> Duration {
    let exp = routing
        .backoff_base
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
    let cap = exp.min(routing.backoff_max);
    let ms = cap.as_millis() as u64;
    Duration::from_millis(if ms == 0 {
        0
    } else {
        rand::rng().random_range(ms / 2..=ms)
    })
}

/// `Retry-After` in seconds, or OpenAI's `retry-after-ms`. HTTP dates are not used by the
/// providers tollgate speaks to, and are ignored.
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        if ms.is_finite() && ms >= 0.0 {
            return Some(Duration::from_millis(ms as u64));
        }
    }
    let secs = headers
        .get(http::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<f64>()
        .ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_millis((secs * 1000.0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dep(name: &str, weight: u32, priority: u32, health: Arc<Health>) -> Arc<Deployment> {
        let cfg = ProviderConfig::builtin_mock();
        Arc::new(Deployment {
            provider: Arc::new(
                build_provider(
                    &ProviderConfig {
                        name: name.into(),
                        ..cfg
                    },
                    Some("http://127.0.0.1:1/v1"),
                )
                .unwrap(),
            ),
            model: "m".into(),
            weight,
            priority,
            health,
            limits: crate::limits::Limits::default(),
        })
    }

    #[test]
    fn priority_first_then_weight() {
        let a = dep("a", 1, 1, Arc::default());
        let b = dep("b", 9, 0, Arc::default());
        let c = dep("c", 1, 0, Arc::default());
        let mut first_b = 0;
        for _ in 0..1000 {
            let order = order_candidates(
                &[a.clone(), b.clone(), c.clone()],
                0,
                &RoutingConfig::default(),
            )
            .unwrap();
            assert_eq!(order.len(), 3);
            assert_eq!(order[2].provider.name, "a");
            if order[0].provider.name == "b" {
                first_b += 1;
            }
        }
        // Weight 9 vs 1: b leads about 90% of the time.
        assert!((820..=970).contains(&first_b), "{first_b}");
    }

    #[test]
    fn the_breaker_opens_then_lets_one_probe_through_then_closes() {
        let routing = RoutingConfig {
            cooldown_failures: 2,
            cooldown: Duration::from_secs(10),
            ..RoutingConfig::default()
        };
        let h = Arc::new(Health::default());
        let a = dep("a", 1, 0, h.clone());
        let one = std::slice::from_ref(&a);
        h.failure(0, None, &routing);
        assert!(order_candidates(one, 1, &routing).is_ok());
        h.failure(0, None, &routing);
        assert_eq!(order_candidates(one, 1, &routing).err(), Some(10_000));
        // Half-open: one probe, and nobody else until it reports.
        assert_eq!(h.availability(10_000, &routing), Availability::Probe);
        assert_eq!(
            h.availability(10_001, &routing),
            Availability::Unavailable(20_000)
        );
        // The probe fails: open again.
        h.failure(10_050, None, &routing);
        assert_eq!(order_candidates(one, 10_051, &routing).err(), Some(20_050));
        // The next probe succeeds: closed, everyone gets through.
        assert_eq!(h.availability(20_050, &routing), Availability::Probe);
        h.success(20_050, &routing);
        assert_eq!(h.availability(20_051, &routing), Availability::Closed);
        assert_eq!(h.availability(20_052, &routing), Availability::Closed);
    }

    #[test]
    fn a_steady_error_rate_opens_the_breaker_without_consecutive_failures() {
        let routing = RoutingConfig {
            cooldown_failures: 3,
            error_rate: 0.5,
            error_rate_min_requests: 10,
            ..RoutingConfig::default()
        };
        let h = Health::default();
        // Fail, succeed, fail, succeed…: never two failures in a row.
        for i in 0..9 {
            if i % 2 == 0 {
                h.failure(i, None, &routing);
            } else {
                h.success(i, &routing);
            }
            assert_eq!(h.availability(i, &routing), Availability::Closed, "{i}");
        }
        // The 10th outcome brings the window to its minimum at a 50% failure share.
        h.success(9, &routing);
        h.failure(10, None, &routing);
        assert!(matches!(
            h.availability(11, &routing),
            Availability::Unavailable(_)
        ));
        // Off when error_rate is 0.
        let off = RoutingConfig {
            error_rate: 0.0,
            ..routing
        };
        let h = Health::default();
        for i in 0..40 {
            if i % 2 == 0 {
                h.failure(i, None, &off);
            } else {
                h.success(i, &off);
            }
        }
        assert_eq!(h.availability(41, &off), Availability::Closed);
    }

    #[test]
    fn a_probe_that_never_reports_frees_its_slot_after_a_cooldown() {
        let routing = RoutingConfig {
            cooldown_failures: 1,
            cooldown: Duration::from_secs(1),
            ..RoutingConfig::default()
        };
        let h = Health::default();
        h.failure(0, None, &routing);
        assert_eq!(h.availability(1_000, &routing), Availability::Probe);
        assert!(matches!(
            h.availability(1_500, &routing),
            Availability::Unavailable(_)
        ));
        assert_eq!(h.availability(2_000, &routing), Availability::Probe);
    }

    #[test]
    fn retry_after_cools_a_deployment_for_as_long_as_asked() {
        let routing = RoutingConfig::default();
        let h = Arc::new(Health::default());
        let a = dep("a", 1, 0, h.clone());
        h.failure(20_000, Some(Duration::from_secs(3)), &routing);
        assert_eq!(order_candidates(&[a], 20_001, &routing).err(), Some(23_000));
    }

    #[test]
    fn retry_after_forms() {
        let mut h = reqwest::header::HeaderMap::new();
        h.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        h.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&h), Some(Duration::from_millis(150)));
        let mut h = reqwest::header::HeaderMap::new();
        h.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&h), None);
    }
}
