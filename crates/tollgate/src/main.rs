//! The `tollgate` command.

use anyhow::{bail, Context as _};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use tollgate::admin::{self, CreatedKey, KeyView, NewKey};
use tollgate::config::{parse_duration, Config};
use tollgate::keys::KeyLimits;
use tollgate::keys::ServerSecret;
use tollgate::server::{Gateway, ServeOptions};
use tollgate::store::{ReportRow, Store, TeamRecord};

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An AI agent gateway: virtual keys, routing across providers, exact usage metering."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the gateway. With no flags: 127.0.0.1:4000, data in ./tollgate-data, the built-in
    /// mock provider, and an `openai` provider if OPENAI_API_KEY is set.
    Serve(ServeArgs),
    /// Check a configuration file and print every problem with its path.
    CheckConfig {
        #[arg(long, short, env = "TOLLGATE_CONFIG", default_value = "tollgate.toml")]
        config: PathBuf,
    },
    /// Create, list, revoke and rotate virtual keys.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Prepaid wallets and their ledger.
    Wallet {
        #[command(subcommand)]
        cmd: WalletCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Spending budgets per key, team or org (daily, weekly, monthly, lifetime).
    Budget {
        #[command(subcommand)]
        cmd: BudgetCmd,
        #[command(flatten)]
        target: Target,
    },
    /// What an agent run (x-tollgate-run) spent, by model and sub-run.
    Run {
        /// The run id the agent sent.
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Teams and their limit overrides.
    Teams {
        #[command(subcommand)]
        cmd: TeamsCmd,
        #[command(flatten)]
        target: Target,
    },
    /// Requests, tokens and spend, grouped.
    Usage(UsageArgs),
    /// Create or upgrade the store's schema, then exit (`serve` also does this on start).
    Migrate {
        #[arg(long, env = "TOLLGATE_DATA_DIR", default_value = "./tollgate-data")]
        data_dir: PathBuf,
        /// A PostgreSQL store, e.g. postgres://tollgate:secret@db:5432/tollgate (else SQLite
        /// in the data directory).
        #[arg(long, env = "TOLLGATE_STORE_URL", hide_env_values = true)]
        store_url: Option<String>,
    },
    /// Run the mock provider alone (for benchmarks and experiments).
    MockProvider {
        #[arg(long, default_value = "127.0.0.1:4010")]
        listen: SocketAddr,
        /// Require this bearer key from callers.
        #[arg(long)]
        api_key: Option<String>,
    },
}

#[derive(Args)]
struct ServeArgs {
    /// Configuration file. Without one, embedded defaults are used.
    #[arg(long, short, env = "TOLLGATE_CONFIG")]
    config: Option<PathBuf>,
    /// Overrides [server] listen.
    #[arg(long, env = "TOLLGATE_LISTEN")]
    listen: Option<SocketAddr>,
    /// Overrides [server] data_dir.
    #[arg(long, env = "TOLLGATE_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Overrides [store] url: postgres://user:password@host:5432/db.
    #[arg(long, env = "TOLLGATE_STORE_URL", hide_env_values = true)]
    store_url: Option<String>,
}

/// Where management commands act: the data directory, or a running gateway.
#[derive(Args)]
struct Target {
    /// Data directory of the gateway (used unless --url is given).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_DATA_DIR",
        default_value = "./tollgate-data"
    )]
    data_dir: PathBuf,
    /// The gateway's PostgreSQL store, when it has one (else SQLite in the data directory).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_STORE_URL",
        hide_env_values = true
    )]
    store_url: Option<String>,
    /// A running gateway's base URL, e.g. http://127.0.0.1:4000 (needs --admin-key).
    #[arg(long, global = true, env = "TOLLGATE_URL")]
    url: Option<String>,
    /// The admin key, for --url.
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_ADMIN_KEY",
        hide_env_values = true
    )]
    admin_key: Option<String>,
    #[arg(long, global = true, value_enum, default_value = "table")]
    format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Create a key and print its secret once.
    Create {
        /// The agent this key belongs to.
        #[arg(long)]
        name: String,
        #[arg(long)]
        team: Option<String>,
        /// The organisation, whose wallet the key draws on without a key or team wallet.
        #[arg(long)]
        org: Option<String>,
        #[arg(long)]
        project: Option<String>,
        /// Allowed models, comma-separated; `prefix*` matches by prefix. Default: all.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// Lifetime, e.g. 30d, 12h.
        #[arg(long)]
        expires: Option<String>,
        /// k=v attribution tag, repeatable.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// This key's limits (each overrides its [limits] default).
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// List keys (prefixes only, never secrets).
    List,
    /// Revoke a key by id (or by name when unique). Takes effect within a second.
    Revoke { key: String },
    /// Replace a key's limit overrides; a limit left out falls back to [limits]. 0 = none.
    Limits {
        key: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
    /// Issue a new secret for a key; the old one keeps working for the grace period.
    Rotate {
        key: String,
        #[arg(long, default_value = "24h")]
        grace: String,
    },
}

#[derive(Subcommand)]
enum WalletCmd {
    /// Create a wallet for an org, a team or a key. A key draws on its own wallet, else its
    /// team's, else its org's (`default` for keys without an org).
    Create {
        /// org:NAME, team:NAME or key:KEY
        #[arg(long)]
        owner: String,
        /// The balance never goes below this, in USD (default 0: strictly prepaid).
        #[arg(long)]
        floor: Option<String>,
        /// Send a wallet.low_balance webhook when spending takes the balance below this (USD).
        #[arg(long)]
        low_balance: Option<String>,
    },
    /// Change a wallet's floor or low-balance alert (`--low-balance off` removes it).
    Set {
        wallet: String,
        #[arg(long, allow_hyphen_values = true)]
        floor: Option<String>,
        #[arg(long)]
        low_balance: Option<String>,
    },
    /// Add money. Replaying the same --idempotency-key adds once.
    Topup(CreditArgs),
    /// Add free credit that expires (--expires 30d); spent before top-ups.
    Grant(CreditArgs),
    /// Correct a balance (signed amount; --note required).
    Adjust(CreditArgs),
    /// Give money back for a request.
    Refund(CreditArgs),
    /// A wallet's balance, floor and money held by requests in flight.
    Show {
        wallet: String,
    },
    List,
    /// A wallet's ledger entries, newest first.
    Ledger {
        wallet: String,
        #[arg(long, default_value = "50")]
        limit: u32,
    },
    /// Check that every balance equals the sum of its ledger entries and sits above its floor.
    Verify,
}

#[derive(Args)]
struct CreditArgs {
    /// Wallet id, or org:NAME / team:NAME / key:KEY_ID.
    wallet: String,
    /// USD, e.g. 25.00
    #[arg(long, allow_hyphen_values = true)]
    amount: String,
    #[arg(long)]
    idempotency_key: Option<String>,
    #[arg(long)]
    note: Option<String>,
    /// For grants: lifetime, e.g. 30d.
    #[arg(long)]
    expires: Option<String>,
}

impl CreditArgs {
    fn request(&self) -> admin::WalletCredit {
        admin::WalletCredit {
            amount: self.amount.clone(),
            idempotency_key: self.idempotency_key.clone(),
            note: self.note.clone(),
            expires: self.expires.clone(),
        }
    }
}

#[derive(Subcommand)]
enum BudgetCmd {
    /// Create or replace a budget. Hard: requests are refused beyond it (402
    /// budget_exceeded); soft: a webhook and a log line when crossed.
    Set {
        /// key:ID, team:NAME or org:NAME
        #[arg(long)]
        scope: String,
        /// daily, weekly, monthly (calendar, UTC) or lifetime
        #[arg(long)]
        period: String,
        /// USD
        #[arg(long)]
        hard: Option<String>,
        /// USD
        #[arg(long)]
        soft: Option<String>,
    },
    List,
}

#[derive(Subcommand)]
enum TeamsCmd {
    /// List teams with limit overrides.
    List,
    /// Create a team or replace its limit overrides; a limit left out falls back to
    /// [limits.team]. 0 = none. Keys with this team share these limits.
    Set {
        name: String,
        #[command(flatten)]
        limits: LimitArgs,
    },
}

#[derive(Args)]
struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    rpm: Option<u64>,
    /// Tokens (input + output) per minute.
    #[arg(long)]
    tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    concurrency: Option<u32>,
    /// Refuse requests whose estimated cost is above this, in USD (e.g. 0.50).
    #[arg(long, value_parser = parse_usd_arg)]
    max_cost: Option<u64>,
    /// When the wallet cannot cover max_tokens, lower it to what the wallet can pay.
    #[arg(long)]
    clamp_max_tokens: Option<bool>,
}

