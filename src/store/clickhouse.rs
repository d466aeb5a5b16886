//! ClickHouse access through the official crate, restricted to what both
//! ClickHouse 18.16 (Debian 12) and current releases understand.

use crate::config::ClickHouseSettings;

/// A client bound to the configured server and database.
///
/// Validation is off because 18.16 lacks `RowBinaryWithNamesAndTypes`, which the
/// crate uses to check row types; our row structs are checked by tests instead.
///
/// In cluster mode, inserts into the distributed tables are synchronous (the
/// proxy answers a write only once its events are on their shard), and every
/// query prefers the replicas in configuration order, so reads go where the
/// writes went while those replicas are up (read-your-writes).
pub fn connect(settings: &ClickHouseSettings) -> clickhouse::Client {
    let client = clickhouse::Client::default()
        .with_url(&settings.url)
        .with_user(&settings.user)
        .with_password(&settings.password)
        .with_database(&settings.database)
        .with_validation(false);
    cluster_options(settings)
        .into_iter()
        .fold(client, |client, (name, value)| {
            client.with_setting(name, value)
        })
}

/// Query settings of cluster mode; none on a single server.
pub fn cluster_options(settings: &ClickHouseSettings) -> Vec<(&'static str, &'static str)> {
    if settings.cluster.is_empty() {
        return Vec::new();
    }
    vec![
        ("insert_distributed_sync", "1"),
        ("load_balancing", "in_order"),
    ]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_mode_inserts_synchronously_and_reads_in_order() {
        let mut settings = ClickHouseSettings::default();
        assert!(cluster_options(&settings).is_empty());
        settings.cluster = "events".into();
        let options = cluster_options(&settings);
        assert!(options.contains(&("insert_distributed_sync", "1")));
        assert!(options.contains(&("load_balancing", "in_order")));
    }
}
