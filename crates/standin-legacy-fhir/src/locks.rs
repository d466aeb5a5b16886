//! In-process write locks per resource.
//!
//! The stand-in's updates are a compare-and-swap on `meta.versionId`, which is
//! enough on MongoDB. FerretDB (the test database) does not evaluate such a
//! conditional update atomically: two concurrent writers can both match the
//! same version and one update is silently lost. Serialising the stand-in's
//! own writes of one resource keeps its read-modify-write correct there; the
//! compare-and-swap still guards against writers outside this process.

use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use tokio::sync::{Mutex, OwnedMutexGuard};

/// Striped rather than one lock per id: a fixed amount of memory however
/// many resources are written, at the price of rare false sharing.
const STRIPES: usize = 1024;

pub struct WriteLocks {
    stripes: Vec<Arc<Mutex<()>>>,
}

impl Default for WriteLocks {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Arc::new(Mutex::new(()))).collect(),
        }
    }
}

impl WriteLocks {
    /// Waits until no other write of `resource_type/id` in this process runs.
    pub async fn lock(&self, resource_type: &str, id: &str) -> OwnedMutexGuard<()> {
        self.stripes[stripe(resource_type, id)]
            .clone()
            .lock_owned()
            .await
    }
}

fn stripe(resource_type: &str, id: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    (resource_type, id).hash(&mut hasher);
    (hasher.finish() % STRIPES as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn same_resource_waits_other_resources_do_not() {
        let locks = WriteLocks::default();
        let held = locks.lock("Group", "a").await;
        let same = tokio::time::timeout(Duration::from_millis(20), locks.lock("Group", "a")).await;
        assert!(same.is_err());
        if stripe("Group", "a") != stripe("Group", "b") {
            let other =
                tokio::time::timeout(Duration::from_millis(20), locks.lock("Group", "b")).await;
            assert!(other.is_ok());
        }
        drop(held);
        assert!(
            tokio::time::timeout(Duration::from_millis(20), locks.lock("Group", "a"))
                .await
                .is_ok()
        );
    }
}
