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
        match kind {
            ProviderKind::Mock => true,
            // Chat Completions and Messages reach each other's providers through translation.
            ProviderKind::Openai => self.dialect() == Dialect::OpenAi || self == Endpoint::Messages,
            ProviderKind::Anthropic => {
                self.dialect() == Dialect::Anthropic || self == Endpoint::ChatCompletions
            }
        }
    }
    /// The endpoint to call on a provider of this kind.
    pub(crate) fn for_provider(self, kind: ProviderKind) -> Endpoint {
        match (self, kind) {
            (Endpoint::ChatCompletions, ProviderKind::Anthropic) => Endpoint::Messages,
            (Endpoint::Messages, ProviderKind::Openai) => Endpoint::ChatCompletions,
            _ => self,
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
