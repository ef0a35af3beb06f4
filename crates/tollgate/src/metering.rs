//! Usage records and the batching writer behind a bounded queue.
//!
//! The request path hands a record to `Meter::record`, which never waits: a full queue is
//! counted and logged with the record's id and numbers, so nothing disappears silently.
//! A dedicated thread drains the queue into SQLite, one transaction per batch.

use crate::db::{Db, Location};
use crate::metrics::Metrics;
use crate::store;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

pub use crate::records::UsageRecord;

enum Msg {
    Record(Box<UsageRecord>),
    /// Everything queued before this is committed when the reply comes.
    Flush(oneshot::Sender<()>),
    Hold(Box<HoldReply>),
    Sweep(oneshot::Sender<Result<(usize, usize), String>>),
    /// A hold refused elsewhere (hot wallets: by Redis), for the webhook outbox.
    Refused(Box<(HoldRequest, Held)>),
}

/// Everything a request reserves before its upstream call, decided together.
pub struct HoldRequest {
    pub wallet_id: Option<String>,
    pub envelopes: Vec<crate::envelope::Spec>,
    pub request_id: String,
    pub amount: i64,
    pub tokens: i64,
    pub expires_ms: i64,
}

/// What the writer decided for a hold request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Reserved everywhere; the wallet's available balance after the hold, if there is one.
    Ok {
        balance_micros: Option<i64>,
    },
    Insufficient {
        balance_micros: i64,
        floor_micros: i64,
    },
    Exhausted(crate::envelope::Exhausted),
    /// The request named a run it may not use.
    BadRun(String),
}

type HoldReply = (HoldRequest, oneshot::Sender<Result<Held, String>>);

/// Envelopes first (cheap to undo by rolling back), then the wallet; all or nothing. With a
/// hold book (SQLite) the wallet's part is decided in it, after the envelopes: a refusal
/// there rolls the envelopes back, and a hold in the book is only made when it stands.
fn hold_one(
    tx: &mut Db,
    h: &HoldRequest,
    now: i64,
    book: Option<&crate::holdbook::HoldBook>,
) -> Result<Held, String> {
    if !h.envelopes.is_empty() {
        match crate::envelope::reserve(
            tx,
            &h.envelopes,
            &h.request_id,
            h.amount,
            h.tokens,
            h.expires_ms,
            now,
        )? {
            Ok(()) => {}
            Err(crate::envelope::Refused::Exhausted(e)) => return Ok(Held::Exhausted(e)),
            Err(crate::envelope::Refused::BadRun(m)) => return Ok(Held::BadRun(m)),
        }
    }
    let Some(w) = &h.wallet_id else {
        return Ok(Held::Ok {
            balance_micros: None,
        });
    };
    match book {
        Some(book) => book.decide(w, &h.request_id, h.amount, h.expires_ms, now),
        None => crate::wallet::hold(tx, w, &h.request_id, h.amount, h.expires_ms, now),
    }
    .map(held)
    .map_err(|e| e.to_string())
}

fn held(h: crate::wallet::Hold) -> Held {
    match h {
        crate::wallet::Hold::Held { balance_micros } => Held::Ok {
            balance_micros: Some(balance_micros),
        },
        crate::wallet::Hold::Insufficient {
            balance_micros,
            floor_micros,
        } => Held::Insufficient {
            balance_micros,
            floor_micros,
        },
    }
}

type Reply<T> = oneshot::Sender<Result<T, String>>;

/// Enqueues the webhooks of holds refused outside the writer.
fn write_refusals(db: &mut Db, refused: &mut Vec<(HoldRequest, Held)>) {
    if refused.is_empty() {
        return;
    }
    let now = crate::clock::now_ms();
    let events = db.write(|tx| {
        for (h, r) in refused.iter() {
            refusal_event(tx, h, &Ok(r.clone()), now)?;
        }
        Ok::<_, crate::db::DbError>(())
    });
    if let Err(e) = events {
        tracing::warn!(error = %e, "could not enqueue refusal webhooks");
    }
    refused.clear();
}

/// Usage records per write transaction while holds may be waiting.
const RECORD_CHUNK: usize = 64;

/// Holds, flushes and sweeps waiting for the writer; a request past it waits its turn (within
/// `hold_timeout`).
const URGENT_CAPACITY: usize = 4096;

