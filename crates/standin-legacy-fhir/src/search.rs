//! Type-level search: the few parameters the proxy's tests and benchmarks
//! use. Like lax legacy servers, unknown parameters are ignored.

use mongodb::bson::{doc, Bson, Document};

/// Page size when the request gives no usable `_count`.
pub const DEFAULT_COUNT: u64 = 100;

#[derive(Debug, Clone, PartialEq)]
pub struct SearchQuery {
    pub filter: Document,
    pub count: u64,
    /// `_total` was given (any value but `none`).
    pub total_requested: bool,
}

/// `_id=a,b` (any of), `member=Patient/1,Patient/2` (Group only; any of, on
/// `member.entity.reference`) and `_count`. Repeated parameters must all match.
pub fn parse(resource_type: &str, query: &str) -> SearchQuery {
    let mut conditions: Vec<Document> = Vec::new();
    let mut count = DEFAULT_COUNT;
    let mut total_requested = false;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "_id" => conditions.push(any_of("id", &value)),
            "member" if resource_type == "Group" => {
                conditions.push(any_of("member.entity.reference", &value))
            }
            "_count" => count = value.trim().parse().unwrap_or(DEFAULT_COUNT),
            "_total" => total_requested = value.trim() != "none",
            _ => {}
        }
    }
    let filter = match conditions.len() {
        0 => Document::new(),
        1 => conditions.remove(0),
        _ => doc! { "$and": conditions },
    };
    SearchQuery {
        filter,
        count,
        total_requested,
    }
}

fn any_of(field: &str, list: &str) -> Document {
    let values: Vec<Bson> = list
        .split(',')
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(|v| Bson::String(v.to_string()))
        .collect();
    doc! { field: { "$in": values } }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_any_of() {
        let query = parse("Group", "_id=a,b&_count=5");
        assert_eq!(query.filter, doc! { "id": { "$in": ["a", "b"] } });
        assert_eq!(query.count, 5);
    }

    #[test]
    fn member_is_only_for_groups() {
        let query = parse("Group", "member=Patient%2F1");
        assert_eq!(
            query.filter,
            doc! { "member.entity.reference": { "$in": ["Patient/1"] } }
        );
        assert_eq!(parse("Patient", "member=Patient/1").filter, Document::new());
    }

    #[test]
    fn repeated_parameters_must_all_match() {
        let query = parse("Group", "_id=a&member=Patient/1&member=Patient/2");
        assert_eq!(
            query.filter,
            doc! { "$and": [
                { "id": { "$in": ["a"] } },
                { "member.entity.reference": { "$in": ["Patient/1"] } },
                { "member.entity.reference": { "$in": ["Patient/2"] } },
            ] }
        );
    }

    #[test]
    fn total_is_requested_by_any_total_but_none() {
        assert!(!parse("Group", "_count=1").total_requested);
        assert!(parse("Group", "_total=accurate").total_requested);
        assert!(!parse("Group", "_total=none").total_requested);
    }

    #[test]
    fn unknown_and_unusable_parameters_are_ignored() {
        let query = parse("Group", "name=x&_count=-3&_sort=id");
        assert_eq!(query.filter, Document::new());
        assert_eq!(query.count, DEFAULT_COUNT);
        assert_eq!(parse("Group", "_count=0").count, 0);
    }
}
