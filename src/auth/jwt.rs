//! Local validation of `Authorization: Bearer` JWTs against a JWKS: signature
//! (asymmetric algorithms only), issuer, audience, expiry and not-before with
//! a clock-skew allowance, then SMART scopes for the action.

use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{decode, decode_header, Algorithm, DecodingKey, Validation};
use tokio::sync::{Mutex, RwLock};

use super::scopes::{self, Action};
use super::AuthError;
use crate::config::JwtSettings;

/// A JWKS URL is fetched again for an unknown `kid` at most this often, so
/// tokens with made-up key ids cannot make the proxy hammer the identity provider.
const JWKS_REFRESH_MIN_INTERVAL: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read the JWKS file {path}: {reason}")]
    File { path: String, reason: String },
    #[error("cannot fetch the JWKS from {url}: {reason}")]
    Fetch { url: String, reason: String },
    #[error("the JWKS from {source_name} is not a JWK Set: {reason}")]
    Parse { source_name: String, reason: String },
}

pub struct JwtVerifier {
    settings: JwtSettings,
    keys: RwLock<JwkSet>,
    last_fetch: Mutex<Instant>,
}

/// Who a valid token speaks for, for the logs.
#[derive(Debug, Clone)]
pub struct Subject {
    pub subject: String,
}

impl JwtVerifier {
    pub async fn load(settings: &JwtSettings) -> Result<Self, JwksError> {
        let keys = load_jwks(settings).await?;
        Ok(Self {
            settings: settings.clone(),
            keys: RwLock::new(keys),
            last_fetch: Mutex::new(Instant::now()),
        })
    }

    /// Checks the bearer token of a request and its scopes for `action`.
    pub async fn authorize(
        &self,
        authorization: Option<&str>,
        resource_type: &str,
        action: Action,
    ) -> Result<Subject, AuthError> {
        let token = bearer_token(authorization)?;
        let header = decode_header(token)
            .map_err(|e| invalid(format!("the token header is not acceptable ({e}); alg \"none\" and unknown algorithms are refused")))?;
        if header.alg.family() == jsonwebtoken::AlgorithmFamily::Hmac {
            return Err(invalid(format!(
                "{:?} tokens are refused: only asymmetric signatures are verified against the JWKS",
                header.alg
            )));
        }
        let key = self.key_for(header.kid.as_deref(), header.alg).await?;
        let claims = decode::<serde_json::Value>(token, &key, &self.validation(header.alg))
            .map_err(|e| invalid(describe(e.kind())))?
            .claims;
        let granted = scopes::token_scopes(&claims);
        if !scopes::allows(granted.iter().map(String::as_str), resource_type, action) {
            return Err(AuthError::InsufficientScope {
                needed: scopes::needed(resource_type, action),
            });
        }
        Ok(Subject {
            subject: claims["sub"].as_str().unwrap_or_default().to_string(),
        })
    }

    fn validation(&self, algorithm: Algorithm) -> Validation {
        let mut validation = Validation::new(algorithm);
        validation.leeway = self.settings.leeway_seconds;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&self.settings.audience);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation
    }

    async fn key_for(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.find_key(kid, algorithm).await? {
            return Ok(key);
        }
        if self.settings.jwks_url.is_empty() {
            return Err(invalid(unknown_key(kid)));
        }
        // An unknown key id may be a rotated key: fetch the set again, rarely.
        {
            let mut last = self.last_fetch.lock().await;
            if last.elapsed() >= JWKS_REFRESH_MIN_INTERVAL {
                *last = Instant::now();
                match load_jwks(&self.settings).await {
                    Ok(keys) => *self.keys.write().await = keys,
                    Err(e) => tracing::warn!(error = %e, "JWKS refresh failed"),
                }
            }
        }
        self.find_key(kid, algorithm)
            .await?
            .ok_or_else(|| invalid(unknown_key(kid)))
    }

    async fn find_key(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<Option<DecodingKey>, AuthError> {
        let keys = self.keys.read().await;
        let jwk: Option<&Jwk> = match kid {
            Some(kid) => keys.find(kid),
            None if keys.keys.len() == 1 => keys.keys.first(),
            None => {
                return Err(invalid(
                    "the token names no key (kid) and the JWKS has several".into(),
                ))
            }
        };
        let Some(jwk) = jwk else { return Ok(None) };
        if let Some(key_algorithm) = jwk.common.key_algorithm {
            if key_algorithm.to_string() != format!("{algorithm:?}") {
                return Err(invalid(format!(
                    "the token is signed with {algorithm:?} but its key is for {key_algorithm}"
                )));
            }
        }
        DecodingKey::from_jwk(jwk)
            .map(Some)
            .map_err(|e| invalid(format!("the token's key cannot be used: {e}")))
    }
}

