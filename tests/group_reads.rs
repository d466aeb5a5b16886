//! Reads of migrated Groups: the roster merged from ClickHouse into GET,
//! large rosters streamed, `$members` paging and changes since an instant,
//! `_history/{vid}` rosters, search by member, and what a client sees while
//! the member store is unreachable. Against the real servers and the stand-in
//! legacy FHIR server.

mod support;

use serde_json::{json, Value};
use support::members::*;
use support::stack::*;
use support::*;

#[tokio::test]
async fn reads_merge_members_from_clickhouse() {
    let stack = Stack::start(&[("FGP_FHIR_MAX_INLINE_MEMBERS", "3")]).await;
    let id = stack.create_group(json!([])).await;
    let reply = stack
        .patch(
            &id,
            json!([
                add("Patient/b"),
                {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/a"},
                  "inactive": true, "period": {"start": "2025-02-01", "end": "2025-12-31"}}}
            ]),
            &[],
        )
        .await;
    assert_eq!(reply.status, 200);

    let read = send(
        &stack.client,
        "GET",
        &stack.group_url(&id),
        &[("accept-encoding", "gzip")],
        "",
    )
    .await;
    read.assert_status(200);
    assert_eq!(read.header("etag"), Some("W/\"2\""));
    let group = read.json();
    assert_eq!(group["quantity"], 1, "active members");
    assert_eq!(
        as_sent(&group["member"]),
        json!([
            {"entity": {"reference": "Patient/b"}},
            {"entity": {"reference": "Patient/a"}, "period": {"start": "2025-02-01", "end": "2025-12-31"}, "inactive": true}
        ]),
        "the array in patch order, elements as sent"
    );

    for query in ["_summary=true", "_elements=id,quantity"] {
        let read = send(
            &stack.client,
            "GET",
            &format!("{}?{query}", stack.group_url(&id)),
            &[],
            "",
        )
        .await;
        let group = read.json();
        assert!(group.get("member").is_none(), "{query}: {group}");
        assert_eq!(group["quantity"], 1, "{query}");
    }

    // Above the inline cap: quantity and a pointer to paging instead.
    let reply = stack
        .patch(&id, json!([add("Patient/c"), add("Patient/d")]), &[])
        .await;
    assert_eq!(reply.status, 200);
    let group = send(&stack.client, "GET", &stack.group_url(&id), &[], "")
        .await
        .json();
    assert!(group.get("member").is_none());
    assert_eq!(group["quantity"], 3);
    assert_eq!(
        group["extension"][0]["valueUri"],
        format!("/4_0_0/Group/{id}/$members")
    );

    // Not migrated, unknown and removed Groups are the legacy server's answers.
    let legacy = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/inline"}}]))
        .await;
    let group = send(&stack.client, "GET", &stack.group_url(&legacy), &[], "")
        .await
        .json();
    assert_eq!(group["member"][0]["entity"]["reference"], "Patient/inline");
    let missing = send(
        &stack.client,
        "GET",
        &stack.group_url("no-such-group"),
        &[],
        "",
    )
    .await;
    assert_outcome(&missing, 404, "not-found");
}

#[tokio::test]
async fn large_rosters_are_streamed_whole_and_in_order() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let ops: Vec<Value> = (0..2_500)
        .map(|i| add(&format!("Patient/s{i:05}")))
        .collect();
    assert_eq!(
        stack
            .patch(&id, Value::Array(ops), &[("prefer", "return=minimal")])
            .await
            .status,
        200
    );
    let read = send(&stack.client, "GET", &stack.group_url(&id), &[], "").await;
    assert_eq!(read.header("transfer-encoding"), Some("chunked"));
    let group = read.json();
    let references: Vec<&str> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..2_500).map(|i| format!("Patient/s{i:05}")).collect();
    assert_eq!(references, expected);
    assert_eq!(group["quantity"], 2_500);
}

#[tokio::test]
async fn an_unreachable_member_store_is_503_and_changes_nothing() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let stack = Stack::start(&[("FGP_CLICKHOUSE_URL", closed.as_str())]).await;
    let id = stack.create_group(json!([])).await;
    let reply = stack.patch(&id, json!([add("Patient/1")]), &[]).await;
    assert_outcome(&reply, 503, "transient");
    let document = stack.group_document(&id).await;
    assert_eq!(
        document
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "1"
    );
    // Passthrough keeps working meanwhile.
    let read = send(&stack.client, "GET", &stack.group_url(&id), &[], "").await;
    assert_eq!(read.status, 200);
}

