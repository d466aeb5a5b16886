//! Member PATCHes answered by the proxy: events in ClickHouse, only metadata in
//! MongoDB; errors, If-Match and version conflicts, Prefer, retries by
//! X-Request-Id, patches the proxy does not own, Expect: 100-continue,
//! concurrent and batched writers, mixed patches split between the member store
//! and the legacy server, recovery of stopped writers and history entries.
//! Against the real servers and the stand-in legacy FHIR server.

mod support;

use std::collections::BTreeMap;

use futures_util::StreamExt;
use mongodb::bson::{doc, Bson, Document};
use serde_json::{json, Value};
use support::members::*;
use support::raw::RawConnection;
use support::stack::*;
use support::*;

/// The history entry matching `filter`, as the legacy server's history holds it.
async fn history_entry(stack: &Stack, filter: Document) -> Document {
    stack.standin.history_settled().await;
    stack
        .mongo
        .collection::<Document>("Group_4_0_0_History")
        .find_one(filter)
        .await
        .unwrap()
        .expect("history entry")
}

/// The issues of a history entry's response outcome (one per applied op).
fn outcome_issues(entry: &Document) -> &mongodb::bson::Array {
    entry
        .get_document("response")
        .and_then(|r| r.get_document("outcome"))
        .and_then(|o| o.get_array("issue"))
        .expect("an outcome with issues")
}

fn refs(members: &BTreeMap<String, (bool, String)>) -> Vec<&str> {
    members.keys().map(String::as_str).collect()
}

#[tokio::test]
async fn member_ops_write_events_and_only_metadata() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let before = stack.group_document(&id).await;

    let reply = stack.patch(&id, json!([
        add("Patient/1"), add("Patient/2"),
        {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/3"}, "inactive": true,
          "period": {"start": "2025-01-01"}}}
    ]), &[]).await;
    reply.assert_status(200);
    assert_eq!(reply.header("etag"), Some("W/\"2\""));
    // As the reference server answers: absolute, at the host the client used.
    assert_eq!(
        reply.header("content-location"),
        Some(format!("{}/4_0_0/Group/{id}/_history/2", stack.proxy.url()).as_str())
    );
    assert_eq!(
        reply.header("location"),
        Some(format!("4_0_0/Group/{id}").as_str())
    );
    // The answer's time in ISO 8601, as the reference server sends it.
    assert!(reply
        .header("last-modified")
        .is_some_and(|v| chrono::DateTime::parse_from_rfc3339(v).is_ok()));
    let body = reply.json();
    assert_eq!(body["resourceType"], "Group");
    assert_eq!(body["meta"]["versionId"], "2");
    assert_eq!(body["quantity"], 2, "quantity counts active members");
    assert_eq!(
        references(&body),
        vec!["Patient/1", "Patient/2", "Patient/3"],
        "the roster after the write"
    );
    assert!(body.get("_uuid").is_none());

    let members = stack.members(&id).await;
    assert_eq!(refs(&members), vec!["Patient/1", "Patient/2", "Patient/3"]);
    assert_eq!(members["Patient/3"], (true, "2025-01-01".to_string()));

    // MongoDB: only versionId (a string), lastUpdated (a date) and our token changed.
    let after = stack.group_document(&id).await;
    let meta = after.get_document("meta").unwrap();
    assert_eq!(meta.get("versionId"), Some(&Bson::String("2".into())));
    assert!(matches!(meta.get("lastUpdated"), Some(Bson::DateTime(_))));
    assert!(
        after.get_array("member").map_or(true, |m| m.is_empty()),
        "no member written to MongoDB"
    );
    for (key, value) in before.iter().filter(|(k, _)| k.as_str() != "meta") {
        assert_eq!(after.get(key), Some(value), "{key} unchanged");
    }
    assert_eq!(
        after.get_str("_memberStorage"),
        Ok("clickhouse"),
        "marked as external"
    );
    let history = history_entry(&stack, doc! {"resource.id": &id, "request.method": "PATCH"}).await;
    assert_eq!(
        history
            .get_document("resource")
            .unwrap()
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "2"
    );
    // As the reference server records a patch: one informational issue per
    // op of the client's patch, the op as JSON text.
    let issues = outcome_issues(&history);
    assert_eq!(issues.len(), 3);
    let first = issues[0].as_document().unwrap();
    assert_eq!(first.get_str("code"), Ok("informational"));
    let op: Value = serde_json::from_str(first.get_str("diagnostics").unwrap()).unwrap();
    assert_eq!(op, add("Patient/1"));

    // The legacy server reads the same Group at the new version.
    let direct = send(
        &stack.client,
        "GET",
        &format!("{}/4_0_0/Group/{id}", stack.standin.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(direct.json()["meta"]["versionId"], "2");

    // Remove by value, then by pinned position.
    let reply = stack
        .patch(
            &id,
            json!([remove("Patient/1")]),
            &[("if-match", "W/\"2\"")],
        )
        .await;
    reply.assert_status(200);
    assert_eq!(reply.header("etag"), Some("W/\"3\""));
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/2"},
                {"op": "remove", "path": "/member/0"}
            ]),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(refs(&stack.members(&id).await), vec!["Patient/3"]);

    // Attribute change of a pinned member.
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/3"},
                {"op": "replace", "path": "/member/0/inactive", "value": false}
            ]),
            &[],
        )
        .await;
    assert_eq!(reply.json()["quantity"], 1);
    assert_eq!(
        stack.members(&id).await["Patient/3"],
        (false, "2025-01-01".to_string())
    );

    // Replace a pinned member by another one.
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/3"},
                {"op": "replace", "path": "/member/0", "value": {"entity": {"reference": "Practitioner/9"}}}
            ]),
            &[],
        )
        .await;
    reply.assert_status(200);
    assert_eq!(refs(&stack.members(&id).await), vec!["Practitioner/9"]);
}

