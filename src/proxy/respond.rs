//! Writing responses the proxy produces itself (as opposed to relayed ones).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::fhir::outcome::Outcome;
use crate::fhir::FHIR_JSON;
use crate::proxy::forwarding::X_REQUEST_ID;

/// Sends `outcome` as a complete FHIR JSON response. Does nothing when a final
/// response was already started (a mid-body failure can only close the stream).
pub async fn send_outcome(
    session: &mut Session,
    outcome: &Outcome,
    request_id: &str,
) -> Result<()> {
    send_outcome_with(session, outcome, request_id, &[]).await
}

/// [`send_outcome`] with extra headers (`WWW-Authenticate`, `Accept-Patch`).
pub async fn send_outcome_with(
    session: &mut Session,
    outcome: &Outcome,
    request_id: &str,
    extra_headers: &[(&'static str, String)],
) -> Result<()> {
    let body = Bytes::from(outcome.to_bytes());
    let mut header = ResponseHeader::build(outcome.status, Some(4))?;
    header.insert_header("content-type", FHIR_JSON)?;
    header.insert_header("content-length", body.len().to_string())?;
    header.insert_header("cache-control", "no-store")?;
    for (name, value) in extra_headers {
        header.insert_header(*name, value.clone())?;
    }
    if !request_id.is_empty() {
        header.insert_header(X_REQUEST_ID, request_id.to_string())?;
    }
    session.write_error_response(header, body).await
}
