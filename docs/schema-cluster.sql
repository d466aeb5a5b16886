CREATE DATABASE IF NOT EXISTS fhir_group_proxy ON CLUSTER 'fhir_events';

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEventsStaged_local ON CLUSTER 'fhir_events' (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberEventsStaged_local', '{replica}') PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEventsStaged ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberEventsStaged_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberEventsStaged_local', cityHash64(group_key));

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEvents_local ON CLUSTER 'fhir_events' (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberEvents_local', '{replica}') PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, entity_reference, sequence);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberEvents ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberEvents_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberEvents_local', cityHash64(group_key));

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCurrent_local ON CLUSTER 'fhir_events' (
                group_key String,
                entity_reference String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64),
                period_start AggregateFunction(argMax, String, UInt64),
                period_end AggregateFunction(argMax, String, UInt64),
                last_sequence AggregateFunction(max, UInt64),
                last_event_time_ms AggregateFunction(max, UInt64)
             ) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberCurrent_local', '{replica}') ORDER BY (group_key, entity_reference);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCurrent ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberCurrent_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberCurrent_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCurrent_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberCurrent_local AS
             SELECT group_key, entity_reference,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive,
                    argMaxState(period_start, sequence) AS period_start,
                    argMaxState(period_end, sequence) AS period_end,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents_local GROUP BY group_key, entity_reference;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberGroups_local ON CLUSTER 'fhir_events' (
                entity_reference String,
                group_key String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64)
             ) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberGroups_local', '{replica}') ORDER BY (entity_reference, group_key);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberGroups ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberGroups_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberGroups_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberGroups_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberGroups_local AS
             SELECT entity_reference, group_key,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(inactive, sequence) AS inactive
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents_local GROUP BY entity_reference, group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCounts_local ON CLUSTER 'fhir_events' (
                group_key String,
                members Int64,
                active_members Int64
             ) ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberCounts_local', '{replica}') ORDER BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCounts ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberCounts_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberCounts_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCounts_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberCounts_local AS
             SELECT group_key, sum(toInt64(member_delta)) AS members,
                    sum(toInt64(active_delta)) AS active_members
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents_local GROUP BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCommits_local ON CLUSTER 'fhir_events' (
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             ) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberCommits_local', '{replica}') ORDER BY (group_key, request_id, token);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCommits ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberCommits_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberCommits_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberCommits_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberCommits_local AS
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberEvents_local GROUP BY group_key, request_id, token;
