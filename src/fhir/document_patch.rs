//! The non-member half of a mixed patch, applied by the proxy itself.
//!
//! A legacy server that ignores `If-Match` on PATCH (the real icanbwell
//! server does) cannot be trusted to apply that half on the version the
//! member half was planned against. So the proxy applies those ops to the
//! stored Group, as the legacy server would apply them, and sends the result
//! as a `PUT` with `If-Match`, which that server does guard: exactly one
//! version results, or nothing changes.
//!
//! "As the legacy server would apply them": the reference server patches the
//! stored document without its top-level `_` fields but with the
//! `_uuid`/`_sourceId`/`_sourceAssigningAuthority` it keeps on references
//! (seen in the trees its failed patches print, 2026-12-02), so a `test` of a
//! whole reference object sees them too. A PUT recomputes those reference
//! fields, whatever the body says, so the patched Group is sent as it is.

use json_patch::{Patch, PatchErrorKind};
use serde_json::Value;

use super::outcome::{IssueType, Outcome};

/// The ops of a patch that do not target `/member`, in their order, with
/// their indexes in the client's patch (for the error a client reads).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OtherOps {
    pub ops: Vec<Value>,
    pub indexes: Vec<usize>,
}

/// Applies `other` to `document` (the stored Group as its patches see it).
/// `Ok(None)`: the ops change nothing (only `test`s, or values already
/// there), so the legacy server need not be written at all. RFC failures get
/// `failure_status`, the status the legacy server gives them, and name the
/// op by its index in the client's patch.
pub fn apply_other_ops(
    document: &Value,
    other: &OtherOps,
    failure_status: u16,
) -> Result<Option<Value>, Outcome> {
    let original_index = |local: usize| other.indexes.get(local).copied().unwrap_or(local);
    let patch: Patch = match serde_json::from_value(Value::Array(other.ops.clone())) {
        Ok(patch) => patch,
        Err(e) => {
            return Err(Outcome::error(
                400,
                IssueType::Structure,
                format!("the patch is not a JSON Patch (RFC 6902): {e}"),
            ))
        }
    };
    let mut patched = document.clone();
    if let Err(error) = json_patch::patch(&mut patched, &patch) {
        let index = original_index(error.operation);
        let what = match error.kind {
            PatchErrorKind::TestFailed => "test failed".to_string(),
            kind => kind.to_string(),
        };
        return Err(Outcome::error(
            failure_status,
            IssueType::of_patch_failure(failure_status),
            format!(
                "operation {index}: {what} at '{}'; nothing was changed",
                error.path
            ),
        )
        .at(format!("/{index}")));
    }
    Ok((patched != *document).then_some(patched))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn other(ops: Value, indexes: Vec<usize>) -> OtherOps {
        OtherOps {
            ops: ops.as_array().cloned().unwrap_or_default(),
            indexes,
        }
    }

    #[test]
    fn the_ops_are_applied_to_a_copy_of_the_document() {
        let group = json!({"resourceType": "Group", "name": "a"});
        let ops = other(
            json!([{"op": "replace", "path": "/name", "value": "b"}]),
            vec![1],
        );
        let patched = apply_other_ops(&group, &ops, 400).unwrap();
        assert_eq!(patched, Some(json!({"resourceType": "Group", "name": "b"})));
        assert_eq!(group["name"], "a");
    }

    #[test]
    fn ops_that_change_nothing_ask_for_no_write() {
        let group = json!({"resourceType": "Group", "name": "a"});
        let ops = other(
            json!([
                {"op": "test", "path": "/name", "value": "a"},
                {"op": "replace", "path": "/name", "value": "a"}
            ]),
            vec![0, 2],
        );
        assert_eq!(apply_other_ops(&group, &ops, 400).unwrap(), None);
    }

    #[test]
    fn a_failing_op_is_named_by_its_index_in_the_clients_patch_with_the_legacy_status() {
        let group = json!({"resourceType": "Group", "name": "a"});
        let ops = other(
            json!([
                {"op": "replace", "path": "/name", "value": "b"},
                {"op": "test", "path": "/name", "value": "a"}
            ]),
            vec![0, 3],
        );
        let outcome = apply_other_ops(&group, &ops, 422).unwrap_err();
        assert_eq!(outcome.status, 422);
        let issue = &outcome.issues[0];
        assert_eq!(issue.expression, vec!["/3".to_string()]);
        assert!(issue
            .diagnostics
            .contains("operation 3: test failed at '/name'"));
    }

    #[test]
    fn removing_an_absent_field_fails_as_the_rfc_says() {
        let group = json!({"resourceType": "Group"});
        let ops = other(json!([{"op": "remove", "path": "/name"}]), vec![0]);
        assert_eq!(apply_other_ops(&group, &ops, 400).unwrap_err().status, 400);
    }

    #[test]
    fn an_unknown_op_is_refused_as_malformed() {
        let group = json!({"resourceType": "Group"});
        let ops = other(json!([{"op": "frobnicate", "path": "/name"}]), vec![0]);
        assert_eq!(apply_other_ops(&group, &ops, 422).unwrap_err().status, 400);
    }
}
