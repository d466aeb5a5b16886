//! Prometheus metrics of the whole process, served by the admin listener.
//!
//! One registry per process: the proxy is one process, and a global lets the
//! store layer (group commit, MongoDB command monitoring) record without every
//! constructor carrying a handle.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus::{
    exponential_buckets, Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Latency buckets in seconds: 1 ms to 30 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = prometheus::TEXT_FORMAT;

pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    requests_in_flight: IntGauge,
    upstream_errors: IntCounterVec,
    batch_rows: HistogramVec,
    batch_writers: HistogramVec,
    flush_duration: HistogramVec,
    mongo_command_duration: HistogramVec,
    drift_detected: IntCounterVec,
    history_entries_lost: IntCounterVec,
    clickhouse_statements: IntCounterVec,
}

/// Who answered a request: the proxy itself, or the legacy server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    Intercepted,
    Forwarded,
}

impl Disposition {
    pub fn label(self) -> &'static str {
        match self {
            Disposition::Intercepted => "intercepted",
            Disposition::Forwarded => "forwarded",
        }
    }
}

/// Which HTTP client met an upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamClientKind {
    /// pingora's own forwarding of passthrough requests.
    Pingora,
    /// The proxy's client for requests it sends itself (split patches, reads, large bodies).
    Direct,
}

pub fn metrics() -> &'static Metrics {
    static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        let registry = Registry::new();
        let latency = || LATENCY_BUCKETS.to_vec();
        Self {
            requests: counter(
                &registry,
                "fgp_http_requests_total",
                "Requests answered, by route, method, status and disposition (intercepted: answered by the proxy; forwarded: by the legacy server)",
                &["route", "method", "status", "disposition"],
            ),
            request_duration: histogram(
                &registry,
                "fgp_http_request_duration_seconds",
                "Time from request head to the end of the response",
                latency(),
                &["route", "method", "disposition"],
            ),
            requests_in_flight: register(
                &registry,
                IntGauge::new("fgp_http_requests_in_flight", "Requests being handled now"),
            ),
            upstream_errors: counter(
                &registry,
                "fgp_upstream_errors_total",
                "Requests to the legacy server that failed (502 unreachable or broken, 504 timeout), by client",
                &["status", "client"],
            ),
            batch_rows: histogram(
                &registry,
                "fgp_clickhouse_batch_rows",
                "Rows per ClickHouse group-commit flush, by writer (staging: staged member events; publishing: published member events; publishing_staged: writes published from the staging table)",
                exponential_buckets(1.0, 4.0, 9).expect("valid buckets"),
                &["writer"],
            ),
            batch_writers: histogram(
                &registry,
                "fgp_clickhouse_batch_writers",
                "Concurrent writes sharing one ClickHouse group-commit flush",
                exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
                &["writer"],
            ),
            flush_duration: histogram(
                &registry,
                "fgp_clickhouse_flush_duration_seconds",
                "Duration of one ClickHouse group-commit flush, by writer and outcome",
                latency(),
                &["writer", "outcome"],
            ),
            mongo_command_duration: histogram(
                &registry,
                "fgp_mongo_command_duration_seconds",
                "Duration of MongoDB commands sent by the proxy, by command and outcome",
                latency(),
                &["command", "outcome"],
            ),
            drift_detected: counter(
                &registry,
                "fgp_group_drift_detected_total",
                "Requests refused because a managed Group's document gained an inline member array written around the proxy",
                &[],
            ),
            history_entries_lost: counter(
                &registry,
                "fgp_history_entries_lost_total",
                "History entries of committed member writes that recovery could not rebuild (the Group changed after the write)",
                &[],
            ),
            clickhouse_statements: counter(
                &registry,
                "fgp_clickhouse_statements_total",
                "Statements the member store sent to ClickHouse, by kind (query, insert)",
                &["kind"],
            ),
            registry,
        }
    }

    pub fn history_entries_lost(&self, entries: usize) {
        self.history_entries_lost
            .with_label_values(&[] as &[&str])
            .inc_by(entries as u64);
    }

    pub fn drift_detected(&self) {
        self.drift_detected.with_label_values(&[] as &[&str]).inc();
    }

    pub fn request_done(
        &self,
        route: &str,
        method: &http::Method,
        status: u16,
        disposition: Disposition,
        elapsed: Duration,
    ) {
        let method = method_label(method);
        let status = StatusLabel::new(status);
        self.requests
            .with_label_values(&[route, method, status.as_str(), disposition.label()])
            .inc();
        self.request_duration
            .with_label_values(&[route, method, disposition.label()])
            .observe(elapsed.as_secs_f64());
    }

    pub fn upstream_error(&self, status: u16, client: UpstreamClientKind) {
        let client = match client {
            UpstreamClientKind::Pingora => "pingora",
            UpstreamClientKind::Direct => "direct",
        };
        self.upstream_errors
            .with_label_values(&[StatusLabel::new(status).as_str(), client])
            .inc();
    }

    pub fn batch_flushed(
        &self,
        writer: &str,
        rows: usize,
        writers: usize,
        elapsed: Duration,
        ok: bool,
    ) {
        self.batch_rows
            .with_label_values(&[writer])
            .observe(rows as f64);
        self.batch_writers
            .with_label_values(&[writer])
            .observe(writers as f64);
        self.flush_duration
            .with_label_values(&[writer, outcome_label(ok)])
            .observe(elapsed.as_secs_f64());
    }

    pub fn clickhouse_statement(&self, kind: &'static str) {
        self.clickhouse_statements.with_label_values(&[kind]).inc();
    }

    pub fn mongo_command(&self, command: &str, elapsed: Duration, ok: bool) {
        self.mongo_command_duration
            .with_label_values(&[command, outcome_label(ok)])
            .observe(elapsed.as_secs_f64());
    }

    /// The Prometheus text exposition of every metric, with the in-flight
    /// gauge set to `in_flight` (counted by the shutdown logic, read here).
    pub fn render(&self, in_flight: usize) -> String {
        self.requests_in_flight.set(in_flight as i64);
        let mut text = Vec::new();
        if let Err(error) = TextEncoder::new().encode(&self.registry.gather(), &mut text) {
            return format!("# metrics cannot be encoded: {error}\n");
        }
        String::from_utf8_lossy(&text).into_owned()
    }
}

