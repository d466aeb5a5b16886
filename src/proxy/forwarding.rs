//! How a forwarded request is changed on its way upstream, and nothing more:
//! forwarding headers, `Host`, the upstream path prefix and the request id.

use pingora::http::RequestHeader;
use pingora::Result;

use crate::config::{UpstreamSettings, UpstreamTarget};

pub const X_REQUEST_ID: &str = "x-request-id";

/// Longest `X-Request-Id` the proxy keeps (it is stored with member writes).
pub const MAX_REQUEST_ID_LEN: usize = 200;

/// The client's `X-Request-Id`: `None` when absent; refused (never replaced)
/// when it cannot be kept as it is: an idempotency key that the proxy
/// silently swapped for another would let a retry apply twice.
pub fn client_request_id(
    headers: &http::HeaderMap,
) -> Result<Option<String>, crate::fhir::outcome::Outcome> {
    let mut values = headers.get_all(X_REQUEST_ID).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    let refuse = |why: &str| {
        crate::fhir::outcome::Outcome::error(
            400,
            crate::fhir::outcome::IssueType::Invalid,
            format!(
                "X-Request-Id {why}; it must be one header of 1 to {MAX_REQUEST_ID_LEN} visible \
                 ASCII characters or inner spaces (it is kept as the request's idempotency key)"
            ),
        )
    };
    if values.next().is_some() {
        return Err(refuse("is sent more than once"));
    }
    let bytes = value.as_bytes();
    if bytes.is_empty() {
        return Err(refuse("is empty"));
    }
    if bytes.len() > MAX_REQUEST_ID_LEN {
        return Err(refuse(&format!("is {} bytes long", bytes.len())));
    }
    if !bytes.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(refuse("holds characters other than visible ASCII"));
    }
    Ok(Some(String::from_utf8_lossy(bytes).into_owned()))
}

/// The facts about the downstream connection the rewrite needs.
pub struct ClientFacts<'a> {
    pub client_ip: Option<String>,
    /// The `Host` header as the client sent it.
    pub host: Option<&'a str>,
    pub request_id: &'a str,
}

pub fn rewrite_upstream_request(
    request: &mut RequestHeader,
    settings: &UpstreamSettings,
    target: &UpstreamTarget,
    client: &ClientFacts<'_>,
) -> Result<()> {
    if settings.forwarded_headers {
        if let Some(ip) = &client.client_ip {
            let forwarded_for = match request.headers.get("x-forwarded-for") {
                Some(existing) => format!("{}, {ip}", String::from_utf8_lossy(existing.as_bytes())),
                None => ip.clone(),
            };
            request.insert_header("x-forwarded-for", forwarded_for)?;
        }
        if !request.headers.contains_key("x-forwarded-proto") {
            request.insert_header("x-forwarded-proto", "http")?;
        }
        if let (false, Some(host)) = (
            request.headers.contains_key("x-forwarded-host"),
            client.host,
        ) {
            request.insert_header("x-forwarded-host", host.to_string())?;
        }
    }
    if !settings.preserve_host {
        request.insert_header("host", target.authority.clone())?;
    }
    if !request.headers.contains_key(X_REQUEST_ID) {
        request.insert_header(X_REQUEST_ID, client.request_id.to_string())?;
    }
    if !target.path_prefix.is_empty() {
        let original = request
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let prefixed = format!("{}{}", target.path_prefix, original);
        let uri = prefixed.parse::<http::Uri>().map_err(|e| {
            pingora::Error::because(
                pingora::ErrorType::InternalError,
                "upstream path prefix makes an invalid URI",
                e,
            )
        })?;
        request.set_uri(uri);
    }
    Ok(())
}

