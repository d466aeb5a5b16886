//! Creating a Group with members (`POST {base}/Group`, or a `PUT` to an id
//! that does not exist yet): the legacy server stores the Group without its
//! `member` array, and the roster becomes member events of the version it
//! created, so the Group never holds its members inline.
//!
//! The id is only known once the legacy server created the Group, so the
//! order is: create upstream (the commit point of the resource), then stage,
//! mark pending as committed, and publish the events. When the events cannot
//! be written, the Group is deleted again upstream and the client gets a 503:
//! no Group without its roster stays behind.

use crate::fhir::group_resource::{roster_diff, RosterEntry};
use crate::fhir::member_patch::plan_changes;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::patch::{event_rows, UpstreamReply};
use std::future::Future;

use super::{GroupService, WriteError};

impl GroupService {
    /// Creates the Group upstream with `create_upstream`, then stores `roster`
    /// as its members. `known_id`: the id of a `PUT`; a `POST`'s id is read
    /// from the legacy server's reply. `delete_upstream` undoes the create when
    /// the members cannot be stored.
    pub async fn create_with_members<C, D, F>(
        &self,
        known_id: Option<&str>,
        roster: &[RosterEntry],
        request_id: &str,
        create_upstream: C,
        delete_upstream: D,
    ) -> Result<UpstreamReply, WriteError>
    where
        C: Future<Output = Result<UpstreamReply, Outcome>>,
        D: FnOnce(String) -> F,
        F: Future<Output = Result<UpstreamReply, Outcome>>,
    {
        let reply = create_upstream.await.map_err(WriteError::Outcome)?;
        if reply.status != 201 {
            // Not created: an error, or a conditional create (If-None-Exist)
            // that found an existing Group, which keeps its own roster.
            return Ok(reply);
        }
        let Some(id) = known_id.map(str::to_string).or_else(|| created_id(&reply)) else {
            tracing::error!("the legacy server created a Group without naming its id");
            return Err(WriteError::Outcome(Outcome::error(
                502,
                IssueType::Exception,
                "the legacy server created the Group but its reply names no id (no Location \
                 header and no id in the body), so its members could not be stored",
            )));
        };
        match self.attach_roster(&id, roster, request_id).await {
            Ok(()) => Ok(reply),
            Err(error) => {
                tracing::warn!(group = %id, %error, "members of a new Group not stored; deleting the Group again");
                match delete_upstream(id.clone()).await {
                    Ok(undo) if (200..300).contains(&undo.status) => Err(error),
                    _ => {
                        tracing::error!(group = %id, "a new Group was created without its members and could not be deleted");
                        Err(WriteError::Outcome(Outcome::error(
                            500,
                            IssueType::Exception,
                            format!(
                                "Group/{id} was created, but its members could not be stored \
                                 ({}) and the Group could not be deleted again; delete it, then \
                                 retry",
                                error.to_outcome().first_diagnostics()
                            ),
                        )))
                    }
                }
            }
        }
    }

    /// The roster of a Group just created upstream, as events of its version.
    async fn attach_roster(
        &self,
        id: &str,
        roster: &[RosterEntry],
        request_id: &str,
    ) -> Result<(), WriteError> {
        let token = uuid::Uuid::new_v4().to_string();
        // Nobody else knows the new id yet, so the lock is normally free; a
        // client guessing it (PUT-create races) waits like any writer.
        self.acquire_lease_waiting(id, &token).await?;
        let result = self
            .attach_under_lease(id, roster, request_id, &token)
            .await;
        if result.is_err() {
            if let Err(e) = self.documents.finish(id, &token, false).await {
                tracing::warn!(group = id, error = %e, "could not release the member write lock");
            }
        }
        result
    }

    async fn attach_under_lease(
        &self,
        id: &str,
        roster: &[RosterEntry],
        request_id: &str,
        token: &str,
    ) -> Result<(), WriteError> {
        let head = self.head_or_404(id).await?;
        let nobody = Default::default();
        let planned = plan_changes(
            &format!("Group/{id}"),
            &roster_diff(&nobody, roster),
            &nobody,
        )
        .map_err(WriteError::Outcome)?;
        let rows = event_rows(
            &head.group_key,
            id,
            head.version,
            token,
            request_id,
            &planned,
        );
        self.events.stage(rows).await?;
        if !self
            .documents
            .mark_pending(id, token, head.version, request_id)
            .await?
        {
            return Err(WriteError::Outcome(Outcome::error(
                503,
                IssueType::Transient,
                format!("the write lease on Group/{id} expired before its members were stored"),
            )));
        }
        // The legacy server's create is the commit: from here on recovery
        // publishes these events if we stop.
        self.documents.mark_upstream_committed(id, token).await?;
        if let Err(e) = self.documents.tag_version(id, head.version, token).await {
            tracing::warn!(group = id, error = %e, "could not tag the created version");
        }
        self.complete_committed(id, token).await;
        Ok(())
    }
}

/// The id of a Group the legacy server created: from `Location`
/// (`.../Group/{id}/_history/{vid}` or `.../Group/{id}`), else the body's `id`.
pub fn created_id(reply: &UpstreamReply) -> Option<String> {
    let from_location = reply
        .headers
        .get(http::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|location| {
            let path = location.split(['?', '#']).next()?;
            let after = path.rsplit_once("/Group/")?.1;
            let id = after.split('/').next()?;
            crate::proxy::route::is_fhir_id(id).then(|| id.to_string())
        });
    from_location.or_else(|| {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        let id = body.get("id")?.as_str()?;
        crate::proxy::route::is_fhir_id(id).then(|| id.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(location: Option<&str>, body: &str) -> UpstreamReply {
        let mut headers = http::HeaderMap::new();
        if let Some(location) = location {
            headers.insert(http::header::LOCATION, location.parse().unwrap());
        }
        UpstreamReply {
            status: 201,
            headers,
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn the_created_id_comes_from_location_or_the_body() {
        let cases = [
            (Some("http://h/4_0_0/Group/abc/_history/1"), "", Some("abc")),
            (Some("/4_0_0/Group/abc"), "", Some("abc")),
            (None, r#"{"resourceType":"Group","id":"b-2"}"#, Some("b-2")),
            (Some("http://h/elsewhere"), r#"{"id":"c"}"#, Some("c")),
            (None, "", None),
            (None, r#"{"id":"bad id!"}"#, None),
        ];
        for (location, body, expected) in cases {
            assert_eq!(
                created_id(&reply(location, body)).as_deref(),
                expected,
                "{location:?} {body}"
            );
        }
    }
}
