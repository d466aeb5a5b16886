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

use bytes::Bytes;
use futures_util::future::BoxFuture;
use mongodb::bson::Document;

use crate::fhir::atr::{atr_plan, AtrMember, AtrOperation};
use crate::fhir::document_patch::{apply_other_ops, OtherOps};
use crate::fhir::member_array::Plan;
use crate::fhir::member_patch::MemberOps;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::roster_replace::replace_all;
use crate::store::group_documents::{to_fhir_json, version_of, GroupHead};

use super::members::{
    event_rows, new_slot_id, plan_stored_as_legacy, stored_as_legacy, EventOrigin, Planning,
};
use super::{GroupService, WriteError};

pub struct MemberPatchRequest {
    pub group_id: String,
    pub edit: MemberEdit,
    /// Version from `If-Match`, when the client sent one.
    pub if_match: Option<u64>,
    /// `X-Request-Id` as sent by the client: a retry with the same id is
    /// answered from the first attempt's commit instead of writing again.
    pub client_request_id: Option<String>,
    /// What the request asks for (method, URL, body), digested: a reused
    /// `X-Request-Id` with another digest is another request, refused.
    pub request_digest: String,
    pub request_id: String,
    /// The request URL as the history entry records it.
    pub url: String,
    /// For a split mixed patch: sends the non-member ops upstream.
    pub upstream_part: Option<UpstreamPart>,
    /// The client's JSON Patch, every op in order (empty for PUT and ATR):
    /// the history entry's outcome lists them, as the reference server's does.
    pub patch_ops: Vec<serde_json::Value>,
}

/// What a member write does to the roster.
pub enum MemberEdit {
    /// The member ops of a JSON Patch, with RFC 6902's meaning on the array.
    Patch(MemberOps),
    /// The whole roster as a `PUT` states it (`None`: no `member` key):
    /// diffed against the stored slots under the write lock, so concurrent
    /// writes cannot slip between.
    ReplaceRoster(Option<Vec<serde_json::Value>>),
    /// A Da Vinci ATR `$member-add` / `$member-remove`.
    Atr(AtrOperation, Vec<AtrMember>),
}

/// The legacy server's half of a split write: what it is, and how it is sent.
/// It is always a `PUT` with `If-Match` on the version the member half was
/// planned against, never a PATCH: the reference server ignores `If-Match`
/// on PATCH but honours it on PUT, and only a guarded write lets exactly one
/// version result. Its new version is the only version increment of the
/// whole request.
pub struct UpstreamPart {
    pub document: UpstreamDocument,
    /// PUTs the given Group body with `If-Match: W/"<version>"`.
    pub put: PutUpstream,
}

/// Sends a `PUT` of the Group to the legacy server, guarded by the version.
pub type PutUpstream =
    Box<dyn Fn(u64, Bytes) -> BoxFuture<'static, Result<UpstreamReply, Outcome>> + Send + Sync>;

/// What the legacy server's half of a split write does on one attempt.
enum UpstreamHalf {
    /// PUT this Group body.
    Put(Bytes),
    /// Its ops change nothing: only the member half is written.
    Unchanged,
    /// The stored Group moved on since the head was read: start over.
    Moved,
}

/// What the legacy server's half of a split write stores.
pub enum UpstreamDocument {
    /// A roster PUT: the client's Group without its roster.
    Given(Bytes),
    /// The other ops of a mixed patch: applied by the proxy to the stored
    /// Group under the write lock (see [`crate::fhir::document_patch`]).
    Patched(OtherOps),
}

#[derive(Debug, Clone)]
pub struct UpstreamReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct MemberPatchResult {
    pub version: u64,
    /// The Group document after the write (without `member`).
    pub document: Option<Document>,
    /// The member key the Group's roster is stored under, when known: the
    /// answer reads the roster of `version` there without another lookup.
    pub group_key: Option<String>,
    /// True when this answers a retry of an already committed request.
    pub replayed: bool,
    pub events_written: usize,
    /// For split patches: the legacy server's answer, relayed to the client.
    pub upstream_reply: Option<UpstreamReply>,
}

