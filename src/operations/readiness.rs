//! `/readyz`: can the proxy serve? The legacy server must accept connections
//! and, when member handling is on, ClickHouse and MongoDB must answer. Each
//! check has a short timeout, and one result is shared for [`CACHE_TTL`] so a
//! storm of probes costs one round of checks.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::Mutex;

use crate::group::GroupService;
use crate::operations::shutdown::Lifecycle;

/// How long one round of checks answers every probe.
pub const CACHE_TTL: Duration = Duration::from_secs(1);
/// Longest wait for one dependency.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// One dependency and what is wrong with it, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub problem: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadinessReport {
    pub checks: Vec<Check>,
    /// What an operator should know that does not stop the proxy serving.
    pub warnings: Vec<String>,
}

impl ReadinessReport {
    /// The process is shutting down: not ready whatever the dependencies say.
    pub fn shutting_down() -> Self {
        Self {
            checks: vec![Check {
                name: "proxy",
                problem: Some("shutting down".into()),
            }],
            warnings: Vec::new(),
        }
    }

    pub fn down(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| c.problem.is_some())
            .map(|c| c.name)
            .collect()
    }

    pub fn status(&self) -> u16 {
        if self.down().is_empty() {
            200
        } else {
            503
        }
    }

    /// `{"status": "ready"|"unavailable", "down": [...], "checks": {name: "ok"|problem}}`
    pub fn to_json(&self) -> Value {
        let checks: serde_json::Map<String, Value> = self
            .checks
            .iter()
            .map(|c| {
                let state = c.problem.clone().unwrap_or_else(|| "ok".into());
                (c.name.to_string(), Value::String(state))
            })
            .collect();
        let status = if self.status() == 200 {
            "ready"
        } else {
            "unavailable"
        };
        let mut body = json!({ "status": status, "down": self.down(), "checks": checks });
        if !self.warnings.is_empty() {
            body["warnings"] = json!(self.warnings);
        }
        body
    }
}

pub struct Readiness {
    upstream: SocketAddr,
    stores: Option<GroupService>,
    lifecycle: Arc<Lifecycle>,
    /// Also makes concurrent probes wait for the one round of checks under way.
    last: Mutex<Option<(Instant, ReadinessReport)>>,
}

impl Readiness {
    /// `stores` is `None` when member handling is off: only the upstream matters.
    pub fn new(
        upstream: SocketAddr,
        stores: Option<GroupService>,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        Self {
            upstream,
            stores,
            lifecycle,
            last: Mutex::new(None),
        }
    }

    pub async fn report(&self) -> ReadinessReport {
        if self.lifecycle.is_draining() {
            return ReadinessReport::shutting_down();
        }
        let mut last = self.last.lock().await;
        if let Some((taken, report)) = last.as_ref() {
            if taken.elapsed() < CACHE_TTL {
                return report.clone();
            }
        }
        let report = self.check_all().await;
        *last = Some((Instant::now(), report.clone()));
        report
    }

    async fn check_all(&self) -> ReadinessReport {
        let upstream = check("upstream", async {
            tokio::net::TcpStream::connect(self.upstream)
                .await
                .map(drop)
                .map_err(|e| format!("cannot connect to {}: {e}", self.upstream))
        });
        let Some(stores) = &self.stores else {
            return ReadinessReport {
                checks: vec![upstream.await],
                warnings: Vec::new(),
            };
        };
        let clickhouse = check("clickhouse", async {
            stores.ping_member_events().await.map_err(|e| e.to_string())
        });
        let mongo = check("mongo", async {
            stores
                .ping_group_documents()
                .await
                .map_err(|e| e.to_string())
        });
        let (upstream, clickhouse, mongo) = tokio::join!(upstream, clickhouse, mongo);
        let warnings = stores
            .upstream_groups_elsewhere()
            .map(|id| {
                format!(
                    "the legacy server created Group/{id}, which the configured MongoDB does not \
                     hold: its Groups live elsewhere, so every request for them is forwarded \
                     unchanged (check mongo.uri and mongo.database)"
                )
            })
            .into_iter()
            .collect();
        ReadinessReport {
            checks: vec![upstream, clickhouse, mongo],
            warnings,
        }
    }
}

async fn check(
    name: &'static str,
    probe: impl std::future::Future<Output = Result<(), String>>,
) -> Check {
    let problem = match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Ok(Ok(())) => None,
        Ok(Err(problem)) => Some(problem),
        Err(_) => Some(format!("no answer within {} ms", CHECK_TIMEOUT.as_millis())),
    };
    Check { name, problem }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(problems: &[(&'static str, Option<&str>)]) -> ReadinessReport {
        ReadinessReport {
            checks: problems
                .iter()
                .map(|(name, problem)| Check {
                    name,
                    problem: problem.map(str::to_string),
                })
                .collect(),
            warnings: Vec::new(),
        }
    }

    #[test]
    fn all_dependencies_up_is_ready() {
        let report = report(&[("upstream", None), ("clickhouse", None), ("mongo", None)]);
        assert_eq!(report.status(), 200);
        assert_eq!(
            report.to_json(),
            json!({"status": "ready", "down": [], "checks": {"upstream": "ok", "clickhouse": "ok", "mongo": "ok"}})
        );
    }

    #[test]
    fn a_dependency_down_is_named() {
        let report = report(&[
            ("upstream", None),
            ("clickhouse", Some("connection refused")),
            ("mongo", None),
        ]);
        assert_eq!(report.status(), 503);
        let body = report.to_json();
        assert_eq!(body["status"], "unavailable");
        assert_eq!(body["down"], json!(["clickhouse"]));
        assert_eq!(body["checks"]["clickhouse"], "connection refused");
    }

    #[test]
    fn warnings_are_shown_without_making_it_unready() {
        let mut report = report(&[("upstream", None)]);
        report.warnings.push("Groups live elsewhere".into());
        assert_eq!(report.status(), 200);
        assert_eq!(
            report.to_json()["warnings"],
            json!(["Groups live elsewhere"])
        );
    }

    #[test]
    fn shutting_down_is_not_ready() {
        assert_eq!(ReadinessReport::shutting_down().status(), 503);
        assert_eq!(ReadinessReport::shutting_down().down(), vec!["proxy"]);
    }
}
