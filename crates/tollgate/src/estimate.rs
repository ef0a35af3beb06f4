//! Local token estimates, used only when a provider reports no usage. Records built from
//! them say `usage_source = "estimated"`.

use std::sync::OnceLock;
use tiktoken_rs::CoreBPE;

fn bpe() -> Option<&'static CoreBPE> {
    static BPE: OnceLock<Option<CoreBPE>> = OnceLock::new();
    BPE.get_or_init(|| tiktoken_rs::o200k_base().ok()).as_ref()
}

/// Loads the encoder ahead of traffic. Loading takes from a hundred milliseconds (release)
/// to a second (debug), and the first caller waits for it on whichever thread it runs: lazily,
/// that is the first client disconnect or usage-less answer, stalling every request sharing
/// the runtime's threads meanwhile.
pub fn warm_up() {
    let _ = bpe();
}

/// Tokens in `text` under o200k (the GPT-4o family's encoding); a byte-based guess if the
/// encoder failed to load.
pub fn tokens(text: &str) -> u64 {
    if text.is_empty() {
        return 0;
    }
    match bpe() {
        Some(b) => b.encode_ordinary(text).len() as u64,
        None => (text.len() as u64).div_ceil(4),
    }
}

/// Input tokens of a request body: the text the model would read, plus a small overhead per
/// message for the chat template, biased up rather than down.
pub fn request_tokens(body: &[u8]) -> u64 {
    let Ok(doc) = tollgate_proto::RequestDoc::parse(body) else {
        return 0;
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

    #[test]
    fn estimates_are_plausible() {
        assert_eq!(tokens(""), 0);
        let n = tokens("The quick brown fox jumps over the lazy dog.");
        assert!((8..=12).contains(&n), "{n}");
        let body = br#"{"model":"m","messages":[{"role":"user","content":"The quick brown fox jumps over the lazy dog."}]}"#;
        let r = request_tokens(body);
        assert!(r > n && r < n + 12, "{r}");
    }
}
