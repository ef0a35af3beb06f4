//! The tool calls a model asks for in its answer (Chat Completions `tool_calls`, Messages
//! `tool_use`, Responses `function_call`), ruled on by the key's tool policy before the agent
//! sees them. A call the policy refuses (or that waits on an approver) is replaced by text
//! saying so, in the shape the agent's SDK already parses; an allowed call passes unchanged.
//!
//! JSON answers are ruled on whole (`govern_answer`). Streams go through a `ToolGuard` in the
//! client's dialect, after any translation: text flows as it arrives, and only a tool call's
//! own events are held until its block is complete and ruled on. A stream that ends inside a
//! tool call never releases it: a call the policy did not see never reaches the agent.

use super::*;
use crate::policy::Call;
use serde_json::{json, Value};
use tollgate_proto::SseEvent;

/// What is needed to rule on the tool calls of one answer.
pub(crate) struct Judge {
    app: Arc<AppState>,
    runtime: Arc<Runtime>,
    key: Arc<KeyRecord>,
    provider: String,
    model: String,
    run: Option<String>,
    request_id: String,
}

impl Judge {
    /// A judge for `key`'s answers, or `None` when no policy governs the key (its answers
    /// are never parsed).
    pub(crate) fn for_key(
        app: &Arc<AppState>,
        runtime: &Arc<Runtime>,
        key: &KeyRecord,
        provider: &str,
        model: &str,
        run: Option<&str>,
        request_id: &str,
    ) -> Option<Judge> {
        if !runtime.policies.governs(key) {
            return None;
        }
        Some(Judge {
            app: app.clone(),
            runtime: runtime.clone(),
            key: Arc::new(key.clone()),
            provider: provider.to_string(),
            model: model.to_string(),
            run: run.map(str::to_string),
            request_id: request_id.to_string(),
        })
    }

    fn rule(&self, rec: &mut UsageRecord, name: &str, args: &Value) -> Ruling {
        let call = Call {
            surface: "model",
            server: &self.provider,
            tool: name,
            args,
            model: Some(&self.model),
            run: self.run.as_deref(),
        };
        rule(
            &self.app,
            &self.runtime,
            &self.key,
            rec,
            &call,
            &self.request_id,
        )
    }
}

/// A call's fate: it goes to the agent, or the agent reads this text instead.
#[derive(Debug, Clone, PartialEq)]
enum Decided {
    Allow,
    Refuse(String),
}

/// The texts of the refused calls among `decided`, in order.
fn refusals<'a>(decided: impl Iterator<Item = &'a Decided>) -> Vec<&'a str> {
    decided
        .filter_map(|d| match d {
            Decided::Refuse(t) => Some(t.as_str()),
            Decided::Allow => None,
        })
        .collect()
}

fn refusal(tool: &str, error: &ApiError) -> String {
    format!(
        "[tollgate] The tool call '{tool}' was not made: {}",
        error.message
    )
}

/// The arguments of a call as the policy sees them: parsed JSON, or the raw text when it is
/// not JSON (a rule reading a field then fails to evaluate, and so denies).
fn parse_args(text: &str) -> Value {
    if text.trim().is_empty() {
        return json!({});
    }
    serde_json::from_str(text).unwrap_or_else(|_| Value::String(text.to_string()))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(hay, needle).is_some()
}

/// The calls of one block, each ruled on; gates still to be awaited stay in `gates`.
struct Ruled {
    decided: Vec<Option<Decided>>,
    gates: Vec<(usize, String, GateFuture)>,
    /// An approval gate refused a call: the answer holds only until the approver decides.
    parked: bool,
}

