//! Shaping a Group read whose members live in ClickHouse. Pure: the members
//! are streamed between a prefix and a suffix computed here.

use serde_json::{json, Value};

/// The default base of the proxy's own extension URLs (`fhir.extension_base`):
/// a URN, since no StructureDefinition is published for them. An operator
/// who publishes them sets its own canonical base.
pub const DEFAULT_EXTENSION_BASE: &str = "urn:fhir-group-proxy:extension:";

/// Extension on a Group read that names where its members can be paged.
pub fn members_paged_extension(extension_base: &str) -> String {
    format!("{extension_base}members-paged")
}

/// Extension on a member listed by `$members?_since=` that was removed.
pub fn member_removed_extension(extension_base: &str) -> String {
    format!("{extension_base}member-removed")
}

/// Whether a read asks for the roster (`_summary`, `_elements`).
pub fn wants_members(query: Option<&str>) -> bool {
    let mut wants = true;
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "_summary" => wants &= matches!(value.as_ref(), "false" | "data"),
            "_elements" => wants &= value.split(',').any(|e| e.trim() == "member"),
            _ => {}
        }
    }
    wants
}

/// The Group as read from the legacy server, with the counts from the member
/// store: `quantity` set, any stale inline `member` removed.
pub fn with_quantity(mut group: Value, active_members: i64) -> Value {
    if let Some(object) = group.as_object_mut() {
        object.remove("member");
        object.insert("quantity".into(), json!(active_members.max(0)));
    }
    group
}

/// A Group listed in an answer (a search, a write's reply) with the roster
/// the member store holds for it: `members` as stored and presented, or,
/// when too many to inline, their active count and where to page them.
pub enum ListedRoster<'a> {
    Members(&'a [Value]),
    Paged {
        active_members: i64,
        members_url: &'a str,
        extension_base: &'a str,
    },
}

/// `group` as the legacy server holds it (no `member`), shown with its
/// roster: `member` (none at all when empty: FHIR JSON has no empty
/// arrays) and `quantity`, or `quantity` and a `$members` link.
pub fn with_listed_roster(group: Value, roster: ListedRoster<'_>) -> Value {
    match roster {
        ListedRoster::Members(members) => {
            let active = members
                .iter()
                .filter(|m| crate::fhir::member_array::is_active(m))
                .count();
            let mut group = with_quantity(group, active as i64);
            if let (Some(object), false) = (group.as_object_mut(), members.is_empty()) {
                object.insert("member".into(), Value::Array(members.to_vec()));
            }
            group
        }
        ListedRoster::Paged {
            active_members,
            members_url,
            extension_base,
        } => with_paging_link(
            with_quantity(group, active_members),
            members_url,
            extension_base,
        ),
    }
}

/// Points a read that left the roster out (too large) at the paging operation.
pub fn with_paging_link(mut group: Value, members_url: &str, extension_base: &str) -> Value {
    if let Some(object) = group.as_object_mut() {
        let extension = json!({
            "url": members_paged_extension(extension_base),
            "valueUri": members_url
        });
        match object.get_mut("extension").and_then(Value::as_array_mut) {
            Some(list) => list.push(extension),
            None => {
                object.insert("extension".into(), json!([extension]));
            }
        }
    }
    group
}

/// One page of `$members`: a searchset Bundle whose single entry is the Group
/// holding this page's members (a Bundle entry must be a resource, and a
/// member is not one), with `total` members and `next` for the following page.
pub fn members_page(
    group: Value,
    members: Vec<Value>,
    total: i64,
    self_url: &str,
    next_url: Option<&str>,
) -> Value {
    let mut group = group;
    if let Some(object) = group.as_object_mut() {
        object.insert("member".into(), Value::Array(members));
    }
    let mut links = vec![json!({ "relation": "self", "url": self_url })];
    if let Some(next) = next_url {
        links.push(json!({ "relation": "next", "url": next }));
    }
    json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total.max(0),
        "link": links,
        "entry": [{ "resource": group, "search": { "mode": "match" } }]
    })
}

/// `_count` and `_cursor` of a `$members` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub count: usize,
    /// Where the previous page ended ("" for the first page), see [`split_cursor`].
    pub cursor: String,
    /// `_since` as Unix milliseconds: list members changed after it,
    /// removed ones included.
    pub since_ms: Option<u64>,
}

/// A member removed since `_since`: the element it last had, marked
/// removed (its own extensions kept).
pub fn removed_member_json(mut member: Value, extension_base: &str) -> Value {
    if let Some(object) = member.as_object_mut() {
        let marker =
            json!({ "url": member_removed_extension(extension_base), "valueBoolean": true });
        match object.get_mut("extension").and_then(Value::as_array_mut) {
            Some(extensions) => extensions.push(marker),
            None => {
                object.insert("extension".into(), json!([marker]));
            }
        }
        object.insert("inactive".into(), json!(true));
    }
    member
}

