//! What a Group read needs from the member store.

use crate::store::events::MemberCounts;

use super::{GroupService, WriteError};

pub struct RosterForRead {
    pub group_key: String,
    pub counts: MemberCounts,
}

impl GroupService {
    /// `None` when Group `id` keeps its members in MongoDB (or is unknown): the
    /// legacy server answers such reads itself.
    pub async fn roster_for_read(&self, id: &str) -> Result<Option<RosterForRead>, WriteError> {
        if !self.documents.member_state(id).await?.in_clickhouse {
            return Ok(None);
        }
        let Some(head) = self.documents.head(id).await? else {
            return Ok(None);
        };
        let counts = self.events.counts(&head.group_key).await?;
        Ok(Some(RosterForRead {
            group_key: head.group_key,
            counts,
        }))
    }
}
