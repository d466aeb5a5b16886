//! Settings of the proxy: one TOML file, overridden by environment variables and
//! command-line flags (flag > environment > file > built-in default).
//!
//! The file format is documented by `config/fhir-group-proxy.toml`; every key has
//! a default so an empty file is valid.

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

/// Who may use what the proxy answers itself (member writes and reads): the
/// legacy server's access control is bypassed there, so one of these guards it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    /// "upstream": ask the legacy server with the client's own credentials
    /// (`upstream_probe`) and act only on a 2xx; "jwt": validate bearer tokens
    /// locally and require SMART scopes; "none": no checks (loud warning).
    pub mode: AuthMode,
    /// The probe of "upstream" mode: method and path, `{base}` and `{id}` filled in.
    pub upstream_probe: String,
    pub jwt: JwtSettings,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Upstream,
    Jwt,
    None,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::Upstream,
            upstream_probe: "PATCH {base}/Group/{id}".into(),
            jwt: JwtSettings::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    /// A JWK Set file ...
    pub jwks_file: String,
    /// ... or URL (http://; fetched at start and again for unknown key ids).
    pub jwks_url: String,
    /// Required `iss`.
    pub issuer: String,
    /// Accepted `aud` values (one must match).
    pub audience: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf`.
    pub leeway_seconds: u64,
}

impl Default for JwtSettings {
    fn default() -> Self {
        Self {
            jwks_file: String::new(),
            jwks_url: String::new(),
            issuer: String::new(),
            audience: Vec::new(),
            leeway_seconds: 60,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Address the proxy listens on.
    pub listen: String,
    /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`);
    /// empty disables it.
    pub admin_listen: String,
    /// Worker threads; 0 means one per CPU core.
    pub threads: usize,
    /// After SIGTERM, seconds to keep accepting (with `/readyz` answering 503)
    /// while load balancers notice.
    pub grace_period_seconds: u64,
    /// Then at most this many seconds for in-flight requests and the member
    /// writes they started to finish.
    pub graceful_shutdown_timeout_seconds: u64,
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            threads: 0,
            grace_period_seconds: 1,
            graceful_shutdown_timeout_seconds: 10,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamSettings {
    /// Base URL of the legacy FHIR server, e.g. `http://127.0.0.1:3000`.
    pub url: String,
    pub connect_timeout_ms: u64,
    /// Longest wait for the next bytes from the upstream (also time to first byte).
    pub read_timeout_ms: u64,
    pub write_timeout_ms: u64,
    /// Idle upstream keep-alive connections are closed after this long.
    pub idle_timeout_ms: u64,
    /// Forward the client's `Host` header unchanged (the upstream then builds links
    /// that point at the proxy). When false, `Host` is set to the upstream authority.
    pub preserve_host: bool,
    /// Add `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`
    /// (only when absent, so values set by an outer TLS-terminating balancer survive).
    pub forwarded_headers: bool,
}

impl Default for UpstreamSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:3000".into(),
            connect_timeout_ms: 2_000,
            read_timeout_ms: 60_000,
            write_timeout_ms: 60_000,
            idle_timeout_ms: 60_000,
            preserve_host: true,
            forwarded_headers: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct FhirSettings {
    /// Path prefixes under which the FHIR API lives, e.g. `/4_0_0`.
    pub base_paths: Vec<String>,
    /// Largest request body the proxy reads itself (intercepted requests only;
    /// passthrough bodies are streamed and not limited here).
    pub max_intercepted_body_bytes: usize,
    /// Most JSON Patch operations accepted in one member PATCH.
    pub max_patch_operations: usize,
    /// Most members inlined in a Group read; larger Groups are returned with
    /// `quantity` and a link to their `$members` paging operation instead.
    pub max_inline_members: usize,
    /// Deepest nesting of arrays/objects in a body the proxy reads (400 above).
    pub max_json_depth: usize,
    /// Canonical base of the proxy's own extension URLs (`members-paged`,
    /// `member-removed` are appended).
    pub extension_base: String,
    /// Status of a member patch that does not apply (a failed `test`, a
    /// missing target): the legacy server's. FHIR says 422; the reference
    /// server (icanbwell/fhir-server) answers 400.
    pub patch_failure_status: u16,
    /// The reference server's convention `remove /member/-` with a `value`:
    /// remove every member with that `entity.reference`. RFC 6902 has no such
    /// op; off, such a patch fails as RFC 6902 says.
    pub remove_member_by_reference: bool,
    /// Members are stored and shown as the reference server (icanbwell/
    /// fhir-server) stores and shows them: `_uuid`, `_sourceId` and
    /// `_sourceAssigningAuthority` on every reference, shown as
    /// `extension`s. Only for Groups whose stored document has
    /// `_sourceAssigningAuthority` (that server's field); off, members are
    /// stored and shown exactly as sent.
    pub reference_fields: bool,
}

