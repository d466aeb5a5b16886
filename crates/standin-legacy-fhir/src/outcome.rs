//! FHIR `OperationOutcome` error responses. Every error the stand-in answers
//! on a FHIR or diagnostics route goes through here, so the shape is uniform.

use hyper::StatusCode;
use serde_json::json;

use crate::responses::{fhir_json, Response};

/// The FHIR `IssueType` codes the stand-in uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueCode {
    NotFound,
    Invalid,
    Conflict,
    Processing,
    NotSupported,
    Exception,
    Login,
    Forbidden,
}

impl IssueCode {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueCode::NotFound => "not-found",
            IssueCode::Invalid => "invalid",
            IssueCode::Conflict => "conflict",
            IssueCode::Processing => "processing",
            IssueCode::NotSupported => "not-supported",
            IssueCode::Exception => "exception",
            IssueCode::Login => "login",
            IssueCode::Forbidden => "forbidden",
        }
    }
}

/// An `OperationOutcome` with one error issue.
pub fn outcome(status: StatusCode, code: IssueCode, diagnostics: impl AsRef<str>) -> Response {
    fhir_json(
        status,
        &json!({
            "resourceType": "OperationOutcome",
            "issue": [{
                "severity": "error",
                "code": code.as_str(),
                "diagnostics": diagnostics.as_ref(),
            }]
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn outcome_is_a_fhir_operation_outcome() {
        let response = outcome(StatusCode::CONFLICT, IssueCode::Conflict, "Group/g changed");
        assert_eq!(response.status(), StatusCode::CONFLICT);
        assert_eq!(
            response.headers()["content-type"],
            crate::responses::FHIR_JSON
        );
        let body = response.into_body().collect().await.unwrap().to_bytes();
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["resourceType"], "OperationOutcome");
        assert_eq!(value["issue"][0]["severity"], "error");
        assert_eq!(value["issue"][0]["code"], "conflict");
        assert_eq!(value["issue"][0]["diagnostics"], "Group/g changed");
    }
}
