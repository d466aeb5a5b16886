//! FHIR R4 routes of the stand-in: create, read, vread, update, JSON Patch,
//! delete, type search and `metadata`. Updates and patches are
//! read-modify-write of the WHOLE stored document, guarded by a
//! compare-and-swap on `meta.versionId`: the legacy cost model the proxy
//! exists to beat.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, StatusCode};
use mongodb::bson::{Bson, DateTime, Document};
use serde_json::{json, Value};

use crate::documents::{
    history_entry, http_date, keep_internal_fields, stored_last_updated, stored_version,
    to_document, to_fhir,
};
use crate::outcome::{outcome, IssueCode};
use crate::responses::{empty, fhir_json, with_header, Response};
use crate::search;
use crate::storage::{Storage, StoreError};

/// How often an update without `If-Match` re-reads and retries after losing a
/// race to a concurrent writer before giving up with 409.
const MAX_WRITE_ATTEMPTS: u64 = 50;

const JSON_PATCH: &str = "application/json-patch+json";

/// A FHIR route below the base path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route<'a> {
    Metadata,
    Type(&'a str),
    Instance(&'a str, &'a str),
    Version(&'a str, &'a str, &'a str),
}

/// `rest` is the path after the base, e.g. `/Group/g1/_history/2`.
fn route(rest: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        ["metadata"] => Some(Route::Metadata),
        [t] if is_resource_type(t) => Some(Route::Type(t)),
        [t, id] if is_resource_type(t) && !id.starts_with(['_', '$']) => {
            Some(Route::Instance(t, id))
        }
        [t, id, "_history", v] if is_resource_type(t) => Some(Route::Version(t, id, v)),
        _ => None,
    }
}

fn is_resource_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphabetic())
}

/// Per-request context of the resource routes.
struct Ctx<'a> {
    storage: &'a Storage,
    base: &'a str,
    resource_type: &'a str,
    /// `request.id` of the history entries this request writes.
    request_id: String,
    headers: HeaderMap,
}

impl Ctx<'_> {
    fn url(&self, id: &str) -> String {
        format!("{}/{}/{id}", self.base, self.resource_type)
    }

    fn version_url(&self, id: &str, version: u64) -> String {
        format!("{}/_history/{version}", self.url(id))
    }

    fn if_match(&self) -> Option<IfMatch> {
        self.headers
            .get(header::IF_MATCH)
            .map(|value| IfMatch::parse(value.to_str().unwrap_or_default()))
    }
}

pub async fn handle(
    storage: &Storage,
    base: &str,
    request: hyper::Request<Incoming>,
    rest: &str,
) -> Response {
    let Some(route) = route(rest) else {
        return outcome(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            format!("the stand-in has no FHIR route {base}{rest}"),
        );
    };
    let (parts, body) = request.into_parts();
    let method = parts.method;
    let resource_type = match route {
        Route::Metadata if method == Method::GET => {
            return fhir_json(StatusCode::OK, &capability_statement())
        }
        Route::Metadata => return method_not_allowed(&method, rest, "GET"),
        Route::Type(t) | Route::Instance(t, _) | Route::Version(t, _, _) => t,
    };
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let ctx = Ctx {
        storage,
        base,
        resource_type,
        request_id,
        headers: parts.headers,
    };
    if method == Method::PATCH && !is_json_patch(&ctx.headers) {
        let content_type = ctx
            .headers
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        let response = outcome(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IssueCode::NotSupported,
            format!("PATCH needs Content-Type {JSON_PATCH}, not {content_type:?}"),
        );
        return with_header(
            response,
            HeaderName::from_static("accept-patch"),
            JSON_PATCH,
        );
    }
    let body = if matches!(method, Method::POST | Method::PUT | Method::PATCH) {
        match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => {
                return outcome(
                    StatusCode::BAD_REQUEST,
                    IssueCode::Invalid,
                    format!("request body could not be read: {e}"),
                )
            }
        }
    } else {
        Bytes::new()
    };
    let query = parts.uri.query().unwrap_or_default();
    let result = match (route, &method) {
        (Route::Type(_), &Method::GET) => search(&ctx, query).await,
        (Route::Type(_), &Method::POST) => create(&ctx, &body).await,
        (Route::Type(_), _) => Ok(method_not_allowed(&method, rest, "GET, POST")),
        (Route::Instance(_, id), &Method::GET) => read(&ctx, id).await,
        (Route::Instance(_, id), &Method::PUT) => update(&ctx, id, &body).await,
        (Route::Instance(_, id), &Method::PATCH) => patch(&ctx, id, &body).await,
        (Route::Instance(_, id), &Method::DELETE) => delete(&ctx, id).await,
        (Route::Instance(..), _) => {
            Ok(method_not_allowed(&method, rest, "GET, PUT, PATCH, DELETE"))
        }
        (Route::Version(_, id, version), &Method::GET) => vread(&ctx, id, version).await,
        (Route::Version(..), _) => Ok(method_not_allowed(&method, rest, "GET")),
        (Route::Metadata, _) => Ok(method_not_allowed(&method, rest, "GET")),
    };
    result.unwrap_or_else(|e| store_error(&e))
}

