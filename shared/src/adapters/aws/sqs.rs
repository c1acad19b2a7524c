//! The task queue on SQS. Redrive to the dead-letter queue is SQS's own
//! (the queue's redrive policy); this adapter only reads the DLQ.

use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    DeleteMessageBatchRequestEntry, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use futures::{StreamExt, TryStreamExt};

use crate::ports::queue::{MAX_DELAY, Outgoing, Received, TaskQueue};

/// Parallel `SendMessageBatch` calls when enqueueing many tasks.
const SEND_PARALLELISM: usize = 16;
/// Tries of the entries of a SendMessageBatch that SQS reported failed,
/// waiting 50, 100, 200 ms between them.
const SEND_ATTEMPTS: usize = 4;
const SEND_BACKOFF_BASE: Duration = Duration::from_millis(50);
/// Entries of one SendMessageBatch (SQS's limit).
const BATCH_ENTRIES: usize = 10;
/// Longest receive wait SQS allows (long polling).
const MAX_WAIT_SECONDS: u64 = 20;
/// Longest visibility timeout SQS allows: 12 hours.
const MAX_VISIBILITY_SECONDS: u64 = 43_200;
/// Receives of the DLQ while peeking at it (10 messages each).
const PEEK_ROUNDS: usize = 10;

#[derive(Clone)]
pub struct SqsQueue {
    client: Client,
    url: String,
    dead_letter_url: Option<String>,
}