/// Runs `f` in one write transaction on the writer's connection.
fn in_tx<T>(
    db: &mut Db,
    f: impl FnOnce(&mut Db) -> Result<T, crate::wallet::WalletError>,
) -> Result<T, String> {
    db.write(f).map_err(|e| e.to_string())
}

/// Tells the webhooks a wallet or an envelope turned a request away; at most one event per
/// wallet per hour, and one per envelope.
fn refusal_event(
    tx: &mut Db,
    h: &HoldRequest,
    r: &Result<Held, String>,
    now: i64,
) -> crate::db::Result<()> {
    match r {
        Ok(Held::Insufficient {
            balance_micros,
            floor_micros,
        }) => {
            let w = h.wallet_id.clone().unwrap_or_default();
            crate::outbox::enqueue(
                tx,
                &format!("wallet:{w}:insufficient:{}", now / 3_600_000),
                "wallet.insufficient_funds",
                serde_json::json!({
                    "wallet": w,
                    "balance_micros": balance_micros,
                    "floor_micros": floor_micros,
                    "hold_micros": h.amount,
                    "request_id": h.request_id,
                }),
                now,
            )
        }
        Ok(Held::Exhausted(e)) => crate::outbox::enqueue(
            tx,
            &format!("{}:refused", e.envelope),
            if e.envelope.starts_with("budget:") {
                "budget.exceeded"
            } else {
                "run.exhausted"
            },
            serde_json::json!({
                "envelope": e.envelope,
                "limit": e.what,
                "cap": e.cap,
                "used": e.used,
                "needed": e.needed,
            }),
            now,
        ),
        _ => Ok(()),
    }
}

