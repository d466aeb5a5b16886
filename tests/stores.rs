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
    let refused = store::setup::apply_schema(&settings)
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
    store::setup::apply_schema(&own)
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

/// A database written by the previous release (schema version 1: members as
/// a set keyed by reference) is upgraded by `schema-apply` once: every
/// Group reads back as version 1 answered it, its history included, and a
/// second run changes nothing.
#[tokio::test]
async fn a_database_of_schema_version_one_is_upgraded_once_and_reads_back_the_same() {
    let db = support::unique_name("upgrade");
    let settings = ClickHouseSettings {
        url: support::clickhouse_url(),
        database: db.clone(),
        ..Default::default()
    };
    let client = store::clickhouse::connect_server(&settings);
    let v1 = include_str!("fixtures/schema_v1_single_node.sql").replace("fhir_group_proxy", &db);
    for statement in v1.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        client
            .query(statement)
            .execute()
            .await
            .expect("version 1 DDL");
    }
    // Version 1 events: b added (v1), a added inactive with a period (v2),
    // b removed and c added (v3); another Group with d.
    let rows = [
        ("k1", "g1", 1, 0, "Patient/b", "added", "", "", 0, 1, 1),
        (
            "k1",
            "g1",
            2,
            0,
            "Patient/a",
            "added",
            "2026-01-01",
            "",
            1,
            1,
            0,
        ),
        ("k1", "g1", 3, 0, "Patient/b", "removed", "", "", 0, -1, -1),
        ("k1", "g1", 3, 1, "Patient/c", "added", "", "", 0, 1, 1),
        ("k2", "g2", 1, 0, "Patient/d", "added", "", "", 0, 1, 1),
    ];
    for (key, id, version, op, reference, kind, start, end, inactive, delta, active) in rows {
        client
            .query(&format!(
                "INSERT INTO {db}.Group_4_0_0_MemberEvents (group_key, group_id, group_version, \
                 token, request_id, op_index, sequence, entity_reference, entity_type, event_type, \
                 period_start, period_end, inactive, member_delta, active_delta, event_time_ms) \
                 VALUES (?, ?, ?, ?, 'req', ?, ?, ?, 'Patient', ?, ?, ?, ?, ?, ?, 1000)"
            ))
            .bind(key)
            .bind(id)
            .bind(version)
            .bind(format!("token-{key}-{version}"))
            .bind(op as u32)
            .bind(store::events::event_sequence(version, op))
            .bind(reference)
            .bind(kind)
            .bind(start)
            .bind(end)
            .bind(inactive as u8)
            .bind(delta as i8)
            .bind(active as i8)
            .execute()
            .await
            .expect("version 1 event");
    }

    store::setup::apply_schema(&settings)
        .await
        .expect("the upgrade runs");
    store::setup::apply_schema(&settings)
        .await
        .expect("a second run is a no-op");

    let events = store::events::EventStore::start(
        &settings,
        store::insert_batcher::BatchSettings {
            max_rows: 100,
            max_delay: std::time::Duration::from_millis(1),
        },
    );
    let read = |version: Option<u64>| {
        let events = events.clone();
        async move {
            let mut cursor = events.roster("k1", version).unwrap();
            let mut elements = Vec::new();
            while let Some(row) = cursor.next().await.unwrap() {
                elements.push(row.element);
            }
            elements
        }
    };
    assert_eq!(
        read(None).await,
        vec![
            r#"{"entity":{"reference":"Patient/a"},"period":{"start":"2026-01-01"},"inactive":true}"#,
            r#"{"entity":{"reference":"Patient/c"}}"#,
        ],
        "reference order, as version 1 answered"
    );
    assert_eq!(
        read(Some(1)).await,
        vec![r#"{"entity":{"reference":"Patient/b"}}"#]
    );
    let facts = events.array_facts("k1").await.unwrap();
    assert_eq!(
        (
            facts.counts.members,
            facts.counts.active_members,
            facts.absent
        ),
        (2, 1, false)
    );
    assert!(
        !facts.floor.is_empty(),
        "appends go after the upgraded keys"
    );
    assert_eq!(events.counts("k2").await.unwrap().members, 1);
    let upgraded: u64 = client
        .query(&format!(
            "SELECT count() FROM {db}.Group_4_0_0_MemberSlotEvents WHERE slot_id != ''"
        ))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(upgraded, 5, "each version 1 event once, not twice");
    let replay = events.find_commit("k1", "req").await.unwrap();
    assert!(
        replay.is_some(),
        "retries of upgraded writes are still recognised"
    );
}
