//! A STAND-IN for a legacy MongoDB-backed FHIR R4 server.
//!
//! Only for fhir-group-proxy's tests, demo and benchmarks: it stores resources
//! in MongoDB in the layout of the Mongo-backed reference server
//! (icanbwell/fhir-server), and applies a PATCH by reading, patching and
//! rewriting the whole document, which is the slow path the proxy exists to
//! avoid. It is not a FHIR server for real use.
//!
//! How closely it imitates the real server is set by [`Fidelity`]: the
//! `simple` preset is plain FHIR R4, the `real` preset (the default)
//! behaves as icanbwell/fhir-server was measured and read to behave; the
//! crate README has the table.
//!
//! Besides FHIR routes it has diagnostics under `/__standin/` that let the
//! proxy's passthrough tests see exactly what arrived.

mod diagnostics;
pub mod documents;
pub mod enrichment;
pub mod fidelity;
mod locks;
pub mod merge;
mod outcome;
mod responses;
mod routes;
mod search;
pub mod storage;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper::StatusCode;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

pub use diagnostics::GZIP_PATIENT;
pub use fidelity::{Fidelity, Profile};
pub use storage::{history_collection, resource_collection};

use crate::outcome::{outcome, IssueCode};
use crate::storage::{Storage, PREINDEXED_TYPES};

/// Base path of the reference server's FHIR R4 API.
pub const DEFAULT_BASE_PATH: &str = "/4_0_0";

#[derive(Debug, Clone)]
pub struct StandinConfig {
    pub mongo_uri: String,
    /// MongoDB database holding the `{Type}_4_0_0` collections.
    pub database: String,
    /// FHIR base path, e.g. `/4_0_0`.
    pub base_path: String,
    /// Bearer tokens the stand-in accepts; empty: no access control.
    pub access: AccessTokens,
    /// How closely to imitate the real legacy server (`Fidelity::simple()`
    /// or `Fidelity::real()`, or any mix of toggles).
    pub fidelity: Fidelity,
    /// A separate database for the `{Type}_4_0_0_History` collections, as
    /// the real server's `RESOURCE_HISTORY_MONGO_DB_NAME`; `None`: the
    /// history lives beside the resources in `database`.
    pub history_database: Option<String>,
}

/// The stand-in's own access control, so tests can check that the proxy
/// never lets a client do what the legacy server would refuse it.
#[derive(Debug, Clone, Default)]
pub struct AccessTokens {
    /// `(token, may_write)`: read-only tokens may only GET.
    pub tokens: Vec<(String, bool)>,
}

impl AccessTokens {
    /// `None` when allowed; otherwise the refusal's status and reason.
    pub fn refusal(&self, authorization: Option<&str>, writes: bool) -> Option<(u16, String)> {
        if self.tokens.is_empty() {
            return None;
        }
        let token = authorization
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        match token.and_then(|t| self.tokens.iter().find(|(known, _)| known == t)) {
            None => Some((401, "the stand-in requires a known bearer token".into())),
            Some((_, false)) if writes => Some((403, "this token may only read".into())),
            Some(_) => None,
        }
    }
}

impl StandinConfig {
    /// The default base path on the given database, no access control,
    /// the `real` profile and history beside the resources.
    pub fn new(mongo_uri: impl Into<String>, database: impl Into<String>) -> Self {
        Self {
            mongo_uri: mongo_uri.into(),
            database: database.into(),
            base_path: DEFAULT_BASE_PATH.to_string(),
            access: AccessTokens::default(),
            fidelity: Fidelity::default(),
            history_database: None,
        }
    }

