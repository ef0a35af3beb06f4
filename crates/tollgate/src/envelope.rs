//! Spending envelopes: run envelopes for agents (`x-tollgate-run`, nested under a parent run)
//! and periodic budgets (per key, team or org; daily, weekly, monthly or lifetime). Both are
//! the same thing underneath: caps on cost, tokens and calls, with spending reserved at
//! admission and settled with the actual numbers, like a wallet hold. A request reserves
//! in every envelope that applies (its run and that run's ancestors, and each budget), all or
//! nothing, in the writer's transaction, so concurrent sub-agents cannot overshoot a parent.

use crate::db::{Db, Result as DbResult, Row};
use serde::{Deserialize, Serialize};

pub const MIGRATION: &str = "
    CREATE TABLE envelopes (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        parent TEXT,
        org TEXT NOT NULL,
        cap_cost_micros INTEGER,
        cap_tokens INTEGER,
        cap_calls INTEGER,
        soft_cost_micros INTEGER,
        spent_cost_micros INTEGER NOT NULL DEFAULT 0,
        spent_tokens INTEGER NOT NULL DEFAULT 0,
        calls INTEGER NOT NULL DEFAULT 0,
        held_cost_micros INTEGER NOT NULL DEFAULT 0,
        held_tokens INTEGER NOT NULL DEFAULT 0,
        held_calls INTEGER NOT NULL DEFAULT 0,
        created_ms INTEGER NOT NULL
    );
    CREATE INDEX envelopes_parent ON envelopes(parent);
    CREATE TABLE envelope_holds (
        request_id TEXT NOT NULL,
        envelope_id TEXT NOT NULL,
        cost_micros INTEGER NOT NULL,
        tokens INTEGER NOT NULL,
        expires_ms INTEGER NOT NULL,
        state TEXT NOT NULL,
        PRIMARY KEY (request_id, envelope_id)
    );
    CREATE INDEX envelope_holds_open ON envelope_holds(state, expires_ms);
    CREATE TABLE budgets (
        scope TEXT NOT NULL,
        period TEXT NOT NULL,
        hard_micros INTEGER,
        soft_micros INTEGER,
        PRIMARY KEY (scope, period)
    );
    CREATE TABLE webhook_outbox (
        id TEXT PRIMARY KEY,
        event TEXT NOT NULL,
        payload TEXT NOT NULL,
        created_ms INTEGER NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms INTEGER NOT NULL,
        delivered_ms INTEGER
    );
    CREATE INDEX webhook_pending ON webhook_outbox(delivered_ms, next_attempt_ms);
    ALTER TABLE usage ADD COLUMN run_id TEXT;
    CREATE INDEX usage_run ON usage(run_id);
";

/// Caps of an envelope (None = no cap on that dimension).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caps {
    pub cost_micros: Option<i64>,
    pub tokens: Option<i64>,
    pub calls: Option<i64>,
}

/// One envelope a request must fit in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub id: String,
    /// `run` or `budget`.
    pub kind: &'static str,
    /// A run's parent run (its envelope id); created with the run, never changed.
    pub parent: Option<String>,
    pub org: String,
    /// Used when the envelope is created; for budgets, always (the budget's current caps).
    pub caps: Caps,
    /// Budgets: a soft limit, for the webhook.
    pub soft_cost_micros: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    pub parent: Option<String>,
    pub org: String,
    pub caps: Caps,
    pub spent_cost_micros: i64,
    pub spent_tokens: i64,
    pub calls: i64,
    pub held_cost_micros: i64,
    pub held_tokens: i64,
    pub held_calls: i64,
    pub created_ms: i64,
    pub soft_cost_micros: Option<i64>,
}

/// Why a request does not fit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exhausted {
    pub envelope: String,
    /// `cost`, `tokens` or `calls`.
    pub what: &'static str,
    pub cap: i64,
    pub used: i64,
    pub needed: i64,
}

/// Why a request was not admitted into its envelopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    Exhausted(Exhausted),
    /// The request named a run it may not use (another org's, or an unknown parent).
    BadRun(String),
}