fn parse_usd_arg(s: &str) -> Result<u64, String> {
    let v = tollgate::wallet::parse_usd(s)?;
    u64::try_from(v).map_err(|_| format!("\"{s}\" must not be negative"))
}

impl LimitArgs {
    fn overrides(&self) -> KeyLimits {
        KeyLimits {
            rpm: self.rpm,
            tpm: self.tpm,
            concurrency: self.concurrency,
            max_cost_micros: self.max_cost,
            clamp_max_tokens: self.clamp_max_tokens,
        }
    }
}

#[derive(Args)]
struct UsageArgs {
    /// key, team, project, model, day, run, endpoint, or tag:NAME
    #[arg(long, default_value = "model")]
    by: String,
    /// Only the last period, e.g. 7d, 24h.
    #[arg(long)]
    since: Option<String>,
    #[command(flatten)]
    target: Target,
}

fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("tag \"{s}\" must be k=v"))?;
    if k.is_empty() {
        return Err(format!("tag \"{s}\" has an empty name"));
    }
    Ok((k.to_string(), v.to_string()))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
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
            let cfg = Config::from_file(&config).map_err(anyhow::Error::msg)?;
            let problems = cfg
                .with_implicit_providers(tollgate::config::ProviderKeys::from_env())
                .validate();
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
        Cmd::Migrate {
            data_dir,
            store_url,
        } => {
            let location = tollgate::db::Location::from_config(store_url.as_deref(), &data_dir);
            let store = tokio::task::spawn_blocking(move || Store::open_at(&location)).await??;
            println!(
                "{}: schema at version {}",
                store.location().describe(),
                store.schema_version()?
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

/// Acts on the data directory, or calls a running gateway.
enum Backend {
    Local {
        store: Store,
        secret: ServerSecret,
    },
    Remote {
        client: reqwest::Client,
        url: String,
        admin_key: String,
    },
}

impl Backend {
    fn new(t: &Target) -> anyhow::Result<Backend> {
        match &t.url {
            Some(url) => {
                tollgate::server::init_tls();
                let admin_key = t
                    .admin_key
                    .clone()
                    .context("--url needs the admin key (--admin-key or TOLLGATE_ADMIN_KEY)")?;
                Ok(Backend::Remote {
                    client: reqwest::Client::new(),
                    url: url.trim_end_matches('/').to_string(),
                    admin_key,
                })
            }
            None => {
                let location =
                    tollgate::db::Location::from_config(t.store_url.as_deref(), &t.data_dir);
                if let tollgate::db::Location::Sqlite(path) = &location {
                    if !path.exists() {
                        bail!("no tollgate data in {} (run `tollgate serve` once, or pass --data-dir / --url)", t.data_dir.display());
                    }
                }
                let store = Store::open_at(&location)
                    .with_context(|| format!("opening the store at {}", location.describe()))?;
                let secret =
                    ServerSecret::load(&t.data_dir, std::env::var("TOLLGATE_SECRET").ok())?;
                Ok(Backend::Local { store, secret })
            }
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let Backend::Remote {
            client,
            url,
            admin_key,
        } = self
        else {
            bail!("not a remote backend")
        };
        let mut req = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(admin_key);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&b)?);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or(text);
            bail!("{status}: {msg}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

async fn keys(cmd: KeysCmd, target: Target) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    match cmd {
        KeysCmd::Create {
            name,
            team,
            org,
            project,
            models,
            expires,
            tags,
            limits,
        } => {
            let tags = tags.into_iter().collect::<BTreeMap<_, _>>();
            let req = NewKey {
                name,
                team,
                org,
                project,
                models,
                expires,
                tags,
                rpm: limits.rpm,
                tpm: limits.tpm,
                concurrency: limits.concurrency,
            };
            let created: CreatedKey = match &backend {
                Backend::Local { store, secret } => admin::create_key(store, secret, req)?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::POST,
                            "/admin/keys",
                            Some(serde_json::to_value(&req)?),
                        )
                        .await?
                }
            };
            print_created(&created, target.format)?;
        }
        KeysCmd::List => {
            let keys: Vec<KeyView> = match &backend {
                Backend::Local { store, .. } => {
                    store.list_keys()?.into_iter().map(admin::view).collect()
                }
                Backend::Remote { .. } => {
                    backend
                        .call(reqwest::Method::GET, "/admin/keys", None)
                        .await?
                }
            };
            print_keys(&keys, target.format)?;
        }
        KeysCmd::Revoke { key } => {
            let v: KeyView = match &backend {
                Backend::Local { store, .. } => admin::revoke_key(store, &key)?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::POST,
                            &format!("/admin/keys/{}/revoke", urlencode(&key)),
                            None,
                        )
                        .await?
                }
            };
            print_keys(&[v], target.format)?;
        }
        KeysCmd::Limits { key, limits } => {
            let v: KeyView = match &backend {
                Backend::Local { store, .. } => {
                    admin::set_key_limits(store, &key, limits.overrides())?
                }
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::PUT,
                            &format!("/admin/keys/{}/limits", urlencode(&key)),
                            Some(serde_json::to_value(limits.overrides())?),
                        )
                        .await?
                }
            };
            print_keys(&[v], target.format)?;
        }
        KeysCmd::Rotate { key, grace } => {
            let created: CreatedKey = match &backend {
                Backend::Local { store, secret } => admin::rotate_key(
                    store,
                    secret,
                    &key,
                    parse_duration(&grace).map_err(anyhow::Error::msg)?,
                )?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::POST,
                            &format!("/admin/keys/{}/rotate", urlencode(&key)),
                            Some(serde_json::json!({ "grace": grace })),
                        )
                        .await?
                }
            };
            print_created(&created, target.format)?;
        }
    }
    Ok(())
}

