//! Settings of the proxy: one TOML file, overridden by environment variables and
//! command-line flags (flag > environment > file > built-in default).
//!
//! The file format is documented by `config/fhir-group-proxy.toml`; every key has
//! a default so an empty file is valid. The keys, their defaults, flags and
//! environment variables are declared in `settings.rs`.

mod declare;
mod settings;

pub use settings::{
    AuthMode, AuthSettings, ClickHouseSettings, FhirSettings, JwtSettings, MemberSettings,
    MixedPatchPolicy, MongoSettings, Overrides, PutWithoutMember, ServerSettings, UpstreamSettings,
};

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use url::Url;

/// Events one version may hold: an event's `sequence` in the member store is
/// `version << 20 | op index`, so indexes must fit below this to keep it
/// ordered. Here, not in the store, because settings are checked against it
/// and the store depends on the settings, not the other way round.
pub const MAX_OPS_PER_VERSION: usize = 1 << 20;
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: String,
        source: Box<toml::de::Error>,
    },
    #[error("setting {key} = {value:?} is not valid: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerSettings,
    pub upstream: UpstreamSettings,
    pub fhir: FhirSettings,
    pub clickhouse: ClickHouseSettings,
    pub mongo: MongoSettings,
    pub members: MemberSettings,
    pub auth: AuthSettings,
}

impl Config {
    /// Reads `path` (if given), applies `overrides`, and validates the result.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => Self::from_file(path)?,
            None => Self::default(),
        };
        config.apply(overrides);
        config.validate()?;
        Ok(config)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|source| ConfigError::Parse {
            path: path.display().to_string(),
            source: Box::new(source),
        })
    }

    pub fn from_toml(text: &str) -> Result<Self, toml::de::Error> {
        toml::from_str(text)
    }

    /// Sets every key whose flag or environment variable was given.
    pub fn apply(&mut self, overrides: &Overrides) {
        overrides.apply_to(self);
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server
            .listen
            .parse::<SocketAddr>()
            .map_err(|e| invalid("server.listen", &self.server.listen, e))?;
        if !self.server.admin_listen.is_empty() {
            self.server
                .admin_listen
                .parse::<SocketAddr>()
                .map_err(|e| invalid("server.admin_listen", &self.server.admin_listen, e))?;
        }
        UpstreamTarget::parse(&self.upstream.url)?;
        for base in &self.fhir.base_paths {
            if !base.starts_with('/') || (base.len() > 1 && base.ends_with('/')) {
                return Err(invalid(
                    "fhir.base_paths",
                    base,
                    "a base path starts with '/' and has no trailing '/'",
                ));
            }
        }
        if self.fhir.base_paths.is_empty() {
            return Err(invalid("fhir.base_paths", "[]", "at least one is needed"));
        }
        if self.fhir.max_patch_operations == 0 {
            return Err(invalid("fhir.max_patch_operations", "0", "must be > 0"));
        }
        if !matches!(self.fhir.patch_failure_status, 400 | 409 | 422) {
            return Err(invalid(
                "fhir.patch_failure_status",
                &self.fhir.patch_failure_status.to_string(),
                "must be 400, 409 or 422",
            ));
        }
        if !matches!(self.members.version_conflict_status, 409 | 412) {
            return Err(invalid(
                "members.version_conflict_status",
                &self.members.version_conflict_status.to_string(),
                "must be 412 or 409",
            ));
        }
        if self.fhir.max_patch_operations >= MAX_OPS_PER_VERSION {
            return Err(invalid(
                "fhir.max_patch_operations",
                &self.fhir.max_patch_operations.to_string(),
                format!("must be below {}", MAX_OPS_PER_VERSION),
            ));
        }
        if self.members.batch_max_rows == 0 {
            return Err(invalid("members.batch_max_rows", "0", "must be > 0"));
        }
        Url::parse(&self.clickhouse.url)
            .map_err(|e| invalid("clickhouse.url", &self.clickhouse.url, e))?;
        if !is_identifier(&self.clickhouse.database) {
            return Err(invalid(
                "clickhouse.database",
                &self.clickhouse.database,
                "use letters, digits and '_' only (it is spliced into DDL)",
            ));
        }
        self.validate_auth()?;
        self.clickhouse.validate_cluster()?;
        if !self.mongo.uri.starts_with("mongodb://")
            && !self.mongo.uri.starts_with("mongodb+srv://")
        {
            return Err(invalid(
                "mongo.uri",
                "(hidden)",
                "must start with mongodb:// or mongodb+srv://",
            ));
        }
        Ok(())
    }

    pub fn upstream_target(&self) -> Result<UpstreamTarget, ConfigError> {
        UpstreamTarget::parse(&self.upstream.url)
    }

    /// The effective configuration as TOML with secrets masked, for `config show`.
    fn validate_auth(&self) -> Result<(), ConfigError> {
        let auth = &self.auth;
        if auth.mode == AuthMode::Upstream {
            let probe = &auth.upstream_probe;
            let shape_ok = probe.split_once(' ').is_some_and(|(method, path)| {
                http::Method::from_bytes(method.as_bytes()).is_ok()
                    && (path.starts_with('/') || path.starts_with("{base}"))
                    && path.contains("{id}")
            });
            if !shape_ok {
                return Err(invalid(
                    "auth.upstream_probe",
                    probe,
                    "expected \"METHOD /path\" naming {id}, e.g. \"GET {base}/Group/{id}\"",
                ));
            }
        }
        if auth.mode != AuthMode::Jwt {
            return Ok(());
        }
        let jwt = &auth.jwt;
        if jwt.jwks_file.is_empty() == jwt.jwks_url.is_empty() {
            return Err(invalid(
                "auth.jwt.jwks_file",
                &jwt.jwks_file,
                "jwt mode needs exactly one of auth.jwt.jwks_file and auth.jwt.jwks_url",
            ));
        }
        if !jwt.jwks_url.is_empty() && !jwt.jwks_url.starts_with("http://") {
            return Err(invalid(
                "auth.jwt.jwks_url",
                &jwt.jwks_url,
                "only http:// is fetched (no TLS in this build): use a file refreshed by a job, or a local sidecar",
            ));
        }
        if jwt.issuer.is_empty() {
            return Err(invalid(
                "auth.jwt.issuer",
                "",
                "jwt mode needs the issuer to trust",
            ));
        }
        if jwt.audience.is_empty() {
            return Err(invalid(
                "auth.jwt.audience",
                "[]",
                "jwt mode needs at least one audience",
            ));
        }
        Ok(())
    }

    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if !shown.clickhouse.password.is_empty() {
            shown.clickhouse.password = "***".into();
        }
        shown.mongo.uri = redact_url_password(&shown.mongo.uri);
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}"))
    }
}

