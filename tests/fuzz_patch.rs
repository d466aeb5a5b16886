//! Property tests (fuzzing) of the pure request parsers: whatever arrives, they
//! answer with a 4xx OperationOutcome or a result, never a panic; valid input
//! is classified as such; the depth guard agrees with the JSON parser.

use fhir_group_proxy::fhir::group_resource::parse_group_body;
use fhir_group_proxy::fhir::json_limits::nests_deeper_than;
use fhir_group_proxy::fhir::member_patch::{parse_patch, plan_changes, PatchClass, PatchLimits};
use fhir_group_proxy::fhir::outcome::Outcome;
use fhir_group_proxy::fhir::reference::parse_reference;
use proptest::prelude::*;
use serde_json::{json, Value};

const LIMITS: PatchLimits = PatchLimits { max_operations: 50 };

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        "[ -~]{0,12}".prop_map(Value::String),
        // Strings shaped like what the parser looks for.
        prop_oneof![
            Just("/member/-"),
            Just("/member/0"),
            Just("/member/01"),
            Just("/member/0/inactive"),
            Just("/member/1/entity/reference"),
            Just("add"),
            Just("remove"),
            Just("test"),
            Just("replace"),
            Just("move"),
            Just("Patient/1"),
            Just("Patient/1|src"),
            Just("{\"$gt\":\"\"}"),
            Just("x'); DROP TABLE t; --"),
            Just("/member/~1x"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("op".to_string()),
                    Just("path".to_string()),
                    Just("value".to_string()),
                    Just("from".to_string()),
                    Just("entity".to_string()),
                    Just("reference".to_string()),
                    Just("inactive".to_string()),
                    Just("period".to_string()),
                    "[a-z]{1,6}",
                ],
                inner,
                0..5
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn assert_client_error(outcome: &Outcome) {
    assert!(
        matches!(outcome.status, 400 | 413 | 415 | 422),
        "status {} for {outcome:?}",
        outcome.status
    );
    assert!(
        !outcome.first_diagnostics().is_empty(),
        "errors name what was wrong"
    );
}

fn valid_reference() -> impl Strategy<Value = String> {
    (
        "[A-Z][a-z]{0,8}",
        "[A-Za-z0-9.-]{1,20}",
        prop::option::of("[A-Za-z0-9_.-]{1,10}"),
    )
        .prop_map(|(t, id, source)| match source {
            Some(s) => format!("{t}/{id}|{s}"),
            None => format!("{t}/{id}"),
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_get_an_answer(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(outcome) = parse_patch(&bytes, LIMITS) {
            assert_client_error(&outcome);
        }
        if let Err(outcome) = parse_group_body(&bytes, Some("g")) {
            assert_client_error(&outcome);
        }
    }

    #[test]
    fn any_json_gets_an_answer(value in any_json()) {
        let body = serde_json::to_vec(&value).unwrap();
        match parse_patch(&body, LIMITS) {
            Err(outcome) => assert_client_error(&outcome),
            Ok(PatchClass::Members(changes)) | Ok(PatchClass::Mixed { member_changes: changes, .. }) => {
                // Planning against an empty roster answers too, and never
                // produces more events than there are changes.
                match plan_changes("Group/g", &changes, &Default::default()) {
                    Ok(events) => prop_assert!(events.len() <= changes.len()),
                    Err(outcome) => assert_client_error(&outcome),
                }
            }
            Ok(PatchClass::NotMembers) | Ok(PatchClass::WholeDocument { .. }) => {}
        }
        let group = json!({"resourceType": "Group", "id": "g", "member": value});
        if let Err(outcome) = parse_group_body(&serde_json::to_vec(&group).unwrap(), Some("g")) {
            assert_client_error(&outcome);
        }
    }

    #[test]
    fn valid_member_adds_are_understood(references in prop::collection::vec(valid_reference(), 1..30)) {
        let ops: Vec<Value> = references
            .iter()
            .map(|r| json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": r}}}))
            .collect();
        let body = serde_json::to_vec(&ops).unwrap();
        let PatchClass::Members(changes) = parse_patch(&body, LIMITS).unwrap() else {
            panic!("member adds are member changes");
        };
        prop_assert_eq!(changes.len(), references.len());
        let events = plan_changes("Group/g", &changes, &Default::default()).unwrap();
        prop_assert_eq!(events.len(), references.len());
    }

    #[test]
    fn references_accept_the_fhir_form_and_refuse_the_rest(text in "[ -~]{0,40}", valid in valid_reference()) {
        prop_assert!(parse_reference(&valid).is_ok(), "{}", valid);
        let allowed = |c: char| c.is_ascii_alphanumeric() || "/|-._".contains(c);
        if text.chars().any(|c| !allowed(c)) {
            prop_assert!(parse_reference(&text).is_err(), "{}", text);
        }
    }

    #[test]
    fn the_depth_guard_matches_the_parser(value in any_json(), max in 1usize..8) {
        let body = serde_json::to_vec(&value).unwrap();
        prop_assert_eq!(nests_deeper_than(&body, max), depth(&value) > max);
    }
}

fn depth(value: &Value) -> usize {
    match value {
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}
