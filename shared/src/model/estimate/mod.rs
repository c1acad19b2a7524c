//! What a job will take on AWS before it runs: its wall time at its
//! concurrency, the Lambda-seconds, requests and dollars at list prices,
//! and the part of the design that bounds it (the workers, the job's
//! hottest DynamoDB key, the S3 request rate of the table's data prefix, or
//! the manifest each commit rewrites).
//!
//! The service's own figures (CPU per row and per task, calls and
//! DynamoDB units per task, manifest bytes per fragment) are measured by
//! `bench/run --only model`, which writes `measured.json`; AWS's prices,
//! limits and latencies are in `aws.json` with their source. Both are built
//! into the binary, so `dry_run` answers without reading anything.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::model::job::default_commit_granularity;
use crate::model::plan::{self, PlannedFragment, ReadAt};

/// What `bench/run --only model` measured of this service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measured {
    /// The day, the command and the machine of the measurement.
    pub measured: String,
    pub command: String,
    pub machine: String,
    /// CPU of a worker filling `x * 2 + 1`: reading, computing, writing and
    /// checkpointing, per million rows.
    pub sql_cpu_seconds_per_million_rows: f64,
    /// CPU of one more task beyond its rows.
    pub task_cpu_seconds: f64,
    /// What the Python runtime adds per million rows beyond the function
    /// (Arrow IPC both ways, dispatch), in 65,536-row batches.
    pub pool_seconds_per_million_rows: f64,
    /// A manifest's bytes per fragment of a table being filled.
    pub manifest_bytes_per_fragment: f64,
    pub per_task: PerTask,
}

/// A task's requests, from a job of one-fragment tasks on DynamoDB, SQS and
/// S3 (moto's request log and its per-key accounting).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerTask {
    pub dynamodb_calls: f64,
    pub dynamodb_write_units: f64,
    pub dynamodb_read_units: f64,
    /// Write units on the job's busiest partition key for writes.
    pub hottest_key_write_units: f64,
    /// Read units on the job's busiest partition key for reads.
    pub hottest_key_read_units: f64,
    pub sqs_requests: f64,
    pub s3_puts: f64,
    pub s3_gets: f64,
}

/// AWS's prices, the worker function's size, limits and latencies.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Aws {
    pub source: String,
    pub prices_usd: Prices,
    pub worker: Worker,
    pub limits: Limits,
    pub latency_seconds: Latency,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Prices {
    pub lambda_gb_second: f64,
    pub lambda_million_requests: f64,
    pub dynamodb_million_write_units: f64,
    pub dynamodb_million_read_units: f64,
    pub sqs_million_requests: f64,
    pub s3_thousand_puts: f64,
    pub s3_thousand_gets: f64,
}

/// The worker function as template.yaml deploys it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Worker {
    pub memory_mb: f64,
    /// Lambda gives one vCPU per this much memory.
    pub mb_per_vcpu: f64,
    /// The SQS event source's batch size.
    pub messages_per_invocation: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub key_write_units_per_second: f64,
    pub key_read_units_per_second: f64,
    pub s3_puts_per_second_per_prefix: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub dynamodb: f64,
    pub sqs: f64,
    pub s3: f64,
    pub s3_bytes_per_second: f64,
}

/// Everything an estimate is computed from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inputs {
    pub measured: Measured,
    pub aws: Aws,
}