fn rule_all(judge: &Judge, rec: &mut UsageRecord, calls: &[(String, Value)]) -> Ruled {
    let mut decided = Vec::with_capacity(calls.len());
    let mut gates = Vec::new();
    for (i, (name, args)) in calls.iter().enumerate() {
        match judge.rule(rec, name, args) {
            Ruling::Go => decided.push(Some(Decided::Allow)),
            Ruling::Stop(s) => decided.push(Some(Decided::Refuse(refusal(name, &s.error)))),
            Ruling::Gate(f) => {
                decided.push(None);
                gates.push((i, name.clone(), f));
            }
        }
    }
    Ruled {
        decided,
        gates,
        parked: false,
    }
}

impl Ruled {
    /// Polls the gates still open; ready when every call is decided.
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut i = 0;
        while i < self.gates.len() {
            match self.gates[i].2.as_mut().poll(cx) {
                Poll::Ready(outcome) => {
                    let (slot, name, _) = self.gates.swap_remove(i);
                    self.decided[slot] = Some(match outcome {
                        Ok(()) => Decided::Allow,
                        Err(s) => {
                            self.parked = true;
                            Decided::Refuse(refusal(&name, &s.error))
                        }
                    });
                }
                Poll::Pending => i += 1,
            }
        }
        if self.gates.is_empty() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn into_decisions(self) -> Vec<Decided> {
        self.decided
            .into_iter()
            .map(|d| d.unwrap_or(Decided::Refuse("[tollgate] undecided".into())))
            .collect()
    }
}

/// A JSON answer rewritten because the policy refused some of its calls.
pub(crate) struct Rewritten {
    pub(crate) body: Vec<u8>,
    /// A refusal came from an approval gate: the same request may go through once an
    /// approver decides, so the answer must not be replayed to it.
    pub(crate) parked: bool,
}

/// Rules on the tool calls of a JSON answer in the client's dialect (`endpoint`); the
/// rewritten body when any call was refused, `None` when the answer goes out unchanged.
pub(crate) async fn govern_answer(
    judge: &Judge,
    rec: &mut UsageRecord,
    endpoint: Endpoint,
    body: &[u8],
) -> Option<Rewritten> {
    let marker: &[u8] = match endpoint {
        Endpoint::ChatCompletions => b"tool_calls",
        Endpoint::Messages => b"tool_use",
        Endpoint::Responses => b"function_call",
        _ => return None,
    };
    if !contains(body, marker) {
        return None;
    }
    let mut doc: Value = serde_json::from_slice(body).ok()?;
    let calls = json_calls(endpoint, &doc);
    if calls.is_empty() {
        return None;
    }
    let named: Vec<(String, Value)> = calls
        .iter()
        .map(|c| (c.name.clone(), c.args.clone()))
        .collect();
    let mut ruled = rule_all(judge, rec, &named);
    std::future::poll_fn(|cx| ruled.poll(cx)).await;
    let parked = ruled.parked;
    let decisions = ruled.into_decisions();
    if decisions.iter().all(|d| *d == Decided::Allow) {
        return None;
    }
    rewrite_json(endpoint, &mut doc, &calls, &decisions);
    Some(Rewritten {
        body: serde_json::to_vec(&doc).ok()?,
        parked,
    })
}

/// One tool call found in a JSON answer: where it is and what it asks.
struct Found {
    /// The choice (Chat) or 0, and the call's position in its list.
    outer: usize,
    inner: usize,
    name: String,
    args: Value,
}

fn json_calls(endpoint: Endpoint, doc: &Value) -> Vec<Found> {
    let mut out = Vec::new();
    match endpoint {
        Endpoint::ChatCompletions => {
            for (ci, choice) in list(doc, "choices").iter().enumerate() {
                for (ti, tc) in list(&choice["message"], "tool_calls").iter().enumerate() {
                    out.push(Found {
                        outer: ci,
                        inner: ti,
                        name: str_at(tc, "/function/name"),
                        args: parse_args(
                            tc.pointer("/function/arguments")
                                .and_then(Value::as_str)
                                .unwrap_or(""),
                        ),
                    });
                }
            }
        }
        Endpoint::Messages => {
            for (i, block) in list(doc, "content").iter().enumerate() {
                if block["type"] == "tool_use" {
                    out.push(Found {
                        outer: 0,
                        inner: i,
                        name: str_at(block, "/name"),
                        args: block.get("input").cloned().unwrap_or_else(|| json!({})),
                    });
                }
            }
        }
        _ => {
            for (i, item) in list(doc, "output").iter().enumerate() {
                if item["type"] == "function_call" {
                    out.push(Found {
                        outer: 0,
                        inner: i,
                        name: str_at(item, "/name"),
                        args: parse_args(item["arguments"].as_str().unwrap_or("")),
                    });
                }
            }
        }
    }
    out
}

