//! The endpoints tollgate serves, and everything that differs between them, in one table.
//!
//! Adding an endpoint: a variant here, its row in `SPECS`, and (if its dialect is new) a usage
//! reader and a stream observer. The router (`Endpoint::ALL`), the loop guard, the token
//! estimate, the hold and its clamp, settlement and streams all read the row.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Embeddings,
    Messages,
    CountTokens,
    Responses,
}

/// How a stream of this endpoint is read for usage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StreamShape {
    Chat,
    Messages,
    Responses,
    /// It does not stream.
    None,
}

/// One endpoint's row.
pub(crate) struct Spec {
    /// The gateway's path, and the provider's (after its base URL).
    pub(crate) path: &'static str,
    pub(crate) upstream_path: &'static str,
    /// Its name in usage records and metrics.
    pub(crate) name: &'static str,
    pub(crate) dialect: Dialect,
    pub(crate) stream: StreamShape,
    /// Whether it writes output tokens (and so takes an output cap to hold and reserve).
    pub(crate) generates: bool,
    /// Whether the provider bills it (counting tokens is free).
    pub(crate) billed: bool,
    /// The top-level fields whose repetition is an agent looping; empty: never a loop
    /// (re-embedding or re-counting the same text is not an agent stuck).
    pub(crate) loop_fields: &'static [&'static str],
    /// The output-cap fields a clamp may write, the first present winning; the last is
    /// written when none is.
    pub(crate) cap_fields: &'static [&'static str],
    /// The same call in the other dialect, where translation exists.
    pub(crate) counterpart: Option<Endpoint>,
}

static SPECS: [Spec; 5] = [
    Spec {
        path: "/v1/chat/completions",
        upstream_path: "/chat/completions",
        name: "chat.completions",
        dialect: Dialect::OpenAi,
        stream: StreamShape::Chat,
        generates: true,
        billed: true,
        loop_fields: &["messages", "tools"],
        cap_fields: &["max_completion_tokens", "max_tokens"],
        counterpart: Some(Endpoint::Messages),
    },
    Spec {
        path: "/v1/embeddings",
        upstream_path: "/embeddings",
        name: "embeddings",
        dialect: Dialect::OpenAi,
        stream: StreamShape::None,
        generates: false,
        billed: true,
        loop_fields: &[],
        cap_fields: &[],
        counterpart: None,
    },
    Spec {
        path: "/v1/messages",
        upstream_path: "/messages",
        name: "messages",
        dialect: Dialect::Anthropic,
        stream: StreamShape::Messages,
        generates: true,
        billed: true,
        loop_fields: &["system", "messages", "tools"],
        cap_fields: &["max_tokens"],
        counterpart: Some(Endpoint::ChatCompletions),
    },
    Spec {
        path: "/v1/messages/count_tokens",
        upstream_path: "/messages/count_tokens",
        name: "messages.count_tokens",
        dialect: Dialect::Anthropic,
        stream: StreamShape::None,
        generates: false,
        billed: false,
        loop_fields: &[],
        cap_fields: &[],
        counterpart: None,
    },
    Spec {
        path: "/v1/responses",
        upstream_path: "/responses",
        name: "responses",
        dialect: Dialect::OpenAi,
        stream: StreamShape::Responses,
        generates: true,
        billed: true,
        loop_fields: &["instructions", "input", "tools"],
        cap_fields: &["max_output_tokens"],
        counterpart: None,
    },
];

impl Endpoint {
    /// Every endpoint, for the router.
    pub const ALL: [Endpoint; 5] = [
        Endpoint::ChatCompletions,
        Endpoint::Embeddings,
        Endpoint::Messages,
        Endpoint::CountTokens,
        Endpoint::Responses,
    ];

    pub(crate) fn spec(self) -> &'static Spec {
        &SPECS[self as usize]
    }
    pub fn path(self) -> &'static str {
        self.spec().path
    }
    pub(crate) fn name(self) -> &'static str {
        self.spec().name
    }
    pub fn dialect(self) -> Dialect {
        self.spec().dialect
    }
    /// Whether a provider of this kind can serve the endpoint, natively or through translation.
    pub(crate) fn served_by(self, kind: ProviderKind) -> bool {
        let kind = crate::providers::kind(kind);
        kind.speaks(self.dialect())
            || self
                .spec()
                .counterpart
                .is_some_and(|c| kind.speaks(c.dialect()))
    }
    /// The endpoint to call on a provider of this kind: this one, or its counterpart in the
    /// provider's dialect when the request must be translated.
    pub(crate) fn for_provider(self, kind: ProviderKind) -> Endpoint {
        let kind = crate::providers::kind(kind);
        match self.spec().counterpart {
            Some(c) if !kind.speaks(self.dialect()) && kind.speaks(c.dialect()) => c,
            _ => self,
        }
    }
    pub(crate) fn streams(self) -> bool {
        self.spec().stream != StreamShape::None
    }
    pub(crate) fn upstream_path(self) -> &'static str {
        self.spec().upstream_path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_variant_order() {
        for e in Endpoint::ALL {
            assert_eq!(e.spec() as *const Spec, &SPECS[e as usize] as *const Spec);
        }
        let paths: std::collections::BTreeSet<_> = SPECS.iter().map(|s| s.path).collect();
        assert_eq!(paths.len(), SPECS.len());
        assert_eq!(Endpoint::Messages.path(), "/v1/messages");
        assert_eq!(Endpoint::Responses.name(), "responses");
    }
}