#[tokio::test]
async fn every_error_is_an_operation_outcome_and_changes_nothing() {
    let stack = Stack::start(&[
        ("FGP_FHIR_MAX_PATCH_OPERATIONS", "5"),
        ("FGP_FHIR_MAX_INTERCEPTED_BODY_BYTES", "4096"),
    ])
    .await;
    let id = stack.create_group(json!([])).await;
    assert_eq!(
        stack
            .patch(&id, json!([add("Patient/a")]), &[])
            .await
            .status,
        200
    );

    let cases: Vec<(Value, Headers, u16, &str)> = vec![
        (json!([remove("Patient/nobody")]), &[], 400, "invalid"),
        (
            json!([add("Patient/b"), remove("Patient/nobody")]),
            &[],
            400,
            "invalid",
        ),
        (
            json!([{"op": "test", "path": "/member/0/entity/reference", "value": "Patient/x"}]),
            &[],
            400,
            "invalid",
        ),
        (
            json!([{"op": "remove", "path": "/member/1"}]),
            &[],
            400,
            "invalid",
        ),
        (
            json!([{"op": "test", "path": "/member", "value": []}]),
            &[],
            400,
            "invalid",
        ),
        (
            json!([{"op": "remove", "path": "/member/0/period"}]),
            &[],
            400,
            "invalid",
        ),
        (
            json!([{"op": "copy", "from": "/member/0", "path": "/identifier/0"}]),
            &[],
            422,
            "not-supported",
        ),
        (json!({"op": "add"}), &[], 400, "structure"),
        (
            json!((0..6)
                .map(|i| add(&format!("Patient/{i}")))
                .collect::<Vec<_>>()),
            &[],
            400,
            "too-costly",
        ),
        (
            json!([add("Patient/c")]),
            &[("if-match", "W/\"1\"")],
            412,
            "conflict",
        ),
        (
            json!([add("Patient/c")]),
            &[("if-match", "W/\"x\"")],
            400,
            "invalid",
        ),
    ];
    for (ops, headers, status, code) in cases {
        let reply = stack.patch(&id, ops.clone(), headers).await;
        assert_outcome(&reply, status, code);
        let meta_version = stack
            .group_document(&id)
            .await
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap()
            .to_string();
        assert_eq!(meta_version, "2", "nothing written for {ops}");
    }
    assert_eq!(refs(&stack.members(&id).await), vec!["Patient/a"]);
    assert_eq!(stack.event_count(&id).await, 1);

    let malformed = send(
        &stack.client,
        "PATCH",
        &stack.group_url(&id),
        &[PATCH],
        "[{not json",
    )
    .await;
    assert_outcome(&malformed, 400, "invalid");
    let big = format!(
        "[{}]",
        vec![serde_json::to_string(&add("Patient/big")).unwrap(); 100].join(",")
    );
    assert_outcome(
        &send(&stack.client, "PATCH", &stack.group_url(&id), &[PATCH], big).await,
        413,
        "too-long",
    );
    assert_outcome(
        &stack
            .patch("does-not-exist", json!([add("Patient/a")]), &[])
            .await,
        404,
        "not-found",
    );
}

