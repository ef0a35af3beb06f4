//! The command line: every subcommand and flag (clap derive); `--help` is written here.

use super::*;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An AI agent gateway: virtual keys, routing across providers, exact usage metering."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Run the gateway. With no flags: 127.0.0.1:4000, data in ./tollgate-data, the built-in
    /// mock provider, an `openai` provider if OPENAI_API_KEY is set and an `anthropic` provider
    /// if ANTHROPIC_API_KEY is set. The dashboard is at /ui on the same port (sign in with the
    /// admin key; `[ui] enabled = false` turns it off).
    Serve(ServeArgs),
    /// Check a configuration file and print every problem with its path.
    CheckConfig {
        #[arg(
            long,
            short,
            env = "TOLLGATE_CONFIG",
            hide_env_values = true,
            default_value = "tollgate.toml"
        )]
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
    /// Tool calls waiting for a human's approval (tool policies' `require_approval`).
    Approvals {
        #[command(subcommand)]
        cmd: ApprovalsCmd,
        #[command(flatten)]
        target: Target,
    },
    /// The hash-chained audit log: policy decisions, approvals, admin changes.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
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
    /// Cost per outcome and per successful outcome (outcomes are posted to /v1/outcomes),
    /// and the spend no outcome accounts for.
    Roi {
        /// agent, team, project, model or type
        #[arg(long, default_value = "agent")]
        by: String,
        /// Only the last period, e.g. 30d.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Tokens and USD not spent thanks to the response cache, tool-output compression and the
    /// other savers, by saver or per key, team, org, project, model or endpoint next to
    /// what was spent. From rollups: starts at the hour of --since.
    Savings {
        /// saver, key, team, org, project, model or endpoint
        #[arg(long, default_value = "saver")]
        by: String,
        /// Only the last period, e.g. 30d.
        #[arg(long)]
        since: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Compare what tollgate metered for a provider with the provider's own usage report, per
    /// day, model and token class, and what it charged with the provider's cost report, per day
    /// and model. Exits 1 when a row drifts past the threshold. Needs a
    /// running gateway (--url), which holds the provider's credentials.
    Reconcile {
        /// The provider's name in the configuration.
        #[arg(long)]
        provider: String,
        /// From this long ago (1d) or this epoch-milliseconds time.
        #[arg(long, default_value = "1d")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// Percent a row may drift by before it counts.
        #[arg(long, default_value_t = 1.0)]
        threshold: f64,
        #[command(flatten)]
        target: Target,
    },
    /// Exports for finance tools.
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
        #[command(flatten)]
        target: Target,
    },
    /// The request log: every request (served, refused, failed), newest first, with why it
    /// ended. Filters combine; `--follow` keeps printing new ones.
    Logs(LogsArgs),
    /// Create or upgrade the store's schema, then exit (`serve` also does this on start).
    Migrate {
        #[command(flatten)]
        store: StoreArgs,
        /// A configuration whose `[analytics]` names ClickHouse: its schema is migrated too.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send ClickHouse (`[analytics]` in the config) the store's usage records it lacks, in
    /// a time range: after a `kill -9` lost the sink's queue, or to load history. Records
    /// ClickHouse has are not sent again; safe to repeat.
    Backfill {
        #[command(flatten)]
        store: StoreArgs,
        /// The configuration naming ClickHouse.
        #[arg(long, short)]
        config: PathBuf,
        /// From this long ago (`2h`, `7d`) or this time (ms since the epoch).
        #[arg(long)]
        since: String,
        /// Up to this long ago, or this time (default: now).
        #[arg(long)]
        until: Option<String>,
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

/// Which store a command opens directly (not through a running gateway).
#[derive(Args)]
pub struct StoreArgs {
    #[arg(
        long,
        env = "TOLLGATE_DATA_DIR",
        hide_env_values = true,
        default_value = "./tollgate-data"
    )]
    pub data_dir: PathBuf,
    /// A PostgreSQL store, e.g. postgres://tollgate:secret@db:5432/tollgate (else SQLite in
    /// the data directory).
    #[arg(long, env = "TOLLGATE_STORE_URL", hide_env_values = true)]
    pub store_url: Option<String>,
}

impl StoreArgs {
    pub fn location(&self) -> tollgate::db::Location {
        tollgate::db::Location::from_config(self.store_url.as_deref(), &self.data_dir)
    }
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Configuration file. Without one, embedded defaults are used.
    #[arg(long, short, env = "TOLLGATE_CONFIG", hide_env_values = true)]
    pub(crate) config: Option<PathBuf>,
    /// Overrides [server] listen.
    #[arg(long, env = "TOLLGATE_LISTEN", hide_env_values = true)]
    pub(crate) listen: Option<SocketAddr>,
    /// Overrides [server] data_dir.
    #[arg(long, env = "TOLLGATE_DATA_DIR", hide_env_values = true)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Overrides [store] url: postgres://user:password@host:5432/db.
    #[arg(long, env = "TOLLGATE_STORE_URL", hide_env_values = true)]
    pub(crate) store_url: Option<String>,
}

/// Where management commands act: the data directory, or a running gateway.
#[derive(Args)]
pub(crate) struct Target {
    /// Data directory of the gateway (used unless --url is given).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_DATA_DIR",
        hide_env_values = true,
        default_value = "./tollgate-data"
    )]
    pub(crate) data_dir: PathBuf,
    /// The gateway's PostgreSQL store, when it has one (else SQLite in the data directory).
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_STORE_URL",
        hide_env_values = true
    )]
    pub(crate) store_url: Option<String>,
    /// A running gateway's base URL, e.g. http://127.0.0.1:4000 (needs --admin-key).
    #[arg(long, global = true, env = "TOLLGATE_URL", hide_env_values = true)]
    pub(crate) url: Option<String>,
    /// The admin key, for --url.
    #[arg(
        long,
        global = true,
        env = "TOLLGATE_ADMIN_KEY",
        hide_env_values = true
    )]
    pub(crate) admin_key: Option<String>,
    #[arg(long, global = true, value_enum, default_value = "table")]
    pub(crate) format: Format,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    Table,
    Json,
    Csv,
}

