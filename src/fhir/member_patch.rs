//! JSON Patch on `Group.member`, understood without the roster.
//!
//! The proxy stores members as events keyed by entity reference, not as an
//! array, so it accepts the patch forms that name the member they touch:
//!
//! | op                                   | meaning                                   |
//! |--------------------------------------|-------------------------------------------|
//! | `add` `/member/-` (or `/member/`)    | add (or update) the member in `value`     |
//! | `remove` `/member/-` + `value`       | remove the member named by `value` (the de-facto convention of the Mongo-backed reference server) |
//! | `test` `/member/N/entity/reference`  | member must be present; pins index N to it |
//! | `remove` `/member/N`                 | remove the member pinned at N             |
//! | `replace` `/member/N`                | replace the member pinned at N            |
//! | `add`/`replace`/`remove` `/member/N/inactive` or `/member/N/period` | change a pinned member |
//!
//! Positions are never looked up: a lookup by index would cost as much as the
//! group is large, and positions shift under concurrent writers anyway. A `test`
//! op pins a position to a named member for the rest of the patch, and pins
//! shift exactly as JSON Patch indexes shift when a pinned member is removed.
//!
//! Parsing is split from planning: [`parse_patch`] needs only the request body;
//! [`plan_changes`] needs the current state of the members the patch names.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::reference::{parse_reference, EntityReference};

/// A member as the events store it: what `Group.member` holds besides `entity`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemberAttributes {
    pub period_start: Option<String>,
    pub period_end: Option<String>,
    pub inactive: bool,
}

/// One intended change, in op order, with the op index it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberChange {
    pub op_index: usize,
    pub reference: EntityReference,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// Add the member, or overwrite its attributes when present.
    Put(MemberAttributes),
    /// Change attributes of a member that must be present.
    Update(AttributeUpdate),
    Remove,
    /// The member must be present.
    Test,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeUpdate {
    Inactive(bool),
    Period {
        start: Option<String>,
        end: Option<String>,
    },
}

/// What a JSON Patch body means to the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchClass {
    /// No op touches `/member`: the upstream handles it as it is.
    NotMembers,
    /// An op on the root pointer `""` (or `from` it): it replaces or reads the
    /// whole Group, roster included.
    WholeDocument { op_index: usize },
    /// Every op targets `/member`.
    Members(Vec<MemberChange>),
    /// Both kinds; `other_ops` keep their order and content.
    Mixed {
        member_changes: Vec<MemberChange>,
        other_ops: Vec<Value>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct PatchLimits {
    pub max_operations: usize,
}

/// The effect of a patch on the members it names, ready to be stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedEvent {
    pub op_index: usize,
    pub reference: EntityReference,
    pub added: bool,
    pub attributes: MemberAttributes,
    /// Change in the number of members (-1, 0, 1), for the counts view.
    pub member_delta: i8,
    /// Change in the number of active (not `inactive`) members.
    pub active_delta: i8,
}

fn deltas(before: &Option<MemberAttributes>, after: &Option<MemberAttributes>) -> (i8, i8) {
    let counted = |s: &Option<MemberAttributes>| i8::from(s.is_some());
    let active = |s: &Option<MemberAttributes>| i8::from(s.as_ref().is_some_and(|a| !a.inactive));
    (
        counted(after) - counted(before),
        active(after) - active(before),
    )
}

const MEMBER_ROOT: &str = "/member";

fn targets_member(path: &str) -> bool {
    path == MEMBER_ROOT || path.starts_with("/member/")
}

