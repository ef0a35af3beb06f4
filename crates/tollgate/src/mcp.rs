//! The MCP gateway: one endpoint, `/mcp`, that multiplexes the `[[mcp_servers]]` a key may
//! use. Both protocol eras are served on it: the stateless 2026-07-28 revision
//! (`server/discover`, the `_meta` envelope, `Mcp-Method`/`Mcp-Name` checked against the
//! body) and the handshake revisions 2025-03-26 … 2025-11-25, whose session id is signed
//! rather than stored, so any replica sharing the server secret accepts it after a restart.
//!
//! A `tools/call` goes through the tool routes' pipeline: authenticate → the `Settlement`
//! (endpoint `mcp`, provider = server, model = `server__tool`) → allowlist → loop guard →
//! admit (the key's and team's limits) → hold the call's price → call the server
//! (`mcpclient.rs`) → commit, with the call's bytes and latency. Refusals of a call (loop,
//! limits, money, a server that fails) come back as a tool result with `isError` the model
//! can read; a tool the key may not use is a protocol error, as an unknown tool is.

use crate::clock::{new_request_id, now_ms};
use crate::config::McpPrefix;
use crate::error::{ApiError, ErrorKind};
use crate::keys::{pattern_matches, KeyRecord};
use crate::mcpclient::{McpUpstream, HANDSHAKE, MODERN};
use crate::metrics::RequestLabels;
use crate::proxy::{authenticate, limit_checks, read_body, refusal, Settlement};
use crate::state::AppState;
use crate::upstream::Runtime;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use base64::Engine;
use http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// JSON-RPC codes: the spec's, and MCP's header mismatch.
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
const INTERNAL: i64 = -32603;
const HEADER_MISMATCH: i64 = -32020;
/// Not authorised (the key), in the implementation-defined range.
const UNAUTHORIZED: i64 = -32001;

/// How long a handshake-era session id is accepted after it was issued.
const SESSION_TTL_MS: i64 = 7 * 86_400_000;

