//! No route around the proxy: every request that could change or read a
//! managed Group's roster goes through the member path or is refused, and
//! nothing reaches the legacy server that could split, lose or shadow the
//! roster. Requests that involve no managed Group go through unchanged.
//! Real stand-in, ClickHouse and FerretDB.

mod support;

use mongodb::bson::doc;
use serde_json::{json, Value};
use support::stack::*;
use support::*;

/// The Group as it must stay after a refused request: no inline `member` in
/// its document, the same version, and the same roster through GET,
/// `_history/{vid}` and member search.
async fn assert_untouched(stack: &Stack, id: &str, version: &str, roster: &[&str], what: &str) {
    let document = stack.group_document(id).await;
    assert!(
        document
            .get_array("member")
            .map_or(true, |members| members.is_empty()),
        "{what}: inline members written: {document}"
    );
    let read = stack.read_group(id).await;
    assert_eq!(read["meta"]["versionId"], version, "{what}: version moved");
    assert_eq!(
        stack.roster_read(id).await,
        roster,
        "{what}: roster changed"
    );
    stack.standin.history_settled().await;
    let at_version = send(
        &stack.client,
        "GET",
        &format!("{}/_history/{version}", stack.group_url(id)),
        &[],
        "",
    )
    .await;
    at_version.assert_status(200);
    assert_eq!(
        references(&at_version.json()),
        roster,
        "{what}: history differs"
    );
    let search = send(
        &stack.client,
        "GET",
        &format!("{}/4_0_0/Group?member={}", stack.proxy.url(), roster[0]),
        &[],
        "",
    )
    .await;
    search.assert_status(200);
    let found = search.json();
    let found: Vec<&str> = found["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["resource"]["id"].as_str())
        .collect();
    assert_eq!(found, vec![id], "{what}: member search disagrees");
}

fn group_with(id: &str, members: &[&str]) -> Value {
    owned(
        json!({"resourceType": "Group", "id": id, "type": "person", "actual": true,
           "member": members.iter().map(|r| json!({"entity": {"reference": r}})).collect::<Vec<_>>()}),
    )
}

fn bundle(kind: &str, entries: Vec<Value>) -> Value {
    json!({"resourceType": "Bundle", "type": kind, "entry": entries})
}

/// One request sent around the member path, and the status it must get.
struct Around {
    what: &'static str,
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
}

fn around(
    what: &'static str,
    method: &'static str,
    path: String,
    headers: &[(&'static str, &'static str)],
    body: &Value,
    status: u16,
    code: &'static str,
) -> Around {
    Around {
        what,
        method,
        path,
        headers: headers.to_vec(),
        body: if body.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(body).unwrap()
        },
        status,
        code,
    }
}