/// Reads a JSON Patch body and decides whether the proxy handles it.
/// Errors are returned as the OperationOutcome the client gets.
pub fn parse_patch(body: &[u8], limits: PatchLimits) -> Result<PatchClass, Outcome> {
    let document: Value = serde_json::from_slice(body).map_err(|e| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("the JSON Patch body is not valid JSON: {e}"),
        )
    })?;
    let Value::Array(ops) = document else {
        return Err(Outcome::error(
            400,
            IssueType::Structure,
            "a JSON Patch document must be a JSON array of operations",
        ));
    };
    if ops.len() > limits.max_operations {
        return Err(Outcome::error(
            400,
            IssueType::TooCostly,
            format!(
                "the patch has {} operations; at most {} are accepted in one request",
                ops.len(),
                limits.max_operations
            ),
        ));
    }

    let mut member_ops = Vec::new();
    let mut other_ops = Vec::new();
    for (index, op) in ops.into_iter().enumerate() {
        let (name, path) = op_name_and_path(&op, index)?;
        let from = op.get("from").and_then(Value::as_str);
        if path.is_empty() || from == Some("") {
            return Ok(PatchClass::WholeDocument { op_index: index });
        }
        let from_member = from.is_some_and(targets_member);
        if targets_member(path) || from_member {
            if matches!(name, "move" | "copy") {
                return Err(not_supported(
                    index,
                    format!("'{name}' is not supported on Group.member; use add and remove"),
                ));
            }
            member_ops.push((index, op));
        } else {
            other_ops.push(op);
        }
    }
    if member_ops.is_empty() {
        return Ok(PatchClass::NotMembers);
    }
    let member_changes = member_changes(member_ops)?;
    if other_ops.is_empty() {
        Ok(PatchClass::Members(member_changes))
    } else {
        Ok(PatchClass::Mixed {
            member_changes,
            other_ops,
        })
    }
}

fn op_name_and_path(op: &Value, index: usize) -> Result<(&str, &str), Outcome> {
    let malformed = |what: &str| {
        Outcome::error(
            400,
            IssueType::Structure,
            format!("operation {index} is malformed: {what}"),
        )
        .at(format!("/{index}"))
    };
    let object = op
        .as_object()
        .ok_or_else(|| malformed("not a JSON object"))?;
    let name = object
        .get("op")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("missing string 'op'"))?;
    if !matches!(
        name,
        "add" | "remove" | "replace" | "move" | "copy" | "test"
    ) {
        return Err(malformed(&format!("unknown op '{name}'")));
    }
    let path = object
        .get("path")
        .and_then(Value::as_str)
        .ok_or_else(|| malformed("missing string 'path'"))?;
    if !path.is_empty() && !path.starts_with('/') {
        return Err(malformed(&format!(
            "path '{path}' is not a JSON Pointer (must start with '/')"
        )));
    }
    if matches!(name, "add" | "replace" | "test") && !object.contains_key("value") {
        return Err(malformed(&format!("'{name}' needs a 'value'")));
    }
    Ok((name, path))
}

/// Where under `/member` an op points.
#[derive(Debug, PartialEq, Eq)]
enum MemberTarget<'a> {
    /// `/member/-` or `/member/`: the end of the array, or "by value".
    End,
    /// `/member/N` and whatever follows (`entity/reference`, `inactive`, ...).
    Position(usize, Vec<String>),
    /// `/member` itself, or something that is not a member position.
    Other(&'a str),
}

fn member_target(path: &str) -> MemberTarget<'_> {
    let Some(rest) = path.strip_prefix("/member/") else {
        return MemberTarget::Other(path);
    };
    if rest == "-" || rest.is_empty() {
        return MemberTarget::End;
    }
    let mut segments = rest.split('/').map(unescape_pointer_segment);
    let first = segments.next().unwrap_or_default();
    match parse_array_index(&first) {
        Some(position) => MemberTarget::Position(position, segments.collect()),
        None => MemberTarget::Other(path),
    }
}

