//! Whole-resource writes of Groups: `PUT {base}/Group/{id}` and
//! `POST {base}/Group`. Where the Group keeps its members decides the path:
//!
//! | Group                      | body with `member`            | body without `member`            |
//! |----------------------------|-------------------------------|----------------------------------|
//! | members inline (legacy)    | forwarded unchanged           | forwarded unchanged              |
//! | migrated (events)          | roster diffed into events, the Group PUT upstream without `member` | kept (or emptied, by setting), forwarded |
//! | no members yet             | as migrated                   | forwarded unchanged              |
//! | new (POST, PUT to new id)  | created upstream without `member`, roster stored as events | forwarded unchanged |

use bytes::Bytes;
use pingora::http::RequestHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::config::PutWithoutMember;
use crate::fhir::group_resource::{parse_group_body, GroupBody};
use crate::group::patch::{MemberEdit, UpstreamReply};
use crate::group::{RosterHome, WriteError};
use crate::proxy::forwarding::derived_request;
use crate::proxy::intercept::{answer, forward, read_intercepted_body, relay, with_members, Next};
use crate::proxy::{FhirGroupProxy, RequestContext};

pub async fn group_update(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Next> {
    let home = match proxy.roster_home(group_id).await {
        Ok(Some(home)) => home,
        Ok(None) => return Ok(Next::Forward),
        Err(outcome) => return answer(session, ctx, &outcome).await,
    };
    let settings = &proxy.config.members;
    let proxy_may_own = home == RosterHome::Events || settings.create_in_clickhouse;
    if home == RosterHome::Inline || !proxy_may_own {
        // Not read at all: the legacy server gets the request as it came.
        return Ok(Next::Forward);
    }
    let body = match read_intercepted_body(proxy, session, ctx).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let group = match parse_group_body(&body, Some(group_id)) {
        Ok(group) => group,
        Err(outcome) => return answer(session, ctx, &outcome).await,
    };
    let has_members = group.roster.as_ref().is_some_and(|r| !r.is_empty());
    match home {
        RosterHome::NoGroup if has_members => {
            let path = session.req_header().uri.path().to_string();
            create(proxy, session, ctx, Some(group_id), group, path).await
        }
        RosterHome::Events | RosterHome::Empty => {
            let (roster, member_json) = match (group.roster, group.member_json) {
                (Some(roster), Some(json)) if home == RosterHome::Events || has_members => {
                    (roster, json)
                }
                (None, _)
                    if home == RosterHome::Events
                        && settings.put_without_member == PutWithoutMember::Empty =>
                {
                    (Vec::new(), serde_json::Value::Array(Vec::new()))
                }
                _ => return Ok(forward(body)),
            };
            let upstream_body =
                Bytes::from(serde_json::to_vec(&group.document).unwrap_or_default());
            let part = proxy.conditional_upstream_write(session, ctx, upstream_body)?;
            let edit = MemberEdit::ReplaceRoster(roster);
            let written = crate::proxy::intercept::write_members(
                proxy,
                session,
                ctx,
                base,
                group_id,
                edit,
                Some(part),
                Some(member_json),
            )
            .await?;
            Ok(written.unwrap_or_else(|| forward(body)))
        }
        _ => Ok(forward(body)),
    }
}

pub async fn group_create(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
) -> Result<Next> {
    if proxy.group_service.is_none() || !proxy.config.members.create_in_clickhouse {
        return Ok(Next::Forward);
    }
    let body = match read_intercepted_body(proxy, session, ctx).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let group = match parse_group_body(&body, None) {
        Ok(group) => group,
        Err(outcome) => return answer(session, ctx, &outcome).await,
    };
    if group.roster.as_ref().is_none_or(|r| r.is_empty()) {
        return Ok(forward(body));
    }
    let type_path = session
        .req_header()
        .uri
        .path()
        .trim_end_matches('/')
        .to_string();
    create(proxy, session, ctx, None, group, type_path).await
}

/// Creates the Group upstream without `member` (the client's method, headers
/// and credentials), then stores its roster as events; undone upstream with a
/// DELETE of `{instance_path}` when the events cannot be stored.
async fn create(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    known_id: Option<&str>,
    group: GroupBody,
    path: String,
) -> Result<Next> {
    let Some(service) = proxy.group_service.clone() else {
        return Ok(Next::Forward);
    };
    let (Some(roster), Some(member_json)) = (group.roster, group.member_json) else {
        return Ok(Next::Forward);
    };
    let mut create_request = session.req_header().clone();
    proxy.rewrite_for_upstream(session, &mut create_request, ctx)?;
    let delete_template = delete_request(session.req_header(), known_id.is_none(), &path)?;
    let mut delete_template = delete_template;
    proxy.rewrite_for_upstream(session, &mut delete_template, ctx)?;

    let client = proxy.upstream_client.clone();
    let upstream_body = Bytes::from(serde_json::to_vec(&group.document).unwrap_or_default());
    let create_upstream = {
        let client = client.clone();
        async move { client.send_buffered(&create_request, upstream_body).await }
    };
    let delete_upstream = move |id: String| async move {
        let mut request = delete_template;
        if let Some(instance) = instance_uri(&request, &id) {
            request.set_uri(instance);
        }
        client.send_buffered(&request, Bytes::new()).await
    };
    let (known_id, request_id) = (known_id.map(str::to_string), ctx.request_id.clone());
    let result = proxy
        .on_stores(async move {
            service
                .create_with_members(
                    known_id.as_deref(),
                    &roster,
                    &request_id,
                    create_upstream,
                    delete_upstream,
                )
                .await
        })
        .await;
    ctx.intercepted = true;
    match result {
        Ok(Ok(reply)) => {
            // Only a 201 carries the new Group; a conditional create's 200 is
            // an existing Group with its own roster.
            let reply: UpstreamReply = if reply.status == 201 {
                with_members(reply, &member_json)
            } else {
                reply
            };
            relay(session, ctx, reply).await?;
            Ok(Next::Answered)
        }
        Ok(Err(error)) => {
            if !matches!(error, WriteError::Outcome(_)) {
                tracing::warn!(%error, "Group create with members failed");
            }
            answer(session, ctx, &error.to_outcome()).await
        }
        Err(outcome) => answer(session, ctx, &outcome).await,
    }
}

/// A DELETE with the client's headers (credentials) for undoing a create.
/// For a POST the instance path is only known later (`{path}/{id}`).
fn delete_request(original: &RequestHeader, id_pending: bool, path: &str) -> Result<RequestHeader> {
    let path = if id_pending {
        format!("{path}/")
    } else {
        path.to_string()
    };
    derived_request(original, http::Method::DELETE, &path)
}

/// `{type path}/` (a POST's DELETE template) completed with the new id.
fn instance_uri(request: &RequestHeader, id: &str) -> Option<http::Uri> {
    let path = request.uri.path();
    path.strip_suffix('/')
        .and_then(|type_path| format!("{type_path}/{id}").parse().ok())
}
