//! The settle phase: the `Settlement` owns a request's usage record from authentication to
//! the meter, and writes it exactly once on every ending (answer, error, disconnect, panic).

use super::*;

/// Owns the request's usage record until it is handed to the meter, exactly once.
pub(crate) struct Settlement {
    pub(crate) app: Arc<AppState>,
    /// The configuration the request started with (see `Settlement::new`).
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) rec: UsageRecord,
    /// Set once the record has been handed on (to the meter, or to a stream that settles it).
    pub(crate) done: bool,
    /// Refused because the ledger writer is behind: its record would only lengthen the queue.
    pub(crate) shed: bool,
    pub(crate) started: Instant,
    pub(crate) body: Bytes,
    pub(crate) upstream_started: bool,
    /// The limiter's grant: its token reservation is settled with the real count, and its
    /// concurrency slot is released, when the record is committed.
    pub(crate) admission: Option<Admission>,
    /// `x-ratelimit-*` for the response.
    pub(crate) rate_headers: HeaderMap,
    /// Identifies the request (key, endpoint, body) for retry recognition and coalescing.
    pub(crate) request_fp: u64,
    /// Key, endpoint and `Idempotency-Key`, when the request carries one.
    pub(crate) idempotency_fp: Option<u64>,
    /// Set while identical requests wait for this one's answer.
    pub(crate) lead: Option<u64>,
    pub(crate) request_id: String,
    /// The quote held in the key's wallet, for a stream's running cost.
    pub(crate) money: Option<Quote>,
    /// Fingerprints under which a successful JSON answer is kept, and until when (µs).
    pub(crate) keep: Vec<(u64, u64)>,
    /// The answer refuses a tool call until an approver decides: requests in flight may
    /// share it, later ones must not be replayed it.
    pub(crate) parked: bool,
    /// Attempts the provider answered but that broke off: added to the record whatever the
    /// request's ending.
    pub(crate) broken: Broken,
    /// A tool call's price, paid when the service handled the call.
    pub(crate) route_price: Option<u64>,
    /// The response cache keeps this request's answer under this digest, if it is keepable.
    pub(crate) cache_key: Option<[u8; 32]>,
    /// A cache hit waiting for its fee to be held.
    pub(crate) cache_hit: Option<Arc<crate::cache::Entry>>,
    /// Cascade tiers whose answers failed their checks: exact usage and cost, added to the
    /// record whatever the request's ending.
    pub(crate) rejected: Broken,
    /// While a cascade tier before the last is tried: the last tier's deployment, whose price
    /// says what the answer would have cost had the cascade gone straight there.
    pub(crate) cascade_reference: Option<Arc<Deployment>>,
}

/// Tokens and cost (estimated) of upstream attempts that broke off after the provider
/// accepted them.
#[derive(Debug, Default)]
pub(crate) struct Broken {
    pub(crate) usage: Usage,
    pub(crate) cost: u64,
    pub(crate) price: Option<String>,
}

impl Broken {
    /// An attempt's usage, priced as `dep` prices it.
    pub(crate) fn add(&mut self, runtime: &Runtime, dep: &Deployment, usage: Usage) {
        let price = runtime.prices.lookup(&dep.provider.name, &dep.model);
        let cost = price.map_or(0, |p| p.cost(&usage));
        self.usage.input = self.usage.input.saturating_add(usage.input);
        self.usage.cached_input = self.usage.cached_input.saturating_add(usage.cached_input);
        self.usage.output = self.usage.output.saturating_add(usage.output);
        self.cost = self
            .cost
            .saturating_add(cost)
            .min(crate::money::MAX_MICROS as u64);
        if self.price.is_none() {
            self.price = Some(price.map_or_else(|| "unpriced".into(), |p| p.version.clone()));
        }
    }

    /// Adds them to the record that leaves (after its own usage is applied), marking its
    /// usage as (partly) estimated.
    pub(crate) fn fold(&mut self, rec: &mut UsageRecord) {
        if self.add_to(rec) {
            rec.usage_source = match rec.usage_source.as_str() {
                "provider" => "provider+estimated".into(),
                _ => "estimated".into(),
            };
        }
    }

    /// `fold` for usage the provider reported (a rejected cascade tier's): the source stays.
    pub(crate) fn fold_exact(&mut self, rec: &mut UsageRecord) {
        if self.add_to(rec) && rec.usage_source == "none" {
            rec.usage_source = "provider".into();
        }
    }