#[derive(Subcommand)]
pub(crate) enum KeysCmd {
    /// Create a key and print its secret once.
    Create {
        /// The agent this key belongs to.
        #[arg(long)]
        name: String,
        /// The team the agent belongs to: attribution in usage reports, the team's limits
        /// (`teams set`) and its wallet when the key has none.
        #[arg(long)]
        team: Option<String>,
        /// The organisation, whose wallet the key draws on without a key or team wallet.
        #[arg(long)]
        org: Option<String>,
        /// The project the agent works for: attribution in usage reports (`usage --by project`).
        #[arg(long)]
        project: Option<String>,
        /// Allowed models, comma-separated; `prefix*` matches by prefix. Default: all.
        #[arg(long, value_delimiter = ',')]
        models: Vec<String>,
        /// MCP tools the key may list and call at /mcp, comma-separated `server__tool`
        /// patterns (`server__*`, `*`). Default: none.
        #[arg(long, value_delimiter = ',')]
        tools: Vec<String>,
        /// Lifetime, e.g. 30d, 12h.
        #[arg(long)]
        expires: Option<String>,
        /// k=v attribution tag, repeatable.
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// This key's limits (each overrides its [limits] default).
        #[command(flatten)]
        limits: LimitArgs,
        /// A read-only dashboard key: it signs in at /ui to look (no forms, no changes) and
        /// every API refuses it (403 dashboard_only). Takes no models, tools or limits.
        #[arg(long)]
        viewer: bool,
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
    /// Replace the MCP tools a key may use (`server__tool` patterns, comma-separated; none
    /// given: no tools). Takes effect within a second.
    Tools {
        key: String,
        #[arg(value_delimiter = ',')]
        tools: Vec<String>,
    },
    /// Issue a new secret for a key; the old one keeps working for the grace period.
    Rotate {
        key: String,
        #[arg(long, default_value = "24h")]
        grace: String,
    },
}

#[derive(Subcommand)]
pub(crate) enum WalletCmd {
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
pub(crate) struct CreditArgs {
    /// Wallet id, or org:NAME / team:NAME / key:KEY_ID.
    pub(crate) wallet: String,
    /// USD, e.g. 25.00
    #[arg(long, allow_hyphen_values = true)]
    pub(crate) amount: String,
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    #[arg(long)]
    pub(crate) note: Option<String>,
    /// For grants: lifetime, e.g. 30d.
    #[arg(long)]
    pub(crate) expires: Option<String>,
}

impl CreditArgs {
    pub(crate) fn request(&self) -> admin::WalletCredit {
        admin::WalletCredit {
            amount: self.amount.clone(),
            idempotency_key: self.idempotency_key.clone(),
            note: self.note.clone(),
            expires: self.expires.clone(),
        }
    }
}

#[derive(Subcommand)]
pub(crate) enum BudgetCmd {
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
pub(crate) enum ApprovalsCmd {
    /// Approvals, newest first (pending ones by default).
    List {
        /// pending, approved, denied, used, or all.
        #[arg(long, default_value = "pending")]
        state: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// One approval with the exact arguments it would let through.
    Show { id: String },
    /// Let exactly this call through, once, within [approvals] ttl.
    Approve {
        id: String,
        /// Who approves, for the audit log (default: $USER).
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Refuse the call; the agent is told, with the note.
    Deny {
        id: String,
        #[arg(long)]
        by: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum AuditCmd {
    /// Entries, newest first.
    List {
        /// An action (`policy.deny`) or a prefix ending in '.' (`approval.`).
        #[arg(long)]
        action: Option<String>,
        /// What the entry is about: a request id, approval id, key id, wallet id.
        #[arg(long)]
        subject: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Recomputes the whole chain; exits 1 naming the first entry changed or removed.
    Verify,
}

#[derive(Subcommand)]
pub(crate) enum TeamsCmd {
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
pub(crate) struct LimitArgs {
    /// Requests per minute.
    #[arg(long)]
    pub(crate) rpm: Option<u64>,
    /// Tokens (input + output) per minute.
    #[arg(long)]
    pub(crate) tpm: Option<u64>,
    /// Requests in flight at once.
    #[arg(long)]
    pub(crate) concurrency: Option<u32>,
    /// Refuse requests whose estimated cost is above this, in USD (e.g. 0.50).
    #[arg(long, value_parser = parse_usd_arg)]
    pub(crate) max_cost: Option<u64>,
    /// When the wallet cannot cover max_tokens, lower it to what the wallet can pay.
    #[arg(long)]
    pub(crate) clamp_max_tokens: Option<bool>,
}

pub(crate) fn parse_usd_arg(s: &str) -> Result<u64, String> {
    let v = tollgate::wallet::parse_usd(s)?;
    u64::try_from(v).map_err(|_| format!("\"{s}\" must not be negative"))
}

impl LimitArgs {
    pub(crate) fn overrides(&self) -> KeyLimits {
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
pub(crate) struct UsageArgs {
    /// key, team, org, project, model, day, run, endpoint, tag:NAME, outcome (= `roi --by
    /// type`) or saver (= `savings`). Reports from rollups start at the hour of --since.
    #[arg(long, default_value = "model")]
    pub(crate) by: String,
    /// Only the last period, e.g. 7d, 24h.
    #[arg(long)]
    pub(crate) since: Option<String>,
    #[command(flatten)]
    pub(crate) target: Target,
}

#[derive(Subcommand)]
pub(crate) enum ExportCmd {
    /// FinOps FOCUS Cost and Usage rows: usage per token class, tool calls, wallet top-ups
    /// (Purchase) and grants (Credit); CSV, or JSON lines with --format json. Locally priced
    /// with the built-in price table; with --url, with the running gateway's.
    Focus {
        /// From this long ago (30d) or this epoch-milliseconds time. Default: 30d.
        #[arg(long)]
        since: Option<String>,
        /// Up to this long ago or time. Default: now.
        #[arg(long)]
        until: Option<String>,
        /// daily or hourly charge periods.
        #[arg(long, default_value = "daily")]
        granularity: String,
    },
}

#[derive(Args)]
pub(crate) struct LogsArgs {
    /// A key id or an agent name.
    #[arg(long)]
    pub(crate) key: Option<String>,
    #[arg(long)]
    pub(crate) team: Option<String>,
    /// The model asked for, or the one that served.
    #[arg(long)]
    pub(crate) model: Option<String>,
    /// A status (429), a class (4xx, 5xx) or `error` (every status from 400).
    #[arg(long)]
    pub(crate) status: Option<String>,
    /// chat, messages, responses, embeddings, count_tokens, or a tool route's name.
    #[arg(long)]
    pub(crate) endpoint: Option<String>,
    /// The agent run (x-tollgate-run).
    #[arg(long)]
    pub(crate) run: Option<String>,
    /// Why it ended: rate_limited, loop_detected, insufficient_funds, upstream_error, …
    #[arg(long)]
    pub(crate) error_kind: Option<String>,
    /// From this long ago (1h, 7d) or this time in epoch milliseconds. Default: 1d.
    #[arg(long)]
    pub(crate) since: Option<String>,
    /// Up to this long ago, or this epoch-milliseconds time.
    #[arg(long)]
    pub(crate) until: Option<String>,
    /// At most this many records (newest first).
    #[arg(long, default_value_t = 50)]
    pub(crate) limit: u32,
    /// Keep printing new records as they are written (every second) until interrupted.
    #[arg(long)]
    pub(crate) follow: bool,
    #[command(flatten)]
    pub(crate) target: Target,
}

impl LogsArgs {
    /// The filters as the admin API takes them (`ops::LOG_FILTERS`).
    pub(crate) fn pairs(&self) -> Vec<(String, String)> {
        let mut p: Vec<(String, String)> = [
            ("key", &self.key),
            ("team", &self.team),
            ("model", &self.model),
            ("status", &self.status),
            ("endpoint", &self.endpoint),
            ("run", &self.run),
            ("error_kind", &self.error_kind),
            ("until", &self.until),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.clone().map(|v| (k.to_string(), v)))
        .collect();
        p.push((
            "since".into(),
            self.since.clone().unwrap_or_else(|| "1d".into()),
        ));
        p.push(("limit".into(), self.limit.to_string()));
        p
    }
}

pub(crate) fn parse_tag(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("tag \"{s}\" must be k=v"))?;
    if k.is_empty() {
        return Err(format!("tag \"{s}\" has an empty name"));
    }
    Ok((k.to_string(), v.to_string()))
}
