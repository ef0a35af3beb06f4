//! What the mock "bills": every answer's usage, by day and model, served back through the
//! providers' own usage report APIs in their real shapes, so reconciliation is tested against
//! the wire format a real provider sends:
//! - OpenAI: `GET /v1/organization/usage/completions` (`start_time`/`end_time` in Unix
//!   seconds, `bucket_width=1d`, `group_by=model`): pages of buckets of
//!   `organization.usage.completions.result`.
//! - Anthropic: `GET /v1/organizations/usage_report/messages` (`starting_at`/`ending_at` in
//!   RFC 3339, `bucket_width=1d`, `group_by[]=model`): buckets of results with
//!   `uncached_input_tokens`, `cache_read_input_tokens`, `cache_creation`, `output_tokens`.
//!
//! - Costs, priced with the built-in price table (the providers' list prices) per request,
//!   rounded up to the micro-dollar as tollgate rounds: OpenAI's `GET /v1/organization/costs`
//!   (`group_by=line_item`: `amount.value` in USD, line items `"<model>, input"`,
//!   `"<model>, cached input"`, `"<model>, output"`) and Anthropic's
//!   `GET /v1/organizations/cost_report` (`group_by[]=description`: `amount` a decimal
//!   string in cents, with `model` and `token_type`).
//!
//! The `overbill` flag bills 10% more output than the answer reported (at least one token): a
//! provider whose invoice disagrees with what it told the gateway.

use super::*;
use std::collections::BTreeMap;

#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Billed {
    pub(crate) requests: u64,
    /// Everything the prompt held, cached and cache writes included.
    pub(crate) input: u64,
    pub(crate) cached: u64,
    pub(crate) write_5m: u64,
    pub(crate) write_1h: u64,
    pub(crate) output: u64,
    /// What it cost, in micro-USD per `TOKEN_CLASSES` (input, cached, 5m and 1h writes,
    /// output, reasoning); each request's rounding up lands on its uncached input.
    pub(crate) cost: [u64; 6],
}

/// (dialect, day start in Unix seconds, model) → totals.
pub(crate) type Ledger = Mutex<BTreeMap<(&'static str, u64, String), Billed>>;

const DAY_S: u64 = 86_400;

impl MockState {
    /// Books one answer's usage.
    pub(crate) fn bill(&self, dialect: &'static str, model: &str, b: &Behaviour, mut u: Billed) {
        if b.has("overbill") {
            u.output += (u.output / 10).max(1);
        }
        u.requests = 1;
        let table = crate::prices::PriceTable::new(&[]);
        if let Some(price) = table
            .lookup(dialect, model)
            .or_else(|| table.lookup("mock", model))
        {
            let usage = tollgate_proto::Usage {
                input: u.input,
                cached_input: u.cached,
                cache_write_5m: u.write_5m,
                cache_write_1h: u.write_1h,
                output: u.output,
                ..Default::default()
            };
            let classes = crate::prices::token_classes(&usage);
            let mut sum = 0;
            for (i, (n, p)) in classes.iter().zip(price.per_class()).enumerate() {
                u.cost[i] = n * p / 1_000_000;
                sum += u.cost[i];
            }
            u.cost[0] += price.cost(&usage) - sum;
        }
        let day = crate::clock::now_ms().max(0) as u64 / 1000 / DAY_S * DAY_S;
        let mut ledger = self.billed.lock().unwrap_or_else(|p| p.into_inner());
        let t = ledger.entry((dialect, day, model.to_string())).or_default();
        t.requests += u.requests;
        t.input += u.input;
        t.cached += u.cached;
        t.write_5m += u.write_5m;
        t.write_1h += u.write_1h;
        t.output += u.output;
        for i in 0..6 {
            t.cost[i] += u.cost[i];
        }
    }

    fn days(&self, dialect: &str, from_s: u64, to_s: u64) -> BTreeMap<u64, Vec<(String, Billed)>> {
        let ledger = self.billed.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: BTreeMap<u64, Vec<(String, Billed)>> = BTreeMap::new();
        let mut day = from_s / DAY_S * DAY_S;
        while day < to_s {
            out.insert(day, Vec::new());
            day += DAY_S;
        }
        for ((d, day, model), t) in ledger.iter() {
            if *d == dialect && *day + DAY_S > from_s && *day < to_s {
                out.entry(*day).or_default().push((model.clone(), *t));
            }
        }
        out
    }
}

fn query(uri: &axum::http::Uri) -> Vec<(String, String)> {
    uri.query()
        .map(|q| {
            q.split('&')
                .filter_map(|p| p.split_once('='))
                .map(|(k, v)| (k.to_string(), v.replace("%3A", ":").replace("%2B", "+")))
                .collect()
        })
        .unwrap_or_default()
}

/// A report request's query and window, in Unix seconds; or the answer that refuses it.
struct Report;

type Window = (Vec<(String, String)>, u64, u64);

impl Report {
    /// OpenAI's organization reports: `start_time`/`end_time` in Unix seconds.
    async fn openai(
        state: &MockState,
        headers: &HeaderMap,
        uri: &axum::http::Uri,
    ) -> Result<Window, Response> {
        if let Some(r) = state
            .failure(&Behaviour::from("mock", headers), headers)
            .await
        {
            return Err(r);
        }
        let q = query(uri);
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let Some(start) = get("start_time").and_then(|v| v.parse::<u64>().ok()) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "start_time is required",
                "invalid_request_error",
                "invalid_value",
            ));
        };
        let end = get("end_time")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(start + 7 * DAY_S);
        Ok((q, start, end))
    }

    /// Anthropic's organization reports: `starting_at`/`ending_at` in RFC 3339.
    async fn anthropic(
        state: &MockState,
        headers: &HeaderMap,
        uri: &axum::http::Uri,
    ) -> Result<Window, Response> {
        if let Some(r) = state
            .failure(&Behaviour::from("mock", headers), headers)
            .await
        {
            return Err(to_anthropic(r));
        }
        let q = query(uri);
        let get = |k: &str| q.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        let Some(start) = get("starting_at").and_then(parse_rfc3339) else {
            return Err(json_response(
                StatusCode::BAD_REQUEST,
                anthropic_error_body(
                    "invalid_request_error",
                    "starting_at: a RFC 3339 time is required",
                ),
            ));
        };
        let end = get("ending_at")
            .and_then(parse_rfc3339)
            .unwrap_or(start + 7 * DAY_S);
        Ok((q, start, end))
    }
}

