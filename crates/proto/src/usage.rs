use serde::Deserialize;

/// Token counts as a provider bills them. `output` includes `reasoning` (OpenAI counts
/// reasoning tokens inside `completion_tokens`); `input` includes `cached_input`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    pub output: u64,
    pub reasoning: u64,
}

#[derive(Deserialize)]
struct OpenAiUsage {
    #[serde(default, alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(default, alias = "output_tokens")]
    completion_tokens: Option<u64>,
    #[serde(default, alias = "input_tokens_details")]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default, alias = "output_tokens_details")]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl Usage {
    /// Parses an OpenAI `usage` object (Chat Completions, Embeddings, or Responses naming).
    /// Returns `None` for `null` or for an object that carries no token counts at all.
    pub fn from_openai_json(raw: &str) -> Option<Usage> {
        let u: Option<OpenAiUsage> = serde_json::from_str(raw).ok()?;
        let u = u?;
        if u.prompt_tokens.is_none() && u.completion_tokens.is_none() {
            return None;
        }
        Some(Usage {
            input: u.prompt_tokens.unwrap_or(0),
            cached_input: u
                .prompt_tokens_details
                .and_then(|d| d.cached_tokens)
                .unwrap_or(0),
            output: u.completion_tokens.unwrap_or(0),
            reasoning: u
                .completion_tokens_details
                .and_then(|d| d.reasoning_tokens)
                .unwrap_or(0),
        })
    }

    /// Extracts `usage` from a whole non-streaming response body.
    pub fn from_openai_response(body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct Envelope<'a> {
            #[serde(borrow)]
            usage: Option<&'a serde_json::value::RawValue>,
        }
        let env: Envelope = serde_json::from_slice(body).ok()?;
        Usage::from_openai_json(env.usage?.get())
    }

    pub fn total(&self) -> u64 {
        self.input + self.output
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_chat_usage_with_details() {
        let u = Usage::from_openai_json(
            r#"{"prompt_tokens":100,"completion_tokens":40,"total_tokens":140,
               "prompt_tokens_details":{"cached_tokens":64,"audio_tokens":0},
               "completion_tokens_details":{"reasoning_tokens":12}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                input: 100,
                cached_input: 64,
                output: 40,
                reasoning: 12
            })
        );
    }

    #[test]
    fn null_and_empty_usage_are_none() {
        assert_eq!(Usage::from_openai_json("null"), None);
        assert_eq!(Usage::from_openai_json("{}"), None);
    }

    #[test]
    fn embeddings_usage_has_no_output() {
        let u = Usage::from_openai_response(
            br#"{"object":"list","data":[],"usage":{"prompt_tokens":8,"total_tokens":8}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                input: 8,
                ..Usage::default()
            })
        );
    }
}
