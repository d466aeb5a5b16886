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
