//! The gateway process: state, router, background tasks, reload and graceful shutdown.

use crate::config::{Config, ProviderKeys, ProviderKind};
use crate::error::{ApiError, ErrorKind};
use crate::keys::{KeyCache, ServerSecret};
use crate::metering::Meter;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::{HealthRegistry, Runtime};
use crate::{admin, mock, proxy};
use anyhow::Context as _;
use arc_swap::ArcSwap;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use crate::state::{refresh_keys, reload, AppState};

/// How to start a gateway. `tollgate serve` fills it from flags and the environment; tests
/// fill it directly, which keeps process-global state out of them.
pub struct ServeOptions {
    pub config: Config,
    pub config_path: Option<PathBuf>,
    /// Bind here instead of `config.server.listen` (tests pass `127.0.0.1:0`).
    pub listener: Option<tokio::net::TcpListener>,
    /// `TOLLGATE_ADMIN_KEY`: registered as an admin key if the store does not know it.
    pub admin_key: Option<String>,
    /// `TOLLGATE_SECRET`: overrides `<data_dir>/secret`.
    pub secret: Option<String>,
    /// Which of OPENAI_API_KEY / ANTHROPIC_API_KEY are set (implicit providers).
    pub provider_keys: ProviderKeys,
}

pub struct Gateway {
    pub app: Arc<AppState>,
    pub addr: SocketAddr,
    /// An admin key generated on this first start, to be shown once.
    pub generated_admin_key: Option<String>,
    listener: tokio::net::TcpListener,
}

/// Logs every panic with its location through the log (instead of bare stderr) and counts
/// it in `tollgate_panics_total`. Installed once per process, by the first gateway.
pub fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            crate::metrics::PANICS.inc();
            // No log set up (a library user, a test binary): the default hook says it.
            if !tracing::dispatcher::has_been_set() {
                return default(info);
            }
            let location = info
                .location()
                .map(|l| format!("{}:{}", l.file(), l.line()))
                .unwrap_or_default();
            let message = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let backtrace = std::backtrace::Backtrace::capture();
            tracing::error!(%location, %message, %backtrace, "panic");
        }));
    });
}

pub use crate::tls::init_tls;

