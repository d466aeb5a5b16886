CREATE DATABASE IF NOT EXISTS fhir_group_proxy;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEventsStaged (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotEvents (
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))) ENGINE = MergeTree PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, slot_id, sequence);

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlots (
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
             ) ENGINE = AggregatingMergeTree ORDER BY (group_key, slot_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlots_MV TO fhir_group_proxy.Group_4_0_0_MemberSlots AS
             SELECT group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(order_key, sequence) AS order_key,
                    argMaxState(match_key, sequence) AS match_key,
                    argMaxState(element, sequence) AS element,
                    argMaxState(inactive, sequence) AS inactive,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents GROUP BY group_key, slot_id;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotIndex (
                match_key String,
                group_key String,
                slot_id String,
                group_id AggregateFunction(argMax, String, UInt64)
             ) ENGINE = AggregatingMergeTree ORDER BY (match_key, group_key, slot_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotIndex_MV TO fhir_group_proxy.Group_4_0_0_MemberSlotIndex AS
             SELECT match_key, group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents WHERE match_key != '' AND event_type = 'added' GROUP BY match_key, group_key, slot_id;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCounts (
                group_key String,
                members AggregateFunction(sum, Int64),
                active_members AggregateFunction(sum, Int64),
                floor AggregateFunction(max, String)
             ) ENGINE = AggregatingMergeTree ORDER BY group_key;

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCounts_MV TO fhir_group_proxy.Group_4_0_0_MemberSlotCounts AS
             SELECT group_key, sumState(toInt64(member_delta)) AS members,
                    sumState(toInt64(active_delta)) AS active_members,
                    maxState(order_key) AS floor
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents GROUP BY group_key;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCommits (
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             ) ENGINE = MergeTree ORDER BY (group_key, request_id, token);

CREATE MATERIALIZED VIEW IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSlotCommits_MV TO fhir_group_proxy.Group_4_0_0_MemberSlotCommits AS
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             FROM fhir_group_proxy.Group_4_0_0_MemberSlotEvents GROUP BY group_key, request_id, token;

CREATE TABLE IF NOT EXISTS fhir_group_proxy.Group_4_0_0_MemberSchema (
                version UInt32,
                applied_at_ms UInt64,
                note String
             ) ENGINE = MergeTree ORDER BY version;