fn store_error(error: &StoreError) -> Response {
    match error {
        StoreError::AlreadyExists { .. } => {
            outcome(StatusCode::CONFLICT, IssueCode::Conflict, error.to_string())
        }
        StoreError::Mongo(_) => {
            tracing::error!(error = %error, "stand-in storage failed");
            outcome(
                StatusCode::INTERNAL_SERVER_ERROR,
                IssueCode::Exception,
                error.to_string(),
            )
        }
    }
}

fn method_not_allowed(method: &Method, rest: &str, allowed: &'static str) -> Response {
    let response = outcome(
        StatusCode::METHOD_NOT_ALLOWED,
        IssueCode::NotSupported,
        format!("{method} is not supported on {rest}; allowed: {allowed}"),
    );
    with_header(response, header::ALLOW, allowed)
}

fn is_json_patch(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|media_type| media_type.trim().eq_ignore_ascii_case(JSON_PATCH))
}

/// An `If-Match` precondition on `meta.versionId`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum IfMatch {
    /// `*`: any current version.
    Any,
    /// `W/"3"`, `"3"` or `3` (a list of them allows any).
    Versions(Vec<String>),
}

impl IfMatch {
    fn parse(value: &str) -> IfMatch {
        if value.trim() == "*" {
            return IfMatch::Any;
        }
        IfMatch::Versions(
            value
                .split(',')
                .map(|tag| {
                    let tag = tag.trim();
                    let tag = tag.strip_prefix("W/").unwrap_or(tag);
                    tag.trim_matches('"').to_string()
                })
                .filter(|tag| !tag.is_empty())
                .collect(),
        )
    }

    fn allows(&self, current: &str) -> bool {
        match self {
            IfMatch::Any => true,
            IfMatch::Versions(versions) => versions.iter().any(|v| v == current),
        }
    }
}

fn precondition_failed(diagnostics: impl AsRef<str>) -> Response {
    outcome(
        StatusCode::PRECONDITION_FAILED,
        IssueCode::Conflict,
        diagnostics,
    )
}

fn bad_request(diagnostics: impl AsRef<str>) -> Response {
    outcome(StatusCode::BAD_REQUEST, IssueCode::Invalid, diagnostics)
}

/// The resource of a stored document (current or from history) as a response
/// with its version headers; writes also say where the version lives.
fn resource_response(
    ctx: &Ctx<'_>,
    status: StatusCode,
    document: &Document,
    is_write: bool,
) -> Response {
    let resource = to_fhir(document);
    let version = stored_version(document).unwrap_or(0);
    let mut response = fhir_json(status, &resource);
    response = with_header(response, header::ETAG, &format!("W/\"{version}\""));
    if let Some(last_updated) = stored_last_updated(document) {
        response = with_header(response, header::LAST_MODIFIED, &http_date(last_updated));
    }
    if is_write {
        let id = resource["id"].as_str().unwrap_or_default();
        let location = ctx.version_url(id, version);
        response = with_header(response, header::LOCATION, &location);
        response = with_header(response, header::CONTENT_LOCATION, &location);
    }
    response
}

/// The resource in a POST/PUT body, or the diagnostics of a 400.
fn parse_resource(resource_type: &str, body: &[u8]) -> Result<Value, String> {
    let resource: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    if !resource.is_object() {
        return Err("the body must be a JSON object (a FHIR resource)".to_string());
    }
    if resource["resourceType"] != resource_type {
        return Err(format!(
            "resourceType must be {resource_type}, not {}",
            resource["resourceType"]
        ));
    }
    Ok(resource)
}