impl Inputs {
    /// The inputs built into this binary.
    pub fn embedded() -> Result<&'static Inputs, String> {
        static INPUTS: OnceLock<Result<Inputs, String>> = OnceLock::new();
        INPUTS
            .get_or_init(|| {
                let measured = serde_json::from_str(include_str!("measured.json"))
                    .map_err(|err| format!("measured.json: {err}"))?;
                let aws = serde_json::from_str(include_str!("aws.json"))
                    .map_err(|err| format!("aws.json: {err}"))?;
                Ok(Inputs { measured, aws })
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// What computes the column's values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Function {
    Sql,
    /// A Python function; its own time per 1,000 rows when the caller
    /// knows it.
    Python {
        ms_per_1k_rows: Option<f64>,
    },
}

/// The job to estimate.
#[derive(Debug, Clone, PartialEq)]
pub struct Shape {
    pub rows: u64,
    pub fragments: u64,
    pub tasks: u64,
    pub commits: u64,
    pub concurrency: u32,
    pub function: Function,
}

impl Shape {
    /// A job over a table of `rows` in `fragments` of equal size, with
    /// every default: its tasks as the planner packs them, its commits as
    /// the default commit granularity groups them.
    pub fn of_table(rows: u64, fragments: u64, concurrency: u32, function: Function) -> Self {
        let per_fragment = rows / fragments.max(1);
        let planned: Vec<PlannedFragment> = (0..fragments)
            .map(|id| PlannedFragment {
                id,
                physical_rows: per_fragment,
                at: ReadAt::default(),
            })
            .collect();
        let granularity = default_commit_granularity(fragments) as u64;
        Shape {
            rows,
            fragments,
            tasks: plan::task_count(&planned, None),
            commits: fragments.div_ceil(granularity.max(1)),
            concurrency,
            function,
        }
    }
}

/// The part of the design that sets the job's wall time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Bottleneck {
    /// The workers' own time: more concurrency makes it faster.
    Workers,
    /// The units the job's busiest DynamoDB key takes per second.
    HotKey,
    /// S3's PUT rate on the table's data prefix.
    S3Prefix,
    /// Commits, one at a time, each rewriting the manifest.
    Manifest,
}

/// The wall time each part alone would allow, in seconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bounds {
    pub workers: f64,
    pub hot_key: f64,
    pub s3_prefix: f64,
    pub manifest: f64,
}

