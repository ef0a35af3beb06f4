//! The sink: a bounded queue in front of ClickHouse, a task that batches and inserts, and a
//! spill file in the data dir for what ClickHouse could not take.

use super::rows::{self, Chunk, Table, TABLES};
use super::{ClickHouse, REPAIR_EVERY};
use crate::config::AnalyticsConfig;
use crate::metrics::Metrics;
use crate::records::UsageRecord;
use crate::store::Outcome;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Rows ClickHouse did not take yet, in the data dir, as frames (`Chunk::frame`). New rows
/// are appended to `spill.bin`; a replay first renames it to `replay.bin`, so rows spilled
/// meanwhile go to a new file. `spill.jsonl` and `replay.jsonl` are version 7's TabSeparated
/// spill, replayed once and removed.
struct Spill {
    dir: PathBuf,
    max_bytes: u64,
    bytes: u64,
}

const SPILL: &str = "spill.bin";
const REPLAY: &str = "replay.bin";
const LEGACY: [&str; 2] = ["replay.jsonl", "spill.jsonl"];

impl Spill {
    fn path(&self) -> PathBuf {
        self.dir.join(SPILL)
    }

    fn replay_path(&self) -> PathBuf {
        self.dir.join(REPLAY)
    }

    /// What the spill files hold now, in bytes.
    fn measure(dir: &Path) -> u64 {
        [SPILL, REPLAY]
            .iter()
            .chain(LEGACY.iter())
            .filter_map(|p| std::fs::metadata(dir.join(p)).ok())
            .map(|m| m.len())
            .sum()
    }

    /// Appends the chunk (`tried`: an insert of it went out and its outcome is unknown);
    /// `false` (nothing written) past the bound or when the disk fails.
    fn write(&mut self, chunk: &Chunk, tried: bool) -> bool {
        let frame = chunk.frame(tried);
        let n = frame.len() as u64;
        if self.bytes.saturating_add(n) > self.max_bytes {
            return false;
        }
        let ok = std::fs::create_dir_all(&self.dir).is_ok()
            && std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path())
                .and_then(|mut f| f.write_all(&frame).and_then(|_| f.flush()))
                .is_ok();
        if ok {
            self.bytes += n;
        }
        ok
    }
}

enum Msg {
    Rows(Chunk),
    /// Send (or spill) what is pending now, then say so.
    Flush(tokio::sync::oneshot::Sender<()>),
}

/// What the store's writer (and the outcome API) hand rows to.
pub struct Sink {
    /// Unbounded as a channel: `queued` against `capacity` is the bound, in rows.
    tx: mpsc::UnboundedSender<Msg>,
    queued: Arc<AtomicUsize>,
    capacity: usize,
    spill: Arc<Mutex<Spill>>,
    metrics: Arc<Metrics>,
}

impl Sink {
    /// Hands a committed batch over without waiting: its usage rows and the ledger captures
    /// its settles made, to the queue, or the spill file when the queue is full.
    pub fn offer(&self, batch: &[UsageRecord]) {
        if batch.is_empty() {
            return;
        }
        self.enqueue(Chunk::usage(batch));
        self.enqueue(Chunk::captures(batch));
    }

    /// An outcome the store recorded (the first time).
    pub fn offer_outcome(&self, o: &Outcome) {
        self.enqueue(Chunk::outcomes([o]));
    }

    fn enqueue(&self, chunk: Chunk) {
        let n = chunk.len();
        if n == 0 {
            return;
        }
        if self.queued.load(Ordering::Acquire) + n > self.capacity {
            spill(&self.spill, &self.metrics, &chunk, false);
            return;
        }
        self.queued.fetch_add(n, Ordering::AcqRel);
        self.metrics.analytics_queue_depth.inc_by(n as i64);
        if let Err(e) = self.tx.send(Msg::Rows(chunk)) {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            self.metrics.analytics_queue_depth.dec_by(n as i64);
            if let Msg::Rows(chunk) = e.0 {
                spill(&self.spill, &self.metrics, &chunk, false);
            }
        }
    }