async fn write_history(ctx: &Ctx<'_>, document: &Document, method: &str, status: &str) {
    let id = document.get_str("id").unwrap_or_default();
    let entry = history_entry(document, &ctx.request_id, method, &ctx.url(id), status);
    // The resource itself is already written; failing the request now would
    // invite a retry of a write that happened.
    if let Err(e) = ctx.storage.insert_history(ctx.resource_type, &entry).await {
        tracing::error!(error = %e, id, method, "stand-in could not write a history entry");
    }
}

async fn missing_or_gone(ctx: &Ctx<'_>, id: &str) -> Result<Response, StoreError> {
    let what = format!("{}/{id}", ctx.resource_type);
    Ok(
        match ctx
            .storage
            .last_deleted_version(ctx.resource_type, id)
            .await?
        {
            Some(_) => outcome(
                StatusCode::GONE,
                IssueCode::NotFound,
                format!("{what} was deleted"),
            ),
            None => outcome(
                StatusCode::NOT_FOUND,
                IssueCode::NotFound,
                format!("{what} is not known"),
            ),
        },
    )
}

async fn create(ctx: &Ctx<'_>, body: &[u8]) -> Result<Response, StoreError> {
    let resource = match parse_resource(ctx.resource_type, body) {
        Ok(resource) => resource,
        Err(why) => return Ok(bad_request(why)),
    };
    let id = match resource.get("id") {
        None => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id)) if !id.is_empty() && !id.contains('/') => id.clone(),
        Some(other) => return Ok(bad_request(format!("id {other} is not a FHIR id"))),
    };
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, &id).await;
    insert_new(ctx, resource, &id, "POST").await
}

/// Stores a resource that does not exist yet. A resource created again after
/// a DELETE continues its version numbering, so vread stays unambiguous.
async fn insert_new(
    ctx: &Ctx<'_>,
    mut resource: Value,
    id: &str,
    method: &str,
) -> Result<Response, StoreError> {
    ctx.storage.ensure_indexes(ctx.resource_type).await?;
    let version = ctx
        .storage
        .last_deleted_version(ctx.resource_type, id)
        .await?
        .map_or(1, |deleted| deleted + 1);
    resource["id"] = json!(id);
    let document = to_document(&resource, version, DateTime::now());
    ctx.storage.insert(ctx.resource_type, &document).await?;
    write_history(ctx, &document, method, "201").await;
    Ok(resource_response(ctx, StatusCode::CREATED, &document, true))
}

async fn read(ctx: &Ctx<'_>, id: &str) -> Result<Response, StoreError> {
    match ctx.storage.find(ctx.resource_type, id).await? {
        Some(document) => Ok(resource_response(ctx, StatusCode::OK, &document, false)),
        None => missing_or_gone(ctx, id).await,
    }
}

async fn vread(ctx: &Ctx<'_>, id: &str, version: &str) -> Result<Response, StoreError> {
    let entry = ctx
        .storage
        .history_entry(ctx.resource_type, id, version)
        .await?;
    let what = format!("{}/{id}", ctx.resource_type);
    let Some(entry) = entry else {
        return Ok(outcome(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            format!("{what} has no version {version}"),
        ));
    };
    let deleted = entry
        .get_document("request")
        .and_then(|request| request.get_str("method"))
        .is_ok_and(|method| method == "DELETE");
    match entry.get_document("resource") {
        Ok(_) if deleted => Ok(outcome(
            StatusCode::GONE,
            IssueCode::NotFound,
            format!("version {version} of {what} is its deletion"),
        )),
        Ok(resource) => Ok(resource_response(ctx, StatusCode::OK, resource, false)),
        Err(_) => Ok(outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            format!("the history entry of version {version} of {what} has no resource"),
        )),
    }
}

/// Outcome of one compare-and-swap attempt.
enum Attempt {
    Done(Response),
    /// Another writer changed the resource between our read and write.
    Raced,
}

