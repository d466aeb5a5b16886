//! ClickHouse access through the official crate, restricted to what both
//! ClickHouse 18.16 (Debian 12) and current releases understand.

use crate::config::ClickHouseSettings;

/// A client bound to the configured server and database.
///
/// Validation is off because 18.16 lacks `RowBinaryWithNamesAndTypes`, which the
/// crate uses to check row types; our row structs are checked by tests instead.
pub fn connect(settings: &ClickHouseSettings) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&settings.url)
        .with_user(&settings.user)
        .with_password(&settings.password)
        .with_database(&settings.database)
        .with_validation(false)
}

/// The same server without a default database, for `CREATE DATABASE`.
pub fn connect_server(settings: &ClickHouseSettings) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(&settings.url)
        .with_user(&settings.user)
        .with_password(&settings.password)
        .with_validation(false)
}

pub async fn server_version(
    client: &clickhouse::Client,
) -> Result<String, clickhouse::error::Error> {
    client.query("SELECT version()").fetch_one::<String>().await
}
