//! A member PATCH means through the proxy exactly what it means to the
//! legacy server: the same random patches go through the proxy (to a Group
//! whose roster the proxy keeps) and straight to the stand-in (to a Group it
//! keeps inline, patched as a whole document by the `json-patch` crate),
//! from the same starting roster; after every case both `member` arrays are
//! equal byte for byte, and both sides fail the same cases, changing nothing.

mod support;

use serde_json::{json, Value};
use support::stack::{Stack, FHIR_JSON_BODY, PATCH};
use support::*;

/// A small deterministic generator, so a failing case can be replayed from
/// its seed.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

/// A member element with some of every kind of content FHIR allows, and
/// duplicates on purpose (references come from a small pool).
fn member(dice: &mut Dice) -> Value {
    let mut element = json!({"entity": {"reference": format!("Patient/p{}", dice.below(12))}});
    if dice.chance(30) {
        element["entity"]["display"] = json!(format!("Person {}", dice.below(5)));
    }
    if dice.chance(20) {
        element["period"] =
            json!({"start": "2026-01-01", "end": format!("2026-12-{:02}", 1 + dice.below(28))});
    }
    if dice.chance(20) {
        element["inactive"] = json!(dice.chance(50));
    }
    if dice.chance(15) {
        element["extension"] = json!([{"url": "http://example.org/attribution", "valueString": format!("x{}", dice.below(3))}]);
    }
    if dice.chance(10) {
        element["entity"]["identifier"] =
            json!({"system": "urn:mrn", "value": format!("m{}", dice.below(4))});
    }
    element
}

fn index(dice: &mut Dice, len: usize) -> String {
    // Mostly in range, sometimes at or past the end, sometimes malformed.
    match dice.below(20) {
        0 => "-".into(),
        1 => format!("{}", len + 1 + dice.below(3)),
        2 => "01".into(),
        _ => format!("{}", dice.below(len + 1)),
    }
}

fn op(dice: &mut Dice, model: &Option<Vec<Value>>) -> Value {
    let len = model.as_ref().map_or(0, Vec::len);
    let existing = |dice: &mut Dice| -> Value {
        match model {
            Some(m) if !m.is_empty() => m[dice.below(m.len())].clone(),
            _ => json!({"entity": {"reference": "Patient/none"}}),
        }
    };
    match dice.below(17) {
        0..=2 => json!({"op": "add", "path": "/member/-", "value": member(dice)}),
        3 => {
            json!({"op": "add", "path": format!("/member/{}", index(dice, len)), "value": member(dice)})
        }
        4 | 5 => json!({"op": "remove", "path": format!("/member/{}", index(dice, len))}),
        6 => {
            json!({"op": "replace", "path": format!("/member/{}", index(dice, len)), "value": member(dice)})
        }
        7 => {
            // A test that holds as often as not.
            let at = dice.below(len.max(1));
            let value = match (dice.chance(60), model) {
                (true, Some(m)) if at < m.len() => m[at].clone(),
                _ => existing(dice),
            };
            json!({"op": "test", "path": format!("/member/{at}"), "value": value})
        }
        8 => {
            json!({"op": "move", "from": format!("/member/{}", index(dice, len)), "path": format!("/member/{}", index(dice, len))})
        }
        9 => {
            json!({"op": "copy", "from": format!("/member/{}", index(dice, len)), "path": format!("/member/{}", index(dice, len))})
        }
        10 => {
            json!({"op": "replace", "path": format!("/member/{}/inactive", dice.below(len + 1)), "value": true})
        }
        11 => {
            json!({"op": "add", "path": format!("/member/{}/period", dice.below(len + 1)), "value": {"start": "2027-01-01"}})
        }
        12 => {
            json!({"op": "remove", "path": format!("/member/{}/entity/display", dice.below(len + 1))})
        }
        13 => {
            json!({"op": "test", "path": format!("/member/{}/entity/reference", dice.below(len + 1)), "value": existing(dice)["entity"]["reference"].clone()})
        }
        14 => match dice.below(4) {
            0 => json!({"op": "remove", "path": "/member"}),
            1 => json!({"op": "add", "path": "/member", "value": [member(dice), member(dice)]}),
            2 => json!({"op": "replace", "path": "/member", "value": [member(dice)]}),
            _ => {
                json!({"op": "test", "path": "/member", "value": model.clone().unwrap_or_default()})
            }
        },
        // The reference server's remove-by-value: RFC 6902 refuses it (the
        // proxy runs with the extension off here, as the stand-in knows none).
        15 => json!({"op": "remove", "path": "/member/-", "value": existing(dice)}),
        _ => {
            json!({"op": "add", "path": format!("/member/{}/extension", dice.below(len + 1)), "value": [{"url": "http://example.org/x", "valueBoolean": true}]})
        }
    }
}