/// Places every queued hold in one transaction (group commit: under load, many holds share
/// one write), each in its own savepoint so a refused one leaves nothing behind, then
/// answers each.
fn place_holds(db: &mut Db, holds: &mut Vec<HoldReply>, book: Option<&crate::holdbook::HoldBook>) {
    if holds.is_empty() {
        return;
    }
    let now = crate::clock::now_ms();
    if let Some(book) = book {
        let wallets: Vec<&str> = holds
            .iter()
            .filter_map(|(h, _)| h.wallet_id.as_deref())
            .collect();
        if let Err(e) = book.refresh(db, &wallets, now) {
            for (_, reply) in holds.drain(..) {
                let _ = reply.send(Err(e.to_string()));
            }
            return;
        }
    }
    let result = db.write(|tx| -> Result<Vec<Result<Held, String>>, String> {
        // Wallet-only holds go as one group (pipelined on PostgreSQL: one round trip);
        // holds with envelopes need a savepoint each and go one by one after them.
        let (grouped, args): (Vec<usize>, Vec<crate::wallet::HoldArgs>) = holds
            .iter()
            .enumerate()
            .filter(|(_, (h, _))| h.envelopes.is_empty() && book.is_none())
            .filter_map(|(i, (h, _))| {
                let wallet_id = h.wallet_id.as_deref()?;
                Some((
                    i,
                    crate::wallet::HoldArgs {
                        wallet_id,
                        request_id: &h.request_id,
                        amount: h.amount,
                        expires_ms: h.expires_ms,
                    },
                ))
            })
            .unzip();
        let mut decided: Vec<Option<Result<Held, String>>> = vec![None; holds.len()];
        let group = crate::wallet::hold_group(tx, &args, now).map_err(|e| e.to_string())?;
        for (i, r) in grouped.into_iter().zip(group) {
            decided[i] = Some(r.map(held).map_err(|e| e.to_string()));
        }
        let mut out = Vec::with_capacity(holds.len());
        for (i, (h, _)) in holds.iter().enumerate() {
            let r = if let Some(r) = decided[i].take() {
                r
            } else if h.envelopes.is_empty() {
                // A wallet hold alone writes nothing unless it succeeds: no savepoint needed.
                hold_one(tx, h, now, book)
            } else {
                // A refused hold leaves nothing of what it had reserved.
                tx.savepoint(
                    |sp| Ok::<_, String>(hold_one(sp, h, now, book)),
                    |r| matches!(r, Ok(Held::Ok { .. })),
                )?
            };
            if !matches!(r, Ok(Held::Ok { .. })) {
                refusal_event(tx, h, &r, now).map_err(|e| e.to_string())?;
            }
            out.push(r);
        }
        Ok(out)
    });
    match result {
        Ok(outcomes) => {
            for ((_, reply), o) in holds.drain(..).zip(outcomes) {
                let _ = reply.send(o);
            }
        }
        Err(e) => {
            for (_, reply) in holds.drain(..) {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

#[derive(Clone)]
pub struct Meter {
    /// Records and refusal events: nobody waits on them, and sending one wakes nobody
    /// while the writer lingers.
    tx: mpsc::Sender<Msg>,
    /// Holds, flushes and sweeps: someone waits on each, so each wakes the writer.
    urgent: mpsc::Sender<Msg>,
    /// Records the writer has taken from the queue and not yet committed.
    gathered: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
    /// What governed keys did this hour, for their tool policies' `session` counters.
    pub sessions: Arc<crate::policy::Sessions>,
    /// Set when `[otel]` exports traces: each record's trace ends here.
    pub tracer: Option<Arc<crate::otel::Tracer>>,
    /// Wallet holds decided in memory: a SQLite store without hot wallets (ADR 0036).
    book: Option<Arc<crate::holdbook::HoldBook>>,
}

/// What the writer has gathered and not yet handled.
struct Pending {
    batch: Vec<UsageRecord>,
    waiters: Vec<oneshot::Sender<()>>,
    holds: Vec<HoldReply>,
    sweeps: Vec<Reply<(usize, usize)>>,
    refused: Vec<(HoldRequest, Held)>,
    /// `batch.len()`, for `Meter::backlogged`.
    gathered: Arc<AtomicUsize>,
    last_hold: Option<Instant>,
    book: Option<Arc<crate::holdbook::HoldBook>>,
}

impl Pending {
    fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Record(r) => {
                self.batch.push(*r);
                self.gathered.store(self.batch.len(), Ordering::Relaxed);
            }
            Msg::Flush(w) => self.waiters.push(w),
            Msg::Hold(h) => self.holds.push(*h),
            Msg::Sweep(w) => self.sweeps.push(w),
            Msg::Refused(r) => self.refused.push(*r),
        }
    }

    /// Everything someone waits on that is queued now. Called after records are taken: a
    /// hold is always sent before the record that settles it, so every record taken so far
    /// finds its hold placed before it is written.
    fn take_urgent(&mut self, urgent: &mut mpsc::Receiver<Msg>) {
        while let Ok(msg) = urgent.try_recv() {
            self.take(msg);
        }
    }

    /// Records queued now, while the batch has room.
    fn take_records(&mut self, rx: &mut mpsc::Receiver<Msg>, batch_max: usize) {
        while self.batch.len() < batch_max {
            let Ok(msg) = rx.try_recv() else { break };
            self.take(msg);
        }
    }

    /// The first `n` records are committed.
    fn written(&mut self, n: usize) {
        self.batch.drain(..n);
        self.gathered.store(self.batch.len(), Ordering::Relaxed);
    }

    fn place_holds(&mut self, conn: &mut Db) {
        if !self.holds.is_empty() {
            self.last_hold = Some(Instant::now());
            place_holds(conn, &mut self.holds, self.book.as_deref());
        }
    }

    /// Records go in chunks while holds are coming, and holds that arrive meanwhile are
    /// placed between chunks: a hold never waits behind a whole batch of settles. Without
    /// holds, a batch is one transaction.
    fn chunk(&self, batch_max: usize) -> usize {
        match self.last_hold {
            Some(t) if t.elapsed() < Duration::from_secs(1) => RECORD_CHUNK,
            _ => batch_max,
        }
    }

    fn run_sweeps(&mut self, conn: &mut Db) {
        for w in self.sweeps.drain(..) {
            let now = crate::clock::now_ms();
            let _ = w.send(in_tx(conn, |tx| {
                let (h, g) = crate::wallet::expire(tx, now)?;
                let e = crate::envelope::expire(tx, now)?;
                Ok((h + e, g))
            }));
            // Grants that ran out and holds an earlier version left changed balances.
            if let Some(book) = &self.book {
                if let Err(e) = book.reload(conn) {
                    tracing::warn!(error = %e, "could not read balances again after a sweep");
                    book.stale();
                }
            }
        }
    }

    /// After a commit: the book forgets the holds the chunk settled (and holds that never
    /// settle, of requests that gave up waiting) and reads their wallets again; and it checks
    /// for other connections' commits, so that under steady traffic the book stays fresh
    /// and holds never wait for the writer.
    fn settled(&self, conn: &mut Db, chunk: &[UsageRecord]) {
        let Some(book) = &self.book else { return };
        let done: Vec<(&str, &str)> = chunk
            .iter()
            .filter_map(|u| Some((u.id.as_str(), u.wallet_id.as_deref()?)))
            .collect();
        let checked = book.refresh(conn, &[], crate::clock::now_ms());
        if let Err(e) = checked.and_then(|()| book.settled(conn, &done)) {
            // The holds stay in the book until they expire: it refuses more, never less.
            tracing::warn!(error = %e, "could not read balances after a settle");
            book.stale();
        }
    }
}

/// The writer's loop: one thread, one connection, every write of money and usage.
#[allow(clippy::too_many_arguments)]
fn run_writer(
    mut conn: Db,
    mut rx: mpsc::Receiver<Msg>,
    mut urgent: mpsc::Receiver<Msg>,
    gathered: Arc<AtomicUsize>,
    batch_max: usize,
    linger: Duration,
    metrics: Arc<Metrics>,
    acks: Option<mpsc::UnboundedSender<crate::hotwallet::Ack>>,
    sink: Option<Arc<crate::analytics::Sink>>,
    book: Option<Arc<crate::holdbook::HoldBook>>,
) {
    // Waits on both queues, and out `linger` without giving up on a hold that arrives.
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        tracing::error!("the usage writer could not start its timer; no usage is recorded");
        return;
    };
    let mut p = Pending {
        batch: Vec::with_capacity(batch_max),
        waiters: Vec::new(),
        holds: Vec::new(),
        sweeps: Vec::new(),
        refused: Vec::new(),
        gathered,
        last_hold: None,
        book,
    };
    let mut records_open = true;
    let mut urgent_open = true;
    loop {
        // Idle: wait for anything.
        let (first, from_urgent) = rt.block_on(async {
            tokio::select! {
                biased;
                m = urgent.recv(), if urgent_open => (m, true),
                m = rx.recv(), if records_open => (m, false),
                else => (None, false),
            }
        });
        let Some(first) = first else {
            // A queue closes when every Meter is gone: the writer ends with both.
            if from_urgent {
                urgent_open = false;
            } else {
                records_open = false;
            }
            if urgent_open || records_open {
                continue;
            }
            break;
        };
        p.take(first);
        // Records wait on nobody: gather them for up to `linger`, so that a transaction (and
        // the WAL pages it rewrites) carries many of them, while sending one wakes nobody.
        // Holds are placed as they come; a flush or a sweep ends the wait.
        let gather_until = tokio::time::Instant::now() + linger;
        let mut lingered = linger.is_zero();
        loop {
            p.take_records(&mut rx, batch_max);
            p.take_urgent(&mut urgent);
            p.place_holds(&mut conn);
            if lingered
                || p.batch.is_empty()
                || p.batch.len() >= batch_max
                || !p.waiters.is_empty()
                || !p.sweeps.is_empty()
            {
                break;
            }
            let woke = rt.block_on(async {
                tokio::select! {
                    m = urgent.recv() => m,
                    _ = tokio::time::sleep_until(gather_until) => None,
                }
            });
            match woke {
                Some(m) => p.take(m),
                None => lingered = true,
            }
        }
        metrics.usage_queue_depth.set(rx.len() as i64);
        write_refusals(&mut conn, &mut p.refused);
        let chunk = p.chunk(batch_max);
        while !p.batch.is_empty() {
            let end = chunk.min(p.batch.len());
            if write_with_retry(&mut conn, &mut p.batch[..end], &metrics, acks.as_ref()) {
                p.settled(&mut conn, &p.batch[..end]);
                // Only what the store has: analytics never count a record the ledger lacks.
                if let Some(sink) = &sink {
                    sink.offer(&p.batch[..end]);
                }
            }
            p.written(end);
            // Records in memory stay under `batch_max`: a store slower than the traffic
            // leaves the backlog in the bounded queue, where it is visible
            // (`usage_queue_depth`) and its overflow is counted. Under sustained load this
            // loop does not end; flushes are answered once their records are all in.
            p.take_records(&mut rx, batch_max);
            p.take_urgent(&mut urgent);
            metrics.usage_queue_depth.set(rx.len() as i64);
            p.place_holds(&mut conn);
            if p.batch.is_empty() {
                for w in p.waiters.drain(..) {
                    let _ = w.send(());
                }
            }
        }
        write_refusals(&mut conn, &mut p.refused);
        store::restart_wal_if_long(&mut conn);
        for w in p.waiters.drain(..) {
            let _ = w.send(());
        }
        p.run_sweeps(&mut conn);
    }
}

/// `gen_ai.operation.name` of a record's endpoint.
pub fn genai_operation(endpoint: &str) -> &'static str {
    match endpoint {
        "chat.completions" | "messages" | "responses" => "chat",
        "embeddings" => "embeddings",
        "messages.count_tokens" => "count_tokens",
        e if e.starts_with("route:") => "execute_tool",
        _ => "other",
    }
}

