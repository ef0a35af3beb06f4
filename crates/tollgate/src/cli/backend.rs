//! Where a command acts: on the store directly (`--data-dir`, `--store-url`), or on a running
//! gateway through its admin API (`--url` and the admin key).

use super::*;

/// Acts on the data directory, or calls a running gateway.
pub(crate) enum Backend {
    Local {
        store: Store,
        secret: ServerSecret,
    },
    Remote {
        client: reqwest::Client,
        url: String,
        admin_key: String,
    },
}

impl Backend {
    pub(crate) fn new(t: &Target) -> anyhow::Result<Backend> {
        match &t.url {
            Some(url) => {
                tollgate::server::init_tls();
                let admin_key = t
                    .admin_key
                    .clone()
                    .context("--url needs the admin key (--admin-key or TOLLGATE_ADMIN_KEY)")?;
                Ok(Backend::Remote {
                    client: reqwest::Client::new(),
                    url: url.trim_end_matches('/').to_string(),
                    admin_key,
                })
            }
            None => {
                let location =
                    tollgate::db::Location::from_config(t.store_url.as_deref(), &t.data_dir);
                // A new data directory gets its store, as `serve` would make it: the first
                // key is often created before the gateway ever ran.
                if let tollgate::db::Location::Sqlite(path) = &location {
                    if !path.exists() {
                        std::fs::create_dir_all(&t.data_dir).with_context(|| {
                            format!("creating the data directory {}", t.data_dir.display())
                        })?;
                        eprintln!(
                            "note: no tollgate data in {}; created a new store there (a gateway serving another directory will not see it: pass --data-dir, or --url)",
                            t.data_dir.display()
                        );
                    }
                }
                let store = Store::open_at(&location)
                    .with_context(|| format!("opening the store at {}", location.describe()))?;
                let secret =
                    ServerSecret::load(&t.data_dir, std::env::var("TOLLGATE_SECRET").ok())?;
                Ok(Backend::Local { store, secret })
            }
        }
    }

    /// A GET whose answer is text (an export), not JSON.
    pub(crate) async fn get_text(&self, path: &str) -> anyhow::Result<String> {
        let Backend::Remote {
            client,
            url,
            admin_key,
        } = self
        else {
            bail!("not a remote backend")
        };
        let resp = client
            .get(format!("{url}{path}"))
            .bearer_auth(admin_key)
            .send()
            .await
            .with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("{status}: {text}");
        }
        Ok(text)
    }

    pub(crate) async fn call<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let Backend::Remote {
            client,
            url,
            admin_key,
        } = self
        else {
            bail!("not a remote backend")
        };
        let mut req = client
            .request(method, format!("{url}{path}"))
            .bearer_auth(admin_key);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(serde_json::to_vec(&b)?);
        }
        let resp = req.send().await.with_context(|| format!("calling {url}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            let msg = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(|m| m.as_str())
                        .map(str::to_string)
                })
                .unwrap_or(text);
            if status == reqwest::StatusCode::UNAUTHORIZED
                || status == reqwest::StatusCode::FORBIDDEN
            {
                bail!("{status}: {msg}\nhint: {url} did not accept the admin key; check --admin-key or TOLLGATE_ADMIN_KEY (serve prints the admin key once, on its first start)");
            }
            bail!("{status}: {msg}");
        }
        Ok(serde_json::from_str(&text)?)
    }
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b':' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
