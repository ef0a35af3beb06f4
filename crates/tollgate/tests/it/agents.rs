//! Real agents, unchanged, against a gateway on the mock: Claude Code in print mode (native and
//! cross-vendor aliases), Codex `exec` through Responses, openai-agents and LangChain. Each
//! also meets a model that loops on a tool and must stop at the gateway's refusal (or nudge),
//! never stall. `.ci/run` installs the pinned CLIs under `.ci/agents` and the Python packages in
//! `.ci/venv`; with TOLLGATE_REQUIRE_CLIENTS=1 a missing one fails instead of skipping.

use crate::clients::{have as have_python, python};
use crate::harness::*;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tollgate::metering::UsageRecord;

/// A CLI from `TOLLGATE_AGENTS_BIN`, `.ci/agents/node_modules/.bin` or PATH.
fn cli(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("TOLLGATE_AGENTS_BIN")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.ci/agents/node_modules/.bin"
    )));
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    let found = dirs.into_iter().map(|d| d.join(name)).find(|p| p.exists());
    if found.is_none() {
        assert!(
            std::env::var("TOLLGATE_REQUIRE_CLIENTS").is_err(),
            "the agent CLI '{name}' is required (TOLLGATE_REQUIRE_CLIENTS is set); .ci/run installs it"
        );
        eprintln!("SKIPPED: '{name}' not installed (run .ci/run, or set TOLLGATE_AGENTS_BIN)");
    }
    found
}

struct Ran {
    /// `None`: killed at the time limit.
    code: Option<i32>,
    output: String,
    took: Duration,
}

/// Runs an agent to its end or `limit`, whichever comes first; output goes to files so a
/// chatty agent never blocks on a full pipe.
async fn run(mut cmd: Command, dir: &std::path::Path, limit: Duration) -> Ran {
    let out = dir.join("agent.out");
    cmd.current_dir(dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(dir.join("agent.err")).unwrap());
    let err = dir.join("agent.err");
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        let mut child = cmd.spawn().unwrap();
        let code = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status.code().unwrap_or(-1));
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let output = format!(
            "{}\n--- stderr ---\n{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        Ran {
            code,
            output,
            took: started.elapsed(),
        }
    })
    .await
    .unwrap()
}

/// The gateway every agent test uses: the built-in mock, and the standalone mock behind an
/// Anthropic-kind and an OpenAI-kind provider, so each alias picks a dialect and a behaviour.
async fn gateway(extra: &str) -> TestGateway {
    let up = spawn_mock(None).await;
    TestGateway::start(&format!(
        r#"
        {extra}
        [[providers]]
        name = "mock"
        kind = "mock"
        models = ["mock*"]
        [[providers]]
        name = "claude"
        kind = "anthropic"
        base_url = "{up}"
        [[providers]]
        name = "oai"
        kind = "openai"
        base_url = "{up}"
        [[models]]
        name = "claude-native"
        deployments = [{{ provider = "claude", model = "mock" }}]
        [[models]]
        name = "claude-cross"
        deployments = [{{ provider = "oai", model = "mock" }}]
        [[models]]
        name = "gpt-cross"
        deployments = [{{ provider = "claude", model = "mock" }}]
        [[models]]
        name = "claude-loop"
        deployments = [{{ provider = "claude", model = "mock-repeat" }}]
        [[models]]
        name = "claude-cross-loop"
        deployments = [{{ provider = "oai", model = "mock-repeat" }}]
        [[models]]
        name = "gpt-loop"
        deployments = [{{ provider = "oai", model = "mock-repeat" }}]
        "#
    ))
    .await
}

async fn records_of(gw: &TestGateway, key_id: &str) -> Vec<UsageRecord> {
    gw.records()
        .await
        .into_iter()
        .filter(|r| r.key_id == key_id)
        .collect()
}

