//! JSON Patch on a Group, split into what the member store answers and what
//! the legacy server answers.
//!
//! The legacy server applies a patch to the whole document; the proxy keeps
//! `member` as slots ([`crate::fhir::member_array`]) and plans the member ops
//! against them with exactly RFC 6902's meaning. This module only sorts the
//! ops: it reads the body, checks the shape of each op as the legacy server's
//! JSON Patch library does (400 otherwise), and tells member ops (path, and
//! `from` if any, at `/member` or below) from the rest. An op that moves or
//! copies between `member` and the rest of the document ties the two halves
//! together; the proxy refuses it rather than guess an order of writes.

use serde_json::Value;

use crate::fhir::document_patch::OtherOps;
use crate::fhir::member_array::PatchError;
use crate::fhir::outcome::{IssueType, Outcome};

/// The member ops of a patch, in order, with their indexes in the patch.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberOps {
    pub ops: Vec<Value>,
    pub indexes: Vec<usize>,
}

impl MemberOps {
    /// Ops that name members by value or append: planned without any
    /// position lookup (`add /member/-` and the remove-by-reference
    /// extension), so patches of this kind can be planned one after
    /// another against what the previous ones left.
    pub fn is_value_only(&self) -> bool {
        self.ops.iter().all(|op| {
            let name = op.get("op").and_then(Value::as_str);
            let path = op.get("path").and_then(Value::as_str);
            path == Some("/member/-") && matches!(name, Some("add") | Some("remove"))
        })
    }

    /// The references the remove-by-reference ops name.
    pub fn removed_references(&self) -> Vec<&str> {
        self.ops
            .iter()
            .filter(|op| op.get("op").and_then(Value::as_str) == Some("remove"))
            .filter_map(|op| op.pointer("/value/entity/reference")?.as_str())
            .collect()
    }
}

