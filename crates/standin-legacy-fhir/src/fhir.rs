//! FHIR R4 routes of the stand-in: create, read, vread, update, JSON Patch,
//! delete, search by `_id` and `member`. Writes are read-modify-write of whole
//! documents with a compare-and-swap on `meta.versionId`, as legacy servers do.

use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::Method;
use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Collection;
use serde_json::{json, Value};

use crate::documents::{
    http_date, internal_fields, stored_last_updated, stored_version, to_document, to_fhir,
};
use crate::http_util::{fhir, outcome, response, with_header, Response};

const MAX_CAS_RETRIES: usize = 20;

pub fn collection_name(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0")
}

fn history_name(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0_History")
}

fn is_resource_type(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_uppercase()) && s.chars().all(|c| c.is_ascii_alphabetic())
}

struct Ctx<'a> {
    database: &'a mongodb::Database,
    base: &'a str,
    resource_type: String,
}

impl Ctx<'_> {
    fn current(&self) -> Collection<Document> {
        self.database
            .collection(&collection_name(&self.resource_type))
    }
    fn history(&self) -> Collection<Document> {
        self.database.collection(&history_name(&self.resource_type))
    }
    fn url(&self, id: &str) -> String {
        format!("{}/{}/{id}", self.base, self.resource_type)
    }
}

pub async fn handle(
    database: &mongodb::Database,
    base: &str,
    request: hyper::Request<Incoming>,
    rest: &str,
) -> Response {
    let segments: Vec<String> = rest
        .trim_start_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if segments.first().map(String::as_str) == Some("metadata") {
        return fhir(200, &capability_statement());
    }
    let Some(resource_type) = segments.first().filter(|t| is_resource_type(t)).cloned() else {
        return outcome(404, "not-found", &format!("no FHIR route for {rest}"));
    };
    let ctx = Ctx {
        database,
        base,
        resource_type,
    };
    let method = request.method().clone();
    let query = request.uri().query().unwrap_or_default().to_string();
    let headers = request.headers().clone();
    let body = match request.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => return outcome(400, "invalid", &format!("body not readable: {e}")),
    };
    let if_match = headers
        .get(hyper::header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(parse_etag);
    let result = match (&method, segments.len()) {
        (&Method::GET, 1) => search(&ctx, &query).await,
        (&Method::POST, 1) => create(&ctx, &body).await,
        (&Method::GET, 2) => read(&ctx, &segments[1]).await,
        (&Method::PUT, 2) => update(&ctx, &segments[1], &body, if_match).await,
        (&Method::PATCH, 2) => {
            let content_type = headers
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            if !content_type.starts_with("application/json-patch+json") {
                let r = outcome(
                    415,
                    "not-supported",
                    &format!("PATCH content type {content_type:?} is not supported"),
                );
                return with_header(r, "accept-patch", "application/json-patch+json");
            }
            patch(&ctx, &segments[1], &body, if_match).await
        }
        (&Method::DELETE, 2) => delete(&ctx, &segments[1]).await,
        (&Method::GET, 4) if segments[2] == "_history" => {
            vread(&ctx, &segments[1], &segments[3]).await
        }
        _ => Ok(outcome(
            404,
            "not-found",
            &format!("no route for {method} {rest}"),
        )),
    };
    result.unwrap_or_else(|e| outcome(500, "exception", &format!("MongoDB error: {e}")))
}

/// `W/"3"`, `"3"` or `3` -> "3"; anything else is kept and will not match.
fn parse_etag(value: &str) -> String {
    let v = value.trim();
    let v = v.strip_prefix("W/").unwrap_or(v);
    v.trim_matches('"').to_string()
}

type Result<T> = std::result::Result<T, mongodb::error::Error>;

fn resource_response(status: u16, ctx: &Ctx<'_>, document: &Document) -> Response {
    let resource = to_fhir(document);
    let id = resource["id"].as_str().unwrap_or_default().to_string();
    let version = stored_version(document).unwrap_or(0);
    let mut r = fhir(status, &resource);
    r = with_header(r, "etag", &format!("W/\"{version}\""));
    if let Some(last_updated) = stored_last_updated(document) {
        r = with_header(r, "last-modified", &http_date(last_updated));
    }
    let location = format!("{}/_history/{version}", ctx.url(&id));
    if status == 201 {
        r = with_header(r, "location", &location);
    }
    with_header(r, "content-location", &location)
}

/// The resource in `body`, or why not (as the diagnostics of a 400).
fn parse_resource(ctx: &Ctx<'_>, body: &[u8]) -> std::result::Result<Value, String> {
    let resource: Value =
        serde_json::from_slice(body).map_err(|e| format!("body is not JSON: {e}"))?;
    if resource["resourceType"] != ctx.resource_type.as_str() {
        return Err(format!("resourceType must be {}", ctx.resource_type));
    }
    Ok(resource)
}

