//! Prometheus metrics. Labels stay low-cardinality: per-key numbers live in the usage table.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    pub provider: String,
    pub outcome: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub upstream_attempts: Family<UpstreamLabels, Counter>,
    pub request_seconds: Histogram,
    pub usage_records_queued: Counter,
    pub usage_records_written: Counter,
    pub usage_records_dropped: Counter,
    pub usage_records_shed: Counter,
    pub usage_queue_depth: Gauge,
    pub streams_cut: Counter,
    pub client_disconnects: Counter,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub limit_refusals: Family<RefusalLabels, Counter>,
    pub limiter_redis_errors: Counter,
    pub limiter_redis_seconds: Histogram,
    pub limiter_fallbacks: Family<FallbackLabels, Counter>,
    pub retries_suppressed: Family<ScopeLabels, Counter>,
    pub answers_reused: Family<ReuseLabels, Counter>,
    pub redactions: Family<RedactionLabels, Counter>,
    pub cache_lookups: Family<CacheLabels, Counter>,
    pub cache_redis_errors: Counter,
    pub analytics_queue_depth: Gauge,
    pub analytics_spill_bytes: Gauge,
    pub analytics_lag_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub analytics_records_sent: Counter,
    pub analytics_records_spilled: Counter,
    pub analytics_records_replayed: Counter,
    pub analytics_records_dropped: Counter,
    pub cascade_answers: Family<CascadeLabels, Counter>,
    pub saved_tokens: Family<SaverLabels, Counter>,
    pub saved_micros: Family<SaverLabels, Counter>,
    pub hold_seconds: Histogram,
    pub connections_open: Gauge,
    pub connections_refused: Counter,
    pub connection_timeouts: Family<ConnTimeoutLabels, Counter>,
    pub panics: Counter,
    pub attempts_billed_broken: Counter,
    pub otel_spans_exported: Counter,
    pub otel_spans_dropped: Counter,
    pub otel_export_errors: Counter,
    /// The GenAI semantic conventions' metrics, under their own names (no `tollgate_`).
    pub genai: GenAi,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnTimeoutLabels {
    /// `header`, `idle`, or `pressure` (closed idle to make room at the connection limit).
    pub reason: &'static str,
}

