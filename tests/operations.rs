//! Running the proxy: metrics, health and readiness on the admin listener,
//! request logs with request and trace ids, `traceparent` passthrough, and
//! graceful shutdown with member writes in flight. Real servers throughout.

mod support;

use std::process::Stdio;
use std::time::{Duration, Instant};

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use support::*;

const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The value of the sample `name{labels}` in a Prometheus text exposition
/// (labels as the exporter writes them, sorted by name); 0 when absent.
fn sample(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().expect("a number"))
}

async fn get(client: &HttpClient, url: &str) -> Reply {
    send(client, "GET", url, &[], "").await
}

async fn scrape(client: &HttpClient, proxy: &ProxyProcess) -> String {
    let reply = get(client, &format!("{}/metrics", proxy.admin_url())).await;
    reply.assert_status(200);
    assert!(
        reply
            .header("content-type")
            .is_some_and(|ct| ct.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.header("content-type")
    );
    String::from_utf8(reply.body.to_vec()).expect("UTF-8 metrics")
}

/// Scrapes until `settled` holds (the request counters move in pingora's
/// logging phase, just after the client has its response), at most 5 s.
async fn scrape_until(
    client: &HttpClient,
    proxy: &ProxyProcess,
    settled: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(client, proxy).await;
        if settled(&text) || Instant::now() > deadline {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn create_empty_group(client: &HttpClient, proxy: &ProxyProcess) -> String {
    let reply = post_group(client, &format!("{}/4_0_0", proxy.url()), 0).await;
    reply.assert_status(201);
    reply.json()["id"].as_str().expect("id").to_string()
}

async fn patch_member(client: &HttpClient, proxy_url: &str, id: &str, reference: &str) -> Reply {
    send(
        client,
        "PATCH",
        &format!("{proxy_url}/4_0_0/Group/{id}"),
        &[
            ("content-type", "application/json-patch+json"),
            ("prefer", "return=minimal"),
        ],
        serde_json::to_vec(&json!([
            {"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}}
        ]))
        .expect("json"),
    )
    .await
}

#[tokio::test]
async fn metrics_move_with_forwarded_and_intercepted_requests() {
    let (_standin, proxy, _clickhouse) = start_with_member_stores(&[]).await;
    let client = http_client();
    let forwarded = r#"fgp_http_requests_total{disposition="forwarded",method="GET",route="passthrough",status="200"}"#;
    let intercepted = r#"fgp_http_requests_total{disposition="intercepted",method="PATCH",route="group_patch",status="200"}"#;
    let patch_latency = r#"fgp_http_request_duration_seconds_count{disposition="intercepted",method="PATCH",route="group_patch"}"#;
    let staged_batches = r#"fgp_clickhouse_batch_rows_count{writer="staging"}"#;
    let staged_rows = r#"fgp_clickhouse_batch_rows_sum{writer="staging"}"#;
    let published_batches =
        r#"fgp_clickhouse_flush_duration_seconds_count{outcome="ok",writer="publishing"}"#;
    let mongo_inserts =
        r#"fgp_mongo_command_duration_seconds_count{command="insert",outcome="ok"}"#;

    let before = scrape(&client, &proxy).await;
    get(&client, &format!("{}/4_0_0/metadata", proxy.url()))
        .await
        .assert_status(200);
    let after_read = scrape_until(&client, &proxy, |text| {
        sample(text, forwarded) > sample(&before, forwarded)
    })
    .await;
    assert_eq!(
        sample(&after_read, forwarded),
        sample(&before, forwarded) + 1.0
    );
    assert_eq!(
        sample(&after_read, intercepted),
        sample(&before, intercepted)
    );

    let id = create_empty_group(&client, &proxy).await;
    patch_member(&client, &proxy.url(), &id, "Patient/metrics-1")
        .await
        .assert_status(200);
    let in_flight = "fgp_http_requests_in_flight";
    let after_patch = scrape_until(&client, &proxy, |text| {
        sample(text, intercepted) > sample(&after_read, intercepted)
            && sample(text, in_flight) == 0.0
    })
    .await;
    assert_eq!(
        sample(&after_patch, intercepted),
        sample(&after_read, intercepted) + 1.0
    );
    assert_eq!(
        sample(&after_patch, patch_latency),
        sample(&after_read, patch_latency) + 1.0
    );
    assert!(sample(&after_patch, staged_batches) > sample(&after_read, staged_batches));
    assert!(sample(&after_patch, staged_rows) >= sample(&after_read, staged_rows) + 1.0);
    assert!(sample(&after_patch, published_batches) > sample(&after_read, published_batches));
    assert!(
        sample(&after_patch, mongo_inserts) > sample(&after_read, mongo_inserts),
        "the write lock insert is timed:\n{after_patch}"
    );
    assert_eq!(sample(&after_patch, in_flight), 0.0);
}

#[tokio::test]
async fn the_legacy_servers_own_metrics_path_is_still_forwarded() {
    let standin = Standin::start().await;
    let proxy = ProxyProcess::start(&standin.url(), &[("FGP_MEMBERS_ENABLED", "false")]);
    let client = http_client();
    let direct = get(&client, &format!("{}/metrics", standin.url())).await;
    let through_proxy = get(&client, &format!("{}/metrics", proxy.url())).await;
    assert_eq!(through_proxy.status, direct.status);
    assert_eq!(
        through_proxy.body, direct.body,
        "the stand-in answered, not the exporter"
    );
}

#[tokio::test]
async fn healthz_and_readyz_answer_with_the_stores_up() {
    let (_standin, proxy, _clickhouse) = start_with_member_stores(&[]).await;
    let client = http_client();
    let health = get(&client, &format!("{}/healthz", proxy.admin_url())).await;
    health.assert_status(200);
    let ready = get(&client, &format!("{}/readyz", proxy.admin_url())).await;
    ready.assert_status(200);
    assert_eq!(
        ready.json(),
        json!({"status": "ready", "down": [], "checks": {"upstream": "ok", "clickhouse": "ok", "mongo": "ok"}})
    );
    let unknown = get(&client, &format!("{}/nope", proxy.admin_url())).await;
    unknown.assert_status(404);
}

#[tokio::test]
async fn readyz_names_clickhouse_when_it_is_unreachable() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let (_standin, proxy, _clickhouse) =
        start_with_member_stores(&[("FGP_CLICKHOUSE_URL", closed.as_str())]).await;
    let client = http_client();
    let started = Instant::now();
    let ready = get(&client, &format!("{}/readyz", proxy.admin_url())).await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "checks time out quickly"
    );
    ready.assert_status(503);
    let body = ready.json();
    assert_eq!(body["status"], "unavailable");
    assert_eq!(body["down"], json!(["clickhouse"]), "{body}");
    assert_eq!(body["checks"]["mongo"], "ok");
    // Liveness does not depend on the stores.
    get(&client, &format!("{}/healthz", proxy.admin_url()))
        .await
        .assert_status(200);
}

#[tokio::test]
async fn an_unreachable_upstream_is_not_ready_and_its_errors_are_counted() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    let proxy = ProxyProcess::start(&closed, &[("FGP_MEMBERS_ENABLED", "false")]);
    let client = http_client();
    let ready = get(&client, &format!("{}/readyz", proxy.admin_url())).await;
    ready.assert_status(503);
    assert_eq!(ready.json()["down"], json!(["upstream"]));

    let errors = r#"fgp_upstream_errors_total{client="pingora",status="502"}"#;
    let before = sample(&scrape(&client, &proxy).await, errors);
    assert_outcome(
        &get(&client, &format!("{}/4_0_0/Patient/1", proxy.url())).await,
        502,
        "transient",
    );
    assert_eq!(sample(&scrape(&client, &proxy).await, errors), before + 1.0);
}

#[tokio::test]
async fn traceparent_reaches_the_upstream_unchanged_and_is_logged() {
    let standin = Standin::start().await;
    let log_path = std::env::temp_dir().join(format!("{}.log", unique_name("fgp_ops_log")));
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut proxy = ProxyProcess::start_with_stderr(
        &standin.url(),
        &[
            ("FGP_MEMBERS_ENABLED", "false"),
            ("FGP_LOG_JSON", "true"),
            ("FGP_LOG", "info"),
        ],
        Stdio::from(log_file),
    );
    let client = http_client();
    let reply = send(
        &client,
        "GET",
        &format!("{}/__standin/inspect/traced", proxy.url()),
        &[
            ("traceparent", TRACEPARENT),
            ("x-request-id", "ops-trace-1"),
        ],
        "",
    )
    .await;
    reply.assert_status(200);
    let arrived: Vec<(String, String)> = reply.json()["headers"]
        .as_array()
        .expect("headers")
        .iter()
        .map(|pair| {
            (
                pair[0].as_str().unwrap().into(),
                pair[1].as_str().unwrap().into(),
            )
        })
        .collect();
    assert!(
        arrived.contains(&("traceparent".into(), TRACEPARENT.into())),
        "{arrived:?}"
    );
    proxy.terminate();

    let log = std::fs::read_to_string(&log_path).expect("log");
    let _ = std::fs::remove_file(&log_path);
    let access_line: Value = log
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|line| line["fields"]["message"] == "request done")
        .unwrap_or_else(|| panic!("a JSON access log line in:\n{log}"));
    let fields = &access_line["fields"];
    assert_eq!(fields["request_id"], "ops-trace-1", "{access_line}");
    assert_eq!(fields["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(fields["method"], "GET");
    assert_eq!(fields["path"], "/__standin/inspect/traced");
    assert_eq!(fields["status"], 200);
    assert_eq!(fields["route"], "passthrough");
    assert_eq!(fields["intercepted"], false);
    assert!(fields["duration_ms"].as_f64().is_some(), "{access_line}");
}

/// SIGTERM while member PATCHes are in flight (each waits ~1 s for a slow
/// access probe before it writes): the proxy stops accepting, lets them
/// finish, flushes, and exits well within its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_member_writes_finish_before_exiting() {
    const WRITES: usize = 6;
    let (standin, mut proxy, clickhouse) = start_with_member_stores(&[
        // The stand-in's slow route answers 200 after 1 s: access granted.
        (
            "FGP_AUTH_UPSTREAM_PROBE",
            "GET /__standin/slow?ms=1000&group={id}",
        ),
        ("FGP_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "15"),
    ])
    .await;
    let client = http_client();
    let mut ids = Vec::new();
    for _ in 0..WRITES {
        ids.push(create_empty_group(&client, &proxy).await);
    }
    let proxy_url = proxy.url();
    let writes: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let (client, id, url) = (client.clone(), id.clone(), proxy_url.clone());
            tokio::spawn(async move {
                let reply =
                    patch_member(&client, &url, &id, &format!("Patient/shutdown-{i}")).await;
                (reply.status, Instant::now())
            })
        })
        .collect();
    // SIGTERM once every write is inside the proxy (they then wait for the
    // probe for ~1 s).
    let in_flight = scrape_until(&client, &proxy, |text| {
        sample(text, "fgp_http_requests_in_flight") >= WRITES as f64
    })
    .await;
    assert_eq!(
        sample(&in_flight, "fgp_http_requests_in_flight"),
        WRITES as f64
    );
    let signalled = Instant::now();
    proxy.send_sigterm();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        std::net::TcpStream::connect(proxy.addr).is_err(),
        "no new connections once draining (grace period 0)"
    );
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(15)));
    let exit_time = signalled.elapsed();
    let exit = exit.expect("the proxy exits within its shutdown timeout");
    assert!(exit.success(), "{exit}");

    let mut finished_after_signal = 0;
    for write in writes {
        let (status, answered) = write.await.expect("write task");
        assert_eq!(status, 200, "an in-flight write was finished, not dropped");
        if answered > signalled {
            finished_after_signal += 1;
        }
    }
    assert!(
        finished_after_signal > 0,
        "writes were still in flight at SIGTERM"
    );
    eprintln!("exit {exit_time:?} after SIGTERM; {finished_after_signal}/{WRITES} writes answered after it");

    let groups = mongodb::Client::with_uri_str(mongo_uri())
        .await
        .expect("mongo client")
        .database(&standin.database)
        .collection::<Document>("Group_4_0_0");
    let events = fhir_group_proxy::store::clickhouse::connect(&clickhouse);
    for (i, id) in ids.iter().enumerate() {
        let group = groups
            .find_one(doc! {"id": id})
            .await
            .expect("mongo read")
            .expect("group document");
        let version = group
            .get_document("meta")
            .and_then(|m| m.get_str("versionId"));
        assert_eq!(version, Ok("2"), "Group/{id} metadata committed");
        let published: u64 = events
            .query("SELECT count() FROM Group_4_0_0_MemberSlotEvents WHERE group_id = ? AND match_key = ?")
            .bind(id.as_str())
            .bind(format!("Patient/shutdown-{i}"))
            .fetch_one()
            .await
            .expect("clickhouse read");
        assert_eq!(published, 1, "Group/{id}: the member event was published");
    }
}

