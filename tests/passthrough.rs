//! Everything the proxy does not handle itself reaches the legacy server byte
//! for byte and comes back the same way, streamed.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use serde_json::{json, Value};
use support::raw::RawConnection;
use support::*;

async fn stack() -> (Standin, ProxyProcess) {
    let standin = Standin::start().await;
    let proxy = ProxyProcess::start(
        &standin.url(),
        &[("FGP_MONGO_DATABASE", standin.database.as_str())],
    );
    (standin, proxy)
}

/// Headers that legitimately differ between two responses to the same request.
fn comparable_headers(headers: &hyper::HeaderMap) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = headers
        .iter()
        .filter(|(name, _)| {
            !matches!(
                name.as_str(),
                "date" | "x-request-id" | "connection" | "keep-alive"
            )
        })
        .map(|(n, v)| {
            (
                n.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    pairs.sort();
    pairs
}

#[tokio::test]
async fn fhir_crud_on_several_resource_types_goes_through_unchanged() {
    let (standin, proxy) = stack().await;
    let client = http_client();
    let base = format!("{}/4_0_0", proxy.url());
    let json_ct = [("content-type", "application/fhir+json")];

    for resource_type in ["Patient", "Observation", "Group"] {
        let resource = match resource_type {
            "Patient" => json!({"resourceType": "Patient", "name": [{"family": "Ünïcødé"}]}),
            "Observation" => {
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "bp"}})
            }
            // Without members: a Group created with members keeps them in
            // the member store (tests/member_patch.rs), not the legacy server.
            _ => json!({"resourceType": "Group", "type": "person", "actual": false}),
        };
        let resource = owned(resource);
        let created = send(
            &client,
            "POST",
            &format!("{base}/{resource_type}"),
            &json_ct,
            serde_json::to_vec(&resource).unwrap(),
        )
        .await;
        created.assert_status(201);
        let id = created.json()["id"]
            .as_str()
            .expect("server-assigned id")
            .to_string();
        assert_eq!(created.header("etag"), Some("W/\"1\""));
        let location = created.header("location").expect("Location header");
        assert!(
            location.contains(&format!("/{resource_type}/{id}")),
            "{location}"
        );

        // The same read, through the proxy and directly, is the same response.
        let via_proxy = send(
            &client,
            "GET",
            &format!("{base}/{resource_type}/{id}"),
            &[],
            "",
        )
        .await;
        let direct = send(
            &client,
            "GET",
            &format!("{}/4_0_0/{resource_type}/{id}", standin.url()),
            &[],
            "",
        )
        .await;
        via_proxy.assert_status(200);
        assert_eq!(via_proxy.body, direct.body);
        assert_eq!(
            comparable_headers(&via_proxy.headers),
            comparable_headers(&direct.headers)
        );

        let mut updated = via_proxy.json();
        updated["text"] = json!({"status": "generated", "div": "<div>v2</div>"});
        let put = send(
            &client,
            "PUT",
            &format!("{base}/{resource_type}/{id}"),
            &[
                ("content-type", "application/fhir+json"),
                ("if-match", "W/\"1\""),
            ],
            serde_json::to_vec(&updated).unwrap(),
        )
        .await;
        put.assert_status(200);
        assert_eq!(put.header("etag"), Some("W/\"2\""));

        let stale = send(
            &client,
            "PUT",
            &format!("{base}/{resource_type}/{id}"),
            &[
                ("content-type", "application/fhir+json"),
                ("if-match", "W/\"1\""),
            ],
            serde_json::to_vec(&updated).unwrap(),
        )
        .await;
        assert_eq!(
            stale.status, 412,
            "upstream's version conflict is passed through"
        );

        let patch = json!([{"op": "add", "path": "/language", "value": "en"}]);
        let patched = send(
            &client,
            "PATCH",
            &format!("{base}/{resource_type}/{id}"),
            &[("content-type", "application/json-patch+json")],
            serde_json::to_vec(&patch).unwrap(),
        )
        .await;
        patched.assert_status(200);
        assert_eq!(patched.json()["language"], "en");
        assert_eq!(patched.header("etag"), Some("W/\"3\""));

        let search = send(
            &client,
            "GET",
            &format!("{base}/{resource_type}?_id={id}"),
            &[],
            "",
        )
        .await;
        assert_eq!(search.status, 200);
        assert_eq!(search.json()["resourceType"], "Bundle");
        assert_eq!(
            search.json()["entry"][0]["resource"]["id"],
            Value::String(id.clone())
        );

        let deleted = send(
            &client,
            "DELETE",
            &format!("{base}/{resource_type}/{id}"),
            &[],
            "",
        )
        .await;
        assert!(
            matches!(deleted.status, 200 | 204),
            "DELETE -> {}",
            deleted.status
        );
        let gone = send(
            &client,
            "GET",
            &format!("{base}/{resource_type}/{id}"),
            &[],
            "",
        )
        .await;
        assert!(
            matches!(gone.status, 404 | 410),
            "read after delete -> {}",
            gone.status
        );
        assert_eq!(gone.json()["resourceType"], "OperationOutcome");
    }
}

