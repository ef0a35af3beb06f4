use crate::harness::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

fn tollgate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env_remove("TOLLGATE_URL")
        .env_remove("TOLLGATE_ADMIN_KEY")
        .output()
        .unwrap()
}

/// Runs the CLI off the runtime's threads: the gateway it talks to runs on them.
async fn tollgate_async(args: &[&str]) -> std::process::Output {
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
        "key,requests,errors,input,cached,cache_write,output,reasoning,cost_usd"
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
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus"));

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