/// The GenAI metrics of a model call that went upstream (not a replay, a cache hit or a
/// refusal before any provider).
fn observe_genai(metrics: &Metrics, rec: &UsageRecord) {
    let Some(provider) = rec.genai_provider.filter(|_| rec.reused.is_none()) else {
        return;
    };
    let served = rec.model_served.as_deref().unwrap_or_default();
    metrics.genai.observe(&crate::metrics::GenAiCall {
        operation: genai_operation(&rec.endpoint),
        provider,
        request_model: rec.model_requested.as_deref().unwrap_or(served),
        response_model: served,
        input_tokens: rec.input_tokens,
        output_tokens: rec.output_tokens,
        seconds: rec.latency_ms as f64 / 1000.0,
        first_token_seconds: rec
            .ttft_ms
            .filter(|_| rec.stream && rec.status == 200)
            .map(|ms| ms as f64 / 1000.0),
        error_type: rec.error_kind.as_deref(),
    });
}

/// Ends a request's trace with what its record says: the settle span, then the root span
/// named and described after the GenAI conventions, with the gateway's ids as attributes.
fn end_trace(
    mut t: Box<crate::otel::RequestTrace>,
    rec: &UsageRecord,
) -> Box<crate::otel::RequestTrace> {
    use crate::otel::{Kind, Value};
    if !t.recording() {
        return t;
    }
    if let Some(start) = t.settle_start_ns {
        let mut attrs: crate::otel::Attrs = vec![
            ("tollgate.cost_micros", rec.cost_micros.into()),
            ("tollgate.usage_source", rec.usage_source.as_str().into()),
        ];
        if let Some(w) = &rec.wallet_id {
            attrs.push(("tollgate.wallet_id", w.as_str().into()));
        }
        t.closed_child("tollgate.settle", Kind::Internal, start, attrs);
    }
    let operation = genai_operation(&rec.endpoint);
    let model = rec.model_requested.as_deref().unwrap_or_default();
    let mut a: crate::otel::Attrs = Vec::with_capacity(24);
    a.push(("gen_ai.operation.name", operation.into()));
    if let Some(p) = rec.genai_provider {
        a.push(("gen_ai.provider.name", p.into()));
    }
    if !model.is_empty() {
        a.push(("gen_ai.request.model", model.into()));
    }
    if let Some(m) = &rec.model_served {
        a.push(("gen_ai.response.model", m.as_str().into()));
    }
    a.push(("gen_ai.request.stream", rec.stream.into()));
    a.push(("gen_ai.usage.input_tokens", rec.input_tokens.into()));
    a.push(("gen_ai.usage.output_tokens", rec.output_tokens.into()));
    if rec.cached_input_tokens > 0 {
        a.push((
            "gen_ai.usage.cache_read.input_tokens",
            rec.cached_input_tokens.into(),
        ));
    }
    let written = rec
        .cache_write_5m_tokens
        .saturating_add(rec.cache_write_1h_tokens);
    if written > 0 {
        a.push(("gen_ai.usage.cache_creation.input_tokens", written.into()));
    }
    if rec.reasoning_tokens > 0 {
        a.push((
            "gen_ai.usage.reasoning.output_tokens",
            rec.reasoning_tokens.into(),
        ));
    }
    if !t.finish_reasons.is_empty() {
        a.push((
            "gen_ai.response.finish_reasons",
            Value::Strs(std::mem::take(&mut t.finish_reasons)),
        ));
    }
    a.push(("http.response.status_code", rec.status.into()));
    if let Some(e) = &rec.error_kind {
        a.push(("error.type", e.as_str().into()));
    }
    a.push(("tollgate.request_id", rec.id.as_str().into()));
    a.push(("tollgate.key_id", rec.key_id.as_str().into()));
    a.push(("tollgate.agent", rec.agent.as_str().into()));
    for (k, v) in [
        ("tollgate.team", &rec.team),
        ("tollgate.run_id", &rec.run_id),
        ("tollgate.wallet_id", &rec.wallet_id),
        ("tollgate.provider", &rec.provider),
        ("tollgate.reused", &rec.reused),
        ("tollgate.cache", &rec.cache),
        ("tollgate.price_version", &rec.price_version),
    ] {
        if let Some(v) = v {
            a.push((k, v.as_str().into()));
        }
    }
    a.push(("tollgate.cost_micros", rec.cost_micros.into()));
    a.push(("tollgate.usage_source", rec.usage_source.as_str().into()));
    a.push(("tollgate.attempts", rec.attempts.into()));
    if rec.client_disconnected {
        a.push(("tollgate.client_disconnected", true.into()));
    }
    let tool = rec.endpoint.strip_prefix("route:");
    if let Some(tool) = tool {
        a.push(("gen_ai.tool.name", tool.into()));
    }
    let name = match (tool, model.is_empty()) {
        (Some(tool), _) => format!("{operation} {tool}"),
        (None, true) => operation.to_string(),
        (None, false) => format!("{operation} {model}"),
    };
    // A server span is in error only for the server's failures (HTTP semantic conventions):
    // a 4xx is the caller's.
    let error = (rec.status >= 500).then(|| {
        rec.detail
            .clone()
            .or_else(|| rec.error_kind.clone())
            .unwrap_or_else(|| rec.status.to_string())
    });
    t.end_root(name, a, error);
    t
}

