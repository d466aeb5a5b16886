//! FHIR R4 routes of the stand-in: create, read, vread, update, JSON Patch,
//! delete, type search, `$merge` and `metadata`. Updates, patches and merges
//! are read-modify-write of the WHOLE stored document, guarded by a
//! compare-and-swap on `meta.versionId`: the legacy cost model the proxy
//! exists to beat. How closely each route imitates the real legacy server
//! is set by [`Fidelity`].

use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName};
use hyper::{Method, StatusCode};
use mongodb::bson::{Bson, DateTime, Document};
use serde_json::{json, Value};

use crate::documents::{
    history_entry, http_date, js_date_string, keep_internal_fields, real_history_entry,
    render_instant, source_assigning_authority, stored_last_updated, stored_version, to_document,
    to_document_keeping, to_fhir, to_internal_json, OWNER_SYSTEM,
};
use crate::enrichment::{self, KEPT_INTERNAL_FIELDS, SOURCE_ASSIGNING_AUTHORITY_SYSTEM};
use crate::fidelity::Fidelity;
use crate::merge::{diff, smart_merge};
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
    /// `Type/id/_history`: every version, newest first.
    History(&'a str, &'a str),
    /// `[Type/]$merge`.
    Merge(Option<&'a str>),
}

/// `rest` is the path after the base, e.g. `/Group/g1/_history/2`.
fn route(rest: &str) -> Option<Route<'_>> {
    let segments: Vec<&str> = rest.trim_start_matches('/').split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return None;
    }
    match segments.as_slice() {
        ["metadata"] => Some(Route::Metadata),
        ["$merge"] => Some(Route::Merge(None)),
        [t, "$merge"] if is_resource_type(t) => Some(Route::Merge(Some(t))),
        [t] if is_resource_type(t) => Some(Route::Type(t)),
        [t, id] if is_resource_type(t) && !id.starts_with(['_', '$']) => {
            Some(Route::Instance(t, id))
        }
        [t, id, "_history", v] if is_resource_type(t) => Some(Route::Version(t, id, v)),
        [t, id, "_history"] if is_resource_type(t) => Some(Route::History(t, id)),
        _ => None,
    }
}

fn is_resource_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphabetic())
}

/// Per-request context of the resource routes.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    storage: &'a Storage,
    base: &'a str,
    fidelity: &'a Fidelity,
    resource_type: &'a str,
    /// `request.id` of the history entries this request writes.
    request_id: &'a str,
    headers: &'a HeaderMap,
}

/// What a resource response answers, which decides its headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Read,
    Created,
    Updated,
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

    fn if_match_text(&self) -> String {
        self.headers
            .get(header::IF_MATCH)
            .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
            .unwrap_or_default()
    }

    /// `http://<Host>` when the client said which host it talked to.
    fn origin(&self) -> String {
        self.headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .map(|host| format!("http://{host}"))
            .unwrap_or_default()
    }

    /// Whether stored documents are worked on with their `_` fields (the
    /// real server patches and merges its internal JSON).
    fn internal(&self) -> bool {
        self.fidelity.real_internal_fields || self.fidelity.reference_enrichment
    }

    /// The stored document as the JSON that patches and merges apply to.
    fn working_json(&self, document: &Document) -> Value {
        if self.internal() {
            to_internal_json(document)
        } else {
            to_fhir(document)
        }
    }

    /// The stored document as a response body.
    fn render(&self, document: &Document) -> Value {
        if self.fidelity.reference_enrichment {
            enrichment::present(&to_internal_json(document))
        } else {
            to_fhir(document)
        }
    }

    /// FHIR JSON to the document stored at `version`, with the server's
    /// bookkeeping of this profile.
    fn stored_form(&self, resource: &Value, version: u64) -> Document {
        let mut resource = resource.clone();
        let now = DateTime::now();
        if self.fidelity.real_internal_fields {
            let authority = enrichment::presave_resource(&mut resource);
            if self.fidelity.reference_enrichment {
                enrichment::presave_references(&mut resource, &authority);
            }
            to_document_keeping(&resource, &KEPT_INTERNAL_FIELDS, version, now)
        } else {
            if self.fidelity.reference_enrichment {
                let authority = source_assigning_authority(&resource);
                enrichment::presave_references(&mut resource, &authority);
            }
            to_document(&resource, version, now)
        }
    }
}

