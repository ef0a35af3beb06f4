//! `tollgate.toml`: what the gateway serves and how.
//!
//! Static settings (`[server]`, `[metering]`) are read once; providers, models, prices and
//! routing reload on SIGHUP or `POST /admin/reload` (see `server::reload`).

mod validate;

use serde::{Deserialize, Deserializer};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub routing: RoutingConfig,
    pub metering: MeteringConfig,
    pub limits: LimitsConfig,
    pub loop_guard: LoopGuardConfig,
    pub retries: RetriesConfig,
    pub wallets: WalletsConfig,
    pub translation: TranslationConfig,
    pub reconcile: ReconcileConfig,
    pub logging: LoggingConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub prices: Vec<PriceConfig>,
    pub routes: Vec<RouteConfig>,
    pub webhooks: Vec<WebhookConfig>,
    pub mcp: McpConfig,
    pub mcp_servers: Vec<McpServerConfig>,
    pub tool_policies: Vec<ToolPolicyConfig>,
    pub approvals: ApprovalsConfig,
    pub redaction: RedactionConfig,
    pub cache: CacheConfig,
    pub compression: CompressionConfig,
    pub prompt_cache: PromptCacheConfig,
    pub analytics: AnalyticsConfig,
    pub otel: OtelConfig,
    pub ui: UiConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Largest request body accepted; larger bodies get 413 before they are read.
    pub max_body_bytes: usize,
    /// How long SIGTERM waits for in-flight requests (streams included) before giving up.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
    /// How often a gateway looks for keys created or revoked by another process.
    #[serde(deserialize_with = "de_duration")]
    pub key_refresh: Duration,
    /// A request head (request line and headers) must arrive within this of its first byte,
    /// or the connection is closed (slow-header clients).
    #[serde(deserialize_with = "de_duration")]
    pub header_read_timeout: Duration,
    /// A request body must arrive within this of its head, or the request is answered 408.
    #[serde(deserialize_with = "de_duration")]
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request in flight is closed after this.
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// Client connections open at once; 0 = half the process's open-file limit (at most
    /// 10 000). At the limit idle connections are closed first, then new ones refused.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    /// Upstream attempts per request, first try included.
    pub max_attempts: u32,
    #[serde(deserialize_with = "de_duration")]
    pub backoff_base: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub backoff_max: Duration,
    /// The longest upstream `Retry-After` tollgate waits out itself; beyond it the 429 goes
    /// back to the client with the upstream's `Retry-After`.
    #[serde(deserialize_with = "de_duration")]
    pub max_retry_wait: Duration,
    /// Consecutive failures after which a deployment cools down.
    pub cooldown_failures: u32,
    /// A failure share over `error_rate_window` that also cools a deployment down (0 = off),
    /// once it has seen `error_rate_min_requests` outcomes in the window.
    pub error_rate: f64,
    pub error_rate_min_requests: u32,
    #[serde(deserialize_with = "de_duration")]
    pub error_rate_window: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub cooldown: Duration,
}

/// Catches agents that repeat themselves. Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoopGuardConfig {
    pub enabled: bool,
    /// The same request (key, model, conversation, tools) this many times within `window`
    /// trips the guard: the default 5 trips on the 5th, not the 4th.
    pub max_repeats: usize,
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// The conversation's latest tool call (same tool, same arguments) appearing this many
    /// times trips the guard; 0 turns the check off.
    pub max_tool_repeats: usize,
    pub action: LoopAction,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoopAction {
    /// 429 `loop_detected`, telling the agent it is repeating itself.
    Reject,
    /// Serve it, with an `x-tollgate-warning` header.
    Warn,
    /// Answer with the previous response to the same request (no upstream call, no cost);
    /// reject when there is none to give (streams, or nothing kept yet).
    Replay,
    /// Answer 200 in the caller's dialect (JSON or stream) with a message telling the model it
    /// is repeating itself: the agent's own loop reads it as the model's turn. No upstream
    /// call, no cost; recorded as `loop_detected`.
    Nudge,
}

/// What the request log keeps besides the record. Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Keep request and response bodies with the records (off: they are never stored).
    /// Bodies may hold secrets and personal data; redaction does not exist yet.
    pub bodies: bool,
    /// Bytes kept of each body, at most; the rest is cut and the body marked truncated.
    pub max_body_bytes: usize,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        LoggingConfig {
            bodies: false,
            max_body_bytes: 16 * 1024,
        }
    }
}

/// Scheduled reconciliation against the providers' usage reports. Static.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReconcileConfig {
    /// Providers (by name) to reconcile; empty = none, so nothing runs.
    pub providers: Vec<String>,
    /// How often.
    #[serde(deserialize_with = "de_duration")]
    pub every: Duration,
    /// The window each run compares (the providers' reports lag by up to a day).
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// Percent a row may drift by before a `reconcile.drift` webhook is sent.
    pub threshold_pct: f64,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            providers: Vec::new(),
            every: Duration::from_secs(6 * 3600),
            window: Duration::from_secs(2 * 86_400),
            threshold_pct: 1.0,
        }
    }
}

