//! One policy engine for every tool call an agent makes: over MCP (`mcp.rs`), through a tool
//! route (`routes.rs`), or asked for by the model in an answer (`proxy/toolcalls.rs`). Rules
//! are CEL expressions (the `cel` crate, ADR 0025), compiled when the configuration loads,
//! evaluated in order; the first true one decides. A key with a policy is denied every call
//! no rule allows, and a rule that fails to evaluate (a missing field, a type error) denies:
//! a policy fails closed.

use crate::config::{ToolDecision, ToolPolicyConfig};
use crate::keys::{pattern_matches, KeyRecord};
use serde_json::{json, Value};

pub struct Policies {
    sets: Vec<PolicySet>,
}

struct PolicySet {
    name: String,
    keys: Vec<String>,
    teams: Vec<String>,
    rules: Vec<Rule>,
}

struct Rule {
    when: cel::Program,
    source: String,
    decision: ToolDecision,
    reason: Option<String>,
}

/// One tool call as the policy sees it.
pub struct Call<'a> {
    /// `mcp`, `route` or `model`.
    pub surface: &'a str,
    /// The MCP server, the route, or the provider's model answer (`model`).
    pub server: &'a str,
    pub tool: &'a str,
    pub args: &'a Value,
    pub model: Option<&'a str>,
    pub run: Option<&'a str>,
}

pub use crate::records::Verdict;

impl Call<'_> {
    /// The tool's name in approvals and the audit log: `server__tool` for MCP,
    /// `route:<name>` for a tool route, the model's tool name for a model's tool call.
    pub fn shown(&self) -> String {
        match self.surface {
            "mcp" => format!("{}__{}", self.server, self.tool),
            "route" => format!("route:{}", self.tool),
            _ => self.tool.to_string(),
        }
    }
}

impl Policies {
    pub fn build(cfg: &[ToolPolicyConfig]) -> Result<Policies, String> {
        let mut sets = Vec::new();
        for p in cfg {
            let mut rules = Vec::new();
            for (i, r) in p.rules.iter().enumerate() {
                let when = cel::Program::compile(&r.when).map_err(|e| {
                    format!(
                        "tool_policies.{}.rules[{i}].when: not a CEL expression: {e}",
                        p.name
                    )
                })?;
                rules.push(Rule {
                    when,
                    source: r.when.clone(),
                    decision: r.decision,
                    reason: r.reason.clone(),
                });
            }
            sets.push(PolicySet {
                name: p.name.clone(),
                keys: p.keys.clone(),
                teams: p.teams.clone(),
                rules,
            });
        }
        Ok(Policies { sets })
    }

    /// The policy that governs `key`'s tool calls: the first that names it.
    fn for_key(&self, key: &KeyRecord) -> Option<&PolicySet> {
        self.sets.iter().find(|s| {
            s.keys.iter().any(|p| pattern_matches(p, &key.name))
                || key
                    .team
                    .as_deref()
                    .is_some_and(|t| s.teams.iter().any(|p| pattern_matches(p, t)))
        })
    }

    /// Whether any policy names `key`: a caller can skip building a call's context when not.
    pub fn governs(&self, key: &KeyRecord) -> bool {
        self.for_key(key).is_some()
    }

    /// The decision for `call` by `key`, or `None` when no policy names the key (its calls
    /// are not governed).
    pub fn decide(&self, key: &KeyRecord, call: &Call) -> Option<Verdict> {
        self.decide_in(key, call, Session::default())
    }

    /// `decide`, with the key's session counters in the context.
    pub fn decide_in(&self, key: &KeyRecord, call: &Call, session: Session) -> Option<Verdict> {
        let set = self.for_key(key)?;
        let mut ctx = cel::Context::default();
        for (name, value) in context(key, call, session) {
            if ctx.add_variable(name, value).is_err() {
                return Some(set.deny(call, None, "its context could not be built".into()));
            }
        }
        for (i, rule) in set.rules.iter().enumerate() {
            // The interpreter is third-party code fed agent-controlled arguments: a panic in
            // it denies the call instead of taking the request (and its settlement) down.
            let result =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| rule.when.execute(&ctx)));
            match result {
                Ok(Ok(cel::Value::Bool(true))) => {
                    let reason = rule.reason.clone().unwrap_or_else(|| match rule.decision {
                        ToolDecision::Allow => format!("allowed by policy '{}'", set.name),
                        ToolDecision::Deny => {
                            format!("policy '{}' does not allow '{}'", set.name, call.tool)
                        }
                        ToolDecision::RequireApproval => format!(
                            "policy '{}' needs a human's approval for '{}'",
                            set.name, call.tool
                        ),
                    });
                    return Some(Verdict {
                        tool: call.shown(),
                        decision: rule.decision,
                        policy: set.name.clone(),
                        rule: Some(i),
                        reason,
                    });
                }
                Ok(Ok(cel::Value::Bool(false))) => {}
                Ok(Ok(other)) => {
                    return Some(set.deny(
                        call,
                        Some(i),
                        format!(
                            "rule {i} ({}) gave {:?}, not a bool",
                            rule.source,
                            other.type_of()
                        ),
                    ))
                }
                Ok(Err(e)) => {
                    return Some(set.deny(
                        call,
                        Some(i),
                        format!("rule {i} ({}) failed to evaluate: {e}", rule.source),
                    ))
                }
                Err(_) => {
                    return Some(set.deny(
                        call,
                        Some(i),
                        format!("rule {i} ({}) crashed", rule.source),
                    ))
                }
            }
        }
        Some(set.deny(
            call,
            None,
            format!("no rule of policy '{}' allows '{}'", set.name, call.tool),
        ))
    }
}

