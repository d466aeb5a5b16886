//! Writers of one Group inside this process wait in line (first come, first
//! served) before they compete for the Group's MongoDB lock. The lock stays
//! the truth across proxy instances; the line only keeps one instance's
//! writers from polling MongoDB against each other, which made a hot Group's
//! tail latency depend on luck.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct GroupQueues {
    lines: Mutex<HashMap<String, Weak<AsyncMutex<()>>>>,
}

impl GroupQueues {
    /// Waits for this process's turn to write Group `id`; the turn lasts as
    /// long as the guard.
    pub async fn turn(&self, id: &str) -> OwnedMutexGuard<()> {
        let line = self.line(id);
        line.lock_owned().await
    }

    fn line(&self, id: &str) -> Arc<AsyncMutex<()>> {
        let mut lines = self
            .lines
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(line) = lines.get(id).and_then(Weak::upgrade) {
            return line;
        }
        // Lines nobody waits in are dropped here, so the map stays as small
        // as the set of Groups being written right now.
        lines.retain(|_, line| line.strong_count() > 0);
        let line = Arc::new(AsyncMutex::new(()));
        lines.insert(id.to_string(), Arc::downgrade(&line));
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn writers_of_one_group_take_turns_in_order() {
        let queues = Arc::new(GroupQueues::default());
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = queues.turn("g").await;
        let mut waiting = Vec::new();
        for i in 0..5 {
            let (queues, order) = (queues.clone(), order.clone());
            waiting.push(tokio::spawn(async move {
                let _turn = queues.turn("g").await;
                order.lock().unwrap().push(i);
            }));
            // Let each waiter queue up before the next one.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let other = tokio::time::timeout(Duration::from_millis(100), queues.turn("h")).await;
        assert!(other.is_ok(), "another Group is not held up");
        drop(first);
        for task in waiting {
            task.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), vec![0, 1, 2, 3, 4]);
        drop(other);
        assert!(queues
            .lines
            .lock()
            .unwrap()
            .values()
            .all(|l| l.strong_count() == 0));
    }
}
