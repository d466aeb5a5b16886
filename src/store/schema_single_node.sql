CREATE DATABASE IF NOT EXISTS fhir_group_proxy;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEventsStaged (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEvents (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, entity_reference, sequence);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCurrent (
                group_key String,
                entity_reference String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64),
                period_start AggregateFunction(argMax, String, UInt64),
                period_end AggregateFunction(argMax, String, UInt64),
                last_sequence AggregateFunction(max, UInt64),
                last_event_time_ms AggregateFunction(max, UInt64)
             ) ENGINE = AggregatingMergeTree ORDER BY (group_key, entity_reference);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCurrent_MV TO fhir_group_proxy.Group_4_0_0_MemberCurrent AS
             SELECT group_key, entity_reference,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive,
                    argMaxState(period_start, sequence) AS period_start,
                    argMaxState(period_end, sequence) AS period_end,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents GROUP BY group_key, entity_reference;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberGroups (
                entity_reference String,
                group_key String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64)
             ) ENGINE = AggregatingMergeTree ORDER BY (entity_reference, group_key);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberGroups_MV TO fhir_group_proxy.Group_4_0_0_MemberGroups AS
             SELECT entity_reference, group_key,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents GROUP BY entity_reference, group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCounts (
                group_key String,
                members Int64,
                active_members Int64
             ) ENGINE = SummingMergeTree ORDER BY group_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCounts_MV TO fhir_group_proxy.Group_4_0_0_MemberCounts AS
             SELECT group_key, sum(toInt64(member_delta)) AS members,
                    sum(toInt64(active_delta)) AS active_members
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents GROUP BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCommits (
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             ) ENGINE = MergeTree ORDER BY (group_key, request_id, token);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCommits_MV TO fhir_group_proxy.Group_4_0_0_MemberCommits AS
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents GROUP BY group_key, request_id, token;
