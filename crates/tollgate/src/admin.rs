//! The admin HTTP API (`/admin/*`, admin key only): thin handlers over the operations in
//! `ops.rs`, which the CLI shares.

pub use crate::ops::*;

use crate::clock::now_ms;
use crate::config::parse_duration;
use crate::error::{ApiError, ErrorKind};
use crate::keys::KeyLimits;
use crate::proxy::authenticate;
use crate::records::UsageRecord;
use crate::state::{refresh_keys, reload, AppState};
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::HeaderMap;
use serde::Deserialize;
use std::sync::Arc;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/keys", get(list_keys_h).post(create_key_h))
        .route("/keys/{id}/revoke", post(revoke_key_h))
        .route("/keys/{id}/rotate", post(rotate_key_h))
        .route("/keys/{id}/limits", put(key_limits_h))
        .route("/keys/{id}/tools", put(key_tools_h))
        .route("/teams", get(list_teams_h))
        .route("/teams/{name}", put(team_limits_h))
        .route("/wallets", get(list_wallets_h).post(create_wallet_h))
        .route("/wallets/verify", get(verify_wallets_h))
        .route("/wallets/{id}", get(show_wallet_h).put(configure_wallet_h))
        .route("/wallets/{id}/ledger", get(ledger_h))
        .route("/wallets/{id}/{kind}", post(credit_wallet_h))
        .route("/budgets", get(list_budgets_h).put(set_budget_h))
        .route("/runs/{id}", get(run_h).put(run_caps_h))
        .route("/usage", get(usage_h))
        .route("/usage/records", get(records_h))
        .route("/usage/prune", post(prune_h))
        .route("/usage/records/{id}/body", get(record_body_h))
        .route("/roi", get(roi_h))
        .route("/savings", get(savings_h))
        .route("/export/focus", get(focus_h))
        .route("/reconcile", get(reconcile_h))
        .route("/reload", post(reload_h))
        .route("/approvals", get(list_approvals_h))
        .route("/approvals/{id}", get(show_approval_h))
        .route("/approvals/{id}/{decision}", post(decide_approval_h))
        .route("/audit", get(audit_h))
        .route("/audit/verify", get(audit_verify_h))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ApprovalsQuery {
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
}

async fn list_approvals_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ApprovalsQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let v = blocking(&app, move |a| {
        crate::ops::list_approvals(&a.store, q.state.as_deref(), q.limit.unwrap_or(100))
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn show_approval_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let v = blocking(&app, move |a| crate::ops::show_approval(&a.store, &id)).await?;
    Ok(Json(v).into_response())
}

async fn decide_approval_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, decision)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let admin = authenticate(&app, &headers)?;
    require_admin(&app, &headers)?;
    let approve = match decision.as_str() {
        "approve" => true,
        "deny" => false,
        other => {
            return Err(ApiError::new(
                ErrorKind::NotFound,
                format!("no decision \"{other}\": approve or deny"),
            ))
        }
    };
    let d: crate::ops::Decision = if body.iter().all(u8::is_ascii_whitespace) {
        crate::ops::Decision::default()
    } else {
        json_body(&body)?
    };
    // Who decided, as the audit log keeps it: the person named, through which admin key.
    let by = match &d.by {
        Some(person) => format!("{person} (admin key {})", admin.name),
        None => format!("admin key {}", admin.name),
    };
    let ttl = app.runtime.load().approvals.ttl;
    let v = blocking(&app, move |a| {
        crate::ops::decide_approval(&a.store, &id, approve, &by, d.note.as_deref(), ttl)
    })
    .await?;
    Ok(Json(v).into_response())
}

async fn audit_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<crate::audit::Filter>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    // Policy decisions are written with usage records: commit what is queued first.
    app.meter.flush().await;
    let v = blocking(&app, move |a| crate::ops::audit_list(&a.store, &q)).await?;
    Ok(Json(v).into_response())
}

