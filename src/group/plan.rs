//! Planning one write attempt, without I/O: which requests of a batch write
//! and with which version and events, and which are answered without
//! writing (a retry of a committed request, a reused `X-Request-Id`, a
//! stale `If-Match`, a patch that does not apply, only `test` ops).
//!
//! Each request is planned against the state the requests before it left,
//! and gets the next version when it changes anything; a request that fails
//! fails alone. A single write is a batch of one. What is read before
//! (head, replays, member facts) and written after (staging, commit) is in
//! `group::commit`.

use std::collections::HashMap;

use mongodb::bson::Document;

use crate::fhir::member_array::Plan;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::store::events::MemberEventRow;
use crate::store::group_documents::{CommitMarks, GroupHead, MemberState};

use super::members::{event_rows, EventOrigin, Planning};
use super::write::{MemberEdit, MemberPatchRequest, MemberPatchResult};
use super::GroupError;

pub(super) type Answer = Result<MemberPatchResult, GroupError>;

/// What a request's `X-Request-Id` says about it.
pub(super) enum Replay {
    /// Not seen committed: write it.
    New,
    /// A retry of a committed request: its answer.
    Same(Box<MemberPatchResult>),
    /// The id of a committed request, reused for another request.
    Conflict(Outcome),
}

/// Member patches that only append members or remove them by reference:
/// each can be planned against what the previous patches of a batch left,
/// from facts fetched once. Positional patches (positions shift under
/// earlier patches), split patches and roster replacements go alone.
pub(super) fn batchable(request: &MemberPatchRequest) -> bool {
    request.upstream_part.is_none()
        && matches!(&request.edit, MemberEdit::Patch(members) if members.is_value_only())
}

/// How much of a batch's one staging insert a request takes (at least 1).
pub(super) fn weight(request: &MemberPatchRequest) -> usize {
    match &request.edit {
        MemberEdit::Patch(members) => members.ops.len().max(1),
        MemberEdit::ReplaceRoster(roster) => roster.as_ref().map_or(1, |r| r.len().max(1)),
        MemberEdit::Atr(_, members) => members.len().max(1),
    }
}

/// For each request, the earlier request of the batch with the same client
/// `X-Request-Id`, if any: only the first is looked up and written.
pub(super) fn earlier_with_same_id(requests: &[&MemberPatchRequest]) -> Vec<Option<usize>> {
    let mut first: HashMap<&str, usize> = HashMap::new();
    requests
        .iter()
        .enumerate()
        .map(|(index, request)| {
            let id = request.client_request_id.as_deref()?;
            match first.get(id) {
                Some(&earlier) => Some(earlier),
                None => {
                    first.insert(id, index);
                    None
                }
            }
        })
        .collect()
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

pub(super) fn version_conflict(status: u16, id: &str, why: &str) -> GroupError {
    GroupError::Outcome(Outcome::error(
        status,
        IssueType::Conflict,
        format!("version conflict on Group/{id}: {why}"),
    ))
}

/// The refusal of a request whose `If-Match` does not name `current`.
pub(super) fn stale_if_match(
    status: u16,
    id: &str,
    if_match: Option<u64>,
    current: u64,
) -> Result<(), GroupError> {
    match if_match {
        Some(expected) if expected != current => Err(version_conflict(
            status,
            id,
            &format!("If-Match names version {expected} but the current version is {current}"),
        )),
        _ => Ok(()),
    }
}

/// Whether the member state read to route a request, before the lock was
/// taken, may stand in for a read under the lock: only for a Group kept here
/// with nothing unusual in its state (no record of an earlier release's
/// write, no copy of a migration in progress). See [`seen_state_holds`].
pub(super) fn may_reuse_seen_state(seen: &MemberState) -> bool {
    seen.in_clickhouse && seen.pending.is_none() && seen.inline_copy_at.is_none()
}

/// Whether that state still holds, judged from the head read under the lock:
/// every change of the state (a migration, a reverse, a delete, a first
/// write) happens under the lock and sets or drops the document's commit
/// marks, so marks of the same generation on a document without inline
/// members prove nothing changed. Anything else (a document a legacy
/// `$merge` rewrote, one created again, drift) reads the state again.
pub(super) fn seen_state_holds(seen: &MemberState, head: &GroupHead, inline: bool) -> bool {
    may_reuse_seen_state(seen)
        && !inline
        && head.marks
            == Some(CommitMarks {
                generation: seen.generation,
            })
}

/// The Group as an attempt found it.
pub(super) struct Base<'a> {
    pub group_id: &'a str,
    pub group_key: &'a str,
    pub token: &'a str,
    pub version: u64,
    /// 412 or 409 for a stale `If-Match` (`members.version_conflict_status`).
    pub conflict_status: u16,
}

