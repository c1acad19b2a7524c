//! User functions: a vectorised function through the local runtime against
//! pylance `add_columns` with the same function as an in-process batch UDF;
//! the runtime's own cost per batch; a row-by-row function on pools of one
//! and two processes. The functions are tests/udfs.py's.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use arrow_array::{Array, ArrayRef, Int64Array, RecordBatch};
use lance::Dataset;
use lance_backfill::adapters::local::pool::{LocalPool, PoolConfig};
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::ports::udf::{UdfRef, UdfRuntime};
use lance_backfill::run::engine::EngineConfig;
use lance_backfill_tests::{Stack, StackOptions, write_sample_table};
use serde_json::json;

use crate::measure::{Pylance, ms, percentile, python_json, range, rows_per_second, summarize};
use crate::scenarios::{Options, backfill, fresh, verify};

pub(crate) const FUNCTIONS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/udfs.py");

/// Base64 cloudpickles of tests/udfs.py's functions, made by `python`.
pub(crate) fn payloads(python: &str, state: &Path) -> anyhow::Result<HashMap<String, String>> {
    let args = [
        OsStr::new(FUNCTIONS),
        OsStr::new("payloads"),
        state.as_os_str(),
    ];
    let payloads = python_json(python, &args, "pickling the functions")?;
    Ok(serde_json::from_value(payloads)?)
}

pub(crate) async fn udf_stack(root: &Path, workers: usize) -> Stack {
    let mut stack = Stack::embedded(StackOptions {
        root: Some(root.to_string_lossy().into_owned()),
        udf_workers: Some(workers),
        ..StackOptions::default()
    })
    .await;
    stack.start_worker(
        EngineConfig::default(),
        RunnerConfig::default(),
        Duration::from_secs(600),
    );
    stack
}

/// Declares `column` (int64) as `function` of `x`.
pub(crate) async fn declare(
    stack: &Stack,
    column: &str,
    payload: &str,
    function: &str,
) -> anyhow::Result<()> {
    let entry = json!({"name": column, "virtual_column": {
        "input_columns": ["x"], "udf": payload, "udf_name": function, "udf_version": "1",
        "image": "local",
        "outputs": [{"column": column, "struct_field": column,
                     "data_type": {"type": "int64"}, "nullable": true}],
    }});
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [entry]}),
        )
        .await;
    ensure!(status == 200, "add_columns {column}: {status} {body}");
    Ok(())
}

pub async fn udf(options: &Options) -> anyhow::Result<()> {
    let state = fresh(&options.dir, "udf-state")?;
    let functions = payloads(&options.python, &state)?;
    vectorised(options, &functions).await?;
    per_batch(options, &functions).await?;
    row_by_row(options, &functions).await
}

async fn vectorised(options: &Options, functions: &HashMap<String, String>) -> anyhow::Result<()> {
    let (rows, fragments) = if options.quick {
        (100_000, 16)
    } else {
        (1_000_000, 16)
    };
    let root = fresh(&options.dir, "udf-vectorised")?;
    let uri = format!("{}/items.lance", root.display());
    write_sample_table(&uri, rows, fragments).await?;
    let stack = udf_stack(&root, 2).await;
    let mut pylance = Pylance::start(&options.python)?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for rep in 0..options.reps {
        let column = format!("u{rep}");
        declare(
            &stack,
            &column,
            &functions["double_plus_one"],
            "double_plus_one",
        )
        .await?;
        if rep % 2 == 1 {
            theirs.push(pylance.add_udf_column(
                &uri,
                &format!("p{rep}"),
                FUNCTIONS,
                "double_plus_one",
            )?);
        }
        ours.push(backfill(&stack, "items", json!({"column": column})).await?);
        if rep % 2 == 0 {
            theirs.push(pylance.add_udf_column(
                &uri,
                &format!("p{rep}"),
                FUNCTIONS,
                "double_plus_one",
            )?);
        }
        let checked = verify(&uri, &column, "x * 2 + 1").await?;
        ensure!(checked == rows, "verified {checked} of {rows} rows");
    }
    let (o, p) = (summarize(&ours), summarize(&theirs));
    println!("## User functions\n");
    println!(
        "`x * 2 + 1` with pyarrow.compute as a Python function. lance-backfill: declared as a `virtual_column`, filled by a job whose batches go to the local runtime (a pool of 2 Python processes, Arrow IPC over pipes), submit -> DONE, values verified. pylance: `add_columns(batch_udf(f), read_columns=[\"x\"])` in one Python process, timed inside Python.\n"
    );
    println!(
        "| rows / fragments | lance-backfill median (min–max) | rows/s | pylance median (min–max) | rows/s | ratio (pylance time / ours) |"
    );
    println!("|---|---|---|---|---|---|");
    println!(
        "| {rows} / {fragments} | {} | {} | {} | {} | {:.2} |\n",
        range(&o),
        rows_per_second(rows, o.median),
        range(&p),
        rows_per_second(rows, p.median),
        p.median.as_secs_f64() / o.median.as_secs_f64()
    );
    Ok(())
}

