//! The gateway's state: what every request reads (`AppState`, with the current `Runtime`),
//! and the two ways it changes under traffic: a config reload and a key-cache refresh.

use crate::config::{Config, ProviderKeys, ProviderKind, ServerConfig};
use crate::keys::{KeyCache, ServerSecret};
use crate::metering::Meter;
use crate::metrics::{Metrics, ReloadLabels};
use crate::store::Store;
use crate::upstream::{HealthRegistry, Runtime};
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub struct AppState {
    pub runtime: ArcSwap<Runtime>,
    pub keys: KeyCache,
    pub secret: ServerSecret,
    pub store: Arc<Store>,
    pub meter: Meter,
    /// Hot wallets: holds decided in Redis (`[wallets] backend`).
    pub hot: Option<Arc<crate::hotwallet::HotWallets>>,
    pub metrics: Arc<Metrics>,
    /// Settings that need a restart to change.
    pub server: ServerConfig,
    /// As started (changing the store needs a restart).
    pub store_config: crate::config::StoreConfig,
    /// The dashboard's settings (`[ui]`, static).
    pub ui: crate::config::UiConfig,
    pub config_path: Option<PathBuf>,
    pub(crate) provider_keys: ProviderKeys,
    pub(crate) mock_url: Option<String>,
    pub(crate) health: Arc<HealthRegistry>,
    pub shutting_down: AtomicBool,
    pub limiter: crate::limits::Limiter,
    pub loop_guard: crate::loopguard::LoopGuard,
    pub damper: crate::damping::Damper,
    /// The exact response cache (`[cache]`).
    pub cache: crate::cache::ResponseCache,
    /// Usage analytics in ClickHouse (`[analytics]`), when configured.
    pub analytics: Option<Arc<crate::analytics::Analytics>>,
    /// What provider prompt-cache affinity remembers (`[prompt_cache]`).
    pub prompt_caches: crate::promptcache::PromptCaches,
    /// `<store>.gateways`, locked while this gateway serves (`holdbook::lock_store`).
    pub(crate) _store_lock: Option<std::fs::File>,
    /// Stops the WAL checkpointer when the gateway goes away.
    pub(crate) _checkpointer: StopOnDrop,
}

pub(crate) struct StopOnDrop(pub(crate) Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Reloads providers, models, prices and routing from the config file. In-flight requests
/// keep the version they started with.
pub fn reload(app: &AppState) -> Result<(), Vec<String>> {
    let result = (|| {
        let path = app
            .config_path
            .as_ref()
            .ok_or_else(|| vec!["no --config file to reload from".to_string()])?;
        let cfg = Config::from_file(path)
            .map_err(|e| vec![e])?
            .with_implicit_providers(app.provider_keys);
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(problems);
        }
        if cfg.providers.iter().any(|p| p.kind == ProviderKind::Mock) && app.mock_url.is_none() {
            return Err(vec![
                "a mock provider was added: that needs a restart".to_string()
            ]);
        }
        if cfg.server.listen != app.server.listen || cfg.server.data_dir != app.server.data_dir {
            tracing::warn!("[server] changes need a restart; they were not applied");
        }
        if cfg.store != app.store_config {
            tracing::warn!("[store] changes need a restart; they were not applied");
        }
        let runtime = Runtime::build(&cfg, app.mock_url.as_deref(), app.health.clone())
            .map_err(|e| vec![e.to_string()])?;
        app.runtime.store(Arc::new(runtime));
        Ok(())
    })();
    let label = if result.is_ok() { "ok" } else { "error" };
    app.metrics
        .config_reloads
        .get_or_create(&ReloadLabels { result: label })
        .inc();
    match &result {
        Ok(()) => tracing::info!("configuration reloaded"),
        Err(p) => {
            tracing::error!(problems = ?p, "configuration reload failed; keeping the running configuration")
        }
    }
    result
}

/// Reloads the key cache from the store if its revision moved.
pub async fn refresh_keys(app: &Arc<AppState>) -> anyhow::Result<()> {
    let store = app.store.clone();
    let known = app.keys.rev();
    let loaded = tokio::task::spawn_blocking(
        move || -> anyhow::Result<Option<crate::store::KeySnapshot>> {
            if store.keys_rev()? == known {
                return Ok(None);
            }
            Ok(Some(store.load_keys()?))
        },
    )
    .await??;
    if let Some(snap) = loaded {
        let (rev, n) = (snap.rev, snap.keys.len());
        app.keys.replace(snap);
        tracing::debug!(rev, keys = n, "key cache refreshed");
    }
    Ok(())
}
