//! Response building shared by the FHIR routes and the diagnostics.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::header::{HeaderName, HeaderValue, CONTENT_TYPE};
use hyper::StatusCode;
use serde_json::Value;

/// Every response body; boxed so streamed and buffered bodies mix.
pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Response = hyper::Response<Body>;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// A buffered response with a content type.
pub fn buffered(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response {
    let mut response = hyper::Response::new(full(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A FHIR JSON resource as the response body.
pub fn fhir_json(status: StatusCode, resource: &Value) -> Response {
    // Serialising a `Value` cannot fail: its keys are always strings.
    let body = serde_json::to_vec(resource).unwrap_or_default();
    buffered(status, FHIR_JSON, body)
}

/// Appends a header; values that are not valid header text are skipped
/// rather than failing the response (they only come from stored data).
pub fn with_header(mut response: Response, name: HeaderName, value: &str) -> Response {
    if let Ok(value) = HeaderValue::from_str(value) {
        response.headers_mut().append(name, value);
    }
    response
}
