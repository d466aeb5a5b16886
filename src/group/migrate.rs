//! `fhir-group-proxy migrate`: moving the inline `member` array of existing
//! Groups into ClickHouse member events, and back (`--reverse`).
//!
//! Forward, per Group, under its write lock (like any member write):
//! 1. read the stored document's `member` array, element by element as
//!    stored (the legacy server's enrichment keys included: they are the
//!    Group's data);
//! 2. stage the roster in chunks, as events of the Group's *current* version
//!    (no version bump: the roster does not change, so clients' ETags stay
//!    valid and the legacy history entry of that version already holds the
//!    same members inline);
//! 3. publish the staged events;
//! 4. verify: the roster read back from ClickHouse has the count and checksum
//!    of the inline array, else the Group is left as it was and reported;
//! 5. mark the Group migrated (`MemberState.storage`), then remove its inline
//!    array, on condition that its version did not move meanwhile (else it is
//!    marked not migrated again and reported).
//!
//! Resuming: a Group is marked migrated only at step 5, so a run that stops
//! earlier leaves it on the legacy path with its inline array. Events are
//! planned against the slots ClickHouse already holds for the Group, as a
//! roster replacement (`fhir::roster_replace`): a rerun after a publish
//! writes nothing twice, and a rerun after a failed or outdated attempt
//! writes only the difference. Staged events of a stopped run are never
//! published (each run stages under its own token). A Group marked migrated
//! that still holds an inline array (a run stopped between marking and
//! removing) only gets the array removed.
//!
//! The array is at most one MongoDB document (16 MiB), so it is read whole.
//!
//! Ordering: the events of one run follow every event the Group already has
//! at its version (see [`op_index_after`]).
//!
//! Reverse: the roster is streamed from ClickHouse into the document's
//! `member` array (refused when it would not fit in a 16 MiB document), read
//! back and verified, then the Group is marked not migrated. Its events stay in
//! ClickHouse as history; the member search ignores Groups not migrated.

use std::collections::HashSet;
use std::str::FromStr;

use mongodb::bson::{Bson, Document, RawArrayBuf, RawDocumentBuf};
use serde_json::Value;

use crate::fhir::member_array::Plan;
use crate::fhir::migration::{GroupOutcome, RosterChecksum};
use crate::fhir::roster_replace::replace_all;
use crate::store::events::{event_sequence, EventStoreError, MemberEventRow};
use crate::store::group_documents::{GroupHead, MemberState, StoredGroup};
use crate::store::schema::MAX_OPS_PER_VERSION;

use super::members::{event_rows, new_slot_id, EventOrigin};
use super::{GroupError, GroupService};

/// Members staged per ClickHouse insert unless told otherwise.
pub const DEFAULT_CHUNK_SIZE: usize = 10_000;

/// MongoDB's limit on one document.
const MAX_DOCUMENT_BYTES: usize = 16 * 1024 * 1024;

/// The `request_id` of migration events (there is no client request).
const MIGRATION_REQUEST_ID: &str = "fhir-group-proxy-migrate";

/// Exit status of a run stopped by [`MigrationFault::ExitAfter`].
pub const FAULT_EXIT_CODE: i32 = 70;

/// Points where a migration can be stopped on purpose (tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationStep {
    /// The first chunk of events is staged.
    FirstChunk,
    /// Every event is staged, none published.
    Staging,
    /// The events are published, the Group is not marked migrated.
    Publish,
    /// The Group is marked migrated, its inline array is still there.
    Mark,
}

/// Faults injected by tests through `FGP_MIGRATE_FAULT` (never set it in
/// production): they exercise interruption and verification failure on the
/// real code path against the real stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationFault {
    /// The process exits right after the step, without any cleanup, as if killed.
    ExitAfter(MigrationStep),
    /// The first member's event is left out: verification sees one member too few.
    DropMember,
    /// The first member is stored with `inactive` changed: same count, other checksum.
    AlterMember,
}

