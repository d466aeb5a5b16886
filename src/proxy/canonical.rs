//! Request paths that a legacy server (or any common HTTP router) may read as a
//! Group route although they are not spelled like one. Pure.
//!
//! Express, the router of the reference server, collapses nothing itself but
//! matches case-insensitively, ignores a trailing slash and decodes
//! percent-escapes in parameters; Node and most front proxies resolve dot
//! segments and repeated slashes. A request the proxy routes as "not a Group"
//! but the legacy server routes as one would write around the proxy, so such
//! spellings are refused instead of being guessed at: only the canonical form
//! reaches the legacy server.

use percent_encoding::percent_decode_str;

/// Why a path under a FHIR base is refused, with the canonical spelling.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NonCanonical {
    pub canonical: String,
    pub why: &'static str,
}

/// `Some` when `path` reads as `{base}/Group...`, as a `$merge`, or (for a
/// POST: a batch or transaction Bundle) as the base itself once normalised
/// (percent escapes decoded, `;params` dropped, repeated slashes collapsed,
/// dot segments resolved, a trailing slash dropped, `group` matched in any
/// case) but is not spelled exactly so.
pub fn non_canonical_group_path(
    method: &http::Method,
    path: &str,
    base_paths: &[String],
) -> Option<NonCanonical> {
    let (segments, why) = normalise(path);
    let canonical_segments = as_group_path(&segments, base_paths)
        .or_else(|| as_sensitive_path(method, &segments, base_paths))?;
    let canonical = format!("/{}", canonical_segments.join("/"));
    let why = why.or_else(|| (canonical != path).then_some("a variant spelling of 'Group'"))?;
    // The bare root is written "/" however it was reached.
    let canonical = if canonical.is_empty() {
        "/".into()
    } else {
        canonical
    };
    Some(NonCanonical { canonical, why })
}

/// Segments after normalisation, and the first reason the path was not
/// already normal.
fn normalise(path: &str) -> (Vec<String>, Option<&'static str>) {
    let mut why = None;
    let mut note = |reason: &'static str| {
        why.get_or_insert(reason);
    };
    let raw: Vec<&str> = path.split('/').skip(1).collect();
    let mut segments: Vec<String> = Vec::new();
    for (i, segment) in raw.iter().enumerate() {
        let without_params = match segment.split_once(';') {
            Some((head, _)) => {
                note("a ';' parameter in a path segment");
                head
            }
            None => segment,
        };
        let decoded = if without_params.contains('%') {
            note("a percent-escape in the path");
            percent_decode_str(without_params)
                .decode_utf8_lossy()
                .into_owned()
        } else {
            without_params.to_string()
        };
        match decoded.as_str() {
            "" if i + 1 == raw.len() && i > 0 => note("a trailing slash"),
            "" if i + 1 == raw.len() => {}
            "" => note("an empty path segment (repeated slash)"),
            "." => note("a '.' path segment"),
            ".." => {
                note("a '..' path segment");
                segments.pop();
            }
            _ => segments.push(decoded),
        }
    }
    (segments, why)
}

/// The segments of a `$merge` anywhere, or of a POST to a base itself, when
/// they lie under a base.
fn as_sensitive_path(
    method: &http::Method,
    segments: &[String],
    base_paths: &[String],
) -> Option<Vec<String>> {
    let merge = segments.last().is_some_and(|s| s == "$merge");
    let base_root = *method == http::Method::POST
        && base_paths.iter().any(|base| {
            let base: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
            segments.len() == base.len()
                && segments
                    .iter()
                    .zip(&base)
                    .all(|(a, b)| a.eq_ignore_ascii_case(b))
        });
    (merge || base_root).then(|| segments.to_vec())
}