fn list<'a>(v: &'a Value, field: &str) -> &'a [Value] {
    v.get(field)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn str_at(v: &Value, pointer: &str) -> String {
    v.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string()
}

/// A Responses message item carrying `text`.
fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "status": status, "role": "assistant",
        "content": if status == "completed" {
            json!([{"type": "output_text", "text": text, "annotations": []}])
        } else { json!([]) }})
}

fn refusal_item_id(call_item_id: &str) -> String {
    format!("msg_tollgate_{}", call_item_id.trim_start_matches("fc_"))
}

fn rewrite_json(endpoint: Endpoint, doc: &mut Value, calls: &[Found], decisions: &[Decided]) {
    match endpoint {
        Endpoint::ChatCompletions => {
            let Some(choices) = doc.get_mut("choices").and_then(Value::as_array_mut) else {
                return;
            };
            for (ci, choice) in choices.iter_mut().enumerate() {
                let mine: Vec<(&Found, &Decided)> = calls
                    .iter()
                    .zip(decisions)
                    .filter(|(c, _)| c.outer == ci)
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                let texts = refusals(mine.iter().map(|(_, d)| *d));
                let keep: Vec<usize> = mine
                    .iter()
                    .filter(|(_, d)| **d == Decided::Allow)
                    .map(|(c, _)| c.inner)
                    .collect();
                let msg = &mut choice["message"];
                if let Some(tcs) = msg.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    let mut i = 0;
                    tcs.retain(|_| {
                        i += 1;
                        keep.contains(&(i - 1))
                    });
                }
                let before = msg["content"].as_str().unwrap_or("").to_string();
                let joined = texts.join("\n");
                msg["content"] = json!(if before.is_empty() {
                    joined
                } else {
                    format!("{before}\n\n{joined}")
                });
                if keep.is_empty() {
                    if let Some(m) = msg.as_object_mut() {
                        m.remove("tool_calls");
                    }
                    if choice["finish_reason"] == "tool_calls" {
                        choice["finish_reason"] = json!("stop");
                    }
                }
            }
        }
        Endpoint::Messages => {
            let Some(content) = doc.get_mut("content").and_then(Value::as_array_mut) else {
                return;
            };
            for (c, d) in calls.iter().zip(decisions) {
                if let (Decided::Refuse(text), Some(block)) = (d, content.get_mut(c.inner)) {
                    *block = json!({"type": "text", "text": text});
                }
            }
            let any_left = content.iter().any(|b| b["type"] == "tool_use");
            if !any_left && doc["stop_reason"] == "tool_use" {
                doc["stop_reason"] = json!("end_turn");
            }
        }
        _ => {
            let Some(output) = doc.get_mut("output").and_then(Value::as_array_mut) else {
                return;
            };
            for (c, d) in calls.iter().zip(decisions) {
                if let (Decided::Refuse(text), Some(item)) = (d, output.get_mut(c.inner)) {
                    let id = refusal_item_id(item["id"].as_str().unwrap_or("call"));
                    *item = message_item(&id, text, "completed");
                }
            }
        }
    }
}

