//! The MCP gateway with real parts: two MCP servers built on the official Python SDK's
//! `MCPServer` (Streamable HTTP), and agents on the official SDK's `Client` in both protocol
//! eras, through `/mcp`.

use crate::clients::{have, python};
use crate::harness::*;
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

const SERVER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/mcp/support_server.py"
);
const AGENT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/mcp/agent_client.py"
);

/// A real MCP server on a free port; its stderr lines `CALL tool args` are what reached it.
struct McpServer {
    _child: KillOnDrop,
    url: String,
    calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

fn start_server(name: &str) -> McpServer {
    let port = free_port();
    let mut child = Command::new(python())
        .args([SERVER, &port.to_string(), name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let calls = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = calls.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(c) = line.strip_prefix("CALL ") {
                sink.lock().unwrap().push(c.to_string());
            }
        }
    });
    let mut first = String::new();
    BufReader::new(stdout).read_line(&mut first).unwrap();
    assert_eq!(first.trim(), "ready", "the MCP server did not start");
    McpServer {
        _child: KillOnDrop(Some(child)),
        url: format!("http://127.0.0.1:{port}/mcp"),
        calls,
    }
}

async fn agent(url: &str, key: &str, mode: &str, scenario: &str) -> String {
    let (url, key, mode, scenario) = (
        url.to_string(),
        key.to_string(),
        mode.to_string(),
        scenario.to_string(),
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([AGENT, &url, &key, &mode, &scenario])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn line<'a>(out: &'a str, prefix: &str) -> &'a str {
    out.lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in:\n{out}"))
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_the_official_sdk_use_mcp_servers_through_the_gateway_in_both_eras() {
    if !have("mcp") {
        return;
    }
    let support = start_server("support");
    let billing = start_server("billing");
    let gw = TestGateway::start(&format!(
        r#"
        [[mcp_servers]]
        name = "support"
        url = "{}"
        price_per_call = 1000
        [mcp_servers.tool_prices]
        lookup_account = 2500
        [[mcp_servers]]
        name = "billing"
        url = "{}"
        [loop_guard]
        max_repeats = 5
        "#,
        support.url, billing.url
    ))
    .await;
    let mcp = format!("{}/mcp", gw.url);
    for (mode, version) in [("legacy", "2025-11-25"), ("auto", "2026-07-28")] {
        // A key per era, so the loop guard's count starts again.
        let (key, key_id) = gw
            .create_key(json!({
                "name": format!("support-agent-{mode}"),
                "tools": ["support__lookup_account", "support__echo", "billing__echo"],
            }))
            .await;
        let wallet = gw.wallet(&format!("key:{key_id}"), "1.00").await;
        let before = support.calls.lock().unwrap().len();
        let out = agent(&mcp, &key, mode, "support").await;
        assert_eq!(line(&out, "VERSION"), version, "{out}");
        // Only what the key may use; `echo` is on both servers, so it is prefixed.
        assert_eq!(
            line(&out, "TOOLS"),
            "billing__echo,lookup_account,support__echo",
            "{out}"
        );
        assert!(
            line(&out, "LOOKUP").starts_with("False account @alice"),
            "{out}"
        );
        assert!(
            line(&out, "PREFIXED").starts_with("False account @bob"),
            "{out}"
        );
        // A tool the key may not use is refused like one that does not exist.
        assert_eq!(
            line(&out, "DENIED reset_password"),
            "unknown tool: reset_password",
            "{out}"
        );
        assert_eq!(
            line(&out, "DENIED no_such_tool"),
            "unknown tool: no_such_tool",
            "{out}"
        );
        assert_eq!(line(&out, "ECHO support"), "False support: hi", "{out}");
        assert_eq!(line(&out, "ECHO billing"), "False billing: hi", "{out}");
        // The loop guard: the 5th identical call is refused in words the model can read.
        for i in 1..=4 {
            assert!(
                line(&out, &format!("REPEAT {i} ")).starts_with("False account @loop"),
                "{out}"
            );
        }
        let refused = line(&out, "REPEAT 5 ");
        assert!(
            refused.starts_with("True tollgate refused this tool call: loop detected"),
            "{out}"
        );
        // What reached the server: nothing refused did.
        let calls: Vec<String> = support.calls.lock().unwrap()[before..].to_vec();
        assert!(
            !calls.iter().any(|c| c.starts_with("reset_password")),
            "{calls:?}"
        );
        assert_eq!(
            calls.iter().filter(|c| c.contains("@loop")).count(),
            4,
            "{calls:?}"
        );
        // Metered: one record per call that reached a server, priced per tool, paid from
        // the wallet.
        let recs: Vec<_> = gw
            .wait_records(0)
            .await
            .into_iter()
            .filter(|r| r.key_id == key_id && r.endpoint == "mcp")
            .collect();
        let served: Vec<_> = recs.iter().filter(|r| r.error_kind.is_none()).collect();
        // lookup ×2, 4 loop calls, 2 echoes.
        assert_eq!(served.len(), 8, "{recs:#?}");
        let spent: u64 = served.iter().map(|r| r.cost_micros).sum();
        assert_eq!(spent, 6 * 2500 + 1000, "{recs:#?}");
        assert!(served
            .iter()
            .all(|r| r.provider.is_some() && r.response_bytes > 0));
        assert!(recs
            .iter()
            .any(|r| r.error_kind.as_deref() == Some("loop_detected") && r.cost_micros == 0));
        let w = gw.wallet_view(&wallet).await;
        assert_eq!(w["balance_micros"], 1_000_000 - spent as i64, "{w}");
    }
    // A key with no tools is told so instead of getting an empty list.
    let (bare, _) = gw.create_key(json!({"name": "no-tools"})).await;
    let out = agent(&mcp, &bare, "auto", "no-tools").await;
    assert!(
        line(&out, "NOTOOLS").contains("may use no MCP tools"),
        "{out}"
    );
}
