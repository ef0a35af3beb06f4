//! OpenTelemetry traces (ADR 0033): a span per request following the GenAI semantic
//! conventions, with a child span per upstream attempt, for the wallet hold and for
//! settling; the W3C trace context taken from the client and passed on upstream. Spans leave
//! as OTLP/HTTP protobuf (`proto.rs`) through the HTTP client the gateway already has
//! (`export.rs`, cargo feature `otel`).
//!
//! A request's trace travels inside its usage record (`UsageRecord::trace`), so it ends
//! where the record is committed (`Meter::record`), however the request ended: an answer, a
//! refusal, a stream cut short, a client that went away.

pub use crate::clock::now_ns;
use http::{HeaderMap, HeaderValue};

#[cfg(feature = "otel")]
mod export;
pub mod proto;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// The longest `tracestate` passed on. Trace context asks intermediaries to keep at least
/// 512 characters; a longer one is dropped whole rather than cut mid-entry.
pub const MAX_TRACESTATE: usize = 512;

/// A caller's span, from its `traceparent` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

/// Lower-case hex only: trace context refuses upper case, which `hex::decode` accepts.
fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

fn hex_into(src: &[u8], dst: &mut [u8]) -> Option<()> {
    for (i, d) in dst.iter_mut().enumerate() {
        *d = (hex_digit(src[2 * i])? << 4) | hex_digit(src[2 * i + 1])?;
    }
    Some(())
}

/// A `traceparent` value (W3C Trace Context, §3.2): `00-<32 hex>-<16 hex>-<2 hex>`, lower
/// case. A later version is read for its version-00 fields, as the spec asks, when what
/// follows them starts with `-`; version `ff` and all-zero ids are invalid.
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let mut version = [0u8];
    hex_into(&v[0..2], &mut version)?;
    match version[0] {
        0xff => return None,
        0 if v.len() != 55 => return None,
        0 => {}
        _ if v.len() > 55 && v[55] != b'-' => return None,
        _ => {}
    }
    let mut trace_id = [0u8; 16];
    hex_into(&v[3..35], &mut trace_id)?;
    let mut span_id = [0u8; 8];
    hex_into(&v[36..52], &mut span_id)?;
    let mut flags = [0u8];
    hex_into(&v[53..55], &mut flags)?;
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: flags[0] & 1 == 1,
    })
}

/// The `traceparent` that names `span_id` of `trace_id`.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, flags: u8) -> HeaderValue {
    let mut s = String::with_capacity(55);
    s.push_str("00-");
    s.push_str(&hex::encode(trace_id));
    s.push('-');
    s.push_str(&hex::encode(span_id));
    s.push('-');
    s.push_str(&hex::encode([flags]));
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_str(&s).unwrap_or(HeaderValue::from_static(""))
}

/// The caller's `tracestate`, when it may be passed on: one header line, visible ASCII, at
/// most `MAX_TRACESTATE` bytes.
pub fn tracestate(headers: &HeaderMap) -> Option<&HeaderValue> {
    let mut all = headers.get_all("tracestate").iter();
    let v = all.next()?;
    (all.next().is_none() && v.len() <= MAX_TRACESTATE && v.to_str().is_ok()).then_some(v)
}

fn random_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

fn random_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

/// An attribute's value: the kinds the gateway's attributes need.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
    Strs(Vec<String>),
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Str(s.to_string())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Value {
        Value::Str(s)
    }
}
impl From<u64> for Value {
    fn from(n: u64) -> Value {
        Value::Int(i64::try_from(n).unwrap_or(i64::MAX))
    }
}
impl From<u32> for Value {
    fn from(n: u32) -> Value {
        Value::Int(i64::from(n))
    }
}
impl From<u16> for Value {
    fn from(n: u16) -> Value {
        Value::Int(i64::from(n))
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Value {
        Value::Bool(b)
    }
}

/// OTLP's `SpanKind` numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
}

pub type Attrs = Vec<(&'static str, Value)>;

#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    pub span_id: SpanId,
    pub parent_id: Option<SpanId>,
    pub name: String,
    pub kind: Kind,
    pub start_ns: u64,
    /// 0 while the span is open.
    pub end_ns: u64,
    pub attrs: Attrs,
    /// Status ERROR with this description; `None` leaves the status unset.
    pub error: Option<String>,
}

