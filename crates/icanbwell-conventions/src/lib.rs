//! The conventions of the Mongo-backed reference server
//! (icanbwell/fhir-server) for the fields it keeps on stored resources and
//! the enrichment of its responses, as pure functions on JSON. Shared by the
//! proxy (which stores and answers members as that server does) and its
//! stand-in (which imitates that server); both are checked against the real
//! server by hand, not against each other.
//!
//! Before a write it computes, in this order: `_sourceId` (the id);
//! `_access` (one key per `https://www.icanbwell.com/access` tag code, value
//! 1); an owner tag from the first access tag when there is none; the
//! `sourceAssigningAuthority` tag from the owner tag when there is none, and
//! `_sourceAssigningAuthority` from it; `_uuid` (the id when it is a UUID,
//! else UUIDv5 of `id|authority` in the OID namespace); and on every
//! reference `_uuid`, `_sourceId` and `_sourceAssigningAuthority`. It also
//! drops the identifiers and reference extensions it adds to responses, so a
//! response sent back is stored as before.
//!
//! A response carries none of the `_` fields: references get them as
//! `extension`s and the resource gets `identifier` entries instead.

use serde_json::{json, Map, Value};

/// Security tag system naming the owning organisation.
pub const OWNER_SYSTEM: &str = "https://www.icanbwell.com/owner";

/// Authority used when a resource carries no owner tag.
pub const DEFAULT_AUTHORITY: &str = "default";

pub const ACCESS_SYSTEM: &str = "https://www.icanbwell.com/access";
pub const SOURCE_ASSIGNING_AUTHORITY_SYSTEM: &str =
    "https://www.icanbwell.com/sourceAssigningAuthority";
pub const SOURCE_ID_SYSTEM: &str = "https://www.icanbwell.com/sourceId";
pub const UUID_SYSTEM: &str = "https://www.icanbwell.com/uuid";

/// Top-level `_` fields the real server's resource classes keep; every
/// other top-level `_` field is dropped on each write.
pub const KEPT_INTERNAL_FIELDS: [&str; 4] =
    ["_uuid", "_sourceId", "_sourceAssigningAuthority", "_access"];

/// The `_` fields it puts on references.
pub const REFERENCE_FIELDS: [&str; 3] = ["_uuid", "_sourceId", "_sourceAssigningAuthority"];

/// Whether a stored value (text) holds any reference field, so that its
/// presentation differs from its stored form. A cheap screen before parsing.
pub fn has_reference_fields(stored: &str) -> bool {
    REFERENCE_FIELDS
        .iter()
        .any(|field| stored.contains(&format!("\"{field}\"")))
}