    fn add_to(&mut self, rec: &mut UsageRecord) -> bool {
        let Some(price) = self.price.take() else {
            return false;
        };
        rec.input_tokens = rec.input_tokens.saturating_add(self.usage.input);
        rec.cached_input_tokens = rec
            .cached_input_tokens
            .saturating_add(self.usage.cached_input);
        rec.output_tokens = rec.output_tokens.saturating_add(self.usage.output);
        rec.cost_micros = rec
            .cost_micros
            .saturating_add(self.cost)
            .min(crate::money::MAX_MICROS as u64);
        if rec.price_version.is_none() {
            rec.price_version = Some(price);
        }
        true
    }
}

impl Settlement {
    /// `runtime` is the configuration the request started with: from admission to
    /// settlement it sees no other, so a reload in the middle changes neither its prices, its
    /// deployments nor its limits.
    pub(crate) fn new(
        app: Arc<AppState>,
        runtime: Arc<Runtime>,
        key: &KeyRecord,
        endpoint: String,
        request_id: &str,
        started: Instant,
    ) -> Settlement {
        let rec = UsageRecord {
            id: request_id.to_string(),
            ts_ms: now_ms(),
            endpoint,
            key_id: key.id.clone(),
            agent: key.name.clone(),
            team: key.team.clone(),
            project: key.project.clone(),
            org: key.org.clone(),
            tags: key.tags.clone(),
            usage_source: "none".into(),
            ..UsageRecord::default()
        };
        Settlement {
            app,
            runtime,
            rec,
            done: false,
            shed: false,
            started,
            body: Bytes::new(),
            upstream_started: false,
            admission: None,
            rate_headers: HeaderMap::new(),
            request_fp: 0,
            idempotency_fp: None,
            lead: None,
            request_id: request_id.to_string(),
            money: None,
            keep: Vec::new(),
            parked: false,
            broken: Broken::default(),
            route_price: None,
            cache_key: None,
            cache_hit: None,
            rejected: Broken::default(),
            cascade_reference: None,
        }
    }

    /// A tool call's settlement: the same record, hold and commit as a model call's, named
    /// after its route.
    pub(crate) fn for_route(
        app: Arc<AppState>,
        runtime: Arc<Runtime>,
        key: &KeyRecord,
        route: &crate::toolroute::ToolRoute,
        request_id: &str,
        started: Instant,
    ) -> Settlement {
        let name = format!("route:{}", route.name);
        let mut s = Settlement::new(app, runtime, key, name, request_id, started);
        s.rec.provider = Some(route.name.clone());
        s.route_price = Some(route.price_per_call);
        s
    }

    /// A tool call's ending, once its answer's body is done (or abandoned): its status, the
    /// bytes it answered with, and its price when the service handled it (below 500).
    pub(crate) fn finish_route(
        &mut self,
        status: u16,
        error: Option<&str>,
        bytes: u64,
        disconnected: bool,
    ) {
        let Some(mut rec) = self.take() else {
            return;
        };
        rec.status = status;
        rec.error_kind = error.map(str::to_string);
        rec.response_bytes = bytes;
        rec.client_disconnected = disconnected;
        rec.attempts = 1;
        if let Some(price) = self.route_price.filter(|_| status < 500 && error.is_none()) {
            rec.cost_micros = price;
            rec.price_version = (price > 0).then(|| format!("per-call:{price}"));
        }
        self.commit(rec);
    }

    /// An attempt whose answer broke off after the provider accepted it: the provider bills
    /// its input and whatever it wrote, so the request does too (estimated), even when a
    /// later attempt succeeds.
    pub(crate) fn bill_broken_attempt(
        &mut self,
        runtime: &Runtime,
        dep: &Deployment,
        partial: &[u8],
    ) {
        let usage = Usage {
            input: estimate::request_tokens(&self.body).min(crate::money::MAX_TOKENS),
            output: estimate::tokens(&partial_answer_text(partial)).min(crate::money::MAX_TOKENS),
            ..Usage::default()
        };
        self.broken.add(runtime, dep, usage);
        self.app.metrics.attempts_billed_broken.inc();
    }

