//! FHIR JSON <-> stored MongoDB documents, in the layout of the Mongo-backed
//! reference server: FHIR JSON plus `_uuid`, `_sourceId`,
//! `_sourceAssigningAuthority`; `meta.versionId` a string, `meta.lastUpdated`
//! a BSON date. Pure functions.

use mongodb::bson::{Bson, DateTime, Document};
use serde_json::{Map, Value};

const OWNER_SYSTEM: &str = "https://www.icanbwell.com/owner";

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
        .unwrap_or("default")
        .to_string()
}

/// `_uuid`: UUIDv5 of `id|authority` (URL namespace), stable across versions.
pub fn resource_uuid(id: &str, authority: &str) -> String {
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("{id}|{authority}").as_bytes(),
    )
    .to_string()
}

/// FHIR JSON to the stored document, with the given version and time.
pub fn to_document(resource: &Value, version: u64, last_updated: DateTime) -> Document {
    let id = resource["id"].as_str().unwrap_or_default().to_string();
    let authority = source_assigning_authority(resource);
    let mut document = Document::new();
    if let Value::Object(fields) = resource {
        for (key, value) in fields {
            if key == "meta" {
                continue;
            }
            document.insert(key.clone(), json_to_bson(value));
        }
    }
    let mut meta = match resource.get("meta").map(json_to_bson) {
        Some(Bson::Document(meta)) => meta,
        _ => Document::new(),
    };
    meta.insert("versionId", version.to_string());
    meta.insert("lastUpdated", last_updated);
    document.insert("meta", meta);
    document.insert("_uuid", resource_uuid(&id, &authority));
    document.insert("_sourceId", id);
    document.insert("_sourceAssigningAuthority", authority);
    document
}

/// The stored document as FHIR JSON: `_`-prefixed fields dropped, dates rendered.
pub fn to_fhir(document: &Document) -> Value {
    Value::Object(
        document
            .iter()
            .filter(|(k, _)| !k.starts_with('_'))
            .map(|(k, v)| (k.clone(), bson_to_json(v)))
            .collect(),
    )
}

/// Fields of a stored document that are not FHIR (`_uuid`, markers of other
/// tools): kept across the stand-in's own rewrites.
pub fn internal_fields(document: &Document) -> Document {
    document
        .iter()
        .filter(|(k, _)| k.starts_with('_') && k.as_str() != "_id")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

pub fn json_to_bson(value: &Value) -> Bson {
    match value {
        Value::Null => Bson::Null,
        Value::Bool(b) => Bson::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => Bson::Int64(i),
            (None, Some(f)) => Bson::Double(f),
            _ => Bson::Null,
        },
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

/// `meta.versionId` of a stored document.
pub fn stored_version(document: &Document) -> Option<u64> {
    document
        .get_document("meta")
        .ok()?
        .get_str("versionId")
        .ok()?
        .parse()
        .ok()
}

pub fn stored_last_updated(document: &Document) -> Option<DateTime> {
    document
        .get_document("meta")
        .ok()?
        .get_datetime("lastUpdated")
        .ok()
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn documents_use_the_reference_layout() {
        let resource = json!({"resourceType": "Group", "id": "g1", "quantity": 2, "actual": true,
            "meta": {"security": [{"system": OWNER_SYSTEM, "code": "clinic-a"}]}, "member": [{"entity": {"reference": "Patient/1"}}]});
        let document = to_document(&resource, 3, DateTime::from_millis(1_700_000_000_123));
        let meta = document.get_document("meta").unwrap();
        assert_eq!(meta.get("versionId"), Some(&Bson::String("3".into())));
        assert!(matches!(meta.get("lastUpdated"), Some(Bson::DateTime(_))));
        assert_eq!(
            document.get_str("_sourceAssigningAuthority").unwrap(),
            "clinic-a"
        );
        assert_eq!(
            document.get_str("_uuid").unwrap(),
            resource_uuid("g1", "clinic-a")
        );

        let back = to_fhir(&document);
        assert_eq!(back["meta"]["lastUpdated"], "2023-11-14T22:13:20.123Z");
        assert_eq!(back["meta"]["versionId"], "3");
        assert_eq!(back["quantity"], 2);
        assert_eq!(back["member"][0]["entity"]["reference"], "Patient/1");
        assert!(back.get("_uuid").is_none());
    }

    #[test]
    fn values_round_trip() {
        let value = json!({"a": [1, 2.5, "x", true, null, {"b": -7}]});
        assert_eq!(bson_to_json(&json_to_bson(&value)), value);
    }

    #[test]
    fn internal_fields_are_kept_apart() {
        let mut document = to_document(
            &json!({"resourceType": "Group", "id": "g"}),
            1,
            DateTime::now(),
        );
        document.insert("_memberCommitToken", "t");
        let internal = internal_fields(&document);
        assert!(internal.contains_key("_uuid") && internal.contains_key("_memberCommitToken"));
        assert!(!internal.contains_key("resourceType"));
    }
}
