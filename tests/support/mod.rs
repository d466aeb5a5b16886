//! Shared test harness: real sockets, real services. The proxy runs as its own
//! process (the built binary), the stand-in legacy FHIR server runs in-process
//! on MongoDB-compatible FerretDB, and ClickHouse is the real server started by
//! `scripts/test.sh`.
#![allow(dead_code)]

pub mod members;
pub mod raw;
pub mod stack;

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use standin_legacy_fhir::{spawn_on_free_port, StandinConfig};

pub fn mongo_uri() -> String {
    std::env::var("FGP_TEST_MONGO_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27018/".into())
}

pub fn clickhouse_url() -> String {
    std::env::var("FGP_TEST_CLICKHOUSE_URL").unwrap_or_else(|_| "http://127.0.0.1:18123".into())
}

/// The owner every test Group belongs to.
pub const TEST_OWNER: &str = "bwell";

/// `group` with what the reference server requires of every write (and the
/// stand-in, which imitates it): a `meta.source` and an owner tag (plus the
/// access tag its tokens' `access/*.*` scopes are checked against). Kept
/// when the test already set its own.
pub fn owned(mut group: serde_json::Value) -> serde_json::Value {
    if group.get("meta").is_none() {
        group["meta"] = serde_json::json!({
            "source": "https://fhir-group-proxy.test/source",
            "security": [
                {"system": "https://www.icanbwell.com/owner", "code": TEST_OWNER},
                {"system": "https://www.icanbwell.com/access", "code": TEST_OWNER}
            ]
        });
    }
    group
}

