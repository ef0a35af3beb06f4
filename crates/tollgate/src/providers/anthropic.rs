//! Anthropic's Messages API: `x-api-key` auth, `anthropic-version` on every call.

use super::Kind;
use crate::error::Dialect;
use http::HeaderName;

pub static KIND: Kind = Kind {
    name: "anthropic",
    genai_name: "anthropic",
    dialects: &[Dialect::Anthropic],
    needs_base_url: true,
    auth: |key| (HeaderName::from_static("x-api-key"), key.to_string()),
    model_names: None,
};
