//! Command-line entry point. Errors are reported here with `anyhow`, which is
//! the only place the crate uses it.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fhir_group_proxy::config::{Config, Overrides};
use tracing_subscriber::EnvFilter;

/// A FHIR-aware reverse proxy for legacy MongoDB-backed FHIR R4 servers.
///
/// Group rosters live in ClickHouse: member PATCHes (and Da Vinci ATR
/// operations) of the Groups the proxy keeps are answered by the proxy, their
/// reads get their members from ClickHouse, and requests that would reach a
/// kept roster around that path are refused with an OperationOutcome. Every
/// other request is forwarded to the upstream FHIR server unchanged and
/// streamed.
/// Settings come from a TOML file (--config; see config/fhir-group-proxy.toml),
/// each overridable by the environment variable or flag listed below
/// (flag > environment > file > default).
#[derive(Debug, Parser)]
#[command(name = "fhir-group-proxy", version, about, long_about)]
struct Cli {
    /// TOML configuration file
    #[arg(long, short, env = "FGP_CONFIG", global = true)]
    config: Option<PathBuf>,

    /// Log filter, e.g. "info" or "fhir_group_proxy=debug,pingora=warn"
    #[arg(long, env = "FGP_LOG", default_value = "info", global = true)]
    log: String,

    /// Log as JSON lines instead of human-readable text (FGP_LOG_JSON: 1/true/yes/on or 0/false/no/off)
    #[arg(
        long,
        env = "FGP_LOG_JSON",
        global = true,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    log_json: bool,

    // Global, so they may follow the subcommand; under their own heading,
    // since `bench` (which drives servers from outside) does not use them.
    #[command(
        flatten,
        next_help_heading = "Proxy settings (serve, show-config, check-stores, schema-apply, migrate; not used by bench)"
    )]
    overrides: Overrides,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy
    Serve,
    /// Print the effective configuration (secrets masked) and exit
    ShowConfig,
    /// Check that ClickHouse and MongoDB answer with the configured settings
    CheckStores,
    /// Create the ClickHouse database, tables and views (idempotent; also done at start)
    SchemaApply {
        /// Print the DDL for the configured database and topology instead of applying it
        #[arg(long)]
        print: bool,
    },
    /// Load-test the legacy server directly and through the proxy, side by side,
    /// and write report.md, report.json and latency.svg
    Bench(Box<fhir_group_proxy::loadtest::BenchArgs>),
    /// Move the inline members of existing Groups into ClickHouse (or back, with --reverse)
    ///
    /// Per Group, under its write lock: stage and publish its members as events,
    /// verify them (count and checksum read back from ClickHouse), then mark it
    /// migrated and remove its inline `member` array. Resumable and idempotent:
    /// run it again after an interruption or a failure.
    Migrate(MigrateArgs),
}

#[derive(Debug, clap::Args)]
struct MigrateArgs {
    /// Only the Groups with these ids (repeat the flag or separate with commas)
    #[arg(long = "id", value_name = "ID", value_delimiter = ',')]
    ids: Vec<String>,
    /// Only the Groups matching this MongoDB filter, as JSON, e.g. '{"type":"person"}'
    #[arg(long, value_name = "JSON")]
    query: Option<String>,
    /// Write the rosters back into the Group documents and mark the Groups not migrated
    #[arg(long, conflicts_with_all = ["check", "fold"])]
    reverse: bool,
    /// Change nothing; list managed Groups whose documents gained inline members
    /// written around the proxy (drift). Exit status 1 when any is found
    #[arg(long, conflicts_with = "fold")]
    check: bool,
    /// Fold drift in: add the inline members of drifted Groups to the member
    /// store (their attributes win), then remove the inline arrays
    #[arg(long)]
    fold: bool,
    /// Members per ClickHouse insert
    #[arg(long, default_value_t = fhir_group_proxy::group::migrate::DEFAULT_CHUNK_SIZE as u32,
          value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    chunk_size: u32,
    /// FOR TESTS ONLY: injects a fault (see src/group/migrate.rs)
    #[arg(long, env = "FGP_MIGRATE_FAULT", hide = true)]
    fault: Option<fhir_group_proxy::group::migrate::MigrationFault>,
}

