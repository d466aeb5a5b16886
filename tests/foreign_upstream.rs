//! The proxy in front of a legacy server whose Groups are not in the
//! configured MongoDB (HAPI-like: another database): it manages none of them,
//! so every Group request behaves exactly as it does directly. Real stand-in
//! (writing to its own database), ClickHouse and FerretDB.

mod support;

use serde_json::{json, Value};
use support::stack::*;
use support::*;

/// What a client sees of one answer: status, version and roster.
#[derive(Debug, PartialEq)]
struct Seen {
    status: u16,
    version: Option<String>,
    members: Vec<String>,
}

fn seen(reply: &Reply) -> Seen {
    let body: Value = serde_json::from_slice(&reply.body).unwrap_or(Value::Null);
    Seen {
        status: reply.status,
        version: body["meta"]["versionId"].as_str().map(str::to_string),
        members: references(&body),
    }
}

fn group(id: Option<&str>, members: &[&str]) -> Value {
    let mut group = json!({"resourceType": "Group", "type": "person", "actual": true,
        "member": members.iter().map(|r| json!({"entity": {"reference": r}})).collect::<Vec<_>>()});
    if let Some(id) = id {
        group["id"] = json!(id);
    }
    owned(group)
}

async fn read(client: &HttpClient, url: &str) -> Seen {
    seen(&send(client, "GET", url, &[], "").await)
}

/// The same scenario against `base` (the stand-in directly, or the proxy):
/// what the client saw at each step.
async fn scenario(
    client: &HttpClient,
    base: &str,
    standin: &Standin,
    put_id: &str,
) -> Vec<(&'static str, Seen)> {
    let mut steps = Vec::new();
    let created = send(
        client,
        "POST",
        &format!("{base}/4_0_0/Group"),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&group(None, &["Patient/a", "Patient/b"])).unwrap(),
    )
    .await;
    steps.push(("POST with members", seen(&created)));
    let id = created.json()["id"].as_str().unwrap().to_string();
    let url = format!("{base}/4_0_0/Group/{id}");
    steps.push(("GET after create", read(client, &url).await));
    let add = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/c"}}}]);
    let reply = send(
        client,
        "PATCH",
        &url,
        &[PATCH],
        serde_json::to_vec(&add).unwrap(),
    )
    .await;
    steps.push(("member PATCH add", seen(&reply)));
    steps.push(("GET after add", read(client, &url).await));
    let remove = json!([{"op": "remove", "path": "/member/0"}]);
    let reply = send(
        client,
        "PATCH",
        &url,
        &[PATCH],
        serde_json::to_vec(&remove).unwrap(),
    )
    .await;
    steps.push(("member PATCH remove at 0", seen(&reply)));
    let atr = json!({"resourceType": "Parameters", "parameter": [
        {"name": "patientReference", "valueReference": {"reference": "Patient/atr"}}]});
    let reply = send(
        client,
        "POST",
        &format!("{url}/$member-add"),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&atr).unwrap(),
    )
    .await;
    steps.push((
        "$member-add",
        Seen {
            status: reply.status,
            version: None,
            members: vec![],
        },
    ));
    let reply = send(
        client,
        "PUT",
        &url,
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&group(Some(&id), &["Patient/x", "Patient/y"])).unwrap(),
    )
    .await;
    steps.push(("PUT with members", seen(&reply)));
    steps.push(("GET after PUT", read(client, &url).await));
    let reply = send(
        client,
        "PUT",
        &format!("{base}/4_0_0/Group/{put_id}"),
        &[FHIR_JSON_BODY],
        serde_json::to_vec(&group(Some(put_id), &["Patient/p"])).unwrap(),
    )
    .await;
    steps.push(("PUT to a new id", seen(&reply)));
    standin.history_settled().await;
    let reply = send(client, "GET", &format!("{url}/_history/2"), &[], "").await;
    steps.push(("_history/2", seen(&reply)));
    let reply = send(client, "DELETE", &url, &[], "").await;
    steps.push((
        "DELETE",
        Seen {
            status: reply.status,
            version: None,
            members: vec![],
        },
    ));
    steps.push(("GET after DELETE", read(client, &url).await));
    steps
}

#[tokio::test]
async fn every_group_request_behaves_as_direct_when_the_groups_live_elsewhere() {
    let elsewhere = unique_name("not_the_legacy_servers");
    let stack = Stack::start(&[("FGP_MONGO_DATABASE", elsewhere.as_str())]).await;
    let direct = scenario(
        &stack.client,
        &stack.standin.url(),
        &stack.standin,
        "put-direct",
    )
    .await;
    let proxied = scenario(
        &stack.client,
        &stack.proxy.url(),
        &stack.standin,
        "put-proxied",
    )
    .await;
    assert_eq!(direct.len(), proxied.len());
    for ((what, direct), (_, proxied)) in direct.iter().zip(&proxied) {
        assert_eq!(proxied, direct, "{what}");
    }
    // The members the legacy server holds are all there (nothing stripped).
    assert_eq!(
        proxied
            .iter()
            .find(|(w, _)| *w == "GET after PUT")
            .unwrap()
            .1
            .members,
        vec!["Patient/x", "Patient/y"]
    );
    let ready = send(
        &stack.client,
        "GET",
        &format!("{}/readyz", stack.proxy.admin_url()),
        &[],
        "",
    )
    .await;
    ready.assert_status(200);
    let warnings = ready.json()["warnings"].to_string();
    assert!(
        warnings.contains("does not hold"),
        "readiness says so: {warnings}"
    );
}
