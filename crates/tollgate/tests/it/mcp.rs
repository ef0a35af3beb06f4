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
    // Granted a tool with the CLI, it can call it at once; taken away, the tool is unknown.
    let cli = |tools: &'static str| {
        let (url, admin) = (gw.url.clone(), gw.admin_key.clone());
        async move {
            let mut args = vec!["keys", "tools", "no-tools"];
            if !tools.is_empty() {
                args.push(tools);
            }
            args.extend(["--url", &url, "--admin-key", &admin]);
            let out = crate::cli::tollgate_async(&args).await;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    cli("support__lookup_account").await;
    let out = calls(
        &mcp,
        &bare,
        json!([["lookup_account", {"handle": "@granted"}]]),
    )
    .await;
    assert_eq!(out[0]["is_error"], false, "{out:?}");
    cli("").await;
    let out = calls(
        &mcp,
        &bare,
        json!([["support__lookup_account", {"handle": "@taken"}]]),
    )
    .await;
    assert!(
        out[0]["error"].as_str().unwrap().contains("unknown tool"),
        "{out:?}"
    );
    let (_, log) = gw
        .admin(reqwest::Method::GET, "/admin/audit?action=key.tools", None)
        .await;
    assert_eq!(log.as_array().unwrap().len(), 2, "{log}");
}

const CALLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/mcp/call_tools.py");