fn write_routes(id: &str) -> Vec<Around> {
    let intruder = group_with(id, &["Patient/intruder"]);
    let add_intruder = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/intruder"}}}]);
    let xml = ("content-type", "application/fhir+xml");
    let text = ("content-type", "text/plain");
    vec![
        around(
            "double slash PATCH",
            "PATCH",
            format!("/4_0_0//Group/{id}"),
            &[PATCH],
            &add_intruder,
            400,
            "invalid",
        ),
        around(
            "double slash PUT",
            "PUT",
            format!("/4_0_0//Group/{id}"),
            &[FHIR_JSON_BODY],
            &intruder,
            400,
            "invalid",
        ),
        around(
            "lower-case type",
            "PATCH",
            format!("/4_0_0/group/{id}"),
            &[PATCH],
            &add_intruder,
            400,
            "invalid",
        ),
        around(
            "trailing slash",
            "PUT",
            format!("/4_0_0/Group/{id}/"),
            &[FHIR_JSON_BODY],
            &intruder,
            400,
            "invalid",
        ),
        around(
            "percent-escape",
            "PUT",
            format!("/4_0_0/Gr%6Fup/{id}"),
            &[FHIR_JSON_BODY],
            &intruder,
            400,
            "invalid",
        ),
        around(
            "dot segment",
            "PATCH",
            format!("/4_0_0/Patient/../Group/{id}"),
            &[PATCH],
            &add_intruder,
            400,
            "invalid",
        ),
        around(
            ";param",
            "PATCH",
            format!("/4_0_0/Group/{id};v=1"),
            &[PATCH],
            &add_intruder,
            400,
            "invalid",
        ),
        around(
            "double slash DELETE",
            "DELETE",
            format!("/4_0_0//Group/{id}"),
            &[],
            &Value::Null,
            400,
            "invalid",
        ),
        around(
            "method override header",
            "POST",
            format!("/4_0_0/Group/{id}"),
            &[PATCH, ("x-http-method-override", "PATCH")],
            &add_intruder,
            400,
            "not-supported",
        ),
        around(
            "_method parameter",
            "POST",
            format!("/4_0_0/Group/{id}?_method=PATCH"),
            &[PATCH],
            &add_intruder,
            400,
            "not-supported",
        ),
        around(
            "PUT as text/plain",
            "PUT",
            format!("/4_0_0/Group/{id}"),
            &[text],
            &intruder,
            415,
            "not-supported",
        ),
        around(
            "PUT as XML",
            "PUT",
            format!("/4_0_0/Group/{id}"),
            &[xml],
            &intruder,
            415,
            "not-supported",
        ),
        around(
            "PUT without content type",
            "PUT",
            format!("/4_0_0/Group/{id}"),
            &[],
            &intruder,
            415,
            "not-supported",
        ),
        around(
            "root pointer replace",
            "PATCH",
            format!("/4_0_0/Group/{id}"),
            &[PATCH],
            &json!([{"op": "replace", "path": "", "value": intruder}]),
            422,
            "not-supported",
        ),
        around(
            "root pointer mixed with member ops",
            "PATCH",
            format!("/4_0_0/Group/{id}"),
            &[PATCH],
            &json!([add_intruder[0], {"op": "add", "path": "", "value": intruder}]),
            422,
            "not-supported",
        ),
        around(
            "$merge of the Group",
            "POST",
            "/4_0_0/Group/$merge".into(),
            &[FHIR_JSON_BODY],
            &intruder,
            422,
            "not-supported",
        ),
        around(
            "$merge of a Bundle",
            "POST",
            "/4_0_0/$merge".into(),
            &[FHIR_JSON_BODY],
            &bundle("batch", vec![json!({"resource": intruder})]),
            422,
            "not-supported",
        ),
        around(
            "$merge of a list",
            "POST",
            "/4_0_0/Patient/$merge".into(),
            &[FHIR_JSON_BODY],
            &json!([{"resourceType": "Patient", "id": "p"}, intruder]),
            422,
            "not-supported",
        ),
        around(
            "transaction PUT",
            "POST",
            "/4_0_0".into(),
            &[FHIR_JSON_BODY],
            &bundle(
                "transaction",
                vec![
                    json!({"resource": intruder, "request": {"method": "PUT", "url": format!("Group/{id}")}}),
                ],
            ),
            422,
            "not-supported",
        ),
        around(
            "batch PATCH",
            "POST",
            "/4_0_0".into(),
            &[FHIR_JSON_BODY],
            &bundle(
                "batch",
                vec![json!({"request": {"method": "PATCH", "url": format!("Group/{id}")}})],
            ),
            422,
            "not-supported",
        ),
        around(
            "transaction DELETE",
            "POST",
            "/4_0_0".into(),
            &[FHIR_JSON_BODY],
            &bundle(
                "transaction",
                vec![json!({"request": {"method": "DELETE", "url": format!("Group/{id}")}})],
            ),
            422,
            "not-supported",
        ),
        around(
            "transaction conditional",
            "POST",
            "/4_0_0".into(),
            &[FHIR_JSON_BODY],
            &bundle(
                "transaction",
                vec![
                    json!({"resource": intruder, "request": {"method": "PUT", "url": "Group?name=x"}}),
                ],
            ),
            422,
            "not-supported",
        ),
        Around {
            what: "Bundle in XML",
            method: "POST",
            path: "/4_0_0".into(),
            headers: vec![xml],
            body: b"<Bundle xmlns=\"http://hl7.org/fhir\"/>".to_vec(),
            status: 415,
            code: "not-supported",
        },
        around(
            "conditional PUT",
            "PUT",
            format!("/4_0_0/Group?_id={id}"),
            &[FHIR_JSON_BODY],
            &intruder,
            422,
            "not-supported",
        ),
        around(
            "conditional PATCH",
            "PATCH",
            format!("/4_0_0/Group?_id={id}"),
            &[PATCH],
            &add_intruder,
            422,
            "not-supported",
        ),
        around(
            "conditional DELETE",
            "DELETE",
            format!("/4_0_0/Group?_id={id}"),
            &[],
            &Value::Null,
            422,
            "not-supported",
        ),
    ]
}

