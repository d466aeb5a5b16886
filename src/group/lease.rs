//! The per-Group write lock as a value: a [`Lease`] is taken once and ended
//! exactly once, on every path, because ending consumes it and dropping an
//! unended one (a cancelled or panicking write) still leaves the lock for
//! the next writer to settle (see `store::member_locks` for the protocol).
//! And [`Backoff`], the one retry pace of every loop that waits: for a
//! Group's lock, or for the legacy server's history entry of a split patch.

use std::time::{Duration, Instant};

use mongodb::bson::DateTime;

use crate::store::group_documents::DocumentStoreError;
use crate::store::member_locks::MemberLocks;

use super::{busy, GroupError, GroupService};

/// How a write under a lease ended, which says whether its lock (and the
/// record of the write it carries) goes or stays for the next writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ending {
    /// Nothing of the write is visible, or all of it is: the lock goes.
    Done,
    /// The write may have committed (its commit point failed midway): the
    /// lock stays, expired, and the next writer settles it from the Group
    /// document.
    Unknown,
    /// The write committed but its events could not be published: the lock
    /// stays, expired and marked committed, and the next writer (or the
    /// sweep) publishes them.
    CommittedUnpublished,
}

/// This writer's hold on one Group's write lock.
pub(crate) struct Lease {
    locks: MemberLocks,
    id: String,
    token: String,
    taken_at: DateTime,
    /// After this, another writer may take the lock over: the commit point
    /// is not passed any more (see [`Self::still_ours`]).
    good_until: Instant,
    ended: bool,
}

impl Lease {
    /// The write's token: tags its staged events, its lock and the Group
    /// version it commits.
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// When the lock was taken: the `meta.lastUpdated` the write commits
    /// (the lock records it, so recovery writes the same).
    pub(super) fn taken_at(&self) -> DateTime {
        self.taken_at
    }

    /// Whether the lease is safely within its time, by this process's clock:
    /// a writer that stalled (a pause, a slow store) past it stops before its
    /// commit point, since a taker may already have judged it dead.
    pub(super) fn still_ours(&self) -> bool {
        Instant::now() < self.good_until
    }

    /// Ends the write: releases the lock or leaves it for the next writer.
    pub(super) async fn end(mut self, ending: Ending) -> Result<(), DocumentStoreError> {
        self.ended = true;
        match ending {
            Ending::Done => self.locks.release(&self.id, &self.token).await,
            Ending::Unknown => {
                self.locks
                    .leave_unfinished(&self.id, &self.token, false)
                    .await
            }
            Ending::CommittedUnpublished => {
                self.locks
                    .leave_unfinished(&self.id, &self.token, true)
                    .await
            }
        }
    }

    /// Releases the lock (recovery and whole-Group operations, which leave
    /// nothing for the next writer to finish).
    pub(crate) async fn release(self) -> Result<(), DocumentStoreError> {
        self.end(Ending::Done).await
    }

    /// [`Self::end`], logging a failure: the lock then expires after
    /// `lease_ttl` with its record, and nothing of the write is lost.
    pub(super) async fn end_logged(self, ending: Ending) {
        let id = self.id.clone();
        if let Err(e) = self.end(ending).await {
            tracing::warn!(group = %id, error = %e, "could not release the member write lock");
        }
    }

    /// Records that the legacy server committed this split write's other half.
    pub(super) async fn mark_upstream_committed(&self) -> Result<bool, DocumentStoreError> {
        self.locks
            .mark_upstream_committed(&self.id, &self.token)
            .await
    }
}

impl Drop for Lease {
    /// A write dropped midway (its task cancelled, or a panic) may have
    /// passed its commit point: its lock is left expired, with its record,
    /// for the next writer to settle. Without a runtime (process exit) the
    /// lock expires on its own.
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (locks, id, token) = (
            self.locks.clone(),
            std::mem::take(&mut self.id),
            std::mem::take(&mut self.token),
        );
        runtime.spawn(async move {
            if let Err(e) = locks.leave_unfinished(&id, &token, false).await {
                tracing::warn!(group = %id, error = %e, "could not release the lock of a dropped member write");
            }
        });
    }
}

