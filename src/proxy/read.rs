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
    member_json, split_around_members, wants_members, with_paging_link, with_quantity,
};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::FHIR_JSON;
use crate::group::read::RosterForRead;
use crate::group::GroupService;
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::intercept::relay;
use crate::proxy::respond::send_outcome;
use crate::proxy::{FhirGroupProxy, RequestContext};

/// Members per streamed chunk.
const MEMBERS_PER_CHUNK: usize = 1_000;

/// Answers the read, or returns `false` when the legacy server should.
pub async fn group_read(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
    group_id: &str,
) -> Result<bool> {
    let Some(service) = proxy.group_service.clone() else {
        return Ok(false);
    };
    let id = group_id.to_string();
    let lookup = proxy
        .store_runtime
        .spawn(async move { service.roster_for_read(&id).await })
        .await;
    let roster = match lookup {
        Ok(Ok(Some(roster))) => roster,
        Ok(Ok(None)) => return Ok(false),
        Ok(Err(error)) => {
            tracing::warn!(group = group_id, %error, "member store unavailable for a Group read");
            let outcome = Outcome::error(
                503,
                IssueType::Transient,
                format!("the members of Group/{group_id} cannot be read now: {error}"),
            );
            send_outcome(session, &outcome, &ctx.request_id).await?;
            return Ok(true);
        }
        Err(join_error) => {
            tracing::error!(%join_error, "Group read task failed");
            return Ok(false);
        }
    };
    ctx.intercepted = true;

    let mut request = session.req_header().clone();
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
            send_outcome(session, &outcome, &ctx.request_id).await?;
            return Ok(true);
        }
    };
    let group = match serde_json::from_slice::<Value>(&reply.body) {
        Ok(group) if reply.status == 200 && group["resourceType"] == "Group" => group,
        _ => {
            relay(session, ctx, reply).await?;
            return Ok(true);
        }
    };

    let group = with_quantity(group, roster.counts.active_members);
    let query = session.req_header().uri.query().map(str::to_string);
    let mut header = ResponseHeader::build(200, Some(reply.headers.len() + 2))?;
    for (name, value) in reply.headers.iter() {
        let skip = [
            http::header::CONTENT_LENGTH,
            http::header::TRANSFER_ENCODING,
            http::header::CONTENT_ENCODING,
            http::header::CONTENT_TYPE,
        ];
        if !skip.contains(name) {
            header.append_header(name.clone(), value.clone())?;
        }
    }
    header.insert_header("content-type", FHIR_JSON)?;
    if !header.headers.contains_key(X_REQUEST_ID) {
        header.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
    }

    let inline = wants_members(query.as_deref())
        && roster.counts.members <= proxy.config.fhir.max_inline_members as i64;
    if !inline {
        let group = if wants_members(query.as_deref()) {
            with_paging_link(group, &format!("{base}/Group/{group_id}/$members"))
        } else {
            group
        };
        let body = Bytes::from(serde_json::to_vec(&group).unwrap_or_default());
        header.insert_header("content-length", body.len().to_string())?;
        session
            .write_response_header(Box::new(header), false)
            .await?;
        session.write_response_body(Some(body), true).await?;
        return Ok(true);
    }

    let (prefix, suffix) = split_around_members(&group);
    header.insert_header("transfer-encoding", "chunked")?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session
        .write_response_body(Some(Bytes::from(prefix)), false)
        .await?;
    let mut chunks = stream_members(proxy, roster);
    while let Some(chunk) = chunks.recv().await {
        match chunk {
            Ok(bytes) => session.write_response_body(Some(bytes), false).await?,
            Err(error) => {
                // Headers are out: the only honest signal left is a broken body.
                tracing::error!(group = group_id, %error, "roster stream failed mid-response");
                return Err(pingora::Error::explain(
                    pingora::ErrorType::InternalError,
                    "roster stream failed mid-response",
                ));
            }
        }
    }
    session
        .write_response_body(Some(Bytes::from(suffix)), true)
        .await?;
    Ok(true)
}

/// Reads the roster on the store runtime and hands it over in JSON chunks
/// (comma-separated members), a few chunks ahead at most.
fn stream_members(
    proxy: &FhirGroupProxy,
    roster: RosterForRead,
) -> mpsc::Receiver<std::result::Result<Bytes, String>> {
    let (sender, receiver) = mpsc::channel(4);
    let service: Option<GroupService> = proxy.group_service.clone();
    proxy.store_runtime.spawn(async move {
        let Some(service) = service else { return };
        let mut cursor = match service.events.roster(&roster.group_key) {
            Ok(cursor) => cursor,
            Err(e) => {
                let _ = sender.send(Err(e.to_string())).await;
                return;
            }
        };
        let mut chunk = Vec::with_capacity(64 * 1024);
        let mut in_chunk = 0;
        let mut first = true;
        loop {
            match cursor.next().await {
                Ok(Some(row)) => {
                    if !first {
                        chunk.push(b',');
                    }
                    first = false;
                    let member = member_json(&row.entity_reference, &row.attributes());
                    chunk.extend(serde_json::to_vec(&member).unwrap_or_default());
                    in_chunk += 1;
                    if in_chunk == MEMBERS_PER_CHUNK {
                        let full = std::mem::replace(&mut chunk, Vec::with_capacity(64 * 1024));
                        in_chunk = 0;
                        if sender.send(Ok(Bytes::from(full))).await.is_err() {
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
        if !chunk.is_empty() {
            let _ = sender.send(Ok(Bytes::from(chunk))).await;
        }
    });
    receiver
}
