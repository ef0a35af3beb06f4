//! Streams: forwarded event by event while an observer reads usage, cut when the hold is
//! used up or the provider fails, settled when they end or are dropped.

use super::*;

/// The observer for the stream's dialect.
pub(crate) enum Observer {
    Chat(ChatStreamObserver),
    Messages(MessagesStreamObserver),
    Responses(ResponsesStreamObserver),
}

impl Observer {
    /// The observer for what `upstream` streams.
    pub(crate) fn for_endpoint(upstream: Endpoint) -> Observer {
        match upstream.spec().stream {
            StreamShape::Messages => Observer::Messages(MessagesStreamObserver::new()),
            StreamShape::Responses => Observer::Responses(ResponsesStreamObserver::new()),
            StreamShape::Chat | StreamShape::None => Observer::Chat(ChatStreamObserver::new()),
        }
    }

    pub(crate) fn observe(&mut self, ev: &tollgate_proto::SseEvent) -> EventKind {
        match self {
            Observer::Chat(o) => o.observe(ev),
            Observer::Messages(o) => o.observe(ev),
            Observer::Responses(o) => o.observe(ev),
        }
    }
    pub(crate) fn usage(&self) -> Option<Usage> {
        match self {
            Observer::Chat(o) => o.usage,
            Observer::Messages(o) => o.usage(),
            Observer::Responses(o) => o.usage,
        }
    }
    /// The provider reported an error inside the stream.
    pub(crate) fn saw_error(&self) -> bool {
        match self {
            Observer::Chat(o) => o.saw_error,
            Observer::Messages(o) => o.saw_error,
            Observer::Responses(o) => o.saw_error,
        }
    }
    /// The stream reached its proper end, or the provider reported an error in-band.
    pub(crate) fn ended_properly(&self) -> bool {
        match self {
            Observer::Chat(o) => o.done || o.saw_error,
            Observer::Messages(o) => o.done || o.saw_error,
            Observer::Responses(o) => o.done || o.saw_error,
        }
    }
    /// Why the provider stopped, in its words, once it said.
    pub(crate) fn finish_reason(&self) -> Option<&str> {
        match self {
            Observer::Chat(o) => o.finish_reason.as_deref(),
            Observer::Messages(o) => o.stop_reason.as_deref(),
            Observer::Responses(_) => None,
        }
    }
    pub(crate) fn output_text(&self) -> &str {
        match self {
            Observer::Chat(o) => &o.output_text,
            Observer::Messages(o) => &o.output_text,
            Observer::Responses(o) => &o.output_text,
        }
    }
    /// Exact input-side counts the provider gave before the stream ended early, if any.
    pub(crate) fn input_usage(&self) -> Option<Usage> {
        match self {
            Observer::Chat(_) | Observer::Responses(_) => None,
            Observer::Messages(o) => o.input_usage(),
        }
    }
}

/// How a stream is read and what the client sees of it.
pub(crate) struct StreamView {
    /// The client's dialect: decides the shape of a final error event.
    pub(crate) client: Dialect,
    /// The provider's dialect: decides how usage is observed.
    pub(crate) upstream: Endpoint,
    /// Drop the usage-only chunk tollgate asked for on the client's behalf.
    pub(crate) filter_usage: bool,
    /// Rewrites each upstream event into the client's dialect.
    pub(crate) translator: Option<Translator>,
    /// The key's tool policy, over the tool calls in what the client is sent.
    pub(crate) guard: Option<ToolGuard>,
    /// The key's redaction, over the text the client is sent.
    pub(crate) scrub: Option<StreamScrub>,
}

pub(crate) enum Translator {
    ToChat(translate::MessagesToChatStream),
    ToMessages(translate::ChatToMessagesStream),
}

impl Translator {
    pub(crate) fn on_event(&mut self, ev: &tollgate_proto::SseEvent) -> String {
        match self {
            Translator::ToChat(t) => t.on_event(ev),
            Translator::ToMessages(t) => t.on_event(ev),
        }
    }
}

