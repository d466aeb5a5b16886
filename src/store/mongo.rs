//! MongoDB access for the legacy server's database. Only single-document
//! atomic operations are used: FerretDB and many deployments have no
//! multi-document transactions.

use mongodb::bson::doc;
use mongodb::event::command::CommandEvent;
use mongodb::event::EventHandler;
use mongodb::options::ClientOptions;

use crate::config::MongoSettings;

pub async fn connect(settings: &MongoSettings) -> Result<mongodb::Database, mongodb::error::Error> {
    let mut options = ClientOptions::parse(&settings.uri).await?;
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
    let client = mongodb::Client::with_options(options)?;
    Ok(client.database(&settings.database))
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