// pingora's request path allocates and frees many small buffers per request;
// jemalloc (what pingora benchmarks with) costs less per pair than glibc's
// malloc there (measured with scripts/passthrough-bench.sh).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Dropped last: lines still queued are written before the process exits.
    let _log_writer = init_logging(&cli.log, cli.log_json)?;
    let config =
        Config::load(cli.config.as_deref(), &cli.overrides).context("invalid configuration")?;
    match cli.command {
        Command::ShowConfig => {
            print!("{}", config.to_redacted_toml());
            Ok(())
        }
        Command::CheckStores => check_stores(&config),
        Command::SchemaApply { print: true } => {
            let statements = fhir_group_proxy::store::schema::statements_for(&config.clickhouse);
            print!("{}", fhir_group_proxy::store::schema::script(&statements));
            Ok(())
        }
        Command::SchemaApply { print: false } => {
            let runtime = tokio::runtime::Runtime::new().context("cannot start a tokio runtime")?;
            runtime
                .block_on(fhir_group_proxy::store::setup::apply_schema(
                    &config.clickhouse,
                ))
                .context("schema apply failed")?;
            println!(
                "ClickHouse schema is in place in database {}",
                config.clickhouse.database
            );
            Ok(())
        }
        Command::Migrate(args) => migrate(&config, args),
        Command::Bench(args) => bench(&args),
        Command::Serve => {
            tracing::info!(
                listen = %config.server.listen,
                admin_listen = %config.server.admin_listen,
                upstream = %config.upstream.url,
                "fhir-group-proxy starting"
            );
            let server =
                fhir_group_proxy::proxy::build_server(config).context("cannot start the proxy")?;
            let summary = server.run().context("the proxy stopped abnormally")?;
            if summary.unfinished_requests + summary.unfinished_store_tasks > 0 {
                tracing::warn!(
                    unfinished_requests = summary.unfinished_requests,
                    unfinished_store_tasks = summary.unfinished_store_tasks,
                    drain_ms = summary.drain_time.as_millis() as u64,
                    "fhir-group-proxy stopped before all work was done"
                );
            } else {
                tracing::info!(
                    drain_ms = summary.drain_time.as_millis() as u64,
                    "fhir-group-proxy stopped; in-flight requests and member writes finished"
                );
            }
            Ok(())
        }
    }
}

fn check_stores(config: &Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("cannot start a tokio runtime")?;
    runtime.block_on(async {
        let clickhouse = fhir_group_proxy::store::clickhouse::connect(&config.clickhouse);
        let version = fhir_group_proxy::store::clickhouse::server_version(&clickhouse)
            .await
            .context("ClickHouse check failed")?;
        println!("ClickHouse {} at {}: ok", version, config.clickhouse.url);
        let mongo = fhir_group_proxy::store::mongo::connect(&config.mongo)
            .await
            .context("MongoDB check failed")?;
        fhir_group_proxy::store::mongo::ping(&mongo)
            .await
            .context("MongoDB check failed")?;
        println!("MongoDB database {}: ok", config.mongo.database);
        let collections = mongo
            .list_collection_names()
            .await
            .context("MongoDB check failed")?;
        let groups = fhir_group_proxy::store::group_documents::GROUP_COLLECTION;
        if !collections.iter().any(|name| name == groups) {
            println!(
                "note: MongoDB database {} has no {groups} collection: either no Group exists \
                 yet, or the legacy server keeps its Groups elsewhere (then the proxy forwards \
                 every Group request unchanged; check mongo.uri and mongo.database)",
                config.mongo.database
            );
        }
        Ok(())
    })
}

