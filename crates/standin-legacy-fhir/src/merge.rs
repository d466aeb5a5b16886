//! `$merge` semantics of the real legacy server, as pure functions on JSON:
//! its "smart merge" (objects merged key by key, arrays by adding what is not
//! already there) and the JSON Patch diff it records in history.
//!
//! Written from the behaviour of its `mergeHelper` (deepmerge with a custom
//! merge for every key) and of fast-json-patch's `compare`:
//! - a key only in the stored document stays; a scalar in the incoming one
//!   replaces; objects merge recursively;
//! - an array of scalars is replaced by a non-empty incoming array;
//! - an incoming array item deep-equal to a stored one is skipped; one with an
//!   `id` equal to a stored item's `id` is merged into that item; one with a
//!   `sequence` goes before the first stored item with a larger sequence;
//!   any other is appended. Items whose `id` ends in `-delete` remove the
//!   stored item with that id. So members (no `id`) are matched by deep
//!   equality of the whole member, `entity` and `period` included;
//! - an empty incoming array changes nothing.

use serde_json::{json, Map, Value};

/// The stored resource `old` with `new` merged in.
pub fn smart_merge(old: &Value, new: &Value) -> Value {
    deep_merge(old, new)
}

/// deepmerge(target, source) with the custom merge on every key.
fn deep_merge(target: &Value, source: &Value) -> Value {
    match (target, source) {
        (Value::Array(old), Value::Array(new)) => Value::Array(merge_arrays(old, new)),
        (Value::Object(old), Value::Object(new)) => Value::Object(merge_objects(old, new)),
        // Types differ (or neither is mergeable): the source wins.
        _ => source.clone(),
    }
}

fn merge_objects(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut merged = old.clone();
    for (key, value) in new {
        let mergeable = value.is_object() || value.is_array();
        let merged_value = match old.get(key) {
            Some(existing) if mergeable => merge_value(existing, value),
            _ => value.clone(),
        };
        merged.insert(key.clone(), merged_value);
    }
    merged
}

/// The custom merge deepmerge calls for a key both sides have.
fn merge_value(old: &Value, new: &Value) -> Value {
    if old.is_null() {
        return new.clone();
    }
    if new.is_null() || old == new {
        return old.clone();
    }
    match (old, new) {
        (Value::Array(old), Value::Array(new)) => Value::Array(merge_arrays(old, new)),
        // A stored array met by an object: nothing sensible to merge.
        (Value::Array(_), _) => new.clone(),
        _ => deep_merge(old, new),
    }
}

fn item_id(item: &Value) -> Option<&str> {
    item.get("id").and_then(Value::as_str)
}

fn merge_arrays(old: &[Value], new: &[Value]) -> Vec<Value> {
    let of_scalars = old
        .first()
        .is_some_and(|first| !first.is_object() && !first.is_array());
    if of_scalars && !new.is_empty() {
        return new.to_vec();
    }
    let deleted: Vec<&str> = new
        .iter()
        .filter_map(item_id)
        .filter_map(|id| id.strip_suffix("-delete"))
        .collect();
    let new: Vec<&Value> = new
        .iter()
        .filter(|item| !item_id(item).is_some_and(|id| id.ends_with("-delete")))
        .collect();
    let old: Vec<Value> = old
        .iter()
        .filter(|item| !item_id(item).is_some_and(|id| deleted.contains(&id)))
        .cloned()
        .collect();
    let mut result = old.clone();
    for item in new {
        if item.is_null() || old.iter().any(|existing| existing == item) {
            continue;
        }
        if let Some(object) = item.as_object() {
            if object.contains_key("id") {
                let wanted = object.get("id");
                if let Some(index) = result
                    .iter()
                    .position(|existing| !existing.is_null() && existing.get("id") == wanted)
                {
                    result[index] = deep_merge(&result[index], item);
                    continue;
                }
            }
            if let Some(sequence) = object.get("sequence") {
                let position = result.iter().position(|existing| {
                    matches!(
                        (existing.get("sequence").and_then(Value::as_f64), sequence.as_f64()),
                        (Some(theirs), Some(ours)) if theirs > ours
                    )
                });
                match position {
                    Some(index) => result.insert(index, item.clone()),
                    None => result.push(item.clone()),
                }
                continue;
            }
        }
        result.push(item.clone());
    }
    result
}

/// The JSON Patch that turns `old` into `new`, as fast-json-patch's
/// `compare` builds it (removals from the end, then replacements, then
/// additions).
pub fn diff(old: &Value, new: &Value) -> Vec<Value> {
    let mut patches = Vec::new();
    generate(old, new, "", &mut patches);
    patches
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn keys(value: &Value) -> Vec<String> {
    match value {
        Value::Object(map) => map.keys().cloned().collect(),
        Value::Array(items) => (0..items.len()).map(|i| i.to_string()).collect(),
        _ => Vec::new(),
    }
}

fn child<'a>(value: &'a Value, key: &str) -> Option<&'a Value> {
    match value {
        Value::Object(map) => map.get(key),
        Value::Array(items) => key.parse::<usize>().ok().and_then(|i| items.get(i)),
        _ => None,
    }
}