/// The version a legacy server's write answer names: `ETag: W/"n"`, else
/// `meta.versionId` of the returned resource.
pub fn version_in_reply(reply: &UpstreamReply) -> Option<u64> {
    let from_etag = reply
        .headers
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(|etag| {
            let bare = etag.trim().trim_start_matches("W/").trim_matches('"');
            bare.parse().ok()
        });
    from_etag.or_else(|| {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        body.pointer("/meta/versionId")?.as_str()?.parse().ok()
    })
}

/// What a request's `X-Request-Id` says about it.
pub(super) enum Replay {
    /// Not seen committed: write it.
    New,
    /// A retry of a committed request: its answer.
    Same(Box<MemberPatchResult>),
    /// The id of a committed request, reused for another request.
    Conflict(Outcome),
}

pub(super) fn reused_request_id(client_id: &str, group_id: &str, version: u64) -> Outcome {
    Outcome::error(
        422,
        IssueType::BusinessRule,
        format!(
            "X-Request-Id '{client_id}' already names another request, committed on \
             Group/{group_id} as version {version}; a retry must repeat that request exactly, \
             and a new change needs a new X-Request-Id"
        ),
    )
}

impl GroupService {
    /// Records which request a client's `X-Request-Id` names, before the
    /// write can commit, so a reuse for another request is recognised.
    pub(super) async fn record_request(
        &self,
        group_key: &str,
        request: &MemberPatchRequest,
    ) -> Result<(), WriteError> {
        if let Some(client_id) = &request.client_request_id {
            self.documents
                .record_request(group_key, client_id, &request.request_digest)
                .await?;
        }
        Ok(())
    }

