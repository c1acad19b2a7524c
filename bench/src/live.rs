//! A backfill of a live table: the same job on a quiet table and on one
//! another writer (pylance, tests/live_writer.py) appends to every 100 ms
//! and compacts every 5 s, alternating, in one run; for a SQL column (a
//! job shorter than the compaction period) and a Python function column
//! (a job long enough for compactions to move its rows while it runs).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use lance_backfill::model::job::{Counter, Job};
use lance_backfill::submit::SubmitSettings;
use lance_backfill_tests::write_sample_table;
use serde_json::json;

use crate::measure::{range, rows_per_second, summarize};
use crate::scenarios::{Options, backfill_job, fresh, local_stack};

const WRITER: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/live_writer.py");
const APPEND_EVERY_MS: &str = "100";
const COMPACT_EVERY_S: &str = "5";

/// The other writer, running until [`Busy::stop`].
struct Busy(Child);

impl Busy {
    fn start(python: &str, uri: &str, first_id: u64) -> anyhow::Result<Self> {
        let child = Command::new(python)
            .args([WRITER, uri, "busy", &first_id.to_string()])
            .args([APPEND_EVERY_MS, COMPACT_EVERY_S])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the writer")?;
        Ok(Self(child))
    }

    /// Stops it; returns what it did.
    fn stop(mut self) -> anyhow::Result<serde_json::Value> {
        drop(self.0.stdin.take());
        let output = self.0.wait_with_output()?;
        Ok(serde_json::from_slice(&output.stdout).unwrap_or_default())
    }
}

/// The column the job fills: `y = x * 2 + 1`, as SQL or as a Python
/// function on the local pool (tests/udfs.py's `slow_double_plus_one`:
/// 30 ms a batch, so the job lasts several of the writer's compactions).
#[derive(Clone, Copy)]
enum Fill<'a> {
    Sql,
    Function(&'a str),
}

pub async fn live(options: &Options) -> anyhow::Result<()> {
    let (rows, fragments) = if options.quick {
        (1_000_000, 16)
    } else {
        (10_000_000, 100)
    };
    println!("## A live table: the same backfill on a quiet table and under another writer\n");
    println!(
        "`y = x * 2 + 1` over {rows} rows in {fragments} fragments, embedded store and queue, as SQL and as a Python function on the local pool that takes 30 ms a batch (tests/udfs.py `slow_double_plus_one`, 2 processes: a job of about 15 s, so compactions land while it runs). Busy: pylance appends 100 rows every {APPEND_EVERY_MS} ms and compacts every {COMPACT_EVERY_S} s while the job runs (tests/live_writer.py busy). {} repetitions of each, alternating; the table is written afresh for each.\n",
        options.reps
    );
    println!(
        "| column | table | time to DONE, median (min–max) | rows/s | rows re-planned | commits rebased | writer's appends / compactions |"
    );
    println!("|---|---|---|---|---|---|---|");
    let state = fresh(&options.dir, "live-state")?;
    let functions = crate::udf::payloads(&options.python, &state)?;
    let function = functions
        .get("slow_double_plus_one")
        .context("tests/udfs.py has slow_double_plus_one")?;
    let mut ratios = Vec::new();
    for (label, fill) in [
        ("SQL", Fill::Sql),
        ("Python function", Fill::Function(function)),
    ] {
        ratios.push((label, compare(options, rows, fragments, label, fill).await?));
    }
    for (label, ratio) in ratios {
        println!("\n{label}: busy / quiet {ratio:.2} (goal: under 1.3).");
    }
    println!();
    Ok(())
}

/// The quiet and busy runs of one kind of column, alternating; returns
/// busy / quiet of the medians.
async fn compare(
    options: &Options,
    rows: u64,
    fragments: u64,
    label: &str,
    fill: Fill<'_>,
) -> anyhow::Result<f64> {
    let (mut quiet, mut busy) = (Vec::new(), Vec::new());
    let mut notes = [(0, 0, json!(null)), (0, 0, json!(null))];
    for rep in 0..options.reps {
        for (i, with_writer) in [false, true].into_iter().enumerate() {
            let (took, job, writer) =
                one(options, (rows, fragments), fill, with_writer, rep).await?;
            notes[i] = (
                job.metrics.get(Counter::RowsReplanned),
                job.metrics.get(Counter::CommitsRebased),
                writer,
            );
            if with_writer {
                busy.push(took);
            } else {
                quiet.push(took);
            }
        }
    }
    for (table, samples, (replanned, rebased, writer)) in
        [("quiet", &quiet, &notes[0]), ("busy", &busy, &notes[1])]
    {
        let summary = summarize(samples);
        println!(
            "| {label} | {table} | {} | {} | {replanned} | {rebased} | {} / {} |",
            range(&summary),
            rows_per_second(rows, summary.median),
            writer["append"].as_u64().unwrap_or(0),
            writer["compact"].as_u64().unwrap_or(0),
        );
    }
    Ok(summarize(&busy).median.as_secs_f64() / summarize(&quiet).median.as_secs_f64())
}

/// One job, with or without the writer; the values checked after.
async fn one(
    options: &Options,
    (rows, fragments): (u64, u64),
    fill: Fill<'_>,
    with_writer: bool,
    rep: usize,
) -> anyhow::Result<(Duration, Job, serde_json::Value)> {
    let root = fresh(&options.dir, &format!("live-{rep}-{with_writer}"))?;
    let uri = format!("{}/items.lance", root.display());
    write_sample_table(&uri, rows, fragments).await?;
    let stack = match fill {
        Fill::Sql => {
            let stack = local_stack(&root, SubmitSettings::default()).await;
            stack.declare("items", &[("y", "x * 2 + 1")]).await;
            stack
        }
        Fill::Function(payload) => {
            let stack = crate::udf::udf_stack(&root, 2).await;
            crate::udf::declare(&stack, "y", payload, "slow_double_plus_one").await?;
            stack
        }
    };
    let writer = match with_writer {
        true => Some(Busy::start(&options.python, &uri, rows)?),
        false => None,
    };
    // Let the writer start appending before the job reads the table.
    tokio::time::sleep(Duration::from_millis(if with_writer { 1500 } else { 0 })).await;
    let (took, job) = backfill_job(&stack, "items", json!({"column": "y"})).await?;
    let report = match writer {
        Some(writer) => writer.stop()?,
        None => json!({}),
    };
    std::io::stdout().flush().ok();
    check(&uri, rows).await?;
    Ok((took, job, report))
}

/// Every row the job read has its value (appended rows may or may not).
async fn check(uri: &str, rows: u64) -> anyhow::Result<()> {
    let dataset = lance::Dataset::open(uri).await?;
    let filter = format!("id < {rows}");
    let read = dataset.count_rows(Some(filter.clone())).await?;
    anyhow::ensure!(read as u64 == rows, "{read} of {rows} rows left");
    let missing = dataset
        .count_rows(Some(format!("{filter} AND (y IS NULL OR y != x * 2 + 1)")))
        .await?;
    anyhow::ensure!(missing == 0, "{missing} rows without their value");
    Ok(())
}