/// A threshold an envelope's spending crossed (50, 80 or 100% of its cost cap, or its soft
/// limit), for webhooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Crossing {
    pub envelope: String,
    pub kind: String,
    pub threshold: String,
    pub spent_cost_micros: i64,
    pub cap_cost_micros: Option<i64>,
}

const COLUMNS: &str = "id, kind, parent, org, cap_cost_micros, cap_tokens, cap_calls,
    spent_cost_micros, spent_tokens, calls, held_cost_micros, held_tokens, held_calls, created_ms,
    soft_cost_micros";

fn from_row(r: &Row) -> DbResult<Envelope> {
    Ok(Envelope {
        id: r.get(0)?,
        kind: r.get(1)?,
        parent: r.get(2)?,
        org: r.get(3)?,
        caps: Caps {
            cost_micros: r.get(4)?,
            tokens: r.get(5)?,
            calls: r.get(6)?,
        },
        spent_cost_micros: r.get(7)?,
        spent_tokens: r.get(8)?,
        calls: r.get(9)?,
        held_cost_micros: r.get(10)?,
        held_tokens: r.get(11)?,
        held_calls: r.get(12)?,
        created_ms: r.get(13)?,
        soft_cost_micros: r.get(14)?,
    })
}

pub fn get(db: &mut Db, id: &str) -> DbResult<Option<Envelope>> {
    db.row(
        &format!("SELECT {COLUMNS} FROM envelopes WHERE id = ?1"),
        &[&id],
    )?
    .map(|r| from_row(&r))
    .transpose()
}

pub fn children(db: &mut Db, id: &str) -> DbResult<Vec<Envelope>> {
    db.rows(
        &format!("SELECT {COLUMNS} FROM envelopes WHERE parent = ?1 ORDER BY created_ms, id"),
        &[&id],
    )?
    .iter()
    .map(from_row)
    .collect()
}

/// Deepest nesting followed; deeper parents are ignored (and a cycle cannot form: a run's
/// parent must exist before it).
const MAX_DEPTH: usize = 16;

/// The envelope and its ancestors, nearest first.
fn chain(tx: &mut Db, id: &str) -> DbResult<Vec<Envelope>> {
    let mut out = Vec::new();
    let mut next = Some(id.to_string());
    while let Some(id) = next.take() {
        if out.len() >= MAX_DEPTH {
            break;
        }
        match get(tx, &id)? {
            Some(e) => {
                next = e.parent.clone();
                out.push(e);
            }
            None => break,
        }
    }
    Ok(out)
}

/// Creates missing envelopes, checks that `cost`, `tokens` and one call fit in every
/// envelope of every spec's chain, and reserves them; or reserves nothing.
pub fn reserve(
    tx: &mut Db,
    specs: &[Spec],
    request_id: &str,
    cost: i64,
    tokens: i64,
    expires_ms: i64,
    now_ms: i64,
) -> Result<Result<(), Refused>, String> {
    let sql = |e: crate::db::DbError| e.to_string();
    let mut all: Vec<Envelope> = Vec::new();
    for s in specs {
        match get(tx, &s.id).map_err(sql)? {
            Some(e) if e.org != s.org => {
                return Ok(Err(Refused::BadRun(format!(
                    "run \"{}\" belongs to another organisation",
                    s.id.trim_start_matches("run:")
                ))));
            }
            Some(_) => {
                if s.kind == "budget" {
                    tx.exec(
                        "UPDATE envelopes SET cap_cost_micros = ?2, cap_tokens = ?3, cap_calls = ?4,
                                              soft_cost_micros = ?5
                         WHERE id = ?1",
                        &[
                            &s.id,
                            &s.caps.cost_micros,
                            &s.caps.tokens,
                            &s.caps.calls,
                            &s.soft_cost_micros,
                        ],
                    )
                    .map_err(sql)?;
                }
            }
            None => {
                if let Some(p) = &s.parent {
                    match get(tx, p).map_err(sql)? {
                        Some(pe) if pe.org == s.org => {}
                        _ => {
                            return Ok(Err(Refused::BadRun(format!(
                                "parent run \"{}\" does not exist",
                                p.trim_start_matches("run:")
                            ))))
                        }
                    }
                }
                tx.exec(
                    "INSERT INTO envelopes (id, kind, parent, org, cap_cost_micros, cap_tokens,
                                            cap_calls, created_ms, soft_cost_micros)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                    &[
                        &s.id,
                        &s.kind,
                        &s.parent,
                        &s.org,
                        &s.caps.cost_micros,
                        &s.caps.tokens,
                        &s.caps.calls,
                        &now_ms,
                        &s.soft_cost_micros,
                    ],
                )
                .map_err(sql)?;
            }
        }
        for e in chain(tx, &s.id).map_err(sql)? {
            if !all.iter().any(|x| x.id == e.id) {
                all.push(e);
            }
        }
    }
    if let Err(e) = fits(&all, cost, tokens) {
        return Ok(Err(Refused::Exhausted(e)));
    }
    for e in &all {
        tx.exec(
            "UPDATE envelopes SET held_cost_micros = held_cost_micros + ?2,
                                  held_tokens = held_tokens + ?3, held_calls = held_calls + 1
             WHERE id = ?1",
            &[&e.id, &cost, &tokens],
        )
        .map_err(sql)?;
        tx.exec(
            "INSERT INTO envelope_holds (request_id, envelope_id, cost_micros, tokens,
                                         expires_ms, state)
             VALUES (?1, ?2, ?3, ?4, ?5, 'held') ON CONFLICT DO NOTHING",
            &[&request_id, &e.id, &cost, &tokens, &expires_ms],
        )
        .map_err(sql)?;
    }
    Ok(Ok(()))
}

