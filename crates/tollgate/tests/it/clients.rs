//! The official Python SDKs, unchanged, against a running gateway.

use crate::harness::*;
use std::process::Command;

pub(crate) fn python() -> String {
    std::env::var("TOLLGATE_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// True when the SDK can be imported. CI sets TOLLGATE_REQUIRE_CLIENTS=1 so that a missing
/// SDK fails instead of skipping.
pub(crate) fn have(module: &str) -> bool {
    let ok = Command::new(python())
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("TOLLGATE_REQUIRE_CLIENTS").is_err(),
            "the Python package '{module}' is required (TOLLGATE_REQUIRE_CLIENTS is set)"
        );
        eprintln!("SKIPPED: Python package '{module}' not installed (run .ci/run, or set TOLLGATE_PYTHON to a venv's python)");
    }
    ok
}

/// Runs one client script against a fresh gateway, then checks that every call it made that
/// reached a provider left exactly one usage record.
async fn run_client(script: &'static str, url_suffix: &str) {
    // The built-in mock, plus an Anthropic-dialect deployment the OpenAI SDK reaches through
    // translation.
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        r#"
        [[providers]]
        name = "mock"
        kind = "mock"
        models = ["mock*"]
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        models = ["claude-*"]
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[models]]
        name = "claude-via-translation"
        deployments = [{{ provider = "claude", model = "mock" }}]
        [[models]]
        name = "gpt-via-translation"
        deployments = [{{ provider = "oai", model = "mock" }}]
        "#
    ))
    .await;
    let key = gw.key().await;
    let url = format!("{}{url_suffix}", gw.url);
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &url, &key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ALL OK"), "{stdout}");
    let recs = gw.wait_records(1).await;
    let calls: usize = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("CALLS "))
        .map(|n| n.trim().parse::<usize>().unwrap())
        .sum();
    assert_eq!(recs.len(), calls, "{recs:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_works_unchanged() {
    if have("openai") {
        run_client(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/clients/openai_client.py"
            ),
            "/v1",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anthropic_python_sdk_works_unchanged() {
    if have("anthropic") {
        run_client(
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../tests/clients/anthropic_client.py"
            ),
            "",
        )
        .await;
    }
}

/// A tool policy refusing the model's tool calls: the OpenAI and Anthropic SDKs parse what
/// the agent gets instead (JSON, and streams through their own accumulators).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_parse_a_tool_call_the_policy_refused() {
    if !(have("openai") && have("anthropic")) {
        return;
    }
    let up = spawn_mock(None).await;
    let gw = TestGateway::start(&format!(
        r#"
        [[providers]]
        name = "mock"
        kind = "mock"
        models = ["mock*"]
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        models = ["claude-*"]
        [[models]]
        name = "claude-via-translation"
        deployments = [{{ provider = "claude", model = "mock" }}]
        [[tool_policies]]
        name = "desk"
        keys = ["desk"]
        [[tool_policies.rules]]
        when = "surface == 'model' && tool.name == 'lookup_account'"
        decision = "allow"
        "#
    ))
    .await;
    let (key, _) = gw.create_key(serde_json::json!({"name": "desk"})).await;
    let url = gw.url.clone();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/clients/refused_tools.py"
    );
    let out = tokio::task::spawn_blocking(move || {
        Command::new(python())
            .args([script, &url, &key])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
