//! Forwarding a request whose body the proxy already read and which is too
//! large for pingora's 64 KiB replay buffer: sent with our own HTTP client, the
//! upstream's response streamed back unchanged.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::proxy::Session;

use crate::config::UpstreamSettings;
use crate::fhir::outcome::{IssueType, Outcome};
use crate::group::write::UpstreamReply;
use crate::operations::metrics::{metrics, UpstreamClientKind};

#[derive(Clone)]
pub struct UpstreamClient {
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    read_timeout: Duration,
}

impl UpstreamClient {
    pub fn new(settings: &UpstreamSettings, upstream_addr: std::net::SocketAddr) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(settings.connect_timeout()));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(settings.idle_timeout())
            .build(connector);
        Self {
            client,
            base: format!("http://{upstream_addr}"),
            read_timeout: settings.read_timeout(),
        }
    }

    /// Sends `request` with `body` and collects the whole response (used for
    /// the small upstream half of a split patch).
    pub async fn send_buffered(
        &self,
        request: &RequestHeader,
        body: Bytes,
    ) -> Result<UpstreamReply, Outcome> {
        let response = self.send(request, body).await?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = tokio::time::timeout(self.read_timeout, response.into_body().collect())
            .await
            .map_err(|_| upstream_timeout())?
            .map_err(|e| upstream_broken(format!("upstream body failed: {e}")))?
            .to_bytes();
        Ok(UpstreamReply {
            status,
            headers,
            body,
        })
    }

    async fn send(
        &self,
        request: &RequestHeader,
        body: Bytes,
    ) -> Result<http::Response<hyper::body::Incoming>, Outcome> {
        let path = request
            .uri
            .path_and_query()
            .map(|pq| pq.as_str())
            .unwrap_or("/");
        let mut builder = http::Request::builder()
            .method(request.method.clone())
            .uri(format!("{}{}", self.base, path));
        for (name, value) in request.headers.iter() {
            // The body is re-framed by the client (it knows the exact length).
            if name == http::header::TRANSFER_ENCODING
                || name == http::header::CONTENT_LENGTH
                || name == http::header::EXPECT
            {
                continue;
            }
            builder = builder.header(name, value);
        }
        let outgoing = builder.body(Full::new(body)).map_err(|e| {
            Outcome::error(
                400,
                IssueType::Invalid,
                format!("request cannot be forwarded: {e}"),
            )
        })?;
        tokio::time::timeout(self.read_timeout, self.client.request(outgoing))
            .await
            .map_err(|_| upstream_timeout())?
            .map_err(|e| upstream_broken(format!("the upstream FHIR server is unreachable: {e}")))
    }

    /// Sends `request` (already rewritten for the upstream) with `body`, and
    /// relays the response. Errors become 502/504 OperationOutcomes.
    pub async fn forward(
        &self,
        session: &mut Session,
        request: &RequestHeader,
        body: Bytes,
    ) -> Result<u16, Outcome> {
        let response = self.send(request, body).await?;
        let status = response.status().as_u16();
        let (parts, mut incoming) = response.into_parts();
        let mut header = ResponseHeader::build(parts.status, Some(parts.headers.len()))
            .map_err(|e| internal(e.to_string()))?;
        for (name, value) in parts.headers.iter() {
            header
                .append_header(name.clone(), value.clone())
                .map_err(|e| internal(e.to_string()))?;
        }
        session
            .write_response_header(Box::new(header), false)
            .await
            .map_err(|e| internal(e.to_string()))?;
        loop {
            let frame = tokio::time::timeout(self.read_timeout, incoming.frame())
                .await
                .map_err(|_| upstream_timeout())?;
            match frame {
                None => break,
                Some(Err(e)) => return Err(upstream_broken(format!("upstream body failed: {e}"))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        session
                            .write_response_body(Some(data), false)
                            .await
                            .map_err(|e| internal(e.to_string()))?;
                    }
                }
            }
        }
        session
            .write_response_body(None, true)
            .await
            .map_err(|e| internal(e.to_string()))?;
        Ok(status)
    }
}

/// 504, counted as an upstream error.
fn upstream_timeout() -> Outcome {
    metrics().upstream_error(504, UpstreamClientKind::Direct);
    Outcome::error(
        504,
        IssueType::Timeout,
        "the upstream FHIR server did not answer in time",
    )
}

/// 502 for an upstream that is unreachable or broke off, counted as an upstream error.
fn upstream_broken(message: String) -> Outcome {
    metrics().upstream_error(502, UpstreamClientKind::Direct);
    Outcome::error(502, IssueType::Transient, message)
}

/// 502 for a failure on the client side of a relayed answer (not counted
/// as an upstream error).
fn internal(message: String) -> Outcome {
    Outcome::error(502, IssueType::Transient, message)
}
