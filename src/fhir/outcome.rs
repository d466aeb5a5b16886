//! FHIR `OperationOutcome`: the body of every error the proxy produces itself.

use serde_json::{json, Value};

/// The subset of the FHIR `IssueType` value set the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IssueType {
    Invalid,
    Structure,
    Required,
    Value,
    Processing,
    NotSupported,
    NotFound,
    Conflict,
    BusinessRule,
    TooCostly,
    TooLong,
    Timeout,
    Transient,
    Exception,
    Informational,
    Login,
    Forbidden,
}

impl IssueType {
    /// The code of a patch that does not apply, with the legacy server's
    /// status for it: the reference server's 400 says `invalid`; FHIR's 422
    /// goes with `processing`.
    pub fn of_patch_failure(status: u16) -> IssueType {
        match status {
            400 => IssueType::Invalid,
            _ => IssueType::Processing,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            IssueType::Invalid => "invalid",
            IssueType::Structure => "structure",
            IssueType::Required => "required",
            IssueType::Value => "value",
            IssueType::Processing => "processing",
            IssueType::NotSupported => "not-supported",
            IssueType::NotFound => "not-found",
            IssueType::Conflict => "conflict",
            IssueType::BusinessRule => "business-rule",
            IssueType::TooCostly => "too-costly",
            IssueType::TooLong => "too-long",
            IssueType::Timeout => "timeout",
            IssueType::Transient => "transient",
            IssueType::Exception => "exception",
            IssueType::Informational => "informational",
            IssueType::Login => "login",
            IssueType::Forbidden => "forbidden",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Fatal,
    Error,
    Warning,
    Information,
}

impl Severity {
    pub fn code(self) -> &'static str {
        match self {
            Severity::Fatal => "fatal",
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Information => "information",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub severity: Severity,
    pub code: IssueType,
    pub diagnostics: String,
    /// FHIRPath-ish locations (for patches: `/0/path` style op pointers).
    pub expression: Vec<String>,
}

/// An OperationOutcome together with the HTTP status it is sent with.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: u16,
    pub issues: Vec<Issue>,
}

impl Outcome {
    pub fn error(status: u16, code: IssueType, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            issues: vec![Issue {
                severity: Severity::Error,
                code,
                diagnostics: diagnostics.into(),
                expression: Vec::new(),
            }],
        }
    }

    pub fn information(status: u16, diagnostics: impl Into<String>) -> Self {
        Self {
            status,
            issues: vec![Issue {
                severity: Severity::Information,
                code: IssueType::Informational,
                diagnostics: diagnostics.into(),
                expression: Vec::new(),
            }],
        }
    }

    /// Points the first issue at a location in the request.
    pub fn at(mut self, expression: impl Into<String>) -> Self {
        if let Some(issue) = self.issues.first_mut() {
            issue.expression.push(expression.into());
        }
        self
    }

    /// The first issue's diagnostics, for quoting one outcome in another.
    pub fn first_diagnostics(&self) -> &str {
        self.issues.first().map_or("", |i| i.diagnostics.as_str())
    }

    pub fn to_json(&self) -> Value {
        let issues: Vec<Value> = self
            .issues
            .iter()
            .map(|issue| {
                let mut v = json!({
                    "severity": issue.severity.code(),
                    "code": issue.code.code(),
                    "diagnostics": issue.diagnostics,
                });
                if !issue.expression.is_empty() {
                    v["expression"] = json!(issue.expression);
                }
                v
            })
            .collect();
        json!({ "resourceType": "OperationOutcome", "issue": issues })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing a Value built from strings cannot fail.
        serde_json::to_vec(&self.to_json()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_patch_that_does_not_apply_says_invalid_with_400_and_processing_with_422() {
        assert_eq!(IssueType::of_patch_failure(400), IssueType::Invalid);
        assert_eq!(IssueType::of_patch_failure(422), IssueType::Processing);
        assert_eq!(IssueType::of_patch_failure(409), IssueType::Processing);
    }

    #[test]
    fn renders_a_fhir_operation_outcome() {
        let outcome = Outcome::error(422, IssueType::Processing, "op 2 failed").at("/2");
        let v = outcome.to_json();
        assert_eq!(v["resourceType"], "OperationOutcome");
        assert_eq!(v["issue"][0]["severity"], "error");
        assert_eq!(v["issue"][0]["code"], "processing");
        assert_eq!(v["issue"][0]["diagnostics"], "op 2 failed");
        assert_eq!(v["issue"][0]["expression"][0], "/2");
        let reparsed: Value = serde_json::from_slice(&outcome.to_bytes()).unwrap();
        assert_eq!(reparsed, v);
    }

    #[test]
    fn omits_empty_expression() {
        let v = Outcome::error(502, IssueType::Transient, "down").to_json();
        assert!(v["issue"][0].get("expression").is_none());
    }
}
