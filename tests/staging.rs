//! The staging table loses the old months no unfinished write needs, on the
//! real ClickHouse and MongoDB-compatible server.

mod support;

use chrono::{Datelike, TimeZone};
use fhir_group_proxy::config::{Config, MongoSettings};
use fhir_group_proxy::group::{GroupService, LeaseHolder};
use fhir_group_proxy::store::events::{EventType, MemberEventRow};
use fhir_group_proxy::store::group_documents::MEMBER_STATE_COLLECTION;
use fhir_group_proxy::store::member_locks::MEMBER_LOCK_COLLECTION;
use fhir_group_proxy::store::schema::EVENTS_STAGED;
use mongodb::bson::{doc, DateTime, Document};

/// Noon on the 15th of the month `back` months before this one, in ms: well
/// inside that month whatever ClickHouse's time zone.
fn months_ago(back: i32) -> (u64, u32) {
    let now = chrono::Utc::now();
    let index = now.year() * 12 + now.month0() as i32 - back;
    let (year, month) = (index.div_euclid(12), index.rem_euclid(12) as u32 + 1);
    let noon = chrono::Utc
        .with_ymd_and_hms(year, month, 15, 12, 0, 0)
        .single()
        .expect("a real date");
    (noon.timestamp_millis() as u64, year as u32 * 100 + month)
}

fn staged(token: &str, event_time_ms: u64) -> MemberEventRow {
    MemberEventRow {
        group_key: format!("group-of-{token}"),
        group_id: format!("group-of-{token}"),
        group_version: 2,
        token: token.to_string(),
        request_id: format!("request-of-{token}"),
        op_index: 0,
        sequence: 2 << 20,
        slot_id: "s1".into(),
        order_key: "a".into(),
        match_key: "Patient/p".into(),
        event_type: EventType::Added,
        element: r#"{"entity":{"reference":"Patient/p"}}"#.into(),
        inactive: 0,
        member_delta: 1,
        active_delta: 1,
        event_time_ms,
    }
}

/// The writes with events in the staging table.
async fn staged_tokens(client: &clickhouse::Client) -> Vec<String> {
    client
        .query(&format!(
            "SELECT DISTINCT token FROM {EVENTS_STAGED} ORDER BY token"
        ))
        .fetch_all()
        .await
        .expect("staging table reads")
}

#[tokio::test]
async fn old_months_of_staged_events_are_dropped_unless_an_unfinished_write_needs_them() {
    let clickhouse = support::fresh_member_database("fgp_staging").await;
    let mongo = MongoSettings {
        uri: support::mongo_uri(),
        database: support::unique_name("fgp_staging"),
        ..MongoSettings::default()
    };
    let config = Config {
        clickhouse: clickhouse.clone(),
        mongo: mongo.clone(),
        ..Config::default()
    };
    let (now, _) = months_ago(0);
    let (last_month, _) = months_ago(1);
    let (published, published_month) = months_ago(4);
    let (locked, locked_month) = months_ago(5);
    let (pending, pending_month) = months_ago(6);
    let client = fhir_group_proxy::store::clickhouse::connect(&clickhouse);
    let mut insert = client
        .insert::<MemberEventRow>(EVENTS_STAGED)
        .await
        .expect("insert starts");
    for row in [
        staged("recent", now),
        staged("last-month", last_month),
        staged("published", published),
        staged("locked", locked),
        staged("pending", pending),
    ] {
        insert.write(&row).await.expect("row written");
    }
    insert.end().await.expect("rows staged");

    // A write whose lock expired unfinished, and one an earlier release left
    // pending in its Group's member state: both may still need their events.
    let database = mongodb::Client::with_uri_str(&mongo.uri)
        .await
        .expect("mongo client")
        .database(&mongo.database);
    database
        .collection::<Document>(MEMBER_LOCK_COLLECTION)
        .insert_one(doc! {
            "_id": "group-of-locked", "token": "locked", "url": "4_0_0/Group/group-of-locked",
            "expiresAt": DateTime::from_millis(0), "takenAt": DateTime::from_millis(locked as i64),
        })
        .await
        .expect("lock written");
    database
        .collection::<Document>(MEMBER_STATE_COLLECTION)
        .insert_one(doc! {
            "_id": "group-of-pending", "storage": "clickhouse",
            "pending": { "token": "pending", "version": 2_i64, "url": "4_0_0/Group/group-of-pending" },
        })
        .await
        .expect("member state written");

    let service = GroupService::connect(&config, LeaseHolder::here("test", "staging"))
        .await
        .expect("stores connect");
    assert!(
        service
            .sweep_staged_months(0)
            .await
            .expect("sweep")
            .is_empty(),
        "0 keeps every month"
    );
    let dropped = service.sweep_staged_months(2).await.expect("sweep");
    assert_eq!(dropped, vec![published_month]);

    assert_eq!(
        staged_tokens(&client).await,
        ["last-month", "locked", "pending", "recent"]
    );
    assert!(locked_month < published_month && pending_month < locked_month);

    // Once the writes are finished, their months go too.
    database
        .collection::<Document>(MEMBER_LOCK_COLLECTION)
        .delete_many(doc! {})
        .await
        .expect("lock released");
    database
        .collection::<Document>(MEMBER_STATE_COLLECTION)
        .update_one(
            doc! { "_id": "group-of-pending" },
            doc! { "$unset": { "pending": "" } },
        )
        .await
        .expect("pending record cleared");
    let dropped = service.sweep_staged_months(2).await.expect("sweep");
    assert_eq!(dropped, vec![pending_month, locked_month]);
    assert_eq!(staged_tokens(&client).await, ["last-month", "recent"]);

    fhir_group_proxy::store::clickhouse::connect_server(&clickhouse)
        .query(&format!("DROP DATABASE {}", clickhouse.database))
        .execute()
        .await
        .expect("drop ClickHouse database");
    database.drop().await.expect("drop MongoDB database");
}