#[tokio::test]
async fn method_path_query_headers_and_body_arrive_byte_for_byte() {
    let (_standin, proxy) = stack().await;
    let client = http_client();
    let body = pseudo_random_bytes(100_000, 1);
    let url = format!(
        "{}/__standin/inspect/Patient/x%2Fy?name=a%20b&name=c&_format=json&%E2%9C%93=1",
        proxy.url()
    );
    let reply = send(
        &client,
        "PUT",
        &url,
        &[
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("authorization", "Bearer abc.def"),
            ("x-request-id", "req-42"),
            ("content-type", "application/octet-stream"),
        ],
        body.clone(),
    )
    .await;
    assert_eq!(reply.status, 200);
    let seen = reply.json();
    assert_eq!(seen["method"], "PUT");
    assert_eq!(
        seen["uri"],
        "/__standin/inspect/Patient/x%2Fy?name=a%20b&name=c&_format=json&%E2%9C%93=1"
    );
    assert_eq!(seen["bodyLength"], 100_000);
    assert_eq!(seen["bodySha256"], sha256_hex(&body));
    let headers: Vec<(String, String)> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_lowercase(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let values = |name: &str| {
        headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        values("x-custom"),
        vec!["one", "two"],
        "duplicate headers kept in order"
    );
    assert_eq!(values("authorization"), vec!["Bearer abc.def"]);
    assert_eq!(
        values("x-request-id"),
        vec!["req-42"],
        "client request id passed through"
    );
    assert_eq!(values("content-length"), vec!["100000"]);
    assert_eq!(values("x-forwarded-for"), vec!["127.0.0.1"]);
    assert_eq!(values("x-forwarded-proto"), vec!["http"]);
    assert_eq!(
        values("x-forwarded-host"),
        vec![proxy.addr.to_string().as_str()]
    );
    assert_eq!(
        values("host"),
        vec![proxy.addr.to_string().as_str()],
        "Host preserved by default"
    );
    assert_eq!(reply.header("x-request-id"), Some("req-42"));
}

#[tokio::test]
async fn forwarded_headers_and_host_follow_settings() {
    let standin = Standin::start().await;
    let proxy = ProxyProcess::start(
        &standin.url(),
        &[
            ("FGP_UPSTREAM_PRESERVE_HOST", "false"),
            ("FGP_UPSTREAM_FORWARDED_HEADERS", "false"),
        ],
    );
    let reply = send(
        &http_client(),
        "GET",
        &format!("{}/__standin/inspect/x", proxy.url()),
        &[],
        "",
    )
    .await;
    let seen = reply.json();
    let names: Vec<String> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| pair[0].as_str().unwrap().to_lowercase())
        .collect();
    assert!(
        !names.iter().any(|n| n.starts_with("x-forwarded-")),
        "{names:?}"
    );
    let host = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pair| pair[0].as_str().unwrap().eq_ignore_ascii_case("host"))
        .unwrap();
    assert_eq!(host[1], standin.addr.to_string());
    let generated = reply
        .header("x-request-id")
        .expect("a request id is generated");
    assert_eq!(generated.len(), 36, "uuid request id: {generated}");
}