#[tokio::test]
async fn version_conflict_status_is_configurable_and_if_match_can_be_required() {
    let stack = Stack::start(&[
        ("FGP_MEMBERS_VERSION_CONFLICT_STATUS", "409"),
        ("FGP_MEMBERS_REQUIRE_IF_MATCH", "true"),
    ])
    .await;
    let id = stack.create_group(json!([])).await;
    assert_outcome(
        &stack.patch(&id, json!([add("Patient/a")]), &[]).await,
        400,
        "required",
    );
    assert_outcome(
        &stack
            .patch(&id, json!([add("Patient/a")]), &[("if-match", "W/\"7\"")])
            .await,
        409,
        "conflict",
    );
    assert_eq!(
        stack
            .patch(&id, json!([add("Patient/a")]), &[("if-match", "W/\"1\"")])
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn prefer_selects_the_body() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let minimal = stack
        .patch(
            &id,
            json!([add("Patient/1")]),
            &[("prefer", "return=minimal")],
        )
        .await;
    // `{}`, as the reference server answers `return=minimal`.
    assert_eq!((minimal.status, minimal.body.as_ref()), (200, &b"{}"[..]));
    assert_eq!(minimal.header("etag"), Some("W/\"2\""));
    let outcome = stack
        .patch(
            &id,
            json!([add("Patient/2")]),
            &[("prefer", "return=OperationOutcome")],
        )
        .await;
    assert_eq!(outcome.json()["resourceType"], "OperationOutcome");
    assert_eq!(outcome.json()["issue"][0]["severity"], "information");
}

#[tokio::test]
async fn a_retry_with_the_same_request_id_writes_nothing_twice() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let headers = [("x-request-id", "retry-me-1"), ("if-match", "W/\"1\"")];
    let first = stack
        .patch(&id, json!([add("Patient/1"), add("Patient/2")]), &headers)
        .await;
    assert_eq!(first.status, 200);
    let again = stack
        .patch(&id, json!([add("Patient/1"), add("Patient/2")]), &headers)
        .await;
    assert_eq!(
        again.status,
        200,
        "the retry is answered, not refused: {}",
        String::from_utf8_lossy(&again.body)
    );
    assert_eq!(
        again.header("etag"),
        Some("W/\"2\""),
        "same version as the first attempt"
    );
    assert_eq!(stack.event_count(&id).await, 2);
    assert_eq!(
        stack
            .group_document(&id)
            .await
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "2"
    );
    // The same id for another change is another request: refused, naming
    // the request it already stands for, and nothing is written.
    let reused = stack
        .patch(
            &id,
            json!([add("Patient/3")]),
            &[("x-request-id", "retry-me-1")],
        )
        .await;
    assert_outcome(&reused, 422, "business-rule");
    assert!(String::from_utf8_lossy(&reused.body).contains("version 2"));
    assert_eq!(stack.event_count(&id).await, 2);
    // An id the proxy cannot keep is refused, never replaced.
    let long = "x".repeat(201);
    let refused = stack
        .patch(
            &id,
            json!([add("Patient/4")]),
            &[("x-request-id", long.as_str())],
        )
        .await;
    assert_outcome(&refused, 400, "invalid");
    assert!(refused.header("x-request-id").is_none());
    assert_eq!(stack.event_count(&id).await, 2);
}

