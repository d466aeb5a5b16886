//! Insert batching ("group commit"): many concurrent writers, few ClickHouse inserts.
//!
//! Each writer submits its rows and waits. One background task takes everything
//! that has queued up (up to `max_rows`) and writes it with one flush, then
//! answers every writer with the result of that flush. While a flush runs, new
//! rows queue for the next one, so under load batches grow by themselves.
//!
//! Writers that know they will submit soon [`InsertBatcher::announce`] it: a
//! flush waits for announced writers (at most `max_delay` after its first
//! rows), so concurrent writes of different Groups, which reach their insert
//! at different moments, still share it. Nobody announced: the flush goes at
//! once, and a lone write waits for nothing. Every insert is a part in each
//! table it feeds (ClickHouse merges them later), so fewer inserts is less
//! work for the whole store, not only fewer round trips.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, Notify};

#[derive(Debug, Clone, Copy)]
pub struct BatchSettings {
    pub max_rows: usize,
    pub max_delay: Duration,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    #[error("{0}")]
    Flush(Arc<str>),
    #[error("the batch writer has stopped")]
    Stopped,
}

struct Job<T> {
    rows: Vec<T>,
    done: oneshot::Sender<Result<(), BatchError>>,
}

/// The answer a queued job waits for: its flush's result.
type FlushResult = oneshot::Receiver<Result<(), BatchError>>;

pub struct InsertBatcher<T> {
    jobs: mpsc::Sender<Job<T>>,
    announced: Arc<Announcements>,
}

impl<T> Clone for InsertBatcher<T> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
            announced: self.announced.clone(),
        }
    }
}

/// Writers announced and not yet submitted, and a wake-up for the flush
/// waiting on them.
#[derive(Default)]
struct Announcements {
    outstanding: AtomicUsize,
    changed: Notify,
}

/// A writer's word that it will submit rows soon: held until it submits
/// ([`InsertBatcher::submit_announced`]) or gives up (dropped), so a flush
/// never waits for a writer that is not coming.
pub struct Announced {
    announcements: Arc<Announcements>,
}

impl Drop for Announced {
    fn drop(&mut self) {
        self.announcements
            .outstanding
            .fetch_sub(1, Ordering::AcqRel);
        self.announcements.changed.notify_one();
    }
}

impl<T: Send + 'static> InsertBatcher<T> {
    /// Starts the writer task on the current tokio runtime. `flush` writes one
    /// batch; its error text reaches every writer of that batch. `writer`
    /// names it in metrics and logs.
    pub fn spawn<F, Fut>(writer: &'static str, settings: BatchSettings, flush: F) -> Self
    where
        F: Fn(Vec<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let (jobs, receiver) = mpsc::channel(4096);
        let announced = Arc::new(Announcements::default());
        tokio::spawn(run(writer, settings, receiver, announced.clone(), flush));
        Self { jobs, announced }
    }

    /// Says rows will come soon: until they do (or the announcement is
    /// dropped), flushes wait for them, up to `max_delay`.
    pub fn announce(&self) -> Announced {
        self.announced.outstanding.fetch_add(1, Ordering::AcqRel);
        Announced {
            announcements: self.announced.clone(),
        }
    }

    /// [`Self::submit`] of an announced writer. The rows are queued before
    /// the announcement ends, so a flush that sees no one outstanding has
    /// every announced row in its queue.
    pub async fn submit_announced(
        &self,
        announced: Announced,
        rows: Vec<T>,
    ) -> Result<(), BatchError> {
        let queued = self.queue(rows).await;
        drop(announced);
        Self::outcome(queued?).await
    }

    /// Queues `rows` and resolves once they are durably written (or not).
    pub async fn submit(&self, rows: Vec<T>) -> Result<(), BatchError> {
        Self::outcome(self.queue(rows).await?).await
    }

    /// Queues `rows` for a flush: the flush's answer to come (`None`: no
    /// rows, nothing to write).
    async fn queue(&self, rows: Vec<T>) -> Result<Option<FlushResult>, BatchError> {
        if rows.is_empty() {
            return Ok(None);
        }
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { rows, done })
            .await
            .map_err(|_| BatchError::Stopped)?;
        Ok(Some(result))
    }

    async fn outcome(queued: Option<FlushResult>) -> Result<(), BatchError> {
        match queued {
            Some(result) => result.await.map_err(|_| BatchError::Stopped)?,
            None => Ok(()),
        }
    }
}