/// Whether `cost`, `tokens` and one call fit in every envelope.
fn fits(all: &[Envelope], cost: i64, tokens: i64) -> Result<(), Exhausted> {
    for e in all {
        for (what, cap, used, needed) in [
            (
                "cost",
                e.caps.cost_micros,
                e.spent_cost_micros + e.held_cost_micros,
                cost,
            ),
            (
                "tokens",
                e.caps.tokens,
                e.spent_tokens + e.held_tokens,
                tokens,
            ),
            ("calls", e.caps.calls, e.calls + e.held_calls, 1),
        ] {
            if let Some(cap) = cap.filter(|cap| used + needed > *cap) {
                return Err(Exhausted {
                    envelope: e.id.clone(),
                    what,
                    cap,
                    used,
                    needed,
                });
            }
        }
    }
    Ok(())
}

/// What `reserve` would say, without reserving (for quotes). Envelopes that do not exist yet
/// are judged by the caps they would be created with.
pub fn would_fit(
    conn: &mut Db,
    specs: &[Spec],
    cost: i64,
    tokens: i64,
) -> DbResult<Result<(), Exhausted>> {
    let mut all: Vec<Envelope> = Vec::new();
    for s in specs {
        let mut next = Some(s.id.clone());
        let mut depth = 0;
        let mut first = true;
        while let Some(id) = next.take() {
            depth += 1;
            if depth > MAX_DEPTH {
                break;
            }
            match get(conn, &id)? {
                Some(mut e) => {
                    if first && s.kind == "budget" {
                        e.caps = s.caps;
                    }
                    next = e.parent.clone();
                    if !all.iter().any(|x| x.id == e.id) {
                        all.push(e);
                    }
                }
                None if first => {
                    all.push(Envelope {
                        id: s.id.clone(),
                        kind: s.kind.to_string(),
                        parent: s.parent.clone(),
                        org: s.org.clone(),
                        caps: s.caps,
                        spent_cost_micros: 0,
                        spent_tokens: 0,
                        calls: 0,
                        held_cost_micros: 0,
                        held_tokens: 0,
                        held_calls: 0,
                        created_ms: 0,
                        soft_cost_micros: s.soft_cost_micros,
                    });
                    next = s.parent.clone();
                }
                None => {}
            }
            first = false;
        }
    }
    Ok(fits(&all, cost, tokens))
}

/// Replaces a request's reservations with what it actually spent. Idempotent. Returns the
/// thresholds crossed by this spending.
/// Rows of four columns, as a tuple.
fn quads<A, B, C, D>(rows: Vec<Row>) -> DbResult<Vec<(A, B, C, D)>>
where
    A: crate::db::FromValue,
    B: crate::db::FromValue,
    C: crate::db::FromValue,
    D: crate::db::FromValue,
{
    rows.iter()
        .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .collect()
}

