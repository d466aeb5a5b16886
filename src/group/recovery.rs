//! Finishing a write whose writer stopped: one whose lock a new writer took
//! over (see `store::member_locks`), or one an earlier release recorded as
//! `pending` in MemberState. Runs under the Group's write lock. The write
//! committed exactly when the Group document carries its token at its last
//! version (or, for a split patch, when the upstream confirmed its half, or
//! its writer saw the commit pass); then its history is completed and its
//! staged events are published. Otherwise it never happened, and its staged
//! events stay invisible.

use std::sync::atomic::Ordering;
use std::time::Duration;

use mongodb::bson::Document;

use crate::store::group_documents::{GroupHead, PendingWrite};
use crate::store::group_history::HistoryEntry;
use crate::store::member_locks::LockedWrite;

use super::{GroupError, GroupService};

impl GroupService {
    /// Finishes the writes of the lock holders this writer took over. The
    /// versions a write was to make are those of its staged events; a
    /// holder that staged none (it stopped before, or writes no versions)
    /// left nothing to finish.
    pub(super) async fn finish_unfinished(
        &self,
        id: &str,
        writes: &[LockedWrite],
    ) -> Result<(), GroupError> {
        for write in writes {
            // Migrations, deletes and sweeps record no URL: their staged
            // events are never published by anyone else. So do the locks of
            // releases that recorded their writes in MemberState instead.
            if write.url.is_empty() {
                continue;
            }
            let staged = self.events.staged_request_ids(&write.token).await?;
            let (Some(&from), Some(&to)) = (staged.keys().min(), staged.keys().max()) else {
                continue;
            };
            let Some(head) = self.documents.head(id).await? else {
                continue;
            };
            let pending = PendingWrite {
                token: write.token.clone(),
                version: to,
                from_version: from,
                url: write.url.clone(),
                request_id: staged.get(&from).cloned().unwrap_or_default(),
                committed_at: write.taken_at,
                upstream_committed: write.upstream_committed,
                committed: write.committed,
            };
            if self.settle(id, &head, &pending).await? {
                self.documents.mark_stored_in_clickhouse(id).await?;
            }
        }
        Ok(())
    }

    /// Finishes a write an earlier release left `pending` in MemberState,
    /// and clears that record.
    pub async fn recover_pending(
        &self,
        id: &str,
        head: &GroupHead,
        pending: &PendingWrite,
    ) -> Result<(), GroupError> {
        let committed = self.settle(id, head, pending).await?;
        self.documents
            .clear_pending(id, &pending.token, committed)
            .await?;
        Ok(())
    }

    /// Publishes a stopped write's events and completes its history when it
    /// committed; whether it did.
    async fn settle(
        &self,
        id: &str,
        head: &GroupHead,
        pending: &PendingWrite,
    ) -> Result<bool, GroupError> {
        let committed = pending.upstream_committed
            || pending.committed
            || (head.version == pending.version
                && head.commit_token.as_deref() == Some(pending.token.as_str()))
            || (head.version > pending.version && self.superseded_commit(id, pending).await?);
        if committed {
            // History first, as the commit path writes it: once the roster
            // shows the write, every version it made is readable.
            if !pending.upstream_committed {
                self.complete_history(id, pending).await?;
            }
            if !self
                .events
                .is_published(&head.group_key, &pending.token)
                .await?
            {
                tracing::warn!(group = id, token = %pending.token, "publishing the events of a committed write whose writer stopped");
                self.events.publish(&pending.token).await?;
            } else {
                // Published, but the insert may have been cut off between
                // the events table and its views.
                if self
                    .events
                    .repair_commit_records(&head.group_key, &pending.token)
                    .await?
                {
                    tracing::warn!(group = id, token = %pending.token, "commit records of a published write rewritten (its insert was cut off)");
                }
                if self
                    .events
                    .repair_views(&head.group_key, &pending.token)
                    .await?
                {
                    tracing::warn!(group = id, token = %pending.token, "member counts corrected after a cut-off publication");
                }
            }
        } else {
            tracing::warn!(group = id, token = %pending.token, "dropping a write that never committed");
        }
        Ok(committed)
    }
}

impl GroupService {
    /// The document moved past the pending write's versions, so its commit
    /// token tells nothing any more (legacy rewrites drop unknown fields). The
    /// first version it would have made tells: the legacy server writes a
    /// history entry for every version it makes, so that version is ours
    /// when its entry is ours or missing (our writer stopped before writing
    /// it), and another writer's when the entry names another request.
    async fn superseded_commit(
        &self,
        id: &str,
        pending: &PendingWrite,
    ) -> Result<bool, GroupError> {
        let Some(request_id) = self
            .documents
            .history_request_id(id, pending.from_version)
            .await?
        else {
            return Ok(true);
        };
        let ours = self.events.staged_request_ids(&pending.token).await?;
        Ok(request_id == pending.request_id || ours.values().any(|r| *r == request_id))
    }

