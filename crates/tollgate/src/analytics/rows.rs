//! Rows on their way to ClickHouse: each table's columns, rows written in ClickHouse's
//! RowBinary format, and the chunks the sink queues, inserts and spills.
//!
//! RowBinary, not text: ClickHouse 18.16 parses it about 1.6 times as fast as TabSeparated
//! (bench/RESULTS.md run P), and writing it is a copy of each value. Every table's rows start
//! with `id String, <time> Int64, day Date`, so a retry can read back which ids and days a
//! chunk holds without knowing the table.

use crate::records::UsageRecord;
use crate::store::Outcome;

pub(super) const DAY_MS: i64 = 86_400_000;
pub(super) const HOUR_MS: i64 = 3_600_000;

/// The tables the sink writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Table {
    Usage,
    Outcomes,
    Ledger,
}

pub(super) const TABLES: [Table; 3] = [Table::Usage, Table::Outcomes, Table::Ledger];

/// The columns of `usage` rows are sent in: named, so a later migration that adds a column
/// does not shift them. The first 33 are the TabSeparated rows of version 7 (`LEGACY_COLUMNS`).
pub(super) const USAGE_COLUMNS: &str = "id, ts_ms, day, endpoint, key_id, agent, team, org, \
    project, model, model_requested, model_served, provider, status, error, error_kind, run_id, \
    tag_keys, tag_values, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, \
    cache_write_tokens, cost_micros, saved_micros, latency_ms, ttft_ms, stream, cache, \
    usage_source, price_version, wallet_id, attempts, client_disconnected, \
    cache_write_5m_tokens, cache_write_1h_tokens, request_bytes, response_bytes, reused, \
    reused_from, shortfall_micros, detail, cascade, saving_savers, saving_tokens, \
    saving_micros, absent";

/// What spill files of version 7 hold: TabSeparated lines of these columns.
pub(super) const LEGACY_COLUMNS: &str = "id, ts_ms, day, endpoint, key_id, agent, team, org, \
    project, model, model_requested, model_served, provider, status, error, error_kind, run_id, \
    tag_keys, tag_values, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, \
    cache_write_tokens, cost_micros, saved_micros, latency_ms, ttft_ms, stream, cache, \
    usage_source, price_version, wallet_id";
pub(super) const LEGACY_N_COLUMNS: usize = 33;

pub(super) const OUTCOME_COLUMNS: &str = "id, occurred_ms, day, key_id, agent, team, project, \
    run_id, request_id, kind, success, value_micros, tag_keys, tag_values, created_ms, absent";

pub(super) const LEDGER_COLUMNS: &str = "id, ts_ms, day, wallet_id, kind, amount_micros, \
    request_id, key_id, agent, team, org, project, model";

impl Table {
    pub(super) fn name(self) -> &'static str {
        match self {
            Table::Usage => "usage",
            Table::Outcomes => "outcomes",
            Table::Ledger => "ledger",
        }
    }

    pub(super) fn columns(self) -> &'static str {
        match self {
            Table::Usage => USAGE_COLUMNS,
            Table::Outcomes => OUTCOME_COLUMNS,
            Table::Ledger => LEDGER_COLUMNS,
        }
    }

    fn code(self) -> u8 {
        match self {
            Table::Usage => 1,
            Table::Outcomes => 2,
            Table::Ledger => 3,
        }
    }

    fn of_code(c: u8) -> Option<Table> {
        TABLES.into_iter().find(|t| t.code() == c)
    }

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Which optional fields of a row were `None` (the `absent` column), so the request log
/// reads back exactly what the store holds. `KNOWN` marks rows that carry the mask: rows of
/// version 7 do not, and read empty strings as absent.
pub(super) mod absent {
    pub const TEAM: u32 = 1;
    pub const PROJECT: u32 = 1 << 1;
    pub const ORG: u32 = 1 << 2;
    pub const MODEL_REQUESTED: u32 = 1 << 3;
    pub const PROVIDER: u32 = 1 << 4;
    pub const MODEL_SERVED: u32 = 1 << 5;
    pub const ERROR_KIND: u32 = 1 << 6;
    pub const PRICE_VERSION: u32 = 1 << 7;
    pub const TTFT: u32 = 1 << 8;
    pub const REUSED: u32 = 1 << 9;
    pub const REUSED_FROM: u32 = 1 << 10;
    pub const WALLET: u32 = 1 << 11;
    pub const RUN: u32 = 1 << 12;
    pub const DETAIL: u32 = 1 << 13;
    pub const CACHE: u32 = 1 << 14;
    pub const CASCADE: u32 = 1 << 15;
    // Outcomes.
    pub const REQUEST: u32 = 1 << 16;
    pub const VALUE: u32 = 1 << 17;
    pub const KNOWN: u32 = 1 << 31;
}

