//! MongoDB access for the legacy server's database. Only single-document
//! atomic operations are used: FerretDB and many deployments have no
//! multi-document transactions.

use mongodb::bson::doc;
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
    let client = mongodb::Client::with_options(options)?;
    Ok(client.database(&settings.database))
}

pub async fn ping(database: &mongodb::Database) -> Result<(), mongodb::error::Error> {
    database.run_command(doc! { "ping": 1 }).await.map(|_| ())
}