async fn audit_verify_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let v = blocking(&app, |a| crate::ops::audit_verify(&a.store)).await?;
    Ok(Json(v).into_response())
}

fn require_admin(app: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let key = authenticate(app, headers)?;
    if !key.admin {
        return Err(ApiError::new(
            ErrorKind::AdminOnly,
            "this endpoint needs the admin key",
        ));
    }
    Ok(())
}

pub(crate) async fn blocking<T: Send + 'static>(
    app: &Arc<AppState>,
    f: impl FnOnce(&AppState) -> Result<T, AdminError> + Send + 'static,
) -> Result<T, ApiError> {
    let app = app.clone();
    tokio::task::spawn_blocking(move || f(&app))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
        .map_err(ApiError::from)
}

/// An admin request body: a JSON object of the request's schema. serde would also take a
/// struct from an array (`["x"]` made a key named "x"), so anything but an object is refused.
fn json_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "the body must be a JSON object",
        ));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, format!("invalid JSON body: {e}")))
}

async fn list_keys_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let keys = blocking(&app, |a| {
        Ok(a.store
            .list_keys()?
            .into_iter()
            .map(view)
            .collect::<Vec<_>>())
    })
    .await?;
    Ok(Json(keys).into_response())
}

async fn create_key_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: NewKey = json_body(&body)?;
    let created = blocking(&app, move |a| create_key(&a.store, &a.secret, req)).await?;
    let _ = refresh_keys(&app).await;
    Ok((http::StatusCode::CREATED, Json(created)).into_response())
}

async fn revoke_key_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let v = blocking(&app, move |a| revoke_key(&a.store, &id)).await?;
    let _ = refresh_keys(&app).await;
    Ok(Json(v).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateReq {
    #[serde(default)]
    grace: Option<String>,
}

async fn rotate_key_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: RotateReq = if body.is_empty() {
        RotateReq::default()
    } else {
        json_body(&body)?
    };
    let grace = parse_duration(req.grace.as_deref().unwrap_or("24h"))
        .map_err(|e| ApiError::new(ErrorKind::BadRequest, e))?;
    let created = blocking(&app, move |a| rotate_key(&a.store, &a.secret, &id, grace)).await?;
    let _ = refresh_keys(&app).await;
    Ok((http::StatusCode::CREATED, Json(created)).into_response())
}

async fn key_limits_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let limits: KeyLimits = json_body(&body)?;
    let v = blocking(&app, move |a| set_key_limits(&a.store, &id, limits)).await?;
    let _ = refresh_keys(&app).await;
    Ok(Json(v).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyTools {
    tools: Vec<String>,
}

async fn key_tools_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: KeyTools = json_body(&body)?;
    let v = blocking(&app, move |a| set_key_tools(&a.store, &id, req.tools)).await?;
    let _ = refresh_keys(&app).await;
    Ok(Json(v).into_response())
}

async fn list_teams_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let teams = blocking(&app, |a| Ok(a.store.list_teams()?)).await?;
    Ok(Json(teams).into_response())
}

async fn team_limits_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let limits: KeyLimits = json_body(&body)?;
    let t = blocking(&app, move |a| set_team_limits(&a.store, &name, limits)).await?;
    let _ = refresh_keys(&app).await;
    Ok(Json(t).into_response())
}

async fn list_wallets_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let mut w = blocking(&app, |a| Ok(a.store.read(crate::wallet::list)?)).await?;
    for w in &mut w {
        with_holds_in_memory(&app, w);
    }
    Ok(Json(w).into_response())
}

async fn create_wallet_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: NewWallet = json_body(&body)?;
    let w = blocking(&app, move |a| create_wallet(&a.store, req)).await?;
    let _ = refresh_keys(&app).await;
    Ok((http::StatusCode::CREATED, Json(w)).into_response())
}

