//! `fhir-group-proxy migrate` as a child process against the real ClickHouse
//! and FerretDB: Groups created with inline members on the stand-in legacy
//! server move into ClickHouse (and back) and read the same through the proxy.

mod support;

use std::process::{Command, Output};

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};
use support::*;

/// Exit status of a run stopped by `FGP_MIGRATE_FAULT=exit-after-*`.
const FAULT_EXIT: i32 = fhir_group_proxy::group::migrate::FAULT_EXIT_CODE;

struct Stores {
    standin: Standin,
    clickhouse: fhir_group_proxy::config::ClickHouseSettings,
    events: clickhouse::Client,
    mongo: mongodb::Database,
    client: HttpClient,
}

impl Stores {
    async fn start() -> Stores {
        let standin = Standin::start().await;
        let clickhouse = fresh_member_database("fgp_migrate").await;
        let mongo = mongodb::Client::with_uri_str(mongo_uri())
            .await
            .expect("mongo client")
            .database(&standin.database);
        Stores {
            events: fhir_group_proxy::store::clickhouse::connect(&clickhouse),
            clickhouse,
            standin,
            mongo,
            client: http_client(),
        }
    }

    fn store_settings(&self) -> Vec<(&'static str, String)> {
        vec![
            ("FGP_CLICKHOUSE_URL", self.clickhouse.url.clone()),
            ("FGP_CLICKHOUSE_DATABASE", self.clickhouse.database.clone()),
            ("FGP_MONGO_URI", mongo_uri()),
            ("FGP_MONGO_DATABASE", self.standin.database.clone()),
        ]
    }

    fn proxy(&self) -> ProxyProcess {
        let settings = self.store_settings();
        let mut settings: Vec<(&str, &str)> =
            settings.iter().map(|(k, v)| (*k, v.as_str())).collect();
        settings.extend(self.standin.dialect_settings());
        ProxyProcess::start(&self.standin.url(), &settings)
    }

    /// Runs `fhir-group-proxy migrate ARGS` to its end.
    fn migrate(&self, args: &[&str], fault: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_fhir-group-proxy"));
        command
            .arg("migrate")
            .args(args)
            .env("FGP_LOG", "warn")
            // A run killed on purpose leaves its lock; the next run breaks it.
            .env("FGP_MEMBERS_LEASE_TTL_MS", "500")
            .env_remove("FGP_MIGRATE_FAULT");
        for (key, value) in self.store_settings() {
            command.env(key, value);
        }
        if let Some(fault) = fault {
            command.env("FGP_MIGRATE_FAULT", fault);
        }
        command.output().expect("the migrate command runs")
    }

    /// A Group with inline members, created on the legacy server directly.
    async fn create_inline_group(&self, extra: Value, members: Vec<Value>) -> String {
        let mut group = owned(json!({"resourceType": "Group", "type": "person", "actual": true}));
        if let (Some(group), Some(extra)) = (group.as_object_mut(), extra.as_object()) {
            group.extend(extra.clone());
        }
        if !members.is_empty() {
            group["member"] = Value::Array(members);
        }
        let reply = send(
            &self.client,
            "POST",
            &format!("{}/4_0_0/Group", self.standin.url()),
            &[("content-type", "application/fhir+json")],
            serde_json::to_vec(&group).unwrap(),
        )
        .await;
        reply.assert_status(201);
        reply.json()["id"].as_str().unwrap().to_string()
    }

    async fn document(&self, id: &str) -> Document {
        group_document(&self.mongo, id).await
    }

    async fn inline_member_count(&self, id: &str) -> usize {
        self.document(id)
            .await
            .get_array("member")
            .map_or(0, |members| members.len())
    }

    async fn version(&self, id: &str) -> String {
        let document = self.document(id).await;
        document
            .get_document("meta")
            .unwrap()
            .get_str("versionId")
            .unwrap()
            .to_string()
    }

    async fn is_migrated(&self, id: &str) -> bool {
        self.mongo
            .collection::<Document>("Group_4_0_0_MemberState")
            .find_one(doc! {"_id": id})
            .await
            .unwrap()
            .is_some_and(|state| state.get_str("storage") == Ok("clickhouse"))
    }

    /// Published events of the Group (each member once per migration).
    async fn event_count(&self, id: &str) -> u64 {
        let key = self
            .document(id)
            .await
            .get_str("_uuid")
            .unwrap()
            .to_string();
        published_event_count(&self.events, &key).await
    }

