//! What a Group read needs from the member store.

use crate::store::events::MemberCounts;

use super::{GroupService, WriteError};

pub struct RosterForRead {
    pub group_key: String,
    pub counts: MemberCounts,
    state: crate::store::group_documents::MemberState,
}

impl RosterForRead {
    /// Whether an inline array in the legacy server's answer at `version`
    /// is drift rather than the copy an interrupted migration left.
    pub fn inline_array_is_drift(&self, version: Option<u64>) -> bool {
        version.is_none_or(|v| self.state.inline_array_is_drift(v))
    }
}

impl GroupService {
    /// `None` when Group `id` keeps its members in MongoDB (or is unknown): the
    /// legacy server answers such reads itself.
    pub async fn roster_for_read(&self, id: &str) -> Result<Option<RosterForRead>, WriteError> {
        let state = self.documents.member_state(id).await?;
        if !state.in_clickhouse {
            return Ok(None);
        }
        let Some(head) = self.documents.head(id).await? else {
            return Ok(None);
        };
        let counts = self.events.counts(&head.group_key).await?;
        Ok(Some(RosterForRead {
            group_key: head.group_key,
            counts,
            state,
        }))
    }
}

/// Most migrated Groups one member search may return (their ids go upstream
/// in one `_id` list).
pub const MAX_GROUPS_PER_MEMBER_SEARCH: usize = 500;

impl GroupService {
    /// The migrated Groups that currently hold any of `references`, with
    /// their active member counts, by FHIR id.
    pub async fn migrated_groups_with(
        &self,
        references: &[String],
    ) -> Result<Vec<(String, i64)>, WriteError> {
        let names: Vec<&str> = references.iter().map(String::as_str).collect();
        let groups = self
            .events
            .groups_with_members(&names, MAX_GROUPS_PER_MEMBER_SEARCH + 1)
            .await?;
        if groups.len() > MAX_GROUPS_PER_MEMBER_SEARCH {
            return Err(WriteError::Outcome(crate::fhir::outcome::Outcome::error(
                400,
                crate::fhir::outcome::IssueType::TooCostly,
                format!(
                    "more than {MAX_GROUPS_PER_MEMBER_SEARCH} Groups hold these members; \
                     narrow the search"
                ),
            )));
        }
        // Groups not migrated (a reversed or unfinished migration) may keep
        // events in ClickHouse; their inline members are the truth.
        let ids: Vec<&str> = groups.iter().map(|g| g.group_id.as_str()).collect();
        let migrated = self.documents.migrated_among(&ids).await?;
        let groups: Vec<_> = groups
            .into_iter()
            .filter(|g| migrated.contains(&g.group_id))
            .collect();
        let keys: Vec<&str> = groups.iter().map(|g| g.group_key.as_str()).collect();
        let counts = self.events.counts_of(&keys).await?;
        Ok(groups
            .into_iter()
            .map(|g| {
                let active = counts.get(&g.group_key).map_or(0, |c| c.active_members);
                (g.group_id, active)
            })
            .collect())
    }
}
