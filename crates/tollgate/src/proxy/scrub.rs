//! The redact phase (`[redaction]`, `redact.rs`): personal data and secrets in what the agent
//! sends are masked, hashed, refused or logged before anything else reads the request, and,
//! with `responses = true`, in what the model answers before the agent sees it.

use super::*;
use crate::redact::{described, Scrubber};
use serde_json::Value;

/// The fields of a model request that carry text someone wrote: the conversation (with its
/// tool calls' arguments and tool results), the system prompt, instructions.
const TEXT_FIELDS: [&str; 5] = ["messages", "system", "input", "instructions", "prompt"];

/// The (detector, action) pairs of `key`'s traffic; empty when the redaction does not name
/// it (with neither `keys` nor `teams` it names every key).
pub(crate) fn redaction_for(
    cfg: &crate::config::RedactionConfig,
    key: &KeyRecord,
) -> Vec<(crate::redact::Detector, crate::redact::Action)> {
    if cfg.detectors.is_empty() || !covers(&cfg.keys, &cfg.teams, key) {
        return Vec::new();
    }
    cfg.detectors.iter().map(|(d, a)| (*d, *a)).collect()
}

/// What `scrub` found since the last take, counted on `rec` (and the metrics) under `place`.
pub(crate) fn record_found(
    app: &AppState,
    rec: &mut UsageRecord,
    scrub: &mut Scrubber,
    place: &str,
) {
    let found = scrub.take(place);
    if !found.is_empty() {
        app.metrics.count_redactions(&found);
        rec.redactions.extend(found);
    }
}

/// The refusal of something a `reject` detector found: what it was, never the value.
pub(crate) fn sensitive(d: crate::redact::Detector, what: &str, to: &str) -> ApiError {
    ApiError::new(
        ErrorKind::SensitiveData,
        format!(
            "{what} contains {}, which this gateway does not send to {to} (redaction detector '{}'); remove it and send it again",
            described(d),
            d.as_str()
        ),
    )
}

/// Redacts `v` in place with `actions`, counted on `rec` under `place`: whether it changed,
/// and the detector a `reject` fired for.
pub(crate) fn redact_value(
    app: &AppState,
    actions: Vec<(crate::redact::Detector, crate::redact::Action)>,
    rec: &mut UsageRecord,
    v: &mut Value,
    place: &str,
) -> (bool, Option<crate::redact::Detector>) {
    let Some(mut scrub) = Scrubber::new(actions, hash_key(app)) else {
        return (false, None);
    };
    let changed = scrub.value(v);
    record_found(app, rec, &mut scrub, place);
    (changed, scrub.rejected())
}

/// The key of `hash` redactions, derived from the server secret.
pub(crate) fn hash_key(app: &AppState) -> [u8; 32] {
    app.secret.digest("redaction-hash-key")
}

/// Redacts the request in place. A `reject` finding refuses it, naming what was found (never
/// the value); the record keeps the counts, and the request body is then not logged.
pub(crate) fn redact_request(cx: &mut Ctx<'_>, doc: &mut RequestDoc<'_>) -> Result<(), ApiError> {
    let actions = redaction_for(&cx.runtime.redaction, cx.key);
    let Some(mut scrub) = Scrubber::new(actions, hash_key(cx.app)) else {
        return Ok(());
    };
    let mut changed = false;
    for field in TEXT_FIELDS {
        let Some(raw) = doc.raw(field) else { continue };
        let mut v: Value = serde_json::from_str(raw.get()).map_err(|e| {
            ApiError::new(
                ErrorKind::BadRequest,
                format!("'{field}' is not valid JSON: {e}"),
            )
        })?;
        if scrub.value(&mut v) {
            doc.set_raw(field, v.to_string())
                .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
            changed = true;
        }
    }
    if scrub.tally.is_empty() {
        return Ok(());
    }
    let logging = (cx.runtime.logging.bodies, cx.runtime.logging.max_body_bytes);
    let rec = cx.settle.rec_mut();
    record_found(cx.app, rec, &mut scrub, "request");
    if let Some(d) = scrub.rejected() {
        // What was refused is not kept anywhere either.
        rec.bodies = None;
        return Err(sensitive(d, "the request", "a model provider"));
    }
    if changed && logging.0 {
        rec.bodies = Some(Box::new(crate::records::Bodies::new(
            &doc.to_vec(),
            logging.1,
        )));
    }
    Ok(())
}

