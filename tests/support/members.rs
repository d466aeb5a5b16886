//! Member patch ops and roster reads shared by the member write and read tests.

use serde_json::{json, Value};

use super::send;
use super::stack::Stack;

/// The op adding a member by `reference`, at the end of the roster.
pub fn add(reference: &str) -> Value {
    json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}})
}

/// The op removing the member `reference`, found by value.
pub fn remove(reference: &str) -> Value {
    json!({"op": "remove", "path": "/member/-", "value": {"entity": {"reference": reference}}})
}

/// The versionId, member references and quantity of `_history/{version}`.
pub async fn roster_at(stack: &Stack, id: &str, version: u64) -> (String, Vec<String>, Value) {
    stack.standin.history_settled().await;
    let url = format!("{}/_history/{version}", stack.group_url(id));
    let read = send(&stack.client, "GET", &url, &[], "").await;
    read.assert_status(200);
    let group = read.json();
    // No members: no `member` element at all (FHIR JSON has no empty arrays).
    let references = group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["entity"]["reference"].as_str().unwrap().to_string())
        .collect();
    (
        group["meta"]["versionId"].as_str().unwrap().to_string(),
        references,
        group["quantity"].clone(),
    )
}