/// One request of a batch, with what was looked up for it.
pub(super) struct Job<'a> {
    pub request: &'a MemberPatchRequest,
    /// What its `X-Request-Id` says (`New` for one repeated in the batch).
    pub replay: Replay,
    /// It also changes the Group document (the legacy server's half of a
    /// split write): it makes a version even when its members stay.
    pub changes_document: bool,
}

/// What one request of a batch comes to before the commit.
pub(super) enum Planned {
    Answered(Box<Answer>),
    /// Same client request id as an earlier request of the batch: same answer.
    SameAs(usize),
    /// Nothing changes (only `test` ops): no new version; the one it saw.
    Unchanged(u64),
    Writes {
        version: u64,
        events: usize,
    },
}

pub(super) struct BatchPlan {
    /// One per job, in order.
    pub planned: Vec<Planned>,
    /// The staged events of every version the batch makes.
    pub rows: Vec<MemberEventRow>,
    /// The Group's version after the batch (the base one when nothing writes).
    pub version: u64,
}

impl BatchPlan {
    /// Whether any request makes a version.
    pub(super) fn writes(&self, base_version: u64) -> bool {
        self.version != base_version
    }
}

/// Plans `jobs` in order. `plan_one` plans a request's members against the
/// state so far (index of the job, request, planning); it is only called for
/// requests that are new and whose `If-Match` holds.
pub(super) fn plan_batch(
    base: &Base<'_>,
    jobs: Vec<Job<'_>>,
    planning: &mut Planning,
    mut plan_one: impl FnMut(usize, &MemberPatchRequest, &Planning) -> Result<Plan, GroupError>,
) -> BatchPlan {
    let requests: Vec<&MemberPatchRequest> = jobs.iter().map(|job| job.request).collect();
    let earlier = earlier_with_same_id(&requests);
    let mut version = base.version;
    let mut rows = Vec::new();
    let mut planned = Vec::with_capacity(jobs.len());
    for (index, job) in jobs.into_iter().enumerate() {
        let request = job.request;
        if let (Some(first), Some(client_id)) = (earlier[index], &request.client_request_id) {
            let same = requests[first].request_digest == request.request_digest;
            planned.push(match same {
                true => Planned::SameAs(first),
                false => answered(Err(GroupError::Outcome(reused_request_id(
                    client_id,
                    base.group_id,
                    version,
                )))),
            });
            continue;
        }
        match job.replay {
            Replay::New => {}
            Replay::Same(replayed) => {
                planned.push(answered(Ok(*replayed)));
                continue;
            }
            Replay::Conflict(outcome) => {
                planned.push(answered(Err(GroupError::Outcome(outcome))));
                continue;
            }
        }
        if let Err(refused) = stale_if_match(
            base.conflict_status,
            base.group_id,
            request.if_match,
            version,
        ) {
            planned.push(answered(Err(refused)));
            continue;
        }
        let was_absent = planning.known.absent;
        let plan = match plan_one(index, request, planning) {
            Ok(plan) => plan,
            Err(error) => {
                planned.push(answered(Err(error)));
                continue;
            }
        };
        let origin = EventOrigin {
            group_key: base.group_key,
            group_id: base.group_id,
            token: base.token,
            request_id: &request.request_id,
        };
        let written = event_rows(&origin, version + 1, &plan, was_absent);
        if written.is_empty() && !job.changes_document {
            planned.push(Planned::Unchanged(version));
            continue;
        }
        version += 1;
        planning.advance(&plan);
        planned.push(Planned::Writes {
            version,
            events: written.len(),
        });
        rows.extend(written);
    }
    BatchPlan {
        planned,
        rows,
        version,
    }
}

fn answered(answer: Answer) -> Planned {
    Planned::Answered(Box::new(answer))
}

