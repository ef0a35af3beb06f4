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
        let what = format!("routes.{}", cfg.name);
        let headers = service_headers(&what, &cfg.headers, cfg.api_key_env.as_deref())?;
        let client = service_client(&what, cfg.timeout)?;
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

/// The headers sent with every call to a tool service (a route or an MCP server): the
/// configured ones, and its own credentials from `api_key_env` as a bearer token.
pub fn service_headers(
    what: &str,
    configured: &std::collections::BTreeMap<String, String>,
    api_key_env: Option<&str>,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::new();
    for (k, v) in configured {
        let name = HeaderName::from_bytes(k.as_bytes())
            .map_err(|_| format!("{what}: bad header name {k}"))?;
        let value =
            HeaderValue::from_str(v).map_err(|_| format!("{what}: bad value for header {k}"))?;
        headers.insert(name, value);
    }
    if let Some(var) = api_key_env {
        match std::env::var(var) {
            Ok(key) if !key.is_empty() => {
                let mut v = HeaderValue::from_str(&format!("Bearer {key}"))
                    .map_err(|_| format!("{what}: {var} is not a valid header value"))?;
                v.set_sensitive(true);
                headers.insert(http::header::AUTHORIZATION, v);
            }
            _ => {
                tracing::warn!(service = %what, env = %var, "API key variable is not set; calls go unauthenticated")
            }
        }
    }
    Ok(headers)
}

/// The HTTP client for one tool service: redirects are the agent's to see, not followed.
pub fn service_client(what: &str, timeout: Duration) -> Result<reqwest::Client, String> {
    crate::tls::init_tls();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5).min(timeout))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("{what}: HTTP client: {e}"))
}