pub(crate) fn stream_response(
    app: &Arc<AppState>,
    settle: &mut Settlement,
    dep: &Deployment,
    view: StreamView,
    first: Bytes,
    rest: super::forward::BodyStream,
) -> Response {
    let mut rec = settle.take();
    let broken = std::mem::take(&mut settle.broken);
    let rejected = std::mem::take(&mut settle.rejected);
    let cascade_reference = settle.cascade_reference.take();
    let admission = settle.admission.take();
    if let Some(r) = rec.as_mut() {
        r.status = 200;
        r.ttft_ms = Some(settle.started.elapsed().as_millis() as u64);
    }
    let observer = Observer::for_endpoint(view.upstream);
    let mut s = GatewayStream {
        app: app.clone(),
        upstream: rest,
        splitter: SseSplitter::new(),
        observer,
        dialect: view.client,
        translator: view.translator,
        guard: view.guard,
        scrub: view.scrub,
        upstream_ended: false,
        out: VecDeque::new(),
        filter_usage: view.filter_usage,
        idle: dep.provider.idle_timeout,
        idle_timer: Box::pin(tokio::time::sleep(dep.provider.idle_timeout)),
        deadline: Box::pin(tokio::time::sleep(dep.provider.total_timeout)),
        rec,
        broken,
        rejected,
        cascade_reference,
        admission,
        runtime: settle.runtime.clone(),
        provider: dep.provider.name.clone(),
        model: dep.model.clone(),
        body: settle.body.clone(),
        started: settle.started,
        finished: false,
        events: Vec::new(),
        budget: settle.money.map(|q| StreamBudget {
            limit_micros: q.cost_micros.saturating_add(
                q.cost_micros * settle.runtime.wallets.stream_overrun_percent.min(1000) / 100,
            ),
            input_micros: q.input_micros(),
            output_price: q.output_price,
        }),
        delivered_tokens: 0,
        counted_bytes: 0,
        client_gone: false,
        cache_fill: settle.cache_key.take().map(|key| CacheFill {
            key,
            bytes: bytes::BytesMut::new(),
            max: settle.runtime.cache.max_entry_bytes,
            settled: None,
        }),
    };
    s.ingest(&first);
    let mut resp = Response::new(Body::from_stream(ClientBody(Some(s))));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    // Tells nginx-style proxies in front of tollgate not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// Forwards an upstream SSE stream event by event as it arrives, while the observer reads a
/// copy for usage. Settles when the stream ends, fails, stalls, or is dropped.
pub(crate) struct GatewayStream {
    pub(crate) app: Arc<AppState>,
    pub(crate) upstream: super::forward::BodyStream,
    pub(crate) splitter: SseSplitter,
    pub(crate) observer: Observer,
    /// The client's dialect.
    pub(crate) dialect: Dialect,
    pub(crate) translator: Option<Translator>,
    /// Holds tool calls until the policy has ruled on them (`toolcalls.rs`).
    pub(crate) guard: Option<ToolGuard>,
    /// Masks personal data and secrets in the text (`scrub.rs`), after the guard.
    pub(crate) scrub: Option<StreamScrub>,
    /// The provider finished while the guard still held events; the stream ends once it
    /// has let them go.
    pub(crate) upstream_ended: bool,
    pub(crate) out: VecDeque<Bytes>,
    pub(crate) filter_usage: bool,
    pub(crate) idle: Duration,
    pub(crate) idle_timer: Pin<Box<tokio::time::Sleep>>,
    pub(crate) deadline: Pin<Box<tokio::time::Sleep>>,
    pub(crate) rec: Option<UsageRecord>,
    /// Earlier attempts that broke off, added to the record when the stream settles.
    pub(crate) broken: Broken,
    /// Cascade tiers checked and rejected before this one answered.
    pub(crate) rejected: Broken,
    /// The last cascade tier, while an earlier one answers: what it saved.
    pub(crate) cascade_reference: Option<Arc<Deployment>>,
    /// Held for the stream's whole life: the concurrency slot is the stream's.
    pub(crate) admission: Option<Admission>,
    pub(crate) runtime: Arc<Runtime>,
    pub(crate) provider: String,
    pub(crate) model: String,
    pub(crate) body: Bytes,
    pub(crate) started: Instant,
    pub(crate) finished: bool,
    pub(crate) events: Vec<tollgate_proto::SseEvent>,
    /// The wallet's hold: a stream whose running cost passes it is cut.
    pub(crate) budget: Option<StreamBudget>,
    /// Output tokens delivered so far, and how much of the output text they cover.
    pub(crate) delivered_tokens: u64,
    pub(crate) counted_bytes: usize,
    /// The client left and the stream is being read to its end for its usage
    /// (`[metering] on_client_disconnect = "finish"`): nothing more is sent or counted.
    pub(crate) client_gone: bool,
    /// What the client is sent, kept for the response cache until the stream ends whole.
    pub(crate) cache_fill: Option<CacheFill>,
}

/// A stream's answer on its way into the response cache: every byte the client was sent,
/// and the record it settled with. Dropped as soon as the stream cannot be kept.
pub(crate) struct CacheFill {
    pub(crate) key: [u8; 32],
    pub(crate) bytes: bytes::BytesMut,
    pub(crate) max: usize,
    pub(crate) settled: Option<crate::cache::Entry>,
}

/// Queues `b` for the client, through the stream's redaction if it has one.
fn scrubbed(scrub: &mut Option<StreamScrub>, out: &mut VecDeque<Bytes>, b: Bytes) {
    match scrub.as_mut() {
        Some(s) => {
            s.push(&b);
            out.extend(s.out.drain(..));
        }
        None => out.push_back(b),
    }
}

/// The response body: the stream, handed to a background task to finish when the client
/// goes away and `[metering] on_client_disconnect = "finish"`.
pub(crate) struct ClientBody(Option<GatewayStream>);

impl Stream for ClientBody {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.0.as_mut() {
            Some(s) => Pin::new(s).poll_next(cx),
            None => Poll::Ready(None),
        }
    }
}

