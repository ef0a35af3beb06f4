//! Server-sent events: splitting a byte stream into events, and watching an OpenAI chat
//! stream for what it costs.
//!
//! The splitter never copies: each event is a `Bytes` slice of what arrived, so the gateway
//! can forward it unchanged and still look inside.

use crate::usage::{AnthropicUsage, Usage};
use bytes::{Bytes, BytesMut};
use serde::Deserialize;
use std::borrow::Cow;

/// One complete event: the raw bytes including its terminating blank line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    pub raw: Bytes,
}

impl SseEvent {
    /// The event's data: its `data:` lines joined with `\n`, per the SSE spec.
    /// Borrowed when there is a single data line, which is what providers send.
    pub fn data(&self) -> Option<Cow<'_, str>> {
        let text = std::str::from_utf8(&self.raw).ok()?;
        let mut data: Option<Cow<str>> = None;
        for line in text.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            let Some(rest) = line.strip_prefix("data:") else {
                continue;
            };
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            data = Some(match data {
                None => Cow::Borrowed(rest),
                Some(prev) => Cow::Owned(format!("{prev}\n{rest}")),
            });
        }
        data
    }
}

/// Splits arbitrary chunks into complete events. A line ending is `\n` or `\r\n`; an empty
/// line ends an event.
#[derive(Default)]
pub struct SseSplitter {
    buf: BytesMut,
    /// Where the scan for the next line ending resumes.
    scan: usize,
    /// Start of the line being scanned, relative to `buf`.
    line_start: usize,
}

impl SseSplitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds a chunk; pushes every event it completes onto `out`.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<SseEvent>) {
        self.buf.extend_from_slice(chunk);
        while let Some(pos) = memchr::memchr(b'\n', &self.buf[self.scan..]) {
            let nl = self.scan + pos;
            let line = &self.buf[self.line_start..nl];
            let blank = line.is_empty() || line == b"\r";
            self.scan = nl + 1;
            self.line_start = nl + 1;
            if blank {
                let raw = self.buf.split_to(nl + 1).freeze();
                self.scan = 0;
                self.line_start = 0;
                // A blank line with nothing before it (keep-alive padding) is not an event.
                if raw.iter().all(|b| *b == b'\n' || *b == b'\r') {
                    continue;
                }
                out.push(SseEvent { raw });
            }
        }
    }

    /// Bytes of an event that has started but not finished.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Whatever is left once the stream is over. A well-formed stream leaves nothing.
    pub fn take_rest(&mut self) -> Bytes {
        self.scan = 0;
        self.line_start = 0;
        self.buf.split().freeze()
    }
}

#[derive(Deserialize)]
struct ChunkPeek<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    choices: Option<Vec<ChoicePeek<'a>>>,
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
    #[serde(default, borrow)]
    error: Option<&'a serde_json::value::RawValue>,
}

#[derive(Deserialize)]
struct ChoicePeek<'a> {
    #[serde(default, borrow)]
    delta: Option<DeltaPeek<'a>>,
    #[serde(default, borrow)]
    finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct DeltaPeek<'a> {
    #[serde(default, borrow)]
    content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    reasoning_content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    refusal: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    tool_calls: Option<Vec<ToolCallPeek<'a>>>,
}

#[derive(Deserialize)]
struct ToolCallPeek<'a> {
    #[serde(default, borrow)]
    function: Option<FunctionPeek<'a>>,
}

#[derive(Deserialize)]
struct FunctionPeek<'a> {
    #[serde(default, borrow)]
    name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    arguments: Option<Cow<'a, str>>,
}

/// What an event means for the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// Content, a role, a finish reason: forward it.
    Chunk,
    /// The chunk tollgate asked for on the client's behalf: `choices` empty, `usage` set.
    UsageOnly,
    /// `data: [DONE]`.
    Done,
    /// The provider reported an error inside the stream.
    Error,
    /// Comments, unparseable data: forward, learn nothing.
    Other,
}

/// Watches an OpenAI Chat Completions stream. Feed it every event in order.
#[derive(Debug, Default)]
pub struct ChatStreamObserver {
    pub usage: Option<Usage>,
    pub model: Option<String>,
    pub finish_reason: Option<String>,
    pub done: bool,
    pub saw_error: bool,
    /// Generated text and tool-call arguments, kept only so that a stream that ends without
    /// a usage block can still be estimated.
    pub output_text: String,
    pub events: u64,
}