fn generate(old: &Value, new: &Value, path: &str, patches: &mut Vec<Value>) {
    if old == new {
        return;
    }
    let old_keys = keys(old);
    let new_keys = keys(new);
    let mut deleted = false;
    for key in old_keys.iter().rev() {
        let child_path = format!("{path}/{}", escape(key));
        let Some(old_value) = child(old, key) else {
            continue;
        };
        match child(new, key) {
            Some(new_value) => {
                let both_containers = (old_value.is_object() && new_value.is_object())
                    || (old_value.is_array() && new_value.is_array());
                if both_containers {
                    generate(old_value, new_value, &child_path, patches);
                } else if old_value != new_value {
                    patches.push(json!({"op": "replace", "path": child_path, "value": new_value}));
                }
            }
            None if old.is_array() == new.is_array() => {
                patches.push(json!({"op": "remove", "path": child_path}));
                deleted = true;
            }
            None => {
                patches.push(json!({"op": "replace", "path": path, "value": new}));
            }
        }
    }
    if !deleted && new_keys.len() == old_keys.len() {
        return;
    }
    for key in &new_keys {
        if child(old, key).is_none() {
            if let Some(value) = child(new, key) {
                patches.push(
                    json!({"op": "add", "path": format!("{path}/{}", escape(key)), "value": value}),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(reference: &str) -> Value {
        json!({"entity": {"reference": reference}})
    }

    #[test]
    fn members_not_yet_present_are_appended_and_present_ones_skipped() {
        let old = json!({"member": [member("Patient/1"), member("Patient/2")], "name": "a"});
        let new = json!({"member": [member("Patient/2"), member("Patient/3")]});
        let merged = smart_merge(&old, &new);
        assert_eq!(
            merged["member"],
            json!([
                member("Patient/1"),
                member("Patient/2"),
                member("Patient/3")
            ])
        );
        assert_eq!(merged["name"], "a");
    }

    #[test]
    fn a_member_that_differs_in_any_field_is_added_again() {
        let old = json!({"member": [member("Patient/1")]});
        let new = json!({"member": [{"entity": {"reference": "Patient/1"}, "inactive": true}]});
        let merged = smart_merge(&old, &new);
        assert_eq!(merged["member"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn an_empty_incoming_array_keeps_the_stored_one() {
        let old = json!({"member": [member("Patient/1")]});
        let merged = smart_merge(&old, &json!({"member": []}));
        assert_eq!(merged["member"], json!([member("Patient/1")]));
    }

    #[test]
    fn scalars_and_scalar_arrays_are_replaced() {
        let old = json!({"name": "a", "meta": {"profile": ["x", "y"], "source": "s"}});
        let new = json!({"name": "b", "meta": {"profile": ["z"]}});
        let merged = smart_merge(&old, &new);
        assert_eq!(
            merged,
            json!({"name": "b", "meta": {"profile": ["z"], "source": "s"}})
        );
    }

    #[test]
    fn items_with_ids_merge_into_the_item_with_that_id_and_delete_markers_remove() {
        let old = json!({"x": [{"id": "a", "v": 1}, {"id": "b", "v": 2}]});
        let new = json!({"x": [{"id": "a", "w": 3}, {"id": "b-delete"}]});
        let merged = smart_merge(&old, &new);
        assert_eq!(merged["x"], json!([{"id": "a", "v": 1, "w": 3}]));
    }

    #[test]
    fn items_with_a_sequence_go_before_the_first_larger_sequence() {
        let old = json!({"x": [{"sequence": 1}, {"sequence": 3}]});
        let merged = smart_merge(&old, &json!({"x": [{"sequence": 2}]}));
        assert_eq!(
            merged["x"],
            json!([{"sequence": 1}, {"sequence": 2}, {"sequence": 3}])
        );
    }

    #[test]
    fn diffs_are_fast_json_patch_shaped() {
        let old = json!({"a": 1, "m": [1, 2], "gone": true});
        let new = json!({"a": 2, "m": [1, 2, 3], "new": "x"});
        assert_eq!(
            diff(&old, &new),
            vec![
                json!({"op": "remove", "path": "/gone"}),
                json!({"op": "add", "path": "/m/2", "value": 3}),
                json!({"op": "replace", "path": "/a", "value": 2}),
                json!({"op": "add", "path": "/new", "value": "x"}),
            ]
        );
        assert!(diff(&old, &old).is_empty());
    }
}
