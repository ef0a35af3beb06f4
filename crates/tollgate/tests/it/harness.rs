//! A gateway in-process on a free loopback port, with its own data directory, plus
//! helpers to drive it through its HTTP API.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use tollgate::config::Config;
use tollgate::metering::UsageRecord;
use tollgate::server::{Gateway, ServeOptions};

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tollgate-test-{tag}-{}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            rand_suffix()
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub struct TestGateway {
    pub url: String,
    pub admin_key: String,
    pub dir: TempDir,
    pub client: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

pub const ADMIN_KEY: &str = "tg_test_admin_key_0123456789abcdef";

impl TestGateway {
    /// `config` is TOML; `[server] data_dir` is set by the harness.
    pub async fn start(config: &str) -> TestGateway {
        let dir = TempDir::new("gw");
        Self::start_in(config, dir, None).await
    }

    pub async fn start_in(config: &str, dir: TempDir, config_path: Option<PathBuf>) -> TestGateway {
        let mut cfg = Config::from_toml(config).unwrap();
        cfg.server.data_dir = dir.path().to_path_buf();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gw = Gateway::start(ServeOptions {
            config: cfg,
            config_path,
            listener: Some(listener),
            admin_key: Some(ADMIN_KEY.into()),
            secret: None,
            provider_keys: Default::default(),
        })
        .await
        .unwrap();
        let url = format!("http://{}", gw.addr);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(gw.run_until(async move {
            let _ = rx.await;
        }));
        TestGateway {
            url,
            admin_key: ADMIN_KEY.into(),
            dir,
            client: reqwest::Client::new(),
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Graceful shutdown, as on SIGTERM; hands back the data directory for inspection.
    pub async fn stop(mut self) -> TempDir {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
        self.dir
    }

    pub async fn create_key(&self, body: Value) -> (String, String) {
        let r = self
            .client
            .post(format!("{}/admin/keys", self.url))
            .bearer_auth(&self.admin_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        let v: Value = r.json().await.unwrap();
        (
            v["secret"].as_str().unwrap().to_string(),
            v["key"]["id"].as_str().unwrap().to_string(),
        )
    }

    /// Calls the admin API: (status, JSON body or null).
    pub async fn admin(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut r = self
            .client
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.admin_key);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// `GET /admin/wallets/{wallet}`, which must succeed.
    pub async fn wallet_view(&self, wallet: &str) -> Value {
        let (s, w) = self
            .admin(
                reqwest::Method::GET,
                &format!("/admin/wallets/{wallet}"),
                None,
            )
            .await;
        assert_eq!(s, 200, "{w}");
        w
    }

    /// Creates a wallet for `owner` (`team:T`, `key:ID`, …) and tops it up with `topup` USD.
    pub async fn wallet(&self, owner: &str, topup: &str) -> String {
        let (s, w) = self
            .admin(
                reqwest::Method::POST,
                "/admin/wallets",
                Some(json!({"owner": owner})),
            )
            .await;
        assert_eq!(s, 201, "{w}");
        let id = w["id"].as_str().unwrap().to_string();
        let (s, c) = self
            .admin(
                reqwest::Method::POST,
                &format!("/admin/wallets/{id}/topup"),
                Some(json!({"amount": topup, "idempotency_key": format!("initial-{id}")})),
            )
            .await;
        assert_eq!(s, 201, "{c}");
        id
    }

    pub async fn key(&self) -> String {
        self.create_key(json!({"name": "agent-1", "team": "team-a", "project": "proj-x"}))
            .await
            .0
    }

    pub async fn chat(&self, key: &str, body: Value) -> reqwest::Response {
        self.client
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .json(&body)
            .send()
            .await
            .unwrap()
    }

    pub async fn records(&self) -> Vec<UsageRecord> {
        let r = self
            .client
            .get(format!("{}/admin/usage/records?limit=100000", self.url))
            .bearer_auth(&self.admin_key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.json().await.unwrap()
    }

    /// The one record for a request id; fails if there is not exactly one.
    pub async fn record_for(&self, resp_headers: &reqwest::header::HeaderMap) -> UsageRecord {
        let id = resp_headers
            .get("x-request-id")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let all: Vec<UsageRecord> = self
            .records()
            .await
            .into_iter()
            .filter(|r| r.id == id)
            .collect();
        assert_eq!(all.len(), 1, "expected exactly one record for {id}");
        all.into_iter().next().unwrap()
    }

    /// Waits until `n` records exist (streams settle after the client has its last byte).
    /// The Prometheus text of `/metrics`.
    pub async fn metrics(&self) -> String {
        self.client
            .get(format!("{}/metrics", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn wait_records(&self, n: usize) -> Vec<UsageRecord> {
        for _ in 0..200 {
            let recs = self.records().await;
            if recs.len() >= n {
                return recs;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        self.records().await
    }
}

/// Waits (up to 2 s) for the record of a request whose client went away, which the stream's
/// drop settles after the client has stopped reading.
pub async fn wait_record(gw: &TestGateway, id: &str) -> UsageRecord {
    for _ in 0..100 {
        if let Some(rec) = gw.records().await.into_iter().find(|r| r.id == id) {
            return rec;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("no usage record for {id}");
}

/// Waits (up to 2 s) until the mock has seen `n` streams cancelled; fails otherwise.
pub async fn wait_streams_cancelled(base_url: &str, n: u64) {
    let mut seen = 0;
    for _ in 0..100 {
        seen = mock_stats(base_url).await["streams_cancelled"]
            .as_u64()
            .unwrap();
        if seen == n {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!("the upstream saw {seen} cancelled streams, expected {n}");
}

/// A standalone mock provider on a free port; returns its `/v1` base URL.
pub async fn spawn_mock(api_key: Option<&str>) -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", l.local_addr().unwrap());
    let key = api_key.map(str::to_string);
    tokio::spawn(async move { tollgate::mock::serve(l, key).await });
    url
}

/// A loopback address where nothing listens.
pub async fn dead_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    format!("http://{addr}/v1")
}

pub async fn mock_stats(base_url: &str) -> Value {
    let root = base_url.trim_end_matches("/v1");
    reqwest::get(format!("{root}/mock/stats"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Asserts an OpenAI-shaped error with this status and `error.code`.
pub async fn assert_openai_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(resp.status(), status);
    assert!(resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    assert_eq!(v["error"]["code"], code, "{v}");
    v
}

/// Reads an SSE body to the end; returns the data payloads.
pub async fn sse_data(resp: reqwest::Response) -> Vec<String> {
    let text = resp.text().await.unwrap();
    text.split("\n\n")
        .filter_map(|ev| {
            ev.lines()
                .find_map(|l| l.strip_prefix("data: "))
                .map(str::to_string)
        })
        .collect()
}

/// POSTs `body` to any endpoint of the gateway with `key` (and the `anthropic-version` the
/// Messages endpoints want).
pub async fn post_api(gw: &TestGateway, key: &str, path: &str, body: Value) -> reqwest::Response {
    gw.client
        .post(format!("{}{path}", gw.url))
        .bearer_auth(key)
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

/// The JSON payloads of SSE events, as `sse_data` returns them.
pub fn parse_events(events: &[String]) -> Vec<Value> {
    events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

pub fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

/// A process the test started; killed when the test ends, pass or fail (a leftover gateway
/// would hold the test's stderr open).
pub struct KillOnDrop(pub Option<std::process::Child>);

impl KillOnDrop {
    pub fn pid(&self) -> u32 {
        self.0.as_ref().map_or(0, |c| c.id())
    }

    /// Sends a signal by name (`TERM`, `KILL`, `STOP`, `CONT`, `HUP`).
    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} failed");
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the real `tollgate` binary with `args` and waits until its `/healthz` answers on
/// `addr` (where `args` or its config make it listen).
pub async fn spawn_gateway(args: &[&str], addr: &str) -> KillOnDrop {
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("TOLLGATE_ADMIN_KEY", ADMIN_KEY)
        .env("TOLLGATE_SECRET", "shared-test-secret")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let child = KillOnDrop(Some(child));
    // reqwest needs rustls's provider, which a test run alone has not installed yet.
    tollgate::tls::init_tls();
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client
            .get(format!("http://{addr}/healthz"))
            .send()
            .await
            .is_ok()
        {
            return child;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("gateway {args:?} did not come up on {addr}");
}

/// Whether `bin` is on the PATH; says loudly when not, and fails when
/// TOLLGATE_REQUIRE_SERVERS=1 (as in CI) says every server must be there.
pub fn installed(bin: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        assert!(
            std::env::var("TOLLGATE_REQUIRE_SERVERS").as_deref() != Ok("1"),
            "{bin} is not installed and TOLLGATE_REQUIRE_SERVERS=1"
        );
        eprintln!("SKIPPED: {bin} is not installed (apt-get install {bin})");
    }
    found
}

/// A real `redis-server` on a free port, for as long as the value lives. `None` (and a loud
/// line on stderr) when the binary is missing, unless TOLLGATE_REQUIRE_SERVERS=1 makes that
/// a failure, as in CI.
pub struct RedisServer {
    pub port: u16,
    pub process: KillOnDrop,
    _dir: TempDir,
}

impl RedisServer {
    pub async fn start() -> Option<RedisServer> {
        if !installed("redis-server") {
            return None;
        }
        let dir = TempDir::new("redis");
        let port = free_port();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                dir.path().to_str().unwrap(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let process = KillOnDrop(Some(child));
        for _ in 0..200 {
            if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 7];
                if s.write_all(b"PING\r\n").await.is_ok()
                    && s.read_exact(&mut buf).await.is_ok()
                    && &buf == b"+PONG\r\n"
                {
                    return Some(RedisServer {
                        port,
                        process,
                        _dir: dir,
                    });
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("redis-server did not come up on port {port}");
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// A real `clickhouse-server` on free ports with its data in a temporary directory, for as
/// long as the value lives; `None` (and a loud line) when the binary is missing, unless
/// TOLLGATE_REQUIRE_SERVERS=1 makes that a failure. It can be killed and started again on
/// the same port and data.
/// An HTTP front for chDB: a statement in the body (POST) or in `?query=` (GET); an insert
/// (`?query=INSERT ... FORMAT F`, POST) with its rows in the body, read back `FROM INFILE`.
/// Errors answer 400 with ClickHouse's message, as the server does.
const CHDB_FRONT: &str = r#"
import http.server, os, sys, tempfile, urllib.parse
from chdb import session
s = session.Session(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def answer(self, sql, rows=None):
        try:
            if rows is not None:
                with tempfile.NamedTemporaryFile(delete=False, suffix=".rows") as f:
                    f.write(rows)
                head, fmt = sql.rsplit(" FORMAT ", 1)
                out = s.query(f"{head} FROM INFILE '{f.name}' FORMAT {fmt}", "TabSeparated")
                os.unlink(f.name)
            else:
                out = s.query(sql, "TabSeparated")
            data, code = out.bytes(), 200
        except Exception as e:
            data, code = str(e).encode(), 400
        self.send_response(code)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
    def params(self):
        return urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query)
    def do_GET(self):
        self.answer(self.params()["query"][0])
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        q = self.params()
        if "query" in q:
            self.answer(q["query"][0], body)
        else:
            self.answer(body.decode())
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;

pub struct ClickHouseServer {
    pub port: u16,
    tcp_port: u16,
    pub process: KillOnDrop,
    dir: TempDir,
}

impl ClickHouseServer {
    pub async fn start() -> Option<ClickHouseServer> {
        tollgate::server::init_tls();
        if !installed("clickhouse-server") {
            return None;
        }
        let dir = TempDir::new("clickhouse");
        let d = dir.path().display().to_string();
        std::fs::write(
            dir.path().join("users.xml"),
            "<?xml version=\"1.0\"?><yandex><profiles><default></default></profiles>\
             <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>\
             <profile>default</profile><quota>default</quota></default></users>\
             <quotas><default><interval><duration>3600</duration><queries>0</queries><errors>0</errors>\
             <result_rows>0</result_rows><read_rows>0</read_rows><execution_time>0</execution_time>\
             </interval></default></quotas></yandex>",
        )
        .unwrap();
        let mut ch = ClickHouseServer {
            port: free_port(),
            tcp_port: free_port(),
            process: KillOnDrop(None),
            dir,
        };
        std::fs::write(
            ch.dir.path().join("config.xml"),
            format!(
                "<?xml version=\"1.0\"?><yandex><logger><level>warning</level><console>1</console></logger>\
                 <http_port>{}</http_port><tcp_port>{}</tcp_port><listen_host>127.0.0.1</listen_host>\
                 <path>{d}/data/</path><tmp_path>{d}/tmp/</tmp_path><user_files_path>{d}/files/</user_files_path>\
                 <format_schema_path>{d}/schemas/</format_schema_path><users_config>{d}/users.xml</users_config>\
                 <default_profile>default</default_profile><default_database>default</default_database>\
                 <mark_cache_size>268435456</mark_cache_size></yandex>",
                ch.port, ch.tcp_port
            ),
        )
        .unwrap();
        ch.restart().await;
        Some(ch)
    }

    /// Current ClickHouse (PyPI's `chdb-core`: the engine in-process) behind `CHDB_FRONT`, a
    /// small HTTP front speaking what tollgate's client sends, with its own data directory.
    /// No kill or restart: it is there to run the SQL on a current version.
    pub async fn chdb() -> Option<ClickHouseServer> {
        tollgate::server::init_tls();
        if !crate::clients::have("chdb") {
            return None;
        }
        let dir = TempDir::new("chdb");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("front.log")).unwrap();
        let child = std::process::Command::new(crate::clients::python())
            .args([
                "-c",
                CHDB_FRONT,
                &port.to_string(),
                &dir.path().join("data").display().to_string(),
            ])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let ch = ClickHouseServer {
            port,
            tcp_port: 0,
            process: KillOnDrop(Some(child)),
            dir,
        };
        for _ in 0..400 {
            if let Ok(r) = reqwest::get(format!("{}/?query=SELECT%201", ch.url())).await {
                if r.status().is_success() {
                    return Some(ch);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(ch.dir.path().join("front.log")).unwrap_or_default();
        panic!("the chDB front did not come up: {log}");
    }

    /// Starts the server (again) on its ports and data, and waits until it answers.
    pub async fn restart(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("server.log")).unwrap();
        let child = std::process::Command::new("clickhouse-server")
            .arg(format!(
                "--config-file={}/config.xml",
                self.dir.path().display()
            ))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.process = KillOnDrop(Some(child));
        for _ in 0..400 {
            if let Ok(r) = reqwest::get(format!("{}/?query=SELECT%201", self.url())).await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
        panic!(
            "clickhouse-server did not come up on port {}: {log}",
            self.port
        );
    }

    /// Kills it at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.process.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// What ClickHouse answers `sql` with (TabSeparated), trimmed.
    pub async fn query(&self, sql: &str) -> String {
        let r = reqwest::Client::new()
            .post(format!("{}/", self.url()))
            .body(sql.to_string())
            .send()
            .await
            .unwrap();
        let ok = r.status().is_success();
        let text = r.text().await.unwrap();
        assert!(ok, "{sql}: {text}");
        text.trim().to_string()
    }
}

/// The store a test's gateway runs on: SQLite in its data directory, or a PostgreSQL
/// database (the same scenarios run on both).
#[derive(Clone, Debug)]
pub enum TestStore {
    Sqlite,
    Postgres(String),
    /// SQLite, with limits and hot wallets (holds decided) in the Redis at this URL.
    SqliteHotRedis(String),
    /// SQLite, holds decided in the gateway's memory (`[wallets] backend = "memory"`).
    SqliteMemory,
}

impl TestStore {
    /// `rest` (TOML) with the `[store]` table this store needs in front.
    pub fn config(&self, rest: &str) -> String {
        match self {
            TestStore::Sqlite => rest.to_string(),
            TestStore::Postgres(url) => format!("[store]\nurl = \"{url}\"\n{rest}"),
            TestStore::SqliteHotRedis(url) => {
                format!("[limits]\nbackend = \"redis\"\n[limits.redis]\nurl = \"{url}\"\n{rest}")
            }
            TestStore::SqliteMemory if rest.contains("[wallets]\n") => {
                rest.replacen("[wallets]\n", "[wallets]\nbackend = \"memory\"\n", 1)
            }
            TestStore::SqliteMemory => format!("[wallets]\nbackend = \"memory\"\n{rest}"),
        }
    }

    /// What the CLI needs to act on this store.
    pub fn cli_args(&self) -> Vec<String> {
        match self {
            TestStore::Sqlite | TestStore::SqliteHotRedis(_) | TestStore::SqliteMemory => vec![],
            TestStore::Postgres(url) => vec!["--store-url".into(), url.clone()],
        }
    }
}

/// A real PostgreSQL server on a free port, in its own temporary cluster (initdb'd per test;
/// fsync off, since a test cluster need not survive the machine).
pub struct PgServer {
    pub port: u16,
    pub process: KillOnDrop,
    bin: PathBuf,
    as_user: Option<(u32, u32)>,
    dir: TempDir,
}

/// The directory holding `initdb` and `postgres`: on PATH, or Debian's versioned one.
fn pg_bin_dir() -> Option<PathBuf> {
    let on_path = std::process::Command::new("sh")
        .args(["-c", "command -v initdb"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            let p = PathBuf::from(String::from_utf8_lossy(&o.stdout).trim());
            p.parent().map(Path::to_path_buf)
        });
    if on_path.is_some() {
        return on_path;
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|b| b.join("initdb").exists() && b.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop()
}

/// `id -u/-g NAME`.
fn os_id(flag: &str, user: &str) -> Option<u32> {
    let o = std::process::Command::new("id")
        .args([flag, user])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout).trim().parse().ok()
}

pub const PG_PASSWORD: &str = "pg-secret-do-not-print";

impl PgServer {
    pub async fn start() -> Option<PgServer> {
        let Some(bin) = pg_bin_dir() else {
            assert!(
                std::env::var("TOLLGATE_REQUIRE_SERVERS").as_deref() != Ok("1"),
                "PostgreSQL is not installed and TOLLGATE_REQUIRE_SERVERS=1"
            );
            eprintln!("SKIPPED: PostgreSQL is not installed (apt-get install postgresql)");
            return None;
        };
        let dir = TempDir::new("pg");
        let data = dir.path().join("data");
        // PostgreSQL refuses to run as root: run it as the `postgres` user then.
        let root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let as_user = if root {
            let uid = os_id("-u", "postgres").expect("running as root needs a postgres user");
            let gid = os_id("-g", "postgres").unwrap();
            let ok = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres", dir.path().to_str().unwrap()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "chown of the test cluster failed");
            Some((uid, gid))
        } else {
            None
        };
        let mut server = PgServer {
            port: free_port(),
            process: KillOnDrop(None),
            bin,
            as_user,
            dir,
        };
        let out = server
            .command("initdb")
            .args(["-D", data.to_str().unwrap()])
            .args([
                "-U",
                "tollgate",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        server.spawn().await;
        Some(server)
    }

    fn command(&self, prog: &str) -> std::process::Command {
        use std::os::unix::process::CommandExt;
        let mut c = std::process::Command::new(self.bin.join(prog));
        if let Some((uid, gid)) = self.as_user {
            c.uid(uid).gid(gid);
        }
        c
    }

    /// Starts the postmaster and waits until it accepts connections.
    async fn spawn(&mut self) {
        let data = self.dir.path().join("data");
        let child = self
            .command("postgres")
            .args(["-D", data.to_str().unwrap(), "-p", &self.port.to_string()])
            .args(["-h", "127.0.0.1", "-k", self.dir.path().to_str().unwrap()])
            .args(["-c", "fsync=off", "-c", "full_page_writes=off"])
            .args([
                "-c",
                "max_connections=100",
                "-c",
                "log_min_messages=warning",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        self.process = KillOnDrop(Some(child));
        for _ in 0..400 {
            let url = self.url("postgres");
            let up = tokio::task::spawn_blocking(move || {
                tollgate::db::Location::Postgres(url).connect().is_ok()
            })
            .await
            .unwrap();
            if up {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        panic!("postgres did not come up on port {}", self.port);
    }

    /// Sends a signal (`STOP`, `CONT`) to the postmaster and every process it forked
    /// (backends run in sessions of their own, so a process-group signal would miss them).
    pub fn signal_all(&self, sig: &str) {
        let pid = self.process.pid().to_string();
        let children = std::process::Command::new("pkill")
            .args([&format!("--signal={sig}"), "-P", &pid])
            .status()
            .is_ok_and(|s| s.success());
        let parent = std::process::Command::new("kill")
            .args(["-s", sig, &pid])
            .status()
            .is_ok_and(|s| s.success());
        assert!(children && parent, "signalling postgres ({sig}) failed");
    }

    /// A fast shutdown: clients see their connections closed, new ones refused.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.process.0.take() {
            let _ = std::process::Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let _ = c.wait();
        }
    }

    /// Starts the same cluster again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub fn url(&self, db: &str) -> String {
        // The cluster trusts loopback; the password is there to prove it never reaches logs
        // or output.
        format!(
            "postgres://tollgate:{PG_PASSWORD}@127.0.0.1:{}/{db}",
            self.port
        )
    }

    /// A fresh database; its URL.
    pub async fn database(&self, name: &str) -> String {
        let admin = self.url("postgres");
        let db_name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let mut db = tollgate::db::Location::Postgres(admin).connect().unwrap();
            db.batch(&format!("CREATE DATABASE {db_name}")).unwrap();
        })
        .await
        .unwrap();
        self.url(name)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A fast shutdown ends the backends with the postmaster (KILL would orphan them);
        // a stopped group must be continued first.
        if self.process.0.is_some() {
            self.signal_all("CONT");
        }
        self.stop();
    }
}

/// The real binary serving `config` (TOML) with its data in `dir`; (process, listen address).
pub async fn spawn_gateway_with(dir: &Path, config: &str) -> (KillOnDrop, String) {
    let cfg = dir.join("tollgate.toml");
    std::fs::write(&cfg, config).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let data = dir.join("data");
    let args = [
        "serve",
        "--config",
        cfg.to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
        "--listen",
        &listen,
    ];
    (spawn_gateway(&args, &listen).await, listen)
}

/// Three real gateway processes sharing one data directory (and whatever the config shares).
pub struct Replicas {
    pub urls: Vec<String>,
    _procs: Vec<KillOnDrop>,
    _dir: TempDir,
}

pub async fn start_replicas(config: &str) -> Replicas {
    let dir = TempDir::new("replicas");
    let cfg = dir.path().join("tollgate.toml");
    std::fs::write(&cfg, config).unwrap();
    let data = dir.path().join("data");
    let mut urls = Vec::new();
    let mut procs = Vec::new();
    // One after another: the first creates the shared store and runs its migrations.
    for _ in 0..3 {
        let listen = format!("127.0.0.1:{}", free_port());
        procs.push(
            spawn_gateway(
                &[
                    "serve",
                    "--config",
                    cfg.to_str().unwrap(),
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--listen",
                    &listen,
                ],
                &listen,
            )
            .await,
        );
        urls.push(format!("http://{listen}"));
    }
    Replicas {
        urls,
        _procs: procs,
        _dir: dir,
    }
}

/// Creates a key through the first replica and waits until every replica knows it.
pub async fn shared_key(r: &Replicas, body: Value) -> String {
    let client = reqwest::Client::new();
    let v: Value = client
        .post(format!("{}/admin/keys", r.urls[0]))
        .bearer_auth(ADMIN_KEY)
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = v["secret"].as_str().unwrap().to_string();
    for url in &r.urls {
        let mut known = false;
        for _ in 0..100 {
            let s = client
                .get(format!("{url}/v1/models"))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status();
            if s == 200 {
                known = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(known, "{url} never learned the key");
    }
    key
}
