//! What a Group read needs from the member store.

use crate::store::events::EventStoreError;
use crate::store::group_documents::GroupHead;
use crate::store::member_slots::{MemberCounts, PageRow, SlotRow};

use super::{GroupError, GroupService};

pub struct RosterForRead {
    pub group_key: String,
    pub counts: MemberCounts,
    state: crate::store::group_documents::MemberState,
}

impl RosterForRead {
    /// The member key of the generation a version of the Group belongs to,
    /// told by when that version was written (`last_updated`): a Group
    /// deleted and created again with the same id starts its versions over,
    /// so a version number alone does not say which roster it had. `None`:
    /// the version belongs to a generation whose roster the proxy never kept.
    pub fn key_for_version(&self, last_updated: Option<&str>) -> Option<&str> {
        let written = last_updated
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.timestamp_millis());
        for past in &self.state.past {
            match written {
                Some(written) if written <= past.deleted_at.timestamp_millis() => {
                    return Some(&past.key)
                }
                Some(_) => {}
                // Undated: only safe when no generation came before.
                None => return None,
            }
        }
        self.state.in_clickhouse.then_some(self.group_key.as_str())
    }

    /// Whether an inline array in the legacy server's answer at `version`
    /// is drift rather than the copy an interrupted migration left.
    pub fn inline_array_is_drift(&self, version: Option<u64>) -> bool {
        version.is_none_or(|v| self.state.inline_array_is_drift(v))
    }
}

impl GroupService {
    /// One page of a kept roster (see [`crate::store::events::EventStore::roster_page`]).
    pub async fn roster_page(
        &self,
        group_key: &str,
        after: (&str, &str),
        changed_since_ms: Option<u64>,
        limit: usize,
    ) -> Result<Vec<PageRow>, EventStoreError> {
        self.events
            .roster_page(group_key, after, changed_since_ms, limit)
            .await
    }

    /// A kept roster, current or as of `at_version`, in array order, as a
    /// stream (see [`crate::store::events::EventStore::roster`]).
    pub fn roster(
        &self,
        group_key: &str,
        at_version: Option<u64>,
    ) -> Result<clickhouse::query::RowCursor<SlotRow>, EventStoreError> {
        self.events.roster(group_key, at_version)
    }

    /// `None` when Group `id` keeps its members in MongoDB (or is unknown): the
    /// legacy server answers such reads itself.
    pub async fn roster_for_read(&self, id: &str) -> Result<Option<RosterForRead>, GroupError> {
        self.roster_for(id, false).await
    }

    /// [`Self::roster_for_read`] for reads of versions: also for a Group
    /// deleted (and perhaps created again) after the proxy kept its roster.
    pub async fn roster_for_versions(&self, id: &str) -> Result<Option<RosterForRead>, GroupError> {
        self.roster_for(id, true).await
    }

    async fn roster_for(
        &self,
        id: &str,
        versions: bool,
    ) -> Result<Option<RosterForRead>, GroupError> {
        let state = self.documents.member_state(id).await?;
        let kept_a_roster = state.in_clickhouse || (versions && !state.past.is_empty());
        if !kept_a_roster {
            self.refuse_other_addresses(id).await?;
            return Ok(None);
        }
        let head = match self.documents.head(id).await? {
            Some(head) => head,
            // Deleted: only its past generations are read.
            None if versions => GroupHead {
                id: id.to_string(),
                group_key: String::new(),
                version: 0,
                last_updated: None,
                commit_token: None,
                authority: None,
                marks: None,
            },
            None => return Ok(None),
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
    /// The ids of the migrated Groups that currently hold any of
    /// `references`.
    pub async fn migrated_groups_with(
        &self,
        references: &[String],
    ) -> Result<Vec<String>, GroupError> {
        let names: Vec<&str> = references.iter().map(String::as_str).collect();
        let groups = self
            .events
            .groups_with_members(&names, MAX_GROUPS_PER_MEMBER_SEARCH + 1)
            .await?;
        if groups.len() > MAX_GROUPS_PER_MEMBER_SEARCH {
            return Err(GroupError::Outcome(crate::fhir::outcome::Outcome::error(
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
        Ok(groups
            .into_iter()
            .map(|g| g.group_id)
            .filter(|id| migrated.contains(id))
            .collect())
    }
}

impl GroupService {
    /// The roster of Group `id` at `version` (the version a write made) as
    /// stored element texts, in array order, for that write's answer: a
    /// later write (the next patch of a batch, another proxy) is not shown.
    /// `group_key`: where the write stored it, when the write knows (else
    /// looked up). More than `limit` members are answered like a read:
    /// `quantity` and a `$members` link.
    pub async fn roster_for_answer(
        &self,
        id: &str,
        group_key: Option<&str>,
        version: u64,
        limit: usize,
    ) -> Result<AnswerRoster, GroupError> {
        let key = match group_key {
            Some(key) => key.to_string(),
            None => match self.documents.head(id).await? {
                Some(head) => head.group_key,
                None => return Ok(AnswerRoster::Members(Vec::new())),
            },
        };
        let mut cursor = self.events.roster(&key, Some(version))?;
        let mut members = Vec::new();
        while let Some(row) = cursor
            .next()
            .await
            .map_err(crate::store::events::EventStoreError::from)?
        {
            if members.len() == limit {
                let counts = self.events.counts(&key).await?;
                return Ok(AnswerRoster::Paged {
                    active_members: counts.active_members,
                });
            }
            members.push(row.element);
        }
        Ok(AnswerRoster::Members(members))
    }
}

/// The roster a write's answer shows.
pub enum AnswerRoster {
    /// Every member of the version written, as stored element texts.
    Members(Vec<String>),
    /// Too many to inline: the active count (the current one, which may
    /// already be a later version's).
    Paged { active_members: i64 },
}
