//! One stand-in legacy server with the proxy in front of it and handles on
//! both member stores: the harness of the tests that drive Group requests.

use std::collections::BTreeMap;

use mongodb::bson::{doc, Document};
use serde_json::{json, Value};

use super::*;

pub const PATCH: (&str, &str) = ("content-type", "application/json-patch+json");
pub const FHIR_JSON_BODY: (&str, &str) = ("content-type", "application/fhir+json");

pub type Headers<'a> = &'a [(&'a str, &'a str)];

pub struct Stack {
    pub standin: Standin,
    pub proxy: ProxyProcess,
    pub clickhouse: clickhouse::Client,
    pub mongo: mongodb::Database,
    pub client: HttpClient,
    /// The proxy's store settings, as `FGP_*` variables (for `migrate`).
    pub store_settings: Vec<(String, String)>,
}

impl Stack {
    pub async fn start(extra: &[(&str, &str)]) -> Stack {
        Self::start_behind(Standin::start().await, extra).await
    }

    /// The stack in front of a given stand-in.
    pub async fn start_behind(standin: Standin, extra: &[(&str, &str)]) -> Stack {
        let (standin, proxy, clickhouse) = start_with_member_stores_behind(standin, extra).await;
        let mongo = mongodb::Client::with_uri_str(mongo_uri())
            .await
            .expect("mongo client")
            .database(&standin.database);
        let store_settings = vec![
            ("FGP_CLICKHOUSE_URL".to_string(), clickhouse.url.clone()),
            (
                "FGP_CLICKHOUSE_DATABASE".to_string(),
                clickhouse.database.clone(),
            ),
            ("FGP_MONGO_URI".to_string(), mongo_uri()),
            ("FGP_MONGO_DATABASE".to_string(), standin.database.clone()),
        ];
        Stack {
            store_settings,
            clickhouse: fhir_group_proxy::store::clickhouse::connect(&clickhouse),
            standin,
            proxy,
            mongo,
            client: http_client(),
        }
    }

    pub fn group_url(&self, id: &str) -> String {
        format!("{}/4_0_0/Group/{id}", self.proxy.url())
    }

    pub async fn create_group(&self, members: Value) -> String {
        self.create_group_at(&self.proxy.url(), members).await
    }

    /// A Group created on the legacy server directly: members stay inline.
    pub async fn create_legacy_group(&self, members: Value) -> String {
        self.create_group_at(&self.standin.url(), members).await
    }

    pub async fn create_group_at(&self, server: &str, members: Value) -> String {
        // `member: []` stays: RFC 6902 appends (`add /member/-`) only to an
        // array that exists, on the legacy server and through the proxy.
        let mut group =
            super::owned(json!({"resourceType": "Group", "type": "person", "actual": true}));
        group["member"] = members;
        let reply = send(
            &self.client,
            "POST",
            &format!("{server}/4_0_0/Group"),
            &[("content-type", "application/fhir+json")],
            serde_json::to_vec(&group).unwrap(),
        )
        .await;
        reply.assert_status(201);
        reply.json()["id"].as_str().unwrap().to_string()
    }

    pub async fn patch(&self, id: &str, ops: Value, headers: &[(&str, &str)]) -> Reply {
        self.send_json(id, "PATCH", PATCH, ops, headers).await
    }

    /// `method` on Group `id` with a JSON body of the given content type.
    pub async fn send_json(
        &self,
        id: &str,
        method: &str,
        content_type: (&str, &str),
        body: Value,
        headers: Headers<'_>,
    ) -> Reply {
        let mut all = vec![content_type];
        all.extend_from_slice(headers);
        send(
            &self.client,
            method,
            &self.group_url(id),
            &all,
            serde_json::to_vec(&body).unwrap(),
        )
        .await
    }

    pub async fn group_document(&self, id: &str) -> Document {
        group_document(&self.mongo, id).await
    }

    pub async fn group_key(&self, id: &str) -> String {
        self.group_document(id)
            .await
            .get_str("_uuid")
            .unwrap()
            .to_string()
    }

    /// Current members as ClickHouse's views see them, by reference:
    /// (inactive, period start) of the last slot with that reference.
    pub async fn members(&self, id: &str) -> BTreeMap<String, (bool, String)> {
        #[derive(clickhouse::Row, serde::Deserialize)]
        struct Row {
            match_key: String,
            present: u8,
            element: String,
        }
        let rows = self.clickhouse
            .query("SELECT match_key, present, element FROM (SELECT slot_id, argMaxMerge(match_key) AS match_key, \
                    argMaxMerge(present) AS present, argMaxMerge(element) AS element, argMaxMerge(order_key) AS order_key \
                    FROM Group_4_0_0_MemberSlots WHERE group_key = ? AND slot_id != '' GROUP BY slot_id) ORDER BY order_key")
            .bind(self.group_key(id).await)
            .fetch_all::<Row>().await.unwrap();
        rows.into_iter()
            .filter(|r| r.present == 1)
            .map(|r| {
                let element: Value = serde_json::from_str(&r.element).unwrap();
                let inactive = element["inactive"] == json!(true);
                let start = element["period"]["start"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string();
                (r.match_key, (inactive, start))
            })
            .collect()
    }

    pub async fn event_count(&self, id: &str) -> u64 {
        published_event_count(&self.clickhouse, &self.group_key(id).await).await
    }
}

impl Stack {
    pub async fn put_group(&self, id: &str, group: Value, headers: Headers<'_>) -> Reply {
        self.send_json(id, "PUT", FHIR_JSON_BODY, group, headers)
            .await
    }

    pub async fn read_group(&self, id: &str) -> Value {
        let read = send(&self.client, "GET", &self.group_url(id), &[], "").await;
        read.assert_status(200);
        read.json()
    }

    pub async fn group_documents_count(&self) -> u64 {
        self.mongo
            .collection::<Document>("Group_4_0_0")
            .count_documents(doc! {})
            .await
            .unwrap()
    }
}

impl Stack {
    /// Runs `fhir-group-proxy migrate` with `args` on this stack's stores.
    pub fn migrate(&self, args: &[&str]) -> std::process::Output {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fhir-group-proxy"));
        command.arg("migrate").args(args).env("FGP_LOG", "warn");
        for (key, value) in &self.store_settings {
            command.env(key, value);
        }
        command.output().expect("migrate runs")
    }

    /// A Group whose roster the proxy keeps: created empty through the proxy,
    /// then given `members` by member PATCH (version 2).
    pub async fn managed_group(&self, members: &[&str]) -> String {
        let id = self.create_group(json!([])).await;
        let elements: Vec<Value> = members
            .iter()
            .map(|r| json!({"entity": {"reference": r}}))
            .collect();
        // The Group was created without `member`: RFC 6902 adds the array
        // itself (`add /member/-` would find no array to extend).
        let ops = json!([{"op": "add", "path": "/member", "value": elements}]);
        self.patch(&id, ops, &[]).await.assert_status(200);
        assert!(
            !self.members(&id).await.is_empty(),
            "the roster is in ClickHouse"
        );
        id
    }

    /// Active member references of a proxied read, in answer order.
    pub async fn roster_read(&self, id: &str) -> Vec<String> {
        references(&self.read_group(id).await)
    }
}

/// `member[].entity.reference` of a Group.
pub fn references(group: &Value) -> Vec<String> {
    group["member"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["entity"]["reference"].as_str().map(str::to_string))
        .collect()
}
