//! The operations on keys, teams, wallets, budgets, runs and usage that the CLI (acting on
//! the store directly) and the admin HTTP API (`admin.rs`, through a running gateway) share:
//! one implementation, validated once.

use crate::clock::now_ms;
use crate::config::parse_duration;
use crate::error::{ApiError, ErrorKind};
use crate::keys::{self, KeyLimits, KeyRecord, KeyStatus, ServerSecret};
use crate::store::{GroupBy, RecordFilter, ReportRow, Store, StoreError, TeamRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    pub name: String,
    #[serde(default)]
    pub team: Option<String>,
    /// The organisation, for its wallet (`default` when unset).
    #[serde(default)]
    pub org: Option<String>,
    #[serde(default)]
    pub project: Option<String>,
    #[serde(default)]
    pub models: Vec<String>,
    /// MCP tools the key may use, as `server__tool` patterns (`server__*`, `*`). Default: none.
    #[serde(default)]
    pub tools: Vec<String>,
    /// A duration from now, e.g. `30d`.
    #[serde(default)]
    pub expires: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Requests per minute; overrides `[limits] rpm`.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens per minute; overrides `[limits] tpm`.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Requests in flight at once; overrides `[limits] concurrency`.
    #[serde(default)]
    pub concurrency: Option<u32>,
    /// A read-only dashboard key: signs in to `/ui` to look, refused everywhere else. It
    /// takes no models, tools or limits, since it calls nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub viewer: bool,
}

/// A key as shown to operators: never the secret, only its prefix.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyView {
    #[serde(flatten)]
    pub key: KeyRecord,
    pub status: KeyStatus,
    /// Secrets that open the key now: more than one while a rotation's grace runs.
    #[serde(default)]
    pub live_secrets: usize,
    /// When the last rotated-out secret stops working, while a rotation's grace runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotating_until_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreatedKey {
    pub key: KeyView,
    /// Shown once.
    pub secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AdminError> for ApiError {
    fn from(e: AdminError) -> ApiError {
        match e {
            AdminError::Invalid(m) => ApiError::new(ErrorKind::BadRequest, m),
            AdminError::Store(StoreError::KeyNotFound(k)) => {
                ApiError::new(ErrorKind::NotFound, format!("no key matches \"{k}\""))
            }
            AdminError::Store(e @ StoreError::Ambiguous(_)) => {
                ApiError::new(ErrorKind::BadRequest, e.to_string())
            }
            AdminError::Store(StoreError::Wallet(e)) => {
                use crate::wallet::WalletError as W;
                let kind = match &e {
                    W::NotFound(_) | W::RunNotFound(_) => ErrorKind::NotFound,
                    W::Exists(_) | W::IdempotencyConflict(_) | W::Invalid(_) => {
                        ErrorKind::BadRequest
                    }
                    W::Sql(_) => ErrorKind::Internal,
                };
                ApiError::new(kind, e.to_string())
            }
            AdminError::Store(e) => ApiError::new(ErrorKind::Internal, e.to_string()),
        }
    }
}

pub fn view(key: KeyRecord) -> KeyView {
    let now = now_ms();
    let status = key.status_at(now);
    let live: Vec<_> = key
        .secrets
        .iter()
        .filter(|s| status == KeyStatus::Active && s.expires_ms.is_none_or(|e| e > now))
        .collect();
    let rotating_until_ms = if live.len() > 1 {
        live.iter().filter_map(|s| s.expires_ms).max()
    } else {
        None
    };
    KeyView {
        live_secrets: live.len(),
        rotating_until_ms,
        key,
        status,
    }
}

fn validate_name(field: &str, v: &str) -> Result<(), AdminError> {
    if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
        return Err(AdminError::Invalid(format!(
            "{field} must be 1 to 128 printable characters"
        )));
    }
    Ok(())
}

pub fn create_key(
    store: &Store,
    secret: &ServerSecret,
    req: NewKey,
) -> Result<CreatedKey, AdminError> {
    validate_name("name", &req.name)?;
    for (f, v) in [
        ("team", &req.team),
        ("project", &req.project),
        ("org", &req.org),
    ] {
        if let Some(v) = v {
            validate_name(f, v)?;
        }
    }
    for m in &req.models {
        validate_name("models entry", m)?;
    }
    for t in &req.tools {
        validate_name("tools entry", t)?;
    }
    if req.viewer
        && (!req.models.is_empty()
            || !req.tools.is_empty()
            || req.rpm.is_some()
            || req.tpm.is_some()
            || req.concurrency.is_some())
    {
        return Err(AdminError::Invalid(
            "a viewer key only opens the dashboard read-only: it takes no models, tools or limits"
                .into(),
        ));
    }
    let now = now_ms();
    let expires_ms = match &req.expires {
        Some(text) => {
            let d = parse_duration(text).map_err(AdminError::Invalid)?;
            if d.is_zero() {
                return Err(AdminError::Invalid("expires must be in the future".into()));
            }
            Some(now.saturating_add(d.as_millis() as i64))
        }
        None => None,
    };
    let secret_text = keys::generate_secret();
    let record = KeyRecord {
        id: keys::generate_id(),
        name: req.name,
        team: req.team,
        project: req.project,
        models: req.models,
        tools: req.tools,
        tags: req.tags,
        admin: false,
        viewer: req.viewer,
        prefix: keys::shown_prefix(&secret_text),
        created_ms: now,
        expires_ms,
        revoked_ms: None,
        rotated_from: None,
        limits: KeyLimits {
            rpm: req.rpm,
            tpm: req.tpm,
            concurrency: req.concurrency,
            ..KeyLimits::default()
        },
        org: req.org,
        secrets: Vec::new(),
    };
    store.insert_key(&record, &secret.digest(&secret_text))?;
    Ok(CreatedKey {
        key: view(record),
        secret: secret_text,
    })
}

