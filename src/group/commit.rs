//! The one member write pipeline: every member write (PATCH, roster PUT,
//! ATR) is a batch, of one or of the value-only patches queued behind it in
//! this process's line for the Group (see [`super::queue`]).
//!
//! Commit protocol (no multi-document transactions anywhere):
//! 1. take the Group's lock ([`super::lease`]; its document records the
//!    write's token, URL and time), finishing first the writes of a holder
//!    that stopped ([`super::recovery`]);
//! 2. read the Group head (and, unless the state the request was routed by
//!    provably still holds, the member state) and the member facts; plan
//!    every request of the batch ([`super::plan`], pure): each gets the next
//!    version when it changes anything, and fails alone when it does not
//!    apply;
//! 3. stage the events of every version in ClickHouse (durable, invisible),
//!    each carrying its version and request id;
//! 4. **commit point**: compare-and-swap `meta.versionId` base -> last in the
//!    Group document, tagging it with the write's token and member key
//!    generation (or, for a split write, the legacy server's guarded PUT of
//!    the Group);
//! 5. write a history entry per version (one insert for the batch), publish
//!    the staged events, delete the lock.
//!
//! Steps 3 and 5 go through ClickHouse insert batchers shared by every
//! Group's writes: an attempt announces its staging insert as it starts, and
//! its publication once staged, so concurrent writes of different Groups
//! share their inserts (see [`crate::store::insert_batcher`]).
//!
//! A writer that stops after 4 leaves its lock, which expires; the next
//! writer (or the sweep) takes it over and finishes step 5 from the lock's
//! record, the staged events and the Group document. A writer that stops
//! before 4 leaves staged events nobody publishes: invisible, as if never
//! sent. A single-member PATCH of a Group kept here costs six MongoDB
//! commands: the routing read of the member state, the lock insert, the
//! head, the compare-and-swap, the history entry and the lock delete.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::oneshot;

use crate::fhir::document_patch::apply_other_ops;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::store::events::MemberEventRow;
use crate::store::group_documents::{to_fhir_json, version_of, GroupHead, MemberState};
use crate::store::group_history::HistoryEntry;
use crate::store::insert_batcher::Announced;

use super::lease::{Backoff, Ending, Lease};
use super::members::Planning;
use super::plan::{self, Answer, Base, Job, Replay};
use super::write::{
    version_in_reply, MemberEdit, MemberPatchRequest, MemberPatchResult, UpstreamDocument,
    UpstreamPart, UpstreamReply,
};
use super::{busy, GroupError, GroupService};

/// Most member changes written in one batch (one staging insert).
const BATCH_MAX_CHANGES: usize = 10_000;

/// A member write waiting in its Group's line.
pub struct QueuedWrite {
    request: MemberPatchRequest,
    queued_at: Instant,
    reply: oneshot::Sender<Answer>,
}

impl QueuedWrite {
    fn new(request: MemberPatchRequest) -> (Self, oneshot::Receiver<Answer>) {
        let (reply, answer) = oneshot::channel();
        let write = Self {
            request,
            queued_at: Instant::now(),
            reply,
        };
        (write, answer)
    }

    fn weight(&self) -> usize {
        plan::weight(&self.request)
    }
}

/// What one attempt under the lease came to.
enum Attempt {
    /// Every request's answer; `committed`: a version was committed (with
    /// whether the Group was managed before), so the events are published
    /// and the write finished before anyone is answered.
    Done {
        answers: Vec<Answer>,
        committed: Option<Committed>,
    },
    /// Another writer holds the Group, or the Group moved under the attempt:
    /// plan again.
    Busy,
}

/// A committed attempt, for its completion.
struct Committed {
    /// Whether the member store kept the Group's roster before this write.
    managed: bool,
    /// The staged events, when few enough to keep for their publication
    /// (see [`PUBLISH_FROM_MEMORY_MAX_ROWS`]); else they are published from
    /// the staging table.
    events: Option<Vec<MemberEventRow>>,
    /// The publication from memory announced when the events were staged,
    /// so that concurrent writes publish in one insert.
    publication: Announced,
}

/// Staged events a write keeps in memory for its publication: a member
/// PATCH's few; a roster PUT of a large Group is published from the
/// staging table rather than held twice.
const PUBLISH_FROM_MEMORY_MAX_ROWS: usize = 10_000;

