//! `fhir-group-proxy bench`: the same workload against the legacy FHIR server
//! directly and through the proxy, reported side by side.
//!
//! - [`workload`]: request mix, kind schedule, measured cells, bodies (pure).
//! - [`stats`]: percentiles, summaries, ratios (pure).
//! - [`report`]: JSON and Markdown report (pure).
//! - [`chart`]: the latency chart as SVG.
//! - [`runner`]: the HTTP side.

pub mod chart;
pub mod report;
pub mod runner;
pub mod stats;
pub mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use thiserror::Error;

use report::{CellReport, Report, Target, TargetReport};
use runner::{CellRun, Endpoint, Runner, RunnerError, Stop};
use stats::Ratios;
use workload::{Cell, Mix, Plan, RequestKind, DEFAULT_MIX};

/// Settings of `fhir-group-proxy bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// FHIR base URL of the legacy server, measured directly
    #[arg(long, default_value = "http://127.0.0.1:18080/4_0_0")]
    pub legacy: String,
    /// FHIR base URL of the proxy in front of that legacy server
    #[arg(long, default_value = "http://127.0.0.1:8080/4_0_0")]
    pub proxy: String,
    /// Members of the Groups measured, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    pub group_sizes: Vec<usize>,
    /// Concurrent clients, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub concurrency: Vec<usize>,
    /// Seconds each (group size, concurrency) cell runs on each target
    #[arg(long, default_value_t = 4)]
    pub duration_secs: u64,
    /// Requests per cell and target instead of a duration
    #[arg(long)]
    pub requests: Option<u64>,
    /// Relative weights of request kinds: patch (member PATCH), read (whole
    /// Group), summary (Group with _summary=true), passthrough (a Patient read)
    #[arg(long, default_value = DEFAULT_MIX)]
    pub mix: Mix,
    /// Measure every (group size, concurrency) pair, not only the sizes at the
    /// middle concurrency and the concurrencies at the middle size
    #[arg(long)]
    pub full_matrix: bool,
    /// Seconds before a request counts as failed (timeout)
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Directory for report.md, report.json and latency.svg
    #[arg(long, default_value = "bench-results")]
    pub out: PathBuf,
}

