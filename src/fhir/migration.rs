//! Pure parts of `fhir-group-proxy migrate`: reading inline members, the
//! roster checksum that proves a copy complete, and the run's summary.
//!
//! A roster's checksum is order-independent (members are a set keyed by
//! reference): the wrapping sum of a 128-bit digest of every member, reference
//! and stored attributes alike, plus the member count. The inline array and
//! the roster read back from ClickHouse are equal exactly when both agree
//! (up to a digest collision).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::fhir::group_resource::{at_member, RosterEntry};
use crate::fhir::member_patch::{parse_member_value, MemberAttributes};
use crate::fhir::reference::EntityReference;

/// Count and order-independent digest of a roster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RosterChecksum {
    members: u64,
    digest_sum: u128,
}

impl RosterChecksum {
    pub fn add(&mut self, reference: &str, attributes: &MemberAttributes) {
        let mut hasher = Sha256::new();
        for part in [
            reference,
            attributes.period_start.as_deref().unwrap_or(""),
            attributes.period_end.as_deref().unwrap_or(""),
            if attributes.inactive { "1" } else { "0" },
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0]);
        }
        self.members += 1;
        self.digest_sum = self
            .digest_sum
            .wrapping_add(first_128_bits(&hasher.finalize()));
    }

    pub fn members(&self) -> u64 {
        self.members
    }
}

impl fmt::Display for RosterChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} members, checksum {:032x}",
            self.members, self.digest_sum
        )
    }
}

fn first_128_bits(digest: &[u8]) -> u128 {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    u128::from_be_bytes(bytes)
}

/// A short key for a reference, so a large roster can be checked for
/// duplicates and membership without keeping every reference string.
pub fn reference_key(reference: &EntityReference) -> u128 {
    first_128_bits(&Sha256::digest(reference.as_str().as_bytes()))
}

/// Reads `Group.member[index]` of a stored Group, as the proxy stores members.
pub fn inline_member(value: &Value, index: usize) -> Result<RosterEntry, String> {
    parse_member_value(value).map_err(|outcome| {
        format!(
            "{}; fix the member in the legacy server, then migrate again",
            at_member(outcome, index).first_diagnostics()
        )
    })
}

/// What the first pass over an inline member array learns: its checksum and
/// where each reference sits (to refuse duplicates and to find the members
/// that ClickHouse holds but the array does not).
#[derive(Debug, Default)]
pub struct InlineRoster {
    pub checksum: RosterChecksum,
    positions: HashMap<u128, usize>,
}

impl InlineRoster {
    /// Adds `Group.member[index]`; a reference listed twice is refused, since
    /// the member store keeps one entry per reference and the copy could never
    /// verify.
    pub fn add(&mut self, index: usize, entry: &RosterEntry) -> Result<(), String> {
        let (reference, attributes) = entry;
        if let Some(first) = self.positions.insert(reference_key(reference), index) {
            return Err(format!(
                "Group.member[{index}] lists {reference} again (first at member[{first}]); \
                 members are kept once per reference: remove the duplicate in the legacy \
                 server, then migrate again"
            ));
        }
        self.checksum.add(reference.as_str(), attributes);
        Ok(())
    }

    pub fn contains(&self, reference: &EntityReference) -> bool {
        self.positions.contains_key(&reference_key(reference))
    }
}

/// How one Group fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Its roster moved (forward: into ClickHouse; reverse: back inline).
    Moved { members: u64 },
    /// Nothing to do, and why.
    Skipped(String),
    /// Left as it was, and why.
    Failed(String),
}

/// The totals printed at the end of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationSummary {
    pub moved: u64,
    pub skipped: u64,
    pub members_moved: u64,
    /// (Group id, reason), in the order they happened.
    pub failures: Vec<(String, String)>,
}

impl MigrationSummary {
    pub fn record(&mut self, id: &str, outcome: &GroupOutcome) {
        match outcome {
            GroupOutcome::Moved { members } => {
                self.moved += 1;
                self.members_moved += members;
            }
            GroupOutcome::Skipped(_) => self.skipped += 1,
            GroupOutcome::Failed(why) => self.failures.push((id.to_string(), why.clone())),
        }
    }