/// RFC 6901: `~1` is `/`, then `~0` is `~`.
fn unescape_pointer_segment(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// RFC 6901 array index: digits, no leading zeros.
fn parse_array_index(segment: &str) -> Option<usize> {
    let valid = !segment.is_empty()
        && segment.bytes().all(|b| b.is_ascii_digit())
        && (segment == "0" || !segment.starts_with('0'));
    if valid {
        segment.parse().ok()
    } else {
        None
    }
}

fn not_supported(index: usize, why: String) -> Outcome {
    Outcome::error(
        422,
        IssueType::NotSupported,
        format!("operation {index}: {why}"),
    )
    .at(format!("/{index}"))
}

fn unprocessable(index: usize, code: IssueType, why: String) -> Outcome {
    Outcome::error(422, code, format!("operation {index}: {why}")).at(format!("/{index}"))
}

/// Positions named by `test` ops, kept in step with JSON Patch index shifts.
#[derive(Default)]
struct Pins(BTreeMap<usize, EntityReference>);

impl Pins {
    fn get(&self, position: usize, index: usize) -> Result<EntityReference, Outcome> {
        self.0.get(&position).cloned().ok_or_else(|| {
            unprocessable(
                index,
                IssueType::Processing,
                format!(
                    "/member/{position} is not named; put a test op on \
                     /member/{position}/entity/reference before it, because members are \
                     stored by reference and positions cannot be looked up"
                ),
            )
        })
    }

    /// Removing the element at `position` moves every later element down by one.
    fn remove_position(&mut self, position: usize) {
        self.0.remove(&position);
        let shifted: BTreeMap<usize, EntityReference> = std::mem::take(&mut self.0)
            .into_iter()
            .map(|(p, r)| if p > position { (p - 1, r) } else { (p, r) })
            .collect();
        self.0 = shifted;
    }

    /// A member removed by value: positions after it shift, but by how much is
    /// unknown unless it was pinned, so every pin is dropped then.
    fn remove_reference(&mut self, reference: &EntityReference) {
        match self
            .0
            .iter()
            .find(|(_, r)| *r == reference)
            .map(|(p, _)| *p)
        {
            Some(position) => self.remove_position(position),
            None => self.0.clear(),
        }
    }
}

fn member_changes(ops: Vec<(usize, Value)>) -> Result<Vec<MemberChange>, Outcome> {
    let mut pins = Pins::default();
    let mut changes = Vec::with_capacity(ops.len());
    for (index, op) in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op.get("path").and_then(Value::as_str).unwrap_or_default();
        let value = op.get("value");
        let change = |reference: EntityReference, kind: ChangeKind| MemberChange {
            op_index: index,
            reference,
            kind,
        };
        match (name, member_target(path)) {
            ("add", MemberTarget::End) => {
                let (reference, attributes) = member_value(value, index)?;
                changes.push(change(reference, ChangeKind::Put(attributes)));
            }
            ("remove", MemberTarget::End) => {
                let reference = match value {
                    Some(value) => member_value(Some(value), index)?.0,
                    None => {
                        return Err(unprocessable(
                            index,
                            IssueType::Required,
                            "remove at /member/- needs a 'value' whose entity.reference names \
                             the member to remove"
                                .into(),
                        ))
                    }
                };
                pins.remove_reference(&reference);
                changes.push(change(reference, ChangeKind::Remove));
            }
            ("test", MemberTarget::Position(position, rest)) if rest == ["entity", "reference"] => {
                let text = value.and_then(Value::as_str).ok_or_else(|| {
                    unprocessable(
                        index,
                        IssueType::Value,
                        "the value of a test on entity/reference must be a string".into(),
                    )
                })?;
                let reference = checked_reference(text, index)?;
                pins.0.insert(position, reference.clone());
                changes.push(change(reference, ChangeKind::Test));
            }
            ("remove", MemberTarget::Position(position, rest)) if rest.is_empty() => {
                let reference = pins.get(position, index)?;
                pins.remove_position(position);
                changes.push(change(reference, ChangeKind::Remove));
            }
            ("replace", MemberTarget::Position(position, rest)) if rest.is_empty() => {
                let old = pins.get(position, index)?;
                let (new, attributes) = member_value(value, index)?;
                if new != old {
                    changes.push(change(old, ChangeKind::Remove));
                }
                pins.0.insert(position, new.clone());
                changes.push(change(new, ChangeKind::Put(attributes)));
            }
            ("add" | "replace" | "remove", MemberTarget::Position(position, rest))
                if rest.len() == 1 && matches!(rest[0].as_str(), "inactive" | "period") =>
            {
                let reference = pins.get(position, index)?;
                let update = attribute_update(name, &rest[0], value, index)?;
                changes.push(change(reference, ChangeKind::Update(update)));
            }
            ("add", MemberTarget::Position(..)) => {
                return Err(not_supported(
                    index,
                    "inserting at a position is not supported; add at /member/- \
                     (members are kept in order of addition)"
                        .into(),
                ))
            }
            (_, MemberTarget::Other(MEMBER_ROOT)) => {
                return Err(not_supported(
                    index,
                    format!(
                        "'{name}' on the whole /member array is not supported; \
                         patch individual members, or PUT the Group"
                    ),
                ))
            }
            (_, target) => {
                return Err(not_supported(
                    index,
                    format!(
                        "'{name}' at '{path}' is not a supported member operation ({target:?})"
                    ),
                ))
            }
        }
    }
    Ok(changes)
}