impl PolicySet {
    fn deny(&self, call: &Call, rule: Option<usize>, why: String) -> Verdict {
        let reason = match rule {
            // Fail closed, and say so: the operator has a rule to fix.
            Some(_) => format!("denied by policy '{}': {why}", self.name),
            None => why,
        };
        Verdict {
            tool: call.shown(),
            decision: ToolDecision::Deny,
            policy: self.name.clone(),
            rule,
            reason,
        }
    }
}

/// What a key has done in the current clock hour, on this replica: the tool calls its policy
/// ruled on before this one, and what its requests cost (models and tools). A rule reads
/// them as `session.calls` and `session.spend_micros`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Session {
    pub calls: u64,
    pub spend_micros: u64,
}

/// The `Session` of every key a policy governs: counted in memory per clock hour (a counter
/// shared by replicas would put a store round trip on every tool call).
#[derive(Default)]
pub struct Sessions {
    /// Set once any key is counted: until then a record's spend costs nothing to skip.
    any: std::sync::atomic::AtomicBool,
    map: std::sync::Mutex<std::collections::HashMap<String, (i64, Session)>>,
}

/// Keys counted at once; past it, the hours gone are dropped, then the new key is not counted.
const MAX_SESSIONS: usize = 100_000;

impl Sessions {
    fn hour(now_ms: i64) -> i64 {
        now_ms.div_euclid(3_600_000)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, (i64, Session)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key_id: &str, now_ms: i64) -> Session {
        match self.lock().get(key_id) {
            Some((h, s)) if *h == Self::hour(now_ms) => *s,
            _ => Session::default(),
        }
    }

