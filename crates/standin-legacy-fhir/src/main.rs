//! `standin-legacy-fhir`: runs the STAND-IN legacy FHIR server (tests, demo,
//! benchmarks of fhir-group-proxy only; not a FHIR server for real use).

use clap::Parser;
use standin_legacy_fhir::{StandinConfig, StandinServer, DEFAULT_BASE_PATH};
use tracing_subscriber::EnvFilter;

/// A STAND-IN for a legacy MongoDB-backed FHIR R4 server, for fhir-group-proxy's
/// tests, demo and benchmarks only. Stores resources like the Mongo-backed
/// reference server and patches by rewriting whole documents.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:18080")]
    listen: String,
    /// MongoDB (or FerretDB) to store resources in.
    #[arg(
        long,
        env = "STANDIN_MONGO_URI",
        default_value = "mongodb://127.0.0.1:27018/"
    )]
    mongo_uri: String,
    /// Database holding the `{Type}_4_0_0` collections.
    #[arg(long, env = "STANDIN_DATABASE", default_value = "fhir")]
    database: String,
    /// FHIR base path.
    #[arg(long, env = "STANDIN_BASE_PATH", default_value = DEFAULT_BASE_PATH)]
    base_path: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let args = Args::parse();
    let server = StandinServer::connect(StandinConfig {
        mongo_uri: args.mongo_uri,
        database: args.database.clone(),
        base_path: args.base_path.clone(),
        access: Default::default(),
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        database = %args.database,
        base = %args.base_path,
        "STAND-IN for a legacy MongoDB-backed FHIR server (tests, demo and benchmarks only; not for production) listening"
    );
    server.serve(listener).await?;
    Ok(())
}
