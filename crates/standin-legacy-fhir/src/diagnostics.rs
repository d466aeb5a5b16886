//! `/__standin/...`: stand-in diagnostics for the proxy's passthrough tests.
//! They show what arrived, echo bodies, and misbehave on purpose (slow, gzip,
//! arbitrary statuses).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::json;
use sha2::Digest;

use crate::http_util::{outcome, response, with_header, Response};

pub async fn handle(request: hyper::Request<Incoming>, rest: &str) -> Response {
    let query = request.uri().query().unwrap_or_default().to_string();
    let param = |name: &str| -> Option<u64> {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    let (head, _) = rest.split_once('/').unwrap_or((rest, ""));
    match head {
        "inspect" => inspect(request).await,
        "echo" => echo(request),
        "bytes" => bytes_response(
            param("n").unwrap_or(0) as usize,
            param("chunked") == Some(1),
        ),
        "gzip" => {
            let mut r = response(200, "application/fhir+json", gzip_patient().clone());
            r = with_header(r, "content-encoding", "gzip");
            r
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(0))).await;
            response(200, "text/plain", "ok")
        }
        "slow-body" => slow_body(Duration::from_millis(param("ms").unwrap_or(0))),
        "status" => {
            let code = rest
                .split('/')
                .nth(1)
                .and_then(|c| c.parse::<u16>().ok())
                .filter(|c| (200..600).contains(c))
                .unwrap_or(400);
            let mut r = response(code, "text/plain", format!("status {code}"));
            r = with_header(r, "x-standin-custom", "yes");
            r = with_header(r, "set-cookie", "a=1");
            with_header(r, "set-cookie", "b=2")
        }
        _ => outcome(404, "not-found", &format!("no stand-in diagnostic {rest}")),
    }
}

async fn inspect(request: hyper::Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let headers: Vec<[String; 2]> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            [
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            ]
        })
        .collect();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return outcome(400, "invalid", &format!("body not readable: {e}")),
    };
    let digest = sha2::Sha256::digest(&body);
    let report = json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/"),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "bodyLength": body.len(),
        "bodySha256": digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    });
    response(
        200,
        "application/json",
        serde_json::to_vec(&report).unwrap_or_default(),
    )
}

/// Streams the request body back as it arrives.
fn echo(request: hyper::Request<Incoming>) -> Response {
    let content_type = request
        .headers()
        .get(hyper::header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| hyper::header::HeaderValue::from_static("application/octet-stream"));
    let body = request.into_body().map_err(std::io::Error::other).boxed();
    let mut r = hyper::Response::new(body);
    r.headers_mut()
        .insert(hyper::header::CONTENT_TYPE, content_type);
    r
}

fn pattern(start: usize, len: usize) -> Bytes {
    (start..start + len)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

fn bytes_response(n: usize, chunked: bool) -> Response {
    if !chunked {
        return response(200, "application/octet-stream", pattern(0, n));
    }
    const CHUNK: usize = 64 * 1024;
    let frames = (0..n.div_ceil(CHUNK)).map(move |i| {
        let start = i * CHUNK;
        Ok::<_, std::io::Error>(Frame::data(pattern(start, CHUNK.min(n - start))))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let mut r = hyper::Response::new(body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    r
}

fn slow_body(delay: Duration) -> Response {
    let first = futures_util::stream::once(async {
        Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"first chunk\n")))
    });
    let rest = futures_util::stream::once(async move {
        tokio::time::sleep(delay).await;
        Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(b"rest\n")))
    });
    let body = StreamBody::new(futures_util::StreamExt::chain(first, rest)).boxed();
    let mut r = hyper::Response::new(body);
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    r
}

fn gzip_patient() -> &'static Bytes {
    static GZIPPED: OnceLock<Bytes> = OnceLock::new();
    GZIPPED.get_or_init(|| {
        use std::io::Write;
        let patient = br#"{"resourceType":"Patient","id":"gz","name":[{"family":"Compressed"}]}"#;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing to a Vec cannot fail.
        let _ = encoder.write_all(patient);
        Bytes::from(encoder.finish().unwrap_or_default())
    })
}
