//! The `real` profile over a real socket: the stand-in behaving as the real
//! legacy server (icanbwell/fhir-server) was measured and read to behave.

mod common;

use common::Harness;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};
use standin_legacy_fhir::enrichment::{
    uuid_v5, ACCESS_SYSTEM, SOURCE_ASSIGNING_AUTHORITY_SYSTEM, SOURCE_ID_SYSTEM, UUID_SYSTEM,
};
use standin_legacy_fhir::{Fidelity, Profile};

const OWNER: &str = "https://www.icanbwell.com/owner";

fn group(id: Option<&str>, references: &[&str]) -> Value {
    let mut group = json!({
        "resourceType": "Group",
        "meta": {"source": "http://test/source", "security": [
            {"system": OWNER, "code": "bwell"},
            {"system": ACCESS_SYSTEM, "code": "bwell"}
        ]},
        "type": "person",
        "actual": true,
        "member": references.iter().map(|r| json!({"entity": {"reference": r}})).collect::<Vec<_>>(),
    });
    if let Some(id) = id {
        group["id"] = json!(id);
    }
    group
}

async fn stored(h: &Harness, id: &str) -> Document {
    h.database
        .collection::<Document>("Group_4_0_0")
        .find_one(doc! { "id": id })
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("Group/{id} is stored"))
}

async fn history(h: &Harness, id: &str) -> Vec<Document> {
    h.history_settled().await;
    h.history_database
        .collection::<Document>("Group_4_0_0_History")
        .find(doc! { "resource.id": id })
        .sort(doc! { "resource.meta.versionId": 1 })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn version(document: &Document) -> String {
    document
        .get_document("meta")
        .unwrap()
        .get_str("versionId")
        .unwrap()
        .to_string()
}

async fn put(h: &Harness, id: &str, body: &Value) -> common::Reply {
    h.send_json("PUT", &format!("/4_0_0/Group/{id}"), &[], body)
        .await
}

async fn patch(h: &Harness, id: &str, headers: &[(&str, &str)], ops: Value) -> common::Reply {
    h.send_json("PATCH", &format!("/4_0_0/Group/{id}"), headers, &ops)
        .await
}

#[tokio::test]
async fn post_ignores_the_client_id_and_answers_a_relative_location() {
    let h = Harness::start_real().await;
    let reply = h
        .send_json(
            "POST",
            "/4_0_0/Group",
            &[("host", "fhir.test")],
            &group(Some("mine"), &["Patient/1"]),
        )
        .await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let id = reply.json()["id"].as_str().unwrap().to_string();
    assert_ne!(id, "mine");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");
    assert_eq!(reply.header("location"), format!("4_0_0/Group/{id}"));
    assert_eq!(
        reply.header("content-location"),
        format!("http://fhir.test/4_0_0/Group/{id}/_history/1")
    );
    assert_eq!(reply.header("etag"), "W/\"1\"");
    assert!(reply.headers.get("last-modified").is_none());
    // POST-created: the _uuid is the id itself.
    assert_eq!(stored(&h, &id).await.get_str("_uuid").unwrap(), id);
    h.finish().await;
}

#[tokio::test]
async fn stored_documents_carry_the_real_servers_internal_fields_and_enriched_members() {
    let h = Harness::start_real().await;
    let reply = put(&h, "g1", &group(Some("g1"), &["Patient/1", "Patient/2"])).await;
    assert_eq!(
        reply.status,
        201,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let document = stored(&h, "g1").await;
    assert_eq!(document.get_str("_uuid").unwrap(), uuid_v5("g1|bwell"));
    assert_eq!(document.get_str("_sourceId").unwrap(), "g1");
    assert_eq!(
        document.get_str("_sourceAssigningAuthority").unwrap(),
        "bwell"
    );
    assert_eq!(
        document.get_document("_access").unwrap(),
        &doc! { "bwell": 1 }
    );
    let meta = document.get_document("meta").unwrap();
    assert!(matches!(meta.get("lastUpdated"), Some(Bson::DateTime(_))));
    assert_eq!(meta.get_str("versionId").unwrap(), "1");
    assert!(meta
        .get_array("security")
        .unwrap()
        .contains(&Bson::Document(doc! {
            "system": SOURCE_ASSIGNING_AUTHORITY_SYSTEM, "code": "bwell"
        })));
    let entity = document.get_array("member").unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("entity")
        .unwrap()
        .clone();
    assert_eq!(
        entity,
        doc! {
            "reference": "Patient/1",
            "_uuid": format!("Patient/{}", uuid_v5("1|bwell")),
            "_sourceId": "Patient/1",
            "_sourceAssigningAuthority": "bwell",
        }
    );
    h.finish().await;
}

#[tokio::test]
async fn responses_carry_reference_extensions_and_identifiers_instead_of_internal_fields() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    let read = h.get("/4_0_0/Group/g1").await;
    assert_eq!(read.status, 200);
    let body = read.json();
    assert!(
        !String::from_utf8_lossy(&read.body).contains("\"_"),
        "{body}"
    );
    assert_eq!(
        body["member"][0]["entity"]["extension"],
        json!([
            {"id": "sourceId", "url": SOURCE_ID_SYSTEM, "valueString": "Patient/1"},
            {"id": "uuid", "url": UUID_SYSTEM, "valueString": format!("Patient/{}", uuid_v5("1|bwell"))},
            {"id": "sourceAssigningAuthority", "url": SOURCE_ASSIGNING_AUTHORITY_SYSTEM, "valueString": "bwell"}
        ])
    );
    assert_eq!(
        body["identifier"],
        json!([
            {"id": "sourceId", "system": SOURCE_ID_SYSTEM, "value": "g1"},
            {"id": "uuid", "system": UUID_SYSTEM, "value": uuid_v5("g1|bwell")}
        ])
    );
    assert!(body.get("quantity").is_none());
    // Sent back unchanged, the response is stored as it was: no new version.
    let again = put(&h, "g1", &body).await;
    assert_eq!(again.status, 200);
    assert_eq!(version(&stored(&h, "g1").await), "1");
    let entity = stored(&h, "g1").await.get_array("member").unwrap()[0]
        .as_document()
        .unwrap()
        .get_document("entity")
        .unwrap()
        .clone();
    assert!(!entity.contains_key("extension"));
    h.finish().await;
}

#[tokio::test]
async fn reads_answer_last_modified_like_javascript_dates_with_a_content_length() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/2", "Patient/1"])).await;
    let read = h.get("/4_0_0/Group/g1").await;
    let last_modified = read.header("last-modified").to_string();
    assert!(
        last_modified.ends_with(" GMT+0000 (Coordinated Universal Time)"),
        "{last_modified}"
    );
    assert_eq!(
        read.header("content-length").parse::<usize>().unwrap(),
        read.body.len()
    );
    let body = read.json();
    assert_eq!(body["member"][0]["entity"]["reference"], "Patient/2");
    assert_eq!(body["member"][1]["entity"]["reference"], "Patient/1");
    h.finish().await;
}

