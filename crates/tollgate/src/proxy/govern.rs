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
    let Some(verdict) = runtime.policies.decide(key, call) else {
        return Ok(());
    };
    rec.policy.push(verdict.clone());
    match verdict.decision {
        ToolDecision::Allow => Ok(()),
        ToolDecision::Deny => Err(Stopped {
            error: ApiError::new(ErrorKind::ToolDenied, verdict.reason),
            approval: None,
        }),
        ToolDecision::RequireApproval => {
            let ttl_ms = runtime.approvals.ttl.as_millis() as i64;
            let app2 = app.clone();
            let (key_id, agent, tool, args, policy, reason, rid) = (
                key.id.clone(),
                key.name.clone(),
                verdict.tool.clone(),
                call.args.clone(),
                verdict.policy.clone(),
                verdict.reason.clone(),
                request_id.to_string(),
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
            match gate {
                Ok(Ok(Gate::Proceed(_))) => Ok(()),
                Ok(Ok(Gate::Pending(a))) => Err(Stopped {
                    error: ApiError::new(
                        ErrorKind::ApprovalPending,
                        format!(
                            "{}. The call is waiting for a human's approval ({}, pending until {}); do not work around it. Make exactly the same call again once it is approved.",
                            verdict.reason,
                            a.id,
                            crate::clock::rfc3339(a.expires_ms),
                        ),
                    )
                    .retry_after(30),
                    approval: Some(a),
                }),
                Ok(Ok(Gate::Denied(a))) => Err(Stopped {
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
                }),
                // No store, no approval: the call does not go ahead.
                Ok(Err(e)) => Err(Stopped {
                    error: ApiError::new(
                        ErrorKind::WalletUnavailable,
                        format!("this call needs an approval and approvals cannot be read now: {e}"),
                    ),
                    approval: None,
                }),
                Err(e) => Err(Stopped {
                    error: ApiError::new(ErrorKind::Internal, e.to_string()),
                    approval: None,
                }),
            }
        }
    }
}