    /// The Group's members as a client reads them through `proxy`, sorted by
    /// reference (the legacy server keeps array order, the proxy reference order).
    async fn roster(&self, proxy: &ProxyProcess, id: &str) -> Vec<Value> {
        let reply = send(
            &self.client,
            "GET",
            &format!("{}/4_0_0/Group/{id}", proxy.url()),
            &[],
            "",
        )
        .await;
        reply.assert_status(200);
        let mut members = reply.json()["member"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        members.sort_by_key(|m| m["entity"]["reference"].as_str().unwrap_or("").to_string());
        members
    }

    async fn patch(&self, proxy: &ProxyProcess, id: &str, ops: Value) -> Reply {
        send(
            &self.client,
            "PATCH",
            &format!("{}/4_0_0/Group/{id}", proxy.url()),
            &[("content-type", "application/json-patch+json")],
            serde_json::to_vec(&ops).unwrap(),
        )
        .await
    }
}

/// `count` members `Patient/{prefix}-{i}`, some inactive, some with a period.
fn members(prefix: &str, count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            let mut member = json!({"entity": {"reference": format!("Patient/{prefix}-{i}")}});
            if i % 5 == 0 {
                member["period"] = json!({"start": "2024-01-01", "end": "2025-06-30"});
            }
            if i % 7 == 0 {
                member["inactive"] = json!(true);
            }
            member
        })
        .collect()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[track_caller]
