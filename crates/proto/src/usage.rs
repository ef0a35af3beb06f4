use serde::Deserialize;

/// Token counts as a provider bills them, normalised across dialects: `input` is every input
/// token, and `cached_input` (cache reads) and the two cache-write classes are parts of it;
/// `output` includes `reasoning` (OpenAI counts reasoning inside `completion_tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input: u64,
    pub cached_input: u64,
    /// Anthropic prompt-cache writes with the 5-minute TTL.
    pub cache_write_5m: u64,
    /// Anthropic prompt-cache writes with the 1-hour TTL.
    pub cache_write_1h: u64,
    pub output: u64,
    pub reasoning: u64,
}

/// Anthropic's `usage` object. Its `input_tokens` excludes cache reads and writes.
#[derive(Deserialize, Default, Debug, Clone, Copy)]
pub struct AnthropicUsage {
    #[serde(default)]
    pub input_tokens: Option<u64>,
    #[serde(default)]
    pub output_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    pub cache_creation: Option<CacheCreation>,
}

#[derive(Deserialize, Default, Debug, Clone, Copy)]
pub struct CacheCreation {
    #[serde(default)]
    pub ephemeral_5m_input_tokens: Option<u64>,
    #[serde(default)]
    pub ephemeral_1h_input_tokens: Option<u64>,
}

impl AnthropicUsage {
    /// Later fields win: `message_delta` repeats (cumulatively) what `message_start` said.
    pub fn merge(&mut self, later: &AnthropicUsage) {
        macro_rules! take {
            ($f:ident) => {
                if later.$f.is_some() {
                    self.$f = later.$f;
                }
            };
        }
        take!(input_tokens);
        take!(output_tokens);
        take!(cache_creation_input_tokens);
        take!(cache_read_input_tokens);
        take!(cache_creation);
    }

    pub fn normalise(&self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let created = self.cache_creation_input_tokens.unwrap_or(0);
        let (w5, w1) = match self.cache_creation {
            Some(c)
                if c.ephemeral_5m_input_tokens.is_some()
                    || c.ephemeral_1h_input_tokens.is_some() =>
            {
                (
                    c.ephemeral_5m_input_tokens.unwrap_or(0),
                    c.ephemeral_1h_input_tokens.unwrap_or(0),
                )
            }
            // Without the breakdown every write is a 5-minute write, the API's default TTL.
            _ => (created, 0),
        };
        Usage {
            input: self.input_tokens.unwrap_or(0) + read + w5 + w1,
            cached_input: read,
            cache_write_5m: w5,
            cache_write_1h: w1,
            output: self.output_tokens.unwrap_or(0),
            reasoning: 0,
        }
    }
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
            ..Usage::default()
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

    /// Extracts `usage` from a whole Anthropic Messages response body.
    pub fn from_anthropic_response(body: &[u8]) -> Option<Usage> {
        #[derive(Deserialize)]
        struct Envelope {
            usage: Option<AnthropicUsage>,
        }
        let env: Envelope = serde_json::from_slice(body).ok()?;
        let u = env.usage?;
        if u.input_tokens.is_none() && u.output_tokens.is_none() {
            return None;
        }
        Some(u.normalise())
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
                reasoning: 12,
                ..Usage::default()
            })
        );
    }

    #[test]
    fn anthropic_usage_counts_cache_reads_and_writes_as_input() {
        let u = Usage::from_anthropic_response(
            br#"{"type":"message","usage":{"input_tokens":10,"output_tokens":7,
               "cache_creation_input_tokens":300,"cache_read_input_tokens":2000,
               "cache_creation":{"ephemeral_5m_input_tokens":100,"ephemeral_1h_input_tokens":200}}}"#,
        );
        assert_eq!(
            u,
            Some(Usage {
                input: 2310,
                cached_input: 2000,
                cache_write_5m: 100,
                cache_write_1h: 200,
                output: 7,
                reasoning: 0
            })
        );
        // No breakdown: writes default to the 5-minute class.
        let u = Usage::from_anthropic_response(
            br#"{"usage":{"input_tokens":1,"output_tokens":2,"cache_creation_input_tokens":50}}"#,
        )
        .unwrap();
        assert_eq!((u.input, u.cache_write_5m, u.cache_write_1h), (51, 50, 0));
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