#[derive(Debug, Error)]
pub enum LoadTestError {
    #[error("bench setting {setting} is not valid: {reason}")]
    Setting {
        setting: &'static str,
        reason: String,
    },
    #[error(transparent)]
    Setup(#[from] RunnerError),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Chart(#[from] chart::ChartError),
}

fn setting(setting: &'static str, reason: impl Into<String>) -> LoadTestError {
    LoadTestError::Setting {
        setting,
        reason: reason.into(),
    }
}

/// Most concurrent clients per cell: far beyond what a 2-core machine drives,
/// and it keeps a typo from opening thousands of connections.
const MAX_CONCURRENCY: usize = 1_024;

fn check_base_url(flag: &'static str, raw: &str) -> Result<(), LoadTestError> {
    let url = url::Url::parse(raw).map_err(|e| setting(flag, format!("{raw:?}: {e}")))?;
    if url.scheme() != "http" {
        return Err(setting(
            flag,
            format!("{raw:?}: only http:// targets are supported"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(setting(
            flag,
            format!("{raw:?}: a FHIR base URL has no query or fragment"),
        ));
    }
    Ok(())
}

impl BenchArgs {
    /// The cells to measure, after checking every setting.
    pub fn plan(&self) -> Result<Plan, LoadTestError> {
        check_base_url("--legacy", &self.legacy)?;
        check_base_url("--proxy", &self.proxy)?;
        if self.group_sizes.contains(&0) {
            return Err(setting("--group-sizes", "a Group needs at least 1 member"));
        }
        if self
            .concurrency
            .iter()
            .any(|&c| c == 0 || c > MAX_CONCURRENCY)
        {
            return Err(setting(
                "--concurrency",
                format!("each value must be from 1 to {MAX_CONCURRENCY}"),
            ));
        }
        if self.requests == Some(0) {
            return Err(setting("--requests", "must be at least 1"));
        }
        if self.requests.is_none() && self.duration_secs == 0 {
            return Err(setting("--duration-secs", "must be at least 1"));
        }
        if self.timeout_secs == 0 {
            return Err(setting("--timeout-secs", "must be at least 1"));
        }
        Plan::new(&self.group_sizes, &self.concurrency, self.full_matrix)
            .ok_or_else(|| setting("--group-sizes/--concurrency", "both need a value"))
    }

    pub fn stop(&self) -> Stop {
        match self.requests {
            Some(requests) => Stop::Requests(requests),
            None => Stop::After(Duration::from_secs(self.duration_secs)),
        }
    }

    fn stop_description(&self) -> String {
        match self.stop() {
            Stop::Requests(n) => format!("{n} requests per cell"),
            Stop::After(duration) => format!("{} s per cell", duration.as_secs()),
        }
    }
}

fn target_report(run: &CellRun) -> TargetReport {
    TargetReport {
        elapsed_s: run.elapsed.as_secs_f64(),
        overall: stats::summarize(&run.samples, run.elapsed),
        by_kind: stats::summarize_by_kind(&run.samples, run.elapsed),
        failures: stats::failures(&run.samples),
    }
}

/// Deletes what the run created; failures are logged, not fatal: the
/// measurements are done.
async fn remove(runner: &Runner, endpoint: &Endpoint, path: &str) {
    if let Err(e) = runner.delete(endpoint, path).await {
        tracing::warn!("clean-up: {e}");
    }
}

/// Measures the cells of one group size on one target, on a Group created
/// for them and deleted afterwards.
///
/// Only one benchmark Group exists at a time: on the demo stack both targets
/// share one MongoDB database, and FerretDB's SQLite backend scans a whole
/// collection for every query, so a big Group of one target left in place
/// would slow down every query of the other.
async fn measure_size(
    runner: &Runner,
    endpoint: &Endpoint,
    patient: &str,
    cells: &[Cell],
    args: &BenchArgs,
    schedule: &Arc<[RequestKind]>,
) -> Result<(Vec<TargetReport>, Duration), RunnerError> {
    let Some(size) = cells.first().map(|c| c.group_size) else {
        return Ok((Vec::new(), Duration::ZERO));
    };
    let creating = Instant::now();
    let group = runner.create_group(endpoint, size).await?;
    let setup = creating.elapsed();
    tracing::info!(
        target_name = endpoint.target.name(),
        size,
        group,
        seconds = setup.as_secs_f64(),
        "Group created"
    );
    let mut reports = Vec::with_capacity(cells.len());
    for &cell in cells {
        let run = runner
            .run_cell(
                endpoint,
                &group,
                patient,
                cell,
                args.stop(),
                schedule.clone(),
            )
            .await;
        let report = target_report(&run);
        tracing::info!(
            target_name = endpoint.target.name(),
            members = cell.group_size,
            clients = cell.concurrency,
            requests = report.overall.requests,
            errors = report.overall.errors,
            per_s = format!("{:.1}", report.overall.throughput_per_s),
            p50_ms = format!("{:.1}", report.overall.p50_ms),
            p99_ms = format!("{:.1}", report.overall.p99_ms),
            "cell measured"
        );
        reports.push(report);
    }
    remove(runner, endpoint, &format!("Group/{group}")).await;
    Ok((reports, setup))
}

/// Runs the comparison: per group size, on the legacy server and then
/// through the proxy, creates a Group of that size, measures the cells of that
/// size, and deletes the Group; one Patient per target serves passthrough reads.
pub async fn run(args: &BenchArgs) -> Result<Report, LoadTestError> {
    let plan = args.plan()?;
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let runner = Runner::new(Duration::from_secs(args.timeout_secs));
    let endpoints = [
        Endpoint::new(Target::Legacy, &args.legacy),
        Endpoint::new(Target::Proxy, &args.proxy),
    ];
    let mut patients: Vec<String> = Vec::with_capacity(2);
    for endpoint in &endpoints {
        match runner.create_patient(endpoint).await {
            Ok(id) => patients.push(id),
            Err(e) => {
                for (endpoint, id) in endpoints.iter().zip(&patients) {
                    remove(&runner, endpoint, &format!("Patient/{id}")).await;
                }
                return Err(e.into());
            }
        }
    }
    let schedule: Arc<[RequestKind]> = args.mix.schedule().into();
    let mut setup = Duration::ZERO;
    let mut cells = Vec::with_capacity(plan.cells.len());
    let mut failure = None;
    'sizes: for size in plan.group_sizes() {
        let of_size: Vec<Cell> = plan
            .cells
            .iter()
            .copied()
            .filter(|c| c.group_size == size)
            .collect();
        let mut per_target = Vec::with_capacity(2);
        for (endpoint, patient) in endpoints.iter().zip(&patients) {
            match measure_size(&runner, endpoint, patient, &of_size, args, &schedule).await {
                Ok((reports, seconds)) => {
                    setup += seconds;
                    per_target.push(reports);
                }
                Err(e) => {
                    failure = Some(e);
                    break 'sizes;
                }
            }
        }
        let (Some(proxy), Some(legacy)) = (per_target.pop(), per_target.pop()) else {
            continue;
        };
        for ((cell, legacy), proxy) in of_size.into_iter().zip(legacy).zip(proxy) {
            cells.push(CellReport {
                cell,
                ratios: Ratios::of(&legacy.overall, &proxy.overall),
                legacy,
                proxy,
            });
        }
    }
    for (endpoint, id) in endpoints.iter().zip(&patients) {
        remove(&runner, endpoint, &format!("Patient/{id}")).await;
    }
    if let Some(failure) = failure {
        return Err(failure.into());
    }
    Ok(Report {
        legacy_url: args.legacy.clone(),
        proxy_url: args.proxy.clone(),
        mix: args.mix.to_string(),
        stop: args.stop_description(),
        request_timeout_s: args.timeout_secs,
        plan,
        started_at,
        setup_s: setup.as_secs_f64(),
        total_s: started.elapsed().as_secs_f64(),
        cells,
    })
}

/// The files [`write_outputs`] wrote.
#[derive(Debug, Clone)]
pub struct Outputs {
    pub markdown: PathBuf,
    pub json: PathBuf,
    pub chart: PathBuf,
}

/// Writes `report.md`, `report.json` and `latency.svg` into `dir` (created if
/// needed).
pub fn write_outputs(report: &Report, dir: &Path) -> Result<Outputs, LoadTestError> {
    let write = |name: &str, contents: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, contents).map_err(|source| LoadTestError::Write {
            path: path.display().to_string(),
            source,
        })?;
        Ok::<_, LoadTestError>(path)
    };
    std::fs::create_dir_all(dir).map_err(|source| LoadTestError::Write {
        path: dir.display().to_string(),
        source,
    })?;
    let json = serde_json::to_vec_pretty(report).map_err(|e| LoadTestError::Write {
        path: dir.join("report.json").display().to_string(),
        source: e.into(),
    })?;
    let chart = dir.join("latency.svg");
    chart::write_svg(report, &chart)?;
    Ok(Outputs {
        markdown: write("report.md", report::markdown(report).as_bytes())?,
        json: write("report.json", &json)?,
        chart,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::try_parse_from(std::iter::once("bench").chain(args.iter().copied()))
            .unwrap()
            .bench
    }

    #[test]
    fn defaults_measure_the_demo_stack() {
        let args = parse(&[]);
        assert_eq!(args.legacy, "http://127.0.0.1:18080/4_0_0");
        assert_eq!(args.proxy, "http://127.0.0.1:8080/4_0_0");
        assert_eq!(args.mix.to_string(), DEFAULT_MIX);
        assert_eq!(args.stop(), Stop::After(Duration::from_secs(4)));
        assert_eq!(args.plan().unwrap().cells.len(), 5);
    }

    #[test]
    fn flags_set_the_workload() {
        let args = parse(&[
            "--group-sizes",
            "10,20",
            "--concurrency",
            "1,2",
            "--requests",
            "12",
            "--mix",
            "patch=1,read=1",
            "--full-matrix",
        ]);
        assert_eq!(args.stop(), Stop::Requests(12));
        assert_eq!(args.stop_description(), "12 requests per cell");
        assert_eq!(args.plan().unwrap().cells.len(), 4);
        assert!(Cli::try_parse_from(["bench", "--mix", "patch"]).is_err());
    }

    #[test]
    fn bad_settings_name_the_flag() {
        for (flags, flag) in [
            (&["--legacy", "https://x/4_0_0"][..], "--legacy"),
            (&["--proxy", "not a url"][..], "--proxy"),
            (&["--group-sizes", "0"][..], "--group-sizes"),
            (&["--concurrency", "0"][..], "--concurrency"),
            (&["--concurrency", "5000"][..], "--concurrency"),
            (&["--requests", "0"][..], "--requests"),
            (&["--duration-secs", "0"][..], "--duration-secs"),
        ] {
            let err = parse(flags).plan().unwrap_err().to_string();
            assert!(err.contains(flag), "{flags:?}: {err}");
        }
    }

    #[test]
    fn outputs_are_written_to_the_directory() {
        let plan = Plan::new(&[100, 1_000], &[1, 8], false).unwrap();
        let report = report::tests::sample_report(plan);
        let dir = std::env::temp_dir().join(format!("fgp-bench-{}", uuid::Uuid::new_v4()));
        let outputs = write_outputs(&report, &dir.join("nested")).unwrap();
        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&outputs.json).unwrap()).unwrap();
        assert_eq!(json["cells"].as_array().unwrap().len(), 3);
        let markdown = std::fs::read_to_string(&outputs.markdown).unwrap();
        assert!(markdown.contains("legacy/proxy p50"));
        assert!(std::fs::read_to_string(&outputs.chart)
            .unwrap()
            .starts_with("<svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
