//! The member PATCH use case: validate against current state, stage events,
//! commit the version in MongoDB, publish the events.
//!
//! Commit protocol (no multi-document transactions anywhere):
//! 1. take the per-Group lease (MemberState collection);
//! 2. read the current state of the named members, plan the events;
//! 3. stage the events in ClickHouse (durable, invisible);
//! 4. mark the write `pending` in MemberState;
//! 5. **commit point**: compare-and-swap `meta.versionId` n -> n+1 in the
//!    Group document, tagging it with the write's token;
//! 6. write the history entry, publish the staged events, drop lease/pending.
//!
//! A writer that dies after 5 leaves `pending`; the next writer (or reader)
//! finds it and finishes step 6 (see [`super::recovery`]). A writer that dies
//! before 5 leaves staged events nobody publishes: invisible, as if never sent.

use std::time::{Duration, Instant};

use mongodb::bson::Document;

use crate::fhir::member_patch::{plan_changes, MemberChange, PlannedEvent};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::reference::EntityReference;
use crate::store::events::{event_sequence, EventType, MemberCounts, MemberEventRow};

use super::{GroupService, WriteError};

pub struct MemberPatchRequest {
    pub group_id: String,
    pub changes: Vec<MemberChange>,
    /// Version from `If-Match`, when the client sent one.
    pub if_match: Option<u64>,
    /// `X-Request-Id` as sent by the client: a retry with the same id is
    /// answered from the first attempt's commit instead of writing again.
    pub client_request_id: Option<String>,
    pub request_id: String,
    /// The request URL as the history entry records it.
    pub url: String,
}

#[derive(Debug)]
pub struct MemberPatchResult {
    pub version: u64,
    /// The Group document after the write (without `member`).
    pub document: Option<Document>,
    pub counts: Option<MemberCounts>,
    /// True when this answers a retry of an already committed request.
    pub replayed: bool,
    pub events_written: usize,
}

