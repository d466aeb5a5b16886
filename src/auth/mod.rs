//! Authorization of the requests the proxy answers itself. By answering member
//! writes and reads from its own stores the proxy skips the legacy server's
//! access control, so every such request passes one of these first:
//! - [`AuthMode::Upstream`]: the legacy server decides, asked with the
//!   client's own credentials (the probe lives in `proxy::authorize`);
//! - [`AuthMode::Jwt`]: bearer tokens validated here, with SMART scopes;
//! - [`AuthMode::None`]: only when configured so, with a warning at start.

pub mod jwt;
pub mod scopes;

use crate::config::{AuthMode, AuthSettings};
use crate::fhir::outcome::{IssueType, Outcome};

pub use scopes::Action;

/// Why a request is not authorized, with the answer it gets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    MissingCredentials,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("insufficient scope: needs {needed}")]
    InsufficientScope { needed: String },
}

const REALM: &str = "fhir-group-proxy";

impl AuthError {
    pub fn outcome(&self) -> Outcome {
        match self {
            AuthError::MissingCredentials => Outcome::error(
                401,
                IssueType::Login,
                "authentication required: send Authorization: Bearer <token>",
            ),
            AuthError::InvalidToken(why) => Outcome::error(
                401,
                IssueType::Login,
                format!("invalid bearer token: {why}"),
            ),
            AuthError::InsufficientScope { needed } => Outcome::error(
                403,
                IssueType::Forbidden,
                format!("the token's scopes do not allow this; it needs {needed}"),
            ),
        }
    }

    /// The `WWW-Authenticate` challenge (RFC 6750).
    pub fn challenge(&self) -> String {
        match self {
            AuthError::MissingCredentials => format!("Bearer realm=\"{REALM}\""),
            AuthError::InvalidToken(why) => format!(
                "Bearer realm=\"{REALM}\", error=\"invalid_token\", error_description=\"{}\"",
                why.replace(['"', '\\'], "'")
            ),
            AuthError::InsufficientScope { needed } => format!(
                "Bearer realm=\"{REALM}\", error=\"insufficient_scope\", scope=\"{}\"",
                needed.replace(['"', '\\'], "'")
            ),
        }
    }
}

/// The configured authorization, ready to use.
pub enum Authorizer {
    Upstream {
        probe_method: http::Method,
        probe_path: String,
    },
    Jwt(Box<jwt::JwtVerifier>),
    None,
}

impl Authorizer {
    pub async fn from_settings(settings: &AuthSettings) -> Result<Self, jwt::JwksError> {
        Ok(match settings.mode {
            AuthMode::Upstream => {
                let (method, path) = settings
                    .upstream_probe
                    .split_once(' ')
                    .unwrap_or(("PATCH", "{base}/Group/{id}"));
                let probe_method =
                    http::Method::from_bytes(method.as_bytes()).unwrap_or(http::Method::PATCH);
                if matches!(probe_method, http::Method::GET | http::Method::HEAD) {
                    tracing::warn!(
                        probe = %settings.upstream_probe,
                        "auth.upstream_probe is a read: a client that may read a Group but not \
                         write it can change its roster through the proxy; use \
                         \"PATCH {{base}}/Group/{{id}}\" unless reading implies writing here"
                    );
                }
                Authorizer::Upstream {
                    probe_method,
                    probe_path: path.trim().to_string(),
                }
            }
            AuthMode::Jwt => {
                Authorizer::Jwt(Box::new(jwt::JwtVerifier::load(&settings.jwt).await?))
            }
            AuthMode::None => {
                tracing::warn!(
                    "auth.mode = \"none\": member writes and reads answered by the proxy are NOT \
                     authorized; anyone who reaches this port can change Group rosters"
                );
                Authorizer::None
            }
        })
    }
}

/// `{base}` and `{id}` of the upstream probe, filled in.
pub fn probe_path(template: &str, base: &str, id: &str) -> String {
    template.replace("{base}", base).replace("{id}", id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_answer_401_or_403_with_a_challenge() {
        let missing = AuthError::MissingCredentials;
        assert_eq!(missing.outcome().status, 401);
        assert_eq!(missing.challenge(), "Bearer realm=\"fhir-group-proxy\"");
        let invalid = AuthError::InvalidToken("the token has \"expired\"".into());
        assert_eq!(invalid.outcome().status, 401);
        assert!(invalid.challenge().contains("error=\"invalid_token\""));
        assert!(invalid.challenge().contains("'expired'"));
        let scope = AuthError::InsufficientScope {
            needed: "user/Group.write".into(),
        };
        assert_eq!(scope.outcome().status, 403);
        assert!(scope.challenge().contains("insufficient_scope"));
        assert_eq!(
            probe_path("{base}/Group/{id}", "/4_0_0", "g1"),
            "/4_0_0/Group/g1"
        );
    }
}
