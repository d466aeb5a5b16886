//! How the proxy answers a write with the Group's roster: the roster read
//! for the answer, the legacy server's reply with the roster put in, and
//! the answer to a member write the legacy server never saw.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::fhir::group_read::{with_listed_roster, ListedRoster};
use crate::fhir::outcome::Outcome;
use crate::fhir::FHIR_JSON;
use crate::group::read::AnswerRoster;
use crate::group::write::{MemberPatchResult, UpstreamReply};
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::request_facts::Prefer;
use crate::proxy::respond::{Answer, Reply};
use crate::proxy::{FhirGroupProxy, RequestContext};
use crate::store::group_documents::to_fhir_json;

/// Sends a write of a Group kept here to the legacy server as it came, and
/// answers with the legacy server's reply, the roster of the version it
/// names put in (see [`WithRoster`]).
pub(crate) async fn send_showing_the_roster(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    body: Bytes,
) -> Result<Reply> {
    let mut request = session.req_header().clone();
    proxy.rewrite_for_upstream(session, &mut request, ctx)?;
    request.remove_header(&http::header::EXPECT);
    let reply = match proxy.upstream_client.send_buffered(&request, body).await {
        Ok(reply) => reply,
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let version = match (200..300).contains(&reply.status) {
        true => crate::group::write::version_in_reply(&reply),
        false => None,
    };
    let reply = match version {
        Some(version) => {
            let roster = roster_for_answer(proxy, group_id, None, version).await;
            let shown = WithRoster {
                base,
                group_id,
                extension_base: &proxy.config.fhir.extension_base,
            };
            shown.reply(reply, &roster, version)
        }
        None => reply,
    };
    Ok(Answer::PassOn(reply).into())
}

/// How a legacy server's answer that names a Group kept here gets the
/// roster it lacks.
pub(crate) struct WithRoster<'a> {
    pub(crate) base: &'a str,
    pub(crate) group_id: &'a str,
    pub(crate) extension_base: &'a str,
}

impl WithRoster<'_> {
    /// The answer with the roster of `version`; with a roster too long to
    /// inline, its count and `$members` link. When the roster could not be
    /// read, a Group answer would look empty: the client is told instead
    /// that the change stands and to read the Group.
    pub(crate) fn reply(
        &self,
        mut reply: UpstreamReply,
        roster: &RosterAnswer,
        version: u64,
    ) -> UpstreamReply {
        let is_group = serde_json::from_slice::<serde_json::Value>(&reply.body)
            .ok()
            .filter(|body| body.get("resourceType").and_then(|t| t.as_str()) == Some("Group"));
        let Some(group) = is_group else {
            return reply;
        };
        let members_url = format!("{}/Group/{}/$members", self.base, self.group_id);
        match roster.listed(&members_url, self.extension_base) {
            Some(listed) => {
                let group = with_listed_roster(group, listed);
                reply.body = Bytes::from(serde_json::to_vec(&group).unwrap_or_default());
            }
            None => {
                let outcome = Outcome::information(
                    reply.status,
                    format!(
                        "Group/{} is at version {version}: the change was applied, but its \
                         members could not be read for this answer; read the Group to see it",
                        self.group_id
                    ),
                );
                reply.body = Bytes::from(outcome.to_bytes());
                reply.headers.insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static(FHIR_JSON),
                );
            }
        }
        reply
    }
}

/// The legacy server's reply to a write it stored without `member`, with the
/// client's roster put back when the reply is the Group.
pub(crate) fn with_members(mut reply: UpstreamReply, members: &serde_json::Value) -> UpstreamReply {
    if (200..300).contains(&reply.status) {
        if let Some(body) = crate::fhir::group_resource::with_roster(&reply.body, members) {
            reply.body = Bytes::from(body);
        }
    }
    reply
}

/// The roster a write answers with (`Prefer: return=representation`, the
/// default): the Group's members after the write, as a read shows them.
pub(crate) enum RosterAnswer {
    Members(serde_json::Value),
    /// More than `fhir.max_inline_members`: `quantity` (its active
    /// members) and a `$members` link.
    Paged {
        active_members: i64,
    },
    /// Not read (not asked for, or the store did not answer: the write
    /// stands, the answer goes without it).
    Unknown,
}

impl RosterAnswer {
    /// How a Group listed with this roster shows it (see
    /// [`with_listed_roster`]); `None` when it is not known.
    pub(crate) fn listed<'a>(
        &'a self,
        members_url: &'a str,
        extension_base: &'a str,
    ) -> Option<ListedRoster<'a>> {
        match self {
            RosterAnswer::Members(members) => Some(ListedRoster::Members(
                members.as_array().map(Vec::as_slice).unwrap_or_default(),
            )),
            RosterAnswer::Paged { active_members } => Some(ListedRoster::Paged {
                active_members: *active_members,
                members_url,
                extension_base,
            }),
            RosterAnswer::Unknown => None,
        }
    }
}

