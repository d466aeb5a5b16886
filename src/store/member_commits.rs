//! What recovery and retries read of committed writes in ClickHouse:
//! commit records by request id (`Commits`), whether a write's events are
//! published, the request ids its staged events carry, and the repair of
//! views an insert cut off left behind.

use clickhouse::Row;
use serde::Deserialize;

use crate::store::events::{EventStore, EventStoreError};
use crate::store::schema::{COMMITS, COUNTS, CURRENT, EVENTS, EVENTS_STAGED, INDEX};

/// A committed write found by request id (for idempotent retries).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct CommitRecord {
    pub token: String,
    pub group_version: u64,
    pub events: u64,
    pub committed_at_ms: u64,
}

impl EventStore {
    /// The request id of each version a staged write carries.
    pub async fn staged_request_ids(
        &self,
        token: &str,
    ) -> Result<std::collections::HashMap<u64, String>, EventStoreError> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct VersionRequest {
            group_version: u64,
            request_id: String,
        }
        let rows = self
            .query(&format!(
                "SELECT group_version, any(request_id) AS request_id FROM {EVENTS_STAGED} \
                 WHERE token = ? GROUP BY group_version"
            ))
            .bind(token)
            .fetch_all::<VersionRequest>()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| (r.group_version, r.request_id))
            .collect())
    }

    /// The committed write of `request_id` on this group, if any.
    pub async fn find_commit(
        &self,
        group_key: &str,
        request_id: &str,
    ) -> Result<Option<CommitRecord>, EventStoreError> {
        Ok(self
            .query(&format!(
                "SELECT token, max(group_version) AS group_version, sum(events) AS events, \
                        max(committed_at_ms) AS committed_at_ms \
                 FROM {COMMITS} WHERE group_key = ? AND request_id = ? GROUP BY token \
                 ORDER BY group_version DESC LIMIT 1"
            ))
            .bind(group_key)
            .bind(request_id)
            .fetch_optional::<CommitRecord>()
            .await?)
    }

    /// The highest `sequence` among the group's published events; `None`
    /// when it has none.
    pub async fn last_sequence(&self, group_key: &str) -> Result<Option<u64>, EventStoreError> {
        let found = self
            .query(&format!(
                "SELECT count() AS events, max(sequence) AS last_sequence \
                 FROM {EVENTS} WHERE group_key = ?"
            ))
            .bind(group_key)
            .fetch_one::<SequenceRange>()
            .await?;
        Ok((found.events > 0).then_some(found.last_sequence))
    }

    /// Rows of `table` the write `token` of Group `group_key` made.
    async fn rows_of_write(
        &self,
        table: &str,
        group_key: &str,
        token: &str,
    ) -> Result<u64, EventStoreError> {
        Ok(self
            .query(&format!(
                "SELECT count() FROM {table} WHERE group_key = ? AND token = ?"
            ))
            .bind(group_key)
            .bind(token)
            .fetch_one::<u64>()
            .await?)
    }

    /// Whether the write with `token` has already been published.
    pub async fn is_published(
        &self,
        group_key: &str,
        token: &str,
    ) -> Result<bool, EventStoreError> {
        // The events table is the truth: ClickHouse feeds the views in the
        // same insert but not atomically with it, so a crash can leave a
        // published write without its commit record.
        Ok(self.rows_of_write(EVENTS, group_key, token).await? > 0)
    }

    /// Feeds the views again from the events of a published write whose
    /// insert was cut off (a kill can leave `Events` written and some views
    /// not). Slots, index and floor are `argMax`/`max` states: feeding them
    /// twice changes nothing. The counts are sums, so they are reconciled
    /// instead: compared with the slots (a scan of the Group, only on this
    /// rare path) and corrected by the difference. Runs under the Group's
    /// write lock, so no other write moves the counts meanwhile. Returns
    /// whether the counts needed a correction.
    pub async fn repair_views(
        &self,
        group_key: &str,
        token: &str,
    ) -> Result<bool, EventStoreError> {
        self.query(&format!(
            "INSERT INTO {CURRENT} SELECT group_key, slot_id, \
                        argMaxState(group_id, sequence), \
                        argMaxState(toUInt8(event_type = 'added'), sequence), \
                        argMaxState(order_key, sequence), argMaxState(match_key, sequence), \
                        argMaxState(element, sequence), argMaxState(inactive, sequence), \
                        maxState(sequence), maxState(event_time_ms) \
                 FROM {EVENTS} WHERE group_key = ? AND token = ? GROUP BY group_key, slot_id"
        ))
        .bind(group_key)
        .bind(token)
        .execute()
        .await?;
        self.query(&format!(
            "INSERT INTO {INDEX} SELECT match_key, group_key, slot_id, \
                        argMaxState(group_id, sequence) \
                 FROM {EVENTS} WHERE group_key = ? AND token = ? AND match_key != '' \
                   AND event_type = 'added' GROUP BY match_key, group_key, slot_id"
        ))
        .bind(group_key)
        .bind(token)
        .execute()
        .await?;
        self.query(&format!(
            "INSERT INTO {COUNTS} SELECT group_key, sumState(toInt64(0)), \
                        sumState(toInt64(0)), maxState(order_key) \
                 FROM {EVENTS} WHERE group_key = ? AND token = ? GROUP BY group_key"
        ))
        .bind(group_key)
        .bind(token)
        .execute()
        .await?;
        #[derive(Row, Deserialize)]
        struct Held {
            members: u64,
            active_members: u64,
        }
        let held = self
            .query(&format!(
                "SELECT count() AS members, countIf(inactive = 0) AS active_members FROM ( \
                   SELECT argMaxMerge(present) AS present, argMaxMerge(inactive) AS inactive \
                   FROM {CURRENT} WHERE group_key = ? AND slot_id != '' GROUP BY slot_id) \
                 WHERE present = 1"
            ))
            .bind(group_key)
            .fetch_one::<Held>()
            .await?;
        let counted = self.counts(group_key).await?;
        let members = held.members as i64 - counted.members;
        let active = held.active_members as i64 - counted.active_members;
        if members == 0 && active == 0 {
            return Ok(false);
        }
        self.query(&format!(
            "INSERT INTO {COUNTS} SELECT ? AS group_key, sumState(toInt64(?)), \
                        sumState(toInt64(?)), maxState('')"
        ))
        .bind(group_key)
        .bind(members)
        .bind(active)
        .execute()
        .await?;
        Ok(true)
    }

    /// Writes the commit records of a published write again when a crash cut
    /// its insert off before the commit view (retries are answered from them).
    pub async fn repair_commit_records(
        &self,
        group_key: &str,
        token: &str,
    ) -> Result<bool, EventStoreError> {
        if self.rows_of_write(COMMITS, group_key, token).await? > 0 {
            return Ok(false);
        }
        self.query(&format!(
            "INSERT INTO {COMMITS} SELECT group_key, request_id, token, max(group_version), \
                        count(), max(event_time_ms) FROM {EVENTS} \
                 WHERE group_key = ? AND token = ? GROUP BY group_key, request_id, token"
        ))
        .bind(group_key)
        .bind(token)
        .execute()
        .await?;
        Ok(true)
    }
}

#[derive(Debug, Row, Deserialize)]
struct SequenceRange {
    events: u64,
    last_sequence: u64,
}