/// One request's trace: the root span (the gateway serving the request) and its children.
/// A trace that is not sampled records nothing but still names its spans, so the providers
/// it calls stay in the caller's trace.
#[derive(Clone, Debug, PartialEq)]
pub struct RequestTrace {
    pub trace_id: TraceId,
    /// W3C trace flags: bit 0 is sampled.
    pub flags: u8,
    pub tracestate: Option<String>,
    /// The root's parent is the caller's span, in another process.
    pub remote_parent: bool,
    pub root: Span,
    pub children: Vec<Span>,
    /// When the answer was complete and settling began (ns since the epoch).
    pub settle_start_ns: Option<u64>,
    /// The answer's finish reasons, in the provider's words.
    pub finish_reasons: Vec<String>,
}

impl RequestTrace {
    pub fn new(parent: Option<Parent>, sampled: bool, tracestate: Option<&HeaderValue>) -> Self {
        let trace_id = parent.map_or_else(random_trace_id, |p| p.trace_id);
        RequestTrace {
            trace_id,
            flags: u8::from(sampled),
            tracestate: tracestate
                .and_then(|v| v.to_str().ok())
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            remote_parent: parent.is_some(),
            root: Span {
                span_id: random_span_id(),
                parent_id: parent.map(|p| p.span_id),
                name: String::new(),
                kind: Kind::Server,
                start_ns: now_ns(),
                end_ns: 0,
                attrs: Vec::new(),
                error: None,
            },
            children: Vec::new(),
            settle_start_ns: None,
            finish_reasons: Vec::new(),
        }
    }

    pub fn recording(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Opens a child of the root; its id names it upstream even when nothing is recorded.
    pub fn child(&mut self, name: impl Into<String>, kind: Kind, attrs: Attrs) -> SpanId {
        let span_id = random_span_id();
        if self.recording() {
            self.children.push(Span {
                span_id,
                parent_id: Some(self.root.span_id),
                name: name.into(),
                kind,
                start_ns: now_ns(),
                end_ns: 0,
                attrs,
                error: None,
            });
        }
        span_id
    }

    /// A child that began at `start_ns` and ends now.
    pub fn closed_child(&mut self, name: &str, kind: Kind, start_ns: u64, attrs: Attrs) {
        if self.recording() {
            self.children.push(Span {
                span_id: random_span_id(),
                parent_id: Some(self.root.span_id),
                name: name.to_string(),
                kind,
                start_ns,
                end_ns: now_ns(),
                attrs,
                error: None,
            });
        }
    }

    /// Closes a child, with what is known at its end.
    pub fn end_child(&mut self, id: SpanId, error: Option<&str>, attrs: Attrs) {
        if let Some(s) = self.children.iter_mut().find(|s| s.span_id == id) {
            s.end_ns = now_ns();
            s.attrs.extend(attrs);
            s.error = error.map(str::to_string);
        }
    }

    /// Adds attributes to a child, open or closed.
    pub fn annotate(&mut self, id: SpanId, attrs: Attrs) {
        if let Some(s) = self.children.iter_mut().find(|s| s.span_id == id) {
            s.attrs.extend(attrs);
        }
    }

    /// The `traceparent` that makes `span` the parent of what the provider does.
    pub fn traceparent(&self, span: &SpanId) -> HeaderValue {
        traceparent(&self.trace_id, span, self.flags)
    }

    /// Ends the root, closing every child still open (a stream's attempt lasts as long as
    /// the stream).
    pub fn end_root(&mut self, name: String, attrs: Attrs, error: Option<String>) {
        let now = now_ns();
        for s in self.children.iter_mut().filter(|s| s.end_ns == 0) {
            s.end_ns = now;
        }
        self.root.name = name;
        self.root.attrs = attrs;
        self.root.error = error;
        self.root.end_ns = now;
    }
}

/// The trace a usage record carries. A copy of a record (a follower's share of a coalesced
/// answer, a cached entry) carries none, so no span is exported twice; records compare equal
/// whatever their traces.
#[derive(Default)]
pub struct TraceSlot(pub Option<Box<RequestTrace>>);

impl Clone for TraceSlot {
    fn clone(&self) -> Self {
        TraceSlot(None)
    }
}
impl PartialEq for TraceSlot {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl std::fmt::Debug for TraceSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "TraceSlot(Some)"
        } else {
            "TraceSlot(None)"
        })
    }
}

impl TraceSlot {
    pub fn get(&mut self) -> Option<&mut RequestTrace> {
        self.0.as_deref_mut()
    }
}