#[tokio::test]
async fn writes_without_meta_source_or_an_owner_are_refused_with_the_real_wording() {
    let h = Harness::start_real().await;
    let mut no_source = group(None, &[]);
    no_source["meta"].as_object_mut().unwrap().remove("source");
    let reply = h.send_json("POST", "/4_0_0/Group", &[], &no_source).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply
            .diagnostics()
            .contains("Missing either metadata or metadata source"),
        "{}",
        reply.diagnostics()
    );
    let no_meta = json!({"resourceType": "Group", "id": "g2", "type": "person", "actual": true});
    let reply = put(&h, "g2", &no_meta).await;
    assert_eq!(reply.status, 400);
    let mut no_owner = group(Some("g3"), &[]);
    no_owner["meta"]["security"] = json!([]);
    let reply = put(&h, "g3", &no_owner).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.diagnostics().contains(OWNER),
        "{}",
        reply.diagnostics()
    );
    h.finish().await;
}

#[tokio::test]
async fn groups_with_members_must_be_actual() {
    let h = Harness::start_real().await;
    let mut definition = group(Some("g1"), &["Patient/1"]);
    definition["actual"] = json!(false);
    let reply = put(&h, "g1", &definition).await;
    assert_eq!(reply.status, 400);
    assert!(
        reply.diagnostics().contains("grp-1"),
        "{}",
        reply.diagnostics()
    );
    h.finish().await;
}