async fn wallet(cmd: WalletCmd, target: Target) -> anyhow::Result<std::process::ExitCode> {
    use tollgate::wallet::{usd, Entry, Wallet};
    let backend = Backend::new(&target)?;
    let remote = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let backend = &backend;
        async move { backend.call::<serde_json::Value>(method, &path, body).await }
    };
    let local = match &backend {
        Backend::Local { store, .. } => Some(store),
        Backend::Remote { .. } => None,
    };
    let print_wallets = |ws: &[Wallet]| -> anyhow::Result<()> {
        if target.format == Format::Json {
            println!("{}", serde_json::to_string_pretty(ws)?);
            return Ok(());
        }
        let rows: Vec<Vec<String>> = ws
            .iter()
            .map(|w| {
                vec![
                    w.id.clone(),
                    format!("{}:{}", w.owner_kind.as_str(), w.owner),
                    usd(w.balance_micros),
                    usd(w.held_micros),
                    usd(w.floor_micros),
                ]
            })
            .collect();
        print_rows(
            &["wallet", "owner", "available_usd", "held_usd", "floor_usd"],
            &rows,
            target.format == Format::Csv,
        );
        Ok(())
    };
    let kind = match &cmd {
        WalletCmd::Topup(_) => "topup",
        WalletCmd::Grant(_) => "grant",
        WalletCmd::Adjust(_) => "adjust",
        _ => "refund",
    };
    match cmd {
        WalletCmd::Set {
            wallet,
            floor,
            low_balance,
        } => {
            let w: Wallet = match local {
                Some(store) => admin::configure_wallet(store, &wallet, floor, low_balance)?,
                None => serde_json::from_value(
                    backend
                        .call::<serde_json::Value>(
                            reqwest::Method::PUT,
                            &format!("/admin/wallets/{}", urlencode(&wallet)),
                            Some(serde_json::json!({"floor": floor, "low_balance": low_balance})),
                        )
                        .await?,
                )?,
            };
            print_wallets(&[w])?;
        }
        WalletCmd::Create {
            owner,
            floor,
            low_balance,
        } => {
            let req = admin::NewWallet {
                owner,
                floor,
                low_balance,
            };
            let w: Wallet = match local {
                Some(store) => admin::create_wallet(store, req)?,
                None => serde_json::from_value(
                    remote(
                        reqwest::Method::POST,
                        "/admin/wallets".into(),
                        Some(serde_json::to_value(&req)?),
                    )
                    .await?,
                )?,
            };
            print_wallets(&[w])?;
        }
        WalletCmd::Show { wallet } => {
            let w: Wallet = match local {
                Some(store) => store.read(|c| tollgate::wallet::find(c, &wallet))?,
                None => serde_json::from_value(
                    remote(
                        reqwest::Method::GET,
                        format!("/admin/wallets/{}", urlencode(&wallet)),
                        None,
                    )
                    .await?,
                )?,
            };
            print_wallets(&[w])?;
        }
        WalletCmd::List => {
            let ws: Vec<Wallet> = match local {
                Some(store) => store.read(tollgate::wallet::list)?,
                None => serde_json::from_value(
                    remote(reqwest::Method::GET, "/admin/wallets".into(), None).await?,
                )?,
            };
            print_wallets(&ws)?;
        }
        WalletCmd::Ledger { wallet, limit } => {
            let entries: Vec<Entry> = match local {
                Some(store) => store.read(|c| {
                    let w = tollgate::wallet::find(c, &wallet)?;
                    tollgate::wallet::entries(c, &w.id, limit)
                })?,
                None => serde_json::from_value(
                    remote(
                        reqwest::Method::GET,
                        format!("/admin/wallets/{}/ledger?limit={limit}", urlencode(&wallet)),
                        None,
                    )
                    .await?,
                )?,
            };
            if target.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                let rows: Vec<Vec<String>> = entries
                    .iter()
                    .map(|e| {
                        vec![
                            e.seq.to_string(),
                            format_ms(e.ts_ms),
                            e.kind.clone(),
                            usd(e.amount_micros),
                            e.request_id.clone().unwrap_or_else(|| "-".into()),
                            e.idempotency_key.clone(),
                            e.note.clone().unwrap_or_default(),
                        ]
                    })
                    .collect();
                print_rows(
                    &[
                        "seq",
                        "time",
                        "kind",
                        "amount_usd",
                        "request",
                        "idempotency_key",
                        "note",
                    ],
                    &rows,
                    target.format == Format::Csv,
                );
            }
        }
        WalletCmd::Verify => {
            let bad: Vec<(String, i64, i64, i64)> = match local {
                Some(store) => store.read(tollgate::wallet::verify)?,
                None => {
                    let v =
                        remote(reqwest::Method::GET, "/admin/wallets/verify".into(), None).await?;
                    v["mismatches"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default()
                        .iter()
                        .map(|m| {
                            (
                                m["wallet"].as_str().unwrap_or_default().to_string(),
                                m["balance_micros"].as_i64().unwrap_or_default(),
                                m["ledger_sum_micros"].as_i64().unwrap_or_default(),
                                m["floor_micros"].as_i64().unwrap_or_default(),
                            )
                        })
                        .collect()
                }
            };
            if bad.is_empty() {
                println!(
                    "ok: every balance equals the sum of its ledger and sits at or above its floor"
                );
            } else {
                for (id, bal, sum, floor) in &bad {
                    println!(
                        "MISMATCH {id}: balance {} ledger sum {} floor {}",
                        usd(*bal),
                        usd(*sum),
                        usd(*floor)
                    );
                }
                return Ok(std::process::ExitCode::FAILURE);
            }
        }
        WalletCmd::Topup(a) | WalletCmd::Grant(a) | WalletCmd::Adjust(a) | WalletCmd::Refund(a) => {
            let c: admin::Credited = match local {
                Some(store) => admin::credit_wallet(store, &a.wallet, kind, a.request())?,
                None => serde_json::from_value(
                    remote(
                        reqwest::Method::POST,
                        format!("/admin/wallets/{}/{kind}", urlencode(&a.wallet)),
                        Some(serde_json::to_value(a.request())?),
                    )
                    .await?,
                )?,
            };
            if target.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                if !c.applied {
                    println!(
                        "Already applied (idempotency key {}): nothing changed.",
                        c.entry.idempotency_key
                    );
                }
                print_wallets(&[c.wallet])?;
            }
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

async fn budget(cmd: BudgetCmd, target: Target) -> anyhow::Result<()> {
    use tollgate::envelope::Budget;
    let backend = Backend::new(&target)?;
    let budgets: Vec<Budget> = match cmd {
        BudgetCmd::Set {
            scope,
            period,
            hard,
            soft,
        } => {
            let req = admin::BudgetReq {
                scope,
                period,
                hard,
                soft,
            };
            vec![match &backend {
                Backend::Local { store, .. } => admin::set_budget(store, req)?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::PUT,
                            "/admin/budgets",
                            Some(serde_json::to_value(&req)?),
                        )
                        .await?
                }
            }]
        }
        BudgetCmd::List => match &backend {
            Backend::Local { store, .. } => store.read(|c| Ok(tollgate::envelope::budgets(c)?))?,
            Backend::Remote { .. } => {
                backend
                    .call(reqwest::Method::GET, "/admin/budgets", None)
                    .await?
            }
        },
    };
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&budgets)?);
        return Ok(());
    }
    let amount = |v: Option<i64>| v.map_or_else(|| "-".into(), tollgate::wallet::usd);
    let rows: Vec<Vec<String>> = budgets
        .iter()
        .map(|b| {
            vec![
                b.scope.clone(),
                b.period.as_str().to_string(),
                amount(b.hard_micros),
                amount(b.soft_micros),
            ]
        })
        .collect();
    print_rows(
        &["scope", "period", "hard_usd", "soft_usd"],
        &rows,
        target.format == Format::Csv,
    );
    Ok(())
}

