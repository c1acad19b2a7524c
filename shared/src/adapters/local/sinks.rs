//! Local sinks: a JSON-lines file (`serve --events-log`) and an HTTP
//! webhook (`serve --events-url`), delivered in the background with retries
//! and signed, so the receiver knows the event is the service's.
//!
//! Signature: `x-lance-backfill-timestamp` is the sending time (Unix
//! seconds); `x-lance-backfill-signature` is `v1=` and the lowercase hex of
//! HMAC-SHA256(secret, timestamp + "." + body). A receiver recomputes it,
//! compares in constant time, and refuses timestamps far from its clock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use anyhow::Context;
use async_trait::async_trait;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Mutex, mpsc};
use tracing::warn;

use crate::ports::events::{EventSink, JobNotice};

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

/// The header carrying an event's sending time.
pub const TIMESTAMP_HEADER: &str = "x-lance-backfill-timestamp";
/// The header carrying an event's signature.
pub const SIGNATURE_HEADER: &str = "x-lance-backfill-signature";

/// POSTs each event as JSON to a URL, in order, from a background task.
pub struct WebhookSink {
    sender: mpsc::Sender<JobNotice>,
    delivery: Arc<Delivery>,
}

/// What the delivery task sends with, and what it could not deliver.
struct Delivery {
    client: reqwest::Client,
    url: String,
    secret: Option<Vec<u8>>,
    dropped: AtomicU64,
}

impl WebhookSink {
    /// Starts the delivery task (it ends when the sink is dropped); events
    /// are signed with `secret` when one is given.
    pub fn start(url: String, secret: Option<String>) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(WEBHOOK_TIMEOUT)
            .build()
            .context("building the webhook client")?;
        let secret = secret.filter(|s| !s.is_empty()).map(String::into_bytes);
        if secret.is_none() {
            warn!(
                "webhook events are not signed: set LANCE_BACKFILL_EVENT_SECRET so receivers can tell them from forgeries"
            );
        }
        let delivery = Arc::new(Delivery {
            client,
            url,
            secret,
            dropped: AtomicU64::new(0),
        });
        let (sender, receiver) = mpsc::channel(WEBHOOK_QUEUE);
        tokio::spawn(deliver_all(delivery.clone(), receiver));
        Ok(Self { sender, delivery })
    }

    /// Events given up on so far (queue full, or every attempt failed).
    pub fn dropped(&self) -> u64 {
        self.delivery.dropped.load(Ordering::Relaxed)
    }
}

#[async_trait]
impl EventSink for WebhookSink {
    async fn publish(&self, notice: &JobNotice) {
        if self.sender.try_send(notice.clone()).is_err() {
            let dropped = self.delivery.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            warn!(job_id = %notice.job_id, change = notice.change.as_str(), dropped, "webhook queue full or closed: event dropped");
        }
    }
}

async fn deliver_all(delivery: Arc<Delivery>, mut receiver: mpsc::Receiver<JobNotice>) {
    while let Some(notice) = receiver.recv().await {
        delivery.deliver(&notice).await;
    }
}

/// The signature of an event sent at `timestamp` (see the module's note).
pub fn event_signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl Delivery {
    /// One attempt's request, signed at the time it is sent.
    fn request(&self, notice: &JobNotice, body: &[u8]) -> reqwest::RequestBuilder {
        let mut request = self
            .client
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-lance-backfill-event", notice.change.as_str());
        if let Some(secret) = &self.secret {
            let timestamp = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            request = request
                .header(TIMESTAMP_HEADER, timestamp.to_string())
                .header(SIGNATURE_HEADER, event_signature(secret, timestamp, body));
        }
        request.body(body.to_vec())
    }

    /// One event, retried with backoff on errors and non-2xx answers.
    async fn deliver(&self, notice: &JobNotice) {
        let Ok(body) = serde_json::to_vec(notice) else {
            return;
        };
        let mut backoff = WEBHOOK_FIRST_BACKOFF;
        for attempt in 1..=WEBHOOK_ATTEMPTS {
            let failure = match self.request(notice, &body).send().await {
                Ok(response) if response.status().is_success() => return,
                Ok(response) => format!("status {}", response.status()),
                Err(err) => err.to_string(),
            };
            if attempt == WEBHOOK_ATTEMPTS {
                let dropped = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
                warn!(job_id = %notice.job_id, change = notice.change.as_str(), %failure, dropped, "webhook did not take the event; dropped");
                return;
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(WEBHOOK_MAX_BACKOFF);
        }
    }
}
