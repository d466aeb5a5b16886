//! MongoDB access in the reference server's layout: `{Type}_4_0_0` holds the
//! current version of each resource, `{Type}_4_0_0_History` one entry per
//! version. No transactions (FerretDB has none): writes are guarded by a
//! compare-and-swap on `meta.versionId`, a unique index on `id`, and
//! in-process write locks.

use std::collections::HashSet;
use std::sync::Mutex;

use futures_util::TryStreamExt;
use mongodb::bson::{doc, Bson, Document};
use mongodb::error::{CommandError, ErrorKind, WriteError, WriteFailure};
use mongodb::options::IndexOptions;
use mongodb::{Collection, Database, IndexModel};

use crate::documents::stored_version;
use crate::locks::WriteLocks;

/// Resource types whose collections get their indexes when the stand-in
/// starts; others get them on their first write.
pub const PREINDEXED_TYPES: [&str; 2] = ["Group", "Patient"];

pub fn resource_collection(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0")
}

pub fn history_collection(resource_type: &str) -> String {
    format!("{resource_type}_4_0_0_History")
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{resource_type}/{id} already exists")]
    AlreadyExists { resource_type: String, id: String },
    #[error("MongoDB: {0}")]
    Mongo(#[from] mongodb::error::Error),
}

pub struct Storage {
    database: Database,
    /// Where `{Type}_4_0_0_History` lives: `database` unless a separate
    /// history database is configured (as the real server's
    /// `RESOURCE_HISTORY_MONGO_DB_NAME`).
    history_database: Database,
    /// Serialises this process's writes of one resource (see `locks`).
    pub write_locks: WriteLocks,
    /// Resource types whose indexes this process has already ensured.
    indexed: Mutex<HashSet<String>>,
    /// History entries written after their answer, not yet inserted.
    pending_history: std::sync::Arc<PendingHistory>,
}

#[derive(Default)]
struct PendingHistory {
    count: std::sync::atomic::AtomicUsize,
    settled: tokio::sync::Notify,
}

/// Search results: how many match in all, and the first page of them.
pub struct Page {
    pub total: u64,
    pub documents: Vec<Document>,
}

impl Storage {
    pub fn new(database: Database) -> Self {
        Self::with_history_database(database.clone(), database)
    }

    pub fn with_history_database(database: Database, history_database: Database) -> Self {
        Self {
            database,
            history_database,
            write_locks: WriteLocks::default(),
            indexed: Mutex::new(HashSet::new()),
            pending_history: Default::default(),
        }
    }

    pub fn database(&self) -> &Database {
        &self.database
    }

    fn resources(&self, resource_type: &str) -> Collection<Document> {
        self.database
            .collection(&resource_collection(resource_type))
    }

    pub fn history_database(&self) -> &Database {
        &self.history_database
    }

    fn history(&self, resource_type: &str) -> Collection<Document> {
        self.history_database
            .collection(&history_collection(resource_type))
    }

    /// A unique index on `id` (lookups, and no duplicate creates without a
    /// transaction) and an index for history lookups by id and version.
    /// History is looked up by `resource.id`: the real server's entries
    /// have the resource's `_uuid` as their own `id`.
    pub async fn ensure_indexes(&self, resource_type: &str) -> mongodb::error::Result<()> {
        if self.is_indexed(resource_type) {
            return Ok(());
        }
        let unique_id = IndexModel::builder()
            .keys(doc! { "id": 1 })
            .options(
                IndexOptions::builder()
                    .name("id_1".to_string())
                    .unique(true)
                    .build(),
            )
            .build();
        tolerate_existing_index(self.resources(resource_type).create_index(unique_id).await)?;
        let by_version = IndexModel::builder()
            .keys(doc! { "resource.id": 1, "resource.meta.versionId": 1 })
            .build();
        tolerate_existing_index(self.history(resource_type).create_index(by_version).await)?;
        if let Ok(mut indexed) = self.indexed.lock() {
            indexed.insert(resource_type.to_string());
        }
        Ok(())
    }

    fn is_indexed(&self, resource_type: &str) -> bool {
        self.indexed
            .lock()
            .map(|indexed| indexed.contains(resource_type))
            .unwrap_or(false)
    }

    pub async fn find(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<Document>, StoreError> {
        Ok(self
            .resources(resource_type)
            .find_one(doc! { "id": id })
            .await?)
    }

    /// The resource with `id` under `owner` (its `_sourceAssigningAuthority`).
    pub async fn find_owned(
        &self,
        resource_type: &str,
        id: &str,
        owner: &str,
    ) -> Result<Option<Document>, StoreError> {
        Ok(self
            .resources(resource_type)
            .find_one(doc! { "id": id, "_sourceAssigningAuthority": owner })
            .await?)
    }

    /// Inserts a new resource; `AlreadyExists` if one with its id is stored.
    pub async fn insert(&self, resource_type: &str, document: &Document) -> Result<(), StoreError> {
        match self.resources(resource_type).insert_one(document).await {
            Ok(_) => Ok(()),
            Err(e) if is_duplicate_key(&e) => Err(StoreError::AlreadyExists {
                resource_type: resource_type.to_string(),
                id: document.get_str("id").unwrap_or_default().to_string(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces the stored resource only if its `meta.versionId` is still
    /// `expected`; false when another writer got there first.
    pub async fn replace_if_version(
        &self,
        resource_type: &str,
        id: &str,
        expected: Bson,
        document: &Document,
    ) -> Result<bool, StoreError> {
        let result = self
            .resources(resource_type)
            .replace_one(doc! { "id": id, "meta.versionId": expected }, document)
            .await?;
        Ok(result.matched_count == 1)
    }

    /// Removes the resource, returning what was stored.
    pub async fn remove(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<Document>, StoreError> {
        Ok(self
            .resources(resource_type)
            .find_one_and_delete(doc! { "id": id })
            .await?)
    }

    pub async fn insert_history(
        &self,
        resource_type: &str,
        entry: &Document,
    ) -> Result<(), StoreError> {
        self.history(resource_type).insert_one(entry).await?;
        Ok(())
    }

    /// Inserts a history entry `after` from now, in a task of its own: the
    /// request that wrote the version has long been answered by then.
    pub fn insert_history_later(
        &self,
        resource_type: &str,
        entry: Document,
        after: std::time::Duration,
    ) {
        use std::sync::atomic::Ordering;
        let history = self.history(resource_type);
        let pending = self.pending_history.clone();
        pending.count.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            if let Err(e) = history.insert_one(entry).await {
                tracing::error!(error = %e, "stand-in could not write a history entry");
            }
            if pending.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                pending.settled.notify_waiters();
            }
        });
    }

    /// Waits until every history entry written after its answer is in
    /// (for tests that look at history right after a write).
    pub async fn history_settled(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let settled = self.pending_history.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.pending_history.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            settled.await;
        }
    }

    /// The history entry of one version.
    pub async fn history_entry(
        &self,
        resource_type: &str,
        id: &str,
        version: &str,
    ) -> Result<Option<Document>, StoreError> {
        Ok(self
            .history(resource_type)
            .find_one(doc! { "resource.id": id, "resource.meta.versionId": version })
            .await?)
    }

    /// Every history entry of a resource, newest version first.
    pub async fn history_entries(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Vec<Document>, StoreError> {
        let mut entries: Vec<Document> = self
            .history(resource_type)
            .find(doc! { "resource.id": id })
            .await?
            .try_collect()
            .await?;
        entries.sort_by_key(|entry| {
            std::cmp::Reverse(entry.get_document("resource").ok().and_then(stored_version))
        });
        Ok(entries)
    }

    /// The highest version a deleted resource had, if it was ever deleted.
    /// Only the version is fetched: history entries of Groups can be large.
    pub async fn last_deleted_version(
        &self,
        resource_type: &str,
        id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let entries: Vec<Document> = self
            .history(resource_type)
            .find(doc! { "resource.id": id, "request.method": "DELETE" })
            .projection(doc! { "resource.meta.versionId": 1 })
            .await?
            .try_collect()
            .await?;
        Ok(entries
            .iter()
            .filter_map(|entry| entry.get_document("resource").ok())
            .filter_map(stored_version)
            .max())
    }

    /// Resources matching `filter`, sorted by id, at most `limit` of them.
    pub async fn search(
        &self,
        resource_type: &str,
        filter: Document,
        limit: u64,
    ) -> Result<Page, StoreError> {
        let collection = self.resources(resource_type);
        let total = collection.count_documents(filter.clone()).await?;
        // Mongo reads a limit of 0 as "no limit".
        let documents = if limit == 0 {
            Vec::new()
        } else {
            collection
                .find(filter)
                .sort(doc! { "id": 1 })
                .limit(i64::try_from(limit).unwrap_or(i64::MAX))
                .await?
                .try_collect()
                .await?
        };
        Ok(Page { total, documents })
    }
}

fn is_duplicate_key(error: &mongodb::error::Error) -> bool {
    matches!(
        *error.kind,
        ErrorKind::Write(WriteFailure::WriteError(WriteError { code: 11000, .. }))
    )
}

/// A database set up by an older stand-in may already have `id_1` without
/// `unique`; MongoDB then refuses to redefine it (85/86). The old index still
/// serves lookups, so keep going.
fn tolerate_existing_index<T>(result: mongodb::error::Result<T>) -> mongodb::error::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(e) => match *e.kind {
            ErrorKind::Command(CommandError { code: 85 | 86, .. }) => {
                tracing::warn!(error = %e, "stand-in keeps an existing index with other options");
                Ok(())
            }
            _ => Err(e),
        },
    }
}