/// Each route the measurements found around the member path is refused with
/// an OperationOutcome, and afterwards the Group is exactly as before.
#[tokio::test]
async fn every_write_around_a_managed_roster_is_refused_and_changes_nothing() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a", "Patient/b"]).await;
    for request in write_routes(&id) {
        let reply = send(
            &stack.client,
            request.method,
            &format!("{}{}", stack.proxy.url(), request.path),
            &request.headers,
            request.body.clone(),
        )
        .await;
        assert_eq!(
            reply.status,
            request.status,
            "{}: {}",
            request.what,
            String::from_utf8_lossy(&reply.body)
        );
        assert_outcome(&reply, request.status, request.code);
        assert_untouched(&stack, &id, "2", &["Patient/a", "Patient/b"], request.what).await;
    }
}

/// Reads the legacy server would answer from an (empty) inline roster are
/// refused for managed Groups, naming what to use instead.
#[tokio::test]
async fn reads_answered_from_the_inline_roster_are_refused_for_managed_groups() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    for path in [
        format!("/4_0_0/Group/{id}/$everything"),
        format!("/4_0_0/Group/{id}/$export"),
        "/4_0_0/Group/$export".to_string(),
        "/4_0_0/Patient?_revinclude=Group:member".to_string(),
        format!("/4_0_0/Patient?_has:Group:member:_id={id}"),
        "/4_0_0/Patient?_include=Group:member".to_string(),
    ] {
        let reply = send(
            &stack.client,
            "GET",
            &format!("{}{path}", stack.proxy.url()),
            &[],
            "",
        )
        .await;
        assert_outcome(&reply, 422, "not-supported");
    }
    // Single versions and the paged roster stay available.
    stack.standin.history_settled().await;
    let version = send(
        &stack.client,
        "GET",
        &format!("{}/_history/2", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    version.assert_status(200);
    assert_eq!(references(&version.json()), vec!["Patient/a"]);
}

/// The instance history of a managed Group carries each version's roster,
/// as `_history/{vid}` does, and no empty member array.
#[tokio::test]
async fn the_history_of_a_managed_group_carries_each_versions_roster() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/b"}}}]),
            &[],
        )
        .await
        .assert_status(200);
    stack.standin.history_settled().await;
    let history = send(
        &stack.client,
        "GET",
        &format!("{}/_history", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    history.assert_status(200);
    let bundle = history.json();
    assert_eq!(bundle["resourceType"], "Bundle");
    let mut by_version: Vec<(String, Vec<String>, Option<i64>)> = bundle["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let resource = &e["resource"];
            (
                resource["meta"]["versionId"].as_str().unwrap().to_string(),
                references(resource),
                resource["quantity"].as_i64(),
            )
        })
        .collect();
    by_version.sort();
    assert_eq!(
        by_version,
        vec![
            ("1".to_string(), vec![], Some(0)),
            ("2".to_string(), vec!["Patient/a".to_string()], Some(1)),
            (
                "3".to_string(),
                vec!["Patient/a".to_string(), "Patient/b".to_string()],
                Some(2)
            ),
        ]
    );
    for entry in bundle["entry"].as_array().unwrap() {
        assert!(
            entry["resource"]["member"] != json!([]),
            "no empty arrays in FHIR JSON"
        );
    }
    stack.standin.history_settled().await;
    let first = send(
        &stack.client,
        "GET",
        &format!("{}/_history/1", stack.group_url(&id)),
        &[],
        "",
    )
    .await;
    first.assert_status(200);
    let first = first.json();
    assert!(
        first.get("member").is_none(),
        "no empty member array: {first}"
    );
    assert_eq!(first["quantity"], 0);
}