    /// Whether ClickHouse holds all that was offered before: the queue is sent (waiting up
    /// to `within`) and nothing waits in the spill file. Reads that must see every record
    /// the store has read the store when it does not.
    pub async fn caught_up(&self, within: Duration) -> bool {
        self.flush(within).await && self.spill.lock().unwrap_or_else(|p| p.into_inner()).bytes == 0
    }

    /// Waits (up to `within`) until what was offered before is in ClickHouse or spilled.
    pub async fn flush(&self, within: Duration) -> bool {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx.send(Msg::Flush(tx)).is_ok()
            && matches!(tokio::time::timeout(within, rx).await, Ok(Ok(())))
    }
}

fn spill(s: &Mutex<Spill>, metrics: &Metrics, chunk: &Chunk, tried: bool) {
    let mut s = s.lock().unwrap_or_else(|p| p.into_inner());
    if s.write(chunk, tried) {
        metrics.analytics_records_spilled.inc_by(chunk.len() as u64);
        metrics.analytics_spill_bytes.set(s.bytes as i64);
    } else {
        metrics.analytics_records_dropped.inc_by(chunk.len() as u64);
        tracing::error!(
            rows = chunk.len(),
            table = chunk.table.name(),
            bound = s.max_bytes,
            "analytics spill file full or unwritable: these rows are in the store but not in ClickHouse"
        );
    }
}

/// The running analytics backend: the client for reports and the sink for records.
pub struct Analytics {
    pub clickhouse: Arc<ClickHouse>,
    pub sink: Arc<Sink>,
}

impl Analytics {
    /// Starts the sink task; migrates ClickHouse first if it answers (the sink retries until
    /// it does, spilling meanwhile).
    pub async fn start(
        cfg: &AnalyticsConfig,
        data_dir: &Path,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Analytics> {
        let clickhouse = Arc::new(ClickHouse::new(cfg)?);
        let migrated = match clickhouse.migrate().await {
            Ok(v) => {
                tracing::info!(version = v, database = %cfg.database, "clickhouse analytics schema ready");
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "clickhouse unavailable at start; usage is spilled until it answers");
                false
            }
        };
        let dir = data_dir.join("analytics");
        let spill = Spill {
            bytes: Spill::measure(&dir),
            dir,
            max_bytes: cfg.spill_max_bytes,
        };
        metrics.analytics_spill_bytes.set(spill.bytes as i64);
        let (tx, rx) = mpsc::unbounded_channel();
        let sink = Arc::new(Sink {
            tx,
            queued: Arc::new(AtomicUsize::new(0)),
            capacity: cfg.queue_capacity,
            spill: Arc::new(Mutex::new(spill)),
            metrics: metrics.clone(),
        });
        let task = SinkTask {
            ch: clickhouse.clone(),
            queued: sink.queued.clone(),
            spill: sink.spill.clone(),
            metrics,
            batch_max: cfg.batch_max,
            flush_interval: cfg.flush_interval,
            retry_interval: cfg.retry_interval,
            migrated,
        };
        tokio::spawn(task.run(rx));
        Ok(Analytics { clickhouse, sink })
    }
}

struct SinkTask {
    ch: Arc<ClickHouse>,
    queued: Arc<AtomicUsize>,
    spill: Arc<Mutex<Spill>>,
    metrics: Arc<Metrics>,
    batch_max: usize,
    flush_interval: Duration,
    retry_interval: Duration,
    migrated: bool,
}

/// Rows gathered for the next inserts, one chunk per table.
struct Pending([Chunk; 3]);

impl Pending {
    fn new() -> Pending {
        Pending(TABLES.map(Chunk::new))
    }

    fn add(&mut self, c: Chunk) {
        self.0[c.table.index()].append(c);
    }

    fn len(&self) -> usize {
        self.0.iter().map(Chunk::len).sum()
    }

    fn oldest_ms(&self) -> Option<i64> {
        self.0.iter().filter_map(|c| c.oldest_ms).min()
    }

    fn take(&mut self) -> [Chunk; 3] {
        std::mem::replace(&mut self.0, TABLES.map(Chunk::new))
    }
}

