//! Planning a member write against the stored slots: the fetch loop that
//! answers the planner's [`Need`]s from ClickHouse, and the event rows a
//! plan becomes. Runs under the Group's write lock, so the facts fetched are
//! those of the version being written.

use std::collections::HashMap;

use serde_json::Value;

use crate::fhir::atr::atr_plan;
use crate::fhir::member_array::{self, Known, Need, Plan, Planned, RefSlot, Slot, SlotEvent};
use crate::fhir::member_patch::{patch_failure, MemberOps};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::roster_replace::replace_all;
use crate::store::events::{event_sequence, EventType, MemberEventRow};
use crate::store::member_slots::ArrayFacts;

use super::write::MemberEdit;
use super::{GroupError, GroupService};

/// More rounds than the planner's bound (2 + blocking ops, at most one per
/// op) means the store answers inconsistently; stop rather than loop.
fn max_rounds(ops: usize) -> usize {
    ops + 3
}

/// A fresh slot id: random, so ids never collide across writers, versions
/// or a Group deleted and created again.
pub(super) fn new_slot_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// What a plan was made against, kept to plan the next patch of a batch.
#[derive(Debug, Clone)]
pub(super) struct Planning {
    pub known: Known,
}

impl Planning {
    /// Nothing known: for a write answered before it is planned.
    pub fn unknown() -> Self {
        Planning {
            known: Known::default(),
        }
    }

    /// Facts known before anything is fetched.
    pub fn from_facts(facts: &ArrayFacts) -> Self {
        Planning {
            known: Known {
                len: Some(facts.counts.members.max(0) as usize),
                absent: facts.absent,
                floor: Some(facts.floor.clone()),
                ..Known::default()
            },
        }
    }

    /// The facts after `plan` was applied, for the next patch of a batch.
    /// Only length, floor and by-reference lists carry over: positions
    /// shift, so batches hold value-only patches (see `MemberOps::is_value_only`).
    pub fn advance(&mut self, plan: &Plan) {
        let known = &mut self.known;
        known.len = Some(plan.len);
        known.absent = !plan.present;
        if let Some(floor) = &plan.floor {
            known.floor = Some(floor.clone());
        }
        known.at.clear();
        known.all = None;
        for event in &plan.events {
            let (id, put) = match event {
                SlotEvent::Put { id, key, after, .. } => (id, Some((key, after))),
                SlotEvent::Remove { id, .. } => (id, None),
            };
            for list in known.by_ref.values_mut() {
                list.retain(|s| &s.slot.id != id);
            }
            if let Some((key, after)) = put {
                if let Some(list) =
                    member_array::entity_reference(after).and_then(|r| known.by_ref.get_mut(r))
                {
                    let slot = Slot {
                        id: id.clone(),
                        key: key.clone(),
                        element: after.clone(),
                    };
                    let at = list.partition_point(|s| s.slot.key < slot.key);
                    list.insert(
                        at,
                        RefSlot {
                            slot,
                            position: None,
                        },
                    );
                }
            }
        }
    }
}

impl GroupService {
    /// The plan of `ops` against the Group's stored slots; a patch that does
    /// not apply is refused as the legacy server refuses it.
    pub(super) async fn plan_member_ops(
        &self,
        group_key: &str,
        members: &MemberOps,
        planning: &mut Planning,
    ) -> Result<Plan, GroupError> {
        for _ in 0..max_rounds(members.ops.len()) {
            let planned = member_array::plan(
                &members.ops,
                &planning.known,
                &mut new_slot_id,
                self.settings.remove_by_reference,
            );
            match planned {
                Ok(Planned::Done(plan)) => return Ok(plan),
                Ok(Planned::Need(need)) => {
                    self.fetch(group_key, &need, &mut planning.known).await?
                }
                Err(error) => {
                    return Err(GroupError::Outcome(patch_failure(
                        &error,
                        &members.indexes,
                        self.settings.patch_failure_status,
                    )))
                }
            }
        }
        Err(GroupError::Outcome(Outcome::error(
            500,
            IssueType::Exception,
            "the member store's answers did not settle the patch; nothing was changed",
        )))
    }

