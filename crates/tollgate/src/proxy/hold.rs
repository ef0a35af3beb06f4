//! The hold phase: the most a request can cost (its quote), per-request caps, and the hold
//! in the key's wallet and envelopes (budgets, runs) before any upstream call.

use super::*;

/// The most a request can cost on any of its deployments: its input (body bytes / 3, biased
/// up) at the highest input-side price (cache writes can cost more than input), plus its
/// output cap (`max_tokens`, or `[wallets] default_max_output`) at the highest output price.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Quote {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub input_price: u64,
    pub output_price: u64,
    pub cost_micros: u64,
}

impl Quote {
    pub fn new(
        input_tokens: u64,
        output_tokens: u64,
        input_price: u64,
        output_price: u64,
    ) -> Quote {
        // u64 × u64 fits u128 but their sum may not; the result is capped where the
        // ledger's arithmetic is still exact, which no wallet can cover.
        let pico = (u128::from(input_tokens) * u128::from(input_price))
            .saturating_add(u128::from(output_tokens) * u128::from(output_price));
        let cost = pico
            .div_ceil(1_000_000)
            .min(crate::money::MAX_MICROS as u128) as u64;
        Quote {
            input_tokens,
            output_tokens,
            input_price,
            output_price,
            cost_micros: cost,
        }
    }

    pub(crate) fn input_micros(&self) -> u64 {
        Quote::new(self.input_tokens, 0, self.input_price, 0).cost_micros
    }
}

pub fn quote(
    runtime: &Runtime,
    deployments: &[Arc<Deployment>],
    endpoint: Endpoint,
    doc: &RequestDoc,
    body_len: usize,
) -> Quote {
    let input = (body_len as u64).div_ceil(3);
    let output = if endpoint.spec().generates {
        doc.max_output_tokens()
            .ok()
            .flatten()
            .unwrap_or(runtime.wallets.default_max_output)
    } else {
        0
    };
    let (ip, op) = highest_prices(runtime, deployments);
    Quote::new(input, output, ip, op)
}

/// The highest input and output prices among `deployments`: a hold covers whichever serves.
fn highest_prices(runtime: &Runtime, deployments: &[Arc<Deployment>]) -> (u64, u64) {
    let (mut ip, mut op) = (0, 0);
    for d in deployments {
        if let Some(p) = runtime.prices.lookup(&d.provider.name, &d.model) {
            ip = ip.max(p.input).max(p.cache_write_5m).max(p.cache_write_1h);
            op = op.max(p.output).max(p.reasoning);
        }
    }
    (ip, op)
}

/// `quote` for a model: a cascade alias's covers every tier answering once (each tier's
/// highest prices, summed), since a request escalated to the last tier pays them all.
pub fn quote_model(
    runtime: &Runtime,
    model: &str,
    deployments: &[Arc<Deployment>],
    endpoint: Endpoint,
    doc: &RequestDoc,
    body_len: usize,
) -> Quote {
    let q = quote(runtime, deployments, endpoint, doc, body_len);
    let Some(c) = runtime.cascades.get(model) else {
        return q;
    };
    let (mut ip, mut op) = (0u64, 0u64);
    for tier in &c.tiers {
        let (i, o) = highest_prices(
            runtime,
            &runtime.resolve_deployments(tier).unwrap_or_default(),
        );
        ip = ip.saturating_add(i);
        op = op.saturating_add(o);
    }
    Quote::new(q.input_tokens, q.output_tokens, ip, op)
}

