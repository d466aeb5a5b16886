//! Graceful shutdown.
//!
//! pingora's `run_forever` exits the process as soon as its own runtimes stop,
//! and on SIGTERM it stops accepting at once and then sleeps a fixed grace
//! period. The proxy needs more: member writes run on the store runtime (not
//! pingora's), and the group-commit writers there must flush what they hold
//! before the process ends. So pingora runs on its own thread, and the main
//! thread leads the shutdown:
//!
//! 1. SIGTERM: `/readyz` turns 503 while the proxy keeps accepting for
//!    `server.grace_period_seconds` (load balancers notice and stop sending);
//! 2. pingora stops accepting and closes idle connections;
//! 3. requests in flight get up to `server.graceful_shutdown_timeout_seconds`
//!    to finish; the process leaves as soon as none is left;
//! 4. store work the requests started (and the batches it waits on) gets the
//!    rest of that time, then the process exits.
//!
//! SIGINT skips 1-3 (pingora drops the requests) but still waits for store
//! work; SIGQUIT (pingora's graceful upgrade) is left to pingora.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::{
    RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, UnixShutdownSignalWatch,
};
use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Whether the process is draining, and how many requests it is handling.
#[derive(Debug, Default)]
pub struct Lifecycle {
    draining: AtomicBool,
    in_flight: AtomicUsize,
}

impl Lifecycle {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Counts a request until the guard is dropped (also when pingora drops
    /// the request half-way).
    pub fn track_request(self: &Arc<Self>) -> InFlightGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlightGuard(self.clone())
    }
}

pub struct InFlightGuard(Arc<Lifecycle>);

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Spawns request work onto the store runtime, tracked so shutdown can wait
/// for it, and inside the caller's tracing span so its log lines carry the
/// request id.
#[derive(Clone)]
pub struct StoreTasks {
    handle: Handle,
    tracker: TaskTracker,
}

