//! A tool route as configured: the prefix it claims, the service behind it, its client,
//! limits and price. Built with the runtime (`upstream::Runtime`) on every (re)load; the
//! request path for it is `routes.rs`.

use crate::config::RouteConfig;
use crate::limits::Limits;
use http::{HeaderMap, HeaderName, HeaderValue};
use std::time::Duration;

pub struct ToolRoute {
    pub name: String,
    /// Without a trailing slash.
    pub prefix: String,
    /// Without a trailing slash.
    pub upstream: String,
    pub headers: HeaderMap,
    pub client: reqwest::Client,
    pub per_key: Limits,
    pub total: Limits,
    pub price_per_call: u64,
    pub timeout: Duration,
    pub loop_guard: bool,
}

impl ToolRoute {
    pub fn build(cfg: &RouteConfig) -> Result<ToolRoute, String> {
        let mut headers = HeaderMap::new();
        for (k, v) in &cfg.headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("routes.{}: bad header name {k}", cfg.name))?;
            let value = HeaderValue::from_str(v)
                .map_err(|_| format!("routes.{}: bad value for header {k}", cfg.name))?;
            headers.insert(name, value);
        }
        if let Some(var) = &cfg.api_key_env {
            match std::env::var(var) {
                Ok(key) if !key.is_empty() => {
                    let mut v = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
                        format!("routes.{}: {var} is not a valid header value", cfg.name)
                    })?;
                    v.set_sensitive(true);
                    headers.insert(http::header::AUTHORIZATION, v);
                }
                _ => {
                    tracing::warn!(route = %cfg.name, env = %var, "API key variable is not set; calls go unauthenticated")
                }
            }
        }
        crate::tls::init_tls();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5).min(cfg.timeout))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            // The agent sees the service's redirects, as it would without the gateway.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("routes.{}: HTTP client: {e}", cfg.name))?;
        Ok(ToolRoute {
            name: cfg.name.clone(),
            prefix: cfg.path.trim_end_matches('/').to_string(),
            upstream: cfg.upstream.trim_end_matches('/').to_string(),
            headers,
            client,
            per_key: Limits {
                rpm: cfg.rpm,
                tpm: 0,
                concurrency: cfg.concurrency,
            },
            total: Limits {
                rpm: cfg.total_rpm,
                tpm: 0,
                concurrency: cfg.total_concurrency,
            },
            price_per_call: cfg.price_per_call,
            timeout: cfg.timeout,
            loop_guard: cfg.loop_guard,
        })
    }

    /// The rest of the path after this route's prefix, if the path is under it.
    pub fn rest<'a>(&self, path: &'a str) -> Option<&'a str> {
        let rest = path.strip_prefix(&self.prefix)?;
        (rest.is_empty() || rest.starts_with('/')).then_some(rest)
    }
}
