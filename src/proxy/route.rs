//! Which requests the proxy answers itself. Pure functions of the request head.

use pingora::http::RequestHeader;

use crate::fhir::outcome::{IssueType, Outcome};
pub use crate::fhir::reference::is_fhir_id;
use crate::fhir::reference::is_group_address;
use crate::proxy::canonical::non_canonical_group_path;

pub const JSON_PATCH: &str = "application/json-patch+json";

/// Headers some frameworks read as "use this method instead".
const METHOD_OVERRIDE_HEADERS: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// What the proxy does with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Route {
    /// Forward unchanged.
    Passthrough,
    /// Answered with this outcome before anything reaches the legacy server:
    /// a Group route spelled so that the proxy and the legacy server could
    /// disagree about what it is.
    Refused(Outcome),
    /// `PUT {base}/Group/{id}` in a content type the proxy does not read
    /// (XML, or none): fine for the legacy server while it holds the roster.
    GroupUpdateOtherFormat { group_id: String },
    /// Writes that may touch several resources, Groups among them: `$merge`
    /// (of one resource, a list or a Bundle) and batch/transaction Bundles.
    MultiResourceWrite { base: String },
    /// `PUT|PATCH|DELETE {base}/Group?...`: the Group is found by a search.
    GroupConditionalWrite,
    /// Reads the legacy server answers from the inline roster: instance
    /// `_history`, `$export`, `$everything`. `group_id` is `None` for the
    /// type-level form (`Group/$export`).
    GroupRosterDependentRead {
        base: String,
        group_id: Option<String>,
        what: &'static str,
    },
    /// Searches that join through `Group.member` (`_has:Group:member`,
    /// `_revinclude=Group:member`, `_include=Group:member`).
    MemberJoinSearch { parameter: String },
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
    /// `GET {base}/Group` (any other search): the legacy server's Bundle,
    /// with the rosters of Groups kept here put in.
    GroupSearch { base: String },
    /// `GET {base}/Group/{id}/_history/{vid}`: the roster as of that version.
    GroupVersionRead {
        base: String,
        group_id: String,
        version: u64,
    },
}

impl Route {
    /// The Group address of a route about one Group, to be replaced by the
    /// Group's plain id once the stores resolved it (see `id|owner`).
    pub fn group_id_mut(&mut self) -> Option<&mut String> {
        match self {
            Route::GroupUpdateOtherFormat { group_id }
            | Route::GroupPatch { group_id, .. }
            | Route::GroupPatchOtherFormat { group_id }
            | Route::GroupRead { group_id, .. }
            | Route::GroupMembers { group_id, .. }
            | Route::GroupAtrOperation { group_id, .. }
            | Route::GroupUpdate { group_id, .. }
            | Route::GroupDelete { group_id, .. }
            | Route::GroupVersionRead { group_id, .. } => Some(group_id),
            Route::GroupRosterDependentRead { group_id, .. } => group_id.as_mut(),
            _ => None,
        }
    }

    /// A fixed name for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Route::Passthrough => "passthrough",
            Route::Refused(_) => "refused",
            Route::GroupUpdateOtherFormat { .. } => "group_update_other_format",
            Route::MultiResourceWrite { .. } => "multi_resource_write",
            Route::GroupConditionalWrite => "group_conditional_write",
            Route::GroupRosterDependentRead { .. } => "group_roster_dependent_read",
            Route::MemberJoinSearch { .. } => "member_join_search",
            Route::GroupPatch { .. } => "group_patch",
            Route::GroupPatchOtherFormat { .. } => "group_patch_other_format",
            Route::GroupRead { .. } => "group_read",
            Route::GroupMembers { .. } => "group_members",
            Route::GroupAtrOperation { .. } => "group_atr_operation",
            Route::GroupUpdate { .. } => "group_update",
            Route::GroupCreate { .. } => "group_create",
            Route::GroupDelete { .. } => "group_delete",
            Route::GroupSearchByMember { .. } => "group_search_by_member",
            Route::GroupSearch { .. } => "group_search",
            Route::GroupVersionRead { .. } => "group_version_read",
        }
    }
}