    /// A cascade tier's answer that failed its checks: the provider did the work, so the
    /// request pays for it, at the usage the provider reported (estimated if it gave none).
    pub(crate) fn bill_rejected_tier(
        &mut self,
        runtime: &Runtime,
        dep: &Deployment,
        endpoint: Endpoint,
        body: &[u8],
    ) {
        let usage = match endpoint.dialect() {
            Dialect::OpenAi => Usage::from_openai_response(body),
            Dialect::Anthropic => Usage::from_anthropic_response(body),
        }
        .unwrap_or_else(|| Usage {
            input: estimate::request_tokens(&self.body),
            output: estimate_output_json(body),
            ..Usage::default()
        });
        self.bill_rejected(runtime, dep, usage);
    }

    /// A cascade tier's stream, read whole, that failed its checks: billed at the usage its
    /// events reported (estimated from its text if they reported none).
    pub(crate) fn bill_rejected_stream(
        &mut self,
        runtime: &Runtime,
        dep: &Deployment,
        observer: &super::stream::Observer,
    ) {
        let usage = observer.usage().unwrap_or_else(|| Usage {
            input: estimate::request_tokens(&self.body),
            output: estimate::tokens(observer.output_text()),
            ..observer.input_usage().unwrap_or_default()
        });
        self.bill_rejected(runtime, dep, usage);
    }

    fn bill_rejected(&mut self, runtime: &Runtime, dep: &Deployment, usage: Usage) {
        let bound = |n: u64| n.min(crate::money::MAX_TOKENS);
        let usage = Usage {
            input: bound(usage.input),
            cached_input: bound(usage.cached_input),
            output: bound(usage.output),
            ..Usage::default()
        };
        self.rejected.add(runtime, dep, usage);
    }