/// Rules on the tool calls of a stream in the client's dialect, holding each call's events
/// until its block is complete.
pub(crate) struct ToolGuard {
    judge: Judge,
    splitter: tollgate_proto::SseSplitter,
    scratch: Vec<SseEvent>,
    /// Events that arrived while a block waits on an approval: they keep their order.
    backlog: VecDeque<SseEvent>,
    waiting: Option<(Ruled, Block)>,
    shape: Shape,
    /// What is ready for the client, in order.
    pub(crate) out: VecDeque<Bytes>,
}

enum Shape {
    Chat(ChatState),
    Messages(MessagesState),
    Responses(ResponsesState),
}

/// A block of calls complete and ruled on (or being ruled on), with what to send after it.
enum Block {
    /// Chat: the calls of one or more choices, and the chunk that finished them.
    Chat { calls: Vec<ChatCall>, finish: Value },
    /// Messages: one `tool_use` block's events.
    Messages(MessagesCall),
    /// Responses: one `function_call` item's events.
    Responses(ResponsesCall),
}

impl ToolGuard {
    pub(crate) fn new(judge: Judge, client: Endpoint) -> Option<ToolGuard> {
        let shape = match client {
            Endpoint::ChatCompletions => Shape::Chat(ChatState::default()),
            Endpoint::Messages => Shape::Messages(MessagesState::default()),
            Endpoint::Responses => Shape::Responses(ResponsesState::default()),
            _ => return None,
        };
        Some(ToolGuard {
            judge,
            splitter: tollgate_proto::SseSplitter::new(),
            scratch: Vec::new(),
            backlog: VecDeque::new(),
            waiting: None,
            shape,
            out: VecDeque::new(),
        })
    }

    /// Takes bytes the client would have been sent; what may go out lands in `out`.
    pub(crate) fn push(&mut self, bytes: &[u8], rec: &mut Option<UsageRecord>) {
        self.splitter.push(bytes, &mut self.scratch);
        let mut events = std::mem::take(&mut self.scratch);
        for ev in events.drain(..) {
            if self.waiting.is_some() {
                self.backlog.push_back(ev);
            } else {
                self.on_event(ev, rec);
            }
        }
        self.scratch = events;
    }

    /// Whether a block waits on an approval, or events wait behind one.
    pub(crate) fn busy(&self) -> bool {
        self.waiting.is_some() || !self.backlog.is_empty()
    }

    /// Moves a waiting block forward; ready once nothing waits.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>, rec: &mut Option<UsageRecord>) -> Poll<()> {
        loop {
            if let Some((ruled, _)) = self.waiting.as_mut() {
                if ruled.poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let Some((ruled, block)) = self.waiting.take() else {
                    continue;
                };
                self.emit_block(block, &ruled.into_decisions());
            }
            let Some(ev) = self.backlog.pop_front() else {
                return Poll::Ready(());
            };
            self.on_event(ev, rec);
        }
    }

    fn on_event(&mut self, ev: SseEvent, rec: &mut Option<UsageRecord>) {
        let block = match &mut self.shape {
            Shape::Chat(s) => s.on_event(ev, &mut self.out),
            Shape::Messages(s) => s.on_event(ev, &mut self.out),
            Shape::Responses(s) => s.on_event(ev, &mut self.out),
        };
        let Some(block) = block else { return };
        let calls = block.calls();
        let mut scratch = UsageRecord::default();
        let rec = rec.as_mut().unwrap_or(&mut scratch);
        let ruled = rule_all(&self.judge, rec, &calls);
        if ruled.gates.is_empty() {
            self.emit_block(block, &ruled.into_decisions());
        } else {
            self.waiting = Some((ruled, block));
        }
    }

    fn emit_block(&mut self, block: Block, decisions: &[Decided]) {
        match (&mut self.shape, block) {
            (Shape::Chat(s), Block::Chat { calls, finish }) => {
                s.emit(calls, finish, decisions, &mut self.out)
            }
            (Shape::Messages(s), Block::Messages(call)) => s.emit(call, decisions, &mut self.out),
            (Shape::Responses(s), Block::Responses(call)) => s.emit(call, decisions, &mut self.out),
            _ => {}
        }
    }
}

