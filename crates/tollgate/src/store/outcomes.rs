//! Outcomes: what a run or a request bought (a ticket solved, a PR merged), reported by the
//! agent or an operator, and the spend they are set against.

use super::*;
use std::collections::BTreeMap;

/// Migration 14 (records are found by run through `usage_run`, from migration 8).
pub(super) const MIGRATION: &str = "CREATE TABLE outcomes (
        id TEXT PRIMARY KEY,
        occurred_ms INTEGER NOT NULL,
        key_id TEXT NOT NULL,
        agent TEXT NOT NULL,
        team TEXT,
        project TEXT,
        run_id TEXT,
        request_id TEXT,
        kind TEXT NOT NULL,
        success INTEGER NOT NULL,
        value_micros INTEGER,
        tags TEXT NOT NULL,
        created_ms INTEGER NOT NULL
     );
     CREATE INDEX outcomes_occurred ON outcomes(occurred_ms);";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Outcome {
    pub id: String,
    pub occurred_ms: i64,
    pub key_id: String,
    pub agent: String,
    pub team: Option<String>,
    pub project: Option<String>,
    pub run_id: Option<String>,
    pub request_id: Option<String>,
    /// What kind of outcome: `ticket_resolved`, `pr_merged`, … (the caller's words).
    #[serde(rename = "type")]
    pub kind: String,
    pub success: bool,
    pub value_micros: Option<i64>,
    pub tags: BTreeMap<String, String>,
    pub created_ms: i64,
}

const COLUMNS: &str = "id, occurred_ms, key_id, agent, team, project, run_id, request_id, kind,
    success, value_micros, tags, created_ms";

fn from_row(r: &Row) -> Result<Outcome> {
    let tags: String = r.get(11)?;
    Ok(Outcome {
        id: r.get(0)?,
        occurred_ms: r.get(1)?,
        key_id: r.get(2)?,
        agent: r.get(3)?,
        team: r.get(4)?,
        project: r.get(5)?,
        run_id: r.get(6)?,
        request_id: r.get(7)?,
        kind: r.get(8)?,
        success: r.get(9)?,
        value_micros: r.get(10)?,
        tags: serde_json::from_str(&tags).unwrap_or_default(),
        created_ms: r.get(12)?,
    })
}

/// What recording an outcome did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Created(Outcome),
    /// The same outcome was recorded before (a retry): nothing changed.
    Existing(Outcome),
    /// The id was used for a different outcome.
    Conflict(Outcome),
}

/// Spend per model on what an outcome is set against: its request, or its run with every
/// sub-run, counting only records at or after `since_ms`.
pub type ModelSpend = Vec<(String, u64)>;

impl Store {
    /// Records an outcome once: the same id with the same content again is `Existing`.
    /// `timed`: the caller gave the time, so it is part of the content (else a retry that
    /// defaulted to a later "now" would look different).
    pub fn record_outcome(&self, o: &Outcome, timed: bool) -> Result<Recorded> {
        lock(&self.db).write(|tx| {
            if let Some(r) = tx.row(
                &format!("SELECT {COLUMNS} FROM outcomes WHERE id = ?1"),
                &[&o.id],
            )? {
                let old = from_row(&r)?;
                let same = Outcome {
                    created_ms: old.created_ms,
                    occurred_ms: if timed { o.occurred_ms } else { old.occurred_ms },
                    ..o.clone()
                } == old;
                return Ok(if same {
                    Recorded::Existing(old)
                } else {
                    Recorded::Conflict(old)
                });
            }
            tx.exec(
                &format!(
                    "INSERT INTO outcomes ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
                ),
                &[
                    &o.id,
                    &o.occurred_ms,
                    &o.key_id,
                    &o.agent,
                    &o.team,
                    &o.project,
                    &o.run_id,
                    &o.request_id,
                    &o.kind,
                    &o.success,
                    &o.value_micros,
                    &json(&o.tags),
                    &o.created_ms,
                ],
            )?;
            Ok(Recorded::Created(o.clone()))
        })
    }

    /// Outcomes that occurred at or after `since_ms`, oldest first.
    pub fn outcomes_since(&self, since_ms: i64) -> Result<Vec<Outcome>> {
        self.with(|db| {
            db.rows(
                &format!(
                    "SELECT {COLUMNS} FROM outcomes WHERE occurred_ms >= ?1 ORDER BY occurred_ms, id"
                ),
                &[&since_ms],
            )?
            .iter()
            .map(from_row)
            .collect()
        })
    }