    /// Adds the facts `need` names to `known`.
    async fn fetch(
        &self,
        group_key: &str,
        need: &Need,
        known: &mut Known,
    ) -> Result<(), GroupError> {
        if need.len || need.floor {
            let facts = self.events.array_facts(group_key).await?;
            let fresh = Planning::from_facts(&facts).known;
            known.len = fresh.len;
            known.absent = fresh.absent;
            known.floor = fresh.floor;
        }
        if need.all {
            known.all = Some(self.events.all_slots(group_key).await?);
            return Ok(());
        }
        let references: Vec<&str> = need
            .refs
            .iter()
            .chain(&need.ref_positions)
            .map(String::as_str)
            .collect();
        let mut found = if references.is_empty() {
            HashMap::new()
        } else {
            self.events
                .slots_by_match_key(group_key, &references)
                .await?
        };
        let ranked_ids: Vec<String> = need
            .ref_positions
            .iter()
            .filter_map(|r| found.get(r))
            .flatten()
            .map(|s| s.id.clone())
            .collect();
        let positions: Vec<usize> = need.positions.iter().copied().collect();
        let mut ranks = HashMap::new();
        if !positions.is_empty() || !ranked_ids.is_empty() {
            let ids: Vec<&str> = ranked_ids.iter().map(String::as_str).collect();
            let (at, of_ids) = self.events.slots_at(group_key, &positions, &ids).await?;
            known.at.extend(at);
            ranks = of_ids;
        }
        for reference in references {
            let slots = found.remove(reference).unwrap_or_default();
            let with_positions = need.ref_positions.contains(reference);
            let list = slots
                .into_iter()
                .map(|slot| RefSlot {
                    position: with_positions
                        .then(|| ranks.get(&slot.id).copied())
                        .flatten(),
                    slot,
                })
                .collect();
            known.by_ref.insert(reference.to_string(), list);
        }
        Ok(())
    }
}

impl GroupService {
    /// The plan of a write that goes alone (positional ops, a roster
    /// replacement, ATR) against the stored slots, from the facts read for
    /// its attempt; `planning` holds what the patch planner fetched.
    pub(super) async fn plan_edit(
        &self,
        group_key: &str,
        facts: &ArrayFacts,
        planning: &mut Planning,
        authority: Option<&str>,
        edit: &MemberEdit,
    ) -> Result<Plan, GroupError> {
        let mut plan = match edit {
            MemberEdit::Patch(members) => {
                self.plan_member_ops(group_key, members, planning).await?
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
                    .map_err(|e| GroupError::Outcome(roster_failure(&e)))?
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
                .map_err(GroupError::Outcome)?
            }
        };
        plan_stored_as_legacy(&mut plan, authority);
        Ok(plan)
    }

    /// Plans one value-only patch of a batch from the facts the batch holds;
    /// it never fetches, since the store does not know the earlier patches.
    pub(super) fn plan_in_batch(
        &self,
        members: &MemberOps,
        planning: &Planning,
        authority: Option<&str>,
    ) -> Result<Plan, GroupError> {
        let mut plan = match member_array::plan(
            &members.ops,
            &planning.known,
            &mut new_slot_id,
            self.settings.remove_by_reference,
        ) {
            Ok(Planned::Done(plan)) => plan,
            Ok(Planned::Need(need)) => return Err(GroupError::Outcome(Outcome::error(
                500,
                IssueType::Exception,
                format!("internal error: a batched member patch needs facts the batch did not fetch ({need:?}); nothing was changed"),
            ))),
            Err(error) => {
                return Err(GroupError::Outcome(patch_failure(
                    &error,
                    &members.indexes,
                    self.settings.patch_failure_status,
                )))
            }
        };
        plan_stored_as_legacy(&mut plan, authority);
        Ok(plan)
    }

