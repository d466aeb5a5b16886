//! ClickHouse DDL for member events. `schema apply` runs it, and so does the
//! proxy at start; every statement is idempotent (`IF NOT EXISTS`).
//!
//! Written for both ClickHouse 18.16 and current releases: no DateTime64, no
//! LowCardinality, `AggregateFunction` columns fed by `MATERIALIZED VIEW ... TO`.
//!
//! # Schema version 2: the member array as slots
//!
//! The legacy server keeps `Group.member` as a JSON array, so the proxy stores
//! exactly that, one *slot* per array element (see `fhir::member_array`): a
//! stable slot id, an order key (the array is the slots sorted bytewise by
//! key) and the element JSON verbatim. An event puts a slot (new, moved or
//! changed) or removes it. Tables (prefix `Group_4_0_0_MemberSlot`):
//! - `EventsStaged`: events of a write before it commits, keyed by its token.
//! - `Events`: committed events, append-only; feeds the views below. A row
//!   with an empty `slot_id` records that the `member` key itself appeared
//!   (`added`) or went away (`removed`): RFC 6902 tells an absent array from
//!   an empty one.
//! - `Slots` (no `Event` in the name): per (group, slot) the latest state.
//! - `Index`: per (match key, group, slot), the reverse index; the match key
//!   is `entity.reference` (or `identifier:{system}|{value}` for members
//!   named by identifier only). A slot whose reference changed keeps its old
//!   index row, so every lookup checks candidates against `Slots`.
//! - `Counts`: per group, member and active-member sums and the *floor* (the
//!   largest order key ever assigned), so appends need no scan.
//! - `Commits`: one row per committed write, for idempotent retries.
//!
//! `sequence` is `group_version << 20 | event_index`: versions increase
//! strictly per group and events keep their plan order, so ties never occur.
//!
//! Version 1 (`Group_4_0_0_Member*`, members keyed by reference) is upgraded
//! by `store::upgrade`; `Schema` records which versions are in place.

use crate::config::ClickHouseSettings;

pub use crate::config::MAX_OPS_PER_VERSION;

/// The schema version this release reads and writes.
pub const SCHEMA_VERSION: u32 = 2;

pub const EVENTS_STAGED: &str = "Group_4_0_0_MemberSlotEventsStaged";
pub const EVENTS: &str = "Group_4_0_0_MemberSlotEvents";
pub const CURRENT: &str = "Group_4_0_0_MemberSlots";
pub const INDEX: &str = "Group_4_0_0_MemberSlotIndex";
pub const COUNTS: &str = "Group_4_0_0_MemberSlotCounts";
pub const COMMITS: &str = "Group_4_0_0_MemberSlotCommits";
/// One row per schema version applied (and upgrade finished).
pub const SCHEMA: &str = "Group_4_0_0_MemberSchema";

/// Tables of schema version 1, read once by the upgrade.
pub mod v1 {
    pub const EVENTS: &str = "Group_4_0_0_MemberEvents";
    pub const COMMITS: &str = "Group_4_0_0_MemberCommits";
}

const EVENT_COLUMNS: &str = "
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
    event_date Date DEFAULT toDate(toDateTime(intDiv(event_time_ms, 1000)))";

/// Where the tables live: one server, or a ClickHouse cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topology<'a> {
    /// Plain MergeTree tables on one server.
    SingleNode,
    /// Per shard, `Replicated*MergeTree` tables named `{table}_local` (the
    /// views are on them), and over them `Distributed` tables with the names
    /// the proxy reads and writes, sharded by `group_key`. Every statement runs
    /// `ON CLUSTER`.
    Cluster {
        /// A cluster of the servers' `remote_servers` configuration.
        name: &'a str,
        /// Replication path prefix; `/{database}/{table}_local` is appended.
        replication_path: &'a str,
        /// Replica name, usually the `{replica}` macro.
        replica_name: &'a str,
    },
}

