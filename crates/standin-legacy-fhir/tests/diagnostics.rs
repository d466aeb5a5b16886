//! The `/__standin/` diagnostics over a real socket.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::Harness;
use sha2::Digest;

#[tokio::test]
async fn inspect_reports_what_arrived() {
    let h = Harness::start().await;
    let body = b"hello body".to_vec();
    let reply = h
        .send(
            "PUT",
            "/__standin/inspect/some/path?x=1&y=%20z",
            &[("x-dup", "1"), ("x-other", "o"), ("x-dup", "2")],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "application/json");
    let report = reply.json();
    assert_eq!(report["method"], "PUT");
    assert_eq!(report["uri"], "/__standin/inspect/some/path?x=1&y=%20z");
    assert_eq!(report["version"], "HTTP/1.1");
    assert_eq!(report["bodyLength"], body.len());
    let expected: String = sha2::Sha256::digest(&body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(report["bodySha256"], expected);
    let headers: Vec<(String, String)> = report["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().to_string(),
                pair[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let dups: Vec<&str> = headers
        .iter()
        .filter(|(name, _)| name == "x-dup")
        .map(|(_, value)| value.as_str())
        .collect();
    assert_eq!(dups, ["1", "2"]);
    assert!(headers.iter().any(|(n, v)| n == "x-other" && v == "o"));
    assert!(headers.iter().any(|(n, _)| n == "host"));
    h.finish().await;
}

#[tokio::test]
async fn echo_streams_the_body_back() {
    let h = Harness::start().await;
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 7) as u8).collect();
    let reply = h
        .send(
            "POST",
            "/__standin/echo/x",
            &[("content-type", "text/x-test")],
            body.clone(),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "text/x-test");
    assert_eq!(reply.body.as_ref(), body.as_slice());
    let untyped = h.send("POST", "/__standin/echo", &[], "abc").await;
    assert_eq!(untyped.header("content-type"), "application/octet-stream");
    assert_eq!(untyped.body.as_ref(), b"abc");
    h.finish().await;
}

#[tokio::test]
async fn bytes_follow_the_pattern_with_or_without_length() {
    let h = Harness::start().await;
    let n = 200_000usize;
    let expected: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();

    let sized = h.get(&format!("/__standin/bytes?n={n}")).await;
    assert_eq!(sized.status, 200);
    assert_eq!(sized.header("content-length"), n.to_string());
    assert_eq!(sized.body.as_ref(), expected.as_slice());

    let chunked = h.get(&format!("/__standin/bytes?n={n}&chunked=1")).await;
    assert!(chunked.headers.get("content-length").is_none());
    assert_eq!(chunked.header("transfer-encoding"), "chunked");
    assert_eq!(chunked.body.as_ref(), expected.as_slice());

    let nothing = h.get("/__standin/bytes?n=0").await;
    assert_eq!(nothing.header("content-length"), "0");
    assert!(nothing.body.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn gzip_is_byte_identical_every_time() {
    let h = Harness::start().await;
    let first = h.get("/__standin/gzip").await;
    let second = h.get("/__standin/gzip").await;
    assert_eq!(first.header("content-encoding"), "gzip");
    assert_eq!(first.header("content-type"), "application/fhir+json");
    assert_eq!(first.body, second.body);
    let mut text = String::new();
    flate2::read::GzDecoder::new(first.body.as_ref())
        .read_to_string(&mut text)
        .unwrap();
    assert_eq!(text, standin_legacy_fhir::GZIP_PATIENT);
    let patient: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(patient["resourceType"], "Patient");
    h.finish().await;
}

#[tokio::test]
async fn slow_routes_wait() {
    let h = Harness::start().await;
    let started = Instant::now();
    let slow = h.get("/__standin/slow?ms=150").await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(slow.body.as_ref(), b"ok");

    let started = Instant::now();
    let slow_body = h.get("/__standin/slow-body?ms=150").await;
    assert!(started.elapsed() >= Duration::from_millis(150));
    assert_eq!(slow_body.status, 200);
    assert_eq!(slow_body.body.as_ref(), b"first chunk\nrest\n");
    h.finish().await;
}

#[tokio::test]
async fn status_route_answers_any_code_with_extra_headers() {
    let h = Harness::start().await;
    let reply = h.send("POST", "/__standin/status/503", &[], "x").await;
    assert_eq!(reply.status, 503);
    assert_eq!(reply.body.as_ref(), b"status 503");
    assert_eq!(reply.header("x-standin-custom"), "yes");
    let cookies: Vec<&str> = reply
        .headers
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies, ["a=1", "b=2"]);
    let nonsense = h.get("/__standin/status/abc").await;
    assert_eq!(nonsense.status, 400);
    assert_eq!(nonsense.issue_code(), "invalid");
    let unknown = h.get("/__standin/nothing").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.issue_code(), "not-found");
    h.finish().await;
}
