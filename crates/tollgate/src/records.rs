//! The records every layer passes around: a virtual key as stored and cached, and the usage
//! record of one request. Plain data, no behaviour beyond reading itself.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyRecord {
    pub id: String,
    /// The agent this key belongs to.
    pub name: String,
    pub team: Option<String>,
    pub project: Option<String>,
    /// Allowed model names; `prefix*` matches by prefix; empty means every model.
    pub models: Vec<String>,
    pub tags: BTreeMap<String, String>,
    pub admin: bool,
    /// A read-only dashboard key: it signs in to `/ui` to look and is refused everywhere
    /// else (the model and MCP endpoints, tool routes, the admin API, every dashboard form).
    #[serde(default)]
    pub viewer: bool,
    /// The first characters of the secret, for humans.
    pub prefix: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
    pub revoked_ms: Option<i64>,
    pub rotated_from: Option<String>,
    /// Overrides of the configured default limits.
    #[serde(default)]
    pub limits: KeyLimits,
    /// The organisation the key belongs to, for its wallet; `default` when unset.
    #[serde(default)]
    pub org: Option<String>,
    /// MCP tools the key may list and call at `/mcp`, as `server__tool` patterns (`server__*`,
    /// `*`); empty means none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<String>,
    /// The secrets that open this key, newest first (filled by the admin reads; the request
    /// path's cache holds one record per secret instead). Rotation adds one and retires the
    /// others after a grace period: the key's id, and with it its wallet, budgets, limits
    /// and attribution, never changes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<KeySecret>,
}

/// One secret of a key: its shown prefix and its own expiry (a rotated-out secret's end of
/// grace). A secret is live while neither it nor its key has expired or been revoked.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeySecret {
    pub prefix: String,
    pub created_ms: i64,
    pub expires_ms: Option<i64>,
}

/// Limit overrides of a key or a team; unset fields use the configured defaults.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<u32>,
    /// Refuse a request whose estimated cost is above this (micro-USD).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_micros: Option<u64>,
    /// When the wallet cannot cover `max_tokens`, lower `max_tokens` to what it can pay
    /// instead of refusing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clamp_max_tokens: Option<bool>,
}

impl KeyRecord {
    pub fn allows_model(&self, model: &str) -> bool {
        self.models.is_empty() || self.models.iter().any(|pat| pattern_matches(pat, model))
    }

    /// A key an agent calls with: neither the admin key nor a dashboard viewer's.
    pub fn is_agent(&self) -> bool {
        !self.admin && !self.viewer
    }

    pub fn status_at(&self, now_ms: i64) -> KeyStatus {
        if self.revoked_ms.is_some_and(|r| r <= now_ms) {
            KeyStatus::Revoked
        } else if self.expires_ms.is_some_and(|e| e <= now_ms) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    Active,
    Expired,
    Revoked,
}

/// `*` at the end matches any suffix; anything else must match exactly.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// What a tool policy decided for one tool call (`policy.rs`), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// The tool as the policy saw it (`server__tool`, a route's name, a model's tool).
    pub tool: String,
    pub decision: crate::config::ToolDecision,
    pub policy: String,
    /// The rule that decided (its index), `None` when none matched.
    pub rule: Option<usize>,
    pub reason: String,
}

pub use crate::redact::Redacted;

