//! The subcommands that manage keys, wallets, budgets, teams and usage: each calls the
//! operation `tollgate::admin` shares with the admin API, locally or remotely.

use super::*;

pub(crate) async fn keys(cmd: KeysCmd, target: Target) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    match cmd {
        KeysCmd::Create {
            name,
            team,
            org,
            project,
            models,
            tools,
            expires,
            tags,
            limits,
            viewer,
        } => {
            let tags = tags.into_iter().collect::<BTreeMap<_, _>>();
            let req = NewKey {
                name,
                team,
                org,
                project,
                models,
                tools,
                expires,
                tags,
                rpm: limits.rpm,
                tpm: limits.tpm,
                concurrency: limits.concurrency,
                viewer,
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
        KeysCmd::Tools { key, tools } => {
            let v: KeyView = match &backend {
                Backend::Local { store, .. } => admin::set_key_tools(store, &key, tools)?,
                Backend::Remote { .. } => {
                    backend
                        .call(
                            reqwest::Method::PUT,
                            &format!("/admin/keys/{}/tools", urlencode(&key)),
                            Some(serde_json::json!({ "tools": tools })),
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

pub(crate) async fn wallet(
    cmd: WalletCmd,
    target: Target,
) -> anyhow::Result<std::process::ExitCode> {
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
            print_wallets(std::slice::from_ref(&w))?;
            // An empty wallet is a wall, not a meter: say so before the 402s do.
            if w.balance_micros <= w.floor_micros
                && w.owner_kind != tollgate::wallet::OwnerKind::Key
            {
                let who = match w.owner_kind {
                    tollgate::wallet::OwnerKind::Team => format!("of team {}", w.owner),
                    _ => format!("of org {}", w.owner),
                };
                eprintln!(
                    "note: {} holds {}; every key {who} without a wallet of its own now gets 402 insufficient_funds until it is topped up:\n  tollgate wallet topup {} --amount 10 --idempotency-key first-topup",
                    w.id,
                    usd(w.balance_micros),
                    w.id
                );
            }
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
            if target.format == Format::Json {
                let mismatches: Vec<serde_json::Value> = bad
                    .iter()
                    .map(|(id, bal, sum, floor)| {
                        serde_json::json!({"wallet": id, "balance_micros": bal,
                            "ledger_sum_micros": sum, "floor_micros": floor})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"ok": bad.is_empty(), "mismatches": mismatches})
                );
                if !bad.is_empty() {
                    return Ok(std::process::ExitCode::FAILURE);
                }
            } else if bad.is_empty() {
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

pub(crate) async fn budget(cmd: BudgetCmd, target: Target) -> anyhow::Result<()> {
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

pub(crate) async fn teams(cmd: TeamsCmd, target: Target) -> anyhow::Result<()> {
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

pub(crate) async fn usage(args: UsageArgs) -> anyhow::Result<()> {
    if args.by == "outcome" {
        // Spend by what it bought: the ROI report by outcome type.
        return roi("type".into(), args.since, args.target).await;
    }
    if args.by == "saver" {
        return savings("saver".into(), args.since, args.target).await;
    }
    if args.target.format != Format::Json {
        if let Some(from) =
            admin::report_since(&args.by, args.since.as_deref(), None).filter(|f| *f > 0)
        {
            eprintln!(
                "spend from {} (reports start on the hour)",
                tollgate::clock::rfc3339(from)
            );
        }
    }
    let backend = Backend::new(&args.target)?;
    let rows: Vec<ReportRow> = match &backend {
        Backend::Local { store, .. } => {
            admin::usage_report(store, &args.by, args.since.as_deref(), None)?
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
                "cached_share",
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
                        // Of the input, what the provider read from its prompt cache.
                        match r.input_tokens {
                            0 => "-".into(),
                            n => format!("{:.1}%", r.cached_input_tokens as f64 * 100.0 / n as f64),
                        },
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

/// `tollgate logs`: the request log, from the store or a running gateway.
pub(crate) async fn logs(args: LogsArgs) -> anyhow::Result<()> {
    let backend = Backend::new(&args.target)?;
    let fetch = |pairs: Vec<(String, String)>| {
        let backend = &backend;
        async move {
            let recs: Vec<tollgate::metering::UsageRecord> = match backend {
                Backend::Local { store, .. } => {
                    store.find_records(&admin::record_filter(&pairs)?)?
                }
                Backend::Remote { .. } => {
                    let q: Vec<String> = pairs
                        .iter()
                        .map(|(k, v)| format!("{k}={}", urlencode(v)))
                        .collect();
                    let path = format!("/admin/usage/records?{}", q.join("&"));
                    backend.call(reqwest::Method::GET, &path, None).await?
                }
            };
            anyhow::Ok(recs)
        }
    };
    let mut recs = fetch(args.pairs()).await?;
    // Oldest first on screen, as a log reads.
    recs.reverse();
    print_log(&recs, args.target.format, true)?;
    if !args.follow {
        return Ok(());
    }
    let mut seen: std::collections::HashSet<String> = recs.iter().map(|r| r.id.clone()).collect();
    let mut since = recs
        .last()
        .map_or_else(tollgate::clock::now_ms, |r| r.ts_ms);
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        let mut pairs: Vec<(String, String)> = args
            .pairs()
            .into_iter()
            .filter(|(k, _)| k != "since" && k != "limit")
            .collect();
        pairs.push(("since".into(), since.to_string()));
        pairs.push(("limit".into(), "10000".into()));
        let mut new = fetch(pairs).await?;
        new.retain(|r| !seen.contains(&r.id));
        new.reverse();
        for r in &new {
            seen.insert(r.id.clone());
            since = since.max(r.ts_ms);
        }
        print_log(&new, args.target.format, false)?;
    }
}

fn print_log(
    recs: &[tollgate::metering::UsageRecord],
    format: Format,
    header: bool,
) -> anyhow::Result<()> {
    if format == Format::Json {
        // One record per line, so --follow output can be piped into jq.
        for r in recs {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    let head = [
        "time", "request", "agent", "endpoint", "model", "status", "tokens", "cost_usd", "ms",
        "why",
    ];
    let rows: Vec<Vec<String>> = recs
        .iter()
        .map(|r| {
            vec![
                format_ms(r.ts_ms),
                r.id.clone(),
                r.agent.clone(),
                r.endpoint.clone(),
                r.model_served
                    .clone()
                    .or_else(|| r.model_requested.clone())
                    .unwrap_or_else(|| "-".into()),
                r.status.to_string(),
                format!("{}/{}", r.input_tokens, r.output_tokens),
                usd(r.cost_micros),
                r.latency_ms.to_string(),
                tollgate::admin::why(r),
            ]
        })
        .collect();
    if header || !rows.is_empty() {
        let header: &[&str] = if header { &head } else { &[] };
        print_rows(header, &rows, format == Format::Csv);
    }
    Ok(())
}

/// `tollgate roi`.
pub(crate) async fn roi(by: String, since: Option<String>, target: Target) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    let rows: Vec<admin::RoiRow> = match &backend {
        Backend::Local { store, .. } => admin::roi_report(store, &by, since.as_deref())?,
        Backend::Remote { .. } => {
            let mut path = format!("/admin/roi?by={}", urlencode(&by));
            if let Some(s) = &since {
                path.push_str(&format!("&since={}", urlencode(s)));
            }
            backend.call(reqwest::Method::GET, &path, None).await?
        }
    };
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let opt = |m: Option<u64>| m.map_or_else(|| "-".into(), usd);
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.group.clone(),
                r.outcomes.to_string(),
                r.successes.to_string(),
                usd(r.spend_micros),
                opt(r.cost_per_outcome_micros),
                opt(r.cost_per_success_micros),
                usd(r.value_micros),
                r.value_per_cost
                    .map_or_else(|| "-".into(), |x| format!("{x:.2}")),
            ]
        })
        .collect();
    print_rows(
        &[
            by.as_str(),
            "outcomes",
            "successes",
            "spend_usd",
            "per_outcome",
            "per_success",
            "value_usd",
            "value_per_usd",
        ],
        &body,
        target.format == Format::Csv,
    );
    Ok(())
}

/// `tollgate savings`.
pub(crate) async fn savings(
    by: String,
    since: Option<String>,
    target: Target,
) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    let rows: Vec<admin::SavingsRow> = match &backend {
        Backend::Local { store, .. } => admin::savings_report(store, &by, since.as_deref())?,
        Backend::Remote { .. } => {
            let mut path = format!("/admin/savings?by={}", urlencode(&by));
            if let Some(s) = &since {
                path.push_str(&format!("&since={}", urlencode(s)));
            }
            backend.call(reqwest::Method::GET, &path, None).await?
        }
    };
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let savers = r
                .savers
                .iter()
                .map(|(k, s)| format!("{k}={}", usd(s.micros)))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                r.group.clone(),
                r.spend_micros.map_or_else(|| "-".into(), usd),
                usd(r.saved_micros),
                r.saved_tokens.to_string(),
                r.saved_share
                    .map_or_else(|| "-".into(), |x| format!("{:.1}%", x * 100.0)),
                savers,
            ]
        })
        .collect();
    print_rows(
        &[
            by.as_str(),
            "spend_usd",
            "saved_usd",
            "saved_tokens",
            "saved_share",
            "by_saver",
        ],
        &body,
        target.format == Format::Csv,
    );
    Ok(())
}

/// `tollgate export focus`.
pub(crate) async fn export(cmd: ExportCmd, target: Target) -> anyhow::Result<()> {
    let ExportCmd::Focus {
        since,
        until,
        granularity,
    } = cmd;
    let output = if target.format == Format::Json {
        "jsonl"
    } else {
        "csv"
    };
    let backend = Backend::new(&target)?;
    let text = match &backend {
        Backend::Local { store, .. } => {
            let prices = tollgate::prices::PriceTable::new(&[]);
            admin::focus_export(
                store,
                &prices,
                since.as_deref(),
                until.as_deref(),
                Some(&granularity),
                Some(output),
            )?
            .1
        }
        Backend::Remote { .. } => {
            let mut q = vec![
                format!("granularity={}", urlencode(&granularity)),
                format!("format={output}"),
            ];
            if let Some(s) = &since {
                q.push(format!("since={}", urlencode(s)));
            }
            if let Some(u) = &until {
                q.push(format!("until={}", urlencode(u)));
            }
            backend
                .get_text(&format!("/admin/export/focus?{}", q.join("&")))
                .await?
        }
    };
    print!("{text}");
    Ok(())
}

/// `tollgate reconcile`.
pub(crate) async fn reconcile(
    provider: String,
    since: String,
    until: Option<String>,
    threshold: f64,
    target: Target,
) -> anyhow::Result<std::process::ExitCode> {
    let backend = Backend::new(&target)?;
    if matches!(backend, Backend::Local { .. }) {
        bail!("reconcile asks the provider, with the gateway's credentials: pass --url and --admin-key of a running gateway");
    }
    let mut path = format!(
        "/admin/reconcile?provider={}&since={}&threshold={threshold}",
        urlencode(&provider),
        urlencode(&since)
    );
    if let Some(u) = &until {
        path.push_str(&format!("&until={}", urlencode(u)));
    }
    let r: tollgate::reconcile::Reconciliation =
        backend.call(reqwest::Method::GET, &path, None).await?;
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        let body: Vec<Vec<String>> = r
            .rows
            .iter()
            .map(|d| {
                vec![
                    d.day.clone(),
                    d.model.clone(),
                    d.class.clone(),
                    d.tollgate.to_string(),
                    d.provider.to_string(),
                    d.drift.to_string(),
                    format!("{:.2}%", d.drift_pct),
                ]
            })
            .collect();
        print_rows(
            &[
                "day",
                "model",
                "class",
                "tollgate",
                "provider",
                "drift",
                "drift_pct",
            ],
            &body,
            target.format == Format::Csv,
        );
        if let Some(e) = &r.cost_error {
            eprintln!("costs not compared (tokens were): {e}");
        }
        println!(
            "{}: {}",
            r.provider,
            if r.ok {
                format!("no drift past {}%", r.threshold_pct)
            } else {
                format!("DRIFT past {}%", r.threshold_pct)
            }
        );
    }
    Ok(if r.ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}

pub(crate) async fn approvals(cmd: ApprovalsCmd, target: Target) -> anyhow::Result<()> {
    use tollgate::approval::Approval;
    let backend = Backend::new(&target)?;
    let shown: Vec<Approval> = match cmd {
        ApprovalsCmd::List { state, limit } => {
            let state = (state != "all").then_some(state);
            match &backend {
                Backend::Local { store, .. } => {
                    admin::list_approvals(store, state.as_deref(), limit)?
                }
                Backend::Remote { .. } => {
                    let q = state
                        .map(|s| format!("&state={}", urlencode(&s)))
                        .unwrap_or_default();
                    backend
                        .call(
                            reqwest::Method::GET,
                            &format!("/admin/approvals?limit={limit}{q}"),
                            None,
                        )
                        .await?
                }
            }
        }
        ApprovalsCmd::Show { id } => vec![match &backend {
            Backend::Local { store, .. } => admin::show_approval(store, &id)?,
            Backend::Remote { .. } => {
                backend
                    .call(
                        reqwest::Method::GET,
                        &format!("/admin/approvals/{}", urlencode(&id)),
                        None,
                    )
                    .await?
            }
        }],
        ApprovalsCmd::Approve { id, by, note } => {
            vec![decide(&backend, &id, true, by, note).await?]
        }
        ApprovalsCmd::Deny { id, by, note } => vec![decide(&backend, &id, false, by, note).await?],
    };
    if target.format == Format::Json {
        println!("{}", serde_json::to_string_pretty(&shown)?);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.state.clone(),
                a.agent.clone(),
                a.tool.clone(),
                a.arguments.to_string(),
                a.reason.clone(),
                tollgate::clock::rfc3339(a.expires_ms),
                a.decided_by.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_rows(
        &[
            "id",
            "state",
            "agent",
            "tool",
            "arguments",
            "why",
            "expires",
            "decided by",
        ],
        &rows,
        target.format == Format::Csv,
    );
    Ok(())
}

async fn decide(
    backend: &Backend,
    id: &str,
    approve: bool,
    by: Option<String>,
    note: Option<String>,
) -> anyhow::Result<tollgate::approval::Approval> {
    let verb = if approve { "approve" } else { "deny" };
    Ok(match backend {
        Backend::Local { store, .. } => {
            let by = by
                .or_else(|| std::env::var("USER").ok())
                .unwrap_or_else(|| "cli".into());
            admin::decide_approval(
                store,
                id,
                approve,
                &by,
                note.as_deref(),
                admin::DEFAULT_APPROVAL_TTL,
            )?
        }
        Backend::Remote { .. } => {
            let by = by.or_else(|| std::env::var("USER").ok());
            backend
                .call(
                    reqwest::Method::POST,
                    &format!("/admin/approvals/{}/{verb}", urlencode(id)),
                    Some(serde_json::json!({ "by": by, "note": note })),
                )
                .await?
        }
    })
}

pub(crate) async fn audit(cmd: AuditCmd, target: Target) -> anyhow::Result<()> {
    let backend = Backend::new(&target)?;
    match cmd {
        AuditCmd::List {
            action,
            subject,
            limit,
        } => {
            let filter = tollgate::audit::Filter {
                action,
                subject,
                since_ms: None,
                limit: Some(limit),
            };
            let entries: Vec<tollgate::audit::Entry> = match &backend {
                Backend::Local { store, .. } => admin::audit_list(store, &filter)?,
                Backend::Remote { .. } => {
                    let mut q = format!("?limit={limit}");
                    if let Some(a) = &filter.action {
                        q.push_str(&format!("&action={}", urlencode(a)));
                    }
                    if let Some(s) = &filter.subject {
                        q.push_str(&format!("&subject={}", urlencode(s)));
                    }
                    backend
                        .call(reqwest::Method::GET, &format!("/admin/audit{q}"), None)
                        .await?
                }
            };
            if target.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = entries
                .iter()
                .map(|e| {
                    vec![
                        e.seq.to_string(),
                        tollgate::clock::rfc3339(e.ts_ms),
                        e.actor.clone(),
                        e.action.clone(),
                        e.subject.clone(),
                        e.detail.to_string(),
                    ]
                })
                .collect();
            print_rows(
                &["seq", "time", "actor", "action", "subject", "detail"],
                &rows,
                target.format == Format::Csv,
            );
            Ok(())
        }
        AuditCmd::Verify => {
            let v: tollgate::audit::Verified = match &backend {
                Backend::Local { store, .. } => admin::audit_verify(store)?,
                Backend::Remote { .. } => {
                    backend
                        .call(reqwest::Method::GET, "/admin/audit/verify", None)
                        .await?
                }
            };
            if target.format == Format::Json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
            match &v.broken {
                None => {
                    if target.format != Format::Json {
                        println!("audit log intact: {} entries, head {}", v.entries, v.head);
                    }
                    Ok(())
                }
                Some((seq, why)) => {
                    anyhow::bail!(
                        "audit log broken at entry {seq}: {why} ({} entries before it hold; last good hash {})",
                        v.entries,
                        v.head
                    )
                }
            }
        }
    }
}