async fn find(ctx: &Ctx<'_>, id: &str) -> Result<Option<Document>> {
    ctx.current().find_one(doc! { "id": id }).await
}

async fn write_history(
    ctx: &Ctx<'_>,
    document: &Document,
    method: &str,
    status: &str,
) -> Result<()> {
    let id = document.get_str("id").unwrap_or_default();
    let mut resource = document.clone();
    resource.remove("_id");
    let entry = doc! {
        "id": id,
        "_uuid": document.get_str("_uuid").unwrap_or_default(),
        "resource": resource,
        "request": { "id": uuid::Uuid::new_v4().to_string(), "method": method, "url": ctx.url(id) },
        "response": { "status": status },
    };
    ctx.history().insert_one(entry).await.map(|_| ())
}

async fn create(ctx: &Ctx<'_>, body: &[u8]) -> Result<Response> {
    let mut resource = match parse_resource(ctx, body) {
        Ok(r) => r,
        Err(why) => return Ok(outcome(400, "invalid", &why)),
    };
    let id = match resource["id"].as_str() {
        Some(id) => id.to_string(),
        None => uuid::Uuid::new_v4().to_string(),
    };
    if find(ctx, &id).await?.is_some() {
        return Ok(outcome(
            409,
            "duplicate",
            &format!("{}/{id} already exists", ctx.resource_type),
        ));
    }
    resource["id"] = json!(id);
    let document = to_document(&resource, 1, DateTime::now());
    ctx.current().insert_one(&document).await?;
    write_history(ctx, &document, "POST", "201").await?;
    Ok(resource_response(201, ctx, &document))
}

async fn read(ctx: &Ctx<'_>, id: &str) -> Result<Response> {
    match find(ctx, id).await? {
        Some(document) => Ok(resource_response(200, ctx, &document)),
        None => Ok(not_found_or_gone(ctx, id).await?),
    }
}

async fn not_found_or_gone(ctx: &Ctx<'_>, id: &str) -> Result<Response> {
    let deleted = ctx
        .history()
        .find_one(doc! { "id": id, "request.method": "DELETE" })
        .await?
        .is_some();
    Ok(if deleted {
        outcome(
            410,
            "deleted",
            &format!("{}/{id} was deleted", ctx.resource_type),
        )
    } else {
        outcome(
            404,
            "not-found",
            &format!("{}/{id} is not known", ctx.resource_type),
        )
    })
}

async fn vread(ctx: &Ctx<'_>, id: &str, version: &str) -> Result<Response> {
    let entry = ctx
        .history()
        .find_one(doc! { "id": id, "resource.meta.versionId": version })
        .await?;
    match entry.and_then(|e| e.get_document("resource").ok().cloned()) {
        Some(resource) => Ok(resource_response(200, ctx, &resource)),
        None => Ok(outcome(
            404,
            "not-found",
            &format!("{}/{id} has no version {version}", ctx.resource_type),
        )),
    }
}

/// Replaces the stored document with `resource` at version+1, only if the
/// stored version is still `expected`. Internal `_` fields of the stored
/// document are kept.
async fn replace_versioned(
    ctx: &Ctx<'_>,
    stored: &Document,
    resource: &Value,
) -> Result<Option<Document>> {
    let expected = stored_version(stored).unwrap_or(0);
    let mut document = to_document(resource, expected + 1, DateTime::now());
    for (key, value) in internal_fields(stored) {
        if !document.contains_key(&key) || key.starts_with("_member") {
            document.insert(key, value);
        }
    }
    let replaced = ctx
        .current()
        .find_one_and_replace(
            doc! { "id": resource["id"].as_str().unwrap_or_default(), "meta.versionId": expected.to_string() },
            &document,
        )
        .await?;
    Ok(replaced.map(|_| document))
}

async fn update(
    ctx: &Ctx<'_>,
    id: &str,
    body: &[u8],
    if_match: Option<String>,
) -> Result<Response> {
    let resource = match parse_resource(ctx, body) {
        Ok(r) => r,
        Err(why) => return Ok(outcome(400, "invalid", &why)),
    };
    if resource["id"] != id {
        return Ok(outcome(
            400,
            "invalid",
            "the resource id must equal the id in the URL",
        ));
    }
    for _ in 0..MAX_CAS_RETRIES {
        let Some(stored) = find(ctx, id).await? else {
            if if_match.is_some() {
                return Ok(outcome(
                    412,
                    "conflict",
                    "If-Match given for a resource that does not exist",
                ));
            }
            return create(ctx, body).await;
        };
        if let Some(conflict) = check_if_match(&stored, if_match.as_deref()) {
            return Ok(conflict);
        }
        if let Some(document) = replace_versioned(ctx, &stored, &resource).await? {
            write_history(ctx, &document, "PUT", "200").await?;
            return Ok(resource_response(200, ctx, &document));
        }
        if if_match.is_some() {
            return Ok(outcome(
                412,
                "conflict",
                "the resource changed during the update",
            ));
        }
    }
    Ok(outcome(409, "conflict", "too many concurrent updates"))
}

