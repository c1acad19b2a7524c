//! Store and queue calls of one job over many small fragments, on DynamoDB
//! and SQS in moto: what a job costs in requests on AWS, read from the
//! emulator's request log (`/_stats`).

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill_tests::{Moto, Stack, StackOptions, write_sample_table};
use serde_json::json;

use crate::scenarios::{Options, fresh, verify};

pub async fn calls(options: &Options) -> anyhow::Result<()> {
    if std::env::var("MOTO_ENDPOINT").is_err() {
        println!(
            "## Store and queue calls\n\nskipped: MOTO_ENDPOINT is not set (bench/run starts moto)\n"
        );
        return Ok(());
    }
    let fragments: u64 = if options.quick { 200 } else { 1_000 };
    let rows = fragments * 10;
    let root = fresh(&options.dir, "calls")?;
    let moto = Moto::connect().await;
    let mut stack = Stack::aws(
        &moto,
        StackOptions {
            root: Some(root.to_string_lossy().into_owned()),
            visibility: Duration::from_secs(600),
            ..StackOptions::default()
        },
    )
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, rows, fragments).await?;
    stack.start_worker(
        EngineConfig::default(),
        RunnerConfig::default(),
        Duration::from_secs(600),
    );
    // Packed (the default), then one task per fragment (fragments of 10
    // rows are packed only below half of `task_size`).
    for (column, body, label) in [
        ("y", json!({"column": "y"}), "packed, the default"),
        (
            "z",
            json!({"column": "z", "task_size": 10}),
            "one task per fragment",
        ),
    ] {
        stack.declare("items", &[(column, "x * 2 + 1")]).await;
        moto.reset_calls().await;
        let job_id = stack.submit("items", body).await;
        let job = stack.wait_done(&job_id, Duration::from_secs(1800)).await;
        let calls = moto.calls().await;
        verify(&uri, column, "x * 2 + 1").await?;
        let tasks = job.spec.plan.tasks;
        println!(
            "## Store and queue calls: one job over {fragments} fragments of 10 rows ({label}: {tasks} tasks), DynamoDB and SQS in moto\n"
        );
        print_calls(&calls, fragments, tasks)?;
    }
    Ok(())
}

/// The calls by name, per 1,000 fragments and per task.
fn print_calls(calls: &serde_json::Value, fragments: u64, tasks: u64) -> anyhow::Result<()> {
    println!("From submit to DONE, read from the emulator's request log.\n");
    println!("| call | count | per 1,000 fragments | per task |");
    println!("|---|---|---|---|");
    let per_thousand = |n: u64| n as f64 * 1000.0 / fragments as f64;
    let per_task = |n: u64| n as f64 / tasks.max(1) as f64;
    let mut by_service: BTreeMap<String, u64> = BTreeMap::new();
    for (name, count) in calls.as_object().context("calls")? {
        let count = count.as_u64().unwrap_or(0);
        let service = name.split('.').next().unwrap_or(name);
        if service != "dynamodb" && service != "sqs" {
            continue;
        }
        *by_service.entry(service.to_string()).or_default() += count;
        println!(
            "| {name} | {count} | {:.0} | {:.2} |",
            per_thousand(count),
            per_task(count)
        );
    }
    for (service, count) in by_service {
        println!(
            "| **{service}, all** | {count} | {:.0} | {:.2} |",
            per_thousand(count),
            per_task(count)
        );
    }
    println!();
    Ok(())
}