    pub async fn apply_member_patch(
        &self,
        request: MemberPatchRequest,
    ) -> Result<MemberPatchResult, WriteError> {
        let deadline = Instant::now() + self.settings.write_wait;
        // A stale If-Match is refused (and a retry answered) before waiting
        // in line: races of many writers on one version end fast.
        if let Some(done) = self.settle_without_writing(&request).await? {
            return Ok(*done);
        }
        let line = self.queues.line(&request.group_id);
        if super::batch::batchable(&request) {
            return self.apply_in_batch(&line, request).await;
        }
        let Ok(_turn) = tokio::time::timeout(self.settings.write_wait, line.turn()).await else {
            return Err(super::busy(&request.group_id));
        };
        let mut backoff = Duration::from_millis(2);
        loop {
            match self.try_member_patch(&request).await? {
                Attempt::Done(result) => return Ok(*result),
                Attempt::Busy => {}
            }
            if Instant::now() >= deadline {
                return Err(super::busy(&request.group_id));
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    async fn try_member_patch(&self, request: &MemberPatchRequest) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        let token = uuid::Uuid::new_v4().to_string();
        if !self.try_lease(id, &token).await? {
            return Ok(Attempt::Busy);
        }
        let result = self.write_under_lease(request, &token).await;
        let committed = matches!(result, Ok(Attempt::Done(_)));
        self.end_lease(id, &token, committed, result.as_ref().err())
            .await;
        result
    }

    /// Takes the Group's lock for one attempt (breaking one whose holder
    /// died); `false`: another writer has it.
    pub(crate) async fn try_lease(&self, id: &str, token: &str) -> Result<bool, WriteError> {
        if self
            .documents
            .acquire_lease(id, token, self.settings.lease_ttl)
            .await?
        {
            return Ok(true);
        }
        if let Some(holder) = self.documents.expired_lease_holder(id).await? {
            tracing::warn!(group = id, %holder, "breaking an expired member write lock");
            self.documents.break_expired_lease(id, &holder).await?;
        }
        Ok(false)
    }

    /// Ends an attempt: a done write already released its lock; an unknown
    /// commit keeps `pending` for recovery (which reads the truth from the
    /// Group document); anything else clears its pending record.
    pub(super) async fn end_lease(
        &self,
        id: &str,
        token: &str,
        done: bool,
        error: Option<&WriteError>,
    ) {
        let release = match (done, error) {
            (true, _) => Ok(()),
            (false, Some(WriteError::CommitUnknown { .. })) => {
                self.documents.release_lease(id, token).await
            }
            (false, _) => self.documents.finish(id, token, false).await,
        };
        if let Err(e) = release {
            tracing::warn!(group = id, error = %e, "could not release the member write lock");
        }
    }

    /// Under the lock: the Group's head after finishing what a stopped writer
    /// left pending; `NotMigrated` when its members are still inline or the
    /// Group is not in this MongoDB at all (the legacy server answers);
    /// `Drift` when a managed Group's document gained inline members. With
    /// the head: whether the member store manages the Group already (false
    /// before its first member write).
    pub(super) async fn head_for_writing(&self, id: &str) -> Result<(GroupHead, bool), WriteError> {
        let facts = self.documents.write_facts(id).await?;
        let state = facts.state;
        let Some((head, inline)) = facts.head else {
            return Err(WriteError::NotMigrated);
        };
        if inline && state.inline_array_is_drift(head.version) {
            return Err(WriteError::Outcome(super::drift(id)));
        }
        if inline && state.in_clickhouse {
            // The copy an interrupted migration left: gone before the version
            // moves on (after which it would read as drift).
            let version_id = mongodb::bson::Bson::String(head.version.to_string());
            if !self.documents.strip_inline_members(id, &version_id).await? {
                return Err(WriteError::Outcome(super::drift(id)));
            }
        }
        if inline && !state.in_clickhouse && state.pending.is_none() {
            return Err(WriteError::NotMigrated);
        }
        match &state.pending {
            Some(pending) => {
                // Finish what a stopped writer left behind, then look again.
                self.recover_pending(id, &head, pending).await?;
                let managed = self.documents.member_state(id).await?.in_clickhouse;
                Ok((self.head_or_404(id).await?, managed))
            }
            None => Ok((head, state.in_clickhouse)),
        }
    }

    /// With If-Match: a retry of a committed request gets its answer, and a
    /// stale version its refusal, without taking the lock.
    async fn settle_without_writing(
        &self,
        request: &MemberPatchRequest,
    ) -> Result<Option<Box<MemberPatchResult>>, WriteError> {
        if request.if_match.is_none() {
            return Ok(None);
        }
        // Unknown here: the legacy server answers (see `head_for_writing`).
        let Some(head) = self.documents.head(&request.group_id).await? else {
            return Ok(None);
        };
        match self.replay(request, &head.group_key).await? {
            Replay::New => {}
            Replay::Same(replayed) => return Ok(Some(replayed)),
            Replay::Conflict(outcome) => return Err(WriteError::Outcome(outcome)),
        }
        self.check_if_match(&request.group_id, request.if_match, head.version)?;
        Ok(None)
    }

    /// A retry of a request that already committed gets that commit's answer;
    /// another request under a used `X-Request-Id` is refused.
    pub(super) async fn replay(
        &self,
        request: &MemberPatchRequest,
        group_key: &str,
    ) -> Result<Replay, WriteError> {
        let Some(client_id) = &request.client_request_id else {
            return Ok(Replay::New);
        };
        let Some(commit) = self.events.find_commit(group_key, client_id).await? else {
            return Ok(Replay::New);
        };
        let recorded = self.documents.request_digest(group_key, client_id).await?;
        if recorded.is_some_and(|digest| digest != request.request_digest) {
            return Ok(Replay::Conflict(reused_request_id(
                client_id,
                &request.group_id,
                commit.group_version,
            )));
        }
        Ok(Replay::Same(Box::new(MemberPatchResult {
            version: commit.group_version,
            document: self.documents.document(&request.group_id).await?,
            group_key: Some(group_key.to_string()),
            replayed: true,
            events_written: 0,
            upstream_reply: None,
        })))
    }

    /// What the legacy server's half of a split write does on this attempt,
    /// on the version being written. The other ops that do not apply fail
    /// the whole request, as on the legacy server.
    async fn upstream_half(
        &self,
        id: &str,
        version: u64,
        document: &UpstreamDocument,
    ) -> Result<UpstreamHalf, WriteError> {
        let ops = match document {
            UpstreamDocument::Given(body) => return Ok(UpstreamHalf::Put(body.clone())),
            UpstreamDocument::Patched(ops) => ops,
        };
        let Some(stored) = self.documents.document(id).await? else {
            return Err(WriteError::NotMigrated);
        };
        if version_of(&stored) != Some(version) {
            return Ok(UpstreamHalf::Moved);
        }
        // `member` stays as stored (absent once the member store keeps the
        // roster): the other ops never touch it, and a PUT without it would
        // make the legacy server drop what it holds.
        let resource = to_fhir_json(&stored);
        match apply_other_ops(&resource, ops, self.settings.patch_failure_status)
            .map_err(WriteError::Outcome)?
        {
            Some(patched) => Ok(UpstreamHalf::Put(Bytes::from(
                serde_json::to_vec(&patched).unwrap_or_default(),
            ))),
            None => Ok(UpstreamHalf::Unchanged),
        }
    }

    async fn write_under_lease(
        &self,
        request: &MemberPatchRequest,
        token: &str,
    ) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        let (head, managed) = self.head_for_writing(id).await?;
        match self.replay(request, &head.group_key).await? {
            Replay::New => {}
            Replay::Same(replayed) => {
                self.documents.finish(id, token, false).await?;
                return Ok(Attempt::Done(replayed));
            }
            Replay::Conflict(outcome) => return Err(WriteError::Outcome(outcome)),
        }
        self.check_if_match(id, request.if_match, head.version)?;

        // The lock is released by `end_lease` on every path out of here.
        let upstream_body = match &request.upstream_part {
            Some(part) => match self.upstream_half(id, head.version, &part.document).await? {
                UpstreamHalf::Put(body) => Some(body),
                UpstreamHalf::Unchanged => None,
                // Written around the proxy since the head was read.
                UpstreamHalf::Moved => return Ok(Attempt::Busy),
            },
            None => None,
        };
        let (plan, was_absent) = self
            .plan_edit(
                id,
                &head.group_key,
                managed,
                self.legacy_authority(&head),
                &request.edit,
            )
            .await?;
        let new_version = head.version + 1;
        let origin = EventOrigin {
            group_key: &head.group_key,
            group_id: id,
            token,
            request_id: &request.request_id,
        };
        let rows = event_rows(&origin, new_version, &plan, was_absent);
        if rows.is_empty() && upstream_body.is_none() {
            // Only `test` ops: nothing changes, so no new version either.
            self.documents.finish(id, token, false).await?;
            return Ok(Attempt::Done(Box::new(MemberPatchResult {
                version: head.version,
                document: self.documents.document(id).await?,
                group_key: Some(head.group_key.clone()),
                replayed: false,
                events_written: 0,
                upstream_reply: None,
            })));
        }

        let events_written = rows.len();
        self.events.stage(rows).await?;
        let committed_at = mongodb::bson::DateTime::now();

        if !self
            .documents
            .mark_pending(
                id,
                token,
                new_version..=new_version,
                &request.request_id,
                &request.url,
                committed_at,
            )
            .await?
        {
            return Err(lease_lost(id));
        }
        self.record_request(&head.group_key, request).await?;
        let attempt = match (&request.upstream_part, upstream_body) {
            (Some(part), Some(body)) => {
                self.commit_through_upstream(
                    request,
                    part,
                    body,
                    head.version,
                    token,
                    events_written,
                    committed_at,
                )
                .await?
            }
            _ => {
                self.commit_own(request, head.version, token, events_written, committed_at)
                    .await?
            }
        };
        Ok(match attempt {
            Attempt::Done(mut result) if result.document.is_some() => {
                result.group_key = Some(head.group_key);
                Attempt::Done(result)
            }
            attempt => attempt,
        })
    }

    /// The legacy server's half of a split patch or roster PUT is the commit
    /// point. Which version it made is read from its answer, never assumed:
    /// - the next version: the member events belong to it;
    /// - none (its half changed nothing, say a PUT whose only change is the
    ///   roster): the member half commits on its own, like a member-only write;
    /// - a later one (a server that ignores `If-Match` even on PUT let another
    ///   write in between): the events cannot belong to that version; the
    ///   client is told exactly what was applied and what was not.
    #[allow(clippy::too_many_arguments)]
    async fn commit_through_upstream(
        &self,
        request: &MemberPatchRequest,
        part: &UpstreamPart,
        body: Bytes,
        base_version: u64,
        token: &str,
        events_written: usize,
        committed_at: mongodb::bson::DateTime,
    ) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        let reply = (part.put)(base_version, body)
            .await
            .map_err(WriteError::Outcome)?;
        if !(200..300).contains(&reply.status) {
            self.documents.finish(id, token, false).await?;
            if reply.status == 412 && request.if_match.is_none() {
                // A legacy writer moved the version under us: start over.
                return Ok(Attempt::Busy);
            }
            return Ok(Attempt::Done(Box::new(MemberPatchResult {
                version: base_version,
                document: None,
                group_key: None,
                replayed: false,
                events_written: 0,
                upstream_reply: Some(reply),
            })));
        }
        let new_version = base_version + 1;
        let made = match version_in_reply(&reply) {
            Some(version) => Some(version),
            None => self.documents.head(id).await?.map(|head| head.version),
        };
        match made {
            Some(version) if version == base_version => {
                return self
                    .commit_own(request, base_version, token, events_written, committed_at)
                    .await;
            }
            Some(version) if version == new_version => {}
            made => {
                // Nothing of ours becomes visible: the staged events stay
                // unpublished, and the pending record is dropped.
                self.documents.finish(id, token, false).await?;
                tracing::error!(group = id, base_version, ?made, "the legacy server's half of a split write landed on an unexpected version; its member operations were not applied");
                return Err(WriteError::Outcome(Outcome::error(
                    409,
                    IssueType::Conflict,
                    format!(
                        "Group/{id}: the legacy server applied this request's other changes, \
                         but as version {} instead of {new_version} (another write came \
                         between; this legacy server did not honour If-Match on PUT), so \
                         its member operations were NOT applied; read the Group and send the \
                         member operations again",
                        made.map_or("unknown".to_string(), |v| v.to_string())
                    ),
                )));
            }
        }
        if let Err(e) = self.documents.mark_upstream_committed(id, token).await {
            tracing::error!(group = id, error = %e, "split patch committed upstream but not recorded");
        }
        let document = match self.documents.tag_version(id, new_version, token).await {
            Ok(document) => document,
            Err(e) => {
                tracing::warn!(group = id, error = %e, "could not tag the upstream version");
                None
            }
        };
        if !request.patch_ops.is_empty() {
            self.record_split_patch_in_history(id, new_version, &request.patch_ops)
                .await;
        }
        self.complete_committed(id, token).await;
        Ok(Attempt::Done(Box::new(MemberPatchResult {
            version: new_version,
            document,
            group_key: None,
            replayed: false,
            events_written,
            upstream_reply: Some(reply),
        })))
    }

