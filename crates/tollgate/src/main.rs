//! The `tollgate` command.

mod cli;

use cli::*;

use anyhow::Context as _;
use clap::Parser;
use tollgate::admin;
use tollgate::config::Config;
use tollgate::server::{Gateway, ServeOptions};
use tollgate::store::Store;

/// mimalloc, not glibc's malloc: under load glibc's took a fifth of the gateway's CPU, much of
/// it freeing on the writer thread what the workers allocated (bench/RESULTS.md, run J).
/// Without the feature the system allocator is used, which heap profilers (valgrind's massif,
/// bench/heap.sh) can see.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log redirected to a file or a collector gets none.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    match cli.cmd {
        Cmd::Serve(args) => serve(args).await?,
        Cmd::CheckConfig { config } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let parse = Config::parse_problems(&text);
            if !parse.is_empty() {
                for p in &parse {
                    println!("{}: {p}", config.display());
                }
                return Ok(std::process::ExitCode::FAILURE);
            }
            let cfg = Config::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?
                .with_implicit_providers(tollgate::config::ProviderKeys::from_env());
            let problems = cfg.validate();
            for w in cfg.env_warnings() {
                println!("{}: warning: {w}", config.display());
            }
            if problems.is_empty() {
                println!("{}: ok", config.display());
            } else {
                for p in &problems {
                    println!("{}: {p}", config.display());
                }
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        Cmd::Keys { cmd, target } => keys(cmd, target).await?,
        Cmd::Teams { cmd, target } => teams(cmd, target).await?,
        Cmd::Approvals { cmd, target } => approvals(cmd, target).await?,
        Cmd::Audit { cmd, target } => audit(cmd, target).await?,
        Cmd::Budget { cmd, target } => budget(cmd, target).await?,
        Cmd::Run { id, target } => {
            let backend = Backend::new(&target)?;
            let report: serde_json::Value = match &backend {
                Backend::Local { store, .. } => admin::run_report(store, &id)?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::GET,
                            &format!("/admin/runs/{}", urlencode(&id)),
                            None,
                        )
                        .await?
                }
            };
            println!("{}", serde_json::to_string_pretty(&report)?);
        }
        Cmd::Wallet { cmd, target } => return wallet(cmd, target).await,
        Cmd::Usage(args) => usage(args).await?,
        Cmd::Logs(args) => logs(args).await?,
        Cmd::Roi { by, since, target } => roi(by, since, target).await?,
        Cmd::Savings { by, since, target } => savings(by, since, target).await?,
        Cmd::Export { cmd, target } => export(cmd, target).await?,
        Cmd::Reconcile {
            provider,
            since,
            until,
            threshold,
            target,
        } => return reconcile(provider, since, until, threshold, target).await,
        Cmd::Migrate { store, config } => {
            let location = store.location();
            let store = tokio::task::spawn_blocking(move || Store::open_at(&location)).await??;
            println!(
                "{}: schema at version {}",
                store.location().describe(),
                store.schema_version()?
            );
            let cfg = match &config {
                Some(p) => tollgate::config::Config::from_file(p).map_err(anyhow::Error::msg)?,
                None => tollgate::config::Config::default(),
            };
            if cfg.analytics.backend == tollgate::config::AnalyticsBackend::Clickhouse {
                let ch = tollgate::analytics::ClickHouse::new(&cfg.analytics)?;
                let v = ch.migrate().await.map_err(anyhow::Error::msg)?;
                println!("clickhouse {}: schema at version {v}", ch.database());
            }
        }
        Cmd::Backfill {
            store,
            config,
            since,
            until,
        } => {
            let cfg = tollgate::config::Config::from_file(&config).map_err(anyhow::Error::msg)?;
            if cfg.analytics.backend != tollgate::config::AnalyticsBackend::Clickhouse {
                anyhow::bail!(
                    "{}: [analytics] backend is not \"clickhouse\"; nothing to backfill",
                    config.display()
                );
            }
            let since =
                tollgate::ops::time_ms("since", &since).map_err(|e| anyhow::anyhow!("{e}"))?;
            let until = until
                .map(|u| tollgate::ops::time_ms("until", &u))
                .transpose()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let location = store.location();
            let store = tokio::task::spawn_blocking(move || Store::open_at(&location)).await??;
            let ch = tollgate::analytics::ClickHouse::new(&cfg.analytics)?;
            ch.migrate().await.map_err(anyhow::Error::msg)?;
            let (read, inserted) = ch
                .backfill(&store, since, until)
                .await
                .map_err(anyhow::Error::msg)?;
            println!(
                "clickhouse {}: {read} rows in the store's range (records, their captures, outcomes), {inserted} sent, {} already there",
                ch.database(),
                read - inserted
            );
        }
        Cmd::MockProvider { listen, api_key } => {
            let l = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            eprintln!("mock provider listening on http://{}/v1", l.local_addr()?);
            tollgate::mock::serve(l, api_key).await?;
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path).map_err(anyhow::Error::msg)?,
        None => Config::default(),
    };
    if let Some(l) = args.listen {
        config.server.listen = l;
    }
    if let Some(d) = args.data_dir {
        config.server.data_dir = d;
    }
    if let Some(u) = args.store_url {
        config.store.url = Some(u);
    }
    let gw = Gateway::start(ServeOptions {
        config,
        config_path: args.config,
        listener: None,
        admin_key: std::env::var("TOLLGATE_ADMIN_KEY").ok(),
        secret: std::env::var("TOLLGATE_SECRET").ok(),
        provider_keys: tollgate::config::ProviderKeys::from_env(),
    })
    .await?;
    if let Some(k) = &gw.generated_admin_key {
        println!("Admin key (shown once; keep it, or set TOLLGATE_ADMIN_KEY next time):\n  {k}");
    }
    let models: Vec<String> = gw
        .app
        .runtime
        .load()
        .model_names()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    tracing::info!(addr = %gw.addr, data_dir = %gw.app.server.data_dir.display(), models = %models.join(","), "tollgate listening");
    let app = gw.app.clone();
    gw.run_until(tollgate::server::shutdown_signal(app)).await
}
