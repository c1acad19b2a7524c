//! Assembling the service from configuration: the AWS way (DynamoDB, SQS)
//! and the embedded way (one SQLite file), built once per process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::adapters::aws::DynamoJobStore;
use crate::adapters::aws::SqsQueue;
use crate::adapters::sqlite::SqliteJobStore;
use crate::adapters::sqlite::SqliteQueue;
use crate::adapters::sqlite::embedded::EmbeddedDb;
use crate::app::config;
use crate::app::worker::Worker;
use crate::http::Service;
use crate::http::auth::Authenticator;
use crate::http::tokens::PageTokens;
use crate::model::table::Catalog;
use crate::ports::events::Publisher;
use crate::ports::queue::{QueueSet, TaskQueue};
use crate::ports::store::JobStore;
use crate::ports::udf::runtimes::UdfRuntimes;
use crate::run::engine::{Engine, EngineConfig};
use crate::run::lifecycle::Lifecycle;
use crate::submit::maintain::Maintainer;
use crate::submit::{SubmitSettings, Submitter};

/// The parts every entry point shares.
#[derive(Clone)]
pub struct Components {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn JobStore>,
    pub queues: QueueSet,
    /// Where workers run user functions (`None`: SQL only).
    pub udf: Option<Arc<UdfRuntimes>>,
    /// Where every change of a job's state is published.
    pub publisher: Publisher,
}

impl Components {
    pub fn service(&self, auth: Authenticator, settings: SubmitSettings) -> Service {
        Service {
            catalog: self.catalog.clone(),
            store: self.store.clone(),
            submitter: self.submitter(settings),
            lifecycle: self.lifecycle(),
            auth,
            tokens: page_tokens(),
        }
    }

    /// What changes jobs' states and publishes the changes.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle::new(
            self.store.clone(),
            self.queues.clone(),
            self.catalog.clone(),
            self.publisher.clone(),
        )
    }

    pub fn submitter(&self, settings: SubmitSettings) -> Submitter {
        Submitter {
            catalog: self.catalog.clone(),
            store: self.store.clone(),
            queues: self.queues.clone(),
            lifecycle: self.lifecycle(),
            settings,
        }
    }

    pub fn engine(&self, config: EngineConfig) -> Arc<Engine> {
        Arc::new(
            Engine::new(
                self.store.clone(),
                self.queues.clone(),
                self.catalog.clone(),
                self.lifecycle(),
                config,
            )
            .with_udf(self.udf.clone()),
        )
    }

    /// What fills maintained columns (the watcher of `serve`, the trigger).
    pub fn maintainer(&self, settings: SubmitSettings) -> Maintainer {
        Maintainer::new(
            self.catalog.clone(),
            self.store.clone(),
            self.submitter(settings),
        )
    }

    pub fn worker(&self, config: EngineConfig, visibility: Duration) -> Worker {
        Worker::new(self.engine(config), self.queues.default_queue(), visibility)
    }
}

/// What seals the API's page tokens: `LANCE_BACKFILL_TOKEN_SECRET` when set
/// (every API process of a deployment must share it), else a key of this
/// process alone (tokens then last until it restarts).
fn page_tokens() -> PageTokens {
    match std::env::var(config::env::TOKEN_SECRET) {
        Ok(secret) if !secret.is_empty() => PageTokens::from_secret(&secret),
        _ => PageTokens::random(),
    }
}

pub async fn catalog(root: &str) -> anyhow::Result<Arc<Catalog>> {
    let catalog = Catalog::open(root, config::storage_options()?)
        .await
        .with_context(|| format!("opening the namespace at {root}"))?;
    Ok(Arc::new(catalog))
}

/// DynamoDB and SQS, named by `LANCE_BACKFILL_JOBS_TABLE`,
/// `LANCE_BACKFILL_QUEUE_URL` (and `_DLQ_URL`, `_CLUSTERS`). No user
/// function runtimes: what the API function builds, which never runs user
/// code.
pub async fn aws(root: &str) -> anyhow::Result<Components> {
    Ok(aws_with_sdk(root).await?.0)
}

/// [`aws`] with the runtimes of user functions (`LANCE_BACKFILL_UDF_*`):
/// what workers build.
pub async fn aws_worker(root: &str) -> anyhow::Result<Components> {
    let (mut components, sdk) = aws_with_sdk(root).await?;
    let hidden = hidden_from_functions(root, None);
    components.udf = Some(Arc::new(config::udf_runtimes(Some(&sdk), None, hidden)?));
    Ok(components)
}