/// A stored member element (JSON text) as the legacy server shows it: for
/// servers of the reference server's kind, the internal fields it keeps on
/// references become `extension`s; every other element is returned as
/// stored, byte for byte, without being parsed.
pub fn presented_member(stored: &str) -> std::borrow::Cow<'_, str> {
    if !icanbwell_conventions::has_reference_fields(stored) {
        return std::borrow::Cow::Borrowed(stored);
    }
    match serde_json::from_str::<Value>(stored) {
        Ok(mut element) => {
            icanbwell_conventions::present_references(&mut element);
            std::borrow::Cow::Owned(element.to_string())
        }
        // Not ours to repair here: a read shows what is stored.
        Err(_) => std::borrow::Cow::Borrowed(stored),
    }
}

/// A `$members` cursor: the order key and slot id of the last member of
/// the previous page, `key.slot` (neither holds a `.`); `("", "")` first.
pub fn split_cursor(cursor: &str) -> (&str, &str) {
    cursor.split_once('.').unwrap_or((cursor, ""))
}

/// The cursor after a member.
pub fn cursor_after(order_key: &str, slot_id: &str) -> String {
    format!("{order_key}.{slot_id}")
}

pub const MAX_PAGE_SIZE: usize = 1_000;

pub fn page_request(query: Option<&str>) -> Result<PageRequest, String> {
    let mut page = PageRequest {
        count: 100,
        cursor: String::new(),
        since_ms: None,
    };
    for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match key.as_ref() {
            "_count" => {
                page.count = value
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=MAX_PAGE_SIZE).contains(n))
                    .ok_or_else(|| {
                        format!("_count must be between 1 and {MAX_PAGE_SIZE}, not '{value}'")
                    })?;
            }
            "_cursor" => page.cursor = value.into_owned(),
            "_since" => {
                let instant = chrono::DateTime::parse_from_rfc3339(&value).map_err(|_| {
                    format!("_since '{value}' is not a FHIR instant like 2026-01-31T12:00:00Z")
                })?;
                page.since_ms = Some(instant.timestamp_millis().max(0) as u64);
            }
            _ => {}
        }
    }
    Ok(page)
}

