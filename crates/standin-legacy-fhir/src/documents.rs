//! FHIR JSON <-> stored MongoDB documents, in the layout of the Mongo-backed
//! reference server (icanbwell/fhir-server): the FHIR JSON plus `_uuid`,
//! `_sourceId` and `_sourceAssigningAuthority`; `meta.versionId` a string and
//! `meta.lastUpdated` a BSON date. Pure functions only, so the layout can be
//! checked without a database.

use mongodb::bson::{doc, Bson, DateTime, Document};
use serde_json::{Map, Value};

pub use icanbwell_conventions::{DEFAULT_AUTHORITY, OWNER_SYSTEM};

/// Top-level fields starting with this are not FHIR: `_id`, `_uuid`, and
/// markers other tools (the proxy) put on stored documents.
const INTERNAL_PREFIX: char = '_';

fn is_internal(key: &str) -> bool {
    key.starts_with(INTERNAL_PREFIX)
}

/// The authority owning a resource: the code of its owner security tag.
pub fn source_assigning_authority(resource: &Value) -> String {
    resource
        .pointer("/meta/security")
        .and_then(Value::as_array)
        .and_then(|tags| {
            tags.iter()
                .find(|t| t["system"] == OWNER_SYSTEM)
                .and_then(|t| t["code"].as_str())
        })
        .unwrap_or(DEFAULT_AUTHORITY)
        .to_string()
}

/// `_uuid`: UUIDv5 of `id|authority` in the URL namespace, so it is the same
/// for every version and for every server that stores the resource.
pub fn resource_uuid(id: &str, authority: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("{id}|{authority}").as_bytes(),
    )
    .to_string()
}

/// FHIR JSON to the stored document at `version`, last updated at
/// `last_updated` (both replace whatever `meta` the client sent).
///
/// Top-level `_` fields of the input are dropped: they are reserved for the
/// server and the proxy, and a client must not be able to set them.
pub fn to_document(resource: &Value, version: u64, last_updated: DateTime) -> Document {
    let id = resource["id"].as_str().unwrap_or_default().to_string();
    let authority = source_assigning_authority(resource);
    let mut document = Document::new();
    if let Value::Object(fields) = resource {
        for (key, value) in fields {
            if is_internal(key) {
                continue;
            }
            if key == "meta" {
                document.insert("meta", stored_meta(value, version, last_updated));
            } else {
                document.insert(key.clone(), json_to_bson(value));
            }
        }
    }
    if !document.contains_key("meta") {
        document.insert("meta", stored_meta(&Value::Null, version, last_updated));
    }
    document.insert("_uuid", resource_uuid(&id, &authority));
    document.insert("_sourceId", id);
    document.insert("_sourceAssigningAuthority", authority);
    document
}

fn stored_meta(meta: &Value, version: u64, last_updated: DateTime) -> Document {
    let mut stored = match json_to_bson(meta) {
        Bson::Document(stored) => stored,
        _ => Document::new(),
    };
    stored.insert("versionId", version.to_string());
    stored.insert("lastUpdated", last_updated);
    stored
}

/// The stored document as FHIR JSON: `_`-prefixed fields dropped, dates
/// rendered as FHIR instants.
pub fn to_fhir(document: &Document) -> Value {
    Value::Object(
        document
            .iter()
            .filter(|(k, _)| !is_internal(k))
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect(),
    )
}

/// Copies `_` fields of `stored` that `replacement` lacks into it, so a
/// rewrite by the stand-in keeps markers other tools put on the document.
/// Mongo's own `_id` is left out: a replacement keeps it anyway.
pub fn keep_internal_fields(replacement: &mut Document, stored: &Document) {
    for (key, value) in stored {
        if is_internal(key) && key != "_id" && !replacement.contains_key(key) {
            replacement.insert(key.clone(), value.clone());
        }
    }
}

/// A history entry, shaped like a Bundle entry as the reference server
/// writes it. `document` is the stored document at that version.
pub fn history_entry(
    document: &Document,
    request_id: &str,
    method: &str,
    url: &str,
    status: &str,
) -> Document {
    let mut resource = document.clone();
    resource.remove("_id");
    doc! {
        "id": document.get_str("id").unwrap_or_default(),
        "_uuid": document.get_str("_uuid").unwrap_or_default(),
        "resource": resource,
        "request": { "id": request_id, "method": method, "url": url },
        "response": { "status": status },
    }
}

