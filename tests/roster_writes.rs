//! Whole-resource writes of Groups: PUT and POST with members, Groups created
//! with members, PUT without members, inline Groups left to the legacy server,
//! and DELETE tombstoning a migrated roster. Against the real servers and the
//! stand-in legacy FHIR server.

mod support;

use serde_json::{json, Value};
use support::members::*;
use support::stack::*;
use support::*;

/// Deleting a migrated Group tombstones its roster: a Group created again
/// with the same id (same `_uuid`) starts without the old members.
#[tokio::test]
async fn deleting_a_migrated_group_tombstones_its_roster() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    stack
        .patch(&id, json!([add("Patient/old1"), add("Patient/old2")]), &[])
        .await
        .assert_status(200);
    let group_key = stack.group_key(&id).await;

    let deleted = send(&stack.client, "DELETE", &stack.group_url(&id), &[], "").await;
    assert!(
        matches!(deleted.status, 200 | 204),
        "DELETE -> {}",
        deleted.status
    );
    let gone = send(&stack.client, "GET", &stack.group_url(&id), &[], "").await;
    assert!(
        matches!(gone.status, 404 | 410),
        "read after delete -> {}",
        gone.status
    );
    let removed_events: u64 = stack.clickhouse
        .query("SELECT count() FROM Group_4_0_0_MemberSlotEvents WHERE group_key = ? AND slot_id != '' AND event_type = 'removed'")
        .bind(&group_key).fetch_one().await.unwrap();
    assert_eq!(removed_events, 2, "tombstones kept for audit");

    // Created again under the same id: a fresh roster.
    let again = owned(json!({"resourceType": "Group", "id": id, "type": "person", "actual": true}));
    send(
        &stack.client,
        "PUT",
        &stack.group_url(&id),
        &[("content-type", "application/fhir+json")],
        serde_json::to_vec(&again).unwrap(),
    )
    .await;
    // Created without `member`: the array is added whole (RFC 6902).
    let fresh = json!([{"op": "add", "path": "/member", "value": [
        {"entity": {"reference": "Patient/new"}}, {"entity": {"reference": "Patient/old1"}}]}]);
    stack.patch(&id, fresh, &[]).await.assert_status(200);
    let group = send(&stack.client, "GET", &stack.group_url(&id), &[], "")
        .await
        .json();
    let references: Vec<&str> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        references,
        vec!["Patient/new", "Patient/old1"],
        "old tombstones do not hide a re-added member"
    );
    assert_eq!(group["quantity"], 2);
}

fn references_of(group: &Value) -> Vec<&str> {
    group["member"]
        .as_array()
        .map(|members| {
            members
                .iter()
                .map(|m| m["entity"]["reference"].as_str().unwrap())
                .collect()
        })
        .unwrap_or_default()
}