    /// The legacy server recorded the PUT the proxy sent for a split patch;
    /// the version is the client's PATCH, with all its ops. The reference
    /// server writes history after it answers (its post-request processor),
    /// so the entry may not be there yet: then a task of its own looks
    /// again, for a while, without holding up the answer.
    async fn record_split_patch_in_history(
        &self,
        id: &str,
        version: u64,
        patch_ops: &[serde_json::Value],
    ) {
        const LOOK_FOR: Duration = Duration::from_secs(10);
        match self
            .documents
            .record_patch_in_history(id, version, patch_ops)
            .await
        {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(group = id, version, error = %e, "the history entry of a split patch still names the proxy's PUT");
                return;
            }
        }
        let documents = self.documents.clone();
        let id = id.to_string();
        let patch_ops = patch_ops.to_vec();
        tokio::spawn(async move {
            let give_up = Instant::now() + LOOK_FOR;
            let mut wait = Duration::from_millis(10);
            loop {
                tokio::time::sleep(wait).await;
                let outcome = documents
                    .record_patch_in_history(&id, version, &patch_ops)
                    .await;
                match outcome {
                    Ok(true) => return,
                    Ok(false) if Instant::now() < give_up => {}
                    Ok(false) => {
                        tracing::warn!(group = %id, version, "the legacy server wrote no history entry for a split patch's PUT in 10 s; none was relabelled");
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(group = %id, version, error = %e, "the history entry of a split patch still names the proxy's PUT");
                        return;
                    }
                }
                wait = (wait * 2).min(Duration::from_millis(500));
            }
        });
    }

    /// The commit point of a member-only write (also of the member half of a
    /// split write whose legacy half made no version): the proxy's own
    /// compare-and-swap of the version, then history and publication.
    async fn commit_own(
        &self,
        request: &MemberPatchRequest,
        base_version: u64,
        token: &str,
        events_written: usize,
        committed_at: mongodb::bson::DateTime,
    ) -> Result<Attempt, WriteError> {
        let id = request.group_id.as_str();
        let new_version = base_version + 1;
        let committed = self
            .documents
            .commit_version(id, base_version, new_version, token, committed_at)
            .await
            .map_err(|e| WriteError::CommitUnknown {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let Some(document) = committed else {
            // Someone (the legacy server, via passthrough) moved the version
            // between our read and our commit; nothing of ours is visible.
            self.documents.finish(id, token, false).await?;
            return match request.if_match {
                Some(_) => Err(self.version_conflict(id, "the Group changed during the write")),
                None => Ok(Attempt::Busy),
            };
        };
        super::crash_point_after_commit();
        // Committed. What follows is completion: failures here are finished by
        // recovery, and the client's write stands.
        let method = if matches!(request.edit, MemberEdit::ReplaceRoster(_)) {
            "PUT"
        } else {
            "PATCH"
        };
        if let Err(e) = self
            .documents
            .insert_history(
                &document,
                &request.request_id,
                method,
                &request.url,
                &request.patch_ops,
            )
            .await
        {
            tracing::error!(group = id, error = %e, "history entry not written for a committed member write");
        }
        self.complete_committed(id, token).await;
        Ok(Attempt::Done(Box::new(MemberPatchResult {
            version: new_version,
            document: Some(document),
            group_key: None,
            replayed: false,
            events_written,
            upstream_reply: None,
        })))
    }

    /// The plan of `edit` against the stored slots, and whether the
    /// `member` key was absent before it.
    pub(super) async fn plan_edit(
        &self,
        id: &str,
        group_key: &str,
        managed: bool,
        authority: Option<&str>,
        edit: &MemberEdit,
    ) -> Result<(Plan, bool), WriteError> {
        let facts = self.array_facts(id, group_key, managed).await?;
        let mut plan = match edit {
            MemberEdit::Patch(members) => {
                let mut planning = Planning::from_facts(&facts);
                self.plan_member_ops(group_key, members, &mut planning)
                    .await?
            }
            MemberEdit::ReplaceRoster(desired) => {
                let stored = self.events.all_slots(group_key).await?;
                // Compared as the legacy server would store them, so members
                // sent back as a read showed them keep their slots.
                let desired = desired.clone().map(|mut desired| {
                    desired
                        .iter_mut()
                        .for_each(|element| stored_as_legacy(element, authority));
                    desired
                });
                replace_all(&stored, &facts.floor, desired.as_deref(), &mut new_slot_id)
                    .map_err(|e| WriteError::Outcome(roster_failure(&e)))?
            }
            MemberEdit::Atr(operation, members) => {
                let keys: Vec<&str> = members.iter().map(|m| m.match_key.as_str()).collect();
                let found = self.events.slots_by_match_key(group_key, &keys).await?;
                let len = facts.counts.members.max(0) as usize;
                atr_plan(
                    *operation,
                    members,
                    &found,
                    len,
                    &facts.floor,
                    &mut new_slot_id,
                )
                .map_err(WriteError::Outcome)?
            }
        };
        plan_stored_as_legacy(&mut plan, authority);
        Ok((plan, facts.absent))
    }

    /// The member store's facts of a Group; for a Group it does not manage
    /// yet (`managed` false: its first member write), whether the `member`
    /// key exists comes from the document, where the legacy server kept it.
    pub(super) async fn array_facts(
        &self,
        id: &str,
        group_key: &str,
        managed: bool,
    ) -> Result<crate::store::events::ArrayFacts, WriteError> {
        let mut facts = self.events.array_facts(group_key).await?;
        // Before its first member write (or after a delete and re-create)
        // the member store's marker is not this Group's.
        if !managed {
            facts.absent = facts.counts.members == 0 && !self.documents.has_member_key(id).await?;
        }
        Ok(facts)
    }

    /// After the commit point: publish the events and end the write. Nothing
    /// here can fail the write, which stands; what does not happen now is
    /// finished by recovery (the pending record stays until then).
    pub(super) async fn complete_committed(&self, id: &str, token: &str) {
        match self.events.publish(token).await {
            Ok(()) => {
                if let Err(e) = self.documents.finish(id, token, true).await {
                    tracing::warn!(group = id, error = %e, "committed write not marked finished; recovery will");
                }
            }
            Err(e) => {
                tracing::error!(group = id, error = %e, "member events committed but not yet published; recovery publishes them");
                // The client hears of this write; recovery must not take a
                // later legacy write (which may drop the commit token) as
                // proof that it never happened.
                if let Err(e) = self.documents.mark_committed(id, token).await {
                    tracing::warn!(group = id, error = %e, "could not record the commit for recovery");
                }
                // The lock goes now so recovery need not wait for it to expire.
                if let Err(e) = self.documents.release_lease(id, token).await {
                    tracing::warn!(group = id, error = %e, "could not release the member write lock");
                }
            }
        }
    }

    pub(super) fn check_if_match(
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
    Done(Box<MemberPatchResult>),
    /// Another write holds the Group, or recovery just ran: try again.
    Busy,
}

pub(super) fn lease_lost(id: &str) -> WriteError {
    WriteError::Outcome(Outcome::error(
        503,
        IssueType::Transient,
        format!("the write lease on Group/{id} expired before the write committed; nothing was changed, retry"),
    ))
}

/// A roster the planner cannot store (its order keys ran out): refused,
/// nothing written.
fn roster_failure(error: &crate::fhir::member_array::PatchError) -> Outcome {
    Outcome::error(
        500,
        IssueType::Exception,
        format!("the member store cannot store this roster, nothing was changed: {error}"),
    )
}

pub(super) fn jittered(base: Duration) -> Duration {
    let nanos = uuid::Uuid::new_v4().as_u128() as u64 % (base.as_nanos() as u64 + 1);
    base + Duration::from_nanos(nanos)
}
