//! Which requests the proxy answers itself. Pure functions of the request head.

use pingora::http::RequestHeader;

pub const JSON_PATCH: &str = "application/json-patch+json";

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// Forward unchanged.
    Passthrough,
    /// A JSON Patch of a Group: the proxy reads the body to see whether its
    /// ops target `/member`.
    GroupPatch { base: String, group_id: String },
    /// `PATCH {base}/Group/{id}` in another patch format (XML Patch, FHIRPath
    /// Patch): the proxy cannot see which elements it touches.
    GroupPatchOtherFormat { group_id: String },
    /// A read of a Group: members come from ClickHouse once it was migrated.
    GroupRead { base: String, group_id: String },
    /// `GET {base}/Group/{id}/$members`: one page of a migrated Group's members.
    GroupMembers { base: String, group_id: String },
    /// `POST {base}/Group/{id}/$member-add|$member-remove` (Da Vinci ATR).
    GroupAtrOperation {
        base: String,
        group_id: String,
        operation: crate::fhir::atr::AtrOperation,
    },
    /// `PUT {base}/Group/{id}` with a JSON body: a roster replacement once
    /// the Group's members are events.
    GroupUpdate { base: String, group_id: String },
    /// `POST {base}/Group` with a JSON body: a Group created with members
    /// keeps them as events.
    GroupCreate { base: String },
    /// `DELETE {base}/Group/{id}`: a migrated Group's roster is tombstoned.
    GroupDelete { base: String, group_id: String },
    /// `GET {base}/Group?member=...`: migrated Groups come from the reverse index.
    GroupSearchByMember { base: String },
    /// `GET {base}/Group/{id}/_history/{vid}`: the roster as of that version.
    GroupVersionRead {
        base: String,
        group_id: String,
        version: u64,
    },
}

impl Route {
    /// A fixed name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Passthrough => "passthrough",
            Route::GroupPatch { .. } => "group_patch",
            Route::GroupPatchOtherFormat { .. } => "group_patch_other_format",
            Route::GroupRead { .. } => "group_read",
            Route::GroupMembers { .. } => "group_members",
            Route::GroupAtrOperation { .. } => "group_atr_operation",
            Route::GroupUpdate { .. } => "group_update",
            Route::GroupCreate { .. } => "group_create",
            Route::GroupDelete { .. } => "group_delete",
            Route::GroupSearchByMember { .. } => "group_search_by_member",
            Route::GroupVersionRead { .. } => "group_version_read",
        }
    }
}

pub fn route(request: &RequestHeader, base_paths: &[String]) -> Route {
    if request.method == http::Method::GET {
        let path = request.uri.path();
        let searches_members =
            crate::fhir::group_search::member_search_terms(request.uri.query()).is_some();
        if let (true, Some(base)) = (searches_members, group_type_base(path, base_paths)) {
            return Route::GroupSearchByMember { base };
        }
        if let Some(group_path) = path.strip_suffix("/$members") {
            if let Some((base, group_id)) = group_id(group_path, base_paths) {
                return Route::GroupMembers { base, group_id };
            }
        }
        if let Some((group_path, version)) = path.rsplit_once("/_history/") {
            let version = version.parse::<u64>().ok().filter(|v| *v > 0);
            if let (Some((base, group_id)), Some(version)) =
                (group_id(group_path, base_paths), version)
            {
                return Route::GroupVersionRead {
                    base,
                    group_id,
                    version,
                };
            }
        }
        return match group_id(path, base_paths) {
            Some((base, group_id)) => Route::GroupRead { base, group_id },
            None => Route::Passthrough,
        };
    }
    if request.method == http::Method::DELETE {
        return match group_id(request.uri.path(), base_paths) {
            Some((base, group_id)) => Route::GroupDelete { base, group_id },
            None => Route::Passthrough,
        };
    }
    if request.method == http::Method::PUT {
        return match group_id(request.uri.path(), base_paths) {
            Some((base, group_id)) if has_json_body(request) => {
                Route::GroupUpdate { base, group_id }
            }
            _ => Route::Passthrough,
        };
    }
    if request.method == http::Method::POST {
        let path = request.uri.path();
        if let (Some(base), true) = (group_type_base(path, base_paths), has_json_body(request)) {
            return Route::GroupCreate { base };
        }
        if let Some((group_path, segment)) = path.rsplit_once('/') {
            let operation = crate::fhir::atr::AtrOperation::from_path_segment(segment);
            if let (Some(operation), Some((base, group_id))) =
                (operation, group_id(group_path, base_paths))
            {
                return Route::GroupAtrOperation {
                    base,
                    group_id,
                    operation,
                };
            }
        }
        return Route::Passthrough;
    }
    if request.method != http::Method::PATCH {
        return Route::Passthrough;
    }
    let is_json_patch =
        media_type(request).is_some_and(|media| media.eq_ignore_ascii_case(JSON_PATCH));
    match group_id(request.uri.path(), base_paths) {
        Some((base, group_id)) if is_json_patch => Route::GroupPatch { base, group_id },
        Some((_, group_id)) => Route::GroupPatchOtherFormat { group_id },
        None => Route::Passthrough,
    }
}

/// The request's media type, without parameters.
fn media_type(request: &RequestHeader) -> Option<&str> {
    request
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(str::trim)
}

/// FHIR JSON (`application/fhir+json`, or plain `application/json`); XML
/// resources are the legacy server's business.
fn has_json_body(request: &RequestHeader) -> bool {
    media_type(request).is_some_and(|media| {
        media.eq_ignore_ascii_case("application/fhir+json")
            || media.eq_ignore_ascii_case("application/json")
    })
}