// The definitions are constants of this module: an error is a programming
// mistake caught by the unit tests, hence `expect`.
fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    let metric = metric.expect("valid metric definition");
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique");
    metric
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(registry, IntCounterVec::new(Opts::new(name, help), labels))
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    buckets: Vec<f64>,
    labels: &[&str],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets);
    register(registry, HistogramVec::new(opts, labels))
}

fn outcome_label(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "error"
    }
}

/// A status code as a label value, without formatting it on every request.
struct StatusLabel(Option<http::StatusCode>);

impl StatusLabel {
    fn new(status: u16) -> Self {
        Self(http::StatusCode::from_u16(status).ok())
    }

    /// "0" when no response was written.
    fn as_str(&self) -> &str {
        self.0.as_ref().map_or("0", http::StatusCode::as_str)
    }
}

/// Standard methods by name; anything else as "other", so a client cannot
/// create label values at will.
pub fn method_label(method: &http::Method) -> &'static str {
    use http::Method;
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_labels_are_the_codes_and_zero_without_a_response() {
        assert_eq!(StatusLabel::new(200).as_str(), "200");
        assert_eq!(StatusLabel::new(504).as_str(), "504");
        assert_eq!(StatusLabel::new(0).as_str(), "0");
    }

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&http::Method::PATCH), "PATCH");
        let custom = http::Method::from_bytes(b"PROPFIND").unwrap();
        assert_eq!(method_label(&custom), "other");
    }

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        let metrics = metrics();
        metrics.request_done(
            "group_patch",
            &http::Method::PATCH,
            200,
            Disposition::Intercepted,
            Duration::from_millis(12),
        );
        metrics.batch_flushed("staging", 7, 2, Duration::from_millis(3), true);
        metrics.upstream_error(504, UpstreamClientKind::Direct);
        let text = metrics.render(3);
        assert!(
            text.contains(r#"fgp_http_requests_total{disposition="intercepted",method="PATCH",route="group_patch",status="200"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fgp_clickhouse_batch_rows_sum{writer="staging"}"#),
            "{text}"
        );
        assert!(
            text.contains(r#"fgp_upstream_errors_total{client="direct",status="504"}"#),
            "{text}"
        );
        assert!(text.contains("fgp_http_requests_in_flight 3"), "{text}");
    }
}
