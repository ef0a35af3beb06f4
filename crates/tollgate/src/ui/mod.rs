//! The dashboard at `/ui` (issue 14, ADR 0035): server-rendered pages over the same
//! functions the admin API calls, signed in with the admin key.
//!
//! A session is a cookie the server can check without storing it: the key's id, an expiry
//! and a nonce, with an HMAC under the server secret (`keys::ServerSecret`). Every page
//! checks that the key is still active and admin, so revoking or rotating it out ends its
//! sessions. Every change is a POST carrying a CSRF token derived from the session, from
//! this origin (`Origin`, `Sec-Fetch-Site`). Pages forbid inline script (CSP), framing and
//! sniffing; the one script and the stylesheet are embedded in the binary.

mod chart;
mod html;
mod pages;

use crate::clock::now_ms;
use crate::state::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use html::esc;
/// How the dashboard writes an amount of micro-USD.
pub use html::usd;
use http::{HeaderMap, HeaderValue, StatusCode};
use std::sync::Arc;

const COOKIE: &str = "tollgate_ui";
const CSS: &str = include_str!("app.css");
const JS: &str = include_str!("app.js");

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(pages::overview))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route(
            "/assets/app.css",
            get(|| asset(CSS, "text/css; charset=utf-8")),
        )
        .route(
            "/assets/app.js",
            get(|| asset(JS, "text/javascript; charset=utf-8")),
        )
        .route("/keys", get(pages::keys).post(pages::create_key))
        .route("/keys/{id}/{action}", post(pages::key_action))
        .route("/wallets", get(pages::wallets).post(pages::create_wallet))
        .route("/wallets/{id}", get(pages::wallet))
        .route("/wallets/{id}/credit", post(pages::credit))
        .route("/requests", get(pages::requests))
        .route("/requests/{id}", get(pages::request))
        .route("/runs", get(pages::runs))
        .route("/runs/{id}", get(pages::run))
        .route("/roi", get(pages::roi))
        .route("/approvals", get(pages::approvals))
        .route("/approvals/{id}/{decision}", post(pages::decide))
        .fallback(|| async { error_page(StatusCode::NOT_FOUND, "No such page.") })
        .layer(axum::middleware::map_response(security_headers))
}

async fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (http::header::CONTENT_TYPE, kind),
            (http::header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

/// On every `/ui` answer: no inline script, no framing, no sniffing, no referrer to other
/// sites, and pages (which show money and keys) never cached. (`no-referrer` would make
/// Chromium send `Origin: null` with the forms' POSTs, which the origin check refuses.)
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(
        http::header::X_FRAME_OPTIONS,
        HeaderValue::from_static("DENY"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(http::header::CACHE_CONTROL) {
        h.insert(
            http::header::CACHE_CONTROL,
            HeaderValue::from_static("no-store"),
        );
    }
    // The gateway's error middleware turns bare error statuses into JSON; these are pages.
    resp.extensions_mut().insert(crate::error::Passthrough);
    resp
}

/// A page that stands instead of the one asked for: sign in first, a refused change, an
/// error (boxed: a `Response` is large for the error side of every `Result`).
pub struct Refused(Box<Response>);

impl From<Response> for Refused {
    fn from(r: Response) -> Self {
        Refused(Box::new(r))
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        *self.0
    }
}

/// Who is signed in.
pub struct Session {
    pub key_id: String,
    pub key_name: String,
    /// Signed in with a read-only dashboard key: pages show no forms, and every change is
    /// refused (`check_change`).
    pub viewer: bool,
    /// The token every form carries back.
    pub csrf: String,
}

fn mac(app: &AppState, what: &str, payload: &str) -> String {
    hex::encode(app.secret.digest(&format!("tollgate-ui-{what}\n{payload}")))
}

fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The session the request's cookie carries, if it is genuine, unexpired, and its key is
/// still an active admin or viewer key.
pub fn session(app: &AppState, headers: &HeaderMap) -> Option<Session> {
    let token = cookie(headers, COOKIE)?;
    let mut parts = token.split('.');
    let (key_id, expires, nonce, sig) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let payload = format!("{key_id}.{expires}.{nonce}");
    if !same(sig, &mac(app, "session", &payload)) {
        return None;
    }
    if expires.parse::<i64>().ok()? <= now_ms() {
        return None;
    }
    let key = app.keys.by_id(key_id)?;
    if key.is_agent() || key.status_at(now_ms()) != crate::records::KeyStatus::Active {
        return None;
    }
    Some(Session {
        key_id: key.id.clone(),
        key_name: key.name.clone(),
        viewer: key.viewer,
        csrf: mac(app, "csrf", token)[..32].to_string(),
    })
}

/// A change (a POST) is honoured only from a page of this gateway (`from_our_page`) and from
/// the admin key's session: a viewer's session looks and changes nothing.
pub fn check_change(
    headers: &HeaderMap,
    s: &Session,
    form: &[(String, String)],
) -> Result<(), Refused> {
    from_our_page(headers, s, form)?;
    if s.viewer {
        return Err(error_page(
            StatusCode::FORBIDDEN,
            "This session's key is a read-only dashboard key: it can look, not change. Nothing was changed; sign in with the admin key to change keys, wallets or approvals.",
        )
        .into());
    }
    Ok(())
}

/// The form's CSRF token matches the session, and the browser, where it says, sent it from
/// this origin.
fn from_our_page(
    headers: &HeaderMap,
    s: &Session,
    form: &[(String, String)],
) -> Result<(), Refused> {
    let token = form
        .iter()
        .find(|(k, _)| k == "csrf")
        .map(|(_, v)| v.as_str());
    let site_ok = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_none_or(|v| v == "same-origin" || v == "none");
    let origin_ok = match (
        headers
            .get(http::header::ORIGIN)
            .and_then(|v| v.to_str().ok()),
        headers
            .get(http::header::HOST)
            .and_then(|v| v.to_str().ok()),
    ) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
        (None, _) => true,
    };
    if token.is_some_and(|t| same(t, &s.csrf)) && site_ok && origin_ok {
        Ok(())
    } else {
        Err(error_page(
            StatusCode::FORBIDDEN,
            "This change did not come from a dashboard page of this gateway (a missing or wrong CSRF token, or another origin). Nothing was changed; reload the page and try again.",
        )
        .into())
    }
}

/// The form's fields, in order (a field may repeat).
pub fn form(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

pub fn field<'a>(form: &'a [(String, String)], name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

fn to_login() -> Response {
    (
        StatusCode::SEE_OTHER,
        [(http::header::LOCATION, "/ui/login")],
    )
        .into_response()
}

/// The page for a request: a redirect to the sign-in page without a session.
pub fn signed_in(app: &AppState, headers: &HeaderMap) -> Result<Session, Refused> {
    session(app, headers).ok_or_else(|| to_login().into())
}

pub fn see_other(to: &str) -> Response {
    let loc = HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static("/ui"));
    (StatusCode::SEE_OTHER, [(http::header::LOCATION, loc)]).into_response()
}

/// A whole page: the navigation, the title, the body (already escaped where it must be).
pub fn page(s: &Session, active: &str, title: &str, body: &str) -> Response {
    let nav = [
        ("/ui", "Overview"),
        ("/ui/keys", "Agents and keys"),
        ("/ui/wallets", "Wallets"),
        ("/ui/runs", "Runs"),
        ("/ui/requests", "Requests"),
        ("/ui/roi", "ROI"),
        ("/ui/approvals", "Approvals"),
    ]
    .iter()
    .map(|(href, name)| {
        let cur = if *name == active {
            " aria-current=\"page\""
        } else {
            ""
        };
        format!("<a href=\"{href}\"{cur}>{name}</a>")
    })
    .collect::<String>();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{t} · tollgate</title><link rel=\"stylesheet\" href=\"/ui/assets/app.css\">\
         <script src=\"/ui/assets/app.js\" defer></script></head><body>\
         <header><span class=\"brand\">tollgate</span><nav>{nav}</nav>\
         <form method=\"post\" action=\"/ui/logout\" class=\"signout\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <span class=\"who\">{who}{ro}</span><button type=\"submit\">Sign out</button></form></header>\
         <main><h1>{t}</h1>{body}</main></body></html>",
        t = esc(title),
        csrf = esc(&s.csrf),
        who = esc(&s.key_name),
        ro = if s.viewer { " (read-only)" } else { "" },
    );
    (
        [(http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

/// A page that says what went wrong, with the status it deserves.
pub fn error_page(status: StatusCode, message: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{code} · tollgate</title><link rel=\"stylesheet\" href=\"/ui/assets/app.css\"></head>\
         <body><main class=\"narrow\"><h1>{code}</h1><p class=\"error\" role=\"alert\">{m}</p>\
         <p><a href=\"/ui\">Back to the dashboard</a></p></main></body></html>",
        code = status.as_u16(),
        m = esc(message),
    );
    (
        status,
        [(http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

fn login_page(status: StatusCode, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!("<p class=\"error\" role=\"alert\">{}</p>", esc(m)))
        .unwrap_or_default();
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>Sign in · tollgate</title><link rel=\"stylesheet\" href=\"/ui/assets/app.css\"></head>\
         <body><main class=\"narrow\"><h1>tollgate</h1>{msg}\
         <form method=\"post\" action=\"/ui/login\" class=\"stack\">\
         <label for=\"key\">Admin or viewer key</label>\
         <input id=\"key\" name=\"key\" type=\"password\" autocomplete=\"current-password\" required placeholder=\"tg_…\">\
         <button type=\"submit\">Sign in</button></form>\
         <p class=\"hint\">The admin key was printed when the gateway first started (or set with \
         <code>TOLLGATE_ADMIN_KEY</code>); <code>tollgate keys create --name NAME --viewer</code> \
         makes a read-only one, for people who only look.</p>\
         </main></body></html>"
    );
    (
        status,
        [(http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

async fn login_form(State(app): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if session(&app, &headers).is_some() {
        return see_other("/ui");
    }
    login_page(StatusCode::OK, None)
}

async fn login(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let f = form(&body);
    let Some(secret) = field(&f, "key") else {
        return login_page(
            StatusCode::BAD_REQUEST,
            Some("Paste the admin key or a viewer key."),
        );
    };
    let key = app.keys.get(&app.secret.digest(secret));
    let Some(key) = key.filter(|k| k.status_at(now_ms()) == crate::records::KeyStatus::Active)
    else {
        return login_page(
            StatusCode::UNAUTHORIZED,
            Some("That is not a key of this gateway, or it was revoked or has expired."),
        );
    };
    if key.is_agent() {
        return login_page(
            StatusCode::FORBIDDEN,
            Some("That is an agent key; the dashboard needs the admin key or a viewer key."),
        );
    }
    let ttl = i64::try_from(app.ui.session_ttl.as_millis()).unwrap_or(i64::MAX);
    let expires = now_ms().saturating_add(ttl);
    let nonce = hex::encode(rand::random::<[u8; 16]>());
    let payload = format!("{}.{expires}.{nonce}", key.id);
    let token = format!("{payload}.{}", mac(&app, "session", &payload));
    // Secure where the browser reached us over TLS (directly or through a proxy that says
    // so); on plain loopback HTTP a Secure cookie would not be sent back.
    let secure = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    let cookie = format!(
        "{COOKIE}={token}; Path=/ui; HttpOnly; SameSite=Strict; Max-Age={}{}",
        ttl / 1000,
        if secure { "; Secure" } else { "" }
    );
    tracing::info!(key = %key.id, viewer = key.viewer, "dashboard sign-in");
    let mut resp = see_other("/ui");
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(http::header::SET_COOKIE, v);
    }
    resp
}

async fn logout(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if let Some(s) = session(&app, &headers) {
        // Signing out changes nothing but the browser's cookie: viewers may.
        if let Err(r) = from_our_page(&headers, &s, &form(&body)) {
            return r.into_response();
        }
    }
    let mut resp = see_other("/ui/login");
    resp.headers_mut().insert(
        http::header::SET_COOKIE,
        HeaderValue::from_static("tollgate_ui=; Path=/ui; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}