/// Writes `resource` over `stored` as the next version if nobody wrote in
/// between. `_` fields others put on the stored document are kept.
async fn replace(
    ctx: &Ctx<'_>,
    stored: &Document,
    resource: &Value,
    method: &str,
) -> Result<Attempt, StoreError> {
    let id = resource["id"].as_str().unwrap_or_default();
    // The raw stored value, so even a malformed versionId can be swapped.
    let expected = stored
        .get_document("meta")
        .ok()
        .and_then(|meta| meta.get("versionId").cloned())
        .unwrap_or(Bson::Null);
    let next = stored_version(stored).unwrap_or(0) + 1;
    let mut document = to_document(resource, next, DateTime::now());
    keep_internal_fields(&mut document, stored);
    if !ctx
        .storage
        .replace_if_version(ctx.resource_type, id, expected, &document)
        .await?
    {
        return Ok(Attempt::Raced);
    }
    write_history(ctx, &document, method, "200").await;
    Ok(Attempt::Done(resource_response(
        ctx,
        StatusCode::OK,
        &document,
        true,
    )))
}

/// The precondition failure, if `If-Match` does not allow the stored version.
fn check_if_match(ctx: &Ctx<'_>, stored: &Document) -> Option<Response> {
    let if_match = ctx.if_match()?;
    let current = stored_version(stored).unwrap_or(0).to_string();
    (!if_match.allows(&current)).then(|| {
        precondition_failed(format!(
            "If-Match {if_match:?} does not match the current version {current} of {}/{}",
            ctx.resource_type,
            stored.get_str("id").unwrap_or_default()
        ))
    })
}

/// Whether to try again after losing a race: never under `If-Match` (the
/// version the client saw is gone), else after a short, growing pause.
async fn retry_after_race(ctx: &Ctx<'_>, attempt: u64, id: &str) -> Option<Response> {
    if ctx.if_match().is_some() {
        return Some(precondition_failed(format!(
            "{}/{id} changed while this request was writing it",
            ctx.resource_type
        )));
    }
    // Growing, jittered pauses so racing writers stop colliding in lockstep.
    let jitter = u64::from(uuid::Uuid::new_v4().as_bytes()[0] % 4);
    tokio::time::sleep(Duration::from_millis((attempt + 1).min(10) + jitter)).await;
    None
}

fn gave_up(ctx: &Ctx<'_>, id: &str) -> Response {
    outcome(
        StatusCode::CONFLICT,
        IssueCode::Conflict,
        format!(
            "{}/{id} kept changing under concurrent writers; gave up after {MAX_WRITE_ATTEMPTS} attempts",
            ctx.resource_type
        ),
    )
}

async fn update(ctx: &Ctx<'_>, id: &str, body: &[u8]) -> Result<Response, StoreError> {
    let resource = match parse_resource(ctx.resource_type, body) {
        Ok(resource) => resource,
        Err(why) => return Ok(bad_request(why)),
    };
    if resource.get("id").and_then(Value::as_str) != Some(id) {
        return Ok(bad_request(format!(
            "the body's id {} must equal the id {id:?} in the URL",
            resource.get("id").unwrap_or(&Value::Null)
        )));
    }
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, id).await;
    for attempt in 0..MAX_WRITE_ATTEMPTS {
        let Some(stored) = ctx.storage.find(ctx.resource_type, id).await? else {
            if ctx.if_match().is_some() {
                return Ok(precondition_failed(format!(
                    "If-Match given, but {}/{id} does not exist",
                    ctx.resource_type
                )));
            }
            match insert_new(ctx, resource.clone(), id, "PUT").await {
                // Created concurrently: update that instead.
                Err(StoreError::AlreadyExists { .. }) => continue,
                other => return other,
            }
        };
        if let Some(failed) = check_if_match(ctx, &stored) {
            return Ok(failed);
        }
        match replace(ctx, &stored, &resource, "PUT").await? {
            Attempt::Done(response) => return Ok(response),
            Attempt::Raced => {
                if let Some(failed) = retry_after_race(ctx, attempt, id).await {
                    return Ok(failed);
                }
            }
        }
    }
    Ok(gave_up(ctx, id))
}

/// Why a JSON Patch was refused.
#[derive(Debug, PartialEq, Eq)]
enum PatchRejection {
    /// An operation could not be applied (422).
    Failed(String),
    /// The patch would change `id` or `resourceType` (400).
    ChangesIdentity,
}