/// Claude Code in print mode, its own config in a fresh HOME, no traffic but to the gateway.
fn claude(
    bin: &PathBuf,
    gw: &TestGateway,
    key: &str,
    home: &std::path::Path,
    model: &str,
) -> Command {
    let mut c = Command::new(bin);
    c.args([
        "-p",
        "Use Bash to run the command",
        "--allowedTools",
        "Bash",
        "--model",
        model,
    ])
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("HOME", home)
    .env("ANTHROPIC_BASE_URL", &gw.url)
    .env("ANTHROPIC_API_KEY", key)
    .env("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1")
    .env("DISABLE_AUTOUPDATER", "1")
    .env("DISABLE_TELEMETRY", "1");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_runs_through_native_and_cross_vendor_aliases() {
    let Some(bin) = cli("claude") else { return };
    let gw = gateway("").await;
    for (model, provider) in [("claude-native", "claude"), ("claude-cross", "oai")] {
        let (key, key_id) = gw
            .create_key(serde_json::json!({"name": format!("cc-{model}")}))
            .await;
        let home = TempDir::new("claude-home");
        let ran = run(
            claude(&bin, &gw, &key, home.path(), model),
            home.path(),
            Duration::from_secs(120),
        )
        .await;
        assert_eq!(ran.code, Some(0), "{model}: {}", ran.output);
        assert!(ran.output.contains("The mock provider"), "{}", ran.output);
        // The Bash call and the answer after its result, both served by the alias's provider.
        let recs = records_of(&gw, &key_id).await;
        assert!(recs.len() >= 2, "{model}: {recs:#?}");
        for r in &recs {
            assert_eq!(r.status, 200, "{r:#?}");
            assert_eq!(r.provider.as_deref(), Some(provider), "{r:#?}");
            assert!(r.input_tokens > 0 && r.cost_micros > 0, "{r:#?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claude_code_stops_at_a_loop_refusal_and_reads_a_nudge() {
    let Some(bin) = cli("claude") else { return };
    for (extra, model, want_code, want_text) in [
        ("", "claude-loop", 1, "loop detected"),
        ("", "claude-cross-loop", 1, "loop detected"),
        (
            "[loop_guard]\naction = \"nudge\"",
            "claude-loop",
            0,
            "[tollgate]",
        ),
    ] {
        let gw = gateway(extra).await;
        let (key, key_id) = gw.create_key(serde_json::json!({"name": "cc-loop"})).await;
        let home = TempDir::new("claude-home");
        let ran = run(
            claude(&bin, &gw, &key, home.path(), model),
            home.path(),
            Duration::from_secs(90),
        )
        .await;
        assert_eq!(ran.code, Some(want_code), "{model} {extra}: {}", ran.output);
        assert!(ran.output.contains(want_text), "{}", ran.output);
        assert!(
            ran.took < Duration::from_secs(60),
            "stalled: {:?}",
            ran.took
        );
        let recs = records_of(&gw, &key_id).await;
        assert!(
            recs.iter()
                .any(|r| r.error_kind.as_deref() == Some("loop_detected")),
            "{recs:#?}"
        );
    }
}

/// Codex reads its provider from `$CODEX_HOME/config.toml`; `wire_api = "responses"`.
fn codex(
    bin: &PathBuf,
    gw: &TestGateway,
    key: &str,
    home: &std::path::Path,
    model: &str,
) -> Command {
    std::fs::write(
        home.join("config.toml"),
        format!(
            "model = \"{model}\"\nmodel_provider = \"tollgate\"\n[model_providers.tollgate]\nname = \"tollgate\"\nbase_url = \"{}/v1\"\nenv_key = \"TOLLGATE_KEY\"\nwire_api = \"responses\"\n",
            gw.url
        ),
    )
    .unwrap();
    let mut c = Command::new(bin);
    c.args([
        "exec",
        "--skip-git-repo-check",
        "Use exec_command to run it",
    ])
    .env_clear()
    .env("PATH", std::env::var_os("PATH").unwrap_or_default())
    .env("HOME", home)
    .env("CODEX_HOME", home)
    .env("TOLLGATE_KEY", key);
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn codex_exec_runs_through_responses_and_stops_at_a_loop() {
    let Some(bin) = cli("codex") else { return };
    let gw = gateway("").await;
    let (key, key_id) = gw.create_key(serde_json::json!({"name": "codex"})).await;
    let home = TempDir::new("codex-home");
    let ran = run(
        codex(&bin, &gw, &key, home.path(), "mock"),
        home.path(),
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(ran.code, Some(0), "{}", ran.output);
    assert!(ran.output.contains("The mock provider"), "{}", ran.output);
    let recs = records_of(&gw, &key_id).await;
    assert!(
        recs.len() >= 2,
        "the exec_command call and the answer: {recs:#?}"
    );
    assert!(recs
        .iter()
        .all(|r| r.status == 200 && r.endpoint == "responses" && r.output_tokens > 0));

    // The model repeats exec_command: the third repeat is a 400 loop_detected, which Codex
    // does not retry (it retries 429 and even 422, ignoring x-should-retry).
    let (key, key_id) = gw
        .create_key(serde_json::json!({"name": "codex-loop"}))
        .await;
    let home = TempDir::new("codex-home");
    let ran = run(
        codex(&bin, &gw, &key, home.path(), "gpt-loop"),
        home.path(),
        Duration::from_secs(90),
    )
    .await;
    assert!(
        ran.code.is_some(),
        "Codex stalled on the refusal: {}",
        ran.output
    );
    assert!(ran.output.contains("loop detected"), "{}", ran.output);
    assert!(ran.took < Duration::from_secs(60), "{:?}", ran.took);
    let recs = records_of(&gw, &key_id).await;
    assert!(
        recs.iter()
            .any(|r| r.error_kind.as_deref() == Some("loop_detected")),
        "{recs:#?}"
    );
}

async fn python_agent(script: &str, module: &str) {
    if !have_python(module) {
        return;
    }
    let gw = gateway("").await;
    let (key, key_id) = gw.create_key(serde_json::json!({"name": module})).await;
    let dir = TempDir::new("py-agent");
    let mut cmd = Command::new(python());
    let url = if module == "agents" {
        format!("{}/v1", gw.url)
    } else {
        gw.url.clone()
    };
    cmd.args([script, &url, &key]);
    let ran = run(cmd, dir.path(), Duration::from_secs(180)).await;
    assert_eq!(ran.code, Some(0), "{}", ran.output);
    assert!(ran.output.contains("ALL OK"), "{}", ran.output);
    let recs = records_of(&gw, &key_id).await;
    assert!(
        recs.iter().any(|r| r.status == 200 && r.cost_micros > 0),
        "{recs:#?}"
    );
    assert!(
        recs.iter()
            .any(|r| r.error_kind.as_deref() == Some("loop_detected")),
        "{recs:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_agents_sdk_runs_tools_on_responses_and_chat() {
    python_agent(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/agents/openai_agents_client.py"
        ),
        "agents",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn langchain_invokes_streams_and_calls_tools_in_both_dialects() {
    python_agent(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../tests/agents/langchain_client.py"
        ),
        "langchain_openai",
    )
    .await;
}