#[tokio::test]
async fn patches_the_proxy_does_not_own_reach_the_legacy_server() {
    let stack = Stack::start(&[]).await;
    // Not a member patch: forwarded, applied by the legacy server.
    let id = stack.create_group(json!([])).await;
    let reply = stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/name", "value": "Roster A"}]),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.json()["name"], "Roster A");

    // A large non-member patch (beyond pingora's replay buffer) too.
    let long_name = "x".repeat(100_000);
    let reply = stack
        .patch(
            &id,
            json!([{"op": "replace", "path": "/name", "value": long_name}]),
            &[],
        )
        .await;
    reply.assert_status(200);
    assert_eq!(reply.json()["name"].as_str().map(str::len), Some(100_000));

    // A Group whose members are still inline (not migrated): legacy path.
    let legacy = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/inline"}}]))
        .await;
    let reply = stack.patch(&legacy, json!([add("Patient/new")]), &[]).await;
    assert_eq!(reply.status, 200);
    let body = reply.json();
    let members: Vec<&str> = body["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(members, vec!["Patient/inline", "Patient/new"]);
    assert_eq!(
        stack.event_count(&legacy).await,
        0,
        "nothing went to ClickHouse"
    );
}

/// The legacy server applies a patch without member ops to a Group whose
/// roster the proxy keeps, and answers with the Group as it holds it: without
/// `member`. Its clients always got the whole Group, so the answer gets the
/// roster of the version it names; a refusal is relayed as it came.
#[tokio::test]
async fn patches_without_member_ops_answer_with_the_kept_roster() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a", "Patient/b"]).await;
    let expected = vec!["Patient/a".to_string(), "Patient/b".to_string()];

    let renamed = stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/name", "value": "Roster A"}]),
            &[],
        )
        .await;
    renamed.assert_status(200);
    assert_eq!(renamed.json()["name"], "Roster A");
    assert_eq!(renamed.json()["meta"]["versionId"], "3");
    assert_eq!(references(&renamed.json()), expected);
    assert_eq!(stack.event_count(&id).await, 2, "no member event written");

    for patch in [
        json!([{"op": "test", "path": "/name", "value": "Roster A"}]),
        json!([]),
    ] {
        let reply = stack.patch(&id, patch.clone(), &[]).await;
        reply.assert_status(200);
        assert_eq!(references(&reply.json()), expected, "{patch}");
    }

    let refused = stack
        .patch(
            &id,
            json!([{"op": "test", "path": "/name", "value": "Roster B"}]),
            &[],
        )
        .await;
    assert!(refused.status >= 400, "{}", refused.status);
    assert_eq!(refused.json()["resourceType"], "OperationOutcome");
    assert_eq!(stack.roster_read(&id).await, expected);
}

#[tokio::test]
async fn expect_continue_is_answered_before_reading_the_body() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let body = serde_json::to_vec(&json!([add("Patient/1")])).unwrap();
    let mut conn = RawConnection::open(stack.proxy.addr).await;
    conn.write(format!("PATCH /4_0_0/Group/{id} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json-patch+json\r\n\
        Content-Length: {}\r\nExpect: 100-continue\r\n\r\n", body.len()).as_bytes()).await;
    let (status, _) = conn.read_head().await;
    assert_eq!(status, 100);
    conn.write(&body).await;
    let response = conn.read_response().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("etag"), Some("W/\"2\""));
}

/// `count` PATCHes at once to Group `id`, each adding `Patient/{prefix}-{i}`
/// with `headers`; their replies.
async fn concurrent_adds(
    stack: &Stack,
    id: &str,
    count: usize,
    prefix: &str,
    headers: &[(&str, &str)],
) -> Vec<Reply> {
    futures_util::stream::iter(0..count)
        .map(|i| async move {
            stack
                .patch(id, json!([add(&format!("Patient/{prefix}-{i}"))]), headers)
                .await
        })
        .buffer_unordered(count)
        .collect::<Vec<_>>()
        .await
}

#[tokio::test]
async fn concurrent_patches_with_the_same_if_match_have_one_winner() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let replies = concurrent_adds(&stack, &id, 100, "race", &[("if-match", "W/\"1\"")]).await;
    let winners = replies.iter().filter(|r| r.status == 200).count();
    let conflicts = replies.iter().filter(|r| r.status == 412).count();
    assert_eq!(
        (winners, conflicts),
        (1, 99),
        "statuses: {:?}",
        replies.iter().map(|r| r.status).collect::<Vec<_>>()
    );
    assert_eq!(stack.members(&id).await.len(), 1);
    assert_eq!(stack.event_count(&id).await, 1);
}

