//! The gateway as an MCP client: one upstream MCP server (Streamable HTTP) as configured in
//! `[[mcp_servers]]`, in whichever protocol era it speaks. A server that answers
//! `server/discover` for 2026-07-28 is called statelessly, each request carrying its `_meta`
//! envelope and the `Mcp-Method`/`Mcp-Name` headers; any other gets the `initialize`
//! handshake once and its session id on every request after (re-established when the server
//! says the session is gone). Answers may be JSON or an SSE stream; either way only the
//! response to the request sent is kept. The request path for `/mcp` is `mcp.rs`.

use crate::config::McpServerConfig;
use http::HeaderMap;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const MODERN: &str = "2026-07-28";
/// Handshake-era revisions, oldest first; the newest is what the gateway offers upstream.
pub const HANDSHAKE: &[&str] = &["2025-03-26", "2025-06-18", "2025-11-25"];
/// An answer larger than this is refused rather than buffered.
const MAX_ANSWER_BYTES: usize = 16 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Era {
    Modern,
    /// The session id the server gave (`None`: it gave none, as stateless servers do).
    Handshake(Option<String>),
}

pub struct McpUpstream {
    pub name: String,
    pub url: String,
    headers: HeaderMap,
    client: reqwest::Client,
    pub price_per_call: u64,
    pub tool_prices: BTreeMap<String, u64>,
    pub timeout: Duration,
    era: tokio::sync::Mutex<Option<Era>>,
    /// The server's tools as it listed them, and when.
    tools: Mutex<Option<(Instant, std::sync::Arc<Vec<Value>>)>>,
    ids: AtomicU64,
}

/// Why an upstream call failed, in words for the agent.
#[derive(Debug, Clone)]
pub struct UpstreamError {
    pub message: String,
    pub timeout: bool,
}

impl McpUpstream {
    pub fn build(cfg: &McpServerConfig) -> Result<McpUpstream, String> {
        let what = format!("mcp_servers.{}", cfg.name);
        let headers =
            crate::toolroute::service_headers(&what, &cfg.headers, cfg.api_key_env.as_deref())?;
        let client = crate::toolroute::service_client(&what, cfg.timeout)?;
        Ok(McpUpstream {
            name: cfg.name.clone(),
            url: cfg.url.clone(),
            headers,
            client,
            price_per_call: cfg.price_per_call,
            tool_prices: cfg.tool_prices.clone(),
            timeout: cfg.timeout,
            era: tokio::sync::Mutex::new(None),
            tools: Mutex::new(None),
            ids: AtomicU64::new(1),
        })
    }

    /// What one call of `tool` costs, in micro-USD.
    pub fn price(&self, tool: &str) -> u64 {
        self.tool_prices
            .get(tool)
            .copied()
            .unwrap_or(self.price_per_call)
    }