pub async fn handle(
    storage: &Storage,
    base: &str,
    fidelity: &Fidelity,
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
        Route::Merge(_) if method != Method::POST => {
            return method_not_allowed(&method, rest, "POST")
        }
        Route::Merge(t) => t.unwrap_or_default(),
        Route::Type(t) | Route::Instance(t, _) | Route::Version(t, _, _) | Route::History(t, _) => {
            t
        }
    };
    let request_id = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let headers = parts.headers;
    let ctx = Ctx {
        storage,
        base,
        fidelity,
        resource_type,
        request_id: &request_id,
        headers: &headers,
    };
    if method == Method::PATCH && !is_json_patch(ctx.headers) {
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
    // The real server's `id|owner` address: that owner's resource with the
    // id, then handled as its plain id.
    let qualified = match route {
        Route::Instance(_, id) | Route::Version(_, id, _) | Route::History(_, id) => {
            match id.split_once('|') {
                Some((plain, owner)) => match storage.find_owned(resource_type, plain, owner).await
                {
                    Ok(found) => found.map(|_| plain.to_string()),
                    Err(e) => return store_error(&e),
                },
                None => None,
            }
        }
        _ => None,
    };
    let route = match (route, qualified.as_deref()) {
        (Route::Instance(t, _), Some(id)) => Route::Instance(t, id),
        (Route::Version(t, _, v), Some(id)) => Route::Version(t, id, v),
        (Route::History(t, _), Some(id)) => Route::History(t, id),
        (route, _) => route,
    };
    let result = match (route, &method) {
        (Route::Merge(_), _) => merge_operation(&ctx, &body).await,
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
        (Route::History(_, id), &Method::GET) => instance_history(&ctx, id).await,
        (Route::History(..), _) => Ok(method_not_allowed(&method, rest, "GET")),
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
/// with its version headers.
fn resource_response(
    ctx: &Ctx<'_>,
    status: StatusCode,
    document: &Document,
    answer: Answer,
) -> Response {
    let resource = ctx.render(document);
    let version = stored_version(document).unwrap_or(0);
    let id = resource["id"].as_str().unwrap_or_default();
    let mut response = fhir_json(status, &resource);
    response = with_header(response, header::ETAG, &format!("W/\"{version}\""));
    if !ctx.fidelity.real_headers {
        if let Some(last_updated) = stored_last_updated(document) {
            response = with_header(response, header::LAST_MODIFIED, &http_date(last_updated));
        }
        if answer != Answer::Read {
            let location = ctx.version_url(id, version);
            response = with_header(response, header::LOCATION, &location);
            response = with_header(response, header::CONTENT_LOCATION, &location);
        }
        return response;
    }
    // The real server: a read's Last-Modified is the JS rendering of
    // lastUpdated; an update's is "now" as an ISO instant; a create has
    // none. Location is relative without a leading slash or _history.
    match answer {
        Answer::Read => {
            if let Some(last_updated) = stored_last_updated(document) {
                response = with_header(
                    response,
                    header::LAST_MODIFIED,
                    &js_date_string(last_updated),
                );
            }
            return response;
        }
        Answer::Updated => {
            response = with_header(
                response,
                header::LAST_MODIFIED,
                &render_instant(DateTime::now()),
            );
        }
        Answer::Created => {}
    }
    let relative = ctx.url(id);
    let relative = relative.trim_start_matches('/');
    response = with_header(
        response,
        header::CONTENT_LOCATION,
        &format!("{}/{relative}/_history/{version}", ctx.origin()),
    );
    with_header(response, header::LOCATION, relative)
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

/// FHIR grp-1, worded as the real server does.
fn group_invariant_violation(resource: &Value) -> Option<String> {
    let has_members = resource["member"]
        .as_array()
        .is_some_and(|members| !members.is_empty());
    let actual = resource["actual"].as_bool().unwrap_or(false);
    (resource["resourceType"] == "Group" && has_members && !actual).then(|| {
        "FHIR invariant grp-1 violated: Can only have members if actual = true. \
         A Group with actual=false is a definition, not an actual list of entities."
            .to_string()
    })
}

/// The checks the profile makes on a resource about to be written; `Err`
/// holds the 400's diagnostics.
fn check_write(ctx: &Ctx<'_>, resource: &Value) -> Result<(), String> {
    if ctx.fidelity.require_meta {
        enrichment::check_meta(resource)?;
    }
    if ctx.fidelity.group_invariant {
        if let Some(why) = group_invariant_violation(resource) {
            return Err(why);
        }
    }
    Ok(())
}

/// Removes what a client may not set, as this profile's server does.
fn strip_client_fields(ctx: &Ctx<'_>, resource: &mut Value) {
    if ctx.internal() {
        enrichment::strip_client_internal(resource);
    }
}

/// What the real server's merger will not let a PUT or `$merge` change: the
/// id, `meta.source`, and the owner and sourceAssigningAuthority tags.
fn keep_non_writable_fields(incoming: &mut Value, stored: &Value) {
    if !incoming["meta"].is_object() {
        incoming["meta"] = json!({});
    }
    incoming["id"] = stored["id"].clone();
    match stored.pointer("/meta/source") {
        Some(source) => incoming["meta"]["source"] = source.clone(),
        None => {
            if let Some(meta) = incoming["meta"].as_object_mut() {
                meta.remove("source");
            }
        }
    }
    for system in [SOURCE_ASSIGNING_AUTHORITY_SYSTEM, OWNER_SYSTEM] {
        let Some(current) = stored
            .pointer("/meta/security")
            .and_then(Value::as_array)
            .and_then(|tags| tags.iter().find(|t| t["system"] == system))
            .cloned()
        else {
            continue;
        };
        let tags = incoming["meta"]
            .as_object_mut()
            .map(|meta| meta.entry("security").or_insert_with(|| json!([])));
        let Some(Value::Array(tags)) = tags else {
            continue;
        };
        match tags.iter().position(|t| t["system"] == system) {
            Some(first) => {
                tags[first] = current;
                let mut index = 0;
                tags.retain(|t| {
                    let keep = index <= first || t["system"] != system;
                    index += 1;
                    keep
                });
            }
            None => tags.push(current),
        }
    }
    if let Some(Value::Array(tags)) = incoming.pointer_mut("/meta/security") {
        let mut seen = std::collections::HashSet::new();
        tags.retain(|t| seen.insert(format!("{}|{}", t["system"], t["code"])));
    }
}

/// The stored document as compared to tell whether a write changes
/// anything: FHIR JSON without the version fields the write sets.
fn comparable(document: &Document) -> Value {
    let mut value = to_fhir(document);
    if let Some(meta) = value.get_mut("meta").and_then(Value::as_object_mut) {
        meta.remove("versionId");
        meta.remove("lastUpdated");
    }
    value
}

/// The patch operations a write applied, as the real server records them.
fn applied_patches(old: &Document, new: &Document) -> Vec<Value> {
    diff(&comparable(old), &comparable(new))
        .into_iter()
        .filter(|p| p["path"] != "/id" && p["path"] != "/_id")
        .collect()
}

/// How long after its write a version's history entry appears, with
/// `Fidelity::history_after_answer`: long enough that a client (or proxy)
/// acting on the answer at once finds no entry yet.
const HISTORY_DELAY: std::time::Duration = std::time::Duration::from_millis(30);

async fn write_history(
    ctx: &Ctx<'_>,
    document: &Document,
    method: &str,
    status: &str,
    patches: Option<&[Value]>,
) {
    let id = document.get_str("id").unwrap_or_default();
    let entry = if ctx.fidelity.real_history {
        real_history_entry(document, ctx.request_id, method, &ctx.url(id), patches)
    } else {
        history_entry(document, ctx.request_id, method, &ctx.url(id), status)
    };
    if ctx.fidelity.history_after_answer {
        // As the real server's post-request processor: after the answer.
        ctx.storage
            .insert_history_later(ctx.resource_type, entry, HISTORY_DELAY);
        return;
    }
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
    let mut resource = match parse_resource(ctx.resource_type, body) {
        Ok(resource) => resource,
        Err(why) => return Ok(bad_request(why)),
    };
    let id = if ctx.fidelity.post_assigns_id {
        uuid::Uuid::new_v4().to_string()
    } else {
        match resource.get("id") {
            None => uuid::Uuid::new_v4().to_string(),
            Some(Value::String(id)) if !id.is_empty() && !id.contains('/') => id.clone(),
            Some(other) => return Ok(bad_request(format!("id {other} is not a FHIR id"))),
        }
    };
    resource["id"] = json!(id);
    strip_client_fields(ctx, &mut resource);
    if let Err(why) = check_write(ctx, &resource) {
        return Ok(bad_request(why));
    }
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, &id).await;
    let document = insert_new(ctx, resource, &id, "POST").await?;
    Ok(resource_response(
        ctx,
        StatusCode::CREATED,
        &document,
        Answer::Created,
    ))
}

/// Stores a resource that does not exist yet and returns what was stored. A
/// resource created again after a DELETE continues its version numbering,
/// so vread stays unambiguous.
async fn insert_new(
    ctx: &Ctx<'_>,
    mut resource: Value,
    id: &str,
    method: &str,
) -> Result<Document, StoreError> {
    ctx.storage.ensure_indexes(ctx.resource_type).await?;
    let version = ctx
        .storage
        .last_deleted_version(ctx.resource_type, id)
        .await?
        .map_or(1, |deleted| deleted + 1);
    resource["id"] = json!(id);
    let document = ctx.stored_form(&resource, version);
    ctx.storage.insert(ctx.resource_type, &document).await?;
    write_history(ctx, &document, method, "201", None).await;
    Ok(document)
}

async fn read(ctx: &Ctx<'_>, id: &str) -> Result<Response, StoreError> {
    match ctx.storage.find(ctx.resource_type, id).await? {
        Some(document) => Ok(resource_response(
            ctx,
            StatusCode::OK,
            &document,
            Answer::Read,
        )),
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
        Ok(resource) => Ok(resource_response(
            ctx,
            StatusCode::OK,
            resource,
            Answer::Read,
        )),
        Err(_) => Ok(outcome(
            StatusCode::INTERNAL_SERVER_ERROR,
            IssueCode::Exception,
            format!("the history entry of version {version} of {what} has no resource"),
        )),
    }
}

/// `GET Type/id/_history`: a `history` Bundle of every stored version, newest
/// first, with its real `total` (the real server counts history), each entry
/// the resource as `_history/{vid}` renders it.
async fn instance_history(ctx: &Ctx<'_>, id: &str) -> Result<Response, StoreError> {
    let entries = ctx.storage.history_entries(ctx.resource_type, id).await?;
    if entries.is_empty() {
        return Ok(outcome(
            StatusCode::NOT_FOUND,
            IssueCode::NotFound,
            format!("{}/{id} is not known", ctx.resource_type),
        ));
    }
    let rendered: Vec<Value> = entries
        .iter()
        .filter_map(|entry| {
            let resource = entry.get_document("resource").ok()?;
            let version = stored_version(resource).unwrap_or(0);
            let method = entry
                .get_document("request")
                .and_then(|r| r.get_str("method"))
                .unwrap_or("PUT");
            Some(json!({
                "fullUrl": ctx.url(id),
                "resource": ctx.render(resource),
                "request": {"method": method, "url": format!("{}/{id}/_history/{version}", ctx.resource_type)},
            }))
        })
        .collect();
    let bundle = json!({
        "resourceType": "Bundle",
        "type": "history",
        "total": rendered.len(),
        "entry": rendered,
    });
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// Outcome of one compare-and-swap attempt.
enum Attempt {
    /// Written as this document.
    Written(Document),
    /// The write would change nothing, so no version was made.
    Unchanged,
    /// Another writer changed the resource between our read and write.
    Raced,
}

/// How [`replace`] writes.
struct Rewrite<'p> {
    method: &'static str,
    /// Keep `_` fields other tools put on the stored document (the simple
    /// profile's PUT and PATCH; never `$merge`, never the real profile).
    keep_markers: bool,
    /// Make no version when nothing changes.
    skip_unchanged: bool,
    /// The operations to record in a real history entry; else the diff.
    patches: Option<&'p [Value]>,
}

/// Writes `resource` over `stored` as the next version if nobody wrote in
/// between.
async fn replace(
    ctx: &Ctx<'_>,
    stored: &Document,
    resource: &Value,
    rewrite: &Rewrite<'_>,
) -> Result<Attempt, StoreError> {
    let id = resource["id"].as_str().unwrap_or_default();
    // The raw stored value, so even a malformed versionId can be swapped.
    let expected = stored
        .get_document("meta")
        .ok()
        .and_then(|meta| meta.get("versionId").cloned())
        .unwrap_or(Bson::Null);
    let next = stored_version(stored).unwrap_or(0) + 1;
    let mut document = ctx.stored_form(resource, next);
    if rewrite.keep_markers {
        keep_internal_fields(&mut document, stored);
    }
    // Diffing a large Group costs; only done when something needs it.
    let needs_changes =
        rewrite.skip_unchanged || (ctx.fidelity.real_history && rewrite.patches.is_none());
    let changes = if needs_changes {
        applied_patches(stored, &document)
    } else {
        Vec::new()
    };
    if rewrite.skip_unchanged && changes.is_empty() {
        return Ok(Attempt::Unchanged);
    }
    if !ctx
        .storage
        .replace_if_version(ctx.resource_type, id, expected, &document)
        .await?
    {
        return Ok(Attempt::Raced);
    }
    let patches = rewrite.patches.unwrap_or(&changes);
    write_history(ctx, &document, rewrite.method, "200", Some(patches)).await;
    Ok(Attempt::Written(document))
}

/// The precondition failure, if `If-Match` does not allow the stored version.
fn check_if_match(ctx: &Ctx<'_>, stored: &Document) -> Option<Response> {
    let if_match = ctx.if_match()?;
    let current = stored_version(stored).unwrap_or(0).to_string();
    (!if_match.allows(&current)).then(|| {
        if ctx.fidelity.patch_ignores_if_match {
            precondition_failed(format!(
                "Version conflict: If-Match does not match current resource version. \
                 Older version: {current}, If-Match: {}",
                ctx.if_match_text()
            ))
        } else {
            precondition_failed(format!(
                "If-Match {if_match:?} does not match the current version {current} of {}/{}",
                ctx.resource_type,
                stored.get_str("id").unwrap_or_default()
            ))
        }
    })
}

/// Whether to try again after losing a race: never under `If-Match` (the
/// version the client saw is gone), else after a short, growing pause.
async fn retry_after_race(
    ctx: &Ctx<'_>,
    attempt: u64,
    id: &str,
    honours_if_match: bool,
) -> Option<Response> {
    if honours_if_match && ctx.if_match().is_some() {
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
    let mut resource = match parse_resource(ctx.resource_type, body) {
        Ok(resource) => resource,
        Err(why) => return Ok(bad_request(why)),
    };
    if resource.get("id").and_then(Value::as_str) != Some(id) {
        return Ok(bad_request(format!(
            "the body's id {} must equal the id {id:?} in the URL",
            resource.get("id").unwrap_or(&Value::Null)
        )));
    }
    strip_client_fields(ctx, &mut resource);
    let rewrite = Rewrite {
        method: "PUT",
        keep_markers: !ctx.fidelity.real_internal_fields,
        skip_unchanged: ctx.fidelity.real_patch,
        patches: None,
    };
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, id).await;
    for attempt in 0..MAX_WRITE_ATTEMPTS {
        let Some(stored) = ctx.storage.find(ctx.resource_type, id).await? else {
            if ctx.if_match().is_some() {
                return Ok(precondition_failed(
                    if ctx.fidelity.patch_ignores_if_match {
                        format!(
                        "Version conflict: Resource does not exist, but If-Match header was provided. If-Match: {}",
                        ctx.if_match_text()
                    )
                    } else {
                        format!(
                            "If-Match given, but {}/{id} does not exist",
                            ctx.resource_type
                        )
                    },
                ));
            }
            if let Err(why) = check_write(ctx, &resource) {
                return Ok(bad_request(why));
            }
            match insert_new(ctx, resource.clone(), id, "PUT").await {
                // Created concurrently: update that instead.
                Err(StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
                Ok(document) => {
                    return Ok(resource_response(
                        ctx,
                        StatusCode::CREATED,
                        &document,
                        Answer::Updated,
                    ))
                }
            }
        };
        if let Some(failed) = check_if_match(ctx, &stored) {
            return Ok(failed);
        }
        let mut incoming = resource.clone();
        if ctx.fidelity.keep_non_writable_fields {
            keep_non_writable_fields(&mut incoming, &ctx.working_json(&stored));
        }
        if let Err(why) = check_write(ctx, &incoming) {
            return Ok(bad_request(why));
        }
        match replace(ctx, &stored, &incoming, &rewrite).await? {
            Attempt::Written(document) => {
                return Ok(resource_response(
                    ctx,
                    StatusCode::OK,
                    &document,
                    Answer::Updated,
                ))
            }
            Attempt::Unchanged => {
                return Ok(resource_response(
                    ctx,
                    StatusCode::OK,
                    &stored,
                    Answer::Updated,
                ))
            }
            Attempt::Raced => {
                if let Some(failed) = retry_after_race(ctx, attempt, id, true).await {
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
    /// An operation could not be applied: its index, name and reason, and
    /// the fast-json-patch error name the real server reports.
    Failed { why: String, name: &'static str },
    /// The patch would change `id` or `resourceType` (400).
    ChangesIdentity,
}

/// Applies `patch` to `resource` (the JSON of the whole stored document).
fn apply_patch(
    mut resource: Value,
    patch: &json_patch::Patch,
    resource_type: &str,
    id: &str,
) -> Result<Value, PatchRejection> {
    if let Err(e) = json_patch::patch(&mut resource, patch) {
        let op = patch.0.get(e.operation).map_or("?", operation_name);
        let name = match e.kind {
            json_patch::PatchErrorKind::TestFailed => "TEST_OPERATION_FAILED",
            json_patch::PatchErrorKind::InvalidFromPointer => "OPERATION_FROM_UNRESOLVABLE",
            json_patch::PatchErrorKind::InvalidPointer => "OPERATION_PATH_UNRESOLVABLE",
            _ => "OPERATION_PATH_ILLEGAL",
        };
        return Err(PatchRejection::Failed {
            why: format!(
                "JSON Patch operation {} ({op}) failed at path '{}': {}",
                e.operation, e.path, e.kind
            ),
            name,
        });
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

/// The real server refuses patches that name or carry a `_` field.
fn internal_field_in_patch(operations: &[Value]) -> Option<String> {
    fn in_path(path: &str) -> Option<&str> {
        path.split('/').find(|segment| segment.starts_with('_'))
    }
    fn in_value(value: &Value) -> Option<String> {
        match value {
            Value::Object(fields) => fields.iter().find_map(|(key, child)| {
                if key.starts_with('_') {
                    Some(key.clone())
                } else {
                    in_value(child)
                }
            }),
            Value::Array(items) => items.iter().find_map(in_value),
            _ => None,
        }
    }
    for operation in operations {
        if let Some(field) = operation["path"].as_str().and_then(in_path) {
            return Some(format!(
                "Patch operation targeting internal field '{field}' is not allowed. \
                 Internal fields prefixed with _ cannot be modified via PATCH."
            ));
        }
        if let Some(field) = operation["from"].as_str().and_then(in_path) {
            return Some(format!(
                "Patch operation referencing internal field '{field}' in 'from' is not allowed. \
                 Internal fields prefixed with _ cannot be accessed via PATCH."
            ));
        }
        if let Some(field) = operation.get("value").and_then(in_value) {
            return Some(format!(
                "Patch operation value contains internal field '{field}' which is not allowed. \
                 Internal fields prefixed with _ cannot be modified via PATCH."
            ));
        }
    }
    None
}

async fn patch(ctx: &Ctx<'_>, id: &str, body: &[u8]) -> Result<Response, StoreError> {
    let raw: Value = match serde_json::from_slice(body) {
        Ok(raw) => raw,
        Err(e) => return Ok(bad_request(format!("the body is not JSON: {e}"))),
    };
    let operations: json_patch::Patch = match serde_json::from_value(raw.clone()) {
        Ok(operations) => operations,
        Err(e) => {
            return Ok(bad_request(format!(
                "the body is not a JSON Patch (a JSON array of operations): {e}"
            )))
        }
    };
    let recorded: Vec<Value> = raw
        .as_array()
        .map(|ops| {
            ops.iter()
                .map(|op| {
                    let mut entry = json!({"op": op["op"], "path": op["path"]});
                    if let Some(value) = op.get("value") {
                        entry["value"] = value.clone();
                    }
                    entry
                })
                .collect()
        })
        .unwrap_or_default();
    if ctx.fidelity.real_patch {
        if let Some(why) = raw.as_array().and_then(|ops| internal_field_in_patch(ops)) {
            return Ok(bad_request(why));
        }
    }
    let rewrite = Rewrite {
        method: "PATCH",
        keep_markers: !ctx.fidelity.real_internal_fields,
        skip_unchanged: ctx.fidelity.real_patch,
        patches: Some(&recorded),
    };
    let honours_if_match = !ctx.fidelity.patch_ignores_if_match;
    let _write = ctx.storage.write_locks.lock(ctx.resource_type, id).await;
    for attempt in 0..MAX_WRITE_ATTEMPTS {
        let Some(stored) = ctx.storage.find(ctx.resource_type, id).await? else {
            return missing_or_gone(ctx, id).await;
        };
        if honours_if_match {
            if let Some(failed) = check_if_match(ctx, &stored) {
                return Ok(failed);
            }
        }
        let base = ctx.working_json(&stored);
        let patched = match apply_patch(base, &operations, ctx.resource_type, id) {
            Ok(patched) => patched,
            Err(PatchRejection::Failed { why, name }) => {
                return Ok(if ctx.fidelity.real_patch {
                    bad_request(format!("{name}: {why}"))
                } else {
                    outcome(StatusCode::UNPROCESSABLE_ENTITY, IssueCode::Processing, why)
                })
            }
            Err(PatchRejection::ChangesIdentity) => {
                return Ok(bad_request(
                    "a PATCH must not change the resource's id or resourceType",
                ))
            }
        };
        if ctx.fidelity.group_invariant {
            if let Some(why) = group_invariant_violation(&patched) {
                return Ok(bad_request(why));
            }
        }
        match replace(ctx, &stored, &patched, &rewrite).await? {
            Attempt::Written(document) => {
                return Ok(resource_response(
                    ctx,
                    StatusCode::OK,
                    &document,
                    Answer::Updated,
                ))
            }
            Attempt::Unchanged => {
                return Ok(resource_response(
                    ctx,
                    StatusCode::OK,
                    &stored,
                    Answer::Updated,
                ))
            }
            Attempt::Raced => {
                if let Some(failed) = retry_after_race(ctx, attempt, id, honours_if_match).await {
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
    write_history(ctx, &deleted, "DELETE", "204", None).await;
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
    let origin = ctx.origin();
    let entries: Vec<Value> = page
        .documents
        .iter()
        .map(|document| {
            let resource = ctx.render(document);
            let id = resource["id"].as_str().unwrap_or_default().to_string();
            json!({
                "fullUrl": format!("{origin}{}", ctx.url(&id)),
                "resource": resource,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let total = if ctx.fidelity.total_only_on_request && !query.total_requested {
        0
    } else {
        page.total
    };
    let mut bundle = json!({"resourceType": "Bundle", "type": "searchset", "total": total});
    // FHIR forbids empty arrays.
    if !entries.is_empty() {
        bundle["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(StatusCode::OK, &bundle))
}

/// The resources of a `$merge` body, and whether it was a list (an array,
/// a Bundle or Parameters: answered with a list).
fn merge_input(body: &[u8]) -> Result<(Vec<Value>, bool), String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    match value {
        Value::Array(items) => Ok((items, true)),
        Value::Object(ref fields) if fields.get("resourceType") == Some(&json!("Bundle")) => {
            let entries = fields
                .get("entry")
                .and_then(Value::as_array)
                .map(|entries| {
                    entries
                        .iter()
                        .filter_map(|entry| entry.get("resource").cloned())
                        .collect()
                })
                .unwrap_or_default();
            Ok((entries, true))
        }
        Value::Object(ref fields) if fields.get("resourceType") == Some(&json!("Parameters")) => {
            let resources: Vec<Value> = fields
                .get("parameter")
                .and_then(Value::as_array)
                .map(|parameters| {
                    parameters
                        .iter()
                        .filter_map(|p| p.get("resource").cloned())
                        .collect()
                })
                .unwrap_or_default();
            if resources.is_empty() {
                return Err("Invalid parameter list".to_string());
            }
            Ok((resources, true))
        }
        Value::Object(_) => Ok((vec![value], false)),
        _ => Err("the body must be a resource, an array of resources or a Bundle".to_string()),
    }
}

/// Resources with the same type and id in one request are merged into one
/// first, in the order they came.
fn merge_duplicates(resources: Vec<Value>) -> Vec<Value> {
    let mut merged: Vec<((Value, Value), Value)> = Vec::new();
    for resource in resources {
        let key = (resource["resourceType"].clone(), resource["id"].clone());
        match merged.iter_mut().find(|(k, _)| *k == key) {
            Some((_, existing)) => *existing = smart_merge(existing, &resource),
            None => merged.push((key, resource)),
        }
    }
    merged.into_iter().map(|(_, resource)| resource).collect()
}

/// One resource's entry in a `$merge` answer, shaped as the real server's.
fn merge_result(document: &Document, resource_type: &str, created: bool, updated: bool) -> Value {
    let mut result = json!({
        "created": created,
        "id": document.get_str("id").unwrap_or_default(),
    });
    if let Ok(uuid) = document.get_str("_uuid") {
        result["uuid"] = json!(uuid);
    }
    result["resourceType"] = json!(resource_type);
    result["updated"] = json!(updated);
    if let Ok(authority) = document.get_str("_sourceAssigningAuthority") {
        result["sourceAssigningAuthority"] = json!(authority);
    }
    result
}

fn merge_error(resource: &Value, diagnostics: &str) -> Value {
    let resource_type = resource["resourceType"].as_str().unwrap_or_default();
    let expression = match resource["id"].as_str() {
        Some(id) => format!("{resource_type}/{id}"),
        None => resource_type.to_string(),
    };
    let issue = json!({
        "severity": "error",
        "code": "exception",
        "details": {"text": diagnostics},
        "diagnostics": diagnostics,
        "expression": [expression],
    });
    let mut result = json!({
        "issue": issue,
        "operationOutcome": {"resourceType": "OperationOutcome", "issue": [issue]},
        "created": false,
    });
    if let Some(id) = resource.get("id").filter(|id| !id.is_null()) {
        result["id"] = id.clone();
    }
    result["resourceType"] = json!(resource_type);
    result["updated"] = json!(false);
    result
}

/// `POST [Type/]$merge`: each resource is created if its id is new, else
/// smart-merged into the stored one and the whole document rewritten. Always
/// 200 with one result per resource (a list for a list).
async fn merge_operation(ctx: &Ctx<'_>, body: &[u8]) -> Result<Response, StoreError> {
    let (resources, was_list) = match merge_input(body) {
        Ok(input) => input,
        Err(why) => return Ok(bad_request(why)),
    };
    let mut results = Vec::new();
    for resource in merge_duplicates(resources) {
        results.push(merge_one(ctx, resource).await?);
    }
    // Sorted by uuid, results without one (errors) first.
    results.sort_by(|a, b| match (a["uuid"].as_str(), b["uuid"].as_str()) {
        (Some(a), Some(b)) => a.cmp(b),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    });
    let body = if was_list {
        Value::Array(results)
    } else {
        results.into_iter().next().unwrap_or_else(|| json!([]))
    };
    Ok(fhir_json(StatusCode::OK, &body))
}

async fn merge_one(ctx: &Ctx<'_>, mut resource: Value) -> Result<Value, StoreError> {
    if !resource.is_object() {
        return Ok(merge_error(&resource, "resource is not a JSON object"));
    }
    let Some(resource_type) = resource["resourceType"]
        .as_str()
        .filter(|t| is_resource_type(t))
        .map(str::to_string)
    else {
        return Ok(merge_error(&resource, "resource is missing resourceType"));
    };
    // The real server takes a numeric id as its text.
    if let Some(number) = resource["id"].as_number().map(ToString::to_string) {
        resource["id"] = json!(number);
    }
    let Some(id) = resource["id"]
        .as_str()
        .filter(|id| !id.is_empty())
        .map(str::to_string)
    else {
        return Ok(merge_error(&resource, "resource is missing id"));
    };
    if id.contains('/') {
        return Ok(merge_error(
            &resource,
            &format!("id {id:?} is not a FHIR id"),
        ));
    }
    if ctx.fidelity.real_internal_fields {
        if id.contains('|') {
            return Ok(merge_error(&resource, "Pipe | is not allowed in id field"));
        }
        let tagged = resource
            .pointer("/meta/security")
            .and_then(Value::as_array)
            .is_some_and(|tags| {
                tags.iter().any(|t| {
                    t["system"] == OWNER_SYSTEM || t["system"] == SOURCE_ASSIGNING_AUTHORITY_SYSTEM
                })
            });
        if !enrichment::is_uuid(&id) && !tagged {
            return Ok(merge_error(
                &resource,
                "Either id passed in resource should be uuid or meta.security tag with system: \
                 https://www.icanbwell.com/owner or https://www.icanbwell.com/sourceAssigningAuthority \
                 should be present",
            ));
        }
    }
    let ctx = Ctx {
        resource_type: &resource_type,
        ..*ctx
    };
    let ctx = &ctx;
    strip_client_fields(ctx, &mut resource);
    ctx.storage.ensure_indexes(&resource_type).await?;
    let rewrite = Rewrite {
        method: "POST",
        keep_markers: false,
        skip_unchanged: true,
        patches: None,
    };
    let _write = ctx.storage.write_locks.lock(&resource_type, &id).await;
    for attempt in 0..MAX_WRITE_ATTEMPTS {
        let Some(stored) = ctx.storage.find(&resource_type, &id).await? else {
            if ctx.fidelity.require_meta
                && resource
                    .pointer("/meta/source")
                    .and_then(Value::as_str)
                    .is_none_or(str::is_empty)
            {
                return Ok(merge_error(
                    &resource,
                    "Unable to merge resource. Missing either metadata or metadata source.",
                ));
            }
            if ctx.fidelity.group_invariant {
                if let Some(why) = group_invariant_violation(&resource) {
                    return Ok(merge_error(&resource, &why));
                }
            }
            match insert_new(ctx, resource.clone(), &id, "POST").await {
                Err(StoreError::AlreadyExists { .. }) => continue,
                Err(e) => return Err(e),
                Ok(document) => return Ok(merge_result(&document, &resource_type, true, false)),
            }
        };
        let current = ctx.working_json(&stored);
        let mut incoming = resource.clone();
        if ctx.fidelity.keep_non_writable_fields {
            keep_non_writable_fields(&mut incoming, &current);
        }
        if ctx.fidelity.real_internal_fields {
            // As stored, so members already there compare equal.
            enrichment::presave(&mut incoming);
        } else if ctx.fidelity.reference_enrichment {
            let authority = source_assigning_authority(&current);
            enrichment::presave_references(&mut incoming, &authority);
        }
        let merged = smart_merge(&current, &incoming);
        if let Err(why) = check_write(ctx, &merged) {
            return Ok(merge_error(&resource, &why));
        }
        match replace(ctx, &stored, &merged, &rewrite).await? {
            Attempt::Written(document) => {
                return Ok(merge_result(&document, &resource_type, false, true))
            }
            Attempt::Unchanged => return Ok(merge_result(&stored, &resource_type, false, false)),
            Attempt::Raced => {
                let _ = retry_after_race(ctx, attempt, &id, false).await;
            }
        }
    }
    Ok(merge_error(
        &resource,
        &format!("{resource_type}/{id} kept changing under concurrent writers"),
    ))
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
             "searchParam": [{"name": "member", "type": "reference"}],
             "operation": [{"name": "merge", "definition": "https://www.icanbwell.com/fhir/OperationDefinition/merge"}]},
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
        assert_eq!(
            route("/Group/g1/_history"),
            Some(Route::History("Group", "g1"))
        );
        assert_eq!(route("/Group/$merge"), Some(Route::Merge(Some("Group"))));
        assert_eq!(route("/$merge"), Some(Route::Merge(None)));
        for unknown in [
            "",
            "/",
            "/group/g1",
            "/Group/_search",
            "/Group/$export",
            "/Group//x",
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

    fn stored_group() -> Value {
        to_fhir(&to_document(
            &json!({"resourceType": "Group", "id": "g", "member": [{"entity": {"reference": "Patient/1"}}]}),
            1,
            DateTime::now(),
        ))
    }

    fn patch_of(value: Value) -> json_patch::Patch {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn patch_applies_to_the_whole_resource() {
        let patch = patch_of(
            json!([{"op": "add", "path": "/member/-", "value": {"entity": {"reference": "Patient/2"}}}]),
        );
        let patched = apply_patch(stored_group(), &patch, "Group", "g").unwrap();
        assert_eq!(patched["member"][1]["entity"]["reference"], "Patient/2");
        assert_eq!(patched["member"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn failed_patch_names_operation_and_path() {
        let patch = patch_of(json!([
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/1"},
            {"op": "test", "path": "/member/0/entity/reference", "value": "Patient/9"}
        ]));
        let Err(PatchRejection::Failed { why, name }) =
            apply_patch(stored_group(), &patch, "Group", "g")
        else {
            panic!("patch should fail");
        };
        assert_eq!(name, "TEST_OPERATION_FAILED");
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
                apply_patch(stored_group(), &patch, "Group", "g"),
                Err(PatchRejection::ChangesIdentity)
            );
        }
    }

    #[test]
    fn a_remove_of_the_end_of_an_array_is_an_unresolvable_path() {
        let patch = patch_of(json!([{"op": "remove", "path": "/member/-"}]));
        let Err(PatchRejection::Failed { name, .. }) =
            apply_patch(stored_group(), &patch, "Group", "g")
        else {
            panic!("patch should fail");
        };
        assert_eq!(name, "OPERATION_PATH_UNRESOLVABLE");
    }

    #[test]
    fn patches_may_not_name_or_carry_internal_fields() {
        assert!(internal_field_in_patch(&[
            json!({"op": "remove", "path": "/member/0/entity/_uuid"})
        ])
        .unwrap()
        .contains("'_uuid'"));
        assert!(
            internal_field_in_patch(&[json!({"op": "add", "path": "/member/-",
            "value": {"entity": {"reference": "Patient/1", "_sourceId": "x"}}})])
            .is_some()
        );
        assert!(internal_field_in_patch(&[
            json!({"op": "move", "from": "/_access", "path": "/x"})
        ])
        .is_some());
        assert!(
            internal_field_in_patch(&[json!({"op": "add", "path": "/member/-",
            "value": {"entity": {"reference": "Patient/1"}}})])
            .is_none()
        );
    }

    #[test]
    fn merge_bodies_may_be_a_resource_a_list_or_a_bundle() {
        let (one, list) = merge_input(br#"{"resourceType":"Group","id":"a"}"#).unwrap();
        assert_eq!((one.len(), list), (1, false));
        let (two, list) = merge_input(br#"[{"id":"a"},{"id":"b"}]"#).unwrap();
        assert_eq!((two.len(), list), (2, true));
        let bundle =
            br#"{"resourceType":"Bundle","entry":[{"resource":{"id":"a"}},{"request":{}}]}"#;
        let (entries, list) = merge_input(bundle).unwrap();
        assert_eq!((entries.len(), list), (1, true));
        assert!(merge_input(b"3").is_err());
        assert!(merge_input(br#"{"resourceType":"Parameters","parameter":[]}"#).is_err());
    }

    #[test]
    fn duplicates_in_one_merge_are_merged_first() {
        let merged = merge_duplicates(vec![
            json!({"resourceType": "Group", "id": "a", "member": [{"entity": {"reference": "Patient/1"}}]}),
            json!({"resourceType": "Group", "id": "b"}),
            json!({"resourceType": "Group", "id": "a", "member": [{"entity": {"reference": "Patient/2"}}]}),
        ]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0]["member"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn groups_with_members_must_be_actual() {
        let members = json!([{"entity": {"reference": "Patient/1"}}]);
        assert!(group_invariant_violation(
            &json!({"resourceType": "Group", "actual": false, "member": members})
        )
        .is_some());
        assert!(
            group_invariant_violation(&json!({"resourceType": "Group", "member": members}))
                .is_some()
        );
        assert!(group_invariant_violation(
            &json!({"resourceType": "Group", "actual": true, "member": members})
        )
        .is_none());
        assert!(group_invariant_violation(
            &json!({"resourceType": "Group", "actual": false, "member": []})
        )
        .is_none());
    }

    #[test]
    fn puts_and_merges_keep_the_stored_source_and_owner() {
        let stored = json!({"id": "g", "meta": {"source": "s1", "security": [
            {"system": OWNER_SYSTEM, "code": "a"},
            {"system": SOURCE_ASSIGNING_AUTHORITY_SYSTEM, "code": "a"}]}});
        let mut incoming = json!({"id": "g", "meta": {"source": "s2", "security": [
            {"system": OWNER_SYSTEM, "code": "b"},
            {"system": "https://www.icanbwell.com/access", "code": "b"}]}});
        keep_non_writable_fields(&mut incoming, &stored);
        assert_eq!(incoming["meta"]["source"], "s1");
        assert_eq!(
            incoming["meta"]["security"],
            json!([{"system": OWNER_SYSTEM, "code": "a"},
                   {"system": "https://www.icanbwell.com/access", "code": "b"},
                   {"system": SOURCE_ASSIGNING_AUTHORITY_SYSTEM, "code": "a"}])
        );
        let mut bare = json!({"id": "g"});
        keep_non_writable_fields(&mut bare, &stored);
        assert_eq!(bare["meta"]["security"].as_array().map(Vec::len), Some(2));
    }

    #[test]
    fn resources_must_match_the_route() {
        assert!(parse_resource("Group", br#"{"resourceType":"Group"}"#).is_ok());
        assert!(parse_resource("Group", br#"{"resourceType":"Patient"}"#).is_err());
        assert!(parse_resource("Group", br#"[1]"#).is_err());
        assert!(parse_resource("Group", b"{").is_err());
    }
}