fn migrate(config: &Config, args: MigrateArgs) -> anyhow::Result<()> {
    use fhir_group_proxy::fhir::migration::{GroupOutcome, MigrationSummary};
    use fhir_group_proxy::group::migrate::MigrateOptions;

    let filter = migration_filter(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("cannot start a tokio runtime")?;
    runtime.block_on(async {
        fhir_group_proxy::store::setup::apply_schema(&config.clickhouse)
            .await
            .context("cannot apply the ClickHouse schema")?;
        let holder = fhir_group_proxy::group::LeaseHolder::here("migrate", &config.mongo.database);
        let service = fhir_group_proxy::group::GroupService::connect(config, holder)
            .await
            .context("cannot connect the member stores")?;
        let ids = service
            .group_ids(filter)
            .await
            .context("cannot list the Groups in MongoDB")?;
        let options = MigrateOptions {
            chunk_size: args.chunk_size as usize,
            fault: args.fault,
            fold: args.fold,
        };
        let started = std::time::Instant::now();
        let mut summary = MigrationSummary::default();
        for missing in args.ids.iter().filter(|id| ids.binary_search(id).is_err()) {
            summary.record(missing, &GroupOutcome::Failed("no Group has this id".into()));
        }
        let bar = progress_bar(ids.len() as u64);
        let mut members = 0u64;
        for id in &ids {
            bar.set_message(format!("{members} members moved; Group/{id}"));
            let mut on_members = |moved: u64| {
                members += moved;
                bar.set_message(format!("{members} members moved; Group/{id}"));
            };
            let outcome = if args.reverse {
                service.reverse_group(id, &mut on_members).await
            } else if args.check {
                service.check_group(id).await
            } else {
                service.migrate_group(id, &options, &mut on_members).await
            };
            match &outcome {
                GroupOutcome::Failed(why) => tracing::warn!(group = %id, reason = %why, "Group left as it was"),
                GroupOutcome::Skipped(why) => tracing::debug!(group = %id, reason = %why, "Group skipped"),
                GroupOutcome::Moved { members } => tracing::debug!(group = %id, members, "Group moved"),
            }
            summary.record(id, &outcome);
            bar.inc(1);
        }
        bar.finish_and_clear();
        let moved_word = match (args.reverse, args.check) {
            (true, _) => "reversed",
            (_, true) => "changed",
            _ => "migrated",
        };
        print!("{}", summary.render(moved_word, started.elapsed()));
        if !summary.succeeded() {
            anyhow::bail!(
                "{} Group(s) were left as they were; fix what the summary names and run migrate again",
                summary.failures.len()
            );
        }
        Ok(())
    })
}

/// The MongoDB filter selecting the Groups to migrate.
fn migration_filter(args: &MigrateArgs) -> anyhow::Result<mongodb::bson::Document> {
    use mongodb::bson::{doc, Document};
    let query = match &args.query {
        None => None,
        Some(text) => {
            let value: serde_json::Value =
                serde_json::from_str(text).context("--query is not valid JSON")?;
            let serde_json::Value::Object(object) = value else {
                anyhow::bail!("--query must be a JSON object (a MongoDB filter), got {text}");
            };
            Some(Document::try_from(object).context("--query is not a valid MongoDB filter")?)
        }
    };
    let ids = (!args.ids.is_empty()).then(|| doc! { "id": { "$in": &args.ids } });
    Ok(match (query, ids) {
        (Some(query), Some(ids)) => doc! { "$and": [query, ids] },
        (Some(only), None) | (None, Some(only)) => only,
        (None, None) => doc! {},
    })
}

/// Groups done out of all, on stderr; hidden when stderr is not a terminal.
fn progress_bar(groups: u64) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(groups);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "[{elapsed_precise}] {bar:30} {pos}/{len} Groups, {msg} (eta {eta})",
    ) {
        bar.set_style(style);
    }
    bar
}