impl ChatStreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, event: &SseEvent) -> EventKind {
        self.events += 1;
        let Some(data) = event.data() else {
            return EventKind::Other;
        };
        let data = data.trim();
        if data == "[DONE]" {
            self.done = true;
            return EventKind::Done;
        }
        let Ok(chunk) = serde_json::from_str::<ChunkPeek>(data) else {
            return EventKind::Other;
        };
        if chunk.error.is_some() {
            self.saw_error = true;
            return EventKind::Error;
        }
        if self.model.is_none() {
            self.model = chunk.model.map(Cow::into_owned);
        }
        let mut no_choices = true;
        for choice in chunk.choices.into_iter().flatten() {
            no_choices = false;
            if let Some(delta) = choice.delta {
                for text in [delta.content, delta.reasoning_content, delta.refusal]
                    .into_iter()
                    .flatten()
                {
                    self.output_text.push_str(&text);
                }
                for call in delta.tool_calls.into_iter().flatten() {
                    if let Some(f) = call.function {
                        for text in [f.name, f.arguments].into_iter().flatten() {
                            self.output_text.push_str(&text);
                        }
                    }
                }
            }
            if let Some(reason) = choice.finish_reason {
                self.finish_reason = Some(reason.into_owned());
            }
        }
        match chunk
            .usage
            .and_then(|raw| Usage::from_openai_json(raw.get()))
        {
            Some(usage) => {
                self.usage = Some(usage);
                if no_choices {
                    EventKind::UsageOnly
                } else {
                    EventKind::Chunk
                }
            }
            None => EventKind::Chunk,
        }
    }
}

/// Watches an Anthropic Messages stream: `message_start` carries the input side of usage,
/// `message_delta` the (cumulative) output side, `message_stop` ends it.
#[derive(Debug, Default)]
pub struct MessagesStreamObserver {
    usage: Option<AnthropicUsage>,
    /// `message_delta` carried usage: the output count is final.
    final_usage: bool,
    pub model: Option<String>,
    pub stop_reason: Option<String>,
    pub done: bool,
    pub saw_error: bool,
    /// Generated text, thinking and tool input, for an estimate when usage never came.
    pub output_text: String,
    pub events: u64,
}

#[derive(Deserialize)]
struct MessagesEventPeek<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default)]
    message: Option<MessageStartPeek<'a>>,
    #[serde(default, borrow)]
    delta: Option<MessagesDeltaPeek<'a>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct MessageStartPeek<'a> {
    #[serde(default, borrow)]
    model: Option<Cow<'a, str>>,
    #[serde(default)]
    usage: Option<AnthropicUsage>,
}

#[derive(Deserialize)]
struct MessagesDeltaPeek<'a> {
    #[serde(default, borrow)]
    text: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    partial_json: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    thinking: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    stop_reason: Option<Cow<'a, str>>,
}

impl MessagesStreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// The provider's complete usage: only once `message_delta` has given the output count.
    pub fn usage(&self) -> Option<Usage> {
        if !self.final_usage {
            return None;
        }
        self.usage.map(|u| u.normalise())
    }

    /// What `message_start` reported, for a stream that ended before its final usage: the
    /// input side is exact, the output side is not.
    pub fn input_usage(&self) -> Option<Usage> {
        self.usage.map(|u| Usage {
            output: 0,
            reasoning: 0,
            ..u.normalise()
        })
    }

    pub fn observe(&mut self, event: &SseEvent) -> EventKind {
        self.events += 1;
        let Some(data) = event.data() else {
            return EventKind::Other;
        };
        let Ok(ev) = serde_json::from_str::<MessagesEventPeek>(data.trim()) else {
            return EventKind::Other;
        };
        match ev.kind.as_ref() {
            "message_start" => {
                if let Some(m) = ev.message {
                    self.model = m.model.map(Cow::into_owned);
                    if let Some(u) = m.usage {
                        self.usage
                            .get_or_insert_with(AnthropicUsage::default)
                            .merge(&u);
                    }
                }
                EventKind::Chunk
            }
            "content_block_delta" => {
                if let Some(d) = ev.delta {
                    for text in [d.text, d.partial_json, d.thinking].into_iter().flatten() {
                        self.output_text.push_str(&text);
                    }
                }
                EventKind::Chunk
            }
            "message_delta" => {
                if let Some(reason) = ev.delta.and_then(|d| d.stop_reason) {
                    self.stop_reason = Some(reason.into_owned());
                }
                if let Some(u) = ev.usage {
                    self.usage
                        .get_or_insert_with(AnthropicUsage::default)
                        .merge(&u);
                    self.final_usage = true;
                }
                EventKind::Chunk
            }
            "message_stop" => {
                self.done = true;
                EventKind::Done
            }
            "error" => {
                self.saw_error = true;
                EventKind::Error
            }
            _ => EventKind::Chunk,
        }
    }
}