async fn show_wallet_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let mut w = blocking(&app, move |a| {
        Ok(a.store.read(|c| crate::wallet::find(c, &id))?)
    })
    .await?;
    with_holds_in_memory(&app, &mut w);
    let mut v = serde_json::to_value(&w).unwrap_or_default();
    if let Some(hot) = &app.hot {
        // What Redis admits against: the store's balance minus the holds of requests in
        // flight (null: Redis has not loaded this wallet yet, or does not answer).
        let avail = hot.available(&w.id).await.ok().flatten();
        if let Some(o) = v.as_object_mut() {
            o.insert("hot_balance_micros".into(), avail.into());
        }
    }
    Ok(Json(v).into_response())
}

/// A SQLite store's holds live in the writer's book until they settle (ADR 0036): what is
/// available and held counts them as the store's own open holds are counted.
pub(crate) fn with_holds_in_memory(app: &AppState, w: &mut crate::wallet::Wallet) {
    let open = app.meter.held_in_memory(&w.id);
    w.held_micros = w.held_micros.saturating_add(open);
    w.balance_micros = w.balance_micros.saturating_sub(open);
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WalletSettings {
    #[serde(default)]
    floor: Option<String>,
    #[serde(default)]
    low_balance: Option<String>,
}

async fn configure_wallet_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: WalletSettings = json_body(&body)?;
    let w = blocking(&app, move |a| {
        configure_wallet(&a.store, &id, req.floor, req.low_balance)
    })
    .await?;
    push_hot(&app, &w.id).await;
    Ok(Json(w).into_response())
}

/// Hot wallets: tells Redis about a change made here at once, instead of at the next
/// reconciliation (changes made by the CLI wait for that).
pub(crate) async fn push_hot(app: &Arc<AppState>, wallet_id: &str) {
    // Holds decided in memory read the store again before the next one.
    app.meter.wallets_changed();
    let Some(hot) = app.hot.clone() else { return };
    let id = wallet_id.to_string();
    let state = blocking(app, move |a| {
        Ok(a.store.read(|c| crate::wallet::state(c, &id))?)
    })
    .await;
    if let Ok((balance, floor, version)) = state {
        if let Err(e) = hot.push(wallet_id, balance, floor, version).await {
            tracing::debug!(error = %e, "hot wallet push failed; reconciliation will follow");
        }
    }
}

#[derive(Deserialize)]
struct LedgerQuery {
    limit: Option<u32>,
}

async fn ledger_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(q): Query<LedgerQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    // Captures are written with usage records: commit what is queued first.
    app.meter.flush().await;
    let limit = q.limit.unwrap_or(100).min(100_000);
    let entries = blocking(&app, move |a| {
        Ok(a.store.read(|c| {
            let w = crate::wallet::find(c, &id)?;
            crate::wallet::entries(c, &w.id, limit)
        })?)
    })
    .await?;
    Ok(Json(entries).into_response())
}

async fn verify_wallets_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let bad = blocking(&app, |a| Ok(a.store.read(crate::wallet::verify)?)).await?;
    let rows: Vec<_> = bad
        .into_iter()
        .map(|(id, balance, sum, floor)| {
            serde_json::json!({"wallet": id, "balance_micros": balance, "ledger_sum_micros": sum, "floor_micros": floor})
        })
        .collect();
    Ok(Json(serde_json::json!({"ok": rows.is_empty(), "mismatches": rows})).into_response())
}

async fn credit_wallet_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, kind)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let mut req: WalletCredit = json_body(&body)?;
    if req.idempotency_key.is_none() {
        req.idempotency_key = headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
    }
    let c = blocking(&app, move |a| credit_wallet(&a.store, &id, &kind, req)).await?;
    push_hot(&app, &c.wallet.id).await;
    let status = if c.applied {
        http::StatusCode::CREATED
    } else {
        http::StatusCode::OK
    };
    Ok((status, Json(c)).into_response())
}

async fn list_budgets_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let b = blocking(&app, |a| {
        Ok(a.store.read(|c| Ok(crate::envelope::budgets(c)?))?)
    })
    .await?;
    Ok(Json(b).into_response())
}

