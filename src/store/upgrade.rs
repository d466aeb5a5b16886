//! Upgrades member events written by schema version 1 (members as a set
//! keyed by reference, tables `Group_4_0_0_Member*`) to version 2 (slots,
//! see [`crate::store::schema`]). Run by `schema-apply` and at start, after
//! the version 2 tables exist.
//!
//! Each version 1 event becomes a version 2 event of the slot `v1:{ref}`,
//! with its version, token, request id and sequence kept, so history reads,
//! idempotent retries and recovery see the same writes. Version 1 kept no
//! array order and answered reads in reference order, so that is the order
//! the slots get: clients see no change at the upgrade. Every upgraded Group
//! gets the `member` array marker (version 1 let any Group be appended to).
//!
//! The upgrade writes one insert per Group and then the `Schema` row that
//! says it is done; a run stopped in between is found by the upgrade token
//! on the next start and refused with the remedy named, never mixed.
//! Version 1 tables are left in place; an operator drops them.

use std::collections::HashMap;

use clickhouse::Row;
use serde::Deserialize;
use serde_json::{json, Map, Value};

use crate::fhir::member_array::order_key;
use crate::store::events::{EventStoreError, EventType, MemberEventRow};
use crate::store::schema::{self, v1};

/// The token of the marker rows the upgrade writes (its own events keep
/// the tokens of the writes they come from).
const UPGRADE_TOKEN: &str = "schema-upgrade-v1";

/// One row of version 1's events table (the columns the upgrade reads).
#[derive(Debug, Row, Deserialize)]
pub struct V1Event {
    pub group_key: String,
    pub group_id: String,
    pub group_version: u64,
    pub token: String,
    pub request_id: String,
    pub op_index: u32,
    pub sequence: u64,
    pub entity_reference: String,
    pub event_type: EventType,
    pub period_start: String,
    pub period_end: String,
    pub inactive: u8,
    pub member_delta: i8,
    pub active_delta: i8,
    pub event_time_ms: u64,
}

/// The element version 1 answered reads with for a member.
pub fn v1_element(reference: &str, period_start: &str, period_end: &str, inactive: bool) -> Value {
    let mut element = Map::new();
    element.insert("entity".into(), json!({ "reference": reference }));
    if !period_start.is_empty() || !period_end.is_empty() {
        let mut period = Map::new();
        if !period_start.is_empty() {
            period.insert("start".into(), json!(period_start));
        }
        if !period_end.is_empty() {
            period.insert("end".into(), json!(period_end));
        }
        element.insert("period".into(), Value::Object(period));
    }
    if inactive {
        element.insert("inactive".into(), json!(true));
    }
    Value::Object(element)
}

/// The version 2 rows of one Group's version 1 events (in sequence order).
pub fn upgraded_rows(events: &[V1Event]) -> Result<Vec<MemberEventRow>, EventStoreError> {
    let mut references: Vec<&str> = events.iter().map(|e| e.entity_reference.as_str()).collect();
    references.sort_unstable();
    references.dedup();
    let mut keys = HashMap::with_capacity(references.len());
    let mut key = String::new();
    for reference in references {
        key = order_key::after(&key)
            .map_err(|e| EventStoreError::ForeignSchema(format!("upgrade: {e}")))?;
        keys.insert(reference, key.clone());
    }
    let mut rows = Vec::with_capacity(events.len() + 1);
    if let Some(first) = events.first() {
        rows.push(MemberEventRow {
            group_key: first.group_key.to_string(),
            group_id: first.group_id.to_string(),
            group_version: first.group_version,
            token: UPGRADE_TOKEN.to_string(),
            request_id: UPGRADE_TOKEN.to_string(),
            op_index: first.op_index,
            sequence: first.sequence,
            slot_id: String::new(),
            order_key: String::new(),
            match_key: String::new(),
            event_type: EventType::Added,
            element: String::new(),
            inactive: 0,
            member_delta: 0,
            active_delta: 0,
            event_time_ms: first.event_time_ms,
        });
    }
    for event in events {
        let element = v1_element(
            &event.entity_reference,
            &event.period_start,
            &event.period_end,
            event.inactive == 1,
        );
        rows.push(MemberEventRow {
            group_key: event.group_key.to_string(),
            group_id: event.group_id.to_string(),
            group_version: event.group_version,
            token: event.token.to_string(),
            request_id: event.request_id.to_string(),
            op_index: event.op_index,
            sequence: event.sequence,
            slot_id: format!("v1:{}", event.entity_reference),
            order_key: keys
                .get(event.entity_reference.as_str())
                .cloned()
                .unwrap_or_default(),
            match_key: event.entity_reference.to_string(),
            event_type: event.event_type,
            element: element.to_string(),
            inactive: event.inactive,
            member_delta: event.member_delta,
            active_delta: event.active_delta,
            event_time_ms: event.event_time_ms,
        });
    }
    Ok(rows)
}

