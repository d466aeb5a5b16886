//! Member patches of one Group waiting in this process's line are written
//! together (see [`super::queue`]): one lock, one staging insert, one
//! compare-and-swap that moves the version by one per patch, one publication.
//! Each patch keeps its own meaning: it is planned against the state left by
//! the patches before it, gets its own version, history entry and answer, and
//! a patch that does not apply (or names a stale If-Match) fails alone.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::fhir::outcome::{IssueType, Outcome};

use super::members::{event_rows, plan_stored_as_legacy, EventOrigin, Planning};
use super::patch::{
    jittered, lease_lost, MemberEdit, MemberPatchRequest, MemberPatchResult, Replay,
};
use super::queue::Line;
use super::{busy, GroupService, WriteError};

/// Most member changes written in one batch (one staging insert).
const BATCH_MAX_CHANGES: usize = 10_000;

type Answer = Result<MemberPatchResult, WriteError>;

pub struct BatchJob {
    request: MemberPatchRequest,
    queued_at: Instant,
    reply: oneshot::Sender<Answer>,
}

impl BatchJob {
    fn weight(&self) -> usize {
        match &self.request.edit {
            MemberEdit::Patch(members) => members.ops.len().max(1),
            MemberEdit::ReplaceRoster(roster) => roster.as_ref().map_or(1, |r| r.len().max(1)),
            MemberEdit::Atr(_, members) => members.len().max(1),
        }
    }
}

/// Patches that only append members or remove them by reference: each can
/// be planned against what the previous patches of the batch left, from
/// facts fetched once. Positional patches (positions shift under earlier
/// patches), split patches and roster replacements are written alone.
pub fn batchable(request: &MemberPatchRequest) -> bool {
    request.upstream_part.is_none()
        && matches!(&request.edit, MemberEdit::Patch(members) if members.is_value_only())
}

/// What one patch of a batch comes to before the commit.
enum Planned {
    Answered(Box<Answer>),
    /// Same client request id as an earlier job of the batch: same answer.
    SameAs(usize),
    /// Only `test` ops: no new version; the version it saw.
    Unchanged(u64),
    Writes {
        version: u64,
        events: usize,
    },
}

enum BatchAttempt {
    Done(Vec<Answer>),
    Busy,
}

impl GroupService {
    /// Plans one value-only patch of a batch from the facts the batch holds;
    /// it never fetches, since the store does not know the earlier patches.
    fn plan_in_batch(
        &self,
        members: &crate::fhir::member_patch::MemberOps,
        planning: &Planning,
    ) -> Result<crate::fhir::member_array::Plan, WriteError> {
        use crate::fhir::member_array::{plan, Planned as Outcomes};
        match plan(
            &members.ops,
            &planning.known,
            &mut super::members::new_slot_id,
            self.settings.remove_by_reference,
        ) {
            Ok(Outcomes::Done(plan)) => Ok(plan),
            Ok(Outcomes::Need(need)) => Err(WriteError::Outcome(Outcome::error(
                500,
                IssueType::Exception,
                format!("internal error: a batched member patch needs facts the batch did not fetch ({need:?}); nothing was changed"),
            ))),
            Err(error) => Err(WriteError::Outcome(crate::fhir::member_patch::patch_failure(
                &error,
                &members.indexes,
                self.settings.patch_failure_status,
            ))),
        }
    }

    /// Queues the patch in its Group's line; the first writer in a line
    /// writes everything queued behind it, batch after batch.
    pub(super) async fn apply_in_batch(
        &self,
        line: &Line<BatchJob>,
        request: MemberPatchRequest,
    ) -> Answer {
        let (reply, answer) = oneshot::channel();
        let job = BatchJob {
            request,
            queued_at: Instant::now(),
            reply,
        };
        if line.join(job) {
            while let Some(jobs) = line.next_batch(BATCH_MAX_CHANGES, BatchJob::weight) {
                let _turn = line.turn().await;
                self.write_batch(jobs).await;
            }
        }
        answer.await.unwrap_or_else(|_| {
            Err(WriteError::Outcome(Outcome::error(
                500,
                IssueType::Exception,
                "the member write was dropped unexpectedly; read the Group to see its state",
            )))
        })
    }

