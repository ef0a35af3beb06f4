//! Error bodies in the dialects clients speak.

use serde::Serialize;

#[derive(Serialize)]
struct OpenAiErrorBody<'a> {
    error: OpenAiError<'a>,
}

#[derive(Serialize)]
struct OpenAiError<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

/// `{"error":{"message":…,"type":…,"param":…,"code":…}}`, the shape OpenAI's SDKs parse.
pub fn openai_error_body(
    message: &str,
    kind: &str,
    param: Option<&str>,
    code: Option<&str>,
) -> Vec<u8> {
    serde_json::to_vec(&OpenAiErrorBody {
        error: OpenAiError {
            message,
            kind,
            param,
            code,
        },
    })
    .unwrap_or_else(|_| {
        br#"{"error":{"message":"internal error","type":"server_error","param":null,"code":null}}"#
            .to_vec()
    })
}

/// The same error as one SSE event, for failures after a stream has started: OpenAI's SDKs
/// raise on a `data:` event whose object carries `error`.
pub fn openai_error_event(message: &str, kind: &str, code: Option<&str>) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend_from_slice(&openai_error_body(message, kind, None, code));
    out.extend_from_slice(b"\n\n");
    out
}

#[derive(Serialize)]
struct AnthropicErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: AnthropicError<'a>,
}

#[derive(Serialize)]
struct AnthropicError<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

/// `{"type":"error","error":{"type":…,"message":…}}`, the shape Anthropic's SDKs parse.
pub fn anthropic_error_body(kind: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&AnthropicErrorBody {
        kind: "error",
        error: AnthropicError { kind, message },
    })
    .unwrap_or_else(|_| {
        br#"{"type":"error","error":{"type":"api_error","message":"internal error"}}"#.to_vec()
    })
}

/// The same as an SSE `error` event, for failures after a Messages stream has started.
pub fn anthropic_error_event(kind: &str, message: &str) -> Vec<u8> {
    let mut out = b"event: error\ndata: ".to_vec();
    out.extend_from_slice(&anthropic_error_body(kind, message));
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_body_shape() {
        let v: serde_json::Value = serde_json::from_slice(&openai_error_body(
            "no \"key\"",
            "invalid_request_error",
            None,
            Some("invalid_api_key"),
        ))
        .unwrap_or_default();
        assert_eq!(v["error"]["message"], "no \"key\"");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
    }

    #[test]
    fn anthropic_error_shape() {
        let v: serde_json::Value =
            serde_json::from_slice(&anthropic_error_body("not_found_error", "no model"))
                .unwrap_or_default();
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "not_found_error");
        assert_eq!(v["error"]["message"], "no model");
    }
}
