//! Member PATCH cost: through the proxy (events in ClickHouse) versus the
//! legacy path (the stand-in legacy server rewriting the whole Group document),
//! measured in the same run on the same machine. Run with `bash scripts/bench.sh`.
//!
//! Reported: latency of a value op (add one member) and of a positional op
//! (pin member N, set its `inactive`) on groups of 1k, 100k and 1M members,
//! the store round trips of one PATCH, PATCHes/s against the store's own
//! compare-and-swap rate (16 clients on 16 Groups and on 1), and member-add
//! throughput with 64 concurrent clients.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use serde_json::{json, Value};
use support::*;

const SAMPLES: usize = 30;
const CLIENTS: usize = 64;
const PATCHES_PER_CLIENT: usize = 10;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("FGP_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 100_000, 1_000_000]);

    let (standin, proxy, _clickhouse) =
        start_with_member_stores(&[("FGP_FHIR_MAX_INTERCEPTED_BODY_BYTES", "67108864")]).await;
    let client = http_client();
    let proxy_base = format!("{}/4_0_0", proxy.url());

    println!("\n## Member PATCH: one value op and one positional op (ms, {SAMPLES} sequential samples each)\n");
    println!("value op = `add /member/-` of a new member (O(ops) on the proxy); positional op = `test /member/N/entity/reference` + `add /member/N/inactive` at N spread over the array (the proxy ranks the Group's order keys in ClickHouse)\n");
    println!("| members in group | op | legacy p50 | legacy p90 | proxy p50 | proxy p90 | legacy/proxy (p50) | proxy seeding |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &size in &sizes {
        let seeding = Instant::now();
        let proxy_group = create_group(&client, &proxy_base).await;
        seed_members(&client, &proxy_base, &proxy_group, size).await;
        let seeded_in = seeding.elapsed();
        let proxy_ms = [
            latencies(&client, &proxy_base, &proxy_group, Op::Value, size).await,
            latencies(&client, &proxy_base, &proxy_group, Op::Positional, size).await,
        ];

        // Each legacy measurement gets its own database: FerretDB's SQLite
        // backend scans a collection for every query, so big legacy documents
        // would slow every later query in the same collection.
        let legacy_standin = Standin::start().await;
        let legacy_base = format!("{}/4_0_0", legacy_standin.url());
        let legacy = match create_legacy_group(&client, &legacy_base, size).await {
            Ok(id) => Ok([
                latencies(&client, &legacy_base, &id, Op::Value, size).await,
                latencies(&client, &legacy_base, &id, Op::Positional, size).await,
            ]),
            Err(why) => Err(why),
        };
        for (kind, op) in [Op::Value, Op::Positional].into_iter().enumerate() {
            let proxy_ms = &proxy_ms[kind];
            let (lp50, lp90, ratio) = match &legacy {
                Ok(ms) => (
                    format!("{:.1}", pct(&ms[kind], 50)),
                    format!("{:.1}", pct(&ms[kind], 90)),
                    format!("{:.1}x", pct(&ms[kind], 50) / pct(proxy_ms, 50)),
                ),
                Err(why) => (why.clone(), "-".into(), "legacy cannot".into()),
            };
            println!(
                "| {size} | {} | {lp50} | {lp90} | {:.1} | {:.1} | {ratio} | {:.1} s |",
                op.name(),
                pct(proxy_ms, 50),
                pct(proxy_ms, 90),
                seeded_in.as_secs_f64()
            );
        }
    }

    store_round_trips(&client, &proxy_base, &proxy.admin_url()).await;
    if std::env::var("FGP_BENCH_RATIO").as_deref() != Ok("0") {
        store_ratio(
            &client,
            &proxy_base,
            &proxy.admin_url(),
            proxy.pid(),
            &standin.database,
        )
        .await;
    }

    if std::env::var("FGP_BENCH_THROUGHPUT").as_deref() == Ok("0") {
        return;
    }
    println!("\n## Member-add throughput, {CLIENTS} concurrent clients x {PATCHES_PER_CLIENT} PATCHes (1 add each)\n");
    println!("| target | groups | PATCHes/s | p50 ms | p99 ms | failed |");
    println!("|---|---|---:|---:|---:|---:|");
    for label in ["legacy (stand-in)", "proxy"] {
        for shared in [false, true] {
            let legacy_standin = Standin::start().await;
            let legacy_base = format!("{}/4_0_0", legacy_standin.url());
            let base = if label == "proxy" {
                &proxy_base
            } else {
                &legacy_base
            };
            let distinct = if shared { 1 } else { CLIENTS };
            let mut ids = Vec::with_capacity(distinct);
            for _ in 0..distinct {
                let id = if label == "proxy" {
                    let id = create_group(&client, base).await;
                    seed_members(&client, base, &id, 1_000).await;
                    id
                } else {
                    create_legacy_group(&client, base, 1_000)
                        .await
                        .expect("1k group")
                };
                ids.push(id);
            }
            let groups: Vec<String> = (0..CLIENTS).map(|i| ids[i % distinct].clone()).collect();
            let (rate, p50, p99, failed) = throughput(&client, base, &groups).await;
            println!(
                "| {label} | {} | {rate:.0} | {p50:.1} | {p99:.1} | {failed} |",
                if shared {
                    "1 shared group (1k members)"
                } else {
                    "64 groups (1k members each)"
                }
            );
        }
    }
}