pub(crate) async fn roster_for_answer(
    proxy: &FhirGroupProxy,
    group_id: &str,
    group_key: Option<&str>,
    version: u64,
) -> RosterAnswer {
    let Some(service) = proxy.group_service.clone() else {
        return RosterAnswer::Unknown;
    };
    let id = group_id.to_string();
    let key = group_key.map(str::to_string);
    let limit = proxy.config.fhir.max_inline_members;
    let reference_fields = proxy.config.fhir.reference_fields;
    match proxy
        .on_stores(async move {
            service
                .roster_for_answer(&id, key.as_deref(), version, limit)
                .await
        })
        .await
    {
        Ok(Ok(AnswerRoster::Members(elements))) => {
            let members = elements
                .iter()
                .filter_map(|text| {
                    let shown = match reference_fields {
                        true => crate::fhir::group_read::presented_member(text),
                        false => std::borrow::Cow::Borrowed(text.as_str()),
                    };
                    serde_json::from_str(&shown).ok()
                })
                .collect();
            RosterAnswer::Members(serde_json::Value::Array(members))
        }
        Ok(Ok(AnswerRoster::Paged { active_members })) => RosterAnswer::Paged { active_members },
        Ok(Err(error)) => {
            tracing::warn!(group = group_id, %error, "the roster for a write's answer could not be read");
            RosterAnswer::Unknown
        }
        Err(outcome) => {
            tracing::warn!(
                group = group_id,
                ?outcome,
                "the roster for a write's answer could not be read"
            );
            RosterAnswer::Unknown
        }
    }
}

/// How a member write the proxy committed itself is answered.
pub(crate) struct WriteAnswer<'a> {
    pub(crate) base: &'a str,
    pub(crate) group_id: &'a str,
    pub(crate) prefer: Prefer,
    pub(crate) roster: &'a RosterAnswer,
    pub(crate) reference_fields: bool,
    pub(crate) extension_base: &'a str,
}

/// The answer to a member write the legacy server never saw, as the legacy
/// server answers a write. A Group of the reference server's kind (it keeps
/// `_sourceAssigningAuthority`, and `fhir.reference_fields` is on) is
/// answered as that server answers an update: the Group with its
/// `identifier`s and reference extensions, `Location` relative
/// (`4_0_0/Group/{id}`), `Content-Location` absolute, `Last-Modified` the
/// answer's time in ISO 8601, and `{}` for `return=minimal`.
pub(crate) fn success_answer(
    session: &Session,
    ctx: &RequestContext,
    answer: &WriteAnswer<'_>,
    result: &MemberPatchResult,
) -> Result<Reply> {
    let (base, group_id) = (answer.base, answer.group_id);
    let reference_server = answer.reference_fields
        && result
            .document
            .as_ref()
            .is_some_and(|d| d.contains_key("_sourceAssigningAuthority"));
    let mut resource = match &result.document {
        Some(document) if reference_server => icanbwell_conventions::present(
            &crate::store::group_documents::to_internal_json(document),
        ),
        Some(document) => to_fhir_json(document),
        None => serde_json::Value::Null,
    };
    let last_modified = if reference_server {
        Some(
            chrono::Utc::now()
                .format("%Y-%m-%dT%H:%M:%S%.3fZ")
                .to_string(),
        )
    } else {
        resource
            .pointer("/meta/lastUpdated")
            .and_then(|v| v.as_str())
            .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            .map(|t| {
                t.with_timezone(&chrono::Utc)
                    .format("%a, %d %b %Y %H:%M:%S GMT")
                    .to_string()
            })
    };
    let body = match answer.prefer {
        Prefer::Minimal if reference_server => Bytes::from_static(b"{}"),
        Prefer::Minimal => Bytes::new(),
        Prefer::OperationOutcome => Bytes::from(
            Outcome::information(
                200,
                format!(
                    "Group/{group_id} is at version {}: {} member event(s) written{}",
                    result.version,
                    result.events_written,
                    if result.replayed {
                        " (repeat of an already applied request)"
                    } else {
                        ""
                    }
                ),
            )
            .to_bytes(),
        ),
        Prefer::Representation => {
            // The roster (and `quantity`) of the version answered, when it
            // was read.
            let members_url = format!("{base}/Group/{group_id}/$members");
            if let Some(listed) = answer.roster.listed(&members_url, answer.extension_base) {
                resource = with_listed_roster(resource, listed);
            }
            Bytes::from(serde_json::to_vec(&resource).unwrap_or_default())
        }
    };
    let history = format!("{base}/Group/{group_id}/_history/{}", result.version);
    let mut header = ResponseHeader::build(200, Some(9))?;
    header.insert_header("etag", format!("W/\"{}\"", result.version))?;
    if reference_server {
        let host = session
            .req_header()
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
            .to_string();
        header.insert_header("content-location", format!("http://{host}{history}"))?;
        header.insert_header(
            "location",
            format!("{}/Group/{group_id}", base.trim_start_matches('/')),
        )?;
    } else {
        header.insert_header("content-location", history)?;
    }
    if let Some(last_modified) = last_modified {
        header.insert_header("last-modified", last_modified)?;
    }
    header.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
    if !body.is_empty() {
        header.insert_header("content-type", FHIR_JSON)?;
    }
    Ok(Answer::Whole {
        header: Box::new(header),
        body,
    }
    .into())
}
