//! Pure parts of `fhir-group-proxy migrate`: the roster checksum that proves
//! a copy complete, and the run's summary.
//!
//! `member` is an ordered array kept element by element, so a roster's
//! checksum is order-dependent: SHA-256 over every element's JSON text, in
//! order, each followed by a separator, plus the count. The inline array and
//! the roster read back from ClickHouse are equal exactly when both agree
//! (up to a digest collision). Element texts are compared as the proxy
//! writes them (`serde_json` of the element), on both sides.

use std::fmt;
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Count and order-dependent digest of a roster.
#[derive(Clone, Default)]
pub struct RosterChecksum {
    members: u64,
    hasher: Sha256,
}

impl RosterChecksum {
    /// Adds the next element, as its JSON text.
    pub fn add(&mut self, element: &str) {
        self.hasher.update(element.as_bytes());
        // JSON text never holds a raw NUL byte.
        self.hasher.update([0]);
        self.members += 1;
    }

    pub fn members(&self) -> u64 {
        self.members
    }

    fn digest(&self) -> [u8; 32] {
        self.hasher.clone().finalize().into()
    }
}

impl PartialEq for RosterChecksum {
    fn eq(&self, other: &Self) -> bool {
        self.members == other.members && self.digest() == other.digest()
    }
}

impl Eq for RosterChecksum {}

impl fmt::Debug for RosterChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for RosterChecksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digest = self.digest();
        write!(f, "{} members, checksum ", self.members)?;
        for byte in &digest[..16] {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
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

    fn checksum(elements: &[&str]) -> RosterChecksum {
        let mut sum = RosterChecksum::default();
        for element in elements {
            sum.add(element);
        }
        sum
    }

    #[test]
    fn the_checksum_sees_order_duplicates_and_every_byte_of_every_element() {
        let (a, b) = (
            r#"{"entity":{"reference":"Patient/a"}}"#,
            r#"{"entity":{"reference":"Patient/b"}}"#,
        );
        let both = checksum(&[a, b]);
        assert_eq!(both, checksum(&[a, b]));
        assert_eq!(both.members(), 2);
        assert_ne!(both, checksum(&[b, a]), "order");
        assert_ne!(both, checksum(&[a]), "a member missing");
        assert_ne!(checksum(&[a, a]), checksum(&[a]), "a duplicate");
        assert_ne!(
            both,
            checksum(&[a, r#"{"entity":{"reference":"Patient/b","display":"B"}}"#])
        );
        assert_ne!(
            checksum(&["ab", "c"]),
            checksum(&["a", "bc"]),
            "element boundaries"
        );
        assert!(both.to_string().starts_with("2 members, checksum "));
    }

    #[test]
    fn the_summary_counts_and_lists_failures() {
        let mut summary = MigrationSummary::default();
        summary.record("a", &GroupOutcome::Moved { members: 3 });
        summary.record("b", &GroupOutcome::Skipped("x".into()));
        summary.record("c", &GroupOutcome::Failed("why".into()));
        assert!(!summary.succeeded());
        let text = summary.render("migrated", Duration::from_millis(1500));
        assert!(text.starts_with("Groups migrated: 1, skipped: 1, failed: 1; members moved: 3"));
        assert!(text.contains("failed: Group/c: why"));
    }
}
