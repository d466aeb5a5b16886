//! Member events in ClickHouse: staging, publishing, and the point lookups a
//! member PATCH needs. Every value travels as RowBinary or as a bound literal
//! escaped by the crate; no SQL is built from request text.

use std::collections::HashMap;
use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use serde_repr::{Deserialize_repr, Serialize_repr};

use crate::config::ClickHouseSettings;
use crate::fhir::member_patch::MemberAttributes;
use crate::fhir::reference::{parse_reference, EntityReference};
use crate::store::group_commit::{BatchError, BatchSettings, GroupCommit};
use crate::store::schema::{self, COMMITS, COUNTS, CURRENT, EVENTS, EVENTS_STAGED, GROUPS};

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("ClickHouse batch write failed: {0}")]
    Batch(#[from] BatchError),
    #[error("ClickHouse schema: {0}")]
    ForeignSchema(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize_repr, Deserialize_repr)]
#[repr(i8)]
pub enum EventType {
    Added = 1,
    Removed = 2,
}

/// One row of `EventsStaged` / `Events` (same columns, same order as the DDL).
#[derive(Debug, Clone, PartialEq, Eq, Row, Serialize, Deserialize)]
pub struct MemberEventRow {
    pub group_key: String,
    pub group_id: String,
    pub group_version: u64,
    pub token: String,
    pub request_id: String,
    pub op_index: u32,
    pub sequence: u64,
    pub entity_reference: String,
    pub entity_type: String,
    pub event_type: EventType,
    pub period_start: String,
    pub period_end: String,
    pub inactive: u8,
    pub member_delta: i8,
    pub active_delta: i8,
    pub event_time_ms: u64,
}

/// `sequence` orders events of a group: by version, then by op within it.
pub fn event_sequence(group_version: u64, op_index: usize) -> u64 {
    (group_version << 20) | (op_index as u64 & (schema::MAX_OPS_PER_VERSION as u64 - 1))
}

#[derive(Debug, Row, Deserialize)]
struct CurrentStateRow {
    entity_reference: String,
    present: u8,
    inactive: u8,
    period_start: String,
    period_end: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Row, Deserialize)]
pub struct MemberCounts {
    pub members: i64,
    pub active_members: i64,
}

/// A committed write found by request id (for idempotent retries).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct CommitRecord {
    pub token: String,
    pub group_version: u64,
    pub events: u64,
    pub committed_at_ms: u64,
}

#[derive(Clone)]
pub struct EventStore {
    client: clickhouse::Client,
    staging: GroupCommit<MemberEventRow>,
    publishing: GroupCommit<String>,
}

