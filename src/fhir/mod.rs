//! Pure FHIR logic: resources, OperationOutcome, JSON Patch analysis. No I/O here,
//! so everything in this module is unit-tested without servers.

pub mod atr;
pub mod document_patch;
pub mod group_read;
pub mod group_resource;
pub mod group_search;
pub mod json_limits;
pub mod member_array;
pub mod member_patch;
pub mod migration;
pub mod outcome;
pub mod reference;
pub mod roster_replace;
pub mod written_groups;

/// Media type of FHIR JSON responses.
pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";
