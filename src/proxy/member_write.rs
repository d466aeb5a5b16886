//! Member writes the proxy answers itself: `PATCH {base}/Group/{id}` with a
//! JSON Patch body and the ATR operations. The body is read and classified;
//! a write of the roster of a Group kept here goes to the member store,
//! everything else to the legacy server unchanged.

use bytes::Bytes;
use pingora::proxy::Session;
use pingora::Result;

use crate::config::MixedPatchPolicy;
use crate::fhir::atr::{parse_atr_parameters, AtrOperation};
use crate::fhir::member_patch::{parse_patch, PatchClass, PatchLimits};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::write::{
    MemberEdit, MemberPatchRequest, MemberPatchResult, UpstreamDocument, UpstreamPart,
};
use crate::group::{GroupError, RosterHome};
use crate::proxy::authorize::Access;
use crate::proxy::request_body::read_intercepted_body;
use crate::proxy::request_facts::{request_digest, Prefer, WriteHeaders};
use crate::proxy::respond::{Answer, Reply};
use crate::proxy::roster_answer::{
    roster_for_answer, send_showing_the_roster, success_answer, with_members, RosterAnswer,
    WithRoster, WriteAnswer,
};
use crate::proxy::{FhirGroupProxy, RequestContext};

pub async fn group_patch(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Reply> {
    let body = match read_intercepted_body(proxy, session).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let limits = PatchLimits {
        max_operations: proxy.config.fhir.max_patch_operations,
    };
    let parsed = parse_patch(&body, limits);
    if matches!(parsed, Ok(PatchClass::NotMembers)) {
        return patch_beside_the_roster(proxy, session, ctx, base, group_id, body).await;
    }
    // The patch may touch the roster: the proxy answers only for Groups whose
    // roster it keeps (or may take over: no members yet). The legacy server
    // answers for every other Group, exactly as it would without the proxy,
    // including patches the proxy itself could not apply.
    let managed = match proxy.member_write_home(ctx, group_id).await {
        Ok(Some(RosterHome::Events)) => true,
        Ok(Some(RosterHome::Empty)) => false,
        Ok(_) => return Ok(Reply::forward(body)),
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let (changes, other_ops) = match parsed {
        Ok(PatchClass::NotMembers) => return Ok(Reply::forward(body)),
        Ok(PatchClass::WholeDocument { op_index }) if managed => {
            let outcome = Outcome::error(
                422,
                IssueType::NotSupported,
                format!(
                    "operation {op_index} works on the whole Group (path or from \"\"), roster \
                     included, which this server keeps in its member store; PUT the Group, or \
                     patch its elements one by one"
                ),
            )
            .at(format!("/{op_index}"));
            return Ok(Reply::outcome(outcome));
        }
        Ok(PatchClass::WholeDocument { .. } | PatchClass::CrossesMember { .. }) if !managed => {
            return Ok(Reply::forward(body))
        }
        Ok(PatchClass::CrossesMember { op_index }) => {
            let outcome = Outcome::error(
                422,
                IssueType::NotSupported,
                format!(
                    "operation {op_index} moves or copies between Group.member and the rest of \
                     the Group, which this server keeps in two stores; send the value itself \
                     (add/replace) instead"
                ),
            )
            .at(format!("/{op_index}"));
            return Ok(Reply::outcome(outcome));
        }
        Ok(PatchClass::WholeDocument { .. }) => return Ok(Reply::forward(body)),
        Err(_) if !managed => return Ok(Reply::forward(body)),
        Err(outcome) => return Ok(Reply::outcome(outcome)),
        Ok(PatchClass::Members(changes)) => (changes, None),
        Ok(PatchClass::Mixed { .. })
            if proxy.config.members.mixed_patch == MixedPatchPolicy::Reject =>
        {
            let outcome = Outcome::error(
                422,
                IssueType::NotSupported,
                "this patch mixes Group.member operations with other operations, which this \
                 server is configured to refuse; send them as two PATCH requests",
            );
            return Ok(Reply::outcome(outcome));
        }
        Ok(PatchClass::Mixed { members, other_ops }) => (members, Some(other_ops)),
    };
    let upstream_part = match other_ops {
        Some(ops) => {
            Some(proxy.conditional_upstream_write(session, ctx, UpstreamDocument::Patched(ops))?)
        }
        None => None,
    };
    let edit = MemberEdit::Patch(changes);
    let Some(next) = write_members(
        proxy,
        session,
        ctx,
        base,
        group_id,
        &body,
        edit,
        upstream_part,
        None,
    )
    .await?
    else {
        return Ok(Reply::forward(body));
    };
    Ok(next)
}

/// A patch without member ops is the legacy server's, sent as it came. For a
/// Group whose roster is kept here the legacy server answers with the Group
/// as it holds it, without the roster, where its clients always got the
/// whole Group: the answer gets the roster of the version it names, as a
/// read of that version shows it. Every other Group's patch is forwarded
/// (streamed, untouched).
async fn patch_beside_the_roster(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    body: Bytes,
) -> Result<Reply> {
    match proxy.member_write_home(ctx, group_id).await {
        Ok(Some(RosterHome::Events)) => {}
        Ok(_) => return Ok(Reply::forward(body)),
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    }
    send_showing_the_roster(proxy, session, ctx, base, group_id, body).await
}

/// Da Vinci ATR `$member-add` / `$member-remove` on a Group: the same write
/// path as a member PATCH. Groups not migrated go to the legacy server.
pub async fn atr_operation(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    operation: AtrOperation,
) -> Result<Reply> {
    let body = match read_intercepted_body(proxy, session).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let members = match parse_atr_parameters(operation, &body) {
        Ok(members) => members,
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let edit = MemberEdit::Atr(operation, members);
    match write_members(proxy, session, ctx, base, group_id, &body, edit, None, None).await? {
        Some(next) => Ok(next),
        None => Ok(Reply::forward(body)),
    }
}

/// Runs a member write (from a PATCH, an ATR operation or a PUT) and answers
/// it; `None` when the Group is not migrated and the legacy server must answer.
/// `body`: the request body as received (what a retry must repeat).
/// `answer_members`: the `member` array of a PUT, put back into the legacy
/// server's reply (which never saw it).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn write_members(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    body: &[u8],
    edit: MemberEdit,
    upstream_part: Option<UpstreamPart>,
    answer_members: Option<serde_json::Value>,
) -> Result<Option<Reply>> {
    let Some(service) = proxy.group_service.as_ref() else {
        return Ok(None);
    };
    if upstream_part.is_none() {
        if let Access::Refused(answer) = may_write(proxy, session, ctx, base, group_id).await? {
            return Ok(Some(answer.into()));
        }
    }
    let facts = WriteHeaders::from_headers(
        &session.req_header().headers,
        proxy.config.members.require_if_match,
    );
    let WriteHeaders {
        if_match,
        prefer,
        client_request_id,
    } = match facts {
        Ok(facts) => facts,
        Err(outcome) => return Ok(Some(Reply::outcome(outcome))),
    };
    // A PATCH's ops, as its history entry lists them.
    let patch_ops = match &edit {
        MemberEdit::Patch(_) => serde_json::from_slice(body).unwrap_or_default(),
        _ => Vec::new(),
    };
    let request = MemberPatchRequest {
        group_id: group_id.to_string(),
        edit,
        if_match,
        client_request_id,
        request_digest: request_digest(session.req_header(), body),
        request_id: ctx.request_id.clone(),
        url: format!("{base}/Group/{group_id}"),
        upstream_part,
        seen_state: ctx.member_state_seen.take(),
        patch_ops,
    };

    let service = service.clone();
    let result = proxy
        .on_stores(async move { service.apply_member_patch(request).await })
        .await;
    let result = match result {
        Ok(result) => result,
        Err(outcome) => return Ok(Some(Reply::outcome(outcome))),
    };
    let roster = match (&result, prefer) {
        (Ok(result), Prefer::Representation) if !result.replayed || result.document.is_some() => {
            roster_for_answer(proxy, group_id, result.group_key.as_deref(), result.version).await
        }
        _ => RosterAnswer::Unknown,
    };
    match result {
        Ok(MemberPatchResult {
            upstream_reply: Some(reply),
            version: result_version,
            ..
        }) => {
            let shown = WithRoster {
                base,
                group_id,
                extension_base: &proxy.config.fhir.extension_base,
            };
            let reply = match (&roster, &answer_members) {
                (RosterAnswer::Unknown, Some(members)) => with_members(reply, members),
                (RosterAnswer::Unknown, None) if prefer != Prefer::Representation => reply,
                (roster, _) => shown.reply(reply, roster, result_version),
            };
            Ok(Some(Reply::relay(reply)))
        }
        Ok(result) => {
            let roster = match (roster, answer_members) {
                (RosterAnswer::Unknown, Some(members)) => RosterAnswer::Members(members),
                (roster, _) => roster,
            };
            let answer = WriteAnswer {
                base,
                group_id,
                prefer,
                roster: &roster,
                reference_fields: proxy.config.fhir.reference_fields,
                extension_base: &proxy.config.fhir.extension_base,
            };
            Ok(Some(success_answer(session, ctx, &answer, &result)?))
        }
        Err(GroupError::NotMigrated) => Ok(None),
        Err(error) => {
            if !matches!(error, GroupError::Outcome(_)) {
                tracing::warn!(group = group_id, %error, "member write failed");
            }
            Ok(Some(Reply::outcome(error.to_outcome())))
        }
    }
}

/// For a write the legacy server never sees, under `auth.mode = "upstream"`:
/// Groups still inline go to the legacy server anyway (no probe needed);
/// otherwise the legacy server is asked first.
async fn may_write(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Access> {
    if !matches!(&*proxy.authorizer, crate::auth::Authorizer::Upstream { .. }) {
        return Ok(Access::Granted);
    }
    match proxy.member_write_home(ctx, group_id).await {
        Ok(None | Some(crate::group::RosterHome::Inline)) => Ok(Access::Granted),
        Ok(Some(_)) => {
            crate::proxy::authorize::probe_upstream(proxy, session, ctx, base, group_id).await
        }
        Err(outcome) => Ok(Access::Refused(Answer::outcome(outcome))),
    }
}