impl EventStore {
    /// Connects and starts the two group-commit writers on the current runtime.
    pub fn start(settings: &ClickHouseSettings, batch: BatchSettings) -> Self {
        let client = crate::store::clickhouse::connect(settings);

        let staging_client = client.clone();
        let staging = GroupCommit::spawn("staging", batch, move |rows: Vec<MemberEventRow>| {
            let client = staging_client.clone();
            async move {
                insert_rows(&client, EVENTS_STAGED, rows)
                    .await
                    .map_err(|e| e.to_string())
            }
        });

        let publishing_client = client.clone();
        let publishing = GroupCommit::spawn("publishing", batch, move |tokens: Vec<String>| {
            let client = publishing_client.clone();
            async move {
                publish_tokens(&client, tokens)
                    .await
                    .map_err(|e| e.to_string())
            }
        });

        Self {
            client,
            staging,
            publishing,
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Durably records the events of a write that has not committed yet.
    pub async fn stage(&self, rows: Vec<MemberEventRow>) -> Result<(), EventStoreError> {
        Ok(self.staging.submit(rows).await?)
    }

    /// Makes the staged events of a committed write visible (copies them into
    /// `Events`, which feeds the membership views).
    pub async fn publish(&self, token: &str) -> Result<(), EventStoreError> {
        Ok(self.publishing.submit(vec![token.to_string()]).await?)
    }

    /// The current state of the named members of a group; absent members are
    /// left out. Cost follows the number of names, not the group size.
    pub async fn current_members(
        &self,
        group_key: &str,
        references: &[&EntityReference],
    ) -> Result<HashMap<EntityReference, MemberAttributes>, EventStoreError> {
        let names: Vec<&str> = references.iter().map(|r| r.as_str()).collect();
        let mut rows = Vec::new();
        // Bound values are sent inside the SQL text: chunks keep every query
        // well under ClickHouse's default max_query_size (256 KiB) whatever
        // the number and length of the references.
        for chunk in chunks_of_text(&names, MAX_BOUND_TEXT_BYTES) {
            rows.extend(
                self.client
                    .query(&format!(
                        "SELECT entity_reference, argMaxMerge(present) AS present, \
                                argMaxMerge(inactive) AS inactive, argMaxMerge(period_start) AS period_start, \
                                argMaxMerge(period_end) AS period_end \
                         FROM {CURRENT} \
                         WHERE group_key = ? AND entity_reference IN (SELECT arrayJoin(?)) \
                         GROUP BY entity_reference"
                    ))
                    .bind(group_key)
                    .bind(chunk)
                    .fetch_all::<CurrentStateRow>()
                    .await?,
            );
        }
        Ok(rows
            .into_iter()
            .filter(|row| row.present == 1)
            .filter_map(|row| {
                let reference = parse_reference(&row.entity_reference).ok()?;
                Some((
                    reference,
                    MemberAttributes {
                        period_start: non_empty(row.period_start),
                        period_end: non_empty(row.period_end),
                        inactive: row.inactive == 1,
                    },
                ))
            })
            .collect())
    }

    /// Every current member of a group with its attributes (for a whole-roster
    /// `PUT`, whose cost follows the roster size by nature).
    pub async fn current_roster(
        &self,
        group_key: &str,
    ) -> Result<HashMap<EntityReference, MemberAttributes>, EventStoreError> {
        let mut cursor = self.roster(group_key, None)?;
        let mut members = HashMap::new();
        while let Some(row) = cursor.next().await? {
            if let Ok(reference) = parse_reference(&row.entity_reference) {
                let attributes = row.attributes();
                members.insert(reference, attributes);
            }
        }
        Ok(members)
    }

    pub async fn counts(&self, group_key: &str) -> Result<MemberCounts, EventStoreError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT toInt64(sum(members)) AS members, toInt64(sum(active_members)) AS active_members \
                 FROM {COUNTS} WHERE group_key = ?"
            ))
            .bind(group_key)
            .fetch_one::<MemberCounts>()
            .await?)
    }

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
            .client
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
            .client
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
            .client
            .query(&format!(
                "SELECT count() AS events, max(sequence) AS last_sequence \
                 FROM {EVENTS} WHERE group_key = ?"
            ))
            .bind(group_key)
            .fetch_one::<SequenceRange>()
            .await?;
        Ok((found.events > 0).then_some(found.last_sequence))
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
        let found = self
            .client
            .query(&format!(
                "SELECT count() FROM {EVENTS} WHERE group_key = ? AND token = ?"
            ))
            .bind(group_key)
            .bind(token)
            .fetch_one::<u64>()
            .await?;
        Ok(found > 0)
    }

    /// Writes the commit records of a published write again when a crash cut
    /// its insert off before the commit view (retries are answered from them).
    pub async fn repair_commit_records(
        &self,
        group_key: &str,
        token: &str,
    ) -> Result<bool, EventStoreError> {
        let recorded = self
            .client
            .query(&format!(
                "SELECT count() FROM {COMMITS} WHERE group_key = ? AND token = ?"
            ))
            .bind(group_key)
            .bind(token)
            .fetch_one::<u64>()
            .await?;
        if recorded > 0 {
            return Ok(false);
        }
        self.client
            .query(&format!(
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

/// One current member, as a Group read lists it.
#[derive(Debug, Row, Deserialize)]
pub struct RosterRow {
    pub entity_reference: String,
    pub inactive: u8,
    pub period_start: String,
    pub period_end: String,
}

impl RosterRow {
    pub fn attributes(&self) -> MemberAttributes {
        attributes(self.inactive, &self.period_start, &self.period_end)
    }
}

/// One member of a `$members` page; `present == 0` marks a removed member
/// (only listed when asking for changes).
#[derive(Debug, Row, Deserialize)]
pub struct PageRow {
    pub entity_reference: String,
    pub present: u8,
    pub inactive: u8,
    pub period_start: String,
    pub period_end: String,
}

impl PageRow {
    pub fn attributes(&self) -> MemberAttributes {
        attributes(self.inactive, &self.period_start, &self.period_end)
    }
}

fn attributes(inactive: u8, period_start: &str, period_end: &str) -> MemberAttributes {
    MemberAttributes {
        period_start: non_empty(period_start.to_string()),
        period_end: non_empty(period_end.to_string()),
        inactive: inactive == 1,
    }
}

impl EventStore {
    /// Up to `limit` members with a reference after `after`, in reference
    /// order (seek pagination: stable under concurrent writes). Without
    /// `changed_since_ms`: the current members; with it: every member whose
    /// last event is newer, removed ones included (`present == 0`).
    pub async fn roster_page(
        &self,
        group_key: &str,
        after: &str,
        changed_since_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<PageRow>, EventStoreError> {
        let filter = match changed_since_ms {
            None => "present = 1",
            Some(_) => "last_event_time_ms > ?",
        };
        let mut query = self
            .client
            .query(&format!(
                "SELECT entity_reference, present, inactive, period_start, period_end FROM ( \
                   SELECT entity_reference, argMaxMerge(present) AS present, \
                          argMaxMerge(inactive) AS inactive, argMaxMerge(period_start) AS period_start, \
                          argMaxMerge(period_end) AS period_end, maxMerge(last_event_time_ms) AS last_event_time_ms \
                   FROM {CURRENT} WHERE group_key = ? AND entity_reference > ? GROUP BY entity_reference) \
                 WHERE {filter} ORDER BY entity_reference LIMIT ?"
            ))
            .bind(group_key)
            .bind(after);
        if let Some(since) = changed_since_ms {
            query = query.bind(since);
        }
        Ok(query.bind(limit as u64).fetch_all::<PageRow>().await?)
    }

    /// All current members of a group (or, with `at_version`, the members as
    /// of that version, rebuilt from the events), ordered by reference, as a stream.
    pub fn roster(
        &self,
        group_key: &str,
        at_version: Option<u64>,
    ) -> Result<clickhouse::query::RowCursor<RosterRow>, EventStoreError> {
        let query = match at_version {
            None => self
                .client
                .query(&format!(
                    "SELECT entity_reference, inactive, period_start, period_end FROM ( \
                       SELECT entity_reference, argMaxMerge(present) AS present, \
                              argMaxMerge(inactive) AS inactive, argMaxMerge(period_start) AS period_start, \
                              argMaxMerge(period_end) AS period_end \
                       FROM {CURRENT} WHERE group_key = ? GROUP BY entity_reference) \
                     WHERE present = 1 ORDER BY entity_reference"
                ))
                .bind(group_key),
            Some(version) => self
                .client
                .query(&format!(
                    "SELECT entity_reference, inactive, period_start, period_end FROM ( \
                       SELECT entity_reference, argMax(toUInt8(event_type = 'added'), sequence) AS present, \
                              argMax(inactive, sequence) AS inactive, argMax(period_start, sequence) AS period_start, \
                              argMax(period_end, sequence) AS period_end \
                       FROM {EVENTS} WHERE group_key = ? AND group_version <= ? GROUP BY entity_reference) \
                     WHERE present = 1 ORDER BY entity_reference"
                ))
                .bind(group_key)
                .bind(version),
        };
        Ok(query.fetch::<RosterRow>()?)
    }
}

fn non_empty(s: String) -> Option<String> {
    if s.is_empty() {
        None
    } else {
        Some(s)
    }
}

async fn insert_rows(
    client: &clickhouse::Client,
    table: &str,
    rows: Vec<MemberEventRow>,
) -> Result<(), clickhouse::error::Error> {
    let mut insert = client
        .insert::<MemberEventRow>(table)
        .await?
        .with_timeouts(Some(Duration::from_secs(30)), Some(Duration::from_secs(60)));
    for row in &rows {
        insert.write(row).await?;
    }
    insert.end().await
}

async fn publish_tokens(
    client: &clickhouse::Client,
    tokens: Vec<String>,
) -> Result<(), clickhouse::error::Error> {
    let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
    for chunk in chunks_of_text(&tokens, MAX_BOUND_TEXT_BYTES) {
        client
            .query(&format!(
                "INSERT INTO {EVENTS} SELECT * FROM {EVENTS_STAGED} \
                 WHERE token IN (SELECT arrayJoin(?))"
            ))
            .bind(chunk)
            .execute()
            .await?;
    }
    Ok(())
}

/// Runs the schema statements; used by `schema apply` and at proxy start.
pub async fn apply_schema(settings: &ClickHouseSettings) -> Result<(), EventStoreError> {
    let client = crate::store::clickhouse::connect_server(settings);
    check_existing_objects(&client, settings).await?;
    for statement in schema::statements_for(settings) {
        client.query(&statement).execute().await?;
    }
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
    if found.0.is_empty() && database != OLD_DEFAULT_DATABASE {
        let (earlier, _) = existing_objects(client, OLD_DEFAULT_DATABASE, &shape).await?;
        let ours = shape.tables.iter().find(|(t, _)| t == EVENTS);
        if ours.is_some_and(|(t, columns)| earlier.get(t) == Some(columns)) {
            return Err(EventStoreError::ForeignSchema(format!(
                "ClickHouse database {database} holds no member events, but \
                 {OLD_DEFAULT_DATABASE}.{EVENTS} holds those of an earlier release of this proxy \
                 (its default database was {OLD_DEFAULT_DATABASE}); set clickhouse.database = \
                 \"{OLD_DEFAULT_DATABASE}\" to keep using them"
            )));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_value_lists_are_cut_into_queries_of_bounded_text() {
        let names: Vec<String> = (0..10_000).map(|i| format!("Patient/{i:064}")).collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let chunks = chunks_of_text(&names, MAX_BOUND_TEXT_BYTES);
        assert!(chunks.len() > 1);
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), names.len());
        for chunk in &chunks {
            let text: usize = chunk.iter().map(|n| n.len() * 2 + 3).sum();
            assert!(text <= MAX_BOUND_TEXT_BYTES, "{text}");
        }
        assert!(chunks_of_text(&[], 10).is_empty());
        assert_eq!(
            chunks_of_text(&["a-long-one"], 5),
            vec![&["a-long-one"][..]]
        );
    }

    #[test]
    fn refused_queries_are_not_transient_and_outages_are() {
        use clickhouse::error::Error;
        let refused = EventStoreError::ClickHouse(Error::BadResponse(
            "Code: 62, e.displayText() = DB::Exception: Syntax error: failed at position 262122"
                .into(),
        ));
        assert!(!refused.is_transient());
        let overloaded = EventStoreError::ClickHouse(Error::BadResponse(
            "Code: 252, e.displayText() = DB::Exception: Too many parts".into(),
        ));
        assert!(overloaded.is_transient());
        assert!(EventStoreError::ClickHouse(Error::TimedOut).is_transient());
        assert!(!EventStoreError::ForeignSchema("x".into()).is_transient());
    }

    #[test]
    fn sequence_orders_by_version_then_op() {
        assert!(event_sequence(2, 0) > event_sequence(1, 10_000));
        assert!(event_sequence(1, 1) > event_sequence(1, 0));
        assert_eq!(event_sequence(3, 5) >> 20, 3);
    }
}

/// Most bytes of values one query carries in its text (quoting included).
const MAX_BOUND_TEXT_BYTES: usize = 96 * 1024;

/// `items` in runs whose quoted text stays within `max_bytes` (an item
/// longer than that goes alone).
fn chunks_of_text<'a>(items: &'a [&'a str], max_bytes: usize) -> Vec<&'a [&'a str]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        // Quotes, a comma, and room for escapes.
        let cost = item.len() * 2 + 3;
        if i > start && bytes + cost > max_bytes {
            chunks.push(&items[start..i]);
            start = i;
            bytes = 0;
        }
        bytes += cost;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

impl EventStoreError {
    /// Whether trying again later can succeed: the store was unreachable,
    /// slow or overloaded. A query it refused (syntax, size, schema) fails
    /// the same way every time.
    pub fn is_transient(&self) -> bool {
        use clickhouse::error::Error;
        match self {
            EventStoreError::ClickHouse(Error::Network(_) | Error::TimedOut) => true,
            EventStoreError::ClickHouse(Error::BadResponse(text)) => {
                // TIMEOUT_EXCEEDED, SOCKET_TIMEOUT, NETWORK_ERROR,
                // TOO_MANY_SIMULTANEOUS_QUERIES, MEMORY_LIMIT_EXCEEDED,
                // TOO_MANY_PARTS, TABLE_IS_READ_ONLY, ALL_CONNECTION_TRIES_FAILED.
                const TRANSIENT: [u32; 9] = [159, 209, 210, 202, 241, 252, 242, 279, 425];
                server_error_code(text).is_none_or(|code| TRANSIENT.contains(&code))
            }
            EventStoreError::ClickHouse(_) => false,
            EventStoreError::Batch(_) => true,
            EventStoreError::ForeignSchema(_) => false,
        }
    }
}

/// `Code: 62` in a ClickHouse error text.
fn server_error_code(text: &str) -> Option<u32> {
    let after = text.split("Code: ").nth(1)?;
    after
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// A migrated Group that holds a member (reverse index).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct GroupWithMember {
    pub group_key: String,
    pub group_id: String,
}

#[derive(Debug, Row, Deserialize)]
struct GroupCounts {
    group_key: String,
    members: i64,
    active_members: i64,
}

impl EventStore {
    /// The Groups whose current members include any of `references`, at most
    /// `limit` of them, ordered by id.
    pub async fn groups_with_members(
        &self,
        references: &[&str],
        limit: usize,
    ) -> Result<Vec<GroupWithMember>, EventStoreError> {
        Ok(self
            .client
            .query(&format!(
                "SELECT group_key, any(group_id) AS group_id FROM ( \
                   SELECT entity_reference, group_key, argMaxMerge(group_id) AS group_id, \
                          argMaxMerge(present) AS present \
                   FROM {GROUPS} WHERE entity_reference IN (SELECT arrayJoin(?)) \
                   GROUP BY entity_reference, group_key) \
                 WHERE present = 1 GROUP BY group_key ORDER BY group_id LIMIT ?"
            ))
            .bind(references)
            .bind(limit as u64)
            .fetch_all::<GroupWithMember>()
            .await?)
    }

    /// Member counts of several groups, by group key.
    pub async fn counts_of(
        &self,
        group_keys: &[&str],
    ) -> Result<HashMap<String, MemberCounts>, EventStoreError> {
        let rows = self
            .client
            .query(&format!(
                "SELECT group_key, toInt64(sum(members)) AS members, \
                        toInt64(sum(active_members)) AS active_members \
                 FROM {COUNTS} WHERE group_key IN (SELECT arrayJoin(?)) GROUP BY group_key"
            ))
            .bind(group_keys)
            .fetch_all::<GroupCounts>()
            .await?;
        Ok(rows
            .into_iter()
            .map(|r| {
                (
                    r.group_key,
                    MemberCounts {
                        members: r.members,
                        active_members: r.active_members,
                    },
                )
            })
            .collect())
    }
}