#[tokio::test]
async fn concurrent_patches_without_if_match_all_apply_once() {
    // About correctness, not latency: 64 writers queue on one Group, so the
    // last may wait long on a loaded machine.
    let stack = Stack::start(&[("FGP_MEMBERS_WRITE_WAIT_MS", "60000")]).await;
    let id = stack.create_group(json!([])).await;
    let replies = concurrent_adds(&stack, &id, 64, "c", &[("prefer", "return=minimal")]).await;
    let failures: Vec<String> = replies
        .iter()
        .filter(|r| r.status != 200)
        .map(|r| format!("{} {}", r.status, String::from_utf8_lossy(&r.body)))
        .collect();
    assert!(failures.is_empty(), "{failures:#?}");
    let mut versions: Vec<String> = replies
        .iter()
        .map(|r| r.header("etag").unwrap().to_string())
        .collect();
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 64, "each write got its own version");
    assert_eq!(stack.members(&id).await.len(), 64);
    assert_eq!(
        stack
            .group_document(&id)
            .await
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "65"
    );
}

/// Random member patches through the proxy end in the same membership as the
/// same patches applied by the json-patch crate to a plain Group document.
#[tokio::test]
async fn differential_against_json_patch_on_a_plain_document() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let mut model = json!({"resourceType": "Group", "member": []});
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = |bound: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % bound as u64) as usize
    };
    for round in 0..25 {
        let mut ops = Vec::new();
        let mut scratch = model.clone();
        for _ in 0..(1 + next(8)) {
            let members = scratch["member"].as_array().unwrap().clone();
            let op = match next(4) {
                // Add a reference not present (set semantics on both sides).
                0 | 1 => {
                    let reference = format!("Patient/d{}", next(40));
                    if members
                        .iter()
                        .any(|m| m["entity"]["reference"] == reference)
                    {
                        continue;
                    }
                    let inactive = next(3) == 0;
                    vec![
                        json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}, "inactive": inactive}}),
                    ]
                }
                2 if !members.is_empty() => {
                    let i = next(members.len());
                    vec![
                        json!({"op": "test", "path": format!("/member/{i}/entity/reference"), "value": members[i]["entity"]["reference"]}),
                        json!({"op": "remove", "path": format!("/member/{i}")}),
                    ]
                }
                3 if !members.is_empty() => {
                    let i = next(members.len());
                    vec![
                        json!({"op": "test", "path": format!("/member/{i}/entity/reference"), "value": members[i]["entity"]["reference"]}),
                        json!({"op": "add", "path": format!("/member/{i}/inactive"), "value": next(2) == 0}),
                    ]
                }
                _ => continue,
            };
            let patch: json_patch::Patch =
                serde_json::from_value(Value::Array(op.clone())).unwrap();
            json_patch::patch(&mut scratch, &patch).unwrap();
            ops.extend(op);
        }
        if ops.is_empty() {
            continue;
        }
        let reply = stack.patch(&id, Value::Array(ops.clone()), &[]).await;
        assert_eq!(
            reply.status,
            200,
            "round {round}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        model = scratch;
    }
    let expected: BTreeMap<String, (bool, String)> = model["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["entity"]["reference"].as_str().unwrap().to_string(),
                (m["inactive"] == true, String::new()),
            )
        })
        .collect();
    assert_eq!(stack.members(&id).await, expected);
}

