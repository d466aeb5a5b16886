//! Whole-resource writes of Groups: `PUT {base}/Group/{id}` and
//! `POST {base}/Group`. Where the Group keeps its members decides the path:
//!
//! | Group                      | body with `member`            | body without `member`            |
//! |----------------------------|-------------------------------|----------------------------------|
//! | members inline (legacy)    | forwarded unchanged           | forwarded unchanged              |
//! | migrated (events)          | roster diffed into events, the Group PUT upstream without `member` | kept (or emptied, by setting), forwarded |
//! | no members yet             | as migrated                   | forwarded unchanged              |
//! | new (POST, PUT to new id)  | forwarded unchanged; the created Group is adopted (members moved to events) | forwarded unchanged |

use bytes::Bytes;
use pingora::proxy::Session;
use pingora::Result;

use crate::config::PutWithoutMember;
use crate::fhir::group_resource::parse_group_body;
use crate::group::create::Adoption;
use crate::group::write::MemberEdit;
use crate::group::RosterHome;
use crate::proxy::request_body::read_intercepted_body;
use crate::proxy::respond::Reply;
use crate::proxy::{FhirGroupProxy, RequestContext};

pub async fn group_update(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Reply> {
    let home = match proxy.roster_home(group_id).await {
        Ok(Some(home)) => home,
        Ok(None) => return Ok(Reply::Forward),
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let settings = &proxy.config.members;
    match home {
        // Not read at all: the legacy server gets the request as it came.
        RosterHome::Inline => return Ok(Reply::Forward),
        RosterHome::NoGroup => {
            // Created under an owner-qualified address, the Group is the
            // legacy server's: adoption knows Groups by their plain id.
            if settings.create_in_clickhouse && !group_id.contains('|') {
                ctx.created = Some(CreatedGroup::Known(group_id.to_string()));
            }
            return Ok(Reply::Forward);
        }
        RosterHome::Events | RosterHome::Empty => {}
    }
    let body = match read_intercepted_body(proxy, session).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let group = match parse_group_body(&body, Some(group_id)) {
        Ok(group) => group,
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let has_members = group.roster.as_ref().is_some_and(|r| !r.is_empty());
    let (roster, member_json) = match (group.roster, group.member_json) {
        (Some(roster), Some(json)) if home == RosterHome::Events || has_members => {
            (Some(roster), json)
        }
        (None, _)
            if home == RosterHome::Events
                && settings.put_without_member == PutWithoutMember::Empty =>
        {
            // As the legacy server reads a PUT: the Group has no `member`.
            (None, serde_json::Value::Array(Vec::new()))
        }
        (None, _) if home == RosterHome::Events => {
            // The kept roster stays, so the answer shows it: the legacy
            // server's reply holds the Group without it.
            return crate::proxy::roster_answer::send_showing_the_roster(
                proxy, session, ctx, base, group_id, body,
            )
            .await;
        }
        _ => return Ok(Reply::forward(body)),
    };
    // `quantity` of a Group whose roster the proxy keeps is computed from
    // that roster on every read; a stored one could only go stale.
    let mut document = group.document;
    document.remove("quantity");
    let upstream_body = Bytes::from(serde_json::to_vec(&document).unwrap_or_default());
    let part = proxy.conditional_upstream_write(
        session,
        ctx,
        crate::group::write::UpstreamDocument::Given(upstream_body),
    )?;
    let edit = MemberEdit::ReplaceRoster(roster);
    let written = crate::proxy::member_write::write_members(
        proxy,
        session,
        ctx,
        base,
        group_id,
        &body,
        edit,
        Some(part),
        Some(member_json),
    )
    .await?;
    Ok(written.unwrap_or_else(|| Reply::forward(body)))
}

/// `POST {base}/Group`: forwarded unchanged, streamed; the Group the legacy
/// server creates is adopted before the client hears of it (see
/// [`crate::group::create`]).
pub fn group_create(proxy: &FhirGroupProxy, ctx: &mut RequestContext) -> Reply {
    if proxy.group_service.is_some() && proxy.config.members.create_in_clickhouse {
        ctx.created = Some(CreatedGroup::FromReply);
    }
    Reply::Forward
}

/// A create the proxy forwarded and adopts once the legacy server answers 201.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreatedGroup {
    /// `PUT` to a new id.
    Known(String),
    /// `POST`: the id is in the reply's `Location`.
    FromReply,
}

impl CreatedGroup {
    /// The new Group's id, from the legacy server's 201 reply head.
    pub fn id(&self, reply: &pingora::http::ResponseHeader) -> Option<String> {
        match self {
            CreatedGroup::Known(id) => Some(id.clone()),
            CreatedGroup::FromReply => {
                let location = reply.headers.get(http::header::LOCATION)?.to_str().ok()?;
                crate::group::create::id_in_location(location)
            }
        }
    }
}

/// Adopts the Group the legacy server just created (before its reply goes
/// on to the client); a Group that cannot be adopted stays on the legacy
/// path, whole, and the client gets the legacy server's answer either way.
pub async fn adopt_created(proxy: &FhirGroupProxy, ctx: &RequestContext, id: String) {
    let Some(service) = proxy.group_service.clone() else {
        return;
    };
    let group = id.clone();
    let adoption = proxy
        .on_stores(async move { service.adopt_created(&group).await })
        .await;
    match adoption {
        Ok(Adoption::Adopted { members }) => {
            tracing::info!(request_id = %ctx.request_id, group = %id, members, "created Group adopted: its members moved to the member store");
        }
        Ok(Adoption::NoMembers | Adoption::NotInMongo) => {}
        Ok(Adoption::Left(why)) => {
            tracing::warn!(request_id = %ctx.request_id, group = %id, %why, "created Group left on the legacy path");
        }
        Err(outcome) => {
            tracing::warn!(request_id = %ctx.request_id, group = %id, why = outcome.first_diagnostics(), "created Group left on the legacy path");
        }
    }
}
