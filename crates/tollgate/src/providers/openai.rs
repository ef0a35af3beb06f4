//! Any OpenAI-compatible API: OpenAI, vLLM, llama.cpp, Ollama, OpenRouter, Groq…

use super::Kind;
use crate::error::Dialect;

pub static KIND: Kind = Kind {
    name: "openai",
    genai_name: "openai",
    dialects: &[Dialect::OpenAi],
    needs_base_url: true,
    auth: super::bearer,
    model_names: None,
};
