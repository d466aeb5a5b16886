//! The proxy itself is killed (SIGKILL) in the middle of a concurrent member
//! PATCH load and restarted at once; clients retry what got no answer with
//! the same X-Request-Id. Afterwards every version a client was told of, and
//! every version up to the current one, is readable as `_history/{vid}`, and
//! every acknowledged add is in the roster exactly once. Real stand-in,
//! ClickHouse and FerretDB (the shared test services: only the proxy dies).

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::stack::*;
use support::*;
use tokio::sync::Mutex;

const CLIENTS: usize = 24;
const ADDS_PER_CLIENT: usize = 8;

/// One add, retried with its X-Request-Id until answered (bounded): the
/// version it was acknowledged with.
async fn add_until_answered(
    client: &HttpClient,
    proxy: &str,
    id: &str,
    reference: &str,
) -> Option<u64> {
    let ops =
        json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": reference}}}]);
    let body = serde_json::to_vec(&ops).unwrap();
    let request_id = format!("crash-{reference}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let url = format!("{proxy}/4_0_0/Group/{id}");
        let headers = [
            PATCH,
            ("x-request-id", request_id.as_str()),
            ("prefer", "return=minimal"),
        ];
        let sending = try_send(client, "PATCH", &url, &headers, body.clone());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(20), sending).await {
            if reply.status == 200 {
                let etag = reply.header("etag").unwrap_or_default();
                return etag.trim_start_matches("W/").trim_matches('"').parse().ok();
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// The load, a crash of the proxy while it runs (`crash`), a restart at
/// once, and the checks of the module doc.
async fn crash_mid_load(extra: &[(&str, &str)], crash: impl AsyncFnOnce(&mut ProxyProcess)) {
    let mut settings = vec![("FGP_MEMBERS_WRITE_WAIT_MS", "15000")];
    settings.extend_from_slice(extra);
    let mut stack = Stack::start(&settings).await;
    let id = stack.create_group(json!([])).await;
    // The restarted proxy listens where the killed one did.
    let proxy_url = Arc::new(stack.proxy.url());
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, u64)>::new()));
    let unanswered = Arc::new(Mutex::new(Vec::<String>::new()));

    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client, proxy, id) = (stack.client.clone(), proxy_url.clone(), id.clone());
        let (acknowledged, unanswered) = (acknowledged.clone(), unanswered.clone());
        clients.push(tokio::spawn(async move {
            for i in 0..ADDS_PER_CLIENT {
                let reference = format!("Patient/c{c:02}-{i}");
                match add_until_answered(&client, &proxy, &id, &reference).await {
                    Some(version) => acknowledged.lock().await.push((reference, version)),
                    None => unanswered.lock().await.push(reference),
                }
            }
        }));
    }
    crash(&mut stack.proxy).await;
    for client in clients {
        client.await.expect("client task");
    }

    let unanswered = unanswered.lock().await.clone();
    assert!(unanswered.is_empty(), "never answered: {unanswered:?}");
    let acknowledged = acknowledged.lock().await.clone();
    assert_eq!(acknowledged.len(), CLIENTS * ADDS_PER_CLIENT);

    let current: u64 = stack.read_group(&id).await["meta"]["versionId"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let told: BTreeSet<u64> = acknowledged.iter().map(|(_, v)| *v).collect();
    assert!(told.iter().all(|v| *v <= current), "{told:?} > {current}");
    stack.standin.history_settled().await;
    let mut missing = Vec::new();
    for version in 1..=current {
        let reply = send(
            &stack.client,
            "GET",
            &format!("{}/_history/{version}", stack.group_url(&id)),
            &[],
            "",
        )
        .await;
        if reply.status != 200 {
            missing.push((version, reply.status, told.contains(&version)));
        }
    }
    assert!(
        missing.is_empty(),
        "versions without history (version, status, told to a client): {missing:?}"
    );

    let roster = stack.roster_read(&id).await;
    let unique: BTreeSet<&String> = roster.iter().collect();
    assert_eq!(unique.len(), roster.len(), "a member twice: {roster:?}");
    for (reference, _) in &acknowledged {
        assert!(
            roster.contains(reference),
            "acknowledged {reference} is missing"
        );
    }
    assert_eq!(roster.len(), CLIENTS * ADDS_PER_CLIENT);
}

