//! `standin-legacy-fhir`: runs the STAND-IN legacy FHIR server (tests, demo,
//! benchmarks of fhir-group-proxy only; not a FHIR server for real use).

use clap::Parser;
use standin_legacy_fhir::{StandinConfig, StandinServer};

/// A stand-in for a legacy MongoDB-backed FHIR R4 server, for fhir-group-proxy's
/// tests, demo and benchmarks. Stores resources like the Mongo-backed reference
/// server and patches by rewriting whole documents.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[arg(long, env = "STANDIN_LISTEN", default_value = "127.0.0.1:18080")]
    listen: String,
    #[arg(
        long,
        env = "STANDIN_MONGO_URI",
        default_value = "mongodb://127.0.0.1:27018/"
    )]
    mongo_uri: String,
    #[arg(long, env = "STANDIN_DATABASE", default_value = "fhir")]
    database: String,
    #[arg(long, env = "STANDIN_BASE_PATH", default_value = "/4_0_0")]
    base_path: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = StandinServer::connect(StandinConfig {
        mongo_uri: args.mongo_uri,
        database: args.database.clone(),
        base_path: args.base_path.clone(),
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(
        listen = %args.listen,
        database = %args.database,
        base = %args.base_path,
        "stand-in legacy FHIR server (NOT for production) listening"
    );
    server.serve(listener).await?;
    Ok(())
}