async fn set_budget_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: BudgetReq = json_body(&body)?;
    let b = blocking(&app, move |a| set_budget(&a.store, req)).await?;
    let _ = refresh_keys(&app).await;
    Ok(Json(b).into_response())
}

async fn run_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let r = blocking(&app, move |a| run_report(&a.store, &id)).await?;
    Ok(Json(r).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunCaps {
    #[serde(default)]
    cost: Option<String>,
    #[serde(default)]
    tokens: Option<i64>,
    #[serde(default)]
    calls: Option<i64>,
}

/// Sets a run's caps, creating the run (in the `default` org) if it does not exist yet.
async fn run_caps_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let req: RunCaps = json_body(&body)?;
    let cost = req
        .cost
        .as_deref()
        .map(|c| usd_arg("cost", c))
        .transpose()
        .map_err(ApiError::from)?;
    let r = blocking(&app, move |a| {
        let eid = format!("run:{id}");
        a.store.write(|tx| {
            tx.exec(
                "INSERT INTO envelopes (id, kind, org, created_ms) VALUES (?1, 'run', 'default', ?2)
                 ON CONFLICT(id) DO NOTHING",
                &[&eid, &now_ms()],
            )?;
            tx.exec(
                "UPDATE envelopes SET cap_cost_micros = ?2, cap_tokens = ?3, cap_calls = ?4 WHERE id = ?1",
                &[&eid, &cost, &req.tokens, &req.calls],
            )?;
            Ok(())
        })?;
        run_report(&a.store, &id)
    })
    .await?;
    Ok(Json(r).into_response())
}

/// ClickHouse, when it is configured and holds every record the store does (the sink's
/// queue sent, nothing spilled): reads go there, else to the store.
async fn clickhouse_caught_up(app: &AppState) -> Option<Arc<crate::analytics::ClickHouse>> {
    let a = app.analytics.as_ref()?;
    if a.sink.caught_up(std::time::Duration::from_secs(5)).await {
        Some(a.clickhouse.clone())
    } else {
        tracing::info!("clickhouse is behind the store (queue or spill); answering from the store");
        None
    }
}

/// The ROI report from ClickHouse: outcomes and spend from there, the run trees (envelopes,
/// money) from the store.
async fn roi_from_clickhouse(
    app: &Arc<AppState>,
    ch: &crate::analytics::ClickHouse,
    by: &str,
    since: Option<&str>,
) -> Result<Vec<crate::ops::RoiRow>, String> {
    let since_ms = crate::ops::since_ms(since).map_err(|e| e.to_string())?;
    let outcomes = ch.outcomes_since(since_ms).await?;
    let mut roots: Vec<String> = outcomes
        .iter()
        .filter(|o| o.request_id.is_none())
        .filter_map(|o| o.run_id.clone())
        .collect();
    roots.sort();
    roots.dedup();
    let trees = blocking(app, move |a| Ok(a.store.run_trees(&roots)?))
        .await
        .map_err(|e| e.message.to_string())?;
    let spends = ch.outcome_spends(&outcomes, &trees, since_ms).await?;
    let total: u64 = ch
        .usage_report(
            &crate::store::GroupBy::Endpoint,
            since_ms,
            crate::clock::now_ms(),
        )
        .await?
        .iter()
        .map(|r| r.cost_micros)
        .sum();
    Ok(crate::ops::roi_rows(by, outcomes, &spends, total))
}

/// The ROI report, from ClickHouse when it can answer, with where it came from.
pub(crate) async fn roi_answer(
    app: &Arc<AppState>,
    by: String,
    since: Option<String>,
) -> Result<(Vec<crate::ops::RoiRow>, &'static str), ApiError> {
    crate::ops::roi_by(&by)?;
    if let Some(ch) = clickhouse_caught_up(app).await {
        match roi_from_clickhouse(app, &ch, &by, since.as_deref()).await {
            Ok(rows) => return Ok((rows, "clickhouse")),
            Err(e) => {
                tracing::warn!(error = %e, "roi report from clickhouse failed; answering from the store")
            }
        }
    }
    let rows = blocking(app, move |a| roi_report(&a.store, &by, since.as_deref())).await?;
    Ok((rows, "store"))
}