/// The crash lands exactly after a commit point, before the history entry
/// and the publication: recovery must write both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_dead_right_after_a_commit_leaves_every_version_readable() {
    crash_mid_load(
        &[("FGP_WRITE_FAULT", "exit-after-commit")],
        async |proxy: &mut ProxyProcess| {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !proxy.has_exited() {
                assert!(
                    Instant::now() < deadline,
                    "the proxy never reached a commit"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            proxy.kill_and_restart(&["FGP_WRITE_FAULT"]);
        },
    )
    .await;
}

/// SIGKILL at a moment of the load's choosing, mid-flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_proxy_killed_mid_load_leaves_every_committed_version_readable() {
    crash_mid_load(&[], async |proxy: &mut ProxyProcess| {
        tokio::time::sleep(Duration::from_millis(400)).await;
        proxy.kill_and_restart(&[]);
    })
    .await;
}

/// A write that passed its commit point, then lost its writer, and then a
/// legacy write moved the Group on (dropping, on the real server, the commit
/// token from the document) before recovery ran: the write is still known
/// committed, its members published and its version's history rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_superseded_by_a_legacy_write_before_recovery_is_kept() {
    let mut stack = Stack::start(&[]).await;
    let id = stack.managed_group(&["Patient/a"]).await;
    stack
        .proxy
        .kill_and_restart_with(&[("FGP_WRITE_FAULT", "exit-after-commit")], &[]);
    let add = serde_json::to_vec(&json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/x"}}}])).unwrap();
    let headers = [PATCH, ("x-request-id", "superseded-1")];
    let lost = try_send(
        &stack.client,
        "PATCH",
        &stack.group_url(&id),
        &headers,
        add.clone(),
    )
    .await;
    assert!(
        lost.is_err() || lost.is_ok_and(|r| r.status != 200),
        "the proxy died at the commit"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !stack.proxy.has_exited() {
        assert!(
            Instant::now() < deadline,
            "the proxy did not stop at the commit"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The legacy server moves the Group on before the proxy is back.
    let rename =
        serde_json::to_vec(&json!([{"op": "add", "path": "/name", "value": "renamed"}])).unwrap();
    send(
        &stack.client,
        "PATCH",
        &format!("{}/4_0_0/Group/{id}", stack.standin.url()),
        &[PATCH],
        rename,
    )
    .await
    .assert_status(200);
    stack.proxy.kill_and_restart(&["FGP_WRITE_FAULT"]);

    // The sweeper (every 2 s) finishes the write.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !stack
        .roster_read(&id)
        .await
        .contains(&"Patient/x".to_string())
    {
        assert!(
            Instant::now() < deadline,
            "the committed add never became visible"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let group = stack.read_group(&id).await;
    assert_eq!(group["meta"]["versionId"], "4");
    assert_eq!(group["name"], "renamed");
    stack.standin.history_settled().await;
    for (version, roster) in [
        (3, vec!["Patient/a", "Patient/x"]),
        (4, vec!["Patient/a", "Patient/x"]),
    ] {
        let reply = send(
            &stack.client,
            "GET",
            &format!("{}/_history/{version}", stack.group_url(&id)),
            &[],
            "",
        )
        .await;
        reply.assert_status(200);
        assert_eq!(references(&reply.json()), roster, "version {version}");
    }
    // The client's retry learns the outcome: version 3.
    let retry = send(&stack.client, "PATCH", &stack.group_url(&id), &headers, add).await;
    retry.assert_status(200);
    assert_eq!(retry.header("etag"), Some("W/\"3\""));
}
