//! Clearing the staging table. Every member write stages its events
//! (commit protocol, step 3, see [`super::commit`]) and publishes them into
//! the events table; the staged copy is needed only until then, by the
//! writer or by whoever finishes its write from its lock's record
//! ([`super::recovery`]). Kept forever it would hold every event a second
//! time, and its merges cost ClickHouse as much as the events table's.
//!
//! The table is partitioned by month, so a month is dropped whole (cheap,
//! no mutation; 18.16 has no TTL that could do it) once it is older than
//! `members.staging_months_kept` months and no
//! write that may still need it has events in it. Such a write holds its
//! Group's lock, or is one a lock records as taken over, or (from an
//! earlier release) is `pending` in the Group's member state: a write
//! stages only under its lock, and its lock goes only once the write is
//! published or was never committed. So the tokens read from the locks
//! and member states before the months are looked at name every write
//! that may need an old month; a lock taken later stages in the current
//! month.

use std::collections::BTreeSet;
use std::time::Duration;

use super::{GroupError, GroupService};

/// How often the staging table is looked at, and how long after start.
const SWEEP_EVERY: Duration = Duration::from_secs(3600);
const FIRST_SWEEP_AFTER: Duration = Duration::from_secs(60);

impl GroupService {
    /// Drops the staged events of months before the `months_kept` most
    /// recent (the current one included) that no unfinished write needs;
    /// the months dropped. `months_kept == 0` keeps everything.
    pub async fn sweep_staged_months(&self, months_kept: u32) -> Result<Vec<u32>, GroupError> {
        if months_kept == 0 {
            return Ok(Vec::new());
        }
        // The writes that may still need their staged events, read before
        // the months (see the module docs for why that order is safe).
        let mut tokens = self.documents.locks().recorded_tokens().await?;
        tokens.extend(self.documents.pending_tokens().await?);
        let old = self.events.staged_months_before(months_kept).await?;
        let needed = self.events.months_staging(&old, &tokens).await?;
        let droppable = months_to_drop(&old, &needed);
        for &month in &droppable {
            self.events.drop_staged_month(month).await?;
            tracing::info!(
                month,
                "staged member events of a month no write needs any more dropped"
            );
        }
        for month in needed {
            tracing::info!(
                month,
                "staged member events of an old month kept: an unfinished write needs them"
            );
        }
        Ok(droppable)
    }

    /// Runs [`Self::sweep_staged_months`] a minute after start, then hourly,
    /// forever.
    pub async fn sweep_staging(self, months_kept: u32) {
        if months_kept == 0 {
            return;
        }
        tokio::time::sleep(FIRST_SWEEP_AFTER).await;
        loop {
            if let Err(e) = self.sweep_staged_months(months_kept).await {
                tracing::warn!(error = %e, "staging sweep skipped; next try in an hour");
            }
            tokio::time::sleep(SWEEP_EVERY).await;
        }
    }
}

/// The old months no unfinished write needs.
fn months_to_drop(old: &[u32], needed: &BTreeSet<u32>) -> Vec<u32> {
    old.iter()
        .copied()
        .filter(|month| !needed.contains(month))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_old_month_an_unfinished_write_needs_is_kept_and_the_others_go() {
        let needed = BTreeSet::from([202_608]);
        assert_eq!(
            months_to_drop(&[202_607, 202_608, 202_609], &needed),
            vec![202_607, 202_609]
        );
        assert!(months_to_drop(&[], &needed).is_empty());
    }
}