impl Drop for ClientBody {
    fn drop(&mut self) {
        let Some(mut s) = self.0.take() else {
            return;
        };
        let finish = s.rec.is_some()
            && !s.finished
            && s.runtime.on_client_disconnect == crate::config::OnDisconnect::Finish;
        match tokio::runtime::Handle::try_current() {
            Ok(rt) if finish => {
                s.client_gone = true;
                s.out.clear();
                // The provider's timeouts and the hold's cut still apply while it drains.
                rt.spawn(async move {
                    use futures_util::StreamExt;
                    while s.next().await.is_some() {}
                });
            }
            // Dropping it settles it as cut by the client (GatewayStream's Drop).
            _ => drop(s),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StreamBudget {
    pub(crate) limit_micros: u64,
    pub(crate) input_micros: u64,
    pub(crate) output_price: u64,
}

impl StreamBudget {
    /// The cost so far: the held input plus the output tokens delivered, counted with the
    /// tokenizer as the text arrives (a byte-based guess cut streams that fit their hold).
    pub(crate) fn spent(&self, delivered_tokens: u64) -> u64 {
        let output = (u128::from(delivered_tokens) * u128::from(self.output_price))
            .div_ceil(1_000_000)
            .min(crate::money::MAX_MICROS as u128) as u64;
        self.input_micros.saturating_add(output)
    }
}

impl GatewayStream {
    pub(crate) fn ingest(&mut self, chunk: &[u8]) {
        self.splitter.push(chunk, &mut self.events);
        // Taken out of `self` for the loop (and put back, to keep its allocation).
        let mut events = std::mem::take(&mut self.events);
        for ev in events.drain(..) {
            let kind = self.observer.observe(&ev);
            if let Some(t) = self.translator.as_mut() {
                let translated = t.on_event(&ev);
                if !translated.is_empty() {
                    self.send(Bytes::from(translated));
                }
                if self.over_budget() {
                    break;
                }
                continue;
            }
            if kind == EventKind::UsageOnly && self.filter_usage {
                continue;
            }
            self.send(ev.raw);
            if self.over_budget() {
                break;
            }
        }
        events.clear();
        self.events = events;
    }

    /// Queues bytes for the client, through the tool guard when the key has a policy and
    /// the redaction of answers when it has one.
    fn send(&mut self, b: Bytes) {
        match self.guard.as_mut() {
            Some(g) => {
                g.push(&b, &mut self.rec);
                for x in g.out.drain(..) {
                    scrubbed(&mut self.scrub, &mut self.out, x);
                }
            }
            None => scrubbed(&mut self.scrub, &mut self.out, b),
        }
    }

    /// How the stream ends once the provider has finished it.
    fn upstream_finished(&mut self) {
        if self.observer.ended_properly() {
            self.end(None);
        } else {
            self.end(Some((
                "stream_truncated",
                "the provider ended the stream before it was complete".into(),
            )));
        }
    }

    /// What is ready for the client, as one chunk: events that arrived together leave in one
    /// write (hyper's write queue flushes every 16 buffers, and each chunk is three).
    fn take_out(&mut self) -> Option<Bytes> {
        if self.out.len() <= 1 {
            return self.out.pop_front();
        }
        let len = self.out.iter().map(Bytes::len).sum();
        let mut joined = bytes::BytesMut::with_capacity(len);
        for b in self.out.drain(..) {
            joined.extend_from_slice(&b);
        }
        Some(joined.freeze())
    }

    /// Cuts the stream once its running cost passes the wallet's hold: the event that
    /// crossed it is delivered (and billed), nothing after it.
    pub(crate) fn over_budget(&mut self) -> bool {
        let Some(b) = self.budget else { return false };
        if self.finished {
            return false;
        }
        // Only the text added since the last event is counted: linear in the stream.
        let text = self.observer.output_text();
        if text.len() > self.counted_bytes {
            self.delivered_tokens += estimate::tokens(&text[self.counted_bytes..]);
            self.counted_bytes = text.len();
        }
        if b.spent(self.delivered_tokens) <= b.limit_micros {
            return false;
        }
        self.end(Some((
            "insufficient_funds",
            format!(
                "the wallet's hold for this request (${}) is used up; the stream was cut",
                crate::money::usd(b.limit_micros as i64)
            ),
        )));
        true
    }

    /// Ends the stream, telling the client why when the upstream did not finish cleanly.
    pub(crate) fn end(&mut self, error: Option<(&str, String)>) {
        self.finished = true;
        if let Some((kind, message)) = &error {
            self.app.metrics.streams_cut.inc();
            let money = *kind == "insufficient_funds";
            let event = match self.dialect {
                Dialect::OpenAi => openai_error_event(
                    message,
                    if money {
                        "insufficient_funds"
                    } else {
                        "upstream_error"
                    },
                    Some(kind),
                ),
                Dialect::Anthropic => anthropic_error_event(
                    if money { "billing_error" } else { "api_error" },
                    &format!("{kind}: {message}"),
                ),
            };
            self.out.push_back(Bytes::from(event));
        }
        if let (Some((_, message)), Some(rec)) = (&error, self.rec.as_mut()) {
            rec.detail = Some(super::settle::detail(message));
        }
        let kind = match error {
            Some((k, _)) => Some(k.to_string()),
            None if self.observer.saw_error() => Some("provider_error_event".to_string()),
            None => None,
        };
        self.settle(kind, false);
    }

    pub(crate) fn settle(&mut self, error_kind: Option<String>, disconnected: bool) {
        let Some(mut rec) = self.rec.take() else {
            return;
        };
        if let Some(t) = rec.trace.get().filter(|t| t.recording()) {
            t.settle_start_ns = Some(crate::otel::now_ns());
            t.finish_reasons
                .extend(self.observer.finish_reason().map(str::to_string));
        }
        let (usage, source) = match self.observer.usage() {
            Some(u) => (u, "provider"),
            None => {
                let input = self.observer.input_usage().unwrap_or_else(|| Usage {
                    input: estimate::request_tokens(&self.body),
                    ..Usage::default()
                });
                (
                    Usage {
                        output: estimate::tokens(self.observer.output_text()),
                        ..input
                    },
                    "estimated",
                )
            }
        };
        apply_usage(
            &mut rec,
            &self.runtime.prices,
            &self.provider,
            &self.model,
            usage,
            source,
        );
        self.broken.fold(&mut rec);
        self.rejected.fold_exact(&mut rec);
        if let Some(reference) = self.cascade_reference.take() {
            note_cascade_saving(&self.runtime, &reference, &mut rec);
        }
        if let Some(s) = self.scrub.as_mut() {
            s.record(&self.app, &mut rec);
        }
        rec.error_kind = error_kind;
        rec.client_disconnected = disconnected;
        if self.client_gone {
            // Read to its end after the client left: the provider's usage, the client's cut.
            rec.client_disconnected = true;
            rec.error_kind = rec
                .error_kind
                .take()
                .or_else(|| Some("client_disconnected".into()));
        }
        rec.latency_ms = self.started.elapsed().as_millis() as u64;
        if rec.client_disconnected {
            self.app.metrics.client_disconnects.inc();
        }
        if let Some(mut a) = self.admission.take() {
            a.settle(now_us(), rec.input_tokens + rec.output_tokens);
        }
        // Kept once the last byte has gone out (`poll_next`): only a stream that ended whole.
        let whole = !self.observer.saw_error()
            && self
                .cache_fill
                .as_ref()
                .is_some_and(|f| super::keepable(&self.runtime.cache, &rec, &f.bytes));
        match self.cache_fill.as_mut() {
            Some(f) if whole => {
                f.settled = Some(super::entry_of(
                    &rec,
                    Bytes::new(),
                    HeaderValue::from_static("text/event-stream; charset=utf-8"),
                ));
            }
            _ => self.cache_fill = None,
        }
        self.app.meter.record(rec);
    }

    /// The stream has ended and everything it had was sent: its answer goes into the cache
    /// if it settled whole.
    fn keep_cached(&mut self) {
        let Some(f) = self.cache_fill.take() else {
            return;
        };
        let Some(mut entry) = f.settled else {
            return;
        };
        let cfg = &self.runtime.cache;
        if f.bytes.len() > f.max || (!cfg.tool_calls && crate::cache::has_tool_calls(&f.bytes)) {
            return;
        }
        entry.body = f.bytes.freeze();
        super::keep(&self.app, cfg, f.key, entry);
    }
}

impl Stream for GatewayStream {
    type Item = Result<Bytes, std::io::Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        loop {
            if let Some(b) = this.take_out() {
                // What the client was handed, counted on the record until it settles.
                if let Some(rec) = this.rec.as_mut().filter(|_| !this.client_gone) {
                    rec.response_bytes += b.len() as u64;
                    if let Some(bodies) = rec.bodies.as_mut() {
                        bodies.push_response(&b);
                    }
                }
                if let Some(f) = this.cache_fill.as_mut() {
                    if f.bytes.len() + b.len() <= f.max {
                        f.bytes.extend_from_slice(&b);
                    } else {
                        this.cache_fill = None;
                    }
                }
                return Poll::Ready(Some(Ok(b)));
            }
            if let Some(g) = this.guard.as_mut().filter(|g| g.busy()) {
                // A tool call waits on an approval lookup: nothing behind it goes out first.
                let ready = g.poll(cx, &mut this.rec);
                for x in g.out.drain(..) {
                    scrubbed(&mut this.scrub, &mut this.out, x);
                }
                if ready.is_pending() && this.out.is_empty() {
                    return Poll::Pending;
                }
                continue;
            }
            if this.upstream_ended && !this.finished {
                this.upstream_finished();
                continue;
            }
            if this.finished {
                this.keep_cached();
                return Poll::Ready(None);
            }
            match this.upstream.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(chunk))) => {
                    let next = tokio::time::Instant::now() + this.idle;
                    this.idle_timer.as_mut().reset(next);
                    this.ingest(&chunk);
                }
                Poll::Ready(Some(Err(e))) => {
                    let msg = format!("the provider's stream broke off: {}", error_chain(&*e));
                    this.end(Some(("upstream_stream_error", msg)));
                }
                Poll::Ready(None) => {
                    if this.guard.as_ref().is_some_and(ToolGuard::busy) {
                        this.upstream_ended = true;
                    } else {
                        this.upstream_finished();
                    }
                }
                Poll::Pending => {
                    if this.idle_timer.as_mut().poll(cx).is_ready() {
                        let msg = format!("the provider sent nothing for {:?}", this.idle);
                        this.end(Some(("upstream_idle_timeout", msg)));
                        continue;
                    }
                    if this.deadline.as_mut().poll(cx).is_ready() {
                        this.end(Some((
                            "upstream_timeout",
                            "the stream exceeded the provider's total timeout".into(),
                        )));
                        continue;
                    }
                    return Poll::Pending;
                }
            }
        }
    }
}

impl Drop for GatewayStream {
    fn drop(&mut self) {
        if self.rec.is_some() {
            // Dropping `upstream` closes the provider connection, which cancels generation.
            self.settle(Some("client_disconnected".into()), true);
        }
    }
}