pub fn route(request: &RequestHeader, base_paths: &[String]) -> Route {
    let path = request.uri.path();
    if let Some(refused) = non_canonical_group_path(&request.method, path, base_paths) {
        return Route::Refused(Outcome::error(
            400,
            IssueType::Invalid,
            format!(
                "the path '{path}' names a Group route with {}; send it as '{}'",
                refused.why, refused.canonical
            ),
        ));
    }
    let group_path = is_group_path(path, base_paths);
    if group_path {
        if let Some(refused) = method_override(request) {
            return Route::Refused(refused);
        }
    }
    if let Some(parameter) = member_join_parameter(request.uri.query()) {
        return Route::MemberJoinSearch { parameter };
    }
    if let Some(route) = wide_route(request, base_paths) {
        return route;
    }
    if request.method == http::Method::GET {
        let path = request.uri.path();
        let searches_members =
            crate::fhir::group_search::member_search_terms(request.uri.query()).is_some();
        if let Some(base) = group_type_base(path, base_paths) {
            return match searches_members {
                true => Route::GroupSearchByMember { base },
                false => Route::GroupSearch { base },
            };
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
            Some((_, group_id)) => Route::GroupUpdateOtherFormat { group_id },
            None => Route::Passthrough,
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

/// Routes that are not about one Group instance: conditional writes, writes
/// of several resources, and roster-dependent reads.
fn wide_route(request: &RequestHeader, base_paths: &[String]) -> Option<Route> {
    let path = request.uri.path();
    let method = &request.method;
    let conditional = matches!(
        *method,
        http::Method::PUT | http::Method::PATCH | http::Method::DELETE
    ) && group_type_base(path, base_paths).is_some()
        && request.uri.query().is_some_and(|q| !q.is_empty());
    if conditional {
        return Some(Route::GroupConditionalWrite);
    }
    if *method == http::Method::POST {
        let merge_base = path
            .strip_suffix("/$merge")
            .and_then(|before| base_of(before, base_paths));
        let bundle_base = base_paths
            .iter()
            .map(|b| b.trim_end_matches('/'))
            .find(|b| path.trim_end_matches('/') == *b)
            .map(str::to_string);
        if let Some(base) = merge_base.or(bundle_base) {
            return Some(Route::MultiResourceWrite { base });
        }
    }
    if matches!(*method, http::Method::GET | http::Method::POST) {
        for (suffix, what) in [("/$export", "$export"), ("/$everything", "$everything")] {
            let Some(before) = path.strip_suffix(suffix) else {
                continue;
            };
            if let Some(base) = group_type_base(before, base_paths) {
                return Some(Route::GroupRosterDependentRead {
                    base,
                    group_id: None,
                    what,
                });
            }
            if let Some((base, group_id)) = group_id(before, base_paths) {
                return Some(Route::GroupRosterDependentRead {
                    base,
                    group_id: Some(group_id),
                    what,
                });
            }
        }
    }
    if *method == http::Method::GET {
        if let Some(before) = path.strip_suffix("/_history") {
            if let Some((base, group_id)) = group_id(before, base_paths) {
                return Some(Route::GroupRosterDependentRead {
                    base,
                    group_id: Some(group_id),
                    what: "_history",
                });
            }
        }
    }
    None
}

/// The base a path lies under: `{base}`, `{base}/{Type}` or
/// `{base}/{Type}/{id}` (the places `$merge` may be posted to).
fn base_of(path: &str, base_paths: &[String]) -> Option<String> {
    base_paths.iter().find_map(|base| {
        let base = base.trim_end_matches('/');
        let rest = path.strip_prefix(base)?;
        let segments = rest.split('/').skip(1).count();
        (rest.is_empty() || (rest.starts_with('/') && segments <= 2)).then(|| base.to_string())
    })
}

/// `{base}/Group` or anything below it.
fn is_group_path(path: &str, base_paths: &[String]) -> bool {
    base_paths.iter().any(|base| {
        let base = base.trim_end_matches('/');
        path.strip_prefix(base)
            .and_then(|rest| rest.strip_prefix("/Group"))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    })
}

/// `X-HTTP-Method-Override` and its kin, or `_method=` in the query: some
/// frameworks would run another method than the one the proxy routed.
fn method_override(request: &RequestHeader) -> Option<Outcome> {
    let header = METHOD_OVERRIDE_HEADERS
        .iter()
        .find(|name| request.headers.contains_key(**name))
        .map(|name| format!("the header {name}"));
    let query = url::form_urlencoded::parse(request.uri.query().unwrap_or_default().as_bytes())
        .any(|(key, _)| key == "_method")
        .then(|| "the query parameter _method".to_string());
    header.or(query).map(|what| {
        Outcome::error(
            400,
            IssueType::NotSupported,
            format!("method overrides ({what}) are not accepted on Group routes; send the request with its own method"),
        )
    })
}

/// A search parameter that follows `Group.member` from the other side, which
/// the legacy server can only answer from inline rosters.
fn member_join_parameter(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find_map(|(key, value)| {
        let joins = key.starts_with("_has:Group:member:")
            || (key.starts_with("_revinclude") || key.starts_with("_include"))
                && value.split(',').any(|v| {
                    let v = v.trim();
                    v == "*" || v.starts_with("Group:")
                });
        joins.then(|| format!("{key}={value}"))
    })
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
        // `id|owner` too: the proxy must see requests for a Group it keeps,
        // however the reference server lets them address it.
        is_group_address(id).then(|| (base.to_string(), id.to_string()))
    })
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
        assert_eq!(
            route(&request("GET", "/4_0_0/Group/g/_history/x", None), &bases()),
            Route::Passthrough
        );
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

    fn refusal(route: Route) -> Option<String> {
        match route {
            Route::Refused(outcome) => Some(outcome.first_diagnostics().to_string()),
            _ => None,
        }
    }

    #[test]
    fn variant_spellings_of_group_paths_are_refused_for_every_method() {
        for method in ["GET", "PUT", "PATCH", "DELETE", "POST"] {
            for path in [
                "/4_0_0//Group/g",
                "/4_0_0/Group/g/",
                "/4_0_0/group/g",
                "/4_0_0/Group/%67",
                "/4_0_0/./Group/g",
            ] {
                let why = refusal(route(&request(method, path, Some(JSON_PATCH)), &bases()));
                assert!(
                    why.as_deref().is_some_and(|w| w.contains("/4_0_0/Group/g")),
                    "{method} {path}: {why:?}"
                );
            }
        }
    }

    #[test]
    fn method_overrides_on_group_routes_are_refused() {
        let mut r = request("POST", "/4_0_0/Group/g", Some("application/json"));
        r.insert_header("X-HTTP-Method-Override", "PATCH").unwrap();
        let why = refusal(route(&r, &bases())).unwrap();
        assert!(why.contains("x-http-method-override"), "{why}");
        let r = request("POST", "/4_0_0/Group/g?_method=PUT", None);
        assert!(refusal(route(&r, &bases())).unwrap().contains("_method"));
        let mut r = request("POST", "/4_0_0/Patient/p", None);
        r.insert_header("X-HTTP-Method-Override", "PATCH").unwrap();
        assert_eq!(route(&r, &bases()), Route::Passthrough, "not a Group route");
    }

    #[test]
    fn group_puts_in_other_content_types_are_looked_at() {
        for ct in [Some("application/fhir+xml"), Some("text/plain"), None] {
            assert_eq!(
                route(&request("PUT", "/4_0_0/Group/g", ct), &bases()),
                Route::GroupUpdateOtherFormat {
                    group_id: "g".into()
                },
                "{ct:?}"
            );
        }
    }

    #[test]
    fn merges_and_bundles_are_writes_of_several_resources() {
        for path in [
            "/4_0_0/$merge",
            "/4_0_0/Group/$merge",
            "/4_0_0/Patient/$merge",
            "/4_0_0/Group/g/$merge",
            "/4_0_0",
        ] {
            assert_eq!(
                route(
                    &request("POST", path, Some("application/fhir+json")),
                    &bases()
                ),
                Route::MultiResourceWrite {
                    base: "/4_0_0".into()
                },
                "{path}"
            );
        }
        assert_eq!(
            route(
                &request("POST", "/", Some("application/fhir+json")),
                &bases()
            ),
            Route::MultiResourceWrite { base: "".into() }
        );
    }

    #[test]
    fn conditional_group_writes_are_recognised() {
        for method in ["PUT", "PATCH", "DELETE"] {
            assert_eq!(
                route(
                    &request(method, "/4_0_0/Group?identifier=x|1", Some(JSON_PATCH)),
                    &bases()
                ),
                Route::GroupConditionalWrite,
                "{method}"
            );
        }
        assert!(matches!(
            route(&request("GET", "/4_0_0/Group?identifier=x", None), &bases()),
            Route::GroupSearch { .. }
        ));
    }

    #[test]
    fn reads_answered_from_the_inline_roster_are_recognised() {
        for (method, path, id, what) in [
            ("GET", "/4_0_0/Group/g/_history", Some("g"), "_history"),
            (
                "GET",
                "/4_0_0/Group/g/$everything",
                Some("g"),
                "$everything",
            ),
            ("GET", "/4_0_0/Group/g/$export", Some("g"), "$export"),
            ("POST", "/4_0_0/Group/g/$export", Some("g"), "$export"),
            ("GET", "/4_0_0/Group/$export", None, "$export"),
        ] {
            assert_eq!(
                route(&request(method, path, None), &bases()),
                Route::GroupRosterDependentRead {
                    base: "/4_0_0".into(),
                    group_id: id.map(str::to_string),
                    what
                },
                "{method} {path}"
            );
        }
    }

    #[test]
    fn other_group_searches_are_routed_so_kept_rosters_can_be_put_in() {
        for target in [
            "/4_0_0/Group",
            "/4_0_0/Group?_id=a",
            "/4_0_0/Group?name=x&_count=5",
        ] {
            assert_eq!(
                route(&request("GET", target, None), &bases()),
                Route::GroupSearch {
                    base: "/4_0_0".into()
                },
                "{target}"
            );
        }
        assert_eq!(
            route(
                &request("GET", "/4_0_0/Group?member=Patient/1", None),
                &bases()
            ),
            Route::GroupSearchByMember {
                base: "/4_0_0".into()
            }
        );
        assert_eq!(
            route(&request("GET", "/4_0_0/Patient?name=x", None), &bases()),
            Route::Passthrough
        );
    }

    #[test]
    fn searches_that_join_through_group_member_are_recognised() {
        for query in [
            "_has:Group:member:_id=g",
            "_revinclude=Group:member",
            "_revinclude:iterate=Group:member",
            "_include=Group:member",
            "_revinclude=*",
        ] {
            let path = format!("/4_0_0/Patient?{query}");
            assert!(
                matches!(
                    route(&request("GET", &path, None), &bases()),
                    Route::MemberJoinSearch { .. }
                ),
                "{query}"
            );
        }
        for query in [
            "_has:Group:managing-entity:_id=g",
            "_include=Patient:organization",
        ] {
            let path = format!("/4_0_0/Patient?{query}");
            assert_eq!(
                route(&request("GET", &path, None), &bases()),
                Route::Passthrough
            );
        }
    }
}
