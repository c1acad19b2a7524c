//! The local runner: polls a queue the way the SQS event source drives the
//! worker function (batches, visibility timeout, partial failures; the
//! queue itself redrives to its DLQ), on as many pollers as asked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::warn;

use crate::app::worker::Worker;
use crate::ports::queue::{Received, TaskQueue};

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

/// Runs pollers until `shutdown` turns true; messages in flight finish first.
///
/// Unlike a Lambda invocation, a poller does not wait for its whole batch:
/// each message is deleted as soon as it is handled and its place refilled
/// from the queue, so one slow message (a fragment being assembled) does not
/// hold back the rest. A poller keeps at most `batch_size` messages in flight
/// and receives once half of its places are free. Messages handled while a
/// delete is under way are deleted together by the next one.
pub async fn run(
    worker: Arc<Worker>,
    queue: Arc<dyn TaskQueue>,
    visibility: Duration,
    config: RunnerConfig,
    shutdown: watch::Receiver<bool>,
) {
    let pollers = (0..config.pollers.max(1)).map(|_| {
        let (handled, receipts) = mpsc::unbounded_channel();
        let poller = Poller {
            worker: worker.clone(),
            queue: queue.clone(),
            visibility,
            room: Arc::new(Semaphore::new(config.batch_size.max(1))),
            config: config.clone(),
            handled,
            deleter: tokio::spawn(delete_handled(queue.clone(), receipts)),
        };
        tokio::spawn(poller.run(shutdown.clone()))
    });
    for poller in pollers.collect::<Vec<_>>() {
        let _ = poller.await;
    }
}

/// Deletes handled messages: each call takes every receipt that arrived
/// while the one before ran (one SQLite transaction, or a
/// `DeleteMessageBatch` per 10), so busy pollers delete in groups and an
/// idle one at once. Ends when every sender is gone.
async fn delete_handled(queue: Arc<dyn TaskQueue>, mut receipts: mpsc::UnboundedReceiver<String>) {
    while let Some(first) = receipts.recv().await {
        let mut group = vec![first];
        while let Ok(more) = receipts.try_recv() {
            group.push(more);
        }
        if let Err(err) = queue.delete_many(&group).await {
            warn!(error = %format!("{err:#}"), "delete failed; the messages will be seen again");
        }
    }
}

/// One poller: its queue, its worker and its room for messages in flight.
struct Poller {
    worker: Arc<Worker>,
    queue: Arc<dyn TaskQueue>,
    visibility: Duration,
    room: Arc<Semaphore>,
    config: RunnerConfig,
    /// Receipts of handled messages, for `deleter` to delete.
    handled: mpsc::UnboundedSender<String>,
    deleter: tokio::task::JoinHandle<()>,
}

impl Poller {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut dead_letters_checked = Instant::now();
        while !*shutdown.borrow() {
            if self.config.dead_letters && dead_letters_checked.elapsed() >= DEAD_LETTER_SWEEP {
                self.worker.sweep_dead_letters().await;
                dead_letters_checked = Instant::now();
            }
            // Room for half a batch at least (so a receive is not spent on
            // every message), then as many more as are free.
            let refill = (self.config.batch_size / 2).max(1) as u32;
            let permits = tokio::select! {
                permits = self.room.clone().acquire_many_owned(refill) => permits,
                _ = shutdown.changed() => break,
            };
            let Ok(mut places) = permits else { break };
            while let Ok(more) = self.room.clone().try_acquire_owned() {
                places.merge(more);
            }
            let received = tokio::select! {
                received = self.queue.receive(places.num_permits(), self.visibility, self.config.wait) => received,
                _ = shutdown.changed() => break,
            };
            match received {
                Ok(messages) => self.start(messages, places),
                Err(err) => {
                    warn!(error = %format!("{err:#}"), "receive failed");
                    tokio::time::sleep(RECEIVE_RETRY).await;
                }
            }
        }
        // Wait for the messages in flight, then for their deletes.
        let _ = self
            .room
            .acquire_many(self.config.batch_size.max(1) as u32)
            .await;
        drop(self.handled);
        let _ = self.deleter.await;
    }

    /// Handles each message on its own, in one of `places`, deleting it
    /// once it is finished with; places left unused go back.
    fn start(&self, messages: Vec<Received>, mut places: OwnedSemaphorePermit) {
        let deadline = self.config.invocation_timeout.map(|t| Instant::now() + t);
        for message in messages {
            let Some(permit) = places.split(1) else { break };
            let worker = self.worker.clone();
            let handled = self.handled.clone();
            tokio::spawn(async move {
                let report = worker.process(vec![message], deadline).await;
                for receipt in report.succeeded {
                    // Only a poller that has stopped waiting drops the receiver.
                    let _ = handled.send(receipt);
                }
                drop(permit);
            });
        }
    }
}
