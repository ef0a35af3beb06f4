//! Tool-output compression: what an agent's tools printed, made smaller before a model reads
//! it. Lossless transforms (nothing the model could need is lost, or it is said how much was
//! folded):
//!
//! - `ansi`: terminal escape sequences (colours, cursor moves, hyperlinks) removed;
//! - `json`: a JSON document written without its insignificant whitespace, keys in their order;
//! - `repeats`: a line repeated `min_repeats` times or more in a row kept once, with the count;
//! - `dedupe` (across a conversation, `dedupe`): a tool result identical to an earlier one
//!   replaced by a reference to it.
//!
//! And one lossy transform, only when configured: `truncate`, the head and the tail of a
//! result over `max_tokens` with a marker saying what was cut.
//!
//! Every transform is a pure function of its input, so the same conversation compresses to
//! the same bytes on every turn and provider prompt caches keep matching (ADR 0029).
//!
//! What a transform saved is counted on what it removed, not on the text before and after:
//! the tokenizer runs at ~6 MB/s, and counting 40 KiB of output twice per transform cost more
//! than the rest of the request. The removed escapes and cut middle are counted (a long
//! middle from samples), each distinct whitespace run once, a folded run as its line's tokens
//! times the lines folded, less the marker's. `examples/compress_rate` measures that against counting both texts.

use crate::estimate;

/// Counting a long text for truncation encodes this much of it (sampled windows).
const SAMPLED_BYTES: usize = 8 * 1024;

/// Which transforms run, from `[compression]`.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub ansi: bool,
    pub json: bool,
    /// Runs of at least this many identical lines are folded (0: never).
    pub min_repeats: usize,
    /// Results over this many tokens keep their head and tail only (0: never).
    pub max_tokens: u64,
}

/// What one transform saved on one text, in tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Step {
    pub transform: &'static str,
    pub saved: u64,
}

/// Runs the plan's transforms over `text` in order; the new text (`None`: unchanged) and a
/// step for each transform that saved tokens (one that saved none is undone).
pub fn compress(text: &str, plan: &Plan) -> (Option<String>, Vec<Step>) {
    let mut steps = Vec::new();
    let mut current: Option<String> = None;
    type Transform = fn(&str, &Plan) -> Option<(String, u64)>;
    let transforms: [(&'static str, bool, Transform); 4] = [
        ("ansi", plan.ansi, |t, _| strip_ansi(t)),
        ("json", plan.json, |t, _| minify_json(t)),
        ("repeats", plan.min_repeats > 1, |t, p| {
            collapse_repeats(t, p.min_repeats)
        }),
        ("truncate", plan.max_tokens > 0, |t, p| {
            truncate(t, p.max_tokens)
        }),
    ];
    for (name, on, f) in transforms {
        if !on {
            continue;
        }
        let input = current.as_deref().unwrap_or(text);
        // A fold of a few short lines can cost more tokens than it saves: then it is undone.
        let Some((out, saved)) = f(input, plan).filter(|(_, saved)| *saved > 0) else {
            continue;
        };
        steps.push(Step {
            transform: name,
            saved,
        });
        current = Some(out);
    }
    (current, steps)
}

/// `text` without ANSI/VT escape sequences: CSI (`ESC [ … final`), OSC (`ESC ] … BEL` or
/// `ESC \`), nF (`ESC ( B`) and two-byte escapes, and the tokens they took. `None` when
/// there are none.
pub fn strip_ansi(text: &str) -> Option<(String, u64)> {
    if !text.contains('\u{1b}') {
        return None;
    }
    let b = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut gone = String::new();
    let (mut i, mut kept) = (0, 0);
    while i < b.len() {
        if b[i] != 0x1b {
            i += 1;
            continue;
        }
        out.push_str(&text[kept..i]);
        let end = match b.get(i + 1) {
            Some(b'[') => {
                // Parameters and intermediates, then one final byte in 0x40..=0x7e.
                let mut j = i + 2;
                while j < b.len() && (0x20..=0x3f).contains(&b[j]) {
                    j += 1;
                }
                if j < b.len() && (0x40..=0x7e).contains(&b[j]) {
                    j + 1
                } else {
                    j
                }
            }
            Some(b']') => {
                let mut j = i + 2;
                loop {
                    match b.get(j) {
                        None => break j,
                        Some(0x07) => break j + 1,
                        Some(0x1b) if b.get(j + 1) == Some(&b'\\') => break j + 2,
                        Some(_) => j += 1,
                    }
                }
            }
            // nF (`ESC ( B`: intermediates, then a final byte).
            Some(0x20..=0x2f) => {
                let mut j = i + 1;
                while j < b.len() && (0x20..=0x2f).contains(&b[j]) {
                    j += 1;
                }
                if j < b.len() && (0x30..=0x7e).contains(&b[j]) {
                    j + 1
                } else {
                    j
                }
            }
            // A two-byte escape; an ASCII second byte keeps `end` on a char boundary.
            Some(c) if c.is_ascii() => i + 2,
            _ => i + 1,
        };
        gone.push_str(&text[i..end]);
        i = end;
        kept = end;
    }
    out.push_str(&text[kept..]);
    Some((out, estimate::tokens(&gone)))
}

/// A JSON document (object or array) without insignificant whitespace, everything else
/// byte for byte (key order, number spelling, string escapes), and the tokens of the
/// whitespace it removed. `None` when `text` is not one or is already minimal.
pub fn minify_json(text: &str) -> Option<(String, u64)> {
    let t = text.trim();
    if !(t.starts_with('{') || t.starts_with('[')) {
        return None;
    }
    serde_json::from_str::<serde::de::IgnoredAny>(t).ok()?;
    let mut out = String::with_capacity(t.len());
    let (mut in_string, mut escaped) = (false, false);
    // Each distinct run of whitespace (an indentation level, mostly) is counted once.
    let mut counts: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
    let mut saved = u64::from(t.len() < text.len());
    let mut run_start: Option<usize> = None;
    for (i, c) in t.char_indices() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if matches!(c, ' ' | '\n' | '\r' | '\t') {
            run_start.get_or_insert(i);
        } else {
            if let Some(start) = run_start.take() {
                let run = &t[start..i];
                saved += *counts.entry(run).or_insert_with(|| estimate::tokens(run));
            }
            in_string = c == '"';
            out.push(c);
        }
    }
    (out.len() < text.len()).then_some((out, saved))
}