async fn teams(cmd: TeamsCmd, target: Target) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    let teams: Vec<TeamRecord> = match cmd {
        TeamsCmd::List => match &backend {
            Backend::Local { store, .. } => store.list_teams()?,
            Backend::Remote { .. } => {
                backend
                    .call(reqwest::Method::GET, "/admin/teams", None)
                    .await?
            }
        },
        TeamsCmd::Set { name, limits } => vec![match &backend {
            Backend::Local { store, .. } => {
                admin::set_team_limits(store, &name, limits.overrides())?
            }
            Backend::Remote { .. } => {
                backend
                    .call(
                        reqwest::Method::PUT,
                        &format!("/admin/teams/{}", urlencode(&name)),
                        Some(serde_json::to_value(limits.overrides())?),
                    )
                    .await?
            }
        }],
    };
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&teams)?);
        return Ok(());
    }
    let or_default = |v: Option<String>| v.unwrap_or_else(|| "default".into());
    let rows: Vec<Vec<String>> = teams
        .iter()
        .map(|t| {
            vec![
                t.name.clone(),
                or_default(t.limits.rpm.map(|v| v.to_string())),
                or_default(t.limits.tpm.map(|v| v.to_string())),
                or_default(t.limits.concurrency.map(|v| v.to_string())),
            ]
        })
        .collect();
    print_rows(
        &["team", "rpm", "tpm", "concurrency"],
        &rows,
        target.format == Format::Csv,
    );
    Ok(())
}