    /// Answers with another request's answer: no upstream call, no cost.
    pub(crate) fn reuse(
        &mut self,
        answer: &crate::damping::Answer,
        kind: &'static str,
    ) -> Response {
        if let Some(mut rec) = self.take() {
            rec.status = answer.status.as_u16();
            rec.reused = Some(kind.to_string());
            rec.reused_from = Some(answer.request_id.clone());
            self.commit(rec);
        }
        self.app
            .metrics
            .answers_reused
            .get_or_create(&ReuseLabels { kind })
            .inc();
        let mut resp = Response::new(Body::from(answer.body.clone()));
        *resp.status_mut() = answer.status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, answer.content_type.clone());
        h.insert("x-tollgate-cost", HeaderValue::from(0));
        h.insert("x-tollgate-reused", HeaderValue::from_static(kind));
        if let Ok(v) = HeaderValue::from_str(&answer.request_id) {
            h.insert("x-tollgate-reused-from", v);
        }
        resp
    }

    /// Answers with the loop guard's nudge (see `nudge.rs`): a 200 in the caller's dialect,
    /// recorded as a loop at zero cost.
    pub(crate) fn nudge(
        &mut self,
        finding: &str,
        content_type: &'static str,
        body: Bytes,
    ) -> Response {
        if let Some(mut rec) = self.take() {
            rec.detail = Some(detail(finding));
            rec.status = 200;
            rec.error_kind = Some(ErrorKind::LoopDetected.as_str().to_string());
            rec.reused = Some("loop_nudge".to_string());
            self.commit(rec);
        }
        self.app
            .metrics
            .answers_reused
            .get_or_create(&ReuseLabels { kind: "loop_nudge" })
            .inc();
        let mut resp = Response::new(Body::from(body));
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static(content_type),
        );
        h.insert("x-tollgate-cost", HeaderValue::from(0));
        h.insert("x-tollgate-loop", HeaderValue::from_static("nudge"));
        resp
    }

    /// Hands a finished JSON answer to the requests waiting on this one, and keeps it for
    /// idempotent retries and the loop guard.
    pub(crate) fn share(&mut self, status: StatusCode, content_type: &HeaderValue, body: &Bytes) {
        if self.lead.is_none() && self.keep.is_empty() && self.idempotency_fp.is_none() {
            return;
        }
        let answer = Arc::new(crate::damping::Answer {
            status,
            content_type: content_type.clone(),
            body: body.clone(),
            request_id: self.request_id.clone(),
            request_fp: self.request_fp,
        });
        if let Some(fp) = self.lead.take() {
            self.app
                .damper
                .finish_lead(fp, Some(crate::damping::Outcome::Answer(answer.clone())));
        }
        if !status.is_success() || self.parked {
            return;
        }
        let ttl = self.runtime.retries.idempotency_ttl.as_micros() as u64;
        if let Some(fp) = self.idempotency_fp {
            self.app
                .damper
                .keep_answer(fp, now_us() + ttl, answer.clone());
        }
        for (fp, until) in std::mem::take(&mut self.keep) {
            self.app.damper.keep_answer(fp, until, answer.clone());
        }
    }

    /// Starts the request's trace when `[otel]` exports them: the caller's context, or a new one.
    pub(crate) fn begin_trace(&mut self, headers: &HeaderMap) {
        if let Some(t) = &self.app.meter.tracer {
            self.rec.trace.0 = Some(t.begin(headers));
        }
    }

    pub(crate) fn rec_mut(&mut self) -> &mut UsageRecord {
        &mut self.rec
    }

    /// The record, once; `None` if it was already handed on.
    pub(crate) fn take(&mut self) -> Option<UsageRecord> {
        if self.done {
            return None;
        }
        self.done = true;
        Some(std::mem::take(&mut self.rec))
    }

    pub(crate) fn commit(&mut self, mut rec: UsageRecord) {
        self.broken.fold(&mut rec);
        self.rejected.fold_exact(&mut rec);
        self.note_cascade_saving(&mut rec);
        rec.latency_ms = self.started.elapsed().as_millis() as u64;
        if let Some(mut a) = self.admission.take() {
            a.settle(now_us(), rec.input_tokens + rec.output_tokens);
        }
        if self.shed {
            self.app.metrics.usage_records_shed.inc();
            return;
        }
        self.app.meter.record(rec);
    }

    /// A cascade answered before its last tier: what the answer would have cost from the
    /// last tier's deployment (same tokens), less what it cost, is saved.
    pub(crate) fn note_cascade_saving(&mut self, rec: &mut UsageRecord) {
        if let Some(reference) = self.cascade_reference.take() {
            note_cascade_saving(&self.runtime, &reference, rec);
        }
    }

    pub(crate) fn finish_error(&mut self, e: &ApiError) {
        if let Some(mut rec) = self.take() {
            if !self.upstream_started {
                // Refused before any provider saw it: compressing it saved nothing.
                rec.savings.retain(|s| !s.saver.starts_with("compress."));
            }
            rec.status = e.status().as_u16();
            rec.error_kind = Some(e.kind.as_str().to_string());
            rec.detail = Some(detail(&e.message));
            self.commit(rec);
        }
    }

    /// Settles a JSON answer. `endpoint` is what the provider was called on (its dialect
    /// decides how usage is read); `client_body`, when set, is the answer translated into the
    /// client's dialect.
    pub(crate) fn finish_json(
        &mut self,
        runtime: &Runtime,
        dep: &Deployment,
        endpoint: Endpoint,
        answer: JsonAnswer,
        client_body: Option<Bytes>,
    ) -> Response {
        let JsonAnswer {
            status,
            headers: up_headers,
            body,
        } = answer;
        if self.done {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        }
        if let Some(t) = self.rec.trace.get().filter(|t| t.recording()) {
            t.settle_start_ns = Some(crate::otel::now_ns());
            t.finish_reasons = finish_reasons(&body);
        }
        let reported = match endpoint.dialect() {
            Dialect::OpenAi => Usage::from_openai_response(&body),
            Dialect::Anthropic => Usage::from_anthropic_response(&body),
        };
        let (usage, source) = match (endpoint.spec().billed, reported) {
            (false, _) => (Usage::default(), "none"),
            (true, Some(u)) => (u, "provider"),
            (true, None) => (
                Usage {
                    input: estimate::request_tokens(&self.body),
                    output: estimate_output_json(&body),
                    ..Usage::default()
                },
                "estimated",
            ),
        };
        // Filled in place and taken only to commit: if anything here panics, `Drop` still
        // finds the record and writes it.
        #[cfg(debug_assertions)]
        crate::fault::check("settle", &dep.model);
        apply_usage(
            &mut self.rec,
            &runtime.prices,
            &dep.provider.name,
            &dep.model,
            usage,
            source,
        );
        self.rec.status = status.as_u16();
        self.rec.ttft_ms = Some(self.started.elapsed().as_millis() as u64);
        self.rec.response_bytes = client_body.as_ref().unwrap_or(&body).len() as u64;
        if let Some(b) = self.rec.bodies.as_mut() {
            b.push_response(client_body.as_ref().unwrap_or(&body));
        }
        let cost = self.rec.cost_micros;
        let content_type = match client_body {
            Some(_) => HeaderValue::from_static("application/json"),
            None => up_headers
                .get(http::header::CONTENT_TYPE)
                .cloned()
                .unwrap_or(HeaderValue::from_static("application/json")),
        };
        let body = client_body.unwrap_or(body);
        let kept = self
            .cache_key
            .take()
            .filter(|_| !self.parked && keepable(&runtime.cache, &self.rec, &body))
            .map(|k| (k, entry_of(&self.rec, body.clone(), content_type.clone())));
        if let Some(rec) = self.take() {
            self.commit(rec);
        }
        if let Some((k, entry)) = kept {
            keep(&self.app, &runtime.cache, k, entry);
        }
        self.share(status, &content_type, &body);
        let mut resp = Response::new(Body::from(body));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(http::header::CONTENT_TYPE, content_type);
        h.insert("x-tollgate-cost", HeaderValue::from(cost));
        resp
    }

    /// `count_tokens` for a model no provider can count: a local estimate, marked as such.
    pub(crate) fn finish_local_count(&mut self) -> Response {
        let n = estimate::request_tokens(&self.body);
        if let Some(mut rec) = self.take() {
            rec.status = 200;
            self.commit(rec);
        }
        let mut resp = axum::Json(serde_json::json!({ "input_tokens": n })).into_response();
        resp.headers_mut().insert(
            "x-tollgate-usage-source",
            HeaderValue::from_static("estimated"),
        );
        resp
    }
}

