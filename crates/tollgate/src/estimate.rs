//! Local token estimates, used only when a provider reports no usage. Records built from
//! them say `usage_source = "estimated"`.

mod bpe;

use bpe::Bpe;
use std::sync::OnceLock;

fn bpe() -> Option<&'static Bpe> {
    static BPE: OnceLock<Option<Bpe>> = OnceLock::new();
    BPE.get_or_init(|| match Bpe::load() {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(error = %e, "the token estimator did not load; counting by bytes");
            None
        }
    })
    .as_ref()
}

/// Loads the encoder ahead of traffic. Indexing the vocabulary takes some milliseconds
/// (release) to a few hundred (debug), and the first caller waits for it on whichever thread it runs: lazily,
/// that is the first client disconnect or usage-less answer, stalling every request sharing
/// the runtime's threads meanwhile.
pub fn warm_up() {
    let _ = bpe();
}

/// Texts up to this many bytes are encoded whole; longer ones are sampled (see `tokens`).
const EXACT_BYTES: usize = 64 * 1024;
/// A run of letters or of spaces longer than this is cut into pieces of this size before
/// encoding: BPE merges are quadratic in a piece's length, and the encoder's regex recurses
/// deeper the longer a run is (a 1 MB word overflowed its stack).
const RUN_BYTES: usize = 64;
/// How many evenly spaced windows of a long text are encoded.
const SAMPLES: usize = 16;

/// Tokens in `text` under o200k (the GPT-4o family's encoding); a byte-based guess if the
/// encoder failed to load or panicked. Linear, and bounded per call: a text over 64 KiB is
/// estimated from 64 KiB of evenly spaced windows, scaled to its length and rounded up.
pub fn tokens(text: &str) -> u64 {
    tokens_sampled(text, EXACT_BYTES)
}

/// `tokens`, encoding at most about `exact_bytes` of the text: longer texts are estimated
/// from 16 evenly spaced windows of `exact_bytes / 16` (for savings, where a few percent
/// matter less than the encoder's ~6 MB/s).
pub fn tokens_sampled(text: &str, exact_bytes: usize) -> u64 {
    if text.is_empty() {
        return 0;
    }
    let Some(b) = bpe() else {
        return by_bytes(text.len());
    };
    let counted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        if text.len() <= exact_bytes.max(SAMPLES) {
            return encode_bounded(b, text);
        }
        let window = exact_bytes.max(SAMPLES) / SAMPLES;
        let stride = text.len() / SAMPLES;
        let (mut sampled_bytes, mut sampled_tokens) = (0u64, 0u64);
        for i in 0..SAMPLES {
            let start = floor_char(text, i * stride);
            let end = floor_char(text, (start + window).min(text.len()));
            sampled_bytes += (end - start) as u64;
            sampled_tokens += encode_bounded(b, &text[start..end]);
        }
        let scaled = (u128::from(sampled_tokens) * text.len() as u128)
            .div_ceil(u128::from(sampled_bytes.max(1)));
        // Windows cut words at their edges, which adds a token or two each: a small upward
        // bias, which is the side an estimate that bills should err on (ADR 0002).
        u64::try_from(scaled).unwrap_or(u64::MAX)
    }));
    match counted {
        Ok(n) => n,
        Err(_) => {
            tracing::error!(
                bytes = text.len(),
                "the token estimator panicked; counting by bytes for this text"
            );
            by_bytes(text.len())
        }
    }
}

/// Dense text (code, base64, CJK) runs at two to four bytes a token; three, rounded up.
fn by_bytes(len: usize) -> u64 {
    (len as u64).div_ceil(3)
}

