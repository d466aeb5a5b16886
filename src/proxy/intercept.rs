//! `PATCH {base}/Group/{id}` with a JSON Patch body: read the body, decide
//! whether its ops target `/member`, and either answer from the member store or
//! send it on to the upstream unchanged.

use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::config::MixedPatchPolicy;
use crate::fhir::atr::{parse_atr_parameters, AtrOperation};
use crate::fhir::group_read::{with_listed_roster, ListedRoster};
use crate::fhir::member_patch::{parse_patch, PatchClass, PatchLimits};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::FHIR_JSON;
use crate::group::read::AnswerRoster;
use crate::group::write::{
    MemberEdit, MemberPatchRequest, MemberPatchResult, UpstreamDocument, UpstreamPart,
    UpstreamReply,
};
use crate::group::{RosterHome, WriteError};
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::respond::answer_outcome;
pub(crate) use crate::proxy::respond::relay;
use crate::proxy::{FhirGroupProxy, RequestContext};
use crate::store::group_documents::to_fhir_json;

/// Pingora replays at most this much buffered body to the upstream itself.
const PINGORA_REPLAY_LIMIT: usize = 64 * 1024;

/// Forwarding a body we read: pingora replays what fits its buffer; the rest
/// goes through our own client.
pub(crate) fn forward(body: Bytes) -> Next {
    if body.len() <= PINGORA_REPLAY_LIMIT {
        Next::Forward
    } else {
        Next::ForwardWithBody(body)
    }
}

/// What happens next with an inspected request.
pub enum Next {
    /// The response was written here.
    Answered,
    /// Forward it; pingora replays the buffered body.
    Forward,
    /// Forward it through our own client with this body (too big to replay).
    ForwardWithBody(Bytes),
}

pub async fn group_patch(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Next> {
    let body = match read_intercepted_body(proxy, session, ctx).await? {
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
        Ok(_) => return Ok(forward(body)),
        Err(outcome) => return answer(session, ctx, &outcome).await,
    };
    let (changes, other_ops) = match parsed {
        Ok(PatchClass::NotMembers) => return Ok(forward(body)),
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
            return answer(session, ctx, &outcome).await;
        }
        Ok(PatchClass::WholeDocument { .. } | PatchClass::CrossesMember { .. }) if !managed => {
            return Ok(forward(body))
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
            return answer(session, ctx, &outcome).await;
        }
        Ok(PatchClass::WholeDocument { .. }) => return Ok(forward(body)),
        Err(_) if !managed => return Ok(forward(body)),
        Err(outcome) => return answer(session, ctx, &outcome).await,
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
            return answer(session, ctx, &outcome).await;
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
        return Ok(forward(body));
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
) -> Result<Next> {
    match proxy.member_write_home(ctx, group_id).await {
        Ok(Some(RosterHome::Events)) => {}
        Ok(_) => return Ok(forward(body)),
        Err(outcome) => return answer(session, ctx, &outcome).await,
    }
    send_showing_the_roster(proxy, session, ctx, base, group_id, body).await
}

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
) -> Result<Next> {
    let mut request = session.req_header().clone();
    proxy.rewrite_for_upstream(session, &mut request, ctx)?;
    request.remove_header(&http::header::EXPECT);
    let reply = match proxy.upstream_client.send_buffered(&request, body).await {
        Ok(reply) => reply,
        Err(outcome) => return answer(session, ctx, &outcome).await,
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
    relay(session, ctx, reply).await?;
    Ok(Next::Answered)
}

/// How a legacy server's answer that names a Group kept here gets the
/// roster it lacks.
struct WithRoster<'a> {
    base: &'a str,
    group_id: &'a str,
    extension_base: &'a str,
}