/// A request's cap from `x-tollgate-max-cost` (USD) and the key's (or its team's) setting:
/// the lower one.
pub(crate) fn cost_cap(
    app: &AppState,
    key: &KeyRecord,
    headers: &HeaderMap,
) -> Result<Option<u64>, ApiError> {
    let header = match headers.get("x-tollgate-max-cost") {
        None => None,
        Some(v) => {
            let text = v.to_str().unwrap_or("");
            let micros = crate::money::parse_usd(text)
                .ok()
                .and_then(|m| u64::try_from(m).ok())
                .ok_or_else(|| {
                    ApiError::new(
                        ErrorKind::BadRequest,
                        format!("x-tollgate-max-cost must be an amount in USD, e.g. 0.25 (got \"{text}\")"),
                    )
                })?;
            Some(micros)
        }
    };
    let configured = key_setting(app, key, |l| l.max_cost_micros);
    Ok(match (header, configured) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

/// A per-key setting, else the key's team's.
pub(crate) fn key_setting<T>(
    app: &AppState,
    key: &KeyRecord,
    field: impl Fn(&crate::keys::KeyLimits) -> Option<T>,
) -> Option<T> {
    field(&key.limits).or_else(|| {
        key.team
            .as_deref()
            .and_then(|t| app.keys.team_limits(t))
            .and_then(|l| field(&l))
    })
}

/// Hot wallets: the wallet's hold in Redis, then any envelopes through the writer; a hold
/// whose envelopes refuse (or that may have landed after a timeout) is dropped again.
pub(crate) async fn hold_hot(
    app: &AppState,
    hot: &Arc<crate::hotwallet::HotWallets>,
    req: crate::metering::HoldRequest,
    within: std::time::Duration,
) -> Result<crate::metering::Held, String> {
    use crate::metering::Held;
    let Some(wallet) = req.wallet_id.clone() else {
        return app.meter.hold(req, within).await;
    };
    if app.meter.backlogged() {
        return Err("the ledger writer is behind".into());
    }
    let rid = req.request_id.clone();
    let cancel = |hot: &Arc<crate::hotwallet::HotWallets>| {
        let (hot, wallet, rid) = (hot.clone(), wallet.clone(), rid.clone());
        tokio::spawn(async move { hot.cancel(&wallet, &rid).await });
    };
    let balance = match hot.hold(&wallet, &rid, req.amount, req.expires_ms).await {
        Ok(crate::hotwallet::HotHold::Held { balance_micros }) => balance_micros,
        Ok(crate::hotwallet::HotHold::Insufficient {
            balance_micros,
            floor_micros,
        }) => {
            let refused = Held::Insufficient {
                balance_micros,
                floor_micros,
            };
            app.meter.refused(req, refused.clone());
            return Ok(refused);
        }
        Err(e) => {
            cancel(hot);
            return Err(e);
        }
    };
    if req.envelopes.is_empty() {
        return Ok(Held::Ok {
            balance_micros: Some(balance),
        });
    }
    let envelopes = crate::metering::HoldRequest {
        wallet_id: None,
        ..req
    };
    match app.meter.hold(envelopes, within).await {
        Ok(Held::Ok { .. }) => Ok(Held::Ok {
            balance_micros: Some(balance),
        }),
        other => {
            cancel(hot);
            other
        }
    }
}

/// The ledger did not answer: refuse before any upstream call (money fails closed).
pub(crate) fn wallet_unavailable(why: &str) -> ApiError {
    // Once per 10 s: during an outage every request would log this.
    static LAST_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);
    let now = now_ms();
    let last = LAST_MS.load(std::sync::atomic::Ordering::Relaxed);
    if now - last >= 10_000
        && LAST_MS
            .compare_exchange(
                last,
                now,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            )
            .is_ok()
    {
        tracing::warn!(error = %why, "wallet holds failing; refusing requests that need money (fail closed)");
    }
    ApiError::new(
        ErrorKind::WalletUnavailable,
        "the wallet ledger is unavailable right now; no upstream call was made, retry shortly",
    )
}

/// The 402 for a wallet that cannot cover a hold, the same for model calls and tool routes.
pub(crate) fn insufficient_funds(
    wallet_id: &str,
    balance_micros: i64,
    floor_micros: i64,
    hold_micros: u64,
    advice: &str,
) -> ApiError {
    ApiError::new(
        ErrorKind::InsufficientFunds,
        format!(
            "insufficient funds: this request needs a hold of ${} and wallet {wallet_id} has ${} available (floor ${}); {advice}",
            crate::money::usd(hold_micros as i64),
            crate::money::usd(balance_micros),
            crate::money::usd(floor_micros)
        ),
    )
    .details(money_details(&[
        ("wallet", wallet_id.into()),
        ("balance_micros", balance_micros.into()),
        ("hold_micros", hold_micros.into()),
        ("floor_micros", floor_micros.into()),
    ]))
}

pub(crate) fn money_details(
    pairs: &[(&str, serde_json::Value)],
) -> serde_json::Map<String, serde_json::Value> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

/// Refuses a request over its cost cap, and holds its maximum cost in the key's wallet (or
/// refuses with 402). With `clamp_max_tokens`, a request the wallet cannot cover in full is
/// sent with a `max_tokens` the wallet can pay instead.
pub(crate) async fn hold(
    cx: &mut Ctx<'_>,
    doc: &mut RequestDoc<'_>,
    deployments: &[Arc<Deployment>],
) -> Result<(), ApiError> {
    let (app, key, endpoint, headers) = (cx.app, cx.key, cx.endpoint, cx.headers);
    let runtime = &*cx.runtime;
    let settle = &mut *cx.settle;
    let cap = cost_cap(app, key, headers)?;
    let (envelopes, run_id) = envelopes_for(app, key, headers)?;
    if run_id.is_some() {
        settle.rec_mut().run_id = run_id;
    }
    let wallet_id = app.keys.wallet_for(key);
    // Most requests have no cap, wallet or envelope: they skip the quote entirely.
    if cap.is_none() && wallet_id.is_none() && envelopes.is_empty() {
        return Ok(());
    }
    let mut q = quote_model(
        runtime,
        &cx.model,
        deployments,
        endpoint,
        doc,
        settle.body.len(),
    );
    if let Some(cap) = cap {
        if q.cost_micros > cap {
            return Err(ApiError::new(
                ErrorKind::MaxCostExceeded,
                format!(
                    "this request could cost up to ${} ({} input tokens estimated, {} output tokens allowed), above its cap of ${}; lower max_tokens or raise the cap",
                    crate::money::usd(q.cost_micros as i64),
                    q.input_tokens,
                    q.output_tokens,
                    crate::money::usd(cap as i64)
                ),
            )
            .details(money_details(&[
                ("estimate_micros", q.cost_micros.into()),
                ("cap_micros", cap.into()),
            ])));
        }
    }
    if wallet_id.is_none() && envelopes.is_empty() {
        return Ok(());
    }
    let ttl_ms = runtime.wallets.hold_ttl.as_millis() as i64;
    let clamp = key_setting(app, key, |l| l.clamp_max_tokens).unwrap_or(false);
    let mut clamped = false;
    loop {
        let req = crate::metering::HoldRequest {
            wallet_id: wallet_id.clone(),
            envelopes: envelopes.clone(),
            request_id: settle.request_id.clone(),
            amount: q.cost_micros as i64,
            tokens: (q.input_tokens + q.output_tokens) as i64,
            expires_ms: now_ms() + ttl_ms,
        };
        let outcome = place_hold(app, runtime, settle, req).await?;
        match outcome {
            crate::metering::Held::BadRun(m) => {
                return Err(ApiError::new(ErrorKind::BadRequest, m).param("x-tollgate-run"));
            }
            crate::metering::Held::Ok { balance_micros } => {
                settle.money = Some(q);
                if let Some(b) =
                    balance_micros.and_then(|b| HeaderValue::from_str(&b.to_string()).ok())
                {
                    settle.rate_headers.insert("x-tollgate-balance", b);
                }
                if clamped {
                    settle.rate_headers.insert(
                        "x-tollgate-clamped-max-tokens",
                        HeaderValue::from(q.output_tokens),
                    );
                }
                return Ok(());
            }
            crate::metering::Held::Exhausted(e) => {
                let budget = e.envelope.starts_with("budget:");
                let (kind, what) = if budget {
                    (ErrorKind::BudgetExceeded, "budget")
                } else {
                    (ErrorKind::RunBudgetExhausted, "run envelope")
                };
                let shown = |v: i64| {
                    if e.what == "cost" {
                        format!("${}", crate::money::usd(v))
                    } else {
                        v.to_string()
                    }
                };
                return Err(ApiError::new(
                    kind,
                    format!(
                        "the {what} {} is spent: {} {} of {} used, this request needs {}",
                        e.envelope.trim_start_matches("run:"),
                        shown(e.used),
                        e.what,
                        shown(e.cap),
                        shown(e.needed)
                    ),
                )
                .details(money_details(&[
                    ("envelope", e.envelope.clone().into()),
                    ("limit", e.what.into()),
                    ("cap", e.cap.into()),
                    ("used", e.used.into()),
                    ("needed", e.needed.into()),
                ])));
            }
            crate::metering::Held::Insufficient {
                balance_micros,
                floor_micros,
            } => {
                let wallet_id = wallet_id.clone().unwrap_or_default();
                let payable = (balance_micros - floor_micros).max(0) as u64;
                // What the wallet can pay for output once the input is paid for.
                let affordable = payable
                    .checked_sub(q.input_micros())
                    .map(|left| {
                        if q.output_price == 0 {
                            q.output_tokens
                        } else {
                            (u128::from(left) * 1_000_000 / u128::from(q.output_price)) as u64
                        }
                    })
                    .unwrap_or(0);
                const MIN_CLAMPED_OUTPUT: u64 = 16;
                if clamp
                    && !clamped
                    && affordable >= MIN_CLAMPED_OUTPUT
                    && affordable < q.output_tokens
                {
                    let fields = endpoint.spec().cap_fields;
                    let field = fields
                        .iter()
                        .copied()
                        .find(|f| doc.raw(f).is_some())
                        .or(fields.last().copied())
                        .unwrap_or("max_tokens");
                    doc.set_raw(field, affordable.to_string())
                        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
                    q = Quote::new(q.input_tokens, affordable, q.input_price, q.output_price);
                    clamped = true;
                    continue;
                }
                return Err(insufficient_funds(
                    &wallet_id,
                    balance_micros,
                    floor_micros,
                    q.cost_micros,
                    "top it up or lower max_tokens",
                ));
            }
        }
    }
}

/// The envelopes a request must fit in: its run (`x-tollgate-run`, under
/// `x-tollgate-parent-run` when it is new, with `x-tollgate-run-budget` caps) and the budgets
/// of its key, team and org.
#[allow(clippy::type_complexity)]
pub(crate) fn envelopes_for(
    app: &AppState,
    key: &KeyRecord,
    headers: &HeaderMap,
) -> Result<(Vec<crate::envelope::Spec>, Option<String>), ApiError> {
    let org = key.org.clone().unwrap_or_else(|| "default".into());
    let now = now_ms();
    let mut specs: Vec<crate::envelope::Spec> = app
        .keys
        .budgets_for(key)
        .iter()
        .map(|b| b.spec(&org, now))
        .collect();
    let header = |name: &'static str| -> Result<Option<String>, ApiError> {
        match headers.get(name) {
            None => Ok(None),
            Some(v) => {
                let t = v.to_str().unwrap_or("").trim();
                if t.is_empty() || t.len() > 128 || t.chars().any(|c| c.is_control()) {
                    return Err(ApiError::new(
                        ErrorKind::BadRequest,
                        format!("{name} must be 1 to 128 printable characters"),
                    ));
                }
                Ok(Some(t.to_string()))
            }
        }
    };
    if let Some(run) = header("x-tollgate-run")? {
        let caps = match header("x-tollgate-run-budget")? {
            Some(text) => crate::envelope::parse_caps(&text).map_err(|e| {
                ApiError::new(ErrorKind::BadRequest, format!("x-tollgate-run-budget: {e}"))
            })?,
            None => crate::envelope::Caps::default(),
        };
        specs.push(crate::envelope::Spec {
            id: format!("run:{run}"),
            kind: "run",
            parent: header("x-tollgate-parent-run")?.map(|p| format!("run:{p}")),
            org,
            caps,
            soft_cost_micros: None,
        });
        return Ok((specs, Some(run)));
    }
    Ok((specs, None))
}