    /// The spend each outcome that occurred at or after `since_ms` is set against, by model,
    /// keyed `req:ID` or `run:ID`: its request's record, or its run and the run's sub-runs
    /// (at any depth) from the per-run rollups, counting spend from `since_ms` on (rounded down
    /// to its hour, as reports are). Three queries, whatever the number of outcomes.
    ///
    /// `per_model` false: one total per target (named `*`), which is all a report not by
    /// model needs and half the work (grouping 400 000 rollup rows by model was most of a
    /// 30-day report at 100 000 outcomes).
    pub fn outcome_spends(
        &self,
        since_ms: i64,
        per_model: bool,
    ) -> Result<BTreeMap<String, ModelSpend>> {
        let from = super::usage::report_start(since_ms);
        let model = if per_model {
            "COALESCE(NULLIF(r.model, ''), '-')"
        } else {
            "'*'"
        };
        let request_model = if per_model {
            "COALESCE(NULLIF(COALESCE(u.model_served, u.model_requested), ''), '-')"
        } else {
            "'*'"
        };
        self.with(|db| {
            let mut spends: BTreeMap<String, ModelSpend> = BTreeMap::new();
            let by_request = db.rows(
                &format!("SELECT 'req:' || u.id, {request_model},
                        CAST(SUM(u.cost_micros) AS BIGINT)
                 FROM usage u
                 WHERE u.id IN (SELECT request_id FROM outcomes WHERE occurred_ms >= ?1 AND request_id IS NOT NULL)
                   AND u.ts_ms >= ?2
                 GROUP BY 1, 2 ORDER BY 1, 2"),
                &[&since_ms, &from],
            )?;
            // A run's own spend, on the rollup's primary key in run order; then what its
            // sub-runs spent, walking only from the runs that have any (most have none: the
            // recursion seeded with every run cost ~1.7 s for 100 000 outcomes).
            let own = db.rows(
                &format!("SELECT 'run:' || r.run_id, {model}, CAST(SUM(r.cost_micros) AS BIGINT)
                 FROM usage_run_rollup r
                 WHERE r.start_ms >= ?2
                   AND r.run_id IN (SELECT run_id FROM outcomes
                                    WHERE occurred_ms >= ?1 AND request_id IS NULL AND run_id IS NOT NULL)
                 GROUP BY 1, 2"),
                &[&since_ms, &from],
            )?;
            let below = db.rows(
                &format!("WITH RECURSIVE tree(root, id) AS (
                    SELECT DISTINCT o.run_id, CAST(e.id AS TEXT) FROM outcomes o
                    JOIN envelopes e ON e.parent = 'run:' || o.run_id
                    WHERE o.occurred_ms >= ?1 AND o.request_id IS NULL AND o.run_id IS NOT NULL
                    UNION ALL
                    SELECT t.root, e.id FROM envelopes e JOIN tree t ON e.parent = t.id
                 )
                 SELECT 'run:' || t.root, {model}, CAST(SUM(r.cost_micros) AS BIGINT)
                 FROM tree t JOIN usage_run_rollup r ON r.run_id = substr(t.id, 5)
                 WHERE r.start_ms >= ?2
                 GROUP BY 1, 2"),
                &[&since_ms, &from],
            )?;
            // One entry per (target, model), in model order, however many parts it came in.
            let mut sums: BTreeMap<(String, String), u64> = BTreeMap::new();
            for r in by_request.iter().chain(own.iter()).chain(below.iter()) {
                let e = sums
                    .entry((r.get::<String>(0)?, r.get::<String>(1)?))
                    .or_default();
                *e = e.saturating_add(r.get::<u64>(2)?);
            }
            for ((target, model), cost) in sums {
                spends.entry(target).or_default().push((model, cost));
            }
            Ok(spends)
        })
    }

    /// Each run under each of `roots` at any depth, the root included, as (root, run):
    /// what a run's outcome is set against when its spend is summed elsewhere (ClickHouse).
    pub fn run_trees(&self, roots: &[String]) -> Result<Vec<(String, String)>> {
        let rows = self.rows_in(
            roots,
            |list| {
                format!(
                    "WITH RECURSIVE tree(root, id) AS (
                    SELECT column1, CAST('run:' || column1 AS TEXT) FROM (VALUES {list}) AS v
                    UNION ALL
                    SELECT t.root, e.id FROM envelopes e JOIN tree t ON e.parent = t.id
                 )
                 SELECT DISTINCT root, substr(id, 5) FROM tree ORDER BY 1, 2"
                )
            },
            "(CAST(?{} AS TEXT))",
        )?;
        rows.iter()
            .map(|r| Ok((r.get::<String>(0)?, r.get::<String>(1)?)))
            .collect()
    }

    /// What the ledger captured for each of `request_ids` that has a capture.
    pub fn captures(&self, request_ids: &[&str]) -> Result<BTreeMap<String, i64>> {
        let rows = self.rows_in(
            request_ids,
            |list| {
                format!(
                    "SELECT request_id, -amount_micros FROM ledger
                 WHERE kind = 'capture' AND request_id IN ({list})"
                )
            },
            "?{}",
        )?;
        rows.iter()
            .map(|r| Ok((r.get::<String>(0)?, r.get::<i64>(1)?)))
            .collect()
    }

    /// `sql(list)` for each 500 of `values`, `list` being `each` (with `{}` for the
    /// parameter's number) once per value, joined by commas; the rows of all of them.
    pub(super) fn rows_in<P: crate::db::Param>(
        &self,
        values: &[P],
        sql: impl Fn(&str) -> String,
        each: &str,
    ) -> Result<Vec<Row>> {
        let mut out = Vec::new();
        for part in values.chunks(500) {
            let list = (1..=part.len())
                .map(|i| each.replace("{}", &i.to_string()))
                .collect::<Vec<_>>()
                .join(", ");
            let params: Vec<&dyn crate::db::Param> =
                part.iter().map(|r| r as &dyn crate::db::Param).collect();
            out.extend(self.with(|db| Ok(db.rows(&sql(&list), &params)?))?);
        }
        Ok(out)
    }
}