impl WithRoster<'_> {
    /// The answer with the roster of `version`; with a roster too long to
    /// inline, its count and `$members` link. When the roster could not be
    /// read, a Group answer would look empty: the client is told instead
    /// that the change stands and to read the Group.
    fn reply(
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

/// Da Vinci ATR `$member-add` / `$member-remove` on a Group: the same write
/// path as a member PATCH. Groups not migrated go to the legacy server.
pub async fn atr_operation(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    operation: AtrOperation,
) -> Result<Next> {
    let body = match read_intercepted_body(proxy, session, ctx).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let members = match parse_atr_parameters(operation, &body) {
        Ok(members) => members,
        Err(outcome) => return answer(session, ctx, &outcome).await,
    };
    let edit = MemberEdit::Atr(operation, members);
    match write_members(proxy, session, ctx, base, group_id, &body, edit, None, None).await? {
        Some(next) => Ok(next),
        None => Ok(forward(body)),
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
) -> Result<Option<Next>> {
    let Some(service) = proxy.group_service.as_ref() else {
        return Ok(None);
    };
    if upstream_part.is_none() && !may_write(proxy, session, ctx, base, group_id).await? {
        return Ok(Some(Next::Answered));
    }
    let headers = &session.req_header().headers;
    let if_match = match headers
        .get(http::header::IF_MATCH)
        .and_then(|v| parse_if_match(v.as_bytes()).transpose())
    {
        None if proxy.config.members.require_if_match => {
            let outcome = Outcome::error(
                400,
                IssueType::Required,
                "this server requires If-Match (W/\"<versionId>\") on Group member PATCHes",
            );
            return answer(session, ctx, &outcome).await.map(Some);
        }
        None => None,
        Some(Ok(version)) => Some(version),
        Some(Err(outcome)) => return answer(session, ctx, &outcome).await.map(Some),
    };
    let prefer = Prefer::from_header(headers.get("prefer").and_then(|v| v.to_str().ok()));
    let client_request_id = headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string);
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
        Err(outcome) => return answer(session, ctx, &outcome).await.map(Some),
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
            ctx.intercepted = true;
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
            relay(session, ctx, reply).await?;
            Ok(Some(Next::Answered))
        }
        Ok(result) => {
            ctx.intercepted = true;
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
            write_success(session, ctx, &answer, &result).await?;
            Ok(Some(Next::Answered))
        }
        Err(WriteError::NotMigrated) => Ok(None),
        Err(error) => {
            if !matches!(error, WriteError::Outcome(_)) {
                tracing::warn!(group = group_id, %error, "member write failed");
            }
            answer(session, ctx, &error.to_outcome()).await.map(Some)
        }
    }
}