/// While no Group's roster is managed, requests around the member path are
/// the legacy server's business: the proxy forwards them, and the answers are
/// those the legacy server gives directly.
#[tokio::test]
async fn requests_around_the_member_path_pass_through_while_no_group_is_managed() {
    let stack = Stack::start(&[]).await;
    let id = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/inline"}}]))
        .await;
    for path in [
        format!("/4_0_0/Group/{id}/$everything"),
        "/4_0_0/Patient?_revinclude=Group:member".to_string(),
    ] {
        let direct = send(
            &stack.client,
            "GET",
            &format!("{}{path}", stack.standin.url()),
            &[],
            "",
        )
        .await;
        let proxied = send(
            &stack.client,
            "GET",
            &format!("{}{path}", stack.proxy.url()),
            &[],
            "",
        )
        .await;
        assert_eq!(proxied.status, direct.status, "{path}");
        assert_eq!(proxied.body, direct.body, "{path}");
    }
    // Writes of several resources and conditional writes reach the legacy
    // server too (whatever it makes of them).
    let conditional = send(
        &stack.client,
        "DELETE",
        &format!("{}/4_0_0/Group?_id=nothing-like-it", stack.proxy.url()),
        &[],
        "",
    )
    .await;
    let direct = send(
        &stack.client,
        "DELETE",
        &format!("{}/4_0_0/Group?_id=nothing-like-it", stack.standin.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(conditional.status, direct.status);
    let transaction = bundle(
        "transaction",
        vec![
            json!({"resource": group_with(&id, &["Patient/x"]), "request": {"method": "PUT", "url": format!("Group/{id}")}}),
        ],
    );
    let body = serde_json::to_vec(&transaction).unwrap();
    let direct = send(
        &stack.client,
        "POST",
        &format!("{}/4_0_0", stack.standin.url()),
        &[FHIR_JSON_BODY],
        body.clone(),
    )
    .await;
    let proxied = send(
        &stack.client,
        "POST",
        &format!("{}/4_0_0", stack.proxy.url()),
        &[FHIR_JSON_BODY],
        body,
    )
    .await;
    assert_eq!(proxied.status, direct.status);
    assert!(!String::from_utf8_lossy(&proxied.body).contains("member store"));
}

/// A managed Group whose document gained inline members behind the proxy's
/// back is refused on read and write (counted in a metric), listed by
/// `migrate --check`, and folded in by `migrate --fold`.
#[tokio::test]
async fn drift_is_refused_listed_and_folded_never_erased() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    stack
        .mongo
        .collection::<mongodb::bson::Document>("Group_4_0_0")
        .update_one(
            doc! {"id": &id},
            doc! {"$set": {"member": [{"entity": {"reference": "Patient/direct"}}]}},
        )
        .await
        .unwrap();

    let read = send(&stack.client, "GET", &stack.group_url(&id), &[], "").await;
    assert_outcome(&read, 409, "conflict");
    let write = stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/c"}}}]),
            &[],
        )
        .await;
    assert_outcome(&write, 409, "conflict");
    let metrics = send(
        &stack.client,
        "GET",
        &format!("{}/metrics", stack.proxy.admin_url()),
        &[],
        "",
    )
    .await;
    let text = String::from_utf8_lossy(&metrics.body).to_string();
    let line = text
        .lines()
        .find(|l| l.starts_with("fgp_group_drift_detected_total"))
        .unwrap_or_default();
    assert!(line.ends_with(" 2"), "two refusals counted: {line:?}");
    let read_refusal = r#"fgp_http_requests_total{disposition="intercepted",method="GET",route="group_read",status="409"} 1"#;
    assert!(
        text.lines().any(|l| l == read_refusal),
        "the read's refusal is the proxy's answer, not a forwarded one: {text}"
    );

    let check = stack.migrate(&["--check", "--id", &id]);
    assert_eq!(check.status.code(), Some(1), "{check:?}");
    let report = String::from_utf8_lossy(&check.stdout);
    assert!(report.contains(&format!("Group/{id}: drift")), "{report}");
    assert!(
        stack.group_document(&id).await.contains_key("member"),
        "--check changes nothing"
    );
    // A plain migrate does not erase the inline members either.
    let plain = stack.migrate(&["--id", &id]);
    assert_eq!(plain.status.code(), Some(1), "{plain:?}");
    assert!(stack.group_document(&id).await.contains_key("member"));

    let fold = stack.migrate(&["--fold", "--id", &id]);
    assert!(fold.status.success(), "{fold:?}");
    assert!(!stack.group_document(&id).await.contains_key("member"));
    let mut roster = stack.roster_read(&id).await;
    roster.sort();
    assert_eq!(roster, vec!["Patient/a", "Patient/direct"]);
}