/// During the grace period the proxy still serves, but tells load balancers
/// to go elsewhere; then it exits without waiting out the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_grace_period_readyz_fails_while_requests_are_still_served() {
    let standin = Standin::start().await;
    let mut proxy = ProxyProcess::start(
        &standin.url(),
        &[
            ("FGP_MEMBERS_ENABLED", "false"),
            ("FGP_GRACE_PERIOD_SECONDS", "1"),
            ("FGP_GRACEFUL_SHUTDOWN_TIMEOUT_SECONDS", "10"),
        ],
    );
    let client = http_client();
    get(&client, &format!("{}/readyz", proxy.admin_url()))
        .await
        .assert_status(200);
    let signalled = Instant::now();
    proxy.send_sigterm();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ready = get(&client, &format!("{}/readyz", proxy.admin_url())).await;
    ready.assert_status(503);
    assert_eq!(ready.json()["checks"]["proxy"], "shutting down");
    get(&client, &format!("{}/4_0_0/metadata", proxy.url()))
        .await
        .assert_status(200);
    let exit = tokio::task::block_in_place(|| proxy.wait_exit(Duration::from_secs(10)));
    assert!(exit.expect("the proxy exits").success());
    let elapsed = signalled.elapsed();
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "grace period kept, drain timeout not waited out: {elapsed:?}"
    );
}