/// `PUT` with `member` on a migrated Group: the roster is diffed into events
/// (one version, If-Match honoured), the legacy server stores the rest.
#[tokio::test]
async fn put_with_members_replaces_the_roster_through_events() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    stack
        .patch(
            &id,
            json!([add("Patient/a"), add("Patient/b"), add("Patient/c")]),
            &[],
        )
        .await
        .assert_status(200);
    let members = json!([
        {"entity": {"reference": "Patient/b"}, "inactive": true},
        {"entity": {"reference": "Patient/d"}}
    ]);
    let group = owned(
        json!({"resourceType": "Group", "id": id, "type": "person", "actual": true,
        "name": "renamed", "member": members}),
    );

    let stale = stack
        .put_group(&id, group.clone(), &[("if-match", "W/\"1\"")])
        .await;
    assert_outcome(&stale, 412, "conflict");
    assert_eq!(
        stack.event_count(&id).await,
        3,
        "a refused PUT writes nothing"
    );

    let reply = stack
        .put_group(&id, group.clone(), &[("if-match", "W/\"2\"")])
        .await;
    reply.assert_status(200);
    let answered = reply.json();
    assert_eq!(answered["meta"]["versionId"], "3");
    assert_eq!(
        as_sent(&answered["member"]),
        members,
        "the reply shows the new roster"
    );
    assert_eq!(answered["quantity"], 1);

    let read = stack.read_group(&id).await;
    assert_eq!(read["name"], "renamed");
    assert_eq!(read["meta"]["versionId"], "3");
    assert_eq!(references_of(&read), vec!["Patient/b", "Patient/d"]);
    assert_eq!(read["member"][0]["inactive"], true);
    assert_eq!(read["quantity"], 1);
    let document = stack.group_document(&id).await;
    assert!(
        !document.contains_key("member"),
        "legacy document has no roster"
    );
    // a, b, c removed (b's element changed), b' and d added; an unchanged
    // element keeps its slot and costs nothing.
    assert_eq!(stack.event_count(&id).await, 3 + 5);
    let (_, before, _) = roster_at(&stack, &id, 2).await;
    assert_eq!(before, vec!["Patient/a", "Patient/b", "Patient/c"]);

    let again = stack.put_group(&id, group, &[]).await;
    again.assert_status(200);
    assert_eq!(stack.event_count(&id).await, 8, "same roster: no events");
    assert_eq!(stack.read_group(&id).await["meta"]["versionId"], "4");

    // The elements are the legacy server's to judge: it stores them as sent,
    // and so does the member store.
    let odd = json!([{"entity": {"reference": "Patient/ok"}}, {"entity": {"reference": "not a reference"}}]);
    let bad = owned(
        json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "member": odd}),
    );
    stack.put_group(&id, bad, &[]).await.assert_status(200);
    assert_eq!(as_sent(&stack.read_group(&id).await["member"]), odd);
    let wrong_id = owned(
        json!({"resourceType": "Group", "id": "other", "type": "person", "actual": true, "member": []}),
    );
    assert_outcome(&stack.put_group(&id, wrong_id, &[]).await, 400, "invalid");
    assert_eq!(stack.read_group(&id).await["meta"]["versionId"], "5");
}

/// `PUT` without `member` keeps a migrated roster by default; FHIR-strict
/// replacement empties it when configured.
#[tokio::test]
async fn put_without_members_keeps_or_empties_the_roster_by_setting() {
    for (setting, expected) in [("keep", vec!["Patient/a"]), ("empty", vec![])] {
        let stack = Stack::start(&[("FGP_MEMBERS_PUT_WITHOUT_MEMBER", setting)]).await;
        let id = stack.create_group(json!([])).await;
        stack
            .patch(&id, json!([add("Patient/a")]), &[])
            .await
            .assert_status(200);
        let group = owned(
            json!({"resourceType": "Group", "id": id, "type": "person", "actual": true, "name": "n"}),
        );
        let put = stack.put_group(&id, group, &[]).await;
        put.assert_status(200);
        // The answer is the Group as it now is, roster included.
        assert_eq!(references_of(&put.json()), expected, "answer, {setting}");
        let read = stack.read_group(&id).await;
        assert_eq!(read["name"], "n", "{setting}");
        assert_eq!(read["meta"]["versionId"], "3", "{setting}");
        assert_eq!(references_of(&read), expected, "{setting}");
        assert_eq!(read["quantity"], expected.len(), "{setting}");
    }
}

