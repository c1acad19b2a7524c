//! The local runner: polls a queue the way the SQS event source drives the
//! worker function (batches, visibility timeout, partial failures; the
//! queue itself redrives to its DLQ), on as many pollers as asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::warn;

use crate::queue::TaskQueue;
use crate::worker::Worker;

#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Concurrent pollers (like concurrent worker invocations).
    pub pollers: usize,
    /// Messages per batch (the event source's batch size).
    pub batch_size: usize,
    /// Time each batch may take, like the function timeout; tasks checkpoint
    /// and requeue their remainder before it runs out.
    pub invocation_timeout: Option<Duration>,
    pub wait: Duration,
    /// Handle the queue's dead letters too (what the DLQ's event source
    /// does on AWS): each fails its job with the reason.
    pub dead_letters: bool,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            pollers: DEFAULT_POLLERS,
            batch_size: DEFAULT_BATCH_SIZE,
            invocation_timeout: None,
            wait: RECEIVE_WAIT,
            dead_letters: true,
        }
    }
}

/// Pollers of a local runner: one per core of a small machine.
const DEFAULT_POLLERS: usize = 2;
/// Messages per batch, as the SQS event source's default.
const DEFAULT_BATCH_SIZE: usize = 10;

/// How long a receive waits for a message (long polling).
const RECEIVE_WAIT: Duration = Duration::from_secs(1);
/// Pause after a failed receive (the queue is unreachable).
const RECEIVE_RETRY: Duration = Duration::from_secs(1);

/// How often a poller handles the dead letters (the DLQ's event source on AWS).
const DEAD_LETTER_SWEEP: Duration = Duration::from_secs(1);

/// Runs pollers until `shutdown` turns true; in-flight batches finish first.
pub async fn run(
    worker: Arc<Worker>,
    queue: Arc<dyn TaskQueue>,
    visibility: Duration,
    config: RunnerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let pollers = (0..config.pollers.max(1)).map(|_| {
        let worker = worker.clone();
        let queue = queue.clone();
        let config = config.clone();
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut dead_letters_checked = Instant::now();
            while !*shutdown.borrow() {
                if config.dead_letters && dead_letters_checked.elapsed() >= DEAD_LETTER_SWEEP {
                    worker.sweep_dead_letters().await;
                    dead_letters_checked = Instant::now();
                }
                let received = tokio::select! {
                    received = queue.receive(config.batch_size, visibility, config.wait) => received,
                    _ = shutdown.changed() => break,
                };
                let messages = match received {
                    Ok(messages) => messages,
                    Err(err) => {
                        warn!(error = %format!("{err:#}"), "receive failed");
                        tokio::time::sleep(RECEIVE_RETRY).await;
                        continue;
                    }
                };
                if messages.is_empty() {
                    continue;
                }
                let deadline = config.invocation_timeout.map(|t| Instant::now() + t);
                let report = worker.process(messages, deadline).await;
                for receipt in report.succeeded {
                    if let Err(err) = queue.delete(&receipt).await {
                        warn!(error = %format!("{err:#}"), "delete failed; the message will be seen again");
                    }
                }
            }
        })
    });
    for poller in pollers.collect::<Vec<_>>() {
        let _ = poller.await;
    }
}
