//! `GET {base}/Group?member=...` when some Groups keep their members in
//! ClickHouse: the legacy server finds the Groups with inline members, the
//! reverse index finds the migrated ones, and the two Bundles are merged.
//! Pure: building the second query and merging the results.

use std::collections::HashSet;

use serde_json::{json, Value};

/// The references a `member` search asks for (comma means "or"), if any.
pub fn member_search_terms(query: Option<&str>) -> Option<Vec<String>> {
    let terms: Vec<String> = url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .filter(|(key, _)| key == "member")
        .flat_map(|(_, value)| {
            value
                .split(',')
                .map(|v| v.trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|v| !v.is_empty())
        .collect();
    (!terms.is_empty()).then_some(terms)
}

/// The same search without `member`, restricted to `ids` (intersected with an
/// `_id` the client gave). `None` when no id is left.
pub fn query_for_ids(query: Option<&str>, ids: &[String]) -> Option<String> {
    let params: Vec<(String, String)> =
        url::form_urlencoded::parse(query.unwrap_or_default().as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    let asked: Option<HashSet<&str>> = params
        .iter()
        .find(|(k, _)| k == "_id")
        .map(|(_, v)| v.split(',').map(str::trim).collect());
    let ids: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .filter(|id| asked.as_ref().is_none_or(|a| a.contains(id)))
        .collect();
    if ids.is_empty() {
        return None;
    }
    let mut out = url::form_urlencoded::Serializer::new(String::new());
    for (key, value) in params.iter().filter(|(k, _)| k != "member" && k != "_id") {
        out.append_pair(key, value);
    }
    out.append_pair("_id", &ids.join(","));
    Some(out.finish())
}

/// Adds the migrated Groups of `migrated` (a searchset from the legacy server
/// restricted to their ids) to `inline` (the legacy server's own answer),
/// each once. Their rosters are put in afterwards, like any search's.
pub fn merge_member_search(mut inline: Value, migrated: Value) -> Value {
    let mut seen: HashSet<String> = entries(&inline)
        .filter_map(|e| e["resource"]["id"].as_str().map(str::to_string))
        .collect();
    let mut added = Vec::new();
    for entry in entries(&migrated) {
        let Some(id) = entry["resource"]["id"].as_str().map(str::to_string) else {
            continue;
        };
        if !seen.insert(id.clone()) {
            continue;
        }
        added.push(entry.clone());
    }
    let added_count = added.len() as i64;
    // A legacy server that reports fewer than it returned is not counting
    // (the reference server says 0 unless `_total` is asked for): its total
    // stays what it would have said.
    let counted = inline["total"]
        .as_i64()
        .is_some_and(|total| total >= entries(&inline).count() as i64);
    if let Some(object) = inline.as_object_mut() {
        let list = object.entry("entry").or_insert_with(|| json!([]));
        if let Some(list) = list.as_array_mut() {
            list.extend(added);
        }
        match object.get("total").and_then(Value::as_i64) {
            Some(total) if counted => {
                object.insert("total".into(), json!(total + added_count));
            }
            _ => {}
        }
    }
    inline
}

fn entries(bundle: &Value) -> impl Iterator<Item = &Value> {
    bundle["entry"].as_array().into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_terms_and_id_queries() {
        assert_eq!(member_search_terms(Some("type=person")), None);
        assert_eq!(
            member_search_terms(Some("member=Patient/1,Patient/2&member=Patient/3")),
            Some(vec![
                "Patient/1".into(),
                "Patient/2".into(),
                "Patient/3".into()
            ])
        );
        let ids = vec!["a".to_string(), "b".to_string()];
        assert_eq!(
            query_for_ids(Some("member=Patient/1&type=person&_count=5"), &ids).as_deref(),
            Some("type=person&_count=5&_id=a%2Cb")
        );
        assert_eq!(
            query_for_ids(Some("member=P/1&_id=b,c"), &ids).as_deref(),
            Some("_id=b")
        );
        assert_eq!(query_for_ids(Some("member=P/1&_id=c"), &ids), None);
    }

    #[test]
    fn merging_adds_migrated_groups_once() {
        let inline = json!({"resourceType": "Bundle", "type": "searchset", "total": 1,
            "entry": [{"resource": {"resourceType": "Group", "id": "legacy"}}]});
        let migrated = json!({"resourceType": "Bundle", "total": 2, "entry": [
            {"resource": {"resourceType": "Group", "id": "m1"}},
            {"resource": {"resourceType": "Group", "id": "legacy"}}]});
        let merged = merge_member_search(inline, migrated);
        assert_eq!(merged["total"], 2);
        assert_eq!(merged["entry"].as_array().unwrap().len(), 2);
        assert_eq!(merged["entry"][1]["resource"]["id"], "m1");
    }

    #[test]
    fn a_legacy_total_that_does_not_count_is_left_as_the_legacy_server_gave_it() {
        let inline = json!({"resourceType": "Bundle", "type": "searchset", "total": 0,
            "entry": [{"resource": {"resourceType": "Group", "id": "legacy"}}]});
        let migrated = json!({"resourceType": "Bundle", "total": 1, "entry": [
            {"resource": {"resourceType": "Group", "id": "m1"}}]});
        let merged = merge_member_search(inline, migrated);
        assert_eq!(merged["entry"].as_array().unwrap().len(), 2);
        assert_eq!(merged["total"], 0);
    }
}
