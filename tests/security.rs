//! Authorization of what the proxy answers itself, in each mode, and input
//! that must be refused or stored verbatim. Real stand-in (with its own access
//! control), real ClickHouse and FerretDB.

mod support;

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use standin_legacy_fhir::AccessTokens;
use support::*;

const PATCH: (&str, &str) = ("content-type", "application/json-patch+json");
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/auth");
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "fhir-group-proxy-tests";

fn add(reference: &str) -> Value {
    json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}}])
}

async fn patch(client: &HttpClient, url: &str, ops: &Value, headers: &[(&str, &str)]) -> Reply {
    let mut all = vec![PATCH];
    all.extend_from_slice(headers);
    send(client, "PATCH", url, &all, serde_json::to_vec(ops).unwrap()).await
}

async fn version_of(client: &HttpClient, standin: &Standin, id: &str, token: &str) -> String {
    let bearer = format!("Bearer {token}");
    let read = send(
        client,
        "GET",
        &format!("{}/4_0_0/Group/{id}", standin.url()),
        &[("authorization", bearer.as_str())],
        "",
    )
    .await;
    read.assert_status(200);
    read.json()["meta"]["versionId"]
        .as_str()
        .unwrap()
        .to_string()
}

/// An empty Group created on the legacy server with the writer's token.
async fn create_as_writer(client: &HttpClient, standin: &Standin) -> String {
    let created = send(
        client,
        "POST",
        &format!("{}/4_0_0/Group", standin.url()),
        &[
            ("content-type", "application/fhir+json"),
            ("authorization", "Bearer writer"),
        ],
        serde_json::to_vec(&owned(
            json!({"resourceType": "Group", "type": "person", "actual": true, "member": []}),
        ))
        .unwrap(),
    )
    .await;
    created.assert_status(201);
    created.json()["id"].as_str().unwrap().to_string()
}

fn tokens() -> AccessTokens {
    AccessTokens {
        tokens: vec![("writer".into(), true), ("reader".into(), false)],
    }
}