fn floor_char(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Encodes `text` in pieces: split before each whitespace that follows a non-space (where
/// the encoder's own pre-split puts a boundary: " word" is one piece), and every run longer
/// than `RUN_BYTES` cut at that length.
fn encode_bounded(b: &Bpe, text: &str) -> u64 {
    #[cfg(debug_assertions)]
    crate::fault::check("estimate", text);
    #[cfg(test)]
    tests::ENCODED.with(|e| e.set(e.get() + text.len()));
    let mut total = 0u64;
    let mut start = 0;
    let mut run_start = 0;
    let mut prev_space: Option<bool> = None;
    for (i, c) in text.char_indices() {
        let space = c.is_whitespace();
        let boundary = (space && prev_space == Some(false)) || i - run_start >= RUN_BYTES;
        if prev_space != Some(space) || boundary {
            run_start = i;
        }
        if boundary && i > start {
            total += count_or_guess(b, &text[start..i]);
            start = i;
        }
        prev_space = Some(space);
    }
    if start < text.len() {
        total += count_or_guess(b, &text[start..]);
    }
    total
}

fn count_or_guess(b: &Bpe, text: &str) -> u64 {
    b.count(text).unwrap_or_else(|_| by_bytes(text.len()))
}

/// Input tokens of a request body: the text the model would read, plus a small overhead per
/// message for the chat template, biased up rather than down.
pub fn request_tokens(body: &[u8]) -> u64 {
    let Ok(doc) = tollgate_proto::RequestDoc::parse(body) else {
        return by_bytes(body.len());
    };
    let text = doc.text_for_estimate();
    let messages = doc
        .raw("messages")
        .and_then(|r| serde_json::from_str::<Vec<serde::de::IgnoredAny>>(r.get()).ok())
        .map_or(0, |v| v.len() as u64);
    tokens(&text) + 4 * messages + 3
}

#[cfg(test)]
mod tests {
    use super::*;

    thread_local! {
        /// Bytes handed to the encoder on this thread: the work an estimate does.
        pub(super) static ENCODED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    /// The estimate was quadratic in a word's length (256 KB took over 10 s on a runtime
    /// worker); now the encoder sees at most 64 KiB per text, whatever its length or shape.
    #[test]
    fn the_work_per_estimate_is_bounded() {
        for text in [
            "y".repeat(8 << 20),
            "word ".repeat(2 << 20),
            "\u{1F600}".repeat(1 << 20),
        ] {
            ENCODED.with(|e| e.set(0));
            let n = tokens(&text);
            let encoded = ENCODED.with(|e| e.get());
            assert!(n > 0);
            assert!(
                encoded <= EXACT_BYTES,
                "{encoded} bytes encoded for {}",
                text.len()
            );
        }
    }

    #[test]
    fn estimates_are_plausible() {
        assert_eq!(tokens(""), 0);
        let n = tokens("The quick brown fox jumps over the lazy dog.");
        assert!((8..=12).contains(&n), "{n}");
        let body = br#"{"model":"m","messages":[{"role":"user","content":"The quick brown fox jumps over the lazy dog."}]}"#;
        let r = request_tokens(body);
        assert!(r > n && r < n + 12, "{r}");
    }

    #[test]
    fn pieces_match_the_whole_on_ordinary_text() {
        let b = bpe().unwrap();
        let text = "Agents retry, loop and spam endpoints; with a key in hand they spend real \
                    money.\n\n  Indented   lines,\ttabs and   runs of spaces stay close.";
        let whole = b.count(text).unwrap() as i64;
        let pieces = encode_bounded(b, text) as i64;
        assert!((pieces - whole).abs() <= 2, "{pieces} vs {whole}");
    }

    #[test]
    fn a_megabyte_word_and_a_megabyte_of_spaces_neither_panic_nor_undercount() {
        let word = "a".repeat(1 << 20);
        let n = tokens(&word);
        assert!(((1 << 20) / 64..1 << 20).contains(&n), "{n}");
        let spaces = " ".repeat(1 << 20);
        assert!(tokens(&spaces) > 0);
        let b64: String = (0..300_000u32)
            .map(|i| {
                char::from(
                    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
                        [(i.wrapping_mul(2654435761) >> 26) as usize],
                )
            })
            .collect();
        let n = tokens(&b64);
        assert!(n > 300_000 / 8, "{n}");
    }

    #[test]
    fn sampling_a_long_text_stays_near_the_exact_count() {
        let b = bpe().unwrap();
        let para = "The gateway meters every token exactly once, holds each agent's money \
                    in a wallet, and tells a client when its stream was cut. ";
        let text = para.repeat(4000);
        assert!(text.len() > EXACT_BYTES * 4);
        let exact = encode_bounded(b, &text) as f64;
        let est = tokens(&text) as f64;
        assert!(
            est >= exact * 0.98 && est <= exact * 1.05,
            "{est} vs {exact}"
        );
    }

    /// The estimator is held to tiktoken's o200k token for token, not only in count: any
    /// vocabulary, split or merge-order difference shows as a different rank sequence.
    #[test]
    fn the_compact_encoder_encodes_exactly_as_tiktoken_does() {
        let ours = bpe().unwrap();
        let theirs = tiktoken_rs::o200k_base().unwrap();
        let mut texts: Vec<String> = [
            "The quick brown fox jumps over the lazy dog.",
            "I'LL say it's done; they've gone, we'd've WON'T. Don't",
            "fn main() {\n    let x: Vec<u8> = vec![0x1f, 255];\r\n\tprintln!(\"{x:?}\");\n}\n\n\n",
            r#"{"id":"chatcmpl-123","choices":[{"delta":{"content":"héllo wörld"}}],"n":12345678}"#,
            "日本語のテキストと中文文本，还有한국어 텍스트。",
            "مرحبا بالعالم — Здравствуй, мир! Γειά σου κόσμε",
            "emoji 😀👍🏽👨‍👩‍👧 and combining e\u{301} a\u{308}",
            "   leading spaces, trailing   \n \n\n   \t\t mixed\u{a0}nbsp\u{2003}em",
            "1234567890 3.14159 -42 1e10 ١٢٣ ⅷ",
            "CamelCaseWord HTTPServer iPhone XMLHttpRequest snake_case_name kebab-case",
            "$$$ ### !!! ... --- *** /// \\\\ ??? ~~~ `code` <html><body></body></html>",
            "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Deterministic noise drawn from the scripts and punctuation agents send.
        let alphabet: Vec<char> =
            "abcXYZ019 \n\t.,;:'\"(){}[]<>/_-+=*&^%$#@!?éüßñøçΩЖж中文日本語한국😀\u{301}\u{200d}\r"
                .chars()
                .collect();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..3000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 48) as usize + 1;
            let mut s = String::new();
            let mut x = seed;
            for _ in 0..len {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push(alphabet[(x >> 33) as usize % alphabet.len()]);
            }
            texts.push(s);
        }
        for text in &texts {
            let want: Vec<u32> = theirs.encode_ordinary(text);
            assert_eq!(ours.encode(text), want, "{text:?}");
            assert_eq!(ours.count(text).unwrap(), want.len() as u64, "{text:?}");
        }
    }
}