impl Drop for Settlement {
    /// The handler future was dropped: the client went away before an answer.
    fn drop(&mut self) {
        if let Some(fp) = self.lead.take() {
            // Whoever waits on this request makes its own call.
            self.app.damper.finish_lead(fp, None);
        }
        if let Some(mut rec) = self.take() {
            let panicked = std::thread::panicking();
            if panicked {
                // A bug, not the client: the record says so, and keeps what was measured.
                rec.status = 500;
                rec.error_kind = Some("internal_panic".into());
                if rec.usage_source == "provider" || !self.upstream_started {
                    self.commit(rec);
                    return;
                }
            } else {
                rec.client_disconnected = true;
                rec.status = 499;
            }
            if self.upstream_started {
                // The provider may have started work; its input is the best bound we have.
                let usage = Usage {
                    input: estimate::request_tokens(&self.body),
                    ..Usage::default()
                };
                let (p, m) = (
                    rec.provider.clone().unwrap_or_default(),
                    rec.model_served.clone().unwrap_or_default(),
                );
                apply_usage(&mut rec, &self.runtime.prices, &p, &m, usage, "estimated");
            }
            if !panicked {
                rec.error_kind = Some("client_disconnected".into());
                self.app.metrics.client_disconnects.inc();
            }
            self.commit(rec);
        }
    }
}