    /// The same with the toggles of a profile.
    pub fn with_profile(mut self, profile: Profile) -> Self {
        self.fidelity = Fidelity::of(profile);
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StandinError {
    #[error("stand-in legacy FHIR server: MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("stand-in legacy FHIR server: I/O: {0}")]
    Io(#[from] std::io::Error),
}

struct Shared {
    storage: Storage,
    /// Normalised: starts with `/` unless empty, no trailing `/`.
    base_path: String,
    access: AccessTokens,
    fidelity: Fidelity,
}

/// The stand-in server; cheap to clone.
#[derive(Clone)]
pub struct StandinServer {
    shared: Arc<Shared>,
}

fn normalise_base_path(base_path: &str) -> String {
    let trimmed = base_path.trim().trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

impl StandinServer {
    /// Connects to MongoDB and makes sure the indexes of the Group and Patient
    /// collections exist (which also proves the database is reachable).
    pub async fn connect(config: StandinConfig) -> Result<Self, StandinError> {
        let client = mongodb::Client::with_uri_str(&config.mongo_uri).await?;
        let database = client.database(&config.database);
        let history_database = match &config.history_database {
            Some(name) if !name.is_empty() => client.database(name),
            _ => database.clone(),
        };
        let storage = Storage::with_history_database(database, history_database);
        for resource_type in PREINDEXED_TYPES {
            storage.ensure_indexes(resource_type).await?;
        }
        Ok(Self {
            shared: Arc::new(Shared {
                storage,
                base_path: normalise_base_path(&config.base_path),
                access: config.access.clone(),
                fidelity: config.fidelity.clone(),
            }),
        })
    }

    pub fn database(&self) -> &mongodb::Database {
        self.shared.storage.database()
    }

    /// The database holding the history collections.
    pub fn history_database(&self) -> &mongodb::Database {
        self.shared.storage.history_database()
    }

    /// Waits until the history entries of every answered write are written
    /// (see `Fidelity::history_after_answer`).
    pub async fn history_settled(&self) {
        self.shared.storage.history_settled().await
    }

    /// Serves HTTP/1.1 (keep-alive; HTTP/2 with prior knowledge too) on
    /// `listener` until this future is dropped, e.g. by aborting its task,
    /// which also closes every open connection.
    pub async fn serve(self, listener: TcpListener) -> Result<(), StandinError> {
        let mut connections = JoinSet::new();
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        connections.spawn(self.clone().serve_connection(stream));
                    }
                    Err(e) if is_transient_accept_error(&e) => {
                        tracing::warn!(error = %e, "stand-in could not accept a connection");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err(e) => return Err(e.into()),
                },
                // Reap finished connections so the set does not grow.
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
            }
        }
    }

    async fn serve_connection(self, stream: TcpStream) {
        // Small responses on keep-alive connections must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let service = service_fn(move |request| {
            let server = self.clone();
            async move { Ok::<_, std::convert::Infallible>(server.handle(request).await) }
        });
        if let Err(e) = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await
        {
            tracing::debug!(error = %e, "stand-in connection ended with an error");
        }
    }

    async fn handle(&self, request: hyper::Request<hyper::body::Incoming>) -> responses::Response {
        let method = request.method().clone();
        let path = request.uri().path().to_string();
        let response = if path == "/__standin/history-settled" {
            // Answers once every answered write's history entry is in.
            self.shared.storage.history_settled().await;
            responses::buffered(hyper::StatusCode::NO_CONTENT, "text/plain", "")
        } else if let Some(rest) = path.strip_prefix("/__standin/") {
            diagnostics::handle(request, rest).await
        } else {
            let base = self.shared.base_path.as_str();
            match path.strip_prefix(base) {
                Some(rest) if rest.starts_with('/') => {
                    let authorization = request
                        .headers()
                        .get(hyper::header::AUTHORIZATION)
                        .and_then(|v| v.to_str().ok());
                    let writes = request.method() != hyper::Method::GET;
                    match self.shared.access.refusal(authorization, writes) {
                        Some((status, why)) => outcome(
                            StatusCode::from_u16(status).unwrap_or(StatusCode::UNAUTHORIZED),
                            if status == 401 {
                                IssueCode::Login
                            } else {
                                IssueCode::Forbidden
                            },
                            why,
                        ),
                        None => {
                            routes::handle(
                                &self.shared.storage,
                                base,
                                &self.shared.fidelity,
                                request,
                                rest,
                            )
                            .await
                        }
                    }
                }
                _ => outcome(
                    StatusCode::NOT_FOUND,
                    IssueCode::NotFound,
                    format!("the stand-in has no route {path} (FHIR base is {base:?})"),
                ),
            }
        };
        tracing::debug!(%method, %path, status = response.status().as_u16(), "stand-in answered");
        response
    }
}

/// Errors after which accepting again can succeed: the peer went away, or
/// the process is briefly out of descriptors or memory.
fn is_transient_accept_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        error.kind(),
        ErrorKind::ConnectionAborted
            | ErrorKind::ConnectionReset
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
            | ErrorKind::TimedOut
            | ErrorKind::OutOfMemory
    ) || matches!(error.raw_os_error(), Some(12 | 23 | 24 | 105))
}

/// Binds 127.0.0.1:0, serves there on a new task, and returns the bound
/// address and that task (abort it to stop the server).
pub async fn spawn_on_free_port(
    config: StandinConfig,
) -> Result<(SocketAddr, tokio::task::JoinHandle<()>), StandinError> {
    let server = StandinServer::connect(config).await?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = server.serve(listener).await {
            tracing::error!(error = %e, "stand-in legacy FHIR server stopped");
        }
    });
    Ok((addr, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_paths_are_normalised() {
        assert_eq!(normalise_base_path("/4_0_0"), "/4_0_0");
        assert_eq!(normalise_base_path("4_0_0/"), "/4_0_0");
        assert_eq!(normalise_base_path("/"), "");
        assert_eq!(normalise_base_path(""), "");
    }
}