/// Appends RowBinary values.
struct Rb<'a>(&'a mut Vec<u8>);

impl Rb<'_> {
    fn varint(&mut self, mut n: u64) {
        while n >= 0x80 {
            self.0.push((n as u8) | 0x80);
            n >>= 7;
        }
        self.0.push(n as u8);
    }
    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }
    fn opt(&mut self, s: &Option<String>) {
        self.str(s.as_deref().unwrap_or(""));
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn i64(&mut self, v: i64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `Date`: days since 1970, which ClickHouse keeps in 16 bits (up to 2149).
    fn date(&mut self, ts_ms: i64) {
        self.u16(day_number(ts_ms));
    }
    fn strs<'s>(&mut self, items: impl ExactSizeIterator<Item = &'s str>) {
        self.varint(items.len() as u64);
        for s in items {
            self.str(s);
        }
    }
    fn u64s(&mut self, items: impl ExactSizeIterator<Item = u64>) {
        self.varint(items.len() as u64);
        for v in items {
            self.u64(v);
        }
    }
}

/// The `Date` of a UTC millisecond timestamp, clamped to what ClickHouse can keep.
pub(super) fn day_number(ts_ms: i64) -> u16 {
    ts_ms.div_euclid(DAY_MS).clamp(0, i64::from(u16::MAX)) as u16
}

/// `YYYY-MM-DD` of a day number.
pub(super) fn day_text(day: u16) -> String {
    let (y, m, d) = crate::clock::civil(i64::from(day));
    format!("{y:04}-{m:02}-{d:02}")
}

/// What reports group a record's model by: the one that served, else the one asked for.
pub(super) fn report_model(r: &UsageRecord) -> &str {
    r.model_served
        .as_deref()
        .or(r.model_requested.as_deref())
        .filter(|m| !m.is_empty())
        .unwrap_or("-")
}

/// The `absent` mask of (field is `None`, its bit) pairs.
fn mask_of(fields: &[(bool, u32)]) -> u32 {
    fields
        .iter()
        .filter(|(none, _)| *none)
        .fold(absent::KNOWN, |m, (_, bit)| m | bit)
}

fn usage_row(out: &mut Vec<u8>, r: &UsageRecord) {
    let mask = mask_of(&[
        (r.team.is_none(), absent::TEAM),
        (r.project.is_none(), absent::PROJECT),
        (r.org.is_none(), absent::ORG),
        (r.model_requested.is_none(), absent::MODEL_REQUESTED),
        (r.provider.is_none(), absent::PROVIDER),
        (r.model_served.is_none(), absent::MODEL_SERVED),
        (r.error_kind.is_none(), absent::ERROR_KIND),
        (r.price_version.is_none(), absent::PRICE_VERSION),
        (r.ttft_ms.is_none(), absent::TTFT),
        (r.reused.is_none(), absent::REUSED),
        (r.reused_from.is_none(), absent::REUSED_FROM),
        (r.wallet_id.is_none(), absent::WALLET),
        (r.run_id.is_none(), absent::RUN),
        (r.detail.is_none(), absent::DETAIL),
        (r.cache.is_none(), absent::CACHE),
        (r.cascade.is_none(), absent::CASCADE),
    ]);
    let mut w = Rb(out);
    w.str(&r.id);
    w.i64(r.ts_ms);
    w.date(r.ts_ms);
    w.str(&r.endpoint);
    w.str(&r.key_id);
    w.str(&r.agent);
    w.opt(&r.team);
    w.str(r.org.as_deref().unwrap_or("default"));
    w.opt(&r.project);
    w.str(report_model(r));
    w.opt(&r.model_requested);
    w.opt(&r.model_served);
    w.opt(&r.provider);
    w.u16(r.status);
    w.u8(u8::from(r.status >= 400 || r.error_kind.is_some()));
    w.opt(&r.error_kind);
    w.str(r.run_id.as_deref().unwrap_or("-"));
    w.strs(r.tags.keys().map(String::as_str));
    w.strs(r.tags.values().map(String::as_str));
    w.u64(r.input_tokens);
    w.u64(r.cached_input_tokens);
    w.u64(r.output_tokens);
    w.u64(r.reasoning_tokens);
    w.u64(
        r.cache_write_5m_tokens
            .saturating_add(r.cache_write_1h_tokens),
    );
    w.u64(r.cost_micros);
    w.u64(
        r.savings
            .iter()
            .fold(0u64, |a, s| a.saturating_add(s.micros)),
    );
    w.u64(r.latency_ms);
    w.u64(r.ttft_ms.unwrap_or(0));
    w.u8(u8::from(r.stream));
    w.opt(&r.cache);
    w.str(&r.usage_source);
    w.opt(&r.price_version);
    w.opt(&r.wallet_id);
    w.u32(r.attempts);
    w.u8(u8::from(r.client_disconnected));
    w.u64(r.cache_write_5m_tokens);
    w.u64(r.cache_write_1h_tokens);
    w.u64(r.request_bytes);
    w.u64(r.response_bytes);
    w.opt(&r.reused);
    w.opt(&r.reused_from);
    w.u64(r.shortfall_micros);
    w.opt(&r.detail);
    w.opt(&r.cascade);
    w.strs(r.savings.iter().map(|s| s.saver.as_str()));
    w.u64s(r.savings.iter().map(|s| s.tokens));
    w.u64s(r.savings.iter().map(|s| s.micros));
    w.u32(mask);
}