pub async fn handle(State(app): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let mut resp = match *req.method() {
        http::Method::POST => post(&app, req, started).await,
        // Sessions are signed, not stored: ending one needs nothing from the gateway.
        http::Method::DELETE => match authenticate(&app, req.headers()) {
            Ok(_) => status_only(StatusCode::NO_CONTENT),
            Err(e) => rpc_error(e.status(), Value::Null, UNAUTHORIZED, &e.message),
        },
        // No server-initiated stream: the spec lets a server answer 405 here.
        _ => {
            let mut r = status_only(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut().insert(
                http::header::ALLOW,
                HeaderValue::from_static("POST, DELETE"),
            );
            r
        }
    };
    app.metrics
        .requests
        .get_or_create(&RequestLabels {
            endpoint: "mcp",
            status: resp.status().as_u16(),
        })
        .inc();
    resp.headers_mut()
        .insert("cache-control", HeaderValue::from_static("no-store"));
    resp
}

fn status_only(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn json_response(status: StatusCode, body: &Value) -> Response {
    let mut r = Response::new(Body::from(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn rpc_error(status: StatusCode, id: Value, code: i64, message: &str) -> Response {
    json_response(
        status,
        &json!({ "jsonrpc": "2.0", "id": id, "error": { "code": code, "message": message } }),
    )
}

fn rpc_result(id: Value, result: Value) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "jsonrpc": "2.0", "id": id, "result": result }),
    )
}

/// The revision a request speaks: the modern one when its envelope or header says so.
fn is_modern(headers: &HeaderMap, params: &Value) -> bool {
    let in_meta = params
        .pointer("/_meta/io.modelcontextprotocol~1protocolVersion")
        .and_then(|v| v.as_str());
    let in_header = headers
        .get("mcp-protocol-version")
        .and_then(|v| v.to_str().ok());
    in_meta == Some(MODERN) || (in_meta.is_none() && in_header == Some(MODERN))
}

async fn post(app: &Arc<AppState>, req: Request, started: Instant) -> Response {
    let (parts, body) = req.into_parts();
    let key = match authenticate(app, &parts.headers) {
        Ok(k) => k,
        Err(e) => return rpc_error(e.status(), Value::Null, UNAUTHORIZED, &e.message),
    };
    let body = match read_body(body, &parts.headers, app.server.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => return rpc_error(e.status(), Value::Null, INVALID_REQUEST, &e.message),
    };
    let msg: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                Value::Null,
                PARSE_ERROR,
                &format!("the body is not JSON: {e}"),
            )
        }
    };
    if msg.is_array() {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            Value::Null,
            INVALID_REQUEST,
            "JSON-RPC batches are not supported (the 2025-06-18 revision removed them); send one message per request",
        );
    }
    let Some(method) = msg.get("method").and_then(|m| m.as_str()) else {
        // A response to a server request: the gateway sends none, so there is nothing to do.
        return status_only(StatusCode::ACCEPTED);
    };
    let Some(id) = msg.get("id").cloned() else {
        // Notifications (initialized, cancelled, …) need no answer.
        return status_only(StatusCode::ACCEPTED);
    };
    if !(id.is_string() || id.is_i64() || id.is_u64()) {
        return rpc_error(
            StatusCode::BAD_REQUEST,
            Value::Null,
            INVALID_REQUEST,
            "a request id must be a string or an integer",
        );
    }
    let params = msg.get("params").cloned().unwrap_or_else(|| json!({}));
    let modern = is_modern(&parts.headers, &params);
    if modern {
        // Intermediaries route on these headers; a body that says otherwise is refused.
        let header = |n: &str| parts.headers.get(n).and_then(|v| v.to_str().ok());
        if header("mcp-method").is_some_and(|h| h != method) {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                id,
                HEADER_MISMATCH,
                "the Mcp-Method header does not match the request body's method",
            );
        }
        // `Mcp-Name` carries a resource's `uri` and everything else's `name`.
        let field = if method.starts_with("resources/") {
            "uri"
        } else {
            "name"
        };
        let name = params.get(field).and_then(|n| n.as_str());
        if header("mcp-name").is_some_and(|h| Some(h) != name) {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                id,
                HEADER_MISMATCH,
                &format!(
                    "the Mcp-Name header does not match the request body's '{field}' parameter"
                ),
            );
        }
    } else if method != "initialize" {
        match parts.headers.get("mcp-session-id").and_then(|v| v.to_str().ok()) {
            None => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    id,
                    INVALID_REQUEST,
                    "missing Mcp-Session-Id: send initialize first (or use the 2026-07-28 revision, which needs no session)",
                )
            }
            Some(s) if !session_valid(app, &key, s) => {
                // 404 tells a client to start a new session.
                return rpc_error(
                    StatusCode::NOT_FOUND,
                    id,
                    INVALID_REQUEST,
                    "session not found: start a new one with initialize",
                );
            }
            Some(_) => {}
        }
    }
    let runtime = app.runtime.load_full();
    match method {
        "initialize" => initialize(app, &key, id, &params),
        "server/discover" => rpc_result(
            id,
            json!({
                "supportedVersions": [MODERN],
                "capabilities": { "tools": { "listChanged": false }, "resources": {}, "prompts": {} },
                "resultType": "complete",
                "ttlMs": 0,
                "cacheScope": "private",
                "_meta": { "io.modelcontextprotocol/serverInfo": server_info() },
            }),
        ),
        "ping" => rpc_result(id, json!({})),
        "tools/list" => tools_list(&runtime, &key, id, modern).await,
        "tools/call" => {
            let request_id = new_request_id();
            let mut resp = tools_call(app, &runtime, &key, id, &params, modern, body.len(), &request_id, started).await;
            if let Ok(v) = HeaderValue::from_str(&request_id) {
                resp.headers_mut().insert("x-request-id", v);
            }
            resp
        }
        "resources/list" | "resources/templates/list" | "prompts/list" => {
            listed(&runtime, &key, id, method, modern).await
        }
        "resources/read" | "prompts/get" => passed(&runtime, &key, id, method, &params, modern).await,
        other => rpc_error(
            StatusCode::OK,
            id,
            METHOD_NOT_FOUND,
            &format!("method '{other}' is not served by this gateway (it serves tools: tools/list and tools/call)"),
        ),
    }
}