    fn update(&self, key_id: &str, now_ms: i64, create: bool, f: impl FnOnce(&mut Session)) {
        let hour = Self::hour(now_ms);
        let mut map = self.lock();
        if !map.contains_key(key_id) {
            if !create {
                return;
            }
            if map.len() >= MAX_SESSIONS {
                map.retain(|_, (h, _)| *h == hour);
                if map.len() >= MAX_SESSIONS {
                    return;
                }
            }
            map.insert(key_id.to_string(), (hour, Session::default()));
            self.any.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some((h, s)) = map.get_mut(key_id) {
            if *h != hour {
                *h = hour;
                *s = Session::default();
            }
            f(s);
        }
    }

    /// One more tool call of `key_id` ruled on.
    pub fn note_call(&self, key_id: &str, now_ms: i64) {
        self.update(key_id, now_ms, true, |s| s.calls += 1);
    }

    /// What a request of `key_id` cost, for keys whose calls are counted.
    pub fn note_spend(&self, key_id: &str, micros: u64, now_ms: i64) {
        if micros == 0 || !self.any.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        self.update(key_id, now_ms, false, |s| {
            s.spend_micros = s.spend_micros.saturating_add(micros)
        });
    }
}

/// The variables a rule sees.
fn context(key: &KeyRecord, call: &Call, session: Session) -> Vec<(&'static str, Value)> {
    let now = crate::clock::now_ms();
    let secs = now.div_euclid(1000);
    vec![
        (
            "key",
            json!({
                "id": key.id, "name": key.name, "team": key.team, "project": key.project,
                "org": key.org, "tags": key.tags,
            }),
        ),
        (
            "tool",
            json!({ "name": call.tool, "server": call.server, "args": call.args }),
        ),
        ("surface", json!(call.surface)),
        ("model", json!(call.model)),
        ("run", json!(call.run)),
        (
            "session",
            json!({ "calls": session.calls, "spend_micros": session.spend_micros }),
        ),
        (
            "time",
            json!({
                "unix": secs,
                "hour": secs.rem_euclid(86_400) / 3600,
                // 1970-01-01 was a Thursday; 0 = Sunday.
                "weekday": (secs.div_euclid(86_400) + 4).rem_euclid(7),
            }),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ToolRuleConfig;

    fn key(name: &str) -> KeyRecord {
        serde_json::from_value(json!({
            "id": "key_1", "name": name, "team": "support", "project": null, "models": [],
            "tags": {}, "admin": false, "prefix": "tg_x", "created_ms": 0, "expires_ms": null,
            "revoked_ms": null, "rotated_from": null,
        }))
        .unwrap()
    }

    fn policies(rules: &[(&str, ToolDecision)]) -> Policies {
        Policies::build(&[ToolPolicyConfig {
            name: "desk".into(),
            keys: vec!["support-*".into()],
            teams: vec![],
            rules: rules
                .iter()
                .map(|(w, d)| ToolRuleConfig {
                    when: w.to_string(),
                    decision: *d,
                    reason: None,
                })
                .collect(),
        }])
        .unwrap()
    }

    fn call<'a>(tool: &'a str, args: &'a Value) -> Call<'a> {
        Call {
            surface: "mcp",
            server: "support",
            tool,
            args,
            model: None,
            run: None,
        }
    }

    #[test]
    fn the_first_true_rule_decides_and_nothing_else_passes() {
        let p = policies(&[
            ("tool.name == 'lookup_account'", ToolDecision::Allow),
            (
                "tool.name == 'change_account_email' && !tool.args.email.endsWith('@example.org')",
                ToolDecision::RequireApproval,
            ),
            ("tool.name == 'change_account_email'", ToolDecision::Allow),
        ]);
        let k = key("support-bot");
        let args = json!({"handle": "@a", "email": "evil@example.com"});
        let d = |tool: &str, args: &Value| p.decide(&k, &call(tool, args)).unwrap();
        assert_eq!(d("lookup_account", &args).decision, ToolDecision::Allow);
        let v = d("change_account_email", &args);
        assert_eq!(
            (v.decision, v.rule),
            (ToolDecision::RequireApproval, Some(1))
        );
        let ok = json!({"handle": "@a", "email": "a@example.org"});
        assert_eq!(d("change_account_email", &ok).decision, ToolDecision::Allow);
        // Default deny.
        let v = d("reset_password", &args);
        assert_eq!((v.decision, v.rule), (ToolDecision::Deny, None));
        assert!(v.reason.contains("no rule"), "{}", v.reason);
        // Keys the policy does not name are not governed.
        assert!(p
            .decide(&key("other"), &call("reset_password", &args))
            .is_none());
    }

    #[test]
    fn session_counters_reach_the_rules_and_start_over_each_hour() {
        let p = policies(&[(
            "session.calls < 2 && session.spend_micros <= 500",
            ToolDecision::Allow,
        )]);
        let (k, args, s) = (key("support-bot"), json!({}), Sessions::default());
        let hour = 7 * 3_600_000;
        let d = |s: &Sessions, now: i64| {
            let v = p
                .decide_in(&k, &call("x", &args), s.get(&k.id, now))
                .unwrap();
            s.note_call(&k.id, now);
            v.decision
        };
        // Spend of a key not counted yet is not kept.
        s.note_spend(&k.id, 10_000, hour);
        assert_eq!(d(&s, hour), ToolDecision::Allow);
        s.note_spend(&k.id, 400, hour + 1);
        assert_eq!(d(&s, hour + 2), ToolDecision::Allow);
        assert_eq!(
            d(&s, hour + 3),
            ToolDecision::Deny,
            "a third call in the hour"
        );
        assert_eq!(d(&s, hour + 3_600_000), ToolDecision::Allow, "a new hour");
        s.note_spend(&k.id, 600, hour + 3_600_001);
        assert_eq!(s.get(&k.id, hour + 3_600_002).spend_micros, 600);
        assert_eq!(
            d(&s, hour + 3_600_002),
            ToolDecision::Deny,
            "spent past 500"
        );
    }

    #[test]
    fn rules_can_match_arguments_with_regular_expressions() {
        let p = policies(&[(
            "tool.args.email.matches('^[a-z.]+@example[.]org$')",
            ToolDecision::Allow,
        )]);
        let k = key("support-bot");
        let d = |email: &str| {
            p.decide(
                &k,
                &call("change_account_email", &json!({ "email": email })),
            )
            .unwrap()
            .decision
        };
        assert_eq!(d("ann@example.org"), ToolDecision::Allow);
        assert_eq!(d("evil@example.com"), ToolDecision::Deny);
        assert_eq!(d("ann@example.org.evil.com"), ToolDecision::Deny);
    }

    #[test]
    fn a_rule_that_cannot_be_evaluated_denies() {
        let p = policies(&[
            ("tool.args.missing.deeper == 1", ToolDecision::Allow),
            ("true", ToolDecision::Allow),
        ]);
        let v = p
            .decide(&key("support-bot"), &call("x", &json!({})))
            .unwrap();
        assert_eq!((v.decision, v.rule), (ToolDecision::Deny, Some(0)));
        assert!(v.reason.contains("failed to evaluate"), "{}", v.reason);
        let p = policies(&[("tool.name", ToolDecision::Allow)]);
        let v = p
            .decide(&key("support-bot"), &call("x", &json!({})))
            .unwrap();
        assert_eq!(v.decision, ToolDecision::Deny);
        assert!(v.reason.contains("not a bool"), "{}", v.reason);
        assert!(Policies::build(&[ToolPolicyConfig {
            name: "bad".into(),
            keys: vec!["*".into()],
            teams: vec![],
            rules: vec![ToolRuleConfig {
                when: "tool.name ==".into(),
                decision: ToolDecision::Allow,
                reason: None,
            }],
        }])
        .is_err());
    }
}