impl GroupService {
    pub async fn apply_member_patch(
        &self,
        request: MemberPatchRequest,
        want_counts: bool,
    ) -> Result<MemberPatchResult, WriteError> {
        let deadline = Instant::now() + self.settings.write_wait;
        let mut backoff = Duration::from_millis(2);
        loop {
            match self.try_member_patch(&request).await? {
                Attempt::Done(mut result) => {
                    if want_counts {
                        if let Some(document) = &result.document {
                            let key = document.get_str("_uuid").unwrap_or_default();
                            result.counts = Some(self.events.counts(key).await?);
                        }
                    }
                    return Ok(result);
                }
                Attempt::Busy => {}
            }
            if Instant::now() >= deadline {
                return Err(WriteError::Outcome(Outcome::error(
                    503,
                    IssueType::Transient,
                    format!(
                        "Group/{} is busy with other member writes; retry later",
                        request.group_id
                    ),
                )));
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    async fn try_member_patch(&self, request: &MemberPatchRequest) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        let head = self.head_or_404(id).await?;
        let state = self.documents.member_state(id).await?;
        if !state.in_clickhouse && self.documents.has_inline_members(id).await? {
            return Err(WriteError::NotMigrated);
        }
        if state.pending.is_some() || (state.lease_token.is_some() && state.lease_expired) {
            self.recover(id, &head, &state).await?;
            return Ok(Attempt::Busy);
        }
        if let Some(client_id) = &request.client_request_id {
            if let Some(commit) = self.events.find_commit(&head.group_key, client_id).await? {
                return Ok(Attempt::Done(MemberPatchResult {
                    version: commit.group_version,
                    document: self.documents.document(id).await?,
                    counts: None,
                    replayed: true,
                    events_written: 0,
                }));
            }
        }
        self.check_if_match(id, request.if_match, head.version)?;

        let token = uuid::Uuid::new_v4().to_string();
        if !self
            .documents
            .acquire_lease(id, &token, self.settings.lease_ttl)
            .await?
        {
            return Ok(Attempt::Busy);
        }
        let result = self.write_under_lease(request, &token).await;
        if !matches!(result, Ok(Attempt::Done(_))) {
            // Not committed: give the lease back (pending is only set right
            // before the commit point, and cleared on failure there).
            if let Err(e) = self.documents.finish(id, &token, false).await {
                tracing::warn!(group = id, error = %e, "could not release the member write lease");
            }
        }
        result
    }

    async fn write_under_lease(
        &self,
        request: &MemberPatchRequest,
        token: &str,
    ) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        // Re-read under the lease: the version may have moved while we waited.
        let head = self.head_or_404(id).await?;
        self.check_if_match(id, request.if_match, head.version)?;

        let named: Vec<&EntityReference> = unique_references(&request.changes);
        let current = self.events.current_members(&head.group_key, &named).await?;
        let planned = plan_changes(&format!("Group/{id}"), &request.changes, &current)
            .map_err(WriteError::Outcome)?;
        if planned.is_empty() {
            // Only `test` ops: nothing changes, so no new version either.
            self.documents.finish(id, token, false).await?;
            return Ok(Attempt::Done(MemberPatchResult {
                version: head.version,
                document: self.documents.document(id).await?,
                counts: None,
                replayed: false,
                events_written: 0,
            }));
        }

        let new_version = head.version + 1;
        let rows = event_rows(
            &head.group_key,
            id,
            new_version,
            token,
            &request.request_id,
            &planned,
        );
        let events_written = rows.len();
        self.events.stage(rows).await?;

        if !self
            .documents
            .mark_pending(id, token, new_version, &request.request_id)
            .await?
        {
            return Err(lease_lost(id));
        }
        let Some(document) = self
            .documents
            .commit_version(id, head.version, token)
            .await?
        else {
            // Someone (the legacy server, via passthrough) moved the version
            // between our read and our commit; nothing of ours is visible.
            self.documents.finish(id, token, false).await?;
            return match request.if_match {
                Some(_) => Err(self.version_conflict(id, "the Group changed during the write")),
                None => Ok(Attempt::Busy),
            };
        };

        // Committed. What follows is completion: failures here are finished by
        // recovery, and the client's write stands.
        if let Err(e) = self
            .documents
            .insert_history(&document, &request.request_id, "PATCH", &request.url)
            .await
        {
            tracing::error!(group = id, error = %e, "history entry not written for a committed member write");
        }
        match self.events.publish(token).await {
            Ok(()) => self.documents.finish(id, token, true).await?,
            Err(e) => tracing::error!(
                group = id,
                error = %e,
                "member events committed but not yet published; the next access publishes them"
            ),
        }
        Ok(Attempt::Done(MemberPatchResult {
            version: new_version,
            document: Some(document),
            counts: None,
            replayed: false,
            events_written,
        }))
    }

    fn check_if_match(
        &self,
        id: &str,
        if_match: Option<u64>,
        current: u64,
    ) -> Result<(), WriteError> {
        match if_match {
            Some(expected) if expected != current => Err(self.version_conflict(
                id,
                &format!("If-Match names version {expected} but the current version is {current}"),
            )),
            _ => Ok(()),
        }
    }

    fn version_conflict(&self, id: &str, why: &str) -> WriteError {
        WriteError::Outcome(Outcome::error(
            self.settings.version_conflict_status,
            IssueType::Conflict,
            format!("version conflict on Group/{id}: {why}"),
        ))
    }
}

enum Attempt {
    Done(MemberPatchResult),
    /// Another write holds the Group, or recovery just ran: try again.
    Busy,
}

fn lease_lost(id: &str) -> WriteError {
    WriteError::Outcome(Outcome::error(
        503,
        IssueType::Transient,
        format!("the write lease on Group/{id} expired before the write committed; nothing was changed, retry"),
    ))
}

fn unique_references(changes: &[MemberChange]) -> Vec<&EntityReference> {
    let mut seen = std::collections::HashSet::new();
    changes
        .iter()
        .map(|c| &c.reference)
        .filter(|r| seen.insert(*r))
        .collect()
}

fn event_rows(
    group_key: &str,
    group_id: &str,
    version: u64,
    token: &str,
    request_id: &str,
    planned: &[PlannedEvent],
) -> Vec<MemberEventRow> {
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    planned
        .iter()
        .map(|event| MemberEventRow {
            group_key: group_key.to_string(),
            group_id: group_id.to_string(),
            group_version: version,
            token: token.to_string(),
            request_id: request_id.to_string(),
            op_index: event.op_index as u32,
            sequence: event_sequence(version, event.op_index),
            entity_reference: event.reference.as_str().to_string(),
            entity_type: event.reference.resource_type().to_string(),
            event_type: if event.added {
                EventType::Added
            } else {
                EventType::Removed
            },
            period_start: event.attributes.period_start.clone().unwrap_or_default(),
            period_end: event.attributes.period_end.clone().unwrap_or_default(),
            inactive: u8::from(event.attributes.inactive),
            member_delta: event.member_delta,
            active_delta: event.active_delta,
            event_time_ms: now_ms,
        })
        .collect()
}

fn jittered(base: Duration) -> Duration {
    let nanos = uuid::Uuid::new_v4().as_u128() as u64 % (base.as_nanos() as u64 + 1);
    base + Duration::from_nanos(nanos)
}
