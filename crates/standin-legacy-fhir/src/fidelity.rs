//! How closely the stand-in imitates the real legacy server
//! (icanbwell/fhir-server): one toggle per behaviour, and two presets.
//!
//! `simple` is the stand-in as the proxy's tests have always known it;
//! `real` reproduces what the real server was measured to do (see the crate
//! README for the table). Tests may start from either preset and flip one
//! toggle.

use std::fmt;
use std::str::FromStr;

/// The two presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Profile {
    /// Plain FHIR R4 behaviour, for tests that need the simpler server.
    Simple,
    /// As the real legacy server behaves (the default: the proxy's tests
    /// must catch what its users would hit).
    #[default]
    Real,
}

impl FromStr for Profile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "simple" => Ok(Profile::Simple),
            "real" => Ok(Profile::Real),
            other => Err(format!(
                "unknown stand-in profile {other:?}: expected real or simple"
            )),
        }
    }
}

impl fmt::Display for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Profile::Simple => "simple",
            Profile::Real => "real",
        })
    }
}

/// One switch per real-server behaviour. `$merge` and access tokens are not
/// here: they are on in both profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fidelity {
    /// POST ignores a client `id` and assigns a UUID.
    pub post_assigns_id: bool,
    /// `Location: 4_0_0/Group/<id>` (relative, no `_history`), an absolute
    /// `Content-Location`, and the real server's `Last-Modified` forms.
    pub real_headers: bool,
    /// Stored documents get `_uuid` (UUIDv5 in the OID namespace, or the id
    /// when it is a UUID), `_sourceId`, `_sourceAssigningAuthority`,
    /// `_access` and a `sourceAssigningAuthority` security tag.
    pub real_internal_fields: bool,
    /// Stored references get `_uuid`, `_sourceId`, `_sourceAssigningAuthority`;
    /// responses carry them as `extension`s instead, and resources get
    /// `identifier` [sourceId, uuid].
    pub reference_enrichment: bool,
    /// Writes without `meta.source` and an owner tag are refused with 400.
    pub require_meta: bool,
    /// A Group with members must have `actual: true` (FHIR grp-1), else 400.
    pub group_invariant: bool,
    /// History entries as the real server writes them: `id` = `_uuid`,
    /// `response` null for creates and the applied patches for updates.
    pub real_history: bool,
    /// `If-Match` is ignored on PATCH (honoured on PUT in both profiles;
    /// with this on, PUT uses the real "Version conflict" wording).
    pub patch_ignores_if_match: bool,
    /// A failed or malformed patch answers 400 (not 422); a patch, PUT or
    /// `$merge` that changes nothing creates no version; PATCH may not touch
    /// `_` fields.
    pub real_patch: bool,
    /// PUT and `$merge` keep the stored `meta.source` and owner /
    /// sourceAssigningAuthority tags, as the real server's merger does.
    pub keep_non_writable_fields: bool,
    /// A search Bundle's `total` is 0 unless `_total` is asked for.
    pub total_only_on_request: bool,
    /// History entries are written after the answer (the real server's
    /// post-request processor), so they appear a little after the version.
    pub history_after_answer: bool,
}

impl Fidelity {
    /// Every toggle off: the stand-in as the proxy's tests know it.
    pub fn simple() -> Self {
        Self {
            post_assigns_id: false,
            real_headers: false,
            real_internal_fields: false,
            reference_enrichment: false,
            require_meta: false,
            group_invariant: false,
            real_history: false,
            patch_ignores_if_match: false,
            real_patch: false,
            keep_non_writable_fields: false,
            total_only_on_request: false,
            history_after_answer: false,
        }
    }

    /// Every toggle on: as the real server behaves.
    pub fn real() -> Self {
        Self {
            post_assigns_id: true,
            real_headers: true,
            real_internal_fields: true,
            reference_enrichment: true,
            require_meta: true,
            group_invariant: true,
            real_history: true,
            patch_ignores_if_match: true,
            real_patch: true,
            keep_non_writable_fields: true,
            total_only_on_request: true,
            history_after_answer: true,
        }
    }

    pub fn of(profile: Profile) -> Self {
        match profile {
            Profile::Simple => Self::simple(),
            Profile::Real => Self::real(),
        }
    }
}

impl Default for Fidelity {
    fn default() -> Self {
        Self::of(Profile::default())
    }
}

impl From<Profile> for Fidelity {
    fn from(profile: Profile) -> Self {
        Self::of(profile)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_parse_case_insensitively_and_reject_others() {
        assert_eq!("real".parse::<Profile>(), Ok(Profile::Real));
        assert_eq!(" Simple ".parse::<Profile>(), Ok(Profile::Simple));
        assert!("faithful".parse::<Profile>().is_err());
        assert_eq!(Profile::Real.to_string(), "real");
    }

    #[test]
    fn the_default_is_the_real_profile() {
        assert_eq!(Fidelity::default(), Fidelity::real());
        assert_ne!(Fidelity::real(), Fidelity::simple());
    }
}