/// JSON to BSON as the Node driver of the reference server stores it:
/// integers as Int32 when they fit, else Int64; other numbers as doubles.
pub fn json_to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i32::try_from(i).map_or(Bson::Int64(i), Bson::Int32)
            } else {
                // u64 above i64::MAX or a fraction; f64 is what JS has anyway.
                n.as_f64().map_or(Bson::Null, Bson::Double)
            }
        }
        Value::String(s) => Bson::String(s.clone()),
        Value::Array(items) => Bson::Array(items.iter().map(json_to_bson).collect()),
        Value::Object(fields) => Bson::Document(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), json_to_bson(v)))
                .collect(),
        ),
    }
}

/// BSON to JSON for responses. Dates become FHIR instants; BSON types with
/// no JSON counterpart (ObjectId, ...) become relaxed Extended JSON.
pub fn bson_to_json(value: &Bson) -> Value {
    match value {
        Bson::DateTime(date) => Value::String(render_instant(*date)),
        Bson::Document(fields) => Value::Object(
            fields
                .iter()
                .map(|(k, v)| (k.clone(), bson_to_json(v)))
                .collect::<Map<String, Value>>(),
        ),
        Bson::Array(items) => Value::Array(items.iter().map(bson_to_json).collect()),
        Bson::Int32(n) => (*n).into(),
        Bson::Int64(n) => (*n).into(),
        Bson::Double(f) => serde_json::Number::from_f64(*f)
            .map(Value::Number)
            .unwrap_or(Value::Null),
        Bson::String(s) => Value::String(s.clone()),
        Bson::Boolean(b) => Value::Bool(*b),
        Bson::Null | Bson::Undefined => Value::Null,
        other => other.clone().into_relaxed_extjson(),
    }
}

/// FHIR instant with milliseconds, e.g. `2026-11-24T03:57:12.123Z`.
pub fn render_instant(date: DateTime) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(date.timestamp_millis())
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

/// The same instant as an HTTP date, for `Last-Modified`.
pub fn http_date(date: DateTime) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(date.timestamp_millis())
        .map(|t| t.format("%a, %d %b %Y %H:%M:%S GMT").to_string())
        .unwrap_or_default()
}

/// `meta.versionId` of a stored document as a number.
pub fn stored_version(document: &Document) -> Option<u64> {
    document
        .get_document("meta")
        .ok()?
        .get_str("versionId")
        .ok()?
        .parse()
        .ok()
}

/// `meta.lastUpdated` of a stored document.
pub fn stored_last_updated(document: &Document) -> Option<DateTime> {
    document
        .get_document("meta")
        .ok()?
        .get_datetime("lastUpdated")
        .ok()
        .copied()
}

/// The instant as JavaScript's `Date.toString()` renders it in UTC, which
/// is what the real server puts in `Last-Modified` of a read:
/// `Wed Dec 02 2026 04:27:59 GMT+0000 (Coordinated Universal Time)`.
pub fn js_date_string(date: DateTime) -> String {
    chrono::DateTime::<chrono::Utc>::from_timestamp_millis(date.timestamp_millis())
        .map(|t| {
            t.format("%a %b %d %Y %H:%M:%S GMT+0000 (Coordinated Universal Time)")
                .to_string()
        })
        .unwrap_or_default()
}

/// FHIR JSON to the stored document as the real server writes it: nested
/// fields as they are (enriched references included), top-level `_` fields
/// only if its resource classes keep them (`keep`), `meta` versioned.
pub fn to_document_keeping(
    resource: &Value,
    keep: &[&str],
    version: u64,
    last_updated: DateTime,
) -> Document {
    let mut document = Document::new();
    if let Value::Object(fields) = resource {
        for (key, value) in fields {
            if is_internal(key) && !keep.contains(&key.as_str()) {
                continue;
            }
            if key == "meta" {
                document.insert("meta", stored_meta(value, version, last_updated));
            } else {
                document.insert(key.clone(), json_to_bson(value));
            }
        }
    }
    if !document.contains_key("meta") {
        document.insert("meta", stored_meta(&Value::Null, version, last_updated));
    }
    document
}

/// The whole stored document as JSON, `_` fields included (Mongo's `_id`
/// left out): what the real server patches and merges.
pub fn to_internal_json(document: &Document) -> Value {
    Value::Object(
        document
            .iter()
            .filter(|(k, _)| k.as_str() != "_id")
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect(),
    )
}