/// Store round trips of one member PATCH (a single add, one client, so no
/// batching), from the proxy's own counters: MongoDB commands by name and
/// ClickHouse statements by kind, each divided by the PATCHes sent; once
/// answered `return=minimal`, once with the Group (the default, which reads
/// the roster of the version written).
async fn store_round_trips(client: &HttpClient, base: &str, admin: &str) {
    const PATCHES: usize = 50;
    let id = create_group(client, base).await;
    seed_members(client, base, &id, 1_000).await;
    println!(
        "\n## Store round trips per member PATCH ({PATCHES} sequential single adds, 1k members)\n"
    );
    println!("| answer | store | per PATCH | by command |");
    println!("|---|---|---:|---|");
    for (answer, prefer) in [
        ("minimal", "return=minimal"),
        ("representation", "return=representation"),
    ] {
        let before = counters(client, admin).await;
        for i in 0..PATCHES {
            let patch = json!([add(format!("Patient/rt-{answer}-{i}"))]);
            let (status, _) = send_patch_preferring(client, base, &id, &patch, prefer).await;
            assert_eq!(status, 200, "round-trip sample {i} ({answer})");
        }
        let after = counters(client, admin).await;
        let per_patch = |name: &str| {
            (after.get(name).copied().unwrap_or(0.0) - before.get(name).copied().unwrap_or(0.0))
                / PATCHES as f64
        };
        let mongo = grown_by_name(&before, &after, "mongo:", PATCHES as f64);
        let clickhouse = per_patch("clickhouse:query") + per_patch("clickhouse:insert");
        println!(
            "| {answer} | MongoDB commands | {:.1} | {} |",
            total(&mongo),
            by_name(&mongo, 1)
        );
        println!(
            "| {answer} | ClickHouse statements | {clickhouse:.1} | query {:.1}, insert {:.1} |",
            per_patch("clickhouse:query"),
            per_patch("clickhouse:insert")
        );
    }
}

/// MongoDB commands and ClickHouse statements the proxy sent between two
/// [`counters`] readings.
fn statements_since(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
) -> (f64, f64) {
    let grown = |key: &String| after[key] - before.get(key).copied().unwrap_or(0.0);
    let sum = |prefix: &str| {
        after
            .keys()
            .filter(|key| key.starts_with(prefix))
            .map(grown)
            .sum::<f64>()
    };
    (sum("mongo:"), sum("clickhouse:"))
}

/// `mongo:<command>` (commands, from the latency histogram's count) and
/// `clickhouse:<kind>` (statements) from the proxy's `/metrics`.
async fn counters(client: &HttpClient, admin: &str) -> std::collections::HashMap<String, f64> {
    let reply = send(client, "GET", &format!("{admin}/metrics"), &[], "").await;
    reply.assert_status(200);
    parse_counters(&String::from_utf8_lossy(&reply.body))
}

