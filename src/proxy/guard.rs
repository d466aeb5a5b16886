//! Requests that could reach a managed Group's roster around the member path.
//!
//! The legacy server answers them from (or writes them into) the Group
//! document, which holds no members once the proxy manages the roster: a
//! `$merge` or Bundle would write members inline beside the events, a
//! conditional write would hit a Group the proxy never saw, and `$export`,
//! `$everything`, instance `_history` or a `Group:member` join would answer
//! from an empty array. Each is forwarded unchanged while no managed Group is
//! involved, and refused with an OperationOutcome otherwise: never forwarded
//! raw, never guessed at.

use pingora::proxy::Session;
use pingora::Result;

use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::written_groups::written_groups;
use crate::group::RosterHome;
use crate::proxy::request_body::read_intercepted_body;
use crate::proxy::respond::Reply;
use crate::proxy::route::JSON_PATCH;
use crate::proxy::FhirGroupProxy;

/// `$merge`, batch and transaction Bundles: forwarded unless they write a
/// managed Group (or address Groups by search while some are managed).
pub async fn multi_resource_write(proxy: &FhirGroupProxy, session: &mut Session) -> Result<Reply> {
    match proxy.manages_any_group().await {
        Ok(false) => return Ok(Reply::Forward),
        Ok(true) => {}
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    }
    let body = match read_intercepted_body(proxy, session).await? {
        Ok(body) => body,
        Err(next) => return Ok(next),
    };
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        let outcome = Outcome::error(
            415,
            IssueType::NotSupported,
            "this server keeps some Group rosters apart from the Group documents, so writes \
             of several resources must be FHIR JSON (application/fhir+json) for it to see \
             which Groups they touch",
        );
        return Ok(Reply::outcome(outcome));
    };
    let groups = written_groups(&json);
    if let Some(url) = groups.by_search.first() {
        let outcome = Outcome::error(
            422,
            IssueType::NotSupported,
            format!(
                "the entry '{url}' addresses Groups by search, which is refused while this \
                 server keeps Group rosters apart from the Group documents; address the Group \
                 by id"
            ),
        );
        return Ok(Reply::outcome(outcome));
    }
    let managed = match proxy.managed_among(&groups.ids).await {
        Ok(managed) => managed,
        Err(outcome) => return Ok(Reply::outcome(outcome)),
    };
    if let Some(id) = managed.first() {
        let outcome = Outcome::error(
            422,
            IssueType::NotSupported,
            format!(
                "Group/{id} keeps its members in the member store, and this request would \
                 rewrite its whole document; change it with PUT or PATCH of Group/{id} \
                 (members: JSON Patch on /member) instead (managed Groups in this request: {})",
                managed.join(", ")
            ),
        );
        return Ok(Reply::outcome(outcome));
    }
    Ok(Reply::forward(body))
}

/// `PUT|PATCH|DELETE {base}/Group?...`: the legacy server would pick the
/// Group itself, so it is refused while any Group is managed.
pub async fn conditional_write(proxy: &FhirGroupProxy, session: &mut Session) -> Result<Reply> {
    let outcome = match proxy.manages_any_group().await {
        Ok(false) => return Ok(Reply::Forward),
        Ok(true) => Outcome::error(
            422,
            IssueType::NotSupported,
            format!(
                "conditional {} of Groups (Group?search) is refused while this server keeps \
                 Group rosters apart from the Group documents; search for the Group, then \
                 address it by id",
                session.req_header().method
            ),
        ),
        Err(outcome) => outcome,
    };
    Ok(Reply::outcome(outcome))
}

/// `$export`, `$everything`: the legacy server answers them from the inline
/// roster, which a managed Group does not have. (Instance `_history` is
/// answered with rosters, see `proxy::read::group_history`.)
pub async fn roster_dependent_read(
    proxy: &FhirGroupProxy,
    group_id: Option<&str>,
    what: &str,
) -> Result<Reply> {
    let refused = match group_id {
        Some(id) => proxy
            .roster_home(id)
            .await
            .map(|home| home == Some(RosterHome::Events)),
        None => proxy.manages_any_group().await,
    };
    let outcome = match refused {
        Ok(false) => return Ok(Reply::Forward),
        Ok(true) => {
            let target = group_id.map_or("Group".to_string(), |id| format!("Group/{id}"));
            let instead = "read the roster with $members (paged) and the Group with GET";
            Outcome::error(
                422,
                IssueType::NotSupported,
                format!(
                    "{what} of {target} is not available: the roster of {} lives in the member \
                     store and the legacy server would answer without it; {instead}",
                    if group_id.is_some() {
                        "this Group"
                    } else {
                        "some Groups"
                    }
                ),
            )
        }
        Err(outcome) => outcome,
    };
    Ok(Reply::outcome(outcome))
}

/// `_has:Group:member`, `_revinclude=Group:member`, `_include=Group:member`:
/// the legacy server joins through inline rosters only.
pub async fn member_join_search(proxy: &FhirGroupProxy, parameter: &str) -> Result<Reply> {
    let outcome = match proxy.manages_any_group().await {
        Ok(false) => return Ok(Reply::Forward),
        Ok(true) => Outcome::error(
            422,
            IssueType::NotSupported,
            format!(
                "the search parameter '{parameter}' joins through Group.member, which the legacy \
                 server can only follow for Groups that hold their members inline; search \
                 Group?member=... (answered for every Group) instead"
            ),
        ),
        Err(outcome) => outcome,
    };
    Ok(Reply::outcome(outcome))
}

/// A write of Group `id` in a format the proxy does not read (XML Patch,
/// FHIRPath Patch, a PUT in XML or with no content type): fine for the legacy
/// server while it holds the roster; refused with 415 once the roster lives
/// in the member store.
pub async fn write_in_other_format(
    proxy: &FhirGroupProxy,
    group_id: &str,
    is_patch: bool,
) -> Result<Reply> {
    let (accepted, accept_header) = if is_patch {
        (
            format!("JSON Patch ({JSON_PATCH})"),
            Some(("accept-patch", JSON_PATCH.to_string())),
        )
    } else {
        ("FHIR JSON (application/fhir+json)".to_string(), None)
    };
    let outcome = match proxy.roster_home(group_id).await {
        Ok(Some(RosterHome::Events)) => Outcome::error(
            415,
            IssueType::NotSupported,
            format!(
                "Group/{group_id} keeps its members in the member store, which only {accepted} \
                 reaches; send the request as {accepted}"
            ),
        ),
        Ok(_) => return Ok(Reply::Forward),
        Err(outcome) => outcome,
    };
    Ok(Reply::outcome_with(
        outcome,
        accept_header.into_iter().collect(),
    ))
}