fn checked_reference(text: &str, index: usize) -> Result<EntityReference, Outcome> {
    parse_reference(text).map_err(|why| {
        unprocessable(
            index,
            IssueType::Value,
            format!("entity.reference '{text}' is not valid: {why}"),
        )
    })
}

const MEMBER_KEYS: [&str; 3] = ["entity", "period", "inactive"];

/// Reads a `Group.member` value (entity.reference, period, inactive) outside
/// a patch, e.g. for the ATR operations; errors point at `/0`.
pub fn parse_member_value(value: &Value) -> Result<(EntityReference, MemberAttributes), Outcome> {
    member_value(Some(value), 0)
}

/// Reads a `Group.member` value: `entity.reference` required, `period` and
/// `inactive` optional. Anything else is refused rather than silently dropped.
fn member_value(
    value: Option<&Value>,
    index: usize,
) -> Result<(EntityReference, MemberAttributes), Outcome> {
    let object = value.and_then(Value::as_object).ok_or_else(|| {
        unprocessable(
            index,
            IssueType::Value,
            "the value must be a Group.member object with entity.reference".into(),
        )
    })?;
    if let Some(unknown) = object.keys().find(|k| !MEMBER_KEYS.contains(&k.as_str())) {
        return Err(not_supported(
            index,
            format!("member element '{unknown}' is not stored by the proxy (supported: entity, period, inactive)"),
        ));
    }
    let entity = object.get("entity").and_then(Value::as_object);
    let text = entity
        .and_then(|e| e.get("reference"))
        .and_then(Value::as_str)
        .ok_or_else(|| {
            unprocessable(
                index,
                IssueType::Required,
                "member.entity.reference is required".into(),
            )
        })?;
    if let Some(unknown) = entity
        .into_iter()
        .flat_map(Map::keys)
        .find(|k| !matches!(k.as_str(), "reference" | "type" | "display"))
    {
        return Err(not_supported(
            index,
            format!("member.entity.{unknown} is not stored by the proxy"),
        ));
    }
    let reference = checked_reference(text, index)?;
    let inactive = match object.get("inactive") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            return Err(unprocessable(
                index,
                IssueType::Value,
                "member.inactive must be a boolean".into(),
            ))
        }
    };
    let (period_start, period_end) = match object.get("period") {
        None => (None, None),
        Some(period) => period_bounds(period, index)?,
    };
    Ok((
        reference,
        MemberAttributes {
            period_start,
            period_end,
            inactive,
        },
    ))
}