fn with_source(mut resp: Response, source: &'static str) -> Response {
    resp.headers_mut().insert(
        "x-tollgate-report-source",
        axum::http::HeaderValue::from_static(source),
    );
    resp
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UsageQuery {
    by: Option<String>,
    since: Option<String>,
    /// `records` reads every record instead of the rollups (slow; for cross-checks).
    source: Option<String>,
}

async fn usage_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<UsageQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    if q.by.as_deref() == Some("outcome") {
        // Spend by what it bought: the ROI report by outcome type.
        let (rows, source) = roi_answer(&app, "type".into(), q.since.clone()).await?;
        return Ok(with_source(Json(rows).into_response(), source));
    }
    if q.by.as_deref() == Some("saver") {
        let rows = blocking(&app, move |a| {
            crate::ops::savings_report(&a.store, "saver", q.since.as_deref())
        })
        .await?;
        return Ok(Json(rows).into_response());
    }
    // Where the report starts: rollups start on the hour.
    let from = crate::ops::report_since(
        q.by.as_deref().unwrap_or("model"),
        q.since.as_deref(),
        q.source.as_deref(),
    );
    let (rows, source) = usage_rows(&app, q.by, q.since, q.source).await?;
    let mut resp = Json(rows).into_response();
    resp.headers_mut().insert(
        "x-tollgate-report-source",
        axum::http::HeaderValue::from_static(source),
    );
    if let Some(v) =
        from.and_then(|f| axum::http::HeaderValue::from_str(&crate::clock::rfc3339(f)).ok())
    {
        resp.headers_mut().insert("x-tollgate-report-since", v);
    }
    Ok(resp)
}

/// A usage report as `GET /admin/usage` gives it, and who answered: ClickHouse when it is
/// configured and caught up (and not told otherwise by `source`), else the store.
pub(crate) async fn usage_rows(
    app: &Arc<AppState>,
    by: Option<String>,
    since: Option<String>,
    source_q: Option<String>,
) -> Result<(Vec<crate::store::ReportRow>, &'static str), ApiError> {
    let ch = report_clickhouse(app, source_q.as_deref()).await;
    usage_rows_on(app, ch.as_deref(), by, since, source_q).await
}

/// Whether ClickHouse answers this report: configured, caught up, and not told otherwise by
/// `source`. A page of several reports asks once.
pub(crate) async fn report_clickhouse(
    app: &Arc<AppState>,
    source_q: Option<&str>,
) -> Option<Arc<crate::analytics::ClickHouse>> {
    match source_q {
        None | Some("auto" | "rollups") => clickhouse_caught_up(app).await,
        _ => None,
    }
}

/// `usage_rows` with the ClickHouse decision already made (`report_clickhouse`).
pub(crate) async fn usage_rows_on(
    app: &Arc<AppState>,
    ch: Option<&crate::analytics::ClickHouse>,
    by: Option<String>,
    since: Option<String>,
    source_q: Option<String>,
) -> Result<(Vec<crate::store::ReportRow>, &'static str), ApiError> {
    // With ClickHouse configured it answers (the store does, should it fail: the store
    // holds every record ClickHouse does).
    let mut source = "store";
    let mut rows = None;
    if let Some(ch) = ch {
        let by: crate::store::GroupBy = by
            .as_deref()
            .unwrap_or("model")
            .parse()
            .map_err(|e: String| ApiError::new(ErrorKind::BadRequest, e))?;
        let since = crate::ops::since_ms(since.as_deref())
            .map_err(|e| ApiError::new(ErrorKind::BadRequest, e.to_string()))?;
        match ch.usage_report(&by, since, crate::clock::now_ms()).await {
            Ok(r) => {
                rows = Some(r);
                source = "clickhouse";
            }
            Err(e) => {
                tracing::warn!(error = %e, "usage report from clickhouse failed; answering from the store")
            }
        }
    }
    let rows = match rows {
        Some(r) => r,
        None => {
            blocking(app, move |a| {
                usage_report(
                    &a.store,
                    by.as_deref().unwrap_or("model"),
                    since.as_deref(),
                    source_q.as_deref(),
                )
            })
            .await?
        }
    };
    Ok((rows, source))
}

