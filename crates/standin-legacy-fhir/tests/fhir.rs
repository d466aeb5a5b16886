//! FHIR behaviour of the stand-in over a real socket, against the real
//! MongoDB-compatible server, including the stored document layout.

mod common;

use common::Harness;
use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};

const OWNER: &str = "https://www.icanbwell.com/owner";

fn group(id: &str, members: &[&str]) -> Value {
    json!({
        "resourceType": "Group",
        "id": id,
        "meta": {"security": [{"system": OWNER, "code": "clinic-a"}]},
        "type": "person",
        "actual": true,
        "quantity": members.len(),
        "member": members.iter().map(|m| json!({"entity": {"reference": m}})).collect::<Vec<_>>(),
    })
}

async fn stored(h: &Harness, collection: &str, id: &str) -> Option<Document> {
    h.database
        .collection::<Document>(collection)
        .find_one(doc! { "id": id })
        .await
        .unwrap()
}

async fn history(h: &Harness, id: &str) -> Vec<Document> {
    h.history_settled().await;
    h.database
        .collection::<Document>("Group_4_0_0_History")
        .find(doc! { "id": id })
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

fn methods_and_versions(entries: &[Document]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = entries
        .iter()
        .map(|e| {
            (
                e.get_document("request")
                    .unwrap()
                    .get_str("method")
                    .unwrap()
                    .to_string(),
                e.get_document("resource")
                    .unwrap()
                    .get_document("meta")
                    .unwrap()
                    .get_str("versionId")
                    .unwrap()
                    .to_string(),
            )
        })
        .collect();
    pairs.sort_by_key(|(_, v)| v.parse::<u64>().unwrap());
    pairs
}

#[tokio::test]
async fn group_lifecycle_is_stored_like_the_legacy_server() {
    let h = Harness::start().await;

    // Create.
    let created = h
        .send_json("POST", "/4_0_0/Group", &[], &group("g1", &["Patient/1"]))
        .await;
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.header("location"), "/4_0_0/Group/g1/_history/1");
    assert_eq!(created.header("etag"), "W/\"1\"");
    assert!(created.header("last-modified").ends_with(" GMT"));
    assert_eq!(
        created.header("content-type"),
        "application/fhir+json; charset=utf-8"
    );
    let body = created.json();
    assert_eq!(body["meta"]["versionId"], "1");
    let last_updated = body["meta"]["lastUpdated"].as_str().unwrap();
    assert_eq!(last_updated.len(), "2026-11-24T03:57:12.123Z".len());
    assert!(last_updated.ends_with('Z'));

    // The stored document has the reference server's layout.
    let document = stored(&h, "Group_4_0_0", "g1").await.unwrap();
    let meta = document.get_document("meta").unwrap();
    assert_eq!(meta.get("versionId"), Some(&Bson::String("1".into())));
    assert!(matches!(meta.get("lastUpdated"), Some(Bson::DateTime(_))));
    let expected_uuid = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"g1|clinic-a").to_string();
    assert_eq!(document.get_str("_uuid").unwrap(), expected_uuid);
    assert_eq!(document.get_str("_sourceId").unwrap(), "g1");
    assert_eq!(
        document.get_str("_sourceAssigningAuthority").unwrap(),
        "clinic-a"
    );
    assert!(matches!(document.get("_id"), Some(Bson::ObjectId(_))));

    // Read, without any `_` field.
    let read = h.get("/4_0_0/Group/g1").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.header("etag"), "W/\"1\"");
    assert_eq!(read.json(), body);
    assert!(read
        .json()
        .as_object()
        .unwrap()
        .keys()
        .all(|k| !k.starts_with('_')));

    // Update under If-Match, then a stale If-Match.
    let mut changed = group("g1", &["Patient/1", "Patient/2"]);
    changed["name"] = json!("renamed");
    let updated = h
        .send_json(
            "PUT",
            "/4_0_0/Group/g1",
            &[("if-match", "W/\"1\"")],
            &changed,
        )
        .await;
    assert_eq!(updated.status, 200, "{:?}", updated.body);
    assert_eq!(updated.header("etag"), "W/\"2\"");
    assert_eq!(
        updated.header("content-location"),
        "/4_0_0/Group/g1/_history/2"
    );
    assert_eq!(updated.json()["name"], "renamed");
    let stale = h
        .send_json(
            "PUT",
            "/4_0_0/Group/g1",
            &[("if-match", "W/\"1\"")],
            &changed,
        )
        .await;
    assert_eq!(stale.status, 412);
    assert_eq!(stale.issue_code(), "conflict");

    // Patch: append a member to the whole document.
    let add = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/3"}}}]);
    let patched = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[("if-match", "\"2\"")], &add)
        .await;
    assert_eq!(patched.status, 200, "{:?}", patched.body);
    assert_eq!(patched.header("etag"), "W/\"3\"");
    let patched = patched.json();
    assert_eq!(patched["meta"]["versionId"], "3");
    assert_eq!(patched["member"].as_array().unwrap().len(), 3);
    assert_eq!(patched["member"][2]["entity"]["reference"], "Patient/3");
    assert_eq!(patched["name"], "renamed");

    // Patch failures change nothing.
    let failed_test = json!([
        {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/4"}}},
        {"op": "test", "path": "/name", "value": "other"}
    ]);
    let failed = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[], &failed_test)
        .await;
    assert_eq!(failed.status, 422);
    assert_eq!(failed.issue_code(), "processing");
    assert!(
        failed.diagnostics().contains("operation 1 (test)"),
        "{}",
        failed.diagnostics()
    );
    assert!(
        failed.diagnostics().contains("/name"),
        "{}",
        failed.diagnostics()
    );
    let missing_path = json!([{"op": "remove", "path": "/member/9"}]);
    let failed = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[], &missing_path)
        .await;
    assert_eq!(failed.status, 422);
    assert!(
        failed.diagnostics().contains("/member/9"),
        "{}",
        failed.diagnostics()
    );
    let stale = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[("if-match", "1")], &add)
        .await;
    assert_eq!(stale.status, 412);
    assert_eq!(stale.issue_code(), "conflict");
    let not_an_array = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[], &json!({"op": "add"}))
        .await;
    assert_eq!(not_an_array.status, 400);
    assert_eq!(not_an_array.issue_code(), "invalid");
    let malformed = h
        .send(
            "PATCH",
            "/4_0_0/Group/g1",
            &[("content-type", "application/json-patch+json")],
            "[{",
        )
        .await;
    assert_eq!(malformed.status, 400);
    let identity = json!([{"op": "replace", "path": "/id", "value": "g2"}]);
    let identity = h
        .send_json("PATCH", "/4_0_0/Group/g1", &[], &identity)
        .await;
    assert_eq!(identity.status, 400);
    assert_eq!(identity.issue_code(), "invalid");
    let merge = h
        .send(
            "PATCH",
            "/4_0_0/Group/g1",
            &[("content-type", "application/merge-patch+json")],
            "{}",
        )
        .await;
    assert_eq!(merge.status, 415);
    assert_eq!(merge.issue_code(), "not-supported");
    assert_eq!(merge.header("accept-patch"), "application/json-patch+json");
    assert_eq!(h.get("/4_0_0/Group/g1").await.header("etag"), "W/\"3\"");

    // vread of every version, and of one that never was.
    for (version, members) in [("1", 1), ("2", 2), ("3", 3)] {
        let old = h.get(&format!("/4_0_0/Group/g1/_history/{version}")).await;
        assert_eq!(old.status, 200);
        assert_eq!(old.json()["meta"]["versionId"], version);
        assert_eq!(old.json()["member"].as_array().unwrap().len(), members);
        assert!(old.json().get("_uuid").is_none());
    }
    let never = h.get("/4_0_0/Group/g1/_history/9").await;
    assert_eq!(never.status, 404);
    assert_eq!(never.issue_code(), "not-found");

    // Delete: gone afterwards, with a history entry of its own.
    let deleted = h.send("DELETE", "/4_0_0/Group/g1", &[], "").await;
    assert_eq!(deleted.status, 204);
    assert!(stored(&h, "Group_4_0_0", "g1").await.is_none());
    let gone = h.get("/4_0_0/Group/g1").await;
    assert_eq!(gone.status, 410);
    assert_eq!(gone.issue_code(), "not-found");
    assert_eq!(
        h.send("DELETE", "/4_0_0/Group/g1", &[], "").await.status,
        410
    );

    let entries = history(&h, "g1").await;
    assert_eq!(
        methods_and_versions(&entries),
        [("POST", "1"), ("PUT", "2"), ("PATCH", "3"), ("DELETE", "4")]
            .map(|(m, v)| (m.to_string(), v.to_string()))
    );
    for entry in &entries {
        assert_eq!(entry.get_str("id").unwrap(), "g1");
        assert_eq!(entry.get_str("_uuid").unwrap(), expected_uuid);
        let resource = entry.get_document("resource").unwrap();
        assert!(matches!(
            resource.get_document("meta").unwrap().get("lastUpdated"),
            Some(Bson::DateTime(_))
        ));
        let request = entry.get_document("request").unwrap();
        assert_eq!(request.get_str("url").unwrap(), "/4_0_0/Group/g1");
        assert!(uuid::Uuid::parse_str(request.get_str("id").unwrap()).is_ok());
        assert!(entry
            .get_document("response")
            .unwrap()
            .contains_key("status"));
    }

    // Created again after the delete: versions continue.
    let again = h
        .send_json("PUT", "/4_0_0/Group/g1", &[], &group("g1", &[]))
        .await;
    assert_eq!(again.status, 201);
    assert_eq!(again.header("etag"), "W/\"5\"");

    h.finish().await;
}