/// What the legacy server's half of a split write does on one attempt.
enum UpstreamHalf {
    /// PUT this Group body.
    Put(Bytes),
    /// Its ops change nothing: only the member half is written.
    Unchanged,
    /// The stored Group moved on since the head was read: start over.
    Moved,
}

/// What the legacy server's guarded PUT of a split write came to.
enum UpstreamCommit {
    /// It refused (or failed): its answer is the client's, nothing of ours
    /// is visible.
    Refused(UpstreamReply),
    /// A legacy writer moved the version first: plan again.
    Moved,
    /// It changed nothing: the member half commits on its own.
    NoVersion,
    /// It made the next version: the member events belong to it.
    Made(Option<mongodb::bson::Document>, UpstreamReply),
}

impl GroupService {
    pub async fn apply_member_patch(&self, request: MemberPatchRequest) -> Answer {
        // A stale If-Match is refused (and a retry answered) before waiting
        // in line: races of many writers on one version end fast.
        if let Some(done) = self.settle_without_writing(&request).await? {
            return Ok(*done);
        }
        let line = self.queues.line(&request.group_id);
        let alone = !plan::batchable(&request);
        let (write, answer) = QueuedWrite::new(request);
        if alone {
            let id = write.request.group_id.clone();
            let Ok(_turn) = tokio::time::timeout(self.settings.write_wait, line.turn()).await
            else {
                return Err(busy(&id));
            };
            self.write_in_turn(vec![write]).await;
        } else if line.join(write) {
            // The first writer in a line writes everything queued behind it.
            while let Some(writes) = line.next_batch(BATCH_MAX_CHANGES, QueuedWrite::weight) {
                let _turn = line.turn().await;
                self.write_in_turn(writes).await;
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(GroupError::Outcome(Outcome::error(
                500,
                IssueType::Exception,
                "the member write was dropped unexpectedly; read the Group to see its state",
            )))
        })
    }

    /// Writes `writes` (one Group's), attempt after attempt until each has
    /// its answer. No client waits longer than `write_wait` in all, line
    /// included: those past it are answered busy, the rest planned again.
    async fn write_in_turn(&self, writes: Vec<QueuedWrite>) {
        let mut writes = self.answer_late(writes);
        let Some(first) = writes.first() else { return };
        let id = first.request.group_id.clone();
        let mut backoff = Backoff::until(Instant::now() + self.settings.write_wait);
        let mut first_attempt = true;
        let answers = loop {
            let attempt = self.attempt(&id, &writes, first_attempt).await;
            first_attempt = false;
            match attempt {
                Ok(answers) => break answers,
                Err(None) => {
                    writes = self.answer_late(writes);
                    if writes.is_empty() {
                        return;
                    }
                    if !backoff.wait().await {
                        break writes.iter().map(|_| Err(busy(&id))).collect();
                    }
                }
                Err(Some(error)) => {
                    // Each client's answer is logged where it is sent.
                    let shared: Vec<Answer> = writes
                        .iter()
                        .skip(1)
                        .map(|_| Err(plan::shared(&error)))
                        .collect();
                    break std::iter::once(Err(error)).chain(shared).collect();
                }
            }
        };
        for (write, answer) in writes.into_iter().zip(answers) {
            // A client that gave up no longer listens; its write stands.
            let _ = write.reply.send(answer);
        }
    }

    /// Answers busy the writes that waited past `write_wait`; the others.
    fn answer_late(&self, writes: Vec<QueuedWrite>) -> Vec<QueuedWrite> {
        let now = Instant::now();
        let (waiting, late): (Vec<_>, Vec<_>) = writes
            .into_iter()
            .partition(|write| now < write.queued_at + self.settings.write_wait);
        for write in late {
            let _ = write.reply.send(Err(busy(&write.request.group_id)));
        }
        waiting
    }