impl ClickHouseSettings {
    /// Cluster names and replication settings are spliced into DDL string
    /// literals: only characters that cannot end the literal are accepted.
    fn validate_cluster(&self) -> Result<(), ConfigError> {
        if !self
            .cluster
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            return Err(invalid(
                "clickhouse.cluster",
                &self.cluster,
                "use letters, digits, '_' and '-' only (it is spliced into DDL)",
            ));
        }
        if self.cluster.is_empty() {
            return Ok(());
        }
        let literal_safe = |value: &str| {
            value.chars().all(|c| {
                c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | '{' | '}')
            })
        };
        if !self.replication_path.starts_with('/') || !literal_safe(&self.replication_path) {
            return Err(invalid(
                "clickhouse.replication_path",
                &self.replication_path,
                "a path starting with '/' of letters, digits, '_', '-', '.', '/' and {macros}",
            ));
        }
        if self.replica_name.is_empty() || !literal_safe(&self.replica_name) {
            return Err(invalid(
                "clickhouse.replica_name",
                &self.replica_name,
                "letters, digits, '_', '-', '.' and {macros}, not empty",
            ));
        }
        Ok(())
    }
}

impl UpstreamSettings {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }
}

/// Where passthrough traffic goes, resolved once at start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `host:port` as written in the URL, used for `Host` when not preserved.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Path prefix of the upstream URL (without trailing '/'), prepended to every
    /// forwarded path, so `http://legacy/fhir` works as well as `http://legacy`.
    pub path_prefix: String,
}