/// Whether `database` holds this proxy's version 1 events table (the
/// reference server's own ClickHouse mode has a table of the same name with
/// other columns: that one is not ours to read).
pub async fn holds_v1_events(
    client: &clickhouse::Client,
    database: &str,
) -> Result<bool, EventStoreError> {
    let ours: u64 = client
        .query(
            "SELECT count() FROM system.columns WHERE database = ? AND table = ? \
             AND name IN ('entity_reference', 'period_start', 'member_delta', 'sequence')",
        )
        .bind(database)
        .bind(v1::EVENTS)
        .fetch_one()
        .await?;
    Ok(ours == 4)
}

/// Upgrades `database`'s version 1 events, once; the number of Groups
/// upgraded (0 when there was nothing to do).
pub async fn upgrade_v1(
    client: &clickhouse::Client,
    database: &str,
) -> Result<u64, EventStoreError> {
    let db = database;
    if !holds_v1_events(client, db).await? {
        return Ok(0);
    }
    let done: u64 = client
        .query(&format!(
            "SELECT count() FROM {db}.{} WHERE version = ?",
            schema::SCHEMA
        ))
        .bind(schema::SCHEMA_VERSION)
        .fetch_one()
        .await?;
    if done > 0 {
        return Ok(0);
    }
    let started: u64 = client
        .query(&format!(
            "SELECT count() FROM {db}.{} WHERE token = ?",
            schema::EVENTS
        ))
        .bind(UPGRADE_TOKEN)
        .fetch_one()
        .await?;
    if started > 0 {
        return Err(EventStoreError::ForeignSchema(format!(
            "an upgrade of {db}'s member events from schema version 1 stopped half way; \
             drop the version 2 tables ({db}.{}*) and start again: the version 1 tables \
             are untouched",
            "Group_4_0_0_MemberSlot"
        )));
    }
    let groups: Vec<String> = client
        .query(&format!(
            "SELECT DISTINCT group_key FROM {db}.{} ORDER BY group_key",
            v1::EVENTS
        ))
        .fetch_all()
        .await?;
    for group_key in &groups {
        let events: Vec<V1Event> = client
            .query(&format!(
                "SELECT group_key, group_id, group_version, token, request_id, op_index, sequence, \
                        entity_reference, event_type, period_start, period_end, inactive, \
                        member_delta, active_delta, event_time_ms \
                 FROM {db}.{} WHERE group_key = ? ORDER BY sequence",
                v1::EVENTS
            ))
            .bind(group_key)
            .fetch_all()
            .await?;
        let rows = upgraded_rows(&events)?;
        let mut insert = client
            .clone()
            .with_database(db)
            .insert::<MemberEventRow>(schema::EVENTS)
            .await?;
        for row in &rows {
            insert.write(row).await?;
        }
        insert.end().await?;
    }
    client
        .query(&format!(
            "INSERT INTO {db}.{} (version, applied_at_ms, note) VALUES (?, ?, ?)",
            schema::SCHEMA
        ))
        .bind(schema::SCHEMA_VERSION)
        .bind(chrono::Utc::now().timestamp_millis().max(0) as u64)
        .bind(format!("upgraded from version 1: {} Groups", groups.len()))
        .execute()
        .await?;
    tracing::warn!(
        database = db,
        groups = groups.len(),
        "member events upgraded from schema version 1; its tables can be dropped"
    );
    Ok(groups.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(reference: &str, sequence: u64, kind: EventType) -> V1Event {
        V1Event {
            group_key: "k".into(),
            group_id: "g".into(),
            group_version: sequence >> 20,
            token: "t".into(),
            request_id: "r".into(),
            op_index: 0,
            sequence,
            entity_reference: reference.into(),
            event_type: kind,
            period_start: String::new(),
            period_end: "2026-12-31".into(),
            inactive: 0,
            member_delta: 1,
            active_delta: 1,
            event_time_ms: 5,
        }
    }

    #[test]
    fn version_one_events_become_slots_in_reference_order_with_the_array_marker() {
        let events = [
            event("Patient/b", 1 << 20, EventType::Added),
            event("Patient/a", 2 << 20, EventType::Added),
            event("Patient/b", 3 << 20, EventType::Removed),
        ];
        let rows = upgraded_rows(&events).unwrap();
        assert_eq!(rows.len(), 4);
        assert_eq!(
            (rows[0].slot_id.as_str(), rows[0].event_type),
            ("", EventType::Added)
        );
        let key = |slot: &str| {
            rows.iter()
                .find(|r| r.slot_id == slot)
                .unwrap()
                .order_key
                .clone()
        };
        assert!(key("v1:Patient/a") < key("v1:Patient/b"));
        assert_eq!(rows[3].slot_id, "v1:Patient/b");
        assert_eq!(rows[3].sequence, 3 << 20);
        assert_eq!(
            rows[1].element,
            r#"{"entity":{"reference":"Patient/b"},"period":{"end":"2026-12-31"}}"#
        );
    }
}