fn period_bounds(
    period: &Value,
    index: usize,
) -> Result<(Option<String>, Option<String>), Outcome> {
    let bad = |why: &str| unprocessable(index, IssueType::Value, format!("member.period {why}"));
    let object = period.as_object().ok_or_else(|| bad("must be an object"))?;
    if let Some(unknown) = object
        .keys()
        .find(|k| !matches!(k.as_str(), "start" | "end"))
    {
        return Err(bad(&format!("has unknown element '{unknown}'")));
    }
    let bound = |key: &str| -> Result<Option<String>, Outcome> {
        match object.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if is_fhir_datetime(s) => Ok(Some(s.clone())),
            Some(other) => Err(bad(&format!("{key} '{other}' is not a FHIR dateTime"))),
        }
    };
    Ok((bound("start")?, bound("end")?))
}

/// FHIR dateTime: `YYYY`, `YYYY-MM`, `YYYY-MM-DD` or a full timestamp with zone.
fn is_fhir_datetime(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        range
            .clone()
            .all(|i| b.get(i).is_some_and(u8::is_ascii_digit))
    };
    match b.len() {
        4 => digits(0..4),
        7 => digits(0..4) && b[4] == b'-' && digits(5..7),
        10 => digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10),
        n if n > 10 => {
            digits(0..4)
                && b[4] == b'-'
                && digits(5..7)
                && b[7] == b'-'
                && digits(8..10)
                && b[10] == b'T'
                && chrono::DateTime::parse_from_rfc3339(s).is_ok()
        }
        _ => false,
    }
}

fn attribute_update(
    op: &str,
    field: &str,
    value: Option<&Value>,
    index: usize,
) -> Result<AttributeUpdate, Outcome> {
    match (field, op) {
        ("inactive", "remove") => Ok(AttributeUpdate::Inactive(false)),
        ("inactive", _) => match value {
            Some(Value::Bool(b)) => Ok(AttributeUpdate::Inactive(*b)),
            _ => Err(unprocessable(
                index,
                IssueType::Value,
                "member.inactive must be a boolean".into(),
            )),
        },
        (_, "remove") => Ok(AttributeUpdate::Period {
            start: None,
            end: None,
        }),
        (_, _) => {
            let (start, end) = period_bounds(value.unwrap_or(&Value::Null), index)?;
            Ok(AttributeUpdate::Period { start, end })
        }
    }
}