#[tokio::test]
async fn history_entries_are_keyed_by_uuid_with_no_response_for_creates_and_patches_for_updates() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    let mut renamed = group(Some("g1"), &["Patient/1"]);
    renamed["name"] = json!("renamed");
    let reply = put(&h, "g1", &renamed).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("location"), "4_0_0/Group/g1");
    let entries = history(&h, "g1").await;
    assert_eq!(entries.len(), 2);
    for entry in &entries {
        assert_eq!(entry.get_str("id").unwrap(), uuid_v5("g1|bwell"));
        let request = entry.get_document("request").unwrap();
        assert_eq!(request.get_str("method").unwrap(), "PUT");
        assert_eq!(request.get_str("url").unwrap(), "/4_0_0/Group/g1");
        assert!(request.get_str("id").is_ok());
    }
    assert_eq!(entries[0].get("response"), Some(&Bson::Null));
    let issues = entries[1]
        .get_document("response")
        .unwrap()
        .get_document("outcome")
        .unwrap()
        .get_array("issue")
        .unwrap()
        .clone();
    assert_eq!(
        issues[0]
            .as_document()
            .unwrap()
            .get_str("diagnostics")
            .unwrap(),
        r#"{"op":"add","path":"/name","value":"renamed"}"#
    );
    // vread finds versions by the resource's id, not the entry's.
    let v1 = h.get("/4_0_0/Group/g1/_history/1").await;
    assert_eq!(v1.status, 200);
    assert!(v1.json().get("name").is_none());
    h.finish().await;
}

#[tokio::test]
async fn history_goes_to_a_separate_database_when_configured() {
    let history_name = format!("standin_test_history_{}", uuid::Uuid::new_v4().simple());
    let h = Harness::start_with(|mut config| {
        config.fidelity = Fidelity::real();
        config.history_database = Some(history_name.clone());
        config
    })
    .await;
    put(&h, "g1", &group(Some("g1"), &[])).await;
    assert_eq!(history(&h, "g1").await.len(), 1);
    let beside = h
        .database
        .collection::<Document>("Group_4_0_0_History")
        .count_documents(doc! {})
        .await
        .unwrap();
    assert_eq!(beside, 0);
    assert_eq!(h.get("/4_0_0/Group/g1/_history/1").await.status, 200);
    h.finish().await;
}

#[tokio::test]
async fn if_match_is_ignored_on_patch_and_honoured_on_put() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &[])).await;
    let add = |reference: &str| json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}}]);
    assert_eq!(patch(&h, "g1", &[], add("Patient/1")).await.status, 200);
    let stale = patch(&h, "g1", &[("if-match", "W/\"1\"")], add("Patient/2")).await;
    assert_eq!(
        stale.status,
        200,
        "{}",
        String::from_utf8_lossy(&stale.body)
    );
    assert_eq!(stale.header("etag"), "W/\"3\"");
    let refused = h
        .send_json(
            "PUT",
            "/4_0_0/Group/g1",
            &[("if-match", "W/\"1\"")],
            &group(Some("g1"), &[]),
        )
        .await;
    assert_eq!(refused.status, 412);
    assert!(
        refused.diagnostics().starts_with("Version conflict"),
        "{}",
        refused.diagnostics()
    );
    assert_eq!(version(&stored(&h, "g1").await), "3");
    h.finish().await;
}