/// The finish reasons of a JSON answer in any dialect: Chat's per choice, Messages'
/// `stop_reason`, a Responses answer's `incomplete_details.reason` or its `status`.
pub(crate) fn finish_reasons(body: &[u8]) -> Vec<String> {
    #[derive(serde::Deserialize)]
    struct Choice {
        finish_reason: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Incomplete {
        reason: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        choices: Vec<Choice>,
        stop_reason: Option<String>,
        status: Option<String>,
        incomplete_details: Option<Incomplete>,
    }
    let Ok(a) = serde_json::from_slice::<Answer>(body) else {
        return Vec::new();
    };
    let mut out: Vec<String> = a
        .choices
        .into_iter()
        .filter_map(|c| c.finish_reason)
        .collect();
    out.extend(a.stop_reason);
    if out.is_empty() {
        out.extend(
            a.incomplete_details
                .and_then(|i| i.reason)
                .or(a.status.filter(|s| s != "in_progress")),
        );
    }
    out
}

/// Tokens, source and cost into the record, under the price of what was actually served.
pub(crate) fn apply_usage(
    rec: &mut UsageRecord,
    prices: &PriceTable,
    provider: &str,
    model: &str,
    usage: Usage,
    source: &str,
) {
    // A provider's numbers are client input too: bounded, so no sum, price or column
    // (SQLite integers are i64) can overflow.
    let bound = |n: u64| n.min(crate::money::MAX_TOKENS);
    let usage = Usage {
        input: bound(usage.input),
        cached_input: bound(usage.cached_input),
        cache_write_5m: bound(usage.cache_write_5m),
        cache_write_1h: bound(usage.cache_write_1h),
        output: bound(usage.output),
        reasoning: bound(usage.reasoning),
    };
    rec.input_tokens = usage.input;
    rec.cached_input_tokens = usage.cached_input;
    rec.cache_write_5m_tokens = usage.cache_write_5m;
    rec.cache_write_1h_tokens = usage.cache_write_1h;
    rec.output_tokens = usage.output;
    rec.reasoning_tokens = usage.reasoning;
    rec.usage_source = source.to_string();
    match prices.lookup(provider, model) {
        Some(price) => {
            rec.cost_micros = price.cost(&usage);
            rec.price_version = Some(price.version.clone());
            // What compression kept out of the request, at the price the rest was paid.
            for s in rec
                .savings
                .iter_mut()
                .filter(|s| s.saver.starts_with("compress."))
            {
                s.micros = price.cost(&Usage {
                    input: bound(s.tokens),
                    ..Usage::default()
                });
            }
            // What the provider's prompt cache took off the input: its cached tokens at the
            // full input price less the cached price (writes' premium is in the cost).
            rec.savings.retain(|s| s.saver != "provider_cache");
            let cached = usage.cached_input.min(usage.input);
            if cached > 0 && price.input > price.cached_input {
                let micros =
                    u128::from(cached) * u128::from(price.input - price.cached_input) / 1_000_000;
                rec.savings.push(crate::records::Saving {
                    saver: "provider_cache".into(),
                    tokens: cached,
                    micros: micros.min(crate::money::MAX_MICROS as u128) as u64,
                });
            }
        }
        None => {
            rec.cost_micros = 0;
            rec.price_version = Some("unpriced".into());
        }
    }
}

/// Output tokens of a JSON answer that came without usage, in either dialect.
pub(crate) fn estimate_output_json(body: &[u8]) -> u64 {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return 0;
    };
    let mut text = String::new();
    let mut push = |s: Option<&str>| {
        if let Some(s) = s {
            text.push_str(s);
        }
    };
    for choice in v
        .get("choices")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(choice.pointer("/message/content").and_then(|c| c.as_str()));
        for call in choice
            .pointer("/message/tool_calls")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            push(call.pointer("/function/name").and_then(|s| s.as_str()));
            push(call.pointer("/function/arguments").and_then(|s| s.as_str()));
        }
    }
    for block in v
        .get("content")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(block.get("text").and_then(|s| s.as_str()));
        push(block.get("thinking").and_then(|s| s.as_str()));
        if let Some(input) = block.get("input") {
            push(Some(&input.to_string()));
        }
    }
    // Responses API: output items hold content parts or function-call arguments.
    for item in v
        .get("output")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
    {
        push(item.get("arguments").and_then(|s| s.as_str()));
        for part in item
            .get("content")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            push(part.get("text").and_then(|s| s.as_str()));
        }
    }
    estimate::tokens(&text)
}

/// A message cut to what the request log keeps (on a character boundary).
pub(crate) fn detail(message: &str) -> String {
    const MAX: usize = 300;
    match message.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}…", &message[..i]),
        None => message.to_string(),
    }
}

/// A cascade answered before its last tier: what the last tier would have charged for the
/// same tokens, less what was charged, is recorded as a `cascade` saving.
pub(crate) fn note_cascade_saving(
    runtime: &Runtime,
    reference: &Deployment,
    rec: &mut UsageRecord,
) {
    if rec.status != 200 || rec.usage_source == "none" {
        return;
    }
    let Some(price) = runtime
        .prices
        .lookup(&reference.provider.name, &reference.model)
    else {
        return;
    };
    let would = price.cost(&Usage {
        input: rec.input_tokens,
        cached_input: rec.cached_input_tokens,
        output: rec.output_tokens,
        reasoning: rec.reasoning_tokens,
        cache_write_5m: rec.cache_write_5m_tokens,
        cache_write_1h: rec.cache_write_1h_tokens,
    });
    if would > rec.cost_micros {
        rec.savings.push(crate::records::Saving {
            saver: "cascade".into(),
            tokens: 0,
            micros: would - rec.cost_micros,
        });
    }
}