fn outcome_row(out: &mut Vec<u8>, o: &Outcome) {
    let mask = mask_of(&[
        (o.team.is_none(), absent::TEAM),
        (o.project.is_none(), absent::PROJECT),
        (o.run_id.is_none(), absent::RUN),
        (o.request_id.is_none(), absent::REQUEST),
        (o.value_micros.is_none(), absent::VALUE),
    ]);
    let mut w = Rb(out);
    w.str(&o.id);
    w.i64(o.occurred_ms);
    w.date(o.occurred_ms);
    w.str(&o.key_id);
    w.str(&o.agent);
    w.opt(&o.team);
    w.opt(&o.project);
    w.opt(&o.run_id);
    w.opt(&o.request_id);
    w.str(&o.kind);
    w.u8(u8::from(o.success));
    w.i64(o.value_micros.unwrap_or(0));
    w.strs(o.tags.keys().map(String::as_str));
    w.strs(o.tags.values().map(String::as_str));
    w.i64(o.created_ms);
    w.u32(mask);
}

/// The capture the ledger got for a record's settle, keyed as the ledger keys it.
fn capture_row(out: &mut Vec<u8>, r: &UsageRecord, wallet: &str, captured: i64) {
    let mut w = Rb(out);
    w.str(&format!("capture:{}", r.id));
    w.i64(r.ts_ms);
    w.date(r.ts_ms);
    w.str(wallet);
    w.str("capture");
    w.i64(-captured);
    w.str(&r.id);
    w.str(&r.key_id);
    w.str(&r.agent);
    w.opt(&r.team);
    w.str(r.org.as_deref().unwrap_or("default"));
    w.opt(&r.project);
    w.str(report_model(r));
}

/// Rows of one table on their way.
pub(super) struct Chunk {
    pub table: Table,
    bytes: Vec<u8>,
    /// Where each row starts in `bytes`.
    starts: Vec<u32>,
    /// The oldest row's time, for the lag.
    pub oldest_ms: Option<i64>,
}

/// One row read back: its bytes, id, time and day.
pub(super) struct Entry<'a> {
    pub bytes: &'a [u8],
    pub id: &'a str,
    pub ts_ms: i64,
    pub day: u16,
}

fn read_varint(b: &[u8], at: &mut usize) -> Option<u64> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *b.get(*at)?;
        *at += 1;
        n |= u64::from(byte & 0x7f) << shift;
        if byte < 0x80 {
            return Some(n);
        }
    }
    None
}

impl Chunk {
    pub(super) fn new(table: Table) -> Chunk {
        Chunk {
            table,
            bytes: Vec::new(),
            starts: Vec::new(),
            oldest_ms: None,
        }
    }

    fn push(&mut self, ts_ms: i64, write: impl FnOnce(&mut Vec<u8>)) {
        self.starts.push(self.bytes.len() as u32);
        write(&mut self.bytes);
        self.oldest_ms = Some(self.oldest_ms.map_or(ts_ms, |o| o.min(ts_ms)));
    }

    pub(super) fn usage(batch: &[UsageRecord]) -> Chunk {
        let mut c = Chunk::new(Table::Usage);
        c.bytes.reserve(batch.len() * 320);
        c.starts.reserve(batch.len());
        for r in batch {
            c.push(r.ts_ms, |out| usage_row(out, r));
        }
        c
    }