async fn run<T, F, Fut>(
    writer: &'static str,
    settings: BatchSettings,
    mut receiver: mpsc::Receiver<Job<T>>,
    announced: Arc<Announcements>,
    flush: F,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    while let Some(first) = receiver.recv().await {
        let deadline = tokio::time::Instant::now() + settings.max_delay;
        let mut rows = first.rows;
        let mut waiters = vec![first.done];
        loop {
            while rows.len() < settings.max_rows {
                let Ok(job) = receiver.try_recv() else { break };
                rows.extend(job.rows);
                waiters.push(job.done);
            }
            // An announced writer queues its rows before its announcement
            // ends: with none outstanding, everything announced is in.
            if rows.len() >= settings.max_rows || announced.outstanding.load(Ordering::Acquire) == 0
            {
                break;
            }
            tokio::select! {
                job = receiver.recv() => match job {
                    Some(job) => {
                        rows.extend(job.rows);
                        waiters.push(job.done);
                    }
                    None => break,
                },
                _ = announced.changed.notified() => {}
                _ = tokio::time::sleep_until(deadline) => {
                    tracing::debug!(
                        writer,
                        outstanding = announced.outstanding.load(Ordering::Acquire),
                        "flush waited out its delay for announced writers"
                    );
                    break;
                }
            }
        }
        let batch_rows = rows.len();
        let started = std::time::Instant::now();
        let result = flush(rows).await.map_err(|e| BatchError::Flush(e.into()));
        let elapsed = started.elapsed();
        crate::operations::metrics::metrics().batch_flushed(
            writer,
            batch_rows,
            waiters.len(),
            elapsed,
            result.is_ok(),
        );
        tracing::debug!(
            writer,
            rows = batch_rows,
            writers = waiters.len(),
            elapsed_ms = elapsed.as_millis() as u64,
            ok = result.is_ok(),
            "group commit flush"
        );
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn concurrent_writers_share_flushes_and_all_get_the_result() {
        let (commit, batches) = recording(Duration::from_millis(20));
        // Announced first, as member writes do: the flushes wait for them.
        let announced: Vec<Announced> = (0..50).map(|_| commit.announce()).collect();
        let writers: Vec<_> = announced
            .into_iter()
            .zip(0..)
            .map(|(announced, i)| {
                let commit = commit.clone();
                tokio::spawn(async move { commit.submit_announced(announced, vec![i; 3]).await })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap().unwrap();
        }
        let batches = batches.lock().unwrap();
        assert_eq!(batches.iter().sum::<usize>(), 150, "every row flushed once");
        assert!(batches.len() < 50, "rows were batched: {batches:?}");
    }

    #[tokio::test]
    async fn a_failed_flush_fails_every_writer_in_it() {
        let commit = InsertBatcher::spawn(
            "test",
            BatchSettings {
                max_rows: 10,
                max_delay: Duration::from_millis(5),
            },
            |_rows: Vec<u8>| async { Err("clickhouse is down".to_string()) },
        );
        let err = commit.submit(vec![1]).await.unwrap_err();
        assert!(err.to_string().contains("clickhouse is down"));
    }

    /// A batcher recording the size of each flush, waiting up to `max_delay`.
    fn recording(max_delay: Duration) -> (InsertBatcher<u32>, Arc<Mutex<Vec<usize>>>) {
        let batches: Arc<Mutex<Vec<usize>>> = Arc::default();
        let seen = batches.clone();
        let batcher = InsertBatcher::spawn(
            "test",
            BatchSettings {
                max_rows: 1_000,
                max_delay,
            },
            move |rows: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(rows.len());
                    Ok(())
                }
            },
        );
        (batcher, batches)
    }

    #[tokio::test]
    async fn a_lone_write_is_flushed_without_waiting() {
        let (batcher, batches) = recording(Duration::from_secs(30));
        let flushed = tokio::time::timeout(Duration::from_secs(5), batcher.submit(vec![1])).await;
        assert!(matches!(flushed, Ok(Ok(()))), "nobody announced: no wait");
        assert_eq!(*batches.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn a_flush_waits_for_an_announced_writer_and_takes_its_rows_along() {
        let (batcher, batches) = recording(Duration::from_secs(30));
        let announced = batcher.announce();
        let early = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(vec![1, 2]).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(batches.lock().unwrap().is_empty(), "the flush waits");
        let late = tokio::time::timeout(
            Duration::from_secs(5),
            batcher.submit_announced(announced, vec![3]),
        )
        .await;
        assert!(matches!(late, Ok(Ok(()))));
        early.await.unwrap().unwrap();
        assert_eq!(*batches.lock().unwrap(), vec![3], "one insert for both");
    }

    #[tokio::test]
    async fn a_dropped_announcement_releases_the_waiting_flush() {
        let (batcher, batches) = recording(Duration::from_secs(30));
        let announced = batcher.announce();
        let waiting = {
            let batcher = batcher.clone();
            tokio::spawn(async move { batcher.submit(vec![1]).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(announced);
        let flushed = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(flushed, Ok(Ok(Ok(())))),
            "no wait for a writer who gave up"
        );
        assert_eq!(*batches.lock().unwrap(), vec![1]);
    }

    #[tokio::test]
    async fn an_announced_writer_that_never_comes_delays_a_flush_at_most_max_delay() {
        let (batcher, batches) = recording(Duration::from_millis(100));
        let _announced = batcher.announce();
        let flushed = tokio::time::timeout(Duration::from_secs(5), batcher.submit(vec![1])).await;
        assert!(matches!(flushed, Ok(Ok(()))));
        assert_eq!(*batches.lock().unwrap(), vec![1]);
    }
}
