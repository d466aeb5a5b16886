//! What a member write asks for and what it comes to: the use case's
//! request and result types, shared by the HTTP side and the commit
//! pipeline (`group::commit`).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use mongodb::bson::Document;

use crate::fhir::atr::{AtrMember, AtrOperation};
use crate::fhir::document_patch::OtherOps;
use crate::fhir::member_patch::MemberOps;
use crate::fhir::outcome::Outcome;

pub struct MemberPatchRequest {
    pub group_id: String,
    pub edit: MemberEdit,
    /// Version from `If-Match`, when the client sent one.
    pub if_match: Option<u64>,
    /// `X-Request-Id` as sent by the client: a retry with the same id is
    /// answered from the first attempt's commit instead of writing again.
    pub client_request_id: Option<String>,
    /// What the request asks for (method, URL, body), digested: a reused
    /// `X-Request-Id` with another digest is another request, refused.
    pub request_digest: String,
    pub request_id: String,
    /// The request URL as the history entry records it.
    pub url: String,
    /// For a split mixed patch: sends the non-member ops upstream.
    pub upstream_part: Option<UpstreamPart>,
    /// The Group's member state as read to route the request, if it was:
    /// the write's first attempt reuses it when it still holds.
    pub seen_state: Option<crate::store::group_documents::MemberState>,
    /// The client's JSON Patch, every op in order (empty for PUT and ATR):
    /// the history entry's outcome lists them, as the reference server's does.
    pub patch_ops: Vec<serde_json::Value>,
}

/// What a member write does to the roster.
pub enum MemberEdit {
    /// The member ops of a JSON Patch, with RFC 6902's meaning on the array.
    Patch(MemberOps),
    /// The whole roster as a `PUT` states it (`None`: no `member` key):
    /// diffed against the stored slots under the write lock, so concurrent
    /// writes cannot slip between.
    ReplaceRoster(Option<Vec<serde_json::Value>>),
    /// A Da Vinci ATR `$member-add` / `$member-remove`.
    Atr(AtrOperation, Vec<AtrMember>),
}

/// The legacy server's half of a split write: what it is, and how it is sent.
/// It is always a `PUT` with `If-Match` on the version the member half was
/// planned against, never a PATCH: the reference server ignores `If-Match`
/// on PATCH but honours it on PUT, and only a guarded write lets exactly one
/// version result. Its new version is the only version increment of the
/// whole request.
pub struct UpstreamPart {
    pub document: UpstreamDocument,
    /// PUTs the given Group body with `If-Match: W/"<version>"`.
    pub put: PutUpstream,
}

/// Sends a `PUT` of the Group to the legacy server, guarded by the version.
pub type PutUpstream =
    Box<dyn Fn(u64, Bytes) -> BoxFuture<'static, Result<UpstreamReply, Outcome>> + Send + Sync>;

/// What the legacy server's half of a split write stores.
pub enum UpstreamDocument {
    /// A roster PUT: the client's Group without its roster.
    Given(Bytes),
    /// The other ops of a mixed patch: applied by the proxy to the stored
    /// Group under the write lock (see [`crate::fhir::document_patch`]).
    Patched(OtherOps),
}

#[derive(Debug, Clone)]
pub struct UpstreamReply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

#[derive(Debug, Clone)]
pub struct MemberPatchResult {
    pub version: u64,
    /// The Group document after the write (without `member`).
    pub document: Option<Document>,
    /// The member key the Group's roster is stored under, when known: the
    /// answer reads the roster of `version` there without another lookup.
    pub group_key: Option<String>,
    /// True when this answers a retry of an already committed request.
    pub replayed: bool,
    pub events_written: usize,
    /// For split patches: the legacy server's answer, relayed to the client.
    pub upstream_reply: Option<UpstreamReply>,
}

/// The version a legacy server's write answer names: `ETag: W/"n"`, else
/// `meta.versionId` of the returned resource.
pub fn version_in_reply(reply: &UpstreamReply) -> Option<u64> {
    let from_etag = reply
        .headers
        .get(http::header::ETAG)
        .and_then(|v| v.to_str().ok())
        .and_then(|etag| {
            let bare = etag.trim().trim_start_matches("W/").trim_matches('"');
            bare.parse().ok()
        });
    from_etag.or_else(|| {
        let body: serde_json::Value = serde_json::from_slice(&reply.body).ok()?;
        body.pointer("/meta/versionId")?.as_str()?.parse().ok()
    })
}