/// A page of the request log, and who answered: ClickHouse when configured and caught up
/// (and its rows have every column the log shows), else the store.
pub(crate) async fn request_log(
    app: &Arc<AppState>,
    filter: crate::store::RecordFilter,
) -> Result<(Vec<UsageRecord>, &'static str), ApiError> {
    let mut source = "store";
    let mut found = None;
    if let Some(ch) = clickhouse_caught_up(app).await {
        match ch.find_records(&filter).await {
            Ok(Some(rows)) => {
                found = Some(rows);
                source = "clickhouse";
            }
            Ok(None) => tracing::info!(
                "the request log's page has rows clickhouse took before schema version 8; answering from the store"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "request log from clickhouse failed; answering from the store")
            }
        }
    }
    let rows: Vec<UsageRecord> = match found {
        Some(rows) => rows,
        None => blocking(app, move |a| Ok(a.store.find_records(&filter)?)).await?,
    };
    Ok((rows, source))
}

/// The request log: `LOG_FILTERS` as query parameters, newest first; a full page carries
/// `x-tollgate-next-cursor` for the next one.
async fn records_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let filter = record_filter(&pairs)?;
    // Read-your-writes for operators and tests: whatever was queued is committed first.
    app.meter.flush().await;
    let limit = filter.limit;
    let (rows, source) = request_log(&app, filter).await?;
    let cursor = next_cursor(&rows, limit);
    // Each record with why it ended, in words.
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            v["why"] = serde_json::Value::String(why(r));
            v
        })
        .collect();
    let mut resp = with_source(Json(rows).into_response(), source);
    if let Some(v) = cursor.and_then(|c| axum::http::HeaderValue::from_str(&c).ok()) {
        resp.headers_mut().insert("x-tollgate-next-cursor", v);
    }
    Ok(resp)
}