impl Gateway {
    pub async fn start(opts: ServeOptions) -> anyhow::Result<Gateway> {
        init_tls();
        install_panic_hook();
        // Off the request path, and finished before the listener is up (see `warm_up`).
        let warm = tokio::task::spawn_blocking(crate::estimate::warm_up);
        let config = opts.config.with_implicit_providers(opts.provider_keys);
        let problems = config.validate();
        if !problems.is_empty() {
            anyhow::bail!("invalid configuration:\n  {}", problems.join("\n  "));
        }
        let data_dir = config.server.data_dir.clone();
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let location = crate::db::Location::from_config(config.store.url.as_deref(), &data_dir);
        let opened = {
            let location = location.clone();
            // A PostgreSQL store blocks while it connects and migrates.
            tokio::task::spawn_blocking(move || Store::open_at(&location)).await?
        };
        let store = Arc::new(
            opened.with_context(|| format!("opening the store at {}", location.describe()))?,
        );
        let secret =
            ServerSecret::load(&data_dir, opts.secret).context("loading the server secret")?;
        let stop_checkpoints = Arc::new(AtomicBool::new(false));
        crate::store::start_checkpointer(
            &location,
            std::time::Duration::from_millis(500),
            stop_checkpoints.clone(),
        )
        .context("starting the WAL checkpointer")?;
        let metrics = Arc::new(Metrics::new());
        let cache = if config.cache_in_redis() {
            let r = &config.limits.redis;
            let url = r
                .url
                .as_deref()
                .context("[cache] in redis needs [limits.redis] url")?;
            crate::cache::ResponseCache::in_redis(url, r.timeout, r.retry_interval, metrics.clone())
                .context("setting up the response cache in redis")?
        } else {
            crate::cache::ResponseCache::in_memory()
        };
        let (hot, acks) = if config.hot_wallets() {
            let url = config
                .limits
                .redis
                .url
                .as_deref()
                .context("hot wallets need [limits.redis] url")?;
            let hot = Arc::new(
                crate::hotwallet::HotWallets::new(url, config.wallets.hold_timeout, store.clone())
                    .context("setting up hot wallets in redis")?,
            );
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(crate::hotwallet::run_acks(hot.clone(), rx));
            tokio::spawn(crate::hotwallet::run_reconciler(
                Arc::downgrade(&hot),
                config.wallets.reconcile_interval,
            ));
            (Some(hot), Some(tx))
        } else {
            (None, None)
        };
        let analytics = match config.analytics.backend {
            crate::config::AnalyticsBackend::Clickhouse => Some(Arc::new(
                crate::analytics::Analytics::start(&config.analytics, &data_dir, metrics.clone())
                    .await
                    .context("setting up clickhouse analytics")?,
            )),
            crate::config::AnalyticsBackend::Store => None,
        };
        let in_memory = config.wallets.backend == crate::config::WalletsBackend::Memory;
        let store_lock = crate::holdbook::lock_store(&location, in_memory)?;
        let mut meter = Meter::start(
            &location,
            in_memory,
            config.metering.queue_capacity,
            config.metering.batch_max,
            config.metering.linger,
            metrics.clone(),
            acks,
            analytics.as_ref().map(|a| a.sink.clone()),
        )
        .context("starting the usage writer")?;
        let counters = crate::otel::Counters {
            exported: metrics.otel_spans_exported.clone(),
            dropped: metrics.otel_spans_dropped.clone(),
            errors: metrics.otel_export_errors.clone(),
        };
        meter.tracer = crate::otel::Tracer::start(&config.otel, counters)
            .context("setting up OpenTelemetry")?
            .map(Arc::new);

        let mock_url = if config
            .providers
            .iter()
            .any(|p| p.kind == ProviderKind::Mock)
        {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .context("binding the built-in mock provider")?;
            let url = format!("http://{}/v1", l.local_addr()?);
            tokio::spawn(async move {
                if let Err(e) = mock::serve(l, None).await {
                    tracing::error!(error = %e, "built-in mock provider stopped");
                }
            });
            Some(url)
        } else {
            None
        };
        let limiter = match config.limits.backend {
            crate::config::LimitsBackend::Local => crate::limits::Limiter::default(),
            crate::config::LimitsBackend::Redis => crate::limits::Limiter::Redis(
                crate::limits::redis::RedisLimiter::new(&config.limits.redis, metrics.clone())
                    .context("setting up the redis limiter")?,
            ),
        };
        let health = Arc::new(HealthRegistry::default());
        let runtime = Runtime::build(&config, mock_url.as_deref(), health.clone())?;

        let generated_admin_key = {
            let store = store.clone();
            let secret = secret.clone();
            let admin_key = opts.admin_key;
            tokio::task::spawn_blocking(move || {
                admin::bootstrap_admin_key(&store, &secret, admin_key.as_deref())
            })
            .await??
        };

        let listener = match opts.listener {
            Some(l) => l,
            None => tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("binding {}", config.server.listen))?,
        };
        let addr = listener.local_addr()?;
        let app = Arc::new(AppState {
            runtime: ArcSwap::from_pointee(runtime),
            keys: KeyCache::new(),
            secret,
            store,
            meter,
            hot,
            metrics,
            server: config.server.clone(),
            store_config: config.store.clone(),
            ui: config.ui.clone(),
            config_path: opts.config_path,
            provider_keys: opts.provider_keys,
            mock_url,
            health,
            shutting_down: AtomicBool::new(false),
            limiter,
            loop_guard: crate::loopguard::LoopGuard::default(),
            damper: crate::damping::Damper::default(),
            cache,
            analytics,
            prompt_caches: crate::promptcache::PromptCaches::default(),
            _checkpointer: crate::state::StopOnDrop(stop_checkpoints),
            _store_lock: store_lock,
        });
        refresh_keys(&app).await.context("loading keys")?;
        let _ = warm.await;
        tokio::spawn(poll_keys(Arc::downgrade(&app)));
        tokio::spawn(sweep_wallets(Arc::downgrade(&app)));
        if !config.reconcile.providers.is_empty() {
            tokio::spawn(reconcile_on_schedule(
                Arc::downgrade(&app),
                config.reconcile.clone(),
            ));
        }
        if !config.metering.retain_records.is_zero() {
            tokio::spawn(prune_records(
                Arc::downgrade(&app),
                config.metering.retain_records,
            ));
        }
        tokio::spawn(crate::webhooks::deliver(Arc::downgrade(&app)));
        Ok(Gateway {
            app,
            addr,
            generated_admin_key,
            listener,
        })
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, lets in-flight requests
    /// and streams finish (up to `shutdown_grace`), and commits every queued usage record.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = self.app.clone();
        let router = router(app.clone());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let limits = crate::conn::Limits::from_config(&app.server);
        let mut server_task = tokio::spawn(crate::conn::serve(
            self.listener,
            router,
            limits,
            app.metrics.clone(),
            stop_rx,
        ));
        tokio::select! {
            res = &mut server_task => {
                res?;
                return Ok(());
            }
            _ = shutdown => {}
        }
        tracing::info!("shutting down: draining in-flight requests");
        app.shutting_down.store(true, Ordering::SeqCst);
        let _ = stop_tx.send(true);
        match tokio::time::timeout(app.server.shutdown_grace, &mut server_task).await {
            Ok(res) => res?,
            Err(_) => {
                tracing::warn!(grace = ?app.server.shutdown_grace, "requests still in flight after the grace period; stopping anyway");
                server_task.abort();
            }
        }
        // A store that is down must not keep the process from exiting: wait as long again
        // as the grace period, then say what is lost.
        match tokio::time::timeout(app.server.shutdown_grace, app.meter.flush()).await {
            Ok(()) => tracing::info!("usage records flushed; bye"),
            Err(_) => {
                tracing::error!(
                    "the store did not take the last usage records within the grace period; exiting without them"
                );
            }
        }
        if let Some(t) = &app.meter.tracer {
            if !t.flush(app.server.shutdown_grace).await {
                tracing::warn!("the last spans were not exported within the grace period");
            }
        }
        // What ClickHouse did not take goes to the spill file, replayed on the next start.
        if let Some(a) = &app.analytics {
            if !a.sink.flush(app.server.shutdown_grace).await {
                tracing::warn!("the analytics sink did not finish within the grace period");
            }
        }
        Ok(())
    }
}

