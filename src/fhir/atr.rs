//! Da Vinci ATR `$member-add` / `$member-remove`
//! (<https://build.fhir.org/ig/HL7/davinci-atr/>): the `Parameters` body read
//! into member elements, and their plan against the stored slots.
//!
//! Forms: the member by `patientReference` or by `memberId` (an
//! Identifier), the attributed provider by `providerReference` or
//! `providerNpi`, each with an optional `attributionPeriod`. The member
//! element is `entity` (the reference, or the identifier), `period` (the
//! attribution period) and the IG's attributed-provider extension.

use std::collections::HashMap;

use serde_json::{json, Map, Value};

use crate::fhir::member_array::{order_key, Plan, Slot, SlotEvent};
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::reference::parse_reference;

/// The ATR extension naming a member's attributed provider.
pub const ATTRIBUTED_PROVIDER: &str =
    "http://hl7.org/fhir/us/davinci-atr/StructureDefinition/ext-attributedProvider";

const NPI_SYSTEM: &str = "http://hl7.org/fhir/sid/us-npi";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtrOperation {
    /// Adds the member, or updates its attribution (re-activating it).
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

/// One member an ATR operation names: what the store finds it by, and the
/// element the operation states.
#[derive(Debug, Clone, PartialEq)]
pub struct AtrMember {
    /// See `member_array::match_key`.
    pub match_key: String,
    pub element: Value,
}

fn refused(status: u16, code: IssueType, text: impl Into<String>) -> Outcome {
    Outcome::error(status, code, text)
}

/// The member an ATR operation's `Parameters` body names.
pub fn parse_atr_parameters(
    _operation: AtrOperation,
    body: &[u8],
) -> Result<Vec<AtrMember>, Outcome> {
    let parameters: Value = serde_json::from_slice(body).map_err(|e| {
        refused(
            400,
            IssueType::Invalid,
            format!("the body is not valid JSON: {e}"),
        )
    })?;
    if parameters["resourceType"] != "Parameters" {
        return Err(refused(
            400,
            IssueType::Invalid,
            "the body of an ATR operation must be a Parameters resource",
        ));
    }
    let list = parameters["parameter"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let one = |name: &'static str, value: &'static str| -> Result<Option<Value>, Outcome> {
        let found: Vec<&Value> = list.iter().filter(|p| p["name"] == name).collect();
        match found.as_slice() {
            [] => Ok(None),
            [single] => single.get(value).cloned().map(Some).ok_or_else(|| {
                refused(
                    422,
                    IssueType::Invalid,
                    format!("parameter {name} needs {value}"),
                )
            }),
            _ => Err(refused(
                422,
                IssueType::Invalid,
                format!(
                    "parameter {name} is given {} times; at most once",
                    found.len()
                ),
            )),
        }
    };
    let patient = one("patientReference", "valueReference")?;
    let member_id = one("memberId", "valueIdentifier")?;
    let provider = one("providerReference", "valueReference")?;
    let npi = one("providerNpi", "valueIdentifier")?;
    let period = one("attributionPeriod", "valuePeriod")?;

    let (entity, match_key) = match (patient, member_id) {
        (Some(_), Some(_)) => {
            return Err(refused(
                422,
                IssueType::Invalid,
                "give the member as patientReference or as memberId, not both",
            ))
        }
        (None, None) => {
            return Err(refused(
                422,
                IssueType::Required,
                "the member is missing: give patientReference or memberId",
            ))
        }
        (Some(reference), None) => {
            let text = reference["reference"].as_str().unwrap_or_default();
            parse_reference(text).map_err(|why| {
                refused(
                    422,
                    IssueType::Invalid,
                    format!("parameter patientReference: {why}"),
                )
            })?;
            (json!({ "reference": text }), text.to_string())
        }
        (None, Some(identifier)) => {
            let Some(value) = identifier["value"].as_str() else {
                return Err(refused(
                    422,
                    IssueType::Invalid,
                    "parameter memberId: the Identifier has no value",
                ));
            };
            let system = identifier["system"].as_str().unwrap_or_default();
            (
                json!({ "identifier": identifier }),
                format!("identifier:{system}|{value}"),
            )
        }
    };
    let provider = match (provider, npi) {
        (Some(_), Some(_)) => {
            return Err(refused(
                422,
                IssueType::Invalid,
                "give the provider as providerReference or as providerNpi, not both",
            ))
        }
        (Some(reference), None) => Some(reference),
        (None, Some(identifier)) => {
            if identifier["value"].as_str().is_none() {
                return Err(refused(
                    422,
                    IssueType::Invalid,
                    "parameter providerNpi: the Identifier has no value",
                ));
            }
            let mut identifier = identifier;
            if identifier.get("system").is_none() {
                identifier["system"] = json!(NPI_SYSTEM);
            }
            Some(json!({ "identifier": identifier }))
        }
        (None, None) => None,
    };
    let mut element = Map::new();
    element.insert("entity".into(), entity);
    if let Some(period) = period {
        if !period.is_object() {
            return Err(refused(
                422,
                IssueType::Invalid,
                "parameter attributionPeriod: valuePeriod must be a Period",
            ));
        }
        element.insert("period".into(), period);
    }
    if let Some(provider) = provider {
        element.insert(
            "extension".into(),
            json!([{ "url": ATTRIBUTED_PROVIDER, "valueReference": provider }]),
        );
    }
    Ok(vec![AtrMember {
        match_key,
        element: Value::Object(element),
    }])
}

/// The plan of an ATR operation: `found[match_key]` are the stored slots
/// of each named member (key order). `$member-add` updates a present member
/// in place (new period and provider, `inactive` dropped, every other field
/// kept) or appends it; `$member-remove` marks present members inactive
/// (with the period given, as the end of their attribution).
pub fn atr_plan(
    operation: AtrOperation,
    members: &[AtrMember],
    found: &HashMap<String, Vec<Slot>>,
    len: usize,
    floor: &str,
    ids: &mut dyn FnMut() -> String,
) -> Result<Plan, Outcome> {
    let mut events = Vec::new();
    let mut floor = floor.to_owned();
    let mut raised = false;
    let mut len = len;
    for member in members {
        let slots = found
            .get(&member.match_key)
            .map(Vec::as_slice)
            .unwrap_or_default();
        if slots.is_empty() {
            if operation == AtrOperation::MemberRemove {
                return Err(refused(
                    422,
                    IssueType::Processing,
                    format!("{} is not a member of this Group", member.match_key),
                ));
            }
            let key = order_key::after(&floor)
                .map_err(|e| refused(500, IssueType::Exception, format!("order key: {e}")))?;
            floor = key.clone();
            raised = true;
            len += 1;
            events.push(SlotEvent::Put {
                id: ids(),
                key,
                before: None,
                after: member.element.clone(),
            });
            continue;
        }
        for slot in slots {
            let after = updated(operation, &slot.element, &member.element);
            if after != slot.element {
                events.push(SlotEvent::Put {
                    id: slot.id.clone(),
                    key: slot.key.clone(),
                    before: Some(slot.element.clone()),
                    after,
                });
            }
        }
    }
    Ok(Plan {
        events,
        len,
        present: true,
        floor: raised.then_some(floor),
    })
}

/// A stored member after the operation: only the attribution changes.
fn updated(operation: AtrOperation, stored: &Value, stated: &Value) -> Value {
    let mut element = stored.as_object().cloned().unwrap_or_default();
    match operation {
        AtrOperation::MemberAdd => {
            element.remove("inactive");
        }
        AtrOperation::MemberRemove => {
            element.insert("inactive".into(), Value::Bool(true));
        }
    }
    if let Some(period) = stated.get("period") {
        match operation {
            AtrOperation::MemberAdd => {
                element.insert("period".into(), period.clone());
            }
            AtrOperation::MemberRemove => {
                // The attribution ends: the end given, the start kept.
                let mut kept = element
                    .get("period")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                if let Some(end) = period.get("end") {
                    kept.insert("end".into(), end.clone());
                }
                element.insert("period".into(), Value::Object(kept));
            }
        }
    }
    if let Some(provider) = stated
        .get("extension")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        let mut extensions: Vec<Value> = element
            .get("extension")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        extensions.retain(|e| e["url"] != ATTRIBUTED_PROVIDER);
        extensions.push(provider.clone());
        element.insert("extension".into(), Value::Array(extensions));
    }
    Value::Object(element)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(parameters: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": parameters})).unwrap()
    }

    fn parse(parameters: Value) -> Result<Vec<AtrMember>, Outcome> {
        parse_atr_parameters(AtrOperation::MemberAdd, &body(parameters))
    }

    fn fresh() -> impl FnMut() -> String {
        || "new".to_string()
    }

    #[test]
    fn a_patient_and_provider_by_reference_with_a_period_become_one_member_element() {
        let members = parse(json!([
            {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
            {"name": "providerReference", "valueReference": {"reference": "Practitioner/9"}},
            {"name": "attributionPeriod", "valuePeriod": {"start": "2026-01-01"}}
        ]))
        .unwrap();
        assert_eq!(members[0].match_key, "Patient/1");
        assert_eq!(
            members[0].element,
            json!({"entity": {"reference": "Patient/1"}, "period": {"start": "2026-01-01"},
                   "extension": [{"url": ATTRIBUTED_PROVIDER, "valueReference": {"reference": "Practitioner/9"}}]})
        );
    }

    #[test]
    fn a_member_id_and_an_npi_are_identifiers() {
        let members = parse(json!([
            {"name": "memberId", "valueIdentifier": {"system": "urn:payer", "value": "M1"}},
            {"name": "providerNpi", "valueIdentifier": {"value": "1234567893"}}
        ]))
        .unwrap();
        assert_eq!(members[0].match_key, "identifier:urn:payer|M1");
        assert_eq!(members[0].element["entity"]["identifier"]["value"], "M1");
        assert_eq!(
            members[0].element["extension"][0]["valueReference"]["identifier"]["system"],
            NPI_SYSTEM
        );
    }

    #[test]
    fn bad_bodies_and_forms_are_refused_naming_the_parameter() {
        let e = parse_atr_parameters(AtrOperation::MemberAdd, b"{").unwrap_err();
        assert_eq!(e.status, 400);
        for (parameters, words) in [
            (json!([]), "patientReference or memberId"),
            (
                json!([
                    {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
                    {"name": "memberId", "valueIdentifier": {"value": "1"}}
                ]),
                "not both",
            ),
            (
                json!([{"name": "patientReference", "valueReference": {"reference": "bad ref"}}]),
                "patientReference",
            ),
            (
                json!([
                    {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
                    {"name": "patientReference", "valueReference": {"reference": "Patient/2"}}
                ]),
                "2 times",
            ),
            (
                json!([{"name": "memberId", "valueIdentifier": {}}]),
                "no value",
            ),
        ] {
            let e = parse(parameters).unwrap_err();
            assert_eq!(e.status, 422, "{words}");
            assert!(e.issues[0].diagnostics.contains(words), "{words}: {e:?}");
        }
    }

    #[test]
    fn member_add_appends_a_new_member_and_updates_a_present_one_in_place() {
        let members = parse(json!([
            {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
            {"name": "attributionPeriod", "valuePeriod": {"start": "2027-01-01"}}
        ]))
        .unwrap();
        let found = HashMap::from([("Patient/1".to_string(), vec![])]);
        let plan = atr_plan(
            AtrOperation::MemberAdd,
            &members,
            &found,
            3,
            "a3",
            &mut fresh(),
        )
        .unwrap();
        assert_eq!((plan.len, plan.floor.as_deref()), (4, Some("a4")));
        let stored = Slot {
            id: "s".into(),
            key: "a1".into(),
            element: json!({"entity": {"reference": "Patient/1", "display": "A"}, "inactive": true}),
        };
        let found = HashMap::from([("Patient/1".to_string(), vec![stored])]);
        let plan = atr_plan(
            AtrOperation::MemberAdd,
            &members,
            &found,
            3,
            "a3",
            &mut fresh(),
        )
        .unwrap();
        let SlotEvent::Put { id, after, .. } = &plan.events[0] else {
            panic!("a put")
        };
        assert_eq!(id, "s");
        assert_eq!(
            after,
            &json!({"entity": {"reference": "Patient/1", "display": "A"}, "period": {"start": "2027-01-01"}})
        );
        assert_eq!(plan.len, 3);
    }

    #[test]
    fn member_remove_marks_the_member_inactive_and_ends_its_attribution() {
        let members = parse_atr_parameters(
            AtrOperation::MemberRemove,
            &body(json!([
                {"name": "patientReference", "valueReference": {"reference": "Patient/1"}},
                {"name": "attributionPeriod", "valuePeriod": {"end": "2026-06-30"}}
            ])),
        )
        .unwrap();
        let stored = Slot {
            id: "s".into(),
            key: "a1".into(),
            element: json!({"entity": {"reference": "Patient/1"}, "period": {"start": "2026-01-01"}}),
        };
        let found = HashMap::from([("Patient/1".to_string(), vec![stored])]);
        let plan = atr_plan(
            AtrOperation::MemberRemove,
            &members,
            &found,
            1,
            "a1",
            &mut fresh(),
        )
        .unwrap();
        let SlotEvent::Put { after, .. } = &plan.events[0] else {
            panic!("a put")
        };
        assert_eq!(after["inactive"], true);
        assert_eq!(
            after["period"],
            json!({"start": "2026-01-01", "end": "2026-06-30"})
        );
        let none = HashMap::from([("Patient/1".to_string(), vec![])]);
        let e = atr_plan(
            AtrOperation::MemberRemove,
            &members,
            &none,
            0,
            "",
            &mut fresh(),
        )
        .unwrap_err();
        assert_eq!(e.status, 422);
    }
}
