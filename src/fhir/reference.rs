//! References to group members: `Type/id`, optionally `Type/id|sourceAssigningAuthority`
//! (the multi-tenant form of the Mongo-backed reference server).

use std::fmt;

/// A checked, normalized member reference. Only constructible through
/// [`parse_reference`], so everything stored was validated.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityReference(String);

impl EntityReference {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The resource type, e.g. `Patient`.
    pub fn resource_type(&self) -> &str {
        self.0.split('/').next().unwrap_or_default()
    }
}

impl fmt::Display for EntityReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why a reference was refused, in words for the OperationOutcome.
pub fn parse_reference(text: &str) -> Result<EntityReference, String> {
    let (local, source) = match text.split_once('|') {
        Some((local, source)) => (local, Some(source)),
        None => (text, None),
    };
    let (resource_type, id) = local
        .split_once('/')
        .ok_or_else(|| "expected the form Type/id, e.g. Patient/123".to_string())?;
    let type_ok = resource_type.len() <= 64
        && resource_type.starts_with(|c: char| c.is_ascii_uppercase())
        && resource_type.chars().all(|c| c.is_ascii_alphabetic());
    if !type_ok {
        return Err(format!(
            "'{resource_type}' is not a FHIR resource type (letters only, starting upper-case)"
        ));
    }
    let id_ok = (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !id_ok {
        return Err(format!("'{id}' is not a FHIR id (1-64 of A-Z a-z 0-9 - .)"));
    }
    if let Some(source) = source {
        let source_ok = (1..=128).contains(&source.len())
            && source
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !source_ok {
            return Err(format!(
                "'{source}' after '|' is not a valid source assigning authority"
            ));
        }
    }
    Ok(EntityReference(text.to_string()))
}

/// FHIR `id`: 1-64 of `A-Z a-z 0-9 - .`
pub fn is_fhir_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// A Group address as the reference server takes it: a FHIR id, or
/// `id|owner` (the id under one owner, when ids are shared by tenants).
pub fn is_group_address(address: &str) -> bool {
    match address.split_once('|') {
        None => is_fhir_id(address),
        Some((id, owner)) => {
            is_fhir_id(id)
                && !owner.is_empty()
                && owner
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_addresses_are_ids_or_ids_qualified_by_an_owner() {
        assert!(is_group_address("g1"));
        assert!(is_group_address("g1|bwell"));
        assert!(is_group_address("g1|client_a.b-c"));
        assert!(!is_group_address("g1|"));
        assert!(!is_group_address("|bwell"));
        assert!(!is_group_address("g1|a|b"));
        assert!(!is_group_address("g1|a/b"));
    }

    #[test]
    fn accepts_relative_references_with_optional_source() {
        for ok in ["Patient/123", "Practitioner/a-b.c", "Patient/1|client-a"] {
            assert_eq!(parse_reference(ok).unwrap().as_str(), ok);
        }
        assert_eq!(
            parse_reference("Patient/1|x").unwrap().resource_type(),
            "Patient"
        );
    }

    #[test]
    fn refuses_anything_else_with_a_reason() {
        for bad in [
            "",
            "Patient",
            "patient/1",
            "Patient/",
            "Patient/1/_history/2",
            "http://x/Patient/1",
            "Patient/{\"$gt\":\"\"}",
            "Patient/1'; DROP TABLE x",
            "Patient/1|",
            &format!("Patient/{}", "a".repeat(65)),
        ] {
            assert!(parse_reference(bad).is_err(), "{bad} should be refused");
        }
    }
}
