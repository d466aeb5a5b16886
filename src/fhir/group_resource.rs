//! Whole Group resources in `PUT` and `POST` bodies: the roster they carry
//! and the document the legacy server stores without it. The roster is kept
//! as the client sent it, element by element (see `fhir::roster_replace`
//! for how it replaces the stored one).

use serde_json::{Map, Value};

use crate::fhir::outcome::{IssueType, Outcome};

/// A Group body split into what the legacy server stores and what the member
/// store keeps.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupBody {
    /// The resource without `member`: what goes upstream.
    pub document: Map<String, Value>,
    /// `Some` when the body has a `member` element (possibly empty): its
    /// elements, verbatim and in order.
    pub roster: Option<Vec<Value>>,
    /// The `member` array as the client sent it, to answer with.
    pub member_json: Option<Value>,
}

/// Reads a Group resource body. `expected_id` is the id in the URL of a `PUT`.
pub fn parse_group_body(body: &[u8], expected_id: Option<&str>) -> Result<GroupBody, Outcome> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("the Group body is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut document) = value else {
        return Err(Outcome::error(
            400,
            IssueType::Structure,
            "the body must be a JSON object (a FHIR Group resource)",
        ));
    };
    match document.get("resourceType").and_then(Value::as_str) {
        Some("Group") => {}
        Some(other) => {
            return Err(Outcome::error(
                400,
                IssueType::Invalid,
                format!("resourceType is '{other}', but this endpoint takes a Group"),
            ))
        }
        None => {
            return Err(Outcome::error(
                400,
                IssueType::Required,
                "resourceType is missing; expected \"Group\"",
            ))
        }
    }
    if let Some(expected) = expected_id {
        match document.get("id") {
            Some(Value::String(id)) if id == expected => {}
            Some(other) => {
                return Err(Outcome::error(
                    400,
                    IssueType::Invalid,
                    format!("the resource id {other} does not match the id '{expected}' in the URL"),
                )
                .at("Group.id"))
            }
            None => {
                return Err(Outcome::error(
                    400,
                    IssueType::Required,
                    format!("the resource has no id; a PUT to Group/{expected} must carry id \"{expected}\""),
                )
                .at("Group.id"))
            }
        }
    }
    let member_json = document.remove("member");
    let roster = member_json.as_ref().map(parse_roster).transpose()?;
    Ok(GroupBody {
        document,
        roster,
        member_json,
    })
}

fn parse_roster(members: &Value) -> Result<Vec<Value>, Outcome> {
    // Elements are kept as the legacy server keeps them: whatever they hold,
    // duplicates included.
    members.as_array().cloned().ok_or_else(|| {
        Outcome::error(400, IssueType::Structure, "Group.member must be an array")
            .at("Group.member")
    })
}

/// The Group the legacy server answered with, with the roster the client sent
/// put back (the legacy server never saw it) and `quantity` set to its active
/// members. Bodies that are not a Group are returned as they are.
pub fn with_roster(reply_body: &[u8], member_json: &Value) -> Option<Vec<u8>> {
    let group = serde_json::from_slice::<Value>(reply_body).ok()?;
    if group.get("resourceType").and_then(Value::as_str) != Some("Group") {
        return None;
    }
    let members = member_json
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    let group = crate::fhir::group_read::with_listed_roster(
        group,
        crate::fhir::group_read::ListedRoster::Members(members),
    );
    serde_json::to_vec(&group).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn body(value: Value) -> Vec<u8> {
        serde_json::to_vec(&value).unwrap()
    }

    #[test]
    fn a_group_body_splits_into_document_and_roster() {
        let group = parse_group_body(
            &body(
                json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/1"}},
                           {"entity": {"reference": "Patient/2"}, "inactive": true}]}),
            ),
            Some("g1"),
        )
        .unwrap();
        assert!(!group.document.contains_key("member"));
        assert_eq!(group.document["type"], "person");
        let roster = group.roster.unwrap();
        assert_eq!(roster.len(), 2);
        assert_eq!(roster[1]["entity"]["reference"], "Patient/2");
        assert_eq!(roster[1]["inactive"], true);
        assert_eq!(group.member_json.unwrap().as_array().unwrap().len(), 2);
    }

    #[test]
    fn a_body_without_member_has_no_roster_and_an_empty_one_has_an_empty_roster() {
        let none = parse_group_body(&body(json!({"resourceType": "Group"})), None).unwrap();
        assert_eq!(none.roster, None);
        let empty =
            parse_group_body(&body(json!({"resourceType": "Group", "member": []})), None).unwrap();
        assert_eq!(empty.roster, Some(vec![]));
    }

    #[test]
    fn bad_bodies_are_refused_with_what_was_wrong() {
        let cases: Vec<(Vec<u8>, Option<&str>, u16, &str)> = vec![
            (b"{not json".to_vec(), None, 400, "not valid JSON"),
            (body(json!([1])), None, 400, "JSON object"),
            (
                body(json!({"resourceType": "Patient"})),
                None,
                400,
                "'Patient'",
            ),
            (
                body(json!({"id": "x"})),
                None,
                400,
                "resourceType is missing",
            ),
            (
                body(json!({"resourceType": "Group", "id": "b"})),
                Some("a"),
                400,
                "does not match",
            ),
            (
                body(json!({"resourceType": "Group"})),
                Some("a"),
                400,
                "has no id",
            ),
            (
                body(json!({"resourceType": "Group", "member": {}})),
                None,
                400,
                "must be an array",
            ),
        ];
        for (input, id, status, words) in cases {
            let outcome = parse_group_body(&input, id).unwrap_err();
            assert_eq!(outcome.status, status, "{words}");
            assert!(
                outcome.issues[0].diagnostics.contains(words),
                "{words}: {:?}",
                outcome.issues[0].diagnostics
            );
        }
    }

    #[test]
    fn a_roster_keeps_duplicates_and_every_element_verbatim() {
        let members = json!([
            {"entity": {"reference": "Patient/1", "display": "A", "_uuid": "x"}, "extension": [{"url": "u"}]},
            {"entity": {"reference": "Patient/1"}}
        ]);
        let group = parse_group_body(
            &body(json!({"resourceType": "Group", "member": members.clone()})),
            None,
        )
        .unwrap();
        assert_eq!(Value::Array(group.roster.unwrap()), members);
    }

    #[test]
    fn the_reply_gets_the_roster_back_with_its_quantity() {
        let members = json!([{"entity": {"reference": "Patient/1"}}, {"entity": {"reference": "Patient/2"}, "inactive": true}]);
        let reply = body(json!({"resourceType": "Group", "id": "g", "meta": {"versionId": "2"}}));
        let merged: Value =
            serde_json::from_slice(&with_roster(&reply, &members).unwrap()).unwrap();
        assert_eq!(merged["member"], members);
        assert_eq!(merged["quantity"], 1);
        assert_eq!(merged["meta"]["versionId"], "2");
        assert_eq!(with_roster(b"", &members), None);
        assert_eq!(
            with_roster(&body(json!({"resourceType": "OperationOutcome"})), &members),
            None
        );
    }
}
