//! Writing responses the proxy produces itself (as opposed to relayed ones).
//!
//! Every answer the proxy gives in its own name starts here: these writers
//! mark the request answered (`RequestContext::intercepted`, which metrics
//! and the access log report as the disposition), so no handler sets it by
//! hand. [`send_outcome`] and [`pass_on`] write without marking: for
//! answers about forwarding (an upstream that failed) and for the legacy
//! server's own answer.

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;

use crate::fhir::outcome::Outcome;
use crate::fhir::FHIR_JSON;
use crate::group::write::UpstreamReply;
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::RequestContext;

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

/// Answers `outcome` in the proxy's name (counted as answered, not forwarded).
pub(crate) async fn answer_outcome(
    session: &mut Session,
    ctx: &mut RequestContext,
    outcome: &Outcome,
) -> Result<()> {
    answer_outcome_with(session, ctx, outcome, &[]).await
}

/// [`answer_outcome`] with extra headers (`WWW-Authenticate`, `Accept-Patch`).
pub(crate) async fn answer_outcome_with(
    session: &mut Session,
    ctx: &mut RequestContext,
    outcome: &Outcome,
    extra_headers: &[(&'static str, String)],
) -> Result<()> {
    mark_answered(ctx);
    send_outcome_with(session, outcome, &ctx.request_id, extra_headers).await
}

/// Starts the proxy's own answer with `header`; the body (if any) follows
/// through the session.
pub(crate) async fn answer_header(
    session: &mut Session,
    ctx: &mut RequestContext,
    header: ResponseHeader,
    end_of_stream: bool,
) -> Result<()> {
    mark_answered(ctx);
    session
        .write_response_header(Box::new(header), end_of_stream)
        .await
}

/// Answers in the proxy's name with `reply` (a legacy server's answer the
/// proxy took into its own: a refused probe, a search or read it completed).
pub(crate) async fn relay(
    session: &mut Session,
    ctx: &mut RequestContext,
    reply: UpstreamReply,
) -> Result<()> {
    mark_answered(ctx);
    pass_on(session, ctx, reply).await
}

/// The only place a request becomes the proxy's answer.
fn mark_answered(ctx: &mut RequestContext) {
    ctx.intercepted = true;
}

/// Writes the legacy server's own answer to a request it handled (the
/// proxy only completed it: a write beside a kept roster, shown with it).
pub(crate) async fn pass_on(
    session: &mut Session,
    ctx: &RequestContext,
    reply: UpstreamReply,
) -> Result<()> {
    let mut header = ResponseHeader::build(reply.status, Some(reply.headers.len() + 1))?;
    for (name, value) in reply.headers.iter() {
        if name == http::header::TRANSFER_ENCODING || name == http::header::CONTENT_LENGTH {
            continue;
        }
        header.append_header(name.clone(), value.clone())?;
    }
    header.insert_header("content-length", reply.body.len().to_string())?;
    if !header.headers.contains_key(X_REQUEST_ID) {
        header.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
    }
    let empty = reply.body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(reply.body), true).await?;
    }
    Ok(())
}

/// Pingora replays at most this much buffered body to the upstream itself.
const PINGORA_REPLAY_LIMIT: usize = 64 * 1024;

/// Forwarding a body we read: pingora replays what fits its buffer; the rest
/// goes through our own client.
pub(crate) fn forward(body: Bytes) -> Next {
    if body.len() <= PINGORA_REPLAY_LIMIT {
        Next::Forward
    } else {
        Next::ForwardWithBody(body)
    }
}

/// What happens next with an inspected request.
pub enum Next {
    /// The response was written here.
    Answered,
    /// Forward it; pingora replays the buffered body.
    Forward,
    /// Forward it through our own client with this body (too big to replay).
    ForwardWithBody(Bytes),
}

/// Answers `outcome` in the proxy's name; the request goes no further.
pub(crate) async fn answer(
    session: &mut Session,
    ctx: &mut RequestContext,
    outcome: &Outcome,
) -> Result<Next> {
    answer_outcome(session, ctx, outcome).await?;
    Ok(Next::Answered)
}
