//! `GET {base}/Group/{id}` of a Group whose members live in ClickHouse: the
//! legacy server's Group (read with the client's own credentials) with
//! `quantity` and `member` from the member store, streamed.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::fhir::group_read::{
    cursor_after, page_request, presented_member, removed_member_json, split_cursor, wants_members,
    with_paging_link, with_quantity,
};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::FHIR_JSON;
use crate::group::read::RosterForRead;
use crate::group::{GroupError, GroupService};
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::respond::{Answer, Reply, RosterChunk, StreamedGroup};
use crate::proxy::{FhirGroupProxy, RequestContext};

/// Members per streamed chunk.
const MEMBERS_PER_CHUNK: usize = 1_000;

/// A migrated Group as the legacy server returns it to this client.
struct MigratedGroup {
    roster: RosterForRead,
    group: Value,
    headers: http::HeaderMap,
}

/// `Err(reply)`: no migrated Group to work on; the reply instead (an error,
/// the legacy server's own answer, or forwarding: the Group is not migrated).
type Fetched = std::result::Result<MigratedGroup, Reply>;

/// Looks up the member store, then reads `{base}/Group/{id}` from the legacy
/// server with the client's own headers, so its access control decides.
async fn fetch_migrated_group(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    group_id: &str,
    upstream_path: &str,
) -> Result<Fetched> {
    let versions = upstream_path.contains("/_history/");
    fetch_managed(
        proxy,
        session,
        ctx,
        group_id,
        upstream_path,
        "Group",
        versions,
    )
    .await
}

/// [`fetch_migrated_group`] for any answer of the legacy server about the
/// Group: a `resource_type` resource (the Group, or its history Bundle).
async fn fetch_managed(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    group_id: &str,
    upstream_path: &str,
    resource_type: &str,
    versions: bool,
) -> Result<Fetched> {
    let Some(service) = proxy.group_service.clone() else {
        return Ok(Err(Reply::Forward));
    };
    let id = group_id.to_string();
    let lookup = proxy
        .on_stores(async move {
            match versions {
                true => service.roster_for_versions(&id).await,
                false => service.roster_for_read(&id).await,
            }
        })
        .await;
    let roster = match lookup {
        Ok(Ok(Some(roster))) => roster,
        Ok(Ok(None)) => return Ok(Err(Reply::Forward)),
        Ok(Err(
            error @ (GroupError::Shared { .. }
            | GroupError::Readdress { .. }
            | GroupError::SharedKept { .. }),
        )) => {
            return Ok(Err(Reply::outcome(error.to_outcome())));
        }
        Ok(Err(error)) => {
            tracing::warn!(group = group_id, %error, "member store unavailable for a Group read");
            let outcome = Outcome::error(
                503,
                IssueType::Transient,
                format!("the members of Group/{group_id} cannot be read now: {error}"),
            );
            return Ok(Err(Reply::outcome(outcome)));
        }
        Err(outcome) => {
            return Ok(Err(Reply::outcome(outcome)));
        }
    };

    let mut request = session.req_header().clone();
    if request.uri.path() != upstream_path {
        let uri = upstream_path.parse::<http::Uri>().map_err(|e| {
            pingora::Error::because(pingora::ErrorType::InternalError, "Group URI", e)
        })?;
        request.set_uri(uri);
    }
    proxy.rewrite_for_upstream(session, &mut request, ctx)?;
    // The Group body is rewritten here, so it must come uncompressed.
    request.remove_header(&http::header::ACCEPT_ENCODING);
    let reply = match proxy
        .upstream_client
        .send_buffered(&request, Bytes::new())
        .await
    {
        Ok(reply) => reply,
        Err(outcome) => {
            return Ok(Err(Reply::outcome(outcome)));
        }
    };
    let current = !upstream_path.contains("/_history/");
    match serde_json::from_slice::<Value>(&reply.body) {
        Ok(group)
            if current
                && reply.status == 200
                && group["member"].as_array().is_some_and(|m| !m.is_empty())
                && roster.inline_array_is_drift(
                    group["meta"]["versionId"]
                        .as_str()
                        .and_then(|v| v.parse().ok()),
                ) =>
        {
            // Two rosters for one Group: neither is shown as the truth.
            let outcome = crate::group::drift(group_id);
            Ok(Err(Reply::outcome(outcome)))
        }
        Ok(group) if reply.status == 200 && group["resourceType"] == resource_type => {
            Ok(Ok(MigratedGroup {
                roster,
                group,
                headers: reply.headers,
            }))
        }
        _ => Ok(Err(Reply::relay(reply))),
    }
}