/// For a write the legacy server never sees, under `auth.mode = "upstream"`:
/// Groups still inline go to the legacy server anyway (no probe needed);
/// otherwise the legacy server is asked first. `false`: answered here.
async fn may_write(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<bool> {
    if !matches!(&*proxy.authorizer, crate::auth::Authorizer::Upstream { .. }) {
        return Ok(true);
    }
    match proxy.member_write_home(ctx, group_id).await {
        Ok(None | Some(crate::group::RosterHome::Inline)) => Ok(true),
        Ok(Some(_)) => {
            crate::proxy::authorize::probe_upstream(proxy, session, ctx, base, group_id).await
        }
        Err(outcome) => {
            answer(session, ctx, &outcome).await?;
            Ok(false)
        }
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

/// Reads the body of a request the proxy may answer itself, keeping it for a
/// replay upstream. `Err` carries what happens instead: forwarding (member
/// handling off) or an answered 413.
pub(crate) async fn read_intercepted_body(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
) -> Result<std::result::Result<Bytes, Next>> {
    if proxy.group_service.is_none() {
        return Ok(Err(Next::Forward));
    }
    session.enable_retry_buffering();
    let max_depth = proxy.config.fhir.max_json_depth;
    match read_body(session, proxy.config.fhir.max_intercepted_body_bytes).await? {
        Ok(body) if crate::fhir::json_limits::nests_deeper_than(&body, max_depth) => {
            let outcome = Outcome::error(
                400,
                IssueType::TooCostly,
                format!("the request body nests JSON deeper than {max_depth} levels"),
            );
            Ok(Err(answer(session, ctx, &outcome).await?))
        }
        Ok(body) => Ok(Ok(body)),
        Err(outcome) => Ok(Err(answer(session, ctx, &outcome).await?)),
    }
}

pub(crate) async fn answer(
    session: &mut Session,
    ctx: &mut RequestContext,
    outcome: &Outcome,
) -> Result<Next> {
    answer_outcome(session, ctx, outcome).await?;
    Ok(Next::Answered)
}

async fn read_body(session: &mut Session, limit: usize) -> Result<Result<Bytes, Outcome>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(Err(Outcome::error(
                413,
                IssueType::TooLong,
                format!("the request body exceeds the limit of {limit} bytes (fhir.max_intercepted_body_bytes)"),
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}

/// What a request asks for, digested: method, path and query, body. A retry
/// under the same `X-Request-Id` repeats all three.
fn request_digest(head: &pingora::http::RequestHeader, body: &[u8]) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    digest.update(head.method.as_str().as_bytes());
    digest.update(b"\n");
    digest.update(
        head.uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes(),
    );
    digest.update(b"\n");
    digest.update(body);
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `If-Match: W/"3"` (also `"3"` and `3`) to a version number; `*` (any
/// version: the Group exists, which a member write checks anyway) to `None`.
pub fn parse_if_match(value: &[u8]) -> Result<Option<u64>, Outcome> {
    let text = std::str::from_utf8(value).unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    let unweak = text.strip_prefix("W/").unwrap_or(text);
    let bare = unweak
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(unweak);
    bare.parse::<u64>().map(Some).map_err(|_| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("If-Match '{text}' is not a version ETag like W/\"3\""),
        )
    })
}

/// The body the client asked for with `Prefer: return=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    Minimal,
    Representation,
    OperationOutcome,
}

impl Prefer {
    pub fn from_header(value: Option<&str>) -> Self {
        let Some(value) = value else {
            return Prefer::Representation;
        };
        for preference in value.split(',').map(str::trim) {
            match preference.to_ascii_lowercase().as_str() {
                "return=minimal" => return Prefer::Minimal,
                "return=operationoutcome" => return Prefer::OperationOutcome,
                "return=representation" => return Prefer::Representation,
                _ => {}
            }
        }
        Prefer::Representation
    }
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
struct WriteAnswer<'a> {
    base: &'a str,
    group_id: &'a str,
    prefer: Prefer,
    roster: &'a RosterAnswer,
    reference_fields: bool,
    extension_base: &'a str,
}

/// Answers a member write the legacy server never saw, as the legacy server
/// answers a write. A Group of the reference server's kind (it keeps
/// `_sourceAssigningAuthority`, and `fhir.reference_fields` is on) is
/// answered as that server answers an update: the Group with its
/// `identifier`s and reference extensions, `Location` relative
/// (`4_0_0/Group/{id}`), `Content-Location` absolute, `Last-Modified` the
/// answer's time in ISO 8601, and `{}` for `return=minimal`.
async fn write_success(
    session: &mut Session,
    ctx: &RequestContext,
    answer: &WriteAnswer<'_>,
    result: &MemberPatchResult,
) -> Result<()> {
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
    header.insert_header("content-length", body.len().to_string())?;
    if !body.is_empty() {
        header.insert_header("content-type", FHIR_JSON)?;
    }
    let empty = body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_match_forms() {
        assert_eq!(parse_if_match(b"W/\"3\"").unwrap(), Some(3));
        assert_eq!(parse_if_match(b"\"12\"").unwrap(), Some(12));
        assert_eq!(parse_if_match(b" 7 ").unwrap(), Some(7));
        assert_eq!(parse_if_match(b"*").unwrap(), None, "any version");
        let e = parse_if_match(b"W/\"abc\"").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.issues[0].diagnostics.contains("abc"));
    }

    #[test]
    fn prefer_forms() {
        assert_eq!(Prefer::from_header(None), Prefer::Representation);
        assert_eq!(Prefer::from_header(Some("return=minimal")), Prefer::Minimal);
        assert_eq!(
            Prefer::from_header(Some("handling=strict, return=OperationOutcome")),
            Prefer::OperationOutcome
        );
        assert_eq!(
            Prefer::from_header(Some("respond-async")),
            Prefer::Representation
        );
    }
}