pub(crate) fn udf_ref(name: &str, payload: &str) -> anyhow::Result<UdfRef> {
    use base64::Engine;
    use sha2::Digest;
    let pickle = base64::engine::general_purpose::STANDARD.decode(payload)?;
    Ok(UdfRef {
        id: hex::encode(sha2::Sha256::digest(&pickle)),
        name: name.to_string(),
        outputs: json!([{"column": "y", "struct_field": "y",
                         "data_type": {"type": "int64"}, "nullable": true}]),
        pickle: Arc::new(pickle),
        principal: "bench".into(),
        wants: Default::default(),
        workspace_zips: Vec::new(),
    })
}

/// The identity function called directly on the pool, one process, one
/// call at a time: what a batch costs beyond the function (Arrow IPC both
/// ways over the pipes, the dispatch, the result's decoding).
async fn per_batch(options: &Options, functions: &HashMap<String, String>) -> anyhow::Result<()> {
    let pool = LocalPool::new(PoolConfig {
        python: options.python.clone(),
        size: 1,
        ..PoolConfig::default()
    })?;
    let identity = udf_ref("identity", &functions["identity"])?;
    let calls = if options.quick { 200 } else { 2_000 };
    println!(
        "Per-batch cost of the local runtime: the identity function, one process, {calls} sequential calls after a warm-up.\n"
    );
    println!("| rows per batch | median per call | p99 | min |");
    println!("|---|---|---|---|");
    for rows in [1usize, 1_024, 65_536] {
        let x: ArrayRef = Arc::new(Int64Array::from_iter_values(0..rows as i64));
        let batch = RecordBatch::try_from_iter([("x", x)])?;
        for _ in 0..20 {
            pool.call(&identity, &batch).await?;
        }
        let mut samples = Vec::with_capacity(calls);
        for _ in 0..calls {
            let began = Instant::now();
            let result = pool.call(&identity, &batch).await?;
            samples.push(began.elapsed());
            ensure!(
                result.len() == rows,
                "identity returned {} rows",
                result.len()
            );
        }
        let summary = summarize(&samples);
        println!(
            "| {rows} | {} | {} | {} |",
            ms(summary.median),
            ms(percentile(&samples, 99.0)),
            ms(summary.min)
        );
    }
    println!();
    Ok(())
}

/// Σ i² for i below x % 200: what tests/udfs.py's `row_by_row` computes.
fn row_by_row_of(x: i64) -> i64 {
    let n = x.rem_euclid(200);
    (n - 1) * n * (2 * n - 1) / 6
}

async fn check_row_by_row(uri: &str, column: &str) -> anyhow::Result<()> {
    let dataset = Dataset::open(uri).await?;
    let mut scanner = dataset.scan();
    scanner.project(&["x", column])?;
    let batch = scanner.try_into_batch().await?;
    let x = batch
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .context("x")?;
    let y = batch
        .column(1)
        .as_any()
        .downcast_ref::<Int64Array>()
        .context("y")?;
    ensure!(y.null_count() == 0, "{column} has nulls");
    for i in 0..batch.num_rows() {
        ensure!(
            y.value(i) == row_by_row_of(x.value(i)),
            "{column} wrong at x = {}",
            x.value(i)
        );
    }
    Ok(())
}

/// A CPU-bound row-by-row function, filled with pools of one and of two
/// processes.
async fn row_by_row(options: &Options, functions: &HashMap<String, String>) -> anyhow::Result<()> {
    let rows = if options.quick { 50_000 } else { 1_000_000 };
    let reps = options.reps.min(5);
    println!(
        "A CPU-bound row-by-row Python function (a loop per row), {rows} rows in 16 fragments, pools of 1 and 2 processes; submit -> DONE, values verified.\n"
    );
    println!("| pool | median (min–max) | rows/s | speed-up |");
    println!("|---|---|---|---|");
    let mut single = None;
    for workers in [1usize, 2] {
        let root = fresh(&options.dir, &format!("udf-rows-{workers}"))?;
        let uri = format!("{}/items.lance", root.display());
        write_sample_table(&uri, rows, 16).await?;
        let stack = udf_stack(&root, workers).await;
        let mut samples = Vec::new();
        for rep in 0..reps {
            let column = format!("r{rep}");
            declare(&stack, &column, &functions["row_by_row"], "row_by_row").await?;
            samples.push(backfill(&stack, "items", json!({"column": column})).await?);
            check_row_by_row(&uri, &column).await?;
        }
        let summary = summarize(&samples);
        let base = *single.get_or_insert(summary.median);
        println!(
            "| {workers} | {} | {} | {:.2} |",
            range(&summary),
            rows_per_second(rows, summary.median),
            base.as_secs_f64() / summary.median.as_secs_f64()
        );
    }
    println!();
    Ok(())
}
