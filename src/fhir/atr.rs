//! Da Vinci ATR `$member-add` / `$member-remove` (reference forms), turned
//! into the same member changes a PATCH makes.

use serde_json::{json, Value};

use crate::fhir::member_patch::{parse_member_value, AttributeUpdate, ChangeKind, MemberChange};
use crate::fhir::outcome::{IssueType, Outcome};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtrOperation {
    /// Adds (or re-activates) the member, with `attributionPeriod` as its period.
    MemberAdd,
    /// Marks the member inactive, as ATR asks, keeping it in the roster.
    MemberRemove,
}

impl AtrOperation {
    pub fn from_path_segment(segment: &str) -> Option<Self> {
        match segment {
            "$member-add" => Some(AtrOperation::MemberAdd),
            "$member-remove" => Some(AtrOperation::MemberRemove),
            _ => None,
        }
    }
}

/// The member changes of an ATR operation's `Parameters` body.
pub fn parse_atr_parameters(
    operation: AtrOperation,
    body: &[u8],
) -> Result<Vec<MemberChange>, Outcome> {
    let parameters: Value = serde_json::from_slice(body).map_err(|e| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if parameters["resourceType"] != "Parameters" {
        return Err(Outcome::error(
            400,
            IssueType::Invalid,
            "the body of an ATR operation must be a Parameters resource",
        ));
    }
    let list = parameters["parameter"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let named = |name: &'static str| list.iter().filter(move |p| p["name"] == name);
    for (name, why) in [
        ("memberId", "identifier forms need a Patient lookup by identifier; send patientReference"),
        ("providerNpi", "identifier forms need a lookup by NPI; send patientReference"),
        ("providerReference", "the attributed provider is not stored by the member store yet; send patientReference alone"),
    ] {
        if named(name).next().is_some() {
            return Err(Outcome::error(422, IssueType::NotSupported, format!("parameter {name}: {why}")));
        }
    }
    let patients: Vec<&Value> = named("patientReference").collect();
    let [patient] = patients.as_slice() else {
        return Err(Outcome::error(
            422,
            IssueType::Required,
            format!(
                "exactly one patientReference parameter is required, found {}",
                patients.len()
            ),
        ));
    };
    let mut member =
        json!({ "entity": { "reference": patient["valueReference"]["reference"].clone() } });
    let period = named("attributionPeriod")
        .next()
        .map(|p| p["valuePeriod"].clone());
    if let Some(period) = &period {
        member["period"] = period.clone();
    }
    let (reference, attributes) = parse_member_value(&member)?;
    let change = |op_index, kind| MemberChange {
        op_index,
        reference: reference.clone(),
        kind,
    };
    Ok(match operation {
        AtrOperation::MemberAdd => vec![change(0, ChangeKind::Put(attributes))],
        AtrOperation::MemberRemove => {
            let mut changes = vec![change(
                0,
                ChangeKind::Update(AttributeUpdate::Inactive(true)),
            )];
            if period.is_some() {
                changes.push(change(
                    1,
                    ChangeKind::Update(AttributeUpdate::Period {
                        start: attributes.period_start,
                        end: attributes.period_end,
                    }),
                ));
            }
            changes
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parameters: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": parameters})).unwrap()
    }

    #[test]
    fn member_add_with_attribution_period() {
        let changes = parse_atr_parameters(
            AtrOperation::MemberAdd,
            &body(json!([
                {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
                {"name": "attributionPeriod", "valuePeriod": {"start": "2026-01-01", "end": "2026-12-31"}}
            ])),
        )
        .unwrap();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].reference.as_str(), "Patient/1");
        match &changes[0].kind {
            ChangeKind::Put(a) => assert_eq!(a.period_end.as_deref(), Some("2026-12-31")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn member_remove_marks_inactive() {
        let changes = parse_atr_parameters(
            AtrOperation::MemberRemove,
            &body(
                json!([{"name": "patientReference", "valueReference": {"reference": "Patient/1"}}]),
            ),
        )
        .unwrap();
        assert_eq!(
            changes[0].kind,
            ChangeKind::Update(AttributeUpdate::Inactive(true))
        );
    }

    #[test]
    fn unsupported_and_malformed_forms_say_why() {
        let e = parse_atr_parameters(AtrOperation::MemberAdd, b"{").unwrap_err();
        assert_eq!(e.status, 400);
        let e = parse_atr_parameters(
            AtrOperation::MemberAdd,
            &body(json!([
                {"name": "memberId", "valueIdentifier": {"value": "1"}}
            ])),
        )
        .unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (422, IssueType::NotSupported));
        let e = parse_atr_parameters(AtrOperation::MemberAdd, &body(json!([]))).unwrap_err();
        assert_eq!((e.status, e.issues[0].code), (422, IssueType::Required));
        let e = parse_atr_parameters(
            AtrOperation::MemberAdd,
            &body(json!([
                {"name": "patientReference", "valueReference": {"reference": "bad ref"}}
            ])),
        )
        .unwrap_err();
        assert_eq!(e.status, 422);
    }
}