    /// One attempt under the Group's lease, which ends here on every path;
    /// `Err(None)`: try again.
    async fn attempt(
        &self,
        id: &str,
        writes: &[QueuedWrite],
        first_attempt: bool,
    ) -> Result<Vec<Answer>, Option<GroupError>> {
        let url = writes.first().map(|w| w.request.url.as_str());
        let Some(lease) = self.take_lease(id, url).await? else {
            return Err(None);
        };
        let requests: Vec<&MemberPatchRequest> = writes.iter().map(|w| &w.request).collect();
        // The state the request was routed by holds on the first attempt
        // when the Group document's commit marks agree (see `head_for_writing`).
        let seen = match first_attempt {
            true => writes.first().and_then(|w| w.request.seen_state.as_ref()),
            false => None,
        };
        match self.write_under_lease(id, &requests, &lease, seen).await {
            Ok(Attempt::Done {
                answers,
                committed: Some(committed),
            }) => {
                self.complete_committed(id, lease, committed).await;
                Ok(answers)
            }
            Ok(Attempt::Done { answers, .. }) => {
                lease.end_logged(Ending::Done).await;
                Ok(answers)
            }
            Ok(Attempt::Busy) => {
                lease.end_logged(Ending::Done).await;
                Err(None)
            }
            Err(error) => {
                let ending = match error {
                    GroupError::CommitUnknown { .. } => Ending::Unknown,
                    _ => Ending::Done,
                };
                lease.end_logged(ending).await;
                Err(Some(error))
            }
        }
    }

