//! The admin listener (`server.admin_listen`): `/metrics`, `/healthz`,
//! `/readyz`. A port of its own, because the proxy's port forwards every path
//! to the legacy server unchanged (its own `/metrics` included), and so it can
//! stay private while the proxy port is public. It is a small hyper server on
//! the store runtime, where the readiness checks' clients live; it keeps
//! answering while the proxy drains (`/readyz` then says 503).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

use crate::operations::metrics::{self, metrics};
use crate::operations::readiness::Readiness;
use crate::operations::shutdown::Lifecycle;

pub struct AdminState {
    pub readiness: Readiness,
    pub lifecycle: Arc<Lifecycle>,
}

/// Binds `addr` now, so a taken port fails the start with a clear error.
pub fn bind(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves the admin endpoints on `listener` from `runtime`.
pub fn spawn(
    listener: std::net::TcpListener,
    state: Arc<AdminState>,
    runtime: &tokio::runtime::Handle,
) -> std::io::Result<()> {
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    runtime.spawn(accept_loop(listener, state));
    Ok(())
}

async fn accept_loop(listener: tokio::net::TcpListener, state: Arc<AdminState>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                // Out of file descriptors and the like: back off, keep serving.
                tracing::warn!(%error, "admin listener cannot accept");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(answer(&request, &state).await) }
            });
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(%error, "admin connection ended with an error");
            }
        });
    }
}

async fn answer<B>(request: &Request<B>, state: &AdminState) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "use GET\n".into(),
        );
    }
    match request.uri().path() {
        "/metrics" => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            metrics().render(state.lifecycle.in_flight()),
        ),
        "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => {
            let report = state.readiness.report().await;
            let status =
                StatusCode::from_u16(report.status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            reply(
                status,
                "application/json",
                format!("{}\n", report.to_json()),
            )
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "not found: the admin listener serves /metrics, /healthz and /readyz\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
