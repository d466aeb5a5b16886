//! The load test's HTTP side: creating the Groups on each target, and sending
//! the measured requests from concurrent workers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, StatusCode};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use thiserror::Error;
use tokio::task::JoinSet;

use super::report::Target;
use super::stats::{Outcome, Sample};
use super::workload::{self, Cell, RequestKind};

/// Members added per seeding PATCH through the proxy: the proxy's default
/// `fhir.max_patch_operations`.
const SEED_OPS_PER_PATCH: usize = 10_000;

const FHIR_JSON: &str = "application/fhir+json";
const JSON_PATCH: &str = "application/json-patch+json";

#[derive(Debug, Error)]
pub enum RunnerError {
    #[error("{target}: {what} ({method} {url}) answered {status}: {body}")]
    Refused {
        target: &'static str,
        what: &'static str,
        method: Method,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{target}: {what} ({method} {url}) failed: {reason}")]
    Failed {
        target: &'static str,
        what: &'static str,
        method: Method,
        url: String,
        reason: String,
    },
    #[error("{target}: {what} ({url}) answered without a resource id: {body}")]
    NoId {
        target: &'static str,
        what: &'static str,
        url: String,
        body: String,
    },
}

/// A target and its FHIR base URL (no trailing `/`).
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub target: Target,
    pub base: String,
}

impl Endpoint {
    pub fn new(target: Target, base: &str) -> Endpoint {
        Endpoint {
            target,
            base: base.trim_end_matches('/').to_string(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{path}", self.base)
    }
}

/// How long each cell runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Workers start no request after this long; requests under way finish.
    After(Duration),
    /// This many requests in all.
    Requests(u64),
}

/// The requests of one cell, shared by its workers.
struct CellTarget {
    group_url: String,
    patient_url: String,
    group_size: usize,
}

/// The measured requests of one cell on one target.
#[derive(Debug, Clone)]
pub struct CellRun {
    pub samples: Vec<Sample>,
    /// From the first request to the last answer.
    pub elapsed: Duration,
}

/// One request to send.
struct Call {
    method: Method,
    url: String,
    content_type: Option<&'static str>,
    body: Bytes,
}

impl Call {
    fn new(method: Method, url: String, content_type: Option<&'static str>, json: &Value) -> Call {
        Call {
            method,
            url,
            content_type,
            body: Bytes::from(json.to_string()),
        }
    }

    fn get(url: String) -> Call {
        Call {
            method: Method::GET,
            url,
            content_type: None,
            body: Bytes::new(),
        }
    }

