//! The results of a load test, as JSON (serde) and as a Markdown report.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use super::stats::{Ratios, Summary};
use super::workload::{Cell, Plan, RequestKind};

/// The two measured targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    /// The legacy FHIR server, directly.
    Legacy,
    /// The same through fhir-group-proxy.
    Proxy,
}

impl Target {
    pub const BOTH: [Target; 2] = [Target::Legacy, Target::Proxy];

    pub fn name(self) -> &'static str {
        match self {
            Target::Legacy => "legacy",
            Target::Proxy => "proxy",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub legacy_url: String,
    pub proxy_url: String,
    pub mix: String,
    /// How long each cell ran, e.g. `5 s per cell` or `200 requests per cell`.
    pub stop: String,
    pub request_timeout_s: u64,
    pub plan: Plan,
    pub started_at: String,
    /// Creating the Groups on both targets (seeding members included).
    pub setup_s: f64,
    /// The whole run, setup and clean-up included.
    pub total_s: f64,
    pub cells: Vec<CellReport>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CellReport {
    #[serde(flatten)]
    pub cell: Cell,
    pub legacy: TargetReport,
    pub proxy: TargetReport,
    pub ratios: Ratios,
}

impl CellReport {
    pub fn target(&self, target: Target) -> &TargetReport {
        match target {
            Target::Legacy => &self.legacy,
            Target::Proxy => &self.proxy,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub elapsed_s: f64,
    pub overall: Summary,
    pub by_kind: BTreeMap<RequestKind, Summary>,
    /// Failed requests by status, `timeout` or `transport`.
    pub failures: BTreeMap<String, u64>,
}

fn times(value: Option<f64>) -> String {
    value.map_or_else(|| "-".into(), |v| format!("{v:.1}x"))
}

fn failures(report: &TargetReport) -> String {
    if report.failures.is_empty() {
        return "0".into();
    }
    let parts: Vec<String> = report
        .failures
        .iter()
        .map(|(what, count)| format!("{count} {what}"))
        .collect();
    parts.join(", ")
}

/// The report as Markdown: settings, then the targets side by side per cell,
/// then the latency of each request kind.
pub fn markdown(report: &Report) -> String {
    let mut out = String::new();
    let plan = &report.plan;
    // Writing to a String cannot fail.
    let _ = writeln!(out, "# Load-testing comparison: legacy vs proxy\n");
    let _ = writeln!(
        out,
        "- legacy: `{}` (directly)\n- proxy: `{}`\n- mix: `{}`; {}; request timeout {} s\n\
         - started {}; setup {:.1} s; whole run {:.1} s\n\
         - latency vs group size at {} concurrent clients; vs concurrency at {} members\n",
        report.legacy_url,
        report.proxy_url,
        report.mix,
        report.stop,
        report.request_timeout_s,
        report.started_at,
        report.setup_s,
        report.total_s,
        plan.size_sweep_concurrency,
        plan.concurrency_sweep_size,
    );
    let _ = writeln!(
        out,
        "All requests of a cell go to one Group of that many members. Latency in ms over \
         every request (failed ones too); req/s counts successful requests. \
         legacy/proxy above 1: the proxy is faster.\n"
    );
    let _ = writeln!(
        out,
        "| members | clients | legacy req/s | proxy req/s | legacy p50 | proxy p50 | legacy p90 | proxy p90 | legacy p99 | proxy p99 | legacy/proxy p50 | legacy/proxy p99 | legacy errors | proxy errors |"
    );
    let _ = writeln!(
        out,
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for cell in &report.cells {
        let (l, p) = (&cell.legacy.overall, &cell.proxy.overall);
        let _ = writeln!(
            out,
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} | {} of {} | {} of {} |",
            cell.cell.group_size,
            cell.cell.concurrency,
            l.throughput_per_s,
            p.throughput_per_s,
            l.p50_ms,
            p.p50_ms,
            l.p90_ms,
            p.p90_ms,
            l.p99_ms,
            p.p99_ms,
            times(cell.ratios.p50_legacy_over_proxy),
            times(cell.ratios.p99_legacy_over_proxy),
            failures(&cell.legacy),
            l.requests,
            failures(&cell.proxy),
            p.requests,
        );
    }
    let _ = writeln!(out, "\nBy request kind (p50 / p99 ms, requests):\n");
    let _ = writeln!(out, "| members | clients | kind | legacy | proxy |");
    let _ = writeln!(out, "|---:|---:|---|---:|---:|");
    for cell in &report.cells {
        for kind in RequestKind::ALL {
            let shown: Vec<String> = Target::BOTH
                .into_iter()
                .map(|t| {
                    cell.target(t).by_kind.get(&kind).map_or_else(
                        || "-".into(),
                        |s| format!("{:.1} / {:.1} ({})", s.p50_ms, s.p99_ms, s.requests),
                    )
                })
                .collect();
            if shown.iter().all(|s| s == "-") {
                continue;
            }
            let _ = writeln!(
                out,
                "| {} | {} | {kind} | {} | {} |",
                cell.cell.group_size, cell.cell.concurrency, shown[0], shown[1]
            );
        }
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::loadtest::stats::{summarize, summarize_by_kind, Outcome, Sample};
    use std::time::Duration;

    fn target_report(latencies_ms: &[u64], failed_status: Option<u16>) -> TargetReport {
        let mut samples: Vec<Sample> = latencies_ms
            .iter()
            .map(|&ms| Sample {
                kind: RequestKind::Patch,
                latency: Duration::from_millis(ms),
                outcome: Outcome::Success,
            })
            .collect();
        if let Some(status) = failed_status {
            samples.push(Sample {
                kind: RequestKind::Read,
                latency: Duration::from_millis(5),
                outcome: Outcome::Status(status),
            });
        }
        let elapsed = Duration::from_secs(1);
        TargetReport {
            elapsed_s: 1.0,
            overall: summarize(&samples, elapsed),
            by_kind: summarize_by_kind(&samples, elapsed),
            failures: crate::loadtest::stats::failures(&samples),
        }
    }

    /// A report over `plan` whose legacy latency grows with the group size and
    /// the concurrency, and whose proxy latency stays flat.
    pub(crate) fn sample_report(plan: Plan) -> Report {
        let cells = plan
            .cells
            .iter()
            .map(|&cell| {
                let legacy_ms = (cell.group_size as u64 / 10 + 1) * cell.concurrency as u64;
                let legacy = target_report(&[legacy_ms, legacy_ms * 2], None);
                let proxy = target_report(&[3, 4, 5], Some(503));
                CellReport {
                    cell,
                    ratios: Ratios::of(&legacy.overall, &proxy.overall),
                    legacy,
                    proxy,
                }
            })
            .collect();
        Report {
            legacy_url: "http://127.0.0.1:18080/4_0_0".into(),
            proxy_url: "http://127.0.0.1:8080/4_0_0".into(),
            mix: "patch=1".into(),
            stop: "1 s per cell".into(),
            request_timeout_s: 30,
            plan,
            started_at: "2026-01-01T00:00:00Z".into(),
            setup_s: 1.0,
            total_s: 2.0,
            cells,
        }
    }

    #[test]
    fn markdown_shows_both_targets_per_cell_with_ratios_and_failures() {
        let plan = Plan::new(&[100, 1_000], &[1, 8], false).unwrap();
        let text = markdown(&sample_report(plan));
        assert!(
            text.contains("| 100 | 8 | 2.0 | 3.0 | 88.0 | 4.0 |"),
            "{text}"
        );
        assert!(
            text.contains("| 22.0x | 35.2x | 0 of 2 | 1 503 of 4 |"),
            "{text}"
        );
        assert!(
            text.contains("| 1000 | 1 | patch | 101.0 / 202.0 (2) | 4.0 / 5.0 (3) |"),
            "{text}"
        );
        assert!(
            text.contains("| 1000 | 1 | read | - | 5.0 / 5.0 (1) |"),
            "{text}"
        );
    }

    #[test]
    fn json_names_targets_and_cells() {
        let plan = Plan::new(&[10], &[2], false).unwrap();
        let json = serde_json::to_value(sample_report(plan)).unwrap();
        let cell = &json["cells"][0];
        assert_eq!(cell["group_size"], 10);
        assert_eq!(cell["concurrency"], 2);
        assert_eq!(cell["legacy"]["overall"]["requests"], 2);
        assert_eq!(cell["proxy"]["failures"]["503"], 1);
        assert!(cell["proxy"]["by_kind"]["patch"]["p50_ms"].is_number());
        assert!(cell["ratios"]["p50_legacy_over_proxy"].is_number());
    }
}
