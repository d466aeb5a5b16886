//! Command-line entry point. Errors are reported here with `anyhow`, which is
//! the only place the crate uses it.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use fhir_group_proxy::config::{Config, Overrides};
use tracing_subscriber::EnvFilter;

/// A FHIR-aware reverse proxy for legacy MongoDB-backed FHIR R4 servers.
///
/// Every request is forwarded to the upstream FHIR server unchanged and streamed.
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

    /// Log as JSON lines instead of human-readable text
    #[arg(long, env = "FGP_LOG_JSON", global = true)]
    log_json: bool,

    #[command(flatten)]
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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log, cli.log_json)?;
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
                .block_on(fhir_group_proxy::store::events::apply_schema(
                    &config.clickhouse,
                ))
                .context("schema apply failed")?;
            println!(
                "ClickHouse schema is in place in database {}",
                config.clickhouse.database
            );
            Ok(())
        }
        Command::Bench(args) => bench(&args),
        Command::Serve => {
            tracing::info!(
                listen = %config.server.listen,
                upstream = %config.upstream.url,
                "fhir-group-proxy starting"
            );
            let server =
                fhir_group_proxy::proxy::build_server(config).context("cannot start the proxy")?;
            server.run_forever()
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
        Ok(())
    })
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

fn init_logging(filter: &str, json: bool) -> anyhow::Result<()> {
    let filter =
        EnvFilter::try_new(filter).with_context(|| format!("bad --log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    Ok(())
}