/// A history entry as the real server writes one: `id` is the resource's
/// `_uuid`; `response` is null for a create, and for an update lists the
/// applied patch operations as informational issues.
pub fn real_history_entry(
    document: &Document,
    request_id: &str,
    method: &str,
    url: &str,
    patches: Option<&[Value]>,
) -> Document {
    let mut resource = document.clone();
    resource.remove("_id");
    let response = match patches {
        None => Bson::Null,
        Some(patches) => {
            let issues: Vec<Bson> = patches
                .iter()
                .map(|p| {
                    Bson::Document(doc! {
                        "severity": "information",
                        "code": "informational",
                        "diagnostics": serde_json::to_string(p).unwrap_or_default(),
                    })
                })
                .collect();
            Bson::Document(doc! {
                "status": "200",
                "outcome": { "resourceType": "OperationOutcome", "issue": issues },
            })
        }
    };
    doc! {
        "id": document.get_str("_uuid").unwrap_or_default(),
        "resource": resource,
        "request": { "id": request_id, "method": method, "url": url },
        "response": response,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn owned_group() -> Value {
        json!({"resourceType": "Group", "id": "g1", "quantity": 2, "actual": true,
            "meta": {"versionId": "99", "lastUpdated": "2000-01-01T00:00:00Z",
                     "security": [{"system": OWNER_SYSTEM, "code": "clinic-a"}]},
            "member": [{"entity": {"reference": "Patient/1"}}]})
    }

    #[test]
    fn documents_use_the_reference_layout() {
        let document = to_document(&owned_group(), 3, DateTime::from_millis(1_700_000_000_123));
        let meta = document.get_document("meta").unwrap();
        assert_eq!(meta.get("versionId"), Some(&Bson::String("3".into())));
        assert_eq!(
            meta.get("lastUpdated"),
            Some(&Bson::DateTime(DateTime::from_millis(1_700_000_000_123)))
        );
        assert!(meta.contains_key("security"));
        assert_eq!(document.get_str("_sourceId").unwrap(), "g1");
        assert_eq!(
            document.get_str("_sourceAssigningAuthority").unwrap(),
            "clinic-a"
        );
        assert_eq!(
            document.get_str("_uuid").unwrap(),
            resource_uuid("g1", "clinic-a")
        );
        assert!(!document.contains_key("_id"));
    }

    #[test]
    fn stored_documents_render_as_fhir() {
        let document = to_document(&owned_group(), 3, DateTime::from_millis(1_700_000_000_123));
        let back = to_fhir(&document);
        assert_eq!(back["meta"]["lastUpdated"], "2023-11-14T22:13:20.123Z");
        assert_eq!(back["meta"]["versionId"], "3");
        assert_eq!(back["quantity"], 2);
        assert_eq!(back["actual"], true);
        assert_eq!(back["member"][0]["entity"]["reference"], "Patient/1");
        assert!(back
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with('_')));
    }

    #[test]
    fn meta_is_created_when_absent() {
        let document = to_document(
            &json!({"resourceType": "Patient", "id": "p"}),
            1,
            DateTime::from_millis(0),
        );
        assert_eq!(
            document
                .get_document("meta")
                .unwrap()
                .get_str("versionId")
                .unwrap(),
            "1"
        );
        assert_eq!(
            document.get_str("_sourceAssigningAuthority").unwrap(),
            "default"
        );
        assert_eq!(
            document.get_str("_uuid").unwrap(),
            resource_uuid("p", "default")
        );
    }

    #[test]
    fn clients_cannot_set_internal_fields() {
        let document = to_document(
            &json!({"resourceType": "Group", "id": "g", "_memberStorage": "x", "_uuid": "forged"}),
            1,
            DateTime::now(),
        );
        assert!(!document.contains_key("_memberStorage"));
        assert_eq!(
            document.get_str("_uuid").unwrap(),
            resource_uuid("g", "default")
        );
    }

    #[test]
    fn uuid_is_v5_of_id_and_authority() {
        let expected = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"g1|clinic-a");
        assert_eq!(resource_uuid("g1", "clinic-a"), expected.to_string());
        assert_eq!(expected.get_version_num(), 5);
    }

    #[test]
    fn values_round_trip() {
        let value = json!({"a": [1, -7, 2.5, 1e300, 5_000_000_000i64, "x", true, false, null,
            {"b": {"c": []}}], "d": {}});
        assert_eq!(bson_to_json(&json_to_bson(&value)), value);
    }

    #[test]
    fn integers_are_stored_like_the_node_driver_does() {
        assert_eq!(json_to_bson(&json!(7)), Bson::Int32(7));
        assert_eq!(
            json_to_bson(&json!(5_000_000_000i64)),
            Bson::Int64(5_000_000_000)
        );
        assert_eq!(json_to_bson(&json!(0.5)), Bson::Double(0.5));
        assert_eq!(
            json_to_bson(&json!(u64::MAX)),
            Bson::Double(u64::MAX as f64)
        );
    }

    #[test]
    fn object_key_order_is_kept() {
        let value = json!({"z": 1, "a": 2, "m": 3});
        let back = bson_to_json(&json_to_bson(&value));
        let keys: Vec<_> = back.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys, ["z", "a", "m"]);
    }

    #[test]
    fn instants_have_milliseconds_and_z() {
        assert_eq!(
            render_instant(DateTime::from_millis(1_700_000_000_000)),
            "2023-11-14T22:13:20.000Z"
        );
        assert_eq!(
            http_date(DateTime::from_millis(1_700_000_000_999)),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
    }

    #[test]
    fn non_json_bson_becomes_extended_json() {
        let oid = mongodb::bson::oid::ObjectId::new();
        assert_eq!(
            bson_to_json(&Bson::ObjectId(oid)),
            json!({"$oid": oid.to_hex()})
        );
        assert_eq!(bson_to_json(&Bson::Double(f64::NAN)), Value::Null);
    }

    #[test]
    fn rewrites_keep_markers_of_other_tools() {
        let mut stored = to_document(&owned_group(), 1, DateTime::now());
        stored.insert("_id", mongodb::bson::oid::ObjectId::new());
        stored.insert("_memberStorage", "clickhouse");
        stored.insert("_uuid", "stale");
        let mut replacement = to_document(&owned_group(), 2, DateTime::now());
        keep_internal_fields(&mut replacement, &stored);
        assert_eq!(replacement.get_str("_memberStorage").unwrap(), "clickhouse");
        // The replacement's own server fields win over the stored ones.
        assert_eq!(
            replacement.get_str("_uuid").unwrap(),
            resource_uuid("g1", "clinic-a")
        );
        assert!(!replacement.contains_key("_id"));
    }

    #[test]
    fn last_modified_can_be_rendered_like_javascript_dates() {
        assert_eq!(
            js_date_string(DateTime::from_millis(1_700_000_000_999)),
            "Tue Nov 14 2023 22:13:20 GMT+0000 (Coordinated Universal Time)"
        );
    }

    #[test]
    fn real_history_entries_are_keyed_by_uuid_and_list_patches_of_updates() {
        let mut document = to_document_keeping(
            &json!({"resourceType": "Group", "id": "g1", "_uuid": "u-1", "_other": 1}),
            &["_uuid"],
            2,
            DateTime::from_millis(5),
        );
        assert!(!document.contains_key("_other"));
        document.insert("_id", mongodb::bson::oid::ObjectId::new());
        let created = real_history_entry(&document, "r", "PUT", "/4_0_0/Group/g1", None);
        assert_eq!(created.get_str("id").unwrap(), "u-1");
        assert_eq!(created.get("response"), Some(&Bson::Null));
        assert!(!created
            .get_document("resource")
            .unwrap()
            .contains_key("_id"));
        let patch = json!({"op": "add", "path": "/name", "value": "x"});
        let updated =
            real_history_entry(&document, "r", "PATCH", "/4_0_0/Group/g1", Some(&[patch]));
        let response = updated.get_document("response").unwrap();
        assert_eq!(response.get_str("status").unwrap(), "200");
        let issue = response
            .get_document("outcome")
            .unwrap()
            .get_array("issue")
            .unwrap()[0]
            .as_document()
            .unwrap()
            .clone();
        assert_eq!(
            issue.get_str("diagnostics").unwrap(),
            r#"{"op":"add","path":"/name","value":"x"}"#
        );
    }

    #[test]
    fn history_entries_are_bundle_entries() {
        let mut document = to_document(&owned_group(), 4, DateTime::from_millis(5));
        document.insert("_id", mongodb::bson::oid::ObjectId::new());
        let entry = history_entry(&document, "req-1", "PATCH", "/4_0_0/Group/g1", "200");
        assert_eq!(entry.get_str("id").unwrap(), "g1");
        assert_eq!(
            entry.get_str("_uuid").unwrap(),
            resource_uuid("g1", "clinic-a")
        );
        let resource = entry.get_document("resource").unwrap();
        assert!(!resource.contains_key("_id"));
        assert_eq!(stored_version(resource), Some(4));
        assert_eq!(
            stored_last_updated(resource),
            Some(DateTime::from_millis(5))
        );
        let request = entry.get_document("request").unwrap();
        assert_eq!(request.get_str("method").unwrap(), "PATCH");
        assert_eq!(request.get_str("url").unwrap(), "/4_0_0/Group/g1");
        assert_eq!(request.get_str("id").unwrap(), "req-1");
        assert_eq!(
            entry
                .get_document("response")
                .unwrap()
                .get_str("status")
                .unwrap(),
            "200"
        );
    }
}