/// Watches an OpenAI Responses stream: text deltas as they come, usage in the terminal
/// `response.completed` (or `response.incomplete` / `response.failed`) event.
#[derive(Debug, Default)]
pub struct ResponsesStreamObserver {
    pub usage: Option<Usage>,
    pub done: bool,
    pub saw_error: bool,
    pub output_text: String,
    pub events: u64,
}

#[derive(Deserialize)]
struct ResponsesEventPeek<'a> {
    #[serde(rename = "type", borrow)]
    kind: Cow<'a, str>,
    #[serde(default, borrow)]
    delta: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    response: Option<ResponsePeek<'a>>,
}

#[derive(Deserialize)]
struct ResponsePeek<'a> {
    #[serde(default, borrow)]
    usage: Option<&'a serde_json::value::RawValue>,
}

impl ResponsesStreamObserver {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn observe(&mut self, event: &SseEvent) -> EventKind {
        self.events += 1;
        let Some(data) = event.data() else {
            return EventKind::Other;
        };
        let Ok(ev) = serde_json::from_str::<ResponsesEventPeek>(data.trim()) else {
            return EventKind::Other;
        };
        match ev.kind.as_ref() {
            "response.output_text.delta"
            | "response.function_call_arguments.delta"
            | "response.reasoning_summary_text.delta" => {
                if let Some(d) = ev.delta {
                    self.output_text.push_str(&d);
                }
                EventKind::Chunk
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(u) = ev
                    .response
                    .and_then(|r| r.usage)
                    .and_then(|raw| Usage::from_openai_json(raw.get()))
                {
                    self.usage = Some(u);
                }
                self.done = true;
                EventKind::Done
            }
            "error" => {
                self.saw_error = true;
                EventKind::Error
            }
            _ => EventKind::Chunk,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn events_of(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut s = SseSplitter::new();
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, &mut out);
        }
        out
    }

    #[test]
    fn splits_on_blank_lines_with_either_line_ending() {
        let ev = events_of(&[
            b"data: a\n\nda",
            b"ta: b\r\n\r\n: comment\n\ndata: x\ndata: y\n\n",
        ]);
        let data: Vec<_> = ev
            .iter()
            .map(|e| e.data().map(|d| d.into_owned()))
            .collect();
        assert_eq!(
            data,
            vec![
                Some("a".into()),
                Some("b".into()),
                None,
                Some("x\ny".into())
            ]
        );
    }