impl<'a> Topology<'a> {
    /// The topology `settings` select (`clickhouse.cluster` empty: one server).
    pub fn of(settings: &'a ClickHouseSettings) -> Topology<'a> {
        if settings.cluster.is_empty() {
            Topology::SingleNode
        } else {
            Topology::Cluster {
                name: &settings.cluster,
                replication_path: settings.replication_path.trim_end_matches('/'),
                replica_name: &settings.replica_name,
            }
        }
    }

    /// What DDL adds to a statement and to its tables' names: ` ON CLUSTER
    /// '…'` and the per-shard suffix in a cluster, nothing on one server.
    fn ddl_parts(self) -> (String, &'static str) {
        match self {
            Topology::SingleNode => (String::new(), ""),
            Topology::Cluster { name, .. } => (format!(" ON CLUSTER '{name}'"), LOCAL_SUFFIX),
        }
    }
}

/// Suffix of the per-shard tables in cluster mode.
pub const LOCAL_SUFFIX: &str = "_local";

/// Rows of one Group stay on one shard: the `argMax` views and the per-group
/// reads need all events of a Group in one place.
const SHARDING_KEY: &str = "cityHash64(group_key)";

/// A table: `CREATE TABLE ... ({columns}) ENGINE = {engine}{layout}`.
struct Table {
    name: &'static str,
    columns: String,
    /// A MergeTree family engine without parameters, e.g. `SummingMergeTree`.
    engine: &'static str,
    /// What follows the engine: ` PARTITION BY ... ORDER BY ...`.
    layout: &'static str,
}

/// A materialized view from the events table into `target`.
struct View {
    target: &'static str,
    /// From `AS` up to `FROM`, with the line breaks around it.
    select: &'static str,
    /// ` WHERE ...` after `FROM`, or empty.
    filter: &'static str,
    group_by: &'static str,
}

fn tables() -> Vec<Table> {
    vec![
        Table {
            name: EVENTS_STAGED,
            columns: EVENT_COLUMNS.to_string(),
            engine: "MergeTree",
            layout: " PARTITION BY toYYYYMM(event_date) ORDER BY (token, op_index)",
        },
        Table {
            name: EVENTS,
            columns: EVENT_COLUMNS.to_string(),
            engine: "MergeTree",
            layout: " PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, slot_id, sequence)",
        },
        Table {
            name: CURRENT,
            columns: "
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
             "
            .to_string(),
            engine: "AggregatingMergeTree",
            layout: " ORDER BY (group_key, slot_id)",
        },
        Table {
            name: INDEX,
            columns: "
                match_key String,
                group_key String,
                slot_id String,
                group_id AggregateFunction(argMax, String, UInt64)
             "
            .to_string(),
            engine: "AggregatingMergeTree",
            layout: " ORDER BY (match_key, group_key, slot_id)",
        },
        Table {
            name: COUNTS,
            columns: "
                group_key String,
                members AggregateFunction(sum, Int64),
                active_members AggregateFunction(sum, Int64),
                floor AggregateFunction(max, String)
             "
            .to_string(),
            engine: "AggregatingMergeTree",
            layout: " ORDER BY group_key",
        },
        Table {
            name: COMMITS,
            columns: "
                group_key String,
                request_id String,
                token String,
                group_version UInt64,
                events UInt64,
                committed_at_ms UInt64
             "
            .to_string(),
            engine: "MergeTree",
            layout: " ORDER BY (group_key, request_id, token)",
        },
        Table {
            name: SCHEMA,
            columns: "
                version UInt32,
                applied_at_ms UInt64,
                note String
             "
            .to_string(),
            engine: "MergeTree",
            layout: " ORDER BY version",
        },
    ]
}

fn views() -> [View; 4] {
    [
        View {
            target: CURRENT,
            select: "
             SELECT group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id,
                    argMaxState(toUInt8(event_type = 'added'), sequence) AS present,
                    argMaxState(order_key, sequence) AS order_key,
                    argMaxState(match_key, sequence) AS match_key,
                    argMaxState(element, sequence) AS element,
                    argMaxState(inactive, sequence) AS inactive,
                    maxState(sequence) AS last_sequence,
                    maxState(event_time_ms) AS last_event_time_ms
             ",
            filter: "",
            group_by: "group_key, slot_id",
        },
        View {
            target: INDEX,
            select: "
             SELECT match_key, group_key, slot_id,
                    argMaxState(group_id, sequence) AS group_id
             ",
            filter: " WHERE match_key != '' AND event_type = 'added'",
            group_by: "match_key, group_key, slot_id",
        },
        View {
            target: COUNTS,
            select: "
             SELECT group_key, sumState(toInt64(member_delta)) AS members,
                    sumState(toInt64(active_delta)) AS active_members,
                    maxState(order_key) AS floor
             ",
            filter: "",
            group_by: "group_key",
        },
        View {
            target: COMMITS,
            select: "
             SELECT group_key, request_id, token, max(group_version) AS group_version,
                    count() AS events, max(event_time_ms) AS committed_at_ms
             ",
            filter: "",
            group_by: "group_key, request_id, token",
        },
    ]
}

/// The statements for `settings` (database and topology).
pub fn statements_for(settings: &ClickHouseSettings) -> Vec<String> {
    statements_in(&settings.database, Topology::of(settings))
}

/// The single-node statements, in dependency order, for `database`.
pub fn statements(database: &str) -> Vec<String> {
    statements_in(database, Topology::SingleNode)
}

/// The statements, in dependency order, for `database` laid out as `topology`.
pub fn statements_in(database: &str, topology: Topology<'_>) -> Vec<String> {
    let db = database;
    let (on_cluster, local) = topology.ddl_parts();
    let mut statements = vec![format!("CREATE DATABASE IF NOT EXISTS {db}{on_cluster}")];
    let tables = tables();
    let views = views();
    for table in &tables {
        let name = table.name;
        let engine = match topology {
            Topology::SingleNode => table.engine.to_string(),
            Topology::Cluster {
                replication_path,
                replica_name,
                ..
            } => format!(
                "Replicated{}('{replication_path}/{db}/{name}{local}', '{replica_name}')",
                table.engine
            ),
        };
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {db}.{name}{local}{on_cluster} ({}) ENGINE = {engine}{}",
            table.columns, table.layout
        ));
        if let Topology::Cluster { name: cluster, .. } = topology {
            statements.push(format!(
                "CREATE TABLE IF NOT EXISTS {db}.{name}{on_cluster} AS {db}.{name}{local} \
                 ENGINE = Distributed('{cluster}', '{db}', '{name}{local}', {SHARDING_KEY})"
            ));
        }
        // Each view right after its target table: the order the single-node
        // schema has always had.
        if let Some(view) = views.iter().find(|v| v.target == name) {
            statements.push(format!(
                "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.{name}_MV{on_cluster} \
                 TO {db}.{name}{local} AS{}FROM {db}.{EVENTS}{local}{} GROUP BY {}",
                view.select, view.filter, view.group_by
            ));
        }
    }
    statements
}

