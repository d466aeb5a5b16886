//! `$merge` over a real socket, in both profiles.

mod common;

use common::Harness;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use standin_legacy_fhir::enrichment::uuid_v5;

const OWNER: &str = "https://www.icanbwell.com/owner";
const ACCESS: &str = "https://www.icanbwell.com/access";

fn members(references: &[&str]) -> Vec<Value> {
    references
        .iter()
        .map(|r| json!({"entity": {"reference": r}}))
        .collect()
}

fn group(id: &str, references: &[&str]) -> Value {
    json!({
        "resourceType": "Group",
        "id": id,
        "meta": {"source": "http://test/source", "security": [
            {"system": OWNER, "code": "bwell"},
            {"system": ACCESS, "code": "bwell"}
        ]},
        "type": "person",
        "actual": true,
        "member": members(references),
    })
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

fn references(document: &Document) -> Vec<String> {
    document
        .get_array("member")
        .unwrap()
        .iter()
        .map(|m| {
            m.as_document()
                .unwrap()
                .get_document("entity")
                .unwrap()
                .get_str("reference")
                .unwrap()
                .to_string()
        })
        .collect()
}

fn version(document: &Document) -> String {
    document
        .get_document("meta")
        .unwrap()
        .get_str("versionId")
        .unwrap()
        .to_string()
}

async fn merge(h: &Harness, path: &str, body: &Value) -> Value {
    let reply = h.send_json("POST", path, &[], body).await;
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    reply.json()
}

#[tokio::test]
async fn merge_creates_a_group_it_does_not_know_and_answers_one_result() {
    let h = Harness::start().await;
    let result = merge(&h, "/4_0_0/Group/$merge", &group("g1", &["Patient/1"])).await;
    assert_eq!(result["created"], true, "{result}");
    assert_eq!(result["updated"], false);
    assert_eq!(result["id"], "g1");
    assert_eq!(result["resourceType"], "Group");
    assert!(result["uuid"].is_string());
    assert_eq!(result["sourceAssigningAuthority"], "bwell");
    let document = stored(&h, "g1").await;
    assert_eq!(version(&document), "1");
    assert_eq!(history(&h, "g1").await.len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn merge_adds_only_members_not_yet_present_and_rewrites_the_whole_document() {
    let h = Harness::start().await;
    let created = h
        .send_json(
            "PUT",
            "/4_0_0/Group/g1",
            &[],
            &group("g1", &["Patient/1", "Patient/2"]),
        )
        .await;
    assert_eq!(created.status, 201);
    // Markers another tool put on the document do not survive a merge.
    h.database
        .collection::<Document>("Group_4_0_0")
        .update_one(
            doc! { "id": "g1" },
            doc! { "$set": { "_memberStorage": "clickhouse", "_memberCommitToken": "t" } },
        )
        .await
        .unwrap();
    let mut incoming = group("g1", &["Patient/2", "Patient/3"]);
    incoming["name"] = json!("renamed");
    let result = merge(&h, "/4_0_0/Group/$merge", &incoming).await;
    assert_eq!(result["created"], false, "{result}");
    assert_eq!(result["updated"], true);
    let document = stored(&h, "g1").await;
    assert_eq!(
        references(&document),
        ["Patient/1", "Patient/2", "Patient/3"]
    );
    assert_eq!(document.get_str("name").unwrap(), "renamed");
    assert_eq!(version(&document), "2");
    assert!(!document.contains_key("_memberStorage"));
    assert!(!document.contains_key("_memberCommitToken"));
    assert!(document.contains_key("_uuid"));
    let entries = history(&h, "g1").await;
    assert_eq!(entries.len(), 2);
    let request = entries[1].get_document("request").unwrap();
    assert_eq!(request.get_str("method").unwrap(), "POST");
    h.finish().await;
}

#[tokio::test]
async fn merge_that_changes_nothing_creates_no_version() {
    let h = Harness::start().await;
    merge(&h, "/4_0_0/Group/$merge", &group("g1", &["Patient/1"])).await;
    let again = merge(
        &h,
        "/4_0_0/Group/$merge",
        &json!({"resourceType": "Group", "id": "g1", "member": members(&["Patient/1"])}),
    )
    .await;
    assert_eq!(again["created"], false, "{again}");
    assert_eq!(again["updated"], false);
    assert_eq!(version(&stored(&h, "g1").await), "1");
    assert_eq!(history(&h, "g1").await.len(), 1);
    h.finish().await;
}

#[tokio::test]
async fn merge_of_a_bundle_or_an_array_answers_a_list_sorted_by_uuid() {
    let h = Harness::start().await;
    let bundle = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": group("ga", &["Patient/1"])},
        {"resource": group("gb", &["Patient/2"])},
        {"resource": group("gc", &[])},
    ]});
    let results = merge(&h, "/4_0_0/Group/$merge", &bundle).await;
    let results = results.as_array().expect("a list");
    assert_eq!(results.len(), 3);
    let uuids: Vec<&str> = results
        .iter()
        .map(|r| r["uuid"].as_str().unwrap())
        .collect();
    let mut sorted = uuids.clone();
    sorted.sort();
    assert_eq!(uuids, sorted);
    assert!(results.iter().all(|r| r["created"] == true));
    let array = json!([group("ga", &["Patient/9"])]);
    let results = merge(&h, "/4_0_0/Group/$merge", &array).await;
    assert_eq!(results[0]["updated"], true, "{results}");
    assert_eq!(
        references(&stored(&h, "ga").await),
        ["Patient/1", "Patient/9"]
    );
    h.finish().await;
}