impl Meter {
    /// Starts the writer thread on its own SQLite connection. The thread ends when every
    /// `Meter` clone is gone; shutdown does not wait for that, it calls `flush`.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        location: &Location,
        holds_in_memory: bool,
        capacity: usize,
        batch_max: usize,
        linger: Duration,
        metrics: Arc<Metrics>,
        acks: Option<mpsc::UnboundedSender<crate::hotwallet::Ack>>,
        sink: Option<Arc<crate::analytics::Sink>>,
    ) -> store::Result<Meter> {
        let conn = location.connect()?;
        let (tx, rx) = mpsc::channel::<Msg>(capacity);
        let (urgent, urgent_rx) = mpsc::channel::<Msg>(URGENT_CAPACITY);
        let writer_metrics = metrics.clone();
        let gathered = Arc::new(AtomicUsize::new(0));
        let writer_gathered = gathered.clone();
        let book = (holds_in_memory && matches!(location, Location::Sqlite(_)) && acks.is_none())
            .then(|| Arc::new(crate::holdbook::HoldBook::default()));
        let writer_book = book.clone();
        std::thread::Builder::new()
            .name("tollgate-meter".into())
            .spawn(move || {
                run_writer(
                    conn,
                    rx,
                    urgent_rx,
                    writer_gathered,
                    batch_max,
                    linger,
                    writer_metrics,
                    acks,
                    sink,
                    writer_book,
                )
            })?;
        Ok(Meter {
            tx,
            urgent,
            gathered,
            metrics,
            sessions: Arc::default(),
            tracer: None,
            book,
        })
    }

    /// Wallet holds are decided in memory and written with their settle (a SQLite store
    /// without hot wallets): the request's record carries its hold, as a hot wallet's does.
    pub fn holds_in_memory(&self) -> bool {
        self.book.is_some()
    }

    /// An operator changed wallets on another connection: the next hold reads the store.
    pub fn wallets_changed(&self) {
        if let Some(b) = &self.book {
            b.stale();
        }
    }

    /// Money held in memory for a wallet, on top of the store's open holds.
    pub fn held_in_memory(&self, wallet_id: &str) -> i64 {
        self.book
            .as_ref()
            .map_or(0, |b| b.open_micros(wallet_id, crate::clock::now_ms()))
    }

    /// Queues a record without waiting. Never blocks the request path.
    pub fn record(&self, mut rec: UsageRecord) {
        observe_genai(&self.metrics, &rec);
        if let Some(t) = rec.trace.0.take() {
            match &self.tracer {
                Some(tracer) => tracer.end(end_trace(t, &rec)),
                None => drop(t),
            }
        }
        self.sessions
            .note_spend(&rec.key_id, rec.cost_micros, crate::clock::now_ms());
        if !rec.savings.is_empty() {
            self.metrics.count_savings(&rec.savings);
        }
        match self.tx.try_send(Msg::Record(Box::new(rec))) {
            Ok(()) => {
                self.metrics.usage_records_queued.inc();
            }
            Err(err) => {
                self.metrics.usage_records_dropped.inc();
                let rec = match err {
                    mpsc::error::TrySendError::Full(Msg::Record(r))
                    | mpsc::error::TrySendError::Closed(Msg::Record(r)) => r,
                    _ => return,
                };
                // The log line carries everything needed to re-bill by hand.
                tracing::error!(
                    target: "tollgate::metering",
                    record = %serde_json::to_string(&rec).unwrap_or_default(),
                    "usage queue full or closed: record not stored"
                );
            }
        }
    }

    /// Reserves a request's money: its envelopes and its wallet hold, all or nothing. Holds
    /// go through the writer's connection, the one writer of money and usage, so they never
    /// wait on SQLite's lock, and many share one commit.
    ///
    /// Gives up after `within` (the store is down or stalled). A hold the writer places after
    /// that is released by the request's usage record, which the caller must then send with
    /// the wallet set: the writer handles it after the hold.
    pub async fn hold(&self, req: HoldRequest, within: Duration) -> Result<Held, String> {
        if let (Some(book), Some(w), true) = (&self.book, &req.wallet_id, req.envelopes.is_empty())
        {
            let now = crate::clock::now_ms();
            if let Some(decided) =
                book.try_hold(w, &req.request_id, req.amount, req.expires_ms, now)
            {
                let outcome = decided.map(held).map_err(|e| e.to_string())?;
                if !matches!(outcome, Held::Ok { .. }) {
                    self.refused(req, outcome.clone());
                }
                return Ok(outcome);
            }
        }
        let placed = async {
            let (reply, rx) = oneshot::channel();
            self.urgent
                .send(Msg::Hold(Box::new((req, reply))))
                .await
                .map_err(|_| "the writer has stopped".to_string())?;
            rx.await
                .map_err(|_| "the writer dropped the hold".to_string())?
        };
        tokio::time::timeout(within, placed)
            .await
            .unwrap_or_else(|_| Err(format!("no answer from the ledger within {within:?}")))
    }

    /// More than half the writer's queue is waiting. Hot wallets admit faster than the store
    /// can record: past this, new money waits rather than risk captures a full queue would
    /// drop (each is revenue, and the hold it settles would stay in Redis until it expires).
    /// Records the writer has gathered count too: they are as far from committed as queued ones.
    pub fn backlogged(&self) -> bool {
        let max = self.tx.max_capacity();
        let waiting = (max - self.tx.capacity()) + self.gathered.load(Ordering::Relaxed);
        waiting * 2 > max
    }

    /// Tells the webhooks about a hold refused outside the writer (hot wallets). Never waits;
    /// a full queue drops the event (the refusal itself was answered already).
    pub fn refused(&self, req: HoldRequest, outcome: Held) {
        let _ = self.tx.try_send(Msg::Refused(Box::new((req, outcome))));
    }

    /// Releases expired holds and expires grants; (holds, grants).
    pub async fn sweep(&self) -> Result<(usize, usize), String> {
        let (reply, rx) = oneshot::channel();
        self.urgent
            .send(Msg::Sweep(reply))
            .await
            .map_err(|_| "the writer has stopped".to_string())?;
        rx.await
            .map_err(|_| "the writer dropped the sweep".to_string())?
    }

    /// Waits until everything queued so far is committed.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.urgent.send(Msg::Flush(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

