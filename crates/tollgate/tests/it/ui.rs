//! The dashboard in a real browser: Debian's Chromium driven by its chromedriver over the
//! W3C WebDriver protocol (plain HTTP and JSON, spoken here with the test's reqwest client).
//! Screenshots of every page go to `target/ui-screenshots/`, and to `docs/ui/` when
//! `TOLLGATE_UI_SCREENSHOTS=docs`.

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;
use tollgate::ui::usd;

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

struct Browser {
    http: reqwest::Client,
    url: String,
    _driver: std::process::Child,
    _profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        // The browser outlives chromedriver when only the driver is killed (hundreds piled
        // up over a day of runs): end the processes that use this browser's own profile.
        let _ = std::process::Command::new("pkill")
            .args(["-KILL", "-f", &self._profile.path().display().to_string()])
            .status();
        let _ = self._driver.kill();
        let _ = self._driver.wait();
    }
}

impl Browser {
    async fn start(width: u32, height: u32) -> Option<Browser> {
        if !installed("chromedriver") || !installed("chromium") {
            return None;
        }
        let port = free_port();
        let driver = std::process::Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver");
        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        for _ in 0..200 {
            if http.get(format!("{base}/status")).send().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let profile = TempDir::new("chromium");
        // Debian's /usr/bin/chromium is a wrapper script; the browser itself is beside it.
        let binary = ["/usr/lib/chromium/chromium", "/usr/bin/chromium"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("chromium");
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            // Finding an element waits for it a while: a form's answer may still be loading
            // on a busy machine when the next step looks for what it shows.
            "timeouts": {"implicit": 10000},
            "goog:chromeOptions": {
                "binary": binary,
                "args": [
                    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--no-first-run", "--hide-scrollbars", "--disable-crash-reporter", "--disable-breakpad", "--force-device-scale-factor=1",
                    format!("--window-size={width},{height}"),
                    format!("--user-data-dir={}", profile.path().display()),
                ]
            }
        }}});
        let r: Value = http
            .post(format!("{base}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let session = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {r}"))
            .to_string();
        Some(Browser {
            http,
            url: format!("{base}/session/{session}"),
            _driver: driver,
            _profile: profile,
        })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        req = req.json(&body.unwrap_or(json!({})));
        let v: Value = req.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"].get("error").is_none(),
            "WebDriver {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }

    /// Loads `url` and waits for the new page (see `submit`).
    async fn goto(&self, url: &str) {
        self.mark_page().await;
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
        self.wait_new_page().await;
    }

    async fn find(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_string()
    }

    async fn fill(&self, css: &str, text: &str) {
        let el = self.find(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{el}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let el = self.find(css).await;
        self.cmd(reqwest::Method::POST, &format!("/element/{el}/click"), None)
            .await;
    }

    /// Clicks something that loads a page (a form's button, a link) and waits for the new
    /// page (within 10 s): the click returns before the answer has replaced the old page,
    /// and reading right after it could read the old one.
    async fn submit(&self, css: &str) {
        self.mark_page().await;
        self.click(css).await;
        self.wait_new_page().await;
    }

    async fn mark_page(&self) {
        // Before the first page there is no document to mark: nothing to tell apart.
        self.try_script("document.documentElement.dataset.tgBefore = '1';")
            .await;
    }

    /// Until the marked page is gone and its successor has loaded (within 10 s).
    async fn wait_new_page(&self) {
        for _ in 0..100 {
            // Asked while the page unloads, the browser may answer with an error: not yet.
            let loaded = self
                .try_script("return document.documentElement.dataset.tgBefore !== '1' && document.readyState === 'complete';")
                .await;
            if loaded == Some(Value::Bool(true)) {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// `script`, with the browser's error as `None` instead of a failed test.
    async fn try_script(&self, js: &str) -> Option<Value> {
        let v: Value = self
            .http
            .post(format!("{}/execute/sync", self.url))
            .json(&json!({"script": js, "args": []}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["value"]
            .get("error")
            .is_none()
            .then(|| v["value"].clone())
    }

    async fn text(&self, css: &str) -> String {
        let el = self.find(css).await;
        self.cmd(reqwest::Method::GET, &format!("/element/{el}/text"), None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn current_url(&self) -> String {
        self.cmd(reqwest::Method::GET, "/url", None)
            .await
            .as_str()
            .unwrap()
            .to_string()
    }

    async fn script(&self, js: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": js, "args": []})),
        )
        .await
    }

    async fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let dir = root.join("target/ui-screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &bytes).unwrap();
        if std::env::var("TOLLGATE_UI_SCREENSHOTS").as_deref() == Ok("docs") {
            let docs = root.join("docs/ui");
            std::fs::create_dir_all(&docs).unwrap();
            std::fs::write(docs.join(format!("{name}.png")), &bytes).unwrap();
        }
    }

    /// The session cookie, as the browser holds it (HttpOnly: no page script can read it).
    async fn cookie(&self, name: &str) -> Value {
        self.cmd(reqwest::Method::GET, &format!("/cookie/{name}"), None)
            .await
    }

    /// How far the page moved while it loaded (the Layout Instability API's sum).
    async fn layout_shift(&self) -> f64 {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/execute/async",
                Some(json!({"script": "const done = arguments[arguments.length - 1]; let sum = 0; \
                    new PerformanceObserver(l => { for (const e of l.getEntries()) sum += e.value; }) \
                      .observe({type: 'layout-shift', buffered: true}); \
                    setTimeout(() => done(sum), 300);", "args": []})),
            )
            .await;
        v.as_f64().unwrap()
    }
}

/// Signs in, creates a key, gives it a wallet and tops it up, sends traffic, and sees the
/// request in the log and the spend in the overview; every page once at 1 280 px and the
/// overview on a phone, without layout shift or sideways scrolling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_in_a_real_browser() {
    let gw = TestGateway::start(
        r#"
        [[providers]]
        name = "mock"
        kind = "mock"
        models = ["mock*"]
        [[tool_policies]]
        name = "desk"
        keys = ["desk-*"]
        [[tool_policies.rules]]
        when = "surface == 'model' && tool.name == 'change_account_email'"
        decision = "require_approval"
        reason = "an account's email changes with a human's approval"
        "#,
    )
    .await;
    let Some(b) = Browser::start(1280, 900).await else {
        return;
    };
    let ui = format!("{}/ui", gw.url);

    // Not signed in: the sign-in page. A wrong key is refused there.
    b.goto(&ui).await;
    assert!(b.current_url().await.ends_with("/ui/login"));
    b.screenshot("login").await;
    b.fill("#key", "tg_not_a_key").await;
    b.submit("button[type=submit]").await;
    assert!(
        b.text(".error").await.contains("not a key of this gateway"),
        "{}",
        b.source().await
    );
    let agent = gw.create_key(json!({"name": "someone"})).await.0;
    b.fill("#key", &agent).await;
    b.submit("button[type=submit]").await;
    assert!(b.text(".error").await.contains("agent key"));

    b.fill("#key", &gw.admin_key).await;
    b.submit("button[type=submit]").await;
    assert!(
        b.current_url().await.ends_with("/ui"),
        "{}",
        b.current_url().await
    );
    assert_eq!(b.text("[data-testid=spend]").await, "$0.00");
    let cookie = b.cookie("tollgate_ui").await;
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");

    // A key, made in the browser.
    b.goto(&format!("{ui}/keys")).await;
    b.script("document.querySelector('details').open = true;")
        .await;
    b.fill("input[name=name]", "ui-agent").await;
    b.fill("input[name=team]", "web").await;
    b.submit("details form button[type=submit]").await;
    let secret = b.text("[data-testid=secret]").await;
    let key_id = b.text("[data-testid=key-id]").await;
    assert!(secret.starts_with("tg_"), "{secret}");
    b.screenshot("keys").await;

    // Its wallet, topped up with $5.
    b.goto(&format!("{ui}/wallets")).await;
    b.script("document.querySelector('details').open = true;")
        .await;
    b.fill("input[name=owner]", &format!("key:{key_id}")).await;
    b.submit("details form button[type=submit]").await;
    assert_eq!(b.text("[data-testid=balance]").await, "$0.00");
    b.fill("input[name=amount]", "5.00").await;
    b.submit("form.panel button[type=submit]").await;
    assert_eq!(b.text("[data-testid=balance]").await, "$5.00");

    // The team's monthly budget, set through the API.
    let r = gw
        .client
        .put(format!("{}/admin/budgets", gw.url))
        .bearer_auth(&gw.admin_key)
        .json(&json!({"scope": "team:web", "period": "monthly", "hard": "100"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.text().await.unwrap());

    // Traffic through the gateway with the key the browser made.
    for i in 0..3 {
        let r = gw
            .chat(
                &secret,
                json!({"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": format!("hello {i}")}]}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    // A run with a sub-run.
    for (run, parent) in [("ui-run", None), ("ui-run-child", Some("ui-run"))] {
        let mut req = gw
            .client
            .post(format!("{}/v1/chat/completions", gw.url))
            .bearer_auth(&secret)
            .header("x-tollgate-run", run)
            .json(&json!({"model": "mock", "max_tokens": 16, "messages": [{"role": "user", "content": run}]}));
        if let Some(p) = parent {
            req = req.header("x-tollgate-parent-run", p);
        }
        assert_eq!(req.send().await.unwrap().status(), 200);
    }
    let records = gw.records().await;
    let spent: u64 = records
        .iter()
        .filter(|r| r.agent == "ui-agent")
        .map(|r| r.cost_micros)
        .sum();
    assert!(spent > 0);

    // The requests in the log, and one opened.
    b.goto(&format!("{ui}/requests")).await;
    let log = b.source().await;
    assert_eq!(log.matches(">ui-agent<").count(), 5, "{log}");
    b.screenshot("requests").await;
    b.submit("tbody tr:first-child td:first-child a").await;
    assert!(b.current_url().await.contains("/ui/requests/req_"));
    assert!(b.source().await.contains("price version"));
    b.screenshot("request").await;

    // The spend in the overview: the tile and today's bar.
    b.goto(&ui).await;
    let tile = b.text("[data-testid=spend]").await;
    assert_eq!(tile, usd(spent as i64));
    let today = &tollgate::clock::rfc3339(tollgate::clock::now_ms())[..10];
    assert!(
        b.source()
            .await
            .contains(&format!("{today}: {}", usd(spent as i64))),
        "today's bar"
    );
    assert!(b.layout_shift().await < 0.01, "the overview does not move");
    b.screenshot("overview").await;

    // The wallet spent what the records cost.
    b.goto(&format!("{ui}/wallets")).await;
    b.submit("tbody tr:first-child td:first-child a").await;
    let balance = b.text("[data-testid=balance]").await;
    assert_eq!(balance, usd(5_000_000 - spent as i64), "{balance}");
    b.screenshot("wallet").await;
    // The run, its sub-run and its calls.
    b.goto(&format!("{ui}/runs")).await;
    assert!(b.source().await.contains(">ui-run-child<"));
    b.screenshot("runs").await;
    b.submit("a[href='/ui/runs/ui-run']").await;
    let run = b.source().await;
    assert!(
        run.contains("Sub-runs") && run.contains(">ui-run-child<"),
        "{run}"
    );
    b.screenshot("run").await;
    // The budget's period spend is what the team's records cost.
    b.goto(&format!("{ui}/wallets")).await;
    let budgets = b.source().await;
    assert!(
        budgets.contains("<td>team:web</td>")
            && budgets.contains(&format!("<td>{}</td>", usd(spent as i64)))
            && budgets.contains("<td>$100.00</td>"),
        "{budgets}"
    );
    for (page, name) in [("/roi", "roi"), ("/wallets", "wallets")] {
        b.goto(&format!("{ui}{page}")).await;
        b.screenshot(name).await;
    }

    // A tool call parked for approval, approved from the dashboard.
    let desk = gw.create_key(json!({"name": "desk-1"})).await.0;
    let tools = json!([{"type": "function", "function": {"name": "change_account_email",
        "parameters": {"type": "object", "properties": {"email": {"type": "string", "const": "a@b.example"}}, "required": ["email"]}}}]);
    let r = gw
        .chat(
            &desk,
            json!({"model": "mock", "messages": [{"role": "user", "content": "change it"}], "tools": tools,
                   "tool_choice": {"type": "function", "function": {"name": "change_account_email"}}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    b.goto(&format!("{ui}/approvals")).await;
    let pending = b.source().await;
    assert!(
        pending.contains("change_account_email") && pending.contains("a@b.example"),
        "{pending}"
    );
    b.screenshot("approvals").await;
    b.submit("form[action$='/approve'] button").await;
    b.goto(&format!("{ui}/approvals?state=approved")).await;
    let approved = b.source().await;
    assert!(
        approved.contains("change_account_email") && approved.contains("(dashboard)"),
        "{approved}"
    );

    // Changes from elsewhere are refused: no CSRF token, a wrong one, another origin.
    let session = format!("tollgate_ui={}", cookie["value"].as_str().unwrap());
    let csrf = {
        let page = b.source().await;
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        page[at..at + 32].to_string()
    };
    let post = |body: String, origin: Option<&str>| {
        let mut r = gw
            .client
            .post(format!("{ui}/keys"))
            .header("cookie", &session)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(o) = origin {
            r = r.header("origin", o);
        }
        r.send()
    };
    let keys = || async {
        gw.client
            .get(format!("{}/admin/keys", gw.url))
            .bearer_auth(&gw.admin_key)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
            .as_array()
            .unwrap()
            .len()
    };
    let before = keys().await;
    let r = post("name=csrf-less".into(), None).await.unwrap();
    assert_eq!(r.status(), 403);
    let r = post(format!("name=wrong&csrf={}", "0".repeat(32)), None)
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = post(
        format!("name=elsewhere&csrf={csrf}"),
        Some("http://evil.example"),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(keys().await, before, "no key was made");
    // The same form with its token and this origin works.
    let r = post(format!("name=from-form&csrf={csrf}"), Some(&gw.url))
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A forged cookie is no session.
    let r = gw
        .client
        .get(&ui)
        .header("cookie", "tollgate_ui=key_x.99999999999999.00.00")
        .send()
        .await
        .unwrap();
    assert!(r.url().path().ends_with("/ui/login"));

    // Every page says what it allows: no inline script, no framing.
    let r = gw.client.get(format!("{ui}/login")).send().await.unwrap();
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"));
    assert!(csp.contains("frame-ancestors 'none'"));
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    drop(b);

    // On a phone: the overview fits the screen's width.
    let phone = Browser::start(390, 844).await.unwrap();
    phone.goto(&format!("{ui}/login")).await;
    phone.fill("#key", &gw.admin_key).await;
    phone.submit("button[type=submit]").await;
    let fits = phone
        .script("return document.documentElement.scrollWidth <= window.innerWidth + 1;")
        .await;
    assert_eq!(fits, true, "no sideways scrolling at 390 px");
    assert!(phone.layout_shift().await < 0.01);
    phone.screenshot("overview-phone").await;
}

/// A read-only dashboard key, made in the browser: it signs in and sees every page without a
/// form, its changes are refused even with the right CSRF token, and every API refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_key_looks_and_changes_nothing() {
    let gw = TestGateway::start(
        r#"
        [[providers]]
        name = "mock"
        kind = "mock"
        models = ["mock*"]
        "#,
    )
    .await;
    let Some(b) = Browser::start(1280, 900).await else {
        return;
    };
    let ui = format!("{}/ui", gw.url);
    let (agent, agent_id) = gw.create_key(json!({"name": "worker"})).await;
    let r = gw
        .chat(
            &agent,
            json!({"model": "mock", "max_tokens": 8, "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let (s, w) = gw
        .admin(
            reqwest::Method::POST,
            "/admin/wallets",
            Some(json!({"owner": format!("key:{agent_id}")})),
        )
        .await;
    assert_eq!(s, 201, "{w}");
    let wallet_id = w["id"].as_str().unwrap().to_string();

    // The admin makes the viewer key with the form's checkbox.
    b.goto(&format!("{ui}/login")).await;
    b.fill("#key", &gw.admin_key).await;
    b.submit("button[type=submit]").await;
    b.goto(&format!("{ui}/keys")).await;
    b.script("document.querySelector('details').open = true;")
        .await;
    b.fill("input[name=name]", "finance-viewer").await;
    b.click("input[name=viewer]").await;
    b.submit("details form button[type=submit]").await;
    let viewer = b.text("[data-testid=secret]").await;
    assert!(viewer.starts_with("tg_"), "{viewer}");
    assert!(b.source().await.contains("<td>viewer "));
    b.submit("header form button[type=submit]").await;
    assert!(b.current_url().await.ends_with("/ui/login"));

    // Every API refuses it, in its caller's dialect.
    let r = gw
        .chat(
            &viewer,
            json!({"model": "mock", "max_tokens": 8, "messages": user("hi")}),
        )
        .await;
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["error"]["code"], "dashboard_only", "{v}");
    let r = gw
        .client
        .post(format!("{}/v1/messages", gw.url))
        .header("x-api-key", &viewer)
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "mock", "max_tokens": 8, "messages": user("hi")}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    for (method, path) in [
        (reqwest::Method::GET, "/admin/keys"),
        (reqwest::Method::GET, "/admin/usage"),
        (reqwest::Method::GET, "/v1/models"),
        (reqwest::Method::POST, "/mcp"),
    ] {
        let r = gw
            .client
            .request(method, format!("{}{path}", gw.url))
            .bearer_auth(&viewer)
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
    }

    // Signed in with it, the pages show the numbers and no form but signing out.
    b.fill("#key", &viewer).await;
    b.submit("button[type=submit]").await;
    assert!(b.current_url().await.ends_with("/ui"));
    assert!(b.text("header .who").await.contains("(read-only)"));
    for page in [
        String::new(),
        "/keys".into(),
        "/wallets".into(),
        format!("/wallets/{wallet_id}"),
        "/approvals".into(),
        "/requests".into(),
    ] {
        b.goto(&format!("{ui}{page}")).await;
        let html = b.source().await;
        assert_eq!(
            html.matches("method=\"post\"").count(),
            1,
            "{page}: only the sign-out form\n{html}"
        );
    }
    b.goto(&format!("{ui}/keys")).await;
    assert!(b.source().await.contains(">worker<"));
    b.screenshot("keys-viewer").await;

    // A change sent with the viewer's own session and CSRF token is still refused.
    let cookie = b.cookie("tollgate_ui").await;
    let session = format!("tollgate_ui={}", cookie["value"].as_str().unwrap());
    let csrf = {
        let page = b.source().await;
        let at = page.find("name=\"csrf\" value=\"").unwrap() + 19;
        page[at..at + 32].to_string()
    };
    let keys = || async {
        let (_, v) = gw.admin(reqwest::Method::GET, "/admin/keys", None).await;
        v.as_array().unwrap().len()
    };
    let keys_before = keys().await;
    for (path, body) in [
        ("/keys", format!("name=by-viewer&csrf={csrf}")),
        (&format!("/keys/{agent_id}/revoke"), format!("csrf={csrf}")),
        (
            &format!("/wallets/{wallet_id}/credit"),
            format!("amount=1000&kind=topup&csrf={csrf}"),
        ),
    ] {
        let r = gw
            .client
            .post(format!("{ui}{path}"))
            .header("cookie", &session)
            .header("origin", &gw.url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{path}");
        assert!(r.text().await.unwrap().contains("read-only"));
    }
    assert_eq!(keys().await, keys_before, "no key was made");
    let r = gw
        .chat(
            &agent,
            json!({"model": "mock", "max_tokens": 8, "messages": user("still here")}),
        )
        .await;
    // Alive (a revoked key is 401) and still unfunded (a credit would have paid).
    assert_eq!(r.status(), 402, "the agent's key was not revoked");
    let w = gw.wallet_view(&wallet_id).await;
    assert_eq!(w["balance_micros"], 0, "nothing was credited: {w}");

    // Signing out works for a viewer.
    b.submit("header form button[type=submit]").await;
    assert!(b.current_url().await.ends_with("/ui/login"));
}