/// `value` without the extensions the reference server (and the proxy in
/// front of it) adds to every reference it shows: what the client sent.
pub fn as_sent(value: &serde_json::Value) -> serde_json::Value {
    const SHOWN: [&str; 3] = [
        "https://www.icanbwell.com/sourceId",
        "https://www.icanbwell.com/uuid",
        "https://www.icanbwell.com/sourceAssigningAuthority",
    ];
    let mut value = value.clone();
    fn walk(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(fields) => {
                if fields.contains_key("reference") {
                    if let Some(serde_json::Value::Array(extensions)) = fields.get_mut("extension")
                    {
                        extensions.retain(|e| !SHOWN.iter().any(|url| e["url"] == *url));
                        if extensions.is_empty() {
                            fields.remove("extension");
                        }
                    }
                }
                fields.values_mut().for_each(walk);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

/// A database name no other test uses. Under `scripts/test.sh` (and
/// `scripts/bench.sh`, whose benches share this module) its hex part
/// starts with the run's id (`FGP_TEST_RUN_ID`, 8 lowercase hex digits), by
/// which the script drops the databases of its own run, and of no other run
/// sharing the servers, when it ends (`examples/drop_test_run_databases.rs`).
pub fn unique_name(prefix: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    match std::env::var("FGP_TEST_RUN_ID") {
        Ok(run) if is_run_id(&run) => format!("{prefix}_{run}{}", &random[run.len()..]),
        _ => format!("{prefix}_{random}"),
    }
}

fn is_run_id(run: &str) -> bool {
    run.len() == 8 && run.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// A port no server listens on now, for a server another process will bind
/// (the proxy, a fault test's ClickHouse) or for a closed address.
///
/// Taken below the kernel's ephemeral range: in-process servers of parallel
/// tests bind port 0 and get ports from that range, so between this check and
/// the child's own bind none of them can take the port (a port taken by
/// binding port 0 here and released once did collide: the proxy's test then
/// talked to a stand-in). Each call hands out another port, so parallel tests
/// of one binary never get the same one.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (first, end) = ports_below_ephemeral_range();
    let span = u32::from(end - first);
    // Test binaries run one after another; each starts elsewhere in the span.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(u32::from(first) + offset) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free local port in {first}..{end}");
}

/// `first..end`: up to 12k ports just below the ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 by default), above the
/// well-known ports.
fn ports_below_ephemeral_range() -> (u16, u16) {
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32_768);
    assert!(
        ephemeral_start > 2_048,
        "the ephemeral port range starts at {ephemeral_start}: no room below it for test servers"
    );
    (
        ephemeral_start.saturating_sub(12_000).max(1_025),
        ephemeral_start,
    )
}

/// The stand-in legacy FHIR server on its own Mongo database.
pub struct Standin {
    pub addr: SocketAddr,
    pub database: String,
    /// The real-server behaviours it has on: the proxy in front of it is
    /// configured for them, as an operator would configure it.
    pub fidelity: standin_legacy_fhir::Fidelity,
    task: tokio::task::JoinHandle<()>,
}

impl Standin {
    pub async fn start() -> Standin {
        Self::start_with_access(standin_legacy_fhir::AccessTokens::default()).await
    }

    /// A stand-in that enforces its own access control with these tokens.
    pub async fn start_with_access(access: standin_legacy_fhir::AccessTokens) -> Standin {
        Self::start_with(access, standin_legacy_fhir::Fidelity::real()).await
    }

    /// A stand-in with some of the real server's behaviours switched on.
    pub async fn start_with_fidelity(fidelity: standin_legacy_fhir::Fidelity) -> Standin {
        Self::start_with(Default::default(), fidelity).await
    }

    /// A stand-in that keeps history in a database of its own.
    pub async fn start_with_history_database(history_database: &str) -> Standin {
        Self::start_configured(
            Default::default(),
            Default::default(),
            Some(history_database),
        )
        .await
    }

    async fn start_with(
        access: standin_legacy_fhir::AccessTokens,
        fidelity: standin_legacy_fhir::Fidelity,
    ) -> Standin {
        Self::start_configured(access, fidelity, None).await
    }

    async fn start_configured(
        access: standin_legacy_fhir::AccessTokens,
        fidelity: standin_legacy_fhir::Fidelity,
        history_database: Option<&str>,
    ) -> Standin {
        let database = unique_name("standin");
        let config = StandinConfig {
            base_path: "/4_0_0".into(),
            access,
            fidelity: fidelity.clone(),
            history_database: history_database.map(str::to_string),
            ..StandinConfig::new(mongo_uri(), database.clone())
        };
        let (addr, task) = spawn_on_free_port(config).await.expect(
            "stand-in legacy FHIR server starts (is FerretDB running? see scripts/test.sh)",
        );
        Standin {
            addr,
            database,
            fidelity,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until the history entries of every write it answered are in:
    /// like the real server, it writes them after answering.
    pub async fn history_settled(&self) {
        let url = format!("{}/__standin/history-settled", self.url());
        send(&http_client(), "GET", &url, &[], "")
            .await
            .assert_status(204);
    }

    /// The proxy settings for this stand-in's behaviour, as an operator
    /// would set them for their legacy server.
    pub fn dialect_settings(&self) -> [(&'static str, &'static str); 2] {
        let fidelity = &self.fidelity;
        [
            (
                "FGP_FHIR_REFERENCE_FIELDS",
                if fidelity.reference_enrichment {
                    "true"
                } else {
                    "false"
                },
            ),
            (
                "FGP_FHIR_PATCH_FAILURE_STATUS",
                if fidelity.real_patch { "400" } else { "422" },
            ),
        ]
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The stand-in legacy server with the proxy in front of it, and the member
/// stores the proxy uses: a fresh ClickHouse database (schema applied) and the
/// stand-in's own MongoDB database. `extra` adds or overrides `FGP_*` settings.
pub async fn start_with_member_stores(
    extra: &[(&str, &str)],
) -> (
    Standin,
    ProxyProcess,
    fhir_group_proxy::config::ClickHouseSettings,
) {
    start_with_member_stores_behind(Standin::start().await, extra).await
}

/// [`start_with_member_stores`] in front of a given stand-in.
pub async fn start_with_member_stores_behind(
    standin: Standin,
    extra: &[(&str, &str)],
) -> (
    Standin,
    ProxyProcess,
    fhir_group_proxy::config::ClickHouseSettings,
) {
    let clickhouse = fresh_member_database("fgp_test").await;
    let mongo = mongo_uri();
    let mut settings = vec![
        ("FGP_CLICKHOUSE_URL", clickhouse.url.as_str()),
        ("FGP_CLICKHOUSE_DATABASE", clickhouse.database.as_str()),
        ("FGP_MONGO_URI", mongo.as_str()),
        ("FGP_MONGO_DATABASE", standin.database.as_str()),
    ];
    settings.extend(standin.dialect_settings());
    settings.extend_from_slice(extra);
    let proxy = ProxyProcess::start(&standin.url(), &settings);
    (standin, proxy, clickhouse)
}

/// A ClickHouse database of its own with the member schema applied.
pub async fn fresh_member_database(prefix: &str) -> fhir_group_proxy::config::ClickHouseSettings {
    let clickhouse = fhir_group_proxy::config::ClickHouseSettings {
        url: clickhouse_url(),
        database: unique_name(prefix),
        ..Default::default()
    };
    fhir_group_proxy::store::setup::apply_schema(&clickhouse)
        .await
        .expect("schema applies on the real ClickHouse");
    clickhouse
}

/// The stored Group document with FHIR id `id`.
pub async fn group_document(mongo: &mongodb::Database, id: &str) -> mongodb::bson::Document {
    mongo
        .collection::<mongodb::bson::Document>("Group_4_0_0")
        .find_one(mongodb::bson::doc! {"id": id})
        .await
        .expect("MongoDB answers")
        .expect("group document")
}

/// Published member events of the Group with member key `group_key`.
pub async fn published_event_count(clickhouse: &clickhouse::Client, group_key: &str) -> u64 {
    clickhouse
        .query("SELECT count() FROM Group_4_0_0_MemberSlotEvents WHERE group_key = ? AND slot_id != ''")
        .bind(group_key)
        .fetch_one::<u64>()
        .await
        .expect("ClickHouse answers")
}

/// The proxy binary running as a child process; killed on drop.
pub struct ProxyProcess {
    pub addr: SocketAddr,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`), unless disabled
    /// with `FGP_ADMIN_LISTEN=""`.
    pub admin_addr: Option<SocketAddr>,
    child: Child,
    /// How it was started, for a restart in the same place.
    upstream_url: String,
    settings: Vec<(String, String)>,
}

impl ProxyProcess {
    /// The proxy process's id (for CPU accounting from `/proc`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Starts the proxy in front of `upstream_url`, with extra `FGP_*` settings.
    pub fn start(upstream_url: &str, settings: &[(&str, &str)]) -> ProxyProcess {
        Self::start_with_stderr(upstream_url, settings, Stdio::inherit())
    }

    /// Like [`ProxyProcess::start`], with the proxy's log (stderr) going to `stderr`.
    pub fn start_with_stderr(
        upstream_url: &str,
        settings: &[(&str, &str)],
        stderr: Stdio,
    ) -> ProxyProcess {
        let port = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
        let admin_listen = settings
            .iter()
            .rev()
            .find(|(key, _)| *key == "FGP_ADMIN_LISTEN")
            .map_or_else(
                || format!("127.0.0.1:{}", free_port()),
                |(_, v)| v.to_string(),
            );
        let settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Self::spawn(addr, &admin_listen, upstream_url, settings, stderr)
    }

    fn spawn(
        addr: SocketAddr,
        admin_listen: &str,
        upstream_url: &str,
        settings: Vec<(String, String)>,
        stderr: Stdio,
    ) -> ProxyProcess {
        let admin_addr = admin_listen.parse().ok();
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-group-proxy"));
        command
            .arg("serve")
            .env("FGP_LISTEN", addr.to_string())
            .env("FGP_ADMIN_LISTEN", admin_listen)
            .env("FGP_UPSTREAM_URL", upstream_url)
            .env("FGP_THREADS", "2")
            .env("FGP_GRACE_PERIOD_SECONDS", "0")
            .env("FGP_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "2")
            .env(
                "FGP_LOG",
                std::env::var("FGP_TEST_PROXY_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // The real test services, so every test runs the production shape;
            // tests that look into the stores name their own databases.
            .env("FGP_CLICKHOUSE_URL", clickhouse_url())
            .env("FGP_CLICKHOUSE_DATABASE", unique_name("fgp_proxy"))
            .env("FGP_MONGO_URI", mongo_uri())
            .env("FGP_MONGO_DATABASE", unique_name("fgp_proxy"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, value) in &settings {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("the proxy binary starts");
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("the proxy exited at start with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "the proxy did not listen on {addr} in 15s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        ProxyProcess {
            addr,
            admin_addr,
            child,
            upstream_url: upstream_url.to_string(),
            settings,
        }
    }

    /// SIGKILL (no drain, no goodbye), then the same proxy again on the same
    /// addresses, as a supervisor would restart it, less the settings named
    /// in `dropping`.
    pub fn kill_and_restart(&mut self, dropping: &[&str]) {
        self.kill_and_restart_with(&[], dropping);
    }

    /// [`Self::kill_and_restart`], with `adding` settings too.
    pub fn kill_and_restart_with(&mut self, adding: &[(&str, &str)], dropping: &[&str]) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let admin = self.admin_addr.map(|a| a.to_string()).unwrap_or_default();
        let mut settings = std::mem::take(&mut self.settings);
        settings.retain(|(key, _)| !dropping.contains(&key.as_str()));
        settings.extend(adding.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let restarted = Self::spawn(
            self.addr,
            &admin,
            &self.upstream_url,
            settings,
            Stdio::inherit(),
        );
        *self = restarted;
    }

    /// Whether the process has exited.
    pub fn has_exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://` + the admin listener's address.
    pub fn admin_url(&self) -> String {
        let addr = self.admin_addr.expect("the admin listener is enabled");
        format!("http://{addr}")
    }

    /// Peak resident memory of the proxy process so far, in KiB (Linux).
    pub fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).ok()?;
        status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.send_sigterm();
        self.child.wait().expect("the proxy exits")
    }

    /// Sends SIGTERM without waiting.
    pub fn send_sigterm(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -TERM {pid} failed");
    }

    /// The exit status once the process has exited, `None` if it still runs
    /// after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("process status") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A received response, body collected.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, showing the body when it differs.
    #[track_caller]
    pub fn assert_status(&self, status: u16) {
        assert_eq!(
            self.status,
            status,
            "body: {}",
            String::from_utf8_lossy(&self.body[..self.body.len().min(2_000)])
        );
    }
}

pub type HttpClient = Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>;

pub fn http_client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

/// One request with a full body; `headers` are sent in order.
pub async fn send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Reply {
    try_send(client, method, url, headers, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {url}: {e}"))
}

/// [`send`] for tests that expect transport failures: they come back as `Err`.
pub async fn try_send(
    client: &HttpClient,
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Reply, String> {
    let mut builder = hyper::Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let request = builder.body(Full::new(body.into())).expect("valid request");
    let response = client
        .request(request)
        .await
        .map_err(|e| format!("no response: {e}"))?;
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body cut off: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        headers,
        body,
    })
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (no two tests need the same seed).
pub fn pseudo_random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// Asserts `reply` is a FHIR OperationOutcome error with `status`.
pub fn assert_outcome(reply: &Reply, status: u16, code: &str) {
    assert_eq!(
        reply.status,
        status,
        "body: {}",
        String::from_utf8_lossy(&reply.body)
    );
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("application/fhir+json")),
        "content-type {:?}",
        reply.header("content-type")
    );
    let body = reply.json();
    assert_eq!(body["resourceType"], "OperationOutcome");
    assert_eq!(body["issue"][0]["code"], code, "{body}");
    assert!(
        body["issue"][0]["diagnostics"]
            .as_str()
            .is_some_and(|d| !d.is_empty()),
        "diagnostics explain the error: {body}"
    );
}

/// `Patient/seed-{i}` for the `i`-th member of seeded groups.
pub fn seed_reference(i: usize) -> String {
    format!("Patient/seed-{i}")
}

/// POSTs a Group with `members` inline members (`seed_reference`) to
/// `{base}/Group`; the legacy server's or the proxy's reply.
pub async fn post_group(client: &HttpClient, base: &str, members: usize) -> Reply {
    // `member: []` when empty: RFC 6902 appends only to an array that exists.
    let mut group =
        owned(serde_json::json!({"resourceType": "Group", "type": "person", "actual": true}));
    group["member"] = (0..members)
        .map(|i| serde_json::json!({"entity": {"reference": seed_reference(i)}}))
        .collect();
    send(
        client,
        "POST",
        &format!("{base}/Group"),
        &[("content-type", "application/fhir+json")],
        serde_json::to_vec(&group).expect("json"),
    )
    .await
}

/// Adds members `seed_reference(0..size)` to Group `id` with member PATCHes of
/// 10,000 ops each.
pub async fn seed_members(client: &HttpClient, base: &str, id: &str, size: usize) {
    let mut added = 0;
    while added < size {
        let batch = 10_000.min(size - added);
        let ops: Vec<serde_json::Value> = (added..added + batch)
            .map(|i| serde_json::json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": seed_reference(i)}}}))
            .collect();
        send(
            client,
            "PATCH",
            &format!("{base}/Group/{id}"),
            &[
                ("content-type", "application/json-patch+json"),
                ("prefer", "return=minimal"),
            ],
            serde_json::to_vec(&ops).expect("json"),
        )
        .await
        .assert_status(200);
        added += batch;
    }
}