/// Tool calls through `/mcp` on the official SDK; one JSON outcome per call.
async fn calls(url: &str, key: &str, list: serde_json::Value) -> Vec<serde_json::Value> {
    let (url, key) = (url.to_string(), key.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([CALLS, &url, &key, "auto", &list.to_string()])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The attack on a support agent that needed no prompt injection: "change the email on
/// @handle to evil@example.com". Lookups are allowed, email changes need a human, everything
/// else is denied; an approval lets through exactly the call the approver saw, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_support_agent_cannot_change_an_email_without_a_human_approving_that_exact_change() {
    if !have("mcp") {
        return;
    }
    let support = start_server("support");
    let gw = TestGateway::start(&format!(
        r#"
        [[mcp_servers]]
        name = "support"
        url = "{}"
        [[tool_policies]]
        name = "support-desk"
        keys = ["support-desk*"]
        [[tool_policies.rules]]
        when = "tool.name == 'lookup_account'"
        decision = "allow"
        [[tool_policies.rules]]
        when = "tool.server == 'support' && tool.name == 'change_account_email'"
        decision = "require_approval"
        reason = "changing an account's email address needs a human's approval"
        "#,
        support.url
    ))
    .await;
    let mcp = format!("{}/mcp", gw.url);
    let (key, key_id) = gw
        .create_key(json!({"name": "support-desk-1", "tools": ["support__*"]}))
        .await;
    let sent = |tool: &str| {
        support
            .calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.starts_with(tool))
            .cloned()
            .collect::<Vec<_>>()
    };
    let evil = json!({"handle": "@victim", "email": "evil@example.com"});
    let out = calls(
        &mcp,
        &key,
        json!([
            ["lookup_account", {"handle": "@victim"}],
            ["change_account_email", evil],
            ["reset_password", {"handle": "@victim"}],
        ]),
    )
    .await;
    assert_eq!(out[0]["is_error"], false, "{out:?}");
    // Parked: the agent reads why and what to do; nothing reached the server.
    assert_eq!(out[1]["is_error"], true, "{out:?}");
    let pending = &out[1]["meta"]["tollgate/error"];
    assert_eq!(pending["type"], "approval_pending", "{out:?}");
    let first = pending["approval"]["id"].as_str().unwrap().to_string();
    assert!(
        out[1]["text"]
            .as_str()
            .unwrap()
            .contains("needs a human's approval"),
        "{out:?}"
    );
    // No rule allows it: denied, in words.
    assert_eq!(out[2]["is_error"], true);
    assert_eq!(
        out[2]["meta"]["tollgate/error"]["type"], "tool_denied",
        "{out:?}"
    );
    assert!(
        out[2]["text"]
            .as_str()
            .unwrap()
            .contains("no rule of policy 'support-desk' allows"),
        "{out:?}"
    );
    assert!(sent("change_account_email").is_empty());
    assert!(sent("reset_password").is_empty());
    assert_eq!(sent("lookup_account").len(), 1);

    // The approver sees exactly what would be sent.
    let (s, list) = gw
        .admin(reqwest::Method::GET, "/admin/approvals", None)
        .await;
    assert_eq!(s, 200, "{list}");
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list[0]["id"], first.as_str());
    assert_eq!(list[0]["tool"], "support__change_account_email");
    assert_eq!(list[0]["arguments"], evil);
    assert_eq!(list[0]["key_id"], key_id.as_str());
    // Denied: the agent's retry of the same call gets the refusal and the approver's note.
    let (s, d) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/approvals/{first}/deny"),
            Some(json!({"by": "alice", "note": "the requester is not the account owner"})),
        )
        .await;
    assert_eq!(s, 200, "{d}");
    assert_eq!(d["state"], "denied");
    let out = calls(&mcp, &key, json!([["change_account_email", evil]])).await;
    assert_eq!(
        out[0]["meta"]["tollgate/error"]["type"], "tool_denied",
        "{out:?}"
    );
    assert!(
        out[0]["text"]
            .as_str()
            .unwrap()
            .contains("not the account owner"),
        "{out:?}"
    );
    // A decided approval cannot be decided again.
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/approvals/{first}/approve"),
            None,
        )
        .await;
    assert_eq!(s, 400);

    // Binding: approving a different email does not unlock the one the attacker asked for.
    let evil2 = json!({"handle": "@victim2", "email": "evil@example.com"});
    let good2 = json!({"handle": "@victim2", "email": "owner@example.org"});
    let out = calls(
        &mcp,
        &key,
        json!([
            ["change_account_email", evil2],
            ["change_account_email", good2]
        ]),
    )
    .await;
    let a_evil = out[0]["meta"]["tollgate/error"]["approval"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let a_good = out[1]["meta"]["tollgate/error"]["approval"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(a_evil, a_good);
    let (s, _) = gw
        .admin(
            reqwest::Method::POST,
            &format!("/admin/approvals/{a_good}/approve"),
            Some(json!({"by": "bob"})),
        )
        .await;
    assert_eq!(s, 200);
    let out = calls(
        &mcp,
        &key,
        json!([
            ["change_account_email", evil2],
            ["change_account_email", {"email": "owner@example.org", "handle": "@victim2"}],
            ["change_account_email", good2],
        ]),
    )
    .await;
    assert_eq!(
        out[0]["meta"]["tollgate/error"]["type"], "approval_pending",
        "{out:?}"
    );
    assert_eq!(
        out[0]["meta"]["tollgate/error"]["approval"]["id"],
        a_evil.as_str()
    );
    // The approved call, with its arguments in another order, goes through once…
    assert_eq!(out[1]["is_error"], false, "{out:?}");
    assert!(
        out[1]["text"]
            .as_str()
            .unwrap()
            .contains("now owner@example.org"),
        "{out:?}"
    );
    // …and only once.
    assert_eq!(
        out[2]["meta"]["tollgate/error"]["type"], "approval_pending",
        "{out:?}"
    );
    assert_ne!(
        out[2]["meta"]["tollgate/error"]["approval"]["id"],
        a_good.as_str()
    );
    assert_eq!(
        sent("change_account_email"),
        vec![
            r#"change_account_email {"email": "owner@example.org", "handle": "@victim2"}"#
                .to_string()
        ]
    );

    // Every decision and approval is in the audit log, with who decided.
    let (s, audit) = gw
        .admin(reqwest::Method::GET, "/admin/audit?limit=1000", None)
        .await;
    assert_eq!(s, 200, "{audit}");
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "key.created",
        "policy.allow",
        "policy.deny",
        "policy.require_approval",
        "approval.requested",
        "approval.denied",
        "approval.approved",
        "approval.used",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    let denied = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "approval.denied")
        .unwrap();
    assert_eq!(denied["actor"], "alice (admin key admin)", "{denied}");
    let (s, v) = gw
        .admin(reqwest::Method::GET, "/admin/audit/verify", None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(v["broken"], serde_json::Value::Null, "{v}");
    let entries = v["entries"].as_u64().unwrap();
    assert_eq!(entries as usize, actions.len());

    // Tampering: a changed entry, then a removed one, are found.
    let db = rusqlite::Connection::open(gw.dir.path().join("tollgate.db")).unwrap();
    db.execute(
        "UPDATE audit SET detail = '{\"tool\":\"support__lookup_account\"}' WHERE action = 'approval.denied'",
        [],
    )
    .unwrap();
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/audit/verify", None)
        .await;
    assert!(v["broken"][1].as_str().unwrap().contains("changed"), "{v}");
    let seq = v["broken"][0].as_i64().unwrap();
    db.execute("DELETE FROM audit WHERE seq = ?1", [seq])
        .unwrap();
    let (_, v) = gw
        .admin(reqwest::Method::GET, "/admin/audit/verify", None)
        .await;
    assert!(v["broken"][1].as_str().unwrap().contains("missing"), "{v}");
    assert_eq!(v["broken"][0].as_i64().unwrap(), seq + 1, "{v}");
    // The CLI says so with its exit status, for a cron job to alert on.
    let out = crate::cli::tollgate_async(&[
        "audit",
        "verify",
        "--url",
        &gw.url,
        "--admin-key",
        &gw.admin_key,
    ])
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("audit log broken at entry {}", seq + 1)),
        "{err}"
    );
}

