//! Reading a message, running what it asks for, and turning how that ended
//! into a [`Disposition`]: finished, retried later, or given up on (the job
//! then fails with the reason).

use std::time::Duration;

use tracing::{Instrument, warn};

use super::{Delivery, Disposition, Engine, fanout};
use crate::model::error::Error;
use crate::ports::queue::Message;
use crate::ports::store::StoreError;
use crate::run::lifecycle::Cleanup;

/// A failed message is hidden for 2^receives seconds before its next try,
/// up to 2^6 = 64 s.
const RETRY_BACKOFF_MAX_EXPONENT: u32 = 6;

/// How a failed message should be treated.
enum Failure {
    /// No retry can fix it: the job fails now.
    Permanent(String),
    /// Worth another delivery.
    Transient(anyhow::Error),
}

fn classify(err: anyhow::Error) -> Failure {
    let permanent = err.chain().any(|cause| {
        matches!(cause.downcast_ref::<Error>(), Some(Error::Permanent(_)))
            || matches!(
                cause.downcast_ref::<StoreError>(),
                Some(StoreError::ItemTooLarge(_))
            )
    });
    if permanent {
        Failure::Permanent(format!("{err:#}"))
    } else {
        Failure::Transient(err)
    }
}

impl Engine {
    /// Handles one message body. Never panics on bad input; every outcome
    /// is a [`Disposition`].
    pub async fn handle(&self, body: &str, delivery: &Delivery) -> Disposition {
        let message = match Message::parse(body) {
            Ok(message) => message,
            Err(reason) => return self.poison(body, delivery, reason).await,
        };
        let span = span_of(&message);
        let outcome = self.run(&message, delivery).instrument(span.clone()).await;
        let _entered = span.enter();
        match outcome {
            Ok(disposition) => disposition,
            Err(err) => self.failed(&message, delivery, err).await,
        }
    }

    async fn run(&self, message: &Message, delivery: &Delivery) -> anyhow::Result<Disposition> {
        let job_id = message.job_id();
        match message {
            Message::Run { task, .. } => self.run_task(job_id, task, delivery).await,
            Message::RunPack { pack, .. } => self.run_pack(job_id, pack, delivery).await,
            Message::Plan { first, count, .. } => {
                let (store, catalog) = (self.store.as_ref(), self.catalog.as_ref());
                fanout::fan_out(store, catalog, &self.queues, job_id, (*first, *count)).await
            }
            Message::Cleanup { .. } => {
                let owner = format!("{}/cleanup", self.config.worker_id);
                match self
                    .lifecycle
                    .cleanup(job_id, &owner, self.config.lease_ttl)
                    .await?
                {
                    Cleanup::Done => Ok(Disposition::Done),
                    Cleanup::Busy => Ok(Disposition::Requeue {
                        delay: self.config.busy_delay,
                    }),
                }
            }
        }
    }

    async fn poison(&self, body: &str, delivery: &Delivery, reason: String) -> Disposition {
        if let Some(job_id) = lenient_job_id(body) {
            self.lifecycle.fail(&job_id, &reason).await;
        }
        warn!(message_id = %delivery.message_id, %reason, "poison message");
        Disposition::Poison { reason }
    }

    /// A permanent failure fails the job now; a transient one is retried
    /// until the message's last receive, which fails the job.
    async fn failed(
        &self,
        message: &Message,
        delivery: &Delivery,
        err: anyhow::Error,
    ) -> Disposition {
        let job_id = message.job_id();
        match classify(err) {
            Failure::Permanent(reason) => {
                let reason = format!("{}: {reason}", describe(message));
                warn!(%reason, "task failed permanently");
                self.lifecycle.fail(job_id, &reason).await;
                Disposition::Done
            }
            Failure::Transient(err) if delivery.receive_count >= self.config.max_receive_count => {
                let reason = format!(
                    "{} failed {} times, last: {err:#}",
                    describe(message),
                    delivery.receive_count
                );
                warn!(%reason, "giving up on message");
                self.lifecycle.fail(job_id, &reason).await;
                Disposition::Poison { reason }
            }
            Failure::Transient(err) => {
                let after = Duration::from_secs(
                    1 << delivery.receive_count.min(RETRY_BACKOFF_MAX_EXPONENT),
                );
                warn!(error = %format!("{err:#}"), retry_in = ?after, "task failed, will retry");
                Disposition::Retry {
                    after,
                    reason: format!("{err:#}"),
                }
            }
        }
    }

    /// A message that reached the dead-letter queue: it was received the
    /// redrive limit's number of times and never finished. A worker that
    /// saw its last receive fail has already failed the job; this covers
    /// the deliveries that died with their process (out of memory, killed,
    /// a hard timeout), which would otherwise leave the job RUNNING.
    pub async fn handle_dead_letter(&self, body: &str) {
        let (job_id, what) = match Message::parse(body) {
            Ok(Message::Cleanup { job_id, .. }) => {
                warn!(
                    job_id,
                    "a cleanup message went to the dead-letter queue; staged files may remain"
                );
                return;
            }
            Ok(message) => (message.job_id().to_string(), describe(&message)),
            Err(reason) => match lenient_job_id(body) {
                Some(job_id) => (job_id, format!("a malformed message ({reason})")),
                None => {
                    warn!(%reason, "dead letter names no job");
                    return;
                }
            },
        };
        let reason = format!(
            "{what} was received {} times without finishing and went to the dead-letter queue \
             (each attempt ended without a result: the process died, ran out of memory or was stopped); \
             submit the backfill again to resume from its checkpoints",
            self.config.max_receive_count
        );
        warn!(job_id, %reason, "dead letter");
        self.lifecycle.fail(&job_id, &reason).await;
    }
}

fn span_of(message: &Message) -> tracing::Span {
    let job_id = message.job_id();
    match message {
        Message::Run { task, .. } => {
            tracing::info_span!("task", job_id = %job_id, fragment = task.fragment_id, task = task.task)
        }
        Message::RunPack { pack, .. } => {
            let first = pack.fragments.first().map(|f| f.id);
            tracing::info_span!("pack", job_id = %job_id, first_fragment = first, fragments = pack.fragments.len())
        }
        Message::Plan { first, count, .. } => {
            tracing::info_span!("plan", job_id = %job_id, first, count)
        }
        Message::Cleanup { .. } => tracing::info_span!("cleanup", job_id = %job_id),
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Run { task, .. } => format!(
            "task {} (fragment {}, rows {}..{})",
            task.label(),
            task.fragment_id,
            task.start,
            task.end
        ),
        Message::RunPack { pack, .. } => pack.label(),
        Message::Plan { first, count, .. } => {
            format!("planning fragments {first}..{}", first + count)
        }
        Message::Cleanup { .. } => "cleanup".to_string(),
    }
}

/// A job id from a message that does not parse, if it names one.
fn lenient_job_id(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value.get("job_id")?.as_str().map(str::to_string)
}