/// One per request that got past authentication.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct UsageRecord {
    pub id: String,
    pub ts_ms: i64,
    pub endpoint: String,
    pub key_id: String,
    pub agent: String,
    pub team: Option<String>,
    pub project: Option<String>,
    /// The key's organisation (`None`: the `default` one).
    #[serde(default)]
    pub org: Option<String>,
    pub tags: BTreeMap<String, String>,
    pub model_requested: Option<String>,
    pub provider: Option<String>,
    pub model_served: Option<String>,
    pub attempts: u32,
    pub status: u16,
    pub error_kind: Option<String>,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    /// Anthropic prompt-cache writes (part of `input_tokens`), by TTL.
    #[serde(default)]
    pub cache_write_5m_tokens: u64,
    #[serde(default)]
    pub cache_write_1h_tokens: u64,
    /// `provider`, `estimated` (the provider gave no usage), or `none` (nothing reached a provider).
    pub usage_source: String,
    pub cost_micros: u64,
    pub price_version: Option<String>,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    pub stream: bool,
    pub client_disconnected: bool,
    /// Body sizes, recorded for tool routes.
    #[serde(default)]
    pub request_bytes: u64,
    #[serde(default)]
    pub response_bytes: u64,
    /// Set when the answer came from another request instead of an upstream call of this
    /// one's: `coalesced` (joined an identical request in flight), `replayed` (a retry with
    /// a known `Idempotency-Key`), `loop_replay` (the loop guard answered from the last
    /// response). Such records cost nothing; `reused_from` names the request that paid.
    #[serde(default)]
    pub reused: Option<String>,
    #[serde(default)]
    pub reused_from: Option<String>,
    /// The wallet that held money for this request; the hold is settled (released, and the
    /// cost captured) in the same transaction that writes this record.
    #[serde(default)]
    pub wallet_id: Option<String>,
    /// Cost the wallet could not pay without passing its floor (not captured).
    #[serde(default)]
    pub shortfall_micros: u64,
    /// The run envelope (`x-tollgate-run`) the request drew on.
    #[serde(default)]
    pub run_id: Option<String>,
    /// Tool-policy decisions on this request's tool calls, for the audit log (the writer
    /// appends them with the record). Not a column of the usage table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy: Vec<Verdict>,
    /// What redaction found in the request and its answer, by detector, action and place
    /// (never the values), for the audit log. Not a column of the usage table.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub redactions: Vec<Redacted>,
    /// What the exact response cache did with it (`hit`, `miss`, `bypass`), when it applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// A cascade alias's path: the tiers tried, why each before the answering one was passed
    /// over, and which answered (`mock-small (the answer is empty) -> mock-large`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cascade: Option<String>,
    /// Tokens and money saved on this request, by what saved them (a cache hit, compressed
    /// tool output, ...): never counted as spent, reported next to spend.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub savings: Vec<Saving>,
    /// Why it ended, in words, when it did not end well: the refusal's or the failure's
    /// message (which limit, which wallet, what the provider said), at most 300 characters.
    #[serde(default)]
    pub detail: Option<String>,
    /// The request's and the answer's bodies (`[logging] bodies`), capped, kept in
    /// `usage_bodies` beside the record.
    #[serde(skip)]
    pub bodies: Option<Box<Bodies>>,
    /// The hold admitted for this request outside the store's holds (by Redis for hot
    /// wallets, or in the writer's book in memory on SQLite): written to the ledger with the
    /// request's settle.
    #[serde(skip)]
    pub hot_hold_micros: Option<i64>,
    /// The request reserved in envelopes (its run, budgets), settled with this record.
    #[serde(skip)]
    pub enveloped: bool,
    /// What its settle captured from the wallet (`commit_batch` sets it, with
    /// `shortfall_micros`): the ledger's `capture` entry, for analytics.
    #[serde(skip)]
    pub captured_micros: Option<i64>,
    /// The request's trace (`otel`), ended and exported when the record is committed.
    #[serde(skip)]
    pub trace: crate::otel::TraceSlot,
    /// `gen_ai.provider.name` of the deployment that served it (`openai`, `anthropic`).
    #[serde(skip)]
    pub genai_provider: Option<&'static str>,
}

/// Tokens and micro-USD one saver kept a request from spending.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saving {
    /// `cache`, or `compress.<transform>`, ...
    pub saver: String,
    pub tokens: u64,
    pub micros: u64,
}

/// A request's bodies as the request log keeps them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bodies {
    pub request: String,
    pub response: String,
    /// One of them was longer than `[logging] max_body_bytes` and was cut.
    pub truncated: bool,
    /// Bytes the response may still take (streams fill it as they go).
    #[serde(skip)]
    pub room: usize,
}

impl Bodies {
    /// The request, cut at `max` bytes (on a character boundary).
    pub fn new(request: &[u8], max: usize) -> Bodies {
        let (request, cut) = cut(request, max);
        Bodies {
            request,
            response: String::new(),
            truncated: cut,
            room: max,
        }
    }

    /// Appends answer bytes while there is room.
    pub fn push_response(&mut self, bytes: &[u8]) {
        if self.room == 0 {
            self.truncated |= !bytes.is_empty();
            return;
        }
        let (text, cut) = cut(bytes, self.room);
        self.room -= text.len();
        self.truncated |= cut;
        self.response.push_str(&text);
    }
}

fn cut(bytes: &[u8], max: usize) -> (String, bool) {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= max {
        return (text.into_owned(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (text[..end].to_string(), true)
}