async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    let backend = Backend::new(&args.target)?;
    let rows: Vec<ReportRow> = match &backend {
        Backend::Local { store, .. } => {
            admin::usage_report(store, &args.by, args.since.as_deref())?
        }
        Backend::Remote { .. } => {
            let mut path = format!("/admin/usage?by={}", urlencode(&args.by));
            if let Some(s) = &args.since {
                path.push_str(&format!("&since={}", urlencode(s)));
            }
            backend.call(reqwest::Method::GET, &path, None).await?
        }
    };
    match args.target.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        f => {
            let header = [
                args.by.as_str(),
                "requests",
                "errors",
                "input",
                "cached",
                "cache_write",
                "output",
                "reasoning",
                "cost_usd",
            ];
            let body: Vec<Vec<String>> = rows
                .iter()
                .map(|r| {
                    vec![
                        r.group.clone(),
                        r.requests.to_string(),
                        r.errors.to_string(),
                        r.input_tokens.to_string(),
                        r.cached_input_tokens.to_string(),
                        r.cache_write_tokens.to_string(),
                        r.output_tokens.to_string(),
                        r.reasoning_tokens.to_string(),
                        usd(r.cost_micros),
                    ]
                })
                .collect();
            print_rows(&header, &body, f == Format::Csv);
        }
    }
    Ok(())
}