/// `ferretdb:<command>`: the commands FerretDB received from every client
/// (the proxy's and the stand-in legacy server's, which answers each PATCH's
/// access probe), from FerretDB's own metrics; empty when it does not serve
/// them (`scripts/lib.sh` starts it with `--debug-addr` on 127.0.0.1).
async fn ferretdb_counters(client: &HttpClient) -> std::collections::HashMap<String, f64> {
    let url = std::env::var("FGP_TEST_FERRETDB_METRICS_URL")
        .unwrap_or_else(|_| "http://127.0.0.1:18088/debug/metrics".into());
    match try_send(client, "GET", &url, &[], "").await {
        Ok(reply) if reply.status == 200 => parse_counters(&String::from_utf8_lossy(&reply.body)),
        _ => std::collections::HashMap::new(),
    }
}

/// The counters [`counters`] and [`ferretdb_counters`] read, from a
/// Prometheus text page.
fn parse_counters(text: &str) -> std::collections::HashMap<String, f64> {
    let mut found = std::collections::HashMap::new();
    for line in text.lines() {
        let Some((name_labels, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let label = |key: &str| {
            name_labels
                .split(&format!("{key}=\""))
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(str::to_string)
        };
        let key = if name_labels.starts_with("fgp_mongo_command_duration_seconds_count") {
            label("command").map(|c| format!("mongo:{c}"))
        } else if name_labels.starts_with("fgp_clickhouse_statements_total") {
            label("kind").map(|k| format!("clickhouse:{k}"))
        } else if name_labels.starts_with("ferretdb_client_requests_total") {
            label("command").map(|c| format!("ferretdb:{c}"))
        } else {
            None
        };
        if let Some(key) = key {
            *found.entry(key).or_insert(0.0) += value;
        }
    }
    found
}

/// How much each `prefix` counter grew between two readings, divided by
/// `per` and named without the prefix, largest first (zeros left out).
fn grown_by_name(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
    prefix: &str,
    per: f64,
) -> Vec<(String, f64)> {
    let mut grown: Vec<(String, f64)> = after
        .iter()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(prefix)?;
            let n = (value - before.get(key).copied().unwrap_or(0.0)) / per;
            (n > 0.0).then(|| (name.to_string(), n))
        })
        .collect();
    grown.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    grown
}

fn total(grown: &[(String, f64)]) -> f64 {
    grown.iter().map(|(_, n)| n).sum()
}

