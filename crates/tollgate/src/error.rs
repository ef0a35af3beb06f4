//! The one error type the HTTP surface returns, written in the caller's dialect.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use tollgate_proto::error::{anthropic_error_body, openai_error_body};

/// The wire dialect a client speaks, which decides the shape of its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    Anthropic,
}

/// The dialect of a path: Anthropic's for `/v1/messages` and below, OpenAI's elsewhere
/// (the OpenAI endpoints, `/admin/*`, tool routes and unknown paths).
pub fn dialect_for_path(path: &str) -> Dialect {
    if path == "/v1/messages" || path.starts_with("/v1/messages/") {
        Dialect::Anthropic
    } else {
        Dialect::OpenAi
    }
}

/// Marks a response that carries another service's answer as it is (a tool route's
/// upstream): its error statuses and bodies are that service's, not tollgate's.
#[derive(Debug, Clone, Copy)]
pub struct Passthrough;

/// A low-cardinality name for each way a request can fail. It is what usage records and
/// metrics carry as `error_kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    InvalidApiKey,
    KeyExpired,
    KeyRevoked,
    ModelNotAllowed,
    AdminOnly,
    /// A read-only dashboard key was sent to an API: it opens `/ui` and nothing else.
    DashboardOnly,
    ModelNotFound,
    NotFound,
    /// The path exists, the method does not.
    MethodNotAllowed,
    /// The model's deployments speak another dialect and cannot serve this endpoint.
    DialectMismatch,
    BodyTooLarge,
    /// The request body did not arrive within `[server] body_read_timeout`.
    RequestTimeout,
    /// One of this key's own limits refused the request.
    RateLimited,
    /// The agent is repeating itself.
    LoopDetected,
    /// The agent's retries exceed its retry budget.
    RetryBudgetExhausted,
    /// A tool policy refused the tool call.
    ToolDenied,
    /// The redaction policy refuses to send what the request contains (`[redaction]`).
    SensitiveData,
    /// A tool policy wants a human's approval first; the call is parked.
    ApprovalPending,
    /// The wallet cannot cover the request's hold.
    InsufficientFunds,
    /// The request's estimated cost is above its cap (`x-tollgate-max-cost` or the key's).
    MaxCostExceeded,
    /// A run envelope's cap is spent.
    RunBudgetExhausted,
    /// A budget's hard limit is reached.
    BudgetExceeded,
    /// The shared limiter (Redis) is unreachable and this limit fails closed.
    LimiterUnavailable,
    /// The ledger (the store, or Redis in Redis mode) did not answer in time: money checks
    /// fail closed, before any upstream call.
    WalletUnavailable,
    UpstreamRateLimited,
    /// The provider refused the request itself (a 4xx other than 429): passed through.
    UpstreamRejected,
    /// The provider rejected tollgate's own credentials: an operator problem, not the client's.
    UpstreamAuth,
    UpstreamError,
    UpstreamUnavailable,
    NoHealthyDeployment,
    UpstreamTimeout,
    Internal,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::InvalidApiKey => "invalid_api_key",
            ErrorKind::KeyExpired => "key_expired",
            ErrorKind::KeyRevoked => "key_revoked",
            ErrorKind::ModelNotAllowed => "model_not_allowed",
            ErrorKind::AdminOnly => "admin_only",
            ErrorKind::DashboardOnly => "dashboard_only",
            ErrorKind::ModelNotFound => "model_not_found",
            ErrorKind::NotFound => "not_found",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::DialectMismatch => "dialect_mismatch",
            ErrorKind::BodyTooLarge => "request_too_large",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::LoopDetected => "loop_detected",
            ErrorKind::ToolDenied => "tool_denied",
            ErrorKind::SensitiveData => "sensitive_data",
            ErrorKind::ApprovalPending => "approval_pending",
            ErrorKind::RetryBudgetExhausted => "retry_budget_exhausted",
            ErrorKind::InsufficientFunds => "insufficient_funds",
            ErrorKind::MaxCostExceeded => "max_cost_exceeded",
            ErrorKind::RunBudgetExhausted => "run_budget_exhausted",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::LimiterUnavailable => "limiter_unavailable",
            ErrorKind::WalletUnavailable => "wallet_unavailable",
            ErrorKind::UpstreamRateLimited => "upstream_rate_limited",
            ErrorKind::UpstreamRejected => "upstream_rejected",
            ErrorKind::UpstreamAuth => "upstream_auth",
            ErrorKind::UpstreamError => "upstream_error",
            ErrorKind::UpstreamUnavailable => "upstream_unavailable",
            ErrorKind::NoHealthyDeployment => "no_healthy_deployment",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::Internal => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest | ErrorKind::DialectMismatch | ErrorKind::SensitiveData => {
                StatusCode::BAD_REQUEST
            }
            ErrorKind::InvalidApiKey | ErrorKind::KeyExpired | ErrorKind::KeyRevoked => {
                StatusCode::UNAUTHORIZED
            }
            ErrorKind::ModelNotAllowed | ErrorKind::AdminOnly | ErrorKind::DashboardOnly => {
                StatusCode::FORBIDDEN
            }
            ErrorKind::ModelNotFound | ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::InsufficientFunds
            | ErrorKind::MaxCostExceeded
            | ErrorKind::RunBudgetExhausted
            | ErrorKind::BudgetExceeded => StatusCode::PAYMENT_REQUIRED,
            ErrorKind::UpstreamRateLimited | ErrorKind::RateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            // Not 429: every agent SDK retries a 429, and Codex retries even 422 and ignores
            // x-should-retry; a 400 is the one status none of them resend (ADR 0019).
            ErrorKind::LoopDetected | ErrorKind::RetryBudgetExhausted => StatusCode::BAD_REQUEST,
            ErrorKind::ToolDenied | ErrorKind::ApprovalPending => StatusCode::FORBIDDEN,
            ErrorKind::UpstreamRejected => StatusCode::BAD_REQUEST,
            ErrorKind::UpstreamAuth | ErrorKind::UpstreamError | ErrorKind::UpstreamUnavailable => {
                StatusCode::BAD_GATEWAY
            }
            ErrorKind::NoHealthyDeployment
            | ErrorKind::LimiterUnavailable
            | ErrorKind::WalletUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `error.type`.
    fn openai_type(self) -> &'static str {
        match self {
            ErrorKind::BadRequest
            | ErrorKind::InvalidApiKey
            | ErrorKind::KeyExpired
            | ErrorKind::KeyRevoked
            | ErrorKind::ModelNotFound
            | ErrorKind::NotFound
            | ErrorKind::MethodNotAllowed
            | ErrorKind::BodyTooLarge
            | ErrorKind::RequestTimeout
            | ErrorKind::UpstreamRejected
            | ErrorKind::SensitiveData
            | ErrorKind::DialectMismatch => "invalid_request_error",
            ErrorKind::ModelNotAllowed
            | ErrorKind::AdminOnly
            | ErrorKind::DashboardOnly
            | ErrorKind::ToolDenied
            | ErrorKind::ApprovalPending => "permission_error",
            ErrorKind::InsufficientFunds
            | ErrorKind::RunBudgetExhausted
            | ErrorKind::BudgetExceeded => "insufficient_funds",
            ErrorKind::MaxCostExceeded => "invalid_request_error",
            ErrorKind::LoopDetected | ErrorKind::RetryBudgetExhausted => "invalid_request_error",
            ErrorKind::UpstreamRateLimited | ErrorKind::RateLimited => "rate_limit_error",
            ErrorKind::UpstreamTimeout => "timeout_error",
            _ => "server_error",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ApiError {
    pub kind: ErrorKind,
    pub message: String,
    pub param: Option<&'static str>,
    /// Overrides the kind's status, for upstream answers passed through as they came.
    pub status: Option<StatusCode>,
    pub retry_after_secs: Option<u64>,
    /// An upstream error body, returned verbatim to clients of the same dialect.
    pub upstream_body: Option<bytes::Bytes>,
    pub upstream_dialect: Option<Dialect>,
    /// Sent with the error, e.g. the `x-ratelimit-*` state of the limit that refused it.
    pub headers: Option<Box<http::HeaderMap>>,
    /// Extra fields of the error object, e.g. the balance and the hold a 402 needed.
    pub details: Option<Box<serde_json::Map<String, serde_json::Value>>>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ApiError {
        ApiError {
            kind,
            message: message.into(),
            param: None,
            status: None,
            retry_after_secs: None,
            upstream_body: None,
            upstream_dialect: None,
            headers: None,
            details: None,
        }
    }

    pub fn details(mut self, d: serde_json::Map<String, serde_json::Value>) -> ApiError {
        self.details = Some(Box::new(d));
        self
    }

    pub fn param(mut self, p: &'static str) -> ApiError {
        self.param = Some(p);
        self
    }

    pub fn retry_after(mut self, secs: u64) -> ApiError {
        self.retry_after_secs = Some(secs);
        self
    }

    pub fn status(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.kind.status())
    }

    /// The error as the client's dialect writes it. An upstream error body is passed through
    /// only to clients of the upstream's own dialect.
    pub fn into_dialect_response(self, dialect: Dialect) -> Response {
        let status = self.status();
        let passthrough = match (&self.upstream_body, self.upstream_dialect) {
            (Some(b), Some(d)) if d == dialect => Some(b.to_vec()),
            _ => None,
        };
        let body = passthrough.unwrap_or_else(|| match dialect {
            Dialect::OpenAi => openai_error_body(
                &self.message,
                self.kind.openai_type(),
                self.param,
                Some(self.kind.as_str()),
            ),
            Dialect::Anthropic => anthropic_error_body(anthropic_type(status), &self.message),
        });
        let body = match &self.details {
            Some(d) => with_details(body, d),
            None => body,
        };
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after_secs {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        // An agent that loops, or whose retries are already over budget, must see the
        // refusal, not stall behind its SDK's silent retries: the status is already one the
        // SDKs do not retry, and this says so to any client that asks.
        if matches!(
            self.kind,
            ErrorKind::LoopDetected | ErrorKind::RetryBudgetExhausted | ErrorKind::SensitiveData
        ) {
            h.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let Some(extra) = self.headers {
            h.extend(*extra);
        }
        resp.extensions_mut().insert(self.kind);
        resp
    }
}

/// Anthropic's `error.type`, chosen by status as Anthropic's API does.
/// Adds fields to the body's `error` object (both dialects have one).
fn with_details(body: Vec<u8>, d: &serde_json::Map<String, serde_json::Value>) -> Vec<u8> {
    let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return body;
    };
    if let Some(e) = v.get_mut("error").and_then(|e| e.as_object_mut()) {
        for (k, x) in d {
            e.insert(k.clone(), x.clone());
        }
    }
    serde_json::to_vec(&v).unwrap_or(body)
}

fn anthropic_type(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 405 | 408 | 422 => "invalid_request_error",
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        504 => "timeout_error",
        _ => "api_error",
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

/// OpenAI's shape: the default for routes that are not dialect-specific (admin, fallbacks).
impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_dialect_response(Dialect::OpenAi)
    }
}

/// A request body that took longer than `body_read_timeout` to arrive.
#[derive(Debug)]
pub struct BodyTimeout(pub std::time::Duration);

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the request body did not arrive within {:?} ([server] body_read_timeout)",
            self.0
        )
    }
}

impl std::error::Error for BodyTimeout {}

/// Whether an error (or anything in its source chain) is a body read timeout.
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimeout>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An error and its sources, `outer: inner: innermost`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