    /// The captures the batch's settles made (`UsageRecord::captured_micros`).
    pub(super) fn captures(batch: &[UsageRecord]) -> Chunk {
        let mut c = Chunk::new(Table::Ledger);
        for r in batch {
            if let (Some(w), Some(cap)) = (&r.wallet_id, r.captured_micros) {
                if cap > 0 {
                    c.push(r.ts_ms, |out| capture_row(out, r, w, cap));
                }
            }
        }
        c
    }

    pub(super) fn outcomes<'a>(all: impl IntoIterator<Item = &'a Outcome>) -> Chunk {
        let mut c = Chunk::new(Table::Outcomes);
        for o in all {
            c.push(o.occurred_ms, |out| outcome_row(out, o));
        }
        c
    }

    pub(super) fn len(&self) -> usize {
        self.starts.len()
    }

    pub(super) fn body(&self) -> &[u8] {
        &self.bytes
    }

    pub(super) fn append(&mut self, other: Chunk) {
        let base = self.bytes.len() as u32;
        self.bytes.extend_from_slice(&other.bytes);
        self.starts.extend(other.starts.iter().map(|s| s + base));
        self.oldest_ms = match (self.oldest_ms, other.oldest_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// Each row with its id, time and day, read back from its first three columns: only
    /// retries and replays need them, so the writer's path does not pay for them.
    pub(super) fn entries(&self) -> impl Iterator<Item = Entry<'_>> {
        (0..self.starts.len()).filter_map(move |i| {
            let a = self.starts[i] as usize;
            let b = self
                .starts
                .get(i + 1)
                .map_or(self.bytes.len(), |s| *s as usize);
            let bytes = self.bytes.get(a..b)?;
            let mut at = 0;
            let n = read_varint(bytes, &mut at)? as usize;
            let id = std::str::from_utf8(bytes.get(at..at.checked_add(n)?)?).ok()?;
            at += n;
            let ts_ms = i64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?);
            let day = u16::from_le_bytes(bytes.get(at + 8..at + 10)?.try_into().ok()?);
            Some(Entry {
                bytes,
                id,
                ts_ms,
                day,
            })
        })
    }

    /// The UTC hours of the rows whose ids are in `ids`.
    pub(super) fn hours_of(
        &self,
        ids: &std::collections::HashSet<String>,
    ) -> std::collections::BTreeSet<i64> {
        self.entries()
            .filter(|e| ids.contains(e.id))
            .map(|e| e.ts_ms.div_euclid(HOUR_MS) * HOUR_MS)
            .collect()
    }

    /// The rows whose ids are not in `present`.
    pub(super) fn without(&self, present: &std::collections::HashSet<String>) -> Chunk {
        let mut out = Chunk::new(self.table);
        for e in self.entries() {
            if !present.contains(e.id) {
                out.starts.push(out.bytes.len() as u32);
                out.bytes.extend_from_slice(e.bytes);
                out.oldest_ms = Some(out.oldest_ms.map_or(e.ts_ms, |o| o.min(e.ts_ms)));
            }
        }
        out
    }

    /// The chunk as one spill-file frame: `T` (an insert of these rows was tried and its
    /// outcome is unknown) or `U` (never sent), the table, the row count, the body's length,
    /// each row's start, the body. A frame cut by a crash mid-write is short, and skipped.
    pub(super) fn frame(&self, tried: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(10 + 4 * self.starts.len() + self.bytes.len());
        f.push(if tried { b'T' } else { b'U' });
        f.push(self.table.code());
        f.extend_from_slice(&(self.starts.len() as u32).to_le_bytes());
        f.extend_from_slice(&(self.bytes.len() as u32).to_le_bytes());
        for s in &self.starts {
            f.extend_from_slice(&s.to_le_bytes());
        }
        f.extend_from_slice(&self.bytes);
        f
    }

    /// The frames of a spill file, in order, each with whether it was tried; stops at the
    /// first one that is cut or does not read as a frame (and says whether it did).
    pub(super) fn unframe(mut b: &[u8]) -> (Vec<(Chunk, bool)>, bool) {
        let mut out = Vec::new();
        let u32_at = |b: &[u8], at: usize| -> Option<u32> {
            Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        while !b.is_empty() {
            let frame = (|| {
                let tried = match *b.first()? {
                    b'T' => true,
                    b'U' => false,
                    _ => return None,
                };
                let table = Table::of_code(*b.get(1)?)?;
                let rows = u32_at(b, 2)? as usize;
                let len = u32_at(b, 6)? as usize;
                let body_at = 10usize.checked_add(rows.checked_mul(4)?)?;
                let end = body_at.checked_add(len)?;
                let bytes = b.get(body_at..end)?.to_vec();
                let mut starts = Vec::with_capacity(rows);
                for i in 0..rows {
                    let s = u32_at(b, 10 + 4 * i)?;
                    if s as usize >= len || starts.last().is_some_and(|l| *l >= s) {
                        return None;
                    }
                    starts.push(s);
                }
                let mut c = Chunk {
                    table,
                    bytes,
                    starts,
                    oldest_ms: None,
                };
                c.oldest_ms = c.entries().map(|e| e.ts_ms).min();
                Some((c, tried, end))
            })();
            match frame {
                Some((c, tried, end)) => {
                    out.push((c, tried));
                    b = &b[end..];
                }
                None => return (out, false),
            }
        }
        (out, true)
    }
}