/// `find 2.0, insert 2.0, ...` with `decimals` places.
fn by_name(grown: &[(String, f64)], decimals: usize) -> String {
    grown
        .iter()
        .map(|(name, n)| format!("{name} {n:.decimals$}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn pct(samples: &[f64], p: usize) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let index = ((sorted.len() - 1) * p).div_ceil(100);
    sorted[index.min(sorted.len() - 1)]
}

fn add(reference: String) -> Value {
    json!({"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}})
}

async fn create_group(client: &HttpClient, base: &str) -> String {
    let reply = post_group(client, base, 0).await;
    reply.assert_status(201);
    reply.json()["id"].as_str().expect("id").to_string()
}

/// The legacy server stores the whole roster in one document; over 16 MB it
/// cannot store the Group at all.
async fn create_legacy_group(
    client: &HttpClient,
    base: &str,
    size: usize,
) -> Result<String, String> {
    let reply = post_group(client, base, size).await;
    if reply.status == 201 {
        Ok(reply.json()["id"].as_str().expect("id").to_string())
    } else {
        Err(format!("cannot store it ({})", reply.status))
    }
}

async fn patch_one(client: &HttpClient, base: &str, id: &str, reference: String) -> (u16, f64) {
    send_patch(client, base, id, &json!([add(reference)])).await
}

async fn send_patch(client: &HttpClient, base: &str, id: &str, patch: &Value) -> (u16, f64) {
    send_patch_preferring(client, base, id, patch, "return=minimal").await
}

async fn send_patch_preferring(
    client: &HttpClient,
    base: &str,
    id: &str,
    patch: &Value,
    prefer: &str,
) -> (u16, f64) {
    let body = serde_json::to_vec(patch).expect("json");
    let started = Instant::now();
    let reply = send(
        client,
        "PATCH",
        &format!("{base}/Group/{id}"),
        &[
            ("content-type", "application/json-patch+json"),
            ("prefer", prefer),
        ],
        body,
    )
    .await;
    (reply.status, started.elapsed().as_secs_f64() * 1e3)
}

#[derive(Clone, Copy)]
enum Op {
    /// Names the member by value: the proxy's cost is O(ops).
    Value,
    /// Names the member by position: the proxy ranks the Group's order keys.
    Positional,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Value => "value: add /member/-",
            Op::Positional => "positional: test+add /member/N",
        }
    }
}

/// The positional patch of sample `i` on a Group seeded with `size` members:
/// pins member N (spread over the array, so positions far from both ends are
/// measured) and toggles its `inactive`, so every sample changes the Group.
fn positional_patch(i: usize, size: usize) -> Value {
    let n = (i * size / SAMPLES + size / (2 * SAMPLES)).min(size.saturating_sub(1));
    json!([
        {"op": "test", "path": format!("/member/{n}/entity/reference"), "value": seed_reference(n)},
        {"op": "add", "path": format!("/member/{n}/inactive"), "value": i.is_multiple_of(2)}
    ])
}

async fn latencies(client: &HttpClient, base: &str, id: &str, op: Op, size: usize) -> Vec<f64> {
    let mut samples = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let patch = match op {
            Op::Value => json!([add(format!(
                "Patient/bench-{}",
                uuid::Uuid::new_v4().simple()
            ))]),
            Op::Positional => positional_patch(i, size),
        };
        let (status, ms) = send_patch(client, base, id, &patch).await;
        assert_eq!(status, 200, "{} sample {i}", op.name());
        samples.push(ms);
    }
    samples
}

async fn throughput(client: &HttpClient, base: &str, groups: &[String]) -> (f64, f64, f64, usize) {
    let started = Instant::now();
    let results: Vec<(u16, f64)> = futures_util::stream::iter(0..CLIENTS * PATCHES_PER_CLIENT)
        .map(|n| {
            let id = groups[n % CLIENTS].clone();
            async move {
                patch_one(
                    client,
                    base,
                    &id,
                    format!("Patient/t-{}", uuid::Uuid::new_v4().simple()),
                )
                .await
            }
        })
        .buffer_unordered(CLIENTS)
        .collect()
        .await;
    let elapsed = started.elapsed().max(Duration::from_millis(1));
    let ok: Vec<f64> = results
        .iter()
        .filter(|(s, _)| *s == 200)
        .map(|(_, ms)| *ms)
        .collect();
    let failed = results.len() - ok.len();
    let rate = ok.len() as f64 / elapsed.as_secs_f64();
    if ok.is_empty() {
        return (0.0, 0.0, 0.0, failed);
    }
    (rate, pct(&ok, 50), pct(&ok, 99), failed)
}

/// Clients of the store-ratio rows (issue: 16 clients on 16 Groups and on 1).
const RATIO_CLIENTS: usize = 16;
/// How long each store-ratio row runs.
const RATIO_RUN: Duration = Duration::from_secs(4);

/// Member PATCHes/s through the proxy against what its MongoDB does on its
/// own in the same run: single-document compare-and-swap updates of a
/// version field (`findAndModify`, as the proxy's commit point), by the same
/// number of clients, on as many documents as the proxy's rows have Groups.
/// The ratio says how much of its store's write rate the proxy reaches.
async fn store_ratio(
    client: &HttpClient,
    base: &str,
    admin: &str,
    proxy_pid: u32,
    group_database: &str,
) {
    println!("\n## Member PATCHes/s against the store's own compare-and-swap rate ({RATIO_CLIENTS} clients, {} s per row, same run)\n", RATIO_RUN.as_secs());
    println!("raw = {RATIO_CLIENTS} clients doing `findAndModify` of `{{_id, v: n}}` to `n + 1` directly on FerretDB (retrying a lost race); raw on Groups = the same clients reading a Group by `id` and compare-and-swapping its `meta.versionId` (`findAndModify` of `{{id, meta.versionId}}`), on a copy of the proxy's Group collection taken just before the proxy row (FerretDB's SQLite backend pushes down only a filter that is exactly `{{_id}}`, so both commands decode the collection's documents until the match); MongoDB floor = the same clients, one per Group, each making the seven MongoDB commands of one single-member PATCH through the proxy's own store code, back to back, on a copy of the proxy's collections (member-state read, lock insert, head read, the legacy server's read for the access probe, compare-and-swap, history entry, lock delete): the most PATCHes/s this MongoDB allows if ClickHouse, HTTP and the proxy cost nothing (16 Groups only: on one Group queued PATCHes share a write); proxy = {RATIO_CLIENTS} clients sending single-member adds (`return=minimal`)\n");
    println!(
        "| documents / Groups | raw CAS updates/s | raw CAS on Groups/s | MongoDB floor/s | floor ÷ raw | proxy PATCHes/s | proxy ÷ raw | proxy ÷ raw on Groups | proxy failed | MongoDB commands / PATCH | ClickHouse statements / PATCH |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let mut cpu_rows = Vec::new();
    let mut ferretdb_rows = Vec::new();
    for groups in [RATIO_CLIENTS, 1] {
        let before = Cpu::sample(proxy_pid);
        let raw = raw_cas_rate(groups).await;
        let raw_cpu = Cpu::sample(proxy_pid).since(&before);
        let mut ids = Vec::with_capacity(groups);
        for _ in 0..groups {
            let id = create_group(client, base).await;
            seed_members(client, base, &id, 1_000).await;
            ids.push(id);
        }
        let raw_on_groups = raw_group_cas_rate(group_database, &ids).await;
        // With one Group the proxy shares one write among queued PATCHes,
        // so one PATCH's commands are no floor there.
        let floor = match groups == RATIO_CLIENTS {
            true => Some(store_floor_rate(group_database, &ids).await),
            false => None,
        };
        let counted = counters(client, admin).await;
        let received = ferretdb_counters(client).await;
        let before = Cpu::sample(proxy_pid);
        let (rate, sent, failed) = patches_for(client, base, &ids, RATIO_RUN).await;
        let proxy_cpu = Cpu::sample(proxy_pid).since(&before);
        // Concurrent writes share store commands: these say how much.
        let (mongo, clickhouse) = statements_since(&counted, &counters(client, admin).await);
        let patches = sent.max(1) as f64;
        let received = grown_by_name(
            &received,
            &ferretdb_counters(client).await,
            "ferretdb:",
            patches,
        );
        ferretdb_rows.push(match received.is_empty() {
            true => format!("| {groups} | ? | FerretDB serves no metrics here |"),
            false => format!(
                "| {groups} | {:.2} | {} |",
                total(&received),
                by_name(&received, 2)
            ),
        });
        let (floor, floor_ratio) = match floor {
            Some(floor) => (
                format!("{floor:.0}"),
                format!("{:.2}", floor / raw.max(f64::MIN_POSITIVE)),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {groups} | {raw:.0} | {raw_on_groups:.0} | {floor} | {floor_ratio} | {rate:.0} | {:.2} | {:.2} | {failed} | {:.2} | {:.2} |",
            rate / raw.max(f64::MIN_POSITIVE),
            rate / raw_on_groups.max(f64::MIN_POSITIVE),
            mongo / patches,
            clickhouse / patches
        );
        let per = |cpu: &Cpu, n: f64| cpu.per_op_ms(n * RATIO_RUN.as_secs_f64());
        let r = per(&raw_cpu, raw);
        cpu_rows.push(format!(
            "| {groups} | raw CAS | {} | - | - | - | {} |",
            r.ferretdb, r.bench
        ));
        let p = per(&proxy_cpu, rate);
        cpu_rows.push(format!(
            "| {groups} | proxy PATCH | {} | {} | {} | {} | {} |",
            p.ferretdb, p.clickhouse, p.clickhouse_background, p.proxy, p.bench
        ));
    }
    println!("\nCPU ms per operation in those rows, from `/proc/<pid>/stat` (utime + stime); the bench process holds the clients and the stand-in legacy server (which answers each PATCH's access probe); ClickHouse's background threads (`BackgrProcPool` on 18.16, `Bg*`/`MergeMutate` on current releases) merge the parts every insert makes:\n");
    println!("| documents / Groups | operation | FerretDB | ClickHouse | of which background (merges) | proxy | bench process |");
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for row in cpu_rows {
        println!("{row}");
    }
    println!("\nCommands FerretDB received per member PATCH in the proxy rows, from every client (FerretDB's own metrics): the proxy's and the stand-in legacy server's access probe:\n");
    println!("| documents / Groups | commands / PATCH | by command |");
    println!("|---:|---:|---|");
    for row in ferretdb_rows {
        println!("{row}");
    }
}

/// CPU seconds used so far by the processes of a store-ratio row.
struct Cpu {
    ferretdb: f64,
    clickhouse: f64,
    clickhouse_background: f64,
    proxy: f64,
    bench: f64,
}

/// Per-operation CPU, formatted (ms).
struct CpuPerOp {
    ferretdb: String,
    clickhouse: String,
    clickhouse_background: String,
    proxy: String,
    bench: String,
}

impl Cpu {
    fn sample(proxy_pid: u32) -> Self {
        let pid_of = |name: &str| {
            let run = std::env::var("FGP_RUN_DIR").unwrap_or_else(|_| ".run".into());
            std::fs::read_to_string(format!("{run}/{name}/pid"))
                .map(|pid| pid.trim().to_string())
                .unwrap_or_default()
        };
        let service = |name: &str| cpu_seconds(&pid_of(name)).unwrap_or(f64::NAN);
        Self {
            ferretdb: service("ferretdb"),
            clickhouse: service("clickhouse"),
            clickhouse_background: background_cpu_seconds(&pid_of("clickhouse"))
                .unwrap_or(f64::NAN),
            proxy: cpu_seconds(&proxy_pid.to_string()).unwrap_or(f64::NAN),
            bench: cpu_seconds("self").unwrap_or(f64::NAN),
        }
    }

    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            ferretdb: self.ferretdb - before.ferretdb,
            clickhouse: self.clickhouse - before.clickhouse,
            clickhouse_background: self.clickhouse_background - before.clickhouse_background,
            proxy: self.proxy - before.proxy,
            bench: self.bench - before.bench,
        }
    }

    fn per_op_ms(&self, operations: f64) -> CpuPerOp {
        let ms = |seconds: f64| match seconds.is_finite() && operations > 0.0 {
            true => format!("{:.2}", seconds * 1e3 / operations),
            false => "?".into(),
        };
        CpuPerOp {
            ferretdb: ms(self.ferretdb),
            clickhouse: ms(self.clickhouse),
            clickhouse_background: ms(self.clickhouse_background),
            proxy: ms(self.proxy),
            bench: ms(self.bench),
        }
    }
}

/// utime + stime of process `pid` (all its threads), in seconds: fields 14
/// and 15 of `/proc/<pid>/stat`, in clock ticks of 1/100 s.
fn cpu_seconds(pid: &str) -> Option<f64> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

/// [`cpu_seconds`] of ClickHouse's background threads only: those pools
/// live as long as the server, so two readings of them subtract.
fn background_cpu_seconds(pid: &str) -> Option<f64> {
    let mut seconds = 0.0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .flatten()
    {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        if ["Backgr", "Bg", "MergeMutate"]
            .iter()
            .any(|pool| comm.starts_with(pool))
        {
            seconds += stat_cpu_seconds(&path.join("stat").to_string_lossy()).unwrap_or(0.0);
        }
    }
    Some(seconds)
}

fn stat_cpu_seconds(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may hold spaces: count from its closing paren.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// Successful compare-and-swap updates per second on `documents` documents.
async fn raw_cas_rate(documents: usize) -> f64 {
    use mongodb::bson::doc;
    let collection = scratch_collection("cas").await;
    for n in 0..documents {
        collection
            .insert_one(doc! { "_id": n as i64, "v": 0_i64 })
            .await
            .expect("seed");
    }
    swaps_per_second(collection, |collection, c| async move {
        let id = (c % documents) as i64;
        let seen = collection
            .find_one(doc! { "_id": id })
            .await
            .expect("read")
            .and_then(|d| d.get_i64("v").ok())
            .unwrap_or(0);
        collection
            .find_one_and_update(
                doc! { "_id": id, "v": seen },
                doc! { "$set": { "v": seen + 1 } },
            )
            .await
            .expect("cas")
            .is_some()
    })
    .await
}

/// Successful compare-and-swaps per second of `meta.versionId` on the Groups
/// `ids`, each read by `id` first, as the proxy's commit does, on a copy of
/// the Group collection of `database` (so as many documents of the same
/// shape lie in the way of every scan).
async fn raw_group_cas_rate(database: &str, ids: &[String]) -> f64 {
    use fhir_group_proxy::store::group_documents::GROUP_COLLECTION;
    use mongodb::bson::doc;
    let collection = copy_of_collections(database, &[GROUP_COLLECTION])
        .await
        .collection(GROUP_COLLECTION);
    swaps_per_second(collection, |collection, c| {
        let id = ids[c % ids.len()].clone();
        async move {
            let seen = collection
                .find_one(doc! { "id": &id })
                .await
                .expect("read")
                .and_then(|d| {
                    d.get_document("meta")
                        .ok()?
                        .get_str("versionId")
                        .ok()
                        .map(str::to_string)
                })
                .expect("a Group with a version");
            let next = seen.parse::<u64>().expect("numeric version") + 1;
            collection
                .find_one_and_update(
                    doc! { "id": &id, "meta.versionId": &seen },
                    doc! { "$set": {
                        "meta.versionId": next.to_string(),
                        "meta.lastUpdated": mongodb::bson::DateTime::now(),
                    } },
                )
                .await
                .expect("cas")
                .is_some()
        }
    })
    .await
}

/// Member writes per second that MongoDB alone allows on the Groups `ids`
/// (one client per Group): the MongoDB commands of one single-member PATCH,
/// made through the proxy's own store code, back to back, on a copy of the
/// proxy's Group and member-state collections: the routing read of the
/// member state, the lock insert, the head read, the legacy server's read
/// for the access probe, the compare-and-swap, the history entry and the
/// lock delete. What a PATCH could reach if ClickHouse, HTTP, the proxy's
/// own work and the legacy server's logic cost nothing.
async fn store_floor_rate(database: &str, ids: &[String]) -> f64 {
    use fhir_group_proxy::store::group_documents::{
        GroupDocuments, GROUP_COLLECTION, MEMBER_STATE_COLLECTION,
    };
    use fhir_group_proxy::store::group_history::HistoryEntry;
    use fhir_group_proxy::store::mongo::LeaseHolder;
    use mongodb::bson::{doc, DateTime, Document};
    let scratch = copy_of_collections(database, &[GROUP_COLLECTION, MEMBER_STATE_COLLECTION]).await;
    let documents = GroupDocuments::new(&scratch, &scratch, LeaseHolder::here("bench", "floor"));
    let groups = scratch.collection::<Document>(GROUP_COLLECTION);
    swaps_per_second(groups, |groups, c| {
        let id = ids[c % ids.len()].clone();
        let documents = &documents;
        async move {
            let token = uuid::Uuid::new_v4().simple().to_string();
            let url = format!("/4_0_0/Group/{id}");
            let state = documents.member_state(&id).await.expect("member state");
            let taken = documents
                .locks()
                .acquire(&id, &token, &url, DateTime::now(), Duration::from_secs(30))
                .await
                .expect("lock");
            if !taken {
                return false;
            }
            let (head, _) = documents
                .head_with_inline(&id, state.generation)
                .await
                .expect("head")
                .expect("a Group");
            groups
                .find_one(doc! { "id": &id })
                .await
                .expect("the access probe's read");
            let committed = documents
                .commit_version(
                    &id,
                    head.version,
                    head.version + 1,
                    &token,
                    DateTime::now(),
                    state.generation,
                )
                .await
                .expect("compare-and-swap");
            if let Some(resource) = &committed {
                documents
                    .insert_history(vec![HistoryEntry {
                        resource,
                        request_id: &token,
                        method: "PATCH",
                        url: &url,
                        patch_ops: &[],
                    }])
                    .await
                    .expect("history entry");
            }
            documents
                .locks()
                .release(&id, &token)
                .await
                .expect("lock delete");
            committed.is_some()
        }
    })
    .await
}

/// A database of its own (dropped by [`swaps_per_second`]) holding a copy
/// of the collections `names` of `database`, taken now.
async fn copy_of_collections(database: &str, names: &[&str]) -> mongodb::Database {
    use mongodb::bson::{doc, Document};
    let mongo = mongodb::Client::with_uri_str(mongo_uri())
        .await
        .expect("mongo client");
    let scratch = mongo.database(&format!("fgp_bench_raw_{}", uuid::Uuid::new_v4().simple()));
    for name in names {
        let documents: Vec<Document> = mongo
            .database(database)
            .collection::<Document>(name)
            .find(doc! {})
            .await
            .expect("read the proxy's documents")
            .try_collect()
            .await
            .expect("read the proxy's documents");
        if !documents.is_empty() {
            scratch
                .collection::<Document>(name)
                .insert_many(documents)
                .await
                .expect("copy the proxy's documents");
        }
    }
    scratch
}

/// `name` in a database of its own, dropped by [`swaps_per_second`].
async fn scratch_collection(name: &str) -> mongodb::Collection<mongodb::bson::Document> {
    mongodb::Client::with_uri_str(mongo_uri())
        .await
        .expect("mongo client")
        .database(&format!("fgp_bench_raw_{}", uuid::Uuid::new_v4().simple()))
        .collection(name)
}

/// `RATIO_CLIENTS` clients each trying `swap` (client number given) again
/// and again for `RATIO_RUN`: the successful swaps per second. The
/// collection's database is dropped afterwards.
async fn swaps_per_second<F, Fut>(
    collection: mongodb::Collection<mongodb::bson::Document>,
    swap: F,
) -> f64
where
    F: Fn(mongodb::Collection<mongodb::bson::Document>, usize) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + RATIO_RUN;
    let started = Instant::now();
    let swap = &swap;
    let done: Vec<u64> = futures_util::stream::iter(0..RATIO_CLIENTS)
        .map(|c| {
            let collection = collection.clone();
            async move {
                let mut swaps = 0;
                while Instant::now() < deadline {
                    swaps += u64::from(swap(collection.clone(), c).await);
                }
                swaps
            }
        })
        .buffer_unordered(RATIO_CLIENTS)
        .collect()
        .await;
    let rate = done.iter().sum::<u64>() as f64 / started.elapsed().as_secs_f64();
    // The whole scratch database: FerretDB keeps a database whose last
    // collection is dropped, as a file of its own.
    let scratch = collection.namespace().db;
    let _ = collection.client().database(&scratch).drop().await;
    rate
}

/// Successful member PATCHes per second by `RATIO_CLIENTS` clients spread
/// over `ids` for `run`, how many were sent, and how many failed.
async fn patches_for(
    client: &HttpClient,
    base: &str,
    ids: &[String],
    run: Duration,
) -> (f64, usize, usize) {
    let deadline = Instant::now() + run;
    let started = Instant::now();
    let results: Vec<(usize, usize)> = futures_util::stream::iter(0..RATIO_CLIENTS)
        .map(|c| {
            let id = ids[c % ids.len()].clone();
            async move {
                let (mut ok, mut failed) = (0, 0);
                while Instant::now() < deadline {
                    let reference = format!("Patient/r-{}", uuid::Uuid::new_v4().simple());
                    match patch_one(client, base, &id, reference).await.0 {
                        200 => ok += 1,
                        _ => failed += 1,
                    }
                }
                (ok, failed)
            }
        })
        .buffer_unordered(RATIO_CLIENTS)
        .collect()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let ok: usize = results.iter().map(|r| r.0).sum();
    let failed: usize = results.iter().map(|r| r.1).sum();
    (ok as f64 / elapsed, ok + failed, failed)
}
