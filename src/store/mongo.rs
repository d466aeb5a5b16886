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
    let client = mongodb::Client::with_options(options)?;
    Ok(client.database(&settings.database))
}

pub async fn ping(database: &mongodb::Database) -> Result<(), mongodb::error::Error> {
    database.run_command(doc! { "ping": 1 }).await.map(|_| ())
}