pub fn router(app: Arc<AppState>) -> Router {
    let mut r = Router::new();
    for endpoint in proxy::Endpoint::ALL {
        r = r.route(
            endpoint.path(),
            post(
                move |axum::extract::State(app): axum::extract::State<Arc<AppState>>,
                      req: axum::extract::Request| {
                    proxy::model_call(app, endpoint, req)
                },
            ),
        );
    }
    if app.ui.enabled {
        r = r
            .nest("/ui", crate::ui::router())
            .route("/ui/", get(|| async { crate::ui::see_other("/ui") }));
    }
    r.route("/v1/models", get(proxy::list_models))
        .route("/v1/models/{*id}", get(proxy::get_model))
        .route("/v1/quote", post(proxy::quote_handler))
        .route("/v1/outcomes", post(admin::outcomes_h))
        .route("/mcp", axum::routing::any(crate::mcp::handle))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .nest("/admin", admin::router())
        .fallback(crate::routes::fallback)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn(errors_in_dialect))
        .with_state(app)
}

/// Every error leaves in the caller's dialect, whoever produced it: a handler that panicked
/// answers 500 (its `Settlement` still writes the record while unwinding) instead of
/// dropping the connection, and the framework's own plain-text rejections (a query string
/// that does not parse, a path that is not UTF-8, a body over the extractor's limit) are
/// rewritten with their status kept. Answers passed through from a tool service are left
/// alone.
async fn errors_in_dialect(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    use futures_util::FutureExt as _;
    let dialect = crate::error::dialect_for_path(req.uri().path());
    let resp =
        match std::panic::AssertUnwindSafe(next.run(req))
            .catch_unwind()
            .await
        {
            Ok(r) => r,
            Err(_) => return ApiError::new(
                ErrorKind::Internal,
                "the gateway hit an internal error on this request (logged); it was not retried",
            )
            .into_dialect_response(dialect),
        };
    let mut resp = resp;
    let status = resp.status();
    // Refused before its body was read: the rest of the body is still on the wire, so the
    // connection cannot carry another request. Saying so keeps clients from reusing it (a
    // pooled connection reused here fails the *next* request).
    if matches!(status.as_u16(), 408 | 413) {
        resp.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    let ours = resp.extensions().get::<ErrorKind>().is_some()
        || resp
            .extensions()
            .get::<crate::error::Passthrough>()
            .is_some();
    let json = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if status.as_u16() < 400 || ours || json {
        return resp;
    }
    let resp_connection = resp.headers().get(http::header::CONNECTION).cloned();
    let text = axum::body::to_bytes(resp.into_body(), 16 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let (kind, status) = match status.as_u16() {
        413 => (ErrorKind::BodyTooLarge, status),
        404 => (ErrorKind::NotFound, status),
        405 => (ErrorKind::MethodNotAllowed, status),
        // axum says 422 for a body of the wrong shape, 415 for a missing content type:
        // both are a malformed request here.
        422 | 415 | 400 => (ErrorKind::BadRequest, http::StatusCode::BAD_REQUEST),
        s if s >= 500 => (ErrorKind::Internal, status),
        _ => (ErrorKind::BadRequest, status),
    };
    let message = if text.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_string()
    } else {
        text.trim().to_string()
    };
    let mut e = ApiError::new(kind, message);
    e.status = Some(status);
    let mut out = e.into_dialect_response(dialect);
    if let Some(close) = resp_connection {
        out.headers_mut().insert(http::header::CONNECTION, close);
    }
    out
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> Response {
    if app.shutting_down.load(Ordering::SeqCst) {
        return (http::StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    "ready\n".into_response()
}

async fn metrics(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> Response {
    (
        [(
            http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

async fn method_not_allowed(method: http::Method, uri: http::Uri) -> Response {
    ApiError::new(
        ErrorKind::MethodNotAllowed,
        format!("{method} is not allowed on {}", uri.path()),
    )
    .into_dialect_response(crate::error::dialect_for_path(uri.path()))
}

/// Picks up keys created or revoked by other processes sharing the store.
async fn poll_keys(app: std::sync::Weak<AppState>) {
    let mut failing = false;
    loop {
        let Some(strong) = app.upgrade() else { return };
        let every = strong.server.key_refresh;
        // Once per outage: the poll runs four times a second.
        match refresh_keys(&strong).await {
            Err(e) if !failing => {
                tracing::warn!(error = %e, "key refresh failing; serving the cached keys until the store answers");
                failing = true;
            }
            Err(e) => tracing::debug!(error = %e, "key refresh still failing"),
            Ok(()) if failing => {
                tracing::info!("key refresh works again");
                failing = false;
            }
            Ok(()) => {}
        }
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

/// Releases expired holds (a gateway that died mid-request never freezes money) and expires
/// grants; the first sweep runs at start, which is what recovers from a crash.
async fn sweep_wallets(app: std::sync::Weak<AppState>) {
    loop {
        let Some(strong) = app.upgrade() else { return };
        let every = strong.runtime.load().wallets.sweep_interval;
        match strong.meter.sweep().await {
            Ok((holds, grants)) if holds + grants > 0 => {
                tracing::info!(holds, grants, "released expired holds / expired grants")
            }
            Err(e) => tracing::warn!(error = %e, "wallet sweep failed; retrying"),
            _ => {}
        }
        drop(strong);
        tokio::time::sleep(every).await;
    }
}

/// `[reconcile]`: every `every`, each provider's window against its usage report; a drift
/// past the threshold is logged and sent as a `reconcile.drift` webhook (once per provider
/// and drifting content).
async fn reconcile_on_schedule(
    app: std::sync::Weak<AppState>,
    cfg: crate::config::ReconcileConfig,
) {
    loop {
        tokio::time::sleep(cfg.every).await;
        let Some(app) = app.upgrade() else { return };
        let window = format!("{}s", cfg.window.as_secs().max(1));
        for provider in &cfg.providers {
            match crate::admin::reconcile_provider(
                &app,
                provider,
                Some(&window),
                None,
                Some(cfg.threshold_pct),
            )
            .await
            {
                Ok(r) if !r.ok => {
                    let drifting: Vec<_> = r
                        .rows
                        .iter()
                        .filter(|d| d.drift != 0 && d.drift_pct.abs() > r.threshold_pct)
                        .collect();
                    tracing::warn!(provider = %provider, rows = drifting.len(), "usage drifts from the provider's report");
                    let digest = crate::damping::fingerprint(&[serde_json::to_string(&drifting)
                        .unwrap_or_default()
                        .as_bytes()]);
                    let data = serde_json::json!({"provider": provider, "threshold_pct": r.threshold_pct, "rows": drifting});
                    let store = app.store.clone();
                    let id = format!("reconcile:{provider}:{digest:x}");
                    let _ = tokio::task::spawn_blocking(move || {
                        store.enqueue_event(&id, "reconcile.drift", data, crate::clock::now_ms())
                    })
                    .await;
                }
                Ok(_) => {
                    tracing::debug!(provider = %provider, "no drift from the provider's report")
                }
                Err(e) => {
                    tracing::warn!(provider = %provider, error = %e.message, "reconciliation failed; will retry")
                }
            }
        }
    }
}

/// `[metering] retain_records`: on start and hourly, records past the retention go (their
/// rollups stay).
async fn prune_records(app: std::sync::Weak<AppState>, retain: std::time::Duration) {
    loop {
        let Some(strong) = app.upgrade() else { return };
        let before = crate::clock::now_ms().saturating_sub(retain.as_millis() as i64);
        let store = strong.store.clone();
        drop(strong);
        match tokio::task::spawn_blocking(move || store.prune_records(before)).await {
            Ok(Ok(n)) if n > 0 => tracing::info!(
                deleted = n,
                "pruned usage records past [metering] retain_records"
            ),
            Ok(Err(e)) => tracing::warn!(error = %e, "pruning usage records failed; will retry"),
            _ => {}
        }
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}

/// Resolves on SIGTERM or Ctrl-C. SIGHUP reloads the configuration meanwhile.
pub async fn shutdown_signal(app: Arc<AppState>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut hup)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::hangup()),
        ) else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = tokio::signal::ctrl_c() => return,
                _ = hup.recv() => {
                    let app = app.clone();
                    let _ = tokio::task::spawn_blocking(move || reload(&app)).await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = app;
        let _ = tokio::signal::ctrl_c().await;
    }
}
