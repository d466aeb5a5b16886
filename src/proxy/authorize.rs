//! The authorization step of requests the proxy may answer itself (see
//! [`crate::auth`]): local JWT checks at routing time, or the upstream probe
//! right before a member write that the legacy server would never see.

use pingora::proxy::Session;
use pingora::Result;

use crate::auth::{probe_path, Action, AuthError, Authorizer};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::proxy::forwarding::derived_request;
use crate::proxy::respond::Answer;
use crate::proxy::route::Route;
use crate::proxy::{FhirGroupProxy, RequestContext};

/// What a routed request does to the Group, for the scope check.
pub fn action_of(route: &Route) -> Option<Action> {
    Some(match route {
        Route::Passthrough
        | Route::Refused(_)
        | Route::MultiResourceWrite { .. }
        | Route::GroupConditionalWrite
        | Route::MemberJoinSearch { .. } => return None,
        Route::GroupRosterDependentRead { .. } => Action::Read,
        Route::GroupPatch { .. }
        | Route::GroupPatchOtherFormat { .. }
        | Route::GroupUpdateOtherFormat { .. }
        | Route::GroupAtrOperation { .. }
        | Route::GroupUpdate { .. } => Action::Update,
        Route::GroupCreate { .. } => Action::Create,
        Route::GroupDelete { .. } => Action::Delete,
        Route::GroupRead { .. } | Route::GroupMembers { .. } | Route::GroupVersionRead { .. } => {
            Action::Read
        }
        Route::GroupSearchByMember { .. } | Route::GroupSearch { .. } => Action::Search,
    })
}

/// Whether a request may go on, or is refused with this answer.
pub enum Access {
    Granted,
    Refused(Answer),
}

/// JWT mode: checks the token for every request on a route the proxy may
/// answer itself, whether or not its Group is migrated (the answer must not
/// depend on, or reveal, where a roster lives).
pub async fn check_token(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    route: &Route,
) -> Result<Access> {
    let (Authorizer::Jwt(verifier), Some(action)) = (&*proxy.authorizer, action_of(route)) else {
        return Ok(Access::Granted);
    };
    if proxy.group_service.is_none() {
        return Ok(Access::Granted);
    }
    let authorization = session
        .req_header()
        .headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    match verifier
        .authorize(authorization.as_deref(), "Group", action)
        .await
    {
        Ok(subject) => {
            tracing::debug!(request_id = %ctx.request_id, subject = %subject.subject, ?action, "token accepted");
            Ok(Access::Granted)
        }
        Err(refusal) => {
            tracing::info!(request_id = %ctx.request_id, %refusal, "request refused");
            Ok(Access::Refused(refuse(&refusal)))
        }
    }
}

fn refuse(refusal: &AuthError) -> Answer {
    Answer::Outcome {
        outcome: refusal.outcome(),
        headers: vec![("www-authenticate", refusal.challenge())],
    }
}

/// Upstream mode: asks the legacy server, with the client's own credentials,
/// whether this client may touch Group `id` before the proxy writes members
/// the legacy server never sees. Refused: the legacy server's 401/403/404
/// passed back unchanged, or an error.
pub async fn probe_upstream(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Access> {
    let Authorizer::Upstream {
        probe_method,
        probe_path: template,
    } = &*proxy.authorizer
    else {
        return Ok(Access::Granted);
    };
    let path = probe_path(template, base, group_id);
    let mut probe = derived_request(session.req_header(), probe_method.clone(), &path)?;
    // A write probe is an empty JSON Patch conditional on a version that
    // never exists: a server checking access first answers 401/403 to a
    // client that may not write, 412 to one that may, and changes nothing.
    let writes = !matches!(*probe_method, http::Method::GET | http::Method::HEAD);
    let body = if writes {
        probe.insert_header(http::header::CONTENT_TYPE, "application/json-patch+json")?;
        probe.insert_header(http::header::IF_MATCH, "W/\"0\"")?;
        bytes::Bytes::from_static(b"[]")
    } else {
        bytes::Bytes::new()
    };
    proxy.rewrite_for_upstream(session, &mut probe, ctx)?;
    let reply = match proxy.upstream_client.send_buffered(&probe, body).await {
        Ok(reply) => reply,
        Err(outcome) => {
            let outcome = Outcome::error(
                outcome.status,
                IssueType::Transient,
                format!(
                    "access to Group/{group_id} cannot be confirmed with the legacy server: {}",
                    outcome.first_diagnostics()
                ),
            );
            return Ok(Access::Refused(Answer::outcome(outcome)));
        }
    };
    match reply.status {
        200..=299 => Ok(Access::Granted),
        412 if writes => Ok(Access::Granted),
        401 | 403 | 404 | 410 => Ok(Access::Refused(Answer::Relay(reply))),
        status => {
            let outcome = Outcome::error(
                502,
                IssueType::Transient,
                format!(
                    "access to Group/{group_id} cannot be confirmed: the legacy server answered the access probe with {status}"
                ),
            );
            Ok(Access::Refused(Answer::outcome(outcome)))
        }
    }
}
