//! `Group_4_0_0_MemberLocks`: the one member write in flight per Group, and
//! what recovery needs to finish it if its writer stops.
//!
//! A lock document is taken by inserting it (`_id` = the Group id): only an
//! insert with a unique `_id` is atomic on MongoDB and FerretDB alike
//! (FerretDB 1.x runs conditional updates as find-then-update). It carries
//! the write's token and URL from the start, so a write records nothing else
//! before its commit point: its staged events (by token) and the Group
//! document (which the commit tags with the token) tell the rest.
//!
//! Deleting the lock ends a write. A write that may have committed without
//! finishing (its commit point failed midway, its events could not be
//! published, its task was dropped) leaves its lock *expired* instead, so
//! the record stays. The next writer takes an expired lock over: it claims
//! the dead token by inserting a takeover document (atomic again, so one
//! taker wins), moves the dead write's record into the lock's `unfinished`
//! list under its own token, and finishes those writes before its own.

use mongodb::bson::{doc, Bson, DateTime, Document};
use mongodb::Collection;

use super::mongo::{ids_where, is_duplicate_key, DocumentStoreError, LeaseHolder};

pub const MEMBER_LOCK_COLLECTION: &str = "Group_4_0_0_MemberLocks";
pub const MEMBER_LOCK_TAKEOVER_COLLECTION: &str = "Group_4_0_0_MemberLockTakeovers";

/// A write that took a Group's lock and may not have finished.
#[derive(Debug, Clone, PartialEq)]
pub struct LockedWrite {
    pub token: String,
    /// The request URL its history entries record.
    pub url: String,
    /// When it took the lock: the `meta.lastUpdated` its commit writes.
    pub taken_at: Option<DateTime>,
    /// Its writer saw the commit point pass (then could not publish).
    pub committed: bool,
    /// For split writes: the legacy server committed the version that
    /// carries the write's other changes.
    pub upstream_committed: bool,
}

/// A Group's lock as found.
#[derive(Debug, Clone, PartialEq)]
pub struct LockRecord {
    pub holder: LockedWrite,
    pub expired: bool,
    /// Writes of earlier holders taken over and not yet finished.
    pub unfinished: Vec<LockedWrite>,
}

impl LockRecord {
    /// Every write the lock records, oldest first: what a taker of the lock
    /// must finish.
    pub fn writes(&self) -> impl Iterator<Item = &LockedWrite> {
        self.unfinished.iter().chain(std::iter::once(&self.holder))
    }
}

#[derive(Clone)]
pub struct MemberLocks {
    holder: LeaseHolder,
    locks: Collection<Document>,
    takeovers: Collection<Document>,
}

fn expiry(ttl: std::time::Duration) -> DateTime {
    DateTime::from_millis(DateTime::now().timestamp_millis() + ttl.as_millis() as i64)
}

/// Long past: an expired lock is taken over at once.
fn expired() -> DateTime {
    DateTime::from_millis(0)
}

fn write_of(lock: &Document) -> Option<LockedWrite> {
    Some(LockedWrite {
        token: lock.get_str("token").ok()?.to_string(),
        url: lock.get_str("url").unwrap_or_default().to_string(),
        taken_at: lock.get_datetime("takenAt").ok().copied(),
        committed: lock.get_bool("committed").unwrap_or(false),
        upstream_committed: lock.get_bool("upstreamCommitted").unwrap_or(false),
    })
}

fn write_document(write: &LockedWrite) -> Document {
    let mut document = doc! {
        "token": &write.token,
        "url": &write.url,
        "committed": write.committed,
        "upstreamCommitted": write.upstream_committed,
    };
    if let Some(taken_at) = write.taken_at {
        document.insert("takenAt", taken_at);
    }
    document
}

/// The lock document as found: its holder, whether it expired, and the
/// writes of earlier holders it carries.
pub fn parse_lock(lock: &Document, now: DateTime) -> Option<LockRecord> {
    let holder = write_of(lock)?;
    let expired = lock
        .get_datetime("expiresAt")
        .map_or(true, |expires| *expires < now);
    let unfinished = lock
        .get_array("unfinished")
        .map(|writes| {
            writes
                .iter()
                .filter_map(Bson::as_document)
                .filter_map(write_of)
                .collect()
        })
        .unwrap_or_default();
    Some(LockRecord {
        holder,
        expired,
        unfinished,
    })
}

