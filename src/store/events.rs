//! Member events in ClickHouse (schema version 2, see [`schema`]): the event
//! rows, staging and publishing them. What reads them back lives by table:
//! the member array in `member_slots`, commit records and recovery lookups
//! in `member_commits`. Every value travels as RowBinary or
//! as a bound literal escaped by the crate; no SQL is built from request text.

use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use serde_repr::{Deserialize_repr, Serialize_repr};

use crate::config::ClickHouseSettings;
use crate::store::insert_batcher::{Announced, BatchError, BatchSettings, InsertBatcher};
use crate::store::schema::{self, EVENTS, EVENTS_STAGED};

#[derive(Debug, thiserror::Error)]
pub enum EventStoreError {
    #[error("ClickHouse: {0}")]
    ClickHouse(#[from] clickhouse::error::Error),
    #[error("ClickHouse batch write failed: {0}")]
    Batch(#[from] BatchError),
    #[error("ClickHouse schema: {0}")]
    ForeignSchema(String),
    /// A stored element is not JSON: the store was written by something else.
    #[error("ClickHouse member store holds a damaged element in slot {slot}: {reason}")]
    Damaged { slot: String, reason: String },
}

/// `added` puts a slot (new, moved or changed); `removed` ends it. On the
/// array marker row (empty `slot_id`) they say the `member` key appeared or
/// went away.
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
    pub slot_id: String,
    pub order_key: String,
    pub match_key: String,
    pub event_type: EventType,
    /// The element JSON; on a removal the element it had, so a change feed
    /// can say what left.
    pub element: String,
    pub inactive: u8,
    pub member_delta: i8,
    pub active_delta: i8,
    pub event_time_ms: u64,
}

/// `sequence` orders events of a group: by version, then by event within it.
pub fn event_sequence(group_version: u64, op_index: usize) -> u64 {
    (group_version << 20) | (op_index as u64 & (schema::MAX_OPS_PER_VERSION as u64 - 1))
}

#[derive(Clone)]
pub struct EventStore {
    client: clickhouse::Client,
    /// Where the tables live (database, cluster), for DDL.
    settings: ClickHouseSettings,
    staging: InsertBatcher<MemberEventRow>,
    publishing: InsertBatcher<MemberEventRow>,
    publishing_staged: InsertBatcher<String>,
}

impl EventStore {
    /// Connects and starts the two group-commit writers on the current runtime.
    pub fn start(settings: &ClickHouseSettings, batch: BatchSettings) -> Self {
        let client = crate::store::clickhouse::connect(settings);

        let staging = rows_batcher("staging", EVENTS_STAGED, &client, batch);
        let publishing = rows_batcher("publishing", EVENTS, &client, batch);

        let staged_client = client.clone();
        let publishing_staged =
            InsertBatcher::spawn("publishing_staged", batch, move |tokens: Vec<String>| {
                let client = staged_client.clone();
                async move {
                    publish_tokens(&client, tokens)
                        .await
                        .map_err(|e| e.to_string())
                }
            });

        Self {
            client,
            settings: settings.clone(),
            staging,
            publishing,
            publishing_staged,
        }
    }

    /// Whether ClickHouse answers (readiness).
    pub async fn ping(&self) -> Result<(), EventStoreError> {
        self.client.query("SELECT 1").fetch_one::<u8>().await?;
        Ok(())
    }

    /// Every statement the store sends goes through here, so that the
    /// statements per request can be counted (`fgp_clickhouse_statements_total`).
    pub(super) fn query(&self, sql: &str) -> clickhouse::query::Query {
        crate::operations::metrics::metrics().clickhouse_statement("query");
        self.client.query(sql)
    }

    /// The months (`YYYYMM`) of staged events before the `kept` most recent
    /// months (the current one included), as ClickHouse's clock and time
    /// zone date them, which also dated the events.
    pub async fn staged_months_before(&self, kept: u32) -> Result<Vec<u32>, EventStoreError> {
        Ok(self
            .query(&format!(
                "SELECT DISTINCT toYYYYMM(event_date) AS month FROM {EVENTS_STAGED} \
                 WHERE event_date < addMonths(toStartOfMonth(today()), ?) ORDER BY month"
            ))
            .bind(1 - i64::from(kept))
            .fetch_all::<u32>()
            .await?)
    }