/// Seek pagination by reference: every member present from start to end is
/// listed exactly once, even while other members are added between pages.
/// 100,000 members, 100 pages, a concurrent write between every two pages.
#[tokio::test]
async fn members_pages_are_stable_under_concurrent_adds() {
    const SIZE: usize = 100_000;
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let base = format!("{}/4_0_0", stack.proxy.url());
    seed_members(&stack.client, &base, &id, SIZE).await;

    let mut url = format!("{}/$members?_count=1000", stack.group_url(&id));
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    loop {
        let page = send(&stack.client, "GET", &url, &[], "").await;
        page.assert_status(200);
        let bundle = page.json();
        assert_eq!(bundle["type"], "searchset");
        for member in bundle["entry"][0]["resource"]["member"].as_array().unwrap() {
            seen.push(member["entity"]["reference"].as_str().unwrap().to_string());
        }
        // Writers add members before and after the cursor between pages.
        let early = format!("Patient/a-{pages}");
        let late = format!("Patient/z-{pages}");
        stack
            .patch(
                &id,
                json!([add(&early), add(&late)]),
                &[("prefer", "return=minimal")],
            )
            .await
            .assert_status(200);
        pages += 1;
        let Some(next) = bundle["link"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["relation"] == "next")
        else {
            break;
        };
        url = format!("{}{}", stack.proxy.url(), next["url"].as_str().unwrap());
    }
    assert!(pages > 100, "{pages} pages");
    let originals: Vec<&String> = seen
        .iter()
        .filter(|r| r.starts_with("Patient/seed-"))
        .collect();
    // In array order: the order the seed members were added.
    let expected: Vec<String> = (0..SIZE).map(seed_reference).collect();
    assert_eq!(
        originals,
        expected.iter().collect::<Vec<_>>(),
        "none skipped, none repeated"
    );
    let mut unique = seen.clone();
    unique.dedup();
    assert_eq!(unique.len(), seen.len(), "no member listed twice");

    let bad = send(
        &stack.client,
        "GET",
        &format!("{}/$members?_count=0", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    assert_outcome(&bad, 400, "invalid");
}

/// `_history/{vid}` of a migrated Group shows the roster as it was then.
#[tokio::test]
async fn version_reads_rebuild_the_roster_of_that_version() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    stack
        .patch(&id, json!([add("Patient/a"), add("Patient/b")]), &[])
        .await
        .assert_status(200);
    stack
        .patch(&id, json!([remove("Patient/a"), add("Patient/c")]), &[])
        .await
        .assert_status(200);
    stack
        .patch(
            &id,
            json!([
                {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/b"},
                {"op": "add", "path": "/member/0/inactive", "value": true}
            ]),
            &[],
        )
        .await
        .assert_status(200);

    assert_eq!(
        roster_at(&stack, &id, 1).await,
        ("1".into(), vec![], json!(0))
    );
    assert_eq!(
        roster_at(&stack, &id, 2).await,
        (
            "2".into(),
            vec!["Patient/a".into(), "Patient/b".into()],
            json!(2)
        )
    );
    assert_eq!(
        roster_at(&stack, &id, 3).await,
        (
            "3".into(),
            vec!["Patient/b".into(), "Patient/c".into()],
            json!(2)
        )
    );
    assert_eq!(
        roster_at(&stack, &id, 4).await,
        (
            "4".into(),
            vec!["Patient/b".into(), "Patient/c".into()],
            json!(1)
        ),
        "b inactive"
    );

    let unknown = send(
        &stack.client,
        "GET",
        &format!("{}/_history/99", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    assert_outcome(&unknown, 404, "not-found");
}

/// `$members?_since=` lists the members changed after an instant, removed
/// ones marked as such, and keeps `_since` in its next link.
#[tokio::test]
async fn members_changed_since_an_instant() {
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
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let since = chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3fZ")
        .to_string();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    stack
        .patch(
            &id,
            json!([remove("Patient/a"), add("Patient/d"), add("Patient/e")]),
            &[],
        )
        .await
        .assert_status(200);

    let url = format!("{}/$members?_count=2&_since={since}", stack.group_url(&id));
    let first = send(&stack.client, "GET", &url, &[], "").await;
    first.assert_status(200);
    let bundle = first.json();
    let members = bundle["entry"][0]["resource"]["member"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(members[0]["entity"]["reference"], "Patient/a");
    assert_eq!(
        members[0]["extension"][0]["valueBoolean"], true,
        "marked removed: {}",
        members[0]
    );
    assert_eq!(members[1]["entity"]["reference"], "Patient/d");
    assert!(members[1].get("extension").is_none());
    let next = bundle["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap()["url"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(next.contains("_since="), "{next}");
    let second = send(
        &stack.client,
        "GET",
        &format!("{}{}", stack.proxy.url(), next),
        &[],
        "",
    )
    .await
    .json();
    let rest: Vec<&str> = second["entry"][0]["resource"]["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(rest, vec!["Patient/e"]);

    let bad = send(
        &stack.client,
        "GET",
        &format!("{}/$members?_since=yesterday", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    assert_outcome(&bad, 400, "invalid");
}

/// Search by member finds Groups with inline members (legacy search) and
/// migrated Groups (reverse index) alike, once each.
#[tokio::test]
async fn search_by_member_merges_legacy_and_migrated_groups() {
    let stack = Stack::start(&[]).await;
    let migrated_a = stack.create_group(json!([])).await;
    let migrated_b = stack.create_group(json!([])).await;
    let migrated_other = stack.create_group(json!([])).await;
    let legacy = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/x"}}]))
        .await;
    stack
        .patch(
            &migrated_a,
            json!([add("Patient/x"), add("Patient/y")]),
            &[],
        )
        .await
        .assert_status(200);
    stack
        .patch(&migrated_b, json!([add("Patient/x")]), &[])
        .await
        .assert_status(200);
    stack
        .patch(&migrated_other, json!([add("Patient/z")]), &[])
        .await
        .assert_status(200);
    // Removed members no longer match.
    let gone = stack.create_group(json!([])).await;
    stack
        .patch(&gone, json!([add("Patient/x")]), &[])
        .await
        .assert_status(200);
    stack
        .patch(&gone, json!([remove("Patient/x")]), &[])
        .await
        .assert_status(200);

    let url = format!(
        "{}/4_0_0/Group?member=Patient/x&_total=accurate",
        stack.proxy.url()
    );
    let reply = send(&stack.client, "GET", &url, &[], "").await;
    reply.assert_status(200);
    let bundle = reply.json();
    let mut ids: Vec<&str> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap())
        .collect();
    ids.sort();
    let mut expected = vec![migrated_a.as_str(), migrated_b.as_str(), legacy.as_str()];
    expected.sort();
    assert_eq!(ids, expected);
    assert_eq!(bundle["total"], 3);
    let a = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["resource"]["id"] == migrated_a.as_str())
        .unwrap();
    assert_eq!(a["resource"]["quantity"], 2);
    // Listed with its roster, as the legacy server lists Groups it keeps.
    assert_eq!(references(&a["resource"]).len(), 2);
    assert!(references(&a["resource"]).contains(&"Patient/x".to_string()));

    // A member no migrated Group holds: the legacy server's answer as is.
    let url = format!("{}/4_0_0/Group?member=Patient/nobody", stack.proxy.url());
    let bundle = send(&stack.client, "GET", &url, &[], "").await.json();
    assert_eq!(bundle["total"], 0);
}

/// Any Group search: the legacy server holds the Groups kept here without
/// their rosters, so their entries get the roster a read shows; the legacy
/// server's own Groups, and searches that ask for no `member`, come back as
/// it answered them.
#[tokio::test]
async fn searches_show_the_rosters_of_groups_kept_here() {
    let stack = Stack::start(&[]).await;
    let kept = stack.managed_group(&["Patient/a", "Patient/b"]).await;
    let legacy = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/l"}}]))
        .await;
    let search = |query: String| {
        let client = stack.client.clone();
        let url = format!("{}/4_0_0/Group?{query}", stack.proxy.url());
        async move { send(&client, "GET", &url, &[], "").await }
    };

    let found = search(format!("_id={kept},{legacy}")).await;
    found.assert_status(200);
    let bundle = found.json();
    let entry = |id: &str| -> Value {
        bundle["entry"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["resource"]["id"] == id)
            .unwrap_or_else(|| panic!("{id} in {bundle}"))["resource"]
            .clone()
    };
    assert_eq!(references(&entry(&kept)), vec!["Patient/a", "Patient/b"]);
    assert_eq!(entry(&kept)["quantity"], 2);
    assert_eq!(references(&entry(&legacy)), vec!["Patient/l"]);
    let direct = send(
        &stack.client,
        "GET",
        &format!("{}/4_0_0/Group?_id={legacy}", stack.standin.url()),
        &[],
        "",
    )
    .await;
    let through = search(format!("_id={legacy}")).await;
    // `fullUrl` names the host the client asked (the proxy's, or the
    // stand-in's); everything else is as the legacy server answered.
    let without_full_urls = |mut bundle: Value| {
        for entry in bundle["entry"].as_array_mut().into_iter().flatten() {
            entry.as_object_mut().map(|e| e.remove("fullUrl"));
        }
        bundle
    };
    assert_eq!(
        without_full_urls(through.json()),
        without_full_urls(direct.json()),
        "a legacy Group as it was"
    );

    // No member asked for: as the legacy server answered.
    let summary = search(format!("_id={kept}&_elements=id")).await;
    summary.assert_status(200);
    let listed = &summary.json()["entry"][0]["resource"];
    assert!(references(listed).is_empty(), "{listed}");
}