/// Applies `patch` to the FHIR JSON of the whole stored document.
fn apply_patch(
    stored: &Document,
    patch: &json_patch::Patch,
    resource_type: &str,
    id: &str,
) -> Result<Value, PatchRejection> {
    let mut resource = to_fhir(stored);
    if let Err(e) = json_patch::patch(&mut resource, patch) {
        let op = patch.0.get(e.operation).map_or("?", operation_name);
        return Err(PatchRejection::Failed(format!(
            "JSON Patch operation {} ({op}) failed at path '{}': {}",
            e.operation, e.path, e.kind
        )));
    }
    if resource["id"] != id || resource["resourceType"] != resource_type {
        return Err(PatchRejection::ChangesIdentity);
    }
    Ok(resource)
}

fn operation_name(operation: &json_patch::PatchOperation) -> &'static str {
    use json_patch::PatchOperation as Op;
    match operation {
        Op::Add(_) => "add",
        Op::Remove(_) => "remove",
        Op::Replace(_) => "replace",
        Op::Move(_) => "move",
        Op::Copy(_) => "copy",
        Op::Test(_) => "test",
    }
}

async fn patch(ctx: &Ctx<'_>, id: &str, body: &[u8]) -> Result<Response, StoreError> {
    let operations: json_patch::Patch = match serde_json::from_slice(body) {
        Ok(operations) => operations,
        Err(e) => {
            return Ok(bad_request(format!(
                "the body is not a JSON Patch (a JSON array of operations): {e}"
            )))
        }
    };
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, id).await;
    for attempt in 0..MAX_WRITE_ATTEMPTS {
        let Some(stored) = ctx.storage.find(ctx.resource_type, id).await? else {
            return missing_or_gone(ctx, id).await;
        };
        if let Some(failed) = check_if_match(ctx, &stored) {
            return Ok(failed);
        }
        let patched = match apply_patch(&stored, &operations, ctx.resource_type, id) {
            Ok(patched) => patched,
            Err(PatchRejection::Failed(why)) => {
                return Ok(outcome(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    IssueCode::Processing,
                    why,
                ))
            }
            Err(PatchRejection::ChangesIdentity) => {
                return Ok(bad_request(
                    "a PATCH must not change the resource's id or resourceType",
                ))
            }
        };
        match replace(ctx, &stored, &patched, "PATCH").await? {
            Attempt::Done(response) => return Ok(response),
            Attempt::Raced => {
                if let Some(failed) = retry_after_race(ctx, attempt, id).await {
                    return Ok(failed);
                }
            }
        }
    }
    Ok(gave_up(ctx, id))
}

async fn delete(ctx: &Ctx<'_>, id: &str) -> Result<Response, StoreError> {
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, id).await;
    let Some(stored) = ctx.storage.remove(ctx.resource_type, id).await? else {
        return missing_or_gone(ctx, id).await;
    };
    // History records the deletion as one more version of the resource.
    let mut deleted = stored.clone();
    let version = stored_version(&stored).unwrap_or(0) + 1;
    let mut meta = deleted.get_document("meta").cloned().unwrap_or_default();
    meta.insert("versionId", version.to_string());
    meta.insert("lastUpdated", DateTime::now());
    deleted.insert("meta", meta);
    write_history(ctx, &deleted, "DELETE", "204").await;
    let mut response = hyper::Response::new(empty());
    *response.status_mut() = StatusCode::NO_CONTENT;
    Ok(response)
}

