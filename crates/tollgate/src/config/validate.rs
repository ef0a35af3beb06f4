//! `Config::validate`: every problem of a configuration, each with its path, so a file with
//! four mistakes is fixed in one round.

use super::*;

impl Config {
    /// Environment variables the configuration names that are not set here: not errors (the
    /// gateway runs), but each one is a provider, route or webhook that will misbehave.
    pub fn env_warnings(&self) -> Vec<String> {
        let unset = |var: &str| std::env::var_os(var).is_none_or(|v| v.is_empty());
        let mut out = Vec::new();
        for (i, p) in self.providers.iter().enumerate() {
            if let Some(var) = p.api_key_env.as_deref().filter(|v| unset(v)) {
                out.push(format!("providers[{i}].api_key_env: {var} is not set; requests to \"{}\" go unauthenticated", p.name));
            }
        }
        for (i, r) in self.routes.iter().enumerate() {
            if let Some(var) = r.api_key_env.as_deref().filter(|v| unset(v)) {
                out.push(format!(
                    "routes[{i}].api_key_env: {var} is not set; calls to \"{}\" go unauthenticated",
                    r.name
                ));
            }
        }
        for (i, m) in self.mcp_servers.iter().enumerate() {
            if let Some(var) = m.api_key_env.as_deref().filter(|v| unset(v)) {
                out.push(format!(
                    "mcp_servers[{i}].api_key_env: {var} is not set; calls to \"{}\" go unauthenticated",
                    m.name
                ));
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if let Some(var) = w.secret_env.as_deref().filter(|v| unset(v)) {
                out.push(format!(
                    "webhooks[{i}].secret_env: {var} is not set; deliveries to {} are unsigned",
                    w.url
                ));
            }
        }
        out
    }

    /// Every problem, each prefixed with its path (`models[2].deployments[0].provider: …`).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut p = |path: String, msg: &str| problems.push(format!("{path}: {msg}"));
        for (path, d) in [
            (
                "server.header_read_timeout",
                self.server.header_read_timeout,
            ),
            ("server.body_read_timeout", self.server.body_read_timeout),
            ("server.idle_timeout", self.server.idle_timeout),
        ] {
            if d.is_zero() {
                p(path.into(), "must be greater than 0");
            }
        }
        for (field, policy) in &self.translation.fields {
            let mappable = tollgate_proto::translate::MAPPABLE
                .iter()
                .any(|(f, _)| f == field);
            if *policy == tollgate_proto::translate::FieldPolicy::Map && !mappable {
                let names: Vec<&str> = tollgate_proto::translate::MAPPABLE
                    .iter()
                    .map(|(f, _)| *f)
                    .collect();
                p(
                    format!("translation.fields.{field}"),
                    &format!(
                        "has no mapping; use drop or reject (fields with a mapping: {})",
                        names.join(", ")
                    ),
                );
            }
        }
        if self.translation.unknown == Some(tollgate_proto::translate::FieldPolicy::Map) {
            p(
                "translation.unknown".into(),
                "must be drop or reject (map needs a known field)",
            );
        }
        for (i, name) in self.reconcile.providers.iter().enumerate() {
            if !self.providers.iter().any(|p| &p.name == name) {
                p(
                    format!("reconcile.providers[{i}]"),
                    &format!("no provider \"{name}\" is configured"),
                );
            }
        }
        if !self.reconcile.providers.is_empty() && self.reconcile.every.is_zero() {
            p("reconcile.every".into(), "must be greater than 0");
        }
        if !(0.0..=100.0).contains(&self.reconcile.threshold_pct) {
            p("reconcile.threshold_pct".into(), "must be from 0 to 100");
        }
        if self.logging.max_body_bytes > 1 << 20 {
            p(
                "logging.max_body_bytes".into(),
                "must be at most 1048576 (bodies are kept with every record)",
            );
        }
        let c = &self.cache;
        if c.fee_micros > crate::money::MAX_MICROS as u64 {
            p(
                "cache.fee_micros".into(),
                &format!("must be at most {}", crate::money::MAX_MICROS),
            );
        }
        if c.enabled && c.ttl.is_zero() {
            p("cache.ttl".into(), "must be greater than 0");
        }
        if c.max_entry_bytes > c.max_bytes {
            p(
                "cache.max_entry_bytes".into(),
                "must be at most cache.max_bytes",
            );
        }
        if c.max_bytes > 16 << 30 {
            p(
                "cache.max_bytes".into(),
                "must be at most 17179869184 (16 GiB)",
            );
        }
        if !(0.0..=1.0).contains(&self.prompt_cache.min_reuse) {
            p("prompt_cache.min_reuse".into(), "must be from 0 to 1");
        }
        if self.compression.max_tool_tokens > crate::money::MAX_TOKENS {
            p(
                "compression.max_tool_tokens".into(),
                &format!("must be at most {}", crate::money::MAX_TOKENS),
            );
        }
        if self.compression.min_repeats == 1 {
            p(
                "compression.min_repeats".into(),
                "must be 0 (off) or at least 2",
            );
        }
        if self.server.max_body_bytes == 0 {
            p("server.max_body_bytes".into(), "must be greater than 0");
        }
        for (path, v) in [
            (
                "wallets.default_max_output",
                self.wallets.default_max_output,
            ),
            ("limits.output_estimate", self.limits.output_estimate),
        ] {
            if v > crate::money::MAX_TOKENS {
                p(
                    path.into(),
                    &format!("must be at most {}", crate::money::MAX_TOKENS),
                );
            }
        }
        if !(1..=crate::money::MAX_TOKENS).contains(&self.limits.max_output_tokens) {
            p(
                "limits.max_output_tokens".into(),
                &format!("must be between 1 and {}", crate::money::MAX_TOKENS),
            );
        }
        if self.wallets.backend == WalletsBackend::Redis && self.limits.redis.url.is_none() {
            p(
                "wallets.backend".into(),
                "\"redis\" needs [limits.redis] url",
            );
        }
        if self.wallets.backend == WalletsBackend::Memory
            && self
                .store
                .url
                .as_deref()
                .is_some_and(|u| !u.trim().is_empty() && !u.starts_with("sqlite://"))
        {
            p(
                "wallets.backend".into(),
                "\"memory\" needs a SQLite store: a PostgreSQL store is shared by several \
                 gateways, whose holds must meet in it (use \"store\" or \"redis\")",
            );
        }
        if self.cache.backend == CacheBackend::Redis && self.limits.redis.url.is_none() {
            p("cache.backend".into(), "\"redis\" needs [limits.redis] url");
        }
        let a = &self.analytics;
        if a.backend == AnalyticsBackend::Clickhouse {
            match a.url.as_deref() {
                None => p(
                    "analytics.url".into(),
                    "required when analytics.backend = \"clickhouse\"",
                ),
                Some(u) if !is_http_url(u) => p(
                    "analytics.url".into(),
                    &format!("not an http(s) URL: \"{u}\""),
                ),
                Some(_) => {}
            }
            let ident = |s: &str| {
                !s.is_empty()
                    && s.len() <= 64
                    && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            };
            if !ident(&a.database) {
                p(
                    "analytics.database".into(),
                    "letters, digits and _ only (at most 64)",
                );
            }
            if !(1..=1_000_000).contains(&a.batch_max) {
                p(
                    "analytics.batch_max".into(),
                    "must be between 1 and 1000000",
                );
            }
            if a.queue_capacity < a.batch_max {
                p(
                    "analytics.queue_capacity".into(),
                    "must be at least batch_max",
                );
            }
            if a.timeout.is_zero() || a.flush_interval.is_zero() {
                p(
                    "analytics.timeout".into(),
                    "timeout and flush_interval must be greater than 0",
                );
            }
        }
        let ttl = self.ui.session_ttl;
        if ttl < Duration::from_secs(60) || ttl > Duration::from_secs(30 * 86_400) {
            p(
                "ui.session_ttl".into(),
                "must be between 1 minute and 30 days",
            );
        }
        let o = &self.otel;
        if let Some(u) = o.endpoint.as_deref() {
            if !is_http_url(u) {
                p(
                    "otel.endpoint".into(),
                    &format!("not an http(s) URL: \"{u}\""),
                );
            }
            if cfg!(not(feature = "otel")) {
                p(
                    "otel.endpoint".into(),
                    "this build has no `otel` feature (rebuild with default features)",
                );
            }
        }
        if !(0.0..=1.0).contains(&o.sample_ratio) {
            p("otel.sample_ratio".into(), "must be between 0 and 1");
        }
        if !(1..=100_000).contains(&o.batch_max) {
            p("otel.batch_max".into(), "must be between 1 and 100000");
        }
        if o.queue_capacity < o.batch_max || o.queue_capacity > 10_000_000 {
            p(
                "otel.queue_capacity".into(),
                "must be at least batch_max and at most 10000000",
            );
        }
        if o.timeout.is_zero() || o.flush_interval.is_zero() {
            p(
                "otel.timeout".into(),
                "timeout and flush_interval must be greater than 0",
            );
        }
        for name in o.headers_env.keys() {
            if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                p(
                    format!("otel.headers_env.{name}"),
                    "not a valid header name",
                );
            }
        }
        if let Some(url) = &self.store.url {
            let ok = ["postgres://", "postgresql://", "sqlite://"]
                .iter()
                .any(|s| url.starts_with(s))
                || url.contains("host=");
            if !ok {
                p(
                    "store.url".into(),
                    "must be a postgres:// (or postgresql://, sqlite://) URL",
                );
            }
        }
        if self.routing.max_attempts == 0 {
            p("routing.max_attempts".into(), "must be at least 1");
        }
        if self.routing.backoff_base > self.routing.backoff_max {
            p(
                "routing.backoff_base".into(),
                "must not exceed routing.backoff_max",
            );
        }
        if !(0.0..=1.0).contains(&self.routing.error_rate) {
            p("routing.error_rate".into(), "must be between 0 and 1");
        }
        if !(0.0..=1.0).contains(&self.retries.budget_ratio) {
            p("retries.budget_ratio".into(), "must be between 0 and 1");
        }
        if self.retries.window.is_zero() {
            p("retries.window".into(), "must be greater than 0");
        }
        if self.metering.queue_capacity == 0 {
            p("metering.queue_capacity".into(), "must be greater than 0");
        }
        if self.metering.batch_max == 0 {
            p("metering.batch_max".into(), "must be greater than 0");
        }
        if let Some(u) = self.limits.redis.url.as_deref() {
            if !(u.starts_with("redis://") || u.starts_with("unix://")) {
                p(
                    "limits.redis.url".into(),
                    &format!("not a redis:// URL: \"{u}\""),
                );
            }
            if self.limits.redis.timeout.is_zero() {
                p("limits.redis.timeout".into(), "must be greater than 0");
            }
        }
        if self.limits.backend == LimitsBackend::Redis {
            let r = &self.limits.redis;
            if r.url.is_none() {
                p(
                    "limits.redis.url".into(),
                    "required when limits.backend = \"redis\"",
                );
            }
            if r.replicas == 0 {
                p("limits.redis.replicas".into(), "must be at least 1");
            }
            if r.lease_ttl < Duration::from_secs(1) {
                p("limits.redis.lease_ttl".into(), "must be at least 1s");
            }
        }
        for (i, w) in self.webhooks.iter().enumerate() {
            if !is_http_url(&w.url) {
                p(
                    format!("webhooks[{i}].url"),
                    &format!("not an http(s) URL: \"{}\"", w.url),
                );
            }
        }
        let mut route_names = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.price_per_call > crate::money::MAX_MICROS as u64 {
                p(
                    format!("routes[{i}].price_per_call"),
                    &format!("must be at most {}", crate::money::MAX_MICROS),
                );
            }
            let path = format!("routes[{i}]");
            if r.name.is_empty() || !route_names.insert(r.name.as_str()) {
                p(format!("{path}.name"), "must be non-empty and unique");
            }
            let prefix = r.path.trim_end_matches('/');
            if !r.path.starts_with('/') || prefix.is_empty() {
                p(
                    format!("{path}.path"),
                    "must start with '/' and name a prefix",
                );
            } else if RESERVED_PATHS
                .iter()
                .any(|res| prefix == *res || prefix.starts_with(&format!("{res}/")))
            {
                p(
                    format!("{path}.path"),
                    &format!("\"{}\" is served by the gateway itself", r.path),
                );
            }
            if !is_http_url(&r.upstream) {
                p(
                    format!("{path}.upstream"),
                    &format!("not an http(s) URL: \"{}\"", r.upstream),
                );
            }
        }
        let mut mcp_names = HashSet::new();
        for (i, m) in self.mcp_servers.iter().enumerate() {
            let path = format!("mcp_servers[{i}]");
            let charset = m
                .name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if m.name.is_empty() || !charset || m.name.contains("__") || m.name.len() > 64 {
                p(
                    format!("{path}.name"),
                    "must be 1-64 letters, digits, '-' or '_', without \"__\" (it prefixes tool names as server__tool)",
                );
            }
            if !mcp_names.insert(m.name.as_str()) {
                p(
                    format!("{path}.name"),
                    &format!("duplicate MCP server name \"{}\"", m.name),
                );
            }
            if !is_http_url(&m.url) {
                p(
                    format!("{path}.url"),
                    &format!("not an http(s) URL: \"{}\"", m.url),
                );
            }
            for (tool, price) in std::iter::once(("price_per_call", &m.price_per_call))
                .chain(m.tool_prices.iter().map(|(t, p)| (t.as_str(), p)))
            {
                if *price > crate::money::MAX_MICROS as u64 {
                    p(
                        format!("{path}.{tool}"),
                        &format!("must be at most {}", crate::money::MAX_MICROS),
                    );
                }
            }
            if m.timeout.is_zero() {
                p(format!("{path}.timeout"), "must be greater than 0");
            }
        }
        let mut policy_names = HashSet::new();
        for (i, pol) in self.tool_policies.iter().enumerate() {
            let path = format!("tool_policies[{i}]");
            if pol.name.is_empty() || !policy_names.insert(pol.name.as_str()) {
                p(format!("{path}.name"), "must be non-empty and unique");
            }
            if pol.keys.is_empty() && pol.teams.is_empty() {
                p(
                    path.clone(),
                    "names no keys and no teams: it would apply to nobody",
                );
            }
            if pol.rules.is_empty() {
                p(
                    format!("{path}.rules"),
                    "needs at least one rule (with none, every tool call would be denied)",
                );
            }
            for (j, r) in pol.rules.iter().enumerate() {
                if let Err(e) = cel::Program::compile(&r.when) {
                    p(
                        format!("{path}.rules[{j}].when"),
                        &format!("not a CEL expression: {e}"),
                    );
                }
            }
        }
        if self.approvals.ttl.is_zero() {
            p("approvals.ttl".into(), "must be greater than 0");
        }
        let mut provider_names = HashSet::new();
        for (i, prov) in self.providers.iter().enumerate() {
            let path = format!("providers[{i}]");
            if prov.name.is_empty() || prov.name.contains('/') {
                p(
                    format!("{path}.name"),
                    "must be non-empty and must not contain '/'",
                );
            }
            if !provider_names.insert(prov.name.as_str()) {
                p(
                    format!("{path}.name"),
                    &format!("duplicate provider name \"{}\"", prov.name),
                );
            }
            let kind = crate::providers::kind(prov.kind);
            match (kind.needs_base_url, &prov.base_url) {
                (true, None) => {
                    let kinds: Vec<String> = crate::providers::all()
                        .iter()
                        .filter(|k| k.needs_base_url)
                        .map(|k| format!("\"{}\"", k.name))
                        .collect();
                    p(
                        format!("{path}.base_url"),
                        &format!("required for kinds {}", kinds.join(" and ")),
                    )
                }
                (true, Some(url)) => {
                    if !is_http_url(url) {
                        p(
                            format!("{path}.base_url"),
                            &format!("not an http(s) URL: \"{url}\""),
                        );
                    }
                }
                (false, Some(_)) => p(
                    format!("{path}.base_url"),
                    &format!("not used by kind \"{}\" (it runs in-process)", kind.name),
                ),
                (false, None) => {}
            }
            if let Some(var) = &prov.api_key_env {
                if var.is_empty() {
                    p(
                        format!("{path}.api_key_env"),
                        "must name an environment variable",
                    );
                }
            }
            for (name, value) in &prov.headers {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    p(format!("{path}.headers.{name}"), "not a valid header name");
                }
                if http::HeaderValue::from_str(value).is_err() {
                    p(format!("{path}.headers.{name}"), "not a valid header value");
                }
            }
            for (d, field) in [
                (prov.connect_timeout, "connect_timeout"),
                (prov.first_byte_timeout, "first_byte_timeout"),
                (prov.idle_timeout, "idle_timeout"),
                (prov.total_timeout, "total_timeout"),
            ] {
                if d.is_zero() {
                    p(format!("{path}.{field}"), "must be greater than 0");
                }
            }
        }
        let mut aliases = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let path = format!("models[{i}]");
            if m.name.is_empty() {
                p(format!("{path}.name"), "must be non-empty");
            }
            if !aliases.insert(m.name.as_str()) {
                p(
                    format!("{path}.name"),
                    &format!("duplicate model name \"{}\"", m.name),
                );
            }
            match (m.deployments.is_empty(), m.cascade.is_empty()) {
                (true, true) => p(
                    format!("{path}.deployments"),
                    "needs at least one deployment (or a cascade)",
                ),
                (false, false) => p(
                    format!("{path}.cascade"),
                    "a model has deployments or a cascade, not both",
                ),
                _ => {}
            }
            if m.cascade.len() == 1 || m.cascade.len() > 4 {
                p(
                    format!("{path}.cascade"),
                    "needs two to four models, cheapest first",
                );
            }
            if !(1..=64 << 20).contains(&m.validate.buffer_max_bytes) {
                p(
                    format!("{path}.validate.buffer_max_bytes"),
                    "must be between 1 and 67108864",
                );
            }
            for (j, tier) in m.cascade.iter().enumerate() {
                // A tier that is itself a cascade would nest holds and checks without end.
                if self
                    .models
                    .iter()
                    .any(|o| &o.name == tier && !o.cascade.is_empty())
                {
                    p(
                        format!("{path}.cascade[{j}]"),
                        &format!("\"{tier}\" is a cascade itself"),
                    );
                }
                if tier == &m.name {
                    p(
                        format!("{path}.cascade[{j}]"),
                        "a cascade cannot name itself",
                    );
                }
            }
            if let Some(re) = &m.validate.must_match {
                if let Err(e) = fancy_regex::Regex::new(re) {
                    p(
                        format!("{path}.validate.must_match"),
                        &format!("not a regex: {e}"),
                    );
                }
            }
            for (j, d) in m.deployments.iter().enumerate() {
                if !provider_names.contains(d.provider.as_str()) {
                    p(
                        format!("{path}.deployments[{j}].provider"),
                        &format!("unknown provider \"{}\"", d.provider),
                    );
                }
                if d.weight == 0 {
                    p(
                        format!("{path}.deployments[{j}].weight"),
                        "must be at least 1 (remove the deployment to disable it)",
                    );
                }
            }
        }
        let mut priced = HashSet::new();
        for (i, pr) in self.prices.iter().enumerate() {
            if !priced.insert(pr.model.as_str()) {
                p(
                    format!("prices[{i}].model"),
                    &format!("duplicate price for \"{}\"", pr.model),
                );
            }
            if let Some(c) = pr.cached_input {
                if c > pr.input {
                    p(
                        format!("prices[{i}].cached_input"),
                        "is more than input; check the units (micro-USD per million tokens)",
                    );
                }
            }
        }
        problems
    }
}

fn is_http_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://")) && reqwest::Url::parse(url).is_ok()
}