/// What `resources/list`, `resources/templates/list` and `prompts/list` return: the servers'
/// lists merged. A server's resources are the key's when its tool patterns reach that
/// server; a prompt is the key's when `server__prompt` matches one of them, and it is named
/// as tools are (`server__prompt` where names collide, or always). A server that fails to
/// list is left out: an empty list is an answer here (resources and prompts are optional).
async fn listed(
    runtime: &Runtime,
    key: &KeyRecord,
    id: Value,
    method: &str,
    modern: bool,
) -> Response {
    let field = match method {
        "resources/list" => "resources",
        "resources/templates/list" => "resourceTemplates",
        _ => "prompts",
    };
    let lists = futures_util::future::join_all(reachable(runtime, key).map(|s| async move {
        let items = list_of(&s, method, field).await;
        (s, items)
    }))
    .await;
    let mut out: Vec<Value> = Vec::new();
    if field == "prompts" {
        let mut found = Vec::new();
        for (server, items) in &lists {
            for p in items {
                let Some(name) = p.get("name").and_then(Value::as_str) else {
                    continue;
                };
                if may_use(key, &format!("{}__{name}", server.name)) {
                    found.push((server.name.clone(), name.to_string(), p.clone()));
                }
            }
        }
        let always = runtime.mcp.prefix == McpPrefix::Always;
        for (server, name, mut p) in found.clone() {
            let collides = found.iter().filter(|(_, n, _)| *n == name).count() > 1;
            if always || collides {
                p["name"] = json!(format!("{server}__{name}"));
            }
            out.push(p);
        }
    } else {
        for (_, items) in lists {
            out.extend(items);
        }
    }
    let mut r = json!({ field: out });
    if modern {
        // The 2026-07-28 list results say how long they may be cached, and by whom: what a
        // key sees is its own, and the servers' lists can change at any time.
        r["resultType"] = json!("complete");
        r["ttlMs"] = json!(0);
        r["cacheScope"] = json!("private");
    }
    rpc_result(id, r)
}

/// One list a server returns (`resources`, `prompts`, …), empty when it fails or has none.
async fn list_of(server: &McpUpstream, method: &str, field: &str) -> Vec<Value> {
    server
        .request(method, json!({}), None)
        .await
        .ok()
        .and_then(|a| a.pointer(&format!("/result/{field}")).cloned())
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// The servers whose tools the key's patterns can reach.
fn reachable<'a>(
    runtime: &'a Runtime,
    key: &'a KeyRecord,
) -> impl Iterator<Item = Arc<McpUpstream>> + 'a {
    runtime
        .mcp_servers
        .iter()
        .filter(|s| key.tools.iter().any(|p| pattern_could_match(p, &s.name)))
        .cloned()
}