    /// Writes the history entries a committed write's stopped writer did not:
    /// every version it committed is readable as `_history/{vid}`. A member
    /// write changes only the version metadata, so each entry is the Group as
    /// committed with its own `versionId`: the document itself while it is
    /// still at the write's last version, else the version before the write
    /// (its history entry) with the commit's metadata. When neither is there,
    /// the entry is not made up: it is reported (log and metric).
    async fn complete_history(&self, id: &str, pending: &PendingWrite) -> Result<(), GroupError> {
        let mut missing = Vec::new();
        for version in pending.from_version..=pending.version {
            if !self.documents.has_history(id, version).await? {
                missing.push(version);
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let Some(document) = self.committed_document(id, pending).await? else {
            crate::operations::metrics::metrics().history_entries_lost(missing.len());
            tracing::error!(group = id, versions = ?missing, "history entries of a committed write cannot be rebuilt: neither the Group at it nor the version before it is known");
            return Ok(());
        };
        let request_ids = self.events.staged_request_ids(&pending.token).await?;
        let entries: Vec<(&str, Document)> = missing
            .iter()
            .map(|&version| {
                let request_id = request_ids
                    .get(&version)
                    .map_or(pending.request_id.as_str(), String::as_str);
                (request_id, super::plan::at_version(&document, version))
            })
            .collect();
        self.documents
            .insert_history(
                entries
                    .iter()
                    .map(|(request_id, entry)| HistoryEntry {
                        resource: entry,
                        request_id,
                        method: "PATCH",
                        url: &pending.url,
                        // The ops are not kept past the writer: the entry names no outcome.
                        patch_ops: &[],
                    })
                    .collect(),
            )
            .await?;
        tracing::warn!(
            group = id,
            versions = ?missing,
            "history entries of a committed write written by recovery"
        );
        Ok(())
    }
}

impl GroupService {
    /// The Group as the pending write committed it (its last version).
    async fn committed_document(
        &self,
        id: &str,
        pending: &PendingWrite,
    ) -> Result<Option<mongodb::bson::Document>, GroupError> {
        let document = self.documents.document(id).await?;
        if let Some(document) = document
            .filter(|d| crate::store::group_documents::version_of(d) == Some(pending.version))
        {
            return Ok(Some(document));
        }
        let (Some(committed_at), Some(before)) =
            (pending.committed_at, pending.from_version.checked_sub(1))
        else {
            return Ok(None);
        };
        let Some(mut resource) = self.documents.history_resource(id, before).await? else {
            return Ok(None);
        };
        // The members live in ClickHouse at every version this write made.
        resource.remove("member");
        resource.insert(
            "_memberStorage",
            crate::store::group_documents::STORAGE_CLICKHOUSE,
        );
        if let Ok(meta) = resource.get_document_mut("meta") {
            meta.insert("versionId", pending.version.to_string());
            meta.insert("lastUpdated", committed_at);
        }
        Ok(Some(resource))
    }
}

/// Most Groups one sweep looks at.
const SWEEP_BATCH: i64 = 100;

impl GroupService {
    /// Finishes writes left pending on any Group (by a writer that stopped, or
    /// whose events could not be published while ClickHouse was away), so
    /// reads become whole again without waiting for the next write. Groups
    /// busy with a live writer are skipped: that writer recovers them.
    pub async fn recover_stalled_writes(&self) -> Result<usize, GroupError> {
        let mut recovered = 0;
        let mut ids = self.documents.locks().expired_ids(SWEEP_BATCH).await?;
        // Pending records come only from earlier releases: looked for until
        // none is left, then never again.
        if !self.no_earlier_pending.load(Ordering::Relaxed) {
            let pending = self
                .documents
                .groups_with_pending_writes(SWEEP_BATCH)
                .await?;
            if pending.is_empty() {
                self.no_earlier_pending.store(true, Ordering::Relaxed);
            }
            ids.extend(pending);
        }
        ids.sort();
        ids.dedup();
        for id in ids {
            // Taking an expired lock over finishes the writes it records.
            let Some(lease) = self.take_lease(&id, None).await? else {
                continue;
            };
            let result = self.recover_under_lease(&id).await;
            lease.release().await?;
            result?;
            recovered += 1;
        }
        Ok(recovered)
    }

    async fn recover_under_lease(&self, id: &str) -> Result<(), GroupError> {
        let state = self.documents.member_state(id).await?;
        let (Some(pending), Some(head)) = (state.pending, self.documents.head(id).await?) else {
            return Ok(());
        };
        self.recover_pending(id, &head, &pending).await
    }

    /// Runs [`Self::recover_stalled_writes`] every `interval`, forever.
    pub async fn sweep_stalled_writes(self, interval: Duration) {
        loop {
            tokio::time::sleep(interval).await;
            match self.recover_stalled_writes().await {
                Ok(0) => {}
                Ok(n) => tracing::info!(groups = n, "finished member writes left pending"),
                Err(e) => {
                    tracing::debug!(error = %e, "pending-write sweep skipped: a store is unavailable")
                }
            }
        }
    }
}