/// UUIDv5 in the namespace the real server uses (the RFC 4122 OID namespace).
pub fn uuid_v5(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// Whether the real server takes `text` for a UUID: a valid UUID, or any
/// text containing a lower-case 8-4-4-4-12 hex group.
pub fn is_uuid(text: &str) -> bool {
    if text.len() == 36 && uuid::Uuid::try_parse(text).is_ok() {
        return true;
    }
    let bytes = text.as_bytes();
    let groups = [8usize, 4, 4, 4, 12];
    (0..bytes.len()).any(|start| {
        let mut at = start;
        for (n, len) in groups.iter().enumerate() {
            if n > 0 {
                if bytes.get(at) != Some(&b'-') {
                    return false;
                }
                at += 1;
            }
            let Some(group) = bytes.get(at..at + len) else {
                return false;
            };
            if !group
                .iter()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
            {
                return false;
            }
            at += len;
        }
        true
    })
}

fn security_codes(resource: &Value, system: &str) -> Vec<String> {
    let mut codes: Vec<String> = Vec::new();
    if let Some(tags) = resource.pointer("/meta/security").and_then(Value::as_array) {
        for tag in tags {
            if tag["system"] == system {
                if let Some(code) = tag["code"].as_str() {
                    if !codes.iter().any(|c| c == code) {
                        codes.push(code.to_string());
                    }
                }
            }
        }
    }
    codes
}

/// Whether a write carries what the real server requires: `meta.source`
/// and an owner tag. `Err` holds its refusal's wording.
pub fn check_meta(resource: &Value) -> Result<(), String> {
    let has_source = resource
        .pointer("/meta/source")
        .and_then(Value::as_str)
        .is_some_and(|s| !s.is_empty());
    if !has_source {
        return Err(
            "Unable to create/update resource. Missing either metadata or metadata source."
                .to_string(),
        );
    }
    if security_codes(resource, OWNER_SYSTEM).is_empty() {
        return Err(format!(
            "Resource {}/{} is missing a security access tag with system: {OWNER_SYSTEM}",
            resource["resourceType"].as_str().unwrap_or_default(),
            resource["id"].as_str().unwrap_or_default()
        ));
    }
    Ok(())
}

/// Removes what a client may not set: top-level `_` fields, the `_` fields
/// of references, and (as the real server does before storing) the
/// identifiers and reference extensions its responses add.
pub fn strip_client_internal(resource: &mut Value) {
    if let Value::Object(fields) = resource {
        fields.retain(|key, _| !key.starts_with('_'));
    }
    for_each_reference(resource, &mut |reference| {
        for field in REFERENCE_FIELDS {
            reference.remove(field);
        }
    });
}

/// The real server's pre-save bookkeeping (see the module docs).
pub fn presave(resource: &mut Value) {
    let authority = presave_resource(resource);
    presave_references(resource, &authority);
}

/// The top-level part of [`presave`]; returns the resource's authority.
pub fn presave_resource(resource: &mut Value) -> String {
    let Value::Object(fields) = resource else {
        return DEFAULT_AUTHORITY.to_string();
    };
    let id = fields
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    if !fields.contains_key("_sourceId") {
        fields.insert("_sourceId".into(), json!(id));
    }
    remove_identifiers(fields);
    let access = security_codes(resource, ACCESS_SYSTEM);
    update_access(resource, &access);
    if security_codes(resource, OWNER_SYSTEM).is_empty() {
        if let Some(first) = access.first() {
            push_security(resource, OWNER_SYSTEM, first);
        }
    }
    let mut authorities = security_codes(resource, SOURCE_ASSIGNING_AUTHORITY_SYSTEM);
    if authorities.is_empty() {
        authorities = security_codes(resource, OWNER_SYSTEM);
        if let Some(first) = authorities.first() {
            push_security(resource, SOURCE_ASSIGNING_AUTHORITY_SYSTEM, first);
        }
    }
    let authority = authorities
        .first()
        .cloned()
        .or_else(|| {
            resource["_sourceAssigningAuthority"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| DEFAULT_AUTHORITY.to_string());
    let uuid = if is_uuid(&id) {
        id.clone()
    } else if id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        uuid_v5(&format!("{id}|{authority}"))
    };
    if let Value::Object(fields) = resource {
        fields.insert("_sourceAssigningAuthority".into(), json!(authority));
        fields.insert("_uuid".into(), json!(uuid));
    }
    authority
}

/// The reference part of [`presave`]: every reference gets `_uuid`,
/// `_sourceId` and `_sourceAssigningAuthority` (by default `authority`).
pub fn presave_references(resource: &mut Value, authority: &str) {
    for_each_reference(resource, &mut |reference| {
        enrich_reference(reference, authority)
    });
}

/// Drops the sourceId and uuid identifiers (responses add them again).
fn remove_identifiers(fields: &mut Map<String, Value>) {
    if let Some(Value::Array(identifiers)) = fields.get_mut("identifier") {
        identifiers.retain(|i| i["system"] != SOURCE_ID_SYSTEM && i["system"] != UUID_SYSTEM);
        if identifiers.is_empty() {
            fields.remove("identifier");
        }
    }
}

fn update_access(resource: &mut Value, codes: &[String]) {
    if !resource
        .pointer("/meta/security")
        .is_some_and(Value::is_array)
    {
        return;
    }
    let Value::Object(fields) = resource else {
        return;
    };
    if let Some(Value::Object(access)) = fields.get_mut("_access") {
        access.retain(|code, _| codes.iter().any(|c| c == code));
    }
    if !codes.is_empty() {
        let access = fields
            .entry("_access")
            .or_insert_with(|| Value::Object(Map::new()));
        if !access.is_object() {
            *access = Value::Object(Map::new());
        }
        if let Value::Object(access) = access {
            for code in codes {
                access.insert(code.clone(), json!(1));
            }
        }
    }
}

fn push_security(resource: &mut Value, system: &str, code: &str) {
    if let Some(Value::Array(tags)) = resource.pointer_mut("/meta/security") {
        tags.push(json!({"system": system, "code": code}));
    }
}

/// Calls `f` on every object below the root that has a string `reference`
/// (FHIR `Reference`s: `member[].entity`, `managingEntity`, ...).
fn for_each_reference(value: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>)) {
    fn walk(value: &mut Value, f: &mut dyn FnMut(&mut Map<String, Value>), root: bool) {
        match value {
            Value::Object(fields) => {
                if !root && fields.get("reference").is_some_and(Value::is_string) {
                    f(fields);
                }
                for (_, child) in fields.iter_mut() {
                    walk(child, f, false);
                }
            }
            Value::Array(items) => {
                for item in items {
                    walk(item, f, false);
                }
            }
            _ => {}
        }
    }
    walk(value, f, true)
}

fn enrich_reference(reference: &mut Map<String, Value>, resource_authority: &str) {
    let Some(text) = reference.get("reference").and_then(Value::as_str) else {
        return;
    };
    let parts: Vec<&str> = text.split('/').collect();
    let resource_type = (parts.len() > 1).then(|| parts[0]);
    let mut target_id = parts.last().copied().unwrap_or_default().to_string();
    let mut authority = resource_authority.to_string();
    if let Some((id, named_authority)) = target_id.clone().split_once('|') {
        target_id = id.to_string();
        authority = named_authority.to_string();
    } else if let Some(own) = reference
        .get("_sourceAssigningAuthority")
        .and_then(Value::as_str)
    {
        authority = own.to_string();
    }
    let uuid = if is_uuid(&target_id) {
        target_id.clone()
    } else {
        uuid_v5(&format!("{target_id}|{authority}"))
    };
    let prefix = resource_type.map(|t| format!("{t}/")).unwrap_or_default();
    // In the order the real server stores them.
    reference.insert("_sourceAssigningAuthority".into(), json!(authority));
    reference.insert("_uuid".into(), json!(format!("{prefix}{uuid}")));
    reference.insert("_sourceId".into(), json!(format!("{prefix}{target_id}")));
    if let Some(Value::Array(extensions)) = reference.get_mut("extension") {
        extensions.retain(|e| {
            e["url"] != UUID_SYSTEM
                && e["url"] != SOURCE_ID_SYSTEM
                && e["url"] != SOURCE_ASSIGNING_AUTHORITY_SYSTEM
        });
        if extensions.is_empty() {
            reference.remove("extension");
        }
    }
}

/// A stored resource (as JSON, `_` fields and all) as the real server
/// answers it: no `_` fields; references with extensions [sourceId, uuid,
/// sourceAssigningAuthority]; `identifier` gets [sourceId, uuid].
pub fn present(stored: &Value) -> Value {
    let mut resource = stored.clone();
    let uuid = stored["_uuid"].as_str().map(str::to_string);
    let source_id = stored["_sourceId"].as_str().map(str::to_string);
    if let Value::Object(fields) = &mut resource {
        fields.retain(|key, _| !key.starts_with('_'));
    }
    present_references(&mut resource);
    if let Value::Object(fields) = &mut resource {
        let mut identifiers = match fields.remove("identifier") {
            Some(Value::Array(identifiers)) => identifiers,
            Some(other) => vec![other],
            None => Vec::new(),
        };
        for (id, system, value) in [
            ("sourceId", SOURCE_ID_SYSTEM, source_id),
            ("uuid", UUID_SYSTEM, uuid),
        ] {
            let Some(value) = value else { continue };
            match identifiers.iter_mut().find(|i| i["system"] == system) {
                Some(existing) => existing["value"] = json!(value),
                None => identifiers.push(json!({"id": id, "system": system, "value": value})),
            }
        }
        if !identifiers.is_empty() {
            fields.insert("identifier".into(), Value::Array(identifiers));
        }
    }
    resource
}

/// Every reference below `value` (not `value` itself) as responses show it:
/// its `_` fields become `extension`s. References without them are left
/// exactly as they are.
pub fn present_references(value: &mut Value) {
    for_each_reference(value, &mut |reference| {
        if REFERENCE_FIELDS.iter().any(|f| reference.contains_key(*f)) {
            present_reference(reference)
        }
    });
}

fn present_reference(reference: &mut Map<String, Value>) {
    let uuid = reference.remove("_uuid");
    let source_id = reference.remove("_sourceId").or_else(|| uuid.clone());
    let authority = reference.remove("_sourceAssigningAuthority");
    let mut extensions = match reference.remove("extension") {
        Some(Value::Array(extensions)) => extensions,
        _ => Vec::new(),
    };
    for (id, url, value) in [
        ("sourceId", SOURCE_ID_SYSTEM, source_id),
        ("uuid", UUID_SYSTEM, uuid),
        (
            "sourceAssigningAuthority",
            SOURCE_ASSIGNING_AUTHORITY_SYSTEM,
            authority,
        ),
    ] {
        let Some(value) = value.filter(|v| !v.is_null()) else {
            continue;
        };
        match extensions.iter_mut().find(|e| e["url"] == url) {
            Some(existing) => existing["valueString"] = value,
            None => extensions.push(json!({"id": id, "url": url, "valueString": value})),
        }
    }
    if !extensions.is_empty() {
        reference.insert("extension".into(), Value::Array(extensions));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned_group() -> Value {
        json!({
            "resourceType": "Group", "id": "g1", "actual": true, "type": "person",
            "meta": {"source": "http://test/source", "security": [
                {"system": OWNER_SYSTEM, "code": "bwell"},
                {"system": ACCESS_SYSTEM, "code": "bwell"}
            ]},
            "member": [{"entity": {"reference": "Patient/1"}}]
        })
    }

    #[test]
    fn the_uuid_namespace_is_the_oid_namespace() {
        assert_eq!(
            uuid_v5("g1|bwell"),
            uuid::Uuid::new_v5(
                &uuid::Uuid::parse_str("6ba7b812-9dad-11d1-80b4-00c04fd430c8").unwrap(),
                b"g1|bwell"
            )
            .to_string()
        );
    }

    #[test]
    fn uuids_are_recognised_like_the_real_server_does() {
        assert!(is_uuid("0b3a52f2-5a38-4c9a-8a55-2b2f4c0c2f11"));
        assert!(is_uuid("0B3A52F2-5A38-4C9A-8A55-2B2F4C0C2F11"));
        assert!(is_uuid("x-0b3a52f2-5a38-4c9a-8a55-2b2f4c0c2f11"));
        assert!(!is_uuid("g1"));
        assert!(!is_uuid("0b3a52f2-5a38-4c9a-8a55"));
    }

    #[test]
    fn presave_adds_the_real_servers_internal_fields() {
        let mut group = owned_group();
        presave(&mut group);
        assert_eq!(group["_sourceId"], "g1");
        assert_eq!(group["_sourceAssigningAuthority"], "bwell");
        assert_eq!(group["_uuid"], uuid_v5("g1|bwell"));
        assert_eq!(group["_access"], json!({"bwell": 1}));
        let tags = group["meta"]["security"].as_array().unwrap();
        assert!(
            tags.contains(&json!({"system": SOURCE_ASSIGNING_AUTHORITY_SYSTEM, "code": "bwell"}))
        );
        let entity = &group["member"][0]["entity"];
        assert_eq!(entity["_sourceId"], "Patient/1");
        assert_eq!(entity["_uuid"], format!("Patient/{}", uuid_v5("1|bwell")));
        assert_eq!(entity["_sourceAssigningAuthority"], "bwell");
        // Idempotent: a second pass adds no second tag.
        let once = group.clone();
        presave(&mut group);
        assert_eq!(group, once);
    }

    #[test]
    fn references_may_name_their_own_authority() {
        let mut group = owned_group();
        group["member"][0]["entity"]["reference"] = json!("Patient/7|other");
        presave(&mut group);
        let entity = &group["member"][0]["entity"];
        assert_eq!(entity["_sourceId"], "Patient/7");
        assert_eq!(entity["_sourceAssigningAuthority"], "other");
        assert_eq!(entity["_uuid"], format!("Patient/{}", uuid_v5("7|other")));
    }

    #[test]
    fn responses_carry_extensions_and_identifiers_instead_of_internal_fields() {
        let mut group = owned_group();
        presave(&mut group);
        let shown = present(&group);
        assert!(shown
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with('_')));
        let entity = &shown["member"][0]["entity"];
        assert!(entity.get("_uuid").is_none());
        let extensions = entity["extension"].as_array().unwrap();
        assert_eq!(extensions.len(), 3);
        assert_eq!(
            extensions[0],
            json!({"id": "sourceId", "url": SOURCE_ID_SYSTEM, "valueString": "Patient/1"})
        );
        assert_eq!(extensions[1]["url"], UUID_SYSTEM);
        assert_eq!(extensions[2]["valueString"], "bwell");
        assert_eq!(
            shown["identifier"],
            json!([
                {"id": "sourceId", "system": SOURCE_ID_SYSTEM, "value": "g1"},
                {"id": "uuid", "system": UUID_SYSTEM, "value": uuid_v5("g1|bwell")}
            ])
        );
        // Sent back, it is stored as before.
        let mut again = shown.clone();
        strip_client_internal(&mut again);
        presave(&mut again);
        assert_eq!(again, group);
    }

    #[test]
    fn meta_source_and_owner_are_required() {
        assert!(check_meta(&owned_group()).is_ok());
        let mut no_source = owned_group();
        no_source["meta"].as_object_mut().unwrap().remove("source");
        assert_eq!(
            check_meta(&no_source).unwrap_err(),
            "Unable to create/update resource. Missing either metadata or metadata source."
        );
        let mut no_owner = owned_group();
        no_owner["meta"]["security"] = json!([]);
        assert!(check_meta(&no_owner).unwrap_err().contains(OWNER_SYSTEM));
    }

    #[test]
    fn references_without_internal_fields_are_presented_exactly_as_stored() {
        let mut member = json!({"entity": {"extension": [{"url": "x", "valueString": "y"}], "reference": "Patient/1"}});
        let before = member.clone();
        present_references(&mut member);
        assert_eq!(member.to_string(), before.to_string());
        assert!(!has_reference_fields(&member.to_string()));
        presave_references(&mut member, "bwell");
        assert!(has_reference_fields(&member.to_string()));
        let keys: Vec<&String> = member["entity"].as_object().unwrap().keys().collect();
        assert_eq!(
            keys,
            [
                "extension",
                "reference",
                "_sourceAssigningAuthority",
                "_uuid",
                "_sourceId"
            ],
            "stored in the real server's order"
        );
    }
}