    #[test]
    fn pending_holds_an_unfinished_event() {
        let mut s = SseSplitter::new();
        let mut out = Vec::new();
        s.push(b"data: {\"a\":1}\n", &mut out);
        assert!(out.is_empty());
        assert_eq!(s.pending(), b"data: {\"a\":1}\n");
        s.push(b"\n", &mut out);
        assert_eq!(out.len(), 1);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn observer_reads_usage_only_chunk_and_done() {
        let mut obs = ChatStreamObserver::new();
        let ev = events_of(&[
            b"data: {\"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hi\"},\"finish_reason\":null}],\"usage\":null}\n\n",
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
            b"data: {\"choices\":[],\"usage\":{\"prompt_tokens\":5,\"completion_tokens\":1,\"total_tokens\":6}}\n\n",
            b"data: [DONE]\n\n",
        ]);
        let kinds: Vec<_> = ev.iter().map(|e| obs.observe(e)).collect();
        assert_eq!(
            kinds,
            vec![
                EventKind::Chunk,
                EventKind::Chunk,
                EventKind::UsageOnly,
                EventKind::Done
            ]
        );
        assert_eq!(
            obs.usage,
            Some(Usage {
                input: 5,
                output: 1,
                ..Usage::default()
            })
        );
        assert_eq!(obs.output_text, "Hi");
        assert_eq!(obs.finish_reason.as_deref(), Some("stop"));
        assert_eq!(obs.model.as_deref(), Some("m"));
        assert!(obs.done);
    }

    fn stream_strategy() -> impl Strategy<Value = (Vec<u8>, Usage, String)> {
        (
            prop::collection::vec("[a-zA-Z0-9 \\n\"\\\\é€]{0,12}", 0..20),
            any::<(u32, u32, u16, u16)>(),
            any::<bool>(),
        )
            .prop_map(|(pieces, (input, output, cached, reasoning), crlf)| {
                let nl = if crlf { "\r\n" } else { "\n" };
                let mut s = String::new();
                let mut text = String::new();
                s.push_str(&format!(": keep-alive{nl}{nl}"));
                for p in &pieces {
                    let chunk = serde_json::json!({
                        "id": "c", "object": "chat.completion.chunk",
                        "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": null}],
                        "usage": null
                    });
                    s.push_str(&format!("data: {chunk}{nl}{nl}"));
                    text.push_str(p);
                }
                let usage = Usage {
                    input: u64::from(input),
                    cached_input: u64::from(cached).min(u64::from(input)),
                    output: u64::from(output),
                    reasoning: u64::from(reasoning).min(u64::from(output)),
                    ..Usage::default()
                };
                let last = serde_json::json!({
                    "choices": [],
                    "usage": {
                        "prompt_tokens": usage.input, "completion_tokens": usage.output,
                        "total_tokens": usage.input + usage.output,
                        "prompt_tokens_details": {"cached_tokens": usage.cached_input},
                        "completion_tokens_details": {"reasoning_tokens": usage.reasoning}
                    }
                });
                s.push_str(&format!("data: {last}{nl}{nl}data: [DONE]{nl}{nl}"));
                (s.into_bytes(), usage, text)
            })
    }

    proptest! {
        /// Whatever the network does to chunk boundaries, the observer sees the same stream.
        #[test]
        fn any_split_gives_the_same_usage(
            (bytes, usage, text) in stream_strategy(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.push(0);
            points.push(bytes.len());
            points.sort_unstable();
            points.dedup();
            let mut splitter = SseSplitter::new();
            let mut obs = ChatStreamObserver::new();
            let mut events = Vec::new();
            let mut forwarded = Vec::new();
            for w in points.windows(2) {
                splitter.push(&bytes[w[0]..w[1]], &mut events);
                for e in events.drain(..) {
                    obs.observe(&e);
                    forwarded.extend_from_slice(&e.raw);
                }
            }
            prop_assert!(splitter.pending().is_empty());
            prop_assert_eq!(obs.usage, Some(usage));
            prop_assert_eq!(&obs.output_text, &text);
            prop_assert!(obs.done);
            // Forwarding event by event loses nothing but keep-alive padding.
            prop_assert_eq!(forwarded, bytes);
        }
    }

    fn messages_stream(pieces: &[String], input: u64, read: u64, output: u64) -> String {
        let mut s = String::new();
        let start = serde_json::json!({"type": "message_start", "message": {"id": "msg_1", "type": "message",
            "role": "assistant", "content": [], "model": "claude-x", "stop_reason": null,
            "usage": {"input_tokens": input, "cache_read_input_tokens": read, "cache_creation_input_tokens": 0, "output_tokens": 1}}});
        s.push_str(&format!("event: message_start\ndata: {start}\n\n"));
        s.push_str("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n");
        s.push_str("event: ping\ndata: {\"type\": \"ping\"}\n\n");
        for p in pieces {
            let d = serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}});
            s.push_str(&format!("event: content_block_delta\ndata: {d}\n\n"));
        }
        s.push_str(
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        );
        let delta = serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null},
            "usage": {"output_tokens": output}});
        s.push_str(&format!("event: message_delta\ndata: {delta}\n\n"));
        s.push_str("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n");
        s
    }

    proptest! {
        #[test]
        fn any_split_of_a_messages_stream_gives_the_same_usage(
            pieces in prop::collection::vec("[a-z \"\\\\é]{0,10}", 0..15),
            input in 0u64..100_000, read in 0u64..100_000, output in 1u64..10_000,
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        ) {
            let bytes = messages_stream(&pieces, input, read, output).into_bytes();
            let mut points: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            points.extend([0, bytes.len()]);
            points.sort_unstable();
            points.dedup();
            let mut splitter = SseSplitter::new();
            let mut obs = MessagesStreamObserver::new();
            let mut events = Vec::new();
            for w in points.windows(2) {
                splitter.push(&bytes[w[0]..w[1]], &mut events);
                for e in events.drain(..) {
                    obs.observe(&e);
                }
            }
            let u = obs.usage().unwrap();
            prop_assert_eq!((u.input, u.cached_input, u.output), (input + read, read, output));
            prop_assert_eq!(obs.output_text, pieces.concat());
            prop_assert!(obs.done);
            prop_assert_eq!(obs.stop_reason.as_deref(), Some("end_turn"));
        }
    }

    #[test]
    fn responses_observer_reads_usage_from_the_terminal_event() {
        let mut obs = ResponsesStreamObserver::new();
        let ev = events_of(&[
            b"event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"usage\":null}}\n\n",
            b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"Hi\"}\n\n",
            b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"usage\":{\"input_tokens\":9,\"input_tokens_details\":{\"cached_tokens\":4},\"output_tokens\":3,\"output_tokens_details\":{\"reasoning_tokens\":1},\"total_tokens\":12}}}\n\n",
        ]);
        for e in &ev {
            obs.observe(e);
        }
        assert_eq!(
            obs.usage,
            Some(Usage {
                input: 9,
                cached_input: 4,
                output: 3,
                reasoning: 1,
                ..Usage::default()
            })
        );
        assert_eq!(obs.output_text, "Hi");
        assert!(obs.done);
    }
}