pub(crate) async fn openai_usage(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let (q, start, end) = match Report::openai(&state, &headers, &uri).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by_model = q
        .iter()
        .any(|(k, v)| k.starts_with("group_by") && v == "model");
    let data: Vec<Value> = state
        .days("openai", start, end)
        .into_iter()
        .map(|(day, models)| {
            let mut results: Vec<Value> = models
                .iter()
                .map(|(m, t)| {
                    json!({"object": "organization.usage.completions.result", "input_tokens": t.input,
                        "output_tokens": t.output, "input_cached_tokens": t.cached,
                        "input_audio_tokens": 0, "output_audio_tokens": 0,
                        "num_model_requests": t.requests, "project_id": null, "user_id": null,
                        "api_key_id": null, "model": if by_model { json!(m) } else { Value::Null },
                        "batch": null, "service_tier": null})
                })
                .collect();
            if !by_model && results.len() > 1 {
                let mut sum = results[0].clone();
                for r in &results[1..] {
                    for f in ["input_tokens", "output_tokens", "input_cached_tokens", "num_model_requests"] {
                        sum[f] = json!(sum[f].as_u64().unwrap_or(0) + r[f].as_u64().unwrap_or(0));
                    }
                }
                results = vec![sum];
            }
            json!({"object": "bucket", "start_time": day, "end_time": day + DAY_S, "results": results})
        })
        .collect();
    axum::Json(json!({"object": "page", "data": data, "has_more": false, "next_page": null}))
        .into_response()
}

fn rfc3339(s: u64) -> String {
    crate::clock::rfc3339((s * 1000) as i64)
}

fn parse_rfc3339(v: &str) -> Option<u64> {
    u64::try_from(crate::clock::parse_rfc3339(v)? / 1000).ok()
}