pub fn revoke_key(store: &Store, id_or_name: &str) -> Result<KeyView, AdminError> {
    let key = store.find_key(id_or_name, now_ms())?;
    store.revoke_key(&key.id, now_ms())?;
    Ok(view(store.find_key(&key.id, now_ms())?))
}

/// A new secret for the same key: same id, so its wallet, budgets, limits, team and tags
/// follow. Every secret still live keeps working for `grace` at most (its own, shorter
/// expiry if it has one), then only the new one opens the key; the key's own expiry is
/// untouched. Rotating again during a grace period retires the previous new secret the same
/// way. A revoked or expired key cannot be rotated.
pub fn rotate_key(
    store: &Store,
    secret: &ServerSecret,
    id_or_name: &str,
    grace: Duration,
) -> Result<CreatedKey, AdminError> {
    let old = store.find_key(id_or_name, now_ms())?;
    if old.status_at(now_ms()) != KeyStatus::Active {
        return Err(AdminError::Invalid(format!(
            "key {} is not active; create a new one instead",
            old.id
        )));
    }
    let now = now_ms();
    let secret_text = keys::generate_secret();
    let retire_at = now.saturating_add(i64::try_from(grace.as_millis()).unwrap_or(i64::MAX));
    store.rotate_key(
        &old.id,
        now,
        retire_at,
        &keys::shown_prefix(&secret_text),
        &secret.digest(&secret_text),
    )?;
    Ok(CreatedKey {
        key: view(store.find_key(&old.id, now)?),
        secret: secret_text,
    })
}

/// Makes sure an admin key exists. Returns a freshly generated one, to be printed once.
pub fn bootstrap_admin_key(
    store: &Store,
    secret: &ServerSecret,
    from_env: Option<&str>,
) -> Result<Option<String>, StoreError> {
    let now = now_ms();
    let record = |secret_text: &str| KeyRecord {
        id: keys::generate_id(),
        name: "admin".into(),
        team: None,
        project: None,
        models: Vec::new(),
        tools: Vec::new(),
        tags: BTreeMap::new(),
        admin: true,
        viewer: false,
        prefix: keys::shown_prefix(secret_text),
        created_ms: now,
        expires_ms: None,
        revoked_ms: None,
        rotated_from: None,
        limits: KeyLimits::default(),
        org: None,
        secrets: Vec::new(),
    };
    if let Some(k) = from_env.filter(|k| !k.is_empty()) {
        let digest = secret.digest(k);
        if !store.key_with_digest_exists(&digest)? {
            store.insert_key(&record(k), &digest)?;
        }
        return Ok(None);
    }
    if store.has_admin_key()? {
        return Ok(None);
    }
    let k = keys::generate_secret();
    store.insert_key(&record(&k), &secret.digest(&k))?;
    Ok(Some(k))
}

/// `7d`, `24h` … → the timestamp that long ago.
pub fn since_ms(since: Option<&str>) -> Result<i64, AdminError> {
    since.map_or(Ok(0), |s| time_ms("since", s))
}

/// The request log's filters, as query parameters or CLI flags (the same names). An unknown
/// or repeated name is an error, never ignored: a typo must not return the whole log.
pub const LOG_FILTERS: &[&str] = &[
    "since",
    "until",
    "key",
    "team",
    "model",
    "status",
    "endpoint",
    "run",
    "error_kind",
    "request_id",
    "limit",
    "cursor",
];

/// A point in time from `30m` / `1d` (that long ago) or milliseconds since the epoch.
pub fn time_ms(name: &str, v: &str) -> Result<i64, AdminError> {
    if let Ok(ms) = v.parse::<i64>() {
        if ms > 0 {
            return Ok(ms);
        }
    }
    let d = parse_duration(v).map_err(|e| {
        AdminError::Invalid(format!(
            "{name}: {e} (a duration ago, e.g. 1h, or milliseconds since the epoch)"
        ))
    })?;
    Ok(now_ms().saturating_sub(d.as_millis().min(i64::MAX as u128) as i64))
}

