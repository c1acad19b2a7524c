//! The project's Python client (python/lance_backfill_client) runs a user's
//! session against the API (tests/client_session.py): `computed()`,
//! `dry_run`, `backfill` and `wait`, a function that raises on some rows
//! skipped and explained by `errors`, a maintained column declared with
//! `context=`, `list_jobs` and `describe`. The values are checked in the table.

use std::collections::HashMap;
use std::time::Duration;

use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::estimate::{Function, Shape, estimate};
use lance_backfill_tests::{
    API_KEY, Stack, StackOptions, assert_json_close, fast_engine, read_i64, write_sample_table,
};
use serde_json::Value;

use crate::udf::python;

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const ROWS: u64 = 4_000;

async fn session(stack: &Stack) -> Value {
    let output = tokio::process::Command::new(python())
        .arg(format!("{REPO}/tests/client_session.py"))
        .args([&stack.base_url(), API_KEY, "items"])
        .output()
        .await
        .expect("run the client session");
    assert!(
        output.status.success(),
        "client session failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("session JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_client_declares_prices_fills_and_explains_jobs() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, ROWS, 4).await.unwrap();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let out = session(&stack).await;
    println!("client session: {out}");
    // The dry run priced the job without making one.
    assert_eq!(out["dry_run"]["dry_run"], true, "{out}");
    assert_eq!(out["dry_run"]["fragments"], 4);
    assert_eq!(out["dry_run"]["rows"], ROWS);
    // The function's dry run: the estimate of its plan, its own time added.
    let plan = &out["z_dry_run"];
    let shape = Shape {
        rows: ROWS,
        fragments: 4,
        tasks: plan["tasks"].as_u64().unwrap(),
        commits: plan["commits"].as_u64().unwrap(),
        concurrency: plan["parameters"]["concurrency"].as_u64().unwrap() as u32,
        function: Function::Python {
            ms_per_1k_rows: Some(10.0),
        },
    };
    let expected = serde_json::to_value(estimate(&shape).unwrap()).unwrap();
    assert_json_close(&plan["estimate"], &expected);
    let text = out["z_dry_run_text"].as_str().unwrap();
    assert!(text.contains("4000 rows of z in 4 fragments"), "{text}");
    assert!(text.contains("on AWS: about"), "{text}");
    assert!(
        !text.contains("function_ms_per_1k_rows"),
        "its time was given: {text}"
    );
    assert_eq!(out["y"]["state"], "DONE");
    // The function raised on x & 1023 = 7: four rows skipped, listed.
    assert_eq!(out["z"]["state"], "DONE", "{out}");
    let errors = &out["z_errors"];
    assert_eq!(errors["rows_failed"], 4, "{errors}");
    let failures = errors["row_failures"].as_array().unwrap();
    assert_eq!(failures.len(), 4);
    assert!(
        failures[0]["error"]
            .as_str()
            .unwrap()
            .contains("cannot handle x")
    );
    assert_eq!(out["w"]["state"], "DONE", "{out}");
    // Listing: every job of the table, newest first, filtered and limited.
    let listed = out["listed"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{out}");
    assert_eq!(listed[0][0], out["ids"]["w"]);
    assert_eq!(out["listed_done"].as_array().unwrap().len(), 2);
    assert_eq!(out["listed_everywhere"].as_array().unwrap().len(), 3);
    assert_eq!(
        out["described"],
        serde_json::json!(["id", "x", "s", "y", "z", "w"])
    );
    // The values, in the table.
    let none = HashMap::new();
    let x = read_i64(&uri, "x", &none).await.unwrap();
    let expected = |f: &dyn Fn(i64) -> Option<i64>| -> Vec<Option<i64>> {
        x.iter().map(|v| v.and_then(f)).collect()
    };
    assert_eq!(
        read_i64(&uri, "y", &none).await.unwrap(),
        expected(&|x| Some(x * 2 + 1))
    );
    assert_eq!(
        read_i64(&uri, "z", &none).await.unwrap(),
        expected(&|x| (x & 1023 != 7).then_some(x + 5))
    );
    assert_eq!(
        read_i64(&uri, "w", &none).await.unwrap(),
        expected(&|x| Some(x - 1))
    );
}
