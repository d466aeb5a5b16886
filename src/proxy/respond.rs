//! The proxy's replies: [`Reply`] is what every handler of an inspected
//! request returns, and [`send`] is the one place an [`Answer`] is written
//! and the request marked answered (`RequestContext::intercepted`, which
//! metrics and the access log report as the disposition). Handlers build
//! answers; none writes to the session or sets the disposition itself.
//!
//! [`send_outcome`] writes without marking, for answers about forwarding
//! (an upstream that failed while pingora or our client relayed it).

use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::proxy::Session;
use pingora::Result;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::fhir::group_read::split_around_members;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::fhir::FHIR_JSON;
use crate::group::write::UpstreamReply;
use crate::proxy::forwarding::X_REQUEST_ID;
use crate::proxy::RequestContext;

/// What happens with an inspected request.
pub enum Reply {
    /// Forward it; pingora replays the buffered body.
    Forward,
    /// Forward it through our own client with this body (too big to replay).
    ForwardWithBody(Bytes),
    /// The proxy answers it.
    Answer(Answer),
}

/// An answer in the proxy's name, as [`send`] writes it.
pub enum Answer {
    /// An OperationOutcome, with extra headers (`WWW-Authenticate`,
    /// `Accept-Patch`).
    Outcome {
        outcome: Outcome,
        headers: Vec<(&'static str, String)>,
    },
    /// A whole body under `header`; `Content-Length` is set when sent.
    Whole {
        header: Box<ResponseHeader>,
        body: Bytes,
    },
    /// A legacy server's answer the proxy takes as its own (a refused probe,
    /// a search or read it completed).
    Relay(UpstreamReply),
    /// The legacy server's own answer to a request it handled, which the
    /// proxy only completed (a write beside a kept roster, shown with it):
    /// counted as forwarded.
    PassOn(UpstreamReply),
    /// A Group with its roster streamed from the member store.
    StreamedGroup(Box<StreamedGroup>),
}

impl Reply {
    /// An OperationOutcome in the proxy's name.
    pub fn outcome(outcome: Outcome) -> Reply {
        Reply::Answer(Answer::outcome(outcome))
    }

