//! `lance-backfill`: the service on one machine.
//!
//! `serve` runs the API and the worker together (embedded store and queue by
//! default, DynamoDB and SQS with `--aws`); `demo` shows a real backfill.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use lance_backfill::local::{self, ServeOptions};
use lance_backfill::{demo, telemetry};

#[derive(Parser)]
#[command(
    name = "lance-backfill",
    version,
    about = "Fill computed columns of Lance tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the worker on the task queue.
    Serve {
        /// Namespace root: a directory or s3://bucket/prefix.
        #[arg(long, env = "LANCE_BACKFILL_ROOT")]
        root: String,
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Use DynamoDB and SQS (LANCE_BACKFILL_JOBS_TABLE, LANCE_BACKFILL_QUEUE_URL)
        /// instead of the embedded store; implied by AWS_ENDPOINT_URL.
        #[arg(long)]
        aws: bool,
        /// With --aws: create the table and queue if missing (emulators).
        #[arg(long)]
        create_resources: bool,
        /// Embedded state file (default: <root>/_lance_backfill/state.db).
        #[arg(long)]
        state: Option<PathBuf>,
        /// Accept requests without credentials (only for a private machine).
        #[arg(long)]
        insecure_no_auth: bool,
        /// Concurrent pollers of the queue (like concurrent worker invocations).
        #[arg(long, default_value_t = 2)]
        workers: usize,
        /// Messages per batch.
        #[arg(long, default_value_t = 10)]
        batch_size: usize,
        /// Seconds a received message stays hidden.
        #[arg(long, default_value_t = 60)]
        visibility_timeout: u64,
        /// Receives before a message goes to the dead-letter queue (the
        /// worker's last attempt is this receive).
        #[arg(long, env = "LANCE_BACKFILL_MAX_RECEIVE_COUNT", default_value_t = 5)]
        max_receive_count: u32,
        /// Seconds a batch may run (like the function timeout); tasks
        /// checkpoint and requeue their rest before it ends.
        #[arg(long)]
        invocation_timeout: Option<u64>,
        /// Only serve the API (no worker).
        #[arg(long)]
        no_worker: bool,
        /// Python processes running user functions (default: the cores, or
        /// LANCE_BACKFILL_UDF_WORKERS).
        #[arg(long)]
        udf_workers: Option<usize>,
        /// Append every job state change (SUBMITTED, RUNNING, DONE, FAILED,
        /// CANCELLED) to this file as a JSON line.
        #[arg(long)]
        events_log: Option<PathBuf>,
        /// POST every job state change as JSON to this URL (in the
        /// background, retried with backoff; never holds up a job).
        #[arg(long)]
        events_url: Option<String>,
        /// Seconds between looks for new table versions that maintained
        /// columns (declared with auto_backfill) must fill; 0 turns it off.
        /// On a local root new versions and jobs' ends also wake it at once.
        #[arg(long, default_value_t = 1.0)]
        poll_interval: f64,
    },
    /// Create a sample table, backfill a computed column through the API,
    /// verify every value and print the figures.
    Demo {
        #[arg(long, default_value_t = 1_000_000)]
        rows: u64,
        #[arg(long, default_value_t = 16)]
        fragments: u64,
        /// Where the demo writes its table and state.
        #[arg(long, default_value = "demo-data")]
        root: PathBuf,
        /// Fill a 64-dimension embedding with a Python function (numpy) run
        /// by the local pool of `LANCE_BACKFILL_UDF_PYTHON` processes.
        #[arg(long)]
        udf: bool,
    },
}

/// `--poll-interval`: seconds, 0 for none; bounded to a day.
fn maintain_interval(seconds: f64) -> anyhow::Result<Option<std::time::Duration>> {
    const MAX_SECONDS: f64 = 86_400.0;
    if !(0.0..=MAX_SECONDS).contains(&seconds) {
        anyhow::bail!("--poll-interval must be from 0 to {MAX_SECONDS} seconds, got {seconds}");
    }
    Ok((seconds > 0.0).then(|| std::time::Duration::from_secs_f64(seconds)))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match &cli.command {
        Command::Serve { .. } => telemetry::init(),
        Command::Demo { .. } => telemetry::init_quiet(),
    }
    match cli.command {
        Command::Serve {
            root,
            listen,
            aws,
            create_resources,
            state,
            insecure_no_auth,
            workers,
            batch_size,
            visibility_timeout,
            max_receive_count,
            invocation_timeout,
            no_worker,
            udf_workers,
            events_log,
            events_url,
            poll_interval,
        } => {
            local::serve(ServeOptions {
                root,
                listen,
                aws: aws || std::env::var_os("AWS_ENDPOINT_URL").is_some(),
                create_resources,
                state,
                insecure_no_auth,
                pollers: workers,
                batch_size,
                visibility_timeout: std::time::Duration::from_secs(visibility_timeout),
                max_receive_count,
                invocation_timeout: invocation_timeout.map(std::time::Duration::from_secs),
                worker: !no_worker,
                udf_workers,
                events_log,
                events_url,
                maintain_interval: maintain_interval(poll_interval)?,
            })
            .await
        }
        Command::Demo {
            rows,
            fragments,
            root,
            udf,
        } => {
            demo::run(demo::DemoOptions {
                root,
                rows,
                fragments,
                udf,
            })
            .await?;
            Ok(())
        }
    }
}
