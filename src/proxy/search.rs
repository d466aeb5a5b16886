//! `GET {base}/Group?member=...`: Groups with inline members come from the
//! legacy server's own search; migrated Groups are found in the ClickHouse
//! reverse index and read from the legacy server by id, with the client's own
//! credentials both times; the two Bundles are merged.

use std::collections::HashMap;

use bytes::Bytes;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::Value;

use crate::fhir::group_search::{member_search_terms, merge_member_search, query_for_ids};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::patch::UpstreamReply;
use crate::group::WriteError;
use crate::proxy::intercept::relay;
use crate::proxy::read::json_header;
use crate::proxy::respond::send_outcome;
use crate::proxy::{FhirGroupProxy, RequestContext};

/// Answers the search, or returns `false` when the legacy server alone can.
pub async fn group_member_search(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
) -> Result<bool> {
    let query = session.req_header().uri.query().map(str::to_string);
    let (Some(terms), Some(service)) = (
        member_search_terms(query.as_deref()),
        proxy.group_service.clone(),
    ) else {
        return Ok(false);
    };
    let found = proxy
        .on_stores(async move { service.migrated_groups_with(&terms).await })
        .await;
    let migrated = match found {
        Ok(Ok(groups)) if groups.is_empty() => return Ok(false),
        Ok(Ok(groups)) => groups,
        Ok(Err(error)) => {
            ctx.intercepted = true;
            let outcome = match error {
                WriteError::Outcome(outcome) => outcome,
                other => Outcome::error(
                    503,
                    IssueType::Transient,
                    format!("the member index cannot be searched now: {other}"),
                ),
            };
            send_outcome(session, &outcome, &ctx.request_id).await?;
            return Ok(true);
        }
        Err(outcome) => {
            ctx.intercepted = true;
            send_outcome(session, &outcome, &ctx.request_id).await?;
            return Ok(true);
        }
    };
    ctx.intercepted = true;

    let inline = match search_upstream(proxy, session, ctx, None).await? {
        Ok(reply) => reply,
        Err(()) => return Ok(true),
    };
    let ids: Vec<String> = migrated.iter().map(|(id, _)| id.clone()).collect();
    let Some(id_query) = query_for_ids(query.as_deref(), &ids) else {
        relay(session, ctx, inline).await?;
        return Ok(true);
    };
    let by_id = match search_upstream(proxy, session, ctx, Some(&id_query)).await? {
        Ok(reply) => reply,
        Err(()) => return Ok(true),
    };
    let (Ok(inline_bundle), Ok(by_id_bundle)) = (
        serde_json::from_slice::<Value>(&inline.body),
        serde_json::from_slice::<Value>(&by_id.body),
    ) else {
        relay(session, ctx, inline).await?;
        return Ok(true);
    };
    let active: HashMap<String, i64> = migrated.into_iter().collect();
    let merged = merge_member_search(
        inline_bundle,
        by_id_bundle,
        &active,
        base,
        &proxy.config.fhir.extension_base,
    );
    let body = Bytes::from(serde_json::to_vec(&merged).unwrap_or_default());
    let mut header = json_header(&inline.headers, ctx)?;
    header.insert_header("content-length", body.len().to_string())?;
    session
        .write_response_header(Box::new(header), false)
        .await?;
    session.write_response_body(Some(body), true).await?;
    Ok(true)
}

/// The client's search (or the same path with `query` instead), sent upstream
/// with its headers. A failure or non-200 answer is already relayed: `Err(())`.
async fn search_upstream(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    query: Option<&str>,
) -> Result<std::result::Result<UpstreamReply, ()>> {
    let mut request = session.req_header().clone();
    if let Some(query) = query {
        let uri = format!("{}?{query}", request.uri.path())
            .parse::<http::Uri>()
            .map_err(|e| {
                pingora::Error::because(pingora::ErrorType::InternalError, "search URI", e)
            })?;
        request.set_uri(uri);
    }
    proxy.rewrite_for_upstream(session, &mut request, ctx)?;
    request.remove_header(&http::header::ACCEPT_ENCODING);
    match proxy
        .upstream_client
        .send_buffered(&request, Bytes::new())
        .await
    {
        Ok(reply) if reply.status == 200 => Ok(Ok(reply)),
        Ok(reply) => {
            relay(session, ctx, reply).await?;
            Ok(Err(()))
        }
        Err(outcome) => {
            send_outcome(session, &outcome, &ctx.request_id).await?;
            Ok(Err(()))
        }
    }
}
