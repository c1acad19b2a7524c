//! `lance-backfill`: the service on one machine, and its client.
//!
//! `serve` runs the API and the worker together (embedded store and queue by
//! default, DynamoDB and SQS with `--aws`); `demo` shows a real backfill;
//! `submit`, `jobs`, `watch`, `cancel`, `pause`, `resume`, `describe` and
//! `errors` call a running service (`--url`), local or deployed;
//! `estimate` projects jobs over a table of any size to AWS time and cost.

mod client;
mod commands;
mod demo;
mod estimate;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use lance_backfill::app::local::{self, ServeOptions};
use lance_backfill::app::telemetry;

#[derive(Parser)]
#[command(
    name = "lance-backfill",
    version,
    about = "Fill computed columns of Lance tables"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    service: Service,
}

/// Where the client commands send their calls.
#[derive(Args)]
struct Service {
    /// The service's base URL (client commands).
    #[arg(
        long,
        global = true,
        env = "LANCE_BACKFILL_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// An API key, sent as x-api-key (client commands).
    #[arg(
        long,
        global = true,
        env = "LANCE_BACKFILL_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Print JSON for scripts instead of text (client commands).
    #[arg(long, global = true)]
    json: bool,
}

/// What else decides whether `serve` starts and who may call it: read from
/// the environment only, so secrets stay out of process listings.
const SERVE_ENVIRONMENT: &str = "\
Environment (read by serve; secrets never go on the command line):
  LANCE_BACKFILL_API_KEYS        API keys, comma-separated (or LANCE_BACKFILL_API_KEY_HASHES:
                                 name:sha256-hex entries); one of the key or JWT settings, or
                                 --insecure-no-auth, is needed to start
  LANCE_BACKFILL_JWT_ISSUER      with LANCE_BACKFILL_JWT_AUDIENCE and one of LANCE_BACKFILL_JWT_SECRET,
                                 LANCE_BACKFILL_JWT_PUBLIC_KEY or LANCE_BACKFILL_JWT_JWKS: bearer tokens
  LANCE_BACKFILL_POLICY          JSON policy: which principal may read, submit, declare, udf, cancel where
  LANCE_BACKFILL_UDF_PYTHON      the Python that runs user functions (needs pyarrow and cloudpickle)
  LANCE_BACKFILL_UDF_RUNTIMES    where functions run: local, lambda:<function> or http(s)://... rules
  LANCE_BACKFILL_TOKEN_SECRET    seals listing page tokens (default: a key of the process)
  LANCE_BACKFILL_EVENT_SECRET    signs webhook events (--events-url)