#[tokio::test]
async fn merge_at_the_base_stores_each_resource_by_its_own_type() {
    let h = Harness::start().await;
    let patient = json!({"resourceType": "Patient", "id": "p1",
        "meta": {"source": "s", "security": [{"system": OWNER, "code": "bwell"}]}});
    let results = merge(&h, "/4_0_0/$merge", &json!([patient, group("g1", &[])])).await;
    assert_eq!(results.as_array().map(Vec::len), Some(2), "{results}");
    let read = h.get("/4_0_0/Patient/p1").await;
    assert_eq!(read.status, 200);
    assert_eq!(h.get("/4_0_0/Group/g1").await.status, 200);
    h.finish().await;
}

#[tokio::test]
async fn merge_reports_a_resource_it_cannot_take_in_its_result_not_as_a_failure() {
    let h = Harness::start().await;
    let results = merge(
        &h,
        "/4_0_0/Group/$merge",
        &json!([{"resourceType": "Group", "type": "person"}, group("g1", &[])]),
    )
    .await;
    let results = results.as_array().unwrap();
    assert_eq!(results.len(), 2);
    // Errors carry no uuid and sort first.
    assert_eq!(results[0]["created"], false);
    assert_eq!(
        results[0]["operationOutcome"]["issue"][0]["diagnostics"],
        "resource is missing id"
    );
    assert_eq!(results[1]["created"], true);
    assert_eq!(
        h.send("GET", "/4_0_0/Group/$merge", &[], "").await.status,
        405
    );
    h.finish().await;
}

#[tokio::test]
async fn merge_in_the_real_profile_matches_members_as_stored_and_records_the_patches() {
    let h = Harness::start_real().await;
    let created = merge(&h, "/4_0_0/Group/$merge", &group("g1", &["Patient/1"])).await;
    assert_eq!(created["created"], true, "{created}");
    assert_eq!(created["uuid"], uuid_v5("g1|bwell"));
    // The incoming member is not enriched, the stored one is: still the same.
    let result = merge(
        &h,
        "/4_0_0/Group/$merge",
        &json!({"resourceType": "Group", "id": "g1",
            "meta": {"security": [{"system": OWNER, "code": "bwell"}]},
            "member": members(&["Patient/1", "Patient/2"])}),
    )
    .await;
    assert_eq!(result["updated"], true, "{result}");
    let document = stored(&h, "g1").await;
    assert_eq!(references(&document), ["Patient/1", "Patient/2"]);
    let entity = document.get_array("member").unwrap()[1]
        .as_document()
        .unwrap()
        .get_document("entity")
        .unwrap()
        .clone();
    assert_eq!(entity.get_str("_sourceId").unwrap(), "Patient/2");
    assert_eq!(
        entity.get_str("_uuid").unwrap(),
        format!("Patient/{}", uuid_v5("2|bwell"))
    );
    // The stored meta.source is kept although the merge sent none.
    assert_eq!(
        document
            .get_document("meta")
            .unwrap()
            .get_str("source")
            .unwrap(),
        "http://test/source"
    );
    let entries = history(&h, "g1").await;
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].get_str("id").unwrap(), uuid_v5("g1|bwell"));
    assert_eq!(entries[0].get("response"), Some(&mongodb::bson::Bson::Null));
    let response = entries[1].get_document("response").unwrap();
    assert_eq!(response.get_str("status").unwrap(), "200");
    let issues = response
        .get_document("outcome")
        .unwrap()
        .get_array("issue")
        .unwrap();
    assert!(
        issues.iter().any(|i| i
            .as_document()
            .unwrap()
            .get_str("diagnostics")
            .unwrap()
            .contains("\"path\":\"/member/1\"")),
        "{issues:?}"
    );
    h.finish().await;
}

#[tokio::test]
async fn merge_in_the_real_profile_refuses_a_new_resource_without_meta_source() {
    let h = Harness::start_real().await;
    let mut incoming = group("g1", &[]);
    incoming["meta"].as_object_mut().unwrap().remove("source");
    let result = merge(&h, "/4_0_0/Group/$merge", &incoming).await;
    assert_eq!(result["created"], false, "{result}");
    assert_eq!(
        result["issue"]["diagnostics"],
        "Unable to merge resource. Missing either metadata or metadata source."
    );
    let untagged = json!({"resourceType": "Group", "id": "g2", "meta": {"source": "s"}});
    let result = merge(&h, "/4_0_0/Group/$merge", &untagged).await;
    assert!(result["issue"]["diagnostics"]
        .as_str()
        .unwrap()
        .starts_with("Either id passed in resource should be uuid"));
    assert_eq!(h.get("/4_0_0/Group/g1").await.status, 404);
    h.finish().await;
}