/// Panics anywhere in the process, counted by the panic hook (`server::install_panic_hook`).
pub static PANICS: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub scope: &'static str,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FallbackLabels {
    pub policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabels {
    pub scope: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CascadeLabels {
    pub tier: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SaverLabels {
    pub saver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RedactionLabels {
    pub detector: &'static str,
    pub action: &'static str,
    pub place: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReuseLabels {
    pub kind: &'static str,
}

/// `gen_ai.client.token.usage`'s attributes, as Prometheus labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTokenLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_token_type: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_response_model: String,
}

/// `gen_ai.client.operation.duration`'s attributes; `error_type` is empty (no label) on
/// success.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiOpLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_response_model: String,
    pub error_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiTtftLabels {
    pub gen_ai_operation_name: &'static str,
    pub gen_ai_provider_name: &'static str,
    pub gen_ai_request_model: String,
    pub gen_ai_response_model: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// One model call as the GenAI metrics see it.
pub struct GenAiCall<'a> {
    pub operation: &'static str,
    pub provider: &'static str,
    pub request_model: &'a str,
    pub response_model: &'a str,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub seconds: f64,
    /// Streams that answered: when the first event was ready for the client.
    pub first_token_seconds: Option<f64>,
    pub error_type: Option<&'a str>,
}

/// The GenAI semantic conventions' metrics (v1.36 names, ADR 0033), in Prometheus form:
/// `gen_ai.client.token.usage` is `gen_ai_client_token_usage`, and so on. Labels carry
/// operation, provider and model, never a key, run or wallet.
pub struct GenAi {
    registry: Registry,
    pub token_usage: HistogramFamily<GenAiTokenLabels>,
    pub operation_duration: HistogramFamily<GenAiOpLabels>,
    pub time_to_first_token: HistogramFamily<GenAiTtftLabels>,
    /// Model names seen as labels: a passthrough provider lets a caller choose any name,
    /// so past `MAX_MODEL_LABELS` new ones are counted as `_other`.
    models: std::sync::Mutex<std::collections::HashSet<String>>,
}

pub const MAX_MODEL_LABELS: usize = 200;

impl GenAi {
    fn new() -> GenAi {
        let mut registry = Registry::default();
        let token_usage: HistogramFamily<GenAiTokenLabels> =
            Family::new_with_constructor(|| Histogram::new((0..14).map(|i| 4f64.powi(i))));
        registry.register(
            "gen_ai_client_token_usage",
            "Number of input and output tokens used (billable), per model call",
            token_usage.clone(),
        );
        let operation_duration: HistogramFamily<GenAiOpLabels> =
            Family::new_with_constructor(|| Histogram::new((0..14).map(|i| 0.01 * 2f64.powi(i))));
        registry.register_with_unit(
            "gen_ai_client_operation_duration",
            "GenAI operation duration: a model call through the gateway, retries included",
            prometheus_client::registry::Unit::Seconds,
            operation_duration.clone(),
        );
        let time_to_first_token: HistogramFamily<GenAiTtftLabels> =
            Family::new_with_constructor(|| {
                Histogram::new([
                    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0,
                ])
            });
        registry.register_with_unit(
            "gen_ai_server_time_to_first_token",
            "Time until a stream's first event was ready for the client",
            prometheus_client::registry::Unit::Seconds,
            time_to_first_token.clone(),
        );
        GenAi {
            registry,
            token_usage,
            operation_duration,
            time_to_first_token,
            models: Default::default(),
        }
    }

    fn model_label(&self, model: &str) -> String {
        let mut seen = self.models.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains(model) {
            if seen.len() >= MAX_MODEL_LABELS {
                return "_other".into();
            }
            seen.insert(model.to_string());
        }
        model.to_string()
    }

    pub fn observe(&self, c: &GenAiCall<'_>) {
        let request_model = self.model_label(c.request_model);
        let response_model = self.model_label(c.response_model);
        for (kind, n) in [("input", c.input_tokens), ("output", c.output_tokens)] {
            self.token_usage
                .get_or_create(&GenAiTokenLabels {
                    gen_ai_operation_name: c.operation,
                    gen_ai_provider_name: c.provider,
                    gen_ai_token_type: kind,
                    gen_ai_request_model: request_model.clone(),
                    gen_ai_response_model: response_model.clone(),
                })
                .observe(n as f64);
        }
        self.operation_duration
            .get_or_create(&GenAiOpLabels {
                gen_ai_operation_name: c.operation,
                gen_ai_provider_name: c.provider,
                gen_ai_request_model: request_model.clone(),
                gen_ai_response_model: response_model.clone(),
                error_type: c.error_type.unwrap_or_default().to_string(),
            })
            .observe(c.seconds);
        if let Some(s) = c.first_token_seconds {
            self.time_to_first_token
                .get_or_create(&GenAiTtftLabels {
                    gen_ai_operation_name: c.operation,
                    gen_ai_provider_name: c.provider,
                    gen_ai_request_model: request_model,
                    gen_ai_response_model: response_model,
                })
                .observe(s);
        }
    }
}

/// Registers `metric` under `name` and hands it back.
fn reg<M: prometheus_client::registry::Metric + Clone>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    metric: M,
) -> M {
    registry.register(name, help, metric.clone());
    metric
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: &'static str,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("tollgate");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by endpoint and status",
            requests.clone(),
        );
        let upstream_attempts = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_attempts",
            "Upstream attempts, by provider and outcome",
            upstream_attempts.clone(),
        );
        let request_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
        ]);
        registry.register(
            "request_seconds",
            "Request latency until the response head",
            request_seconds.clone(),
        );
        let usage_records_queued = Counter::default();
        registry.register(
            "usage_records_queued",
            "Usage records handed to the writer",
            usage_records_queued.clone(),
        );
        let usage_records_written = Counter::default();
        registry.register(
            "usage_records_written",
            "Usage records committed to the store",
            usage_records_written.clone(),
        );
        let usage_records_dropped = Counter::default();
        registry.register(
            "usage_records_dropped",
            "Usage records that could not be queued or written (each is logged in full)",
            usage_records_dropped.clone(),
        );
        let usage_records_shed = Counter::default();
        registry.register(
            "usage_records_shed",
            "Records not written for requests refused because the ledger writer was behind (no upstream call, no money moved)",
            usage_records_shed.clone(),
        );
        let usage_queue_depth = Gauge::default();
        registry.register(
            "usage_queue_depth",
            "Usage records waiting for the writer",
            usage_queue_depth.clone(),
        );
        let streams_cut = Counter::default();
        registry.register(
            "streams_cut",
            "Streams that ended early on the upstream side",
            streams_cut.clone(),
        );
        let client_disconnects = Counter::default();
        registry.register(
            "client_disconnects",
            "Requests the client abandoned before the end",
            client_disconnects.clone(),
        );
        let config_reloads = Family::<ReloadLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Configuration reloads, by result",
            config_reloads.clone(),
        );
        let limit_refusals = reg(
            &mut registry,
            "limit_refusals",
            "Requests refused by a limit, by scope and class",
            Family::default(),
        );
        let limiter_redis_errors = reg(
            &mut registry,
            "limiter_redis_errors",
            "Limiter calls to Redis that failed or missed their deadline",
            Counter::default(),
        );
        let limiter_redis_seconds = reg(
            &mut registry,
            "limiter_redis_seconds",
            "Latency of limiter admissions in Redis",
            Histogram::new([0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25]),
        );
        let limiter_fallbacks = reg(
            &mut registry,
            "limiter_fallbacks",
            "Admissions decided without Redis, by the policy applied",
            Family::default(),
        );
        let retries_suppressed = reg(
            &mut registry,
            "retries_suppressed",
            "Retries refused or not made because a retry budget was spent, by scope",
            Family::default(),
        );
        let redactions = reg(
            &mut registry,
            "redactions",
            "Findings of the redaction detectors, by detector, action and place",
            Family::default(),
        );
        let analytics_queue_depth = reg(
            &mut registry,
            "analytics_queue_depth",
            "Usage records waiting for the ClickHouse sink",
            Gauge::default(),
        );
        let analytics_spill_bytes = reg(
            &mut registry,
            "analytics_spill_bytes",
            "Bytes of usage rows in the analytics spill file, waiting for ClickHouse",
            Gauge::default(),
        );
        let analytics_lag_seconds = reg(
            &mut registry,
            "analytics_lag_seconds",
            "Age of the oldest row the ClickHouse sink holds",
            Gauge::<f64, std::sync::atomic::AtomicU64>::default(),
        );
        let analytics_records_sent = reg(
            &mut registry,
            "analytics_records_sent",
            "Analytics rows (usage, captures, outcomes) inserted into ClickHouse",
            Counter::default(),
        );
        let analytics_records_spilled = reg(
            &mut registry,
            "analytics_records_spilled",
            "Analytics rows (usage, captures, outcomes) written to the spill file because ClickHouse failed or the queue was full",
            Counter::default(),
        );
        let analytics_records_replayed = reg(
            &mut registry,
            "analytics_records_replayed",
            "Spilled analytics rows inserted into ClickHouse once it answered again",
            Counter::default(),
        );
        let analytics_records_dropped = reg(
            &mut registry,
            "analytics_records_dropped",
            "Analytics rows not sent to ClickHouse because the spill file was full (they are in the store)",
            Counter::default(),
        );
        let cache_redis_errors = reg(
            &mut registry,
            "cache_redis_errors",
            "Response cache reads and writes in Redis that failed or missed their deadline",
            Counter::default(),
        );
        let cache_lookups = reg(
            &mut registry,
            "cache_lookups",
            "Requests the response cache applied to, by result (hit, miss, refresh, bypass)",
            Family::default(),
        );
        let cascade_answers = reg(
            &mut registry,
            "cascade_answers",
            "Cascade requests answered, by whether the first tier answered or it escalated",
            Family::default(),
        );
        let saved_tokens = reg(
            &mut registry,
            "saved_tokens",
            "Tokens requests did not spend, by what saved them",
            Family::default(),
        );
        let saved_micros = reg(
            &mut registry,
            "saved_micros",
            "Micro-USD requests did not spend, by what saved them",
            Family::default(),
        );
        let answers_reused = reg(
            &mut registry,
            "answers_reused",
            "Requests answered without an upstream call of their own, by kind",
            Family::default(),
        );
        let hold_seconds = reg(
            &mut registry,
            "hold_seconds",
            "Time to place a request's wallet hold and envelope reservations (the writer's round trip)",
            Histogram::new([0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1]),
        );
        let connections_open = reg(
            &mut registry,
            "connections_open",
            "Client connections open",
            Gauge::default(),
        );
        let connections_refused = reg(
            &mut registry,
            "connections_refused",
            "Client connections closed unserved at [server] max_connections (no idle one to close)",
            Counter::default(),
        );
        let connection_timeouts = reg(
            &mut registry,
            "connection_timeouts",
            "Client connections closed by the gateway: a head too slow, idle too long, or idle at the connection limit",
            Family::default(),
        );
        let panics = reg(
            &mut registry,
            "panics",
            "Panics caught in this process (each is logged with its location); any is a bug",
            PANICS.clone(),
        );
        let attempts_billed_broken = reg(
            &mut registry,
            "attempts_billed_broken",
            "Upstream attempts whose answer broke off after the provider accepted them, billed from an estimate",
            Counter::default(),
        );
        let otel_spans_exported = reg(
            &mut registry,
            "otel_spans_exported",
            "Spans the OTLP collector accepted",
            Counter::default(),
        );
        let otel_spans_dropped = reg(
            &mut registry,
            "otel_spans_dropped",
            "Spans not exported: the export queue was full, or the collector refused or stayed down",
            Counter::default(),
        );
        let otel_export_errors = reg(
            &mut registry,
            "otel_export_errors",
            "OTLP trace exports that failed (each retried up to twice)",
            Counter::default(),
        );
        Metrics {
            registry,
            otel_spans_exported,
            otel_spans_dropped,
            otel_export_errors,
            genai: GenAi::new(),
            attempts_billed_broken,
            connections_open,
            connections_refused,
            connection_timeouts,
            panics,
            hold_seconds,
            limit_refusals,
            limiter_redis_errors,
            limiter_redis_seconds,
            limiter_fallbacks,
            retries_suppressed,
            answers_reused,
            redactions,
            cache_lookups,
            cache_redis_errors,
            analytics_queue_depth,
            analytics_spill_bytes,
            analytics_lag_seconds,
            analytics_records_sent,
            analytics_records_spilled,
            analytics_records_replayed,
            analytics_records_dropped,
            cascade_answers,
            saved_tokens,
            saved_micros,
            requests,
            upstream_attempts,
            request_seconds,
            usage_records_queued,
            usage_records_written,
            usage_records_dropped,
            usage_records_shed,
            usage_queue_depth,
            streams_cut,
            client_disconnects,
            config_reloads,
        }
    }

    pub fn count_cache(&self, result: &'static str) {
        self.cache_lookups
            .get_or_create(&CacheLabels { result })
            .inc();
    }

    pub fn count_cascade(&self, tier: &'static str) {
        self.cascade_answers
            .get_or_create(&CascadeLabels { tier })
            .inc();
    }

    pub fn count_savings(&self, savings: &[crate::records::Saving]) {
        for s in savings {
            let labels = SaverLabels {
                saver: s.saver.clone(),
            };
            self.saved_tokens.get_or_create(&labels).inc_by(s.tokens);
            self.saved_micros.get_or_create(&labels).inc_by(s.micros);
        }
    }

    pub fn count_redactions(&self, found: &[crate::records::Redacted]) {
        for r in found {
            self.redactions
                .get_or_create(&RedactionLabels {
                    detector: r.detector.as_str(),
                    action: r.action.as_str(),
                    place: r.place.clone(),
                })
                .inc_by(r.count);
        }
    }

    pub fn encode(&self) -> String {
        use prometheus_client::encoding::text::{encode_eof, encode_registry};
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry);
        let _ = encode_registry(&mut out, &self.genai.registry);
        let _ = encode_eof(&mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