impl Block {
    fn calls(&self) -> Vec<(String, Value)> {
        match self {
            Block::Chat { calls, .. } => calls
                .iter()
                .map(|c| (c.name.clone(), parse_args(&c.args)))
                .collect(),
            Block::Messages(c) => vec![(c.name.clone(), c.args())],
            Block::Responses(c) => vec![(c.name.clone(), c.args())],
        }
    }
}

pub(super) fn data_event(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

pub(super) fn named_event(v: &Value) -> Bytes {
    let name = v["type"].as_str().unwrap_or("message");
    Bytes::from(format!("event: {name}\ndata: {v}\n\n"))
}

fn event_json(ev: &SseEvent) -> Option<Value> {
    let data = ev.data()?;
    serde_json::from_str(&data).ok()
}

/// Chat Completions: `delta.tool_calls` pieces, keyed by choice and call index, complete
/// when the choice's `finish_reason` arrives.
#[derive(Default)]
struct ChatState {
    held: Vec<ChatCall>,
    /// Choices that have streamed text, so a refusal starts on a new paragraph.
    texted: Vec<u64>,
}

struct ChatCall {
    choice: u64,
    index: u64,
    id: String,
    name: String,
    args: String,
}

impl ChatState {
    fn on_event(&mut self, ev: SseEvent, out: &mut VecDeque<Bytes>) -> Option<Block> {
        let relevant = contains(&ev.raw, b"tool_calls") || !self.held.is_empty();
        if !relevant {
            if self.texted.is_empty() && contains(&ev.raw, b"\"content\"") {
                self.note_text(&ev);
            }
            out.push_back(ev.raw);
            return None;
        }
        let Some(mut v) = event_json(&ev) else {
            // Not JSON (`[DONE]`, a comment): nothing of a call in it.
            if !contains(&ev.raw, b"tool_calls") {
                out.push_back(ev.raw);
            }
            return None;
        };
        let mut finished = Vec::new();
        let mut changed = false;
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for choice in choices.iter_mut() {
                let ci = choice["index"].as_u64().unwrap_or(0);
                self.mark_text(choice);
                if let Some(tcs) = choice
                    .get_mut("delta")
                    .and_then(Value::as_object_mut)
                    .and_then(|d| d.remove("tool_calls"))
                {
                    changed = true;
                    for tc in tcs.as_array().map_or(&[][..], Vec::as_slice) {
                        let index = tc["index"].as_u64().unwrap_or(0);
                        let pos = match self
                            .held
                            .iter()
                            .position(|h| h.choice == ci && h.index == index)
                        {
                            Some(p) => p,
                            None => {
                                self.held.push(ChatCall {
                                    choice: ci,
                                    index,
                                    id: String::new(),
                                    name: String::new(),
                                    args: String::new(),
                                });
                                self.held.len() - 1
                            }
                        };
                        let h = &mut self.held[pos];
                        if let Some(id) = tc["id"].as_str() {
                            h.id = id.to_string();
                        }
                        if let Some(n) = tc.pointer("/function/name").and_then(Value::as_str) {
                            h.name.push_str(n);
                        }
                        if let Some(a) = tc.pointer("/function/arguments").and_then(Value::as_str) {
                            h.args.push_str(a);
                        }
                    }
                }
                let done = choice["finish_reason"].is_string();
                if done && self.held.iter().any(|h| h.choice == ci) {
                    finished.push(ci);
                }
            }
        }
        if !finished.is_empty() {
            let mut calls = Vec::new();
            let mut i = 0;
            while i < self.held.len() {
                if finished.contains(&self.held[i].choice) {
                    calls.push(self.held.remove(i));
                } else {
                    i += 1;
                }
            }
            return Some(Block::Chat { calls, finish: v });
        }
        if changed {
            // What is left of the chunk once its call pieces are held: sent if it still says
            // something (a role, text, a finish), dropped if it is empty.
            let empty = v["choices"].as_array().is_some_and(|cs| {
                cs.iter().all(|c| {
                    c["finish_reason"].is_null()
                        && c["delta"].as_object().is_none_or(|d| {
                            d.iter()
                                .all(|(k, val)| val.is_null() || (k == "content" && val == ""))
                        })
                })
            }) && v.get("usage").is_none_or(Value::is_null);
            if !empty {
                out.push_back(data_event(&v));
            }
        } else {
            out.push_back(ev.raw);
        }
        None
    }

    fn note_text(&mut self, ev: &SseEvent) {
        if let Some(v) = event_json(ev) {
            for c in list(&v, "choices") {
                self.mark_text(c);
            }
        }
    }

    /// Remembers that `choice` has streamed text.
    fn mark_text(&mut self, choice: &Value) {
        let ci = choice["index"].as_u64().unwrap_or(0);
        let has_text = choice
            .pointer("/delta/content")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty());
        if has_text && !self.texted.contains(&ci) {
            self.texted.push(ci);
        }
    }

    fn emit(
        &mut self,
        calls: Vec<ChatCall>,
        mut finish: Value,
        decisions: &[Decided],
        out: &mut VecDeque<Bytes>,
    ) {
        let mut template = finish.clone();
        if let Some(t) = template.as_object_mut() {
            t.remove("usage");
        }
        let mut choices: Vec<u64> = calls.iter().map(|c| c.choice).collect();
        choices.dedup();
        let mut allowed_in = Vec::new();
        for ci in &choices {
            let mine: Vec<(&ChatCall, &Decided)> = calls
                .iter()
                .zip(decisions)
                .filter(|(c, _)| c.choice == *ci)
                .collect();
            let allowed: Vec<Value> = mine
                .iter()
                .filter(|(_, d)| **d == Decided::Allow)
                .enumerate()
                .map(|(k, (c, _))| {
                    json!({"index": k, "id": c.id, "type": "function",
                        "function": {"name": c.name, "arguments": c.args}})
                })
                .collect();
            let texts = refusals(mine.iter().map(|(_, d)| *d));
            if !texts.is_empty() {
                let lead = if self.texted.contains(ci) { "\n\n" } else { "" };
                template["choices"] = json!([{"index": ci,
                    "delta": {"content": format!("{lead}{}", texts.join("\n"))},
                    "finish_reason": null}]);
                out.push_back(data_event(&template));
            }
            if !allowed.is_empty() {
                template["choices"] = json!([{"index": ci, "delta": {"tool_calls": allowed},
                    "finish_reason": null}]);
                out.push_back(data_event(&template));
                allowed_in.push(*ci);
            }
        }
        if let Some(cs) = finish.get_mut("choices").and_then(Value::as_array_mut) {
            for c in cs.iter_mut() {
                let ci = c["index"].as_u64().unwrap_or(0);
                if choices.contains(&ci)
                    && !allowed_in.contains(&ci)
                    && c["finish_reason"] == "tool_calls"
                {
                    c["finish_reason"] = json!("stop");
                }
            }
        }
        out.push_back(data_event(&finish));
    }
}