/// Each request's answer once the batch is settled; `document` is the Group
/// as committed (or as found, when nothing was written).
pub(super) fn answers(
    planned: Vec<Planned>,
    document: Option<&Document>,
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
    document: Option<&Document>,
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

/// The committed Group document as of one request's version: a member write
/// changes only the version metadata, so every version of a batch is the
/// last one with its own `versionId`.
pub(super) fn at_version(document: &Document, version: u64) -> Document {
    let mut document = document.clone();
    if let Ok(meta) = document.get_document_mut("meta") {
        meta.insert("versionId", version.to_string());
    }
    document
}

/// One failure answered to several requests (errors are not `Clone`: the
/// store's are answered by their outcome).
pub(super) fn shared(error: &GroupError) -> GroupError {
    match error {
        GroupError::NotMigrated => GroupError::NotMigrated,
        GroupError::CommitUnknown { id, reason } => GroupError::CommitUnknown {
            id: id.clone(),
            reason: reason.clone(),
        },
        other => GroupError::Outcome(other.to_outcome()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::member_array::{Known, SlotEvent};
    use crate::fhir::member_patch::MemberOps;
    use serde_json::json;

    fn patch(client_id: Option<&str>, digest: &str, if_match: Option<u64>) -> MemberPatchRequest {
        let ops = vec![
            json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/1"}}}),
        ];
        MemberPatchRequest {
            group_id: "g".into(),
            edit: MemberEdit::Patch(MemberOps {
                indexes: vec![0],
                ops: ops.clone(),
            }),
            if_match,
            client_request_id: client_id.map(str::to_string),
            request_digest: digest.into(),
            request_id: format!("req-{digest}"),
            url: "/Group/g".into(),
            upstream_part: None,
            seen_state: None,
            patch_ops: ops,
        }
    }

    fn base() -> Base<'static> {
        Base {
            group_id: "g",
            group_key: "k",
            token: "t",
            version: 7,
            conflict_status: 412,
        }
    }

    fn planning() -> Planning {
        Planning {
            known: Known {
                len: Some(0),
                floor: Some(String::new()),
                ..Known::default()
            },
        }
    }

    /// A plan that appends one member after what the planning holds.
    fn append(planning: &Planning) -> Plan {
        let len = planning.known.len.unwrap_or(0);
        Plan {
            events: vec![SlotEvent::Put {
                id: format!("s{len}"),
                key: format!("k{len}"),
                before: None,
                after: json!({"entity": {"reference": format!("Patient/{len}")}}),
            }],
            len: len + 1,
            present: true,
            floor: Some(format!("k{len}")),
        }
    }

    fn unchanged(planning: &Planning) -> Plan {
        Plan {
            events: vec![],
            len: planning.known.len.unwrap_or(0),
            present: true,
            floor: None,
        }
    }

    fn new_jobs(requests: &[MemberPatchRequest]) -> Vec<Job<'_>> {
        requests
            .iter()
            .map(|request| Job {
                request,
                replay: Replay::New,
                changes_document: false,
            })
            .collect()
    }

    fn versions(plan: &BatchPlan) -> Vec<Option<u64>> {
        plan.planned
            .iter()
            .map(|p| match p {
                Planned::Writes { version, .. } => Some(*version),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn each_writing_request_gets_the_next_version_planned_on_what_the_ones_before_left() {
        let requests = [patch(None, "a", None), patch(None, "b", None)];
        let mut planning = planning();
        let mut lens = Vec::new();
        let plan = plan_batch(&base(), new_jobs(&requests), &mut planning, |_, _, p| {
            lens.push(p.known.len);
            Ok(append(p))
        });
        assert_eq!(versions(&plan), vec![Some(8), Some(9)]);
        assert_eq!(
            lens,
            vec![Some(0), Some(1)],
            "the second saw the first's member"
        );
        assert_eq!(plan.version, 9);
        assert!(plan.writes(7));
        let row_versions: Vec<u64> = plan.rows.iter().map(|r| r.group_version).collect();
        assert_eq!(row_versions, vec![8, 9], "one row per member added");
        assert!(plan
            .rows
            .iter()
            .all(|r| r.token == "t" && r.group_key == "k"));
        assert_eq!(plan.rows[1].request_id, "req-b");
    }

    #[test]
    fn a_request_that_changes_nothing_makes_no_version_and_the_next_one_takes_it() {
        let requests = [patch(None, "a", None), patch(None, "b", None)];
        let mut calls = 0;
        let plan = plan_batch(&base(), new_jobs(&requests), &mut planning(), |_, _, p| {
            calls += 1;
            Ok(if calls == 1 { unchanged(p) } else { append(p) })
        });
        assert!(matches!(plan.planned[0], Planned::Unchanged(7)));
        assert_eq!(versions(&plan), vec![None, Some(8)]);
    }

    #[test]
    fn a_document_change_makes_a_version_even_when_the_members_stay() {
        let requests = [patch(None, "a", None)];
        let mut jobs = new_jobs(&requests);
        jobs[0].changes_document = true;
        let plan = plan_batch(&base(), jobs, &mut planning(), |_, _, p| Ok(unchanged(p)));
        assert_eq!(versions(&plan), vec![Some(8)]);
        assert!(plan.rows.is_empty());
    }

    #[test]
    fn if_match_is_checked_against_the_version_the_earlier_requests_left() {
        let requests = [
            patch(None, "a", Some(7)),
            patch(None, "b", Some(7)),
            patch(None, "c", Some(8)),
        ];
        let plan = plan_batch(&base(), new_jobs(&requests), &mut planning(), |_, _, p| {
            Ok(append(p))
        });
        assert_eq!(versions(&plan), vec![Some(8), None, Some(9)]);
        let Planned::Answered(answer) = &plan.planned[1] else {
            panic!("the stale If-Match is answered");
        };
        let Err(error) = answer.as_ref() else {
            panic!("refused")
        };
        let outcome = error.to_outcome();
        assert_eq!(outcome.status, 412);
        assert!(format!("{outcome:?}")
            .contains("If-Match names version 7 but the current version is 8"));
    }

    #[test]
    fn a_failing_request_fails_alone_and_leaves_the_state_as_it_was() {
        let requests = [
            patch(None, "a", None),
            patch(None, "b", None),
            patch(None, "c", None),
        ];
        let mut seen = Vec::new();
        let plan = plan_batch(&base(), new_jobs(&requests), &mut planning(), |i, _, p| {
            seen.push(p.known.len);
            if i == 1 {
                Err(GroupError::Outcome(Outcome::error(
                    422,
                    IssueType::Processing,
                    "no",
                )))
            } else {
                Ok(append(p))
            }
        });
        assert_eq!(versions(&plan), vec![Some(8), None, Some(9)]);
        assert_eq!(seen, vec![Some(0), Some(1), Some(1)]);
    }

    #[test]
    fn a_repeated_request_id_shares_the_first_answer_and_a_reused_one_is_refused() {
        let requests = [
            patch(Some("x"), "a", None),
            patch(Some("x"), "a", None),
            patch(Some("x"), "other", None),
        ];
        let mut calls = 0;
        let plan = plan_batch(&base(), new_jobs(&requests), &mut planning(), |_, _, p| {
            calls += 1;
            Ok(append(p))
        });
        assert_eq!(calls, 1, "written once");
        assert!(matches!(plan.planned[1], Planned::SameAs(0)));
        let answers = answers(plan.planned, Some(&mongodb::bson::doc! {"meta": {}}), "k");
        let first = answers[0].as_ref().unwrap();
        let second = answers[1].as_ref().unwrap();
        assert_eq!((first.version, first.replayed), (8, false));
        assert_eq!(
            (second.version, second.replayed, second.events_written),
            (8, true, 0)
        );
        let Err(refused) = &answers[2] else {
            panic!("a reused id is refused")
        };
        assert_eq!(refused.to_outcome().status, 422);
    }

    #[test]
    fn a_retry_of_a_committed_request_is_answered_from_its_commit_without_planning() {
        let requests = [patch(Some("x"), "a", Some(3))];
        let done = MemberPatchResult {
            version: 3,
            document: None,
            group_key: Some("k".into()),
            replayed: true,
            events_written: 0,
            upstream_reply: None,
        };
        let jobs = vec![Job {
            request: &requests[0],
            replay: Replay::Same(Box::new(done)),
            changes_document: false,
        }];
        let plan = plan_batch(&base(), jobs, &mut planning(), |_, _, _| {
            panic!("a replay is not planned")
        });
        assert!(!plan.writes(7), "and its stale If-Match does not matter");
        let answers = answers(plan.planned, None, "k");
        assert_eq!(answers[0].as_ref().unwrap().version, 3);
    }

    #[test]
    fn answers_carry_the_committed_document_at_each_requests_own_version() {
        let document = mongodb::bson::doc! {"id": "g", "meta": {"versionId": "9"}};
        let planned = vec![
            Planned::Writes {
                version: 8,
                events: 1,
            },
            Planned::Unchanged(8),
            Planned::Writes {
                version: 9,
                events: 2,
            },
        ];
        let answers = answers(planned, Some(&document), "k");
        let versions: Vec<String> = answers
            .iter()
            .map(|a| {
                let d = a.as_ref().unwrap().document.as_ref().unwrap();
                d.get_document("meta")
                    .unwrap()
                    .get_str("versionId")
                    .unwrap()
                    .to_string()
            })
            .collect();
        assert_eq!(versions, vec!["8", "8", "9"]);
        assert_eq!(answers[2].as_ref().unwrap().events_written, 2);
    }

    #[test]
    fn only_value_only_member_patches_are_batched() {
        let mut positional = patch(None, "a", None);
        positional.edit = MemberEdit::Patch(MemberOps {
            indexes: vec![0],
            ops: vec![json!({"op": "remove", "path": "/member/0"})],
        });
        let roster = MemberPatchRequest {
            edit: MemberEdit::ReplaceRoster(Some(vec![json!({}), json!({})])),
            ..patch(None, "b", None)
        };
        assert!(batchable(&patch(None, "a", None)));
        assert!(!batchable(&positional));
        assert!(!batchable(&roster));
        assert_eq!(weight(&roster), 2);
        assert_eq!(weight(&positional), 1);
    }

    fn kept_state(generation: i64) -> MemberState {
        MemberState {
            in_clickhouse: true,
            generation,
            ..MemberState::default()
        }
    }

    fn head_marked(marks: Option<i64>) -> GroupHead {
        GroupHead {
            id: "g".into(),
            group_key: "k".into(),
            version: 3,
            last_updated: None,
            commit_token: None,
            authority: None,
            marks: marks.map(|generation| CommitMarks { generation }),
        }
    }

    #[test]
    fn the_routing_state_stands_when_the_document_carries_its_generations_marks() {
        assert!(seen_state_holds(
            &kept_state(2),
            &head_marked(Some(2)),
            false
        ));
    }

    #[test]
    fn the_routing_state_is_read_again_when_the_document_does_not_prove_it() {
        let seen = kept_state(2);
        assert!(
            !seen_state_holds(&seen, &head_marked(Some(1)), false),
            "another generation: deleted and created again"
        );
        assert!(
            !seen_state_holds(&seen, &head_marked(None), false),
            "no marks: reversed, rewritten by $merge, or never written here"
        );
        assert!(
            !seen_state_holds(&seen, &head_marked(Some(2)), true),
            "inline members: drift or a migration's copy"
        );
    }

    #[test]
    fn an_unusual_routing_state_is_never_reused() {
        let not_kept = MemberState::default();
        let copying = MemberState {
            inline_copy_at: Some(3),
            ..kept_state(0)
        };
        let earlier_record = MemberState {
            pending: Some(crate::store::group_documents::PendingWrite {
                token: "t".into(),
                version: 4,
                from_version: 4,
                url: String::new(),
                request_id: String::new(),
                committed_at: None,
                upstream_committed: false,
                committed: false,
            }),
            ..kept_state(0)
        };
        for seen in [not_kept, copying, earlier_record] {
            assert!(!may_reuse_seen_state(&seen), "{seen:?}");
            assert!(!seen_state_holds(&seen, &head_marked(Some(0)), false));
        }
    }

    #[test]
    fn only_the_first_request_with_an_id_is_looked_up() {
        let requests = [
            patch(Some("x"), "a", None),
            patch(None, "b", None),
            patch(Some("y"), "c", None),
            patch(Some("x"), "d", None),
        ];
        let refs: Vec<&MemberPatchRequest> = requests.iter().collect();
        assert_eq!(earlier_with_same_id(&refs), vec![None, None, None, Some(0)]);
    }
}
