//! The task queue port: SQS in the cloud, a SQLite table on one machine.
//! Both give at-least-once delivery with a visibility timeout, a receive
//! count, and a dead-letter queue after too many receives.

use std::time::Duration;

use async_trait::async_trait;

pub mod message;

pub use message::{MESSAGE_VERSION, Message};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub message_id: String,
    pub receipt: String,
    pub body: String,
    /// How many times this message has been received, this time included.
    pub receive_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub body: String,
    pub delay: Duration,
}

impl Outgoing {
    /// A body as it is: a received message sent again after `delay` (a
    /// requeue), or one that is not a [`Message`] at all (tests).
    pub fn raw(body: &str, delay: Duration) -> Self {
        Self {
            body: body.to_string(),
            delay,
        }
    }
}

#[async_trait]
pub trait TaskQueue: Send + Sync + 'static {
    /// Sends many messages (SQS: `SendMessageBatch`, 10 per call, calls in parallel).
    async fn send_many(&self, messages: Vec<Outgoing>) -> anyhow::Result<()>;

    /// Receives up to `max` messages, hiding them for `visibility`; waits up
    /// to `wait` for the first one.
    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> anyhow::Result<Vec<Received>>;

    async fn delete(&self, receipt: &str) -> anyhow::Result<()>;

    /// Deletes many received messages (SQS: `DeleteMessageBatch`, 10 per
    /// call). Each is tried; the error counts those left, which come back
    /// after their visibility timeout as repeated deliveries.
    async fn delete_many(&self, receipts: &[String]) -> anyhow::Result<()>;

    /// Extends (or ends, with zero) the time a received message stays hidden.
    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> anyhow::Result<()>;

    /// Bodies of the messages moved to the dead-letter queue (for operators
    /// and tests; does not consume them).
    async fn dead_letters(&self) -> anyhow::Result<Vec<String>>;

    /// Dead letters nobody has handled yet, hidden for `visibility` so that
    /// one handler takes each; [`TaskQueue::settle_dead_letter`] marks one
    /// handled. On AWS the DLQ's own event source delivers them instead.
    async fn take_dead_letters(
        &self,
        max: usize,
        visibility: Duration,
    ) -> anyhow::Result<Vec<Received>>;

    async fn settle_dead_letter(&self, receipt: &str) -> anyhow::Result<()>;

    /// Whether an SQS event record's `eventSourceARN` is this queue's DLQ.
    fn is_dead_letter_source(&self, _event_source_arn: &str) -> bool {
        false
    }
}

/// SQS caps a message delay at 15 minutes.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

/// The queues of the named worker pools (`cluster`); the default pool has no name.
#[derive(Clone)]
pub struct QueueSet {
    default: std::sync::Arc<dyn TaskQueue>,
    clusters: std::collections::HashMap<String, std::sync::Arc<dyn TaskQueue>>,
}

impl QueueSet {
    pub fn new(default: std::sync::Arc<dyn TaskQueue>) -> Self {
        Self {
            default,
            clusters: Default::default(),
        }
    }

    pub fn with_cluster(
        mut self,
        name: impl Into<String>,
        queue: std::sync::Arc<dyn TaskQueue>,
    ) -> Self {
        self.clusters.insert(name.into(), queue);
        self
    }

    pub fn default_queue(&self) -> std::sync::Arc<dyn TaskQueue> {
        self.default.clone()
    }

    /// The queue of a pool; `None` for a pool nobody configured.
    pub fn for_cluster(&self, cluster: Option<&str>) -> Option<std::sync::Arc<dyn TaskQueue>> {
        match cluster {
            None | Some("default") => Some(self.default.clone()),
            Some(name) => self.clusters.get(name).cloned(),
        }
    }

    pub fn cluster_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.clusters.keys().cloned().collect();
        names.sort();
        names
    }
}