pub fn settle(tx: &mut Db, request_id: &str, cost: i64, tokens: i64) -> DbResult<Vec<Crossing>> {
    let holds: Vec<(String, i64, i64, String)> = quads(tx.rows(
        "SELECT envelope_id, cost_micros, tokens, state FROM envelope_holds
         WHERE request_id = ?1",
        &[&request_id],
    )?)?;
    let mut crossings = Vec::new();
    for (id, held_cost, held_tokens, state) in holds {
        if state == "settled" {
            continue;
        }
        let before = get(tx, &id)?;
        if state == "held" {
            tx.exec(
                "UPDATE envelopes SET held_cost_micros = held_cost_micros - ?2,
                                      held_tokens = held_tokens - ?3, held_calls = held_calls - 1
                 WHERE id = ?1",
                &[&id, &held_cost, &held_tokens],
            )?;
        }
        tx.exec(
            "UPDATE envelopes SET spent_cost_micros = spent_cost_micros + ?2,
                                  spent_tokens = spent_tokens + ?3, calls = calls + 1
             WHERE id = ?1",
            &[&id, &cost, &tokens],
        )?;
        tx.exec(
            "UPDATE envelope_holds SET state = 'settled' WHERE request_id = ?1 AND envelope_id = ?2",
            &[&request_id, &id],
        )?;
        if let Some(b) = before {
            crossings.extend(crossed(&b, cost));
        }
    }
    Ok(crossings)
}

/// The thresholds between `e`'s spending before and after `cost` more.
fn crossed(e: &Envelope, cost: i64) -> Vec<Crossing> {
    let (before, after) = (e.spent_cost_micros, e.spent_cost_micros + cost);
    let mk = |threshold: String| Crossing {
        envelope: e.id.clone(),
        kind: e.kind.clone(),
        threshold,
        spent_cost_micros: after,
        cap_cost_micros: e.caps.cost_micros,
    };
    let mut out = Vec::new();
    if let Some(soft) = e.soft_cost_micros {
        if before < soft && after >= soft {
            tracing::warn!(envelope = %e.id, spent = after, soft, "budget soft limit reached");
            out.push(mk("soft".into()));
        }
    }
    if let Some(cap) = e.caps.cost_micros.filter(|c| *c > 0) {
        for pct in [50i64, 80, 100] {
            if before * 100 < cap * pct && after * 100 >= cap * pct {
                out.push(mk(format!("{pct}%")));
            }
        }
    }
    out
}

/// Releases reservations past their expiry (a gateway that died mid-request).
pub fn expire(tx: &mut Db, now_ms: i64) -> DbResult<usize> {
    let stale: Vec<(String, String, i64, i64)> = quads(tx.rows(
        "SELECT request_id, envelope_id, cost_micros, tokens FROM envelope_holds
         WHERE state = 'held' AND expires_ms <= ?1",
        &[&now_ms],
    )?)?;
    for (rid, eid, cost, tokens) in &stale {
        tx.exec(
            "UPDATE envelopes SET held_cost_micros = held_cost_micros - ?2,
                                  held_tokens = held_tokens - ?3, held_calls = held_calls - 1
             WHERE id = ?1",
            &[eid, cost, tokens],
        )?;
        tx.exec(
            "UPDATE envelope_holds SET state = 'expired' WHERE request_id = ?1 AND envelope_id = ?2",
            &[rid, eid],
        )?;
    }
    Ok(stale.len())
}

/// Budget periods, calendar-aligned in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    Daily,
    Weekly,
    Monthly,
    Lifetime,
}

impl Period {
    pub fn parse(s: &str) -> Option<Period> {
        match s {
            "daily" => Some(Period::Daily),
            "weekly" => Some(Period::Weekly),
            "monthly" => Some(Period::Monthly),
            "lifetime" => Some(Period::Lifetime),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Lifetime => "lifetime",
        }
    }