/// Groups created with members (POST, or PUT to a new id) keep them as events
/// from version 1; the legacy server never stores the array.
#[tokio::test]
async fn groups_created_with_members_keep_them_as_events() {
    let stack = Stack::start(&[]).await;
    let members = json!([{"entity": {"reference": "Patient/2"}}, {"entity": {"reference": "Patient/1"}, "inactive": true}]);
    let created = send(
        &stack.client,
        "POST",
        &format!("{}/4_0_0/Group", stack.proxy.url()),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&owned(
            json!({"resourceType": "Group", "type": "person", "actual": true, "member": members}),
        ))
        .unwrap(),
    )
    .await;
    created.assert_status(201);
    let body = created.json();
    let id = body["id"].as_str().unwrap().to_string();
    assert!(created
        .header("location")
        .unwrap()
        .contains(&format!("/Group/{id}")));
    // The legacy server's own answer, exactly as without the proxy.
    assert_eq!(as_sent(&body["member"]), members);
    assert!(body.get("quantity").is_none(), "{body}");
    // Adopted before the answer: the members moved to the member store.
    assert!(!stack.group_document(&id).await.contains_key("member"));
    assert_eq!(stack.members(&id).await.len(), 2);
    let read = stack.read_group(&id).await;
    assert_eq!(read["meta"]["versionId"], "1");
    // The array as created, in its order.
    assert_eq!(references_of(&read), vec!["Patient/2", "Patient/1"]);
    // Version 1 is the legacy server's own, members inline as created.
    let (_, at_one, _) = roster_at(&stack, &id, 1).await;
    assert_eq!(at_one, vec!["Patient/2", "Patient/1"]);
    // Written as members: PATCHes and $members work on it at once.
    stack
        .patch(
            &id,
            json!([remove("Patient/2")]),
            &[("if-match", "W/\"1\"")],
        )
        .await
        .assert_status(200);
    assert_eq!(
        references_of(&stack.read_group(&id).await),
        vec!["Patient/1"]
    );

    let put_created = stack
        .put_group(
            "made-by-put",
            owned(json!({"resourceType": "Group", "id": "made-by-put", "type": "person", "actual": true,
                   "member": [{"entity": {"reference": "Group/nested"}}]})),
            &[],
        )
        .await;
    put_created.assert_status(201);
    assert!(!stack
        .group_document("made-by-put")
        .await
        .contains_key("member"));
    assert_eq!(
        references_of(&stack.read_group("made-by-put").await),
        vec!["Group/nested"]
    );

    // A member listed twice is an array like any other: adopted, both kept.
    let twice =
        json!([{"entity": {"reference": "Patient/1"}}, {"entity": {"reference": "Patient/1"}}]);
    let kept = send(
        &stack.client,
        "POST",
        &format!("{}/4_0_0/Group", stack.proxy.url()),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&owned(
            json!({"resourceType": "Group", "type": "person", "actual": true, "member": twice}),
        ))
        .unwrap(),
    )
    .await;
    kept.assert_status(201);
    let kept_id = kept.json()["id"].as_str().unwrap().to_string();
    assert_eq!(as_sent(&stack.read_group(&kept_id).await["member"]), twice);
}

/// With ClickHouse unreachable a Group created with members is created by
/// the legacy server all the same and stays with it, members inline: nothing
/// is lost and nothing is undone.
#[tokio::test]
async fn a_create_whose_members_cannot_be_moved_stays_with_the_legacy_server() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let stack = Stack::start(&[
        ("FGP_CLICKHOUSE_URL", closed.as_str()),
        ("FGP_MEMBERS_STORE_TIMEOUT_MS", "3000"),
    ])
    .await;
    let members = json!([{"entity": {"reference": "Patient/1"}}]);
    let created = send(
        &stack.client,
        "POST",
        &format!("{}/4_0_0/Group", stack.proxy.url()),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&owned(
            json!({"resourceType": "Group", "type": "person", "actual": true, "member": members}),
        ))
        .unwrap(),
    )
    .await;
    created.assert_status(201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let document = stack.group_document(&id).await;
    assert_eq!(document.get_array("member").unwrap().len(), 1);
    assert_eq!(as_sent(&stack.read_group(&id).await["member"]), members);
}

/// Whole-resource writes of Groups still inline go to the legacy server as
/// they are: nothing is migrated behind the client's back.
#[tokio::test]
async fn whole_writes_of_inline_groups_stay_with_the_legacy_server() {
    let stack = Stack::start(&[]).await;
    let id = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/inline"}}]))
        .await;
    let group = owned(
        json!({"resourceType": "Group", "id": id, "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/inline"}}, {"entity": {"reference": "Patient/more"}}]}),
    );
    stack.put_group(&id, group, &[]).await.assert_status(200);
    let document = stack.group_document(&id).await;
    assert_eq!(document.get_array("member").unwrap().len(), 2);
    assert!(stack.members(&id).await.is_empty());

    // Legacy-only storage for new Groups, by setting.
    let legacy_stack = Stack::start(&[("FGP_MEMBERS_CREATE_IN_CLICKHOUSE", "false")]).await;
    let id = legacy_stack
        .create_group(json!([{"entity": {"reference": "Patient/kept-inline"}}]))
        .await;
    let document = legacy_stack.group_document(&id).await;
    assert_eq!(document.get_array("member").unwrap().len(), 1);
}