/// What a cross-vendor translation does with request fields the target dialect has no
/// direct equivalent for. Reloadable.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranslationConfig {
    /// For a field with no built-in or configured policy: `reject` (the default: a 400
    /// naming it) or `drop` (left out, named in `x-tollgate-warning`).
    pub unknown: Option<tollgate_proto::translate::FieldPolicy>,
    /// Per field (`thinking`, `output_config.effort`, `reasoning_effort`, any top-level
    /// request field): `drop`, `map` or `reject`. Overrides the built-in defaults.
    pub fields: BTreeMap<String, tollgate_proto::translate::FieldPolicy>,
}

impl TranslationConfig {
    pub fn policy(&self) -> tollgate_proto::translate::Policy {
        tollgate_proto::translate::Policy {
            fields: self.fields.clone(),
            unknown: self.unknown,
        }
    }
}

/// An endpoint that receives money events. Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    pub url: String,
    /// Environment variable holding the signing secret (`x-tollgate-signature:
    /// sha256=HMAC(secret, body)`).
    #[serde(default)]
    pub secret_env: Option<String>,
    /// The secret itself, when it may live in the file (prefer `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Event types to send (`budget.threshold`, `budget.soft_limit`, `run.threshold`,
    /// `run.exhausted`, `wallet.insufficient_funds`); empty = all.
    #[serde(default)]
    pub events: Vec<String>,
}

impl WebhookConfig {
    pub fn secret(&self) -> Option<String> {
        self.secret_env
            .as_deref()
            .and_then(|v| std::env::var(v).ok())
            .or_else(|| self.secret.clone())
    }
}

/// Where usage analytics are also written and reports answered from (`analytics.rs`, ADR
/// 0032): the store alone, or ClickHouse beside it. The ledger and wallets never leave the
/// store. Needs a restart to change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnalyticsConfig {
    pub backend: AnalyticsBackend,
    /// ClickHouse's HTTP interface, `http://host:8123`.
    pub url: Option<String>,
    pub database: String,
    pub user: String,
    /// The environment variable holding the user's password (none: no password).
    pub password_env: Option<String>,
    /// Records per insert, and how long records wait for more before they go.
    pub batch_max: usize,
    #[serde(deserialize_with = "de_duration")]
    pub flush_interval: Duration,
    /// Records waiting for the sink; past it they go straight to the spill file.
    pub queue_capacity: usize,
    /// The spill file's bound (records ClickHouse did not take, in the data dir); past it
    /// records are counted as dropped from analytics (they stay in the store).
    pub spill_max_bytes: u64,
    /// Deadline of one ClickHouse call.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// After a failure, how long the sink spills before it tries ClickHouse again.
    #[serde(deserialize_with = "de_duration")]
    pub retry_interval: Duration,
}

/// The dashboard at `/ui` (`ui/`, ADR 0035): static.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    pub enabled: bool,
    /// How long a sign-in lasts.
    #[serde(deserialize_with = "de_duration")]
    pub session_ttl: Duration,
}