/// Micro-USD as dollars, exactly: integer arithmetic, no floats.
fn usd(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_created(c: &CreatedKey, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(c)?);
        return Ok(());
    }
    println!(
        "Created key {} for agent \"{}\".",
        c.key.key.id, c.key.key.name
    );
    println!("Secret (shown once; store it now):\n  {}", c.secret);
    Ok(())
}

fn print_keys(keys: &[KeyView], format: Format) -> anyhow::Result<()> {
    #[derive(Serialize)]
    struct Out<'a>(&'a [KeyView]);
    if format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&Out(keys))?);
        return Ok(());
    }
    let header = [
        "id", "prefix", "name", "team", "project", "models", "status", "expires",
    ];
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|v| {
            let k = &v.key;
            vec![
                k.id.clone(),
                format!("{}…", k.prefix),
                if k.admin {
                    format!("{} (admin)", k.name)
                } else {
                    k.name.clone()
                },
                k.team.clone().unwrap_or_else(|| "-".into()),
                k.project.clone().unwrap_or_else(|| "-".into()),
                if k.models.is_empty() {
                    "*".into()
                } else {
                    k.models.join(",")
                },
                {
                    let status = serde_json::to_value(v.status)
                        .ok()
                        .and_then(|s| s.as_str().map(str::to_string))
                        .unwrap_or_default();
                    match v.rotating_until_ms {
                        Some(t) => format!(
                            "{status} (rotating: {} secrets until {})",
                            v.live_secrets,
                            format_ms(t)
                        ),
                        None => status,
                    }
                },
                k.expires_ms.map_or_else(|| "never".into(), format_ms),
            ]
        })
        .collect();
    print_rows(&header, &rows, format == Format::Csv);
    Ok(())
}

fn format_ms(ms: i64) -> String {
    // Days since the epoch → civil date (Howard Hinnant's algorithm); avoids a date crate.
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn print_rows(header: &[&str], rows: &[Vec<String>], csv: bool) {
    if csv {
        let esc = |s: &str| {
            if s.contains([',', '"', '\n']) {
                format!("\"{}\"", s.replace('"', "\"\""))
            } else {
                s.to_string()
            }
        };
        println!(
            "{}",
            header.iter().map(|h| esc(h)).collect::<Vec<_>>().join(",")
        );
        for r in rows {
            println!("{}", r.iter().map(|c| esc(c)).collect::<Vec<_>>().join(","));
        }
        return;
    }
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.to_vec());
    for r in rows {
        line(r.iter().map(String::as_str).collect());
    }
}