impl Default for FhirSettings {
    fn default() -> Self {
        Self {
            base_paths: vec!["/4_0_0".into()],
            max_intercepted_body_bytes: 16 * 1024 * 1024,
            max_patch_operations: 10_000,
            max_inline_members: 10_000,
            max_json_depth: 64,
            extension_base: crate::fhir::group_read::DEFAULT_EXTENSION_BASE.into(),
            patch_failure_status: 400,
            remove_member_by_reference: true,
            reference_fields: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClickHouseSettings {
    /// HTTP interface of ClickHouse.
    pub url: String,
    pub database: String,
    pub user: String,
    pub password: String,
    /// Cluster of the servers' `remote_servers` to create the tables on
    /// (replicated local tables, distributed tables over them, `ON CLUSTER`);
    /// empty: one server, plain MergeTree tables.
    pub cluster: String,
    /// Cluster mode: replication path prefix of the local tables (the
    /// database and table names are appended).
    pub replication_path: String,
    /// Cluster mode: replica name of the local tables.
    pub replica_name: String,
}

impl Default for ClickHouseSettings {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            // Not "fhir": the reference server's own ClickHouse mode keeps
            // tables of the same names there.
            database: "fhir_group_proxy".into(),
            user: "default".into(),
            password: String::new(),
            cluster: String::new(),
            replication_path: "/clickhouse/tables/{shard}".into(),
            replica_name: "{replica}".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoSettings {
    /// Any MongoDB connection string, replica sets included.
    pub uri: String,
    pub database: String,
    /// Where the legacy server keeps resource history, when not beside the
    /// resources (the reference server's `RESOURCE_HISTORY_MONGO_URL` /
    /// `RESOURCE_HISTORY_MONGO_DB_NAME`): empty means `uri` / `database`.
    pub history_uri: String,
    pub history_database: String,
}

impl Default for MongoSettings {
    fn default() -> Self {
        Self {
            uri: "mongodb://127.0.0.1:27017/".into(),
            database: "fhir".into(),
            history_uri: String::new(),
            history_database: String::new(),
        }
    }
}

/// How PATCHes of `Group.member` are handled by the proxy itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MemberSettings {
    /// Handle member PATCHes in the proxy (false: forward everything).
    pub enabled: bool,
    /// Status for a stale `If-Match`: 412 (FHIR R4) or 409 (as HAPI answers).
    pub version_conflict_status: u16,
    /// Answer 400 to member PATCHes without `If-Match`.
    pub require_if_match: bool,
    /// Patches mixing member and other ops: "split" (other ops go upstream as
    /// their own PATCH, one version in total) or "reject" (422).
    pub mixed_patch: MixedPatchPolicy,
    /// A `PUT` without `member` of a migrated Group: "keep" its roster (what
    /// clients of a member-less legacy view expect) or "empty" it (FHIR-strict
    /// replace semantics).
    pub put_without_member: PutWithoutMember,
    /// A Group created (POST, or PUT to a new id) with members keeps them as
    /// events from the start; false: the legacy server stores them inline.
    pub create_in_clickhouse: bool,
    /// Group commit: most rows in one ClickHouse insert ...
    pub batch_max_rows: usize,
    /// ... and longest wait for more writers after the first one.
    pub batch_max_delay_ms: u64,
    /// A member write holding a Group longer than this is presumed dead.
    pub lease_ttl_ms: u64,
    /// How long a write waits for a busy Group before answering 503.
    pub write_wait_ms: u64,
    /// Longest wait for the member stores per request, then 504 (a write
    /// that reached its commit point still completes).
    pub store_timeout_ms: u64,
    /// Worker threads of the store runtime (MongoDB, ClickHouse clients).
    pub store_threads: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MixedPatchPolicy {
    Split,
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PutWithoutMember {
    Keep,
    Empty,
}

impl Default for MemberSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            version_conflict_status: 412,
            require_if_match: false,
            mixed_patch: MixedPatchPolicy::Split,
            put_without_member: PutWithoutMember::Keep,
            create_in_clickhouse: true,
            batch_max_rows: 10_000,
            batch_max_delay_ms: 5,
            lease_ttl_ms: 30_000,
            write_wait_ms: 10_000,
            store_timeout_ms: 20_000,
            store_threads: 2,
        }
    }
}

/// Values from the environment or the command line that win over the file.
/// Each field maps to exactly one key of [`Config`].
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// Address to listen on [server.listen]
    #[arg(long, env = "FGP_LISTEN", global = true)]
    pub listen: Option<String>,
    /// Admin listener address for /metrics, /healthz, /readyz; empty disables [server.admin_listen]
    #[arg(long, env = "FGP_ADMIN_LISTEN", global = true)]
    pub admin_listen: Option<String>,
    /// Worker threads, 0 = one per core [server.threads]
    #[arg(long, env = "FGP_THREADS", global = true)]
    pub threads: Option<usize>,
    /// Seconds to keep accepting after SIGTERM, /readyz answering 503 [server.grace_period_seconds]
    #[arg(long, env = "FGP_GRACE_PERIOD_SECONDS", global = true)]
    pub grace_period_seconds: Option<u64>,
    /// Seconds in-flight requests and writes get to finish on shutdown [server.graceful_shutdown_timeout_seconds]
    #[arg(long, env = "FGP_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", global = true)]
    pub graceful_shutdown_timeout_seconds: Option<u64>,
    /// Base URL of the legacy FHIR server [upstream.url]
    #[arg(long, env = "FGP_UPSTREAM_URL", global = true)]
    pub upstream_url: Option<String>,
    /// Upstream connect timeout in ms [upstream.connect_timeout_ms]
    #[arg(long, env = "FGP_UPSTREAM_CONNECT_TIMEOUT_MS", global = true)]
    pub upstream_connect_timeout_ms: Option<u64>,
    /// Upstream read timeout in ms [upstream.read_timeout_ms]
    #[arg(long, env = "FGP_UPSTREAM_READ_TIMEOUT_MS", global = true)]
    pub upstream_read_timeout_ms: Option<u64>,
    /// Upstream write timeout in ms [upstream.write_timeout_ms]
    #[arg(long, env = "FGP_UPSTREAM_WRITE_TIMEOUT_MS", global = true)]
    pub upstream_write_timeout_ms: Option<u64>,
    /// Idle upstream connection lifetime in ms [upstream.idle_timeout_ms]
    #[arg(long, env = "FGP_UPSTREAM_IDLE_TIMEOUT_MS", global = true)]
    pub upstream_idle_timeout_ms: Option<u64>,
    /// Forward the client's Host header unchanged [upstream.preserve_host]
    #[arg(long, env = "FGP_UPSTREAM_PRESERVE_HOST", global = true)]
    pub upstream_preserve_host: Option<bool>,
    /// Add X-Forwarded-For/-Proto/-Host [upstream.forwarded_headers]
    #[arg(long, env = "FGP_UPSTREAM_FORWARDED_HEADERS", global = true)]
    pub upstream_forwarded_headers: Option<bool>,
    /// FHIR base paths, comma-separated [fhir.base_paths]
    #[arg(
        long,
        env = "FGP_FHIR_BASE_PATHS",
        value_delimiter = ',',
        global = true
    )]
    pub fhir_base_paths: Option<Vec<String>>,
    /// Largest body of a request the proxy handles itself, in bytes [fhir.max_intercepted_body_bytes]
    #[arg(long, env = "FGP_FHIR_MAX_INTERCEPTED_BODY_BYTES", global = true)]
    pub fhir_max_intercepted_body_bytes: Option<usize>,
    /// Most JSON Patch operations in one member PATCH [fhir.max_patch_operations]
    #[arg(long, env = "FGP_FHIR_MAX_PATCH_OPERATIONS", global = true)]
    pub fhir_max_patch_operations: Option<usize>,
    /// Status of a member patch that does not apply, 422 or 400 [fhir.patch_failure_status]
    #[arg(long, env = "FGP_FHIR_PATCH_FAILURE_STATUS", global = true)]
    pub fhir_patch_failure_status: Option<u16>,
    /// Accept `remove /member/-` with a value (remove by reference) [fhir.remove_member_by_reference]
    #[arg(long, env = "FGP_FHIR_REMOVE_MEMBER_BY_REFERENCE", global = true)]
    pub fhir_remove_member_by_reference: Option<bool>,
    /// Store and show members' references as icanbwell/fhir-server does [fhir.reference_fields]
    #[arg(long, env = "FGP_FHIR_REFERENCE_FIELDS", global = true)]
    pub fhir_reference_fields: Option<bool>,
    /// Canonical base of the proxy's extension URLs [fhir.extension_base]
    #[arg(long, env = "FGP_FHIR_EXTENSION_BASE", global = true)]
    pub fhir_extension_base: Option<String>,
    /// Deepest JSON nesting in a body the proxy reads [fhir.max_json_depth]
    #[arg(long, env = "FGP_FHIR_MAX_JSON_DEPTH", global = true)]
    pub fhir_max_json_depth: Option<usize>,
    /// Most members inlined in a Group read [fhir.max_inline_members]
    #[arg(long, env = "FGP_FHIR_MAX_INLINE_MEMBERS", global = true)]
    pub fhir_max_inline_members: Option<usize>,
    /// ClickHouse HTTP URL [clickhouse.url]
    #[arg(long, env = "FGP_CLICKHOUSE_URL", global = true)]
    pub clickhouse_url: Option<String>,
    /// ClickHouse database [clickhouse.database]
    #[arg(long, env = "FGP_CLICKHOUSE_DATABASE", global = true)]
    pub clickhouse_database: Option<String>,
    /// ClickHouse user [clickhouse.user]
    #[arg(long, env = "FGP_CLICKHOUSE_USER", global = true)]
    pub clickhouse_user: Option<String>,
    /// ClickHouse password (prefer the environment variable) [clickhouse.password]
    #[arg(
        long,
        env = "FGP_CLICKHOUSE_PASSWORD",
        hide_env_values = true,
        global = true
    )]
    pub clickhouse_password: Option<String>,
    /// ClickHouse cluster for replicated + distributed tables, empty = one server [clickhouse.cluster]
    #[arg(long, env = "FGP_CLICKHOUSE_CLUSTER", global = true)]
    pub clickhouse_cluster: Option<String>,
    /// Replication path prefix of the cluster's local tables [clickhouse.replication_path]
    #[arg(long, env = "FGP_CLICKHOUSE_REPLICATION_PATH", global = true)]
    pub clickhouse_replication_path: Option<String>,
    /// Replica name of the cluster's local tables [clickhouse.replica_name]
    #[arg(long, env = "FGP_CLICKHOUSE_REPLICA_NAME", global = true)]
    pub clickhouse_replica_name: Option<String>,
    /// MongoDB connection string [mongo.uri]
    #[arg(long, env = "FGP_MONGO_URI", hide_env_values = true, global = true)]
    pub mongo_uri: Option<String>,
    /// MongoDB database of the legacy FHIR server [mongo.database]
    #[arg(long, env = "FGP_MONGO_DATABASE", global = true)]
    pub mongo_database: Option<String>,
    /// MongoDB connection string of the legacy server's history, empty = mongo.uri [mongo.history_uri]
    #[arg(
        long,
        env = "FGP_MONGO_HISTORY_URI",
        hide_env_values = true,
        global = true
    )]
    pub mongo_history_uri: Option<String>,
    /// MongoDB database of the legacy server's history, empty = mongo.database [mongo.history_database]
    #[arg(long, env = "FGP_MONGO_HISTORY_DATABASE", global = true)]
    pub mongo_history_database: Option<String>,
    /// Handle member PATCHes in the proxy [members.enabled]
    #[arg(long, env = "FGP_MEMBERS_ENABLED", global = true)]
    pub members_enabled: Option<bool>,
    /// Status for a stale If-Match, 412 or 409 [members.version_conflict_status]
    #[arg(long, env = "FGP_MEMBERS_VERSION_CONFLICT_STATUS", global = true)]
    pub members_version_conflict_status: Option<u16>,
    /// Require If-Match on member PATCHes [members.require_if_match]
    #[arg(long, env = "FGP_MEMBERS_REQUIRE_IF_MATCH", global = true)]
    pub members_require_if_match: Option<bool>,
    /// Mixed member/other patches: split or reject [members.mixed_patch]
    #[arg(long, env = "FGP_MEMBERS_MIXED_PATCH", global = true)]
    pub members_mixed_patch: Option<MixedPatchPolicy>,
    /// PUT without member of a migrated Group: keep or empty its roster [members.put_without_member]
    #[arg(long, env = "FGP_MEMBERS_PUT_WITHOUT_MEMBER", global = true)]
    pub members_put_without_member: Option<PutWithoutMember>,
    /// Groups created with members keep them in ClickHouse [members.create_in_clickhouse]
    #[arg(long, env = "FGP_MEMBERS_CREATE_IN_CLICKHOUSE", global = true)]
    pub members_create_in_clickhouse: Option<bool>,
    /// Most rows per ClickHouse insert [members.batch_max_rows]
    #[arg(long, env = "FGP_MEMBERS_BATCH_MAX_ROWS", global = true)]
    pub members_batch_max_rows: Option<usize>,
    /// Longest group-commit wait in ms [members.batch_max_delay_ms]
    #[arg(long, env = "FGP_MEMBERS_BATCH_MAX_DELAY_MS", global = true)]
    pub members_batch_max_delay_ms: Option<u64>,
    /// Write lease lifetime in ms [members.lease_ttl_ms]
    #[arg(long, env = "FGP_MEMBERS_LEASE_TTL_MS", global = true)]
    pub members_lease_ttl_ms: Option<u64>,
    /// Longest wait for a busy Group in ms [members.write_wait_ms]
    #[arg(long, env = "FGP_MEMBERS_WRITE_WAIT_MS", global = true)]
    pub members_write_wait_ms: Option<u64>,
    /// Longest wait for the member stores per request in ms [members.store_timeout_ms]
    #[arg(long, env = "FGP_MEMBERS_STORE_TIMEOUT_MS", global = true)]
    pub members_store_timeout_ms: Option<u64>,
    /// Authorization of what the proxy answers itself: upstream, jwt or none [auth.mode]
    #[arg(long, env = "FGP_AUTH_MODE", global = true)]
    pub auth_mode: Option<AuthMode>,
    /// Upstream-mode probe, e.g. "PATCH {base}/Group/{id}" [auth.upstream_probe]
    #[arg(long, env = "FGP_AUTH_UPSTREAM_PROBE", global = true)]
    pub auth_upstream_probe: Option<String>,
    /// JWK Set file for jwt mode [auth.jwt.jwks_file]
    #[arg(long, env = "FGP_AUTH_JWT_JWKS_FILE", global = true)]
    pub auth_jwt_jwks_file: Option<String>,
    /// JWK Set URL (http) for jwt mode [auth.jwt.jwks_url]
    #[arg(long, env = "FGP_AUTH_JWT_JWKS_URL", global = true)]
    pub auth_jwt_jwks_url: Option<String>,
    /// Required token issuer [auth.jwt.issuer]
    #[arg(long, env = "FGP_AUTH_JWT_ISSUER", global = true)]
    pub auth_jwt_issuer: Option<String>,
    /// Accepted token audiences, comma-separated [auth.jwt.audience]
    #[arg(
        long,
        env = "FGP_AUTH_JWT_AUDIENCE",
        value_delimiter = ',',
        global = true
    )]
    pub auth_jwt_audience: Option<Vec<String>>,
    /// Clock skew allowed on exp/nbf in seconds [auth.jwt.leeway_seconds]
    #[arg(long, env = "FGP_AUTH_JWT_LEEWAY_SECONDS", global = true)]
    pub auth_jwt_leeway_seconds: Option<u64>,
    /// Store runtime worker threads [members.store_threads]
    #[arg(long, env = "FGP_MEMBERS_STORE_THREADS", global = true)]
    pub members_store_threads: Option<usize>,
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

    pub fn apply(&mut self, o: &Overrides) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(value) = value {
                *target = value.clone();
            }
        }
        set(&mut self.server.listen, &o.listen);
        set(&mut self.server.admin_listen, &o.admin_listen);
        set(&mut self.server.threads, &o.threads);
        set(
            &mut self.server.grace_period_seconds,
            &o.grace_period_seconds,
        );
        set(
            &mut self.server.graceful_shutdown_timeout_seconds,
            &o.graceful_shutdown_timeout_seconds,
        );
        set(&mut self.upstream.url, &o.upstream_url);
        set(
            &mut self.upstream.connect_timeout_ms,
            &o.upstream_connect_timeout_ms,
        );
        set(
            &mut self.upstream.read_timeout_ms,
            &o.upstream_read_timeout_ms,
        );
        set(
            &mut self.upstream.write_timeout_ms,
            &o.upstream_write_timeout_ms,
        );
        set(
            &mut self.upstream.idle_timeout_ms,
            &o.upstream_idle_timeout_ms,
        );
        set(&mut self.upstream.preserve_host, &o.upstream_preserve_host);
        set(
            &mut self.upstream.forwarded_headers,
            &o.upstream_forwarded_headers,
        );
        set(&mut self.fhir.base_paths, &o.fhir_base_paths);
        set(&mut self.fhir.max_json_depth, &o.fhir_max_json_depth);
        set(&mut self.fhir.extension_base, &o.fhir_extension_base);
        set(
            &mut self.fhir.patch_failure_status,
            &o.fhir_patch_failure_status,
        );
        set(
            &mut self.fhir.remove_member_by_reference,
            &o.fhir_remove_member_by_reference,
        );
        set(&mut self.fhir.reference_fields, &o.fhir_reference_fields);
        set(
            &mut self.fhir.max_intercepted_body_bytes,
            &o.fhir_max_intercepted_body_bytes,
        );
        set(
            &mut self.fhir.max_patch_operations,
            &o.fhir_max_patch_operations,
        );
        set(
            &mut self.fhir.max_inline_members,
            &o.fhir_max_inline_members,
        );
        set(&mut self.clickhouse.url, &o.clickhouse_url);
        set(&mut self.clickhouse.database, &o.clickhouse_database);
        set(&mut self.clickhouse.user, &o.clickhouse_user);
        set(&mut self.clickhouse.password, &o.clickhouse_password);
        set(&mut self.clickhouse.cluster, &o.clickhouse_cluster);
        set(
            &mut self.clickhouse.replication_path,
            &o.clickhouse_replication_path,
        );
        set(
            &mut self.clickhouse.replica_name,
            &o.clickhouse_replica_name,
        );
        set(&mut self.mongo.uri, &o.mongo_uri);
        set(&mut self.mongo.database, &o.mongo_database);
        set(&mut self.mongo.history_uri, &o.mongo_history_uri);
        set(&mut self.mongo.history_database, &o.mongo_history_database);
        let m = &mut self.members;
        set(&mut m.enabled, &o.members_enabled);
        set(
            &mut m.version_conflict_status,
            &o.members_version_conflict_status,
        );
        set(&mut m.require_if_match, &o.members_require_if_match);
        set(&mut m.mixed_patch, &o.members_mixed_patch);
        set(&mut m.put_without_member, &o.members_put_without_member);
        set(&mut m.create_in_clickhouse, &o.members_create_in_clickhouse);
        set(&mut m.batch_max_rows, &o.members_batch_max_rows);
        set(&mut m.batch_max_delay_ms, &o.members_batch_max_delay_ms);
        set(&mut m.lease_ttl_ms, &o.members_lease_ttl_ms);
        set(&mut m.write_wait_ms, &o.members_write_wait_ms);
        set(&mut m.store_timeout_ms, &o.members_store_timeout_ms);
        set(&mut m.store_threads, &o.members_store_threads);
        let a = &mut self.auth;
        set(&mut a.mode, &o.auth_mode);
        set(&mut a.upstream_probe, &o.auth_upstream_probe);
        set(&mut a.jwt.jwks_file, &o.auth_jwt_jwks_file);
        set(&mut a.jwt.jwks_url, &o.auth_jwt_jwks_url);
        set(&mut a.jwt.issuer, &o.auth_jwt_issuer);
        set(&mut a.jwt.audience, &o.auth_jwt_audience);
        set(&mut a.jwt.leeway_seconds, &o.auth_jwt_leeway_seconds);
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
        let text = include_str!("../config/fhir-group-proxy.toml");
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
