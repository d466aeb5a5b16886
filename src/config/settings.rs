//! Every setting of the proxy, each declared once: its key, type, default,
//! flag and environment variable (see [`super::declare`] for the form).
//! `config/fhir-group-proxy.toml` documents the keys for operators. The order
//! here is the order of the flags in `--help` and of the keys in `show-config`.

use serde::{Deserialize, Serialize};

use super::declare::settings;

settings! {
    pub struct ServerSettings in server {
        /// Address the proxy listens on.
        listen: String = "127.0.0.1:8080".into(),
            flag listen, env "FGP_LISTEN",
            help "Address to listen on";
        /// Address of the admin listener (`/metrics`, `/healthz`, `/readyz`);
        /// empty disables it.
        admin_listen: String = "127.0.0.1:9090".into(),
            flag admin_listen, env "FGP_ADMIN_LISTEN",
            help "Admin listener address for /metrics, /healthz, /readyz; empty disables";
        /// Worker threads; 0 means one per CPU core.
        threads: usize = 0,
            flag threads, env "FGP_THREADS",
            help "Worker threads, 0 = one per core";
        /// After SIGTERM, seconds to keep accepting (with `/readyz` answering 503)
        /// while load balancers notice.
        grace_period_seconds: u64 = 1,
            flag grace_period_seconds, env "FGP_GRACE_PERIOD_SECONDS",
            help "Seconds to keep accepting after SIGTERM, /readyz answering 503";
        /// Then at most this many seconds for in-flight requests and the member
        /// writes they started to finish.
        graceful_shutdown_timeout_seconds: u64 = 10,
            flag graceful_shutdown_timeout_seconds, env "FGP_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS",
            help "Seconds in-flight requests and writes get to finish on shutdown";
    }

    pub struct UpstreamSettings in upstream {
        /// Base URL of the legacy FHIR server, e.g. `http://127.0.0.1:3000`.
        url: String = "http://127.0.0.1:3000".into(),
            flag upstream_url, env "FGP_UPSTREAM_URL",
            help "Base URL of the legacy FHIR server";
        connect_timeout_ms: u64 = 2_000,
            flag upstream_connect_timeout_ms, env "FGP_UPSTREAM_CONNECT_TIMEOUT_MS",
            help "Upstream connect timeout in ms";
        /// Longest wait for the next bytes from the upstream (also time to first byte).
        read_timeout_ms: u64 = 60_000,
            flag upstream_read_timeout_ms, env "FGP_UPSTREAM_READ_TIMEOUT_MS",
            help "Upstream read timeout in ms";
        write_timeout_ms: u64 = 60_000,
            flag upstream_write_timeout_ms, env "FGP_UPSTREAM_WRITE_TIMEOUT_MS",
            help "Upstream write timeout in ms";
        /// Idle upstream keep-alive connections are closed after this long.
        idle_timeout_ms: u64 = 60_000,
            flag upstream_idle_timeout_ms, env "FGP_UPSTREAM_IDLE_TIMEOUT_MS",
            help "Idle upstream connection lifetime in ms";
        /// Forward the client's `Host` header unchanged (the upstream then builds links
        /// that point at the proxy). When false, `Host` is set to the upstream authority.
        preserve_host: bool = true,
            flag upstream_preserve_host, env "FGP_UPSTREAM_PRESERVE_HOST",
            help "Forward the client's Host header unchanged";
        /// Add `X-Forwarded-For` (appended), `X-Forwarded-Proto` and `X-Forwarded-Host`
        /// (only when absent, so values set by an outer TLS-terminating balancer survive).
        forwarded_headers: bool = true,
            flag upstream_forwarded_headers, env "FGP_UPSTREAM_FORWARDED_HEADERS",
            help "Add X-Forwarded-For/-Proto/-Host";
    }

    pub struct FhirSettings in fhir {
        /// Path prefixes under which the FHIR API lives, e.g. `/4_0_0`.
        base_paths: Vec<String> = vec!["/4_0_0".into()],
            flag fhir_base_paths, env "FGP_FHIR_BASE_PATHS", arg(value_delimiter = ','),
            help "FHIR base paths, comma-separated";
        /// Largest request body the proxy reads itself (intercepted requests only;
        /// passthrough bodies are streamed and not limited here).
        max_intercepted_body_bytes: usize = 16 * 1024 * 1024,
            flag fhir_max_intercepted_body_bytes, env "FGP_FHIR_MAX_INTERCEPTED_BODY_BYTES",
            help "Largest body of a request the proxy handles itself, in bytes";
        /// Most JSON Patch operations accepted in one member PATCH.
        max_patch_operations: usize = 10_000,
            flag fhir_max_patch_operations, env "FGP_FHIR_MAX_PATCH_OPERATIONS",
            help "Most JSON Patch operations in one member PATCH";
        /// Status of a member patch that does not apply (a failed `test`, a
        /// missing target): the legacy server's. FHIR says 422; the reference
        /// server (icanbwell/fhir-server) answers 400.
        patch_failure_status: u16 = 400,
            flag fhir_patch_failure_status, env "FGP_FHIR_PATCH_FAILURE_STATUS",
            help "Status of a member patch that does not apply, 422 or 400";
        /// The reference server's convention `remove /member/-` with a `value`:
        /// remove every member with that `entity.reference`. RFC 6902 has no such
        /// op; off, such a patch fails as RFC 6902 says.
        remove_member_by_reference: bool = true,
            flag fhir_remove_member_by_reference, env "FGP_FHIR_REMOVE_MEMBER_BY_REFERENCE",
            help "Accept `remove /member/-` with a value (remove by reference)";
        /// Members are stored and shown as the reference server (icanbwell/
        /// fhir-server) stores and shows them: `_uuid`, `_sourceId` and
        /// `_sourceAssigningAuthority` on every reference, shown as
        /// `extension`s. Only for Groups whose stored document has
        /// `_sourceAssigningAuthority` (that server's field); off, members are
        /// stored and shown exactly as sent.
        reference_fields: bool = true,
            flag fhir_reference_fields, env "FGP_FHIR_REFERENCE_FIELDS",
            help "Store and show members' references as icanbwell/fhir-server does";
        /// Canonical base of the proxy's own extension URLs (`members-paged`,
        /// `member-removed` are appended).
        extension_base: String = crate::fhir::group_read::DEFAULT_EXTENSION_BASE.into(),
            flag fhir_extension_base, env "FGP_FHIR_EXTENSION_BASE",
            help "Canonical base of the proxy's extension URLs";
        /// Deepest nesting of arrays/objects in a body the proxy reads (400 above).
        max_json_depth: usize = 64,
            flag fhir_max_json_depth, env "FGP_FHIR_MAX_JSON_DEPTH",
            help "Deepest JSON nesting in a body the proxy reads";
        /// Most members inlined in a Group read; larger Groups are returned with
        /// `quantity` and a link to their `$members` paging operation instead.
        max_inline_members: usize = 10_000,
            flag fhir_max_inline_members, env "FGP_FHIR_MAX_INLINE_MEMBERS",
            help "Most members inlined in a Group read";
    }

    pub struct ClickHouseSettings in clickhouse {
        /// HTTP interface of ClickHouse.
        url: String = "http://127.0.0.1:8123".into(),
            flag clickhouse_url, env "FGP_CLICKHOUSE_URL",
            help "ClickHouse HTTP URL";
        // Not "fhir": the reference server's own ClickHouse mode keeps tables
        // of the same names there.
        database: String = "fhir_group_proxy".into(),
            flag clickhouse_database, env "FGP_CLICKHOUSE_DATABASE",
            help "ClickHouse database";
        user: String = "default".into(),
            flag clickhouse_user, env "FGP_CLICKHOUSE_USER",
            help "ClickHouse user";
        password: String = String::new(),
            flag clickhouse_password, env "FGP_CLICKHOUSE_PASSWORD", arg(hide_env_values = true),
            help "ClickHouse password (prefer the environment variable)";
        /// Cluster of the servers' `remote_servers` to create the tables on
        /// (replicated local tables, distributed tables over them, `ON CLUSTER`);
        /// empty: one server, plain MergeTree tables.
        cluster: String = String::new(),
            flag clickhouse_cluster, env "FGP_CLICKHOUSE_CLUSTER",
            help "ClickHouse cluster for replicated + distributed tables, empty = one server";
        /// Cluster mode: replication path prefix of the local tables (the
        /// database and table names are appended).
        replication_path: String = "/clickhouse/tables/{shard}".into(),
            flag clickhouse_replication_path, env "FGP_CLICKHOUSE_REPLICATION_PATH",
            help "Replication path prefix of the cluster's local tables";
        /// Cluster mode: replica name of the local tables.
        replica_name: String = "{replica}".into(),
            flag clickhouse_replica_name, env "FGP_CLICKHOUSE_REPLICA_NAME",
            help "Replica name of the cluster's local tables";
    }

    pub struct MongoSettings in mongo {
        /// Any MongoDB connection string, replica sets included.
        uri: String = "mongodb://127.0.0.1:27017/".into(),
            flag mongo_uri, env "FGP_MONGO_URI", arg(hide_env_values = true),
            help "MongoDB connection string";
        database: String = "fhir".into(),
            flag mongo_database, env "FGP_MONGO_DATABASE",
            help "MongoDB database of the legacy FHIR server";
        /// Where the legacy server keeps resource history, when not beside the
        /// resources (the reference server's `RESOURCE_HISTORY_MONGO_URL` /
        /// `RESOURCE_HISTORY_MONGO_DB_NAME`): empty means `uri` / `database`.
        history_uri: String = String::new(),
            flag mongo_history_uri, env "FGP_MONGO_HISTORY_URI", arg(hide_env_values = true),
            help "MongoDB connection string of the legacy server's history, empty = mongo.uri";
        history_database: String = String::new(),
            flag mongo_history_database, env "FGP_MONGO_HISTORY_DATABASE",
            help "MongoDB database of the legacy server's history, empty = mongo.database";
    }

    /// How PATCHes of `Group.member` are handled by the proxy itself.
    pub struct MemberSettings in members {
        /// Handle member PATCHes in the proxy (false: forward everything).
        enabled: bool = true,
            flag members_enabled, env "FGP_MEMBERS_ENABLED",
            help "Handle member PATCHes in the proxy";
        /// Status for a stale `If-Match`: 412 (FHIR R4) or 409 (as HAPI answers).
        version_conflict_status: u16 = 412,
            flag members_version_conflict_status, env "FGP_MEMBERS_VERSION_CONFLICT_STATUS",
            help "Status for a stale If-Match, 412 or 409";
        /// Answer 400 to member PATCHes without `If-Match`.
        require_if_match: bool = false,
            flag members_require_if_match, env "FGP_MEMBERS_REQUIRE_IF_MATCH",
            help "Require If-Match on member PATCHes";
        /// Patches mixing member and other ops: "split" (other ops go upstream as
        /// their own PATCH, one version in total) or "reject" (422).
        mixed_patch: MixedPatchPolicy = MixedPatchPolicy::Split,
            flag members_mixed_patch, env "FGP_MEMBERS_MIXED_PATCH",
            help "Mixed member/other patches: split or reject";
        /// A `PUT` without `member` of a migrated Group: "keep" its roster (what
        /// clients of a member-less legacy view expect) or "empty" it (FHIR-strict
        /// replace semantics).
        put_without_member: PutWithoutMember = PutWithoutMember::Keep,
            flag members_put_without_member, env "FGP_MEMBERS_PUT_WITHOUT_MEMBER",
            help "PUT without member of a migrated Group: keep or empty its roster";
        /// A Group created (POST, or PUT to a new id) with members keeps them as
        /// events from the start; false: the legacy server stores them inline.
        create_in_clickhouse: bool = true,
            flag members_create_in_clickhouse, env "FGP_MEMBERS_CREATE_IN_CLICKHOUSE",
            help "Groups created with members keep them in ClickHouse";
        /// Group commit: most rows in one ClickHouse insert ...
        batch_max_rows: usize = 10_000,
            flag members_batch_max_rows, env "FGP_MEMBERS_BATCH_MAX_ROWS",
            help "Most rows per ClickHouse insert";
        /// ... and longest wait, after the first rows, for writers that said
        /// they are on their way (a lone write never waits).
        batch_max_delay_ms: u64 = 20,
            flag members_batch_max_delay_ms, env "FGP_MEMBERS_BATCH_MAX_DELAY_MS",
            help "Longest group-commit wait for announced writers in ms";
        /// A member write holding a Group longer than this is presumed dead.
        lease_ttl_ms: u64 = 30_000,
            flag members_lease_ttl_ms, env "FGP_MEMBERS_LEASE_TTL_MS",
            help "Write lease lifetime in ms";
        /// How long a write waits for a busy Group before answering 503.
        write_wait_ms: u64 = 10_000,
            flag members_write_wait_ms, env "FGP_MEMBERS_WRITE_WAIT_MS",
            help "Longest wait for a busy Group in ms";
        /// Longest wait for the member stores per request, then 504 (a write
        /// that reached its commit point still completes).
        store_timeout_ms: u64 = 20_000,
            flag members_store_timeout_ms, env "FGP_MEMBERS_STORE_TIMEOUT_MS",
            help "Longest wait for the member stores per request in ms";
        /// Months of staged member events kept, the current one included;
        /// older months are dropped once no unfinished write needs them
        /// (0 keeps them all).
        staging_months_kept: u32 = 2,
            flag members_staging_months_kept, env "FGP_MEMBERS_STAGING_MONTHS_KEPT",
            help "Months of staged member events kept (0 = all)";
        /// Worker threads of the store runtime (MongoDB, ClickHouse clients).
        store_threads: usize = 2,
            flag members_store_threads, env "FGP_MEMBERS_STORE_THREADS",
            help "Store runtime worker threads";
    }

    /// Who may use what the proxy answers itself (member writes and reads): the
    /// legacy server's access control is bypassed there, so one of these guards it.
    pub struct AuthSettings in auth {
        /// "upstream": ask the legacy server with the client's own credentials
        /// (`upstream_probe`) and act only on a 2xx; "jwt": validate bearer tokens
        /// locally and require SMART scopes; "none": no checks (loud warning).
        mode: AuthMode = AuthMode::Upstream,
            flag auth_mode, env "FGP_AUTH_MODE",
            help "Authorization of what the proxy answers itself: upstream, jwt or none";
        /// The probe of "upstream" mode: method and path, `{base}` and `{id}` filled in.
        upstream_probe: String = "PATCH {base}/Group/{id}".into(),
            flag auth_upstream_probe, env "FGP_AUTH_UPSTREAM_PROBE",
            help "Upstream-mode probe, e.g. \"PATCH {base}/Group/{id}\"";
        // A table of its own, whose keys get their flags below.
        jwt: JwtSettings = JwtSettings::default();
    }

    pub struct JwtSettings in auth.jwt {
        /// A JWK Set file ...
        jwks_file: String = String::new(),
            flag auth_jwt_jwks_file, env "FGP_AUTH_JWT_JWKS_FILE",
            help "JWK Set file for jwt mode";
        /// ... or URL (http://; fetched at start and again for unknown key ids).
        jwks_url: String = String::new(),
            flag auth_jwt_jwks_url, env "FGP_AUTH_JWT_JWKS_URL",
            help "JWK Set URL (http) for jwt mode";
        /// Required `iss`.
        issuer: String = String::new(),
            flag auth_jwt_issuer, env "FGP_AUTH_JWT_ISSUER",
            help "Required token issuer";
        /// Accepted `aud` values (one must match).
        audience: Vec<String> = Vec::new(),
            flag auth_jwt_audience, env "FGP_AUTH_JWT_AUDIENCE", arg(value_delimiter = ','),
            help "Accepted token audiences, comma-separated";
        /// Clock skew allowed on `exp` and `nbf`.
        leeway_seconds: u64 = 60,
            flag auth_jwt_leeway_seconds, env "FGP_AUTH_JWT_LEEWAY_SECONDS",
            help "Clock skew allowed on exp/nbf in seconds";
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Upstream,
    Jwt,
    None,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::config::Config;

    /// The override flags alone, mounted as `main.rs` mounts them.
    #[derive(Debug, Parser)]
    struct Flags {
        #[command(flatten)]
        overrides: Overrides,
    }

    fn parse_flags(args: &[&str]) -> Result<Overrides, clap::Error> {
        Flags::try_parse_from(std::iter::once("fhir-group-proxy").chain(args.iter().copied()))
            .map(|flags| flags.overrides)
    }

    /// Dotted paths of the keys that hold values (not tables) in `table`.
    fn leaf_keys(table: &toml::Table, prefix: &str, keys: &mut BTreeSet<String>) {
        for (name, value) in table {
            let key = format!("{prefix}{name}");
            match value {
                toml::Value::Table(inner) => leaf_keys(inner, &format!("{key}."), keys),
                _ => {
                    keys.insert(key);
                }
            }
        }
    }

    fn keys_of_toml(text: &str) -> BTreeSet<String> {
        let table: toml::Table = toml::from_str(text).expect("TOML parses as a table");
        let mut keys = BTreeSet::new();
        leaf_keys(&table, "", &mut keys);
        keys
    }

    fn toml_of(config: &Config) -> String {
        toml::to_string(config).expect("a config renders as TOML")
    }

    #[test]
    fn every_setting_has_a_flag_and_an_env_var_named_after_its_key() {
        let mut flagged = BTreeSet::new();
        for arg in Flags::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" {
                continue;
            }
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let key = help
                .rsplit_once(" [")
                .and_then(|(_, key)| key.strip_suffix(']'))
                .unwrap_or_else(|| panic!("--{id}: help does not end in [key]: {help:?}"));
            // The server's flags have no section prefix; every other section's do.
            let expected_id = key.strip_prefix("server.").unwrap_or(key).replace('.', "_");
            assert_eq!(id, expected_id, "flag of {key}");
            assert_eq!(arg.get_long(), Some(id.replace('_', "-").as_str()));
            let env = arg.get_env().and_then(|env| env.to_str());
            assert_eq!(env, Some(format!("FGP_{}", id.to_uppercase()).as_str()));
            assert!(arg.is_global_set(), "--{id} is not global");
            assert!(flagged.insert(key.to_string()), "two flags set {key}");
        }
        assert_eq!(flagged, keys_of_toml(&toml_of(&Config::default())));
    }

    #[test]
    fn only_secrets_hide_their_environment_values() {
        let hidden: BTreeSet<_> = Flags::command()
            .get_arguments()
            .filter(|arg| arg.is_hide_env_values_set())
            .map(|arg| arg.get_id().to_string())
            .collect();
        let secrets = ["clickhouse_password", "mongo_history_uri", "mongo_uri"];
        assert_eq!(hidden, secrets.map(String::from).into());
    }

    #[test]
    fn an_empty_file_gives_the_declared_defaults() {
        let from_empty = Config::from_toml("").expect("empty TOML is valid");
        assert_eq!(toml_of(&from_empty), toml_of(&Config::default()));
        let members: MemberSettings = toml::from_str("").expect("empty section is valid");
        assert_eq!(members.lease_ttl_ms, 30_000);
        assert_eq!(members.put_without_member, PutWithoutMember::Keep);
    }

    #[test]
    fn the_example_file_shows_every_key_at_its_default() {
        let text = include_str!("../../config/fhir-group-proxy.toml");
        let example = Config::from_toml(text).expect("example parses");
        assert_eq!(toml_of(&example), toml_of(&Config::default()));
        assert_eq!(
            keys_of_toml(text),
            keys_of_toml(&toml_of(&Config::default()))
        );
    }

    #[test]
    fn a_flag_overrides_the_file_and_a_missing_flag_keeps_it() {
        let file = r#"
            [server]
            listen = "127.0.0.1:1"
            [fhir]
            extension_base = "urn:file:"
            [members]
            enabled = true
            batch_max_rows = 7
            lease_ttl_ms = 1
            [auth]
            mode = "none"
            [auth.jwt]
            audience = ["file"]
        "#;
        let mut config = Config::from_toml(file).expect("file parses");
        config.apply(
            &parse_flags(&[
                "--listen=127.0.0.1:2",
                "--fhir-extension-base=urn:flag:",
                "--members-enabled=false",
                "--members-batch-max-rows=9",
                "--auth-mode=jwt",
                "--auth-jwt-audience=a,b",
            ])
            .expect("flags parse"),
        );
        assert_eq!(config.server.listen, "127.0.0.1:2");
        assert_eq!(config.fhir.extension_base, "urn:flag:");
        assert!(!config.members.enabled);
        assert_eq!(config.members.batch_max_rows, 9);
        assert_eq!(config.auth.mode, AuthMode::Jwt);
        assert_eq!(config.auth.jwt.audience, ["a", "b"]);
        assert_eq!(config.members.lease_ttl_ms, 1);

        let unchanged = toml_of(&config);
        config.apply(&parse_flags(&[]).expect("no flags parse"));
        assert_eq!(toml_of(&config), unchanged);
    }

    #[test]
    fn a_bad_flag_value_is_an_error_naming_the_flag() {
        for args in [
            ["--members-mixed-patch", "sometimes"],
            ["--members-batch-max-rows", "many"],
            ["--upstream-preserve-host", "maybe"],
        ] {
            let err = parse_flags(&args).expect_err("a bad value is refused");
            assert!(err.to_string().contains(args[0]), "{err}");
        }
    }
}