/// Runs of `min` or more identical consecutive lines kept once, followed by a line saying how
/// many more there were, and the tokens that saved. `None` when there is no such run.
pub fn collapse_repeats(text: &str, min: usize) -> Option<(String, u64)> {
    let min = min.max(2);
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let (mut saved, mut added) = (0u64, 0u64);
    let mut lines = text.split_inclusive('\n').peekable();
    while let Some(line) = lines.next() {
        let body = line.strip_suffix('\n').unwrap_or(line);
        let mut n = 1;
        let mut last = line;
        while let Some(next) = lines.peek() {
            if next.strip_suffix('\n').unwrap_or(next) != body {
                break;
            }
            last = next;
            n += 1;
            lines.next();
        }
        if n >= min {
            changed = true;
            out.push_str(body);
            out.push('\n');
            let marker = format!("[previous line repeated {} more times]", n - 1);
            saved = saved.saturating_add(estimate::tokens(line) * (n as u64 - 1));
            added += estimate::tokens(&marker) + 1;
            out.push_str(&marker);
            if last.ends_with('\n') {
                out.push('\n');
            }
        } else {
            for _ in 0..n {
                out.push_str(line);
            }
        }
    }
    changed.then(|| (out, saved.saturating_sub(added)))
}

/// The head (about 60 %) and tail (40 %) of a text over `max_tokens`, cut at line ends where
/// there are any, with a marker saying how much of the middle is gone, and the tokens that
/// saved. Lossy.
pub fn truncate(text: &str, max_tokens: u64) -> Option<(String, u64)> {
    // A token is at least a byte: no count needed for a text that short.
    if text.len() as u64 <= max_tokens {
        return None;
    }
    let tokens = estimate::tokens_sampled(text, SAMPLED_BYTES);
    if tokens <= max_tokens {
        return None;
    }
    let keep_bytes = (text.len() as u128 * u128::from(max_tokens) / u128::from(tokens)) as usize;
    let head = floor_line(text, keep_bytes * 3 / 5);
    let tail = ceil_line(text, text.len() - (keep_bytes - keep_bytes * 3 / 5)).max(head);
    let cut = &text[head..tail];
    let cut_tokens = estimate::tokens_sampled(cut, SAMPLED_BYTES);
    let marker = format!(
        "\n[… tollgate cut {} lines (about {cut_tokens} tokens) from the middle of this output …]\n",
        cut.lines().count(),
    );
    let saved = cut_tokens.saturating_sub(estimate::tokens(&marker));
    Some((format!("{}{marker}{}", &text[..head], &text[tail..]), saved))
}

/// The end of the last whole line before `at` (or `at` on a char boundary if none).
fn floor_line(text: &str, at: usize) -> usize {
    let at = floor_char(text, at.min(text.len()));
    match text[..at].rfind('\n') {
        Some(i) if i > at / 2 => i + 1,
        _ => at,
    }
}