#[tokio::test]
async fn requests_are_validated() {
    let h = Harness::start().await;
    let never = h.get("/4_0_0/Group/nope").await;
    assert_eq!(never.status, 404);
    assert_eq!(never.issue_code(), "not-found");
    assert_eq!(
        h.send_json("PATCH", "/4_0_0/Group/nope", &[], &json!([]))
            .await
            .status,
        404
    );
    assert_eq!(
        h.send("DELETE", "/4_0_0/Group/nope", &[], "").await.status,
        404
    );

    let wrong_type = h
        .send_json(
            "POST",
            "/4_0_0/Group",
            &[],
            &json!({"resourceType": "Patient"}),
        )
        .await;
    assert_eq!(wrong_type.status, 400);
    assert_eq!(wrong_type.issue_code(), "invalid");
    assert!(wrong_type.diagnostics().contains("resourceType"));
    assert_eq!(
        h.send("POST", "/4_0_0/Group", &[], "not json").await.status,
        400
    );

    // Without an id one is generated.
    let generated = h
        .send_json(
            "POST",
            "/4_0_0/Patient",
            &[],
            &json!({"resourceType": "Patient"}),
        )
        .await;
    assert_eq!(generated.status, 201);
    let id = generated.json()["id"].as_str().unwrap().to_string();
    assert!(uuid::Uuid::parse_str(&id).is_ok());
    let patient = stored(&h, "Patient_4_0_0", &id).await.unwrap();
    assert_eq!(
        patient.get_str("_sourceAssigningAuthority").unwrap(),
        "default"
    );

    let first = h
        .send_json("POST", "/4_0_0/Group", &[], &group("dup", &[]))
        .await;
    assert_eq!(first.status, 201);
    let duplicate = h
        .send_json("POST", "/4_0_0/Group", &[], &group("dup", &[]))
        .await;
    assert_eq!(duplicate.status, 409);
    assert_eq!(duplicate.issue_code(), "conflict");

    let mismatch = h
        .send_json("PUT", "/4_0_0/Group/other", &[], &group("dup", &[]))
        .await;
    assert_eq!(mismatch.status, 400);
    assert!(mismatch.diagnostics().contains("other"));
    let missing_if_match = h
        .send_json(
            "PUT",
            "/4_0_0/Group/new",
            &[("if-match", "W/\"1\"")],
            &group("new", &[]),
        )
        .await;
    assert_eq!(missing_if_match.status, 412);
    let put_create = h
        .send_json("PUT", "/4_0_0/Group/new", &[], &group("new", &[]))
        .await;
    assert_eq!(put_create.status, 201);
    assert_eq!(put_create.header("location"), "/4_0_0/Group/new/_history/1");

    let unknown = h.get("/4_0_0/Group/g/$everything").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.issue_code(), "not-found");
    assert_eq!(h.get("/elsewhere").await.status, 404);
    let not_allowed = h.send("DELETE", "/4_0_0/Group", &[], "").await;
    assert_eq!(not_allowed.status, 405);
    assert_eq!(not_allowed.issue_code(), "not-supported");

    let metadata = h.get("/4_0_0/metadata").await;
    assert_eq!(metadata.status, 200);
    assert_eq!(metadata.json()["resourceType"], "CapabilityStatement");
    h.finish().await;
}