fn bench(args: &fhir_group_proxy::loadtest::BenchArgs) -> anyhow::Result<()> {
    use fhir_group_proxy::loadtest;
    let runtime = tokio::runtime::Runtime::new().context("cannot start a tokio runtime")?;
    let report = runtime
        .block_on(loadtest::run(args))
        .context("bench failed")?;
    let outputs = loadtest::write_outputs(&report, &args.out).context("bench failed")?;
    print!("{}", loadtest::report::markdown(&report));
    println!(
        "\nwrote {}, {} and {} in {:.1} s",
        outputs.markdown.display(),
        outputs.json.display(),
        outputs.chart.display(),
        report.total_s
    );
    Ok(())
}

/// How long the log writer thread waits after a write before it looks for
/// more lines. Woken for every line, it would cost a busy proxy a futex call
/// and two context switches per request; this way it takes everything queued
/// in one go (at 50,000 requests/s, some 250 lines per write).
const LOG_WRITE_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// The log writer thread's output: `flush` ends each batch of lines, and the
/// thread then waits `pause` before it looks for more.
struct PacedWriter<W: std::io::Write> {
    out: std::io::BufWriter<W>,
    pause: std::time::Duration,
}

impl<W: std::io::Write> PacedWriter<W> {
    fn new(out: W, pause: std::time::Duration) -> Self {
        Self {
            out: std::io::BufWriter::with_capacity(64 * 1024, out),
            pause,
        }
    }
}

impl<W: std::io::Write> std::io::Write for PacedWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.out.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()?;
        std::thread::sleep(self.pause);
        Ok(())
    }
}

/// Lines are formatted where they are logged and written to stderr by a
/// thread of their own, so a slow or stalled stderr never holds up a request:
/// past 128,000 queued lines, new lines are dropped rather than requests
/// delayed. That thread writes whatever has queued up with one write, at
/// most every [`LOG_WRITE_PAUSE`].
fn init_logging(
    filter: &str,
    json: bool,
) -> anyhow::Result<tracing_appender::non_blocking::WorkerGuard> {
    use std::io::IsTerminal;
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("bad --log filter {filter:?}"))?;
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(true)
        .thread_name("fgp-log-writer")
        .finish(PacedWriter::new(std::io::stderr(), LOG_WRITE_PAUSE));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(writer);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(guard)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A writer whose bytes, and the threads that wrote them, the test can
    /// read while the writer is in use.
    #[derive(Clone, Default)]
    struct Shared {
        bytes: Arc<Mutex<Vec<u8>>>,
        writers: Arc<Mutex<Vec<std::thread::ThreadId>>>,
    }

    impl Shared {
        fn text(&self) -> String {
            String::from_utf8(self.bytes.lock().expect("test writer").clone()).expect("utf-8")
        }
    }

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.bytes
                .lock()
                .expect("test writer")
                .extend_from_slice(buf);
            self.writers
                .lock()
                .expect("test writer")
                .push(std::thread::current().id());
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn log_lines_are_written_in_one_batch_when_the_writer_thread_flushes() {
        let out = Shared::default();
        let mut paced = PacedWriter::new(out.clone(), std::time::Duration::ZERO);
        paced.write_all(b"line 1\n").unwrap();
        paced.write_all(b"line 2\n").unwrap();
        assert_eq!(out.text(), "", "held until the batch ends");
        paced.flush().unwrap();
        assert_eq!(out.text(), "line 1\nline 2\n");
        assert_eq!(out.writers.lock().unwrap().len(), 1, "one write");
    }

    #[test]
    fn access_log_lines_are_written_off_the_request_path() {
        let out = Shared::default();
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(true)
            .finish(PacedWriter::new(out.clone(), LOG_WRITE_PAUSE));
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(status = 200, "request done");
        });
        // Dropping the guard waits for the writer thread to write what is queued.
        drop(guard);
        assert!(
            out.text().contains("request done status=200"),
            "{}",
            out.text()
        );
        let writers = out.writers.lock().unwrap().clone();
        assert!(!writers.is_empty());
        assert!(
            writers.iter().all(|id| *id != std::thread::current().id()),
            "written by the logging thread itself"
        );
    }
}