/// Redacts a tool route's request body: JSON scanned string by string, other UTF-8 text as a
/// whole, anything else (binary) left alone. The new body when anything was masked; a
/// `reject` finding refuses the call.
pub(crate) fn redact_body(
    app: &AppState,
    runtime: &Runtime,
    key: &KeyRecord,
    rec: &mut UsageRecord,
    body: &Bytes,
) -> Result<Option<Bytes>, ApiError> {
    let Some(mut scrub) = Scrubber::new(redaction_for(&runtime.redaction, key), hash_key(app))
    else {
        return Ok(None);
    };
    let changed = match serde_json::from_slice::<Value>(body) {
        Ok(mut v) => scrub.value(&mut v).then(|| Bytes::from(v.to_string())),
        Err(_) => match std::str::from_utf8(body) {
            Ok(text) => scrub.text(text).map(Bytes::from),
            Err(_) => None,
        },
    };
    record_found(app, rec, &mut scrub, "tool_arguments");
    if let Some(d) = scrub.rejected() {
        rec.bodies = None;
        return Err(sensitive(d, "the call", "a tool"));
    }
    Ok(changed)
}

/// Redacts a JSON answer (the client's dialect) when the key's redaction covers answers: the
/// rewritten body, or `None` when nothing changed. In an answer `reject` masks: the text was
/// generated and billed, and masking is how it is kept from the agent.
pub(crate) fn redact_answer(
    app: &AppState,
    runtime: &Runtime,
    key: &KeyRecord,
    rec: &mut UsageRecord,
    body: &[u8],
) -> Option<Vec<u8>> {
    if !runtime.redaction.responses {
        return None;
    }
    let actions = answer_actions(runtime, key);
    if actions.is_empty() {
        return None;
    }
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let (changed, _) = redact_value(app, actions, rec, &mut v, "answer");
    if !changed {
        return None;
    }
    serde_json::to_vec(&v).ok()
}

/// The key's actions for answers: `reject` becomes `mask` (see `redact_answer`).
pub(crate) fn answer_actions(
    runtime: &Runtime,
    key: &KeyRecord,
) -> Vec<(crate::redact::Detector, crate::redact::Action)> {
    use crate::redact::Action;
    redaction_for(&runtime.redaction, key)
        .into_iter()
        .map(|(d, a)| (d, if a == Action::Reject { Action::Mask } else { a }))
        .collect()
}

/// Redacts a stream's text as it passes, in the client's dialect: the last `WINDOW` bytes of
/// each text block are held back (longer while a finding runs to the end of what arrived), so
/// a value split across events is found whole; the rest goes out masked. Text already sent
/// is final: a finding can only be caught within the window. A tool call's streamed arguments
/// are held and masked the same way, per call.
pub(crate) struct StreamScrub {
    scrub: Scrubber,
    splitter: tollgate_proto::SseSplitter,
    scratch: Vec<tollgate_proto::SseEvent>,
    client: Endpoint,
    /// Text held back, by block: `c<choice>` (Chat), `m<index>` (Messages), `<item>/<part>`
    /// (Responses).
    held: Vec<(String, String)>,
    /// Responses: events this stage added so far, by which later sequence numbers move.
    shift: u64,
    pub(crate) out: VecDeque<Bytes>,
}

impl StreamScrub {
    pub(crate) fn new(
        app: &AppState,
        runtime: &Runtime,
        key: &KeyRecord,
        client: Endpoint,
    ) -> Option<StreamScrub> {
        if !runtime.redaction.responses
            || !matches!(
                client,
                Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses
            )
        {
            return None;
        }
        Some(StreamScrub {
            scrub: Scrubber::new(answer_actions(runtime, key), hash_key(app))?,
            splitter: tollgate_proto::SseSplitter::new(),
            scratch: Vec::new(),
            client,
            held: Vec::new(),
            shift: 0,
            out: VecDeque::new(),
        })
    }

    /// Counts what was found so far on the stream's record.
    pub(crate) fn record(&mut self, app: &AppState, rec: &mut UsageRecord) {
        record_found(app, rec, &mut self.scrub, "answer");
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.splitter.push(bytes, &mut self.scratch);
        let mut events = std::mem::take(&mut self.scratch);
        for ev in events.drain(..) {
            self.on_event(ev);
        }
        self.scratch = events;
    }

    /// Adds `text` to a block's held text; what may go out now, masked.
    fn release(&mut self, block: &str, text: &str) -> String {
        let pos = match self.held.iter().position(|(b, _)| b == block) {
            Some(p) => p,
            None => {
                self.held.push((block.to_string(), String::new()));
                self.held.len() - 1
            }
        };
        self.held[pos].1.push_str(text);
        let all = &self.held[pos].1;
        let mut cut = all.len().saturating_sub(crate::redact::WINDOW);
        while !all.is_char_boundary(cut) {
            cut -= 1;
        }
        for f in self.scrub.findings(all) {
            if f.start < cut && f.end > cut {
                cut = f.start;
            }
        }
        if cut == 0 {
            return String::new();
        }
        let rest = self.held[pos].1.split_off(cut);
        let sent = std::mem::replace(&mut self.held[pos].1, rest);
        self.scrub.text(&sent).unwrap_or(sent)
    }