#[tokio::test]
async fn search_by_id_member_and_count() {
    let h = Harness::start().await;
    for (id, members) in [
        ("a", vec!["Patient/1", "Patient/2"]),
        ("b", vec!["Patient/2"]),
        ("c", vec!["Patient/3"]),
    ] {
        let created = h
            .send_json("POST", "/4_0_0/Group", &[], &group(id, &members))
            .await;
        assert_eq!(created.status, 201);
    }
    let ids = |bundle: &Value| -> Vec<String> {
        bundle["entry"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| e["resource"]["id"].as_str().unwrap().to_string())
                    .collect()
            })
            .unwrap_or_default()
    };

    let by_id = h.get("/4_0_0/Group?_id=a,c,zzz").await;
    assert_eq!(by_id.status, 200);
    let bundle = by_id.json();
    assert_eq!(bundle["resourceType"], "Bundle");
    assert_eq!(bundle["type"], "searchset");
    assert_eq!(bundle["total"], 2);
    assert_eq!(ids(&bundle), ["a", "c"]);
    let entry = &bundle["entry"][0];
    assert_eq!(entry["search"]["mode"], "match");
    assert_eq!(entry["fullUrl"], format!("http://{}/4_0_0/Group/a", h.addr));
    assert!(entry["resource"].get("_uuid").is_none());

    let by_member = h.get("/4_0_0/Group?member=Patient%2F2&_format=json").await;
    assert_eq!(ids(&by_member.json()), ["a", "b"]);
    let both = h.get("/4_0_0/Group?member=Patient/2&_id=b,c").await;
    assert_eq!(ids(&both.json()), ["b"]);

    let counted = h.get("/4_0_0/Group?_count=1").await.json();
    assert_eq!(counted["total"], 3);
    assert_eq!(ids(&counted), ["a"]);
    let only_total = h.get("/4_0_0/Group?_count=0").await.json();
    assert_eq!(only_total["total"], 3);
    assert!(only_total.get("entry").is_none());
    let none = h.get("/4_0_0/Group?member=Patient/9").await.json();
    assert_eq!(none["total"], 0);
    h.finish().await;
}