/// `resources/read` (to the reachable server that lists the URI) and `prompts/get` (to the
/// server its name resolves to), passed through; the answer is the server's.
async fn passed(
    runtime: &Runtime,
    key: &KeyRecord,
    id: Value,
    method: &str,
    params: &Value,
    modern: bool,
) -> Response {
    let (server, name, upstream_params) = if method == "prompts/get" {
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return rpc_error(
                StatusCode::OK,
                id,
                INVALID_PARAMS,
                "prompts/get needs params.name",
            );
        };
        let mut target = None;
        for server in reachable(runtime, key) {
            let bare = match name.split_once("__") {
                Some((srv, rest)) if srv == server.name => rest.to_string(),
                Some(_) => continue,
                None => name.to_string(),
            };
            if !may_use(key, &format!("{}__{bare}", server.name)) {
                continue;
            }
            let listed = list_of(&server, "prompts/list", "prompts").await;
            if listed.iter().any(|p| p["name"] == bare.as_str()) {
                let mut up = params.clone();
                up["name"] = json!(bare);
                target = Some((server, up, bare));
                break;
            }
        }
        match target {
            Some((server, up, bare)) => (server, bare, up),
            None => {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    &format!("unknown prompt: {name}"),
                )
            }
        }
    } else {
        let Some(uri) = params.get("uri").and_then(Value::as_str) else {
            return rpc_error(
                StatusCode::OK,
                id,
                INVALID_PARAMS,
                "resources/read needs params.uri",
            );
        };
        let mut target = None;
        for server in reachable(runtime, key) {
            let listed = list_of(&server, "resources/list", "resources").await;
            if listed.iter().any(|r| r["uri"] == uri) {
                target = Some((server, uri.to_string()));
                break;
            }
        }
        match target {
            Some((server, uri)) => (server, uri, params.clone()),
            None => {
                return rpc_error(
                    StatusCode::OK,
                    id,
                    INVALID_PARAMS,
                    &format!("unknown resource: {uri}"),
                )
            }
        }
    };
    let mut upstream_params = upstream_params;
    if let Some(p) = upstream_params.as_object_mut() {
        p.remove("_meta");
    }
    match server.request(method, upstream_params, Some(&name)).await {
        Ok(answer) => match answer.get("result").cloned() {
            Some(mut result) => {
                if let Some(r) = result.as_object_mut() {
                    r.remove("_meta");
                    if !modern {
                        r.remove("resultType");
                    }
                }
                rpc_result(id, result)
            }
            None => rpc_error(
                StatusCode::OK,
                id,
                answer
                    .pointer("/error/code")
                    .and_then(Value::as_i64)
                    .unwrap_or(INTERNAL),
                &format!(
                    "MCP server '{}': {}",
                    server.name,
                    crate::mcpclient::error_text(&answer)
                ),
            ),
        },
        Err(e) => rpc_error(
            StatusCode::OK,
            id,
            INTERNAL,
            &format!("MCP server '{}': {}", server.name, e.message),
        ),
    }
}

fn server_info() -> Value {
    json!({ "name": "tollgate", "version": env!("CARGO_PKG_VERSION") })
}

/// `tgs1.<key id, revision and issue time in base64url>.<HMAC under the server secret>`.
fn session_id(app: &AppState, key: &KeyRecord, version: &str) -> String {
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}\n{version}\n{}",
        key.id,
        now_ms()
    ));
    let mac = hex::encode(&app.secret.digest(&format!("mcp-session:{payload}"))[..16]);
    format!("tgs1.{payload}.{mac}")
}

fn session_valid(app: &AppState, key: &KeyRecord, id: &str) -> bool {
    let mut parts = id.splitn(3, '.');
    let (Some("tgs1"), Some(payload), Some(mac)) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let want = hex::encode(&app.secret.digest(&format!("mcp-session:{payload}"))[..16]);
    // Constant-time enough: both are fixed-length hex of a MAC the caller cannot compute.
    if want.len() != mac.len() || !want.bytes().zip(mac.bytes()).all(|(a, b)| a == b) {
        return false;
    }
    let Ok(raw) = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload) else {
        return false;
    };
    let text = String::from_utf8_lossy(&raw);
    let mut fields = text.split('\n');
    let (Some(key_id), Some(_version), Some(issued)) =
        (fields.next(), fields.next(), fields.next())
    else {
        return false;
    };
    let issued: i64 = issued.parse().unwrap_or(i64::MIN);
    // A session belongs to the key that opened it.
    key_id == key.id && now_ms().saturating_sub(issued) < SESSION_TTL_MS
}

fn initialize(app: &AppState, key: &KeyRecord, id: Value, params: &Value) -> Response {
    let asked = params
        .get("protocolVersion")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    let version = if HANDSHAKE.contains(&asked) {
        asked
    } else {
        HANDSHAKE[HANDSHAKE.len() - 1]
    };
    let mut resp = rpc_result(
        id,
        json!({
            "protocolVersion": version,
            "capabilities": { "tools": { "listChanged": false }, "resources": {}, "prompts": {} },
            "serverInfo": server_info(),
        }),
    );
    if let Ok(v) = HeaderValue::from_str(&session_id(app, key, version)) {
        resp.headers_mut().insert("mcp-session-id", v);
    }
    resp
}