/// Applies `changes` to the current state of the members they name
/// (`current[reference]` is `Some` when that member is present) and returns the
/// events to store, in op order. Nothing is returned unless every op applies.
pub fn plan_changes(
    group_label: &str,
    changes: &[MemberChange],
    current: &HashMap<EntityReference, MemberAttributes>,
) -> Result<Vec<PlannedEvent>, Outcome> {
    let mut state: HashMap<&EntityReference, Option<MemberAttributes>> = HashMap::new();
    let mut events = Vec::with_capacity(changes.len());
    for change in changes {
        let present = state
            .entry(&change.reference)
            .or_insert_with(|| current.get(&change.reference).cloned());
        let missing = || {
            unprocessable(
                change.op_index,
                IssueType::Processing,
                format!(
                    "{} is not a member of {group_label}",
                    change.reference.as_str()
                ),
            )
        };
        match &change.kind {
            ChangeKind::Test => {
                if present.is_none() {
                    return Err(Outcome::error(
                        422,
                        IssueType::Processing,
                        format!(
                            "operation {}: test failed: {} is not a member of {group_label}",
                            change.op_index,
                            change.reference.as_str()
                        ),
                    )
                    .at(format!("/{}", change.op_index)));
                }
            }
            ChangeKind::Put(attributes) => {
                let after = Some(attributes.clone());
                let (member_delta, active_delta) = deltas(present, &after);
                *present = after;
                events.push(PlannedEvent {
                    op_index: change.op_index,
                    reference: change.reference.clone(),
                    added: true,
                    attributes: attributes.clone(),
                    member_delta,
                    active_delta,
                });
            }
            ChangeKind::Update(update) => {
                let mut attributes = present.clone().ok_or_else(missing)?;
                match update {
                    AttributeUpdate::Inactive(inactive) => attributes.inactive = *inactive,
                    AttributeUpdate::Period { start, end } => {
                        attributes.period_start = start.clone();
                        attributes.period_end = end.clone();
                    }
                }
                let after = Some(attributes.clone());
                let (member_delta, active_delta) = deltas(present, &after);
                *present = after;
                events.push(PlannedEvent {
                    op_index: change.op_index,
                    reference: change.reference.clone(),
                    added: true,
                    attributes,
                    member_delta,
                    active_delta,
                });
            }
            ChangeKind::Remove => {
                if present.is_none() {
                    return Err(missing());
                }
                let (member_delta, active_delta) = deltas(present, &None);
                *present = None;
                events.push(PlannedEvent {
                    op_index: change.op_index,
                    reference: change.reference.clone(),
                    added: false,
                    attributes: MemberAttributes::default(),
                    member_delta,
                    active_delta,
                });
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const LIMITS: PatchLimits = PatchLimits {
        max_operations: 100,
    };

    fn parse(ops: Value) -> Result<PatchClass, Outcome> {
        parse_patch(&serde_json::to_vec(&ops).unwrap(), LIMITS)
    }

    fn members(ops: Value) -> Vec<MemberChange> {
        match parse(ops) {
            Ok(PatchClass::Members(changes)) => changes,
            other => panic!("expected member changes, got {other:?}"),
        }
    }

    fn r(s: &str) -> EntityReference {
        parse_reference(s).unwrap()
    }

    fn add(reference: &str) -> Value {
        json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}})
    }

    #[test]
    fn classifies_member_other_and_mixed_patches() {
        assert_eq!(
            parse(json!([{"op": "replace", "path": "/name", "value": "x"}])).unwrap(),
            PatchClass::NotMembers
        );
        assert!(
            matches!(parse(json!([add("Patient/1")])).unwrap(), PatchClass::Members(c) if c.len() == 1)
        );
        let mixed =
            parse(json!([{"op": "replace", "path": "/name", "value": "x"}, add("Patient/1")]))
                .unwrap();
        match mixed {
            PatchClass::Mixed {
                member_changes,
                other_ops,
            } => {
                assert_eq!(member_changes[0].op_index, 1);
                assert_eq!(
                    other_ops,
                    vec![json!({"op": "replace", "path": "/name", "value": "x"})]
                );
            }
            other => panic!("{other:?}"),
        }
        // `/memberX` is not the member array.
        assert_eq!(
            parse(json!([{"op": "add", "path": "/memberX", "value": 1}])).unwrap(),
            PatchClass::NotMembers
        );
    }

    #[test]
    fn ops_on_the_root_pointer_touch_the_whole_group() {
        let whole = json!({"resourceType": "Group", "member": []});
        for ops in [
            json!([{"op": "replace", "path": "", "value": whole}]),
            json!([add("Patient/1"), {"op": "add", "path": "", "value": whole}]),
            json!([{"op": "copy", "from": "", "path": "/contained/0"}]),
        ] {
            assert!(
                matches!(
                    parse(ops.clone()).unwrap(),
                    PatchClass::WholeDocument { .. }
                ),
                "{ops}"
            );
        }
    }

    #[test]
    fn malformed_bodies_are_400_with_the_reason() {
        let e = parse_patch(b"{not json", LIMITS).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::Invalid));
        let e = parse(json!({"op": "add"})).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::Structure));
        let e = parse(json!([{"op": "add", "path": "/member/-"}])).unwrap_err();
        assert!(e.issues[0].diagnostics.contains("needs a 'value'"), "{e:?}");
        let e = parse(json!([{"op": "frobnicate", "path": "/member/-"}])).unwrap_err();
        assert!(e.issues[0].diagnostics.contains("unknown op"), "{e:?}");
        let e = parse(json!([{"op": "remove", "path": "member/0"}])).unwrap_err();
        assert_eq!(e.status, 400);
    }

    #[test]
    fn too_many_operations_is_too_costly() {
        let ops: Vec<Value> = (0..101).map(|i| add(&format!("Patient/{i}"))).collect();
        let e = parse(Value::Array(ops)).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::TooCostly));
    }

    #[test]
    fn add_reads_period_and_inactive() {
        let changes = members(json!([
            {"op": "add", "path": "/member/", "value": {"entity": {"reference": "Patient/1"},
             "period": {"start": "2024-01-01", "end": "2024-12-31T23:59:59Z"}, "inactive": true}}
        ]));
        assert_eq!(
            changes[0].kind,
            ChangeKind::Put(MemberAttributes {
                period_start: Some("2024-01-01".into()),
                period_end: Some("2024-12-31T23:59:59Z".into()),
                inactive: true
            })
        );
    }

    #[test]
    fn member_values_are_checked_and_nothing_is_silently_dropped() {
        let cases = [
            (json!({"entity": {}}), IssueType::Required),
            (
                json!({"entity": {"reference": "not a reference"}}),
                IssueType::Value,
            ),
            (
                json!({"entity": {"reference": "Patient/1"}, "inactive": "yes"}),
                IssueType::Value,
            ),
            (
                json!({"entity": {"reference": "Patient/1"}, "period": {"start": "yesterday"}}),
                IssueType::Value,
            ),
            (
                json!({"entity": {"reference": "Patient/1"}, "extension": []}),
                IssueType::NotSupported,
            ),
            (json!("Patient/1"), IssueType::Value),
        ];
        for (value, code) in cases {
            let e = parse(json!([{"op": "add", "path": "/member/-", "value": value}])).unwrap_err();
            assert_eq!((e.status, e.issues[0].code), (422, code), "{value}: {e:?}");
            assert_eq!(e.issues[0].expression, vec!["/0"]);
        }
    }

    #[test]
    fn positional_ops_need_a_pinning_test() {
        let e = parse(json!([{"op": "remove", "path": "/member/3"}])).unwrap_err();
        assert_eq!(e.status, 422);
        assert!(
            e.issues[0]
                .diagnostics
                .contains("test op on /member/3/entity/reference"),
            "{e:?}"
        );

        let changes = members(json!([
            {"op": "test", "path": "/member/3/entity/reference", "value": "Patient/a"},
            {"op": "remove", "path": "/member/3"}
        ]));
        assert_eq!(changes[1].reference, r("Patient/a"));
        assert_eq!(changes[1].kind, ChangeKind::Remove);
    }

    #[test]
    fn pins_shift_like_json_patch_indexes() {
        let changes = members(json!([
            {"op": "test", "path": "/member/1/entity/reference", "value": "Patient/b"},
            {"op": "test", "path": "/member/2/entity/reference", "value": "Patient/c"},
            {"op": "remove", "path": "/member/1"},
            // Patient/c moved from 2 to 1.
            {"op": "remove", "path": "/member/1"}
        ]));
        assert_eq!(changes[3].reference, r("Patient/c"));

        // After a remove by value of an unpinned member, positions are unknown.
        let e = parse(json!([
            {"op": "test", "path": "/member/5/entity/reference", "value": "Patient/x"},
            {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/y"}}},
            {"op": "remove", "path": "/member/5"}
        ]))
        .unwrap_err();
        assert_eq!(e.issues[0].expression, vec!["/2"]);
    }

    #[test]
    fn replace_and_attribute_changes_of_pinned_members() {
        let changes = members(json!([
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/a"},
            {"op": "replace", "path": "/member/0/inactive", "value": true},
            {"op": "replace", "path": "/member/0", "value": {"entity": {"reference": "Patient/b"}}},
            {"op": "add", "path": "/member/0/period", "value": {"start": "2025"}}
        ]));
        assert_eq!(
            changes[1].kind,
            ChangeKind::Update(AttributeUpdate::Inactive(true))
        );
        assert_eq!(
            (changes[2].reference.as_str(), &changes[2].kind),
            ("Patient/a", &ChangeKind::Remove)
        );
        assert_eq!(changes[3].reference, r("Patient/b"));
        assert_eq!(
            changes[4].kind,
            ChangeKind::Update(AttributeUpdate::Period {
                start: Some("2025".into()),
                end: None
            })
        );
    }

    #[test]
    fn unsupported_member_forms_are_422_not_supported() {
        for op in [
            json!({"op": "replace", "path": "/member", "value": []}),
            json!({"op": "add", "path": "/member/0", "value": {"entity": {"reference": "Patient/1"}}}),
            json!({"op": "move", "from": "/member/0", "path": "/member/1"}),
            json!({"op": "copy", "from": "/member/0", "path": "/contained/0"}),
            json!({"op": "test", "path": "/member/0/period", "value": {}}),
            json!({"op": "remove", "path": "/member/01"}),
        ] {
            let e = parse(json!([op])).unwrap_err();
            assert_eq!(
                (e.status, e.issues[0].code),
                (422, IssueType::NotSupported),
                "{op}: {e:?}"
            );
        }
    }

    #[test]
    fn pointer_segments_are_unescaped() {
        assert_eq!(
            member_target("/member/0/entity~1x/~0y"),
            MemberTarget::Position(0, vec!["entity/x".into(), "~y".into()])
        );
    }

    #[test]
    fn planning_applies_ops_in_order_against_current_state() {
        let current = HashMap::from([(r("Patient/old"), MemberAttributes::default())]);
        let changes = members(json!([
            add("Patient/new"),
            {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/new"}}},
            add("Patient/new"),
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/old"},
            {"op": "remove", "path": "/member/0"}
        ]));
        let events = plan_changes("Group/g", &changes, &current).unwrap();
        let summary: Vec<(usize, &str, bool)> = events
            .iter()
            .map(|e| (e.op_index, e.reference.as_str(), e.added))
            .collect();
        assert_eq!(
            summary,
            vec![
                (0, "Patient/new", true),
                (1, "Patient/new", false),
                (2, "Patient/new", true),
                (4, "Patient/old", false)
            ]
        );
    }

    #[test]
    fn planning_fails_whole_patch_on_missing_member_or_failed_test() {
        let current = HashMap::new();
        let changes = members(json!([
            add("Patient/1"),
            {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}
        ]));
        let e = plan_changes("Group/g", &changes, &current).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (422, IssueType::Processing));
        assert!(
            e.issues[0]
                .diagnostics
                .contains("Patient/2 is not a member of Group/g"),
            "{e:?}"
        );

        let changes = members(json!([
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/9"}
        ]));
        let e = plan_changes("Group/g", &changes, &current).unwrap_err();
        assert!(e.issues[0].diagnostics.contains("test failed"), "{e:?}");
    }

    #[test]
    fn deltas_track_member_and_active_counts() {
        let current = HashMap::from([(r("Patient/old"), MemberAttributes::default())]);
        let changes = members(json!([
            add("Patient/old"),
            {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/new"}, "inactive": true}},
            {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/old"}}}
        ]));
        let events = plan_changes("Group/g", &changes, &current).unwrap();
        let deltas: Vec<(i8, i8)> = events
            .iter()
            .map(|e| (e.member_delta, e.active_delta))
            .collect();
        assert_eq!(deltas, vec![(0, 0), (1, 0), (-1, -1)]);
    }

    #[test]
    fn attribute_updates_keep_other_attributes() {
        let current = HashMap::from([(
            r("Patient/1"),
            MemberAttributes {
                period_start: Some("2020".into()),
                period_end: None,
                inactive: false,
            },
        )]);
        let changes = members(json!([
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/1"},
            {"op": "replace", "path": "/member/0/inactive", "value": true}
        ]));
        let events = plan_changes("Group/g", &changes, &current).unwrap();
        assert_eq!(
            events[0].attributes,
            MemberAttributes {
                period_start: Some("2020".into()),
                period_end: None,
                inactive: true
            }
        );
    }
}
