//! The compress phase: the tool results in a request's conversation made smaller
//! (`compress.rs`) before the provider reads them, for keys `[compression]` covers. What each
//! transform saved goes on the record as a `compress.<transform>` saving, priced at the
//! served model's input price when the usage is known (`apply_usage`).
//!
//! Every tool result of the conversation is compressed, not only the newest: the transforms
//! are deterministic, so a result compresses to the same bytes on every later turn and the
//! provider's prompt cache still matches the prefix (compressing only the newest turn would
//! send it raw again on the next, and break the prefix there on every turn; ADR 0029).

use super::*;
use serde_json::Value;

fn applies(cfg: &crate::config::CompressionConfig, key: &KeyRecord) -> bool {
    cfg.enabled && covers(&cfg.keys, &cfg.teams, key)
}

/// One tool result's text in the conversation, and the call it answers.
struct Slot<'a> {
    text: &'a mut String,
    call: Option<String>,
}

/// The tool results of a conversation in order: Chat `tool` messages, Messages `tool_result`
/// blocks, Responses `function_call_output` items; text content, string or text parts.
fn tool_results(endpoint: Endpoint, conversation: &mut Value) -> Vec<Slot<'_>> {
    let mut out = Vec::new();
    let Some(items) = conversation.as_array_mut() else {
        return out;
    };
    fn texts<'a>(content: &'a mut Value, call: Option<String>, out: &mut Vec<Slot<'a>>) {
        match content {
            Value::String(text) => out.push(Slot { text, call }),
            Value::Array(parts) => {
                for p in parts {
                    let is_text = matches!(
                        p.get("type").and_then(Value::as_str),
                        Some("text" | "input_text" | "output_text")
                    );
                    if let (true, Some(Value::String(text))) = (is_text, p.get_mut("text")) {
                        out.push(Slot {
                            text,
                            call: call.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    let id = |v: &Value, f: &str| v.get(f).and_then(Value::as_str).map(str::to_string);
    for item in items {
        // Chat and Responses: the item is the result; Messages: blocks of a user message.
        let (marker, call_field, content_field) = match endpoint {
            Endpoint::ChatCompletions => (("role", "tool"), "tool_call_id", "content"),
            Endpoint::Responses => (("type", "function_call_output"), "call_id", "output"),
            Endpoint::Messages => {
                let Some(blocks) = item.get_mut("content").and_then(Value::as_array_mut) else {
                    continue;
                };
                for b in blocks {
                    if b.get("type").and_then(Value::as_str) == Some("tool_result") {
                        let call = id(b, "tool_use_id");
                        if let Some(c) = b.get_mut("content") {
                            texts(c, call, &mut out);
                        }
                    }
                }
                continue;
            }
            _ => continue,
        };
        if item.get(marker.0).and_then(Value::as_str) != Some(marker.1) {
            continue;
        }
        let call = id(item, call_field);
        if let Some(c) = item.get_mut(content_field) {
            texts(c, call, &mut out);
        }
    }
    out
}

/// Compresses every tool result in `conversation`; the tokens saved by transform, empty when
/// nothing changed.
pub(crate) fn compress_conversation(
    cfg: &crate::config::CompressionConfig,
    endpoint: Endpoint,
    conversation: &mut Value,
) -> Vec<crate::records::Saving> {
    let plan = crate::compress::Plan {
        ansi: cfg.ansi,
        json: cfg.json,
        min_repeats: cfg.min_repeats,
        max_tokens: cfg.max_tool_tokens,
    };
    let mut by: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut seen: std::collections::HashMap<[u8; 32], Option<String>> =
        std::collections::HashMap::new();
    for (n, slot) in tool_results(endpoint, conversation).into_iter().enumerate() {
        if cfg.dedupe && slot.text.len() >= cfg.dedupe_min_bytes.max(1) {
            use sha2::Digest;
            let digest: [u8; 32] = sha2::Sha256::digest(slot.text.as_bytes()).into();
            match seen.get(&digest) {
                Some(first) => {
                    let reference = match first {
                        Some(call) => format!(
                            "[tollgate: this output is identical to the earlier tool result of call {call}]"
                        ),
                        None => "[tollgate: this output is identical to an earlier tool result in this conversation]".to_string(),
                    };
                    let saved =
                        estimate::tokens(slot.text).saturating_sub(estimate::tokens(&reference));
                    if saved > 0 {
                        *by.entry("dedupe").or_default() += saved;
                        *slot.text = reference;
                        continue;
                    }
                }
                None => {
                    seen.insert(digest, slot.call.clone().or(Some(format!("#{}", n + 1))));
                }
            }
        }
        let (out, steps) = crate::compress::compress(slot.text, &plan);
        for s in steps {
            *by.entry(s.transform).or_default() += s.saved;
        }
        if let Some(out) = out {
            *slot.text = out;
        }
    }
    by.into_iter()
        .map(|(t, tokens)| crate::records::Saving {
            saver: format!("compress.{t}"),
            tokens,
            micros: 0,
        })
        .collect()
}

/// The compress phase.
pub(crate) fn compress_request(cx: &mut Ctx<'_>, doc: &mut RequestDoc<'_>) -> Result<(), ApiError> {
    let cfg = &cx.runtime.compression;
    let field = match cx.endpoint {
        Endpoint::ChatCompletions | Endpoint::Messages => "messages",
        Endpoint::Responses => "input",
        _ => return Ok(()),
    };
    if !applies(cfg, cx.key) {
        return Ok(());
    }
    let Some(raw) = doc.raw(field) else {
        return Ok(());
    };
    // Not a conversation this phase can read: left for the provider to refuse.
    let Ok(mut conversation) = serde_json::from_str::<Value>(raw.get()) else {
        return Ok(());
    };
    let savings = compress_conversation(cfg, cx.endpoint, &mut conversation);
    if savings.is_empty() {
        return Ok(());
    }
    doc.set_raw(field, conversation.to_string())
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?;
    cx.settle.rec_mut().savings.extend(savings);
    Ok(())
}