/// What the stand-in itself answers after applying `ops` with json-patch:
/// the model the generator steers by (only for choosing indexes and values).
fn apply_locally(model: &Option<Vec<Value>>, ops: &[Value]) -> Option<Option<Vec<Value>>> {
    let mut document = json!({"resourceType": "Group"});
    if let Some(members) = model {
        document["member"] = Value::Array(members.clone());
    }
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).ok()?;
    json_patch::patch(&mut document, &patch).ok()?;
    Some(document["member"].as_array().cloned())
}

fn starting_roster(dice: &mut Dice) -> Option<Vec<Value>> {
    match dice.below(10) {
        0 => None,
        1 => Some(Vec::new()),
        _ => Some((0..dice.below(51)).map(|_| member(dice)).collect()),
    }
}

fn group_with(id: &str, roster: &Option<Vec<Value>>) -> Value {
    let mut group =
        owned(json!({"resourceType": "Group", "id": id, "type": "person", "actual": true}));
    if let Some(members) = roster {
        group["member"] = Value::Array(members.clone());
    }
    group
}

/// The `member` array as each side serves it, as compact JSON text. An
/// empty array is no array: FHIR JSON has no empty arrays, and the proxy
/// never answers one.
fn served_members(group: &Value) -> String {
    match group.get("member") {
        Some(Value::Array(members)) if !members.is_empty() => {
            serde_json::to_string(members).unwrap()
        }
        _ => "none".into(),
    }
}