/// Messages: a `tool_use` content block, from its start to its stop.
#[derive(Default)]
struct MessagesState {
    open: Option<MessagesCall>,
    allowed: usize,
    refused: usize,
}

struct MessagesCall {
    index: u64,
    name: String,
    input: Value,
    json: String,
    raw: Vec<Bytes>,
}

impl MessagesCall {
    fn args(&self) -> Value {
        if self.json.trim().is_empty() {
            return self.input.clone();
        }
        parse_args(&self.json)
    }
}

impl MessagesState {
    fn on_event(&mut self, ev: SseEvent, out: &mut VecDeque<Bytes>) -> Option<Block> {
        if self.open.is_none() && !contains(&ev.raw, b"tool_use") {
            out.push_back(ev.raw);
            return None;
        }
        let Some(mut v) = event_json(&ev) else {
            out.push_back(ev.raw);
            return None;
        };
        let index = v["index"].as_u64();
        match v["type"].as_str().unwrap_or("") {
            "content_block_start"
                if v.pointer("/content_block/type") == Some(&json!("tool_use")) =>
            {
                self.open = Some(MessagesCall {
                    index: index.unwrap_or(0),
                    name: str_at(&v, "/content_block/name"),
                    input: v
                        .pointer("/content_block/input")
                        .cloned()
                        .unwrap_or_else(|| json!({})),
                    json: String::new(),
                    raw: vec![ev.raw],
                });
                None
            }
            "content_block_delta" if self.open.as_ref().is_some_and(|o| Some(o.index) == index) => {
                if let Some(o) = self.open.as_mut() {
                    if let Some(p) = v.pointer("/delta/partial_json").and_then(Value::as_str) {
                        o.json.push_str(p);
                    }
                    o.raw.push(ev.raw);
                }
                None
            }
            "content_block_stop" if self.open.as_ref().is_some_and(|o| Some(o.index) == index) => {
                let mut call = self.open.take()?;
                call.raw.push(ev.raw);
                Some(Block::Messages(call))
            }
            "message_delta"
                if self.refused > 0
                    && self.allowed == 0
                    && v.pointer("/delta/stop_reason") == Some(&json!("tool_use")) =>
            {
                v["delta"]["stop_reason"] = json!("end_turn");
                out.push_back(named_event(&v));
                None
            }
            _ => {
                out.push_back(ev.raw);
                None
            }
        }
    }