/// A request pipelined behind one the proxy answers itself is answered too,
/// on the same connection.
#[tokio::test]
async fn a_request_pipelined_behind_an_intercepted_patch_is_answered() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    let ops = br#"[{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/piped"}}}]"#;
    let mut pipelined = format!(
        "PATCH /4_0_0/Group/{id} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json-patch+json\r\nContent-Length: {}\r\n\r\n",
        ops.len()
    )
    .into_bytes();
    pipelined.extend_from_slice(ops);
    pipelined
        .extend_from_slice(format!("GET /4_0_0/Group/{id} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes());
    let mut connection = support::raw::RawConnection::open(stack.proxy.addr).await;
    connection.write(&pipelined).await;
    let patched = connection.read_response().await;
    assert_eq!(
        patched.status,
        200,
        "{}",
        String::from_utf8_lossy(&patched.body)
    );
    let read = connection.read_response().await;
    assert_eq!(read.status, 200);
    let group: Value = serde_json::from_slice(&read.body).unwrap();
    assert_eq!(references(&group), vec!["Patient/a", "Patient/piped"]);
    // Forwarded requests pipeline the same way.
    let forwarded = "GET /4_0_0/Patient/none HTTP/1.1\r\nHost: x\r\n\r\n".repeat(2);
    connection.write(forwarded.as_bytes()).await;
    for _ in 0..2 {
        assert_eq!(connection.read_response().await.status, 404);
    }
}

/// Legacy servers that make no version for a write that changes nothing
/// (the reference server does, and ignores If-Match on PATCH): a roster PUT
/// whose only change is the roster, and a mixed PATCH whose other ops change
/// nothing, still make exactly one version, named in the answer, with that
/// version's roster in its history.
#[tokio::test]
async fn a_legacy_half_that_changes_nothing_still_gives_one_true_version() {
    let mut fidelity = standin_legacy_fhir::Fidelity::simple();
    fidelity.real_patch = true;
    fidelity.patch_ignores_if_match = true;
    let stack = Stack::start_behind(Standin::start_with_fidelity(fidelity).await, &[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    let put = stack
        .put_group(&id, group_with(&id, &["Patient/a", "Patient/b"]), &[])
        .await;
    put.assert_status(200);
    assert_eq!(put.header("etag"), Some("W/\"3\""));
    assert_eq!(references(&put.json()), vec!["Patient/a", "Patient/b"]);
    let mixed = stack
        .patch(
            &id,
            json!([
                {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/c"}}},
                {"op": "replace", "path": "/type", "value": "person"}
            ]),
            &[],
        )
        .await;
    mixed.assert_status(200);
    assert_eq!(mixed.header("etag"), Some("W/\"4\""));
    let read = stack.read_group(&id).await;
    assert_eq!(read["meta"]["versionId"], "4");
    stack.standin.history_settled().await;
    for (version, roster) in [
        (2, vec!["Patient/a"]),
        (3, vec!["Patient/a", "Patient/b"]),
        (4, vec!["Patient/a", "Patient/b", "Patient/c"]),
    ] {
        let reply = send(
            &stack.client,
            "GET",
            &format!("{}/_history/{version}", stack.group_url(&id)),
            &[],
            "",
        )
        .await;
        reply.assert_status(200);
        assert_eq!(references(&reply.json()), roster, "version {version}");
    }
    // A stale If-Match is refused although the legacy half would make no version.
    let stale = stack
        .put_group(
            &id,
            group_with(&id, &["Patient/a"]),
            &[("if-match", "W/\"3\"")],
        )
        .await;
    assert_eq!(
        stale.status,
        412,
        "{}",
        String::from_utf8_lossy(&stale.body)
    );
    assert_eq!(stack.roster_read(&id).await.len(), 3);
}

/// Mixed patches through the proxy racing direct PATCHes to a legacy server
/// that ignores If-Match on PATCH (as the reference server does): the proxy
/// sends the non-member half as a PUT with If-Match, which that server
/// guards, so every mixed patch is applied whole (its member and its other
/// change, in one version) or not at all, and no direct write is lost.
#[tokio::test]
async fn mixed_patches_racing_direct_legacy_writes_apply_whole_or_not_at_all() {
    let mut fidelity = standin_legacy_fhir::Fidelity::simple();
    fidelity.real_patch = true;
    fidelity.patch_ignores_if_match = true;
    let standin = Standin::start_with_fidelity(fidelity).await;
    let direct_base = format!("{}/4_0_0", standin.url());
    let stack = Stack::start_behind(standin, &[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/extension", "value": []}]),
            &[],
        )
        .await
        .assert_status(200);
    const EACH: usize = 10;
    let extension = |who: String| json!({"url": "https://example.org/race", "valueString": who});
    let proxied = futures_util::future::join_all((0..EACH).map(|i| {
        stack.patch(
            &id,
            json!([
                {"op": "add", "path": "/member/-", "value": {"entity": {"reference": format!("Patient/m{i}")}}},
                {"op": "add", "path": "/extension/-", "value": extension(format!("m{i}"))}
            ]),
            &[],
        )
    }));
    let direct = futures_util::future::join_all((0..EACH).map(|i| {
        let body = serde_json::to_vec(&json!([
            {"op": "add", "path": "/extension/-", "value": extension(format!("d{i}"))}
        ]))
        .unwrap();
        let url = format!("{direct_base}/Group/{id}");
        let client = &stack.client;
        async move {
            send(
                client,
                "PATCH",
                &url,
                &[("content-type", "application/json-patch+json")],
                body,
            )
            .await
        }
    }));
    let (proxied, direct) = tokio::join!(proxied, direct);

    let group = stack.read_group(&id).await;
    let written: Vec<String> = group["extension"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["valueString"].as_str().unwrap().to_string())
        .collect();
    let roster = stack.roster_read(&id).await;
    let count = |list: &[String], item: &str| list.iter().filter(|x| *x == item).count();
    for (i, reply) in direct.iter().enumerate() {
        reply.assert_status(200);
        assert_eq!(
            count(&written, &format!("d{i}")),
            1,
            "direct write {i} lost or doubled"
        );
    }
    let mut applied = 0;
    for (i, reply) in proxied.iter().enumerate() {
        let member = count(&roster, &format!("Patient/m{i}"));
        let other = count(&written, &format!("m{i}"));
        if reply.status == 200 {
            applied += 1;
            assert_eq!(
                (member, other),
                (1, 1),
                "mixed patch {i} answered 200 but not applied whole"
            );
        } else {
            assert_eq!(
                (member, other),
                (0, 0),
                "mixed patch {i} answered {} but partly applied: {}",
                reply.status,
                String::from_utf8_lossy(&reply.body)
            );
        }
    }
    assert!(applied > 0, "no mixed patch got through");
    // One version per applied write: the managed Group's first patch, the
    // extension array, every direct write and every applied mixed patch.
    let version: usize = group["meta"]["versionId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(version, 1 + 1 + 1 + EACH + applied, "versions: {group}");
}

/// A managed Group deleted, then created again with the same id: each
/// version reads the roster it had, before and after, never the other
/// generation's.
#[tokio::test]
async fn versions_keep_their_rosters_across_delete_and_create_again() {
    let stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/b"}}}]),
            &[],
        )
        .await
        .assert_status(200);
    let deleted = send(&stack.client, "DELETE", &stack.group_url(&id), &[], "").await;
    assert!((200..300).contains(&deleted.status), "{}", deleted.status);
    stack.standin.history_settled().await;
    let roster_at = |version: String| {
        let url = format!("{}/_history/{version}", stack.group_url(&id));
        let client = stack.client.clone();
        async move {
            let reply = send(&client, "GET", &url, &[], "").await;
            reply.assert_status(200);
            references(&reply.json())
        }
    };
    assert_eq!(
        roster_at("2".into()).await,
        vec!["Patient/a"],
        "after the delete"
    );
    assert_eq!(roster_at("3".into()).await, vec!["Patient/a", "Patient/b"]);

    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let again = stack.put_group(&id, group_with(&id, &[]), &[]).await;
    assert!(
        again.status == 201 || again.status == 200,
        "{}",
        again.status
    );
    let added = stack
        .patch(
            &id,
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/new"}}}]),
            &[],
        )
        .await;
    added.assert_status(200);
    let new_version = added
        .header("etag")
        .unwrap()
        .trim_start_matches("W/")
        .trim_matches('"')
        .to_string();
    assert_eq!(stack.roster_read(&id).await, vec!["Patient/new"]);
    assert_eq!(roster_at(new_version).await, vec!["Patient/new"]);
    assert_eq!(
        roster_at("2".into()).await,
        vec!["Patient/a"],
        "the old generation's"
    );
    assert_eq!(roster_at("3".into()).await, vec!["Patient/a", "Patient/b"]);
}

/// A second owner's Group with the same id, as the reference server lets one
/// exist (its `$merge` creates it): stored beside the first in MongoDB.
async fn add_other_owners_group(stack: &Stack, id: &str, owner: &str) {
    let groups = stack
        .mongo
        .collection::<mongodb::bson::Document>("Group_4_0_0");
    // The stand-in keeps ids unique; the reference server does not.
    let _ = groups.drop_index("id_1").await;
    groups
        .insert_one(doc! {
            "resourceType": "Group", "id": id, "type": "person", "actual": true,
            "name": format!("{owner}'s"),
            "meta": {"versionId": "1", "lastUpdated": mongodb::bson::DateTime::now(),
                     "source": "https://other", "security": [
                         {"system": "https://www.icanbwell.com/owner", "code": owner}]},
            "member": [{"entity": {"reference": "Patient/other-owners"}}],
            "_uuid": uuid::Uuid::new_v4().to_string(),
            "_sourceId": id, "_sourceAssigningAuthority": owner,
        })
        .await
        .unwrap();
}

/// Ids shared by owners (the reference server allows them) and the other
/// addresses of a Group (`id|owner`, its `_uuid`): a Group the proxy keeps
/// is never answered without its roster. A plain id shared by owners is
/// refused as the reference server refuses it (400, never 409) when one of
/// them is kept here, and goes upstream untouched when none is; `id|owner`
/// or `_uuid` of a kept Group is that Group (served with its roster) unless
/// its id is shared, and both go upstream for the legacy server's own
/// Groups.
#[tokio::test]
async fn ids_shared_by_owners_and_other_addresses_never_lose_a_kept_roster() {
    let stack = Stack::start(&[]).await;
    let get = |path: String| {
        let client = stack.client.clone();
        async move { send(&client, "GET", &path, &[], "").await }
    };
    let add = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/new"}}}]);

    // Kept here, then shared with another owner.
    let kept = stack.managed_group(&["Patient/a"]).await;
    add_other_owners_group(&stack, &kept, "other").await;
    let read = get(stack.group_url(&kept)).await;
    assert_outcome(&read, 400, "invalid");
    assert!(read.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .starts_with(&format!("Multiple resources found with id {kept}")));
    assert_outcome(&stack.patch(&kept, add.clone(), &[]).await, 400, "invalid");
    let put = stack
        .put_group(&kept, group_with(&kept, &["Patient/b"]), &[])
        .await;
    assert_outcome(&put, 400, "invalid");
    assert_eq!(
        stack.members(&kept).await.len(),
        1,
        "the kept roster is unchanged"
    );

    // The legacy server's own Group, shared: its requests go upstream as sent.
    let legacy = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/l"}}]))
        .await;
    add_other_owners_group(&stack, &legacy, "other").await;
    let direct = get(format!("{}/4_0_0/Group/{legacy}", stack.standin.url())).await;
    let through = get(stack.group_url(&legacy)).await;
    assert_eq!(
        (through.status, through.json()),
        (direct.status, direct.json())
    );
    assert!(stack.members(&legacy).await.is_empty(), "not taken over");

    // A kept Group under its owner-qualified address is the same Group, as
    // on the reference server; by its `_uuid` it is refused, naming the
    // address to use. Created by PUT, so its `_uuid` is not its id.
    let single = format!("single-{}", uuid::Uuid::new_v4().simple());
    stack
        .put_group(&single, group_with(&single, &[]), &[])
        .await
        .assert_status(201);
    let ops = json!([{"op": "add", "path": "/member", "value": [{"entity": {"reference": "Patient/s"}}]}]);
    stack.patch(&single, ops, &[]).await.assert_status(200);
    let qualified = format!("{}/4_0_0/Group/{single}|{TEST_OWNER}", stack.proxy.url());
    let read = get(qualified.clone()).await;
    read.assert_status(200);
    assert_eq!(references(&read.json()), vec!["Patient/s"]);
    let patch = send(
        &stack.client,
        "PATCH",
        &qualified,
        &[PATCH],
        serde_json::to_vec(&add).unwrap(),
    )
    .await;
    patch.assert_status(200);
    assert_eq!(
        stack.members(&single).await.len(),
        2,
        "written through the member store"
    );
    // By its `_uuid` too (the reference server serves it there).
    let uuid = stack.group_key(&single).await;
    assert_ne!(uuid, single);
    let by_uuid = format!("{}/4_0_0/Group/{uuid}", stack.proxy.url());
    let read = get(by_uuid.clone()).await;
    read.assert_status(200);
    assert_eq!(read.json()["id"], single.as_str());
    assert_eq!(references(&read.json()), vec!["Patient/s", "Patient/new"]);
    let again = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/third"}}}]);
    let patch = send(
        &stack.client,
        "PATCH",
        &by_uuid,
        &[PATCH],
        serde_json::to_vec(&again).unwrap(),
    )
    .await;
    patch.assert_status(200);
    assert_eq!(
        stack.members(&single).await.len(),
        3,
        "written through the member store"
    );
    // A shared id's owner-qualified address of the kept Group is refused too:
    // the proxy keeps one roster per id, so it cannot tell them apart; the
    // refusal says so instead of naming the plain id, which is refused too.
    let read = get(format!(
        "{}/4_0_0/Group/{kept}|{TEST_OWNER}",
        stack.proxy.url()
    ))
    .await;
    assert_outcome(&read, 400, "not-supported");
    let why = read.json()["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        why.contains("also the id of another owner's Group") && !why.contains("send the request"),
        "{why}"
    );

    // ... and the legacy server's own Groups go upstream under any address.
    let inline = stack
        .create_legacy_group(json!([{"entity": {"reference": "Patient/i"}}]))
        .await;
    let address = format!("{inline}|{TEST_OWNER}");
    let direct = get(format!("{}/4_0_0/Group/{address}", stack.standin.url())).await;
    let through = get(format!("{}/4_0_0/Group/{address}", stack.proxy.url())).await;
    assert_eq!(through.status, direct.status);
}