/// The start of the first whole line at or after `at`.
fn ceil_line(text: &str, at: usize) -> usize {
    let at = floor_char(text, at.min(text.len()));
    match text[at..].find('\n') {
        Some(i) if i < (text.len() - at) / 2 => at + i + 1,
        _ => at,
    }
}

fn floor_char(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_sequences_go_and_the_text_stays() {
        let colored = "\u{1b}[1m\u{1b}[32mtest result: ok.\u{1b}[0m 3 passed\u{1b}[K\n\
                       \u{1b}]8;;https://x.y\u{7}link\u{1b}]8;;\u{1b}\\ é \u{1b}(B";
        let (out, saved) = strip_ansi(colored).unwrap();
        assert_eq!(out, "test result: ok. 3 passed\nlink é ");
        assert!(saved >= 8, "{saved}");
        assert_eq!(strip_ansi("plain"), None);
        // Cut short, or before a multibyte character: never a panic, never a split char.
        let text = |s: &str| strip_ansi(s).map(|(t, _)| t);
        assert_eq!(text("a\u{1b}[31").as_deref(), Some("a"));
        assert_eq!(text("a\u{1b}é").as_deref(), Some("aé"));
        assert_eq!(text("\u{1b}").as_deref(), Some(""));
    }

    #[test]
    fn json_loses_only_whitespace() {
        let pretty =
            "{\n  \"b\": [1, 2.50, 1e3],\n  \"a\": \"x \\\" y\\\\\",\n  \"c\": \"  \"\n}\n";
        let (min, runs) = minify_json(pretty).unwrap();
        assert_eq!(min, r#"{"b":[1,2.50,1e3],"a":"x \" y\\","c":"  "}"#);
        let exact = estimate::tokens(pretty) - estimate::tokens(&min);
        assert!(
            runs.abs_diff(exact) * 3 <= exact,
            "{runs} counted, {exact} exact"
        );
        let a: serde_json::Value = serde_json::from_str(pretty).unwrap();
        let b: serde_json::Value = serde_json::from_str(&min).unwrap();
        assert_eq!(a, b);
        assert_eq!(minify_json(&min), None, "already minimal");
        assert_eq!(minify_json("{not json"), None);
        assert_eq!(minify_json("plain text"), None);
    }

    #[test]
    fn repeated_lines_fold_with_their_count() {
        let log = "start\nDownloading...\nDownloading...\nDownloading...\nDownloading...\ndone\n";
        let text = |s: &str| collapse_repeats(s, 3).map(|(t, _)| t);
        assert_eq!(
            text(log).as_deref(),
            Some("start\nDownloading...\n[previous line repeated 3 more times]\ndone\n")
        );
        assert_eq!(text("a\na\nb\n"), None, "a run under min");
        assert_eq!(
            text("x\nx\nx").as_deref(),
            Some("x\n[previous line repeated 2 more times]"),
            "no newline at the end stays so"
        );
    }

    #[test]
    fn truncation_keeps_head_and_tail_and_says_so() {
        let text: String = (0..2000)
            .map(|i| format!("line {i} of the log\n"))
            .collect();
        let (out, saved) = truncate(&text, 500).unwrap();
        let exact = estimate::tokens(&text) - estimate::tokens(&out);
        assert!(saved.abs_diff(exact) * 50 < exact, "{saved} vs {exact}");
        assert!(out.starts_with("line 0 of the log\n"));
        assert!(out.ends_with("line 1999 of the log\n"));
        assert!(out.contains("tollgate cut"));
        let t = estimate::tokens(&out);
        assert!(t < 600, "{t} tokens");
        assert_eq!(truncate("short", 500), None);
    }

    #[test]
    fn steps_count_only_what_changed() {
        let plan = Plan {
            ansi: true,
            json: true,
            min_repeats: 3,
            max_tokens: 0,
        };
        let line = "npm WARN deprecated inflight@1.0.6: This module is not supported\n";
        let input = format!("\u{1b}[31mred\u{1b}[0m\n{}", line.repeat(5));
        let (out, steps) = compress(&input, &plan);
        assert_eq!(
            out,
            Some(format!(
                "red\n{line}[previous line repeated 4 more times]\n"
            ))
        );
        let names: Vec<_> = steps.iter().map(|s| s.transform).collect();
        assert_eq!(names, ["ansi", "repeats"]);
        // Counted on what was removed, close to counting the texts before and after.
        let exact = estimate::tokens(&input) - estimate::tokens(out.as_deref().unwrap());
        let counted: u64 = steps.iter().map(|s| s.saved).sum();
        assert!(counted.abs_diff(exact) <= 2, "{counted} vs {exact}");
        assert_eq!(compress("nothing to do", &plan), (None, vec![]));
        // Three short lines folded would cost more than they save: left as they are.
        assert_eq!(compress("ok\nok\nok\n", &plan), (None, vec![]));
    }
}