/// One tool as the key sees it.
struct Exposed {
    name: String,
    server: Arc<McpUpstream>,
    tool: String,
    def: Value,
}

fn may_use(key: &KeyRecord, canonical: &str) -> bool {
    key.tools.iter().any(|p| pattern_matches(p, canonical))
}

/// Every tool of every server the key may use, named as the key sees them. Servers that
/// fail to list are left out (and say why in the second value).
async fn catalogue(runtime: &Runtime, key: &KeyRecord) -> (Vec<Exposed>, Vec<String>) {
    let ttl = runtime.mcp.tools_ttl;
    let lists = futures_util::future::join_all(
        runtime
            .mcp_servers
            .iter()
            .filter(|s| key.tools.iter().any(|p| pattern_could_match(p, &s.name)))
            .map(|s| async move { (s.clone(), s.tools(ttl).await) }),
    )
    .await;
    let mut failed = Vec::new();
    let mut found: Vec<(Arc<McpUpstream>, String, Value)> = Vec::new();
    for (server, list) in lists {
        match list {
            Ok(tools) => {
                for t in tools.iter() {
                    let Some(name) = t.get("name").and_then(|n| n.as_str()) else {
                        continue;
                    };
                    if may_use(key, &format!("{}__{name}", server.name)) {
                        found.push((server.clone(), name.to_string(), t.clone()));
                    }
                }
            }
            Err(e) => {
                tracing::warn!(server = %server.name, error = %e.message, "MCP server did not list its tools");
                failed.push(e.message);
            }
        }
    }
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (_, tool, _) in &found {
        *count.entry(tool.as_str()).or_default() += 1;
    }
    let always = runtime.mcp.prefix == McpPrefix::Always;
    let exposed = found
        .iter()
        .map(|(server, tool, def)| {
            let name = if always || count[tool.as_str()] > 1 {
                format!("{}__{tool}", server.name)
            } else {
                tool.clone()
            };
            let mut def = def.clone();
            def["name"] = json!(name);
            Exposed {
                name,
                server: server.clone(),
                tool: tool.clone(),
                def,
            }
        })
        .collect();
    (exposed, failed)
}

/// Whether a `server__tool` pattern can match some tool of `server`.
fn pattern_could_match(pattern: &str, server: &str) -> bool {
    let prefix = format!("{server}__");
    match pattern.strip_suffix('*') {
        Some(p) => prefix.starts_with(p) || p.starts_with(&prefix),
        None => pattern.starts_with(&prefix),
    }
}

fn no_tools_message(runtime: &Runtime, key: &KeyRecord) -> String {
    if runtime.mcp_servers.is_empty() {
        "no MCP servers are configured on this gateway ([[mcp_servers]] in its config)".into()
    } else if key.tools.is_empty() {
        format!(
            "this key ('{}') may use no MCP tools: grant some with `tollgate keys create --tools 'server__tool,server__*'`",
            key.name
        )
    } else {
        format!(
            "none of the tools this key may use ({}) is offered by the configured MCP servers",
            key.tools.join(", ")
        )
    }
}

async fn tools_list(runtime: &Runtime, key: &KeyRecord, id: Value, modern: bool) -> Response {
    let (tools, failed) = catalogue(runtime, key).await;
    if tools.is_empty() {
        // Never a silent empty list: an agent with no tools would carry on without them.
        let mut message = no_tools_message(runtime, key);
        if !failed.is_empty() {
            message = format!("{message}; {}", failed.join("; "));
        }
        return rpc_error(StatusCode::OK, id, UNAUTHORIZED, &message);
    }
    let mut result = json!({ "tools": tools.into_iter().map(|t| t.def).collect::<Vec<_>>() });
    if modern {
        result["resultType"] = json!("complete");
        result["ttlMs"] = json!(0);
        result["cacheScope"] = json!("private");
    }
    rpc_result(id, result)
}

