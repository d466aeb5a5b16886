//! Member events in ClickHouse (schema version 2, see [`schema`]): staging,
//! publishing, and the lookups that plan a member patch. Every value travels
//! as RowBinary or as a bound literal escaped by the crate; no SQL is built
//! from request text.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use serde_repr::{Deserialize_repr, Serialize_repr};

use crate::config::ClickHouseSettings;
use crate::fhir::member_array::Slot;
use crate::store::insert_batcher::{Announced, BatchError, BatchSettings, InsertBatcher};
use crate::store::schema::{self, COMMITS, COUNTS, CURRENT, EVENTS, EVENTS_STAGED, INDEX};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemberCounts {
    pub members: i64,
    pub active_members: i64,
}

/// What every member patch needs before it looks at any element.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ArrayFacts {
    pub counts: MemberCounts,
    /// The largest order key ever assigned in the group (`""`: none).
    pub floor: String,
    /// The document has no `member` key (rather than an empty array).
    pub absent: bool,
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
            staging,
            publishing,
            publishing_staged,
        }
    }

    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// Every statement the store sends goes through here, so that the
    /// statements per request can be counted (`fgp_clickhouse_statements_total`).
    fn query(&self, sql: &str) -> clickhouse::query::Query {
        crate::operations::metrics::metrics().clickhouse_statement("query");
        self.client.query(sql)
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

    /// Member counts, append floor and whether the `member` key exists:
    /// one point lookup, whatever the group's size.
    pub async fn array_facts(&self, group_key: &str) -> Result<ArrayFacts, EventStoreError> {
        #[derive(Row, Deserialize)]
        struct Facts {
            members: i64,
            active_members: i64,
            floor: String,
            marker: u8,
        }
        let facts = self
            .query(&format!(
                "SELECT toInt64(sumMerge(members)) AS members, \
                        toInt64(sumMerge(active_members)) AS active_members, \
                        maxMerge(floor) AS floor, \
                        (SELECT argMaxMerge(present) FROM {CURRENT} \
                         WHERE group_key = ? AND slot_id = '') AS marker \
                 FROM {COUNTS} WHERE group_key = ?"
            ))
            .bind(group_key)
            .bind(group_key)
            .fetch_one::<Facts>()
            .await?;
        Ok(ArrayFacts {
            counts: MemberCounts {
                members: facts.members,
                active_members: facts.active_members,
            },
            floor: facts.floor,
            absent: facts.members == 0 && facts.marker != 1,
        })
    }

    /// The current slots whose match key (`entity.reference`) is one of
    /// `keys`, in key order, by match key; every key asked is in the map.
    /// Cost follows the number of keys and their matches, not the group.
    pub async fn slots_by_match_key(
        &self,
        group_key: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, Vec<Slot>>, EventStoreError> {
        let mut found: HashMap<String, Vec<Slot>> =
            keys.iter().map(|k| (k.to_string(), Vec::new())).collect();
        // Bound values are sent inside the SQL text: chunks keep every query
        // well under ClickHouse's default max_query_size (256 KiB) whatever
        // the number and length of the keys.
        for chunk in chunks_of_text(keys, MAX_BOUND_TEXT_BYTES) {
            let rows = self
                .query(&format!(
                    "SELECT slot_id, order_key, match_key, element, inactive FROM ( \
                       SELECT slot_id, {SLOT_STATE} FROM {CURRENT} \
                       WHERE group_key = ? AND slot_id IN ( \
                         SELECT slot_id FROM {INDEX} \
                         WHERE match_key IN (SELECT arrayJoin(?)) AND group_key = ?) \
                       GROUP BY slot_id) \
                     WHERE present = 1 ORDER BY order_key"
                ))
                .bind(group_key)
                .bind(chunk)
                .bind(group_key)
                .fetch_all::<SlotRow>()
                .await?;
            for row in rows {
                // The index keeps rows of references a slot no longer has.
                if let Some(list) = found.get_mut(&row.match_key) {
                    list.push(row.into_slot()?);
                }
            }
        }
        Ok(found)
    }

    /// The slots at `positions` (0-based ranks in key order; past the end
    /// left out) and the positions of the slots `ids`. Ranks need the
    /// group's ordering: this scans the group's keys (not its elements).
    pub async fn slots_at(
        &self,
        group_key: &str,
        positions: &[usize],
        ids: &[&str],
    ) -> Result<(BTreeMap<usize, Slot>, HashMap<String, usize>), EventStoreError> {
        #[derive(Row, Deserialize)]
        struct Ranked {
            slot_id: String,
            rank: u64,
        }
        let ranks: Vec<u64> = positions.iter().map(|p| *p as u64 + 1).collect();
        let mut ranked = Vec::new();
        // Positions are short numbers; ids are chunked like any bound text.
        let id_chunks = chunks_of_text(ids, MAX_BOUND_TEXT_BYTES);
        let empty: &[&str] = &[];
        let id_chunks = if id_chunks.is_empty() {
            vec![empty]
        } else {
            id_chunks
        };
        for (i, id_chunk) in id_chunks.into_iter().enumerate() {
            let rank_chunk: &[u64] = if i == 0 { &ranks } else { &[] };
            // An empty bound array has no element type: its test is left out.
            let mut wanted = Vec::new();
            if !rank_chunk.is_empty() {
                wanted.push("has(?, toUInt64(ordinal))");
            }
            if !id_chunk.is_empty() {
                wanted.push("has(?, tupleElement(entry, 2))");
            }
            if wanted.is_empty() {
                continue;
            }
            let mut query = self
                .query(&format!(
                    "SELECT tupleElement(entry, 2) AS slot_id, toUInt64(ordinal) AS rank FROM ( \
                       SELECT arraySort(groupArray((order_key, slot_id))) AS sorted FROM ( \
                         SELECT slot_id, argMaxMerge(present) AS present, \
                                argMaxMerge(order_key) AS order_key \
                         FROM {CURRENT} WHERE group_key = ? AND slot_id != '' \
                         GROUP BY slot_id) \
                       WHERE present = 1) \
                     ARRAY JOIN sorted AS entry, arrayEnumerate(sorted) AS ordinal \
                     WHERE {}",
                    wanted.join(" OR ")
                ))
                .bind(group_key);
            if !rank_chunk.is_empty() {
                query = query.bind(rank_chunk);
            }
            if !id_chunk.is_empty() {
                query = query.bind(id_chunk);
            }
            ranked.extend(query.fetch_all::<Ranked>().await?);
        }
        let wanted: HashSet<u64> = ranks.iter().copied().collect();
        let slot_ids: Vec<&str> = ranked
            .iter()
            .filter(|r| wanted.contains(&r.rank))
            .map(|r| r.slot_id.as_str())
            .collect();
        let slots = self.slots_by_id(group_key, &slot_ids).await?;
        let mut at = BTreeMap::new();
        let mut of_ids = HashMap::new();
        for row in &ranked {
            let position = (row.rank - 1) as usize;
            if wanted.contains(&row.rank) {
                if let Some(slot) = slots.get(&row.slot_id) {
                    at.insert(position, slot.clone());
                }
            }
            of_ids.insert(row.slot_id.clone(), position);
        }
        Ok((at, of_ids))
    }

    /// The current slots with these ids.
    async fn slots_by_id(
        &self,
        group_key: &str,
        ids: &[&str],
    ) -> Result<HashMap<String, Slot>, EventStoreError> {
        let mut found = HashMap::new();
        for chunk in chunks_of_text(ids, MAX_BOUND_TEXT_BYTES) {
            let rows = self
                .query(&format!(
                    "SELECT slot_id, order_key, match_key, element, inactive FROM ( \
                       SELECT slot_id, {SLOT_STATE} FROM {CURRENT} \
                       WHERE group_key = ? AND slot_id IN (SELECT arrayJoin(?)) \
                       GROUP BY slot_id) \
                     WHERE present = 1"
                ))
                .bind(group_key)
                .bind(chunk)
                .fetch_all::<SlotRow>()
                .await?;
            for row in rows {
                let slot = row.into_slot()?;
                found.insert(slot.id.clone(), slot);
            }
        }
        Ok(found)
    }

    /// Every current slot of a group in key order (whole-array ops and
    /// roster PUTs, whose cost follows the roster size by nature).
    pub async fn all_slots(&self, group_key: &str) -> Result<Vec<Slot>, EventStoreError> {
        let mut cursor = self.roster(group_key, None)?;
        let mut slots = Vec::new();
        while let Some(row) = cursor.next().await? {
            slots.push(row.into_slot()?);
        }
        Ok(slots)
    }

    pub async fn counts(&self, group_key: &str) -> Result<MemberCounts, EventStoreError> {
        Ok(self.array_facts(group_key).await?.counts)
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
            .query(&format!(
                "SELECT count() FROM {EVENTS} WHERE group_key = ? AND token = ?"
            ))
            .bind(group_key)
            .bind(token)
            .fetch_one::<u64>()
            .await?;
        Ok(found > 0)
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
        let recorded = self
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

/// The columns of one slot's latest state, merged from `Slots`.
const SLOT_STATE: &str = "argMaxMerge(present) AS present, argMaxMerge(order_key) AS order_key, \
     argMaxMerge(match_key) AS match_key, argMaxMerge(element) AS element, \
     argMaxMerge(inactive) AS inactive";

/// One stored slot, as reads and lookups list it.
#[derive(Debug, Row, Deserialize)]
pub struct SlotRow {
    pub slot_id: String,
    pub order_key: String,
    pub match_key: String,
    /// The element JSON, verbatim.
    pub element: String,
    pub inactive: u8,
}

impl SlotRow {
    pub fn into_slot(self) -> Result<Slot, EventStoreError> {
        let element =
            serde_json::from_str(&self.element).map_err(|e| EventStoreError::Damaged {
                slot: self.slot_id.clone(),
                reason: e.to_string(),
            })?;
        Ok(Slot {
            id: self.slot_id,
            key: self.order_key,
            element,
        })
    }
}

/// One slot of a `$members` page; `present == 0` marks a removed member
/// (only listed when asking for changes), with the element it last had.
#[derive(Debug, Row, Deserialize)]
pub struct PageRow {
    pub slot_id: String,
    pub order_key: String,
    pub present: u8,
    pub element: String,
}

impl EventStore {
    /// Up to `limit` slots after `after` (an order key and slot id), in
    /// array order (seek pagination: stable under concurrent writes).
    /// Without `changed_since_ms`: the current members; with it: every slot
    /// whose last event is newer, removed ones included (`present == 0`).
    pub async fn roster_page(
        &self,
        group_key: &str,
        after: (&str, &str),
        changed_since_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<PageRow>, EventStoreError> {
        let filter = match changed_since_ms {
            None => "present = 1",
            Some(_) => "last_event_time_ms > ?",
        };
        let mut query = self
            .query(&format!(
                "SELECT slot_id, order_key, present, element FROM ( \
                   SELECT slot_id, argMaxMerge(present) AS present, \
                          argMaxMerge(order_key) AS order_key, argMaxMerge(element) AS element, \
                          maxMerge(last_event_time_ms) AS last_event_time_ms \
                   FROM {CURRENT} WHERE group_key = ? AND slot_id != '' GROUP BY slot_id) \
                 WHERE {filter} AND (order_key > ? OR (order_key = ? AND slot_id > ?)) \
                 ORDER BY order_key, slot_id LIMIT ?"
            ))
            .bind(group_key);
        if let Some(since) = changed_since_ms {
            query = query.bind(since);
        }
        Ok(query
            .bind(after.0)
            .bind(after.0)
            .bind(after.1)
            .bind(limit as u64)
            .fetch_all::<PageRow>()
            .await?)
    }

    /// All current slots of a group (or, with `at_version`, the slots as of
    /// that version, rebuilt from the events), in array order, as a stream.
    pub fn roster(
        &self,
        group_key: &str,
        at_version: Option<u64>,
    ) -> Result<clickhouse::query::RowCursor<SlotRow>, EventStoreError> {
        let query = match at_version {
            None => self
                .query(&format!(
                    "SELECT slot_id, order_key, match_key, element, inactive FROM ( \
                       SELECT slot_id, {SLOT_STATE} FROM {CURRENT} \
                       WHERE group_key = ? AND slot_id != '' GROUP BY slot_id) \
                     WHERE present = 1 ORDER BY order_key"
                ))
                .bind(group_key),
            Some(version) => self
                .query(&format!(
                    "SELECT slot_id, order_key, match_key, element, inactive FROM ( \
                       SELECT slot_id, argMax(toUInt8(event_type = 'added'), sequence) AS present, \
                              argMax(order_key, sequence) AS order_key, \
                              argMax(match_key, sequence) AS match_key, \
                              argMax(element, sequence) AS element, \
                              argMax(inactive, sequence) AS inactive \
                       FROM {EVENTS} WHERE group_key = ? AND group_version <= ? AND slot_id != '' \
                       GROUP BY slot_id) \
                     WHERE present = 1 ORDER BY order_key"
                ))
                .bind(group_key)
                .bind(version),
        };
        Ok(query.fetch::<SlotRow>()?)
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

/// A migrated Group that holds a member (reverse index).
#[derive(Debug, Clone, PartialEq, Eq, Row, Deserialize)]
pub struct GroupWithMember {
    pub group_key: String,
    pub group_id: String,
}

impl EventStore {
    /// The Groups whose current members include any of `references`, at most
    /// `limit` of them, ordered by id.
    pub async fn groups_with_members(
        &self,
        references: &[&str],
        limit: usize,
    ) -> Result<Vec<GroupWithMember>, EventStoreError> {
        // The index names candidates; `Slots` says which still hold them.
        Ok(self
            .query(&format!(
                "SELECT group_key, any(group_id) AS group_id FROM ( \
                   SELECT group_key, slot_id, argMaxMerge(group_id) AS group_id, \
                          argMaxMerge(present) AS present, argMaxMerge(match_key) AS match_key \
                   FROM {CURRENT} WHERE (group_key, slot_id) IN ( \
                     SELECT group_key, slot_id FROM {INDEX} \
                     WHERE match_key IN (SELECT arrayJoin(?))) \
                   GROUP BY group_key, slot_id) \
                 WHERE present = 1 AND has(?, match_key) \
                 GROUP BY group_key ORDER BY group_id LIMIT ?"
            ))
            .bind(references)
            .bind(references)
            .bind(limit as u64)
            .fetch_all::<GroupWithMember>()
            .await?)
    }
}
