//! `standin-legacy-fhir`: runs the STAND-IN legacy FHIR server (tests, demo,
//! benchmarks of fhir-group-proxy only; not a FHIR server for real use).

use clap::Parser;
use standin_legacy_fhir::{
    AccessTokens, Fidelity, Profile, StandinConfig, StandinServer, DEFAULT_BASE_PATH,
};
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
    /// How closely to imitate the real legacy server: `real` (as
    /// icanbwell/fhir-server was measured to behave, the default; see the
    /// crate README) or `simple` (plain FHIR).
    #[arg(long, env = "STANDIN_PROFILE", default_value = "real")]
    profile: Profile,
    /// Keep the history collections in this separate database (as the real
    /// server's RESOURCE_HISTORY_MONGO_DB_NAME).
    #[arg(long, env = "STANDIN_HISTORY_DATABASE")]
    history_database: Option<String>,
    /// A bearer token that may read and write (repeatable; the env var is
    /// comma-separated). With no tokens at all there is no access control.
    #[arg(
        long = "writer-token",
        env = "STANDIN_WRITER_TOKENS",
        value_delimiter = ','
    )]
    writer_tokens: Vec<String>,
    /// A bearer token that may only read: its writes get 403 (repeatable;
    /// the env var is comma-separated).
    #[arg(
        long = "reader-token",
        env = "STANDIN_READER_TOKENS",
        value_delimiter = ','
    )]
    reader_tokens: Vec<String>,
}

impl Args {
    fn access(&self) -> AccessTokens {
        let tokens = |list: &[String], may_write: bool| {
            list.iter()
                .map(|t| t.trim())
                .filter(|t| !t.is_empty())
                .map(|t| (t.to_string(), may_write))
                .collect::<Vec<_>>()
        };
        let mut all = tokens(&self.writer_tokens, true);
        all.extend(tokens(&self.reader_tokens, false));
        AccessTokens { tokens: all }
    }
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
    let access = args.access();
    let server = StandinServer::connect(StandinConfig {
        mongo_uri: args.mongo_uri.clone(),
        database: args.database.clone(),
        base_path: args.base_path.clone(),
        access: access.clone(),
        fidelity: Fidelity::of(args.profile),
        history_database: args.history_database.clone(),
    })
    .await?;
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    tracing::info!(
        listen = %listener.local_addr()?,
        database = %args.database,
        base = %args.base_path,
        profile = %args.profile,
        history_database = args.history_database.as_deref().unwrap_or(&args.database),
        tokens = access.tokens.len(),
        "STAND-IN for a legacy MongoDB-backed FHIR server (tests, demo and benchmarks only; not for production) listening"
    );
    server.serve(listener).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_repeated_flags_and_comma_separated_lists() {
        let args = Args::try_parse_from([
            "standin-legacy-fhir",
            "--writer-token",
            "w1,w2",
            "--writer-token",
            "w3",
            "--reader-token",
            " r1 ",
            "--profile",
            "real",
        ])
        .unwrap();
        assert_eq!(
            args.access().tokens,
            vec![
                ("w1".to_string(), true),
                ("w2".to_string(), true),
                ("w3".to_string(), true),
                ("r1".to_string(), false)
            ]
        );
        assert_eq!(args.profile, Profile::Real);
    }

    #[test]
    fn the_default_profile_is_real_and_no_tokens_means_no_access_control() {
        let args = Args::try_parse_from(["standin-legacy-fhir"]).unwrap();
        assert_eq!(args.profile, Profile::Real);
        assert!(args.access().tokens.is_empty());
        assert!(Args::try_parse_from(["standin-legacy-fhir", "--profile", "odd"]).is_err());
    }
}
