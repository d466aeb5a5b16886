//! Reads of the member array in ClickHouse: the facts every patch plans
//! from (`Counts`), slots found by reference (`Index`) or by position, whole
//! rosters and pages (`Slots`), and the Groups holding a member (search).
//! The writes that feed these views are in `events`.

use std::collections::{BTreeMap, HashMap, HashSet};

use clickhouse::Row;
use serde::Deserialize;

use crate::fhir::member_array::Slot;
use crate::store::events::{chunks_of_text, EventStore, EventStoreError, MAX_BOUND_TEXT_BYTES};
use crate::store::schema::{COUNTS, CURRENT, EVENTS, INDEX};

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

impl EventStore {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(element: &str) -> SlotRow {
        SlotRow {
            slot_id: "s1".into(),
            order_key: "k".into(),
            match_key: "Patient/a".into(),
            element: element.into(),
            inactive: 0,
        }
    }

    #[test]
    fn a_stored_slot_becomes_the_slot_with_its_element_verbatim() {
        let slot = row(r#"{"entity":{"reference":"Patient/a"}}"#)
            .into_slot()
            .unwrap();
        assert_eq!((slot.id.as_str(), slot.key.as_str()), ("s1", "k"));
        assert_eq!(
            slot.element,
            serde_json::json!({"entity": {"reference": "Patient/a"}})
        );
    }

    #[test]
    fn a_damaged_element_is_refused_naming_its_slot() {
        let error = row("{not json").into_slot().unwrap_err();
        assert!(matches!(error, EventStoreError::Damaged { ref slot, .. } if slot == "s1"));
    }
}
