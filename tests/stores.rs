//! Proves the install path: the real ClickHouse and the real MongoDB-compatible
//! server answer through the crates the proxy uses, with the settings it uses.

mod support;

use fhir_group_proxy::config::{ClickHouseSettings, MongoSettings};
use fhir_group_proxy::store;
use mongodb::bson::{doc, Document};
use mongodb::options::ReturnDocument;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, clickhouse::Row, Serialize, Deserialize)]
struct ProbeRow {
    group_key: String,
    entity_reference: String,
    sequence: u64,
    event_time_ms: u64,
}

#[tokio::test]
async fn clickhouse_create_insert_select_roundtrip() {
    let settings = ClickHouseSettings {
        url: support::clickhouse_url(),
        database: support::unique_name("fgp_probe"),
        ..ClickHouseSettings::default()
    };
    let server = store::clickhouse::connect_server(&settings);
    let version = store::clickhouse::server_version(&server)
        .await
        .expect("ClickHouse answers");
    assert!(version.split('.').count() >= 3, "version {version}");

    server
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            settings.database
        ))
        .execute()
        .await
        .expect("create database");
    let client = store::clickhouse::connect(&settings);
    client
        .query(
            "CREATE TABLE probe (group_key String, entity_reference String, sequence UInt64, event_time_ms UInt64) \
             ENGINE = MergeTree ORDER BY (group_key, sequence)",
        )
        .execute()
        .await
        .expect("create table");

    let rows: Vec<ProbeRow> = (0..2_000u64)
        .map(|i| ProbeRow {
            group_key: format!("g{}", i % 3),
            // Values that look like SQL must be stored verbatim.
            entity_reference: format!("Patient/{i}'); DROP TABLE probe; --"),
            sequence: i,
            event_time_ms: 1_700_000_000_000 + i,
        })
        .collect();
    let mut insert = client
        .insert::<ProbeRow>("probe")
        .await
        .expect("insert starts");
    for row in &rows {
        insert.write(row).await.expect("row written");
    }
    insert.end().await.expect("insert committed");

    let fetched = client
        .query("SELECT ?fields FROM probe WHERE group_key = ? ORDER BY sequence")
        .bind("g1")
        .fetch_all::<ProbeRow>()
        .await
        .expect("select");
    let expected: Vec<ProbeRow> = rows.into_iter().filter(|r| r.group_key == "g1").collect();
    assert_eq!(fetched, expected);

    server
        .query(&format!("DROP DATABASE {}", settings.database))
        .execute()
        .await
        .expect("drop database");
}

/// No cluster runs here, so cluster-mode DDL cannot be applied; but the real
/// server parses each statement whole before it looks for the cluster, so a
/// refusal naming the unknown cluster (and no syntax error) shows that this
/// ClickHouse release accepts every statement's syntax.
#[tokio::test]
async fn cluster_schema_parses_on_the_real_clickhouse() {
    let settings = ClickHouseSettings {
        url: support::clickhouse_url(),
        database: support::unique_name("fgp_cluster"),
        cluster: "fgp_no_such_cluster".into(),
        ..ClickHouseSettings::default()
    };
    let server = store::clickhouse::connect_server(&settings);
    let statements = store::schema::statements_for(&settings);
    assert!(statements.len() > 10);
    for statement in statements {
        let refused = server
            .query(&statement)
            .execute()
            .await
            .expect_err("there is no cluster fgp_no_such_cluster")
            .to_string();
        assert!(
            refused.contains("'fgp_no_such_cluster' not found")
                && !refused.contains("Syntax error"),
            "{statement}\n-> {refused}"
        );
    }
}

#[tokio::test]
async fn mongo_insert_and_find_one_and_update() {
    let settings = MongoSettings {
        uri: support::mongo_uri(),
        database: support::unique_name("fgp_probe"),
        ..Default::default()
    };
    let database = store::mongo::connect(&settings).await.expect("client");
    store::mongo::ping(&database)
        .await
        .expect("MongoDB-compatible server answers");
    let groups = database.collection::<Document>("Group_4_0_0");
    groups
        .insert_one(doc! { "id": "g1", "resourceType": "Group", "meta": { "versionId": "1" } })
        .await
        .expect("insert");

    // The compare-and-swap the proxy relies on: only the expected version moves.
    let updated = groups
        .find_one_and_update(
            doc! { "id": "g1", "meta.versionId": "1" },
            doc! { "$set": { "meta.versionId": "2", "meta.lastUpdated": mongodb::bson::DateTime::now() } },
        )
        .return_document(ReturnDocument::After)
        .await
        .expect("update")
        .expect("matched");
    assert_eq!(
        updated
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap(),
        "2"
    );
    let stale = groups
        .find_one_and_update(
            doc! { "id": "g1", "meta.versionId": "1" },
            doc! { "$set": { "meta.versionId": "3" } },
        )
        .await
        .expect("update");
    assert!(stale.is_none(), "a stale version does not match");

    database.drop().await.expect("drop");
}

/// Tables of the proxy's names that another tool made (the reference
/// server's ClickHouse mode names its tables the same) are refused, named,
/// and left alone; the proxy's own tables pass the same check.
#[tokio::test]
async fn clickhouse_tables_of_another_shape_are_refused_by_name() {
    let settings = fhir_group_proxy::config::ClickHouseSettings {
        url: support::clickhouse_url(),
        database: support::unique_name("fgp_foreign"),
        ..Default::default()
    };
    let client = store::clickhouse::connect_server(&settings);
    let db = &settings.database;
    client
        .query(&format!("CREATE DATABASE {db}"))
        .execute()
        .await
        .unwrap();
    client
        .query(&format!(
            "CREATE TABLE {db}.Group_4_0_0_MemberSlotEvents (group_id String, entity_reference String, \
             event_type Enum8('added' = 1, 'removed' = 2), event_id String) \
             ENGINE = MergeTree ORDER BY (group_id, entity_reference)"
        ))
        .execute()
        .await
        .unwrap();
    let refused = store::events::apply_schema(&settings)
        .await
        .expect_err("a foreign table is refused");
    let message = refused.to_string();
    assert!(
        message.contains(&format!(
            "{db}.Group_4_0_0_MemberSlotEvents exists with other columns"
        )),
        "{message}"
    );
    assert!(message.contains("event_id String"), "{message}");
    let left: u64 = client
        .query(&format!(
            "SELECT count() FROM system.tables WHERE database = '{db}'"
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(left, 1, "nothing was created beside it");

    let own = support::fresh_member_database("fgp_own").await;
    store::events::apply_schema(&own)
        .await
        .expect("the proxy's own tables pass the check, again and again");
    for database in [db, &own.database] {
        client
            .query(&format!("DROP DATABASE {database}"))
            .execute()
            .await
            .unwrap();
    }
}
