//! A scale model of one job run by many workers at once: one-fragment
//! tasks, 64 concurrent pollers, and DynamoDB's per-partition-key limits
//! enforced by the fault-injecting moto (1,000 write and 3,000 read units a
//! second per key, item sizes in KB units, transactions at double cost).
//! The emulator answers a hundred or two calls a second (one Python
//! process), far below what a thousand Lambda workers send, so the figure
//! that scales is the units each task puts on each key: the hottest key's
//! units per task, against its limit, give the tasks a second a job can
//! take before DynamoDB throttles it. 5,000 tasks in the test command
//! (about a quarter of an hour on 2 cores, nearly all of it the emulator);
//! `SCALE_MODEL_TASKS=<n>` runs another size (100,000: hours, outside CI),
//! and `SCALE_MODEL_SHARDS=<n>` gives the job that many shards instead of
//! one per 8 workers (`SCALE_MODEL_SHARDS=1`: every record under the job's
//! key, to see the throttling that avoids). Named `faults_*`: it
//! configures that moto, so it runs alone (.config/nextest.toml).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use lance_backfill::adapters::aws::dynamodb::ShardPolicy;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::job::{Counter, JobState};
use lance_backfill::ports::store::lease::DEFAULT_LEASE_TTL;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill_tests::{Moto, Stack, StackOptions, fast_engine, read_i64, write_table};
use serde_json::{Value, json};

const POLLERS: usize = 64;
const ROWS_PER_FRAGMENT: u64 = 10;

fn tasks_wanted() -> u64 {
    std::env::var("SCALE_MODEL_TASKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000)
}

fn shard_policy() -> ShardPolicy {
    match std::env::var("SCALE_MODEL_SHARDS").ok().map(|v| v.parse()) {
        Some(Ok(shards)) => ShardPolicy::Fixed(shards),
        Some(Err(err)) => panic!("SCALE_MODEL_SHARDS: {err}"),
        None => ShardPolicy::default(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_one_job_of_many_tasks_keeps_every_key_under_its_limit() {
    let tasks = tasks_wanted();
    let moto = Moto::faulty().await;
    let options = StackOptions {
        shards: shard_policy(),
        ..StackOptions::default()
    };
    let mut stack = Stack::aws(&moto, options).await;
    let uri = stack.table_uri("items");
    write_table(&uri, tasks * ROWS_PER_FRAGMENT, tasks, &HashMap::new())
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let jobs_table = stack.jobs_table.clone().expect("a DynamoDB stack");
    moto.set_faults(json!({"dynamodb": {"key_limits": {}}, "tables": [jobs_table]}))
        .await;
    let runner = RunnerConfig {
        pollers: POLLERS,
        ..RunnerConfig::default()
    };
    // Leases as long as in production: under this load the emulator takes
    // seconds to answer, and the tests' 3 s leases lapsed mid-commit, so
    // every group was refused until the last.
    let engine = EngineConfig {
        lease_ttl: DEFAULT_LEASE_TTL,
        ..fast_engine()
    };
    stack.start_worker(engine, runner, Duration::from_secs(60));
    moto.reset_calls().await;
    let started = Instant::now();
    let body = json!({"column": "y", "concurrency": POLLERS, "task_size": ROWS_PER_FRAGMENT});
    let job_id = stack.submit("items", body).await;
    let job = stack.wait(&job_id, Duration::from_secs(3600)).await;
    let took = started.elapsed();
    let calls = moto.calls().await;
    let capacity = moto.capacity().await;
    stack.stop_workers().await;

    assert_eq!(job.state, JobState::Done, "{job:?}");
    assert_eq!(job.spec.plan.tasks, tasks, "one task per fragment");
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(x.len() as u64, tasks * ROWS_PER_FRAGMENT);
    let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
    assert!(y == expected, "wrong values in {uri}");

    let used = &capacity["tables"][&jobs_table];
    let throttled = used["throttled"].as_u64().unwrap_or(0);
    let dynamodb: u64 = calls
        .as_object()
        .expect("calls")
        .iter()
        .filter(|(name, _)| name.starts_with("dynamodb."))
        .filter_map(|(_, count)| count.as_u64())
        .sum();
    let (write_key, writes) = hottest(used, "wcu");
    let (read_key, reads) = hottest(used, "rcu");
    let per_task = |units: f64| units / tasks as f64;
    let commits = job.metrics.get(Counter::CommitsDone);
    let groups = tasks.div_ceil(job.spec.params.commit_granularity.max(1) as u64);
    println!(
        "FIGURES scale model: {tasks} one-fragment tasks, {POLLERS} pollers, {:.1} s, {commits} commits ({groups} groups); DynamoDB {:.2} calls a task; {} keys; hottest for writes {write_key}: {:.2} WCU a task (DynamoDB throttles it past {:.0} tasks/s); for reads {read_key}: {:.2} RCU a task (past {:.0} tasks/s); {throttled} calls throttled ({calls})",
        took.as_secs_f64(),
        dynamodb as f64 / tasks as f64,
        used["keys"].as_object().map_or(0, |k| k.len()),
        per_task(writes),
        1000.0 / per_task(writes),
        per_task(reads),
        3000.0 / per_task(reads),
    );
    assert_eq!(throttled, 0, "keys went over their limits: {used}");
}

/// The key that took the most of `unit` in all, and how much.
fn hottest(used: &Value, unit: &str) -> (String, f64) {
    let keys = used["keys"].as_object().cloned().unwrap_or_default();
    keys.iter()
        .map(|(key, use_)| (key.clone(), use_[unit].as_f64().unwrap_or(0.0)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or_else(|| ("none".into(), 0.0))
}
