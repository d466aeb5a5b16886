//! Insert batching ("group commit"): many concurrent writers, few ClickHouse inserts.
//!
//! Each writer submits its rows and waits. One background task takes everything
//! that has queued up (up to `max_rows`, waiting at most `max_delay` after the
//! first arrival), writes it with one flush, and answers every writer with the
//! result of that flush. While a flush runs, new rows queue for the next one, so
//! under load batches grow by themselves and ClickHouse sees few large inserts.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

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

pub struct InsertBatcher<T> {
    jobs: mpsc::Sender<Job<T>>,
}

impl<T> Clone for InsertBatcher<T> {
    fn clone(&self) -> Self {
        Self {
            jobs: self.jobs.clone(),
        }
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
        tokio::spawn(run(writer, settings, receiver, flush));
        Self { jobs }
    }

    /// Queues `rows` and resolves once they are durably written (or not).
    pub async fn submit(&self, rows: Vec<T>) -> Result<(), BatchError> {
        if rows.is_empty() {
            return Ok(());
        }
        let (done, result) = oneshot::channel();
        self.jobs
            .send(Job { rows, done })
            .await
            .map_err(|_| BatchError::Stopped)?;
        result.await.map_err(|_| BatchError::Stopped)?
    }
}

async fn run<T, F, Fut>(
    writer: &'static str,
    settings: BatchSettings,
    mut receiver: mpsc::Receiver<Job<T>>,
    flush: F,
) where
    F: Fn(Vec<T>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    while let Some(first) = receiver.recv().await {
        let deadline = tokio::time::Instant::now() + settings.max_delay;
        let mut rows = first.rows;
        let mut waiters = vec![first.done];
        while rows.len() < settings.max_rows {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(job)) => {
                    rows.extend(job.rows);
                    waiters.push(job.done);
                }
                Ok(None) | Err(_) => break,
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
        let batches: Arc<Mutex<Vec<usize>>> = Arc::default();
        let seen = batches.clone();
        let commit = InsertBatcher::spawn(
            "test",
            BatchSettings {
                max_rows: 1_000,
                max_delay: Duration::from_millis(20),
            },
            move |rows: Vec<u32>| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(rows.len());
                    Ok(())
                }
            },
        );
        let writers: Vec<_> = (0..50)
            .map(|i| {
                let commit = commit.clone();
                tokio::spawn(async move { commit.submit(vec![i; 3]).await })
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
}
