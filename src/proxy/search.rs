//! `GET {base}/Group?member=...`: Groups with inline members come from the
//! legacy server's own search; migrated Groups are found in the ClickHouse
//! reverse index and read from the legacy server by id, with the client's own
//! credentials both times; the two Bundles are merged.

use bytes::Bytes;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::Value;

use crate::fhir::group_read::with_listed_roster;
use crate::fhir::group_search::{member_search_terms, merge_member_search, query_for_ids};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::write::UpstreamReply;
use crate::group::GroupError;
use crate::proxy::read::json_header;
use crate::proxy::respond::Reply;
use crate::proxy::{FhirGroupProxy, RequestContext};

/// The search's answer, or [`Reply::Forward`] when the legacy server alone can give it.
pub async fn group_member_search(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
) -> Result<Reply> {
    let query = session.req_header().uri.query().map(str::to_string);
    let (Some(terms), Some(service)) = (
        member_search_terms(query.as_deref()),
        proxy.group_service.clone(),
    ) else {
        return Ok(Reply::Forward);
    };
    let found = proxy
        .on_stores(async move { service.migrated_groups_with(&terms).await })
        .await;
    let migrated = match found {
        Ok(Ok(groups)) if groups.is_empty() => return Ok(Reply::Forward),
        Ok(Ok(groups)) => groups,
        Ok(Err(error)) => {
            let outcome = match error {
                GroupError::Outcome(outcome) => outcome,
                other => Outcome::error(
                    503,
                    IssueType::Transient,
                    format!("the member index cannot be searched now: {other}"),
                ),
            };
            return Ok(Reply::outcome(outcome));
        }
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    let inline = match search_upstream(proxy, session, ctx, None).await? {
        Ok(reply) => reply,
        Err(instead) => return Ok(instead),
    };
    let Some(id_query) = query_for_ids(query.as_deref(), &migrated) else {
        return Ok(Reply::relay(inline));
    };
    let by_id = match search_upstream(proxy, session, ctx, Some(&id_query)).await? {
        Ok(reply) => reply,
        Err(instead) => return Ok(instead),
    };
    let (Ok(inline_bundle), Ok(by_id_bundle)) = (
        serde_json::from_slice::<Value>(&inline.body),
        serde_json::from_slice::<Value>(&by_id.body),
    ) else {
        return Ok(Reply::relay(inline));
    };
    let mut merged = merge_member_search(inline_bundle, by_id_bundle);
    if let Err(outcome) = put_in_kept_rosters(proxy, base, &mut merged, &migrated).await {
        return Ok(Reply::outcome(outcome));
    }
    Ok(Reply::json(json_header(&inline.headers, ctx)?, &merged))
}

/// Any other Group search. The legacy server answers it, but holds the
/// Groups kept here without their rosters: its Bundle is read whole and
/// those Groups get the roster of the version listed, as a read shows it
/// (up to `fhir.max_inline_members`, else `quantity` and a `$members`
/// link). Until some Group is kept here, or when the search asks for no
/// `member` (`_summary`, `_elements`), it streams through untouched.
pub async fn group_search(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    base: &str,
) -> Result<Reply> {
    let query = session.req_header().uri.query().map(str::to_string);
    if !crate::fhir::group_read::wants_members(query.as_deref()) {
        return Ok(Reply::Forward);
    }
    match proxy.manages_any_group().await {
        Ok(false) => return Ok(Reply::Forward),
        Ok(true) => {}
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    }
    let reply = match search_upstream(proxy, session, ctx, None).await? {
        Ok(reply) => reply,
        Err(instead) => return Ok(instead),
    };
    let Ok(mut bundle) = serde_json::from_slice::<Value>(&reply.body) else {
        return Ok(Reply::relay(reply));
    };
    // Groups listed with a version: the ones whose roster can be shown.
    let ids: Vec<String> = bundle["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| &entry["resource"])
        .filter(|resource| resource["resourceType"] == "Group")
        .filter(|resource| listed_version(resource).is_some())
        .filter_map(|resource| resource["id"].as_str().map(str::to_string))
        .collect();
    let managed = match proxy.managed_among(&ids).await {
        Ok(managed) => managed,
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    if managed.is_empty() {
        return Ok(Reply::relay(reply));
    }
    if let Err(outcome) = put_in_kept_rosters(proxy, base, &mut bundle, &managed).await {
        return Ok(Reply::outcome(outcome));
    }
    Ok(Reply::json(json_header(&reply.headers, ctx)?, &bundle))
}

/// The Group entries of `bundle` that are kept here (`managed`) get the
/// roster of the version listed, as a read shows it. Refused rather than
/// answered without it: a kept Group whose listed document holds members
/// too (drift), or whose roster cannot be read now.
async fn put_in_kept_rosters(
    proxy: &FhirGroupProxy,
    base: &str,
    bundle: &mut Value,
    managed: &[String],
) -> std::result::Result<(), Outcome> {
    use crate::proxy::roster_answer::{roster_for_answer, RosterAnswer};
    for entry in bundle["entry"].as_array_mut().into_iter().flatten() {
        let resource = &mut entry["resource"];
        let Some(id) = resource["id"].as_str().map(str::to_string) else {
            continue;
        };
        if resource["resourceType"] != "Group" || !managed.contains(&id) {
            continue;
        }
        if resource["member"].as_array().is_some_and(|m| !m.is_empty()) {
            // Two rosters for one Group: never merged silently.
            return Err(crate::group::drift(&id));
        }
        let roster = match listed_version(resource) {
            Some(version) => roster_for_answer(proxy, &id, None, version).await,
            None => RosterAnswer::Unknown,
        };
        let members_url = format!("{base}/Group/{id}/$members");
        let Some(listed) = roster.listed(&members_url, &proxy.config.fhir.extension_base) else {
            return Err(Outcome::error(
                503,
                IssueType::Transient,
                format!(
                    "the members of Group/{id}, found by this search, cannot be read now; \
                     retry the search"
                ),
            ));
        };
        *resource = with_listed_roster(resource.take(), listed);
    }
    Ok(())
}

/// The `meta.versionId` of a resource listed in a Bundle.
fn listed_version(resource: &Value) -> Option<u64> {
    resource["meta"]["versionId"].as_str()?.parse().ok()
}

/// The client's search (or the same path with `query` instead), sent upstream
/// with its headers. `Err`: a failure or a non-200 answer, to relay.
async fn search_upstream(
    proxy: &FhirGroupProxy,
    session: &mut Session,
    ctx: &mut RequestContext,
    query: Option<&str>,
) -> Result<std::result::Result<UpstreamReply, Reply>> {
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
        Ok(reply) => Ok(Err(Reply::relay(reply))),
        Err(outcome) => Ok(Err(Reply::outcome(outcome))),
    }
}