#[tokio::test]
async fn mixed_patches_split_with_one_version_increment() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "add", "path": "/name", "value": "Attributed 2026"},
                add("Patient/m1"),
                add("Patient/m2")
            ]),
            &[("if-match", "W/\"1\"")],
        )
        .await;
    reply.assert_status(200);
    assert_eq!(
        reply.header("etag"),
        Some("W/\"2\""),
        "one version for both halves"
    );
    assert_eq!(reply.json()["name"], "Attributed 2026");
    assert_eq!(
        refs(&stack.members(&id).await),
        vec!["Patient/m1", "Patient/m2"]
    );
    let document = stack.group_document(&id).await;
    assert_eq!(
        document
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "2"
    );
    assert!(document
        .get_array("member")
        .map_or(true, |members| members.is_empty()));
    // History records the client's PATCH, every op of it, though the legacy
    // server was sent a PUT. The legacy server writes the entry after its
    // answer (as the reference server does), so the proxy relabels it as
    // soon as it appears.
    let version_2 = doc! {"resource.id": &id, "resource.meta.versionId": "2"};
    let mut entry = history_entry(&stack, version_2.clone()).await;
    for _ in 0..100 {
        if entry.get_document("request").unwrap().get_str("method") == Ok("PATCH") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        entry = history_entry(&stack, version_2.clone()).await;
    }
    assert_eq!(
        entry.get_document("request").unwrap().get_str("method"),
        Ok("PATCH")
    );
    assert_eq!(outcome_issues(&entry).len(), 3, "{entry}");

    // The other ops do not apply: the patch fails as on the legacy server,
    // naming the op, and nothing of either half is written.
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "test", "path": "/name", "value": "something else"},
                add("Patient/m3")
            ]),
            &[],
        )
        .await;
    assert_outcome(&reply, 400, "invalid");
    assert_eq!(reply.json()["issue"][0]["expression"][0], "/0");
    assert_eq!(
        refs(&stack.members(&id).await),
        vec!["Patient/m1", "Patient/m2"]
    );
    assert_eq!(
        stack
            .group_document(&id)
            .await
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "2"
    );

    // A failing member half never reaches the upstream.
    let reply = stack
        .patch(
            &id,
            json!([
                {"op": "replace", "path": "/name", "value": "never"},
                remove("Patient/nobody")
            ]),
            &[],
        )
        .await;
    assert_outcome(&reply, 400, "invalid");
    let direct = send(
        &stack.client,
        "GET",
        &format!("{}/4_0_0/Group/{id}", stack.standin.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(direct.json()["name"], "Attributed 2026");
}

#[tokio::test]
async fn mixed_patches_can_be_refused_by_setting() {
    let stack = Stack::start(&[("FGP_MEMBERS_MIXED_PATCH", "reject")]).await;
    let id = stack.create_group(json!([])).await;
    let reply = stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/name", "value": "x"}, add("Patient/1")]),
            &[],
        )
        .await;
    assert_outcome(&reply, 422, "not-supported");
}

/// How a stopped writer recorded its write.
#[derive(Clone, Copy, PartialEq)]
enum Record {
    /// As releases before the lock held the record: `pending` in MemberState
    /// and a bare lock.
    Pending,
    /// As now: the lock itself (token, URL, time).
    Lock,
}

/// Leaves the traces of a writer that stopped mid-write on Group `id`: its
/// staged event (adding `reference` at `version`) and its expired lock, with
/// its record kept as `record` says; `committed` also moves the Group to
/// `version` with its token, as the commit point would have.
async fn leave_stopped_writer(
    stack: &Stack,
    id: &str,
    token: &str,
    version: u64,
    reference: &str,
    committed: bool,
    record: Record,
) {
    use fhir_group_proxy::store::events::{event_sequence, EventType, MemberEventRow};
    use fhir_group_proxy::store::schema::EVENTS_STAGED;

    let row = MemberEventRow {
        group_key: stack.group_key(id).await,
        group_id: id.to_string(),
        group_version: version,
        token: token.to_string(),
        request_id: format!("req-{token}"),
        op_index: 0,
        sequence: event_sequence(version, 0),
        slot_id: format!("stopped-{token}"),
        // Above the keys of the test's small rosters: appended at the end.
        order_key: "b10".into(),
        match_key: reference.to_string(),
        event_type: EventType::Added,
        element: serde_json::json!({"entity": {"reference": reference}}).to_string(),
        inactive: 0,
        member_delta: 1,
        active_delta: 1,
        event_time_ms: 1,
    };
    let mut insert = stack
        .clickhouse
        .insert::<MemberEventRow>(EVENTS_STAGED)
        .await
        .unwrap();
    insert.write(&row).await.unwrap();
    insert.end().await.unwrap();
    if committed {
        stack
            .mongo
            .collection::<Document>("Group_4_0_0")
            .update_one(
                doc! {"id": id},
                doc! {"$set": {"meta.versionId": version.to_string(), "_memberCommitToken": token}},
            )
            .await
            .unwrap();
    }
    let expired = mongodb::bson::DateTime::from_millis(1_000);
    let lock = match record {
        Record::Pending => {
            stack.mongo.collection::<Document>("Group_4_0_0_MemberState")
                .update_one(doc! {"_id": id}, doc! {"$set": {"pending": {"token": token, "version": version as i64, "requestId": format!("req-{token}")}}})
                .await.unwrap();
            doc! {"_id": id, "token": token, "expiresAt": expired}
        }
        Record::Lock => doc! {
            "_id": id, "token": token, "expiresAt": expired, "takenAt": expired,
            "url": format!("/4_0_0/Group/{id}"),
        },
    };
    stack
        .mongo
        .collection::<Document>("Group_4_0_0_MemberLocks")
        .insert_one(lock)
        .await
        .unwrap();
}