impl FromStr for MigrationFault {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(match text {
            "exit-after-first-chunk" => Self::ExitAfter(MigrationStep::FirstChunk),
            "exit-after-staging" => Self::ExitAfter(MigrationStep::Staging),
            "exit-after-publish" => Self::ExitAfter(MigrationStep::Publish),
            "exit-after-mark" => Self::ExitAfter(MigrationStep::Mark),
            "drop-member" => Self::DropMember,
            "alter-member" => Self::AlterMember,
            other => {
                return Err(format!(
                    "unknown migration fault '{other}' (for tests only: exit-after-first-chunk, \
                     exit-after-staging, exit-after-publish, exit-after-mark, drop-member, \
                     alter-member)"
                ))
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct MigrateOptions {
    /// Members per staged insert (and per point lookup of a re-migration).
    pub chunk_size: usize,
    pub fault: Option<MigrationFault>,
    /// Drift (a managed Group whose document gained inline members): add
    /// those members to the member store, then remove the array. Without
    /// it, a drifted Group is reported and left as it is.
    pub fold: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        Self {
            chunk_size: DEFAULT_CHUNK_SIZE,
            fault: None,
            fold: false,
        }
    }
}

impl MigrateOptions {
    fn stop_after(&self, step: MigrationStep) {
        if self.fault == Some(MigrationFault::ExitAfter(step)) {
            eprintln!("FGP_MIGRATE_FAULT: stopping after {step:?}, as if killed");
            std::process::exit(FAULT_EXIT_CODE);
        }
    }
}

/// Where one run writes: a Group's member key at one version and position.
struct MigrationTarget<'a> {
    id: &'a str,
    head: &'a GroupHead,
    token: &'a str,
    op_index: usize,
}

impl GroupService {
    /// The ids of the Groups in MongoDB matching `filter`, sorted: what a
    /// migration run goes through.
    pub async fn group_ids(&self, filter: Document) -> Result<Vec<String>, GroupError> {
        Ok(self.documents.group_ids(filter).await?)
    }

    /// Moves Group `id`'s inline members into ClickHouse (see the module
    /// docs). `progress` is told how many members each step handled.
    pub async fn migrate_group(
        &self,
        id: &str,
        options: &MigrateOptions,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> GroupOutcome {
        let lease = match self.take_lease_waiting(id).await {
            Ok(lease) => lease,
            Err(error) => return failed(error),
        };
        let result = self
            .migrate_under_lease(id, lease.token(), options, progress)
            .await;
        end_migration_lease(lease, result).await
    }

    /// Writes Group `id`'s roster back into its document and marks it not
    /// migrated.
    pub async fn reverse_group(
        &self,
        id: &str,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> GroupOutcome {
        let lease = match self.take_lease_waiting(id).await {
            Ok(lease) => lease,
            Err(error) => return failed(error),
        };
        let result = self.reverse_under_lease(id, progress).await;
        end_migration_lease(lease, result).await
    }

    /// The Group's head and member state, after finishing a write that a
    /// stopped writer left pending.
    async fn settled_state(&self, id: &str) -> Result<(GroupHead, MemberState), GroupError> {
        let head = self.head_or_404(id).await?;
        let state = self.documents.member_state(id).await?;
        let Some(pending) = &state.pending else {
            return Ok((head, state));
        };
        self.recover_pending(id, &head, pending).await?;
        Ok((
            self.head_or_404(id).await?,
            self.documents.member_state(id).await?,
        ))
    }

    /// The stored document at the head's version, with its exact `versionId`.
    async fn stored_at(
        &self,
        id: &str,
        head: &GroupHead,
    ) -> Result<Result<(StoredGroup, Bson), GroupOutcome>, GroupError> {
        let Some(stored) = self.documents.stored_group(id).await? else {
            return Ok(Err(GroupOutcome::Skipped("no longer exists".into())));
        };
        if stored.version()? != head.version {
            return Ok(Err(changed_meanwhile(head.version)));
        }
        let version_id = stored.version_id()?;
        Ok(Ok((stored, version_id)))
    }

    async fn migrate_under_lease(
        &self,
        id: &str,
        token: &str,
        options: &MigrateOptions,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<GroupOutcome, GroupError> {
        let (head, state) = self.settled_state(id).await?;
        let (stored, version_id) = match self.stored_at(id, &head).await? {
            Ok(found) => found,
            Err(outcome) => return Ok(outcome),
        };
        let inline_count = stored.member_count()?;
        if state.in_clickhouse {
            if inline_count == 0 {
                return Ok(GroupOutcome::Skipped("already migrated".into()));
            }
            // Either a run stopped between marking and removing the array
            // (the array is the roster), or drift: a writer around the proxy
            // put members inline. Drift is never removed unread.
            let drifted = match self.inline_drift(&stored, &head).await? {
                Ok(drifted) => drifted,
                Err(why) => return Ok(GroupOutcome::Failed(why)),
            };
            if let Some((inline, held)) = drifted {
                if !options.fold {
                    return Ok(GroupOutcome::Failed(drift_report(&inline, &held)));
                }
                let op_index = match op_index_after(
                    head.version,
                    self.events.last_sequence(&head.group_key).await?,
                ) {
                    Ok(op_index) => op_index,
                    Err(why) => return Ok(GroupOutcome::Failed(why)),
                };
                let target = MigrationTarget {
                    id,
                    head: &head,
                    token,
                    op_index,
                };
                // Folding appends the inline elements the roster lacks and
                // removes nothing: both writers' members are kept.
                let facts = self.events.array_facts(&head.group_key).await?;
                let slots = self.events.all_slots(&head.group_key).await?;
                let held_texts: HashSet<String> =
                    slots.iter().map(|s| s.element.to_string()).collect();
                let mut desired: Vec<Value> = slots.iter().map(|s| s.element.clone()).collect();
                desired.extend(
                    inline
                        .into_iter()
                        .filter(|e| !held_texts.contains(&e.to_string())),
                );
                let plan = replace_all(&slots, &facts.floor, Some(&desired), &mut new_slot_id)
                    .map_err(|e| internal(&e.to_string()))?;
                self.stage_plan(&target, &plan, facts.absent, options, progress)
                    .await?;
                self.events.publish(token).await?;
            }
            return Ok(
                if self.documents.strip_inline_members(id, &version_id).await? {
                    progress(inline_count as u64);
                    GroupOutcome::Moved {
                        members: inline_count as u64,
                    }
                } else {
                    changed_meanwhile(head.version)
                },
            );
        }
        if inline_count == 0 {
            return Ok(GroupOutcome::Skipped(
                "no inline members (it moves to ClickHouse at its first member write)".into(),
            ));
        }

        let inline = read_inline(&stored)?;
        let last_sequence = self.events.last_sequence(&head.group_key).await?;
        let op_index = match op_index_after(head.version, last_sequence) {
            Ok(op_index) => op_index,
            Err(why) => return Ok(GroupOutcome::Failed(why)),
        };
        let target = MigrationTarget {
            id,
            head: &head,
            token,
            op_index,
        };
        let facts = self.events.array_facts(&head.group_key).await?;
        let slots = match last_sequence {
            Some(_) => self.events.all_slots(&head.group_key).await?,
            None => Vec::new(),
        };
        let plan = replace_all(&slots, &facts.floor, Some(&inline), &mut new_slot_id)
            .map_err(|e| internal(&e.to_string()))?;
        self.stage_plan(&target, &plan, facts.absent, options, progress)
            .await?;
        options.stop_after(MigrationStep::Staging);
        self.events.publish(token).await?;
        options.stop_after(MigrationStep::Publish);

        let inline = checksum_of(&inline);
        let stored_roster = self.roster_checksum(&head.group_key).await?;
        if stored_roster != inline {
            return Ok(GroupOutcome::Failed(format!(
                "verification failed: the inline array has {}, ClickHouse {}; the Group keeps \
                 its inline members and stays on the legacy path",
                inline, stored_roster
            )));
        }
        self.documents.set_migrated(id, Some(&version_id)).await?;
        options.stop_after(MigrationStep::Mark);
        if !self.documents.strip_inline_members(id, &version_id).await? {
            self.documents.set_migrated(id, None).await?;
            return Ok(changed_meanwhile(head.version));
        }
        Ok(GroupOutcome::Moved {
            members: inline.members(),
        })
    }

    /// Stages a run's events in chunks, at the Group's current version
    /// after every event it already has, keeping the lock alive between.
    async fn stage_plan(
        &self,
        target: &MigrationTarget<'_>,
        plan: &Plan,
        was_absent: bool,
        options: &MigrateOptions,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<(), GroupError> {
        let origin = EventOrigin {
            group_key: &target.head.group_key,
            group_id: target.id,
            token: target.token,
            request_id: MIGRATION_REQUEST_ID,
        };
        let mut rows = event_rows(&origin, target.head.version, plan, was_absent);
        if target.op_index + rows.len() >= MAX_OPS_PER_VERSION {
            return Err(internal(&format!(
                "version {} has no room for {} more events in ClickHouse",
                target.head.version,
                rows.len()
            )));
        }
        for (i, row) in rows.iter_mut().enumerate() {
            row.op_index = (target.op_index + i) as u32;
            row.sequence = event_sequence(target.head.version, target.op_index + i);
        }
        inject_row_fault(options.fault, &mut rows);
        let chunk_size = options.chunk_size.max(1);
        let mut first = true;
        let mut rows = rows.into_iter().peekable();
        while rows.peek().is_some() {
            let chunk: Vec<MemberEventRow> = rows.by_ref().take(chunk_size).collect();
            let staged = chunk.len() as u64;
            self.events.stage(chunk).await?;
            progress(staged);
            if first {
                options.stop_after(MigrationStep::FirstChunk);
                first = false;
            }
            self.keep_lease(target).await?;
        }
        Ok(())
    }

    async fn keep_lease(&self, target: &MigrationTarget<'_>) -> Result<(), GroupError> {
        if self
            .documents
            .locks()
            .renew(target.id, target.token, self.settings.lease_ttl)
            .await?
        {
            return Ok(());
        }
        Err(GroupError::Outcome(crate::fhir::outcome::Outcome::error(
            503,
            crate::fhir::outcome::IssueType::Transient,
            format!(
                "the write lock on Group/{} was taken over during the migration; nothing is \
                 marked migrated, run migrate again",
                target.id
            ),
        )))
    }

    /// `migrate --check`: whether a managed Group's document holds inline
    /// members that differ from its roster (drift), without changing anything.
    pub async fn check_group(&self, id: &str) -> GroupOutcome {
        let result = async {
            let state = self.documents.member_state(id).await?;
            let Some(head) = self.documents.head(id).await? else {
                return Ok(GroupOutcome::Skipped("no longer exists".into()));
            };
            let Some(stored) = self.documents.stored_group(id).await? else {
                return Ok(GroupOutcome::Skipped("no longer exists".into()));
            };
            if !state.in_clickhouse || stored.member_count()? == 0 {
                return Ok(GroupOutcome::Skipped("no drift".into()));
            }
            Ok(match self.inline_drift(&stored, &head).await? {
                Ok(Some((inline, held))) => GroupOutcome::Failed(drift_report(&inline, &held)),
                Ok(None) => GroupOutcome::Skipped(
                    "a copy of its roster is left inline by an interrupted migration; \
                     migrate removes it"
                        .into(),
                ),
                Err(why) => GroupOutcome::Failed(why),
            })
        }
        .await;
        result.unwrap_or_else(failed)
    }

    /// For a managed Group with an inline array: `None` when the array is
    /// the roster itself (an interrupted migration), else both checksums.
    async fn inline_drift(
        &self,
        stored: &StoredGroup,
        head: &GroupHead,
    ) -> Result<Result<Option<(Vec<Value>, RosterChecksum)>, String>, GroupError> {
        let inline = read_inline(stored)?;
        let held = self.roster_checksum(&head.group_key).await?;
        Ok(Ok((held != checksum_of(&inline)).then_some((inline, held))))
    }

    /// Count and checksum of the Group's current roster in ClickHouse, streamed.
    async fn roster_checksum(&self, group_key: &str) -> Result<RosterChecksum, GroupError> {
        let mut roster = self.events.roster(group_key, None)?;
        let mut checksum = RosterChecksum::default();
        while let Some(member) = roster.next().await.map_err(EventStoreError::from)? {
            checksum.add(&member.element);
        }
        Ok(checksum)
    }

    async fn reverse_under_lease(
        &self,
        id: &str,
        progress: &mut (dyn FnMut(u64) + Send),
    ) -> Result<GroupOutcome, GroupError> {
        let (head, state) = self.settled_state(id).await?;
        if !state.in_clickhouse {
            return Ok(GroupOutcome::Skipped("not migrated".into()));
        }
        let (stored, version_id) = match self.stored_at(id, &head).await? {
            Ok(found) => found,
            Err(outcome) => return Ok(outcome),
        };
        // Room for the array: the rest of the document, the array's key and type.
        let room = MAX_DOCUMENT_BYTES
            .saturating_sub(stored.size_without_members()?)
            .saturating_sub("member".len() + 2);
        drop(stored);

        let mut roster = self.events.roster(&head.group_key, None)?;
        let mut members = RawArrayBuf::new();
        let mut checksum = RosterChecksum::default();
        while let Some(member) = roster.next().await.map_err(EventStoreError::from)? {
            let element: Value = serde_json::from_str(&member.element)
                .map_err(|e| internal(&format!("a stored member is not JSON: {e}")))?;
            members.push(member_document(&element)?);
            if members.as_bytes().len() > room {
                return Ok(GroupOutcome::Failed(format!(
                    "the roster has more than {} members, which do not fit in one MongoDB \
                     document (16 MiB); it stays in ClickHouse",
                    checksum.members()
                )));
            }
            checksum.add(&member.element);
        }
        let count = checksum.members();
        if !self
            .documents
            .restore_inline_members(id, &version_id, members)
            .await?
        {
            return Ok(changed_meanwhile(head.version));
        }

        let Some(written) = self.documents.stored_group(id).await? else {
            return Ok(GroupOutcome::Failed(
                "the Group disappeared while its members were written back".into(),
            ));
        };
        let read_back = checksum_of(&read_inline(&written)?);
        if read_back != checksum {
            return Ok(GroupOutcome::Failed(format!(
                "verification failed: ClickHouse has {checksum}, the written array {read_back}; \
                 the Group stays migrated (its inline array is ignored)"
            )));
        }
        self.documents.set_migrated(id, None).await?;
        progress(count);
        Ok(GroupOutcome::Moved { members: count })
    }
}

fn drift_report(inline: &[Value], held: &RosterChecksum) -> String {
    format!(
        "drift: the Group is managed by the proxy (member store: {held}) but its document \
         also holds an inline array ({}) written around the proxy; nothing was changed: \
         `migrate --fold` appends the inline members the member store lacks and removes the \
         array",
        checksum_of(inline)
    )
}

/// The stored `member` array, element by element.
fn read_inline(stored: &StoredGroup) -> Result<Vec<Value>, GroupError> {
    let mut inline = Vec::new();
    for member in stored.members()? {
        inline.push(member?);
    }
    Ok(inline)
}

/// The checksum of elements as the proxy stores them (their JSON text).
fn checksum_of(elements: &[Value]) -> RosterChecksum {
    let mut checksum = RosterChecksum::default();
    for element in elements {
        checksum.add(&element.to_string());
    }
    checksum
}

/// The op index of a run's events at `version`: 0, or past the events that
/// `version` already has. `last_sequence`: the Group's newest event.
pub fn op_index_after(version: u64, last_sequence: Option<u64>) -> Result<usize, String> {
    let Some(last) = last_sequence else {
        return Ok(0);
    };
    let (last_version, last_op) = (last >> 20, (last as usize) & (MAX_OPS_PER_VERSION - 1));
    match last_version.cmp(&version) {
        std::cmp::Ordering::Less => Ok(0),
        std::cmp::Ordering::Equal if last_op + 1 < MAX_OPS_PER_VERSION => Ok(last_op + 1),
        std::cmp::Ordering::Equal => Err(format!(
            "version {version} has no room for more events in ClickHouse"
        )),
        std::cmp::Ordering::Greater => Err(format!(
            "ClickHouse holds events of version {last_version}, newer than the Group's version \
             {version}; check the Group before migrating it"
        )),
    }
}

fn inject_row_fault(fault: Option<MigrationFault>, rows: &mut Vec<MemberEventRow>) {
    match fault {
        Some(MigrationFault::DropMember) => {
            if let Some(first) = rows.iter().position(|r| !r.slot_id.is_empty()) {
                rows.remove(first);
            }
        }
        Some(MigrationFault::AlterMember) => {
            if let Some(row) = rows.iter_mut().find(|r| !r.slot_id.is_empty()) {
                if let Ok(Value::Object(mut element)) = serde_json::from_str(&row.element) {
                    element.insert("inactive".into(), Value::Bool(row.inactive == 0));
                    row.element = Value::Object(element).to_string();
                }
            }
        }
        _ => {}
    }
}

fn member_document(member: &serde_json::Value) -> Result<RawDocumentBuf, GroupError> {
    let serde_json::Value::Object(object) = member else {
        return Err(internal("a member is not a JSON object"));
    };
    let as_bson = |e: &dyn std::fmt::Display| internal(&format!("member as BSON: {e}"));
    let document = Document::try_from(object.clone()).map_err(|e| as_bson(&e))?;
    RawDocumentBuf::from_document(&document).map_err(|e| as_bson(&e))
}

fn internal(what: &str) -> GroupError {
    GroupError::Outcome(crate::fhir::outcome::Outcome::error(
        500,
        crate::fhir::outcome::IssueType::Exception,
        what,
    ))
}

fn changed_meanwhile(version: u64) -> GroupOutcome {
    GroupOutcome::Failed(format!(
        "the Group changed during the migration (it was at version {version}); it was left \
         as it was, run migrate again"
    ))
}

fn failed(error: GroupError) -> GroupOutcome {
    GroupOutcome::Failed(match error {
        GroupError::Outcome(outcome) => outcome.first_diagnostics().to_string(),
        other => other.to_string(),
    })
}

/// A migration leaves nothing for the next writer to finish (a stopped
/// run's staged events are never published): its lock just goes.
async fn end_migration_lease(
    lease: super::lease::Lease,
    result: Result<GroupOutcome, GroupError>,
) -> GroupOutcome {
    lease.end_logged(super::lease::Ending::Done).await;
    result.unwrap_or_else(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_named_for_tests() {
        assert_eq!(
            "exit-after-publish".parse::<MigrationFault>(),
            Ok(MigrationFault::ExitAfter(MigrationStep::Publish))
        );
        assert_eq!("alter-member".parse(), Ok(MigrationFault::AlterMember));
        let error = "explode".parse::<MigrationFault>().unwrap_err();
        assert!(
            error.contains("explode") && error.contains("drop-member"),
            "{error}"
        );
    }

    #[test]
    fn a_run_goes_after_every_event_the_group_has() {
        assert_eq!(op_index_after(3, None), Ok(0));
        assert_eq!(op_index_after(3, Some(event_sequence(2, 40))), Ok(0));
        assert_eq!(op_index_after(3, Some(event_sequence(3, 0))), Ok(1));
        assert_eq!(op_index_after(3, Some(event_sequence(3, 9))), Ok(10));
        assert!(op_index_after(3, Some(event_sequence(4, 0)))
            .unwrap_err()
            .contains("newer"));
        assert!(op_index_after(3, Some(event_sequence(3, MAX_OPS_PER_VERSION - 1))).is_err());
    }

    fn rows(references: &[&str]) -> Vec<MemberEventRow> {
        use crate::fhir::member_array::SlotEvent;
        let plan = Plan {
            events: references
                .iter()
                .enumerate()
                .map(|(i, reference)| SlotEvent::Put {
                    id: format!("s{i}"),
                    key: format!("a{i}"),
                    before: None,
                    after: serde_json::json!({"entity": {"reference": reference}}),
                })
                .collect(),
            len: references.len(),
            present: true,
            floor: None,
        };
        let origin = EventOrigin {
            group_key: "k",
            group_id: "g",
            token: "t",
            request_id: MIGRATION_REQUEST_ID,
        };
        event_rows(&origin, 3, &plan, false)
    }

    #[test]
    fn row_faults_drop_or_alter_the_first_member() {
        let mut rows = rows(&["Patient/a", "Patient/b"]);
        inject_row_fault(Some(MigrationFault::AlterMember), &mut rows);
        assert_eq!(
            rows[0].element,
            r#"{"entity":{"reference":"Patient/a"},"inactive":true}"#
        );
        inject_row_fault(Some(MigrationFault::DropMember), &mut rows);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].match_key, "Patient/b");
        inject_row_fault(None, &mut rows);
        assert_eq!(rows.len(), 1);
    }
}