async fn aws_with_sdk(root: &str) -> anyhow::Result<(Components, aws_config::SdkConfig)> {
    let sdk = config::aws().await;
    let table = std::env::var(config::env::JOBS_TABLE)
        .with_context(|| format!("{} must name the DynamoDB table", config::env::JOBS_TABLE))?;
    let queue_url = std::env::var(config::env::QUEUE_URL)
        .with_context(|| format!("{} must name the SQS queue", config::env::QUEUE_URL))?;
    let dlq_url = std::env::var(config::env::DLQ_URL).ok();
    let sqs = aws_sdk_sqs::Client::new(&sdk);
    let store: Arc<dyn JobStore> = Arc::new(DynamoJobStore::new(
        aws_sdk_dynamodb::Client::new(&sdk),
        table,
    ));
    let mut queues = QueueSet::new(Arc::new(SqsQueue::new(sqs.clone(), queue_url, dlq_url)));
    for (name, url) in config::clusters()? {
        queues = queues.with_cluster(name, Arc::new(SqsQueue::new(sqs.clone(), url, None)));
    }
    let components = Components {
        catalog: catalog(root).await?,
        store,
        queues,
        udf: None,
        // Every process that changes a job's state publishes the change.
        publisher: config::event_publisher(&sdk),
    };
    Ok((components, sdk))
}

/// What the trigger function needs: [`aws`] and a maintainer, which
/// schedules columns' retries on `LANCE_BACKFILL_MAINTAIN_QUEUE_URL`.
pub async fn aws_trigger(root: &str) -> anyhow::Result<(Components, Maintainer)> {
    let (components, sdk) = aws_with_sdk(root).await?;
    let retries = std::env::var(config::env::MAINTAIN_QUEUE_URL)
        .ok()
        .filter(|url| !url.is_empty())
        .map(|url| {
            let sqs = aws_sdk_sqs::Client::new(&sdk);
            Arc::new(SqsQueue::new(sqs, url, None)) as Arc<dyn TaskQueue>
        });
    let maintainer = components
        .maintainer(config::submit_settings()?)
        .with_access(config::access()?)
        .with_retries(retries);
    Ok((components, maintainer))
}

/// The embedded store and queue in one SQLite file.
pub async fn embedded(
    root: &str,
    state: &Path,
    max_receive_count: u32,
) -> anyhow::Result<(Components, SqliteQueue)> {
    let db = EmbeddedDb::open(state)?;
    let queue = SqliteQueue::new(db.clone(), "tasks", max_receive_count);
    let mut queues = QueueSet::new(Arc::new(queue.clone()) as Arc<dyn TaskQueue>);
    for (name, _) in config::clusters()? {
        queues = queues.with_cluster(
            name.clone(),
            Arc::new(SqliteQueue::new(db.clone(), name, max_receive_count)),
        );
    }
    Ok((
        Components {
            catalog: catalog(root).await?,
            store: Arc::new(SqliteJobStore::new(db)),
            queues,
            udf: Some(Arc::new(config::udf_runtimes(
                None,
                None,
                hidden_from_functions(root, Some(state)),
            )?)),
            publisher: Publisher::default(),
        },
        queue,
    ))
}

/// Where the embedded state lives by default: beside the tables for a
/// local root.
pub fn default_state_path(root: &str) -> Option<std::path::PathBuf> {
    Some(local_root(root)?.join("_lance_backfill").join("state.db"))
}

/// The directory of a root on this machine's disk, if it is one.
pub fn local_root(root: &str) -> Option<std::path::PathBuf> {
    if root.contains("://") && !root.starts_with("file://") {
        return None;
    }
    Some(std::path::PathBuf::from(
        root.strip_prefix("file://").unwrap_or(root),
    ))
}

/// What user functions may not see on this machine: the namespace root
/// (a local one), the embedded state's directory, and the service user's
/// cloud and SSH credentials.
pub fn hidden_from_functions(
    root: &str,
    state: Option<&std::path::Path>,
) -> Vec<std::path::PathBuf> {
    let mut hidden = Vec::new();
    if let Some(local) = local_root(root) {
        hidden.push(local);
    }
    if let Some(dir) = state.and_then(std::path::Path::parent) {
        hidden.push(dir.to_path_buf());
    }
    if let Some(home) = std::env::var_os("HOME") {
        for private in [".aws", ".ssh", ".config/gcloud", ".azure", ".docker"] {
            hidden.push(std::path::Path::new(&home).join(private));
        }
    }
    hidden
}