    /// Adds the slots of every reference in `references` to `planning`, so
    /// value-only patches plan without fetching.
    pub(super) async fn prefetch_references(
        &self,
        group_key: &str,
        references: &[&str],
        planning: &mut Planning,
    ) -> Result<(), GroupError> {
        let found = self
            .events
            .slots_by_match_key(group_key, references)
            .await?;
        for (reference, slots) in found {
            let slots = slots
                .into_iter()
                .map(|slot| RefSlot {
                    slot,
                    position: None,
                })
                .collect();
            planning.known.by_ref.insert(reference, slots);
        }
        Ok(())
    }

    /// The member store's facts of a Group; for a Group it does not manage
    /// yet (`managed` false: its first member write), whether the `member`
    /// key exists comes from the document, where the legacy server kept it.
    pub(super) async fn array_facts(
        &self,
        id: &str,
        group_key: &str,
        managed: bool,
    ) -> Result<ArrayFacts, GroupError> {
        let mut facts = self.events.array_facts(group_key).await?;
        // Before its first member write (or after a delete and re-create)
        // the member store's marker is not this Group's.
        if !managed {
            facts.absent = facts.counts.members == 0 && !self.documents.has_member_key(id).await?;
        }
        Ok(facts)
    }
}

/// A roster the planner cannot store (its order keys ran out): refused,
/// nothing written.
fn roster_failure(error: &member_array::PatchError) -> Outcome {
    Outcome::error(
        500,
        IssueType::Exception,
        format!("the member store cannot store this roster, nothing was changed: {error}"),
    )
}

/// A member element as the legacy server would store it. Servers of the
/// reference server's kind (their Groups carry `_sourceAssigningAuthority`)
/// keep `_uuid`/`_sourceId`/`_sourceAssigningAuthority` on every reference
/// and drop the extensions their responses show instead; the proxy stores
/// what they would, so a Group reads the same through the proxy and direct,
/// and can be moved back. Other servers' members are stored as sent.
pub(super) fn stored_as_legacy(element: &mut Value, authority: Option<&str>) {
    if let Some(authority) = authority {
        icanbwell_conventions::presave_references(element, authority);
    }
}

/// [`stored_as_legacy`] for every element a plan writes.
pub(super) fn plan_stored_as_legacy(plan: &mut Plan, authority: Option<&str>) {
    if authority.is_none() {
        return;
    }
    for event in &mut plan.events {
        if let SlotEvent::Put { after, .. } = event {
            stored_as_legacy(after, authority);
        }
    }
}

/// Who writes a version's events.
pub(super) struct EventOrigin<'a> {
    pub group_key: &'a str,
    pub group_id: &'a str,
    pub token: &'a str,
    pub request_id: &'a str,
}

/// The rows of one version: one per slot event, and the array marker when
/// the `member` key appears or goes away (`was_absent` before the plan).
pub(super) fn event_rows(
    origin: &EventOrigin<'_>,
    version: u64,
    plan: &Plan,
    was_absent: bool,
) -> Vec<MemberEventRow> {
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    let row =
        |index: usize, event_type, slot_id: &str, key: &str, element: &Value| MemberEventRow {
            group_key: origin.group_key.to_string(),
            group_id: origin.group_id.to_string(),
            group_version: version,
            token: origin.token.to_string(),
            request_id: origin.request_id.to_string(),
            op_index: index as u32,
            sequence: event_sequence(version, index),
            slot_id: slot_id.to_string(),
            order_key: key.to_string(),
            match_key: member_array::match_key(element),
            event_type,
            element: element.to_string(),
            inactive: u8::from(!member_array::is_active(element)),
            member_delta: 0,
            active_delta: 0,
            event_time_ms: now_ms,
        };
    let mut rows = Vec::with_capacity(plan.events.len() + 1);
    if was_absent == plan.present {
        let marker = if plan.present {
            EventType::Added
        } else {
            EventType::Removed
        };
        let mut marker = row(0, marker, "", "", &Value::Null);
        marker.element = String::new();
        rows.push(marker);
    }
    for event in &plan.events {
        let index = rows.len();
        let mut written = match event {
            SlotEvent::Put { id, key, after, .. } => row(index, EventType::Added, id, key, after),
            SlotEvent::Remove { id, key, before } => {
                row(index, EventType::Removed, id, key, before)
            }
        };
        let (member, active) = deltas(event);
        written.member_delta = member;
        written.active_delta = active;
        rows.push(written);
    }
    rows
}

