//! ClickHouse DDL for member events. `schema apply` runs it, and so does the
//! proxy at start; every statement is idempotent (`IF NOT EXISTS`).
//!
//! Written for both ClickHouse 18.16 and current releases: no DateTime64, no
//! LowCardinality, `AggregateFunction` columns fed by `MATERIALIZED VIEW ... TO`.
//!
//! Tables (prefix `Group_4_0_0_Member`):
//! - `EventsStaged`: events of a write before it commits, keyed by its token.
//! - `Events`: committed events, append-only; feeds the views below.
//! - `Current`: per (group, member) the latest state, by `sequence`.
//! - `Groups`: the reverse index, per (member, group) the latest state.
//! - `Counts`: per group, sums of member and active-member deltas.
//! - `Commits`: one row per committed write, for idempotent retries.
//!
//! `sequence` is `group_version << 20 | op_index`: versions increase strictly per
//! group and ops keep their patch order, so ties never occur and never need a
//! random tie-break.

/// Op indexes must fit below this to keep `sequence` ordered.
pub const MAX_OPS_PER_VERSION: usize = 1 << 20;

pub const EVENTS_STAGED: &str = "Group_4_0_0_MemberEventsStaged";
pub const EVENTS: &str = "Group_4_0_0_MemberEvents";
pub const CURRENT: &str = "Group_4_0_0_MemberCurrent";
pub const GROUPS: &str = "Group_4_0_0_MemberGroups";
pub const COUNTS: &str = "Group_4_0_0_MemberCounts";
pub const COMMITS: &str = "Group_4_0_0_MemberCommits";

const EVENT_COLUMNS: &str = "
    group_key String,
    group_id String,
    group_version UInt64,
    token String,
    request_id String,
    op_index UInt32,
    sequence UInt64,
    entity_reference String,
    entity_type String,
    event_type Enum8('added' = 1, 'removed' = 2),
    period_start String,
    period_end String,
    inactive UInt8,
    member_delta Int8,
    active_delta Int8,
    event_time_ms UInt64,
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))";

/// The statements, in dependency order, for `database`.
pub fn statements(database: &str) -> Vec<String> {
    let db = database;
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {db}"),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{EVENTS_STAGED} ({EVENT_COLUMNS}) \
             ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{EVENTS} ({EVENT_COLUMNS}) \
             ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) \
             ORDER BY (group_key, entity_reference, sequence)"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{CURRENT} (
                group_key String,
                entity_reference String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64),
                period_start AggregateFunction(argMax, String, UInt64),
                period_end AggregateFunction(argMax, String, UInt64),
                last_sequence AggregateFunction(max, UInt64),
                last_event_time_ms AggregateFunction(max, UInt64)
             ) ENGINE = AggregatingMergeTree ORDER BY (group_key, entity_reference)"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{CURRENT}_MV TO {db}.{CURRENT} AS
             SELECT group_key, entity_reference,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive,
                    argMaxState(period_start, sequence) AS period_start,
                    argMaxState(period_end, sequence) AS period_end,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             FROM {db}.{EVENTS} GROUP BY group_key, entity_reference"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{GROUPS} (
                entity_reference String,
                group_key String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64)
             ) ENGINE = AggregatingMergeTree ORDER BY (entity_reference, group_key)"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{GROUPS}_MV TO {db}.{GROUPS} AS
             SELECT entity_reference, group_key,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive
             FROM {db}.{EVENTS} GROUP BY entity_reference, group_key"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{COUNTS} (
                group_key String,
                members Int64,
                active_members Int64
             ) ENGINE = SummingMergeTree ORDER BY group_key"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{COUNTS}_MV TO {db}.{COUNTS} AS
             SELECT group_key, sum(toInt64(member_delta)) AS members,
                    sum(toInt64(active_delta)) AS active_members
             FROM {db}.{EVENTS} GROUP BY group_key"
        ),
        format!(
            "CREATE TABLE IF NOT EXISTS {db}.{COMMITS} (
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             ) ENGINE = MergeTree ORDER BY (group_key, request_id, token)"
        ),
        format!(
            "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{COMMITS}_MV TO {db}.{COMMITS} AS
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             FROM {db}.{EVENTS} GROUP BY group_key, request_id, token"
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_is_idempotent_and_avoids_newer_features() {
        for statement in statements("fhir") {
            assert!(statement.contains("IF NOT EXISTS"), "{statement}");
            for newer in ["DateTime64", "LowCardinality", "async_insert", "{"] {
                assert!(!statement.contains(newer), "{newer} in {statement}");
            }
        }
    }
}
