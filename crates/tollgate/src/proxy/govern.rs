//! The govern phase of a tool call, on every surface (MCP, tool routes, the tool calls a
//! model asks for): the key's tool policy decides (`policy.rs`), and a call that needs
//! approval is parked until an approver lets exactly it through (`approval.rs`).

use super::*;
use crate::approval::{Approval, Gate};
use crate::config::ToolDecision;
use crate::policy::Call;

/// Why a tool call does not go ahead: the refusal (its words are for the agent) and, for a
/// call waiting on (or refused by) an approver, the approval.
pub(crate) struct Stopped {
    pub(crate) error: ApiError,
    pub(crate) approval: Option<Approval>,
}

/// The approval gate of one call, as a future that owns what it needs: a stream can keep it
/// and poll it between events.
pub(crate) type GateFuture = Pin<Box<dyn Future<Output = Result<(), Box<Stopped>>> + Send>>;

/// What the policy said about a call, before any approval is looked up.
pub(crate) enum Ruling {
    Go,
    Stop(Box<Stopped>),
    /// `require_approval`: the call goes ahead only if the gate lets it.
    Gate(GateFuture),
}

/// Decides `call` for `key`; the decision is added to the record (and so to the audit log).
/// `Ok` lets the call go ahead.
pub(crate) async fn govern(
    app: &Arc<AppState>,
    runtime: &Runtime,
    key: &KeyRecord,
    rec: &mut UsageRecord,
    call: &Call<'_>,
    request_id: &str,
) -> Result<(), Stopped> {
    match rule(app, runtime, key, rec, call, request_id) {
        Ruling::Go => Ok(()),
        Ruling::Stop(s) => Err(*s),
        Ruling::Gate(gate) => gate.await.map_err(|s| *s),
    }
}

/// The policy's decision on `call`, recorded on `rec`; an approval's store lookup is left to
/// the caller to await.
pub(crate) fn rule(
    app: &Arc<AppState>,
    runtime: &Runtime,
    key: &KeyRecord,
    rec: &mut UsageRecord,
    call: &Call<'_>,
    request_id: &str,
) -> Ruling {
    let sessions = &app.meter.sessions;
    let now = now_ms();
    let Some(verdict) = runtime
        .policies
        .decide_in(key, call, sessions.get(&key.id, now))
    else {
        return Ruling::Go;
    };
    sessions.note_call(&key.id, now);
    rec.policy.push(verdict.clone());
    match verdict.decision {
        ToolDecision::Allow => Ruling::Go,
        ToolDecision::Deny => Ruling::Stop(Box::new(Stopped {
            error: ApiError::new(ErrorKind::ToolDenied, verdict.reason),
            approval: None,
        })),
        ToolDecision::RequireApproval => {
            let ttl_ms = runtime.approvals.ttl.as_millis() as i64;
            let app2 = app.clone();
            let (key_id, agent, args, rid) = (
                key.id.clone(),
                key.name.clone(),
                call.args.clone(),
                request_id.to_string(),
            );
            Ruling::Gate(Box::pin(async move {
                let (tool, policy, reason) = (
                    verdict.tool.clone(),
                    verdict.policy.clone(),
                    verdict.reason.clone(),
                );
                let gate = tokio::task::spawn_blocking(move || {
                    app2.store.write(|tx| {
                        crate::approval::gate(
                            tx,
                            &crate::approval::Request {
                                key_id: &key_id,
                                agent: &agent,
                                tool: &tool,
                                arguments: &args,
                                policy: &policy,
                                reason: &reason,
                                request_id: &rid,
                            },
                            ttl_ms,
                            now_ms(),
                        )
                    })
                })
                .await;
                gated(&verdict.reason, gate)
            }))
        }
    }
}

fn gated(
    reason: &str,
    gate: Result<Result<Gate, crate::store::StoreError>, tokio::task::JoinError>,
) -> Result<(), Box<Stopped>> {
    match gate {
        Ok(Ok(Gate::Proceed(_))) => Ok(()),
        Ok(Ok(Gate::Pending(a))) => Err(Box::new(Stopped {
            error: ApiError::new(
                ErrorKind::ApprovalPending,
                format!(
                    "{reason}. The call is waiting for a human's approval ({}, pending until {}); do not work around it. Make exactly the same call again once it is approved.",
                    a.id,
                    crate::clock::rfc3339(a.expires_ms),
                ),
            )
            .retry_after(30),
            approval: Some(a),
        })),
        Ok(Ok(Gate::Denied(a))) => Err(Box::new(Stopped {
            error: ApiError::new(
                ErrorKind::ToolDenied,
                format!(
                    "an approver denied this call ({}){}. Do not make it again.",
                    a.id,
                    a.note
                        .as_deref()
                        .map(|n| format!(": {n}"))
                        .unwrap_or_default()
                ),
            ),
            approval: Some(a),
        })),
        // No store, no approval: the call does not go ahead.
        Ok(Err(e)) => Err(Box::new(Stopped {
            error: ApiError::new(
                ErrorKind::WalletUnavailable,
                format!("this call needs an approval and approvals cannot be read now: {e}"),
            ),
            approval: None,
        })),
        Err(e) => Err(Box::new(Stopped {
            error: ApiError::new(ErrorKind::Internal, e.to_string()),
            approval: None,
        })),
    }
}