/// Redaction on MCP: the server never sees a masked value of a call's arguments, a refused
/// one is not called at all, and with `responses` the agent gets the tool's answer masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_arguments_and_results_are_redacted_on_their_way_through_mcp() {
    if !have("mcp") {
        return;
    }
    let support = start_server("support");
    let gw = TestGateway::start(&format!(
        r#"
        [[mcp_servers]]
        name = "support"
        url = "{}"
        [redaction]
        responses = true
        [redaction.detectors]
        email = "mask"
        card = "reject"
        "#,
        support.url
    ))
    .await;
    let mcp = format!("{}/mcp", gw.url);
    let (key, _) = gw
        .create_key(json!({"name": "desk", "tools": ["support__*"]}))
        .await;
    let out = calls(
        &mcp,
        &key,
        json!([
            ["echo", {"text": "mail bob@example.org please"}],
            ["echo", {"text": "charge 4111 1111 1111 1111"}],
            ["lookup_account", {"handle": "@victim"}],
        ]),
    )
    .await;
    let seen = support.calls.lock().unwrap().clone();
    assert!(
        seen.iter().any(|c| c.contains("mail <EMAIL_1> please")),
        "{seen:?}"
    );
    assert!(
        !seen
            .iter()
            .any(|c| c.contains("bob@") || c.contains("4111")),
        "{seen:?}"
    );
    assert_eq!(
        seen.len(),
        2,
        "the refused call never reached the server: {seen:?}"
    );
    assert_eq!(out[1]["is_error"], true, "{out:?}");
    assert_eq!(
        out[1]["meta"]["tollgate/error"]["type"], "sensitive_data",
        "{out:?}"
    );
    assert!(!out[1]["text"].as_str().unwrap().contains("4111"));
    // The server answers "email victim@example.org": the agent gets it masked.
    let text = out[2]["text"].as_str().unwrap();
    assert!(
        text.contains("<EMAIL_1>") && !text.contains("victim@example.org"),
        "{text}"
    );
}

/// Resources and prompts of the servers a key reaches, passed through in both eras; prompts
/// named as tools are where two servers share a name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resources_and_prompts_are_passed_through_from_the_servers_a_key_reaches() {
    if !have("mcp") {
        return;
    }
    let (a, b) = (start_server("support"), start_server("billing"));
    let gw = TestGateway::start(&format!(
        "[[mcp_servers]]\nname = \"support\"\nurl = \"{}\"\n[[mcp_servers]]\nname = \"billing\"\nurl = \"{}\"\n",
        a.url, b.url
    ))
    .await;
    let mcp = format!("{}/mcp", gw.url);
    let (both, _) = gw
        .create_key(json!({"name": "both", "tools": ["support__*", "billing__*"]}))
        .await;
    let (one, _) = gw
        .create_key(json!({"name": "one", "tools": ["support__*"]}))
        .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/mcp/resources.py");
    let run = |key: String, mode: &'static str| {
        let url = mcp.clone();
        async move {
            let out = tokio::task::spawn_blocking(move || {
                Command::new(python())
                    .args([script, &url, &key, mode])
                    .output()
                    .unwrap()
            })
            .await
            .unwrap();
            assert!(
                out.status.success(),
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        }
    };
    for mode in ["auto", "legacy"] {
        let v = run(both.clone(), mode).await;
        assert_eq!(
            v["resources"],
            json!(["policy://refunds", "policy://refunds"]),
            "{mode}: {v}"
        );
        assert_eq!(
            v["prompts"],
            json!(["support__apologize", "billing__apologize"]),
            "{mode}: {v}"
        );
        assert_eq!(
            v["prompt"], "Write an apology to Ann from the support desk.",
            "{mode}: {v}"
        );
        assert!(
            v["unknown"].as_str().unwrap().contains("unknown resource"),
            "{v}"
        );
        let v = run(one.clone(), mode).await;
        assert_eq!(v["prompts"], json!(["apologize"]), "{mode}: {v}");
        assert_eq!(v["read"], "support: refunds within 30 days", "{mode}: {v}");
    }
}