/// The bodies `[logging] bodies` kept with a record.
async fn record_body_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let found = blocking(&app, move |a| Ok(a.store.record_bodies(&id)?)).await?;
    match found {
        Some(b) => Ok(Json(b).into_response()),
        None => Err(ApiError::new(
            ErrorKind::NotFound,
            "no bodies kept for this request (they are kept only with [logging] bodies = true)",
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneQuery {
    /// Records older than this go, e.g. 90d (rollups stay).
    older_than: String,
}

/// Deletes usage records older than `older_than` now, as `[metering] retain_records` does
/// hourly.
async fn prune_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<PruneQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let before = since_ms(Some(&q.older_than))?;
    let deleted = blocking(&app, move |a| Ok(a.store.prune_records(before)?)).await?;
    Ok(Json(serde_json::json!({ "deleted": deleted })).into_response())
}

/// `POST /v1/outcomes`, with an agent's key or the admin key: records what a run or a
/// request bought. 201 when new, 200 when the same outcome was recorded before.
pub async fn outcomes_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = authenticate(&app, &headers)?;
    let req: NewOutcome = json_body(&body)?;
    // The outcome may name a request that finished a moment ago: its record first.
    app.meter.flush().await;
    let (created, o) = blocking(&app, move |a| record_outcome(&a.store, &key, req)).await?;
    if let (true, Some(a)) = (created, &app.analytics) {
        a.sink.offer_outcome(&o);
    }
    let status = if created {
        http::StatusCode::CREATED
    } else {
        http::StatusCode::OK
    };
    Ok((status, Json(o)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoiQuery {
    by: Option<String>,
    since: Option<String>,
}

async fn roi_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<RoiQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let by = q.by.unwrap_or_else(|| "agent".into());
    let (rows, source) = roi_answer(&app, by, q.since).await?;
    Ok(with_source(Json(rows).into_response(), source))
}

/// Tokens and USD saved, by saver or by a usage dimension (`ops::savings_report`).
async fn savings_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<RoiQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let rows = blocking(&app, move |a| {
        savings_report(
            &a.store,
            q.by.as_deref().unwrap_or("saver"),
            q.since.as_deref(),
        )
    })
    .await?;
    Ok(Json(rows).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FocusQuery {
    since: Option<String>,
    until: Option<String>,
    granularity: Option<String>,
    format: Option<String>,
}

/// FinOps FOCUS Cost and Usage rows (see `focus.rs`), priced with the running table.
async fn focus_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FocusQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let (content_type, body) = blocking(&app, move |a| {
        let runtime = a.runtime.load();
        focus_export(
            &a.store,
            &runtime.prices,
            q.since.as_deref(),
            q.until.as_deref(),
            q.granularity.as_deref(),
            q.format.as_deref(),
        )
    })
    .await?;
    Ok(([(http::header::CONTENT_TYPE, content_type)], body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReconcileQuery {
    provider: String,
    since: Option<String>,
    until: Option<String>,
    /// Percent of the provider's count a row may drift by (default 1).
    threshold: Option<f64>,
}

/// What tollgate metered for a provider against that provider's usage report.
async fn reconcile_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<ReconcileQuery>,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    app.meter.flush().await;
    let r = reconcile_provider(
        &app,
        &q.provider,
        q.since.as_deref(),
        q.until.as_deref(),
        q.threshold,
    )
    .await?;
    Ok(Json(r).into_response())
}

/// Reconciles one configured provider over a window (the admin API and the scheduled run).
pub async fn reconcile_provider(
    app: &Arc<AppState>,
    provider: &str,
    since: Option<&str>,
    until: Option<&str>,
    threshold: Option<f64>,
) -> Result<crate::reconcile::Reconciliation, ApiError> {
    let runtime = app.runtime.load_full();
    let Some(p) = runtime
        .providers
        .iter()
        .find(|p| p.name == provider)
        .cloned()
    else {
        return Err(ApiError::new(
            ErrorKind::NotFound,
            format!("no provider \"{provider}\" is configured"),
        ));
    };
    let since_ms = time_ms("since", since.unwrap_or("1d")).map_err(ApiError::from)?;
    let until_ms = match until {
        Some(u) => time_ms("until", u).map_err(ApiError::from)?,
        None => now_ms() + 1,
    };
    let threshold = threshold.unwrap_or(1.0);
    if !(0.0..=100.0).contains(&threshold) {
        return Err(ApiError::new(
            ErrorKind::BadRequest,
            "threshold: a percentage from 0 to 100",
        ));
    }
    let name = p.name.clone();
    let ours = blocking(app, move |a| {
        crate::reconcile::metered(&a.store, &name, since_ms, until_ms).map_err(AdminError::Invalid)
    })
    .await?;
    let mut theirs = crate::reconcile::reported(&p, since_ms, until_ms)
        .await
        .map_err(|e| ApiError::new(ErrorKind::UpstreamError, e))?;
    let cost_error = crate::reconcile::reported_costs(&p, since_ms, until_ms, &mut theirs)
        .await
        .err();
    Ok(crate::reconcile::compare(
        &p.name, since_ms, until_ms, threshold, &ours, &theirs, cost_error,
    ))
}

async fn reload_h(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_admin(&app, &headers)?;
    let app2 = app.clone();
    let result = tokio::task::spawn_blocking(move || reload(&app2))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    match result {
        Ok(()) => Ok(Json(serde_json::json!({"reloaded": true})).into_response()),
        Err(problems) => Err(ApiError::new(
            ErrorKind::BadRequest,
            format!("configuration not reloaded: {}", problems.join("; ")),
        )),
    }
}
