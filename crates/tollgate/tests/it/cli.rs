use crate::harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

pub fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_remove("TOLLGATE_URL")
        .env_remove("TOLLGATE_ADMIN_KEY")
        .output()
        .unwrap()
}

/// Runs the CLI off the runtime's threads: the gateway it talks to runs on them.
pub(crate) async fn tollgate_async(args: &[&str]) -> std::process::Output {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        tollgate(&refs)
    })
    .await
    .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Polls until the key's status is `want`, and returns how long it took.
async fn until_status(gw: &TestGateway, key: &str, want: u16) -> Duration {
    let start = Instant::now();
    loop {
        let s = gw
            .chat(key, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status()
            .as_u16();
        if s == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "still {s} after 3 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn keys_made_by_the_cli_on_the_data_dir_reach_a_running_gateway_within_a_second() {
    let gw = TestGateway::start("").await;
    let dir = gw.dir.path().to_str().unwrap().to_string();
    let out = ok(tollgate_async(&[
        "keys",
        "create",
        "--name",
        "cli-agent",
        "--team",
        "ops",
        "--models",
        "mock,mock-long",
        "--tag",
        "cost-center=42",
        "--data-dir",
        &dir,
        "--format",
        "json",
    ])
    .await);
    let created: Value = serde_json::from_str(&out).unwrap();
    let secret = created["secret"].as_str().unwrap().to_string();
    assert!(secret.starts_with("tg_") && secret.len() >= 35);
    let id = created["key"]["id"].as_str().unwrap().to_string();
    assert!(until_status(&gw, &secret, 200).await < Duration::from_secs(1));

    // `keys list` shows prefixes, never the secret.
    let listed = ok(tollgate_async(&["keys", "list", "--data-dir", &dir]).await);
    assert!(
        listed.contains(&id) && listed.contains("cli-agent") && !listed.contains(&secret),
        "{listed}"
    );
    assert!(listed.contains(&secret[..10]));

    ok(tollgate_async(&["keys", "revoke", &id, "--data-dir", &dir]).await);
    assert!(until_status(&gw, &secret, 401).await < Duration::from_secs(1));

    let rec = gw
        .records()
        .await
        .into_iter()
        .find(|r| r.agent == "cli-agent" && r.status == 200)
        .unwrap();
    assert_eq!(rec.team.as_deref(), Some("ops"));
    assert_eq!(rec.tags.get("cost-center").map(String::as_str), Some("42"));
}

#[tokio::test]
async fn cli_talks_to_a_running_gateway_with_the_admin_key() {
    let gw = TestGateway::start("").await;
    let run = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--url".to_string(),
            gw.url.clone(),
            "--admin-key".to_string(),
            gw.admin_key.clone(),
        ]);
        async move {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            tollgate_async(&refs).await
        }
    };
    let out = ok(run(&[
        "keys",
        "create",
        "--name",
        "remote-agent",
        "--expires",
        "30d",
        "--format",
        "json",
    ])
    .await);
    let created: Value = serde_json::from_str(&out).unwrap();
    let old = created["secret"].as_str().unwrap().to_string();
    assert_eq!(
        gw.chat(&old, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        200
    );

    // Rotation: both secrets work during the grace period.
    let out = ok(run(&[
        "keys",
        "rotate",
        "remote-agent",
        "--grace",
        "1h",
        "--format",
        "json",
    ])
    .await);
    let rotated: Value = serde_json::from_str(&out).unwrap();
    let new = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(new, old);
    assert_eq!(
        gw.chat(&new, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        200
    );
    assert_eq!(
        gw.chat(&old, json!({"model": "mock", "messages": user("hi")}))
            .await
            .status(),
        200
    );

    let csv = ok(run(&["usage", "--by", "key", "--format", "csv"]).await);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next().unwrap(),
        "key,requests,errors,input,cached,cached_share,cache_write,output,reasoning,cost_usd"
    );
    let total: u64 = lines
        .map(|l| l.split(',').nth(1).unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 3);
    let table = ok(run(&["usage", "--by", "model"]).await);
    assert!(
        table.lines().next().unwrap().starts_with("model"),
        "{table}"
    );
    assert!(table.contains("mock"));

    let bad = run(&["keys", "list"]).await;
    assert!(bad.status.success());
    let wrong =
        tollgate_async(&["keys", "list", "--url", &gw.url, "--admin-key", "tg_wrong"]).await;
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("401"));
}

