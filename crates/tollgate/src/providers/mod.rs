//! What differs by provider kind, in one place: which dialects a kind speaks natively, where
//! it lives, how it authenticates, and which model names it serves by itself. One file per
//! kind; the rest of the gateway asks `kind(…)` instead of matching on `ProviderKind`.
//!
//! Adding a kind: a variant in `config::ProviderKind`, a file here with its `KIND`, and its
//! arm in `kind()`. Routing, translation, validation and `/v1/models` follow from the table.

use crate::error::Dialect;
use http::HeaderName;
use serde::Deserialize;

pub mod anthropic;
pub mod mock;
pub mod openai;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Any OpenAI-compatible base URL: OpenAI, vLLM, llama.cpp, Ollama, OpenRouter, Groq…
    Openai,
    /// Anthropic's Messages API (`x-api-key` auth, `anthropic-version` header).
    Anthropic,
    /// The built-in mock provider, started in-process on a loopback port. It speaks both
    /// dialects.
    Mock,
}

/// A provider kind's behaviour.
pub struct Kind {
    /// The name in `kind = "…"`.
    pub name: &'static str,
    /// `gen_ai.provider.name` in spans and metrics. An OpenAI-compatible URL may be any
    /// server; it is named `openai` after the API it speaks.
    pub genai_name: &'static str,
    /// The dialects it speaks natively; the other one reaches it through translation when the
    /// endpoint has a counterpart (Chat Completions ↔ Messages).
    pub dialects: &'static [Dialect],
    /// Whether `base_url` is required (`false`: it runs in-process and takes none).
    pub needs_base_url: bool,
    /// The header carrying its API key, and the value written for a key.
    pub auth: fn(&str) -> (HeaderName, String),
    /// Model names it serves without an alias, for `/v1/models`; `None`: the priced ones.
    pub model_names: Option<&'static [&'static str]>,
}

impl Kind {
    pub fn speaks(&self, d: Dialect) -> bool {
        self.dialects.contains(&d)
    }
}

pub fn kind(k: ProviderKind) -> &'static Kind {
    match k {
        ProviderKind::Openai => &openai::KIND,
        ProviderKind::Anthropic => &anthropic::KIND,
        ProviderKind::Mock => &mock::KIND,
    }
}

/// Every kind, in `ProviderKind` order.
pub fn all() -> [&'static Kind; 3] {
    [&openai::KIND, &anthropic::KIND, &mock::KIND]
}

fn bearer(key: &str) -> (HeaderName, String) {
    (http::header::AUTHORIZATION, format!("Bearer {key}"))
}
