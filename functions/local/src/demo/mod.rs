//! `lance-backfill demo`: a real backfill end to end on one machine. Makes a
//! sample table, serves the API with the embedded store and queue, declares
//! a computed column and submits a backfill through the HTTP API with the
//! official Lance Namespace client, follows the job, then reads the table
//! back with a fresh reader and checks every value.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use lance::Dataset;
use lance_backfill_sample::{verify, write_sample_table};
use lance_namespace_reqwest_client::apis::configuration::{ApiKey, Configuration};
use lance_namespace_reqwest_client::apis::table_api;
use lance_namespace_reqwest_client::models::{
    AddColumnsEntry, AlterTableAddColumnsRequest, AlterTableBackfillColumnsRequest,
};

use lance_backfill::app::bootstrap;
use lance_backfill::app::runner::{self, RunnerConfig};
use lance_backfill::http::auth::Authenticator;
use lance_backfill::http::server;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill::submit::SubmitSettings;

mod udf;

pub struct DemoOptions {
    pub root: PathBuf,
    pub rows: u64,
    pub fragments: u64,
    /// Fill an embedding with a Python function instead of `y = x * 2 + 1`.
    pub udf: bool,
}

/// The column the demo fills and how it is declared.
struct Fill {
    udf: bool,
    column: &'static str,
    entry: AddColumnsEntry,
    description: &'static str,
}

impl Fill {
    async fn of(options: &DemoOptions) -> anyhow::Result<Self> {
        if !options.udf {
            let mut entry = AddColumnsEntry::new("y".to_string());
            entry.computed = Some(Some("x * 2 + 1".to_string()));
            return Ok(Self {
                udf: false,
                column: "y",
                entry,
                description: "computed column y = x * 2 + 1",
            });
        }
        let python = std::env::var(lance_backfill::app::config::env::UDF_PYTHON)
            .unwrap_or_else(|_| "python3".to_string());
        Ok(Self {
            udf: true,
            column: udf::COLUMN,
            entry: udf::entry(udf::payload(&python).await?),
            description: "virtual column embedding = embed(s), a Python function (64 x float32)",
        })
    }

    async fn verify(&self, dataset: &Dataset) -> anyhow::Result<u64> {
        if self.udf {
            udf::verify(dataset).await
        } else {
            verify(dataset).await
        }
    }
}