    /// The rest of a block's held text, masked, once the block is complete.
    fn flush(&mut self, block: &str) -> String {
        let Some(pos) = self.held.iter().position(|(b, _)| b == block) else {
            return String::new();
        };
        let (_, text) = self.held.swap_remove(pos);
        self.scrub.text(&text).unwrap_or(text)
    }

    fn on_event(&mut self, ev: tollgate_proto::SseEvent) {
        let Some(mut v) = ev
            .data()
            .and_then(|d| serde_json::from_str::<Value>(&d).ok())
        else {
            // `[DONE]`, comments: no text in them.
            self.out.push_back(ev.raw);
            return;
        };
        match self.client {
            Endpoint::ChatCompletions => self.chat(v),
            Endpoint::Messages => self.messages(v),
            _ => {
                self.responses(&mut v);
            }
        }
    }

    fn chat(&mut self, mut v: Value) {
        let mut flushed = Vec::new();
        if let Some(choices) = v.get_mut("choices").and_then(Value::as_array_mut) {
            for c in choices.iter_mut() {
                let block = format!("c{}", c["index"].as_u64().unwrap_or(0));
                if let Some(text) = c.pointer("/delta/content").and_then(Value::as_str) {
                    let text = text.to_string();
                    c["delta"]["content"] = Value::String(self.release(&block, &text));
                }
                // A call's arguments are held and masked like text, per call.
                let calls = c
                    .pointer_mut("/delta/tool_calls")
                    .and_then(Value::as_array_mut)
                    .map(std::mem::take);
                if let Some(mut calls) = calls {
                    for tc in calls.iter_mut() {
                        let key = format!("{block}/{}", tc["index"].as_u64().unwrap_or(0));
                        if let Some(a) = tc.pointer("/function/arguments").and_then(Value::as_str) {
                            let a = a.to_string();
                            tc["function"]["arguments"] = Value::String(self.release(&key, &a));
                        }
                    }
                    c["delta"]["tool_calls"] = Value::Array(calls);
                }
                if c["finish_reason"].is_string() {
                    let delta = self.flush_choice(&block);
                    if !delta.is_empty() {
                        flushed.push((c["index"].clone(), Value::Object(delta)));
                    }
                }
            }
        }
        let mut template = v.clone();
        if let Some(t) = template.as_object_mut() {
            t.remove("usage");
        }
        for (index, delta) in flushed {
            template["choices"] =
                serde_json::json!([{"index": index, "delta": delta, "finish_reason": null}]);
            self.out.push_back(data_event(&template));
        }
        self.out.push_back(data_event(&v));
    }

    /// A Chat choice's held text and call arguments, as the delta that sends them.
    fn flush_choice(&mut self, block: &str) -> serde_json::Map<String, Value> {
        let mut delta = serde_json::Map::new();
        let rest = self.flush(block);
        if !rest.is_empty() {
            delta.insert("content".into(), Value::String(rest));
        }
        let prefix = format!("{block}/");
        let mut keys: Vec<(u64, String)> = self
            .held
            .iter()
            .filter_map(|(b, _)| Some((b.strip_prefix(&prefix)?.parse().ok()?, b.clone())))
            .collect();
        keys.sort();
        let mut pieces = Vec::new();
        for (index, key) in keys {
            let rest = self.flush(&key);
            if !rest.is_empty() {
                pieces.push(serde_json::json!({"index": index, "function": {"arguments": rest}}));
            }
        }
        if !pieces.is_empty() {
            delta.insert("tool_calls".into(), Value::Array(pieces));
        }
        delta
    }