impl GroupService {
    /// Takes Group `id`'s write lock for one attempt; `None` when another
    /// writer holds it. `url`: the member write's request URL, recorded in
    /// the lock for recovery (`None` for holders that write no versions).
    /// An expired lock is taken over, and the writes its holders left
    /// unfinished are finished first.
    pub(crate) async fn take_lease(
        &self,
        id: &str,
        url: Option<&str>,
    ) -> Result<Option<Lease>, GroupError> {
        let token = uuid::Uuid::new_v4().to_string();
        let taken_at = DateTime::now();
        let ttl = self.settings.lease_ttl;
        let locks = self.documents.locks();
        let lease = |token: String| Lease {
            locks: locks.clone(),
            id: id.to_string(),
            token,
            taken_at,
            // A quarter of the lease is kept as margin for clock steps and
            // the commit's own round trip.
            good_until: Instant::now() + ttl - ttl / 4,
            ended: false,
        };
        let url_text = url.unwrap_or_default();
        if locks.acquire(id, &token, url_text, taken_at, ttl).await? {
            return Ok(Some(lease(token)));
        }
        let Some(found) = locks.find(id).await? else {
            return Ok(None);
        };
        if !found.expired {
            return Ok(None);
        }
        tracing::warn!(group = id, holder = %found.holder.token, "taking over an expired member write lock");
        if !locks
            .take_over(id, &found, &token, url_text, taken_at, ttl)
            .await?
        {
            return Ok(None);
        }
        let lease = lease(token);
        let unfinished: Vec<_> = found.writes().cloned().collect();
        if let Err(e) = self.finish_unfinished(id, &unfinished).await {
            // The records stay in our lock, which is left for the next taker.
            lease.end_logged(Ending::Unknown).await;
            return Err(e);
        }
        locks.clear_unfinished(id, lease.token()).await?;
        Ok(Some(lease))
    }

    /// [`Self::take_lease`], waiting up to `write_wait`; 503 when the Group
    /// stays busy.
    pub(crate) async fn take_lease_waiting(&self, id: &str) -> Result<Lease, GroupError> {
        let mut backoff = Backoff::until(Instant::now() + self.settings.write_wait);
        loop {
            if let Some(lease) = self.take_lease(id, None).await? {
                return Ok(lease);
            }
            if !backoff.wait().await {
                return Err(busy(id));
            }
        }
    }
}

/// Jittered exponential waits until a deadline: by default 2 ms doubling up
/// to 50 ms, so writers that lost a race spread out instead of retrying in
/// step; [`Backoff::paced`] for slower waits on another server.
pub(super) struct Backoff {
    next: Duration,
    most: Duration,
    deadline: Instant,
}

impl Backoff {
    const FIRST: Duration = Duration::from_millis(2);
    const MOST: Duration = Duration::from_millis(50);

    pub(super) fn until(deadline: Instant) -> Self {
        Self::paced(Self::FIRST, Self::MOST, deadline)
    }

    /// Waits from `first`, doubling up to `most`, until `deadline`.
    pub(super) fn paced(first: Duration, most: Duration, deadline: Instant) -> Self {
        Self {
            next: first,
            most,
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
        self.next = (self.next * 2).min(self.most);
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

    #[test]
    fn a_paced_backoff_doubles_from_its_first_wait_up_to_its_most() {
        let now = Instant::now();
        let mut backoff = Backoff::paced(
            Duration::from_millis(10),
            Duration::from_millis(500),
            now + Duration::from_secs(10),
        );
        let waits: Vec<u128> = (0..8)
            .map(|_| backoff.next_wait(now, 0.0).unwrap().as_millis())
            .collect();
        assert_eq!(waits, vec![10, 20, 40, 80, 160, 320, 500, 500]);
    }
}