impl StoreTasks {
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            tracker: TaskTracker::new(),
        }
    }

    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker
            .spawn_on(task.instrument(tracing::Span::current()), &self.handle)
    }

    /// Waits up to `timeout` for every tracked task; how many are still running.
    /// Call from outside any runtime (the main thread).
    pub fn drain(&self, timeout: Duration) -> usize {
        self.tracker.close();
        let tracker = self.tracker.clone();
        let _ = self
            .handle
            .block_on(async move { tokio::time::timeout(timeout, tracker.wait()).await });
        self.tracker.len()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownEvent {
    /// SIGTERM, grace period over: pingora stops accepting now.
    Draining,
    /// SIGINT: pingora drops everything at once.
    Fast,
    /// SIGQUIT: pingora hands its sockets to a new process and drains itself.
    Upgrade,
    /// pingora's `run` returned.
    ServerExited,
}

/// pingora's Unix signal handling, with the grace period and drain hand-over
/// described in the module documentation.
struct DrainingSignalWatch {
    lifecycle: Arc<Lifecycle>,
    grace_period: Duration,
    events: mpsc::Sender<ShutdownEvent>,
}

#[async_trait]
impl ShutdownSignalWatch for DrainingSignalWatch {
    async fn recv(&self) -> ShutdownSignal {
        match UnixShutdownSignalWatch.recv().await {
            ShutdownSignal::GracefulTerminate => {
                self.lifecycle.start_draining();
                tracing::info!(
                    grace_period_s = self.grace_period.as_secs(),
                    "SIGTERM: /readyz answers 503; accepting until the grace period ends, then draining"
                );
                if self.interrupted_within(self.grace_period).await {
                    let _ = self.events.send(ShutdownEvent::Fast);
                    return ShutdownSignal::FastShutdown;
                }
                let _ = self.events.send(ShutdownEvent::Draining);
                ShutdownSignal::GracefulTerminate
            }
            ShutdownSignal::FastShutdown => {
                self.lifecycle.start_draining();
                let _ = self.events.send(ShutdownEvent::Fast);
                ShutdownSignal::FastShutdown
            }
            ShutdownSignal::GracefulUpgrade => {
                self.lifecycle.start_draining();
                let _ = self.events.send(ShutdownEvent::Upgrade);
                ShutdownSignal::GracefulUpgrade
            }
        }
    }
}

impl DrainingSignalWatch {
    /// Waits out `period`; `true` when SIGINT cut it short.
    async fn interrupted_within(&self, period: Duration) -> bool {
        if period.is_zero() {
            return false;
        }
        let mut interrupt =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()) {
                Ok(signal) => signal,
                Err(error) => {
                    tracing::warn!(%error, "cannot watch SIGINT during the grace period");
                    tokio::time::sleep(period).await;
                    return false;
                }
            };
        tokio::select! {
            _ = tokio::time::sleep(period) => false,
            _ = interrupt.recv() => true,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct ShutdownSettings {
    /// Keep accepting this long after SIGTERM.
    pub grace_period: Duration,
    /// Then at most this long for requests and store work to finish.
    pub drain_timeout: Duration,
}

/// What was left undone when the process stopped waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownSummary {
    pub unfinished_requests: usize,
    pub unfinished_store_tasks: usize,
    pub drain_time: Duration,
}

/// Runs `server` until a shutdown signal, then drains as described in the
/// module documentation. Returns when the process may exit.
pub fn run_until_drained(
    server: Server,
    lifecycle: Arc<Lifecycle>,
    store_tasks: &StoreTasks,
    settings: ShutdownSettings,
) -> std::io::Result<ShutdownSummary> {
    let (events, received) = mpsc::channel();
    let watch = DrainingSignalWatch {
        lifecycle: lifecycle.clone(),
        grace_period: settings.grace_period,
        events: events.clone(),
    };
    std::thread::Builder::new()
        .name("fgp-pingora".into())
        .spawn(move || {
            server.run(RunArgs {
                shutdown_signal: Box::new(watch),
            });
            let _ = events.send(ShutdownEvent::ServerExited);
        })?;
    let event = received.recv().unwrap_or(ShutdownEvent::ServerExited);
    let started = Instant::now();
    let deadline = started + settings.drain_timeout;
    match event {
        ShutdownEvent::Draining => {
            while lifecycle.in_flight() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        ShutdownEvent::Upgrade => {
            while !matches!(received.recv(), Ok(ShutdownEvent::ServerExited) | Err(_)) {}
        }
        ShutdownEvent::Fast | ShutdownEvent::ServerExited => {}
    }
    let unfinished_requests = lifecycle.in_flight();
    let unfinished_store_tasks =
        store_tasks.drain(deadline.saturating_duration_since(Instant::now()));
    Ok(ShutdownSummary {
        unfinished_requests,
        unfinished_store_tasks,
        drain_time: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_counts_live_guards() {
        let lifecycle = Lifecycle::new();
        let first = lifecycle.track_request();
        let second = lifecycle.track_request();
        assert_eq!(lifecycle.in_flight(), 2);
        drop(first);
        assert_eq!(lifecycle.in_flight(), 1);
        drop(second);
        assert_eq!(lifecycle.in_flight(), 0);
    }

    #[test]
    fn drain_waits_for_store_work_and_reports_what_outlived_the_timeout() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let tasks = StoreTasks::new(runtime.handle().clone());
        let finished = Arc::new(AtomicBool::new(false));
        let flag = finished.clone();
        tasks.spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            flag.store(true, Ordering::SeqCst);
        });
        assert_eq!(tasks.drain(Duration::from_secs(5)), 0);
        assert!(finished.load(Ordering::SeqCst), "drain waited for the task");

        let tasks = StoreTasks::new(runtime.handle().clone());
        tasks.spawn(async { tokio::time::sleep(Duration::from_secs(60)).await });
        assert_eq!(tasks.drain(Duration::from_millis(20)), 1);
    }
}