/// `{base}/Group` (exactly) to its base.
fn group_type_base(path: &str, base_paths: &[String]) -> Option<String> {
    base_paths.iter().find_map(|base| {
        let base = base.trim_end_matches('/');
        (path.strip_prefix(base)? == "/Group").then(|| base.to_string())
    })
}

/// `{base}/Group/{id}` (exactly) to its base and id.
fn group_id(path: &str, base_paths: &[String]) -> Option<(String, String)> {
    base_paths.iter().find_map(|base| {
        let base = base.trim_end_matches('/');
        let id = path.strip_prefix(base)?.strip_prefix("/Group/")?;
        is_fhir_id(id).then(|| (base.to_string(), id.to_string()))
    })
}

/// FHIR `id`: 1-64 of `A-Z a-z 0-9 - .`
pub fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(method: &str, path: &str, content_type: Option<&str>) -> RequestHeader {
        let mut r = RequestHeader::build(method, path.as_bytes(), None).unwrap();
        if let Some(ct) = content_type {
            r.insert_header("content-type", ct).unwrap();
        }
        r
    }

    fn bases() -> Vec<String> {
        vec!["/4_0_0".into(), "/".into()]
    }

    #[test]
    fn json_patch_of_a_group_is_inspected() {
        let r = request(
            "PATCH",
            "/4_0_0/Group/g-1.x?_format=json",
            Some("application/json-patch+json; charset=utf-8"),
        );
        assert_eq!(
            route(&r, &bases()),
            Route::GroupPatch {
                base: "/4_0_0".into(),
                group_id: "g-1.x".into()
            }
        );
        let r = request("PATCH", "/Group/abc", Some("Application/JSON-Patch+JSON"));
        assert!(
            matches!(route(&r, &bases()), Route::GroupPatch { group_id, .. } if group_id == "abc")
        );
    }

    #[test]
    fn group_reads_are_inspected() {
        let r = request("GET", "/4_0_0/Group/g?_summary=true", None);
        assert_eq!(
            route(&r, &bases()),
            Route::GroupRead {
                base: "/4_0_0".into(),
                group_id: "g".into()
            }
        );
        assert_eq!(
            route(
                &request("GET", "/4_0_0/Group/g/$members?_count=5", None),
                &bases()
            ),
            Route::GroupMembers {
                base: "/4_0_0".into(),
                group_id: "g".into()
            }
        );
        assert_eq!(
            route(&request("GET", "/4_0_0/Group/g/_history/7", None), &bases()),
            Route::GroupVersionRead {
                base: "/4_0_0".into(),
                group_id: "g".into(),
                version: 7
            }
        );
        for path in [
            "/4_0_0/Group",
            "/4_0_0/Group/g/_history",
            "/4_0_0/Group/g/_history/x",
            "/4_0_0/Group/g/$everything",
        ] {
            assert_eq!(
                route(&request("GET", path, None), &bases()),
                Route::Passthrough,
                "{path}"
            );
        }
    }

    #[test]
    fn whole_group_writes_in_json_are_inspected() {
        let json = Some("application/fhir+json; fhirVersion=4.0");
        assert_eq!(
            route(&request("PUT", "/4_0_0/Group/g", json), &bases()),
            Route::GroupUpdate {
                base: "/4_0_0".into(),
                group_id: "g".into()
            }
        );
        assert_eq!(
            route(
                &request("POST", "/4_0_0/Group", Some("application/json")),
                &bases()
            ),
            Route::GroupCreate {
                base: "/4_0_0".into()
            }
        );
        for (method, path, ct) in [
            ("PUT", "/4_0_0/Group/g", Some("application/fhir+xml")),
            ("PUT", "/4_0_0/Group/g", None),
            ("PUT", "/4_0_0/Patient/g", json),
            ("POST", "/4_0_0/Group", Some("application/fhir+xml")),
            (
                "POST",
                "/4_0_0/Group/_search",
                Some("application/x-www-form-urlencoded"),
            ),
            ("POST", "/4_0_0/Patient", json),
        ] {
            assert_eq!(
                route(&request(method, path, ct), &bases()),
                Route::Passthrough,
                "{method} {path} {ct:?}"
            );
        }
    }

    #[test]
    fn other_patch_formats_of_groups_are_looked_at() {
        for ct in [
            Some("application/fhir+json"),
            Some("application/xml-patch+xml"),
            None,
        ] {
            assert_eq!(
                route(&request("PATCH", "/4_0_0/Group/g", ct), &bases()),
                Route::GroupPatchOtherFormat {
                    group_id: "g".into()
                },
                "{ct:?}"
            );
        }
    }

    #[test]
    fn everything_else_passes_through() {
        for (method, path, ct) in [
            (
                "HEAD",
                "/4_0_0/Group/g",
                Some("application/json-patch+json"),
            ),
            (
                "PATCH",
                "/4_0_0/Patient/g",
                Some("application/json-patch+json"),
            ),
            (
                "PATCH",
                "/4_0_0/Group/g/_history/1",
                Some("application/json-patch+json"),
            ),
            (
                "PATCH",
                "/4_0_0/Group/",
                Some("application/json-patch+json"),
            ),
            (
                "PATCH",
                "/other/Group/g",
                Some("application/json-patch+json"),
            ),
        ] {
            assert_eq!(
                route(&request(method, path, ct), &["/4_0_0".to_string()]),
                Route::Passthrough,
                "{method} {path} {ct:?}"
            );
        }
    }
}
