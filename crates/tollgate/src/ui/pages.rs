//! The dashboard's pages. Each reads through the functions the admin API uses (`ops`,
//! `admin::usage_rows`, `admin::request_log`, `admin::roi_answer`), so a number on a page is
//! the number `tollgate usage` or `GET /admin/…` gives, from ClickHouse or the store alike.

use super::chart::{self, Bar};
use super::html::{esc, group, link, q, table, usd};
use super::{check_change, error_page, field, form, page, see_other, signed_in, Refused, Session};
use crate::admin::{
    blocking, push_hot, report_clickhouse, request_log, roi_answer, usage_rows, usage_rows_on,
};
use crate::clock::now_ms;
use crate::error::ApiError;
use crate::state::{refresh_keys, AppState};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use http::{HeaderMap, StatusCode};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

type Pairs = Query<Vec<(String, String)>>;

/// Whether a record (status, error kind) is one a refusal share counts.
type Hit = fn(u16, Option<&str>) -> bool;

/// A page, or the page that says why not (sign in first, a refused change, an error).
type Page = Result<Response, Refused>;

const DAY_MS: i64 = 86_400_000;
const HOUR_MS: i64 = 3_600_000;

/// A change's session and form, once it is known to come from a page of ours.
fn change(
    app: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Session, Vec<(String, String)>), Refused> {
    let s = signed_in(app, headers)?;
    let f = form(body);
    check_change(headers, &s, &f)?;
    Ok((s, f))
}