impl SinkTask {
    fn received(&self, c: &Chunk) {
        self.queued.fetch_sub(c.len(), Ordering::AcqRel);
        self.metrics.analytics_queue_depth.dec_by(c.len() as i64);
    }

    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Msg>) {
        let mut pending = Pending::new();
        let mut flushes: Vec<tokio::sync::oneshot::Sender<()>> = Vec::new();
        // While down, rows are spilled; ClickHouse is tried again at `retry_at`.
        let mut down = !self.migrated;
        let mut retry_at = tokio::time::Instant::now();
        let mut repair_at = tokio::time::Instant::now() + REPAIR_EVERY;
        let mut open = true;
        while open || pending.len() > 0 || !flushes.is_empty() {
            let deadline = tokio::time::Instant::now() + self.flush_interval;
            while open && pending.len() < self.batch_max && flushes.is_empty() {
                tokio::select! {
                    m = rx.recv() => match m {
                        Some(Msg::Rows(c)) => {
                            self.received(&c);
                            pending.add(c);
                        }
                        Some(Msg::Flush(done)) => flushes.push(done),
                        None => open = false,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            self.note_lag(pending.oldest_ms());
            if down && tokio::time::Instant::now() >= retry_at {
                down = !self.recover().await;
                if down {
                    retry_at = tokio::time::Instant::now() + self.retry_interval;
                }
            }
            // Rows spill while ClickHouse is down, and also when the queue was full.
            let replay_due = self.spill.lock().unwrap_or_else(|p| p.into_inner()).bytes > 0;
            if !down && replay_due {
                if let Err(e) = self.replay().await {
                    tracing::warn!(error = %e, "replaying the analytics spill failed; retrying later");
                    down = true;
                    retry_at = tokio::time::Instant::now() + self.retry_interval;
                }
            }
            if !down && tokio::time::Instant::now() >= repair_at {
                repair_at = tokio::time::Instant::now() + REPAIR_EVERY;
                if let Err(e) = self.ch.repair_due(crate::clock::now_ms()).await {
                    tracing::warn!(error = %e, "repairing the clickhouse rollups failed; retrying later");
                }
            }
            if pending.len() > 0 {
                let [usage, outcomes, ledger] = pending.take();
                // Behind by more than a batch: a second usage insert goes with the first, so
                // ClickHouse parses on two cores (its parse of one insert is one thread).
                let mut second = Chunk::new(Table::Usage);
                let (mut outcomes, mut ledger) = (outcomes, ledger);
                while open && !down && second.len() < self.batch_max {
                    match rx.try_recv() {
                        Ok(Msg::Rows(c)) => {
                            self.received(&c);
                            match c.table {
                                Table::Usage => second.append(c),
                                Table::Outcomes => outcomes.append(c),
                                Table::Ledger => ledger.append(c),
                            }
                        }
                        Ok(Msg::Flush(done)) => flushes.push(done),
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => open = false,
                    }
                }
                let chunks = [usage, second, outcomes, ledger];
                let tried = !down;
                let results: Vec<Result<(), String>> = if down {
                    chunks.iter().map(|_| Err("down".to_string())).collect()
                } else {
                    let (a, b, c, d) = tokio::join!(
                        self.send(&chunks[0]),
                        self.send(&chunks[1]),
                        self.send(&chunks[2]),
                        self.send(&chunks[3]),
                    );
                    vec![a, b, c, d]
                };
                for (result, c) in results.into_iter().zip(chunks.iter()) {
                    let Err(e) = result else { continue };
                    if c.len() == 0 {
                        continue;
                    }
                    if !down {
                        tracing::warn!(error = %e, rows = c.len(), table = c.table.name(), "clickhouse insert failed; spilling until it answers");
                        down = true;
                        retry_at = tokio::time::Instant::now() + self.retry_interval;
                    }
                    spill(&self.spill, &self.metrics, c, tried);
                }
                self.note_lag(pending.oldest_ms());
            }
            for f in flushes.drain(..) {
                let _ = f.send(());
            }
            if !open && pending.len() == 0 {
                break;
            }
        }
    }

    /// One insert, and twice more (each after asking what landed) if it fails.
    async fn send(&self, chunk: &Chunk) -> Result<(), String> {
        if chunk.len() == 0 {
            return Ok(());
        }
        let mut err = match self.ch.insert(chunk).await {
            Ok(()) => {
                self.metrics
                    .analytics_records_sent
                    .inc_by(chunk.len() as u64);
                return Ok(());
            }
            Err(e) => e,
        };
        for wait in [100u64, 500] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            match self.ch.insert_once(chunk).await {
                Ok(n) => {
                    self.metrics.analytics_records_sent.inc_by(n as u64);
                    return Ok(());
                }
                Err(e) => err = e,
            }
        }
        Err(err)
    }

    async fn recover(&mut self) -> bool {
        match self.ch.migrate().await {
            Ok(_) => {
                tracing::info!("clickhouse answers; replaying the spilled rows");
                self.migrated = true;
                true
            }
            Err(e) => {
                tracing::debug!(error = %e, "clickhouse still unavailable");
                false
            }
        }
    }

    /// Sends what was spilled, each chunk only for the ids ClickHouse lacks. Rows spilled
    /// while it runs (a full queue) are taken in the next round, three rounds at most.
    /// Frames never sent go in without asking, but only from a file this call took: a
    /// `replay.bin` already there is a replay that failed or was cut off, whose inserts may
    /// have landed, so all of it is asked about.
    async fn replay(&self) -> Result<(), String> {
        let dir = self
            .spill
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .dir
            .clone();
        for name in LEGACY {
            let path = dir.join(name);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            let mut sent = 0;
            for piece in rows::read_legacy(&text, self.batch_max) {
                sent += self.ch.insert_legacy_once(&piece).await?;
            }
            self.replayed(sent, &path);
        }
        for _ in 0..3 {
            let replay = {
                let s = self.spill.lock().unwrap_or_else(|p| p.into_inner());
                let (path, replay) = (s.path(), s.replay_path());
                // A replay that did not finish is finished first; new rows start a new file.
                let fresh = !replay.exists() && path.exists();
                if fresh {
                    std::fs::rename(&path, &replay).map_err(|e| format!("spill file: {e}"))?;
                }
                (replay, fresh)
            };
            let (replay, fresh) = replay;
            let Ok(bytes) = std::fs::read(&replay) else {
                return Ok(());
            };
            let (chunks, whole) = Chunk::unframe(&bytes);
            if !whole {
                tracing::warn!(
                    file = %replay.display(),
                    "the analytics spill file ends in a cut frame (a crash mid-write); the frames before it are replayed"
                );
            }
            // A table's frames go in together, up to a batch (the tables' frames alternate in
            // the file: a batch's usage rows, then its captures); those that need asking
            // apart from those that do not.
            let mut merged: Vec<(Chunk, bool)> = Vec::new();
            for (c, tried) in chunks {
                let ask = tried || !fresh;
                match merged
                    .iter_mut()
                    .rev()
                    .find(|(m, a)| m.table == c.table && *a == ask)
                {
                    Some((last, _)) if last.len() < self.batch_max => last.append(c),
                    _ => merged.push((c, ask)),
                }
            }
            let mut sent = 0;
            for (c, ask) in &merged {
                sent += if *ask {
                    self.ch.insert_once(c).await?
                } else {
                    self.ch.insert(c).await?;
                    c.len()
                };
            }
            self.replayed(sent, &replay);
        }
        Ok(())
    }

    /// `file` is in ClickHouse: it goes, and the spill's size is measured again.
    fn replayed(&self, sent: usize, file: &Path) {
        self.metrics.analytics_records_sent.inc_by(sent as u64);
        self.metrics.analytics_records_replayed.inc_by(sent as u64);
        let mut s = self.spill.lock().unwrap_or_else(|p| p.into_inner());
        let _ = std::fs::remove_file(file);
        s.bytes = Spill::measure(&s.dir);
        self.metrics.analytics_spill_bytes.set(s.bytes as i64);
        tracing::info!(rows = sent, file = %file.display(), "replayed an analytics spill file into clickhouse");
    }

    fn note_lag(&self, oldest_ms: Option<i64>) {
        let lag = oldest_ms.map_or(0.0, |oldest| {
            (crate::clock::now_ms() - oldest).max(0) as f64 / 1000.0
        });
        self.metrics.analytics_lag_seconds.set(lag);
    }
}