    async fn write_under_lease(
        &self,
        id: &str,
        requests: &[&MemberPatchRequest],
        lease: &Lease,
        seen: Option<&MemberState>,
    ) -> Result<Attempt, GroupError> {
        // Announced before the reads that plan it, so that writes of other
        // Groups under way now stage in the same insert as this one.
        let staging = self.events.announce_staging();
        let (head, managed, generation) = self.head_for_writing(id, seen).await?;
        let earlier = plan::earlier_with_same_id(requests);
        let mut replays = Vec::with_capacity(requests.len());
        for (request, earlier) in requests.iter().zip(&earlier) {
            replays.push(match earlier {
                Some(_) => Replay::New,
                None => self.replay(request, &head.group_key).await?,
            });
        }
        // A write that goes alone is planned here, with what it fetches
        // (positions, the whole roster, the legacy server's half); a batch
        // from the references its patches name, fetched once. A write
        // answered without planning (a retry, a stale If-Match) reads nothing.
        let first = requests[0];
        let alone = !plan::batchable(first) && requests.len() == 1;
        let admitted = matches!(replays[0], Replay::New)
            && plan::stale_if_match(
                self.settings.version_conflict_status,
                id,
                first.if_match,
                head.version,
            )
            .is_ok();
        let authority = self.legacy_authority(&head);
        let facts = match !alone || admitted {
            true => Some(self.array_facts(id, &head.group_key, managed).await?),
            false => None,
        };
        let mut planning = facts
            .as_ref()
            .map_or_else(Planning::unknown, Planning::from_facts);
        let mut alone_plan = None;
        let mut split_body = None;
        match (alone, &facts) {
            (true, Some(facts)) => {
                if let Some(part) = &first.upstream_part {
                    match self.upstream_half(id, head.version, &part.document).await? {
                        UpstreamHalf::Put(body) => split_body = Some(body),
                        UpstreamHalf::Unchanged => {}
                        // Written around the proxy since the head was read.
                        UpstreamHalf::Moved => return Ok(Attempt::Busy),
                    }
                }
                let mut fetched = planning.clone();
                alone_plan = Some(
                    self.plan_edit(&head.group_key, facts, &mut fetched, authority, &first.edit)
                        .await,
                );
            }
            (true, None) => {}
            (false, _) => {
                let named: BTreeSet<&str> = requests
                    .iter()
                    .flat_map(|request| match &request.edit {
                        MemberEdit::Patch(members) => members.removed_references(),
                        _ => Vec::new(),
                    })
                    .collect();
                let named: Vec<&str> = named.into_iter().collect();
                self.prefetch_references(&head.group_key, &named, &mut planning)
                    .await?;
            }
        }

        let token = lease.token();
        let base = Base {
            group_id: id,
            group_key: &head.group_key,
            token,
            version: head.version,
            conflict_status: self.settings.version_conflict_status,
        };
        let jobs = requests
            .iter()
            .zip(replays)
            .map(|(request, replay)| Job {
                request,
                replay,
                changes_document: split_body.is_some(),
            })
            .collect();
        let batch = plan::plan_batch(&base, jobs, &mut planning, |_, request, planning| {
            if let Some(planned) = alone_plan.take() {
                return planned;
            }
            match &request.edit {
                MemberEdit::Patch(members) => self.plan_in_batch(members, planning, authority),
                // Never queued together (see `plan::batchable`); refused
                // rather than misread.
                _ => Err(GroupError::Outcome(Outcome::error(
                    500,
                    IssueType::Exception,
                    "internal error: a member write that goes alone reached a batch",
                ))),
            }
        });
        if !batch.writes(head.version) {
            // Nothing to write: refusals, tests and retries only; only a
            // request that changed nothing is answered with the document.
            let unchanged = batch
                .planned
                .iter()
                .any(|p| matches!(p, plan::Planned::Unchanged(_)));
            let document = match unchanged {
                true => self.documents.document(id).await?,
                false => None,
            };
            return Ok(Attempt::Done {
                answers: plan::answers(batch.planned, document.as_ref(), &head.group_key),
                committed: None,
            });
        }

        // The lock already records the write (token, URL, time): the staged
        // events and the Group document tell recovery the rest.
        let events = (batch.rows.len() <= PUBLISH_FROM_MEMORY_MAX_ROWS).then(|| batch.rows.clone());
        let publication = self.events.stage_announced(staging, batch.rows).await?;
        let committed_at = lease.taken_at();
        for (request, planned) in requests.iter().zip(&batch.planned) {
            if matches!(planned, plan::Planned::Writes { .. }) {
                self.record_request(&head.group_key, request).await?;
            }
        }
        if !lease.still_ours() {
            return Err(lease_lost(id));
        }

        if let (Some(body), Some(part)) = (split_body, &first.upstream_part) {
            match self
                .commit_through_upstream(first, part, body, head.version, lease)
                .await?
            {
                UpstreamCommit::Refused(reply) => {
                    return Ok(Attempt::Done {
                        answers: vec![Ok(MemberPatchResult {
                            version: head.version,
                            document: None,
                            group_key: None,
                            replayed: false,
                            events_written: 0,
                            upstream_reply: Some(reply),
                        })],
                        committed: None,
                    })
                }
                UpstreamCommit::Moved => return Ok(Attempt::Busy),
                UpstreamCommit::NoVersion => {}
                UpstreamCommit::Made(document, reply) => {
                    let mut answers =
                        plan::answers(batch.planned, document.as_ref(), &head.group_key);
                    if let Some(Ok(result)) = answers.first_mut() {
                        result.upstream_reply = Some(reply);
                    }
                    return Ok(Attempt::Done {
                        answers,
                        committed: Some(Committed {
                            managed,
                            events,
                            publication,
                        }),
                    });
                }
            }
        }

        // The proxy's own commit point: compare-and-swap of the version.
        let committed = self
            .documents
            .commit_version(
                id,
                head.version,
                batch.version,
                token,
                committed_at,
                generation,
            )
            .await
            .map_err(|e| GroupError::CommitUnknown {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let Some(document) = committed else {
            // Someone (the legacy server, via passthrough) moved the version
            // between our read and our commit; nothing of ours is visible.
            // Planned again on the new one, If-Match requests get their conflict.
            return Ok(Attempt::Busy);
        };
        super::crash_point_after_commit();
        // Committed. What follows is completion: failures here are finished
        // by recovery, and the clients' writes stand.
        let versions: Vec<(&MemberPatchRequest, u64, mongodb::bson::Document)> = requests
            .iter()
            .zip(&batch.planned)
            .filter_map(|(request, planned)| match planned {
                plan::Planned::Writes { version, .. } => {
                    Some((*request, *version, plan::at_version(&document, *version)))
                }
                _ => None,
            })
            .collect();
        let entries = versions
            .iter()
            .map(|(request, _, entry)| HistoryEntry {
                resource: entry,
                request_id: &request.request_id,
                method: match request.edit {
                    MemberEdit::ReplaceRoster(_) => "PUT",
                    _ => "PATCH",
                },
                url: &request.url,
                patch_ops: &request.patch_ops,
            })
            .collect();
        if let Err(e) = self.documents.insert_history(entries).await {
            let versions: Vec<u64> = versions.iter().map(|(_, version, _)| *version).collect();
            tracing::error!(group = id, ?versions, error = %e, "history entries not written for a committed member write");
        }
        Ok(Attempt::Done {
            answers: plan::answers(batch.planned, Some(&document), &head.group_key),
            committed: Some(Committed {
                managed,
                events,
                publication,
            }),
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
    async fn commit_through_upstream(
        &self,
        request: &MemberPatchRequest,
        part: &UpstreamPart,
        body: Bytes,
        base_version: u64,
        lease: &Lease,
    ) -> Result<UpstreamCommit, GroupError> {
        let token = lease.token();
        let id = request.group_id.as_str();
        let reply = (part.put)(base_version, body)
            .await
            .map_err(GroupError::Outcome)?;
        if !(200..300).contains(&reply.status) {
            if reply.status == 412 && request.if_match.is_none() {
                // A legacy writer moved the version under us: start over.
                return Ok(UpstreamCommit::Moved);
            }
            return Ok(UpstreamCommit::Refused(reply));
        }
        let new_version = base_version + 1;
        // From here the legacy server may have committed: a store failure
        // leaves the write to recovery, never drops it.
        let made = match version_in_reply(&reply) {
            Some(version) => Some(version),
            None => self
                .documents
                .head(id)
                .await
                .map_err(|e| GroupError::CommitUnknown {
                    id: id.to_string(),
                    reason: e.to_string(),
                })?
                .map(|head| head.version),
        };
        match made {
            Some(version) if version == base_version => return Ok(UpstreamCommit::NoVersion),
            Some(version) if version == new_version => {}
            made => {
                // Nothing of ours becomes visible: the staged events stay
                // unpublished, and the lock (with its record) goes.
                tracing::error!(group = id, base_version, ?made, "the legacy server's half of a split write landed on an unexpected version; its member operations were not applied");
                return Err(GroupError::Outcome(Outcome::error(
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
        if let Err(e) = lease.mark_upstream_committed().await {
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
        Ok(UpstreamCommit::Made(document, reply))
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
            let mut backoff = Backoff::paced(
                Duration::from_millis(10),
                Duration::from_millis(500),
                Instant::now() + LOOK_FOR,
            );
            while backoff.wait().await {
                let outcome = documents
                    .record_patch_in_history(&id, version, &patch_ops)
                    .await;
                match outcome {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(group = %id, version, error = %e, "the history entry of a split patch still names the proxy's PUT");
                        return;
                    }
                }
            }
            tracing::warn!(group = %id, version, "the legacy server wrote no history entry for a split patch's PUT in 10 s; none was relabelled");
        });
    }

    /// After the commit point: publish the events and end the write. Nothing
    /// here can fail the write, which stands; what does not happen now is
    /// finished by recovery (the lock, with its record, stays until then).
    /// A write to a Group the member store did not keep yet marks it kept.
    async fn complete_committed(&self, id: &str, lease: Lease, committed: Committed) {
        let Committed {
            managed,
            events,
            publication,
        } = committed;
        let published = match events {
            Some(rows) => self.events.publish_rows(rows, publication).await,
            None => {
                drop(publication);
                self.events.publish(lease.token()).await
            }
        };
        if let Err(e) = published {
            tracing::error!(group = id, error = %e, "member events committed but not yet published; recovery publishes them");
            // The client hears of this write; recovery must not take a later
            // legacy write (which may drop the commit token) as proof that it
            // never happened. The lock expires now so recovery need not wait.
            lease.end_logged(Ending::CommittedUnpublished).await;
            return;
        }
        if !managed {
            if let Err(e) = self.documents.mark_stored_in_clickhouse(id).await {
                tracing::warn!(group = id, error = %e, "first member write not marked in the member state; recovery will");
                lease.end_logged(Ending::CommittedUnpublished).await;
                return;
            }
        }
        lease.end_logged(Ending::Done).await;
    }

    /// Records which request a client's `X-Request-Id` names, before the
    /// write can commit, so a reuse for another request is recognised.
    async fn record_request(
        &self,
        group_key: &str,
        request: &MemberPatchRequest,
    ) -> Result<(), GroupError> {
        if let Some(client_id) = &request.client_request_id {
            self.documents
                .record_request(group_key, client_id, &request.request_digest)
                .await?;
        }
        Ok(())
    }

    /// Under the lock: the Group's head after finishing what a stopped writer
    /// left pending; `NotMigrated` when its members are still inline or the
    /// Group is not in this MongoDB at all (the legacy server answers);
    /// `Drift` when a managed Group's document gained inline members. With
    /// the head: whether the member store manages the Group already (false
    /// before its first member write), and the generation of its member key.
    ///
    /// `seen`, the member state read before the lock was taken, spares a
    /// second read of it when the document's commit marks agree with it:
    /// every change of that state (a migration, a reverse, a delete, a first
    /// write) happens under the lock and changes the marks too.
    pub(super) async fn head_for_writing(
        &self,
        id: &str,
        seen: Option<&MemberState>,
    ) -> Result<(GroupHead, bool, i64), GroupError> {
        if let Some(seen) = seen.filter(|seen| plan::may_reuse_seen_state(seen)) {
            if let Some((head, inline)) =
                self.documents.head_with_inline(id, seen.generation).await?
            {
                if plan::seen_state_holds(seen, &head, inline) {
                    return Ok((head, true, seen.generation));
                }
            }
        }
        let facts = self.documents.write_facts(id).await?;
        let state = facts.state;
        let Some((head, inline)) = facts.head else {
            return Err(GroupError::NotMigrated);
        };
        if inline && state.inline_array_is_drift(head.version) {
            return Err(GroupError::Outcome(super::drift(id)));
        }
        if inline && state.in_clickhouse {
            // The copy an interrupted migration left: gone before the version
            // moves on (after which it would read as drift).
            let version_id = mongodb::bson::Bson::String(head.version.to_string());
            if !self.documents.strip_inline_members(id, &version_id).await? {
                return Err(GroupError::Outcome(super::drift(id)));
            }
        }
        if inline && !state.in_clickhouse && state.pending.is_none() {
            return Err(GroupError::NotMigrated);
        }
        match &state.pending {
            Some(pending) => {
                // Finish what a stopped writer left behind, then look again.
                self.recover_pending(id, &head, pending).await?;
                let state = self.documents.member_state(id).await?;
                Ok((
                    self.head_or_404(id).await?,
                    state.in_clickhouse,
                    state.generation,
                ))
            }
            None => Ok((head, state.in_clickhouse, state.generation)),
        }
    }

    /// With If-Match: a retry of a committed request gets its answer, and a
    /// stale version its refusal, without taking the lock.
    async fn settle_without_writing(
        &self,
        request: &MemberPatchRequest,
    ) -> Result<Option<Box<MemberPatchResult>>, GroupError> {
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
            Replay::Conflict(outcome) => return Err(GroupError::Outcome(outcome)),
        }
        plan::stale_if_match(
            self.settings.version_conflict_status,
            &request.group_id,
            request.if_match,
            head.version,
        )?;
        Ok(None)
    }

    /// A retry of a request that already committed gets that commit's answer;
    /// another request under a used `X-Request-Id` is refused.
    async fn replay(
        &self,
        request: &MemberPatchRequest,
        group_key: &str,
    ) -> Result<Replay, GroupError> {
        let Some(client_id) = &request.client_request_id else {
            return Ok(Replay::New);
        };
        let Some(commit) = self.events.find_commit(group_key, client_id).await? else {
            return Ok(Replay::New);
        };
        let recorded = self.documents.request_digest(group_key, client_id).await?;
        if recorded.is_some_and(|digest| digest != request.request_digest) {
            return Ok(Replay::Conflict(plan::reused_request_id(
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
    ) -> Result<UpstreamHalf, GroupError> {
        let ops = match document {
            UpstreamDocument::Given(body) => return Ok(UpstreamHalf::Put(body.clone())),
            UpstreamDocument::Patched(ops) => ops,
        };
        let Some(stored) = self.documents.document(id).await? else {
            return Err(GroupError::NotMigrated);
        };
        if version_of(&stored) != Some(version) {
            return Ok(UpstreamHalf::Moved);
        }
        // `member` stays as stored (absent once the member store keeps the
        // roster): the other ops never touch it, and a PUT without it would
        // make the legacy server drop what it holds.
        let resource = to_fhir_json(&stored);
        match apply_other_ops(&resource, ops, self.settings.patch_failure_status)
            .map_err(GroupError::Outcome)?
        {
            Some(patched) => Ok(UpstreamHalf::Put(Bytes::from(
                serde_json::to_vec(&patched).unwrap_or_default(),
            ))),
            None => Ok(UpstreamHalf::Unchanged),
        }
    }
}

fn lease_lost(id: &str) -> GroupError {
    GroupError::Outcome(Outcome::error(
        503,
        IssueType::Transient,
        format!("the write lease on Group/{id} expired before the write committed; nothing was changed, retry"),
    ))
}