#[tokio::test]
async fn rewrites_keep_fields_other_tools_added() {
    let h = Harness::start().await;
    assert_eq!(
        h.send_json("POST", "/4_0_0/Group", &[], &group("m", &["Patient/1"]))
            .await
            .status,
        201
    );
    h.database
        .collection::<Document>("Group_4_0_0")
        .update_one(
            doc! { "id": "m" },
            doc! { "$set": { "_memberStorage": "clickhouse", "_memberCommitToken": "t1" } },
        )
        .await
        .unwrap();
    let add = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}]);
    let patched = h.send_json("PATCH", "/4_0_0/Group/m", &[], &add).await;
    assert_eq!(patched.status, 200);
    assert!(patched.json().get("_memberStorage").is_none());
    let mut replaced = group("m", &[]);
    replaced["_memberStorage"] = json!("forged by a client");
    assert_eq!(
        h.send_json("PUT", "/4_0_0/Group/m", &[], &replaced)
            .await
            .status,
        200
    );

    let document = stored(&h, "Group_4_0_0", "m").await.unwrap();
    assert_eq!(document.get_str("_memberStorage").unwrap(), "clickhouse");
    assert_eq!(document.get_str("_memberCommitToken").unwrap(), "t1");
    assert_eq!(
        document
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "3"
    );
    assert!(h
        .get("/4_0_0/Group/m")
        .await
        .json()
        .get("_memberCommitToken")
        .is_none());
    h.finish().await;
}

#[tokio::test]
async fn concurrent_patches_all_land() {
    let h = std::sync::Arc::new(Harness::start().await);
    assert_eq!(
        h.send_json("POST", "/4_0_0/Group", &[], &group("busy", &[]))
            .await
            .status,
        201
    );
    let writers: Vec<_> = (0..8)
        .map(|i| {
            let h = h.clone();
            tokio::spawn(async move {
                let add = json!([{"op": "add", "path": "/member/-",
                    "value": {"entity": {"reference": format!("Patient/{i}")}}}]);
                h.send_json("PATCH", "/4_0_0/Group/busy", &[], &add)
                    .await
                    .status
            })
        })
        .collect();
    for writer in writers {
        assert_eq!(writer.await.unwrap(), 200);
    }
    let group = h.get("/4_0_0/Group/busy").await.json();
    assert_eq!(group["member"].as_array().unwrap().len(), 8);
    assert_eq!(group["meta"]["versionId"], "9");
    assert_eq!(history(&h, "busy").await.len(), 9);
    if let Ok(h) = std::sync::Arc::try_unwrap(h) {
        h.finish().await;
    }
}