All settings: README.md, Configuration.";

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API and run the worker on the task queue.
    #[command(after_help = SERVE_ENVIRONMENT)]
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
        /// Concurrent pollers of the task queue, each running a batch of
        /// tasks at a time (like concurrent worker Lambda invocations).
        #[arg(long, alias = "workers", default_value_t = 2)]
        pollers: usize,
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
        /// Where the demo writes its table and state. Its table there is
        /// written anew; a folder holding anything but the demo's is refused.
        #[arg(long, default_value = "demo-data")]
        root: PathBuf,
        /// Fill a 64-dimension embedding with a Python function (numpy) run
        /// by the local pool of `LANCE_BACKFILL_UDF_PYTHON` processes.
        #[arg(long)]
        udf: bool,
    },
    /// Backfill a column of a table: prints the job's id (with --wait,
    /// follows it as `watch` does and exits with its code).
    Submit {
        table: String,
        column: String,
        /// SQL choosing the rows to compute (default: the rows where the column is null).
        #[arg(long = "where")]
        filter: Option<String>,
        /// Follow the job until it ends.
        #[arg(long)]
        wait: bool,
        /// Compute again only the rows this job skipped (`on_error: skip`).
        #[arg(long, value_name = "JOB")]
        retry_failed: Option<String>,
        /// Only plan: print what the job would do and take on AWS.
        #[arg(long)]
        dry_run: bool,
        /// A Python function's own time per 1,000 rows, in milliseconds,
        /// for the estimate.
        #[arg(long, value_name = "MS")]
        function_ms_per_1k_rows: Option<f64>,
    },
    /// What jobs over a table of ROWS in FRAGMENTS would take on AWS: wall
    /// time, Lambda, requests, dollars and the bottleneck, for each
    /// function and concurrency (a Markdown table).
    Estimate {
        #[arg(long)]
        rows: u64,
        #[arg(long)]
        fragments: u64,
        /// sql, python, or a Python function's milliseconds per 1,000 rows
        /// (comma-separated: sql,10,1000).
        #[arg(long, value_delimiter = ',', default_value = "sql")]
        function: Vec<String>,
        /// Concurrent workers (comma-separated: 100,1000).
        #[arg(long, value_delimiter = ',', default_value = "100")]
        concurrency: Vec<u32>,
    },
    /// The newest jobs of a table, or of every table you may read.
    Jobs {
        table: Option<String>,
        /// Only jobs in this state: PENDING, RUNNING, PAUSED, DONE, FAILED or CANCELLED.
        #[arg(long)]
        state: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// Follow a job until it ends: exit code 0 DONE, 1 FAILED, 2 CANCELLED.
    Watch { job: String },
    /// Cancel a job.
    Cancel { job: String },
    /// Pause a job: it hands out no more work and keeps what it computed.
    Pause { job: String },
    /// Resume a paused job from its checkpoints.
    Resume { job: String },
    /// A table's version and columns, and what fills each computed one.
    Describe { table: String },
    /// The rows a job's function raised on, and its error.
    Errors { job: String },
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
        _ => {}
    }
    match cli.command {
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
        serve @ Command::Serve { .. } => local::serve(serve_options(serve)?).await,
        command => {
            let code = run_client(&cli.service, command).await?;
            std::process::exit(code);
        }
    }
}

fn serve_options(command: Command) -> anyhow::Result<ServeOptions> {
    let Command::Serve {
        root,
        listen,
        aws,
        create_resources,
        state,
        insecure_no_auth,
        pollers,
        batch_size,
        visibility_timeout,
        max_receive_count,
        invocation_timeout,
        no_worker,
        udf_workers,
        events_log,
        events_url,
        poll_interval,
    } = command
    else {
        anyhow::bail!("not the serve command");
    };
    Ok(ServeOptions {
        root,
        listen,
        aws: aws || std::env::var_os("AWS_ENDPOINT_URL").is_some(),
        create_resources,
        state,
        insecure_no_auth,
        pollers,
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
}

/// A client command against the service at `--url`: its exit code.
async fn run_client(service: &Service, command: Command) -> anyhow::Result<i32> {
    let api = client::Api::new(&service.url, service.api_key.clone())?;
    let json = service.json;
    match command {
        Command::Submit {
            table,
            column,
            filter,
            wait,
            retry_failed,
            dry_run,
            function_ms_per_1k_rows,
        } => {
            let request = commands::Submit {
                table,
                column,
                filter,
                wait,
                retry_failed,
                dry_run,
                function_ms_per_1k_rows,
            };
            commands::submit(&api, request, json).await
        }
        Command::Estimate {
            rows,
            fragments,
            function,
            concurrency,
        } => {
            let projection = estimate::Projection {
                rows,
                fragments,
                functions: function,
                concurrency,
            };
            estimate::run(projection, json)
        }
        Command::Jobs {
            table,
            state,
            limit,
        } => {
            let listing = commands::Listing {
                table,
                state,
                limit,
            };
            commands::jobs(&api, listing, json).await
        }
        Command::Watch { job } => watch::watch(&api, &job, json).await,
        Command::Cancel { job } => commands::control(&api, &job, "cancel", json).await,
        Command::Pause { job } => commands::control(&api, &job, "pause", json).await,
        Command::Resume { job } => commands::control(&api, &job, "resume", json).await,
        Command::Describe { table } => commands::describe(&api, &table, json).await,
        Command::Errors { job } => commands::errors(&api, &job, json).await,
        Command::Serve { .. } | Command::Demo { .. } => anyhow::bail!("not a client command"),
    }
}