    fn emit(&mut self, call: MessagesCall, decisions: &[Decided], out: &mut VecDeque<Bytes>) {
        match decisions.first() {
            Some(Decided::Refuse(text)) => {
                self.refused += 1;
                let i = call.index;
                out.push_back(named_event(
                    &json!({"type": "content_block_start", "index": i,
                    "content_block": {"type": "text", "text": ""}}),
                ));
                out.push_back(named_event(
                    &json!({"type": "content_block_delta", "index": i,
                    "delta": {"type": "text_delta", "text": text}}),
                ));
                out.push_back(named_event(
                    &json!({"type": "content_block_stop", "index": i}),
                ));
            }
            _ => {
                self.allowed += 1;
                out.extend(call.raw);
            }
        }
    }
}

/// Responses: a `function_call` output item, from `output_item.added` to `output_item.done`.
/// Once a refusal has been sent in its place, every event is renumbered (`sequence_number`)
/// and the final response's `output` says what the agent was sent.
#[derive(Default)]
struct ResponsesState {
    open: Option<ResponsesCall>,
    /// The next sequence number, once the guard numbers events itself.
    next_seq: Option<u64>,
    /// Call item ids replaced, with the message item sent instead.
    replaced: Vec<(String, Value)>,
}

struct ResponsesCall {
    output_index: u64,
    item_id: String,
    name: String,
    args: String,
    events: Vec<Value>,
}

impl ResponsesCall {
    fn args(&self) -> Value {
        parse_args(&self.args)
    }
}

impl ResponsesState {
    fn send(&mut self, mut v: Value, out: &mut VecDeque<Bytes>) {
        if let Some(n) = self.next_seq.as_mut() {
            if v.get("sequence_number").is_some() {
                v["sequence_number"] = json!(*n);
                *n += 1;
            }
        }
        out.push_back(named_event(&v));
    }

