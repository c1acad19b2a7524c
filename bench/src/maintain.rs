//! Maintained columns on the embedded default: the lag from a committed
//! append of 10,000 rows to those rows filled, with the watcher as `serve`
//! runs it on a local root (woken by new versions and jobs' ends) and with
//! its 1 s poll alone (as on an object store), beside a job submitted by
//! hand for the same rows; and a burst of 100 appends, with the jobs it took.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use lance::Dataset;
use lance_backfill::ports::events::Publisher;
use lance_backfill::submit::maintain::{self, DEFAULT_POLL_INTERVAL, MAINTAINER, Wake};
use lance_backfill_tests::{Stack, append_rows, write_sample_table};
use serde_json::json;
use tokio::sync::watch;

use crate::measure::{ms, percentile};
use crate::scenarios::{Options, backfill, fresh, local_stack_with, verify};

const APPEND_ROWS: i64 = 10_000;
const BURST_APPENDS: usize = 100;
const BURST_ROWS: i64 = 100;

/// Rows of the table whose y is still null.
async fn nulls(uri: &str) -> anyhow::Result<usize> {
    let dataset = Dataset::open(uri).await?;
    Ok(dataset.count_rows(Some("y IS NULL".to_string())).await?)
}

async fn until_filled(uri: &str, timeout: Duration) -> anyhow::Result<Duration> {
    let began = Instant::now();
    while began.elapsed() < timeout {
        if nulls(uri).await? == 0 {
            return Ok(began.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    bail!("rows not filled within {timeout:?}")
}

async fn declare_maintained(stack: &Stack) -> anyhow::Result<()> {
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": "y", "computed": "x * 2 + 1"}],
                   "context": {"auto_backfill": "true"}}),
        )
        .await;
    anyhow::ensure!(status == 200, "add_columns: {body}");
    let job_id = body["context"]["job_id"].as_str().context("job id")?;
    stack.wait_done(job_id, Duration::from_secs(600)).await;
    Ok(())
}

/// A watcher as `serve` runs it: the default 1 s poll, woken by the stack's
/// jobs' ends and, with `versions`, by new versions under the root.
fn start_watcher(stack: &Stack, wake: &Wake, versions: bool) -> watch::Sender<bool> {
    let maintainer = Arc::new(stack.components.maintainer(Default::default()));
    let (stop, stop_rx) = watch::channel(false);
    let versions = versions
        .then(|| maintain::VersionWatch::start(&stack.root, wake.clone()))
        .flatten();
    let wake = wake.clone();
    tokio::spawn(async move {
        maintain::watch(maintainer, DEFAULT_POLL_INTERVAL, wake, stop_rx).await;
        drop(versions);
    });
    stop
}

/// Appends `APPEND_ROWS` rows `count` times, each after a random pause of
/// up to a poll interval (appends do not keep time with the watcher); each
/// lag runs from the append's commit until no row is null.
async fn lags(uri: &str, next: &mut i64, count: usize) -> anyhow::Result<Vec<Duration>> {
    let mut lags = Vec::new();
    for _ in 0..count {
        let pause = uuid::Uuid::new_v4().as_u128() % DEFAULT_POLL_INTERVAL.as_millis();
        tokio::time::sleep(Duration::from_millis(pause as u64)).await;
        append_rows(uri, *next, APPEND_ROWS).await;
        *next += APPEND_ROWS;
        lags.push(until_filled(uri, Duration::from_secs(120)).await?);
    }
    Ok(lags)
}

pub async fn maintained(options: &Options) -> anyhow::Result<()> {
    let appends = if options.quick { 5 } else { 20 };
    let root = fresh(&options.dir, "maintain")?;
    let wake = Wake::default();
    let publisher = Publisher::default().with(Arc::new(maintain::WakeOnJobEnd(wake.clone())));
    let stack = local_stack_with(&root, Default::default(), publisher).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 100_000, 4).await?;
    declare_maintained(&stack).await?;
    let mut next = 100_000;
    let mut rows = Vec::new();
    for (name, versions) in [
        (
            "maintained column, `serve` on a local root (woken by new versions)",
            true,
        ),
        (
            "maintained column, poll alone (a root on an object store)",
            false,
        ),
    ] {
        let stop = start_watcher(&stack, &wake, versions);
        rows.push((name, lags(&uri, &mut next, appends).await?));
        let _ = stop.send(true);
    }
    // The reference: the same appends, each filled by a job submitted at once.
    let mut direct = Vec::new();
    for _ in 0..appends {
        append_rows(&uri, next, APPEND_ROWS).await;
        next += APPEND_ROWS;
        direct.push(backfill(&stack, "items", json!({"column": "y"})).await?);
    }
    rows.push(("job submitted right after the append", direct));
    print_lags(appends, &rows);
    burst(&stack, &wake, &uri, &mut next).await?;
    verify(&uri, "y", "x * 2 + 1").await?;
    Ok(())
}

fn print_lags(appends: usize, rows: &[(&str, Vec<Duration>)]) {
    println!("## Maintained columns: {appends} appends of {APPEND_ROWS} rows, embedded default\n");
    println!(
        "From the append's commit to every row filled; appends at random times, \
         the watcher's poll at its default 1 s.\n"
    );
    println!("| | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (name, samples) in rows {
        println!(
            "| {name} | {} | {} | {} |",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 100.0))
        );
    }
    println!();
}

/// 100 appends back to back: every row filled, through how many jobs.
async fn burst(stack: &Stack, wake: &Wake, uri: &str, next: &mut i64) -> anyhow::Result<()> {
    let before = maintainer_jobs(stack).await?;
    let stop = start_watcher(stack, wake, true);
    let began = Instant::now();
    for _ in 0..BURST_APPENDS {
        append_rows(uri, *next, BURST_ROWS).await;
        *next += BURST_ROWS;
    }
    let appended = began.elapsed();
    until_filled(uri, Duration::from_secs(600)).await?;
    let filled = began.elapsed();
    let _ = stop.send(true);
    let jobs = maintainer_jobs(stack).await? - before;
    println!(
        "Burst: {BURST_APPENDS} appends of {BURST_ROWS} rows in {}; every row filled {} after the first, by {jobs} jobs.\n",
        ms(appended),
        ms(filled)
    );
    Ok(())
}

async fn maintainer_jobs(stack: &Stack) -> anyhow::Result<usize> {
    let page = stack.store().list_jobs("items", 1000, None).await?;
    Ok(page
        .jobs
        .iter()
        .filter(|job| job.spec.submitted_by == MAINTAINER)
        .count())
}