/// Upstream mode, as configured by default: the legacy server decides, asked
/// with the client's own credentials by a write that changes nothing; its
/// 401/403/404 come back unchanged and nothing is written.
#[tokio::test]
async fn upstream_mode_lets_the_legacy_server_decide() {
    let standin = Standin::start_with_access(tokens()).await;
    let (standin, proxy, _) = start_with_member_stores_behind(standin, &[]).await;
    let client = http_client();
    let id = create_as_writer(&client, &standin).await;
    let url = format!("{}/4_0_0/Group/{id}", proxy.url());

    patch(
        &client,
        &url,
        &add("Patient/ok"),
        &[("authorization", "Bearer writer")],
    )
    .await
    .assert_status(200);
    assert_eq!(
        version_of(&client, &standin, &id, "writer").await,
        "2",
        "the probe changed nothing"
    );

    for (token, status) in [
        (None, 401),
        (Some("Bearer stranger"), 401),
        (Some("Bearer reader"), 403),
    ] {
        let headers: Vec<(&str, &str)> = token.map(|t| ("authorization", t)).into_iter().collect();
        let refused = patch(&client, &url, &add("Patient/intruder"), &headers).await;
        assert_eq!(
            refused.status,
            status,
            "{token:?}: {}",
            String::from_utf8_lossy(&refused.body)
        );
        assert_eq!(refused.json()["resourceType"], "OperationOutcome");
        let atr = send(
            &client,
            "POST",
            &format!("{url}/$member-add"),
            &[&[("content-type", "application/fhir+json")][..], &headers].concat(),
            serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": [
                {"name": "patientReference", "valueReference": {"reference": "Patient/intruder"}}]}))
            .unwrap(),
        )
        .await;
        assert_eq!(atr.status, status, "ATR {token:?}");
    }
    let unknown = patch(
        &client,
        &format!("{}/4_0_0/Group/no-such-group", proxy.url()),
        &add("Patient/x"),
        &[("authorization", "Bearer writer")],
    )
    .await;
    assert_eq!(unknown.status, 404);

    // Reads go upstream with the client's credentials first: no roster leaks.
    let anonymous = send(&client, "GET", &url, &[], "").await;
    assert_eq!(anonymous.status, 401);
    assert!(!String::from_utf8_lossy(&anonymous.body).contains("Patient/ok"));
    let members = send(&client, "GET", &format!("{url}/$members"), &[], "").await;
    assert_eq!(members.status, 401);

    let read = send(
        &client,
        "GET",
        &url,
        &[("authorization", "Bearer reader")],
        "",
    )
    .await;
    read.assert_status(200);
    let group = read.json();
    let references: Vec<&str> = group["member"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["entity"]["reference"].as_str().unwrap())
        .collect();
    assert_eq!(
        references,
        vec!["Patient/ok"],
        "no refused write is visible"
    );
    assert_eq!(version_of(&client, &standin, &id, "writer").await, "2");

    // No other route lets a read-only client change the roster either.
    let reader = ("authorization", "Bearer reader");
    let json_body = ("content-type", "application/fhir+json");
    let with_members = |id: Option<&str>| {
        let mut group = owned(
            json!({"resourceType": "Group", "type": "person", "actual": true,
            "member": [{"entity": {"reference": "Patient/intruder"}}]}),
        );
        if let Some(id) = id {
            group["id"] = json!(id);
        }
        serde_json::to_vec(&group).unwrap()
    };
    let remove_ok = serde_json::to_vec(&json!({"resourceType": "Parameters", "parameter": [
        {"name": "patientReference", "valueReference": {"reference": "Patient/ok"}}]}))
    .unwrap();
    for (what, method, path, body) in [
        (
            "$member-remove",
            "POST",
            format!("{url}/$member-remove"),
            remove_ok,
        ),
        ("roster PUT", "PUT", url.clone(), with_members(Some(&id))),
        (
            "POST with members",
            "POST",
            format!("{}/4_0_0/Group", proxy.url()),
            with_members(None),
        ),
        (
            "PUT to a new id",
            "PUT",
            format!("{}/4_0_0/Group/made-by-reader", proxy.url()),
            with_members(Some("made-by-reader")),
        ),
        ("DELETE", "DELETE", url.clone(), Vec::new()),
    ] {
        let refused = send(&client, method, &path, &[json_body, reader], body).await;
        assert_eq!(
            refused.status,
            403,
            "{what}: {}",
            String::from_utf8_lossy(&refused.body)
        );
    }
    let read = send(&client, "GET", &url, &[reader], "").await;
    read.assert_status(200);
    assert_eq!(
        as_sent(&read.json()["member"]),
        json!([{"entity": {"reference": "Patient/ok"}}])
    );
    assert_eq!(version_of(&client, &standin, &id, "writer").await, "2");
    let made = send(
        &client,
        "GET",
        &format!("{}/4_0_0/Group/made-by-reader", standin.url()),
        &[("authorization", "Bearer writer")],
        "",
    )
    .await;
    assert_eq!(made.status, 404, "nothing created");
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn sign(claims: &Value, key_file: &str, kid: Option<&str>) -> String {
    let pem = std::fs::read(format!("{FIXTURES}/{key_file}")).unwrap();
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, &EncodingKey::from_rsa_pem(&pem).unwrap()).unwrap()
}