impl UpstreamTarget {
    pub fn parse(raw: &str) -> Result<Self, ConfigError> {
        let url = Url::parse(raw).map_err(|e| invalid("upstream.url", raw, e))?;
        if url.scheme() != "http" {
            return Err(invalid(
                "upstream.url",
                raw,
                "only http:// upstreams are supported (terminate TLS to the legacy server in a sidecar)",
            ));
        }
        let host = url
            .host_str()
            .ok_or_else(|| invalid("upstream.url", raw, "has no host"))?
            .to_string();
        let port = url.port_or_known_default().unwrap_or(80);
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "upstream.url",
                raw,
                "must not have a query or fragment",
            ));
        }
        let authority = match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        Ok(Self {
            authority,
            host,
            port,
            path_prefix: url.path().trim_end_matches('/').to_string(),
        })
    }
}

fn invalid(key: &'static str, value: &str, reason: impl ToString) -> ConfigError {
    ConfigError::Invalid {
        key,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

fn redact_url_password(raw: &str) -> String {
    match Url::parse(raw) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        _ => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let config = Config::from_toml("").expect("empty TOML is valid");
        assert_eq!(config.server.listen, "127.0.0.1:8080");
        assert_eq!(config.fhir.base_paths, vec!["/4_0_0".to_string()]);
        config.validate().expect("defaults are valid");
    }

    #[test]
    fn documented_example_file_parses_and_validates() {
        let text = include_str!("../../config/fhir-group-proxy.toml");
        let config = Config::from_toml(text).expect("example parses");
        config.validate().expect("example validates");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_toml("[upstream]\nurll = \"http://x\"\n").unwrap_err();
        assert!(err.to_string().contains("urll"), "{err}");
    }

    #[test]
    fn overrides_win_over_file() {
        let mut config = Config::from_toml("[upstream]\nurl = \"http://a:1\"\n").unwrap();
        config.apply(&Overrides {
            upstream_url: Some("http://b:2/fhir/".into()),
            fhir_base_paths: Some(vec!["/r4".into(), "/4_0_0".into()]),
            ..Overrides::default()
        });
        assert_eq!(config.upstream.url, "http://b:2/fhir/");
        let target = config.upstream_target().unwrap();
        assert_eq!(target.authority, "b:2");
        assert_eq!(target.path_prefix, "/fhir");
        assert_eq!(config.fhir.base_paths, vec!["/r4", "/4_0_0"]);
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut config = Config::default();
        config.upstream.url = "https://legacy.example".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("upstream.url"), "{err}");

        let mut config = Config::default();
        config.clickhouse.database = "fhir; DROP TABLE x".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("clickhouse.database"), "{err}");

        let mut config = Config::default();
        config.fhir.base_paths = vec!["4_0_0/".into()];
        assert!(config.validate().is_err());

        let mut config = Config::default();
        config.server.admin_listen = "localhost".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("server.admin_listen"), "{err}");
    }

    #[test]
    fn an_empty_admin_listen_disables_the_admin_listener() {
        let mut config = Config::default();
        config.apply(&Overrides {
            admin_listen: Some(String::new()),
            ..Overrides::default()
        });
        config.validate().expect("empty admin_listen is valid");
        assert!(config.server.admin_listen.is_empty());
    }

    #[test]
    fn cluster_settings_are_checked_only_in_cluster_mode() {
        let mut config = Config::default();
        config.clickhouse.replication_path = "no slash".into();
        config
            .validate()
            .expect("single node ignores replication settings");

        config.clickhouse.cluster = "events-prod".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("clickhouse.replication_path"), "{err}");

        config.clickhouse.replication_path = "/clickhouse/tables/{shard}".into();
        config.validate().expect("a cluster with the default paths");
        config.clickhouse.replica_name = "{replica}'".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("clickhouse.replica_name"), "{err}");

        config.clickhouse.replica_name = "{replica}".into();
        config.clickhouse.cluster = "events' ON".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("clickhouse.cluster"), "{err}");
    }

    #[test]
    fn redacted_output_hides_secrets() {
        let mut config = Config::default();
        config.clickhouse.password = "s3cret".into();
        config.mongo.uri = "mongodb://user:pw@db:27017/".into();
        let shown = config.to_redacted_toml();
        assert!(
            !shown.contains("s3cret") && !shown.contains(":pw@"),
            "{shown}"
        );
    }
}