fn failed(e: ApiError) -> Refused {
    error_page(e.status(), &e.message).into()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// The ranges the pickers offer, as `since` values and in days.
const RANGES: &[(&str, i64)] = &[("7d", 7), ("30d", 30), ("90d", 90)];

fn range_of(pairs: &[(String, String)]) -> (&'static str, i64) {
    let want = param(pairs, "range").unwrap_or("7d");
    RANGES
        .iter()
        .find(|(r, _)| *r == want)
        .copied()
        .unwrap_or(RANGES[0])
}

/// Range links: `base` ends in `?` or `&`.
fn picker(base: &str, current: &str) -> String {
    let mut s = String::from("<nav class=\"ranges\" aria-label=\"Time range\">");
    for (r, _) in RANGES {
        let cur = if *r == current {
            " aria-current=\"true\""
        } else {
            ""
        };
        let _ = write!(s, "<a href=\"{}range={r}\"{cur}>last {r}</a>", esc(base));
    }
    s.push_str("</nav>");
    s
}

fn day_label(ms: i64) -> String {
    crate::clock::rfc3339(ms)[..10].to_string()
}

/// The agent's name and key id from a report row's `agent (key_…)` label.
fn key_of(label: &str) -> &str {
    label
        .rsplit_once(" (")
        .map(|(_, id)| id.trim_end_matches(')'))
        .unwrap_or(label)
}

fn share(n: usize, of: usize) -> String {
    if of == 0 {
        "–".into()
    } else {
        format!("{:.1} %", n as f64 * 100.0 / of as f64)
    }
}

pub async fn overview(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Pairs) -> Page {
    let s = signed_in(&app, &headers)?;
    let body = overview_body(&app, &p.0).await.map_err(failed)?;
    Ok(page(&s, "Overview", "Overview", &body))
}

async fn overview_body(
    app: &Arc<AppState>,
    pairs: &[(String, String)],
) -> Result<String, ApiError> {
    app.meter.flush().await;
    let (range, days) = range_of(pairs);
    let now = now_ms();
    let start = (now - (days - 1) * DAY_MS).div_euclid(DAY_MS) * DAY_MS;
    let since = Some(start.to_string());
    // One decision for the page's six reports: ClickHouse (caught up) or the store.
    let ch = report_clickhouse(app, None).await;
    let ch = ch.as_deref();
    let (by_day, source) = usage_rows_on(app, ch, Some("day".into()), since.clone(), None).await?;
    let spent: u64 = by_day.iter().map(|r| r.cost_micros).sum();
    let requests: u64 = by_day.iter().map(|r| r.requests).sum();
    let errors: u64 = by_day.iter().map(|r| r.errors).sum();
    let per_day: BTreeMap<&str, u64> = by_day
        .iter()
        .map(|r| (r.group.as_str(), r.cost_micros))
        .collect();
    let bars: Vec<Bar> = (0..days)
        .map(|i| {
            let d = start + i * DAY_MS;
            let label = day_label(d);
            Bar {
                micros: per_day.get(label.as_str()).copied().unwrap_or(0),
                href: format!("/ui/requests?since={d}&until={}", d + DAY_MS),
                label,
            }
        })
        .collect();
    // Burn: the last 24 hours; projection: this month so far, at its pace.
    let (last_day, _) = usage_rows_on(
        app,
        ch,
        Some("endpoint".into()),
        Some((now - DAY_MS).to_string()),
        None,
    )
    .await?;
    let burn: u64 = last_day.iter().map(|r| r.cost_micros).sum();
    let month_start = month_start_ms(now);
    let (month, _) = usage_rows_on(
        app,
        ch,
        Some("endpoint".into()),
        Some(month_start.max(1).to_string()),
        None,
    )
    .await?;
    let month_spent: u64 = month.iter().map(|r| r.cost_micros).sum();
    let month_end = month_start_ms(month_start + 32 * DAY_MS);
    let elapsed = (now - month_start).max(3_600_000) as f64;
    let projected = (month_spent as f64 * (month_end - month_start) as f64 / elapsed) as u64;

    let mut body = picker("/ui?", range);
    let keys = blocking(app, |a| Ok(a.store.list_keys()?)).await?;
    if !keys.iter().any(|k| k.is_agent()) {
        body.push_str(
            "<section class=\"empty\"><h2>Start here</h2><p>No agent has a key yet. \
             <a href=\"/ui/keys\">Create the first agent key</a>, then point the agent's SDK at \
             this gateway's URL with that key; its requests and their spend show up here.</p></section>",
        );
    } else if requests == 0 {
        body.push_str(
            "<section class=\"empty\"><h2>No traffic yet</h2><p>No request in this range. An agent \
             sends its usual SDK calls to this gateway (base URL <code>http://&lt;gateway&gt;/v1</code>) \
             with its key; each one appears on the <a href=\"/ui/requests\">request log</a>.</p></section>",
        );
    }
    let _ = write!(
        body,
        "<div class=\"tiles\">\
         <a class=\"tile\" href=\"/ui/requests?since={start}\"><span>Spend, last {range}</span><strong data-testid=\"spend\">{}</strong></a>\
         <div class=\"tile\"><span>Burn rate</span><strong>{}/h</strong><small>{} in the last 24 h</small></div>\
         <div class=\"tile\"><span>This month, projected</span><strong>{}</strong><small>{} so far</small></div>\
         <a class=\"tile\" href=\"/ui/requests?since={start}\"><span>Requests</span><strong data-testid=\"requests\">{}</strong><small>{} errors</small></a>\
         </div>",
        usd(spent as i64),
        usd((burn / 24) as i64),
        usd(burn as i64),
        usd(projected as i64),
        usd(month_spent as i64),
        group(requests),
        group(errors),
    );
    body.push_str("<h2>Spend per day</h2>");
    body.push_str(&chart::bars(&format!("Spend per day, last {range}"), &bars));
    // The last 24 hours by the hour, from the hourly rollup.
    let hour0 = crate::store::report_start(now) - 23 * HOUR_MS;
    let hours = blocking(app, move |a| Ok(a.store.hourly_spend(hour0)?)).await?;
    let per_hour: BTreeMap<i64, u64> = hours.iter().map(|(h, c, _)| (*h, *c)).collect();
    let hour_bars: Vec<Bar> = (0..24)
        .map(|i| {
            let h = hour0 + i * HOUR_MS;
            Bar {
                micros: per_hour.get(&h).copied().unwrap_or(0),
                href: format!("/ui/requests?since={h}&until={}", h + HOUR_MS),
                label: format!("{}:00", &crate::clock::rfc3339(h)[11..13]),
            }
        })
        .collect();
    body.push_str("<h2>Spend per hour, last 24 h (UTC)</h2>");
    body.push_str(&chart::bars("Spend per hour, last 24 hours", &hour_bars));

    // Refusals and failures, over the newest 10 000 requests of the range.
    let recent = blocking(app, move |a| Ok(a.store.recent_statuses(start, 10_000)?)).await?;
    let n = recent.len();
    let count = |f: Hit| recent.iter().filter(|(st, k)| f(*st, k.as_deref())).count();
    // Each share counts what its link's log filter finds, so the number and the rows agree.
    let shares: [(&str, &str, Hit); 5] = [
        ("402 out of money", "status=402", |st, _| st == 402),
        ("429 rate limited", "status=429", |st, _| st == 429),
        ("loops", "error_kind=loop_detected", |_, k| {
            k == Some("loop_detected")
        }),
        (
            "retry storms",
            "error_kind=retry_budget_exhausted",
            |_, k| k == Some("retry_budget_exhausted"),
        ),
        (
            "5xx: upstream trouble, gateway errors",
            "status=5xx",
            |st, _| (500..600).contains(&st),
        ),
    ];
    let rows: Vec<Vec<String>> = shares
        .iter()
        .map(|(what, filter, hit)| {
            let k = count(*hit);
            vec![
                esc(what),
                share(k, n),
                link(
                    &format!("/ui/requests?since={start}&{filter}"),
                    &group(k as u64),
                ),
            ]
        })
        .collect();
    let _ = write!(
        body,
        "<h2>Refusals and failures</h2><p class=\"hint\">Of the newest {} requests in the range.</p>{}",
        group(n as u64),
        table(&["", "share", "requests"], &rows)
    );

    // Where the money went.
    body.push_str("<div class=\"columns\">");
    for (by, title, filter) in [
        ("key", "Top agents", "key"),
        ("team", "Top teams", "team"),
        ("model", "Top models", "model"),
    ] {
        let (rows, _) = usage_rows_on(app, ch, Some(by.into()), since.clone(), None).await?;
        let rows: Vec<Vec<String>> = rows
            .iter()
            .take(8)
            .map(|r| {
                let value = if by == "key" {
                    key_of(&r.group)
                } else {
                    &r.group
                };
                vec![
                    link(
                        &format!("/ui/requests?since={start}&{filter}={}", q(value)),
                        &r.group,
                    ),
                    esc(&usd(r.cost_micros as i64)),
                    esc(&group(r.requests)),
                ]
            })
            .collect();
        let _ = write!(
            body,
            "<section><h2>{title}</h2>{}</section>",
            table(&["", "spend", "requests"], &rows)
        );
    }
    body.push_str("</div>");

    let savings = blocking(app, move |a| {
        crate::ops::savings_report(&a.store, "saver", Some(&start.to_string()))
    })
    .await?;
    let saved: Vec<Vec<String>> = savings
        .iter()
        .filter(|r| r.saved_micros > 0 || r.saved_tokens > 0)
        .map(|r| {
            vec![
                esc(&r.group),
                esc(&usd(r.saved_micros as i64)),
                esc(&group(r.saved_tokens)),
            ]
        })
        .collect();
    if !saved.is_empty() {
        let _ = write!(
            body,
            "<h2>Saved</h2>{}",
            table(&["saver", "saved", "tokens"], &saved)
        );
    }

    let mut wallets = blocking(app, |a| Ok(a.store.read(crate::wallet::list)?)).await?;
    for w in &mut wallets {
        crate::admin::with_holds_in_memory(app, w);
    }
    let low: Vec<Vec<String>> = wallets
        .iter()
        .filter(|w| {
            let available = w.balance_micros.saturating_sub(w.floor_micros);
            w.low_balance_micros.is_some_and(|l| w.balance_micros < l) || available < 1_000_000
        })
        .map(|w| {
            vec![
                link(
                    &format!("/ui/wallets/{}", q(&w.id)),
                    &format!("{}:{}", w.owner_kind.as_str(), w.owner),
                ),
                esc(&usd(w.balance_micros)),
                esc(&usd(w.floor_micros)),
            ]
        })
        .collect();
    if !low.is_empty() {
        let _ = write!(
            body,
            "<h2>Wallets near their floor</h2>{}",
            table(&["wallet", "balance", "floor"], &low)
        );
    }
    let _ = write!(body, "<p class=\"source\">Reports from {source}.</p>");
    Ok(body)
}

/// The request log of what a wallet pays for: its key's or team's requests (an org wallet
/// pays for every key of the org, which the log does not filter on).
fn owner_requests(w: &crate::wallet::Wallet) -> String {
    match w.owner_kind {
        crate::wallet::OwnerKind::Key => format!("/ui/requests?key={}", q(&w.owner)),
        crate::wallet::OwnerKind::Team => format!("/ui/requests?team={}", q(&w.owner)),
        crate::wallet::OwnerKind::Org => "/ui/requests".into(),
    }
}

/// Midnight UTC of the first day of `ms`'s month.
fn month_start_ms(ms: i64) -> i64 {
    let day = ms.div_euclid(DAY_MS);
    let (y, m, _) = crate::clock::civil(day);
    crate::clock::days_from_civil(y, m, 1) * DAY_MS
}

// ---------------------------------------------------------------------------------------
// Agents and keys

pub async fn keys(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Page {
    let s = signed_in(&app, &headers)?;
    let body = keys_body(&app, &s, None).await.map_err(failed)?;
    Ok(page(&s, "Agents and keys", "Agents and keys", &body))
}

async fn keys_body(
    app: &Arc<AppState>,
    s: &Session,
    created: Option<(&str, &str, &str)>,
) -> Result<String, ApiError> {
    app.meter.flush().await;
    let keys = blocking(app, |a| Ok(a.store.list_keys()?)).await?;
    let (spend, _) = usage_rows(
        app,
        Some("key".into()),
        Some((now_ms() - 30 * DAY_MS).to_string()),
        None,
    )
    .await?;
    let spend: BTreeMap<&str, u64> = spend
        .iter()
        .map(|r| (key_of(&r.group), r.cost_micros))
        .collect();
    let mut body = String::new();
    if let Some((name, id, secret)) = created {
        let _ = write!(
            body,
            "<section class=\"notice\" role=\"status\"><h2>Key for {} created</h2>\
             <p>Key id <code data-testid=\"key-id\">{}</code>. Its secret, shown this once (the \
             gateway keeps only a digest):</p>\
             <p><code class=\"secret\" data-testid=\"secret\">{}</code></p>\
             <p>Give it a wallet: <a href=\"/ui/wallets\">Wallets</a>, owner <code>key:{}</code>.</p></section>",
            esc(name),
            esc(id),
            esc(secret),
            esc(id)
        );
    }
    let csrf = esc(&s.csrf);
    if !s.viewer {
        let _ = write!(
            body,
            "<details class=\"panel\"{open}><summary>Create an agent key</summary>\
             <form method=\"post\" action=\"/ui/keys\" class=\"grid\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Name <input name=\"name\" required maxlength=\"128\" placeholder=\"research-agent\"></label>\
             <label>Team <input name=\"team\" maxlength=\"128\"></label>\
             <label>Requests per minute <input name=\"rpm\" inputmode=\"numeric\"></label>\
             <label>Tokens per minute <input name=\"tpm\" inputmode=\"numeric\"></label>\
             <label>In flight at once <input name=\"concurrency\" inputmode=\"numeric\"></label>\
             <label>Expires after <input name=\"expires\" placeholder=\"30d\"></label>\
             <label class=\"check\"><input type=\"checkbox\" name=\"viewer\" value=\"1\"> Read-only dashboard key (a person who only looks; no API)</label>\
             <button type=\"submit\">Create key</button></form></details>",
            open = if keys.iter().any(|k| k.is_agent()) { "" } else { " open" },
        );
    }
    let now = now_ms();
    let rows: Vec<Vec<String>> = keys
        .into_iter()
        .map(|k| {
            let view = crate::ops::view(k);
            let k = &view.key;
            let wallet = app
                .keys
                .wallet_for(k)
                .map(|w| link(&format!("/ui/wallets/{}", q(&w)), &w))
                .unwrap_or_else(|| "–".into());
            let limits = [
                k.limits.rpm.map(|v| format!("{v} rpm")),
                k.limits.tpm.map(|v| format!("{v} tpm")),
                k.limits.concurrency.map(|v| format!("{v} at once")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ");
            let status = match view.status {
                crate::records::KeyStatus::Active if view.rotating_until_ms.is_some_and(|t| t > now) => {
                    "rotating"
                }
                crate::records::KeyStatus::Active => "active",
                crate::records::KeyStatus::Expired => "expired",
                crate::records::KeyStatus::Revoked => "revoked",
            };
            let id = q(&k.id);
            let actions = if view.status == crate::records::KeyStatus::Active && !k.admin && !s.viewer {
                // A viewer's key calls nothing, so it has no limits to set.
                let limits_form = if k.viewer {
                    String::new()
                } else {
                    format!(
                        "<form method=\"post\" action=\"/ui/keys/{id}/limits\" class=\"inline\">\
                         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                         <input name=\"rpm\" aria-label=\"rpm\" placeholder=\"rpm\" size=\"6\" value=\"{}\">\
                         <input name=\"tpm\" aria-label=\"tpm\" placeholder=\"tpm\" size=\"8\" value=\"{}\">\
                         <button type=\"submit\">Set limits</button></form>",
                        k.limits.rpm.map(|v| v.to_string()).unwrap_or_default(),
                        k.limits.tpm.map(|v| v.to_string()).unwrap_or_default(),
                    )
                };
                format!(
                    "{limits_form}<form method=\"post\" action=\"/ui/keys/{id}/rotate\" class=\"inline\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\">Rotate</button></form>\
                     <form method=\"post\" action=\"/ui/keys/{id}/revoke\" class=\"inline\" data-confirm=\"Revoke {}? Its agent stops at once.\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\"><button type=\"submit\" class=\"danger\">Revoke</button></form>",
                    esc(&k.name),
                )
            } else {
                String::new()
            };
            vec![
                link(&format!("/ui/requests?key={id}"), &k.name),
                esc(k.team.as_deref().unwrap_or("–")),
                format!("<code>{}</code>", esc(&k.prefix)),
                esc(status),
                esc(&usd(spend.get(k.id.as_str()).copied().unwrap_or(0) as i64)),
                esc(if limits.is_empty() { "defaults" } else { &limits }),
                wallet,
                match (k.admin, k.viewer) {
                    (true, _) => "admin".into(),
                    (_, true) => format!("viewer {actions}"),
                    _ => actions,
                },
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "agent",
            "team",
            "key",
            "status",
            "spend 30 d",
            "limits",
            "wallet",
            "",
        ],
        &rows,
    ));
    Ok(body)
}

fn num<T: std::str::FromStr>(f: &[(String, String)], name: &str) -> Result<Option<T>, Refused> {
    match field(f, name) {
        None => Ok(None),
        Some(v) => v.parse::<T>().map(Some).map_err(|_| {
            error_page(
                StatusCode::BAD_REQUEST,
                &format!("{name}: \"{v}\" is not a whole number."),
            )
            .into()
        }),
    }
}

pub async fn create_key(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Page {
    let (s, f) = change(&app, &headers, &body)?;
    let req = crate::ops::NewKey {
        name: field(&f, "name").unwrap_or_default().to_string(),
        team: field(&f, "team").map(str::to_string),
        expires: field(&f, "expires").map(str::to_string),
        rpm: num(&f, "rpm")?,
        tpm: num(&f, "tpm")?,
        concurrency: num(&f, "concurrency")?,
        viewer: field(&f, "viewer").is_some(),
        ..Default::default()
    };
    let created = blocking(&app, move |a| {
        crate::ops::create_key(&a.store, &a.secret, req)
    })
    .await
    .map_err(failed)?;
    let _ = refresh_keys(&app).await;
    let k = &created.key.key;
    let body = keys_body(&app, &s, Some((&k.name, &k.id, &created.secret)))
        .await
        .map_err(failed)?;
    let mut r = page(&s, "Agents and keys", "Agents and keys", &body);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

pub async fn key_action(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Page {
    let (s, f) = change(&app, &headers, &body)?;
    let result = match action.as_str() {
        "revoke" => blocking(&app, move |a| crate::ops::revoke_key(&a.store, &id))
            .await
            .map(|_| None),
        "rotate" => {
            let grace = crate::config::parse_duration(field(&f, "grace").unwrap_or("24h"))
                .map_err(|e| Refused::from(error_page(StatusCode::BAD_REQUEST, &e)))?;
            blocking(&app, move |a| {
                crate::ops::rotate_key(&a.store, &a.secret, &id, grace)
            })
            .await
            .map(|c| Some((c.key.key.name, c.key.key.id, c.secret)))
        }
        "limits" => {
            let limits = crate::keys::KeyLimits {
                rpm: num(&f, "rpm")?,
                tpm: num(&f, "tpm")?,
                concurrency: num(&f, "concurrency")?,
                ..Default::default()
            };
            blocking(&app, move |a| {
                crate::ops::set_key_limits(&a.store, &id, limits)
            })
            .await
            .map(|_| None)
        }
        _ => return Err(error_page(StatusCode::NOT_FOUND, "No such action on a key.").into()),
    };
    let shown = result.map_err(failed)?;
    let _ = refresh_keys(&app).await;
    match shown {
        None => Ok(see_other("/ui/keys")),
        Some((name, id, secret)) => {
            let body = keys_body(&app, &s, Some((&name, &id, &secret)))
                .await
                .map_err(failed)?;
            Ok(page(&s, "Agents and keys", "Agents and keys", &body))
        }
    }
}

// ---------------------------------------------------------------------------------------
// Wallets

pub async fn wallets(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Page {
    let s = signed_in(&app, &headers)?;
    app.meter.flush().await;
    let (wallets, budgets) = blocking(&app, |a| {
        let now = now_ms();
        Ok((
            a.store.read(crate::wallet::list)?,
            // Each budget with its current period's envelope: what it spent and holds.
            a.store.read(|c| {
                let mut out = Vec::new();
                for b in crate::envelope::budgets(c)? {
                    let env = crate::envelope::get(c, &b.spec("", now).id)?;
                    out.push((b, env));
                }
                Ok(out)
            })?,
        ))
    })
    .await
    .map_err(failed)?;
    let mut wallets = wallets;
    for w in &mut wallets {
        crate::admin::with_holds_in_memory(&app, w);
    }
    let mut body = String::new();
    if wallets.is_empty() {
        body.push_str(
            "<section class=\"empty\"><h2>No wallets yet</h2><p>Without a wallet, agents spend \
             without a cap. Create one for an agent's key (<code>key:KEY_ID</code>), a team \
             (<code>team:NAME</code>) or the organisation (<code>org:default</code>), then top it \
             up: requests it cannot pay for are refused with 402.</p></section>",
        );
    }
    if !s.viewer {
        let _ = write!(
            body,
            "<details class=\"panel\"{open}><summary>Create a wallet</summary>\
             <form method=\"post\" action=\"/ui/wallets\" class=\"grid\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <label>Owner <input name=\"owner\" required placeholder=\"key:key_… / team:NAME / org:default\"></label>\
             <label>Floor, USD <input name=\"floor\" placeholder=\"0\"></label>\
             <label>Warn below, USD <input name=\"low_balance\"></label>\
             <button type=\"submit\">Create wallet</button></form></details>",
            csrf = esc(&s.csrf),
            open = if wallets.is_empty() { " open" } else { "" },
        );
    }
    let rows: Vec<Vec<String>> = wallets
        .iter()
        .map(|w| {
            vec![
                link(
                    &format!("/ui/wallets/{}", q(&w.id)),
                    &format!("{}:{}", w.owner_kind.as_str(), w.owner),
                ),
                esc(&usd(w.balance_micros)),
                esc(&usd(w.held_micros)),
                esc(&usd(w.floor_micros)),
            ]
        })
        .collect();
    body.push_str(&table(&["wallet", "balance", "held", "floor"], &rows));
    if !budgets.is_empty() {
        let rows: Vec<Vec<String>> = budgets
            .iter()
            .map(|(b, env)| {
                let spent = env.as_ref().map_or(0, |e| e.spent_cost_micros);
                let held = env.as_ref().map_or(0, |e| e.held_cost_micros);
                vec![
                    esc(&b.scope),
                    esc(&format!(
                        "{} (from {})",
                        b.period.as_str(),
                        b.period.start(now_ms())
                    )),
                    esc(&usd(spent)),
                    esc(&usd(held)),
                    esc(&b.hard_micros.map(usd).unwrap_or_else(|| "–".into())),
                    esc(&b.soft_micros.map(usd).unwrap_or_else(|| "–".into())),
                ]
            })
            .collect();
        let _ = write!(
            body,
            "<h2>Budgets</h2>{}",
            table(
                &[
                    "scope",
                    "period",
                    "spent",
                    "held",
                    "refused beyond",
                    "warned beyond"
                ],
                &rows
            )
        );
    }
    Ok(page(&s, "Wallets", "Wallets", &body))
}

pub async fn create_wallet(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Page {
    let (_, f) = change(&app, &headers, &body)?;
    let req = crate::ops::NewWallet {
        owner: field(&f, "owner").unwrap_or_default().to_string(),
        floor: field(&f, "floor").map(str::to_string),
        low_balance: field(&f, "low_balance").map(str::to_string),
    };
    let w = blocking(&app, move |a| crate::ops::create_wallet(&a.store, req))
        .await
        .map_err(failed)?;
    let _ = refresh_keys(&app).await;
    Ok(see_other(&format!("/ui/wallets/{}", q(&w.id))))
}

pub async fn wallet(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    p: Pairs,
) -> Page {
    let s = signed_in(&app, &headers)?;
    app.meter.flush().await;
    let kind = param(&p.0, "kind").map(str::to_string);
    let found = blocking(&app, move |a| {
        Ok(a.store.read(|c| {
            let w = crate::wallet::find(c, &id)?;
            let entries = crate::wallet::entries(c, &w.id, 500)?;
            Ok((w, entries))
        })?)
    })
    .await;
    let (mut w, entries) = found.map_err(failed)?;
    crate::admin::with_holds_in_memory(&app, &mut w);
    let wid = q(&w.id);
    let mut body = format!(
        "<div class=\"tiles\"><div class=\"tile\"><span>Balance</span><strong data-testid=\"balance\">{}</strong></div>\
         <div class=\"tile\"><span>Held by requests in flight</span><strong>{}</strong></div>\
         <div class=\"tile\"><span>Floor</span><strong>{}</strong></div>\
         <a class=\"tile\" href=\"{}\"><span>Owner: its requests</span><strong>{}:{}</strong></a></div>",
        esc(&usd(w.balance_micros)),
        esc(&usd(w.held_micros)),
        esc(&usd(w.floor_micros)),
        esc(&owner_requests(&w)),
        esc(w.owner_kind.as_str()),
        esc(&w.owner),
    );
    // A fresh idempotency key per page view: a form sent twice (a double click, a reload
    // that re-posts) credits once.
    let idem = format!("ui-{}", hex::encode(rand::random::<[u8; 12]>()));
    if !s.viewer {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/ui/wallets/{wid}/credit\" class=\"grid panel\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
             <input type=\"hidden\" name=\"idempotency_key\" value=\"{idem}\">\
             <label>Kind <select name=\"kind\"><option value=\"topup\">top-up</option><option value=\"grant\">grant (expires)</option><option value=\"adjust\">adjustment (signed)</option></select></label>\
             <label>Amount, USD <input name=\"amount\" required inputmode=\"decimal\" placeholder=\"25.00\"></label>\
             <label>Grant expires after <input name=\"expires\" placeholder=\"30d\"></label>\
             <label>Note <input name=\"note\" maxlength=\"256\"></label>\
             <button type=\"submit\">Credit the wallet</button></form>",
            csrf = esc(&s.csrf),
        );
    }
    let kinds = [
        "capture", "hold", "release", "topup", "grant", "adjust", "expire",
    ];
    let _ = write!(body, "<h2>Ledger</h2><nav class=\"ranges\" aria-label=\"Entry kind\"><a href=\"/ui/wallets/{wid}\">all</a>");
    for k in kinds {
        let _ = write!(body, "<a href=\"/ui/wallets/{wid}?kind={k}\">{k}</a>");
    }
    body.push_str("</nav>");
    let rows: Vec<Vec<String>> = entries
        .iter()
        .filter(|e| kind.as_deref().is_none_or(|k| e.kind == k))
        .map(|e| {
            vec![
                esc(&crate::clock::rfc3339(e.ts_ms)),
                esc(&e.kind),
                esc(&usd(e.amount_micros)),
                e.request_id
                    .as_deref()
                    .map(|r| link(&format!("/ui/requests/{}", q(r)), r))
                    .unwrap_or_else(|| esc(e.note.as_deref().unwrap_or(""))),
            ]
        })
        .collect();
    body.push_str(&table(
        &["when", "kind", "amount", "request or note"],
        &rows,
    ));
    Ok(page(&s, "Wallets", &format!("Wallet {}", w.id), &body))
}

pub async fn credit(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> Page {
    let (_, f) = change(&app, &headers, &body)?;
    let kind = field(&f, "kind").unwrap_or("topup").to_string();
    let req = crate::ops::WalletCredit {
        amount: field(&f, "amount").unwrap_or_default().to_string(),
        idempotency_key: field(&f, "idempotency_key").map(str::to_string),
        note: field(&f, "note").map(str::to_string),
        expires: field(&f, "expires").map(str::to_string),
    };
    let wid = id.clone();
    let c = blocking(&app, move |a| {
        crate::ops::credit_wallet(&a.store, &wid, &kind, req)
    })
    .await
    .map_err(failed)?;
    push_hot(&app, &c.wallet.id).await;
    Ok(see_other(&format!("/ui/wallets/{}", q(&c.wallet.id))))
}

// ---------------------------------------------------------------------------------------
// Requests

pub async fn requests(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Pairs) -> Page {
    let s = signed_in(&app, &headers)?;
    // The log's filters, as `tollgate logs` takes them; empty fields of the form are unset.
    let pairs: Vec<(String, String)> =
        p.0.into_iter()
            .filter(|(_, v)| !v.trim().is_empty())
            .collect();
    let mut filter = crate::ops::record_filter(&pairs).map_err(|e| failed(e.into()))?;
    if param(&pairs, "limit").is_none() {
        filter.limit = 100;
    }
    let limit = filter.limit;
    app.meter.flush().await;
    let (rows, source) = request_log(&app, filter).await.map_err(failed)?;
    let v = |name: &str| esc(param(&pairs, name).unwrap_or(""));
    let mut body = format!(
        "<form method=\"get\" action=\"/ui/requests\" class=\"grid panel\">\
         <label>Agent or key <input name=\"key\" value=\"{}\"></label>\
         <label>Team <input name=\"team\" value=\"{}\"></label>\
         <label>Model <input name=\"model\" value=\"{}\"></label>\
         <label>Status <input name=\"status\" value=\"{}\" placeholder=\"429, 4xx, error\"></label>\
         <label>Run <input name=\"run\" value=\"{}\"></label>\
         <label>Since <input name=\"since\" value=\"{}\" placeholder=\"1h, 7d\"></label>\
         <button type=\"submit\">Filter</button></form>",
        v("key"),
        v("team"),
        v("model"),
        v("status"),
        v("run"),
        v("since"),
    );
    if rows.is_empty() {
        body.push_str(
            "<section class=\"empty\"><p>No request matches. Requests appear here as agents send \
             them through the gateway with their keys.</p></section>",
        );
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                link(
                    &format!("/ui/requests/{}", q(&r.id)),
                    &crate::clock::rfc3339(r.ts_ms),
                ),
                esc(&r.agent),
                esc(r
                    .model_served
                    .as_deref()
                    .or(r.model_requested.as_deref())
                    .unwrap_or("–")),
                esc(&r.status.to_string()),
                esc(&group(r.input_tokens + r.output_tokens)),
                esc(&usd(r.cost_micros as i64)),
                esc(&crate::ops::why(r)),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "when",
            "agent",
            "model",
            "status",
            "tokens",
            "cost",
            "why it ended",
        ],
        &cells,
    ));
    if let Some(c) = crate::ops::next_cursor(&rows, limit) {
        let mut next: Vec<(String, String)> =
            pairs.into_iter().filter(|(k, _)| k != "cursor").collect();
        next.push(("cursor".into(), c));
        let qs = next
            .iter()
            .map(|(k, v)| format!("{}={}", q(k), q(v)))
            .collect::<Vec<_>>()
            .join("&");
        let _ = write!(
            body,
            "<p>{}</p>",
            link(&format!("/ui/requests?{qs}"), "Older requests →")
        );
    }
    let _ = write!(body, "<p class=\"source\">From {source}.</p>");
    Ok(page(&s, "Requests", "Requests", &body))
}

pub async fn request(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Page {
    let s = signed_in(&app, &headers)?;
    app.meter.flush().await;
    let filter = crate::store::RecordFilter {
        request_id: Some(id.clone()),
        limit: 1,
        ..Default::default()
    };
    let (mut rows, _) = request_log(&app, filter).await.map_err(failed)?;
    let Some(r) = rows.pop() else {
        return Err(error_page(
            StatusCode::NOT_FOUND,
            &format!("No request {id} in the log."),
        )
        .into());
    };
    let opt = |v: &Option<String>| esc(v.as_deref().unwrap_or("–"));
    let rows = vec![
        vec!["why it ended".into(), esc(&crate::ops::why(&r))],
        vec!["status".into(), esc(&r.status.to_string())],
        vec!["when".into(), esc(&crate::clock::rfc3339(r.ts_ms))],
        vec![
            "agent".into(),
            link(
                &format!("/ui/requests?key={}", q(&r.key_id)),
                &format!("{} ({})", r.agent, r.key_id),
            ),
        ],
        vec!["team".into(), opt(&r.team)],
        vec!["endpoint".into(), esc(&r.endpoint)],
        vec!["model asked for".into(), opt(&r.model_requested)],
        vec!["model that served".into(), opt(&r.model_served)],
        vec!["provider".into(), opt(&r.provider)],
        vec!["attempts".into(), esc(&r.attempts.to_string())],
        vec!["input tokens".into(), esc(&group(r.input_tokens))],
        vec![
            "cached input tokens".into(),
            esc(&group(r.cached_input_tokens)),
        ],
        vec!["output tokens".into(), esc(&group(r.output_tokens))],
        vec!["reasoning tokens".into(), esc(&group(r.reasoning_tokens))],
        vec!["usage from".into(), esc(&r.usage_source)],
        vec!["cost".into(), esc(&usd(r.cost_micros as i64))],
        vec!["price version".into(), opt(&r.price_version)],
        vec![
            "wallet".into(),
            r.wallet_id
                .as_deref()
                .map(|w| link(&format!("/ui/wallets/{}", q(w)), w))
                .unwrap_or_else(|| "–".into()),
        ],
        vec![
            "run".into(),
            r.run_id
                .as_deref()
                .map(|run| link(&format!("/ui/runs/{}", q(run)), run))
                .unwrap_or_else(|| "–".into()),
        ],
        vec!["latency".into(), esc(&format!("{} ms", r.latency_ms))],
        vec!["error".into(), opt(&r.error_kind)],
    ];
    let body = table(&["", ""], &rows);
    Ok(page(&s, "Requests", &format!("Request {}", r.id), &body))
}

// ---------------------------------------------------------------------------------------
// Runs and ROI

pub async fn runs(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Pairs) -> Page {
    let s = signed_in(&app, &headers)?;
    // The 500 runs active most recently in the range, from the per-run hourly rollup.
    let (range, days) = range_of(&p.0);
    let since = now_ms() - days * DAY_MS;
    let rows = blocking(&app, move |a| Ok(a.store.recent_runs(since, 500)?))
        .await
        .map_err(failed)?;
    let mut body = picker("/ui/runs?", range);
    body.push_str(
        "<p class=\"hint\">The runs active most recently first, with what each spent in the range.</p>",
    );
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                link(&format!("/ui/runs/{}", q(&r.run)), &r.run),
                esc(&format!(
                    "{}:00",
                    crate::clock::rfc3339(r.last_hour_ms)[..13].replace('T', " ")
                )),
                esc(&usd(r.cost_micros as i64)),
                esc(&group(r.requests)),
                esc(&group(r.errors)),
            ]
        })
        .collect();
    if cells.is_empty() {
        body.push_str(
            "<section class=\"empty\"><p>No run in this range. An agent names its run with the \
             <code>x-tollgate-run</code> header (and a sub-run's parent with \
             <code>x-tollgate-parent-run</code>); its calls, spend and outcome then show here.</p></section>",
        );
    }
    body.push_str(&table(
        &[
            "run",
            "last active (hour, UTC)",
            "spend",
            "requests",
            "errors",
        ],
        &cells,
    ));
    Ok(page(&s, "Runs", "Runs", &body))
}

pub async fn run(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Page {
    let s = signed_in(&app, &headers)?;
    app.meter.flush().await;
    let rid = id.clone();
    let r = blocking(&app, move |a| crate::ops::run_report(&a.store, &rid))
        .await
        .map_err(failed)?;
    let run = &r["run"];
    let int = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
    let mut body = format!(
        "<div class=\"tiles\"><a class=\"tile\" href=\"/ui/requests?run={rq}\"><span>Spent</span><strong>{}</strong></a>\
         <div class=\"tile\"><span>Calls</span><strong>{}</strong></div>\
         <div class=\"tile\"><span>Tokens</span><strong>{}</strong></div>\
         <div class=\"tile\"><span>Held now</span><strong>{}</strong></div></div>",
        esc(&usd(int(&run["spent_cost_micros"]))),
        esc(&group(int(&run["calls"]).max(0) as u64)),
        esc(&group(int(&run["spent_tokens"]).max(0) as u64)),
        esc(&usd(int(&run["held_cost_micros"]))),
        rq = q(&id),
    );
    if let Some(parent) = run["parent_run"].as_str() {
        let _ = write!(
            body,
            "<p>Sub-run of {}.</p>",
            link(&format!("/ui/runs/{}", q(parent)), parent)
        );
    }
    let subs: Vec<Vec<String>> = r["sub_runs"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|sr| {
                    let name = sr["run"].as_str().unwrap_or("-");
                    vec![
                        link(&format!("/ui/runs/{}", q(name)), name),
                        esc(&usd(int(&sr["spent_cost_micros"]))),
                        esc(&group(int(&sr["calls"]).max(0) as u64)),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    if !subs.is_empty() {
        let _ = write!(
            body,
            "<h2>Sub-runs</h2>{}",
            table(&["run", "spent", "calls"], &subs)
        );
    }
    let models: Vec<Vec<String>> = r["by_model"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|m| {
                    vec![
                        esc(m["model"].as_str().unwrap_or("-")),
                        esc(&group(int(&m["requests"]).max(0) as u64)),
                        esc(&usd(int(&m["cost_micros"]))),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let _ = write!(
        body,
        "<h2>Calls by model</h2>{}",
        table(&["model", "requests", "cost"], &models)
    );
    Ok(page(&s, "Runs", &format!("Run {id}"), &body))
}

pub async fn roi(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Pairs) -> Page {
    let s = signed_in(&app, &headers)?;
    let by = match param(&p.0, "by") {
        Some(b @ ("agent" | "team" | "project" | "model" | "type")) => b.to_string(),
        _ => "agent".into(),
    };
    let (range, days) = range_of(&p.0);
    app.meter.flush().await;
    let since = Some((now_ms() - days * DAY_MS).to_string());
    let (rows, source) = roi_answer(&app, by.clone(), since).await.map_err(failed)?;
    let mut body = String::from("<nav class=\"ranges\" aria-label=\"Group by\">");
    for b in ["agent", "team", "project", "model", "type"] {
        let cur = if b == by {
            " aria-current=\"true\""
        } else {
            ""
        };
        let _ = write!(
            body,
            "<a href=\"/ui/roi?by={b}&range={range}\"{cur}>by {b}</a>"
        );
    }
    body.push_str("</nav>");
    body.push_str(&picker(&format!("/ui/roi?by={by}&"), range));
    if rows.iter().all(|r| r.outcomes == 0) {
        body.push_str(
            "<section class=\"empty\"><p>No outcome recorded in this range. An agent (or the \
             system it works for) posts what a run bought to <code>POST /v1/outcomes</code>; \
             spend is then set against it here.</p></section>",
        );
    }
    let per = |v: Option<u64>| v.map(|m| usd(m as i64)).unwrap_or_else(|| "–".into());
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                esc(&r.group),
                esc(&group(r.outcomes)),
                esc(&group(r.successes)),
                esc(&usd(r.spend_micros as i64)),
                esc(&per(r.cost_per_outcome_micros)),
                esc(&per(r.cost_per_success_micros)),
                esc(&usd(r.value_micros as i64)),
            ]
        })
        .collect();
    body.push_str(&table(
        &[
            "",
            "outcomes",
            "successes",
            "spend",
            "per outcome",
            "per success",
            "value",
        ],
        &cells,
    ));
    let _ = write!(body, "<p class=\"source\">From {source}.</p>");
    Ok(page(&s, "ROI", "Return on spend", &body))
}

// ---------------------------------------------------------------------------------------
// Approvals

pub async fn approvals(State(app): State<Arc<AppState>>, headers: HeaderMap, p: Pairs) -> Page {
    let s = signed_in(&app, &headers)?;
    let state = match param(&p.0, "state") {
        Some(st @ ("pending" | "approved" | "denied" | "used")) => st.to_string(),
        _ => "pending".into(),
    };
    let st = state.clone();
    let list = blocking(&app, move |a| {
        crate::ops::list_approvals(&a.store, Some(&st), 200)
    })
    .await
    .map_err(failed)?;
    let mut body = String::from("<nav class=\"ranges\" aria-label=\"State\">");
    for st in ["pending", "approved", "denied", "used"] {
        let cur = if st == state {
            " aria-current=\"true\""
        } else {
            ""
        };
        let _ = write!(body, "<a href=\"/ui/approvals?state={st}\"{cur}>{st}</a>");
    }
    body.push_str("</nav>");
    if list.is_empty() {
        body.push_str(
            "<section class=\"empty\"><p>Nothing here. Tool calls a policy marks \
             <code>require_approval</code> wait here for a person; the agent retries the same \
             call once it is approved.</p></section>",
        );
    }
    let csrf = esc(&s.csrf);
    let now = now_ms();
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|a| {
            let args = serde_json::to_string(&a.arguments).unwrap_or_default();
            let shown: String = args.chars().take(300).collect();
            let decide = if a.state == "pending" && a.expires_ms > now && s.viewer {
                "waiting for the admin".into()
            } else if a.state == "pending" && a.expires_ms > now {
                let id = q(&a.id);
                format!(
                    "<form method=\"post\" action=\"/ui/approvals/{id}/approve\" class=\"inline\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <input name=\"note\" aria-label=\"note\" placeholder=\"note\" maxlength=\"2000\">\
                     <button type=\"submit\">Approve</button></form>\
                     <form method=\"post\" action=\"/ui/approvals/{id}/deny\" class=\"inline\">\
                     <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                     <button type=\"submit\" class=\"danger\">Deny</button></form>"
                )
            } else {
                esc(a.decided_by.as_deref().unwrap_or(""))
            };
            vec![
                esc(&crate::clock::rfc3339(a.created_ms)),
                esc(&a.agent),
                format!("<code>{}</code>", esc(&a.tool)),
                format!("<code>{}</code>", esc(&shown)),
                esc(&format!("{}: {}", a.policy, a.reason)),
                decide,
            ]
        })
        .collect();
    body.push_str(&table(
        &["asked", "agent", "tool", "arguments", "policy", ""],
        &rows,
    ));
    Ok(page(&s, "Approvals", "Approvals", &body))
}

pub async fn decide(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    Path((id, decision)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Page {
    let (s, f) = change(&app, &headers, &body)?;
    let approve = match decision.as_str() {
        "approve" => true,
        "deny" => false,
        _ => return Err(error_page(StatusCode::NOT_FOUND, "Approve or deny.").into()),
    };
    // Who decided, as the audit log keeps it: the dashboard session's admin key.
    let by = format!("admin key {} (dashboard)", s.key_name);
    let note = field(&f, "note").map(str::to_string);
    let ttl = app.runtime.load().approvals.ttl;
    blocking(&app, move |a| {
        crate::ops::decide_approval(&a.store, &id, approve, &by, note.as_deref(), ttl)
    })
    .await
    .map_err(failed)?;
    Ok(see_other("/ui/approvals"))
}
