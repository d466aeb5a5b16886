CREATE DATABASE IF NOT EXISTS fhir_group_proxy ON CLUSTER 'fhir_events';

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEventsStaged_local ON CLUSTER 'fhir_events' (
    group_key String,
    group_id String,
    group_version UInt64,
    token String,
    request_id String,
    op_index UInt32,
    sequence UInt64,
    slot_id String,
    order_key String,
    match_key String,
    event_type Enum8('added' = 1, 'removed' = 2),
    element String,
    inactive UInt8,
    member_delta Int8,
    active_delta Int8,
    event_time_ms UInt64,
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlotEventsStaged_local', '{replica}') PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEventsStaged ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlotEventsStaged_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlotEventsStaged_local', cityHash64(group_key));

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local ON CLUSTER 'fhir_events' (
    group_key String,
    group_id String,
    group_version UInt64,
    token String,
    request_id String,
    op_index UInt32,
    sequence UInt64,
    slot_id String,
    order_key String,
    match_key String,
    event_type Enum8('added' = 1, 'removed' = 2),
    element String,
    inactive UInt8,
    member_delta Int8,
    active_delta Int8,
    event_time_ms UInt64,
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlotEvents_local', '{replica}') PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, slot_id, sequence);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEvents ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlotEvents_local', cityHash64(group_key));

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlots_local ON CLUSTER 'fhir_events' (
                group_key String,
                slot_id String,
                group_id AggregateFunction(argMax, String, UInt64),
                present AggregateFunction(argMax, UInt8, UInt64),
                order_key AggregateFunction(argMax, String, UInt64),
                match_key AggregateFunction(argMax, String, UInt64),
                element AggregateFunction(argMax, String, UInt64),
                inactive AggregateFunction(argMax, UInt8, UInt64),
                last_sequence AggregateFunction(max, UInt64),
                last_event_time_ms AggregateFunction(max, UInt64)
             ) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlots_local', '{replica}') ORDER BY (group_key, slot_id);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlots ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlots_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlots_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlots_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberSlots_local AS
             SELECT group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(order_key, sequence) AS order_key,
                    argMaxState(match_key, sequence) AS match_key,
                    argMaxState(element, sequence) AS element,
                    argMaxState(inactive, sequence) AS inactive,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local GROUP BY group_key, slot_id;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotIndex_local ON CLUSTER 'fhir_events' (
                match_key String,
                group_key String,
                slot_id String,
                group_id AggregateFunction(argMax, String, UInt64)
             ) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlotIndex_local', '{replica}') ORDER BY (match_key, group_key, slot_id);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotIndex ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlotIndex_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlotIndex_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotIndex_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberSlotIndex_local AS
             SELECT match_key, group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local WHERE match_key != '' AND event_type = 'added' GROUP BY match_key, group_key, slot_id;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCounts_local ON CLUSTER 'fhir_events' (
                group_key String,
                members AggregateFunction(sum, Int64),
                active_members AggregateFunction(sum, Int64),
                floor AggregateFunction(max, String)
             ) ENGINE = ReplicatedAggregatingMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlotCounts_local', '{replica}') ORDER BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCounts ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlotCounts_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlotCounts_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCounts_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberSlotCounts_local AS
             SELECT group_key, sumState(toInt64(member_delta)) AS members,
                    sumState(toInt64(active_delta)) AS active_members,
                    maxState(order_key) AS floor
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local GROUP BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCommits_local ON CLUSTER 'fhir_events' (
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             ) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSlotCommits_local', '{replica}') ORDER BY (group_key, request_id, token);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCommits ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSlotCommits_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSlotCommits_local', cityHash64(group_key));

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCommits_MV ON CLUSTER 'fhir_events' TO fhir_group_proxy.Group_4_0_0_MemberSlotCommits_local AS
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents_local GROUP BY group_key, request_id, token;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSchema_local ON CLUSTER 'fhir_events' (
                version UInt32,
                applied_at_ms UInt64,
                note String
             ) ENGINE = ReplicatedMergeTree('/clickhouse/tables/{shard}/fhir_group_proxy/Group_4_0_0_MemberSchema_local', '{replica}') ORDER BY version;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSchema ON CLUSTER 'fhir_events' AS fhir_group_proxy.Group_4_0_0_MemberSchema_local ENGINE = Distributed('fhir_events', 'fhir_group_proxy', 'Group_4_0_0_MemberSchema_local', cityHash64(group_key));
