//! Local sinks: a JSON-lines file (`serve --events-log`) and an HTTP
//! webhook (`serve --events-url`), delivered in the background with retries.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc};
use tracing::warn;

use super::{EventSink, JobNotice};

/// Appends one JSON document per line.
pub struct JsonLinesSink {
    path: PathBuf,
    file: Mutex<tokio::fs::File>,
}

impl JsonLinesSink {
    pub async fn open(path: &Path) -> anyhow::Result<Self> {
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .with_context(|| format!("opening the events log {}", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }
}

#[async_trait]
impl EventSink for JsonLinesSink {
    async fn publish(&self, notice: &JobNotice) {
        let Ok(mut line) = serde_json::to_vec(notice) else {
            return;
        };
        line.push(b'\n');
        let mut file = self.file.lock().await;
        let written = async {
            file.write_all(&line).await?;
            file.flush().await
        }
        .await;
        if let Err(err) = written {
            warn!(path = %self.path.display(), job_id = %notice.job_id, error = %err, "could not write a job event");
        }
    }
}

/// Events waiting for the webhook; beyond this the newest are dropped (and
/// logged) rather than holding up jobs.
const WEBHOOK_QUEUE: usize = 1024;
/// Attempts per event, and the pause before the second (doubling, capped).
const WEBHOOK_ATTEMPTS: u32 = 6;
const WEBHOOK_FIRST_BACKOFF: Duration = Duration::from_millis(200);
const WEBHOOK_MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A webhook that does not answer within this is tried again.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);

/// POSTs each event as JSON to a URL, in order, from a background task.
pub struct WebhookSink {
    sender: mpsc::Sender<JobNotice>,
}

impl WebhookSink {
    /// Starts the delivery task (it ends when the sink is dropped).
    pub fn start(url: String) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .context("building the webhook client")?;
        let (sender, receiver) = mpsc::channel(WEBHOOK_QUEUE);
        tokio::spawn(deliver_all(client, url, receiver));
        Ok(Self { sender })
    }
}

#[async_trait]
impl EventSink for WebhookSink {
    async fn publish(&self, notice: &JobNotice) {
        if self.sender.try_send(notice.clone()).is_err() {
            warn!(job_id = %notice.job_id, change = notice.change.as_str(), "webhook queue full or closed: event dropped");
        }
    }
}

async fn deliver_all(
    client: reqwest::Client,
    url: String,
    mut receiver: mpsc::Receiver<JobNotice>,
) {
    while let Some(notice) = receiver.recv().await {
        deliver(&client, &url, &notice).await;
    }
}

/// One event, retried with backoff on errors and non-2xx answers.
async fn deliver(client: &reqwest::Client, url: &str, notice: &JobNotice) {
    let Ok(body) = serde_json::to_vec(notice) else {
        return;
    };
    let mut backoff = WEBHOOK_FIRST_BACKOFF;
    for attempt in 1..=WEBHOOK_ATTEMPTS {
        let sent = client
            .post(url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-lance-backfill-event", notice.change.as_str())
            .body(body.clone())
            .send()
            .await;
        let failure = match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) => format!("status {}", response.status()),
            Err(err) => err.to_string(),
        };
        if attempt == WEBHOOK_ATTEMPTS {
            warn!(job_id = %notice.job_id, change = notice.change.as_str(), %failure, "webhook did not take the event; dropped");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(WEBHOOK_MAX_BACKOFF);
    }
}