impl Default for UiConfig {
    fn default() -> Self {
        UiConfig {
            enabled: true,
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AnalyticsBackend {
    #[default]
    Store,
    Clickhouse,
}

impl Default for AnalyticsConfig {
    fn default() -> Self {
        AnalyticsConfig {
            backend: AnalyticsBackend::Store,
            url: None,
            database: "tollgate".into(),
            user: "default".into(),
            password_env: None,
            // Fewer, larger parts: 50 000 took 1.6–2.3× the rows/s of 10 000 on 18.16
            // (bench/RESULTS.md, run R), ClickHouse merging less.
            batch_max: 50_000,
            flush_interval: Duration::from_secs(1),
            queue_capacity: 100_000,
            spill_max_bytes: 1 << 30,
            timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(2),
        }
    }
}

/// OpenTelemetry traces (`otel/`, ADR 0033): spans exported as OTLP/HTTP protobuf. Without
/// an endpoint no span is recorded, and a caller's `traceparent` is passed on upstream as it
/// came. Needs a restart to change.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtelConfig {
    /// The collector's OTLP/HTTP base URL, `http://host:4318`: spans go to
    /// `<endpoint>/v1/traces`.
    pub endpoint: Option<String>,
    /// `service.name` of the resource.
    pub service_name: String,
    /// More resource attributes, e.g. `{ "deployment.environment.name" = "prod" }`.
    pub resource: BTreeMap<String, String>,
    /// Headers sent with each export, each read from an environment variable at start:
    /// `{ authorization = "OTLP_AUTH" }`.
    pub headers_env: BTreeMap<String, String>,
    /// Share of requests without a sampled parent that are traced, 0 to 1.
    pub sample_ratio: f64,
    /// A caller's `traceparent` decides whether its request is traced.
    pub parent_based: bool,
    /// Finished traces waiting for export; past it they are dropped (counted).
    pub queue_capacity: usize,
    /// Traces per export, and how long a trace waits for more before they go.
    pub batch_max: usize,
    #[serde(deserialize_with = "de_duration")]
    pub flush_interval: Duration,
    /// Deadline of one export.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
}

impl Default for OtelConfig {
    fn default() -> Self {
        OtelConfig {
            endpoint: None,
            service_name: "tollgate".into(),
            resource: BTreeMap::new(),
            headers_env: BTreeMap::new(),
            sample_ratio: 1.0,
            parent_based: true,
            queue_capacity: 10_000,
            batch_max: 512,
            flush_interval: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Where keys, usage and the ledger live. Needs a restart to change.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `postgres://user:password@host:5432/db` for PostgreSQL (shared by several gateways);
    /// unset: SQLite in `<data_dir>/tollgate.db`. `TOLLGATE_STORE_URL` overrides it.
    pub url: Option<String>,
}

/// Money: holds and streams. Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WalletsConfig {
    /// Output tokens held for a request that sets no `max_tokens`.
    pub default_max_output: u64,
    /// A hold not settled within this is released, so a crash never freezes money. Longer
    /// than any provider's `total_timeout`.
    #[serde(deserialize_with = "de_duration")]
    pub hold_ttl: Duration,
    /// How long a request waits for its hold before giving up with 503 `wallet_unavailable`
    /// (the store, or Redis, is down or stalled). Money checks fail closed.
    #[serde(deserialize_with = "de_duration")]
    pub hold_timeout: Duration,
    /// How often expired holds and grants are swept.
    #[serde(deserialize_with = "de_duration")]
    pub sweep_interval: Duration,
    /// A stream whose running cost passes its hold by more than this share (percent) is cut
    /// with a terminal error event; 0 cuts at the hold.
    pub stream_overrun_percent: u64,
    /// Where holds are decided: `store` (the writer, in the store's transactions), `redis`
    /// (hot balances in Redis shared by every replica, the ledger in the store), `memory`
    /// (this gateway's memory, the ledger in the store: SQLite with one gateway on the file,
    /// which it locks; ADR 0036), or `auto`: `redis` when `[limits] backend = "redis"`, else
    /// `store`. Needs a restart to change.
    pub backend: WalletsBackend,
    /// Redis mode: how often balances are reconciled from the store and expired holds
    /// released.
    #[serde(deserialize_with = "de_duration")]
    pub reconcile_interval: Duration,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WalletsBackend {
    #[default]
    Auto,
    Store,
    Redis,
    Memory,
}

impl Config {
    /// Whether the response cache keeps its entries in Redis (`[cache] backend`).
    pub fn cache_in_redis(&self) -> bool {
        match self.cache.backend {
            CacheBackend::Redis => true,
            CacheBackend::Memory => false,
            CacheBackend::Auto => self.limits.redis.url.is_some(),
        }
    }

    /// Whether holds are decided in Redis.
    pub fn hot_wallets(&self) -> bool {
        match self.wallets.backend {
            WalletsBackend::Redis => true,
            WalletsBackend::Store | WalletsBackend::Memory => false,
            WalletsBackend::Auto => self.limits.backend == LimitsBackend::Redis,
        }
    }
}

impl Default for WalletsConfig {
    fn default() -> Self {
        WalletsConfig {
            default_max_output: 4096,
            hold_ttl: Duration::from_secs(1200),
            hold_timeout: Duration::from_secs(2),
            sweep_interval: Duration::from_secs(5),
            stream_overrun_percent: 0,
            backend: WalletsBackend::Auto,
            reconcile_interval: Duration::from_secs(1),
        }
    }
}

/// Retry-storm damping (see `damping.rs`). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetriesConfig {
    /// A key's client retries may be at most this share of its requests in `window`; the
    /// gateway's own upstream retries, this share of a deployment's requests.
    pub budget_ratio: f64,
    /// …but at least this many per window.
    pub budget_min: u32,
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// The same request (byte for byte, same key) again within this counts as a retry.
    #[serde(deserialize_with = "de_duration")]
    pub same_request_within: Duration,
    /// Identical concurrent non-streaming requests from one key make one upstream call.
    pub coalesce: bool,
    /// How long the answer to a request with an `Idempotency-Key` is replayed to retries.
    #[serde(deserialize_with = "de_duration")]
    pub idempotency_ttl: Duration,
}

impl Default for RetriesConfig {
    fn default() -> Self {
        RetriesConfig {
            budget_ratio: 0.2,
            budget_min: 10,
            window: Duration::from_secs(60),
            same_request_within: Duration::from_secs(10),
            coalesce: true,
            idempotency_ttl: Duration::from_secs(600),
        }
    }
}

impl Default for LoopGuardConfig {
    fn default() -> Self {
        LoopGuardConfig {
            enabled: true,
            max_repeats: 5,
            window: Duration::from_secs(60),
            max_tool_repeats: 3,
            action: LoopAction::Reject,
        }
    }
}

/// Default limits for keys without their own (0 = unlimited). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Requests per minute per key.
    pub rpm: u64,
    /// Tokens (input + output) per minute per key: an estimate is reserved at admission and
    /// settled with the provider's count.
    pub tpm: u64,
    /// Requests in flight at once per key.
    pub concurrency: u32,
    /// Output tokens reserved for a request that sets no `max_tokens`.
    pub output_estimate: u64,
    /// The most output tokens a request may ask for (`max_tokens`, `max_completion_tokens`,
    /// `max_output_tokens`); above it the request is refused with 400 naming the field. No
    /// model writes more than a few hundred thousand tokens, and a bound keeps every hold,
    /// quote and token reservation far inside integer range.
    pub max_output_tokens: u64,
    /// Default limits per team (keys with a team share them); teams can override them.
    pub team: ScopeLimits,
    /// Where limit state lives: `local` (this process) or `redis` (shared by replicas).
    /// Needs a restart to change.
    pub backend: LimitsBackend,
    pub redis: RedisLimitsConfig,
}

/// Requests per minute, tokens per minute and requests in flight (0 = unlimited).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ScopeLimits {
    pub rpm: u64,
    pub tpm: u64,
    pub concurrency: u32,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LimitsBackend {
    #[default]
    Local,
    Redis,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisLimitsConfig {
    /// `redis://host:port/db` (or `redis://:password@host:port`).
    pub url: Option<String>,
    /// Deadline of one limiter call; a slower Redis counts as down.
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// How many replicas share the limits: a `fail_open` replica enforces 1/replicas of each.
    pub replicas: u64,
    /// A concurrency slot held by a replica that died frees after this long.
    #[serde(deserialize_with = "de_duration")]
    pub lease_ttl: Duration,
    /// After a failure, how long a replica decides locally before asking Redis again.
    #[serde(deserialize_with = "de_duration")]
    pub retry_interval: Duration,
    pub on_error: OnRedisError,
}

/// What each limit class does while Redis is unreachable.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct OnRedisError {
    pub requests: FailPolicy,
    pub tokens: FailPolicy,
    pub concurrency: FailPolicy,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailPolicy {
    /// Keep serving under this replica's share of the limit (limit / replicas).
    #[default]
    FailOpen,
    /// Refuse with 503 until Redis answers again.
    FailClosed,
}

impl Default for RedisLimitsConfig {
    fn default() -> Self {
        RedisLimitsConfig {
            url: None,
            timeout: Duration::from_millis(50),
            replicas: 1,
            lease_ttl: Duration::from_secs(900),
            retry_interval: Duration::from_secs(1),
            on_error: OnRedisError::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            rpm: 0,
            tpm: 0,
            concurrency: 0,
            output_estimate: 1024,
            max_output_tokens: 1_000_000,
            team: ScopeLimits::default(),
            backend: LimitsBackend::Local,
            redis: RedisLimitsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MeteringConfig {
    /// Usage records waiting for the writer. A full queue counts and logs what it cannot take.
    pub queue_capacity: usize,
    /// Records per write transaction at most.
    pub batch_max: usize,
    /// How long the writer gathers records before it commits them (holds never wait): one
    /// transaction per few hundred records instead of one per record at moderate load.
    /// Records are in memory meanwhile, like the queue (lost to a `kill -9`). 0 = off.
    #[serde(deserialize_with = "de_duration")]
    pub linger: Duration,
    /// Usage records older than this are deleted (hourly, and on start); the hourly and
    /// daily rollups stay, so reports over older windows still add up. 0 keeps them forever.
    #[serde(deserialize_with = "de_duration")]
    pub retain_records: Duration,
    /// What happens to a stream whose client goes away: `cancel` closes the provider's
    /// stream (generation stops; what it billed is estimated), `finish` reads it to its end
    /// in the background, bounded by the provider's timeouts and the wallet's hold, so the
    /// record carries the provider's exact usage.
    pub on_client_disconnect: OnDisconnect,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    #[default]
    Cancel,
    Finish,
}

/// Which well-known provider keys are present in the environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProviderKeys {
    pub openai: bool,
    pub anthropic: bool,
}

impl ProviderKeys {
    pub fn from_env() -> ProviderKeys {
        ProviderKeys {
            openai: std::env::var_os("OPENAI_API_KEY").is_some_and(|v| !v.is_empty()),
            anthropic: std::env::var_os("ANTHROPIC_API_KEY").is_some_and(|v| !v.is_empty()),
        }
    }
}

pub use crate::providers::ProviderKind;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Including the version path, e.g. `https://api.openai.com/v1`. Not used by `mock`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Name of the environment variable holding the provider's API key.
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "d_connect", deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    /// Until the response head (and, for streams, the first chunk) arrives.
    #[serde(default = "d_first_byte", deserialize_with = "de_duration")]
    pub first_byte_timeout: Duration,
    /// Longest silence between two chunks of a stream.
    #[serde(default = "d_idle", deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    #[serde(default = "d_total", deserialize_with = "de_duration")]
    pub total_timeout: Duration,
    /// Sent with every upstream request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Model names (`*` suffix = prefix match) this provider serves directly under their own
    /// name, without an alias in `[[models]]`.
    #[serde(default)]
    pub models: Vec<String>,
}

fn d_connect() -> Duration {
    Duration::from_secs(5)
}
fn d_first_byte() -> Duration {
    Duration::from_secs(300)
}
fn d_idle() -> Duration {
    Duration::from_secs(60)
}
fn d_total() -> Duration {
    Duration::from_secs(900)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients send as `model`.
    pub name: String,
    #[serde(default)]
    pub deployments: Vec<DeploymentConfig>,
    /// Instead of deployments: models (aliases or provider model names) tried in order, the
    /// first whose answer passes `validate` answering (`cascade.rs`, ADR 0030).
    #[serde(default)]
    pub cascade: Vec<String>,
    #[serde(default)]
    pub validate: CascadeValidate,
    /// Limits on this model across all keys.
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub concurrency: u32,
}

/// What a cascade tier's answer must pass to be returned (every check on by default).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CascadeValidate {
    /// The JSON asked for by `response_format` / `text.format`, valid against its schema.
    pub json_schema: bool,
    /// Tool calls name declared tools, with arguments valid against their schemas.
    pub tool_arguments: bool,
    /// Not stopped at the token limit.
    pub not_truncated: bool,
    /// Some text or a tool call.
    pub not_empty: bool,
    /// Not marked a refusal by the provider.
    pub not_refusal: bool,
    /// A regex (fancy-regex syntax) the answer's text must match.
    pub must_match: Option<String>,
    /// Streams too: a tier's stream is read whole and checked before the client gets a byte
    /// of it, then replayed or escalated (off: a stream takes the first tier that starts).
    pub buffer_streams: bool,
    /// Key names (`prefix*`) and teams whose streams are buffered; both empty: every key.
    pub buffer_keys: Vec<String>,
    pub buffer_teams: Vec<String>,
    /// A stream longer than this is not checked: what was read and the rest go out as they are.
    pub buffer_max_bytes: usize,
}

impl Default for CascadeValidate {
    fn default() -> Self {
        CascadeValidate {
            json_schema: true,
            tool_arguments: true,
            not_truncated: true,
            not_empty: true,
            not_refusal: true,
            must_match: None,
            buffer_streams: false,
            buffer_keys: Vec::new(),
            buffer_teams: Vec::new(),
            buffer_max_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentConfig {
    pub provider: String,
    /// The model name sent upstream; defaults to the alias.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "d_weight")]
    pub weight: u32,
    /// Lower is tried first; weights share traffic within one priority.
    #[serde(default)]
    pub priority: u32,
    /// The provider account's quota for this model: a deployment at its limit is skipped.
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub tpm: u64,
    #[serde(default)]
    pub concurrency: u32,
}

/// A tool route: a path prefix on the gateway proxied to any HTTP service (an agent's tool
/// API, an internal CRM…) behind the same virtual keys, limits, loop guard and metering.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    /// The prefix on the gateway, e.g. `/tools/crm`; it is replaced by `upstream`.
    pub path: String,
    /// e.g. `http://crm.internal:8080/api`.
    pub upstream: String,
    /// Sent upstream as `Authorization: Bearer …` (the agent's own key never is).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Sent with every upstream request.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Per key: calls per minute and calls in flight (0 = unlimited).
    #[serde(default)]
    pub rpm: u64,
    #[serde(default)]
    pub concurrency: u32,
    /// For all keys together: what the service behind can take.
    #[serde(default)]
    pub total_rpm: u64,
    #[serde(default)]
    pub total_concurrency: u32,
    /// Micro-USD charged per call the service answered (status below 500).
    #[serde(default)]
    pub price_per_call: u64,
    #[serde(default = "d_route_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// The same call (method, path, query, body) repeated `[loop_guard] max_repeats` times
    /// within the window is refused.
    #[serde(default = "d_true")]
    pub loop_guard: bool,
}

/// The MCP gateway at `/mcp` (see `mcp.rs`). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct McpConfig {
    /// `conditional`: a tool is named `server__tool` only where two servers have a tool of
    /// that name; `always`: every tool is.
    pub prefix: McpPrefix,
    /// How long a server's tool list is reused before it is asked again.
    #[serde(deserialize_with = "de_duration")]
    pub tools_ttl: Duration,
}

impl Default for McpConfig {
    fn default() -> Self {
        McpConfig {
            prefix: McpPrefix::Conditional,
            tools_ttl: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum McpPrefix {
    Conditional,
    Always,
}

/// Rules for the tool calls of the keys it names (see `policy.rs`). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolPolicyConfig {
    pub name: String,
    /// Key names (`prefix*` patterns) the policy applies to.
    #[serde(default)]
    pub keys: Vec<String>,
    /// Teams whose keys it applies to.
    #[serde(default)]
    pub teams: Vec<String>,
    /// In order; the first whose `when` is true decides. A call no rule matches is denied.
    pub rules: Vec<ToolRuleConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolRuleConfig {
    /// A CEL expression over `key`, `tool` (`name`, `server`, `args`), `surface`, `model`,
    /// `run` and `time`; it must be a bool.
    pub when: String,
    pub decision: ToolDecision,
    /// Told to the agent (and the approver) with the decision.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ToolDecision {
    Allow,
    Deny,
    RequireApproval,
}

impl ToolDecision {
    pub fn as_str(self) -> &'static str {
        match self {
            ToolDecision::Allow => "allow",
            ToolDecision::Deny => "deny",
            ToolDecision::RequireApproval => "require_approval",
        }
    }
}

/// Human approval of tool calls (`require_approval`). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApprovalsConfig {
    /// How long a pending or granted approval lasts.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
}

impl Default for ApprovalsConfig {
    fn default() -> Self {
        ApprovalsConfig {
            ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// Personal data and secrets found in what agents send (and, with `responses`, receive):
/// masked, hashed, refused or logged (`redact.rs`). Reloadable.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedactionConfig {
    /// Key names (`prefix*` patterns) it applies to. With `teams` also empty: every key.
    pub keys: Vec<String>,
    /// Teams whose keys it applies to.
    pub teams: Vec<String>,
    /// What each detector does with what it finds; a detector not named is off.
    pub detectors: std::collections::BTreeMap<crate::redact::Detector, crate::redact::Action>,
    /// Also scan model answers (JSON, and streams through a held window) and MCP tool results.
    pub responses: bool,
}

/// The exact response cache (`cache.rs`): off unless enabled, and then only for the keys,
/// teams and models it names (all of them when it names none). Reloadable; kept answers
/// survive a reload and are checked against the bounds in force when they are used.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// Key names (`prefix*` patterns) whose requests it answers.
    pub keys: Vec<String>,
    /// Teams whose keys' requests it answers.
    pub teams: Vec<String>,
    /// Models (as requested, `prefix*` patterns) it answers.
    pub models: Vec<String>,
    /// Whose answers a request may get: its own key's (`key`), or its team's (`team`; keys
    /// without a team keep their own).
    pub scope: CacheScope,
    /// How long an answer is kept.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Answers kept at once, and their bytes; the oldest go first.
    pub max_entries: usize,
    pub max_bytes: usize,
    /// Larger answers are never kept.
    pub max_entry_bytes: usize,
    /// Keep streamed answers (replayed as the same SSE events).
    pub streams: bool,
    /// Keep answers that ask for tool calls (off: an agent's tools would not run again).
    pub tool_calls: bool,
    /// What a hit costs, in micro-USD (0: nothing; above 0 it is held and captured from the
    /// key's wallet like any charge).
    pub fee_micros: u64,
    /// Where entries are kept: `memory` (this process), `redis` (the `[limits.redis]` server,
    /// shared by every replica), or `auto` (Redis when `[limits.redis] url` is set). Read at
    /// start.
    pub backend: CacheBackend,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheBackend {
    #[default]
    Auto,
    Memory,
    Redis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheScope {
    #[default]
    Key,
    Team,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            keys: Vec::new(),
            teams: Vec::new(),
            models: Vec::new(),
            scope: CacheScope::Key,
            ttl: Duration::from_secs(600),
            max_entries: 10_000,
            max_bytes: 64 << 20,
            max_entry_bytes: 1 << 20,
            streams: true,
            tool_calls: false,
            fee_micros: 0,
            backend: CacheBackend::Auto,
        }
    }
}

/// Tool-output compression (`compress.rs`): tool results in requests made smaller before
/// the provider reads them. Off unless enabled, then for the keys and teams it names (all
/// when it names none). Lossless transforms are on by default; truncation only when
/// `max_tool_tokens` is set. Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompressionConfig {
    pub enabled: bool,
    /// Key names (`prefix*` patterns) whose requests it compresses.
    pub keys: Vec<String>,
    /// Teams whose keys' requests it compresses.
    pub teams: Vec<String>,
    /// Remove terminal escape sequences (colours, cursor moves).
    pub ansi: bool,
    /// Write JSON tool results without insignificant whitespace.
    pub json: bool,
    /// Fold runs of at least this many identical lines into one and a count (0: off).
    pub min_repeats: usize,
    /// Replace a tool result identical to an earlier one in the conversation by a reference.
    pub dedupe: bool,
    /// Results shorter than this many bytes are never replaced by a reference.
    pub dedupe_min_bytes: usize,
    /// Lossy: a tool result over this many tokens keeps only its head and tail (0: never).
    pub max_tool_tokens: u64,
}

impl Default for CompressionConfig {
    fn default() -> Self {
        CompressionConfig {
            enabled: false,
            keys: Vec::new(),
            teams: Vec::new(),
            ansi: true,
            json: true,
            min_repeats: 3,
            dedupe: true,
            dedupe_min_bytes: 256,
            max_tool_tokens: 0,
        }
    }
}

/// Provider prompt-cache affinity (`promptcache.rs`, ADR 0031). Off unless enabled, then for
/// the keys and teams it names (all when it names none). Reloadable.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptCacheConfig {
    pub enabled: bool,
    pub keys: Vec<String>,
    pub teams: Vec<String>,
    /// Anthropic: add `cache_control` breakpoints to requests that have none.
    pub breakpoints: bool,
    /// The shortest prefix Anthropic caches, in tokens, unless `min_tokens_by_model` names
    /// the model (`prefix*` patterns).
    pub min_tokens: u64,
    pub min_tokens_by_model: BTreeMap<String, u64>,
    /// Breakpoints only while this share (0 to 1) of the key's recent requests reuse a
    /// prefix seen within five minutes: below ~0.28 the write premium costs more than the
    /// reads save.
    pub min_reuse: f64,
    /// OpenAI: set a stable `prompt_cache_key` per key and static prefix when absent.
    pub cache_key: bool,
    /// The OpenAI-dialect providers (by name) that take `prompt_cache_key`; empty: those whose
    /// base URL is on `openai.com` (an OpenAI-compatible server may refuse the field).
    pub cache_key_providers: Vec<String>,
    /// Send a conversation back to the deployment that served its last turn.
    pub affinity: bool,
}

impl Default for PromptCacheConfig {
    fn default() -> Self {
        PromptCacheConfig {
            enabled: false,
            keys: Vec::new(),
            teams: Vec::new(),
            breakpoints: true,
            min_tokens: 1024,
            // Anthropic's published minimums for the models whose minimum is not 1 024.
            min_tokens_by_model: [
                ("claude-haiku-4*", 4096),
                ("claude-opus-4-5*", 4096),
                ("claude-opus-4-6*", 4096),
                ("claude-sonnet-4-6*", 2048),
                ("claude-3-5-haiku*", 2048),
                ("claude-3-haiku*", 2048),
            ]
            .into_iter()
            .map(|(m, n)| (m.to_string(), n))
            .collect(),
            min_reuse: 0.28,
            cache_key: true,
            cache_key_providers: Vec::new(),
            affinity: true,
        }
    }
}

/// An upstream MCP server (Streamable HTTP) that `/mcp` multiplexes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    /// Letters, digits, `-` and `_` (no `__`): it prefixes the server's tool names.
    pub name: String,
    /// The server's MCP endpoint, e.g. `http://crm.internal:8000/mcp`.
    pub url: String,
    /// Sent upstream as `Authorization: Bearer …` (the agent's own key never is).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Micro-USD charged per `tools/call` the server answered, unless `tool_prices` names it.
    #[serde(default)]
    pub price_per_call: u64,
    #[serde(default)]
    pub tool_prices: BTreeMap<String, u64>,
    #[serde(default = "d_route_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
}

fn d_route_timeout() -> Duration {
    Duration::from_secs(30)
}

fn d_true() -> bool {
    true
}

/// Paths the gateway serves itself, which a tool route may not shadow.
pub const RESERVED_PATHS: &[&str] = &["/v1", "/admin", "/healthz", "/readyz", "/metrics", "/mcp"];

fn d_weight() -> u32 {
    1
}

/// Prices in integer micro-USD per million tokens.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// An upstream model name, or `provider/model` to price one provider's model only.
    pub model: String,
    /// Recorded with every cost computed from this price; defaults to a digest of the numbers.
    #[serde(default)]
    pub version: Option<String>,
    pub input: u64,
    #[serde(default)]
    pub cached_input: Option<u64>,
    pub output: u64,
    #[serde(default)]
    pub reasoning: Option<u64>,
    /// Prompt-cache writes with a 5-minute TTL; defaults to `input`.
    #[serde(default)]
    pub cache_write_5m: Option<u64>,
    /// Prompt-cache writes with a 1-hour TTL; defaults to `input`.
    #[serde(default)]
    pub cache_write_1h: Option<u64>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 4000)),
            data_dir: PathBuf::from("./tollgate-data"),
            max_body_bytes: 16 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            key_refresh: Duration::from_millis(250),
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(60),
            max_connections: 0,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            max_attempts: 3,
            backoff_base: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
            max_retry_wait: Duration::from_secs(5),
            cooldown_failures: 3,
            cooldown: Duration::from_secs(30),
            error_rate: 0.5,
            error_rate_min_requests: 20,
            error_rate_window: Duration::from_secs(30),
        }
    }
}

