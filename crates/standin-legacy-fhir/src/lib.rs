//! A STAND-IN for a legacy MongoDB-backed FHIR R4 server.
//!
//! Only for fhir-group-proxy's tests, demo and benchmarks: it stores resources
//! in MongoDB exactly like the Mongo-backed reference server, and applies a
//! PATCH by reading, patching and rewriting the whole document, which is the
//! slow path the proxy exists to avoid. It is not a FHIR server for real use.
//!
//! Besides FHIR routes it has diagnostics under `/__standin/` that let the
//! proxy's passthrough tests see exactly what arrived.

mod diagnostics;
pub mod documents;
mod fhir;
mod http_util;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mongodb::bson::doc;
use mongodb::options::IndexOptions;
use mongodb::IndexModel;

#[derive(Debug, Clone)]
pub struct StandinConfig {
    pub mongo_uri: String,
    pub database: String,
    /// FHIR base path, e.g. `/4_0_0`.
    pub base_path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    database: mongodb::Database,
    base_path: String,
}

/// The stand-in server; cheap to clone.
#[derive(Clone)]
pub struct StandinServer {
    shared: Arc<Shared>,
}

impl StandinServer {
    pub async fn connect(config: StandinConfig) -> Result<Self, StandinError> {
        let client = mongodb::Client::with_uri_str(&config.mongo_uri).await?;
        let database = client.database(&config.database);
        let server = Self {
            shared: Arc::new(Shared {
                database,
                base_path: config.base_path.trim_end_matches('/').to_string(),
            }),
        };
        server.ensure_indexes("Group").await?;
        server.ensure_indexes("Patient").await?;
        Ok(server)
    }

    pub fn database(&self) -> &mongodb::Database {
        &self.shared.database
    }

    async fn ensure_indexes(&self, resource_type: &str) -> Result<(), StandinError> {
        let collection = self
            .shared
            .database
            .collection::<mongodb::bson::Document>(&fhir::collection_name(resource_type));
        collection
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "id": 1 })
                    .options(IndexOptions::builder().name("id_1".to_string()).build())
                    .build(),
            )
            .await?;
        Ok(())
    }

    /// Serves HTTP/1.1 (keep-alive) on `listener` until the task is dropped.
    pub async fn serve(self, listener: tokio::net::TcpListener) -> Result<(), StandinError> {
        loop {
            let (stream, _) = listener.accept().await?;
            let server = self.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let server = server.clone();
                    async move { Ok::<_, std::convert::Infallible>(server.handle(request).await) }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    async fn handle(&self, request: hyper::Request<hyper::body::Incoming>) -> http_util::Response {
        let path = request.uri().path().to_string();
        if let Some(rest) = path.strip_prefix("/__standin/") {
            let rest = rest.to_string();
            return diagnostics::handle(request, &rest).await;
        }
        let base = &self.shared.base_path;
        match path.strip_prefix(base.as_str()) {
            Some(rest) if rest.starts_with('/') || rest.is_empty() => {
                let rest = rest.to_string();
                fhir::handle(&self.shared.database, base, request, &rest).await
            }
            _ => http_util::outcome(404, "not-found", &format!("no route for {path}")),
        }
    }
}

/// Binds 127.0.0.1:0 and serves there on a new task.
pub async fn spawn_on_free_port(
    config: StandinConfig,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StandinError> {
    let server = StandinServer::connect(config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = server.serve(listener).await {
            tracing::error!(error = %e, "stand-in server stopped");
        }
    });
    Ok((addr, task))
}
