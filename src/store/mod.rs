//! The two stores the proxy writes: ClickHouse holds Group member events,
//! MongoDB (the legacy server's own database) holds Group metadata.

pub mod clickhouse;
pub mod events;
pub mod group_documents;
pub mod group_history;
pub mod insert_batcher;
pub mod member_commits;
pub mod member_locks;
pub mod member_requests;
pub mod member_slots;
pub mod mongo;
pub mod schema;
pub mod setup;
pub mod upgrade;