/// Change of the member and active-member counts by one event.
fn deltas(event: &SlotEvent) -> (i8, i8) {
    let (before, after) = match event {
        SlotEvent::Put { before, after, .. } => (before.as_ref(), Some(after)),
        SlotEvent::Remove { before, .. } => (Some(before), None),
    };
    let active = |e: Option<&Value>| i8::from(e.is_some_and(member_array::is_active));
    (
        i8::from(after.is_some()) - i8::from(before.is_some()),
        active(after) - active(before),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn origin() -> EventOrigin<'static> {
        EventOrigin {
            group_key: "k",
            group_id: "g",
            token: "t",
            request_id: "r",
        }
    }

    #[test]
    fn a_plan_becomes_one_row_per_slot_event_with_count_deltas() {
        let plan = Plan {
            events: vec![
                SlotEvent::Put {
                    id: "s1".into(),
                    key: "a1".into(),
                    before: None,
                    after: json!({"entity": {"reference": "Patient/1"}, "inactive": true}),
                },
                SlotEvent::Remove {
                    id: "s0".into(),
                    key: "a0".into(),
                    before: json!({"entity": {"reference": "Patient/0"}}),
                },
            ],
            len: 1,
            present: true,
            floor: Some("a1".into()),
        };
        let rows = event_rows(&origin(), 7, &plan, false);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].member_delta, rows[0].active_delta, rows[0].inactive),
            (1, 0, 1)
        );
        assert_eq!(rows[0].match_key, "Patient/1");
        assert_eq!((rows[1].member_delta, rows[1].active_delta), (-1, -1));
        assert_eq!(rows[1].element, r#"{"entity":{"reference":"Patient/0"}}"#);
        assert!(rows[1].sequence > rows[0].sequence);
        assert_eq!(rows[0].sequence >> 20, 7);
    }

    #[test]
    fn the_member_key_appearing_or_going_is_recorded_by_a_marker_row() {
        let appeared = Plan {
            events: vec![],
            len: 0,
            present: true,
            floor: None,
        };
        let rows = event_rows(&origin(), 2, &appeared, true);
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].slot_id.as_str(), rows[0].event_type),
            ("", EventType::Added)
        );
        let gone = Plan {
            present: false,
            ..appeared.clone()
        };
        let rows = event_rows(&origin(), 2, &gone, false);
        assert_eq!(rows[0].event_type, EventType::Removed);
        assert!(event_rows(&origin(), 2, &appeared, false).is_empty());
    }

    #[test]
    fn a_batch_carries_length_floor_and_reference_lists_to_the_next_patch() {
        let mut planning = Planning::from_facts(&ArrayFacts {
            floor: "a3".into(),
            ..ArrayFacts::default()
        });
        planning.known.by_ref.insert("Patient/1".into(), vec![]);
        let plan = Plan {
            events: vec![SlotEvent::Put {
                id: "s9".into(),
                key: "a4".into(),
                before: None,
                after: json!({"entity": {"reference": "Patient/1"}}),
            }],
            len: 1,
            present: true,
            floor: Some("a4".into()),
        };
        planning.advance(&plan);
        assert_eq!(planning.known.len, Some(1));
        assert_eq!(planning.known.floor.as_deref(), Some("a4"));
        assert_eq!(planning.known.by_ref["Patient/1"][0].slot.id, "s9");
        planning.advance(&Plan {
            events: vec![SlotEvent::Remove {
                id: "s9".into(),
                key: "a4".into(),
                before: json!({}),
            }],
            len: 0,
            present: true,
            floor: None,
        });
        assert!(planning.known.by_ref["Patient/1"].is_empty());
        assert_eq!(planning.known.floor.as_deref(), Some("a4"));
    }
}
