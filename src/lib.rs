//! fhir-group-proxy: a FHIR-aware reverse proxy in front of a legacy
//! MongoDB-backed FHIR R4 server.
//!
//! - [`proxy`]: pingora glue and routing.
//! - [`fhir`]: pure FHIR and JSON Patch logic, no I/O.
//! - [`store`]: ClickHouse (member events) and MongoDB (Group metadata).
//! - [`config`]: settings from file, environment and flags.
//! - [`operations`]: metrics, health, readiness and graceful shutdown.
//! - [`loadtest`]: `bench`, legacy server vs proxy under the same workload.

pub mod auth;
pub mod config;
pub mod fhir;
pub mod group;
pub mod loadtest;
pub mod operations;
pub mod proxy;
pub mod store;
