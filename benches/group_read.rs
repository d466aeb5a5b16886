//! Group reads: a migrated Group read through the proxy (roster streamed from
//! ClickHouse) versus the legacy server reading the whole document, in one
//! run. Time to first byte, total time, and the proxy's peak RSS, for groups
//! of 10k, 100k and 1M members. Run with `bash scripts/bench.sh`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::raw::RawConnection;
use support::*;

const SAMPLES: usize = 5;

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("FGP_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![10_000, 100_000, 1_000_000]);
    let (_standin, proxy, _clickhouse) = start_with_member_stores(&[
        // Inline every roster: this measures streaming, not the cap.
        ("FGP_FHIR_MAX_INLINE_MEMBERS", "10000000"),
    ])
    .await;
    let client = http_client();
    let base = format!("{}/4_0_0", proxy.url());

    println!("\n## GET a Group with its roster ({SAMPLES} samples each, median ms)\n");
    println!("| members | legacy TTFB | legacy total | proxy TTFB | proxy total | body MB | proxy peak RSS MiB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| (idle) | | | | | | {:.0} |",
        proxy.peak_rss_kib().unwrap_or(0) as f64 / 1024.0
    );
    for &size in &sizes {
        let id = create_group(&client, &base).await;
        seed_members(&client, &base, &id, size).await;
        let proxy_times = timed_reads(proxy.addr, &format!("/4_0_0/Group/{id}"), size).await;

        let legacy_standin = Standin::start().await;
        let legacy =
            match create_legacy_group(&client, &format!("{}/4_0_0", legacy_standin.url()), size)
                .await
            {
                Some(legacy_id) => {
                    let times = timed_reads(
                        legacy_standin.addr,
                        &format!("/4_0_0/Group/{legacy_id}"),
                        size,
                    )
                    .await;
                    (format!("{:.1}", times.0), format!("{:.1}", times.1))
                }
                None => ("cannot store".into(), "-".into()),
            };
        println!(
            "| {size} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} |",
            legacy.0,
            legacy.1,
            proxy_times.0,
            proxy_times.1,
            proxy_times.2 as f64 / 1e6,
            proxy.peak_rss_kib().unwrap_or(0) as f64 / 1024.0
        );
    }
}

/// Median time to first byte and total (ms), and the body size, over raw reads.
async fn timed_reads(addr: std::net::SocketAddr, path: &str, members: usize) -> (f64, f64, usize) {
    let mut ttfb = Vec::new();
    let mut total = Vec::new();
    let mut size = 0;
    for _ in 0..SAMPLES {
        let mut conn = RawConnection::open(addr).await;
        let started = Instant::now();
        conn.write(format!("GET {path} HTTP/1.1\r\nHost: bench\r\n\r\n").as_bytes())
            .await;
        let (status, headers) = conn.read_head().await;
        let first = started.elapsed();
        let response = conn.read_body(status, headers).await;
        let all = started.elapsed();
        assert_eq!(response.status, 200);
        let group: Value = serde_json::from_slice(&response.body).expect("Group JSON");
        assert_eq!(
            group["member"].as_array().map(Vec::len),
            Some(members),
            "whole roster"
        );
        size = response.body.len();
        ttfb.push(ms(first));
        total.push(ms(all));
    }
    (median(ttfb), median(total), size)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn create_group(client: &HttpClient, base: &str) -> String {
    let reply = post_group(client, base, 0).await;
    reply.assert_status(201);
    reply.json()["id"].as_str().expect("id").to_string()
}

async fn create_legacy_group(client: &HttpClient, base: &str, size: usize) -> Option<String> {
    let reply = post_group(client, base, size).await;
    (reply.status == 201).then(|| reply.json()["id"].as_str().expect("id").to_string())
}
