//! Shared harness: the stand-in on a free port over a fresh database of the
//! real MongoDB-compatible server, and a plain HTTP/1.1 client.
#![allow(dead_code)]

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::HeaderMap;
use hyper::StatusCode;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use standin_legacy_fhir::{spawn_on_free_port, Profile, StandinConfig};

pub fn mongo_uri() -> String {
    std::env::var("FGP_TEST_MONGO_URI").unwrap_or_else(|_| "mongodb://127.0.0.1:27018/".into())
}

pub struct Harness {
    pub addr: SocketAddr,
    pub database: mongodb::Database,
    /// Where history lives (the same as `database` unless configured).
    pub history_database: mongodb::Database,
    task: tokio::task::JoinHandle<()>,
    client: Client<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or_else(|| panic!("no {name} header in {:?}", self.headers))
    }

    /// The `code` of the first issue of an OperationOutcome body.
    pub fn issue_code(&self) -> String {
        let body = self.json();
        assert_eq!(body["resourceType"], "OperationOutcome", "{body}");
        assert_eq!(body["issue"][0]["severity"], "error", "{body}");
        body["issue"][0]["code"].as_str().unwrap().to_string()
    }

    pub fn diagnostics(&self) -> String {
        self.json()["issue"][0]["diagnostics"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Harness {
    /// A stand-in in the `simple` profile: plain FHIR, what most of these
    /// tests pin down (`start_real` for the real server's behaviour).
    pub async fn start() -> Harness {
        Self::start_with(|config| config.with_profile(Profile::Simple)).await
    }

    /// A stand-in in the `real` profile.
    pub async fn start_real() -> Harness {
        Self::start_with(|config| config.with_profile(Profile::Real)).await
    }

    /// A stand-in on a fresh database, configured by `configure`.
    pub async fn start_with(configure: impl FnOnce(StandinConfig) -> StandinConfig) -> Harness {
        let name = format!("standin_test_{}", uuid::Uuid::new_v4().simple());
        let config = configure(StandinConfig::new(mongo_uri(), &name));
        let history_name = config.history_database.clone().unwrap_or(name.clone());
        let (addr, task) = spawn_on_free_port(config)
            .await
            .expect("stand-in starts (is FerretDB running at FGP_TEST_MONGO_URI?)");
        let client = mongodb::Client::with_uri_str(mongo_uri()).await.unwrap();
        Harness {
            addr,
            database: client.database(&name),
            history_database: client.database(&history_name),
            task,
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(body.into())).unwrap();
        let response = self.client.request(request).await.unwrap();
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, &[], Bytes::new()).await
    }

    /// Waits until the history entries of every answered write are in (the
    /// real profile writes them after the answer, as the real server does).
    pub async fn history_settled(&self) {
        let reply = self.get("/__standin/history-settled").await;
        assert_eq!(reply.status, StatusCode::NO_CONTENT);
    }

    pub async fn send_json(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Reply {
        let content_type = if method == "PATCH" {
            "application/json-patch+json"
        } else {
            "application/fhir+json"
        };
        let mut all = vec![("content-type", content_type)];
        all.extend_from_slice(headers);
        self.send(method, path, &all, serde_json::to_vec(body).unwrap())
            .await
    }

    /// Stops the server and drops the test database.
    pub async fn finish(self) {
        self.task.abort();
        let _ = self.database.drop().await;
        let _ = self.history_database.drop().await;
    }
}