pub fn record_filter(pairs: &[(String, String)]) -> Result<RecordFilter, AdminError> {
    let mut f = RecordFilter {
        limit: 1000,
        ..RecordFilter::default()
    };
    let mut seen = std::collections::HashSet::new();
    for (k, v) in pairs {
        if !LOG_FILTERS.contains(&k.as_str()) {
            return Err(AdminError::Invalid(format!(
                "unknown filter \"{k}\": use {}",
                LOG_FILTERS.join(", ")
            )));
        }
        if !seen.insert(k.as_str()) {
            return Err(AdminError::Invalid(format!("filter \"{k}\" given twice")));
        }
        if v.len() > 256 {
            return Err(AdminError::Invalid(format!("{k}: at most 256 characters")));
        }
        let text = Some(v.clone());
        match k.as_str() {
            "since" => f.since_ms = time_ms(k, v)?,
            "until" => f.until_ms = Some(time_ms(k, v)?),
            "key" => f.key = text,
            "team" => f.team = text,
            "model" => f.model = text,
            "endpoint" => f.endpoint = text,
            "run" => f.run = text,
            "error_kind" => f.error_kind = text,
            "request_id" => f.request_id = text,
            "status" => {
                f.status = Some(match v.as_str() {
                    "2xx" | "3xx" | "4xx" | "5xx" => {
                        let lo = u16::from(v.as_bytes()[0] - b'0') * 100;
                        (lo, lo + 99)
                    }
                    "error" => (400, 999),
                    n => match n.parse::<u16>() {
                        Ok(code) if (100..=999).contains(&code) => (code, code),
                        _ => {
                            return Err(AdminError::Invalid(format!(
                                "status: \"{v}\" is not a status (429), a class (4xx) or error"
                            )))
                        }
                    },
                })
            }
            "limit" => {
                f.limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| AdminError::Invalid("limit: 1 to 100000".into()))?
            }
            "cursor" => {
                let (ts, id) = v
                    .split_once(':')
                    .and_then(|(ts, id)| Some((ts.parse::<i64>().ok()?, id)))
                    .ok_or_else(|| {
                        AdminError::Invalid(
                            "cursor: use the value of x-tollgate-next-cursor".into(),
                        )
                    })?;
                f.before = Some((ts, id.to_string()));
            }
            _ => unreachable!("every name in LOG_FILTERS has an arm"),
        }
    }
    Ok(f)
}

/// Why a request ended, in words: what the request log shows in its last column.
pub fn why(r: &crate::records::UsageRecord) -> String {
    let what = match (r.error_kind.as_deref(), r.reused.as_deref()) {
        (Some("loop_detected"), Some("loop_nudge")) => "loop: answered with a nudge".to_string(),
        (None, Some(kind)) => format!("served from another request ({kind})"),
        (None, None) if r.client_disconnected => "the client left before the end".into(),
        (None, None) if r.status < 400 => "served".into(),
        (Some("rate_limited"), _) => "refused: rate limit".into(),
        (Some("loop_detected"), _) => "refused: loop (the agent repeated itself)".into(),
        (Some("retry_budget_exhausted"), _) => "refused: too many retries".into(),
        (Some("insufficient_funds"), _) => "refused: the wallet cannot pay".into(),
        (Some("budget_exceeded"), _) => "refused: budget spent".into(),
        (Some("run_budget_exhausted"), _) => "refused: the run's budget is spent".into(),
        (Some("max_cost_exceeded"), _) => "refused: above the request's cost cap".into(),
        (Some("model_not_allowed"), _) => "refused: the key may not use this model".into(),
        (Some("client_disconnected"), _) => "the client left before the end".into(),
        (Some(k), _) if k.starts_with("upstream") || k.starts_with("stream") => {
            format!("provider trouble ({k})")
        }
        (Some(k), _) => k.replace('_', " "),
        (None, None) => format!("status {}", r.status),
    };
    match &r.detail {
        Some(d) if r.status >= 400 || r.error_kind.is_some() => format!("{what}: {d}"),
        _ => what,
    }
}

/// The cursor of the page after `records`, when it was full.
pub fn next_cursor(records: &[crate::records::UsageRecord], limit: u32) -> Option<String> {
    (records.len() as u64 >= u64::from(limit))
        .then(|| records.last().map(|r| format!("{}:{}", r.ts_ms, r.id)))
        .flatten()
}

/// Where a report from `usage_report` starts, when it reads rollups (which start on the
/// hour); None when it reads records from the exact `since` (or the request is invalid,
/// which `usage_report` says).
pub fn report_since(by: &str, since: Option<&str>, source: Option<&str>) -> Option<i64> {
    let by: GroupBy = by.parse().ok()?;
    let rollups = matches!(source, None | Some("auto" | "rollups" | "store")) && by.rolled_up();
    rollups.then(|| since_ms(since).ok().map(crate::store::report_start))?
}

pub fn usage_report(
    store: &Store,
    by: &str,
    since: Option<&str>,
    source: Option<&str>,
) -> Result<Vec<ReportRow>, AdminError> {
    let by: GroupBy = by.parse().map_err(AdminError::Invalid)?;
    let source = match source {
        // `store`: the store's rollups even when ClickHouse answers reports.
        None | Some("auto" | "rollups" | "store") => crate::store::ReportSource::Auto,
        Some("records") => crate::store::ReportSource::Records,
        Some(other) => {
            return Err(AdminError::Invalid(format!(
                "source \"{other}\": use auto (ClickHouse when configured, else the store's rollups where they cover the window), store, or records"
            )))
        }
    };
    Ok(store.usage_report_from(&by, since_ms(since)?, now_ms(), source)?)
}

/// Creates the team if new and replaces its limit overrides (unset = the `[limits.team]`
/// default).
pub fn set_team_limits(
    store: &Store,
    name: &str,
    limits: KeyLimits,
) -> Result<TeamRecord, AdminError> {
    validate_name("team", name)?;
    store.set_team_limits(name, &limits, now_ms())?;
    store
        .list_teams()?
        .into_iter()
        .find(|t| t.name == name)
        .ok_or_else(|| AdminError::Invalid(format!("team \"{name}\" vanished")))
}