pub(crate) async fn anthropic_usage_report(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let (q, start, end) = match Report::anthropic(&state, &headers, &uri).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by_model = q
        .iter()
        .any(|(k, v)| k.starts_with("group_by") && v == "model");
    let data: Vec<Value> = state
        .days("anthropic", start, end)
        .into_iter()
        .map(|(day, models)| {
            let results: Vec<Value> = models
                .iter()
                .map(|(m, t)| {
                    json!({"uncached_input_tokens": t.input - t.cached - t.write_5m - t.write_1h,
                        "cache_read_input_tokens": t.cached,
                        "cache_creation": {"ephemeral_5m_input_tokens": t.write_5m, "ephemeral_1h_input_tokens": t.write_1h},
                        "output_tokens": t.output, "server_tool_use": {"web_search_requests": 0},
                        "api_key_id": null, "workspace_id": null,
                        "model": if by_model { json!(m) } else { Value::Null },
                        "service_tier": "standard", "context_window": "0-200k"})
                })
                .collect();
            json!({"starting_at": rfc3339(day), "ending_at": rfc3339(day + DAY_S), "results": results})
        })
        .collect();
    axum::Json(json!({"data": data, "has_more": false, "next_page": null})).into_response()
}

/// `micros` as Anthropic writes money: a decimal string in cents.
fn cents(micros: u64) -> String {
    format!("{}.{:04}", micros / 10_000, micros % 10_000)
}

pub(crate) async fn openai_costs(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let (q, start, end) = match Report::openai(&state, &headers, &uri).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by_item = q
        .iter()
        .any(|(k, v)| k.starts_with("group_by") && v == "line_item");
    let data: Vec<Value> = state
        .days("openai", start, end)
        .into_iter()
        .map(|(day, models)| {
            let item = |line: Option<String>, micros: u64| {
                json!({"object": "organization.costs.result",
                    "amount": {"value": micros as f64 / 1e6, "currency": "usd"},
                    "line_item": line, "project_id": null})
            };
            let results: Vec<Value> = if by_item {
                models
                    .iter()
                    .flat_map(|(m, t)| {
                        [
                            ("input", t.cost[0] + t.cost[2] + t.cost[3]),
                            ("cached input", t.cost[1]),
                            ("output", t.cost[4] + t.cost[5]),
                        ]
                        .into_iter()
                        .filter(|(_, c)| *c > 0)
                        .map(move |(class, c)| item(Some(format!("{m}, {class}")), c))
                    })
                    .collect()
            } else {
                vec![item(None, models.iter().map(|(_, t)| t.cost.iter().sum::<u64>()).sum())]
            };
            json!({"object": "bucket", "start_time": day, "end_time": day + DAY_S, "results": results})
        })
        .collect();
    axum::Json(json!({"object": "page", "data": data, "has_more": false, "next_page": null}))
        .into_response()
}

pub(crate) async fn anthropic_cost_report(
    State(state): State<Arc<MockState>>,
    headers: HeaderMap,
    uri: axum::http::Uri,
) -> Response {
    let (q, start, end) = match Report::anthropic(&state, &headers, &uri).await {
        Ok(w) => w,
        Err(r) => return r,
    };
    let by_description = q
        .iter()
        .any(|(k, v)| k.starts_with("group_by") && v == "description");
    let data: Vec<Value> = state
        .days("anthropic", start, end)
        .into_iter()
        .map(|(day, models)| {
            let results: Vec<Value> = if by_description {
                models
                    .iter()
                    .flat_map(|(m, t)| {
                        [
                            ("uncached_input_tokens", "Input", t.cost[0]),
                            ("cache_read_input_tokens", "Cache Hits & Refreshes", t.cost[1]),
                            ("cache_creation.ephemeral_5m_input_tokens", "5m Cache Write", t.cost[2]),
                            ("cache_creation.ephemeral_1h_input_tokens", "1h Cache Write", t.cost[3]),
                            ("output_tokens", "Output", t.cost[4] + t.cost[5]),
                        ]
                        .into_iter()
                        .filter(|(_, _, c)| *c > 0)
                        .map(move |(token_type, what, c)| {
                            json!({"amount": cents(c), "currency": "USD",
                                "description": format!("{m}, {what}"), "cost_type": "tokens",
                                "context_window": "0-200k", "model": m, "service_tier": "standard",
                                "token_type": token_type, "workspace_id": null})
                        })
                    })
                    .collect()
            } else {
                let total: u64 = models.iter().map(|(_, t)| t.cost.iter().sum::<u64>()).sum();
                vec![json!({"amount": cents(total), "currency": "USD", "description": null,
                    "cost_type": null, "context_window": null, "model": null,
                    "service_tier": null, "token_type": null, "workspace_id": null})]
            };
            json!({"starting_at": rfc3339(day), "ending_at": rfc3339(day + DAY_S), "results": results})
        })
        .collect();
    axum::Json(json!({"data": data, "has_more": false, "next_page": null})).into_response()
}
