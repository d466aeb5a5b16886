//! Latency statistics of a measured cell, free of I/O.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

use super::workload::RequestKind;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// A 2xx status.
    Success,
    /// Any other status.
    Status(u16),
    /// No response within the request timeout.
    Timeout,
    /// The connection failed (refused, reset, ...).
    Transport,
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Success)
    }

    /// How the failure is counted in reports: the status, `timeout` or `transport`.
    pub fn label(&self) -> String {
        match self {
            Outcome::Success => "success".into(),
            Outcome::Status(status) => status.to_string(),
            Outcome::Timeout => "timeout".into(),
            Outcome::Transport => "transport".into(),
        }
    }
}

/// One completed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub kind: RequestKind,
    pub latency: Duration,
    pub outcome: Outcome,
}

/// Requests, errors, throughput and latency percentiles of a set of samples.
///
/// Latencies cover every request, failed ones too (a client waited for them);
/// throughput counts successful requests only, so a target failing fast does
/// not look fast.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Summary {
    pub requests: u64,
    pub errors: u64,
    pub throughput_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// The `p`-th percentile (0 < p <= 100) of ascending `sorted` values, by the
/// nearest-rank method: a value that was really measured, never interpolated.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() || !(p > 0.0 && p <= 100.0) {
        return None;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

/// Summarizes `samples` completed within `elapsed` wall time.
pub fn summarize<'a>(samples: impl IntoIterator<Item = &'a Sample>, elapsed: Duration) -> Summary {
    let mut latencies_ms = Vec::new();
    let mut errors = 0u64;
    for sample in samples {
        latencies_ms.push(sample.latency.as_secs_f64() * 1e3);
        errors += u64::from(!sample.outcome.is_success());
    }
    latencies_ms.sort_by(f64::total_cmp);
    let requests = latencies_ms.len() as u64;
    let seconds = elapsed.as_secs_f64();
    let at = |p| percentile(&latencies_ms, p).unwrap_or(0.0);
    Summary {
        requests,
        errors,
        throughput_per_s: if seconds > 0.0 {
            (requests - errors) as f64 / seconds
        } else {
            0.0
        },
        p50_ms: at(50.0),
        p90_ms: at(90.0),
        p99_ms: at(99.0),
        max_ms: at(100.0),
    }
}

/// Per request kind, the summary of its samples (same wall time: throughput is
/// that kind's share).
pub fn summarize_by_kind(samples: &[Sample], elapsed: Duration) -> BTreeMap<RequestKind, Summary> {
    RequestKind::ALL
        .into_iter()
        .filter_map(|kind| {
            let of_kind: Vec<&Sample> = samples.iter().filter(|s| s.kind == kind).collect();
            (!of_kind.is_empty()).then(|| (kind, summarize(of_kind, elapsed)))
        })
        .collect()
}

/// How often each failure happened, by [`Outcome::label`].
pub fn failures(samples: &[Sample]) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for sample in samples.iter().filter(|s| !s.outcome.is_success()) {
        *counts.entry(sample.outcome.label()).or_insert(0) += 1;
    }
    counts
}

/// `numerator / denominator`, or `None` when the denominator is not above 0.
pub fn ratio(numerator: f64, denominator: f64) -> Option<f64> {
    (denominator > 0.0).then(|| numerator / denominator)
}

/// The legacy/proxy comparison of one cell.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Ratios {
    /// legacy p50 / proxy p50: above 1, the proxy answers faster.
    pub p50_legacy_over_proxy: Option<f64>,
    /// legacy p99 / proxy p99.
    pub p99_legacy_over_proxy: Option<f64>,
    /// proxy throughput / legacy throughput: above 1, the proxy serves more.
    pub throughput_proxy_over_legacy: Option<f64>,
}

impl Ratios {
    pub fn of(legacy: &Summary, proxy: &Summary) -> Ratios {
        Ratios {
            p50_legacy_over_proxy: ratio(legacy.p50_ms, proxy.p50_ms),
            p99_legacy_over_proxy: ratio(legacy.p99_ms, proxy.p99_ms),
            throughput_proxy_over_legacy: ratio(proxy.throughput_per_s, legacy.throughput_per_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(kind: RequestKind, ms: u64, outcome: Outcome) -> Sample {
        Sample {
            kind,
            latency: Duration::from_millis(ms),
            outcome,
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let values: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&values, 50.0), Some(50.0));
        assert_eq!(percentile(&values, 90.0), Some(90.0));
        assert_eq!(percentile(&values, 99.0), Some(99.0));
        assert_eq!(percentile(&values, 100.0), Some(100.0));
        assert_eq!(percentile(&values, 0.5), Some(1.0));
        let few = [10.0, 20.0, 30.0];
        assert_eq!(percentile(&few, 50.0), Some(20.0));
        assert_eq!(percentile(&few, 99.0), Some(30.0));
        assert_eq!(percentile(&[7.0], 1.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&few, 0.0), None);
        assert_eq!(percentile(&few, 101.0), None);
    }

    #[test]
    fn summary_counts_errors_in_latency_but_not_in_throughput() {
        let samples = vec![
            sample(RequestKind::Patch, 30, Outcome::Success),
            sample(RequestKind::Patch, 10, Outcome::Success),
            sample(RequestKind::Read, 20, Outcome::Status(503)),
            sample(RequestKind::Read, 40, Outcome::Timeout),
        ];
        let summary = summarize(&samples, Duration::from_secs(2));
        assert_eq!(summary.requests, 4);
        assert_eq!(summary.errors, 2);
        assert_eq!(summary.throughput_per_s, 1.0);
        assert_eq!(summary.p50_ms, 20.0);
        assert_eq!(summary.p99_ms, 40.0);
        assert_eq!(summary.max_ms, 40.0);

        let by_kind = summarize_by_kind(&samples, Duration::from_secs(2));
        assert_eq!(by_kind.len(), 2);
        assert_eq!(by_kind[&RequestKind::Patch].p50_ms, 10.0);
        assert_eq!(by_kind[&RequestKind::Read].errors, 2);

        let failed = failures(&samples);
        assert_eq!(failed.get("503"), Some(&1));
        assert_eq!(failed.get("timeout"), Some(&1));
        assert_eq!(failed.len(), 2);
    }

    #[test]
    fn empty_cells_summarize_to_zeros() {
        let summary = summarize(&[], Duration::ZERO);
        assert_eq!(summary.requests, 0);
        assert_eq!(summary.throughput_per_s, 0.0);
        assert_eq!(summary.p99_ms, 0.0);
    }

    #[test]
    fn ratios_compare_legacy_with_proxy() {
        let legacy = summarize(
            &[sample(RequestKind::Patch, 100, Outcome::Success)],
            Duration::from_secs(1),
        );
        let proxy = summarize(
            &[
                sample(RequestKind::Patch, 25, Outcome::Success),
                sample(RequestKind::Patch, 25, Outcome::Success),
            ],
            Duration::from_secs(1),
        );
        let ratios = Ratios::of(&legacy, &proxy);
        assert_eq!(ratios.p50_legacy_over_proxy, Some(4.0));
        assert_eq!(ratios.p99_legacy_over_proxy, Some(4.0));
        assert_eq!(ratios.throughput_proxy_over_legacy, Some(2.0));
        let nothing = summarize(&[], Duration::from_secs(1));
        assert_eq!(Ratios::of(&legacy, &nothing).p50_legacy_over_proxy, None);
    }
}