/// Replaces a key's limit overrides (unset = the `[limits]` default).
pub fn set_key_limits(
    store: &Store,
    id_or_name: &str,
    limits: KeyLimits,
) -> Result<KeyView, AdminError> {
    let key = store.find_key(id_or_name, now_ms())?;
    store.set_key_limits(&key.id, &limits)?;
    Ok(view(store.find_key(&key.id, now_ms())?))
}

/// Replaces the MCP tools a key may use (`server__tool` patterns; empty: none). Takes effect
/// at the key cache's next refresh, within a second.
pub fn set_key_tools(
    store: &Store,
    id_or_name: &str,
    tools: Vec<String>,
) -> Result<KeyView, AdminError> {
    for t in &tools {
        validate_name("tools entry", t)?;
    }
    let key = store.find_key(id_or_name, now_ms())?;
    store.set_key_tools(&key.id, &tools)?;
    Ok(view(store.find_key(&key.id, now_ms())?))
}

// ---------------------------------------------------------------------------------------
// Wallets

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewWallet {
    /// `org:NAME`, `team:NAME` or `key:KEY_ID`.
    pub owner: String,
    /// The balance never goes below this, in USD (default 0: strictly prepaid).
    #[serde(default)]
    pub floor: Option<String>,
    /// A `wallet.low_balance` webhook fires when spending takes the balance below this (USD).
    #[serde(default)]
    pub low_balance: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WalletCredit {
    /// USD, e.g. `10.00` (signed for an adjustment).
    pub amount: String,
    /// Replaying a request with the same key changes nothing; without one, every call counts.
    #[serde(default)]
    pub idempotency_key: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    /// For a grant: its lifetime, e.g. `30d`.
    #[serde(default)]
    pub expires: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Credited {
    pub entry: crate::wallet::Entry,
    /// False when the idempotency key had been used: the entry is the first one.
    pub applied: bool,
    pub wallet: crate::wallet::Wallet,
}

impl From<crate::wallet::WalletError> for AdminError {
    fn from(e: crate::wallet::WalletError) -> AdminError {
        AdminError::Store(StoreError::Wallet(e))
    }
}

pub(crate) fn usd_arg(field: &str, text: &str) -> Result<i64, AdminError> {
    crate::money::parse_usd(text).map_err(|e| AdminError::Invalid(format!("{field}: {e}")))
}

pub fn create_wallet(store: &Store, req: NewWallet) -> Result<crate::wallet::Wallet, AdminError> {
    use crate::wallet::OwnerKind;
    let (kind, owner) = req
        .owner
        .split_once(':')
        .and_then(|(k, o)| OwnerKind::parse(k).map(|k| (k, o)))
        .ok_or_else(|| {
            AdminError::Invalid("owner must be org:NAME, team:NAME or key:KEY_ID".into())
        })?;
    validate_name("owner", owner)?;
    let owner = match kind {
        // By id or by name, stored by id: a key's wallet follows the key, not its name.
        OwnerKind::Key => store.find_key(owner, now_ms())?.id,
        _ => owner.to_string(),
    };
    let floor = match &req.floor {
        Some(f) => usd_arg("floor", f)?,
        None => 0,
    };
    let low = req
        .low_balance
        .as_deref()
        .map(|l| usd_arg("low_balance", l))
        .transpose()?;
    let w = store.create_wallet(kind, &owner, floor, now_ms())?;
    if low.is_none() {
        return Ok(w);
    }
    Ok(store.write(|tx| crate::wallet::configure(tx, &w.id, floor, low))?)
}

/// Changes a wallet's floor and low-balance alert.
pub fn configure_wallet(
    store: &Store,
    wallet: &str,
    floor: Option<String>,
    low_balance: Option<String>,
) -> Result<crate::wallet::Wallet, AdminError> {
    let w = store.read(|c| crate::wallet::find(c, wallet))?;
    let floor = match floor {
        Some(f) => usd_arg("floor", &f)?,
        None => w.floor_micros,
    };
    let low = match low_balance.as_deref() {
        Some("off" | "") => None,
        Some(l) => Some(usd_arg("low_balance", l)?),
        None => w.low_balance_micros,
    };
    Ok(store.write(|tx| crate::wallet::configure(tx, &w.id, floor, low))?)
}

pub fn credit_wallet(
    store: &Store,
    wallet: &str,
    kind: &str,
    req: WalletCredit,
) -> Result<Credited, AdminError> {
    use crate::wallet::Credit;
    let amount = usd_arg("amount", &req.amount)?;
    let now = now_ms();
    let credit = match kind {
        "topup" => Credit::Topup,
        "refund" => Credit::Refund,
        "adjust" => {
            if req.note.as_deref().unwrap_or("").trim().is_empty() {
                return Err(AdminError::Invalid(
                    "an adjustment needs a note saying why".into(),
                ));
            }
            Credit::Adjustment
        }
        "grant" => {
            let d = parse_duration(req.expires.as_deref().unwrap_or("")).map_err(|e| {
                AdminError::Invalid(format!("a grant needs expires (e.g. 30d): {e}"))
            })?;
            Credit::Grant {
                expires_ms: now.saturating_add(d.as_millis() as i64),
            }
        }
        other => return Err(AdminError::Invalid(format!("unknown credit kind {other}"))),
    };
    let idem = req
        .idempotency_key
        .filter(|k| !k.trim().is_empty())
        .unwrap_or_else(|| format!("{kind}:{:016x}", rand::random::<u64>()));
    if idem.len() > 255 {
        return Err(AdminError::Invalid(
            "idempotency_key: at most 255 characters".into(),
        ));
    }
    let wallet = store.read(|c| crate::wallet::find(c, wallet))?;
    let (entry, applied) = store.write(|tx| {
        let (entry, applied) = crate::wallet::credit(
            tx,
            &wallet.id,
            credit,
            amount,
            &idem,
            req.note.as_deref(),
            now,
        )?;
        if applied {
            crate::audit::append(
                tx,
                "admin",
                &format!("wallet.{kind}"),
                &wallet.id,
                &serde_json::json!({ "amount_micros": amount, "idempotency_key": idem, "note": req.note }),
                now,
            )?;
        }
        Ok((entry, applied))
    })?;
    let wallet = store.read(|c| crate::wallet::get(c, &wallet.id))?;
    Ok(Credited {
        entry,
        applied,
        wallet,
    })
}

// ---------------------------------------------------------------------------------------
// Budgets and runs

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetReq {
    /// `key:ID`, `team:NAME` or `org:NAME`.
    pub scope: String,
    /// daily, weekly, monthly (calendar, UTC) or lifetime.
    pub period: String,
    /// Refuse beyond this, in USD.
    #[serde(default)]
    pub hard: Option<String>,
    /// Webhook and log when crossed, in USD.
    #[serde(default)]
    pub soft: Option<String>,
}

pub fn set_budget(store: &Store, req: BudgetReq) -> Result<crate::envelope::Budget, AdminError> {
    let (kind, owner) = req
        .scope
        .split_once(':')
        .filter(|(k, o)| matches!(*k, "key" | "team" | "org") && !o.is_empty())
        .ok_or_else(|| AdminError::Invalid("scope must be key:ID, team:NAME or org:NAME".into()))?;
    let scope = if kind == "key" {
        format!("key:{}", store.find_key(owner, now_ms())?.id)
    } else {
        req.scope.clone()
    };
    let period = crate::envelope::Period::parse(&req.period).ok_or_else(|| {
        AdminError::Invalid("period must be daily, weekly, monthly or lifetime".into())
    })?;
    let amount = |f: &str, v: &Option<String>| -> Result<Option<i64>, AdminError> {
        v.as_deref().map(|t| usd_arg(f, t)).transpose()
    };
    let b = crate::envelope::Budget {
        scope,
        period,
        hard_micros: amount("hard", &req.hard)?,
        soft_micros: amount("soft", &req.soft)?,
    };
    if b.hard_micros.is_none() && b.soft_micros.is_none() {
        return Err(AdminError::Invalid(
            "give a hard limit, a soft limit, or both".into(),
        ));
    }
    store.write(|tx| {
        crate::envelope::set_budget(tx, &b)?;
        tx.exec("UPDATE meta SET v = v + 1 WHERE k = 'keys_rev'", &[])?;
        Ok(())
    })?;
    Ok(b)
}

/// A run's envelope, its sub-runs, and its own requests by model.
pub fn run_report(store: &Store, run: &str) -> Result<serde_json::Value, AdminError> {
    let id = format!("run:{run}");
    store
        .read(|c| {
            let Some(env) = crate::envelope::get(c, &id)? else {
                return Err(crate::wallet::WalletError::RunNotFound(run.to_string()));
            };
            let subs = crate::envelope::children(c, &id)?;
            let by_model = c
                .rows(
                    "SELECT COALESCE(model_served, model_requested, '-'), COUNT(*),
                            CAST(SUM(cost_micros) AS BIGINT), CAST(SUM(input_tokens) AS BIGINT),
                            CAST(SUM(output_tokens) AS BIGINT)
                     FROM usage WHERE run_id = ?1 GROUP BY 1 ORDER BY 3 DESC, 1",
                    &[&run],
                )?
                .iter()
                .map(|r| {
                    Ok(serde_json::json!({
                        "model": r.get::<String>(0)?,
                        "requests": r.get::<i64>(1)?,
                        "cost_micros": r.get::<i64>(2)?,
                        "input_tokens": r.get::<i64>(3)?,
                        "output_tokens": r.get::<i64>(4)?,
                    }))
                })
                .collect::<crate::db::Result<Vec<_>>>()?;
            let strip = |e: &crate::envelope::Envelope| {
                let mut v = serde_json::to_value(e).unwrap_or_default();
                if let Some(o) = v.as_object_mut() {
                    o.insert("run".into(), e.id.trim_start_matches("run:").into());
                    if let Some(p) = &e.parent {
                        o.insert("parent_run".into(), p.trim_start_matches("run:").into());
                    }
                }
                v
            };
            Ok(serde_json::json!({
                "run": strip(&env),
                "sub_runs": subs.iter().map(strip).collect::<Vec<_>>(),
                "by_model": by_model,
            }))
        })
        .map_err(AdminError::from)
}

// ---------------------------------------------------------------------------------------
// Outcomes and ROI

/// `POST /v1/outcomes`: what a run or a request bought.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewOutcome {
    /// The caller's id for this outcome: recording it again is a no-op.
    pub id: String,
    #[serde(default)]
    pub run_id: Option<String>,
    #[serde(default)]
    pub request_id: Option<String>,
    #[serde(rename = "type")]
    pub kind: String,
    pub success: bool,
    /// What it was worth, in USD ("12.50"), if the caller knows.
    #[serde(default)]
    pub value: Option<String>,
    /// When it happened, in epoch milliseconds (default: now).
    #[serde(default)]
    pub occurred_at: Option<i64>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// Records an outcome for `key` (an agent's key may only name its own requests and its org's
/// runs; the admin key any). `Ok((true, o))` when new, `(false, o)` when it was already there.
pub fn record_outcome(
    store: &Store,
    key: &KeyRecord,
    req: NewOutcome,
) -> Result<(bool, crate::store::Outcome), AdminError> {
    let bad = |m: String| Err(AdminError::Invalid(m));
    if req.id.is_empty() || req.id.len() > 128 || !req.id.chars().all(|c| c.is_ascii_graphic()) {
        return bad("id must be 1 to 128 visible ASCII characters".into());
    }
    validate_name("type", &req.kind)?;
    if req.tags.len() > 32 || req.tags.iter().any(|(k, v)| k.len() > 128 || v.len() > 256) {
        return bad("tags: at most 32, names up to 128 and values up to 256 bytes".into());
    }
    let value_micros = match &req.value {
        None => None,
        Some(v) => {
            let m = crate::money::parse_usd(v)
                .map_err(|e| AdminError::Invalid(format!("value: {e}")))?;
            if m < 0 {
                return bad("value: must not be negative".into());
            }
            Some(m)
        }
    };
    let now = now_ms();
    let timed = req.occurred_at.is_some();
    let occurred_ms = req.occurred_at.unwrap_or(now);
    if occurred_ms <= 0 || occurred_ms > now + 86_400_000 {
        return bad("occurred_at: epoch milliseconds, not in the future".into());
    }
    // Whose spend it is set against: the request's key, or the run's latest request's.
    let owner: Option<crate::records::UsageRecord> = match (&req.request_id, &req.run_id) {
        (Some(_), Some(_)) | (None, None) => {
            return bad("give exactly one of run_id and request_id".into())
        }
        (Some(r), None) => {
            let rec = store.usage_records(0, Some(r), 1)?.into_iter().next();
            match rec {
                None => return bad(format!("request_id: no request \"{r}\"")),
                Some(rec) if !key.admin && rec.key_id != key.id => {
                    return bad(format!("request_id: \"{r}\" is not a request of this key"))
                }
                Some(rec) => Some(rec),
            }
        }
        (None, Some(run)) => {
            let env = store.read(|c| Ok(crate::envelope::get(c, &format!("run:{run}"))?))?;
            let org = key.org.clone().unwrap_or_else(|| "default".into());
            match env {
                None => return bad(format!("run_id: no run \"{run}\"")),
                Some(e) if !key.admin && e.org != org => {
                    return bad(format!("run_id: \"{run}\" is not a run of this key's org"))
                }
                Some(_) => store
                    .find_records(&RecordFilter {
                        run: Some(run.clone()),
                        limit: 1,
                        ..RecordFilter::default()
                    })?
                    .into_iter()
                    .next(),
            }
        }
    };
    let o = crate::store::Outcome {
        id: req.id,
        occurred_ms,
        key_id: owner
            .as_ref()
            .map_or_else(|| key.id.clone(), |r| r.key_id.clone()),
        agent: owner
            .as_ref()
            .map_or_else(|| key.name.clone(), |r| r.agent.clone()),
        team: owner
            .as_ref()
            .map_or_else(|| key.team.clone(), |r| r.team.clone()),
        project: owner
            .as_ref()
            .map_or_else(|| key.project.clone(), |r| r.project.clone()),
        run_id: req.run_id,
        request_id: req.request_id,
        kind: req.kind,
        success: req.success,
        value_micros,
        tags: req.tags,
        created_ms: now,
    };
    match store.record_outcome(&o, timed)? {
        crate::store::Recorded::Created(o) => Ok((true, o)),
        crate::store::Recorded::Existing(o) => Ok((false, o)),
        crate::store::Recorded::Conflict(_) => Err(AdminError::Invalid(format!(
            "outcome \"{}\" was already recorded with different content; use a new id for a new outcome",
            o.id
        ))),
    }
}

/// One line of `tollgate savings`: what one group (a saver, a key, a team, ...) did not
/// spend, by saver, next to what it spent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavingsRow {
    pub group: String,
    /// What the group spent over the same window (`None` by saver: savers spend nothing).
    pub spend_micros: Option<u64>,
    pub saved_micros: u64,
    pub saved_tokens: u64,
    /// Saved over what it would have cost: saved / (spend + saved).
    pub saved_share: Option<f64>,
    pub savers: BTreeMap<String, SaverSums>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaverSums {
    /// Requests this saver saved something on.
    pub requests: u64,
    pub tokens: u64,
    pub micros: u64,
}

/// Tokens and USD saved since `since`, by saver (`by = "saver"`) or by key, team, org,
/// project, model or endpoint with each saver's share; the most saved first. From rollups,
/// so it starts on the hour of `since`.
pub fn savings_report(
    store: &Store,
    by: &str,
    since: Option<&str>,
) -> Result<Vec<SavingsRow>, AdminError> {
    let invalid = || {
        AdminError::Invalid(format!(
            "cannot group savings by \"{by}\": use saver, key, team, org, project, model or endpoint"
        ))
    };
    let group: Option<GroupBy> = match by {
        "saver" => None,
        _ => {
            let g: GroupBy = by.parse().map_err(|_| invalid())?;
            g.savings_dim().ok_or_else(invalid)?;
            Some(g)
        }
    };
    let since_ms = since_ms(since)?;
    let now = now_ms();
    let saved = store.savings_report(group.as_ref(), since_ms, now)?;
    let spend: BTreeMap<String, u64> = match &group {
        None => BTreeMap::new(),
        Some(g) => store
            .usage_report_from(g, since_ms, now, crate::store::ReportSource::Auto)?
            .into_iter()
            .map(|r| (r.group, r.cost_micros))
            .collect(),
    };
    let mut rows: BTreeMap<String, SavingsRow> = BTreeMap::new();
    for r in saved {
        let row = rows.entry(r.group.clone()).or_insert_with(|| SavingsRow {
            group: r.group.clone(),
            spend_micros: group
                .as_ref()
                .map(|_| spend.get(&r.group).copied().unwrap_or(0)),
            saved_micros: 0,
            saved_tokens: 0,
            saved_share: None,
            savers: BTreeMap::new(),
        });
        row.saved_micros = row.saved_micros.saturating_add(r.micros);
        row.saved_tokens = row.saved_tokens.saturating_add(r.tokens);
        let s = row.savers.entry(r.saver).or_default();
        s.requests += r.requests;
        s.tokens = s.tokens.saturating_add(r.tokens);
        s.micros = s.micros.saturating_add(r.micros);
    }
    let mut rows: Vec<SavingsRow> = rows.into_values().collect();
    for r in &mut rows {
        if let Some(spend) = r.spend_micros {
            let whole = spend.saturating_add(r.saved_micros);
            r.saved_share = (whole > 0).then(|| r.saved_micros as f64 / whole as f64);
        }
    }
    rows.sort_by(|a, b| {
        b.saved_micros
            .cmp(&a.saved_micros)
            .then(a.group.cmp(&b.group))
    });
    Ok(rows)
}

/// One line of `tollgate roi`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoiRow {
    pub group: String,
    pub outcomes: u64,
    pub successes: u64,
    /// Spend set against these outcomes (each request or run counted once).
    pub spend_micros: u64,
    pub cost_per_outcome_micros: Option<u64>,
    pub cost_per_success_micros: Option<u64>,
    pub value_micros: u64,
    /// Value bought per dollar spent.
    pub value_per_cost: Option<f64>,
}

/// Cost per outcome and per successful outcome since `since`, by agent, team, project, model
/// or type, and a last row `(no outcome)` with the spend no outcome accounts for.
pub fn roi_report(store: &Store, by: &str, since: Option<&str>) -> Result<Vec<RoiRow>, AdminError> {
    roi_by(by)?;
    let since_ms = since_ms(since)?;
    let spends = store.outcome_spends(since_ms, by == "model")?;
    let total: u64 = store
        .usage_report(&GroupBy::Endpoint, since_ms)?
        .iter()
        .map(|r| r.cost_micros)
        .sum();
    Ok(roi_rows(
        by,
        store.outcomes_since(since_ms)?,
        &spends,
        total,
    ))
}

/// Refuses a grouping the ROI report does not have.
pub fn roi_by(by: &str) -> Result<(), AdminError> {
    if !["agent", "team", "project", "model", "type"].contains(&by) {
        return Err(AdminError::Invalid(format!(
            "cannot group outcomes by \"{by}\": use agent, team, project, model or type"
        )));
    }
    Ok(())
}

/// The ROI report's rows from its parts, wherever they were read: the outcomes, the spend
/// each is set against (`Store::outcome_spends`), and all spend in the window.
pub fn roi_rows(
    by: &str,
    outcomes: Vec<crate::store::Outcome>,
    spends: &BTreeMap<String, crate::store::ModelSpend>,
    total: u64,
) -> Vec<RoiRow> {
    #[derive(Default)]
    struct Acc {
        outcomes: u64,
        successes: u64,
        value: u64,
        targets: BTreeMap<String, u64>,
    }
    let mut groups: BTreeMap<String, Acc> = BTreeMap::new();
    let mut attributed: BTreeMap<String, u64> = BTreeMap::new();
    for o in outcomes {
        let target = match (&o.request_id, &o.run_id) {
            (Some(r), _) => format!("req:{r}"),
            (None, Some(r)) => format!("run:{r}"),
            (None, None) => continue,
        };
        let spend = spends.get(&target).cloned().unwrap_or_default();
        let total: u64 = spend.iter().map(|(_, c)| *c).sum();
        attributed.insert(target.clone(), total);
        let names: Vec<(String, u64)> = match by {
            "agent" => vec![(o.agent.clone(), total)],
            "team" => vec![(o.team.clone().unwrap_or_else(|| "-".into()), total)],
            "project" => vec![(o.project.clone().unwrap_or_else(|| "-".into()), total)],
            "type" => vec![(o.kind.clone(), total)],
            _ if spend.is_empty() => vec![("-".into(), 0)],
            _ => spend,
        };
        for (name, cost) in names {
            let g = groups.entry(name).or_default();
            g.outcomes += 1;
            g.successes += u64::from(o.success);
            g.value = g
                .value
                .saturating_add(u64::try_from(o.value_micros.unwrap_or(0)).unwrap_or(0));
            g.targets.insert(target.clone(), cost);
        }
    }
    let per = |spend: u64, n: u64| (n > 0).then(|| spend / n);
    let mut rows: Vec<RoiRow> = groups
        .into_iter()
        .map(|(group, g)| {
            let spend: u64 = g.targets.values().sum();
            RoiRow {
                group,
                outcomes: g.outcomes,
                successes: g.successes,
                spend_micros: spend,
                cost_per_outcome_micros: per(spend, g.outcomes),
                cost_per_success_micros: per(spend, g.successes),
                value_micros: g.value,
                value_per_cost: (spend > 0).then(|| g.value as f64 / spend as f64),
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        b.spend_micros
            .cmp(&a.spend_micros)
            .then(a.group.cmp(&b.group))
    });
    rows.push(RoiRow {
        group: "(no outcome)".into(),
        outcomes: 0,
        successes: 0,
        spend_micros: total.saturating_sub(attributed.values().sum()),
        cost_per_outcome_micros: None,
        cost_per_success_micros: None,
        value_micros: 0,
        value_per_cost: None,
    });
    rows
}

/// `export focus`: FOCUS rows for charges in the window, as CSV or JSON lines.
pub fn focus_export(
    store: &Store,
    prices: &crate::prices::PriceTable,
    since: Option<&str>,
    until: Option<&str>,
    granularity: Option<&str>,
    format: Option<&str>,
) -> Result<(&'static str, String), AdminError> {
    let since_ms = time_ms("since", since.unwrap_or("30d"))?;
    let until_ms = match until {
        Some(u) => time_ms("until", u)?,
        None => now_ms() + 1,
    };
    let g = match granularity.unwrap_or("daily") {
        "daily" => crate::focus::Granularity::Daily,
        "hourly" => crate::focus::Granularity::Hourly,
        other => {
            return Err(AdminError::Invalid(format!(
                "granularity \"{other}\": use daily or hourly"
            )))
        }
    };
    let rows = crate::focus::export(store, prices, since_ms, until_ms, g)?;
    match format.unwrap_or("csv") {
        "csv" => Ok(("text/csv; charset=utf-8", crate::focus::csv(&rows))),
        "jsonl" => Ok(("application/x-ndjson", crate::focus::jsonl(&rows))),
        other => Err(AdminError::Invalid(format!(
            "format \"{other}\": use csv or jsonl"
        ))),
    }
}

// ---------------------------------------------------------------------------------------
// Approvals and the audit log

/// How long an approval granted from the CLI on a local store lasts (the gateway's
/// `[approvals] ttl` applies to those granted through its admin API).
pub const DEFAULT_APPROVAL_TTL: Duration = Duration::from_secs(15 * 60);

pub fn list_approvals(
    store: &Store,
    state: Option<&str>,
    limit: u32,
) -> Result<Vec<crate::approval::Approval>, AdminError> {
    if let Some(s) = state {
        if !["pending", "approved", "denied", "used"].contains(&s) {
            return Err(AdminError::Invalid(format!(
                "state must be pending, approved, denied or used, not \"{s}\""
            )));
        }
    }
    Ok(store.read(|c| crate::approval::list(c, state, limit))?)
}

pub fn show_approval(store: &Store, id: &str) -> Result<crate::approval::Approval, AdminError> {
    Ok(store.read(|c| crate::approval::get(c, id))?)
}

/// An approver's decision. `by` names the approver, as the audit log will.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Decision {
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
}

pub fn decide_approval(
    store: &Store,
    id: &str,
    approve: bool,
    by: &str,
    note: Option<&str>,
    ttl: Duration,
) -> Result<crate::approval::Approval, AdminError> {
    validate_name("by", by)?;
    if note.is_some_and(|n| n.len() > 2000) {
        return Err(AdminError::Invalid("note: at most 2000 characters".into()));
    }
    let ttl_ms = ttl.as_millis() as i64;
    match store.write(|tx| crate::approval::decide(tx, id, approve, by, note, ttl_ms, now_ms())) {
        Err(StoreError::Wallet(crate::wallet::WalletError::Invalid(m))) => {
            Err(AdminError::Invalid(m))
        }
        other => Ok(other?),
    }
}

pub fn audit_list(
    store: &Store,
    filter: &crate::audit::Filter,
) -> Result<Vec<crate::audit::Entry>, AdminError> {
    Ok(store.read(|c| Ok(crate::audit::list(c, filter)?))?)
}

pub fn audit_verify(store: &Store) -> Result<crate::audit::Verified, AdminError> {
    Ok(store.read(|c| Ok(crate::audit::verify(c)?))?)
}