impl Default for MeteringConfig {
    fn default() -> Self {
        MeteringConfig {
            queue_capacity: 65_536,
            batch_max: 2_000,
            linger: Duration::from_millis(20),
            retain_records: Duration::ZERO,
            on_client_disconnect: OnDisconnect::Cancel,
        }
    }
}

/// Model-name patterns the automatic `anthropic` provider serves without aliases.
pub const ANTHROPIC_MODEL_PATTERNS: &[&str] = &["claude-*"];

/// Model-name patterns the automatic `openai` provider serves without aliases.
pub const OPENAI_MODEL_PATTERNS: &[&str] = &[
    "gpt-*",
    "o1*",
    "o3*",
    "o4*",
    "chatgpt-*",
    "text-embedding-*",
    "omni-moderation-*",
];

impl Config {
    /// Reads and parses a file. Parse errors name the line and the offending key.
    pub fn from_file(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Config::from_toml(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Every parse problem a file has, not just the first: each top-level section, and each
    /// element of an array of tables, is read on its own, so four typos in four places take
    /// one run to find. A TOML syntax error still stops at itself (nothing after it parses).
    pub fn parse_problems(text: &str) -> Vec<String> {
        let table: toml::Table = match toml::from_str(text) {
            Ok(t) => t,
            Err(e) => return vec![e.to_string()],
        };
        let mut problems = Vec::new();
        let mut check = |path: String, key: &str, v: toml::Value| {
            let mut one = toml::Table::new();
            one.insert(key.to_string(), v);
            if let Err(e) = Config::deserialize(toml::Value::Table(one)) {
                problems.push(format!("{path}: {}", e.message()));
            }
        };
        for (key, v) in table {
            match v {
                toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                    for (i, item) in items.into_iter().enumerate() {
                        check(format!("{key}[{i}]"), &key, toml::Value::Array(vec![item]));
                    }
                }
                v => check(key.clone(), &key, v),
            }
        }
        problems
    }

    /// Adds what a bare `tollgate serve` needs: the mock provider when nothing is configured,
    /// and an `openai` provider when `OPENAI_API_KEY` is set and none is named so.
    pub fn with_implicit_providers(mut self, keys: ProviderKeys) -> Config {
        if self.providers.is_empty() {
            self.providers.push(ProviderConfig::builtin_mock());
        }
        if keys.openai && !self.providers.iter().any(|p| p.name == "openai") {
            self.providers.push(ProviderConfig {
                name: "openai".into(),
                kind: ProviderKind::Openai,
                base_url: Some("https://api.openai.com/v1".into()),
                api_key_env: Some("OPENAI_API_KEY".into()),
                models: OPENAI_MODEL_PATTERNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ..ProviderConfig::builtin_mock()
            });
        }
        if keys.anthropic && !self.providers.iter().any(|p| p.name == "anthropic") {
            self.providers.push(ProviderConfig {
                name: "anthropic".into(),
                kind: ProviderKind::Anthropic,
                base_url: Some("https://api.anthropic.com/v1".into()),
                api_key_env: Some("ANTHROPIC_API_KEY".into()),
                models: ANTHROPIC_MODEL_PATTERNS
                    .iter()
                    .map(|s| s.to_string())
                    .collect(),
                ..ProviderConfig::builtin_mock()
            });
        }
        self
    }
}

impl ProviderConfig {
    pub fn builtin_mock() -> ProviderConfig {
        ProviderConfig {
            name: "mock".into(),
            kind: ProviderKind::Mock,
            base_url: None,
            api_key_env: None,
            connect_timeout: d_connect(),
            first_byte_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(10),
            total_timeout: d_total(),
            headers: BTreeMap::new(),
            models: vec!["mock*".into()],
        }
    }
}

/// `250ms`, `30s`, `5m`, `2h`, `30d`; a bare integer is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid duration \"{s}\" (try 500ms, 30s, 5m, 2h, 7d)"))?;
    let secs = |m: u64| n.checked_mul(m).map(Duration::from_secs);
    let d = match unit.trim() {
        "ms" => Some(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86_400),
        "w" => secs(7 * 86_400),
        _ => None,
    };
    d.ok_or_else(|| format!("invalid duration \"{s}\" (try 500ms, 30s, 5m, 2h, 7d)"))
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Secs(u64),
        Text(String),
    }
    match Raw::deserialize(d)? {
        Raw::Secs(n) => Ok(Duration::from_secs(n)),
        Raw::Text(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30d"), Ok(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert!(parse_duration("3 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn unknown_fields_are_errors_with_their_name() {
        let err =
            Config::from_toml("[server]\nlisten = \"127.0.0.1:1\"\nlistne = 3\n").unwrap_err();
        assert!(err.contains("listne"), "{err}");
    }

    #[test]
    fn validate_reports_every_problem_with_its_path() {
        let cfg = Config::from_toml(
            r#"
            [[providers]]
            name = "a"
            kind = "openai"
            [[providers]]
            name = "a"
            kind = "openai"
            base_url = "ftp://x"
            [[models]]
            name = "smart"
            deployments = [{ provider = "nope", weight = 0 }]
            "#,
        )
        .unwrap();
        let problems = cfg.validate();
        for expected in [
            "providers[0].base_url: required for kinds",
            "providers[1].name: duplicate",
            "providers[1].base_url: not an http(s) URL",
            "models[0].deployments[0].provider: unknown provider \"nope\"",
            "models[0].deployments[0].weight",
        ] {
            assert!(
                problems.iter().any(|p| p.starts_with(expected)),
                "missing {expected:?} in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), 5, "{problems:#?}");
    }

    #[test]
    fn bare_config_gets_the_mock_provider() {
        let cfg = Config::default().with_implicit_providers(ProviderKeys::default());
        assert_eq!(cfg.providers.len(), 1);
        assert_eq!(cfg.providers[0].kind, ProviderKind::Mock);
        let cfg = Config::default().with_implicit_providers(ProviderKeys {
            openai: true,
            anthropic: true,
        });
        assert!(cfg.providers.iter().any(|p| p.name == "openai"));
        assert!(cfg
            .providers
            .iter()
            .any(|p| p.name == "anthropic" && p.kind == ProviderKind::Anthropic));
        assert!(cfg.validate().is_empty());
    }
}