#[test]
fn check_config_prints_every_problem_with_its_path() {
    let dir = TempDir::new("check");
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[[providers]]\nname = \"a\"\nkind = \"openai\"\n[[models]]\nname = \"m\"\ndeployments = [{ provider = \"b\" }]\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("providers[0].base_url: required"), "{text}");
    assert!(
        text.contains("models[0].deployments[0].provider: unknown provider \"b\""),
        "{text}"
    );

    std::fs::write(&path, "[server]\nlisten = \"127.0.0.1:4000\"\nbogus = 1\n").unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    // Parse problems are listed like the others, one per line with its section.
    assert!(String::from_utf8_lossy(&out.stdout).contains("server: unknown field `bogus`"));

    // The response cache in Redis needs one, at a redis:// URL, with a deadline.
    std::fs::write(&path, "[cache]\nbackend = \"redis\"\n").unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("cache.backend: \"redis\" needs [limits.redis] url"),
        "{text}"
    );
    std::fs::write(
        &path,
        "[cache]\nenabled = true\n[limits.redis]\nurl = \"http://r:6379\"\ntimeout = \"0s\"\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("limits.redis.url: not a redis:// URL"),
        "{text}"
    );
    assert!(
        text.contains("limits.redis.timeout: must be greater than 0"),
        "{text}"
    );

    // ClickHouse analytics: a URL, a plain database name, bounds that fit together.
    std::fs::write(
        &path,
        "[analytics]\nbackend = \"clickhouse\"\ndatabase = \"x; DROP\"\nbatch_max = 0\nqueue_capacity = 0\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "analytics.url: required when analytics.backend = \"clickhouse\"",
        "analytics.database: letters, digits and _ only",
        "analytics.batch_max: must be between 1 and 1000000",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    // OpenTelemetry: an http(s) endpoint, a ratio, bounds, header names.
    std::fs::write(
        &path,
        "[otel]\nendpoint = \"grpc://c:4317\"\nsample_ratio = 1.5\nbatch_max = 0\nheaders_env = { \"bad header\" = \"X\" }\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "--config", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for want in [
        "otel.endpoint: not an http(s) URL: \"grpc://c:4317\"",
        "otel.sample_ratio: must be between 0 and 1",
        "otel.batch_max: must be between 1 and 100000",
        "otel.headers_env.bad header: not a valid header name",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }

    let good = dir.path().join("good.toml");
    std::fs::write(&good, include_str!("../../../../tollgate.example.toml")).unwrap();
    let out = tollgate(&["check-config", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn migrate_is_idempotent_and_a_newer_schema_is_refused() {
    let dir = TempDir::new("migrate");
    let d = dir.path().to_str().unwrap();
    let first = ok(tollgate(&["migrate", "--data-dir", d]));
    let again = ok(tollgate(&["migrate", "--data-dir", d]));
    assert_eq!(first, again);
    let version: i64 = first.trim().rsplit(' ').next().unwrap().parse().unwrap();
    assert!(version >= 8, "{first}");
    // A store written by a newer tollgate: this one refuses to touch it.
    let conn = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
    conn.pragma_update(None, "user_version", version + 1)
        .unwrap();
    drop(conn);
    let out = tollgate(&["migrate", "--data-dir", d]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("newer than this tollgate"));
}

/// The 3 a.m. list from issue 18: each message names what to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_says_what_to_fix() {
    let dir = TempDir::new("cli-fix");
    // check-config: every section's mistake in one run, and unset variables as warnings.
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[server]\nlistn = \"x\"\n[loop_guard]\naction = \"nudgee\"\n[[providers]]\nname = \"a\"\nkind = \"openai\"\n[[providers]]\nname = \"b\"\nkindd = \"openai\"\n[metering]\nfoo = 1\n",
    )
    .unwrap();
    let out = tollgate(&["check-config", "-c", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "listn",
        "nudgee",
        "providers[1]: unknown field `kindd`",
        "foo",
    ] {
        assert!(text.contains(want), "{want}: {text}");
    }
    let warn = dir.path().join("warn.toml");
    std::fs::write(&warn, "[[providers]]\nname = \"a\"\nkind = \"openai\"\nbase_url = \"http://127.0.0.1:1/v1\"\napi_key_env = \"TOLLGATE_TEST_UNSET_VAR\"\n").unwrap();
    let text = ok(tollgate(&["check-config", "-c", warn.to_str().unwrap()]));
    assert!(
        text.contains("warning: providers[0].api_key_env: TOLLGATE_TEST_UNSET_VAR is not set"),
        "{text}"
    );

    // A new data directory gets a store on the first key; a run that never was says so.
    let data = dir.path().join("fresh");
    let data = data.to_str().unwrap();
    let out = tollgate(&["keys", "create", "--name", "first", "--data-dir", data]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("created a new store"));
    let out = tollgate(&["run", "nonexistent", "--data-dir", data]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no run \"nonexistent\"") && !err.contains("wallet"),
        "{err}"
    );
    let out = tollgate(&[
        "wallet",
        "create",
        "--owner",
        "team:research",
        "--data-dir",
        data,
    ]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("402 insufficient_funds"),
        "an empty team wallet warns"
    );
    let v: Value = serde_json::from_str(&ok(tollgate(&[
        "wallet",
        "verify",
        "--format",
        "json",
        "--data-dir",
        data,
    ])))
    .unwrap();
    assert_eq!(v, json!({"ok": true, "mismatches": []}));

    // A wrong admin key names the flag and the variable.
    let gw = TestGateway::start("").await;
    let out = tollgate_async(&["keys", "list", "--url", &gw.url, "--admin-key", "tg_wrong"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--admin-key") && err.contains("TOLLGATE_ADMIN_KEY"),
        "{err}"
    );

    // Help: unset variables are not shown as empty values; flags are described.
    let help = ok(tollgate(&["keys", "create", "--help"]));
    assert!(!help.contains("TOLLGATE_DATA_DIR="), "{help}");
    assert!(help.contains("The team the agent belongs to"), "{help}");
    assert!(ok(tollgate(&["serve", "--help"])).contains("ANTHROPIC_API_KEY"));
}