/// The client's request head (credentials and all) turned into a body-less
/// `method path` request of the proxy's own: body framing and preconditions
/// of the original do not apply to it.
pub fn derived_request(
    original: &RequestHeader,
    method: http::Method,
    path: &str,
) -> Result<RequestHeader> {
    let mut request = original.clone();
    request.set_method(method);
    let uri = path.parse::<http::Uri>().map_err(|e| {
        pingora::Error::because(pingora::ErrorType::InternalError, "derived request path", e)
    })?;
    request.set_uri(uri);
    for name in [
        http::header::CONTENT_TYPE,
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::EXPECT,
        http::header::IF_MATCH,
        http::header::IF_NONE_MATCH,
    ] {
        request.remove_header(&name);
    }
    request.remove_header("if-none-exist");
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_kept_as_sent_or_refused_never_replaced() {
        let headers = |values: &[&[u8]]| {
            let mut map = http::HeaderMap::new();
            for v in values {
                map.append(X_REQUEST_ID, http::HeaderValue::from_bytes(v).unwrap());
            }
            map
        };
        assert_eq!(client_request_id(&headers(&[])).unwrap(), None);
        assert_eq!(
            client_request_id(&headers(&[b"abc-1_2.3~"]))
                .unwrap()
                .as_deref(),
            Some("abc-1_2.3~")
        );
        assert_eq!(
            client_request_id(&headers(&[br#"{"$ne": null}"#]))
                .unwrap()
                .as_deref(),
            Some(r#"{"$ne": null}"#)
        );
        let long = vec![b'x'; MAX_REQUEST_ID_LEN];
        assert!(client_request_id(&headers(&[&long])).is_ok());
        let too_long = vec![b'x'; MAX_REQUEST_ID_LEN + 1];
        for (values, why) in [
            (vec![too_long.as_slice()], "201 bytes"),
            (vec![b"a\tb".as_slice()], "visible ASCII"),
            (vec![b"caf\xc3\xa9".as_slice()], "visible ASCII"),
            (vec![b"".as_slice()], "empty"),
            (vec![b"a".as_slice(), b"b".as_slice()], "more than once"),
        ] {
            let refused = client_request_id(&headers(&values)).unwrap_err();
            assert_eq!(refused.status, 400);
            assert!(
                refused.first_diagnostics().contains(why),
                "{why}: {refused:?}"
            );
        }
    }

    fn request(path: &str) -> RequestHeader {
        let mut r = RequestHeader::build("GET", path.as_bytes(), None).unwrap();
        r.insert_header("host", "proxy.example:8080").unwrap();
        r
    }

    fn facts(request_id: &str) -> ClientFacts<'_> {
        ClientFacts {
            client_ip: Some("10.1.2.3".into()),
            host: Some("proxy.example:8080"),
            request_id,
        }
    }

    #[test]
    fn appends_forwarded_for_and_keeps_outer_proto() {
        let mut r = request("/4_0_0/Patient/1?x=1");
        r.insert_header("x-forwarded-for", "1.1.1.1").unwrap();
        r.insert_header("x-forwarded-proto", "https").unwrap();
        let target = UpstreamTarget::parse("http://legacy:3000").unwrap();
        rewrite_upstream_request(&mut r, &UpstreamSettings::default(), &target, &facts("r1"))
            .unwrap();
        assert_eq!(r.headers["x-forwarded-for"], "1.1.1.1, 10.1.2.3");
        assert_eq!(r.headers["x-forwarded-proto"], "https");
        assert_eq!(r.headers["x-forwarded-host"], "proxy.example:8080");
        assert_eq!(r.headers["host"], "proxy.example:8080");
        assert_eq!(r.headers["x-request-id"], "r1");
        assert_eq!(r.uri.to_string(), "/4_0_0/Patient/1?x=1");
    }

    #[test]
    fn rewrites_host_and_prefix_when_configured() {
        let mut r = request("/4_0_0/Patient?name=a%20b");
        r.insert_header("x-request-id", "client-chosen").unwrap();
        let settings = UpstreamSettings {
            preserve_host: false,
            forwarded_headers: false,
            ..UpstreamSettings::default()
        };
        let target = UpstreamTarget::parse("http://legacy:3000/fhir/").unwrap();
        rewrite_upstream_request(&mut r, &settings, &target, &facts("generated")).unwrap();
        assert_eq!(r.headers["host"], "legacy:3000");
        assert!(r.headers.get("x-forwarded-for").is_none());
        assert_eq!(r.headers["x-request-id"], "client-chosen");
        assert_eq!(r.uri.to_string(), "/fhir/4_0_0/Patient?name=a%20b");
    }
}