    /// The server's tools, from the last listing if it is younger than `ttl`.
    pub async fn tools(&self, ttl: Duration) -> Result<std::sync::Arc<Vec<Value>>, UpstreamError> {
        if let Some((at, tools)) = self
            .tools
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            if at.elapsed() < ttl {
                return Ok(tools.clone());
            }
        }
        let mut all = Vec::new();
        let mut cursor: Option<String> = None;
        // A server pages its list; a hundred pages is far more than any real one has.
        for _ in 0..100 {
            let params = match &cursor {
                Some(c) => json!({ "cursor": c }),
                None => json!({}),
            };
            let answer = self.request("tools/list", params, None).await?;
            let result = answer.get("result").ok_or_else(|| UpstreamError {
                message: format!(
                    "MCP server '{}' refused tools/list: {}",
                    self.name,
                    error_text(&answer)
                ),
                timeout: false,
            })?;
            if let Some(tools) = result.get("tools").and_then(|t| t.as_array()) {
                all.extend(tools.iter().cloned());
            }
            cursor = result
                .get("nextCursor")
                .and_then(|c| c.as_str())
                .map(str::to_string);
            if cursor.is_none() {
                break;
            }
        }
        let tools = std::sync::Arc::new(all);
        *self.tools.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((Instant::now(), tools.clone()));
        Ok(tools)
    }

    /// Sends one JSON-RPC request and returns the server's response object (with `result`
    /// or `error`). `name` is what `Mcp-Name` carries for the methods that have one.
    pub async fn request(
        &self,
        method: &str,
        params: Value,
        name: Option<&str>,
    ) -> Result<Value, UpstreamError> {
        let era = self.era().await?;
        match self.send(&era, method, params.clone(), name).await? {
            Sent::Answer(v) => Ok(v),
            Sent::SessionGone => {
                // The server forgot the session (it restarted): one new handshake, one retry.
                *self.era.lock().await = None;
                let era = self.era().await?;
                match self.send(&era, method, params, name).await? {
                    Sent::Answer(v) => Ok(v),
                    Sent::SessionGone => Err(self.err("dropped the session again")),
                }
            }
        }
    }

    fn err(&self, what: &str) -> UpstreamError {
        UpstreamError {
            message: format!("MCP server '{}' {what}", self.name),
            timeout: false,
        }
    }

    async fn era(&self) -> Result<Era, UpstreamError> {
        let mut era = self.era.lock().await;
        if let Some(e) = era.as_ref() {
            return Ok(e.clone());
        }
        let discovered = self
            .send(&Era::Modern, "server/discover", json!({}), None)
            .await
            .ok()
            .and_then(|s| match s {
                Sent::Answer(v) => v.get("result").cloned(),
                Sent::SessionGone => None,
            })
            .is_some_and(|r| {
                r.get("supportedVersions")
                    .and_then(|v| v.as_array())
                    .is_some_and(|v| v.iter().any(|v| v == MODERN))
            });
        let found = if discovered {
            Era::Modern
        } else {
            self.handshake().await?
        };
        *era = Some(found.clone());
        Ok(found)
    }

    async fn handshake(&self) -> Result<Era, UpstreamError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let body = json!({
            "jsonrpc": "2.0", "id": id, "method": "initialize",
            "params": {
                "protocolVersion": HANDSHAKE[HANDSHAKE.len() - 1],
                "capabilities": {},
                "clientInfo": { "name": "tollgate", "version": env!("CARGO_PKG_VERSION") },
            },
        });
        let resp = self.post(&body, None, None, None).await?;
        let session = resp
            .headers()
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let status = resp.status();
        let answer = read_answer(resp, id).await.map_err(|m| self.err(&m))?;
        if !status.is_success() || answer.get("result").is_none() {
            return Err(self.err(&format!(
                "refused initialize ({status}): {}",
                error_text(&answer)
            )));
        }
        let version = answer
            .pointer("/result/protocolVersion")
            .and_then(|v| v.as_str())
            .unwrap_or(HANDSHAKE[HANDSHAKE.len() - 1])
            .to_string();
        let note = json!({ "jsonrpc": "2.0", "method": "notifications/initialized" });
        // Its answer is a 202 with nothing in it; a server that fails it fails the next call.
        let _ = self
            .post(&note, session.as_deref(), Some(&version), None)
            .await;
        tracing::debug!(server = %self.name, %version, "MCP session established");
        Ok(Era::Handshake(session))
    }

    async fn send(
        &self,
        era: &Era,
        method: &str,
        mut params: Value,
        name: Option<&str>,
    ) -> Result<Sent, UpstreamError> {
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        let resp = match era {
            Era::Modern => {
                if let Some(p) = params.as_object_mut() {
                    let meta = p.entry("_meta").or_insert_with(|| json!({}));
                    if let Some(m) = meta.as_object_mut() {
                        m.insert(
                            "io.modelcontextprotocol/protocolVersion".into(),
                            json!(MODERN),
                        );
                        m.insert(
                            "io.modelcontextprotocol/clientCapabilities".into(),
                            json!({}),
                        );
                        m.insert(
                            "io.modelcontextprotocol/clientInfo".into(),
                            json!({ "name": "tollgate", "version": env!("CARGO_PKG_VERSION") }),
                        );
                    }
                }
                let body =
                    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
                self.post(&body, None, Some(MODERN), Some((method, name)))
                    .await?
            }
            Era::Handshake(session) => {
                let body =
                    json!({ "jsonrpc": "2.0", "id": id, "method": method, "params": params });
                let resp = self
                    .post(
                        &body,
                        session.as_deref(),
                        Some(HANDSHAKE[HANDSHAKE.len() - 1]),
                        None,
                    )
                    .await?;
                if resp.status() == http::StatusCode::NOT_FOUND && session.is_some() {
                    return Ok(Sent::SessionGone);
                }
                resp
            }
        };
        let status = resp.status();
        let answer = read_answer(resp, id).await.map_err(|m| {
            self.err(&format!(
                "gave no usable answer to {method} ({status}): {m}"
            ))
        })?;
        Ok(Sent::Answer(answer))
    }

    async fn post(
        &self,
        body: &Value,
        session: Option<&str>,
        version: Option<&str>,
        modern: Option<(&str, Option<&str>)>,
    ) -> Result<reqwest::Response, UpstreamError> {
        let mut req = self
            .client
            .post(&self.url)
            .headers(self.headers.clone())
            .header(http::header::ACCEPT, "application/json, text/event-stream")
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(self.timeout)
            .body(body.to_string());
        if let Some(s) = session {
            req = req.header("mcp-session-id", s);
        }
        if let Some(v) = version {
            req = req.header("mcp-protocol-version", v);
        }
        if let Some((method, name)) = modern {
            req = req.header("mcp-method", method);
            if let Some(n) = name {
                req = req.header("mcp-name", n);
            }
        }
        req.send().await.map_err(|e| UpstreamError {
            message: format!("MCP server '{}' did not answer: {e}", self.name),
            timeout: e.is_timeout(),
        })
    }
}