fn assert_exit(output: &Output, code: i32) {
    assert_eq!(
        output.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn migrated_groups_read_the_same_and_reruns_skip_them() {
    let stores = Stores::start().await;
    let first = stores
        .create_inline_group(json!({"name": "first-batch"}), members("a", 250))
        .await;
    let second = stores.create_inline_group(json!({}), members("b", 3)).await;
    let empty = stores.create_inline_group(json!({}), vec![]).await;
    let proxy = stores.proxy();
    let first_before = stores.roster(&proxy, &first).await;
    let second_before = stores.roster(&proxy, &second).await;
    assert_eq!(first_before.len(), 250);
    let version_before = stores.version(&first).await;

    let run = stores.migrate(
        &[
            "--query",
            r#"{"name": "first-batch"}"#,
            "--chunk-size",
            "100",
        ],
        None,
    );
    assert_exit(&run, 0);
    assert!(
        stdout(&run).starts_with("Groups migrated: 1, skipped: 0, failed: 0; members moved: 250;"),
        "{}",
        stdout(&run)
    );
    assert!(stores.is_migrated(&first).await);
    assert!(!stores.is_migrated(&second).await, "outside the query");
    let document = stores.document(&first).await;
    assert!(document.get("member").is_none(), "inline array removed");
    assert_eq!(document.get_str("_memberStorage"), Ok("clickhouse"));
    assert_eq!(
        stores.version(&first).await,
        version_before,
        "the roster did not change, nor does the version"
    );
    assert_eq!(stores.event_count(&first).await, 250);
    assert_eq!(stores.roster(&proxy, &first).await, first_before);

    let run = stores.migrate(&[], None);
    assert_exit(&run, 0);
    assert!(
        stdout(&run).starts_with("Groups migrated: 1, skipped: 2, failed: 0; members moved: 3;"),
        "{}",
        stdout(&run)
    );
    assert_eq!(stores.roster(&proxy, &second).await, second_before);
    assert!(!stores.is_migrated(&empty).await, "nothing to move");

    let rerun = stores.migrate(&[], None);
    assert_exit(&rerun, 0);
    assert!(
        stdout(&rerun).starts_with("Groups migrated: 0, skipped: 3, failed: 0; members moved: 0;"),
        "{}",
        stdout(&rerun)
    );
    assert_eq!(
        stores.event_count(&first).await,
        250,
        "nothing written twice"
    );

    // Cut over: member writes of the migrated Group are now events.
    stores
        .patch(
            &proxy,
            &first,
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/new"}}}]),
        )
        .await
        .assert_status(200);
    assert_eq!(stores.event_count(&first).await, 251);
    assert_eq!(stores.inline_member_count(&first).await, 0);
    assert_eq!(stores.roster(&proxy, &first).await.len(), 251);
}

/// A run stopped at each step (the process exits there, as if killed) leaves
/// the Group on the legacy path with its inline members, or (stopped after
/// marking) migrated; the next run completes it without duplicate events.
#[tokio::test]
async fn an_interrupted_migration_resumes_without_duplicates() {
    let stores = Stores::start().await;
    let proxy = stores.proxy();
    for (step, migrated_when_stopped) in [
        ("exit-after-first-chunk", false),
        ("exit-after-staging", false),
        ("exit-after-publish", false),
        ("exit-after-mark", true),
    ] {
        let id = stores
            .create_inline_group(json!({}), members(step, 250))
            .await;
        let before = stores.roster(&proxy, &id).await;

        let stopped = stores.migrate(&["--id", &id, "--chunk-size", "100"], Some(step));
        assert_exit(&stopped, FAULT_EXIT);
        assert_eq!(
            stores.is_migrated(&id).await,
            migrated_when_stopped,
            "{step}"
        );
        assert_eq!(stores.inline_member_count(&id).await, 250, "{step}");
        assert_eq!(stores.roster(&proxy, &id).await, before, "{step}");

        let resumed = stores.migrate(&["--id", &id, "--chunk-size", "100"], None);
        assert_exit(&resumed, 0);
        assert!(
            stdout(&resumed).starts_with("Groups migrated: 1, skipped: 0, failed: 0"),
            "{step}: {}",
            stdout(&resumed)
        );
        assert!(stores.is_migrated(&id).await, "{step}");
        assert_eq!(stores.inline_member_count(&id).await, 0, "{step}");
        assert_eq!(stores.event_count(&id).await, 250, "{step}: no duplicates");
        assert_eq!(stores.roster(&proxy, &id).await, before, "{step}");
    }
}

#[tokio::test]
async fn a_failed_verification_leaves_the_group_untouched() {
    let stores = Stores::start().await;
    let proxy = stores.proxy();
    // (fault, what verification sees, events after the repair: the first
    // run's plus the repair: the missing member, or the wrong element
    // removed and the right one put)
    for (fault, what, events) in [
        ("drop-member", "ClickHouse 39 members", 39 + 1),
        ("alter-member", "ClickHouse 40 members", 40 + 2),
    ] {
        let id = stores
            .create_inline_group(json!({}), members(fault, 40))
            .await;
        let document_before = stores.document(&id).await;
        let before = stores.roster(&proxy, &id).await;

        let run = stores.migrate(&["--id", &id], Some(fault));
        assert_exit(&run, 1);
        let report = stdout(&run);
        assert!(
            report.starts_with("Groups migrated: 0, skipped: 0, failed: 1"),
            "{report}"
        );
        assert!(
            report.contains(&format!("failed: Group/{id}: verification failed"))
                && report.contains("inline array has 40 members")
                && report.contains(what),
            "{fault}: {report}"
        );
        assert_eq!(stores.document(&id).await, document_before, "{fault}");
        assert!(!stores.is_migrated(&id).await, "{fault}");
        assert_eq!(stores.roster(&proxy, &id).await, before, "{fault}");

        // Without the fault, the next run writes only what is missing.
        let repaired = stores.migrate(&["--id", &id], None);
        assert_exit(&repaired, 0);
        assert!(stores.is_migrated(&id).await, "{fault}");
        assert_eq!(stores.roster(&proxy, &id).await, before, "{fault}");
        assert_eq!(
            stores.event_count(&id).await,
            events,
            "{fault}: one repair event"
        );
    }

    let unknown = stores.migrate(&["--id", "no-such-group"], None);
    assert_exit(&unknown, 1);
    assert!(
        stdout(&unknown).contains("failed: Group/no-such-group: no Group has this id"),
        "{}",
        stdout(&unknown)
    );
}

#[tokio::test]
async fn reverse_writes_the_roster_back_and_a_later_migration_follows_legacy_edits() {
    let stores = Stores::start().await;
    let proxy = stores.proxy();
    let id = stores
        .create_inline_group(json!({}), members("r", 120))
        .await;
    assert_exit(&stores.migrate(&["--id", &id], None), 0);
    stores
        .patch(
            &proxy,
            &id,
            json!([
                {"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/added"}}},
                {"op": "remove", "path": "/member/-", "value": {"entity": {"reference": "Patient/r-1"}}},
            ]),
        )
        .await
        .assert_status(200);
    let migrated_roster = stores.roster(&proxy, &id).await;
    assert_eq!(migrated_roster.len(), 120);
    let version = stores.version(&id).await;

    let reversed = stores.migrate(&["--reverse", "--id", &id], None);
    assert_exit(&reversed, 0);
    assert!(
        stdout(&reversed)
            .starts_with("Groups reversed: 1, skipped: 0, failed: 0; members moved: 120;"),
        "{}",
        stdout(&reversed)
    );
    assert!(!stores.is_migrated(&id).await);
    assert_eq!(stores.inline_member_count(&id).await, 120);
    assert!(stores.document(&id).await.get("_memberStorage").is_none());
    assert_eq!(stores.version(&id).await, version);
    assert_eq!(
        stores.roster(&proxy, &id).await,
        migrated_roster,
        "legacy path"
    );
    let again = stores.migrate(&["--reverse", "--id", &id], None);
    assert!(
        stdout(&again).starts_with("Groups reversed: 0, skipped: 1"),
        "{}",
        stdout(&again)
    );

    // Back on the legacy path: member PATCHes go to the legacy server (the
    // array is in the order it was kept, so the appended Patient/added is
    // member 119), and the
    // member search no longer answers from ClickHouse for this Group.
    stores
        .patch(
            &proxy,
            &id,
            json!([
                {"op": "test", "path": "/member/119/entity/reference", "value": "Patient/added"},
                {"op": "remove", "path": "/member/119"},
            ]),
        )
        .await
        .assert_status(200);
    assert_eq!(stores.inline_member_count(&id).await, 119);
    let search = |reference: &'static str| {
        let url = format!(
            "{}/4_0_0/Group?member={reference}&_total=accurate",
            proxy.url()
        );
        let client = stores.client.clone();
        async move { send(&client, "GET", &url, &[], "").await.json()["total"].clone() }
    };
    assert_eq!(search("Patient/added").await, json!(0));
    assert_eq!(search("Patient/r-2").await, json!(1));
    let legacy_roster = stores.roster(&proxy, &id).await;
    assert_eq!(legacy_roster.len(), 119);

    // Migrating again brings ClickHouse to the legacy edits, removal included.
    assert_exit(&stores.migrate(&["--id", &id], None), 0);
    assert!(stores.is_migrated(&id).await);
    assert_eq!(stores.roster(&proxy, &id).await, legacy_roster);
}