/// The exporter's counters (the `tollgate_otel_*` metrics).
#[derive(Clone, Default)]
pub struct Counters {
    pub exported: prometheus_client::metrics::counter::Counter,
    pub dropped: prometheus_client::metrics::counter::Counter,
    pub errors: prometheus_client::metrics::counter::Counter,
}

/// Decides which requests are traced and hands finished traces to the exporter.
pub struct Tracer {
    /// Trace ids whose last 8 bytes fall below this are sampled (`TraceIdRatioBased`).
    ratio_bound: u64,
    always: bool,
    parent_based: bool,
    #[cfg(feature = "otel")]
    exporter: export::Exporter,
}

impl Tracer {
    /// The tracer `[otel]` asks for; `None` when no endpoint is set.
    pub fn start(
        cfg: &crate::config::OtelConfig,
        counters: Counters,
    ) -> anyhow::Result<Option<Tracer>> {
        let Some(endpoint) = cfg.endpoint.as_deref() else {
            return Ok(None);
        };
        #[cfg(feature = "otel")]
        {
            let ratio = cfg.sample_ratio.clamp(0.0, 1.0);
            Ok(Some(Tracer {
                ratio_bound: (ratio * u64::MAX as f64) as u64,
                always: ratio >= 1.0,
                parent_based: cfg.parent_based,
                exporter: export::Exporter::start(cfg, endpoint, counters)?,
            }))
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = counters;
            anyhow::bail!("[otel] endpoint = \"{endpoint}\", but this build has no `otel` feature")
        }
    }

    /// A new request's trace: the caller's when it sent a valid `traceparent`, sampled as
    /// the caller decided (`parent_based`), else by the trace id's ratio.
    pub fn begin(&self, headers: &HeaderMap) -> Box<RequestTrace> {
        let parent = headers
            .get("traceparent")
            .and_then(|v| parse_traceparent(v.as_bytes()));
        let by_ratio = |id: &TraceId| {
            let mut low = [0u8; 8];
            low.copy_from_slice(&id[8..]);
            let low = u64::from_be_bytes(low);
            self.always || low < self.ratio_bound
        };
        let mut t = RequestTrace::new(parent, false, tracestate(headers));
        let sampled = match parent {
            Some(p) if self.parent_based => p.sampled,
            _ => by_ratio(&t.trace_id),
        };
        t.flags = u8::from(sampled);
        Box::new(t)
    }

    /// A finished trace, exported if it was sampled. Never waits.
    pub fn end(&self, t: Box<RequestTrace>) {
        #[cfg(feature = "otel")]
        if t.recording() {
            self.exporter.offer(t);
        }
        #[cfg(not(feature = "otel"))]
        drop(t);
    }

    /// Sends what is queued; false if that took longer than `grace`.
    pub async fn flush(&self, grace: std::time::Duration) -> bool {
        #[cfg(feature = "otel")]
        {
            self.exporter.flush(grace).await
        }
        #[cfg(not(feature = "otel"))]
        {
            let _ = grace;
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specs_example() {
        let p = parse_traceparent(TP.as_bytes()).unwrap();
        assert_eq!(hex::encode(p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex::encode(p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled);
        assert_eq!(traceparent(&p.trace_id, &p.span_id, 1), TP);
    }

    #[test]
    fn refuses_what_trace_context_calls_invalid() {
        for bad in [
            "",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01", // upper case
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01", // zero trace id
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", // zero span id
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // version ff
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x", // 00 with more
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad}");
        }
        // A future version keeps its version-00 fields.
        let later = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what-follows";
        assert!(!parse_traceparent(later.as_bytes()).unwrap().sampled);
    }

    #[test]
    fn an_unsampled_trace_records_nothing_but_names_its_spans() {
        let mut t = RequestTrace::new(None, false, None);
        let id = t.child("x", Kind::Client, Vec::new());
        assert!(t.children.is_empty());
        let h = t.traceparent(&id);
        let p = parse_traceparent(h.as_bytes()).unwrap();
        assert_eq!((p.trace_id, p.span_id, p.sampled), (t.trace_id, id, false));
    }

    #[test]
    fn a_copied_record_carries_no_trace() {
        let slot = TraceSlot(Some(Box::new(RequestTrace::new(None, true, None))));
        assert!(slot.clone().0.is_none());
    }
}