/// Drops the staged events of one month (`YYYYMM`, the staging table's
/// partition): on one server its table, in a cluster every shard's local
/// table. Dropping a month with no parts is a no-op.
pub fn drop_staged_month(database: &str, topology: Topology<'_>, month: u32) -> String {
    let (on_cluster, local) = topology.ddl_parts();
    format!("ALTER TABLE {database}.{EVENTS_STAGED}{local}{on_cluster} DROP PARTITION {month}")
}

/// The tables and views this schema creates in one database, with what an
/// existing object of that name must look like to be ours: a table its
/// columns (name and type, as `system.columns` reports them), a view the
/// table it writes to.
pub struct Shape {
    pub tables: Vec<(String, Vec<(String, String)>)>,
    /// `(view, target table)`.
    pub views: Vec<(String, String)>,
}

/// The [`Shape`] of the objects `statements_in(database, topology)` creates.
pub fn shape(topology: Topology<'_>) -> Shape {
    let local = match topology {
        Topology::SingleNode => "",
        Topology::Cluster { .. } => LOCAL_SUFFIX,
    };
    let mut shaped = Vec::new();
    for table in tables() {
        let columns = parse_columns(&table.columns);
        if !local.is_empty() {
            shaped.push((format!("{}{local}", table.name), columns.clone()));
        }
        shaped.push((table.name.to_string(), columns));
    }
    let views = views()
        .iter()
        .map(|v| (format!("{}_MV", v.target), format!("{}{local}", v.target)))
        .collect();
    Shape {
        tables: shaped,
        views,
    }
}