#[tokio::test]
async fn failed_patches_answer_400_and_patches_that_change_nothing_make_no_version() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    let by_value = patch(
        &h,
        "g1",
        &[],
        json!([{"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/1"}}}]),
    )
    .await;
    assert_eq!(by_value.status, 400);
    assert!(
        by_value
            .diagnostics()
            .contains("OPERATION_PATH_UNRESOLVABLE"),
        "{}",
        by_value.diagnostics()
    );
    let failing_test = patch(
        &h,
        "g1",
        &[],
        json!([{"op": "test", "path": "/type", "value": "animal"}]),
    )
    .await;
    assert_eq!(failing_test.status, 400);
    let empty = patch(&h, "g1", &[], json!([])).await;
    assert_eq!(empty.status, 200);
    assert_eq!(empty.header("etag"), "W/\"1\"");
    let same = patch(
        &h,
        "g1",
        &[],
        json!([{"op": "replace", "path": "/type", "value": "person"}]),
    )
    .await;
    assert_eq!(same.status, 200);
    assert_eq!(version(&stored(&h, "g1").await), "1");
    assert_eq!(history(&h, "g1").await.len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn patches_enrich_new_members_record_their_operations_and_may_not_touch_internal_fields() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    let ops = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}]);
    assert_eq!(patch(&h, "g1", &[], ops.clone()).await.status, 200);
    let document = stored(&h, "g1").await;
    let entity = document.get_array("member").unwrap()[1]
        .as_document()
        .unwrap()
        .get_document("entity")
        .unwrap()
        .clone();
    assert_eq!(
        entity.get_str("_sourceAssigningAuthority").unwrap(),
        "bwell"
    );
    let entries = history(&h, "g1").await;
    let recorded = entries[1]
        .get_document("response")
        .unwrap()
        .get_document("outcome")
        .unwrap()
        .get_array("issue")
        .unwrap()[0]
        .as_document()
        .unwrap()
        .get_str("diagnostics")
        .unwrap()
        .to_string();
    assert_eq!(
        serde_json::from_str::<Value>(&recorded).unwrap(),
        ops[0].clone()
    );
    let internal = patch(
        &h,
        "g1",
        &[],
        json!([{"op": "remove", "path": "/member/0/entity/_uuid"}]),
    )
    .await;
    assert_eq!(internal.status, 400);
    assert!(internal.diagnostics().contains("internal field"));
    h.finish().await;
}

#[tokio::test]
async fn rewrites_in_the_real_profile_drop_top_level_fields_the_real_server_does_not_know() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    h.database
        .collection::<Document>("Group_4_0_0")
        .update_one(
            doc! { "id": "g1" },
            doc! { "$set": { "_memberStorage": "clickhouse" } },
        )
        .await
        .unwrap();
    let ops = json!([{"op": "add", "path": "/name", "value": "x"}]);
    assert_eq!(patch(&h, "g1", &[], ops).await.status, 200);
    let document = stored(&h, "g1").await;
    assert!(!document.contains_key("_memberStorage"));
    assert!(document.contains_key("_access"));
    h.finish().await;
}

#[tokio::test]
async fn put_keeps_the_stored_meta_source() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &[])).await;
    let mut moved = group(Some("g1"), &["Patient/1"]);
    moved["meta"]["source"] = json!("http://elsewhere/");
    assert_eq!(put(&h, "g1", &moved).await.status, 200);
    let document = stored(&h, "g1").await;
    let meta = document.get_document("meta").unwrap();
    assert_eq!(meta.get_str("source").unwrap(), "http://test/source");
    assert_eq!(version(&document), "2");
    h.finish().await;
}

#[tokio::test]
async fn search_total_is_zero_unless_asked_for() {
    let h = Harness::start_real().await;
    put(&h, "g1", &group(Some("g1"), &["Patient/1"])).await;
    put(&h, "g2", &group(Some("g2"), &[])).await;
    let plain = h.get("/4_0_0/Group?_id=g1,g2").await.json();
    assert_eq!(plain["total"], 0, "{plain}");
    assert_eq!(plain["entry"].as_array().map(Vec::len), Some(2));
    assert!(plain["entry"][0]["resource"]["identifier"].is_array());
    let counted = h.get("/4_0_0/Group?_id=g1,g2&_total=accurate").await.json();
    assert_eq!(counted["total"], 2);
    h.finish().await;
}

#[tokio::test]
async fn one_toggle_can_be_picked_on_top_of_the_simple_profile() {
    let h = Harness::start_with(|mut config| {
        config.fidelity = Fidelity {
            post_assigns_id: true,
            ..Fidelity::simple()
        };
        config
    })
    .await;
    let mut body = group(Some("mine"), &[]);
    body["meta"].as_object_mut().unwrap().remove("source");
    let reply = h.send_json("POST", "/4_0_0/Group", &[], &body).await;
    assert_eq!(reply.status, 201);
    assert_ne!(reply.json()["id"], "mine");
    // Everything else is simple: an absolute Location with the version.
    assert!(reply.header("location").starts_with("/4_0_0/Group/"));
    assert_eq!(Fidelity::of(Profile::Real), Fidelity::real());
    h.finish().await;
}