fn write_with_retry(
    conn: &mut Db,
    batch: &mut [UsageRecord],
    metrics: &Metrics,
    acks: Option<&mpsc::UnboundedSender<crate::hotwallet::Ack>>,
) -> bool {
    if batch.is_empty() {
        return false;
    }
    let mut delay = Duration::from_millis(50);
    // Records are only lost if the database stays unwritable for minutes; each failure is
    // logged, and the batch is retried rather than dropped.
    for attempt in 1..=12 {
        match commit_batch(conn, batch) {
            Ok(hot) => {
                metrics.usage_records_written.inc_by(batch.len() as u64);
                if let Some(acks) = acks {
                    for a in hot {
                        let _ = acks.send(a);
                    }
                }
                return true;
            }
            Err(e) => {
                tracing::warn!(attempt, error = %e, records = batch.len(), "usage batch write failed; retrying");
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
    metrics.usage_records_dropped.inc_by(batch.len() as u64);
    for rec in batch {
        tracing::error!(record = %serde_json::to_string(rec).unwrap_or_default(), "usage record not stored after retries");
    }
    false
}

/// Writes a batch in one transaction: for each record, the capture of its wallet hold and the
/// settling of its envelopes (money and metering commit together or not at all, so they
/// cannot disagree), the webhook events that spending crossed, then the records themselves.
///
/// Returns, per wallet whose Redis-admitted ("hot") holds this batch settled, what Redis must
/// learn once the batch is committed.
pub fn commit_batch(
    db: &mut Db,
    batch: &mut [UsageRecord],
) -> Result<Vec<crate::hotwallet::Ack>, store::StoreError> {
    let now = crate::clock::now_ms();
    db.write(|tx| {
        let mut hot: Vec<crate::hotwallet::Ack> = Vec::new();
        let mut shortfalls = Vec::with_capacity(batch.len());
        // Every wallet settle of the batch at once (one round trip on PostgreSQL), then the
        // rest in record order: envelopes and webhooks touch nothing a wallet settle reads.
        let settles: Vec<crate::wallet::SettleArgs> = batch
            .iter()
            .filter_map(|u| {
                let w = u.wallet_id.as_deref()?;
                Some(crate::wallet::SettleArgs {
                    request_id: &u.id,
                    cost_micros: u.cost_micros as i64,
                    hot: u.hot_hold_micros.map(|h| (w, h)),
                })
            })
            .collect();
        let mut settled_all = crate::wallet::settle_group(tx, &settles, now)?.into_iter();
        for u in batch.iter_mut() {
            let mut shortfall = 0;
            u.captured_micros = None;
            if let Some(w) = &u.wallet_id {
                let settled = settled_all.next().flatten();
                if u.hot_hold_micros.is_some() {
                    // Redis forgets the hold either way; a capture only if one was made now.
                    let captured = settled.as_ref().map_or(0, |s| s.captured_micros);
                    let entry = (u.id.clone(), captured);
                    match hot.iter_mut().find(|a| &a.wallet_id == w) {
                        Some(a) => a.settled.push(entry),
                        None => hot.push(crate::hotwallet::Ack {
                            wallet_id: w.clone(),
                            version: -1,
                            settled: vec![entry],
                        }),
                    }
                }
                if let Some(s) = settled {
                    shortfall = s.shortfall_micros as u64;
                    u.captured_micros = Some(s.captured_micros);
                    if let Some((wallet, balance)) = s.low_balance {
                        crate::outbox::enqueue(
                            tx,
                            &format!("wallet:{wallet}:low:{}", now / 3_600_000),
                            "wallet.low_balance",
                            serde_json::json!({"wallet": wallet, "balance_micros": balance}),
                            now,
                        )?;
                    }
                }
            }
            if u.enveloped {
                let crossings = crate::envelope::settle(
                    tx,
                    &u.id,
                    u.cost_micros as i64,
                    (u.input_tokens + u.output_tokens) as i64,
                )?;
                for c in crossings {
                    crate::outbox::enqueue_crossing(tx, &c, now)?;
                }
            }
            u.shortfall_micros = shortfall;
            shortfalls.push(shortfall);
            crate::audit::append_decisions(tx, &u.key_id, &u.id, &u.policy, now)?;
            crate::audit::append_redactions(tx, &u.key_id, &u.id, &u.redactions, now)?;
        }
        store::insert_usage_rows(tx, batch, &shortfalls)?;
        // The version this commit leaves each wallet at: Redis counts a capture once, in a
        // synced balance or as a delta at this version.
        for a in &mut hot {
            a.version = crate::wallet::state(tx, &a.wallet_id)?.2;
        }
        Ok(hot)
    })
}
