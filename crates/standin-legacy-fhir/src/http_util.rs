//! Response helpers shared by the stand-in's routes.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use serde_json::{json, Value};

pub type Body = BoxBody<Bytes, std::io::Error>;
pub type Response = hyper::Response<Body>;

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

pub fn response(status: u16, content_type: &str, body: impl Into<Bytes>) -> Response {
    let mut response = hyper::Response::new(full(body));
    *response.status_mut() =
        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

pub fn fhir(status: u16, resource: &Value) -> Response {
    response(
        status,
        FHIR_JSON,
        serde_json::to_vec(resource).unwrap_or_default(),
    )
}

pub fn outcome(status: u16, code: &str, diagnostics: &str) -> Response {
    fhir(
        status,
        &json!({
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]
        }),
    )
}

pub fn with_header(mut response: Response, name: &'static str, value: &str) -> Response {
    if let Ok(value) = value.parse() {
        response.headers_mut().append(name, value);
    }
    response
}
