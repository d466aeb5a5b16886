//! Da Vinci ATR `$member-add` and `$member-remove` on a migrated Group, through
//! the member write path. Against the real servers and the stand-in legacy
//! FHIR server.

mod support;

use serde_json::{json, Value};
use support::stack::*;
use support::*;

/// Da Vinci ATR operations run through the member write path.
#[tokio::test]
async fn atr_member_add_and_remove() {
    let stack = Stack::start(&[]).await;
    let id = stack.create_group(json!([])).await;
    let call = |operation: &'static str, parameters: Value| {
        let url = format!("{}/${operation}", stack.group_url(&id));
        let body =
            serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": parameters}))
                .unwrap();
        let client = stack.client.clone();
        async move {
            send(
                &client,
                "POST",
                &url,
                &[("content-type", "application/fhir+json")],
                body,
            )
            .await
        }
    };
    let added = call("member-add", json!([
        {"name": "patientReference", "valueReference": {"reference": "Patient/atr1"}},
        {"name": "attributionPeriod", "valuePeriod": {"start": "2026-01-01", "end": "2026-12-31"}}
    ])).await;
    added.assert_status(200);
    assert_eq!(added.header("etag"), Some("W/\"2\""));
    let group = send(&stack.client, "GET", &stack.group_url(&id), &[], "")
        .await
        .json();
    assert_eq!(group["member"][0]["period"]["end"], "2026-12-31");
    assert_eq!(group["quantity"], 1);

    let removed = call(
        "member-remove",
        json!([
            {"name": "patientReference", "valueReference": {"reference": "Patient/atr1"}}
        ]),
    )
    .await;
    removed.assert_status(200);
    let group = send(&stack.client, "GET", &stack.group_url(&id), &[], "")
        .await
        .json();
    assert_eq!(
        group["member"][0]["inactive"], true,
        "ATR keeps removed members, inactive"
    );
    assert_eq!(group["quantity"], 0);

    // Every ATR form: the provider is stored as the IG's extension.
    call(
        "member-add",
        json!([
            {"name": "patientReference", "valueReference": {"reference": "Patient/atr2"}},
            {"name": "providerReference", "valueReference": {"reference": "Practitioner/1"}}
        ]),
    )
    .await
    .assert_status(200);
    call(
        "member-add",
        json!([
            {"name": "memberId", "valueIdentifier": {"system": "urn:payer", "value": "M7"}},
            {"name": "providerNpi", "valueIdentifier": {"value": "1234567893"}},
            {"name": "attributionPeriod", "valuePeriod": {"start": "2027-01-01"}}
        ]),
    )
    .await
    .assert_status(200);
    let group = send(&stack.client, "GET", &stack.group_url(&id), &[], "")
        .await
        .json();
    assert_eq!(
        group["member"][1]["extension"][0]["url"],
        fhir_group_proxy::fhir::atr::ATTRIBUTED_PROVIDER_URL
    );
    assert_eq!(group["member"][2]["entity"]["identifier"]["value"], "M7");
    assert_eq!(group["member"][2]["period"]["start"], "2027-01-01");
    let missing = call(
        "member-remove",
        json!([
            {"name": "patientReference", "valueReference": {"reference": "Patient/nobody"}}
        ]),
    )
    .await;
    assert_outcome(&missing, 422, "not-found");
}
