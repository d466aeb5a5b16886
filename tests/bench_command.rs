//! `fhir-group-proxy bench` against the stand-in legacy server and the proxy in
//! front of it: tiny settings, real sockets, real stores.

mod support;

use std::time::{Duration, Instant};

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_compares_both_targets_and_writes_report_and_chart() {
    let (standin, proxy, clickhouse) = start_with_member_stores(&[]).await;
    let out = std::env::temp_dir().join(unique_name("fgp_bench"));
    let legacy_base = format!("{}/4_0_0", standin.url());
    let proxy_base = format!("{}/4_0_0", proxy.url());

    let started = Instant::now();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_fhir-group-proxy"))
        .args(["bench", "--legacy", &legacy_base, "--proxy", &proxy_base])
        .args(["--group-sizes", "5,20", "--concurrency", "1,3"])
        .args(["--requests", "20", "--timeout-secs", "10"])
        .arg("--out")
        .arg(&out)
        .env("FGP_LOG", "warn")
        .output();
    let output = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("bench finishes within 60 s")
        .expect("the bench command runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("bench took {:?}", started.elapsed());

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("report.json is JSON");
    assert_eq!(report["legacy_url"], legacy_base.as_str());
    assert_eq!(report["proxy_url"], proxy_base.as_str());
    let cells = report["cells"].as_array().expect("cells");
    // The cross through the middle values: (5,3), (20,1), (20,3).
    let measured: Vec<(u64, u64)> = cells
        .iter()
        .map(|c| {
            (
                c["group_size"].as_u64().unwrap(),
                c["concurrency"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(measured, vec![(5, 3), (20, 1), (20, 3)]);
    for cell in cells {
        for target in ["legacy", "proxy"] {
            let overall = &cell[target]["overall"];
            assert_eq!(overall["requests"], 20, "{target}: {cell}");
            assert_eq!(overall["errors"], 0, "{target}: {cell}");
            assert!(overall["p50_ms"].as_f64().unwrap() > 0.0, "{cell}");
            for kind in ["patch", "read", "summary", "passthrough"] {
                assert!(
                    cell[target]["by_kind"][kind]["requests"].as_u64().unwrap() > 0,
                    "{target} sent {kind} requests: {cell}"
                );
            }
        }
        assert!(cell["ratios"]["p50_legacy_over_proxy"].as_f64().unwrap() > 0.0);
    }

    let markdown = std::fs::read_to_string(out.join("report.md")).expect("report.md");
    assert!(markdown.contains(&legacy_base) && markdown.contains(&proxy_base));
    assert!(markdown.contains("| 20 | 3 |"), "{markdown}");
    assert!(stdout.contains("legacy/proxy p50"), "{stdout}");

    let svg = std::fs::read_to_string(out.join("latency.svg")).expect("latency.svg");
    let document = roxmltree::Document::parse(&svg).expect("the chart is well-formed SVG");
    let texts: Vec<&str> = document
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    for label in ["legacy p50", "proxy p50", "legacy p99", "proxy p99"] {
        assert!(
            texts.iter().any(|t| t.trim() == label),
            "{label} in the chart"
        );
    }

    // The proxy side really went through the member store: the seeding and
    // the measured PATCHes are events, and the clean-up deleted both Groups.
    let events: u64 = fhir_group_proxy::store::clickhouse::connect(&clickhouse)
        .query("SELECT count() FROM Group_4_0_0_MemberSlotEvents")
        .fetch_one()
        .await
        .expect("events count");
    assert!(events > 25, "{events} member events in ClickHouse");
    let client = http_client();
    let groups = send(&client, "GET", &format!("{legacy_base}/Group"), &[], "").await;
    groups.assert_status(200);
    assert_eq!(groups.json()["total"], 0, "the bench removed its Groups");

    std::fs::remove_dir_all(&out).expect("clean up the output directory");
}
