//! The built-in mock provider (`mock.rs`): in-process on a loopback port, both dialects.

use super::Kind;
use crate::error::Dialect;

/// The names `/v1/models` lists for it (any `mock*` name works; the flags in a name choose
/// its behaviour, see `mock.rs`).
pub const MODELS: &[&str] = &[
    "mock",
    "mock-long",
    "mock-slow",
    "mock-stall",
    "mock-truncate",
    "mock-nousage",
    "mock-429",
    "mock-500",
    "mock-embed",
    "mock-cached",
    "mock-cachewrite",
];

pub static KIND: Kind = Kind {
    name: "mock",
    genai_name: "tollgate.mock",
    dialects: &[Dialect::OpenAi, Dialect::Anthropic],
    needs_base_url: false,
    auth: super::bearer,
    model_names: Some(MODELS),
};
