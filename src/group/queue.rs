//! Writers of one Group inside this process line up (first come, first
//! served) before they compete for the Group's MongoDB lock, and member
//! patches waiting in line are written together: the writer at the head of
//! the line takes everything queued behind it and commits it under one lock,
//! one staging insert and one version compare-and-swap (each patch still gets
//! its own version). The lock stays the truth across proxy instances; the line
//! turns a hot Group's lock hand-offs into batches instead of polling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

pub struct GroupQueues<J> {
    lines: Mutex<HashMap<String, Weak<Line<J>>>>,
}

impl<J> Default for GroupQueues<J> {
    fn default() -> Self {
        Self {
            lines: Mutex::new(HashMap::new()),
        }
    }
}

/// The line of one Group.
pub struct Line<J> {
    turn: Arc<AsyncMutex<()>>,
    waiting: Mutex<Waiting<J>>,
}

struct Waiting<J> {
    jobs: Vec<J>,
    /// A writer is taking batches off this line; new jobs just wait.
    leading: bool,
}

impl<J> GroupQueues<J> {
    /// The line of Group `id` (kept while anyone holds it).
    pub fn line(&self, id: &str) -> Arc<Line<J>> {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(line) = lines.get(id).and_then(Weak::upgrade) {
            return line;
        }
        // Lines nobody holds are dropped here, so the map stays as small as
        // the set of Groups being written right now.
        lines.retain(|_, line| line.strong_count() > 0);
        let line = Arc::new(Line {
            turn: Arc::new(AsyncMutex::new(())),
            waiting: Mutex::new(Waiting {
                jobs: Vec::new(),
                leading: false,
            }),
        });
        lines.insert(id.to_string(), Arc::downgrade(&line));
        line
    }
}

impl<J> Line<J> {
    /// Waits for this process's turn to write the Group, alone.
    pub async fn turn(&self) -> OwnedMutexGuard<()> {
        self.turn.clone().lock_owned().await
    }

    /// Queues a job. `true`: nobody is taking batches, so the caller must
    /// (with [`Self::next_batch`] until it returns `None`).
    pub fn join(&self, job: J) -> bool {
        let mut waiting = self.lock_waiting();
        waiting.jobs.push(job);
        !std::mem::replace(&mut waiting.leading, true)
    }

    /// The jobs queued so far, oldest first, up to `max_weight` in total (at
    /// least one); `None` when none are left, which also ends the caller's
    /// leadership (under the same lock as [`Self::join`], so no job is missed).
    pub fn next_batch(&self, max_weight: usize, weight: impl Fn(&J) -> usize) -> Option<Vec<J>> {
        let mut waiting = self.lock_waiting();
        if waiting.jobs.is_empty() {
            waiting.leading = false;
            return None;
        }
        let mut total = 0;
        let mut take = 0;
        for job in &waiting.jobs {
            total += weight(job);
            if take > 0 && total > max_weight {
                break;
            }
            take += 1;
        }
        Some(waiting.jobs.drain(..take).collect())
    }

    fn lock_waiting(&self) -> std::sync::MutexGuard<'_, Waiting<J>> {
        self.waiting
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn turns_are_taken_in_order_and_groups_do_not_wait_for_each_other() {
        let queues: Arc<GroupQueues<()>> = Arc::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = queues.line("g").turn().await;
        let mut waiting = Vec::new();
        for i in 0..5 {
            let (queues, order) = (queues.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = queues.line("g").turn().await;
                order.lock().unwrap().push(i);
            }));
            // Let each waiter queue up before the next one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let other = tokio::time::timeout(Duration::from_millis(100), queues.line("h").turn()).await;
        assert!(other.is_ok(), "another Group is not held up");
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn the_first_to_join_leads_and_batches_respect_the_weight() {
        let queues: GroupQueues<usize> = GroupQueues::default();
        let line = queues.line("g");
        assert!(line.join(4), "first job: lead");
        assert!(!line.join(3));
        assert!(!line.join(5));
        assert!(!line.join(20));
        assert_eq!(line.next_batch(8, |w| *w), Some(vec![4, 3]));
        assert_eq!(line.next_batch(8, |w| *w), Some(vec![5]));
        assert_eq!(
            line.next_batch(8, |w| *w),
            Some(vec![20]),
            "an oversized job goes alone"
        );
        assert_eq!(line.next_batch(8, |w| *w), None);
        assert!(line.join(1), "leadership ended with the empty line");
    }
}