/// Members with every kind of content — extensions, identifiers, display,
/// ids, modifier extensions, duplicates and the reference server's own
/// enrichment keys — migrate and read back exactly as the legacy server
/// served them, in their order.
#[tokio::test]
async fn enriched_members_migrate_and_read_back_identical() {
    let stores = Stores::start().await;
    let proxy = stores.proxy();
    let members = vec![
        json!({"id": "m1", "entity": {"reference": "Patient/e-2", "display": "Two",
               "_sourceId": "e-2", "_uuid": "7c1e2b4a-0000-5000-8000-000000000002",
               "_sourceAssigningAuthority": "acme"},
               "extension": [{"url": "http://example.org/attribution", "valueString": "pcp"}]}),
        json!({"entity": {"reference": "Patient/e-1", "type": "Patient",
               "identifier": {"system": "urn:mrn", "value": "123"},
               "extension": [{"url": "http://example.org/source", "valueCode": "claims"}]},
               "period": {"start": "2026-01-01"}, "inactive": false}),
        json!({"modifierExtension": [{"url": "http://example.org/excluded", "valueBoolean": true}],
               "entity": {"identifier": {"system": "urn:payer", "value": "M-9"}}}),
        json!({"entity": {"reference": "Patient/e-2", "display": "Two"}}),
    ];
    let id = stores.create_inline_group(json!({}), members).await;
    let direct = send(
        &stores.client,
        "GET",
        &format!("{}/4_0_0/Group/{id}", stores.standin.url()),
        &[],
        "",
    )
    .await;
    direct.assert_status(200);
    let before = serde_json::to_string(&direct.json()["member"]).unwrap();

    assert_exit(&stores.migrate(&["--id", &id], None), 0);
    assert!(stores.is_migrated(&id).await);
    assert_eq!(stores.inline_member_count(&id).await, 0);
    let read = send(
        &stores.client,
        "GET",
        &format!("{}/4_0_0/Group/{id}", proxy.url()),
        &[],
        "",
    )
    .await;
    read.assert_status(200);
    assert_eq!(
        serde_json::to_string(&read.json()["member"]).unwrap(),
        before
    );
}