    /// [`Reply::outcome`] with extra headers.
    pub fn outcome_with(outcome: Outcome, headers: Vec<(&'static str, String)>) -> Reply {
        Reply::Answer(Answer::Outcome { outcome, headers })
    }

    /// `body` as JSON under `header`.
    pub fn json(header: ResponseHeader, body: &Value) -> Reply {
        Reply::Answer(Answer::Whole {
            header: Box::new(header),
            body: Bytes::from(serde_json::to_vec(body).unwrap_or_default()),
        })
    }

    /// See [`Answer::Relay`].
    pub fn relay(reply: UpstreamReply) -> Reply {
        Reply::Answer(Answer::Relay(reply))
    }

    /// Forwarding a body we read: pingora replays what fits its buffer; the
    /// rest goes through our own client.
    pub fn forward(body: Bytes) -> Reply {
        if body.len() <= PINGORA_REPLAY_LIMIT {
            Reply::Forward
        } else {
            Reply::ForwardWithBody(body)
        }
    }
}

impl Answer {
    /// An OperationOutcome in the proxy's name.
    pub fn outcome(outcome: Outcome) -> Answer {
        Answer::Outcome {
            outcome,
            headers: Vec::new(),
        }
    }
}

impl From<Answer> for Reply {
    fn from(answer: Answer) -> Reply {
        Reply::Answer(answer)
    }
}

/// Pingora replays at most this much buffered body to the upstream itself.
const PINGORA_REPLAY_LIMIT: usize = 64 * 1024;

/// Writes `answer`, marking the request answered unless the legacy server
/// handled it ([`Answer::PassOn`]).
pub(crate) async fn send(
    session: &mut Session,
    ctx: &mut RequestContext,
    answer: Answer,
) -> Result<()> {
    if !matches!(answer, Answer::PassOn(_)) {
        ctx.intercepted = true;
    }
    match answer {
        Answer::Outcome { outcome, headers } => {
            send_outcome_with(session, &outcome, &ctx.request_id, &headers).await
        }
        Answer::Whole { header, body } => send_whole(session, *header, body).await,
        Answer::Relay(reply) | Answer::PassOn(reply) => {
            send_upstream_reply(session, ctx, reply).await
        }
        Answer::StreamedGroup(streamed) => send_streamed_group(session, ctx, *streamed).await,
    }
}

/// Sends `outcome` as a complete FHIR JSON response. Does nothing when a final
/// response was already started (a mid-body failure can only close the stream).
pub async fn send_outcome(
    session: &mut Session,
    outcome: &Outcome,
    request_id: &str,
) -> Result<()> {
    send_outcome_with(session, outcome, request_id, &[]).await
}

async fn send_outcome_with(
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

async fn send_whole(session: &mut Session, mut header: ResponseHeader, body: Bytes) -> Result<()> {
    header.insert_header("content-length", body.len().to_string())?;
    let empty = body.is_empty();
    session
        .write_response_header(Box::new(header), empty)
        .await?;
    if !empty {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(())
}

async fn send_upstream_reply(
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
    if !header.headers.contains_key(X_REQUEST_ID) {
        header.insert_header(X_REQUEST_ID, ctx.request_id.clone())?;
    }
    send_whole(session, header, reply.body).await
}

/// What the roster stream of a Group read hands over.
pub enum RosterChunk {
    /// Comma-separated member JSON.
    Members(Bytes),
    /// The end, with the number of active members streamed.
    End { active_members: i64 },
}

/// A Group whose `member` is streamed from the member store as it is read.
pub struct StreamedGroup {
    /// The answer's head; `Transfer-Encoding` or `Content-Length` are set
    /// when sent.
    pub header: ResponseHeader,
    /// The Group; its `member` is replaced by the streamed roster.
    pub group: Value,
    pub chunks: mpsc::Receiver<std::result::Result<RosterChunk, String>>,
    /// `quantity` goes after the roster: the count of active members
    /// streamed (version reads, whose stored count is not the roster's).
    pub quantity_last: bool,
}

async fn send_streamed_group(
    session: &mut Session,
    ctx: &RequestContext,
    streamed: StreamedGroup,
) -> Result<()> {
    let StreamedGroup {
        mut header,
        group,
        mut chunks,
        quantity_last,
    } = streamed;
    let group = match (quantity_last, group) {
        (true, Value::Object(mut object)) => {
            object.remove("quantity");
            Value::Object(object)
        }
        (_, group) => group,
    };
    let (prefix, _) = split_around_members(&group);
    // Nothing goes out before the first member: a roster without members
    // is answered as a Group without `member` (FHIR JSON has no empty
    // arrays), and a store failure before any member still gets its 503.
    let mut started = false;
    while let Some(chunk) = chunks.recv().await {
        match chunk {
            Ok(RosterChunk::Members(bytes)) if bytes.is_empty() => {}
            Ok(RosterChunk::Members(bytes)) => {
                if !started {
                    started = true;
                    header.insert_header("transfer-encoding", "chunked")?;
                    session
                        .write_response_header(Box::new(header.clone()), false)
                        .await?;
                    session
                        .write_response_body(Some(Bytes::from(prefix.clone())), false)
                        .await?;
                }
                session.write_response_body(Some(bytes), false).await?
            }
            Ok(RosterChunk::End { active_members }) if !started => {
                let mut group = group;
                if let Some(object) = group.as_object_mut() {
                    object.remove("member");
                    if quantity_last {
                        object.insert("quantity".into(), active_members.into());
                    }
                }
                let body = Bytes::from(serde_json::to_vec(&group).unwrap_or_default());
                return send_whole(session, header, body).await;
            }
            Ok(RosterChunk::End { active_members }) => {
                let suffix = if quantity_last {
                    format!("],\"quantity\":{active_members}}}")
                } else {
                    "]}".to_string()
                };
                session
                    .write_response_body(Some(Bytes::from(suffix)), true)
                    .await?;
                return Ok(());
            }
            Err(error) if !started => {
                let outcome = Outcome::error(
                    503,
                    IssueType::Transient,
                    format!("the roster cannot be read now: {error}"),
                );
                return send_outcome(session, &outcome, &ctx.request_id).await;
            }
            Err(error) => {
                // Headers are out: the only honest signal left is a broken body.
                tracing::error!(%error, "roster stream failed mid-response");
                break;
            }
        }
    }
    Err(pingora::Error::explain(
        pingora::ErrorType::InternalError,
        "roster stream ended before its end marker",
    ))
}