/// A TabSeparated field's value (version 7's escapes undone).
fn tsv_unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut it = field.chars();
    while let Some(c) = it.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match it.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some(other) => out.push(other),
            None => {}
        }
    }
    out
}

/// A spill file of version 7 (TabSeparated lines of `LEGACY_COLUMNS`), read back in pieces
/// of at most `max` lines: each piece's lines, and their ids and times.
pub(super) struct LegacyPiece {
    pub lines: Vec<u8>,
    pub rows: Vec<(String, i64)>,
}

pub(super) fn read_legacy(text: &str, max: usize) -> Vec<LegacyPiece> {
    let mut out: Vec<LegacyPiece> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split('\t').collect();
        // A line cut by a crash mid-write is not a row (tabs inside values are escaped).
        if fields.len() != LEGACY_N_COLUMNS {
            continue;
        }
        let Ok(ts) = fields[1].parse::<i64>() else {
            continue;
        };
        if out.last().is_none_or(|p| p.rows.len() >= max) {
            out.push(LegacyPiece {
                lines: Vec::new(),
                rows: Vec::new(),
            });
        }
        if let Some(p) = out.last_mut() {
            p.lines.extend_from_slice(line.as_bytes());
            p.lines.push(b'\n');
            p.rows.push((tsv_unescape(fields[0]), ts));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_and_a_cut_one_is_skipped() {
        let recs: Vec<UsageRecord> = (0..3)
            .map(|i| UsageRecord {
                id: format!("req_{i}é\t"),
                ts_ms: 1_700_000_000_000 + i,
                ..Default::default()
            })
            .collect();
        let c = Chunk::usage(&recs);
        let mut file = c.frame(true);
        file.extend_from_slice(&Chunk::usage(&recs[..1]).frame(false));
        let (chunks, whole) = Chunk::unframe(&file);
        assert!(whole);
        assert_eq!(chunks.len(), 2);
        assert_eq!((chunks[0].1, chunks[1].1), (true, false));
        let chunks: Vec<Chunk> = chunks.into_iter().map(|(c, _)| c).collect();
        let ids: Vec<&str> = chunks[0].entries().map(|e| e.id).collect();
        assert_eq!(ids, ["req_0é\t", "req_1é\t", "req_2é\t"]);
        assert_eq!(chunks[0].body(), c.body());
        assert_eq!(chunks[0].oldest_ms, Some(1_700_000_000_000));
        let e = chunks[0].entries().nth(2).unwrap();
        assert_eq!((e.ts_ms, e.day), (1_700_000_000_002, 19_675));
        assert_eq!(day_text(e.day), "2023-11-14");
        // The second frame cut anywhere: the first still reads, the second does not.
        for cut in 1..Chunk::usage(&recs[..1]).frame(false).len() {
            let (chunks, whole) = Chunk::unframe(&file[..file.len() - cut]);
            assert!(!whole);
            assert_eq!(chunks.len(), 1);
        }
        let present: std::collections::HashSet<String> = ["req_1é\t".to_string()].into();
        let rest = c.without(&present);
        assert_eq!(rest.len(), 2);
        assert_eq!(
            rest.entries().map(|e| e.id).collect::<Vec<_>>(),
            ["req_0é\t", "req_2é\t"]
        );
    }

    #[test]
    fn varints_are_leb128() {
        let mut v = Vec::new();
        Rb(&mut v).varint(300);
        assert_eq!(v, [0xac, 0x02]);
        let mut at = 0;
        assert_eq!(read_varint(&v, &mut at), Some(300));
        assert_eq!(read_varint(&[0x80; 11], &mut 0), None);
    }
}
