//! Putting the member schema in place: refuses objects of the schema's
//! names that another tool made, runs the (idempotent) DDL, then upgrades
//! the events of earlier releases. Used by `schema apply` and at start.

use std::time::Duration;

use clickhouse::Row;
use serde::Deserialize;

use crate::config::ClickHouseSettings;
use crate::store::events::EventStoreError;
use crate::store::schema;

/// Runs the schema statements; used by `schema apply` and at proxy start.
pub async fn apply_schema(settings: &ClickHouseSettings) -> Result<(), EventStoreError> {
    let client = crate::store::clickhouse::connect_server(settings);
    check_existing_objects(&client, settings).await?;
    for statement in schema::statements_for(settings) {
        client.query(&statement).execute().await?;
    }
    crate::store::upgrade::upgrade_v1(&client, &settings.database).await?;
    Ok(())
}

/// Refuses to use tables or views of the schema's names that another tool
/// made (the reference server's own ClickHouse mode uses some of the same
/// names), and a fresh database while an earlier release's member events
/// sit in the old default database: either would mix or hide data.
async fn check_existing_objects(
    client: &clickhouse::Client,
    settings: &ClickHouseSettings,
) -> Result<(), EventStoreError> {
    let database = &settings.database;
    let shape = schema::shape(schema::Topology::of(settings));
    let found = existing_objects(client, database, &shape).await?;
    let problems = schema::foreign_objects(database, &shape, &found.0, &found.1);
    if !problems.is_empty() {
        return Err(EventStoreError::ForeignSchema(format!(
            "{}; these are not this proxy's objects: set clickhouse.database to a database of \
             its own",
            problems.join("; ")
        )));
    }
    if found.0.is_empty()
        && database != OLD_DEFAULT_DATABASE
        && !crate::store::upgrade::holds_v1_events(client, database).await?
        && crate::store::upgrade::holds_v1_events(client, OLD_DEFAULT_DATABASE).await?
    {
        return Err(EventStoreError::ForeignSchema(format!(
            "ClickHouse database {database} holds no member events, but \
             {OLD_DEFAULT_DATABASE}.{} holds those of an earlier release of this proxy \
             (its default database was {OLD_DEFAULT_DATABASE}); set clickhouse.database = \
             \"{OLD_DEFAULT_DATABASE}\" to keep using them (they are upgraded to the \
             current schema at start)",
            schema::v1::EVENTS
        )));
    }
    Ok(())
}

/// The default database of releases before the reference server's own
/// ClickHouse tables were found to share names with the proxy's.
const OLD_DEFAULT_DATABASE: &str = "fhir";

type FoundObjects = (
    std::collections::HashMap<String, Vec<(String, String)>>,
    std::collections::HashMap<String, String>,
);

async fn existing_objects(
    client: &clickhouse::Client,
    database: &str,
    shape: &schema::Shape,
) -> Result<FoundObjects, EventStoreError> {
    #[derive(Row, Deserialize)]
    struct Column {
        table: String,
        name: String,
        #[serde(rename = "type")]
        column_type: String,
    }
    #[derive(Row, Deserialize)]
    struct View {
        name: String,
        create_table_query: String,
    }
    let tables: Vec<&str> = shape.tables.iter().map(|(t, _)| t.as_str()).collect();
    let columns = client
        .query(
            "SELECT table, name, type FROM system.columns \
             WHERE database = ? AND has(?, table) ORDER BY table, position",
        )
        .bind(database)
        .bind(&tables)
        .fetch_all::<Column>()
        .await;
    // 18.16's system.columns has no `position`: its rows come in column order.
    let columns = match columns {
        Ok(columns) => columns,
        Err(_) => {
            client
                .query(
                    "SELECT table, name, type FROM system.columns \
                     WHERE database = ? AND has(?, table)",
                )
                .bind(database)
                .bind(&tables)
                .fetch_all::<Column>()
                .await?
        }
    };
    let mut found_tables: std::collections::HashMap<String, Vec<(String, String)>> =
        std::collections::HashMap::new();
    for column in columns {
        found_tables
            .entry(column.table)
            .or_default()
            .push((column.name, column.column_type));
    }
    let views: Vec<&str> = shape.views.iter().map(|(v, _)| v.as_str()).collect();
    let found_views = client
        .query(
            "SELECT name, create_table_query FROM system.tables \
             WHERE database = ? AND has(?, name)",
        )
        .bind(database)
        .bind(&views)
        .fetch_all::<View>()
        .await?
        .into_iter()
        .map(|v| (v.name, v.create_table_query))
        .collect();
    Ok((found_tables, found_views))
}

/// Applies the schema, retrying until ClickHouse answers (at start, the proxy
/// must not depend on ClickHouse being up first).
pub async fn apply_schema_until_done(settings: &ClickHouseSettings) {
    let mut delay = Duration::from_millis(200);
    loop {
        match apply_schema(settings).await {
            Ok(()) => {
                tracing::info!(database = %settings.database, "ClickHouse member schema is in place");
                return;
            }
            Err(error @ EventStoreError::ForeignSchema(_)) => {
                // Not a matter of waiting: the member store stays unready
                // (writes and reads of migrated Groups answer 503) until an
                // operator fixes the configuration.
                tracing::error!(%error, "the ClickHouse member schema cannot be applied");
                return;
            }
            Err(error) => {
                tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "cannot apply the ClickHouse schema yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