/// A writer that stopped after the commit point is finished by the next
/// writer (its events become visible, its history entry is written); one
/// that stopped before it never happened (its staged events stay invisible).
#[tokio::test]
async fn stopped_writers_recorded_in_their_lock_are_recovered_by_the_next_writer() {
    stopped_writers_are_recovered(Record::Lock).await;
}

/// The same for the records releases before this one left in MemberState.
#[tokio::test]
async fn stopped_writers_recorded_as_pending_are_recovered_by_the_next_writer() {
    stopped_writers_are_recovered(Record::Pending).await;
}

async fn stopped_writers_are_recovered(record: Record) {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    stack
        .patch(&id, json!([add("Patient/1")]), &[])
        .await
        .assert_status(200);

    leave_stopped_writer(
        &stack,
        &id,
        "after-commit",
        3,
        "Patient/committed",
        true,
        record,
    )
    .await;
    let reply = stack.patch(&id, json!([add("Patient/2")]), &[]).await;
    reply.assert_status(200);
    assert_eq!(reply.header("etag"), Some("W/\"4\""));
    assert_eq!(
        refs(&stack.members(&id).await),
        vec!["Patient/1", "Patient/2", "Patient/committed"]
    );
    let entry = stack
        .mongo
        .collection::<Document>("Group_4_0_0_History")
        .find_one(doc! {"resource.id": &id, "resource.meta.versionId": "3"})
        .await
        .unwrap()
        .expect("the stopped write's history entry is written by recovery");
    assert_eq!(
        entry
            .get_document("request")
            .unwrap()
            .get_str("id")
            .unwrap(),
        "req-after-commit"
    );

    leave_stopped_writer(
        &stack,
        &id,
        "before-commit",
        5,
        "Patient/ghost",
        false,
        record,
    )
    .await;
    let reply = stack.patch(&id, json!([add("Patient/3")]), &[]).await;
    reply.assert_status(200);
    assert_eq!(reply.header("etag"), Some("W/\"5\""));
    assert_eq!(
        refs(&stack.members(&id).await),
        vec!["Patient/1", "Patient/2", "Patient/3", "Patient/committed"],
        "the uncommitted write stays invisible"
    );
    let state = stack
        .mongo
        .collection::<Document>("Group_4_0_0_MemberState")
        .find_one(doc! {"_id": &id})
        .await
        .unwrap()
        .unwrap();
    assert!(
        state.get("pending").is_none_or(|p| p == &Bson::Null),
        "{state}"
    );
    let lock = stack
        .mongo
        .collection::<Document>("Group_4_0_0_MemberLocks")
        .find_one(doc! {"_id": &id})
        .await
        .unwrap();
    assert!(lock.is_none(), "lock released");
}

/// Patches queued on one Group are written in batches, each keeping its own
/// meaning: its own version and history entry, and a patch that does not apply
/// fails alone.
#[tokio::test]
async fn queued_patches_are_batched_but_answered_one_by_one() {
    let stack = Stack::start(&[("FGP_MEMBERS_WRITE_WAIT_MS", "60000")]).await;
    let id = stack.create_group(json!([])).await;
    let replies = futures_util::stream::iter(0..30)
        .map(|i| {
            let stack = &stack;
            let id = id.clone();
            async move {
                let ops = if i % 6 == 5 {
                    json!([remove(&format!("Patient/never-{i}"))])
                } else {
                    json!([add(&format!("Patient/q-{i:02}"))])
                };
                (
                    i,
                    stack.patch(&id, ops, &[("prefer", "return=minimal")]).await,
                )
            }
        })
        .buffer_unordered(30)
        .collect::<Vec<_>>()
        .await;
    let mut versions = Vec::new();
    for (i, reply) in &replies {
        if i % 6 == 5 {
            assert_outcome(reply, 400, "invalid");
        } else {
            reply.assert_status(200);
            versions.push(reply.header("etag").unwrap().to_string());
        }
    }
    versions.sort();
    versions.dedup();
    assert_eq!(versions.len(), 25, "one version per applied patch");
    assert_eq!(stack.members(&id).await.len(), 25);
    assert_eq!(stack.event_count(&id).await, 25);
    let document = stack.group_document(&id).await;
    assert_eq!(
        document
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "26"
    );
    let history: Vec<String> = stack
        .mongo
        .collection::<Document>("Group_4_0_0_History")
        .find(doc! {"resource.id": &id})
        .await
        .unwrap()
        .filter_map(|entry| async move {
            let entry = entry.ok()?;
            let meta = entry
                .get_document("resource")
                .ok()?
                .get_document("meta")
                .ok()?;
            Some(meta.get_str("versionId").ok()?.to_string())
        })
        .collect()
        .await;
    for version in 2..=26 {
        assert!(
            history.contains(&version.to_string()),
            "history has version {version}: {history:?}"
        );
    }
}