/// `name Type [DEFAULT ...]` items of a column list, split at top-level
/// commas (types like `Enum8('a' = 1, 'b' = 2)` hold commas of their own).
fn parse_columns(list: &str) -> Vec<(String, String)> {
    let mut items = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in list.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                items.push(&list[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&list[start..]);
    items
        .into_iter()
        .filter_map(|item| {
            let item = item.trim();
            let (name, rest) = item.split_once(char::is_whitespace)?;
            let ty = rest.split(" DEFAULT ").next().unwrap_or(rest).trim();
            Some((name.to_string(), ty.to_string()))
        })
        .collect()
}

/// What is wrong with the objects found in the database (`found_tables`:
/// columns by table; `found_views`: `create_table_query` by view), for the
/// schema of `database`: each a sentence naming the object. Empty when every
/// object found is this proxy's own (objects not there yet are created).
pub fn foreign_objects(
    database: &str,
    shape: &Shape,
    found_tables: &std::collections::HashMap<String, Vec<(String, String)>>,
    found_views: &std::collections::HashMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    for (table, columns) in &shape.tables {
        let Some(found) = found_tables.get(table) else {
            continue;
        };
        if found != columns {
            let foreign: Vec<String> = found
                .iter()
                .filter(|c| !columns.contains(c))
                .map(|(n, t)| format!("{n} {t}"))
                .take(4)
                .collect();
            let missing: Vec<String> = columns
                .iter()
                .filter(|c| !found.contains(c))
                .map(|(n, t)| format!("{n} {t}"))
                .take(4)
                .collect();
            problems.push(format!(
                "{database}.{table} exists with other columns (it has {}; it lacks {})",
                or_none(&foreign),
                or_none(&missing)
            ));
        }
    }
    for (view, target) in &shape.views {
        let Some(query) = found_views.get(view) else {
            continue;
        };
        let writes_ours = query.contains(&format!("TO {database}.{target} "))
            || query.contains(&format!("TO {database}.{target}\n"));
        if !writes_ours {
            problems.push(format!(
                "{database}.{view} exists but does not write into {database}.{target}"
            ));
        }
    }
    problems
}

fn or_none(items: &[String]) -> String {
    if items.is_empty() {
        "nothing else".into()
    } else {
        items.join(", ")
    }
}

/// `statements` as one SQL script, each statement ended by `;`.
pub fn script(statements: &[String]) -> String {
    format!("{};\n", statements.join(";\n\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_staged_month_is_dropped_from_the_table_or_from_every_shard() {
        assert_eq!(
            drop_staged_month("fhir", Topology::SingleNode, 202_609),
            format!("ALTER TABLE fhir.{EVENTS_STAGED} DROP PARTITION 202609")
        );
        let cluster = Topology::Cluster {
            name: "events",
            replication_path: "/clickhouse/tables/{shard}",
            replica_name: "{replica}",
        };
        assert_eq!(
            drop_staged_month("fhir", cluster, 202_609),
            format!(
                "ALTER TABLE fhir.{EVENTS_STAGED}_local ON CLUSTER 'events' DROP PARTITION 202609"
            )
        );
    }

    #[test]
    fn the_shape_lists_every_table_with_its_columns_and_every_view_with_its_target() {
        let shape = shape(Topology::SingleNode);
        let events = &shape.tables.iter().find(|(t, _)| t == EVENTS).unwrap().1;
        assert_eq!(events[0], ("group_key".to_string(), "String".to_string()));
        assert!(events.contains(&(
            "event_type".to_string(),
            "Enum8('added' = 1, 'removed' = 2)".to_string()
        )));
        assert_eq!(
            events.last().unwrap(),
            &("event_date".to_string(), "Date".to_string())
        );
        let current = &shape.tables.iter().find(|(t, _)| t == CURRENT).unwrap().1;
        assert!(current.contains(&(
            "group_id".to_string(),
            "AggregateFunction(argMax, String, UInt64)".to_string()
        )));
        assert_eq!(shape.tables.len(), 7);
        assert!(shape
            .views
            .contains(&(format!("{CURRENT}_MV"), CURRENT.to_string())));
        let cluster = super::shape(Topology::Cluster {
            name: "c",
            replication_path: "/p",
            replica_name: "r",
        });
        assert_eq!(cluster.tables.len(), 14);
        assert!(cluster
            .views
            .contains(&(format!("{CURRENT}_MV"), format!("{CURRENT}_local"))));
    }

    #[test]
    fn objects_of_another_shape_are_named_and_our_own_pass() {
        let shape = shape(Topology::SingleNode);
        let ours: std::collections::HashMap<_, _> = shape.tables.iter().cloned().collect();
        let views: std::collections::HashMap<_, _> = shape
            .views
            .iter()
            .map(|(v, t)| {
                (
                    v.clone(),
                    format!("CREATE MATERIALIZED VIEW db.{v} TO db.{t} (x UInt8) AS SELECT 1"),
                )
            })
            .collect();
        assert!(foreign_objects("db", &shape, &ours, &views).is_empty());
        assert!(foreign_objects("db", &shape, &Default::default(), &Default::default()).is_empty());

        // The reference server's own ClickHouse mode uses these names too.
        let mut theirs = ours.clone();
        theirs.insert(
            EVENTS.to_string(),
            vec![
                ("group_id".to_string(), "String".to_string()),
                ("event_time".to_string(), "DateTime64(3)".to_string()),
            ],
        );
        let mut their_views = views.clone();
        their_views.insert(
            format!("{CURRENT}_MV"),
            format!("CREATE MATERIALIZED VIEW db.{CURRENT}_MV TO db.Other (x UInt8) AS SELECT 1"),
        );
        let problems = foreign_objects("db", &shape, &theirs, &their_views);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains(&format!("db.{EVENTS} exists with other columns")));
        assert!(problems[0].contains("DateTime64(3)"), "{}", problems[0]);
        assert!(
            problems[1].contains("does not write into"),
            "{}",
            problems[1]
        );
    }

    #[test]
    fn every_statement_is_idempotent_and_avoids_newer_features() {
        for statement in statements("fhir") {
            assert!(statement.contains("IF NOT EXISTS"), "{statement}");
            for newer in ["DateTime64", "LowCardinality", "async_insert", "{"] {
                assert!(!statement.contains(newer), "{newer} in {statement}");
            }
        }
    }

    #[test]
    fn single_node_schema_is_unchanged_byte_for_byte() {
        let settings = ClickHouseSettings::default();
        assert_eq!(settings.database, "fhir_group_proxy");
        assert_eq!(
            script(&statements_for(&settings)),
            include_str!("schema_single_node.sql")
        );
    }

    #[test]
    fn documented_cluster_schema_is_what_is_generated() {
        let settings = ClickHouseSettings {
            cluster: "fhir_events".into(),
            ..ClickHouseSettings::default()
        };
        assert_eq!(
            script(&statements_for(&settings)),
            include_str!("../../docs/schema-cluster.sql"),
            "regenerate docs/schema-cluster.sql with \
             FGP_CLICKHOUSE_CLUSTER=fhir_events fhir-group-proxy schema-apply --print"
        );
    }

    fn cluster() -> Vec<String> {
        statements_in(
            "fhir",
            Topology::Cluster {
                name: "events",
                replication_path: "/clickhouse/tables/{shard}",
                replica_name: "{replica}",
            },
        )
    }

    #[test]
    fn cluster_statements_all_run_on_the_cluster() {
        let statements = cluster();
        assert_eq!(
            statements.len(),
            19,
            "database, 7 local + 7 distributed tables, 4 views"
        );
        assert_eq!(
            statements[0],
            "CREATE DATABASE IF NOT EXISTS fhir ON CLUSTER 'events'"
        );
        for statement in &statements {
            assert!(statement.contains("IF NOT EXISTS"), "{statement}");
            assert!(statement.contains(" ON CLUSTER 'events'"), "{statement}");
            for newer in ["DateTime64", "LowCardinality", "async_insert"] {
                assert!(!statement.contains(newer), "{newer} in {statement}");
            }
        }
    }

    #[test]
    fn cluster_local_tables_are_replicated_with_their_own_paths() {
        let statements = cluster();
        let local = |table: &str| {
            let head =
                format!("CREATE TABLE IF NOT EXISTS fhir.{table}_local ON CLUSTER 'events' (");
            statements
                .iter()
                .find(|s| s.starts_with(&head))
                .unwrap_or_else(|| panic!("no local table {table}"))
        };
        let engines = [
            (EVENTS_STAGED, "ReplicatedMergeTree"),
            (EVENTS, "ReplicatedMergeTree"),
            (CURRENT, "ReplicatedAggregatingMergeTree"),
            (INDEX, "ReplicatedAggregatingMergeTree"),
            (COUNTS, "ReplicatedAggregatingMergeTree"),
            (SCHEMA, "ReplicatedMergeTree"),
            (COMMITS, "ReplicatedMergeTree"),
        ];
        for (table, engine) in engines {
            let expected = format!(
                "ENGINE = {engine}('/clickhouse/tables/{{shard}}/fhir/{table}_local', '{{replica}}')"
            );
            assert!(local(table).contains(&expected), "{}", local(table));
        }
        assert!(local(EVENTS).ends_with(
            "('/clickhouse/tables/{shard}/fhir/Group_4_0_0_MemberSlotEvents_local', '{replica}') \
             PARTITION BY toYYYYMM(event_date) ORDER BY (group_key, slot_id, sequence)"
        ));
    }

    #[test]
    fn cluster_distributed_tables_keep_the_names_and_shard_by_group() {
        let statements = cluster();
        for table in [
            EVENTS_STAGED,
            EVENTS,
            CURRENT,
            INDEX,
            COUNTS,
            COMMITS,
            SCHEMA,
        ] {
            let expected = format!(
                "CREATE TABLE IF NOT EXISTS fhir.{table} ON CLUSTER 'events' AS fhir.{table}_local \
                 ENGINE = Distributed('events', 'fhir', '{table}_local', cityHash64(group_key))"
            );
            let position = statements.iter().position(|s| *s == expected);
            let local = statements.iter().position(|s| {
                s.starts_with(&format!("CREATE TABLE IF NOT EXISTS fhir.{table}_local "))
            });
            assert!(
                matches!((local, position), (Some(l), Some(d)) if l < d),
                "{table}: the distributed table follows its local table"
            );
        }
    }

    #[test]
    fn cluster_views_read_and_write_the_local_tables() {
        let statements = cluster();
        let views: Vec<&String> = statements
            .iter()
            .filter(|s| s.starts_with("CREATE MATERIALIZED VIEW"))
            .collect();
        assert_eq!(views.len(), 4);
        for view in views {
            assert!(view.contains("_MV ON CLUSTER 'events' TO fhir."), "{view}");
            assert!(view.contains("_local AS\n"), "{view}");
            assert!(
                view.contains("FROM fhir.Group_4_0_0_MemberSlotEvents_local"),
                "{view}"
            );
        }
    }

    #[test]
    fn topology_follows_the_settings() {
        let mut settings = ClickHouseSettings::default();
        assert_eq!(Topology::of(&settings), Topology::SingleNode);
        settings.cluster = "events".into();
        settings.replication_path = "/ch/{shard}/".into();
        assert_eq!(
            Topology::of(&settings),
            Topology::Cluster {
                name: "events",
                replication_path: "/ch/{shard}",
                replica_name: "{replica}"
            }
        );
        assert!(statements_for(&settings)[1].contains("'/ch/{shard}/fhir_group_proxy/"));
    }
}
