//! The figures the estimates of `dry_run` and `lance-backfill estimate`
//! project from, measured here and written to
//! `shared/src/model/estimate/measured.json` (built into the next build):
//! a worker's CPU per million rows and per task (embedded store and queue,
//! process CPU time), the Python runtime's cost per million rows beyond the
//! function, a one-fragment task's requests on DynamoDB, SQS and S3 (moto's
//! request log and its per-key accounting, the table on moto's S3) and a
//! manifest's bytes per fragment.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::{ArrayRef, Int64Array, RecordBatch};
use lance_backfill::adapters::local::pool::{LocalPool, PoolConfig};
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::estimate::{Measured, PerTask};
use lance_backfill::ports::udf::UdfRuntime;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill::submit::SubmitSettings;
use lance_backfill_tests::{Moto, Stack, StackOptions, write_sample_table, write_table};
use serde_json::{Value, json};

use crate::measure::summarize;
use crate::scenarios::{Options, fresh, local_stack, verify};

const MEASURED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../shared/src/model/estimate/measured.json"
);

/// User plus system CPU time of this process.
fn cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage writes the struct it is given; RUSAGE_SELF is valid.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// CPU the process spent on one job of `body` over `column`, values checked.
async fn job_cpu(stack: &Stack, uri: &str, column: &str, body: Value) -> anyhow::Result<Duration> {
    stack.declare("items", &[(column, "x * 2 + 1")]).await;
    let before = cpu_time();
    let job_id = stack.submit("items", body).await;
    stack.wait_done(&job_id, Duration::from_secs(600)).await;
    let spent = cpu_time() - before;
    verify(uri, column, "x * 2 + 1").await?;
    Ok(spent)
}

/// CPU per million rows (10M rows in 100 fragments) and per extra task
/// (1M rows in 16 fragments as 8 tasks, then as 128).
async fn worker_cpu(options: &Options) -> anyhow::Result<(f64, f64)> {
    let (mut per_million, mut per_task) = (Vec::new(), Vec::new());
    for (rows, fragments) in [(10_000_000u64, 100u64), (1_000_000, 16)] {
        let root = fresh(&options.dir, &format!("model-cpu-{fragments}"))?;
        let uri = format!("{}/items.lance", root.display());
        write_sample_table(&uri, rows, fragments).await?;
        let stack = local_stack(&root, SubmitSettings::default()).await;
        for rep in 0..options.reps {
            let whole = job_cpu(
                &stack,
                &uri,
                &format!("a{rep}"),
                json!({"column": format!("a{rep}")}),
            )
            .await?;
            if fragments == 100 {
                per_million.push(whole.div_f64(rows as f64 / 1e6));
                continue;
            }
            let body = json!({"column": format!("b{rep}"), "task_size": 8192});
            let small = job_cpu(&stack, &uri, &format!("b{rep}"), body).await?;
            per_task.push(small.saturating_sub(whole) / 120);
        }
    }
    let median = |samples: &[Duration]| summarize(samples).median.as_secs_f64();
    Ok((median(&per_million), median(&per_task)))
}

/// What the local runtime adds per million rows: the identity function on
/// one process, 65,536-row batches, wall time per call.
async fn pool_cost(options: &Options) -> anyhow::Result<f64> {
    let state = fresh(&options.dir, "model-pool")?;
    let functions = crate::udf::payloads(&options.python, &state)?;
    let pool = LocalPool::new(PoolConfig {
        python: options.python.clone(),
        size: 1,
        ..PoolConfig::default()
    })?;
    let identity = crate::udf::udf_ref("identity", &functions["identity"])?;
    const ROWS: usize = 65_536;
    let x: ArrayRef = Arc::new(Int64Array::from_iter_values(0..ROWS as i64));
    let batch = RecordBatch::try_from_iter([("x", x)])?;
    let mut samples = Vec::new();
    for call in 0..220 {
        let began = Instant::now();
        pool.call(&identity, &batch).await?;
        if call >= 20 {
            samples.push(began.elapsed());
        }
    }
    Ok(summarize(&samples).median.as_secs_f64() * 1e6 / ROWS as f64)
}

/// Sums the calls named `service.op` for the ops `wanted` accepts.
fn calls_of(calls: &Value, service: &str, wanted: impl Fn(&str) -> bool) -> f64 {
    calls
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(name, count)| Some((name.strip_prefix(&format!("{service}."))?, count)))
        .filter(|(op, _)| wanted(op))
        .filter_map(|(_, count)| count.as_f64())
        .sum()
}

