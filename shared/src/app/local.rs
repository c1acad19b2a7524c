//! `lance-backfill serve`: the API and the worker in one process.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tracing::info;

use crate::adapters::aws::DynamoJobStore;
use crate::adapters::aws::SqsQueue;
use crate::adapters::local::JsonLinesSink;
use crate::adapters::local::WebhookSink;
use crate::app::bootstrap::{self, Components};
use crate::app::config;
use crate::app::runner::{self, RunnerConfig};
use crate::http::auth::Authenticator;
use crate::http::server;
use crate::ports::events::Publisher;
use crate::ports::queue::TaskQueue;
use crate::run::engine::EngineConfig;
use crate::submit::maintain;

pub struct ServeOptions {
    pub root: String,
    pub listen: SocketAddr,
    pub aws: bool,
    pub create_resources: bool,
    pub state: Option<PathBuf>,
    pub insecure_no_auth: bool,
    pub pollers: usize,
    pub batch_size: usize,
    pub visibility_timeout: Duration,
    pub max_receive_count: u32,
    pub invocation_timeout: Option<Duration>,
    pub worker: bool,
    /// Python processes in the local pool of user functions.
    pub udf_workers: Option<usize>,
    /// Job events as JSON lines to this file.
    pub events_log: Option<PathBuf>,
    /// Job events POSTed to this URL.
    pub events_url: Option<String>,
    /// How often maintained columns look for new versions (`None`: never).
    pub maintain_interval: Option<Duration>,
}

pub async fn serve(options: ServeOptions) -> anyhow::Result<()> {
    let auth = if options.insecure_no_auth {
        Authenticator::open()
    } else {
        config::authenticator()?
    };
    if !auth.is_open() && auth.access().is_open() {
        println!(
            "no {} is set: every authenticated caller may read, submit, declare (user functions \
             included) and cancel on every table",
            config::env::POLICY
        );
    }
    if !auth.is_open() && !auth.has_credentials() {
        bail!(
            "no credentials are configured: set {} (comma-separated API keys) or the JWT variables, \
             or pass --insecure-no-auth on a private machine",
            config::env::API_KEYS
        );
    }
    let (mut components, queue) = if options.aws {
        if options.create_resources {
            create_aws_resources(options.max_receive_count, options.visibility_timeout).await?;
        }
        let components = bootstrap::aws_worker(&options.root).await?;
        let queue = components.queues.default_queue();
        (components, queue)
    } else {
        let state = match options.state.clone() {
            Some(path) => path,
            None => bootstrap::default_state_path(&options.root)
                .context("a non-local root needs --state <file> for the embedded store")?,
        };
        info!(state = %state.display(), "embedded job store and queue");
        let (components, queue) =
            bootstrap::embedded(&options.root, &state, options.max_receive_count).await?;
        (components, Arc::new(queue) as Arc<dyn TaskQueue>)
    };
    if let Some(workers) = options.udf_workers {
        let sdk = match options.aws {
            true => Some(config::aws().await),
            false => None,
        };
        let hidden =
            crate::app::bootstrap::hidden_from_functions(&options.root, options.state.as_deref());
        components.udf = Some(Arc::new(config::udf_runtimes(
            sdk.as_ref(),
            Some(workers),
            hidden,
        )?));
    }
    let mut publisher = event_sinks(&options).await?;
    let wake = maintain::Wake::default();
    if options.maintain_interval.is_some() {
        publisher = publisher.with(Arc::new(maintain::WakeOnJobEnd(wake.clone())));
    }
    components.publisher = publisher;
    run(components, queue, auth, options, wake).await
}

/// The sinks `--events-log` and `--events-url` name.
async fn event_sinks(options: &ServeOptions) -> anyhow::Result<Publisher> {
    let mut publisher = Publisher::default();
    if let Some(path) = &options.events_log {
        publisher = publisher.with(Arc::new(JsonLinesSink::open(path).await?));
    }
    if let Some(url) = &options.events_url {
        let secret = std::env::var(config::env::EVENT_SECRET).ok();
        publisher = publisher.with(Arc::new(WebhookSink::start(url.clone(), secret)?));
    }
    Ok(publisher)
}

async fn run(
    components: Components,
    queue: Arc<dyn TaskQueue>,
    auth: Authenticator,
    options: ServeOptions,
    wake: maintain::Wake,
) -> anyhow::Result<()> {
    let settings = config::submit_settings()?;
    let access = auth.access().clone();
    let service = Arc::new(components.service(auth, settings.clone()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut server_stop = stop_rx.clone();
    let (address, server) = server::serve(service, options.listen, async move {
        let _ = server_stop.changed().await;
    })
    .await
    .with_context(|| format!("listening on {}", options.listen))?;
    println!(
        "lance-backfill serving http://{address} (root {})",
        options.root
    );
    let watcher_stop = stop_rx.clone();
    let pollers = options.worker.then(|| {
        // The worker's last attempt is the queue's last receive.
        let engine = EngineConfig {
            max_receive_count: options.max_receive_count,
            ..config::engine()?
        };
        let worker = Arc::new(components.worker(engine, options.visibility_timeout));
        let config = RunnerConfig {
            pollers: options.pollers,
            batch_size: options.batch_size,
            invocation_timeout: options.invocation_timeout,
            ..RunnerConfig::default()
        };
        anyhow::Ok(tokio::spawn(runner::run(
            worker,
            queue,
            options.visibility_timeout,
            config,
            stop_rx,
        )))
    });
    let pollers = pollers.transpose()?;
    let watcher = options.maintain_interval.map(|interval| {
        let maintainer = Arc::new(components.maintainer(settings.clone()).with_access(access));
        let versions = maintain::VersionWatch::start(&options.root, wake.clone());
        tokio::spawn(async move {
            maintain::watch(maintainer, interval, wake, watcher_stop).await;
            drop(versions);
        })
    });
    shutdown_signal().await;
    info!("shutting down: finishing in-flight batches");
    let _ = stop_tx.send(true);
    if let Some(pollers) = pollers {
        let _ = pollers.await;
    }
    if let Some(watcher) = watcher {
        let _ = watcher.await;
    }
    server.await??;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Creates the jobs table and the task queue (with its DLQ) named by the
/// environment, or with default names, and exports their names for the run.
async fn create_aws_resources(max_receive_count: u32, visibility: Duration) -> anyhow::Result<()> {
    let sdk = config::aws().await;
    let table = std::env::var(config::env::JOBS_TABLE)
        .unwrap_or_else(|_| "lance-backfill-jobs".to_string());
    DynamoJobStore::new(aws_sdk_dynamodb::Client::new(&sdk), table.clone())
        .ensure_table()
        .await?;
    if std::env::var(config::env::QUEUE_URL).is_err() {
        let queue = SqsQueue::create_with_dlq(
            aws_sdk_sqs::Client::new(&sdk),
            "lance-backfill-tasks",
            max_receive_count,
            visibility,
        )
        .await?;
        // SAFETY of set_var: called before any other thread reads the environment.
        unsafe { std::env::set_var(config::env::QUEUE_URL, queue.url()) };
    }
    unsafe { std::env::set_var(config::env::JOBS_TABLE, &table) };
    Ok(())
}