    async fn write_batch(&self, jobs: Vec<BatchJob>) {
        let now = Instant::now();
        // Jobs that waited longer than a write may wait get the busy answer.
        let (jobs, late): (Vec<_>, Vec<_>) = jobs
            .into_iter()
            .partition(|job| now < job.queued_at + self.settings.write_wait);
        for job in late {
            let _ = job.reply.send(Err(busy(&job.request.group_id)));
        }
        let Some(first) = jobs.first() else { return };
        let id = first.request.group_id.clone();
        let mut jobs = jobs;
        let mut backoff = Duration::from_millis(2);
        let answers = loop {
            match self.try_batch(&id, &jobs).await {
                Ok(BatchAttempt::Done(answers)) => break answers,
                Ok(BatchAttempt::Busy) => {
                    // No client waits longer than `write_wait` in all, line
                    // included: those past it get the busy answer now, and
                    // the rest are planned again without them.
                    let now = Instant::now();
                    let (waiting, late): (Vec<_>, Vec<_>) = jobs
                        .into_iter()
                        .partition(|job| now < job.queued_at + self.settings.write_wait);
                    for job in late {
                        let _ = job.reply.send(Err(busy(&job.request.group_id)));
                    }
                    if waiting.is_empty() {
                        return;
                    }
                    jobs = waiting;
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(Duration::from_millis(50));
                }
                Err(error) => {
                    if !matches!(error, WriteError::Outcome(_) | WriteError::NotMigrated) {
                        tracing::warn!(group = %id, %error, jobs = jobs.len(), "member write batch failed");
                    }
                    break jobs.iter().map(|_| Err(shared(&error))).collect();
                }
            }
        };
        for (job, answer) in jobs.into_iter().zip(answers) {
            // A client that gave up no longer listens; its write stands.
            let _ = job.reply.send(answer);
        }
    }

    async fn try_batch(&self, id: &str, jobs: &[BatchJob]) -> Result<BatchAttempt, WriteError> {
        let token = uuid::Uuid::new_v4().to_string();
        if !self.try_lease(id, &token).await? {
            return Ok(BatchAttempt::Busy);
        }
        let result = self.write_batch_under_lease(id, jobs, &token).await;
        let done = matches!(result, Ok(BatchAttempt::Done(_)));
        self.end_lease(id, &token, done, result.as_ref().err())
            .await;
        result
    }

    async fn write_batch_under_lease(
        &self,
        id: &str,
        jobs: &[BatchJob],
        token: &str,
    ) -> Result<BatchAttempt, WriteError> {
        let (head, managed) = self.head_for_writing(id).await?;

        // Every reference any patch of the batch removes, fetched once; the
        // planning state then follows the batch patch by patch.
        let named: BTreeSet<&str> = jobs
            .iter()
            .flat_map(|job| match &job.request.edit {
                MemberEdit::Patch(members) => members.removed_references(),
                _ => Vec::new(),
            })
            .collect();
        let named: Vec<&str> = named.into_iter().collect();
        let facts = self.array_facts(id, &head.group_key, managed).await?;
        let mut planning = Planning::from_facts(&facts);
        let found = self
            .events
            .slots_by_match_key(&head.group_key, &named)
            .await?;
        for (reference, slots) in found {
            let slots = slots
                .into_iter()
                .map(|slot| crate::fhir::member_array::RefSlot {
                    slot,
                    position: None,
                })
                .collect();
            planning.known.by_ref.insert(reference, slots);
        }
        let mut version = head.version;
        let mut rows = Vec::new();
        let mut planned_jobs = Vec::with_capacity(jobs.len());
        let mut first_with_id: HashMap<&str, usize> = HashMap::new();
        for (index, job) in jobs.iter().enumerate() {
            let request = &job.request;
            if let Some(client_id) = request.client_request_id.as_deref() {
                if let Some(&first) = first_with_id.get(client_id) {
                    let same = jobs[first].request.request_digest == request.request_digest;
                    planned_jobs.push(match same {
                        true => Planned::SameAs(first),
                        false => Planned::Answered(Box::new(Err(WriteError::Outcome(
                            super::patch::reused_request_id(client_id, id, version),
                        )))),
                    });
                    continue;
                }
                first_with_id.insert(client_id, index);
            }
            match self.replay(request, &head.group_key).await? {
                Replay::New => {}
                Replay::Same(replayed) => {
                    planned_jobs.push(Planned::Answered(Box::new(Ok(*replayed))));
                    continue;
                }
                Replay::Conflict(outcome) => {
                    planned_jobs.push(Planned::Answered(Box::new(Err(WriteError::Outcome(
                        outcome,
                    )))));
                    continue;
                }
            }
            if let Err(refused) = self.check_if_match(id, request.if_match, version) {
                planned_jobs.push(Planned::Answered(Box::new(Err(refused))));
                continue;
            }
            let MemberEdit::Patch(members) = &request.edit else {
                // Never queued (see `batchable`); refused rather than misread.
                let refusal = WriteError::Outcome(Outcome::error(
                    500,
                    IssueType::Exception,
                    "internal error: a roster replacement reached a member patch batch",
                ));
                planned_jobs.push(Planned::Answered(Box::new(Err(refusal))));
                continue;
            };
            let was_absent = planning.known.absent;
            match self.plan_in_batch(members, &planning) {
                Err(error) => planned_jobs.push(Planned::Answered(Box::new(Err(error)))),
                Ok(mut plan) => {
                    plan_stored_as_legacy(&mut plan, self.legacy_authority(&head));
                    let origin = EventOrigin {
                        group_key: &head.group_key,
                        group_id: id,
                        token,
                        request_id: &request.request_id,
                    };
                    let written = event_rows(&origin, version + 1, &plan, was_absent);
                    if written.is_empty() {
                        planned_jobs.push(Planned::Unchanged(version));
                        continue;
                    }
                    version += 1;
                    planning.advance(&plan);
                    planned_jobs.push(Planned::Writes {
                        version,
                        events: written.len(),
                    });
                    rows.extend(written);
                }
            }
        }

        if version == head.version {
            // Nothing to write: refusals, tests and retries only.
            self.documents.finish(id, token, false).await?;
            let document = self.documents.document(id).await?;
            return Ok(BatchAttempt::Done(answers(
                planned_jobs,
                document.as_ref(),
                &head.group_key,
            )));
        }
        self.events.stage(rows).await?;
        let leader = &jobs[0].request.request_id;
        let committed_at = mongodb::bson::DateTime::now();
        if !self
            .documents
            .mark_pending(
                id,
                token,
                head.version + 1..=version,
                leader,
                &jobs[0].request.url,
                committed_at,
            )
            .await?
        {
            return Err(lease_lost(id));
        }
        for (job, planned) in jobs.iter().zip(&planned_jobs) {
            if matches!(planned, Planned::Writes { .. }) {
                self.record_request(&head.group_key, &job.request).await?;
            }
        }
        let committed = self
            .documents
            .commit_version(id, head.version, version, token, committed_at)
            .await
            .map_err(|e| WriteError::CommitUnknown {
                id: id.to_string(),
                reason: e.to_string(),
            })?;
        let Some(document) = committed else {
            // The legacy server moved the version: plan again on the new one
            // (If-Match requests then get their conflict).
            self.documents.finish(id, token, false).await?;
            return Ok(BatchAttempt::Busy);
        };
        super::crash_point_after_commit();
        for (job, planned) in jobs.iter().zip(&planned_jobs) {
            if let Planned::Writes { version, .. } = planned {
                let request = &job.request;
                let entry = at_version(&document, *version);
                if let Err(e) = self
                    .documents
                    .insert_history(
                        &entry,
                        &request.request_id,
                        "PATCH",
                        &request.url,
                        &request.patch_ops,
                    )
                    .await
                {
                    tracing::error!(group = id, version, error = %e, "history entry not written for a committed member write");
                }
            }
        }
        self.complete_committed(id, token).await;
        Ok(BatchAttempt::Done(answers(
            planned_jobs,
            Some(&document),
            &head.group_key,
        )))
    }
}