    pub fn succeeded(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report: one totals line, then one line per failed Group.
    /// `moved_word` is "migrated" or "reversed".
    pub fn render(&self, moved_word: &str, elapsed: Duration) -> String {
        let mut text = format!(
            "Groups {moved_word}: {}, skipped: {}, failed: {}; members moved: {}; time: {:.1} s\n",
            self.moved,
            self.skipped,
            self.failures.len(),
            self.members_moved,
            elapsed.as_secs_f64()
        );
        for (id, why) in &self.failures {
            text.push_str(&format!("failed: Group/{id}: {why}\n"));
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fhir::reference::parse_reference;
    use serde_json::json;

    fn attributes(inactive: bool, end: Option<&str>) -> MemberAttributes {
        MemberAttributes {
            period_start: None,
            period_end: end.map(str::to_string),
            inactive,
        }
    }

    fn checksum(members: &[(&str, MemberAttributes)]) -> RosterChecksum {
        let mut sum = RosterChecksum::default();
        for (reference, attributes) in members {
            sum.add(reference, attributes);
        }
        sum
    }

    #[test]
    fn the_checksum_ignores_order_but_sees_every_member_and_attribute() {
        let a = ("Patient/a", attributes(false, None));
        let b = ("Patient/b", attributes(true, Some("2025-01-01")));
        let both = checksum(&[a.clone(), b.clone()]);
        assert_eq!(both, checksum(&[b.clone(), a.clone()]));
        assert_eq!(both.members(), 2);
        assert_ne!(both, checksum(std::slice::from_ref(&a)), "a member missing");
        assert_ne!(
            both,
            checksum(&[
                a.clone(),
                ("Patient/b", attributes(false, Some("2025-01-01")))
            ]),
            "an attribute changed"
        );
        assert_ne!(
            both,
            checksum(&[a.clone(), ("Patient/c", b.1.clone())]),
            "another reference, same count"
        );
        assert_ne!(
            checksum(&[("Patient/a", attributes(false, Some("x")))]),
            checksum(&[("Patient/ax", attributes(false, None))]),
            "fields are separated, not concatenated"
        );
        assert!(both.to_string().starts_with("2 members, checksum "));
    }

    #[test]
    fn inline_members_are_read_like_the_proxy_stores_them() {
        let (reference, read) = inline_member(
            &json!({"entity": {"reference": "Patient/1"}, "inactive": true,
                    "period": {"start": "2024-01-01"}}),
            0,
        )
        .unwrap();
        assert_eq!(reference.as_str(), "Patient/1");
        assert!(read.inactive);
        assert_eq!(read.period_start.as_deref(), Some("2024-01-01"));

        let error = inline_member(&json!({"entity": {"reference": "not a ref"}}), 7).unwrap_err();
        assert!(error.starts_with("Group.member[7]: "), "{error}");
        assert!(error.contains("migrate again"), "{error}");
        let error = inline_member(
            &json!({"entity": {"reference": "Patient/1"}, "extension": []}),
            2,
        )
        .unwrap_err();
        assert!(
            error.contains("member[2]") && error.contains("extension"),
            "{error}"
        );
    }

    #[test]
    fn an_inline_roster_refuses_duplicates_and_knows_its_members() {
        let entry = |r: &str| (parse_reference(r).unwrap(), MemberAttributes::default());
        let mut roster = InlineRoster::default();
        roster.add(0, &entry("Patient/1")).unwrap();
        roster.add(1, &entry("Patient/2")).unwrap();
        let error = roster.add(2, &entry("Patient/1")).unwrap_err();
        assert!(
            error.contains("member[2]")
                && error.contains("member[0]")
                && error.contains("Patient/1"),
            "{error}"
        );
        assert!(roster.contains(&parse_reference("Patient/2").unwrap()));
        assert!(!roster.contains(&parse_reference("Patient/3").unwrap()));
        assert_eq!(roster.checksum.members(), 2);
    }

    #[test]
    fn the_summary_counts_and_lists_failures() {
        let mut summary = MigrationSummary::default();
        summary.record("a", &GroupOutcome::Moved { members: 10 });
        summary.record("b", &GroupOutcome::Moved { members: 5 });
        summary.record("c", &GroupOutcome::Skipped("already migrated".into()));
        assert!(summary.succeeded());
        summary.record("d", &GroupOutcome::Failed("verification failed".into()));
        assert!(!summary.succeeded());
        assert_eq!(
            summary.render("migrated", Duration::from_millis(2_340)),
            "Groups migrated: 2, skipped: 1, failed: 1; members moved: 15; time: 2.3 s\n\
             failed: Group/d: verification failed\n"
        );
    }
}
