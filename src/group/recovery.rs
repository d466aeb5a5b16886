//! Finishing a write whose writer stopped after marking it `pending`. Runs
//! under the Group's write lock. The write committed exactly when the Group
//! document carries its token at its version (or, for a split patch, when the
//! upstream confirmed its half); then its staged events are published.
//! Otherwise it never happened, and its staged events stay invisible.

use crate::store::group_documents::{GroupHead, PendingWrite};

use super::{GroupService, WriteError};

impl GroupService {
    pub async fn recover_pending(
        &self,
        id: &str,
        head: &GroupHead,
        pending: &PendingWrite,
    ) -> Result<(), WriteError> {
        let committed = pending.upstream_committed
            || (head.version == pending.version
                && head.commit_token.as_deref() == Some(pending.token.as_str()));
        if committed
            && !self
                .events
                .is_published(&head.group_key, &pending.token)
                .await?
        {
            tracing::warn!(group = id, token = %pending.token, "publishing the events of a committed write whose writer stopped");
            self.events.publish(&pending.token).await?;
        } else if !committed {
            tracing::warn!(group = id, token = %pending.token, "dropping a write that never committed");
        }
        self.documents
            .clear_pending(id, &pending.token, committed)
            .await?;
        Ok(())
    }
}
