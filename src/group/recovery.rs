//! Finishing writes whose writer stopped. A write is committed exactly when the
//! Group document carries its token at its version; then its staged events are
//! published. Otherwise it never happened and its lease is dropped.

use crate::store::group_documents::{GroupHead, MemberState};

use super::{GroupService, WriteError};

impl GroupService {
    pub async fn recover(
        &self,
        id: &str,
        head: &GroupHead,
        state: &MemberState,
    ) -> Result<(), WriteError> {
        if let Some(pending) = &state.pending {
            let committed = head.version == pending.version
                && head.commit_token.as_deref() == Some(pending.token.as_str());
            let live_writer = state.lease_token.as_deref() == Some(pending.token.as_str())
                && !state.lease_expired;
            if live_writer {
                // Its writer is still at work (before or after the commit point).
                return Ok(());
            }
            if committed
                && !self
                    .events
                    .is_published(&head.group_key, &pending.token)
                    .await?
            {
                tracing::warn!(group = id, token = %pending.token, "publishing events of a committed write whose writer stopped");
                self.events.publish(&pending.token).await?;
            }
            self.documents
                .clear_pending(id, &pending.token, committed)
                .await?;
            return Ok(());
        }
        if let (Some(token), true) = (&state.lease_token, state.lease_expired) {
            tracing::warn!(group = id, %token, "breaking an expired member write lease");
            self.documents.break_expired_lease(id, token).await?;
        }
        Ok(())
    }
}