    /// Which of `months` hold staged events of any of the writes `tokens`.
    pub async fn months_staging(
        &self,
        months: &[u32],
        tokens: &[String],
    ) -> Result<std::collections::BTreeSet<u32>, EventStoreError> {
        let tokens: Vec<&str> = tokens.iter().map(String::as_str).collect();
        let mut held = std::collections::BTreeSet::new();
        if months.is_empty() {
            return Ok(held);
        }
        for chunk in chunks_of_text(&tokens, MAX_BOUND_TEXT_BYTES) {
            let found = self
                .query(&format!(
                    "SELECT DISTINCT toYYYYMM(event_date) AS month FROM {EVENTS_STAGED} \
                     WHERE toYYYYMM(event_date) IN (SELECT arrayJoin(?)) \
                       AND token IN (SELECT arrayJoin(?))"
                ))
                .bind(months)
                .bind(chunk)
                .fetch_all::<u32>()
                .await?;
            held.extend(found);
        }
        Ok(held)
    }

    /// Drops the staged events of `month` (its whole partition: cheap, no
    /// mutation), on every shard in a cluster.
    pub async fn drop_staged_month(&self, month: u32) -> Result<(), EventStoreError> {
        let statement = schema::drop_staged_month(
            &self.settings.database,
            schema::Topology::of(&self.settings),
            month,
        );
        self.query(&statement).execute().await?;
        Ok(())
    }

    /// Durably records the events of a write that has not committed yet.
    pub async fn stage(&self, rows: Vec<MemberEventRow>) -> Result<(), EventStoreError> {
        Ok(self.staging.submit(rows).await?)
    }

    /// Says a member write will stage events soon (see
    /// [`InsertBatcher::announce`]): concurrent writes share the insert.
    pub fn announce_staging(&self) -> Announced {
        self.staging.announce()
    }

    /// [`EventStore::stage`] of an announced write, which announces its
    /// publication (from memory, [`EventStore::publish_rows`]) in turn.
    pub async fn stage_announced(
        &self,
        announced: Announced,
        rows: Vec<MemberEventRow>,
    ) -> Result<Announced, EventStoreError> {
        self.staging.submit_announced(announced, rows).await?;
        Ok(self.publishing.announce())
    }

    /// Makes the staged events of a committed write visible (copies them into
    /// `Events`, which feeds the membership views).
    pub async fn publish(&self, token: &str) -> Result<(), EventStoreError> {
        Ok(self
            .publishing_staged
            .submit(vec![token.to_string()])
            .await?)
    }

    /// [`EventStore::publish`] of a write whose staged rows the caller still
    /// holds: the same rows go to `Events` from memory, so the publication
    /// does not read the staging table back (on 18.16 that read costs a
    /// granule per part of it: thousands of rows per publication).
    pub async fn publish_rows(
        &self,
        rows: Vec<MemberEventRow>,
        announced: Announced,
    ) -> Result<(), EventStoreError> {
        Ok(self.publishing.submit_announced(announced, rows).await?)
    }
}

/// An [`InsertBatcher`] writing member event rows into `table`.
fn rows_batcher(
    writer: &'static str,
    table: &'static str,
    client: &clickhouse::Client,
    batch: BatchSettings,
) -> InsertBatcher<MemberEventRow> {
    let client = client.clone();
    InsertBatcher::spawn(writer, batch, move |rows: Vec<MemberEventRow>| {
        let client = client.clone();
        async move {
            insert_rows(&client, table, rows)
                .await
                .map_err(|e| e.to_string())
        }
    })
}

async fn insert_rows(
    client: &clickhouse::Client,
    table: &str,
    rows: Vec<MemberEventRow>,
) -> Result<(), clickhouse::error::Error> {
    crate::operations::metrics::metrics().clickhouse_statement("insert");
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
        crate::operations::metrics::metrics().clickhouse_statement("insert");
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

/// Most bytes of values one query carries in its text (quoting included).
pub(super) const MAX_BOUND_TEXT_BYTES: usize = 96 * 1024;

/// `items` in runs whose quoted text stays within `max_bytes` (an item
/// longer than that goes alone).
pub(super) fn chunks_of_text<'a>(items: &'a [&'a str], max_bytes: usize) -> Vec<&'a [&'a str]> {
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
            EventStoreError::ForeignSchema(_) | EventStoreError::Damaged { .. } => false,
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
