//! `/__standin/...`: STAND-IN diagnostics for the proxy's passthrough tests,
//! not part of any FHIR server. They report exactly what arrived, echo
//! bodies, and misbehave on purpose (slow, gzip, arbitrary statuses).

use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderName, HeaderValue};
use hyper::StatusCode;
use serde_json::json;
use sha2::Digest;

use crate::outcome::{outcome, IssueCode};
use crate::responses::{buffered, with_header, Body, Response};

/// Chunk size of streamed `bytes` bodies.
const CHUNK: usize = 64 * 1024;
/// Period of the `bytes` pattern: byte i is `i % 251`.
const PATTERN_PERIOD: usize = 251;

/// `rest` is the path after `/__standin/`.
pub async fn handle(request: hyper::Request<Incoming>, rest: &str) -> Response {
    let query = request.uri().query().unwrap_or_default().to_string();
    let param = |name: &str| -> Option<u64> {
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
    };
    let (head, tail) = rest.split_once('/').unwrap_or((rest, ""));
    match head {
        "inspect" => inspect(request).await,
        "echo" => echo(request),
        "bytes" => bytes_response(param("n").unwrap_or(0), param("chunked") == Some(1)),
        "gzip" => gzip_response(),
        "slow" => {
            tokio::time::sleep(Duration::from_millis(param("ms").unwrap_or(0))).await;
            buffered(StatusCode::OK, "text/plain", "ok")
        }
        "slow-body" => slow_body(Duration::from_millis(param("ms").unwrap_or(0))),
        "status" => status_response(tail.split('/').next().unwrap_or_default()),
        _ => outcome(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            format!("the stand-in has no diagnostic route /__standin/{rest}"),
        ),
    }
}

fn streamed(content_type: HeaderValue, body: Body) -> Response {
    let mut response = hyper::Response::new(body);
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, content_type);
    response
}

/// What arrived: method, target, version, headers, and a digest of the body.
/// Header names are lowercase, and repeats of a name are listed together in
/// arrival order (what hyper's `HeaderMap` keeps).
async fn inspect(request: hyper::Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let headers: Vec<[String; 2]> = parts
        .headers
        .iter()
        .map(|(name, value)| {
            [
                name.to_string(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            ]
        })
        .collect();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                IssueCode::Invalid,
                format!("request body could not be read: {e}"),
            )
        }
    };
    let digest = sha2::Sha256::digest(&body);
    let report = json!({
        "method": parts.method.as_str(),
        "uri": parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
        "version": format!("{:?}", parts.version),
        "headers": headers,
        "bodyLength": body.len(),
        "bodySha256": digest.iter().map(|b| format!("{b:02x}")).collect::<String>(),
    });
    buffered(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec(&report).unwrap_or_default(),
    )
}

/// The request body streamed straight back, frame by frame.
fn echo(request: hyper::Request<Incoming>) -> Response {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("application/octet-stream"));
    streamed(
        content_type,
        request.into_body().map_err(std::io::Error::other).boxed(),
    )
}

/// One period-aligned buffer long enough that every chunk is a zero-copy
/// slice of it, whatever its offset in the pattern.
fn pattern_buffer() -> &'static Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN.get_or_init(|| {
        (0..CHUNK + PATTERN_PERIOD)
            .map(|i| (i % PATTERN_PERIOD) as u8)
            .collect::<Vec<u8>>()
            .into()
    })
}

/// `len` (at most `CHUNK`) bytes of the pattern starting at byte `start`.
fn pattern(start: u64, len: usize) -> Bytes {
    let offset = (start % PATTERN_PERIOD as u64) as usize;
    pattern_buffer().slice(offset..offset + len)
}

/// `n` pattern bytes, always produced lazily in chunks so large `n` costs no
/// memory; without `chunked` the length is announced up front.
fn bytes_response(n: u64, chunked: bool) -> Response {
    let chunk = CHUNK as u64;
    let frames = (0..n.div_ceil(chunk)).map(move |i| {
        let start = i * chunk;
        let len = chunk.min(n - start) as usize;
        Ok::<_, std::io::Error>(Frame::data(pattern(start, len)))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let mut response = streamed(HeaderValue::from_static("application/octet-stream"), body);
    if !chunked {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    response
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
    streamed(HeaderValue::from_static("text/plain"), body)
}

/// The decompressed content of `/__standin/gzip`.
pub const GZIP_PATIENT: &str =
    r#"{"resourceType":"Patient","id":"gz","name":[{"family":"Compressed"}]}"#;

/// Compressed once, so every call answers the very same bytes.
fn gzipped_patient() -> &'static Bytes {
    static GZIPPED: OnceLock<Bytes> = OnceLock::new();
    GZIPPED.get_or_init(|| {
        use std::io::Write;
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        // Writing into a Vec cannot fail.
        let _ = encoder.write_all(GZIP_PATIENT.as_bytes());
        Bytes::from(encoder.finish().unwrap_or_default())
    })
}

fn gzip_response() -> Response {
    let response = buffered(
        StatusCode::OK,
        "application/fhir+json",
        gzipped_patient().clone(),
    );
    with_header(response, header::CONTENT_ENCODING, "gzip")
}

fn status_response(code: &str) -> Response {
    // 1xx cannot be a final response.
    let Some(status) = code
        .parse::<u16>()
        .ok()
        .filter(|c| *c >= 200)
        .and_then(|c| StatusCode::from_u16(c).ok())
    else {
        return outcome(
            StatusCode::BAD_REQUEST,
            IssueCode::Invalid,
            format!("/__standin/status/ needs a status code from 200 to 999, not {code:?}"),
        );
    };
    let mut response = buffered(status, "text/plain", format!("status {}", status.as_u16()));
    response = with_header(response, HeaderName::from_static("x-standin-custom"), "yes");
    response = with_header(response, header::SET_COOKIE, "a=1");
    with_header(response, header::SET_COOKIE, "b=2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_slices_continue_the_pattern() {
        for start in [0u64, 1, 250, 251, 65_536, 1 << 33] {
            let bytes = pattern(start, CHUNK);
            assert_eq!(bytes.len(), CHUNK);
            for (i, b) in bytes.iter().enumerate() {
                assert_eq!(*b as u64, (start + i as u64) % 251);
            }
        }
    }

    #[test]
    fn gzip_body_is_stable_and_decompresses() {
        use std::io::Read;
        let first = gzipped_patient().clone();
        assert_eq!(&first, gzipped_patient());
        let mut text = String::new();
        flate2::read::GzDecoder::new(first.as_ref())
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, GZIP_PATIENT);
    }

    #[test]
    fn status_route_refuses_nonsense() {
        assert_eq!(status_response("418").status(), 418);
        assert_eq!(status_response("100").status(), 400);
        assert_eq!(status_response("abc").status(), 400);
        let response = status_response("503");
        assert_eq!(response.headers().get_all("set-cookie").iter().count(), 2);
        assert_eq!(response.headers()["x-standin-custom"], "yes");
    }
}