    fn messages(&mut self, mut v: Value) {
        let block = format!("m{}", v["index"].as_u64().unwrap_or(0));
        match v["type"].as_str().unwrap_or("") {
            "content_block_delta"
                if v.pointer("/delta/type") == Some(&Value::from("text_delta")) =>
            {
                let text = v["delta"]["text"].as_str().unwrap_or("").to_string();
                v["delta"]["text"] = Value::String(self.release(&block, &text));
            }
            "content_block_delta"
                if v.pointer("/delta/type") == Some(&Value::from("input_json_delta")) =>
            {
                let json = v["delta"]["partial_json"]
                    .as_str()
                    .unwrap_or("")
                    .to_string();
                let key = format!("{block}/json");
                v["delta"]["partial_json"] = Value::String(self.release(&key, &json));
            }
            "content_block_stop" => {
                let rest = self.flush(&block);
                if !rest.is_empty() {
                    let delta = serde_json::json!({"type": "content_block_delta", "index": v["index"],
                        "delta": {"type": "text_delta", "text": rest}});
                    self.out.push_back(named_event(&delta));
                }
                let rest = self.flush(&format!("{block}/json"));
                if !rest.is_empty() {
                    let delta = serde_json::json!({"type": "content_block_delta", "index": v["index"],
                        "delta": {"type": "input_json_delta", "partial_json": rest}});
                    self.out.push_back(named_event(&delta));
                }
            }
            _ => {}
        }
        self.out.push_back(named_event(&v));
    }

    fn responses(&mut self, v: &mut Value) {
        let block = format!(
            "{}/{}",
            v["item_id"].as_str().unwrap_or(""),
            v["content_index"].as_u64().unwrap_or(0)
        );
        match v["type"].as_str().unwrap_or("") {
            "response.output_text.delta" | "response.function_call_arguments.delta" => {
                let text = v["delta"].as_str().unwrap_or("").to_string();
                v["delta"] = Value::String(self.release(&block, &text));
            }
            "response.output_text.done" | "response.function_call_arguments.done" => {
                let rest = self.flush(&block);
                if !rest.is_empty() {
                    let mut delta = v.clone();
                    let kind = v["type"].as_str().unwrap_or("").replace(".done", ".delta");
                    delta["type"] = Value::from(kind);
                    if let Some(d) = delta.as_object_mut() {
                        d.remove("text");
                        d.remove("arguments");
                    }
                    delta["delta"] = Value::String(rest);
                    self.send_numbered(delta);
                    self.shift += 1;
                }
                self.scrub.value_again(v);
            }
            // The closing events repeat the whole text, and every response event the
            // request's own fields: masked the same, counted once.
            "response.created"
            | "response.in_progress"
            | "response.content_part.done"
            | "response.output_item.done"
            | "response.completed"
            | "response.incomplete" => {
                self.scrub.value_again(v);
            }
            _ => {}
        }
        self.send_numbered(v.clone());
    }

    fn send_numbered(&mut self, mut v: Value) {
        if self.shift > 0 {
            if let Some(n) = v["sequence_number"].as_u64() {
                v["sequence_number"] = Value::from(n + self.shift);
            }
        }
        self.out.push_back(named_event(&v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redact::{Action, Detector};

    fn chat_stream() -> StreamScrub {
        StreamScrub {
            scrub: Scrubber::new(
                Detector::ALL.iter().map(|d| (*d, Action::Mask)).collect(),
                [1; 32],
            )
            .unwrap(),
            splitter: tollgate_proto::SseSplitter::new(),
            scratch: Vec::new(),
            client: Endpoint::ChatCompletions,
            held: Vec::new(),
            shift: 0,
            out: VecDeque::new(),
        }
    }

    /// However a text is cut into events, the agent gets what masking it whole gives.
    #[test]
    fn a_stream_cut_anywhere_is_masked_as_the_whole_text_is() {
        let text = "Mail jane.doe@example.com now. ".repeat(3)
            + &"x".repeat(400)
            + " card 4111 1111 1111 1111, key AKIAIOSFODNN7EXAMPLE, end";
        let mut whole = Scrubber::new(
            Detector::ALL.iter().map(|d| (*d, Action::Mask)).collect(),
            [1; 32],
        )
        .unwrap();
        let want = whole.text(&text).unwrap();
        for step in [1, 2, 3, 5, 7, 13, 64, 500] {
            let mut s = chat_stream();
            let chars: Vec<char> = text.chars().collect();
            for piece in chars.chunks(step) {
                let piece: String = piece.iter().collect();
                let ev = serde_json::json!({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
                s.push(format!("data: {ev}\n\n").as_bytes());
            }
            let end = serde_json::json!({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]});
            s.push(format!("data: {end}\n\ndata: [DONE]\n\n").as_bytes());
            let got: String = s
                .out
                .iter()
                .filter_map(|b| {
                    let t = std::str::from_utf8(b)
                        .ok()?
                        .strip_prefix("data: ")?
                        .trim()
                        .to_string();
                    let v: Value = serde_json::from_str(&t).ok()?;
                    v["choices"][0]["delta"]["content"]
                        .as_str()
                        .map(str::to_string)
                })
                .collect();
            assert_eq!(got, want, "cut every {step} characters");
        }
    }
}