/// The API and a worker, in this process, on the embedded store and queue.
struct LocalService {
    client: Configuration,
    api_key: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl LocalService {
    async fn start(root: &str, state: &std::path::Path) -> anyhow::Result<Self> {
        let (components, queue) = bootstrap::embedded(root, state, 5).await?;
        let api_key = format!("demo-{}", uuid::Uuid::new_v4().simple());
        let service = Arc::new(components.service(
            Authenticator::default().with_plain_key(&api_key),
            SubmitSettings::default(),
        ));
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let mut server_shutdown = shutdown_rx.clone();
        let (address, server) = server::serve(service, "127.0.0.1:0".parse()?, async move {
            let _ = server_shutdown.changed().await;
        })
        .await?;
        let worker = Arc::new(components.worker(EngineConfig::default(), VISIBILITY));
        let pollers = tokio::spawn(runner::run(
            worker,
            Arc::new(queue),
            VISIBILITY,
            RunnerConfig::default(),
            shutdown_rx,
        ));
        let server = tokio::spawn(async move {
            let _ = server.await;
        });
        let client = Configuration {
            base_path: format!("http://{address}"),
            api_key: Some(ApiKey {
                prefix: None,
                key: api_key.clone(),
            }),
            ..Configuration::default()
        };
        Ok(Self {
            client,
            api_key,
            shutdown,
            tasks: vec![pollers, server],
        })
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

/// How often the demo polls its job: the job takes tens of milliseconds.
const POLL_INTERVAL: Duration = Duration::from_millis(5);

/// The demo's visibility timeout: tasks take well under a second.
const VISIBILITY: Duration = Duration::from_secs(60);

/// What the demo keeps in its folder: its table and the service's state.
const DEMO_ENTRIES: [&str; 2] = ["items.lance", "_lance_backfill"];

/// The demo writes its table anew and removes its state, so it refuses a
/// folder holding anything else: `--root` pointed at real data by mistake.
fn check_root(root: &std::path::Path) -> anyhow::Result<()> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(());
    };
    let foreign: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .filter(|name| !DEMO_ENTRIES.contains(&name.as_str()))
        .collect();
    if !foreign.is_empty() {
        anyhow::bail!(
            "--root {} holds files that are not the demo's ({}): the demo rewrites its \
             folder, so give it a new or empty one",
            root.display(),
            foreign.join(", ")
        );
    }
    Ok(())
}

pub async fn run(options: DemoOptions) -> anyhow::Result<()> {
    check_root(&options.root)?;
    std::fs::create_dir_all(&options.root)
        .with_context(|| format!("creating {}", options.root.display()))?;
    let root = std::path::absolute(&options.root)?
        .to_string_lossy()
        .into_owned();
    let table_uri = format!("{root}/items.lance");
    let state = bootstrap::default_state_path(&root).context("no local state path")?;
    // A fresh start: the demo owns this folder's state.
    let _ = std::fs::remove_file(&state);

    let fill_spec = Fill::of(&options).await?;
    println!(
        "1/4 writing {} rows in {} fragments to {table_uri}",
        options.rows, options.fragments
    );
    let began = Instant::now();
    write_sample_table(&table_uri, options.rows, options.fragments).await?;
    println!("    written in {:.2?}", began.elapsed());

    let service = LocalService::start(&root, &state).await?;
    let before_and_after = fill(&service, &fill_spec, &table_uri, options.rows).await;
    service.stop().await;
    let (before, job, elapsed) = before_and_after?;
    report(&fill_spec, &table_uri, before, &job, elapsed).await
}

/// Declares the column and backfills it through the API; returns the
/// version before the backfill, the finished job and how long it took.
async fn fill(
    service: &LocalService,
    spec: &Fill,
    table_uri: &str,
    rows: u64,
) -> anyhow::Result<(u64, serde_json::Value, Duration)> {
    let client = &service.client;
    println!(
        "2/4 declaring {} (POST add_columns on {})",
        spec.description, client.base_path
    );
    table_api::alter_table_add_columns(
        client,
        "items",
        AlterTableAddColumnsRequest::new(vec![spec.entry.clone()]),
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("add_columns: {e}"))?;
    let before = Dataset::open(table_uri).await?.manifest().version;

    println!("3/4 backfilling {} (POST backfill_column)", spec.column);
    let submitted = Instant::now();
    let response = table_api::alter_table_backfill_columns(
        client,
        "items",
        AlterTableBackfillColumnsRequest::new(spec.column.to_string()),
        None,
    )
    .await
    .map_err(|e| anyhow::anyhow!("backfill_column: {e}"))?;
    let job = follow(client, &service.api_key, &response.job_id, rows).await?;
    Ok((before, job, submitted.elapsed()))
}

async fn report(
    spec: &Fill,
    table_uri: &str,
    before: u64,
    job: &serde_json::Value,
    elapsed: Duration,
) -> anyhow::Result<()> {
    println!("4/4 verifying with a fresh reader");
    let dataset = Dataset::open(table_uri).await?;
    let checked = spec.verify(&dataset).await?;
    let versions_created = dataset.manifest().version - before;
    let rows_per_second = checked as f64 / elapsed.as_secs_f64();
    println!(
        "verified: all {checked} rows hold {} (job {}, state {})",
        spec.description,
        job["job_id"].as_str().unwrap_or("?"),
        job["state"].as_str().unwrap_or("?")
    );
    println!(
        "figures: {checked} rows in {:.3} s = {:.0} rows/s; {} table version(s) created, {} commit(s)",
        elapsed.as_secs_f64(),
        rows_per_second,
        versions_created,
        job["metrics"]["commits"]["done"]
    );
    Ok(())
}

/// Polls the job, drawing a progress bar of committed rows, until it ends.
async fn follow(
    client: &Configuration,
    api_key: &str,
    job_id: &str,
    rows: u64,
) -> anyhow::Result<serde_json::Value> {
    let bar = ProgressBar::new(rows);
    bar.set_style(
        ProgressStyle::with_template(
            "    [{elapsed_precise}] {bar:40} {pos}/{len} rows computed ({per_sec}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let url = format!("{}/v1/job/{job_id}", client.base_path);
    loop {
        let job: serde_json::Value = client
            .client
            .get(&url)
            .header("x-api-key", api_key)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let computed = job["metrics"]["rows_computed"]["done"]
            .as_u64()
            .unwrap_or(0);
        bar.set_position(computed.min(rows));
        let state = job["state"].as_str().unwrap_or("").to_string();
        bar.set_message(state.clone());
        match state.as_str() {
            "DONE" => {
                bar.set_position(rows);
                bar.finish();
                return Ok(job);
            }
            "FAILED" | "CANCELLED" => {
                bar.abandon();
                bail!("job {job_id} ended {state}: {}", job["error"]);
            }
            _ => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_demo_refuses_a_folder_of_other_data() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("demo-data");
        assert!(check_root(&root).is_ok(), "a new folder");
        std::fs::create_dir_all(root.join("items.lance")).unwrap();
        std::fs::create_dir_all(root.join("_lance_backfill")).unwrap();
        assert!(check_root(&root).is_ok(), "the demo's own folder");
        std::fs::write(root.join("orders.lance"), b"").unwrap();
        let refused = check_root(&root).unwrap_err().to_string();
        assert!(refused.contains("orders.lance"), "{refused}");
    }
}