/// The JSON text of `group` split where a `"member":[ ... ]` array goes, so
/// members can be streamed between the two parts.
pub fn split_around_members(group: &Value) -> (Vec<u8>, Vec<u8>) {
    let mut text = serde_json::to_vec(group).unwrap_or_else(|_| b"{}".to_vec());
    // A serialized object always ends with '}'.
    text.pop();
    if text.len() > 1 {
        text.push(b',');
    }
    text.extend_from_slice(b"\"member\":[");
    (text, b"]}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_groups_get_their_roster_or_its_count_and_link() {
        let group = json!({"resourceType": "Group", "id": "g", "member": []});
        let members = [
            json!({"entity": {"reference": "Patient/1"}}),
            json!({"entity": {"reference": "Patient/2"}, "inactive": true}),
        ];
        let shown = with_listed_roster(group.clone(), ListedRoster::Members(&members));
        assert_eq!(shown["member"], json!(members));
        assert_eq!(shown["quantity"], 1);
        let empty = with_listed_roster(group.clone(), ListedRoster::Members(&[]));
        assert!(empty.get("member").is_none(), "no empty array: {empty}");
        assert_eq!(empty["quantity"], 0);
        let paged = with_listed_roster(
            group,
            ListedRoster::Paged {
                active_members: 20_000,
                members_url: "/4_0_0/Group/g/$members",
                extension_base: DEFAULT_EXTENSION_BASE,
            },
        );
        assert!(paged.get("member").is_none());
        assert_eq!(paged["quantity"], 20_000);
        assert_eq!(paged["extension"][0]["valueUri"], "/4_0_0/Group/g/$members");
    }

    #[test]
    fn members_stored_with_reference_fields_are_shown_with_extensions_instead() {
        let stored = r#"{"entity":{"reference":"Patient/1","_sourceAssigningAuthority":"bwell","_uuid":"Patient/u1","_sourceId":"Patient/1"},"inactive":false}"#;
        let shown: Value = serde_json::from_str(&presented_member(stored)).unwrap();
        assert_eq!(
            shown,
            json!({"entity": {"reference": "Patient/1", "extension": [
                {"id": "sourceId", "url": "https://www.icanbwell.com/sourceId", "valueString": "Patient/1"},
                {"id": "uuid", "url": "https://www.icanbwell.com/uuid", "valueString": "Patient/u1"},
                {"id": "sourceAssigningAuthority", "url": "https://www.icanbwell.com/sourceAssigningAuthority", "valueString": "bwell"}
            ]}, "inactive": false})
        );
    }

    #[test]
    fn members_without_reference_fields_are_shown_byte_for_byte() {
        let stored = r#"{"entity": {"reference":"Patient/1"} , "id":"x"}"#;
        assert!(matches!(presented_member(stored), std::borrow::Cow::Borrowed(s) if s == stored));
    }

    #[test]
    fn summary_and_elements_decide_the_roster() {
        assert!(wants_members(None));
        assert!(wants_members(Some("_summary=false")));
        assert!(wants_members(Some("_summary=data&_format=json")));
        assert!(!wants_members(Some("_summary=true")));
        assert!(!wants_members(Some("_summary=count")));
        assert!(!wants_members(Some("_elements=id,quantity")));
        assert!(wants_members(Some("_elements=quantity,member")));
    }

    #[test]
    fn streamed_parts_make_valid_json() {
        let group = with_quantity(
            json!({"resourceType": "Group", "id": "g", "member": [1]}),
            2,
        );
        let (prefix, suffix) = split_around_members(&group);
        let a = json!({"entity": {"reference": "Patient/1"}});
        let b = json!({"entity": {"reference": "Patient/2"}, "period": {"start": "2024"}, "inactive": true});
        let mut text = prefix;
        text.extend(serde_json::to_vec(&a).unwrap());
        text.push(b',');
        text.extend(serde_json::to_vec(&b).unwrap());
        text.extend(suffix);
        let parsed: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(parsed["quantity"], 2);
        assert_eq!(parsed["member"][0]["entity"]["reference"], "Patient/1");
        assert_eq!(parsed["member"][1]["period"]["start"], "2024");
        assert_eq!(parsed["member"][1]["inactive"], true);
    }

    #[test]
    fn page_requests_are_checked() {
        assert_eq!(
            page_request(None).unwrap(),
            PageRequest {
                count: 100,
                cursor: String::new(),
                since_ms: None
            }
        );
        let since = page_request(Some("_since=2026-01-01T00:00:01.5Z")).unwrap();
        assert_eq!(since.since_ms, Some(1_767_225_601_500));
        assert!(page_request(Some("_since=yesterday"))
            .unwrap_err()
            .contains("FHIR instant"));
        let page = page_request(Some("_count=5&_cursor=Patient%2F7")).unwrap();
        assert_eq!((page.count, page.cursor.as_str()), (5, "Patient/7"));
        assert!(page_request(Some("_count=0")).is_err());
        assert!(page_request(Some("_count=5000"))
            .unwrap_err()
            .contains("between 1 and 1000"));
    }

    #[test]
    fn a_removed_member_keeps_its_element_and_gains_the_removed_marker() {
        let removed = removed_member_json(
            json!({"entity": {"reference": "Patient/1"}, "extension": [{"url": "x", "valueString": "y"}]}),
            DEFAULT_EXTENSION_BASE,
        );
        assert_eq!(removed["extension"][0]["url"], "x");
        assert_eq!(
            removed["extension"][1]["url"],
            "urn:fhir-group-proxy:extension:member-removed"
        );
        assert_eq!(removed["inactive"], true);
    }

    #[test]
    fn cursors_carry_order_key_and_slot() {
        assert_eq!(split_cursor(&cursor_after("a1V", "f00d")), ("a1V", "f00d"));
        assert_eq!(split_cursor(""), ("", ""));
    }

    #[test]
    fn a_page_is_a_searchset_with_next() {
        let page = members_page(
            json!({"resourceType": "Group", "id": "g"}),
            vec![json!({"entity": {"reference": "Patient/1"}})],
            7,
            "/self",
            Some("/next"),
        );
        assert_eq!(page["type"], "searchset");
        assert_eq!(page["total"], 7);
        assert_eq!(page["link"][1]["url"], "/next");
        assert_eq!(
            page["entry"][0]["resource"]["member"][0]["entity"]["reference"],
            "Patient/1"
        );
    }

    #[test]
    fn paging_link_is_an_extension() {
        let group = with_paging_link(
            json!({"resourceType": "Group"}),
            "/4_0_0/Group/g/$members",
            DEFAULT_EXTENSION_BASE,
        );
        assert_eq!(group["extension"][0]["valueUri"], "/4_0_0/Group/g/$members");
        assert_eq!(
            group["extension"][0]["url"],
            "urn:fhir-group-proxy:extension:members-paged"
        );
        let published = members_paged_extension("https://fhir.example.org/StructureDefinition/");
        assert_eq!(
            published,
            "https://fhir.example.org/StructureDefinition/members-paged"
        );
    }
}