/// A refusal of a call the model can read, as the tool's own failed result.
fn refused(id: Value, e: &ApiError, modern: bool) -> Response {
    refused_with(id, e, None, modern)
}

/// A refusal, with the approval it waits on (or that refused it).
fn refused_with(
    id: Value,
    e: &ApiError,
    approval: Option<&crate::approval::Approval>,
    modern: bool,
) -> Response {
    let mut meta = json!({ "type": e.kind.as_str() });
    if let Some(s) = e.retry_after_secs {
        meta["retry_after"] = json!(s);
    }
    if let Some(a) = approval {
        meta["approval"] = json!({ "id": a.id, "status": a.state, "expires_ms": a.expires_ms });
    }
    let mut result = json!({
        "content": [{ "type": "text", "text": format!("tollgate refused this tool call: {}", e.message) }],
        "isError": true,
        "_meta": { "tollgate/error": meta },
    });
    if modern {
        result["resultType"] = json!("complete");
    }
    rpc_result(id, result)
}

#[allow(clippy::too_many_arguments)]
async fn tools_call(
    app: &Arc<AppState>,
    runtime: &Arc<Runtime>,
    key: &Arc<KeyRecord>,
    id: Value,
    params: &Value,
    modern: bool,
    request_bytes: usize,
    request_id: &str,
    started: Instant,
) -> Response {
    let Some(name) = params.get("name").and_then(|n| n.as_str()) else {
        return rpc_error(
            StatusCode::OK,
            id,
            INVALID_PARAMS,
            "tools/call needs params.name",
        );
    };
    let arguments = params
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if !arguments.is_object() {
        return rpc_error(
            StatusCode::OK,
            id,
            INVALID_PARAMS,
            "params.arguments must be an object",
        );
    }
    // `server__tool` names the server outright; a bare name is looked up among the tools the
    // key sees (it is bare only where it is unique).
    let named = name.split_once("__").and_then(|(server, tool)| {
        runtime
            .mcp_servers
            .iter()
            .find(|s| s.name == server)
            .map(|s| (s.clone(), tool.to_string()))
    });
    let target = match named {
        Some(t) => Some(t),
        None => {
            let (tools, _) = catalogue(runtime, key).await;
            tools
                .into_iter()
                .find(|t| t.name == name)
                .map(|t| (t.server, t.tool))
        }
    };
    let Some((server, tool)) = target else {
        return rpc_error(
            StatusCode::OK,
            id,
            INVALID_PARAMS,
            &format!("unknown tool: {name}"),
        );
    };
    let canonical = format!("{}__{tool}", server.name);
    if !may_use(key, &canonical) {
        // The same answer as for a tool that does not exist: a key learns nothing about
        // tools it may not use.
        return rpc_error(
            StatusCode::OK,
            id,
            INVALID_PARAMS,
            &format!("unknown tool: {name}"),
        );
    }
    let mut settle = Settlement::new(
        app.clone(),
        runtime.clone(),
        key,
        "mcp".into(),
        request_id,
        started,
    );
    settle.rec.provider = Some(server.name.clone());
    settle.rec.model_requested = Some(canonical.clone());
    settle.rec.model_served = Some(tool.clone());
    settle.rec.request_bytes = request_bytes as u64;
    let price = server.price(&tool);
    settle.route_price = Some(price);
    let call = crate::policy::Call {
        surface: "mcp",
        server: &server.name,
        tool: &tool,
        args: &arguments,
        model: None,
        run: None,
    };
    if let Err(stop) =
        crate::proxy::govern(app, runtime, key, &mut settle.rec, &call, request_id).await
    {
        settle.finish_error(&stop.error);
        return refused_with(id, &stop.error, stop.approval.as_ref(), modern);
    }
    // redact: what the key's redaction keeps from the tool (after the policy, which rules
    // on the arguments as the agent sent them)
    let mut arguments = arguments;
    let actions = crate::proxy::redaction_for(&runtime.redaction, key);
    let (_, rejected) = crate::proxy::redact_value(
        app,
        actions,
        &mut settle.rec,
        &mut arguments,
        "tool_arguments",
    );
    if let Some(d) = rejected {
        let e = crate::proxy::sensitive(d, "the call's arguments", "a tool");
        settle.finish_error(&e);
        return refused(id, &e, modern);
    }
    if let Err(e) = admit_call(
        app,
        runtime,
        key,
        &mut settle,
        &canonical,
        &arguments,
        price,
    )
    .await
    {
        settle.finish_error(&e);
        return refused(id, &e, modern);
    }
    let mut upstream_params = json!({ "name": tool, "arguments": arguments });
    if let Some(meta) = params.get("_meta").and_then(|m| m.as_object()) {
        // The client's own `_meta` (progress tokens, trace context) travels on; the
        // protocol envelope is the gateway's to set.
        let kept: serde_json::Map<String, Value> = meta
            .iter()
            .filter(|(k, _)| !k.starts_with("io.modelcontextprotocol/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !kept.is_empty() {
            upstream_params["_meta"] = Value::Object(kept);
        }
    }
    match server
        .request("tools/call", upstream_params, Some(&tool))
        .await
    {
        Ok(answer) => {
            let bytes = answer.to_string().len() as u64;
            if let Some(mut result) = answer.get("result").cloned() {
                if runtime.redaction.responses {
                    let actions = crate::proxy::answer_actions(runtime, key);
                    crate::proxy::redact_value(
                        app,
                        actions,
                        &mut settle.rec,
                        &mut result,
                        "tool_result",
                    );
                }
                settle.finish_route(200, None, bytes, false);
                if let Some(r) = result.as_object_mut() {
                    // The upstream's envelope is its own; the client talks to the gateway.
                    r.remove("_meta");
                    if !modern {
                        r.remove("resultType");
                    }
                }
                rpc_result(id, result)
            } else {
                settle.finish_route(200, Some("upstream_error"), bytes, false);
                let code = answer
                    .pointer("/error/code")
                    .and_then(|c| c.as_i64())
                    .unwrap_or(INTERNAL);
                rpc_error(
                    StatusCode::OK,
                    id,
                    code,
                    &format!(
                        "MCP server '{}': {}",
                        server.name,
                        crate::mcpclient::error_text(&answer)
                    ),
                )
            }
        }
        Err(e) => {
            let kind = if e.timeout {
                ErrorKind::UpstreamTimeout
            } else {
                ErrorKind::UpstreamUnavailable
            };
            let err = ApiError::new(kind, e.message);
            settle.finish_error(&err);
            refused(id, &err, modern)
        }
    }
}

/// Loop guard, limits and the price's hold, in that order: nothing is spent on a call the
/// loop guard refuses.
async fn admit_call(
    app: &Arc<AppState>,
    runtime: &Arc<Runtime>,
    key: &KeyRecord,
    settle: &mut Settlement,
    canonical: &str,
    arguments: &Value,
    price: u64,
) -> Result<(), ApiError> {
    // serde_json keeps object keys sorted, so the same arguments in another order are the
    // same call.
    let args = arguments.to_string();
    crate::routes::repeated_call(
        app,
        &runtime.loop_guard,
        &key.id,
        &format!("mcp:{canonical}"),
        &[Some(&args)],
        &format!("the call of '{canonical}' with these arguments"),
    )?;
    let checks = limit_checks(app, key, runtime, &format!("mcp:{canonical}"));
    let admission = app
        .limiter
        .admit(&checks, 0)
        .await
        .map_err(|r| refusal(app, r))?;
    settle.admission = Some(admission);
    crate::routes::hold_call_price(
        app,
        runtime,
        key,
        settle,
        price,
        &format!("a call to '{canonical}' costs that much; top it up"),
    )
    .await
}
