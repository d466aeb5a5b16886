//! MongoDB access for the legacy server's database. Only single-document
//! atomic operations are used: FerretDB and many deployments have no
//! multi-document transactions.

use mongodb::bson::doc;
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;

use crate::config::MongoSettings;

pub async fn connect(settings: &MongoSettings) -> Result<mongodb::Database, mongodb::error::Error> {
    Ok(client(&settings.uri).await?.database(&settings.database))
}

/// The database the legacy server keeps resource history in: `history_uri`
/// and `history_database`, each defaulting to the resources' own.
pub async fn connect_history(
    settings: &MongoSettings,
    resources: &mongodb::Database,
) -> Result<mongodb::Database, mongodb::error::Error> {
    let name = match settings.history_database.as_str() {
        "" => settings.database.as_str(),
        name => name,
    };
    if settings.history_uri.is_empty() {
        return Ok(resources.client().database(name));
    }
    Ok(client(&settings.history_uri).await?.database(name))
}

async fn client(uri: &str) -> Result<mongodb::Client, mongodb::error::Error> {
    let mut options = ClientOptions::parse(uri).await?;
    if options.app_name.is_none() {
        options.app_name = Some("fhir-group-proxy".into());
    }
    // The driver's 30 s default would hold requests long past any client's
    // patience when MongoDB is down; answer 503 sooner (a URI setting wins).
    if options.server_selection_timeout.is_none() {
        options.server_selection_timeout = Some(std::time::Duration::from_secs(5));
    }
    if options.connect_timeout.is_none() {
        options.connect_timeout = Some(std::time::Duration::from_secs(2));
    }
    options.command_event_handler = Some(EventHandler::callback(record_command));
    mongodb::Client::with_options(options)
}

pub async fn ping(database: &mongodb::Database) -> Result<(), mongodb::error::Error> {
    database.run_command(doc! { "ping": 1 }).await.map(|_| ())
}

/// The one place every MongoDB command of the proxy passes: its latency goes
/// to the metrics, by command name and outcome.
fn record_command(event: CommandEvent) {
    let metrics = crate::operations::metrics::metrics();
    match event {
        CommandEvent::Succeeded(done) => {
            metrics.mongo_command(&done.command_name, done.duration, true)
        }
        CommandEvent::Failed(failed) => {
            metrics.mongo_command(&failed.command_name, failed.duration, false)
        }
        _ => {}
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DocumentStoreError {
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
    #[error("Group/{id} is stored more than once (ids shared across tenants); refusing to guess")]
    Ambiguous { id: String },
    #[error("Group/{id} in MongoDB is malformed: {what}")]
    Malformed { id: String, what: String },
    #[error("MongoDB refused to update Group/{id}: {what}")]
    Refused { id: String, what: String },
}

/// Who takes a lock: a process role and place that stay the same across
/// restarts (`owner`), and this particular run of it (`boot`). A process
/// that finds locks of its own owner from another boot knows their holder is
/// dead, without waiting out their lease.
#[derive(Clone, Debug)]
pub struct LeaseHolder {
    pub owner: String,
    pub boot: String,
}

impl LeaseHolder {
    /// `role` on this host at `place` (for the proxy: its listen address).
    pub fn here(role: &str, place: &str) -> Self {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into());
        Self {
            owner: format!("{role}@{host}/{place}"),
            boot: uuid::Uuid::new_v4().to_string(),
        }
    }
}

pub(super) fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    use mongodb::error::{ErrorKind, WriteFailure};
    match error.kind.as_ref() {
        ErrorKind::Write(WriteFailure::WriteError(e)) => e.code == 11000,
        ErrorKind::Command(e) => e.code == 11000,
        _ => error.to_string().contains("E11000") || error.to_string().contains("duplicate key"),
    }
}

/// The `_id`s of up to `limit` documents of `collection` matching `filter`.
pub(super) async fn ids_where(
    collection: &mongodb::Collection<mongodb::bson::Document>,
    filter: mongodb::bson::Document,
    limit: i64,
) -> Result<Vec<String>, DocumentStoreError> {
    let mut cursor = collection
        .find(filter)
        .projection(doc! { "_id": 1 })
        .limit(limit)
        .await?;
    let mut ids = Vec::new();
    while cursor.advance().await? {
        if let Ok(id) = cursor.deserialize_current()?.get_str("_id") {
            ids.push(id.to_string());
        }
    }
    Ok(ids)
}