impl Bounds {
    fn slowest(&self) -> (Bottleneck, f64) {
        [
            (Bottleneck::Workers, self.workers),
            (Bottleneck::HotKey, self.hot_key),
            (Bottleneck::S3Prefix, self.s3_prefix),
            (Bottleneck::Manifest, self.manifest),
        ]
        .into_iter()
        .fold((Bottleneck::Workers, 0.0), |slowest, part| {
            if part.1 > slowest.1 { part } else { slowest }
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Requests {
    pub lambda_invocations: f64,
    pub dynamodb_write_units: f64,
    pub dynamodb_read_units: f64,
    pub sqs: f64,
    pub s3_puts: f64,
    pub s3_gets: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cost {
    pub lambda: f64,
    pub dynamodb: f64,
    pub sqs: f64,
    pub s3: f64,
    pub total: f64,
}

/// What a job will take on AWS, as `dry_run` and `lance-backfill estimate`
/// answer it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub wall_seconds: f64,
    pub bottleneck: Bottleneck,
    pub bounds: Bounds,
    /// One task's billed time on a worker.
    pub task_seconds: f64,
    pub lambda_seconds: f64,
    pub lambda_gb_seconds: f64,
    pub requests: Requests,
    /// Manifest bytes the job's commits write in all.
    pub manifest_bytes_written: f64,
    pub cost_usd: Cost,
    /// What the figures leave out or take for granted.
    pub assumptions: Vec<String>,
    /// Where the measured figures come from.
    pub measured: String,
}

/// The estimate of `shape` from the inputs built into this binary.
pub fn estimate(shape: &Shape) -> Result<Estimate, String> {
    Ok(estimate_with(shape, Inputs::embedded()?))
}

/// The estimate of `shape` from `inputs`.
pub fn estimate_with(shape: &Shape, inputs: &Inputs) -> Estimate {
    let tasks = shape.tasks.max(1) as f64;
    let task_seconds = task_seconds(shape, inputs);
    let manifest_bytes = shape.fragments as f64 * inputs.measured.manifest_bytes_per_fragment;
    let bounds = bounds(shape, inputs, task_seconds, manifest_bytes);
    let (bottleneck, wall_seconds) = bounds.slowest();
    let lambda_seconds = tasks * task_seconds;
    let lambda_gb_seconds = lambda_seconds * inputs.aws.worker.memory_mb / 1024.0;
    let requests = requests(tasks, inputs);
    let cost_usd = cost(&requests, lambda_gb_seconds, &inputs.aws.prices_usd);
    let measured = &inputs.measured;
    Estimate {
        wall_seconds,
        bottleneck,
        bounds,
        task_seconds,
        lambda_seconds,
        lambda_gb_seconds,
        requests,
        manifest_bytes_written: shape.commits as f64 * manifest_bytes,
        cost_usd,
        assumptions: assumptions(shape, inputs),
        measured: format!(
            "{}, {} ({})",
            measured.measured, measured.command, measured.machine
        ),
    }
}

/// One task on a worker: its CPU spread over the worker's vCPUs, then its
/// store, queue and object-store round trips one after another.
fn task_seconds(shape: &Shape, inputs: &Inputs) -> f64 {
    let (measured, aws) = (&inputs.measured, &inputs.aws);
    let millions_of_rows = shape.rows as f64 / shape.tasks.max(1) as f64 / 1e6;
    let per_million = measured.sql_cpu_seconds_per_million_rows
        + match shape.function {
            Function::Sql => 0.0,
            // 10 ms per 1,000 rows is 10 s per million.
            Function::Python { ms_per_1k_rows } => {
                measured.pool_seconds_per_million_rows + ms_per_1k_rows.unwrap_or(0.0)
            }
        };
    let vcpus = (aws.worker.memory_mb / aws.worker.mb_per_vcpu).max(1.0);
    let cpu = (measured.task_cpu_seconds + millions_of_rows * per_million) / vcpus;
    let calls = &measured.per_task;
    let latency = &aws.latency_seconds;
    let waits = calls.dynamodb_calls * latency.dynamodb
        + calls.sqs_requests * latency.sqs
        + (calls.s3_puts + calls.s3_gets) * latency.s3;
    cpu + waits
}

fn bounds(shape: &Shape, inputs: &Inputs, task_seconds: f64, manifest_bytes: f64) -> Bounds {
    let (per_task, aws) = (&inputs.measured.per_task, &inputs.aws);
    let tasks = shape.tasks.max(1) as f64;
    let workers = (shape.concurrency.max(1) as f64).min(tasks);
    // A commit reads the latest manifest and writes the next one.
    let commit =
        2.0 * (aws.latency_seconds.s3 + manifest_bytes / aws.latency_seconds.s3_bytes_per_second);
    Bounds {
        workers: tasks * task_seconds / workers,
        hot_key: tasks
            * (per_task.hottest_key_write_units / aws.limits.key_write_units_per_second)
                .max(per_task.hottest_key_read_units / aws.limits.key_read_units_per_second),
        s3_prefix: tasks * per_task.s3_puts / aws.limits.s3_puts_per_second_per_prefix,
        manifest: shape.commits as f64 * commit,
    }
}

fn requests(tasks: f64, inputs: &Inputs) -> Requests {
    let per_task = &inputs.measured.per_task;
    Requests {
        lambda_invocations: (tasks / inputs.aws.worker.messages_per_invocation).ceil(),
        dynamodb_write_units: tasks * per_task.dynamodb_write_units,
        dynamodb_read_units: tasks * per_task.dynamodb_read_units,
        sqs: tasks * per_task.sqs_requests,
        s3_puts: tasks * per_task.s3_puts,
        s3_gets: tasks * per_task.s3_gets,
    }
}

fn cost(requests: &Requests, gb_seconds: f64, prices: &Prices) -> Cost {
    let lambda = gb_seconds * prices.lambda_gb_second
        + requests.lambda_invocations / 1e6 * prices.lambda_million_requests;
    let dynamodb = requests.dynamodb_write_units / 1e6 * prices.dynamodb_million_write_units
        + requests.dynamodb_read_units / 1e6 * prices.dynamodb_million_read_units;
    let sqs = requests.sqs / 1e6 * prices.sqs_million_requests;
    let s3 = requests.s3_puts / 1e3 * prices.s3_thousand_puts
        + requests.s3_gets / 1e3 * prices.s3_thousand_gets;
    Cost {
        lambda,
        dynamodb,
        sqs,
        s3,
        total: lambda + dynamodb + sqs + s3,
    }
}

fn assumptions(shape: &Shape, inputs: &Inputs) -> Vec<String> {
    let aws = &inputs.aws;
    let mut said = vec![
        format!(
            "workers of {} MB ({:.1} vCPU) whose CPU per row is this service's as measured; \
             each call waits its round trip (DynamoDB {} ms, SQS {} ms, S3 {} ms), one after another",
            aws.worker.memory_mb,
            (aws.worker.memory_mb / aws.worker.mb_per_vcpu).max(1.0),
            aws.latency_seconds.dynamodb * 1e3,
            aws.latency_seconds.sqs * 1e3,
            aws.latency_seconds.s3 * 1e3,
        ),
        format!("prices and limits: {}", aws.source),
        "not counted: planning, cold starts, retries, S3 storage and data transfer".into(),
    ];
    if let Function::Python {
        ms_per_1k_rows: None,
    } = shape.function
    {
        said.push(
            "the Python function's own time is not included: pass \
             context.function_ms_per_1k_rows to add it"
                .into(),
        );
    }
    said
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(rows: u64, fragments: u64, concurrency: u32, function: Function) -> Shape {
        Shape {
            rows,
            fragments,
            tasks: fragments,
            commits: fragments.div_ceil(64),
            concurrency,
            function,
        }
    }

    #[test]
    fn a_table_of_big_fragments_is_a_task_each_and_small_ones_are_packed() {
        let big = Shape::of_table(1_000_000_000, 1_000, 100, Function::Sql);
        assert_eq!((big.tasks, big.commits), (1_000, 16));
        let small = Shape::of_table(1_000_000, 100_000, 100, Function::Sql);
        assert_eq!(
            small.tasks,
            100_000_u64.div_ceil(plan::PACK_FRAGMENTS as u64)
        );
        assert_eq!(small.commits, 20);
    }

    #[test]
    fn the_built_in_inputs_are_read() {
        let inputs = Inputs::embedded().unwrap();
        assert!(inputs.measured.sql_cpu_seconds_per_million_rows > 0.0);
        assert!(inputs.aws.prices_usd.lambda_gb_second > 0.0);
    }

    #[test]
    fn more_workers_shorten_a_job_bound_by_its_workers_and_cost_the_same() {
        let inputs = Inputs::embedded().unwrap();
        let slow = Function::Python {
            ms_per_1k_rows: Some(1000.0),
        };
        let few = estimate_with(&shape(1_000_000_000, 1_000, 100, slow), inputs);
        let many = estimate_with(&shape(1_000_000_000, 1_000, 1_000, slow), inputs);
        assert_eq!(few.bottleneck, Bottleneck::Workers);
        assert!((few.wall_seconds / many.wall_seconds - 10.0).abs() < 1e-6);
        assert!((few.cost_usd.total - many.cost_usd.total).abs() < 1e-9);
        // A second of function per 1,000 rows: a million seconds of CPU.
        let vcpus = inputs.aws.worker.memory_mb / inputs.aws.worker.mb_per_vcpu;
        assert!(few.lambda_seconds > 1e6 / vcpus);
    }

    #[test]
    fn the_slowest_part_names_the_bottleneck() {
        let inputs = Inputs::embedded().unwrap();
        // 100,000 one-row tasks with unbounded workers: the hot key or the
        // S3 prefix, not the workers, bounds the job.
        let many_small = estimate_with(&shape(100_000, 100_000, 1_000_000, Function::Sql), inputs);
        assert_ne!(many_small.bottleneck, Bottleneck::Workers);
        let b = &many_small.bounds;
        assert_eq!(
            many_small.wall_seconds,
            b.workers.max(b.hot_key).max(b.s3_prefix).max(b.manifest)
        );
    }

    #[test]
    fn costs_add_up_and_a_function_of_unknown_cost_says_so() {
        let inputs = Inputs::embedded().unwrap();
        let python = Function::Python {
            ms_per_1k_rows: None,
        };
        let e = estimate_with(&shape(10_000_000, 100, 16, python), inputs);
        let c = &e.cost_usd;
        assert!((c.lambda + c.dynamodb + c.sqs + c.s3 - c.total).abs() < 1e-12);
        assert!(c.total > 0.0);
        assert!(
            e.assumptions
                .iter()
                .any(|a| a.contains("function_ms_per_1k_rows"))
        );
        assert_eq!(e.requests.lambda_invocations, 10.0);
    }
}
