//! A deliberately low-level HTTP/1.1 client over a raw TCP socket, for tests
//! that must see framing (chunked vs content-length), interim `100 Continue`
//! responses and connection reuse exactly as they are on the wire.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct RawConnection {
    stream: TcpStream,
    buffer: Vec<u8>,
}

#[derive(Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Whether the body came with `Transfer-Encoding: chunked`.
    pub chunked: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

impl RawConnection {
    pub async fn open(addr: SocketAddr) -> RawConnection {
        let stream = TcpStream::connect(addr).await.expect("connect");
        RawConnection {
            stream,
            buffer: Vec::new(),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    async fn fill(&mut self) -> usize {
        let mut chunk = [0u8; 64 * 1024];
        let n = tokio::time::timeout(TIMEOUT, self.stream.read(&mut chunk))
            .await
            .expect("read within 30s")
            .expect("read");
        self.buffer.extend_from_slice(&chunk[..n]);
        n
    }

    /// Reads one response head (status line and headers).
    pub async fn read_head(&mut self) -> (u16, Vec<(String, String)>) {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(len) =
                response.parse(&self.buffer).expect("valid response head")
            {
                let status = response.code.expect("status");
                let parsed = response
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_string(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                self.buffer.drain(..len);
                return (status, parsed);
            }
            assert!(
                self.fill().await > 0,
                "connection closed before a response head"
            );
        }
    }

    /// Reads a whole final response (skipping nothing: call `read_head` first
    /// yourself to see interim responses).
    pub async fn read_response(&mut self) -> RawResponse {
        let (status, headers) = self.read_head().await;
        self.read_body(status, headers).await
    }

    pub async fn read_body(&mut self, status: u16, headers: Vec<(String, String)>) -> RawResponse {
        let find = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let chunked = find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            self.read_chunked().await
        } else if let Some(len) = find("content-length") {
            let len: usize = len.trim().parse().expect("numeric content-length");
            while self.buffer.len() < len {
                assert!(self.fill().await > 0, "connection closed mid-body");
            }
            self.buffer.drain(..len).collect()
        } else if status == 204 || status == 304 {
            Vec::new()
        } else {
            while self.fill().await > 0 {}
            std::mem::take(&mut self.buffer)
        };
        RawResponse {
            status,
            headers,
            body,
            chunked,
        }
    }

    async fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(pos) = self.buffer.windows(2).position(|w| w == b"\r\n") {
                    break pos;
                }
                assert!(self.fill().await > 0, "connection closed in chunk size");
            };
            let size_line = String::from_utf8_lossy(&self.buffer[..line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .expect("hex chunk size");
            self.buffer.drain(..line_end + 2);
            while self.buffer.len() < size + 2 {
                assert!(self.fill().await > 0, "connection closed in chunk");
            }
            if size == 0 {
                // No trailers expected in these tests: the terminating CRLF.
                self.buffer.drain(..2);
                return body;
            }
            body.extend(self.buffer.drain(..size));
            self.buffer.drain(..2);
        }
    }

    /// True when the peer has closed the connection (read returns 0).
    pub async fn is_closed(&mut self) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_millis(500), self.stream.read(&mut byte)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
