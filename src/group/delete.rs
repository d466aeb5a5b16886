//! Deleting a migrated Group: the legacy server deletes the document; the
//! proxy then tombstones the roster (a `removed` event for every member, kept
//! for audit) and forgets the Group's member state, so a Group later created
//! with the same id (and so the same `_uuid`) starts with no members.

use std::future::Future;

use crate::fhir::outcome::Outcome;
use crate::group::write::UpstreamReply;
use crate::store::events::{event_sequence, EventType, MemberEventRow};
use crate::store::member_slots::SlotRow;

use super::lease::Ending;
use super::{GroupError, GroupService};

/// Tombstones are staged in chunks of this many rows, so memory stays flat
/// whatever the roster size.
const TOMBSTONE_CHUNK: usize = 10_000;

impl GroupService {
    /// `None` when the Group is not migrated (the legacy server handles it
    /// alone); otherwise the legacy server's reply to `delete_upstream`.
    pub async fn delete_migrated<F>(
        &self,
        id: &str,
        request_id: &str,
        delete_upstream: F,
    ) -> Result<Option<UpstreamReply>, GroupError>
    where
        F: Future<Output = Result<UpstreamReply, Outcome>>,
    {
        if !self.documents.member_state(id).await?.in_clickhouse {
            return Ok(None);
        }
        let lease = self.take_lease_waiting(id).await?;
        let result = self
            .delete_under_lease(id, request_id, lease.token(), delete_upstream)
            .await;
        lease.end_logged(Ending::Done).await;
        result.map(Some)
    }

    async fn delete_under_lease<F>(
        &self,
        id: &str,
        request_id: &str,
        token: &str,
        delete_upstream: F,
    ) -> Result<UpstreamReply, GroupError>
    where
        F: Future<Output = Result<UpstreamReply, Outcome>>,
    {
        let head = self.documents.head(id).await?;
        // Every version of this generation was written before this instant,
        // and every version of a Group created again with this id after it.
        let started = mongodb::bson::DateTime::now();
        let reply = delete_upstream.await.map_err(GroupError::Outcome)?;
        let Some(head) = head.filter(|_| (200..300).contains(&reply.status)) else {
            return Ok(reply);
        };
        // The legacy server records the delete as the next version.
        let version = head.version + 1;
        let removals = Removals {
            group_key: &head.group_key,
            group_id: id,
            version,
            // One event per member at this version: a shared op index
            // keeps `sequence` in range for any roster size.
            op_index: 0,
            token,
            request_id,
            event_time_ms: chrono::Utc::now().timestamp_millis().max(0) as u64,
        };
        let mut roster = self.events.roster(&head.group_key, None)?;
        let mut rows = Vec::with_capacity(TOMBSTONE_CHUNK);
        let mut tombstones = 0;
        while let Some(member) = roster
            .next()
            .await
            .map_err(crate::store::events::EventStoreError::from)?
        {
            rows.push(removals.row(member));
            if rows.len() == TOMBSTONE_CHUNK {
                tombstones += rows.len();
                self.events.stage(std::mem::take(&mut rows)).await?;
            }
        }
        tombstones += rows.len();
        self.events.stage(rows).await?;
        self.events.publish(token).await?;
        self.documents.forget(id, &head.group_key, started).await?;
        tracing::info!(group = id, tombstones, "deleted Group's roster tombstoned");
        Ok(reply)
    }
}

/// `removed` events for current members, all at one position of a version.
pub(super) struct Removals<'a> {
    pub group_key: &'a str,
    pub group_id: &'a str,
    pub version: u64,
    pub op_index: usize,
    pub token: &'a str,
    pub request_id: &'a str,
    pub event_time_ms: u64,
}

impl Removals<'_> {
    /// The event removing `member` (present, as the roster lists it).
    pub fn row(&self, member: SlotRow) -> MemberEventRow {
        MemberEventRow {
            group_key: self.group_key.to_string(),
            group_id: self.group_id.to_string(),
            group_version: self.version,
            token: self.token.to_string(),
            request_id: self.request_id.to_string(),
            op_index: self.op_index as u32,
            sequence: event_sequence(self.version, self.op_index),
            slot_id: member.slot_id,
            order_key: member.order_key,
            match_key: member.match_key,
            event_type: EventType::Removed,
            element: member.element,
            inactive: member.inactive,
            member_delta: -1,
            active_delta: if member.inactive == 1 { 0 } else { -1 },
            event_time_ms: self.event_time_ms,
        }
    }
}
