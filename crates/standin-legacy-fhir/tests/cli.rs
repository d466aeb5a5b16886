//! The stand-in binary, configured from its environment as a demo or bench
//! would start it.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{mongo_uri, Reply};
use serde_json::json;

struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn send(port: u16, method: &str, token: Option<&str>, body: &str) -> Option<Reply> {
    use http_body_util::{BodyExt, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<bytes::Bytes>>();
    let mut request = hyper::Request::builder()
        .method(method)
        .uri(format!("http://127.0.0.1:{port}/4_0_0/Group"))
        .header("content-type", "application/fhir+json");
    if let Some(token) = token {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .ok()?;
    let response = client.request(request).await.ok()?;
    let (parts, body) = response.into_parts();
    Some(Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.collect().await.ok()?.to_bytes(),
    })
}

#[tokio::test]
async fn tokens_and_the_profile_come_from_the_environment() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let database = format!("standin_test_{}", uuid::Uuid::new_v4().simple());
    let _process = Process(
        Command::new(env!("CARGO_BIN_EXE_standin-legacy-fhir"))
            .env("STANDIN_LISTEN", format!("127.0.0.1:{port}"))
            .env("STANDIN_MONGO_URI", mongo_uri())
            .env("STANDIN_DATABASE", &database)
            .env("STANDIN_PROFILE", "real")
            .env("STANDIN_WRITER_TOKENS", "w1, w2")
            .env("STANDIN_READER_TOKENS", "r1")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("the stand-in binary starts"),
    );
    let body = json!({"resourceType": "Group", "id": "mine", "type": "person", "actual": true,
        "meta": {"source": "s", "security": [{"system": "https://www.icanbwell.com/owner", "code": "bwell"}]}})
    .to_string();
    let mut ready = None;
    for _ in 0..100 {
        if let Some(reply) = send(port, "GET", Some("r1"), "").await {
            ready = Some(reply);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready.expect("the binary answers").status, 200);
    assert_eq!(send(port, "POST", None, &body).await.unwrap().status, 401);
    assert_eq!(
        send(port, "POST", Some("nobody"), &body)
            .await
            .unwrap()
            .status,
        401
    );
    let refused = send(port, "POST", Some("r1"), &body).await.unwrap();
    assert_eq!(refused.status, 403);
    assert_eq!(refused.json()["resourceType"], "OperationOutcome");
    let created = send(port, "POST", Some("w2"), &body).await.unwrap();
    assert_eq!(created.status, 201);
    // The real profile: the client's id is ignored.
    assert_ne!(created.json()["id"], "mine");
    let client = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap();
    let _ = client.database(&database).drop().await;
}