impl SqsQueue {
    pub fn new(client: Client, url: impl Into<String>, dead_letter_url: Option<String>) -> Self {
        Self {
            client,
            url: url.into(),
            dead_letter_url,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn dead_letter_url(&self) -> Option<&str> {
        self.dead_letter_url.as_deref()
    }

    /// Messages waiting, in flight or delayed (SQS's approximate counts).
    pub async fn approximate_depth(&self) -> anyhow::Result<u64> {
        let names = [
            QueueAttributeName::ApproximateNumberOfMessages,
            QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
            QueueAttributeName::ApproximateNumberOfMessagesDelayed,
        ];
        let output = self
            .client
            .get_queue_attributes()
            .queue_url(&self.url)
            .set_attribute_names(Some(names.to_vec()))
            .send()
            .await
            .map_err(|e| anyhow!(e.into_service_error()))
            .context("GetQueueAttributes")?;
        let attributes = output.attributes().cloned().unwrap_or_default();
        Ok(names
            .iter()
            .filter_map(|name| attributes.get(name)?.parse::<u64>().ok())
            .sum())
    }

    /// Creates a queue and its DLQ with a redrive policy, as template.yaml
    /// declares them. For emulators and tests; in AWS the stack owns them.
    pub async fn create_with_dlq(
        client: Client,
        name: &str,
        max_receive_count: u32,
        visibility: Duration,
    ) -> anyhow::Result<Self> {
        let dlq = client
            .create_queue()
            .queue_name(format!("{name}-dlq"))
            .send()
            .await
            .context("CreateQueue (DLQ)")?;
        let dlq_url = dlq.queue_url().context("DLQ without url")?.to_string();
        let dlq_arn = client
            .get_queue_attributes()
            .queue_url(&dlq_url)
            .attribute_names(QueueAttributeName::QueueArn)
            .send()
            .await
            .context("GetQueueAttributes")?
            .attributes()
            .and_then(|a| a.get(&QueueAttributeName::QueueArn).cloned())
            .context("DLQ without arn")?;
        let redrive = serde_json::json!({
            "deadLetterTargetArn": dlq_arn,
            "maxReceiveCount": max_receive_count.to_string(),
        });
        let queue = client
            .create_queue()
            .queue_name(name)
            .attributes(QueueAttributeName::RedrivePolicy, redrive.to_string())
            .attributes(
                QueueAttributeName::VisibilityTimeout,
                visibility.as_secs().to_string(),
            )
            .send()
            .await
            .context("CreateQueue")?;
        let url = queue.queue_url().context("queue without url")?.to_string();
        Ok(Self::new(client, url, Some(dlq_url)))
    }

    async fn send_chunk(&self, chunk: Vec<Outgoing>) -> anyhow::Result<()> {
        let mut pending: Vec<(String, Outgoing)> = chunk
            .into_iter()
            .enumerate()
            .map(|(i, m)| (i.to_string(), m))
            .collect();
        for attempt in 0..SEND_ATTEMPTS {
            let entries = pending
                .iter()
                .map(|(id, m)| {
                    SendMessageBatchRequestEntry::builder()
                        .id(id)
                        .message_body(&m.body)
                        .delay_seconds(m.delay.min(MAX_DELAY).as_secs() as i32)
                        .build()
                })
                .collect::<Result<Vec<_>, _>>()?;
            let output = self
                .client
                .send_message_batch()
                .queue_url(&self.url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| anyhow!(e.into_service_error()))
                .context("SendMessageBatch")?;
            let failed: Vec<String> = output.failed().iter().map(|f| f.id().to_string()).collect();
            if failed.is_empty() {
                return Ok(());
            }
            pending.retain(|(id, _)| failed.contains(id));
            tokio::time::sleep(SEND_BACKOFF_BASE * (1 << attempt)).await;
        }
        Err(anyhow!(
            "SendMessageBatch: {} messages kept failing",
            pending.len()
        ))
    }

    async fn delete_from(&self, url: &str, receipt: &str) -> anyhow::Result<()> {
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| anyhow!(e.into_service_error()))
            .context("DeleteMessage")?;
        Ok(())
    }

    /// Deletes up to 10 messages in one `DeleteMessageBatch`; returns how
    /// many were not deleted.
    async fn delete_chunk(&self, receipts: &[String]) -> anyhow::Result<usize> {
        let entries = receipts
            .iter()
            .enumerate()
            .map(|(i, receipt)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(i.to_string())
                    .receipt_handle(receipt)
                    .build()
            })
            .collect::<Result<Vec<_>, _>>()?;
        let output = self
            .client
            .delete_message_batch()
            .queue_url(&self.url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(|e| anyhow!(e.into_service_error()))
            .context("DeleteMessageBatch")?;
        Ok(output.failed().len())
    }

    async fn receive_from(
        &self,
        url: &str,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        let output = self
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(max.clamp(1, BATCH_ENTRIES) as i32)
            .visibility_timeout(visibility.as_secs() as i32)
            .wait_time_seconds(wait.as_secs().min(MAX_WAIT_SECONDS) as i32)
            .message_system_attribute_names(MessageSystemAttributeName::ApproximateReceiveCount)
            .send()
            .await
            .map_err(|e| anyhow!(e.into_service_error()))
            .context("ReceiveMessage")?;
        Ok(output
            .messages()
            .iter()
            .map(|m| Received {
                message_id: m.message_id().unwrap_or_default().to_string(),
                receipt: m.receipt_handle().unwrap_or_default().to_string(),
                body: m.body().unwrap_or_default().to_string(),
                receive_count: m
                    .attributes()
                    .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(1),
            })
            .collect())
    }
}

#[async_trait]
impl TaskQueue for SqsQueue {
    async fn send_many(&self, messages: Vec<Outgoing>) -> anyhow::Result<()> {
        let chunks: Vec<Vec<Outgoing>> = messages
            .chunks(BATCH_ENTRIES)
            .map(<[Outgoing]>::to_vec)
            .collect();
        futures::stream::iter(chunks)
            .map(|chunk| self.send_chunk(chunk))
            .buffer_unordered(SEND_PARALLELISM)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    async fn receive(
        &self,
        max: usize,
        visibility: Duration,
        wait: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        self.receive_from(&self.url, max, visibility, wait).await
    }

    async fn delete(&self, receipt: &str) -> anyhow::Result<()> {
        self.delete_from(&self.url, receipt).await
    }

    async fn delete_many(&self, receipts: &[String]) -> anyhow::Result<()> {
        let mut left = 0;
        let mut last_error = None;
        for chunk in receipts.chunks(BATCH_ENTRIES) {
            match self.delete_chunk(chunk).await {
                Ok(failed) => left += failed,
                Err(err) => {
                    left += chunk.len();
                    last_error = Some(err);
                }
            }
        }
        match last_error {
            Some(err) => Err(err.context(format!("{left} messages not deleted"))),
            None if left > 0 => Err(anyhow!("DeleteMessageBatch: {left} messages not deleted")),
            None => Ok(()),
        }
    }

    async fn change_visibility(&self, receipt: &str, timeout: Duration) -> anyhow::Result<()> {
        self.client
            .change_message_visibility()
            .queue_url(&self.url)
            .receipt_handle(receipt)
            .visibility_timeout(timeout.as_secs().min(MAX_VISIBILITY_SECONDS) as i32)
            .send()
            .await
            .map_err(|e| anyhow!(e.into_service_error()))
            .context("ChangeMessageVisibility")?;
        Ok(())
    }

    async fn take_dead_letters(
        &self,
        max: usize,
        visibility: Duration,
    ) -> anyhow::Result<Vec<Received>> {
        match &self.dead_letter_url {
            Some(dlq) => {
                self.receive_from(dlq, max, visibility, Duration::ZERO)
                    .await
            }
            None => Ok(Vec::new()),
        }
    }

    async fn settle_dead_letter(&self, receipt: &str) -> anyhow::Result<()> {
        match &self.dead_letter_url {
            Some(dlq) => self.delete_from(dlq, receipt).await,
            None => Ok(()),
        }
    }

    fn is_dead_letter_source(&self, event_source_arn: &str) -> bool {
        // arn:aws:sqs:<region>:<account>:<name> and https://.../<account>/<name>
        let name_of_arn = event_source_arn.rsplit(':').next();
        let name_of_url = self
            .dead_letter_url
            .as_deref()
            .and_then(|url| url.trim_end_matches('/').rsplit('/').next());
        name_of_arn.is_some() && name_of_arn == name_of_url
    }

    async fn dead_letters(&self) -> anyhow::Result<Vec<String>> {
        let Some(dlq) = &self.dead_letter_url else {
            return Ok(Vec::new());
        };
        // Peek: receive with a zero visibility timeout so they stay in the DLQ.
        let mut bodies = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for _ in 0..PEEK_ROUNDS {
            let batch = self
                .receive_from(dlq, BATCH_ENTRIES, Duration::ZERO, Duration::ZERO)
                .await?;
            if batch.is_empty() {
                break;
            }
            for message in batch {
                if seen.insert(message.message_id.clone()) {
                    bodies.push(message.body);
                }
            }
        }
        Ok(bodies)
    }
}