    /// Start of the period containing `now_ms`, as `YYYY-MM-DD` (weeks start on Monday).
    pub fn start(self, now_ms: i64) -> String {
        let days = now_ms.div_euclid(86_400_000);
        let start_days = match self {
            Period::Daily => days,
            // 1970-01-01 was a Thursday: Monday is 3 days earlier.
            Period::Weekly => days - (days + 3).rem_euclid(7),
            Period::Monthly => {
                let (y, m, _) = crate::clock::civil(days);
                crate::clock::days_from_civil(y, m, 1)
            }
            Period::Lifetime => return "all".into(),
        };
        let (y, m, d) = crate::clock::civil(start_days);
        format!("{y:04}-{m:02}-{d:02}")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budget {
    /// `key:ID`, `team:NAME` or `org:NAME`.
    pub scope: String,
    pub period: Period,
    /// Refused beyond this (micro-USD).
    pub hard_micros: Option<i64>,
    /// A webhook and a log line when crossed.
    pub soft_micros: Option<i64>,
}

pub fn budgets(db: &mut Db) -> DbResult<Vec<Budget>> {
    db.rows(
        "SELECT scope, period, hard_micros, soft_micros FROM budgets ORDER BY scope, period",
        &[],
    )?
    .iter()
    .map(|r| {
        Ok(Budget {
            scope: r.get(0)?,
            period: Period::parse(&r.get::<String>(1)?).unwrap_or(Period::Lifetime),
            hard_micros: r.get(2)?,
            soft_micros: r.get(3)?,
        })
    })
    .collect()
}

pub fn set_budget(tx: &mut Db, b: &Budget) -> DbResult<()> {
    tx.exec(
        "INSERT INTO budgets (scope, period, hard_micros, soft_micros) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT(scope, period) DO UPDATE SET hard_micros = excluded.hard_micros,
                                                  soft_micros = excluded.soft_micros",
        &[&b.scope, &b.period.as_str(), &b.hard_micros, &b.soft_micros],
    )?;
    Ok(())
}

impl Budget {
    /// The envelope this budget uses for the period containing `now_ms`.
    pub fn spec(&self, org: &str, now_ms: i64) -> Spec {
        Spec {
            id: format!(
                "budget:{}:{}:{}",
                self.scope,
                self.period.as_str(),
                self.period.start(now_ms)
            ),
            kind: "budget",
            parent: None,
            org: org.to_string(),
            caps: Caps {
                cost_micros: self.hard_micros,
                tokens: None,
                calls: None,
            },
            soft_cost_micros: self.soft_micros,
        }
    }
}

/// `cost=1.50,tokens=100000,calls=50` (any subset; cost in USD).
pub fn parse_caps(text: &str) -> Result<Caps, String> {
    let mut caps = Caps::default();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("\"{part}\" must be name=value"))?;
        let (k, v) = (k.trim(), v.trim());
        let int = || {
            v.parse::<i64>()
                .ok()
                .filter(|n| (0..=crate::money::MAX_TOKENS as i64).contains(n))
                .ok_or_else(|| {
                    format!(
                        "{k} must be an integer from 0 to {}, not \"{v}\"",
                        crate::money::MAX_TOKENS
                    )
                })
        };
        match k {
            "cost" => caps.cost_micros = Some(crate::money::parse_usd(v)?.max(0)),
            "tokens" => caps.tokens = Some(int()?),
            "calls" => caps.calls = Some(int()?),
            _ => return Err(format!("unknown cap \"{k}\" (cost, tokens, calls)")),
        }
    }
    Ok(caps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_on_calendar_boundaries_in_utc() {
        // 2026-11-22 (a Sunday) 13:45 UTC.
        let t = 1_795_355_100_000;
        assert_eq!(Period::Daily.start(t), "2026-11-22");
        assert_eq!(Period::Weekly.start(t), "2026-11-16");
        assert_eq!(Period::Monthly.start(t), "2026-11-01");
        assert_eq!(Period::Lifetime.start(t), "all");
        // 2024-02-29 stays in February.
        assert_eq!(Period::Monthly.start(1_709_208_000_000), "2024-02-01");
    }

    #[test]
    fn caps_parse() {
        assert_eq!(
            parse_caps("cost=1.50, tokens=1000,calls=5"),
            Ok(Caps {
                cost_micros: Some(1_500_000),
                tokens: Some(1000),
                calls: Some(5)
            })
        );
        assert!(parse_caps("cost").is_err());
        assert!(parse_caps("dollars=3").is_err());
        assert!(parse_caps("calls=-1").is_err());
    }
}