/// The committed Group document as of one patch's version.
pub(super) fn at_version(
    document: &mongodb::bson::Document,
    version: u64,
) -> mongodb::bson::Document {
    let mut document = document.clone();
    if let Ok(meta) = document.get_document_mut("meta") {
        meta.insert("versionId", version.to_string());
    }
    document
}

fn answers(
    planned: Vec<Planned>,
    document: Option<&mongodb::bson::Document>,
    group_key: &str,
) -> Vec<Answer> {
    let mut answers: Vec<Answer> = Vec::with_capacity(planned.len());
    for plan in planned {
        let answer = match plan {
            Planned::Answered(answer) => *answer,
            Planned::SameAs(first) => match &answers[first] {
                Ok(result) => Ok(MemberPatchResult {
                    replayed: true,
                    events_written: 0,
                    ..result.clone()
                }),
                Err(error) => Err(shared(error)),
            },
            Planned::Unchanged(version) => Ok(result(version, 0, document, group_key)),
            Planned::Writes { version, events } => Ok(result(version, events, document, group_key)),
        };
        answers.push(answer);
    }
    answers
}

fn result(
    version: u64,
    events_written: usize,
    document: Option<&mongodb::bson::Document>,
    group_key: &str,
) -> MemberPatchResult {
    MemberPatchResult {
        version,
        document: document.map(|d| at_version(d, version)),
        group_key: Some(group_key.to_string()),
        replayed: false,
        events_written,
        upstream_reply: None,
    }
}

/// One failure answered to every patch of a batch.
fn shared(error: &WriteError) -> WriteError {
    match error {
        WriteError::NotMigrated => WriteError::NotMigrated,
        WriteError::CommitUnknown { id, reason } => WriteError::CommitUnknown {
            id: id.clone(),
            reason: reason.clone(),
        },
        other => WriteError::Outcome(other.to_outcome()),
    }
}