/// Places a hold in the key's wallet (in Redis with hot wallets, else by the writer) and in
/// its envelopes, failing closed: no answer within `hold_timeout` is a 503 before any upstream
/// call. Model calls and tool routes both hold through here; a hold that was placed is noted
/// in the record, which settles it.
pub(crate) async fn place_hold(
    app: &Arc<AppState>,
    runtime: &Runtime,
    settle: &mut Settlement,
    req: crate::metering::HoldRequest,
) -> Result<crate::metering::Held, ApiError> {
    let started = Instant::now();
    let (wallet_id, enveloped, amount) =
        (req.wallet_id.clone(), !req.envelopes.is_empty(), req.amount);
    let hot = app.hot.as_ref().filter(|_| wallet_id.is_some());
    // Admitted outside the store's holds (Redis, or the writer's book in memory): the record
    // carries the hold to its settle, and a writer far behind means no new money.
    let outside = wallet_id.is_some() && (hot.is_some() || app.meter.holds_in_memory());
    if outside && app.meter.backlogged() {
        settle.shed = true;
        return Err(wallet_unavailable("the ledger writer is behind"));
    }
    let outcome = match hot {
        Some(hot) => hold_hot(app, hot, req, runtime.wallets.hold_timeout).await,
        None => app.meter.hold(req, runtime.wallets.hold_timeout).await,
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            // The hold may still land later: this record settles it (at cost 0).
            let rec = settle.rec_mut();
            rec.wallet_id = wallet_id;
            rec.enveloped = enveloped;
            return Err(wallet_unavailable(&e));
        }
    };
    app.metrics
        .hold_seconds
        .observe(started.elapsed().as_secs_f64());
    if let crate::metering::Held::Ok { .. } = outcome {
        let rec = settle.rec_mut();
        rec.wallet_id = wallet_id;
        rec.enveloped = enveloped;
        rec.hot_hold_micros = outside.then_some(amount);
    }
    Ok(outcome)
}