fn bearer_token(authorization: Option<&str>) -> Result<&str, AuthError> {
    let value = authorization.ok_or(AuthError::MissingCredentials)?;
    let (scheme, token) = value
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MissingCredentials)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::MissingCredentials);
    }
    Ok(token.trim())
}

fn invalid(why: String) -> AuthError {
    AuthError::InvalidToken(why)
}

fn unknown_key(kid: Option<&str>) -> String {
    format!(
        "the token's key {} is not in the JWKS",
        kid.map_or("(no kid)".to_string(), |k| format!("'{k}'"))
    )
}

fn describe(kind: &jsonwebtoken::errors::ErrorKind) -> String {
    use jsonwebtoken::errors::ErrorKind as K;
    match kind {
        K::ExpiredSignature => "the token has expired".into(),
        K::ImmatureSignature => "the token is not valid yet (nbf)".into(),
        K::InvalidAudience => "the token is for another audience (aud)".into(),
        K::InvalidIssuer => "the token comes from another issuer (iss)".into(),
        K::InvalidSignature => "the token's signature does not verify".into(),
        K::MissingRequiredClaim(claim) => format!("the token has no '{claim}' claim"),
        K::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        other => format!("the token is not valid: {other:?}"),
    }
}

async fn load_jwks(settings: &JwtSettings) -> Result<JwkSet, JwksError> {
    let (text, source_name) = if !settings.jwks_file.is_empty() {
        let text = tokio::fs::read_to_string(&settings.jwks_file)
            .await
            .map_err(|e| JwksError::File {
                path: settings.jwks_file.clone(),
                reason: e.to_string(),
            })?;
        (text, settings.jwks_file.clone())
    } else {
        (fetch(&settings.jwks_url).await?, settings.jwks_url.clone())
    };
    serde_json::from_str(&text).map_err(|e| JwksError::Parse {
        source_name,
        reason: e.to_string(),
    })
}

async fn fetch(url: &str) -> Result<String, JwksError> {
    use http_body_util::{BodyExt, Empty};
    let failed = |reason: String| JwksError::Fetch {
        url: url.to_string(),
        reason,
    };
    let uri: http::Uri = url.parse().map_err(|e| failed(format!("{e}")))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<bytes::Bytes>>();
    let response = tokio::time::timeout(Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| failed("no answer within 10 s".into()))?
        .map_err(|e| failed(e.to_string()))?;
    if !response.status().is_success() {
        return Err(failed(format!("status {}", response.status())));
    }
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| failed(e.to_string()))?
        .to_bytes();
    String::from_utf8(body.to_vec()).map_err(|e| failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_are_read_from_the_header() {
        assert_eq!(bearer_token(Some("Bearer abc")).unwrap(), "abc");
        assert_eq!(bearer_token(Some("bearer  abc ")).unwrap(), "abc");
        for missing in [
            None,
            Some("Basic dXNlcg=="),
            Some("Bearer "),
            Some("Bearer"),
        ] {
            assert!(matches!(
                bearer_token(missing),
                Err(AuthError::MissingCredentials)
            ));
        }
    }
}