fn check_if_match(stored: &Document, if_match: Option<&str>) -> Option<Response> {
    let expected = if_match?;
    let current = stored_version(stored).unwrap_or(0).to_string();
    (current != expected).then(|| {
        outcome(
            412,
            "conflict",
            &format!("If-Match {expected} does not match the current version {current}"),
        )
    })
}

async fn patch(ctx: &Ctx<'_>, id: &str, body: &[u8], if_match: Option<String>) -> Result<Response> {
    let operations: json_patch::Patch = match serde_json::from_slice(body) {
        Ok(p) => p,
        Err(e) => {
            return Ok(outcome(
                400,
                "invalid",
                &format!("not a JSON Patch document: {e}"),
            ))
        }
    };
    for _ in 0..MAX_CAS_RETRIES {
        let Some(stored) = find(ctx, id).await? else {
            return not_found_or_gone(ctx, id).await;
        };
        if let Some(conflict) = check_if_match(&stored, if_match.as_deref()) {
            return Ok(conflict);
        }
        // Read-modify-write of the whole document: the legacy cost model.
        let mut resource = to_fhir(&stored);
        if let Err(e) = json_patch::patch(&mut resource, &operations) {
            return Ok(outcome(
                422,
                "processing",
                &format!("patch cannot be applied: {e}"),
            ));
        }
        if resource["id"] != id || resource["resourceType"] != ctx.resource_type.as_str() {
            return Ok(outcome(
                400,
                "invalid",
                "a patch must not change id or resourceType",
            ));
        }
        if let Some(meta) = resource.get_mut("meta").and_then(Value::as_object_mut) {
            meta.remove("versionId");
            meta.remove("lastUpdated");
        }
        if let Some(document) = replace_versioned(ctx, &stored, &resource).await? {
            write_history(ctx, &document, "PATCH", "200").await?;
            return Ok(resource_response(200, ctx, &document));
        }
        if if_match.is_some() {
            return Ok(outcome(
                412,
                "conflict",
                "the resource changed during the patch",
            ));
        }
    }
    Ok(outcome(409, "conflict", "too many concurrent updates"))
}

async fn delete(ctx: &Ctx<'_>, id: &str) -> Result<Response> {
    let Some(stored) = ctx.current().find_one_and_delete(doc! { "id": id }).await? else {
        return not_found_or_gone(ctx, id).await;
    };
    let mut deleted = stored.clone();
    let version = stored_version(&stored).unwrap_or(0) + 1;
    if let Ok(meta) = deleted.get_document_mut("meta") {
        meta.insert("versionId", version.to_string());
        meta.insert("lastUpdated", DateTime::now());
    }
    write_history(ctx, &deleted, "DELETE", "204").await?;
    Ok(response(204, "text/plain", ""))
}

async fn search(ctx: &Ctx<'_>, query: &str) -> Result<Response> {
    let mut filter = Document::new();
    let mut count: i64 = 100;
    for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match key.as_ref() {
            "_id" => {
                let ids: Vec<Bson> = value
                    .split(',')
                    .map(|v| Bson::String(v.to_string()))
                    .collect();
                filter.insert("id", doc! { "$in": ids });
            }
            "member" if ctx.resource_type == "Group" => {
                filter.insert("member.entity.reference", value.as_ref());
            }
            "_count" => count = value.parse().unwrap_or(100),
            _ => {}
        }
    }
    let total = ctx.current().count_documents(filter.clone()).await?;
    let mut cursor = ctx.current().find(filter).limit(count).await?;
    let mut entries = Vec::new();
    while cursor.advance().await? {
        let document = cursor.deserialize_current()?;
        let resource = to_fhir(&document);
        let id = resource["id"].as_str().unwrap_or_default().to_string();
        entries.push(
            json!({"fullUrl": ctx.url(&id), "resource": resource, "search": {"mode": "match"}}),
        );
    }
    Ok(fhir(
        200,
        &json!({"resourceType": "Bundle", "type": "searchset", "total": total, "entry": entries}),
    ))
}

fn capability_statement() -> Value {
    json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "kind": "instance",
        "fhirVersion": "4.0.1",
        "format": ["json"],
        "software": {"name": "standin-legacy-fhir (a stand-in for a legacy Mongo-backed FHIR server)"},
        "rest": [{"mode": "server", "resource": [
            {"type": "Group", "interaction": [{"code": "read"}, {"code": "vread"}, {"code": "update"},
              {"code": "patch"}, {"code": "delete"}, {"code": "create"}, {"code": "search-type"}]}
        ]}]
    })
}
