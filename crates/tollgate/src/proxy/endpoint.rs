//! The endpoints tollgate serves and what differs between them: dialect, upstream path,
//! whether they stream.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Messages,
    CountTokens,
    Responses,
}

impl Endpoint {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat.completions",
            Endpoint::Responses => "responses",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "messages.count_tokens",
        }
    }
    pub fn dialect(self) -> Dialect {
        match self {
            Endpoint::ChatCompletions | Endpoint::Embeddings | Endpoint::Responses => {
                Dialect::OpenAi
            }
            Endpoint::Messages | Endpoint::CountTokens => Dialect::Anthropic,
        }
    }
    /// Whether a provider of this kind can serve the endpoint, natively or through translation.
    pub(crate) fn served_by(self, kind: ProviderKind) -> bool {
        let kind = crate::providers::kind(kind);
        kind.speaks(self.dialect()) || self.counterpart().is_some_and(|c| kind.speaks(c.dialect()))
    }
    /// The endpoint to call on a provider of this kind: this one, or its counterpart in the
    /// provider's dialect when the request must be translated.
    pub(crate) fn for_provider(self, kind: ProviderKind) -> Endpoint {
        let kind = crate::providers::kind(kind);
        match self.counterpart() {
            Some(c) if !kind.speaks(self.dialect()) && kind.speaks(c.dialect()) => c,
            _ => self,
        }
    }
    /// The same call in the other dialect, where translation exists.
    fn counterpart(self) -> Option<Endpoint> {
        match self {
            Endpoint::ChatCompletions => Some(Endpoint::Messages),
            Endpoint::Messages => Some(Endpoint::ChatCompletions),
            _ => None,
        }
    }
    pub(crate) fn streams(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Messages | Endpoint::Responses
        )
    }
    pub(crate) fn upstream_path(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/chat/completions",
            Endpoint::Responses => "/responses",
            Endpoint::Embeddings => "/embeddings",
            Endpoint::Messages => "/messages",
            Endpoint::CountTokens => "/messages/count_tokens",
        }
    }
}
