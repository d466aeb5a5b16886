//! SMART on FHIR scopes: which scopes allow which action on a resource type.
//! Pure; both scope syntaxes are understood:
//! - v1: `user/Group.read`, `user/Group.write`, `system/Group.*`, `user/*.*`;
//! - v2: `user/Group.rs`, `user/Group.u`, `system/*.cruds` (letters in
//!   `c r u d s` order, each optional).
//!
//! Only the `user` and `system` contexts grant anything here: `patient/`
//! scopes are limited to one patient's compartment, and a Group roster is not
//! in it. Granular v2 scopes (with `?param=value`) grant nothing, because the
//! proxy cannot apply their filter to a roster; ask for the plain scope.

/// What a request does to the resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Search,
    Create,
    Update,
    Delete,
}

impl Action {
    fn v2_letter(self) -> char {
        match self {
            Action::Create => 'c',
            Action::Read => 'r',
            Action::Update => 'u',
            Action::Delete => 'd',
            Action::Search => 's',
        }
    }

    fn v1_word(self) -> &'static str {
        match self {
            Action::Read | Action::Search => "read",
            Action::Create | Action::Update | Action::Delete => "write",
        }
    }
}

/// Whether any of `scopes` allows `action` on `resource_type`.
pub fn allows<'a>(
    scopes: impl IntoIterator<Item = &'a str>,
    resource_type: &str,
    action: Action,
) -> bool {
    scopes
        .into_iter()
        .any(|scope| scope_allows(scope, resource_type, action))
}

fn scope_allows(scope: &str, resource_type: &str, action: Action) -> bool {
    let Some((context, rest)) = scope.split_once('/') else {
        return false;
    };
    if !matches!(context, "user" | "system") || rest.contains('?') {
        return false;
    }
    let Some((resource, permission)) = rest.split_once('.') else {
        return false;
    };
    if resource != "*" && resource != resource_type {
        return false;
    }
    match permission {
        "*" => true,
        "read" | "write" => permission == action.v1_word(),
        letters => is_v2_permission(letters) && letters.contains(action.v2_letter()),
    }
}

/// `cruds` letters, each at most once, in that order.
fn is_v2_permission(letters: &str) -> bool {
    let mut order = "cruds".chars();
    !letters.is_empty() && letters.chars().all(|l| order.any(|o| o == l))
}

/// The scopes that would allow `action`, for the 403 answer.
pub fn needed(resource_type: &str, action: Action) -> String {
    format!(
        "user/{resource_type}.{} or user/{resource_type}.{} (or the system/ forms)",
        action.v1_word(),
        action.v2_letter()
    )
}

/// The scopes of a token: `scope` (space-separated, RFC 8693 / SMART) or
/// `scp` (an array or a string, as some identity providers send).
pub fn token_scopes(claims: &serde_json::Value) -> Vec<String> {
    let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
    match (claims.get("scope"), claims.get("scp")) {
        (Some(serde_json::Value::String(s)), _) => words(s),
        (_, Some(serde_json::Value::String(s))) => words(s),
        (_, Some(serde_json::Value::Array(items))) => items
            .iter()
            .filter_map(|i| i.as_str())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_scopes() {
        assert!(allows(["user/Group.write"], "Group", Action::Update));
        assert!(allows(["system/Group.*"], "Group", Action::Delete));
        assert!(allows(["user/*.*"], "Group", Action::Create));
        assert!(allows(["user/*.read"], "Group", Action::Search));
        assert!(!allows(["user/Group.read"], "Group", Action::Update));
        assert!(!allows(["user/Patient.write"], "Group", Action::Update));
        assert!(!allows(["patient/Group.write"], "Group", Action::Update));
        assert!(!allows(
            ["Group.write", "openid", "fhirUser"],
            "Group",
            Action::Update
        ));
    }

    #[test]
    fn v2_scopes() {
        assert!(allows(["user/Group.u"], "Group", Action::Update));
        assert!(allows(["user/Group.cruds"], "Group", Action::Delete));
        assert!(allows(["system/*.rs"], "Group", Action::Search));
        assert!(allows(["user/Group.rs"], "Group", Action::Read));
        assert!(!allows(["user/Group.rs"], "Group", Action::Update));
        assert!(
            !allows(["user/Group.uc"], "Group", Action::Update),
            "letters out of order"
        );
        assert!(
            !allows(["user/Group.uu"], "Group", Action::Update),
            "letter twice"
        );
        assert!(!allows(["user/Group.x"], "Group", Action::Update));
        assert!(!allows(
            ["user/Group.u?identifier=x"],
            "Group",
            Action::Update
        ));
    }

    #[test]
    fn scopes_come_from_scope_or_scp() {
        assert_eq!(
            token_scopes(&json!({"scope": "openid user/Group.u"})),
            vec!["openid", "user/Group.u"]
        );
        assert_eq!(
            token_scopes(&json!({"scp": ["user/Group.read"]})),
            vec!["user/Group.read"]
        );
        assert!(token_scopes(&json!({"scope": 3})).is_empty());
        assert!(needed("Group", Action::Update).contains("user/Group.write"));
    }
}