/// A one-fragment task's requests, on a table of moto's S3 with the job's
/// records on moto's DynamoDB (units counted per key) and its tasks on SQS.
async fn aws_calls(options: &Options, moto: &Moto) -> anyhow::Result<(PerTask, f64)> {
    let tasks: u64 = if options.quick { 40 } else { 200 };
    let (bucket, storage) = moto.fresh_bucket().await;
    let root = format!("s3://{bucket}/warehouse");
    let options = StackOptions {
        root: Some(root.clone()),
        storage_options: storage.clone(),
        ..StackOptions::default()
    };
    let mut stack = Stack::aws(moto, options).await;
    let uri = format!("{root}/items.lance");
    write_table(&uri, tasks * 10_000, tasks, &storage).await?;
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let jobs_table = stack.jobs_table.clone().context("a DynamoDB stack")?;
    moto.set_faults(
        json!({"dynamodb": {"key_limits": {"wcu": null, "rcu": null}}, "tables": [jobs_table]}),
    )
    .await;
    let runner = RunnerConfig {
        pollers: 64,
        ..RunnerConfig::default()
    };
    stack.start_worker(EngineConfig::default(), runner, Duration::from_secs(600));
    moto.reset_calls().await;
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "concurrency": 64, "task_size": 10_000}),
        )
        .await;
    stack.wait_done(&job_id, Duration::from_secs(1800)).await;
    let (calls, capacity) = (moto.calls().await, moto.capacity().await);
    stack.stop_workers().await;
    moto.clear_faults().await;
    let per_task = per_task(&calls, &capacity["tables"][&jobs_table], tasks as f64);
    let manifest = manifest_bytes(&uri, &storage).await?;
    Ok((per_task, manifest / tasks as f64))
}

fn per_task(calls: &Value, used: &Value, tasks: f64) -> PerTask {
    let hottest = |unit: &str| {
        let keys = used["keys"].as_object().into_iter().flatten();
        keys.filter_map(|(_, key)| key[unit].as_f64())
            .fold(0.0, f64::max)
    };
    let units = |unit: &str| used[unit].as_f64().unwrap_or(0.0) / tasks;
    PerTask {
        dynamodb_calls: calls_of(calls, "dynamodb", |_| true) / tasks,
        dynamodb_write_units: units("wcu"),
        dynamodb_read_units: units("rcu"),
        hottest_key_write_units: hottest("wcu") / tasks,
        hottest_key_read_units: hottest("rcu") / tasks,
        sqs_requests: calls_of(calls, "sqs", |_| true) / tasks,
        s3_puts: calls_of(calls, "s3", |op| op == "PUT" || op == "POST") / tasks,
        s3_gets: calls_of(calls, "s3", |op| op == "GET" || op == "HEAD") / tasks,
    }
}

/// The size of the table's latest manifest.
async fn manifest_bytes(uri: &str, storage: &HashMap<String, String>) -> anyhow::Result<f64> {
    let dataset = lance::dataset::builder::DatasetBuilder::from_uri(uri)
        .with_storage_options(storage.clone())
        .load()
        .await?;
    let size = dataset.manifest_location().size;
    Ok(size.context("the manifest's size is not known")? as f64)
}

pub async fn model(options: &Options) -> anyhow::Result<()> {
    let Ok(_) = std::env::var("MOTO_ENDPOINT") else {
        println!(
            "## Estimate inputs\n\nskipped: MOTO_ENDPOINT is not set (bench/run starts moto)\n"
        );
        return Ok(());
    };
    let (sql, task) = worker_cpu(options).await?;
    let pool = pool_cost(options).await?;
    let (per_task, manifest) = aws_calls(options, &Moto::connect().await).await?;
    let measured = Measured {
        measured: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        command: format!("bench/run --only model --reps {}", options.reps),
        machine: crate::measure::machine()
            .trim_start_matches("Machine: ")
            .trim_end_matches('.')
            .into(),
        sql_cpu_seconds_per_million_rows: sql,
        task_cpu_seconds: task,
        pool_seconds_per_million_rows: pool,
        manifest_bytes_per_fragment: manifest,
        per_task,
    };
    let text = serde_json::to_string_pretty(&measured)?;
    if !options.quick {
        std::fs::write(Path::new(MEASURED), format!("{text}\n"))?;
    }
    println!("## Estimate inputs\n");
    println!(
        "Measured for `dry_run` and `lance-backfill estimate` (written to shared/src/model/estimate/measured.json unless `--quick`):\n\n```json\n{text}\n```\n"
    );
    Ok(())
}