enum Sent {
    Answer(Value),
    SessionGone,
}

/// The error message in a JSON-RPC response, or the response itself.
pub fn error_text(answer: &Value) -> String {
    answer
        .pointer("/error/message")
        .and_then(|m| m.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| {
            let mut s = answer.to_string();
            s.truncate(300);
            s
        })
}

/// The response to request `id` in a JSON body or an SSE stream, read to at most
/// `MAX_ANSWER_BYTES`. Notifications and server requests on the stream are skipped.
async fn read_answer(mut resp: reqwest::Response, id: u64) -> Result<Value, String> {
    let sse = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut buf: Vec<u8> = Vec::new();
    let is_ours = |v: &Value| {
        v.get("id").and_then(|i| i.as_u64()) == Some(id)
            && (v.get("result").is_some() || v.get("error").is_some())
    };
    loop {
        let chunk = resp.chunk().await.map_err(|e| e.to_string())?;
        let Some(chunk) = chunk else { break };
        if buf.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!(
                "the answer is larger than {MAX_ANSWER_BYTES} bytes"
            ));
        }
        buf.extend_from_slice(&chunk);
        if sse {
            // Stop at our response: the server may keep the stream open after it.
            if let Some(v) = sse_messages(&buf).into_iter().find(is_ours) {
                return Ok(v);
            }
        }
    }
    if sse {
        return sse_messages(&buf)
            .into_iter()
            .find(is_ours)
            .ok_or_else(|| "the event stream ended without the response".to_string());
    }
    if buf.is_empty() {
        return Err("an empty body".into());
    }
    serde_json::from_slice(&buf).map_err(|e| format!("not JSON: {e}"))
}

/// The JSON messages of the complete events in an SSE buffer.
fn sse_messages(buf: &[u8]) -> Vec<Value> {
    let text = String::from_utf8_lossy(buf);
    let text = text.replace("\r\n", "\n");
    let mut out = Vec::new();
    let complete = match text.rfind("\n\n") {
        Some(i) => &text[..i],
        None => return out,
    };
    for event in complete.split("\n\n") {
        let data: Vec<&str> = event
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .map(|d| d.strip_prefix(' ').unwrap_or(d))
            .collect();
        if data.is_empty() {
            continue;
        }
        if let Ok(v) = serde_json::from_str::<Value>(&data.join("\n")) {
            out.push(v);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_response_among_the_events() {
        let stream = b"event: message\ndata: {\"jsonrpc\":\"2.0\",\"method\":\"notifications/progress\"}\n\nevent: message\r\ndata: {\"jsonrpc\":\"2.0\",\"id\":7,\r\ndata: \"result\":{}}\r\n\r\ndata: {\"id\":8";
        let msgs = sse_messages(stream);
        assert_eq!(msgs.len(), 2);
        assert_eq!(msgs[1]["id"], 7);
    }
}
