//! Running the proxy in production: metrics, health and readiness on the
//! admin listener, trace context in logs, and graceful shutdown.

pub mod admin;
pub mod metrics;
pub mod readiness;
pub mod shutdown;
pub mod trace_context;