fn claims(scope: &str) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "client-1", "exp": now() + 600, "scope": scope})
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// JWT mode: tokens are checked locally, with SMART scopes; every refusal is
/// a 401/403 OperationOutcome with a WWW-Authenticate challenge, and writes
/// nothing.
#[tokio::test]
async fn jwt_mode_checks_tokens_and_scopes() {
    let jwks = format!("{FIXTURES}/jwks.json");
    let (standin, proxy, _) = start_with_member_stores(&[
        ("FGP_AUTH_MODE", "jwt"),
        ("FGP_AUTH_JWT_JWKS_FILE", jwks.as_str()),
        ("FGP_AUTH_JWT_ISSUER", ISSUER),
        ("FGP_AUTH_JWT_AUDIENCE", AUDIENCE),
    ])
    .await;
    let client = http_client();
    let created = post_group(&client, &format!("{}/4_0_0", standin.url()), 0).await;
    created.assert_status(201);
    let id = created.json()["id"].as_str().unwrap().to_string();
    let url = format!("{}/4_0_0/Group/{id}", proxy.url());
    let bearer = |token: &str| format!("Bearer {token}");

    let mut accepted = 0;
    for scope in [
        "user/Group.write",
        "user/Group.u",
        "system/*.cruds",
        "openid user/*.*",
    ] {
        let token = sign(&claims(scope), "issuer-private-key.pem", Some("test-key-1"));
        let reply = patch(
            &client,
            &url,
            &add(&format!("Patient/p{accepted}")),
            &[("authorization", bearer(&token).as_str())],
        )
        .await;
        assert_eq!(
            reply.status,
            200,
            "{scope}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        accepted += 1;
    }

    let mut expired = claims("user/Group.write");
    expired["exp"] = json!(now() - 3_600);
    let mut wrong_audience = claims("user/Group.write");
    wrong_audience["aud"] = json!("another-api");
    let mut wrong_issuer = claims("user/Group.write");
    wrong_issuer["iss"] = json!("https://evil.test");
    let mut no_expiry = claims("user/Group.write");
    no_expiry.as_object_mut().unwrap().remove("exp");
    let alg_none = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("user/Group.write").to_string().as_bytes())
    );
    // Key confusion: HS256 "signed" with the public JWKS as the secret.
    let public = std::fs::read(format!("{FIXTURES}/jwks.json")).unwrap();
    let hs256 = encode(
        &Header::new(Algorithm::HS256),
        &claims("user/Group.write"),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let cases: Vec<(&str, Option<String>, u16, &str)> = vec![
        ("no token", None, 401, "Bearer realm="),
        (
            "expired",
            Some(sign(&expired, "issuer-private-key.pem", Some("test-key-1"))),
            401,
            "expired",
        ),
        (
            "wrong audience",
            Some(sign(
                &wrong_audience,
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            401,
            "audience",
        ),
        (
            "wrong issuer",
            Some(sign(
                &wrong_issuer,
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            401,
            "issuer",
        ),
        (
            "no exp",
            Some(sign(
                &no_expiry,
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            401,
            "exp",
        ),
        (
            "forged signature",
            Some(sign(
                &claims("user/Group.write"),
                "attacker-private-key.pem",
                Some("test-key-1"),
            )),
            401,
            "signature",
        ),
        (
            "unknown key",
            Some(sign(
                &claims("user/Group.write"),
                "attacker-private-key.pem",
                Some("attacker"),
            )),
            401,
            "not in the JWKS",
        ),
        ("alg none", Some(alg_none), 401, "invalid_token"),
        ("HS256 with the public key", Some(hs256), 401, "HS256"),
        (
            "read scope only",
            Some(sign(
                &claims("user/Group.read"),
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            403,
            "insufficient_scope",
        ),
        (
            "patient scope",
            Some(sign(
                &claims("patient/Group.write"),
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            403,
            "insufficient_scope",
        ),
        (
            "other resource",
            Some(sign(
                &claims("user/Patient.write"),
                "issuer-private-key.pem",
                Some("test-key-1"),
            )),
            403,
            "insufficient_scope",
        ),
    ];
    for (case, token, status, words) in cases {
        let authorization = token.as_deref().map(bearer);
        let headers: Vec<(&str, &str)> = authorization
            .as_deref()
            .map(|a| ("authorization", a))
            .into_iter()
            .collect();
        let refused = patch(&client, &url, &add("Patient/intruder"), &headers).await;
        assert_eq!(
            refused.status,
            status,
            "{case}: {}",
            String::from_utf8_lossy(&refused.body)
        );
        assert_eq!(refused.json()["resourceType"], "OperationOutcome", "{case}");
        let challenge = refused
            .header("www-authenticate")
            .unwrap_or_default()
            .to_string();
        let text = format!("{challenge} {}", String::from_utf8_lossy(&refused.body));
        assert!(text.contains(words), "{case}: expected '{words}' in {text}");
    }

    // Reads need a read scope; a write scope does not imply one.
    let reader = sign(
        &claims("user/Group.rs"),
        "issuer-private-key.pem",
        Some("test-key-1"),
    );
    let read = send(
        &client,
        "GET",
        &url,
        &[("authorization", bearer(&reader).as_str())],
        "",
    )
    .await;
    read.assert_status(200);
    let members = read.json()["member"].as_array().unwrap().len();
    assert_eq!(members, accepted, "only the accepted writes are visible");
    let writer_only = sign(
        &claims("user/Group.u"),
        "issuer-private-key.pem",
        Some("test-key-1"),
    );
    let page = send(
        &client,
        "GET",
        &format!("{url}/$members"),
        &[("authorization", bearer(&writer_only).as_str())],
        "",
    )
    .await;
    assert_eq!(page.status, 403);
    // Passthrough is the legacy server's business: not checked here.
    let passthrough = send(
        &client,
        "GET",
        &format!("{}/4_0_0/metadata", proxy.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(passthrough.status, 200);
}

/// `none` must be chosen explicitly; then the proxy answers without checks.
#[tokio::test]
async fn none_mode_is_explicit_and_unchecked() {
    let standin = Standin::start_with_access(tokens()).await;
    let (standin, proxy, _) =
        start_with_member_stores_behind(standin, &[("FGP_AUTH_MODE", "none")]).await;
    let client = http_client();
    let id = create_as_writer(&client, &standin).await;
    let reply = patch(
        &client,
        &format!("{}/4_0_0/Group/{id}", proxy.url()),
        &add("Patient/unchecked"),
        &[],
    )
    .await;
    reply.assert_status(200);
}

/// Hostile input: too deep, other patch formats on migrated Groups, and values
/// that look like SQL or Mongo operators, which are stored verbatim.
#[tokio::test]
async fn hostile_input_is_refused_or_stored_verbatim() {
    let (_standin, proxy, clickhouse) =
        start_with_member_stores(&[("FGP_FHIR_MAX_JSON_DEPTH", "16")]).await;
    let client = http_client();
    let created = post_group(&client, &format!("{}/4_0_0", proxy.url()), 0).await;
    let id = created.json()["id"].as_str().unwrap().to_string();
    let url = format!("{}/4_0_0/Group/{id}", proxy.url());

    let deep = format!("{}{}", "[".repeat(5_000), "]".repeat(5_000));
    let refused = send(&client, "PATCH", &url, &[PATCH], deep).await;
    assert_outcome(&refused, 400, "too-costly");

    let sql = "x'); DROP TABLE Group_4_0_0_MemberEvents; --";
    let operator = r#"{"$ne": null}"#;
    for request_id in [sql, operator] {
        let first = patch(
            &client,
            &url,
            &add(&format!("Patient/v{}", request_id.len())),
            &[("x-request-id", request_id)],
        )
        .await;
        first.assert_status(200);
        let retry = patch(
            &client,
            &url,
            &add(&format!("Patient/v{}", request_id.len())),
            &[("x-request-id", request_id)],
        )
        .await;
        retry.assert_status(200);
        assert_eq!(
            first.header("etag"),
            retry.header("etag"),
            "{request_id}: replayed, not matched as an operator"
        );
    }
    let events = fhir_group_proxy::store::clickhouse::connect(&clickhouse);
    let stored: Vec<String> = events
        .query("SELECT request_id FROM Group_4_0_0_MemberSlotEvents ORDER BY group_version")
        .fetch_all()
        .await
        .expect("the events table is still there");
    assert_eq!(stored, vec![sql.to_string(), operator.to_string()]);

    for content_type in ["application/fhir+json", "application/xml-patch+xml"] {
        let other = send(
            &client,
            "PATCH",
            &url,
            &[("content-type", content_type)],
            "{}",
        )
        .await;
        assert_outcome(&other, 415, "not-supported");
        assert_eq!(
            other.header("accept-patch"),
            Some("application/json-patch+json")
        );
    }
}