/// The read's answer, or [`Reply::Forward`] when the legacy server's is.
pub async fn group_read(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Reply> {
    let MigratedGroup {
        roster,
        group,
        headers,
    } = match fetch_migrated_group(
        proxy,
        session,
        ctx,
        group_id,
        &format!("{base}/Group/{group_id}"),
    )
    .await?
    {
        Ok(migrated) => migrated,
        Err(instead) => return Ok(instead),
    };
    let group = with_quantity(group, roster.counts.active_members);
    let query = session.req_header().uri.query().map(str::to_string);
    let header = json_header(&headers, ctx)?;

    let inline = wants_members(query.as_deref())
        && roster.counts.members <= proxy.config.fhir.max_inline_members as i64;
    if !inline {
        let group = if wants_members(query.as_deref()) {
            with_paging_link(
                group,
                &format!("{base}/Group/{group_id}/$members"),
                &proxy.config.fhir.extension_base,
            )
        } else {
            group
        };
        return Ok(Reply::json(header, &group));
    }

    Ok(streamed_group(proxy, header, group, roster.group_key, None))
}

/// `GET {base}/Group/{id}/_history/{vid}` of a migrated Group: the legacy
/// server's version of the Group with the roster as it was at that version,
/// rebuilt from the events. A version from before the migration still holds
/// its members inline and is relayed as the legacy server returns it.
pub async fn group_version_read(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
    version: u64,
) -> Result<Reply> {
    let path = format!("{base}/Group/{group_id}/_history/{version}");
    let MigratedGroup {
        roster,
        group,
        headers,
    } = match fetch_migrated_group(proxy, session, ctx, group_id, &path).await? {
        Ok(migrated) => migrated,
        Err(instead) => return Ok(instead),
    };
    let header = json_header(&headers, ctx)?;
    let inline_members = group["member"].as_array().is_some_and(|m| !m.is_empty());
    let key = roster
        .key_for_version(group["meta"]["lastUpdated"].as_str())
        .map(str::to_string);
    let (Some(key), false) = (key, inline_members) else {
        // The legacy server's own version: members inline (from before the
        // migration), or a generation whose roster the proxy never kept.
        return Ok(Reply::json(header, &group));
    };
    Ok(streamed_group(proxy, header, group, key, Some(version)))
}

/// `GET {base}/Group/{id}/_history` of a managed Group: the legacy server's
/// history Bundle (read with the client's credentials), each version with the
/// roster it had, as `_history/{vid}` gives it. Rosters over
/// `fhir.max_inline_members` are refused (one version at a time answers them).
/// Not managed: forwarded, the legacy server answers.
pub async fn group_history(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Reply> {
    let path = format!("{base}/Group/{group_id}/_history");
    let MigratedGroup {
        roster,
        group: bundle,
        headers,
    } = match fetch_managed(proxy, session, ctx, group_id, &path, "Bundle", true).await? {
        Ok(fetched) => fetched,
        Err(instead) => return Ok(instead),
    };
    let limit = proxy.config.fhir.max_inline_members as i64;
    if roster.counts.members > limit {
        let outcome = Outcome::error(
            422,
            IssueType::TooCostly,
            format!(
                "Group/{group_id} has more than {limit} members (fhir.max_inline_members), too \
                 many to put into every version of its history; read versions one by one with \
                 _history/{{vid}}"
            ),
        );
        return Ok(Reply::outcome(outcome));
    }
    let mut bundle = bundle;
    let entries = bundle
        .get_mut("entry")
        .and_then(Value::as_array_mut)
        .into_iter()
        .flatten();
    for entry in entries {
        let Some(resource) = entry.get_mut("resource").and_then(Value::as_object_mut) else {
            continue;
        };
        let has_inline = resource
            .get("member")
            .and_then(Value::as_array)
            .is_some_and(|m| !m.is_empty());
        let version = resource
            .get("meta")
            .and_then(|m| m.get("versionId"))
            .and_then(Value::as_str)
            .and_then(|v| v.parse::<u64>().ok());
        let key = roster.key_for_version(
            resource
                .get("meta")
                .and_then(|m| m.get("lastUpdated"))
                .and_then(Value::as_str),
        );
        let (Some(version), false, Some(key)) = (version, has_inline, key) else {
            continue;
        };
        match roster_at(proxy, key.to_string(), version).await {
            Ok((members, active)) => {
                resource.remove("member");
                resource.remove("quantity");
                if !members.is_empty() {
                    resource.insert("member".into(), Value::Array(members));
                }
                resource.insert("quantity".into(), active.into());
            }
            Err(error) => {
                let outcome = Outcome::error(
                    503,
                    IssueType::Transient,
                    format!("the roster of Group/{group_id} version {version} cannot be read now: {error}"),
                );
                return Ok(Reply::outcome(outcome));
            }
        }
    }
    Ok(Reply::json(json_header(&headers, ctx)?, &bundle))
}

/// A managed Group's roster at `version`, collected (bounded by the caller),
/// with its active members.
async fn roster_at(
    proxy: &FhirGroupProxy,
    group_key: String,
    version: u64,
) -> std::result::Result<(Vec<Value>, i64), String> {
    let mut chunks = stream_members(proxy, group_key, Some(version));
    let mut joined = vec![b'['];
    while let Some(chunk) = chunks.recv().await {
        match chunk? {
            RosterChunk::Members(bytes) => {
                if joined.len() > 1 {
                    joined.push(b',');
                }
                joined.extend_from_slice(&bytes);
            }
            RosterChunk::End { active_members } => {
                joined.push(b']');
                let members = serde_json::from_slice(&joined).map_err(|e| e.to_string())?;
                return Ok((members, active_members));
            }
        }
    }
    Err("the roster stream ended early".into())
}

/// The legacy server's response headers for a body the proxy rewrote.
pub(crate) fn json_header(
    upstream: &http::HeaderMap,
    ctx: &RequestContext,
) -> Result<ResponseHeader> {
    let mut header = ResponseHeader::build(200, Some(upstream.len() + 2))?;
    let rewritten = [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::CONTENT_ENCODING,
        http::header::CONTENT_TYPE,
    ];
    for (name, value) in upstream.iter() {
        if !rewritten.contains(name) {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    header.insert_header("content-type", FHIR_JSON)?;
    if !header.headers.contains_key(X_REQUEST_ID) {
        header.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
    }
    Ok(header)
}

/// `GET {base}/Group/{id}/$members?_count=N&_cursor=REF`: one page of members,
/// seeking by reference. Groups not migrated go to the legacy server.
pub async fn members_page(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<Reply> {
    let query = session.req_header().uri.query().map(str::to_string);
    // `_since` as the client wrote it, carried into the next link.
    let page_since = query.as_deref().and_then(|q| {
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "_since")
            .map(|(_, v)| v.into_owned())
    });
    let page = match page_request(query.as_deref()) {
        Ok(page) => page,
        Err(why) => {
            let outcome = Outcome::error(400, IssueType::Invalid, why);
            return Ok(Reply::outcome(outcome));
        }
    };
    let MigratedGroup {
        roster,
        group,
        headers,
    } = match fetch_migrated_group(
        proxy,
        session,
        ctx,
        group_id,
        &format!("{base}/Group/{group_id}"),
    )
    .await?
    {
        Ok(migrated) => migrated,
        Err(instead) => return Ok(instead),
    };
    let Some(service) = proxy.group_service.clone() else {
        return Ok(Reply::Forward);
    };
    let (key, cursor, since, limit) = (
        roster.group_key.clone(),
        page.cursor.clone(),
        page.since_ms,
        page.count + 1,
    );
    let rows = proxy
        .on_stores(async move {
            service
                .roster_page(&key, split_cursor(&cursor), since, limit)
                .await
        })
        .await;
    let mut rows = match rows {
        Ok(Ok(rows)) => rows,
        Ok(Err(error)) => {
            let outcome = Outcome::error(
                503,
                IssueType::Transient,
                format!("members cannot be read now: {error}"),
            );
            return Ok(Reply::outcome(outcome));
        }
        Err(outcome) => {
            return Ok(Reply::outcome(outcome));
        }
    };
    let has_next = rows.len() > page.count;
    rows.truncate(page.count);
    let since = page_since.as_deref().map(|s| {
        let encoded: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
        format!("&_since={encoded}")
    });
    let link = |cursor: &str| {
        let encoded: String = url::form_urlencoded::byte_serialize(cursor.as_bytes()).collect();
        format!(
            "{base}/Group/{group_id}/$members?_count={}&_cursor={encoded}{}",
            page.count,
            since.as_deref().unwrap_or_default()
        )
    };
    let next = has_next
        .then(|| {
            rows.last()
                .map(|row| link(&cursor_after(&row.order_key, &row.slot_id)))
        })
        .flatten();
    let mut members = Vec::with_capacity(rows.len());
    for row in &rows {
        let text = match proxy.config.fhir.reference_fields {
            true => presented_member(&row.element),
            false => std::borrow::Cow::Borrowed(row.element.as_str()),
        };
        let element: Value = match serde_json::from_str(&text) {
            Ok(element) => element,
            Err(error) => {
                let outcome = Outcome::error(
                    500,
                    IssueType::Exception,
                    format!(
                        "the member store holds a damaged element in slot {}: {error}",
                        row.slot_id
                    ),
                );
                return Ok(Reply::outcome(outcome));
            }
        };
        members.push(match row.present {
            1 => element,
            _ => removed_member_json(element, &proxy.config.fhir.extension_base),
        });
    }
    let group = with_quantity(group, roster.counts.active_members);
    let bundle = crate::fhir::group_read::members_page(
        group,
        members,
        roster.counts.members,
        &link(&page.cursor),
        next.as_deref(),
    );
    Ok(Reply::json(json_header(&headers, ctx)?, &bundle))
}

/// Reads the roster (current, or as of a version) on the store runtime and
/// hands it over in JSON chunks, a few chunks ahead at most.
fn stream_members(
    proxy: &FhirGroupProxy,
    group_key: String,
    at_version: Option<u64>,
) -> mpsc::Receiver<std::result::Result<RosterChunk, String>> {
    let (sender, receiver) = mpsc::channel(4);
    let service: Option<GroupService> = proxy.group_service.clone();
    let reference_fields = proxy.config.fhir.reference_fields;
    proxy.store_runtime.spawn(async move {
        let Some(service) = service else { return };
        let mut cursor = match service.roster(&group_key, at_version) {
            Ok(cursor) => cursor,
            Err(e) => {
                let _ = sender.send(Err(e.to_string())).await;
                return;
            }
        };
        let mut chunk = Vec::with_capacity(64 * 1024);
        let mut in_chunk = 0;
        let mut first = true;
        let mut active_members = 0;
        loop {
            match cursor.next().await {
                Ok(Some(row)) => {
                    if !first {
                        chunk.push(b',');
                    }
                    first = false;
                    if row.inactive == 0 {
                        active_members += 1;
                    }
                    // Stored verbatim as the JSON text written: spliced as is,
                    // or as the legacy server shows its reference fields.
                    if reference_fields {
                        chunk.extend_from_slice(presented_member(&row.element).as_bytes());
                    } else {
                        chunk.extend_from_slice(row.element.as_bytes());
                    }
                    in_chunk += 1;
                    if in_chunk == MEMBERS_PER_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(64 * 1024));
                        in_chunk = 0;
                        if sender
                            .send(Ok(RosterChunk::Members(Bytes::from(full))))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = sender.send(Err(e.to_string())).await;
                    return;
                }
            }
        }
        if !chunk.is_empty()
            && sender
                .send(Ok(RosterChunk::Members(Bytes::from(chunk))))
                .await
                .is_err()
        {
            return;
        }
        let _ = sender.send(Ok(RosterChunk::End { active_members })).await;
    });
    receiver
}

/// `group` with its roster (current, or as of `at_version`) streamed into
/// `member`; for a version, `quantity` counts the active members streamed.
fn streamed_group(
    proxy: &FhirGroupProxy,
    header: ResponseHeader,
    group: Value,
    group_key: String,
    at_version: Option<u64>,
) -> Reply {
    Answer::StreamedGroup(Box::new(StreamedGroup {
        header,
        group,
        chunks: stream_members(proxy, group_key, at_version),
        quantity_last: at_version.is_some(),
    }))
    .into()
}
