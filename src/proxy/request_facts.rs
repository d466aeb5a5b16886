//! The facts of a write request the proxy reads from its head, each by one
//! rule: `If-Match`, `Prefer`, `X-Request-Id`, and the digest that tells a
//! retry from another request under the same id. Pure: no I/O.

use http::HeaderMap;

use crate::fhir::outcome::{IssueType, Outcome};
use crate::proxy::forwarding::X_REQUEST_ID;

/// What a member write's request head asks for, read once (not the store's
/// `WriteFacts`, which are what the Group document says).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteHeaders {
    /// The version `If-Match` names; `None` without one, or for `*`.
    pub if_match: Option<u64>,
    pub prefer: Prefer,
    /// The client's own `X-Request-Id` (a retry repeats it); `None` when it
    /// sent none and the proxy made one up, which no retry can repeat.
    pub client_request_id: Option<String>,
}

impl WriteHeaders {
    /// The facts of `headers`; a refusal when `If-Match` is malformed, or
    /// missing where `members.require_if_match` asks for it.
    pub fn from_headers(headers: &HeaderMap, require_if_match: bool) -> Result<Self, Outcome> {
        let if_match = match headers.get(http::header::IF_MATCH) {
            Some(value) => parse_if_match(value.as_bytes())?,
            None => None,
        };
        // A required If-Match names a version: `*` guards against no lost update.
        if if_match.is_none() && require_if_match {
            return Err(Outcome::error(
                400,
                IssueType::Required,
                "this server requires If-Match (W/\"<versionId>\") on Group member PATCHes",
            ));
        }
        Ok(Self {
            if_match,
            prefer: Prefer::from_header(headers.get("prefer").and_then(|v| v.to_str().ok())),
            client_request_id: headers
                .get(X_REQUEST_ID)
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string),
        })
    }
}

/// What a request asks for, digested: method, path and query, body. A retry
/// under the same `X-Request-Id` repeats all three.
pub(crate) fn request_digest(head: &pingora::http::RequestHeader, body: &[u8]) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    digest.update(head.method.as_str().as_bytes());
    digest.update(b"\n");
    digest.update(
        head.uri
            .path_and_query()
            .map_or("", |p| p.as_str())
            .as_bytes(),
    );
    digest.update(b"\n");
    digest.update(body);
    digest
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `If-Match: W/"3"` (also `"3"` and `3`) to a version number; `*` (any
/// version: the Group exists, which a member write checks anyway) to `None`.
pub fn parse_if_match(value: &[u8]) -> Result<Option<u64>, Outcome> {
    let text = std::str::from_utf8(value).unwrap_or_default().trim();
    if text == "*" {
        return Ok(None);
    }
    let unweak = text.strip_prefix("W/").unwrap_or(text);
    let bare = unweak
        .strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(unweak);
    bare.parse::<u64>().map(Some).map_err(|_| {
        Outcome::error(
            400,
            IssueType::Invalid,
            format!("If-Match '{text}' is not a version ETag like W/\"3\""),
        )
    })
}

/// The body the client asked for with `Prefer: return=...`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefer {
    Minimal,
    Representation,
    OperationOutcome,
}

impl Prefer {
    pub fn from_header(value: Option<&str>) -> Self {
        let Some(value) = value else {
            return Prefer::Representation;
        };
        for preference in value.split(',').map(str::trim) {
            match preference.to_ascii_lowercase().as_str() {
                "return=minimal" => return Prefer::Minimal,
                "return=operationoutcome" => return Prefer::OperationOutcome,
                "return=representation" => return Prefer::Representation,
                _ => {}
            }
        }
        Prefer::Representation
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::header::HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn a_write_without_headers_asks_for_the_representation_of_any_version() {
        let facts = WriteHeaders::from_headers(&headers(&[]), false).unwrap();
        assert_eq!(
            facts,
            WriteHeaders {
                if_match: None,
                prefer: Prefer::Representation,
                client_request_id: None
            }
        );
    }

    #[test]
    fn if_match_prefer_and_the_clients_request_id_are_read_from_the_head() {
        let facts = WriteHeaders::from_headers(
            &headers(&[
                ("if-match", "W/\"4\""),
                ("prefer", "return=minimal"),
                ("x-request-id", "retry-7"),
            ]),
            true,
        )
        .unwrap();
        assert_eq!(facts.if_match, Some(4));
        assert_eq!(facts.prefer, Prefer::Minimal);
        assert_eq!(facts.client_request_id.as_deref(), Some("retry-7"));
    }

    #[test]
    fn a_missing_or_any_version_if_match_is_refused_only_where_the_server_requires_one() {
        let refused = WriteHeaders::from_headers(&headers(&[]), true).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.issues[0].diagnostics.contains("requires If-Match"));
        let any = WriteHeaders::from_headers(&headers(&[("if-match", "*")]), true).unwrap_err();
        assert_eq!(any.status, 400, "* names no version");
        let any = WriteHeaders::from_headers(&headers(&[("if-match", "*")]), false).unwrap();
        assert_eq!(any.if_match, None, "* is any version");
    }

    #[test]
    fn a_malformed_if_match_is_refused_even_where_none_is_required() {
        let refused =
            WriteHeaders::from_headers(&headers(&[("if-match", "yesterday")]), false).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.issues[0].diagnostics.contains("yesterday"));
    }

    #[test]
    fn an_empty_request_id_is_not_the_clients() {
        let facts = WriteHeaders::from_headers(&headers(&[("x-request-id", "")]), false).unwrap();
        assert_eq!(facts.client_request_id, None);
    }

    #[test]
    fn the_digest_tells_method_path_and_body_apart() {
        let head = |method: &str, path: &str| {
            pingora::http::RequestHeader::build(method, path.as_bytes(), None).unwrap()
        };
        let patch = request_digest(&head("PATCH", "/Group/g"), b"[]");
        assert_eq!(patch, request_digest(&head("PATCH", "/Group/g"), b"[]"));
        assert_ne!(patch, request_digest(&head("PUT", "/Group/g"), b"[]"));
        assert_ne!(patch, request_digest(&head("PATCH", "/Group/h"), b"[]"));
        assert_ne!(patch, request_digest(&head("PATCH", "/Group/g"), b"[{}]"));
    }

    #[test]
    fn if_match_forms() {
        assert_eq!(parse_if_match(b"W/\"3\"").unwrap(), Some(3));
        assert_eq!(parse_if_match(b"\"12\"").unwrap(), Some(12));
        assert_eq!(parse_if_match(b" 7 ").unwrap(), Some(7));
        assert_eq!(parse_if_match(b"*").unwrap(), None, "any version");
        let e = parse_if_match(b"W/\"abc\"").unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.issues[0].diagnostics.contains("abc"));
    }

    #[test]
    fn prefer_forms() {
        assert_eq!(Prefer::from_header(None), Prefer::Representation);
        assert_eq!(Prefer::from_header(Some("return=minimal")), Prefer::Minimal);
        assert_eq!(
            Prefer::from_header(Some("handling=strict, return=OperationOutcome")),
            Prefer::OperationOutcome
        );
        assert_eq!(
            Prefer::from_header(Some("respond-async")),
            Prefer::Representation
        );
    }
}