/// What a JSON Patch body means to the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum PatchClass {
    /// No op touches `/member`: the upstream handles it as it is.
    NotMembers,
    /// An op on the root pointer `""` (or `from` it): it replaces or reads the
    /// whole Group, roster included.
    WholeDocument { op_index: usize },
    /// A `move`/`copy` between `member` and the rest of the document.
    CrossesMember { op_index: usize },
    /// Every op targets `/member`.
    Members(MemberOps),
    /// Both kinds; `other_ops` keep their order and content.
    Mixed {
        members: MemberOps,
        other_ops: OtherOps,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct PatchLimits {
    pub max_operations: usize,
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

    let mut members = MemberOps {
        ops: Vec::new(),
        indexes: Vec::new(),
    };
    let mut other_ops = OtherOps::default();
    let mut whole_document = None;
    let mut crossing = None;
    for (index, op) in ops.into_iter().enumerate() {
        let (name, path) = op_name_and_path(&op, index)?;
        let from = op.get("from").and_then(Value::as_str);
        if matches!(name, "move" | "copy") && from.is_none() {
            return Err(Outcome::error(
                400,
                IssueType::Structure,
                format!("operation {index} is malformed: '{name}' needs a string 'from'"),
            )
            .at(format!("/{index}")));
        }
        if path.is_empty() || from == Some("") {
            // Checked to the end first: a malformed op later still gets 400.
            whole_document.get_or_insert(index);
            continue;
        }
        let into_member = targets_member(path);
        match from.map(targets_member) {
            Some(from_member) if from_member != into_member => {
                crossing.get_or_insert(index);
            }
            _ if into_member => {
                members.ops.push(op);
                members.indexes.push(index);
            }
            _ => {
                other_ops.ops.push(op);
                other_ops.indexes.push(index);
            }
        }
    }
    if let Some(op_index) = whole_document {
        return Ok(PatchClass::WholeDocument { op_index });
    }
    if let Some(op_index) = crossing {
        return Ok(PatchClass::CrossesMember { op_index });
    }
    if members.ops.is_empty() {
        return Ok(PatchClass::NotMembers);
    }
    if other_ops.ops.is_empty() {
        Ok(PatchClass::Members(members))
    } else {
        Ok(PatchClass::Mixed { members, other_ops })
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

/// The answer to a member patch the planner refused. RFC failures (a
/// missing target, a failed `test`, an index out of range) get
/// `failure_status`, the status the legacy server gives them (servers
/// differ: 422 is FHIR's, the reference server answers 400); the op index
/// is the one in the client's patch.
pub fn patch_failure(error: &PatchError, indexes: &[usize], failure_status: u16) -> Outcome {
    let in_patch = error
        .op_index()
        .map(|op| indexes.get(op).copied().unwrap_or(op));
    let text = match (in_patch, error.op_index()) {
        (Some(original), Some(local)) if original != local => error.to_string().replacen(
            &format!("operation {local}"),
            &format!("operation {original}"),
            1,
        ),
        _ => error.to_string(),
    };
    let outcome = match error {
        PatchError::Malformed { .. } | PatchError::NotMember { .. } => {
            Outcome::error(400, IssueType::Structure, text)
        }
        PatchError::InconsistentFacts(_) | PatchError::OrderKey(_) => Outcome::error(
            500,
            IssueType::Exception,
            format!("the member store cannot plan this patch, nothing was changed: {text}"),
        ),
        _ => Outcome::error(
            failure_status,
            IssueType::of_patch_failure(failure_status),
            text,
        ),
    };
    match in_patch {
        Some(index) => outcome.at(format!("/{index}")),
        None => outcome,
    }
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

    #[test]
    fn member_ops_other_ops_and_mixed_patches_are_told_apart() {
        assert_eq!(
            parse(json!([{"op": "replace", "path": "/name", "value": "x"}])).unwrap(),
            PatchClass::NotMembers
        );
        let Ok(PatchClass::Members(members)) = parse(json!([
            {"op": "move", "from": "/member/1", "path": "/member/0"},
            {"op": "test", "path": "/member/0/entity/display", "value": "x"}
        ])) else {
            panic!("member ops")
        };
        assert_eq!(members.indexes, vec![0, 1]);
        let Ok(PatchClass::Mixed { members, other_ops }) = parse(json!([
            {"op": "replace", "path": "/name", "value": "x"},
            {"op": "remove", "path": "/member"}
        ])) else {
            panic!("mixed")
        };
        assert_eq!((members.indexes, other_ops.indexes), (vec![1], vec![0]));
    }

    #[test]
    fn root_pointers_and_moves_across_the_member_boundary_are_named() {
        assert_eq!(
            parse(json!([
                {"op": "add", "path": "/member/-", "value": {}},
                {"op": "copy", "from": "", "path": "/extension/0"}
            ]))
            .unwrap(),
            PatchClass::WholeDocument { op_index: 1 }
        );
        assert_eq!(
            parse(json!([{"op": "copy", "from": "/member/0", "path": "/contained/0"}])).unwrap(),
            PatchClass::CrossesMember { op_index: 0 }
        );
        assert_eq!(
            parse(json!([{"op": "move", "from": "/name", "path": "/member/0/entity/display"}]))
                .unwrap(),
            PatchClass::CrossesMember { op_index: 0 }
        );
    }

    #[test]
    fn malformed_ops_and_oversized_patches_get_400() {
        for bad in [
            json!({"op": "add"}),
            json!([{"op": "add", "path": "/member/-"}]),
            json!([{"op": "jump", "path": "/member/0"}]),
            json!([{"op": "move", "path": "/member/0"}]),
            json!([{"op": "remove", "path": "member/0"}]),
            json!(["remove"]),
        ] {
            assert_eq!(parse(bad.clone()).unwrap_err().status, 400, "{bad}");
        }
        let many: Vec<Value> = (0..101)
            .map(|_| json!({"op": "test", "path": "/member/0", "value": 1}))
            .collect();
        let e = parse(Value::Array(many)).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (400, IssueType::TooCostly));
    }

    #[test]
    fn value_only_patches_are_appends_and_removals_by_reference() {
        let members = |ops: Value| match parse(ops).unwrap() {
            PatchClass::Members(members) => members,
            other => panic!("{other:?}"),
        };
        let value_only = members(json!([
            {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/1"}}},
            {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}
        ]));
        assert!(value_only.is_value_only());
        assert_eq!(value_only.removed_references(), vec!["Patient/2"]);
        assert!(!members(json!([{"op": "remove", "path": "/member/0"}])).is_value_only());
    }

    #[test]
    fn refusals_name_the_op_index_of_the_clients_patch() {
        let error = PatchError::TestFailed {
            op: 0,
            pointer: "/member/3".into(),
        };
        let outcome = patch_failure(&error, &[4], 422);
        assert_eq!(outcome.status, 422);
        assert!(
            outcome.issues[0].diagnostics.contains("operation 4"),
            "{outcome:?}"
        );
        assert_eq!(patch_failure(&error, &[4], 400).status, 400);
        let malformed = PatchError::Malformed {
            op: 0,
            reason: "x".into(),
        };
        assert_eq!(patch_failure(&malformed, &[0], 422).status, 400);
    }
}
