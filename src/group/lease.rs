//! The per-Group write lock as a value: a [`Lease`] is taken once and ended
//! exactly once, on every path, because ending consumes it and dropping an
//! unended one (a cancelled or panicking write) still releases the lock.
//! And [`Backoff`], the one retry pace of every loop that waits for a Group.

use std::time::{Duration, Instant};

use crate::store::group_documents::{DocumentStoreError, GroupDocuments};

use super::{busy, GroupService, WriteError};

/// How a write under a lease ended, which says what happens to its
/// `pending` record when the lock is released.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Nothing of the write is visible: its own pending record goes too.
    NotCommitted,
    /// The write may have committed (the commit point failed midway), or it
    /// committed and could not be finished: the pending record stays for
    /// recovery, which reads the truth from the Group document.
    KeepPending,
}

/// This writer's hold on one Group's write lock.
pub(crate) struct Lease {
    documents: GroupDocuments,
    id: String,
    token: String,
    ended: bool,
}

impl Lease {
    /// The write's token: tags its staged events, its pending record and the
    /// Group version it commits.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// Ends the write and releases the lock.
    pub(super) async fn end(mut self, ending: Ending) -> Result<(), DocumentStoreError> {
        self.ended = true;
        match ending {
            // Only our own pending record: one a stopped writer left stays
            // for recovery even when this write fails.
            Ending::NotCommitted => self.documents.finish(&self.id, &self.token, false).await,
            Ending::KeepPending => self.documents.release_lease(&self.id, &self.token).await,
        }
    }

    /// Ends a committed write whose events are published: its pending record
    /// goes and the Group is marked stored in ClickHouse.
    pub(super) async fn end_committed(mut self) -> Result<(), DocumentStoreError> {
        self.ended = true;
        self.documents.finish(&self.id, &self.token, true).await
    }

    /// Releases the lock without touching any pending record (recovery and
    /// whole-Group operations that write none of their own).
    pub(crate) async fn release(self) -> Result<(), DocumentStoreError> {
        self.end(Ending::KeepPending).await
    }

    /// Ends the lease and logs a failure to release it: the lock then
    /// expires after `lease_ttl`, and nothing of the write is lost.
    pub(super) async fn end_logged(self, ending: Ending) {
        let id = self.id.clone();
        if let Err(e) = self.end(ending).await {
            tracing::warn!(group = %id, error = %e, "could not release the member write lock");
        }
    }
}

impl Drop for Lease {
    /// A write dropped midway (its task cancelled, or a panic): only the lock
    /// goes, never the pending record, since the write may have passed its
    /// commit point; the next writer's recovery settles it. Without a runtime
    /// (process exit) the lock expires on its own.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (documents, id, token) = (
            self.documents.clone(),
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            if let Err(e) = documents.release_lease(&id, &token).await {
                tracing::warn!(group = %id, error = %e, "could not release the lock of a dropped member write");
            }
        });
    }
}

impl GroupService {
    /// Takes Group `id`'s write lock for one attempt; `None` when another
    /// writer holds it (a lock whose holder died is broken first, so the
    /// next attempt can take it).
    pub(crate) async fn take_lease(&self, id: &str) -> Result<Option<Lease>, WriteError> {
        let token = uuid::Uuid::new_v4().to_string();
        if self
            .documents
            .acquire_lease(id, &token, self.settings.lease_ttl)
            .await?
        {
            return Ok(Some(Lease {
                documents: self.documents.clone(),
                id: id.to_string(),
                token,
                ended: false,
            }));
        }
        if let Some(holder) = self.documents.expired_lease_holder(id).await? {
            tracing::warn!(group = id, %holder, "breaking an expired member write lock");
            self.documents.break_expired_lease(id, &holder).await?;
        }
        Ok(None)
    }

    /// [`Self::take_lease`], waiting up to `write_wait`; 503 when the Group
    /// stays busy.
    pub(crate) async fn take_lease_waiting(&self, id: &str) -> Result<Lease, WriteError> {
        let mut backoff = Backoff::until(Instant::now() + self.settings.write_wait);
        loop {
            if let Some(lease) = self.take_lease(id).await? {
                return Ok(lease);
            }
            if !backoff.wait().await {
                return Err(busy(id));
            }
        }
    }
}

/// Jittered exponential waits, 2 ms doubling up to 50 ms, until a deadline:
/// writers that lost a race spread out instead of retrying in step.
pub(super) struct Backoff {
    next: Duration,
    deadline: Instant,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(2);
    const MOST: Duration = Duration::from_millis(50);

    pub(super) fn until(deadline: Instant) -> Self {
        Self {
            next: Self::FIRST,
            deadline,
        }
    }

    /// The next wait, never past the deadline; `None` once it has passed.
    fn next_wait(&mut self, now: Instant, jitter: f64) -> Option<Duration> {
        let left = self.deadline.checked_duration_since(now)?;
        if left.is_zero() {
            return None;
        }
        let wait = self.next.mul_f64(1.0 + jitter.clamp(0.0, 1.0));
        self.next = (self.next * 2).min(Self::MOST);
        Some(wait.min(left))
    }

    /// Waits before the next try; `false` (without waiting) once the
    /// deadline has passed.
    pub(super) async fn wait(&mut self) -> bool {
        let jitter = (uuid::Uuid::new_v4().as_u128() % 1024) as f64 / 1024.0;
        match self.next_wait(Instant::now(), jitter) {
            Some(wait) => {
                tokio::time::sleep(wait).await;
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_two_milliseconds_up_to_fifty() {
        let now = Instant::now();
        let mut backoff = Backoff::until(now + Duration::from_secs(10));
        let waits: Vec<u128> = (0..7)
            .map(|_| backoff.next_wait(now, 0.0).unwrap().as_millis())
            .collect();
        assert_eq!(waits, vec![2, 4, 8, 16, 32, 50, 50]);
    }

    #[test]
    fn backoff_jitter_adds_at_most_the_wait_itself() {
        let now = Instant::now();
        let mut backoff = Backoff::until(now + Duration::from_secs(10));
        assert_eq!(
            backoff.next_wait(now, 1.0),
            Some(Duration::from_millis(4)),
            "2 ms with full jitter"
        );
        assert_eq!(
            backoff.next_wait(now, 7.0),
            Some(Duration::from_millis(8)),
            "jitter beyond 1 is clamped"
        );
    }

    #[test]
    fn backoff_never_waits_past_its_deadline_and_stops_there() {
        let now = Instant::now();
        let mut backoff = Backoff::until(now + Duration::from_millis(3));
        assert_eq!(backoff.next_wait(now, 0.0), Some(Duration::from_millis(2)));
        assert_eq!(
            backoff.next_wait(now, 0.0),
            Some(Duration::from_millis(3)),
            "cut to what is left"
        );
        assert_eq!(backoff.next_wait(now + Duration::from_millis(3), 0.0), None);
        assert_eq!(backoff.next_wait(now + Duration::from_secs(1), 0.0), None);
    }
}
