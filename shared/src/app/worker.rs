//! The worker: a batch of queue messages in, the ids of the failed ones out
//! (SQS `ReportBatchItemFailures`). Messages run concurrently, each in its
//! own span, with its visibility extended while it works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use tracing::{Instrument, warn};

use crate::ports::queue::{Outgoing, Received, TaskQueue};
use crate::run::engine::{Delivery, Disposition, Engine};
use crate::run::tasks::AbortOnDrop;

#[derive(Clone)]
pub struct Worker {
    engine: Arc<Engine>,
    /// The queue the messages came from (to extend visibility and requeue).
    queue: Arc<dyn TaskQueue>,
    /// The queue's visibility timeout; extended by this much while working.
    visibility: Duration,
}

/// What became of each message of a batch.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchReport {
    /// Receipts of messages that are finished (to delete).
    pub succeeded: Vec<String>,
    /// Ids of messages that failed (left in the queue).
    pub failed: Vec<String>,
}

/// Visibility is extended at least this often while a message is worked on.
const HEARTBEAT_CAP: Duration = Duration::from_secs(60);

/// Dead letters taken per sweep, and how long they stay hidden while a
/// sweep handles them.
const DEAD_LETTER_BATCH: usize = 10;
const DEAD_LETTER_VISIBILITY: Duration = Duration::from_secs(60);

/// How long a poison message stays hidden before its next (counted) receive.
const POISON_BACKOFF: Duration = Duration::from_secs(2);

impl Worker {
    pub fn new(engine: Arc<Engine>, queue: Arc<dyn TaskQueue>, visibility: Duration) -> Self {
        Self {
            engine,
            queue,
            visibility,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub async fn process(&self, messages: Vec<Received>, deadline: Option<Instant>) -> BatchReport {
        // Each message on its own task, so a batch spreads over every core
        // and a panic in one fails only that message.
        let handles: Vec<_> = messages
            .into_iter()
            .map(|message| {
                let span = tracing::info_span!("message", message_id = %message.message_id, receive_count = message.receive_count);
                let worker = self.clone();
                let ids = (message.message_id.clone(), message.receipt.clone());
                let handle = AbortOnDrop::spawn(
                    async move { worker.process_one(&message, deadline).await }.instrument(span),
                );
                (ids, handle)
            })
            .collect();
        let mut report = BatchReport::default();
        for ((message_id, receipt), handle) in handles {
            match handle.await {
                Ok(true) => report.succeeded.push(receipt),
                Ok(false) => report.failed.push(message_id),
                Err(err) => {
                    warn!(%message_id, error = %err, "message handling panicked");
                    report.failed.push(message_id);
                }
            }
        }
        report
    }

    /// Returns whether the message is finished with.
    async fn process_one(&self, message: &Received, deadline: Option<Instant>) -> bool {
        // Ends with this call, however it ends (a panic included).
        let heartbeat = {
            let queue = self.queue.clone();
            let receipt = message.receipt.clone();
            let visibility = self.visibility;
            AbortOnDrop::spawn(async move {
                loop {
                    tokio::time::sleep((visibility / 3).min(HEARTBEAT_CAP)).await;
                    if let Err(err) = queue.change_visibility(&receipt, visibility).await {
                        warn!(error = %format!("{err:#}"), "could not extend message visibility");
                    }
                }
            })
        };
        let delivery = Delivery {
            message_id: message.message_id.clone(),
            receive_count: message.receive_count,
            deadline,
        };
        let disposition = self.engine.handle(&message.body, &delivery).await;
        drop(heartbeat);
        match disposition {
            Disposition::Done => true,
            Disposition::Requeue { delay } => {
                match self
                    .queue
                    .send_many(vec![Outgoing::raw(&message.body, delay)])
                    .await
                {
                    Ok(()) => true,
                    Err(err) => {
                        warn!(error = %format!("{err:#}"), "could not requeue; leaving the message");
                        self.hide(message, delay).await;
                        false
                    }
                }
            }
            Disposition::Retry { after, .. } => {
                self.hide(message, after).await;
                false
            }
            Disposition::Poison { .. } => {
                self.hide(message, POISON_BACKOFF).await;
                false
            }
        }
    }

    async fn hide(&self, message: &Received, duration: Duration) {
        if let Err(err) = self
            .queue
            .change_visibility(&message.receipt, duration)
            .await
        {
            warn!(error = %format!("{err:#}"), "could not change message visibility");
        }
    }

    /// Messages from the dead-letter queue: each fails its job with the
    /// reason. All of them are finished with (a dead letter is not retried).
    pub async fn process_dead_letters(&self, messages: &[Received]) {
        for message in messages {
            let span = tracing::info_span!("dead_letter", message_id = %message.message_id);
            self.engine
                .handle_dead_letter(&message.body)
                .instrument(span)
                .await;
        }
    }

    /// Takes the queue's unhandled dead letters and handles them (the local
    /// runner's stand-in for the DLQ's event source).
    pub async fn sweep_dead_letters(&self) {
        let taken = match self
            .queue
            .take_dead_letters(DEAD_LETTER_BATCH, DEAD_LETTER_VISIBILITY)
            .await
        {
            Ok(taken) => taken,
            Err(err) => {
                warn!(error = %format!("{err:#}"), "could not read dead letters");
                return;
            }
        };
        self.process_dead_letters(&taken).await;
        for message in taken {
            if let Err(err) = self.queue.settle_dead_letter(&message.receipt).await {
                warn!(error = %format!("{err:#}"), "could not settle a dead letter");
            }
        }
    }

    /// The worker function's handler: Lambda deletes the messages not reported failed.
    /// Records from the DLQ (its own event source) fail their jobs.
    pub async fn handle_sqs_event(
        &self,
        event: SqsEvent,
        deadline: Option<Instant>,
    ) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        let mut messages = Vec::new();
        let mut dead_letters = Vec::new();
        for record in event.records {
            let from_dead_letters = record
                .event_source_arn
                .as_deref()
                .is_some_and(|arn| self.queue.is_dead_letter_source(arn));
            let message_id = record.message_id.clone().unwrap_or_default();
            let receipt = record.receipt_handle.clone().unwrap_or_default();
            let receive_count = record
                .attributes
                .get("ApproximateReceiveCount")
                .and_then(|v| v.parse().ok())
                .unwrap_or(1);
            let received = Received {
                message_id,
                receipt,
                body: record.body.unwrap_or_default(),
                receive_count,
            };
            if from_dead_letters {
                dead_letters.push(received);
            } else {
                messages.push(received);
            }
        }
        self.process_dead_letters(&dead_letters).await;
        let report = self.process(messages, deadline).await;
        // Lambda freezes the process once the handler returns: a slot kept
        // for a next task would stay held, unrenewed, until it expired.
        self.engine.release_idle_slots().await;
        for id in report.failed {
            response.add_failure(id);
        }
        response
    }
}

/// Lambda's deadline (milliseconds since the epoch) as an [`Instant`].
pub fn deadline_from_epoch_ms(deadline_ms: u64) -> Instant {
    let now_ms = chrono::Utc::now().timestamp_millis().max(0) as u64;
    Instant::now() + Duration::from_millis(deadline_ms.saturating_sub(now_ms))
}
