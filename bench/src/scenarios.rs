//! The benchmark scenarios. Each prints a Markdown table.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use arrow_array::{Array, Int32Array, Int64Array, StringArray};
use futures::TryStreamExt;
use lance::Dataset;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::job::{Counter, Job, JobState};
use lance_backfill::ports::events::Publisher;
use lance_backfill::ports::queue::TaskQueue;
use lance_backfill::run::engine::{Delivery, EngineConfig};
use lance_backfill::submit::SubmitSettings;
use lance_backfill_tests::{Moto, Stack, StackOptions, write_sample_table};
use serde_json::json;

use crate::measure::{
    Pylance, Summary, ms, peak_rss, percentile, range, reset_peak_rss, rows_per_second, rss,
    summarize,
};

pub struct Options {
    pub reps: usize,
    pub quick: bool,
    pub dir: PathBuf,
    pub python: String,
    /// `rows/fragments` of the throughput shapes to run (empty: all).
    pub shapes: Vec<String>,
}

const EXPRESSIONS: [Expression; 2] = [("x2", "x * 2 + 1"), ("len", "length(s)")];

pub(crate) fn fresh(dir: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join(name);
    if path.exists() {
        std::fs::remove_dir_all(&path)?;
    }
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

pub(crate) async fn local_stack(root: &Path, settings: SubmitSettings) -> Stack {
    local_stack_with(root, settings, Publisher::default()).await
}

/// [`local_stack`] whose store publishes job events to `publisher`.
pub(crate) async fn local_stack_with(
    root: &Path,
    settings: SubmitSettings,
    publisher: Publisher,
) -> Stack {
    let mut stack = Stack::embedded(StackOptions {
        root: Some(root.to_string_lossy().into_owned()),
        settings,
        publisher,
        ..StackOptions::default()
    })
    .await;
    stack.start_worker(
        EngineConfig::default(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    stack
}

/// Submits through the HTTP API and waits for DONE. The time runs from
/// just before the POST to the `finished_at` the service recorded when the
/// job turned DONE (same clock, same machine), so it leaves out how long
/// this poll takes to notice, as pylance's time leaves out returning to
/// the caller.
pub(crate) async fn backfill(
    stack: &Stack,
    table: &str,
    body: serde_json::Value,
) -> anyhow::Result<Duration> {
    Ok(backfill_job(stack, table, body).await?.0)
}

/// [`backfill`], with the job as it ended.
pub(crate) async fn backfill_job(
    stack: &Stack,
    table: &str,
    body: serde_json::Value,
) -> anyhow::Result<(Duration, Job)> {
    let began = chrono::Utc::now();
    let job_id = stack.submit(table, body).await;
    loop {
        let job = stack.store().get_job(&job_id).await?.context("job")?;
        match job.state {
            JobState::Done => {
                let finished = job.finished_at.as_deref().context("finished_at")?;
                let finished = chrono::DateTime::parse_from_rfc3339(finished)?;
                return Ok(((finished.to_utc() - began).to_std()?, job));
            }
            JobState::Failed | JobState::Cancelled => {
                bail!("job {job_id} ended {:?}: {:?}", job.state, job.error)
            }
            _ => tokio::time::sleep(Duration::from_millis(1)).await,
        }
    }
}

/// Checks every value of `column` against `expr` computed here.
pub(crate) async fn verify(uri: &str, column: &str, expr: &str) -> anyhow::Result<u64> {
    let dataset = Dataset::open(uri).await?;
    let mut scanner = dataset.scan();
    scanner.project(&["x", "s", column])?;
    let mut stream = scanner.try_into_stream().await?;
    let mut rows = 0;
    while let Some(batch) = stream.try_next().await? {
        let x = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("x")?;
        let s = batch
            .column(1)
            .as_any()
            .downcast_ref::<StringArray>()
            .context("s")?;
        let got = batch.column(2);
        ensure!(got.null_count() == 0, "{column} has nulls");
        for i in 0..batch.num_rows() {
            let ok = match expr {
                "x + 1" => {
                    got.as_any()
                        .downcast_ref::<Int64Array>()
                        .context("int64")?
                        .value(i)
                        == x.value(i) + 1
                }
                "x * 2 + 1" => {
                    got.as_any()
                        .downcast_ref::<Int64Array>()
                        .context("int64")?
                        .value(i)
                        == x.value(i) * 2 + 1
                }
                "length(s)" => {
                    got.as_any()
                        .downcast_ref::<Int32Array>()
                        .context("int32")?
                        .value(i) as usize
                        == s.value(i).chars().count()
                }
                other => bail!("no check for {other}"),
            };
            ensure!(ok, "{column} is wrong at x = {}", x.value(i));
        }
        rows += batch.num_rows() as u64;
    }
    Ok(rows)
}

pub(crate) async fn versions(uri: &str) -> u64 {
    Dataset::open(uri)
        .await
        .map(|d| d.manifest().version)
        .unwrap_or(0)
}

/// (tag, SQL) of an expression the benchmarks fill.
type Expression = (&'static str, &'static str);

/// Table shapes of the throughput section: rows, fragments, expressions.
fn shapes(options: &Options) -> Vec<(u64, u64, Vec<Expression>)> {
    let all = all_shapes(options);
    if options.shapes.is_empty() {
        return all;
    }
    all.into_iter()
        .filter(|(rows, fragments, _)| options.shapes.contains(&format!("{rows}/{fragments}")))
        .collect()
}

fn all_shapes(options: &Options) -> Vec<(u64, u64, Vec<Expression>)> {
    if options.quick {
        return vec![
            (100_000, 16, EXPRESSIONS.to_vec()),
            (10_000, 1_000, vec![EXPRESSIONS[0]]),
        ];
    }
    vec![
        (1_000_000, 16, EXPRESSIONS.to_vec()),
        (10_000_000, 100, EXPRESSIONS.to_vec()),
        (100_000, 10_000, vec![("x1", "x + 1")]),
        (1_000_000, 1_000, vec![EXPRESSIONS[0]]),
    ]
}

pub async fn throughput(options: &Options) -> anyhow::Result<()> {
    println!("## Throughput: lance-backfill end to end vs pylance `add_columns`\n");
    println!(
        "Same freshly written table for both (`x` int64, `s` string); each repetition fills a new column, and both columns are dropped after it, so every repetition starts from the same manifest. {} repetitions, alternating who goes first.",
        options.reps
    );
    println!(
        "lance-backfill: just before the HTTP submit -> the `finished_at` the service records as the job turns DONE (embedded store and queue); values then verified."
    );
    println!("pylance: `LanceDataset.add_columns({{name: expr}})` timed inside Python.\n");
    println!(
        "| rows / fragments | expression | lance-backfill median (min–max) | rows/s | pylance median (min–max) | rows/s | ratio (pylance time / ours) | versions per job |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let mut pylance = Pylance::start(&options.python)?;
    for (rows, fragments, expressions) in shapes(options) {
        let root = fresh(&options.dir, &format!("throughput-{rows}-{fragments}"))?;
        let uri = format!("{}/items.lance", root.display());
        write_sample_table(&uri, rows, fragments).await?;
        let stack = local_stack(&root, SubmitSettings::default()).await;
        for (tag, expr) in expressions {
            let side = Side {
                stack: &stack,
                uri: &uri,
                tag,
                expr,
                rows,
            };
            let (ours, theirs, created) = side.repeat(options.reps, &mut pylance).await?;
            let (o, p) = (summarize(&ours), summarize(&theirs));
            println!(
                "| {rows} / {fragments} | `{expr}` | {} | {} | {} | {} | {:.2} | {created} |",
                range(&o),
                rows_per_second(rows, o.median),
                range(&p),
                rows_per_second(rows, p.median),
                p.median.as_secs_f64() / o.median.as_secs_f64()
            );
        }
    }
    println!();
    Ok(())
}

/// One expression on one table, both ways.
struct Side<'a> {
    stack: &'a Stack,
    uri: &'a str,
    tag: &'a str,
    expr: &'a str,
    rows: u64,
}

impl Side<'_> {
    /// Our times, pylance's, and the versions our last job created.
    async fn repeat(
        &self,
        reps: usize,
        pylance: &mut Pylance,
    ) -> anyhow::Result<(Vec<Duration>, Vec<Duration>, u64)> {
        let (mut ours, mut theirs, mut created) = (Vec::new(), Vec::new(), 0);
        for rep in 0..reps {
            let column = format!("ours_{}_{rep}", self.tag);
            let theirs_column = format!("py_{}_{rep}", self.tag);
            self.stack.declare("items", &[(&column, self.expr)]).await;
            // Alternate who goes first, so neither always runs on the
            // caches (or the leftover background work) of the other.
            if rep % 2 == 1 {
                theirs.push(pylance.add_column(self.uri, &theirs_column, self.expr)?);
            }
            let before = versions(self.uri).await;
            ours.push(backfill(self.stack, "items", json!({"column": column})).await?);
            created = versions(self.uri).await - before;
            if rep % 2 == 0 {
                theirs.push(pylance.add_column(self.uri, &theirs_column, self.expr)?);
            }
            let checked = verify(self.uri, &column, self.expr).await?;
            ensure!(
                checked == self.rows,
                "verified {checked} of {} rows",
                self.rows
            );
            let mut dataset = Dataset::open(self.uri).await?;
            dataset.drop_columns(&[&column, &theirs_column]).await?;
        }
        Ok((ours, theirs, created))
    }
}

pub async fn overheads(options: &Options) -> anyhow::Result<()> {
    let rows = if options.quick { 100_000 } else { 1_000_000 };
    let root = fresh(&options.dir, "overheads")?;
    let uri = format!("{}/items.lance", root.display());
    write_sample_table(&uri, rows, 16).await?;
    let stack = local_stack(&root, SubmitSettings::default()).await;
    println!(
        "## Overheads: many small tasks and checkpoints ({rows} rows, 16 fragments, `x * 2 + 1`)\n"
    );
    println!("| run | tasks | median (min–max) | rows/s |");
    println!("|---|---|---|---|");
    let runs = [
        ("defaults", json!({})),
        ("task_size 8192", json!({"task_size": 8192})),
        (
            "checkpoint_size 1024, task_size 8192",
            json!({"checkpoint_size": 1024, "task_size": 8192}),
        ),
    ];
    // The runs alternate rep by rep, so the machine's drift and the state
    // of its disk weigh on each alike.
    let mut samples = vec![Vec::new(); runs.len()];
    let mut tasks = vec![0; runs.len()];
    for rep in 0..options.reps {
        for (i, (_, extra)) in runs.iter().enumerate() {
            let column = format!("c{i}_{rep}");
            stack.declare("items", &[(&column, "x * 2 + 1")]).await;
            let mut body = extra.clone();
            body["column"] = json!(column);
            let (took, job) = backfill_job(&stack, "items", body).await?;
            samples[i].push(took);
            tasks[i] = job.metrics.get(Counter::TasksTotal);
            verify(&uri, &column, "x * 2 + 1").await?;
        }
    }
    let mut results: Vec<(String, u64, Summary)> = Vec::new();
    for (i, (label, _)) in runs.iter().enumerate() {
        let summary = summarize(&samples[i]);
        println!(
            "| {label} | {} | {} | {} |",
            tasks[i],
            range(&summary),
            rows_per_second(rows, summary.median)
        );
        results.push((label.to_string(), tasks[i], summary));
    }
    if let [
        (_, base_tasks, base),
        (_, small_tasks, small),
        (_, _, small_batches),
    ] = results.as_slice()
    {
        let extra = small.median.saturating_sub(base.median);
        let per_task = extra / (*small_tasks - *base_tasks).max(1) as u32;
        let batches = small_batches.median.saturating_sub(small.median);
        println!(
            "\nCost of small tasks: {} more in all, about {:.2} ms per extra task (each with its checkpoint write and read); batches of 1,024 rows instead of the default add {}.\n",
            ms(extra),
            per_task.as_secs_f64() * 1000.0,
            ms(batches)
        );
    }
    Ok(())
}

pub async fn planning(options: &Options) -> anyhow::Result<()> {
    let fragments: u64 = if options.quick { 2_000 } else { 10_000 };
    let rows = fragments * 10;
    let root = fresh(&options.dir, "planning")?;
    let uri = format!("{}/items.lance", root.display());
    let began = Instant::now();
    write_sample_table(&uri, rows, fragments).await?;
    let written = began.elapsed();
    let actual = Dataset::open(&uri).await?.get_fragments().len() as u64;
    ensure!(actual == fragments, "wrote {actual} fragments");
    // No workers: the planning message is handled here, timed.
    let stack = Stack::embedded(StackOptions {
        root: Some(root.to_string_lossy().into_owned()),
        ..StackOptions::default()
    })
    .await;
    let queue = stack.sqlite.clone().context("embedded queue")?;
    let engine = stack.components.engine(EngineConfig::default());
    let mut post = Vec::new();
    let mut fan_out = Vec::new();
    for rep in 0..options.reps {
        let column = format!("p{rep}");
        stack.declare("items", &[(&column, "x + 1")]).await;
        let began = Instant::now();
        let job_id = stack.submit("items", json!({"column": column})).await;
        post.push(began.elapsed());
        let began = Instant::now();
        let messages = queue
            .receive(10, Duration::from_secs(600), Duration::ZERO)
            .await?;
        ensure!(messages.len() == 1, "expected one planning message");
        let delivery = Delivery {
            message_id: "plan".into(),
            receive_count: 1,
            deadline: None,
        };
        engine.handle(&messages[0].body, &delivery).await;
        queue.delete(&messages[0].receipt).await?;
        let depth = queue.depth().await?;
        fan_out.push(began.elapsed());
        ensure!(
            depth == fragments,
            "{depth} tasks queued, expected {fragments}"
        );
        // Cancel (which queues a cleanup message) and empty the queue for the next round.
        let _ = stack
            .post(&format!("/v1/job/{job_id}/cancel"), json!({}))
            .await;
        queue.purge().await?;
    }
    println!(
        "## Planning a table of {fragments} fragments ({rows} rows; written in {})\n",
        ms(written)
    );
    println!("| step | median (min–max) |");
    println!("|---|---|");
    println!(
        "| POST backfill_column -> 202 (plan from the manifest, job recorded, one planning message) | {} |",
        range(&summarize(&post))
    );
    println!(
        "| 202 -> all {fragments} tasks queued (a worker fans out) | {} |",
        range(&summarize(&fan_out))
    );
    println!();
    Ok(())
}

pub async fn api_latency(options: &Options) -> anyhow::Result<()> {
    let Ok(endpoint) = std::env::var("MOTO_ENDPOINT") else {
        println!("## API latency\n\nskipped: MOTO_ENDPOINT is not set (bench/run starts moto)\n");
        return Ok(());
    };
    let fragments: u64 = if options.quick { 200 } else { 1_000 };
    let requests = if options.quick { 3 } else { 10 };
    // Moto slows down sharply as a queue fills: few inline requests.
    let inline_requests = 3;
    let moto = Moto::connect().await;
    println!(
        "## API latency: POST backfill_column on a {fragments}-fragment table, DynamoDB + SQS in moto ({endpoint})\n"
    );
    println!(
        "Each request authenticates, resolves the table, opens its latest version, plans {fragments} tasks from the manifest and writes the job (one DynamoDB transaction); then either sends the tasks itself (SendMessageBatch, 10 per call, 16 calls in flight) or queues one planning message for a worker. Moto is a single-threaded Python emulator that slows down as its queue fills: the inline row measures moto more than the service.\n"
    );
    println!("| tasks sent by | requests | p50 | p99 | min | max |");
    println!("|---|---|---|---|---|---|");
    for (label, inline_limit, requests) in [
        (
            "a worker from one planning message (the default above 100 tasks)",
            100u64,
            requests,
        ),
        (
            "the API itself (inline limit raised to 1,000)",
            1_000,
            inline_requests,
        ),
    ] {
        let root = fresh(&options.dir, &format!("latency-{inline_limit}"))?;
        let stack = Stack::aws(
            &moto,
            StackOptions {
                root: Some(root.to_string_lossy().into_owned()),
                settings: SubmitSettings {
                    inline_plan_limit: inline_limit,
                    manifests: vec![],
                },
                ..StackOptions::default()
            },
        )
        .await;
        let uri = stack.table_uri("items");
        write_sample_table(&uri, fragments * 1000, fragments).await?;
        let columns: Vec<String> = (0..requests).map(|i| format!("l{i}")).collect();
        let pairs: Vec<(&str, &str)> = columns.iter().map(|c| (c.as_str(), "x + 1")).collect();
        stack.declare("items", &pairs).await;
        let mut samples = Vec::new();
        for column in &columns {
            let began = Instant::now();
            stack.submit("items", json!({"column": column})).await;
            samples.push(began.elapsed());
        }
        let s = summarize(&samples);
        println!(
            "| {label} | {requests} | {} | {} | {} | {} |",
            ms(percentile(&samples, 50.0)),
            ms(percentile(&samples, 99.0)),
            ms(s.min),
            ms(s.max)
        );
    }
    println!();
    Ok(())
}

/// Spawns a Lambda binary against a stand-in Runtime API and times how long
/// it takes to ask for its first event.
async fn time_to_ready(binary: &Path, root: &Path) -> anyhow::Result<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Instant>(1);
    let app = axum::Router::new().route(
        "/2018-06-01/runtime/invocation/next",
        axum::routing::get(move || {
            let tx = tx.clone();
            async move {
                let _ = tx.send(Instant::now()).await;
                // Never answer: the function waits here as it would for work.
                futures::future::pending::<()>().await;
                ""
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let began = Instant::now();
    let mut child = std::process::Command::new(binary)
        .env("AWS_LAMBDA_RUNTIME_API", address.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", "bench")
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "1769")
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "bench")
        .env("AWS_REGION", "us-east-1")
        .env("AWS_ACCESS_KEY_ID", "bench")
        .env("AWS_SECRET_ACCESS_KEY", "bench")
        .env("LANCE_BACKFILL_ROOT", root)
        .env("LANCE_BACKFILL_JOBS_TABLE", "bench")
        .env("LANCE_BACKFILL_QUEUE_URL", "http://127.0.0.1:9/queue")
        .env("LANCE_BACKFILL_API_KEYS", "bench")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let ready = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await;
    let _ = child.kill();
    let _ = child.wait();
    server.abort();
    match ready {
        Ok(Some(at)) => Ok(at - began),
        _ => bail!("{} never asked for an event", binary.display()),
    }
}

fn stripped_size(binary: &Path) -> Option<u64> {
    let out = std::env::temp_dir().join(format!("stripped-{}", uuid::Uuid::new_v4().simple()));
    let status = std::process::Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(binary)
        .status()
        .ok()?;
    let size = status
        .success()
        .then(|| std::fs::metadata(&out).ok().map(|m| m.len()))
        .flatten();
    let _ = std::fs::remove_file(&out);
    size
}

pub async fn startup(options: &Options) -> anyhow::Result<()> {
    let here = std::env::current_exe()?;
    let dir = here.parent().context("binary dir")?;
    let root = fresh(&options.dir, "startup")?;
    println!("## Cold start, size and memory\n");
    println!(
        "Cold start: process start -> first request to the Lambda Runtime API (a local stand-in), {} runs.\n",
        options.reps
    );
    println!("| binary | cold start median (min–max) | size | stripped |");
    println!("|---|---|---|---|");
    for name in ["api", "worker"] {
        let binary = dir.join(name);
        if !binary.exists() {
            println!("| {name} | not built | | |");
            continue;
        }
        let mut samples = Vec::new();
        for _ in 0..options.reps {
            samples.push(time_to_ready(&binary, &root).await?);
        }
        let size = std::fs::metadata(&binary)?.len();
        let stripped = stripped_size(&binary)
            .map(|s| format!("{:.0} MB", s as f64 / 1e6))
            .unwrap_or_else(|| "-".into());
        println!(
            "| {name} | {} | {:.0} MB | {stripped} |",
            range(&summarize(&samples)),
            size as f64 / 1e6
        );
    }
    let rows = if options.quick { 100_000 } else { 1_000_000 };
    let output = std::process::Command::new(&here)
        .args(["one-task", "--rows", &rows.to_string(), "--dir"])
        .arg(fresh(&options.dir, "one-task")?)
        .output()?;
    ensure!(
        output.status.success(),
        "one-task failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    println!(
        "\nPeak RSS of a {rows}-row task (one fragment, `x * 2 + 1`, whole process incl. API and embedded store): {} MB; {} MB before the task started.\n",
        report["peak_kb"].as_u64().unwrap_or(0) / 1024,
        report["baseline_kb"].as_u64().unwrap_or(0) / 1024,
    );
    Ok(())
}

/// Child of `startup`: one task over one fragment, peak RSS on stdout.
pub async fn one_task(rows: u64, dir: &Path) -> anyhow::Result<()> {
    let uri = format!("{}/items.lance", dir.display());
    write_sample_table(&uri, rows, 1).await?;
    let stack = local_stack(dir, SubmitSettings::default()).await;
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    // Start the peak from here.
    reset_peak_rss(None)?;
    let baseline = rss(None)? / 1024;
    let took = backfill(&stack, "items", json!({"column": "y"})).await?;
    let peak = peak_rss(None)? / 1024;
    verify(&uri, "y", "x * 2 + 1").await?;
    println!(
        "{}",
        json!({"baseline_kb": baseline, "peak_kb": peak, "seconds": took.as_secs_f64()})
    );
    Ok(())
}
