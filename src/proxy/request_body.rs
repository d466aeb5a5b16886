//! Reading the body of a request the proxy may answer itself: bounded, kept
//! for a replay upstream when the legacy server answers after all.

use bytes::{Bytes, BytesMut};
use pingora::proxy::Session;
use pingora::Result;

use crate::fhir::outcome::{IssueType, Outcome};
use crate::proxy::respond::Reply;
use crate::proxy::FhirGroupProxy;

/// Reads the body of a request the proxy may answer itself, keeping it for a
/// replay upstream. `Err` carries what happens instead: forwarding (member
/// handling off) or a refusal (413, a body nested too deep).
pub(crate) async fn read_intercepted_body(
    proxy: &FhirGroupProxy,
    session: &mut Session,
) -> Result<std::result::Result<Bytes, Reply>> {
    if proxy.group_service.is_none() {
        return Ok(Err(Reply::Forward));
    }
    session.enable_retry_buffering();
    let max_depth = proxy.config.fhir.max_json_depth;
    match read_body(session, proxy.config.fhir.max_intercepted_body_bytes).await? {
        Ok(body) if crate::fhir::json_limits::nests_deeper_than(&body, max_depth) => {
            let outcome = Outcome::error(
                400,
                IssueType::TooCostly,
                format!("the request body nests JSON deeper than {max_depth} levels"),
            );
            Ok(Err(Reply::outcome(outcome)))
        }
        Ok(body) => Ok(Ok(body)),
        Err(outcome) => Ok(Err(Reply::outcome(outcome))),
    }
}

async fn read_body(session: &mut Session, limit: usize) -> Result<Result<Bytes, Outcome>> {
    let mut body = BytesMut::new();
    while let Some(chunk) = session.read_request_body().await? {
        if body.len() + chunk.len() > limit {
            return Ok(Err(Outcome::error(
                413,
                IssueType::TooLong,
                format!("the request body exceeds the limit of {limit} bytes (fhir.max_intercepted_body_bytes)"),
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Ok(body.freeze()))
}