#[tokio::test]
async fn ten_megabyte_bodies_stream_both_ways_with_either_framing() {
    let (_standin, proxy) = stack().await;
    let client = http_client();
    let body = pseudo_random_bytes(10 * 1024 * 1024, 2);

    // Content-Length request body, echoed back.
    let echoed = send(
        &client,
        "POST",
        &format!("{}/__standin/echo/big", proxy.url()),
        &[("content-type", "application/octet-stream")],
        body.clone(),
    )
    .await;
    assert_eq!(echoed.status, 200);
    assert_eq!(echoed.body.len(), body.len());
    assert_eq!(sha256_hex(&echoed.body), sha256_hex(&body));

    // Chunked request body (a stream of unknown length) keeps chunked framing upstream.
    let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = body
        .chunks(256 * 1024)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let stream_body = BodyExt::boxed(StreamBody::new(futures_util::stream::iter(chunks)));
    let streaming_client =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<http_body_util::combinators::BoxBody<Bytes, std::io::Error>>();
    let request = hyper::Request::post(format!("{}/__standin/inspect/chunked", proxy.url()))
        .body(stream_body)
        .unwrap();
    let response = streaming_client.request(request).await.expect("response");
    let seen: Value =
        serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(seen["bodySha256"], sha256_hex(&body));
    let te: Vec<&Value> = seen["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| {
            p[0].as_str()
                .unwrap()
                .eq_ignore_ascii_case("transfer-encoding")
        })
        .map(|p| &p[1])
        .collect();
    assert_eq!(te, vec![&json!("chunked")]);

    // Large responses keep their framing too.
    for (query, expect_chunked) in [("n=10485760", false), ("n=10485760&chunked=1", true)] {
        let mut conn = RawConnection::open(proxy.addr).await;
        conn.write(format!("GET /__standin/bytes?{query} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await;
        let response = conn.read_response().await;
        assert_eq!(response.status, 200);
        assert_eq!(response.chunked, expect_chunked, "{query}");
        assert_eq!(response.body.len(), 10 * 1024 * 1024);
        assert!(
            response
                .body
                .iter()
                .enumerate()
                .all(|(i, b)| *b == (i % 251) as u8),
            "pattern intact"
        );
    }
}

#[tokio::test]
async fn responses_are_streamed_not_buffered() {
    let (_standin, proxy) = stack().await;
    let started = Instant::now();
    let mut conn = RawConnection::open(proxy.addr).await;
    conn.write(b"GET /__standin/slow-body?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let (status, _headers) = conn.read_head().await;
    assert_eq!(status, 200);
    // The upstream holds back the rest of the body for 3 s; headers arriving well
    // before that show the proxy relays as bytes arrive.
    assert!(
        started.elapsed() < Duration::from_millis(2500),
        "head took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn gzip_bodies_pass_through_untouched() {
    let (standin, proxy) = stack().await;
    let client = http_client();
    let headers = [("accept-encoding", "gzip")];
    let direct = send(
        &client,
        "GET",
        &format!("{}/__standin/gzip", standin.url()),
        &headers,
        "",
    )
    .await;
    let via_proxy = send(
        &client,
        "GET",
        &format!("{}/__standin/gzip", proxy.url()),
        &headers,
        "",
    )
    .await;
    assert_eq!(via_proxy.header("content-encoding"), Some("gzip"));
    assert_eq!(via_proxy.body, direct.body, "compressed bytes identical");
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&via_proxy.body[..]),
        &mut text,
    )
    .unwrap();
    assert!(text.contains("\"resourceType\""), "{text}");
}

#[tokio::test]
async fn status_codes_and_response_headers_are_preserved() {
    let (_standin, proxy) = stack().await;
    let client = http_client();
    for status in [
        200u16, 201, 202, 301, 400, 401, 403, 404, 409, 412, 418, 422, 429, 500, 503,
    ] {
        let reply = send(
            &client,
            "POST",
            &format!("{}/__standin/status/{status}", proxy.url()),
            &[],
            "x",
        )
        .await;
        assert_eq!(reply.status, status);
        assert_eq!(reply.header("x-standin-custom"), Some("yes"));
        let cookies: Vec<&str> = reply
            .headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(
            cookies,
            vec!["a=1", "b=2"],
            "repeated headers kept for {status}"
        );
        assert_eq!(reply.body, format!("status {status}").as_bytes());
    }
}

#[tokio::test]
async fn keep_alive_connection_serves_many_requests() {
    let (_standin, proxy) = stack().await;
    let mut conn = RawConnection::open(proxy.addr).await;
    for i in 0..5 {
        conn.write(
            format!(
                "POST /__standin/echo/{i} HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            )
            .as_bytes(),
        )
        .await;
        let response = conn.read_response().await;
        assert_eq!(response.status, 200);
        assert_eq!(response.body, b"hello");
    }
    // A chunked request on the same connection.
    conn.write(b"POST /__standin/echo/c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").await;
    let response = conn.read_response().await;
    assert_eq!(response.body, b"abcde");
}

#[tokio::test]
async fn expect_100_continue_is_honoured() {
    let (_standin, proxy) = stack().await;
    let mut conn = RawConnection::open(proxy.addr).await;
    conn.write(b"PUT /__standin/echo/e HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n").await;
    let (status, _) = conn.read_head().await;
    assert_eq!(status, 100, "interim response before the body is sent");
    conn.write(b"hello world").await;
    let response = conn.read_response().await;
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"hello world");
}

#[tokio::test]
async fn upstream_down_is_502_operation_outcome() {
    let closed_port = free_port();
    let proxy = ProxyProcess::start(&format!("http://127.0.0.1:{closed_port}"), &[]);
    let reply = send(
        &http_client(),
        "GET",
        &format!("{}/4_0_0/Patient/1", proxy.url()),
        &[],
        "",
    )
    .await;
    assert_outcome(&reply, 502, "transient");
    assert!(reply.header("x-request-id").is_some());
}

#[tokio::test]
async fn slow_upstream_is_504_operation_outcome() {
    let standin = Standin::start().await;
    let proxy = ProxyProcess::start(&standin.url(), &[("FGP_UPSTREAM_READ_TIMEOUT_MS", "300")]);
    let client = http_client();
    let reply = send(
        &client,
        "GET",
        &format!("{}/__standin/slow?ms=5000", proxy.url()),
        &[],
        "",
    )
    .await;
    assert_outcome(&reply, 504, "timeout");
    // The proxy keeps serving afterwards.
    let ok = send(
        &client,
        "GET",
        &format!("{}/__standin/slow?ms=0", proxy.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(ok.status, 200);
}

#[tokio::test]
async fn upstream_path_prefix_is_prepended() {
    let standin = Standin::start().await;
    let proxy = ProxyProcess::start(&format!("{}/__standin/inspect", standin.url()), &[]);
    let reply = send(
        &http_client(),
        "GET",
        &format!("{}/4_0_0/Patient?x=1", proxy.url()),
        &[],
        "",
    )
    .await;
    assert_eq!(reply.json()["uri"], "/__standin/inspect/4_0_0/Patient?x=1");
}

#[tokio::test]
async fn concurrent_requests_are_not_mixed_up() {
    let (_standin, proxy) = stack().await;
    let client = http_client();
    let tasks = (0..64u64).map(|i| {
        let client = client.clone();
        let url = format!("{}/__standin/echo/{i}", proxy.url());
        tokio::spawn(async move {
            let body = pseudo_random_bytes(10_000 + i as usize, i + 100);
            let reply = send(&client, "POST", &url, &[], body.clone()).await;
            assert_eq!(reply.body, body, "request {i} got its own body back");
        })
    });
    let results = futures_util::stream::iter(tasks)
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    for result in results {
        result.expect("task");
    }
}