/// The canonical segments when `segments` are `{base}/Group[/...]` for one of
/// the bases (the resource type matched in any case, as Express does).
fn as_group_path(segments: &[String], base_paths: &[String]) -> Option<Vec<String>> {
    base_paths.iter().find_map(|base| {
        let base: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
        // Base segments are matched case-insensitively too, as Express does.
        let head = segments.get(..base.len())?;
        let rest = head
            .iter()
            .zip(&base)
            .all(|(a, b)| a.eq_ignore_ascii_case(b))
            .then(|| &segments[base.len()..])?;
        let (resource_type, tail) = rest.split_first()?;
        if !resource_type.eq_ignore_ascii_case("Group") {
            return None;
        }
        let mut canonical: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        canonical.push("Group".into());
        canonical.extend(tail.iter().cloned());
        Some(canonical)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bases() -> Vec<String> {
        vec!["/4_0_0".into(), "/".into()]
    }

    #[test]
    fn canonical_group_paths_are_not_refused() {
        for path in [
            "/4_0_0/Group",
            "/4_0_0/Group/g-1.x",
            "/4_0_0/Group/g/_history/2",
            "/4_0_0/Group/g/$members",
            "/Group/g",
            "/4_0_0/Patient/p",
            "/4_0_0/Patient//p",
            "/",
            "/4_0_0",
            "/4_0_0/",
        ] {
            assert_eq!(
                non_canonical_group_path(&http::Method::GET, path, &bases()),
                None,
                "{path}"
            );
        }
    }

    #[test]
    fn variant_spellings_of_group_routes_are_refused_with_the_canonical_path() {
        for (path, canonical) in [
            ("/4_0_0//Group/g", "/4_0_0/Group/g"),
            ("//4_0_0/Group/g", "/4_0_0/Group/g"),
            ("/4_0_0/Group//g", "/4_0_0/Group/g"),
            ("/4_0_0/./Group/g", "/4_0_0/Group/g"),
            ("/4_0_0/Patient/../Group/g", "/4_0_0/Group/g"),
            ("/4_0_0/Group/g/", "/4_0_0/Group/g"),
            ("/4_0_0/Group/", "/4_0_0/Group"),
            ("/4_0_0/group/g", "/4_0_0/Group/g"),
            ("/4_0_0/GROUP/g", "/4_0_0/Group/g"),
            ("/4_0_0/Gr%6Fup/g", "/4_0_0/Group/g"),
            ("/4_0_0/Group/%67", "/4_0_0/Group/g"),
            ("/4_0_0/Group;x=1/g", "/4_0_0/Group/g"),
            ("/4_0_0/Group/g;v=2", "/4_0_0/Group/g"),
            ("/%34_0_0/Group/g", "/4_0_0/Group/g"),
            ("/group/g", "/Group/g"),
        ] {
            let refused = non_canonical_group_path(&http::Method::PATCH, path, &bases());
            assert_eq!(
                refused.as_ref().map(|r| r.canonical.as_str()),
                Some(canonical),
                "{path}"
            );
        }
    }

    #[test]
    fn the_reason_names_the_first_irregularity() {
        let get = &http::Method::GET;
        let refused = non_canonical_group_path(get, "/4_0_0//Group/g", &bases()).unwrap();
        assert!(refused.why.contains("repeated slash"), "{refused:?}");
        let refused = non_canonical_group_path(get, "/4_0_0/group/g", &bases()).unwrap();
        assert!(refused.why.contains("variant spelling"), "{refused:?}");
    }

    #[test]
    fn variant_spellings_of_merges_and_bundle_posts_are_refused() {
        let post = &http::Method::POST;
        for (path, canonical) in [
            ("/4_0_0//Patient/$merge", "/4_0_0/Patient/$merge"),
            ("/4_0_0/%24merge", "/4_0_0/$merge"),
            ("//4_0_0", "/4_0_0"),
            ("/4_0_0/", "/4_0_0"),
            ("/4_0_0/.", "/4_0_0"),
        ] {
            let refused = non_canonical_group_path(post, path, &bases());
            assert_eq!(
                refused.as_ref().map(|r| r.canonical.as_str()),
                Some(canonical),
                "{path}"
            );
        }
        for path in ["/4_0_0", "/4_0_0/Patient/$merge", "/4_0_0/$merge"] {
            assert_eq!(
                non_canonical_group_path(post, path, &bases()),
                None,
                "{path}"
            );
        }
        assert_eq!(
            non_canonical_group_path(&http::Method::GET, "/4_0_0/", &bases()),
            None,
            "a GET of the base is nobody's Group route"
        );
    }
}