async fn read(stack: &Stack, url: &str) -> Value {
    let reply = send(&stack.client, "GET", url, &[], "").await;
    reply.assert_status(200);
    reply.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_member_patches_mean_the_same_through_the_proxy_as_on_the_legacy_server() {
    let stack = Stack::start(&[
        ("FGP_FHIR_REMOVE_MEMBER_BY_REFERENCE", "false"),
        ("FGP_MEMBERS_PUT_WITHOUT_MEMBER", "empty"),
    ])
    .await;
    let managed = stack.managed_group(&["Patient/seed"]).await;
    let legacy = stack.create_legacy_group(json!([])).await;
    let legacy_url = format!("{}/4_0_0/Group/{legacy}", stack.standin.url());
    let cases: u64 = std::env::var("FGP_DIFFERENTIAL_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(500);
    let (mut failed_alike, mut applied) = (0, 0);
    for case in 0..cases {
        let seed = 0x9E37_79B9_7F4A_7C15 ^ (case + 1);
        let mut dice = Dice(seed);
        let start = starting_roster(&mut dice);
        let mut model = start.clone();
        let mut ops = Vec::new();
        for _ in 0..1 + dice.below(5) {
            ops.push(op(&mut dice, &model));
            if let Some(next) = apply_locally(&model, &ops) {
                model = next;
            }
        }

        stack
            .put_group(&managed, group_with(&managed, &start), &[])
            .await
            .assert_status(200);
        let direct = send(
            &stack.client,
            "PUT",
            &legacy_url,
            &[FHIR_JSON_BODY],
            serde_json::to_vec(&group_with(&legacy, &start)).unwrap(),
        )
        .await;
        direct.assert_status(200);
        let before_proxy = read(&stack, &stack.group_url(&managed)).await;
        let before_direct = read(&stack, &legacy_url).await;
        assert_eq!(
            served_members(&before_proxy),
            served_members(&before_direct),
            "case {case} (seed {seed:#x}): the starting rosters differ"
        );

        let body = serde_json::to_vec(&Value::Array(ops.clone())).unwrap();
        let through = send(
            &stack.client,
            "PATCH",
            &stack.group_url(&managed),
            &[PATCH],
            body.clone(),
        )
        .await;
        let straight = send(&stack.client, "PATCH", &legacy_url, &[PATCH], body).await;
        let context = format!(
            "case {case} (seed {seed:#x}), start {}, ops {}:\n proxy {} {}\n legacy {} {}",
            serde_json::to_string(&start).unwrap(),
            serde_json::to_string(&ops).unwrap(),
            through.status,
            String::from_utf8_lossy(&through.body[..through.body.len().min(400)]),
            straight.status,
            String::from_utf8_lossy(&straight.body[..straight.body.len().min(400)]),
        );
        assert_eq!(through.status == 200, straight.status == 200, "{context}");
        if straight.status == 200 {
            applied += 1;
        } else {
            assert_eq!(through.status, straight.status, "{context}");
            failed_alike += 1;
        }
        let after_proxy = read(&stack, &stack.group_url(&managed)).await;
        let after_direct = read(&stack, &legacy_url).await;
        assert_eq!(
            served_members(&after_proxy),
            served_members(&after_direct),
            "{context}"
        );
        if straight.status != 200 {
            assert_eq!(
                served_members(&after_proxy),
                served_members(&before_proxy),
                "a failed patch changed nothing: {context}"
            );
            assert_eq!(
                after_proxy["meta"]["versionId"], before_proxy["meta"]["versionId"],
                "a failed patch writes no version: {context}"
            );
        }
    }
    // Both kinds are exercised in earnest, not one of them by accident.
    assert!(
        applied > cases / 5 && failed_alike > cases / 10,
        "applied {applied}, failed {failed_alike}"
    );
}

/// A member PATCH is answered as the legacy server answers it (the stand-in
/// in its real-server profile): the whole Group, members with the reference
/// extensions and the Group with its identifiers, the same `ETag` and
/// `Location`, `Content-Location` absolute at the host the client used, and
/// `{}` for `return=minimal`.
#[tokio::test]
async fn a_member_patch_is_answered_as_the_legacy_server_answers_it() {
    let stack = Stack::start(&[]).await;
    let direct_base = format!("{}/4_0_0", stack.standin.url());
    let roster = Some(vec![json!({"entity": {"reference": "Patient/a"}})]);
    let direct_id = "answer-direct";
    let proxied_id = "answer-proxied";
    for (base, id) in [
        (direct_base.as_str(), direct_id),
        (&format!("{}/4_0_0", stack.proxy.url()), proxied_id),
    ] {
        send(
            &stack.client,
            "PUT",
            &format!("{base}/Group/{id}"),
            &[FHIR_JSON_BODY],
            serde_json::to_vec(&group_with(id, &roster)).unwrap(),
        )
        .await
        .assert_status(201);
    }
    // The proxy's Group moves to the member store with its first member write.
    let ops = json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/b"}}}]);
    let patch = |url: String, prefer: &'static str| {
        let body = serde_json::to_vec(&ops).unwrap();
        let client = stack.client.clone();
        async move { send(&client, "PATCH", &url, &[PATCH, ("prefer", prefer)], body).await }
    };
    let direct = patch(
        format!("{direct_base}/Group/{direct_id}"),
        "return=representation",
    )
    .await;
    let proxied = patch(stack.group_url(proxied_id), "return=representation").await;
    direct.assert_status(200);
    proxied.assert_status(200);
    assert!(
        !stack.members(proxied_id).await.is_empty(),
        "the roster is in the member store"
    );
    assert_eq!(proxied.header("etag"), direct.header("etag"));
    let location =
        |reply: &Reply, id: &str| reply.header("location").map(|l| l.replace(id, "{id}"));
    assert_eq!(location(&proxied, proxied_id), location(&direct, direct_id));
    assert_eq!(
        proxied.header("content-location"),
        Some(format!("{}/4_0_0/Group/{proxied_id}/_history/2", stack.proxy.url()).as_str())
    );
    let (direct, proxied) = (direct.json(), proxied.json());
    assert_eq!(served_members(&proxied), served_members(&direct));
    assert_eq!(
        proxied["member"][1]["entity"]["extension"]
            .as_array()
            .map(Vec::len),
        Some(3)
    );
    let systems = |group: &Value| -> Vec<Value> {
        group["identifier"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| i["system"].clone())
            .collect()
    };
    assert_eq!(systems(&proxied), systems(&direct));
    assert!(!systems(&proxied).is_empty());
    let minimal = patch(stack.group_url(proxied_id), "return=minimal").await;
    minimal.assert_status(200);
    assert_eq!(minimal.body, b"{}".to_vec());
}
