//! The real server's bookkeeping on stored resources and its enrichment of
//! responses (`real` profile): the shared implementation of its conventions.

pub use icanbwell_conventions::*;