    fn with_method(self, method: Method) -> Call {
        Call { method, ..self }
    }
}

/// Why an exchange got no status.
enum NoAnswer {
    Timeout,
    Transport(String),
}

#[derive(Clone)]
pub struct Runner {
    client: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl Runner {
    /// `timeout` bounds each request, body included.
    pub fn new(timeout: Duration) -> Runner {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Runner {
            client: Client::builder(TokioExecutor::new()).build(connector),
            timeout,
        }
    }

    /// One request, its whole answer read.
    async fn exchange(&self, call: &Call) -> Result<(StatusCode, Bytes), NoAnswer> {
        let mut request = hyper::Request::builder()
            .method(call.method.clone())
            .uri(&call.url)
            .header("accept", FHIR_JSON)
            .header("prefer", "return=minimal");
        if let Some(content_type) = call.content_type {
            request = request.header("content-type", content_type);
        }
        let request = request
            .body(Full::new(call.body.clone()))
            .map_err(|e| NoAnswer::Transport(e.to_string()))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| NoAnswer::Transport(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| NoAnswer::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .unwrap_or(Err(NoAnswer::Timeout))
    }

    /// A set-up request that must answer `expected`; its body.
    async fn setup_call(
        &self,
        endpoint: &Endpoint,
        what: &'static str,
        call: Call,
        expected: StatusCode,
    ) -> Result<Bytes, RunnerError> {
        let target = endpoint.target.name();
        match self.exchange(&call).await {
            Ok((status, body)) if status == expected => Ok(body),
            Ok((status, body)) => Err(RunnerError::Refused {
                target,
                what,
                method: call.method,
                url: call.url,
                status: status.as_u16(),
                body: excerpt(&body),
            }),
            Err(no_answer) => Err(RunnerError::Failed {
                target,
                what,
                method: call.method,
                url: call.url,
                reason: match no_answer {
                    NoAnswer::Timeout => format!("no answer within {:?}", self.timeout),
                    NoAnswer::Transport(reason) => reason,
                },
            }),
        }
    }

    /// POSTs `resource` to `{base}/{type}`; the id of the created resource.
    async fn create(
        &self,
        endpoint: &Endpoint,
        what: &'static str,
        resource: &Value,
    ) -> Result<String, RunnerError> {
        let resource_type = resource["resourceType"].as_str().unwrap_or_default();
        let url = endpoint.url(resource_type);
        let body = self
            .setup_call(
                endpoint,
                what,
                Call::new(Method::POST, url.clone(), Some(FHIR_JSON), resource),
                StatusCode::CREATED,
            )
            .await?;
        serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|created| created["id"].as_str().map(str::to_string))
            .ok_or_else(|| RunnerError::NoId {
                target: endpoint.target.name(),
                what,
                url,
                body: excerpt(&body),
            })
    }

    /// A Group of `size` members `workload::member_reference(0..size)`: inline
    /// on the legacy server; through the proxy, created empty and filled with
    /// member PATCHes, so its members live in the proxy's member store
    /// whatever `members.create_in_clickhouse` says.
    pub async fn create_group(
        &self,
        endpoint: &Endpoint,
        size: usize,
    ) -> Result<String, RunnerError> {
        if endpoint.target == Target::Legacy {
            return self
                .create(
                    endpoint,
                    "creating a Group",
                    &workload::group_with_members(size),
                )
                .await;
        }
        let id = self
            .create(
                endpoint,
                "creating a Group",
                &workload::group_with_members(0),
            )
            .await?;
        for start in (0..size).step_by(SEED_OPS_PER_PATCH) {
            let patch = workload::add_members_patch(start..size.min(start + SEED_OPS_PER_PATCH));
            let url = endpoint.url(&format!("Group/{id}"));
            self.setup_call(
                endpoint,
                "adding members with a member PATCH",
                Call::new(Method::PATCH, url, Some(JSON_PATCH), &patch),
                StatusCode::OK,
            )
            .await?;
        }
        Ok(id)
    }

    /// The Patient read by passthrough requests.
    pub async fn create_patient(&self, endpoint: &Endpoint) -> Result<String, RunnerError> {
        self.create(
            endpoint,
            "creating a Patient",
            &workload::passthrough_patient(),
        )
        .await
    }

    /// Deletes what the run created.
    pub async fn delete(&self, endpoint: &Endpoint, path: &str) -> Result<(), RunnerError> {
        match self
            .setup_call(
                endpoint,
                "deleting",
                Call::get(endpoint.url(path)).with_method(Method::DELETE),
                StatusCode::NO_CONTENT,
            )
            .await
        {
            // Some servers answer a DELETE with 200 and an OperationOutcome.
            Err(RunnerError::Refused { status: 200, .. }) | Ok(_) => Ok(()),
            Err(other) => Err(other),
        }
    }

    /// Runs `cell` against `endpoint`: `cell.concurrency` workers send the
    /// kinds of `schedule` in turn until `stop`.
    pub async fn run_cell(
        &self,
        endpoint: &Endpoint,
        group_id: &str,
        patient_id: &str,
        cell: Cell,
        stop: Stop,
        schedule: Arc<[RequestKind]>,
    ) -> CellRun {
        let shared = Arc::new(CellTarget {
            group_url: endpoint.url(&format!("Group/{group_id}")),
            patient_url: endpoint.url(&format!("Patient/{patient_id}")),
            group_size: cell.group_size,
        });
        let issued = Arc::new(AtomicU64::new(0));
        let patches = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let mut workers = JoinSet::new();
        for _ in 0..cell.concurrency.max(1) {
            let (runner, shared, issued, patches, schedule) = (
                self.clone(),
                shared.clone(),
                issued.clone(),
                patches.clone(),
                schedule.clone(),
            );
            workers.spawn(async move {
                let mut samples = Vec::new();
                loop {
                    if let Stop::After(duration) = stop {
                        if started.elapsed() >= duration {
                            break;
                        }
                    }
                    let n = issued.fetch_add(1, Ordering::Relaxed);
                    if matches!(stop, Stop::Requests(limit) if n >= limit) || schedule.is_empty() {
                        break;
                    }
                    let kind = schedule[(n % schedule.len() as u64) as usize];
                    samples.push(runner.measure(&shared, kind, &patches).await);
                }
                samples
            });
        }
        let mut samples = Vec::new();
        while let Some(done) = workers.join_next().await {
            // A worker only ends by returning its samples; a panic is a bug
            // worth surfacing, not a measurement.
            match done {
                Ok(worker_samples) => samples.extend(worker_samples),
                Err(e) => std::panic::resume_unwind(e.into_panic()),
            }
        }
        CellRun {
            samples,
            elapsed: started.elapsed(),
        }
    }

    async fn measure(&self, cell: &CellTarget, kind: RequestKind, patches: &AtomicU64) -> Sample {
        let call = match kind {
            RequestKind::Patch => {
                let sequence = patches.fetch_add(1, Ordering::Relaxed);
                let patch = workload::toggle_inactive_patch(sequence, cell.group_size);
                Call::new(
                    Method::PATCH,
                    cell.group_url.clone(),
                    Some(JSON_PATCH),
                    &patch,
                )
            }
            RequestKind::Read => Call::get(cell.group_url.clone()),
            RequestKind::Summary => Call::get(format!("{}?_summary=true", cell.group_url)),
            RequestKind::Passthrough => Call::get(cell.patient_url.clone()),
        };
        let started = Instant::now();
        let outcome = match self.exchange(&call).await {
            Ok((status, _)) if status.is_success() => Outcome::Success,
            Ok((status, _)) => Outcome::Status(status.as_u16()),
            Err(NoAnswer::Timeout) => Outcome::Timeout,
            Err(NoAnswer::Transport(_)) => Outcome::Transport,
        };
        Sample {
            kind,
            latency: started.elapsed(),
            outcome,
        }
    }
}

/// The start of a body, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.char_indices().nth(300) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text.into_owned(),
    }
}