/// A patch at the op cap with long ids (64-character FHIR ids) is one valid
/// request: it is applied, not refused as "transient" by a query that
/// outgrew the member store's limits.
#[tokio::test]
async fn a_patch_at_the_op_cap_with_long_ids_is_applied() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let ops: Vec<Value> = (0..10_000)
        .map(|i| add(&format!("Patient/{i:064}")))
        .collect();
    let reply = stack
        .patch(&id, Value::Array(ops), &[("prefer", "return=minimal")])
        .await;
    reply.assert_status(200);
    assert_eq!(stack.event_count(&id).await, 10_000);
    // And again on top of them: every named member is looked up.
    let again: Vec<Value> = (0..10_000)
        .map(|i| remove(&format!("Patient/{i:064}")))
        .collect();
    stack
        .patch(&id, Value::Array(again), &[("prefer", "return=minimal")])
        .await
        .assert_status(200);
    assert!(stack.members(&id).await.is_empty());
}

/// A legacy server that keeps history in a database of its own (the
/// reference server's RESOURCE_HISTORY_MONGO_DB_NAME): the proxy writes the
/// history entries of member writes there, in the legacy server's shape, so
/// the legacy server serves every version.
#[tokio::test]
async fn history_entries_go_where_the_legacy_server_keeps_history() {
    let history = unique_name("resource_history");
    let standin = Standin::start_with_history_database(&history).await;
    let stack =
        Stack::start_behind(standin, &[("FGP_MONGO_HISTORY_DATABASE", history.as_str())]).await;
    let id = stack.create_group(json!([])).await;
    stack
        .patch(&id, json!([add("Patient/h")]), &[])
        .await
        .assert_status(200);
    let reply = send(
        &stack.client,
        "GET",
        &format!("{}/_history/2", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    reply.assert_status(200);
    assert_eq!(references(&reply.json()), vec!["Patient/h"]);
    let entries = mongodb::Client::with_uri_str(mongo_uri())
        .await
        .unwrap()
        .database(&history)
        .collection::<Document>("Group_4_0_0_History");
    let entry = entries
        .find_one(doc! {"resource.id": &id, "resource.meta.versionId": "2"})
        .await
        .unwrap()
        .expect("the proxy's entry is in the history database");
    assert_eq!(entry.get_str("id").unwrap(), stack.group_key(&id).await);
    assert_eq!(
        stack
            .mongo
            .collection::<Document>("Group_4_0_0_History")
            .count_documents(doc! {"resource.id": &id})
            .await
            .unwrap(),
        0,
        "nothing in the resources' database"
    );
}

/// Patches written together in one batch are each answered with the Group
/// as their own version left it: its roster and `quantity`, not a later
/// patch's of the same batch.
#[tokio::test]
async fn batched_patches_answer_with_the_roster_of_their_own_version() {
    let stack = Stack::start(&[("FGP_MEMBERS_WRITE_WAIT_MS", "60000")]).await;
    let id = stack.create_group(json!([])).await;
    let replies = futures_util::stream::iter(0..12)
        .map(|i| {
            let stack = &stack;
            let id = id.clone();
            async move {
                stack
                    .patch(&id, json!([add(&format!("Patient/b-{i:02}"))]), &[])
                    .await
            }
        })
        .buffer_unordered(12)
        .collect::<Vec<_>>()
        .await;
    for reply in &replies {
        reply.assert_status(200);
        let group = reply.json();
        let version: usize = group["meta"]["versionId"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        // Version 1 was the empty Group; each patch added one member.
        assert_eq!(references(&group).len(), version - 1, "version {version}");
        assert_eq!(group["quantity"], version - 1, "version {version}");
    }
}