impl MemberLocks {
    pub fn new(database: &mongodb::Database, holder: LeaseHolder) -> Self {
        Self {
            holder,
            locks: database.collection(MEMBER_LOCK_COLLECTION),
            takeovers: database.collection(MEMBER_LOCK_TAKEOVER_COLLECTION),
        }
    }

    /// Takes Group `id`'s lock for the write `token` (of `url`) unless
    /// another writer holds it.
    pub async fn acquire(
        &self,
        id: &str,
        token: &str,
        url: &str,
        taken_at: DateTime,
        ttl: std::time::Duration,
    ) -> Result<bool, DocumentStoreError> {
        let lock = doc! {
            "_id": id, "token": token, "url": url, "expiresAt": expiry(ttl), "takenAt": taken_at,
            "owner": &self.holder.owner, "boot": &self.holder.boot,
        };
        match self.locks.insert_one(lock).await {
            Ok(_) => Ok(true),
            Err(e) if is_duplicate_key(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Group `id`'s lock, if taken.
    pub async fn find(&self, id: &str) -> Result<Option<LockRecord>, DocumentStoreError> {
        let lock = self.locks.find_one(doc! { "_id": id }).await?;
        Ok(lock.and_then(|lock| parse_lock(&lock, DateTime::now())))
    }

    /// Takes over the expired lock `dead` for the write `token`: `true` when
    /// this writer now holds it, with `dead`'s writes in its `unfinished`
    /// list; `false` when another taker won (or the lock changed), so the
    /// caller tries again later.
    pub async fn take_over(
        &self,
        id: &str,
        dead: &LockRecord,
        token: &str,
        url: &str,
        taken_at: DateTime,
        ttl: std::time::Duration,
    ) -> Result<bool, DocumentStoreError> {
        let claim = format!("{id}\n{}", dead.holder.token);
        let claimed = self
            .takeovers
            .insert_one(doc! { "_id": &claim, "expiresAt": expiry(ttl) })
            .await;
        match claimed {
            Ok(_) => {}
            Err(e) if is_duplicate_key(&e) => {
                // A taker that stopped midway leaves its claim: it expires.
                self.takeovers
                    .delete_one(doc! { "_id": &claim, "expiresAt": { "$lt": DateTime::now() } })
                    .await?;
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        }
        let unfinished: Vec<Bson> = dead
            .writes()
            .map(|w| Bson::Document(write_document(w)))
            .collect();
        let moved = self
            .locks
            .update_one(
                doc! { "_id": id, "token": &dead.holder.token },
                doc! {
                    "$set": {
                        "token": token, "url": url, "expiresAt": expiry(ttl), "takenAt": taken_at,
                        "owner": &self.holder.owner, "boot": &self.holder.boot,
                        "unfinished": unfinished,
                    },
                    "$unset": { "committed": "", "upstreamCommitted": "" },
                },
            )
            .await;
        // The dead token is off the lock now (or was already): nobody claims
        // it again, so the claim can go.
        if let Err(e) = self.takeovers.delete_one(doc! { "_id": &claim }).await {
            tracing::debug!(group = id, error = %e, "takeover claim left to expire");
        }
        Ok(moved?.matched_count > 0)
    }

    /// The taken-over writes are finished: the lock carries only its own.
    pub async fn clear_unfinished(&self, id: &str, token: &str) -> Result<(), DocumentStoreError> {
        self.update_own(id, token, doc! { "$unset": { "unfinished": "" } })
            .await?;
        Ok(())
    }

    /// Updates the lock of the write `token`; `false` when it is not ours.
    async fn update_own(
        &self,
        id: &str,
        token: &str,
        update: Document,
    ) -> Result<bool, DocumentStoreError> {
        let result = self
            .locks
            .update_one(doc! { "_id": id, "token": token }, update)
            .await?;
        Ok(result.matched_count > 0)
    }

    /// Ends the write `token`: its lock (and record) goes.
    pub async fn release(&self, id: &str, token: &str) -> Result<(), DocumentStoreError> {
        self.locks
            .delete_one(doc! { "_id": id, "token": token })
            .await?;
        Ok(())
    }

    /// Leaves the write `token` for the next writer to finish: its lock
    /// expires now and keeps its record (`committed`: it passed its commit
    /// point, whatever later writes do to the Group document).
    pub async fn leave_unfinished(
        &self,
        id: &str,
        token: &str,
        committed: bool,
    ) -> Result<(), DocumentStoreError> {
        let mut set = doc! { "expiresAt": expired() };
        if committed {
            set.insert("committed", true);
        }
        self.update_own(id, token, doc! { "$set": set }).await?;
        Ok(())
    }

    /// Records that the legacy server committed the other half of the split
    /// write `token`.
    pub async fn mark_upstream_committed(
        &self,
        id: &str,
        token: &str,
    ) -> Result<bool, DocumentStoreError> {
        self.update_own(id, token, doc! { "$set": { "upstreamCommitted": true } })
            .await
    }

    /// Extends our lock on Group `id` (long migrations); false when it is no
    /// longer ours.
    pub async fn renew(
        &self,
        id: &str,
        token: &str,
        ttl: std::time::Duration,
    ) -> Result<bool, DocumentStoreError> {
        self.update_own(id, token, doc! { "$set": { "expiresAt": expiry(ttl) } })
            .await
    }

    /// The locks an earlier run of this same process (same owner, another
    /// boot) left when it died expire now, so their Groups need not wait out
    /// the lease; their records stay for the next writer. How many.
    pub async fn expire_own_dead(&self) -> Result<u64, DocumentStoreError> {
        let result = self
            .locks
            .update_many(
                doc! { "owner": &self.holder.owner, "boot": { "$ne": &self.holder.boot } },
                doc! { "$set": { "expiresAt": expired() } },
            )
            .await?;
        Ok(result.modified_count)
    }

    /// The tokens of every write a lock records (holders and the writes
    /// they took over): writes that may still need their staged events.
    pub async fn recorded_tokens(&self) -> Result<Vec<String>, DocumentStoreError> {
        use futures_util::TryStreamExt;
        let locks: Vec<Document> = self.locks.find(doc! {}).await?.try_collect().await?;
        let now = DateTime::now();
        Ok(locks
            .iter()
            .filter_map(|lock| parse_lock(lock, now))
            .flat_map(|record| {
                record
                    .writes()
                    .map(|write| write.token.clone())
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    /// Ids of Groups whose lock expired (a writer stopped, or left its write
    /// unfinished), at most `limit`.
    pub async fn expired_ids(&self, limit: i64) -> Result<Vec<String>, DocumentStoreError> {
        ids_where(
            &self.locks,
            doc! { "expiresAt": { "$lt": DateTime::now() } },
            limit,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_reads_back_with_its_holder_its_expiry_and_the_writes_it_took_over() {
        let dead = LockedWrite {
            token: "dead".into(),
            url: "/Group/g".into(),
            taken_at: Some(DateTime::from_millis(5)),
            committed: true,
            upstream_committed: false,
        };
        let lock = doc! {
            "_id": "g", "token": "live", "url": "/Group/g",
            "expiresAt": DateTime::from_millis(2_000), "takenAt": DateTime::from_millis(1_000),
            "unfinished": [write_document(&dead)],
        };
        let record = parse_lock(&lock, DateTime::from_millis(1_500)).unwrap();
        assert_eq!(record.holder.token, "live");
        assert!(!record.expired);
        assert_eq!(record.unfinished, vec![dead]);
        let later = parse_lock(&lock, DateTime::from_millis(2_001)).unwrap();
        assert!(later.expired);
    }

    #[test]
    fn a_lock_written_by_an_earlier_release_reads_as_a_write_without_url() {
        let lock = doc! { "_id": "g", "token": "old", "expiresAt": DateTime::from_millis(1) };
        let record = parse_lock(&lock, DateTime::from_millis(2)).unwrap();
        assert_eq!(
            record.holder,
            LockedWrite {
                token: "old".into(),
                url: String::new(),
                taken_at: None,
                committed: false,
                upstream_committed: false,
            }
        );
        assert!(record.expired && record.unfinished.is_empty());
        assert!(parse_lock(&doc! { "_id": "g" }, DateTime::from_millis(2)).is_none());
    }
}