    fn on_event(&mut self, ev: SseEvent, out: &mut VecDeque<Bytes>) -> Option<Block> {
        let watching = self.open.is_some() || self.next_seq.is_some() || !self.replaced.is_empty();
        if !watching && !contains(&ev.raw, b"function_call") {
            out.push_back(ev.raw);
            return None;
        }
        let Some(mut v) = event_json(&ev) else {
            out.push_back(ev.raw);
            return None;
        };
        if self.next_seq.is_none() {
            // From here on the guard numbers what it sends, starting where upstream was.
            self.next_seq = v["sequence_number"].as_u64();
        }
        let index = v["output_index"].as_u64();
        let open_here = self
            .open
            .as_ref()
            .is_some_and(|o| Some(o.output_index) == index);
        match v["type"].as_str().unwrap_or("") {
            "response.output_item.added"
                if v.pointer("/item/type") == Some(&json!("function_call")) =>
            {
                self.open = Some(ResponsesCall {
                    output_index: index.unwrap_or(0),
                    item_id: str_at(&v, "/item/id"),
                    name: str_at(&v, "/item/name"),
                    args: str_at(&v, "/item/arguments"),
                    events: vec![v],
                });
                None
            }
            "response.function_call_arguments.delta" if open_here => {
                if let Some(o) = self.open.as_mut() {
                    o.args.push_str(v["delta"].as_str().unwrap_or(""));
                    o.events.push(v);
                }
                None
            }
            "response.function_call_arguments.done" if open_here => {
                if let Some(o) = self.open.as_mut() {
                    if let Some(a) = v["arguments"].as_str() {
                        o.args = a.to_string();
                    }
                    o.events.push(v);
                }
                None
            }
            "response.output_item.done" if open_here => {
                let mut call = self.open.take()?;
                if let Some(a) = v.pointer("/item/arguments").and_then(Value::as_str) {
                    call.args = a.to_string();
                }
                call.events.push(v);
                Some(Block::Responses(call))
            }
            "response.completed" | "response.incomplete" | "response.failed" => {
                if let Some(output) = v
                    .pointer_mut("/response/output")
                    .and_then(Value::as_array_mut)
                {
                    for item in output.iter_mut() {
                        if let Some((_, m)) = self
                            .replaced
                            .iter()
                            .find(|(id, _)| item["id"].as_str() == Some(id))
                        {
                            *item = m.clone();
                        }
                    }
                }
                self.send(v, out);
                None
            }
            _ => {
                self.send(v, out);
                None
            }
        }
    }

    fn emit(&mut self, call: ResponsesCall, decisions: &[Decided], out: &mut VecDeque<Bytes>) {
        let Some(Decided::Refuse(text)) = decisions.first() else {
            for v in call.events {
                self.send(v, out);
            }
            return;
        };
        let (i, id) = (call.output_index, refusal_item_id(&call.item_id));
        let seq = || json!(0);
        let part = json!({"type": "output_text", "text": text, "annotations": []});
        let events = [
            json!({"type": "response.output_item.added", "sequence_number": seq(), "output_index": i,
                "item": message_item(&id, "", "in_progress")}),
            json!({"type": "response.content_part.added", "sequence_number": seq(), "item_id": id,
                "output_index": i, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}}),
            json!({"type": "response.output_text.delta", "sequence_number": seq(), "item_id": id,
                "output_index": i, "content_index": 0, "delta": text}),
            json!({"type": "response.output_text.done", "sequence_number": seq(), "item_id": id,
                "output_index": i, "content_index": 0, "text": text}),
            json!({"type": "response.content_part.done", "sequence_number": seq(), "item_id": id,
                "output_index": i, "content_index": 0, "part": part}),
            json!({"type": "response.output_item.done", "sequence_number": seq(), "output_index": i,
                "item": message_item(&id, text, "completed")}),
        ];
        for mut v in events {
            if self.next_seq.is_none() {
                // The provider numbers nothing: neither does the guard.
                if let Some(o) = v.as_object_mut() {
                    o.remove("sequence_number");
                }
            }
            self.send(v, out);
        }
        self.replaced
            .push((call.item_id, message_item(&id, text, "completed")));
    }
}
