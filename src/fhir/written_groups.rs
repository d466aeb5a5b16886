//! Which Groups a write of several resources touches: the body of a `$merge`
//! (one resource, a JSON array of resources, or a Bundle) or of a batch or
//! transaction Bundle. Pure.
//!
//! The legacy server applies such writes to whole documents, so the proxy
//! must see every Group among them before it lets the request through.

use serde_json::Value;

/// The Groups a body writes, as far as its text tells.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WrittenGroups {
    /// Group ids named by a resource or an entry's `request.url`.
    pub ids: Vec<String>,
    /// Entries that address Groups by search (`Group?identifier=...`), or
    /// Groups without an id whose target the legacy server decides.
    pub by_search: Vec<String>,
}

impl WrittenGroups {
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty() && self.by_search.is_empty()
    }
}

/// The Groups in `body` (see the module doc for the accepted shapes).
pub fn written_groups(body: &Value) -> WrittenGroups {
    let mut found = WrittenGroups::default();
    match body {
        Value::Array(resources) => resources.iter().for_each(|r| resource(r, &mut found)),
        resource_or_bundle => resource(resource_or_bundle, &mut found),
    }
    found.ids.sort();
    found.ids.dedup();
    found
}

fn resource(value: &Value, found: &mut WrittenGroups) {
    match value.get("resourceType").and_then(Value::as_str) {
        Some("Group") => {
            if let Some(id) = value.get("id").and_then(Value::as_str) {
                found.ids.push(id.to_string());
            }
        }
        Some("Bundle") => {
            for entry in value
                .get("entry")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(inner) = entry.get("resource") {
                    resource(inner, found);
                }
                if let Some(url) = entry.pointer("/request/url").and_then(Value::as_str) {
                    request_url(url, found);
                }
            }
        }
        _ => {}
    }
}

/// `Group/{id}`, `{base}/Group/{id}[/...]`, an absolute URL ending so, or
/// `Group?query`.
fn request_url(url: &str, found: &mut WrittenGroups) {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let Some(at) = segments
        .iter()
        .rposition(|s| s.eq_ignore_ascii_case("Group"))
    else {
        return;
    };
    match (segments.get(at + 1), query) {
        (Some(id), _) if !id.starts_with('$') && !id.starts_with('_') => {
            found.ids.push((*id).to_string())
        }
        (None, Some(_)) => found.by_search.push(url.to_string()),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_single_group_resource_names_its_id() {
        let found = written_groups(&json!({"resourceType": "Group", "id": "g1"}));
        assert_eq!(found.ids, vec!["g1"]);
        assert!(written_groups(&json!({"resourceType": "Patient", "id": "p"})).is_empty());
    }

    #[test]
    fn a_list_of_resources_names_every_group() {
        let found = written_groups(&json!([
            {"resourceType": "Group", "id": "b"},
            {"resourceType": "Patient", "id": "p"},
            {"resourceType": "Group", "id": "a"},
            {"resourceType": "Group", "id": "a"}
        ]));
        assert_eq!(found.ids, vec!["a", "b"]);
    }

    #[test]
    fn bundle_entries_name_groups_by_resource_and_by_request_url() {
        let found = written_groups(&json!({
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {"resource": {"resourceType": "Group", "id": "r"}, "request": {"method": "PUT", "url": "Group/r"}},
                {"request": {"method": "DELETE", "url": "Group/d"}},
                {"request": {"method": "PATCH", "url": "http://fhir.example/4_0_0/Group/p"}},
                {"request": {"method": "PUT", "url": "Group?identifier=x|1"}},
                {"request": {"method": "POST", "url": "Group/$merge"}},
                {"resource": {"resourceType": "Patient", "id": "x"}, "request": {"method": "PUT", "url": "Patient/x"}}
            ]
        }));
        assert_eq!(found.ids, vec!["d", "p", "r"]);
        assert_eq!(found.by_search, vec!["Group?identifier=x|1"]);
    }

    #[test]
    fn shapes_without_groups_name_nothing() {
        for body in [json!(null), json!(3), json!({"entry": "x"}), json!([1, 2])] {
            assert!(written_groups(&body).is_empty(), "{body}");
        }
    }
}