async fn search(ctx: &Ctx<'_>, query: &str) -> Result<Response, StoreError> {
    let query = search::parse(ctx.resource_type, query);
    let page = ctx
        .storage
        .search(ctx.resource_type, query.filter, query.count)
        .await?;
    // fullUrl is absolute when the client said which host it talked to.
    let origin = ctx
        .headers
        .get(header::HOST)
        .and_then(|host| host.to_str().ok())
        .map(|host| format!("http://{host}"))
        .unwrap_or_default();
    let entries: Vec<Value> = page
        .documents
        .iter()
        .map(|document| {
            let resource = to_fhir(document);
            let id = resource["id"].as_str().unwrap_or_default().to_string();
            json!({
                "fullUrl": format!("{origin}{}", ctx.url(&id)),
                "resource": resource,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": page.total});
    // FHIR forbids empty arrays.
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

fn capability_statement() -> Value {
    let interactions: Vec<Value> = [
        "read",
        "vread",
        "update",
        "patch",
        "delete",
        "create",
        "search-type",
    ]
    .iter()
    .map(|code| json!({"code": code}))
    .collect();
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": chrono::Utc::now().format("%Y-%m-%d").to_string(),
        "kind": "instance",
        "description": "STAND-IN for a legacy MongoDB-backed FHIR server, for fhir-group-proxy's tests, demo and benchmarks only",
        "software": {"name": "standin-legacy-fhir"},
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "patchFormat": [JSON_PATCH],
        "rest": [{"mode": "server", "resource": [
            {"type": "Group", "interaction": interactions,
             "searchParam": [{"name": "member", "type": "reference"}]},
            {"type": "Patient", "interaction": interactions}
        ]}]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn routes_below_the_base() {
        assert_eq!(route("/metadata"), Some(Route::Metadata));
        assert_eq!(route("/Group"), Some(Route::Type("Group")));
        assert_eq!(route("/Group/g1"), Some(Route::Instance("Group", "g1")));
        assert_eq!(
            route("/Group/g1/_history/2"),
            Some(Route::Version("Group", "g1", "2"))
        );
        for unknown in [
            "",
            "/",
            "/group/g1",
            "/Group/_search",
            "/Group/$export",
            "/Group//x",
            "/Group/g1/_history",
            "/Group/g1/$everything",
        ] {
            assert_eq!(route(unknown), None, "{unknown}");
        }
    }

    #[test]
    fn if_match_accepts_weak_strong_and_bare_versions() {
        for value in ["W/\"3\"", "\"3\"", "3", " W/\"1\", W/\"3\" "] {
            assert!(IfMatch::parse(value).allows("3"), "{value}");
            assert!(!IfMatch::parse(value).allows("2"), "{value}");
        }
        assert!(IfMatch::parse("*").allows("9"));
        assert!(!IfMatch::parse("").allows("1"));
    }

    #[test]
    fn json_patch_content_type_ignores_parameters_and_case() {
        let mut headers = HeaderMap::new();
        assert!(!is_json_patch(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("Application/JSON-Patch+json; charset=utf-8"),
        );
        assert!(is_json_patch(&headers));
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/merge-patch+json"),
        );
        assert!(!is_json_patch(&headers));
    }

    fn stored_group() -> Document {
        to_document(
            &json!({"resourceType": "Group", "id": "g", "member": [{"entity": {"reference": "Patient/1"}}]}),
            1,
            DateTime::now(),
        )
    }

    fn patch_of(value: Value) -> json_patch::Patch {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn patch_applies_to_the_whole_resource() {
        let patch = patch_of(
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}]),
        );
        let patched = apply_patch(&stored_group(), &patch, "Group", "g").unwrap();
        assert_eq!(patched["member"][1]["entity"]["reference"], "Patient/2");
        assert_eq!(patched["member"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn failed_patch_names_operation_and_path() {
        let patch = patch_of(json!([
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/1"},
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/9"}
        ]));
        let Err(PatchRejection::Failed(why)) = apply_patch(&stored_group(), &patch, "Group", "g")
        else {
            panic!("patch should fail");
        };
        assert!(why.contains("operation 1 (test)"), "{why}");
        assert!(why.contains("/member/0/entity/reference"), "{why}");
    }

    #[test]
    fn patch_may_not_change_identity() {
        for op in [
            json!({"op": "replace", "path": "/id", "value": "other"}),
            json!({"op": "replace", "path": "/resourceType", "value": "Patient"}),
            json!({"op": "remove", "path": "/id"}),
        ] {
            let patch = patch_of(json!([op]));
            assert_eq!(
                apply_patch(&stored_group(), &patch, "Group", "g"),
                Err(PatchRejection::ChangesIdentity)
            );
        }
    }

    #[test]
    fn resources_must_match_the_route() {
        assert!(parse_resource("Group", br#"{"resourceType":"Group"}"#).is_ok());
        assert!(parse_resource("Group", br#"{"resourceType":"Patient"}"#).is_err());
        assert!(parse_resource("Group", br#"[1]"#).is_err());
        assert!(parse_resource("Group", b"{").is_err());
    }
}
