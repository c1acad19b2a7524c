//! LanceDB's own routes: the real `lancedb` client from PyPI runs a user's
//! session (open, add a computed column, refresh it as a job, wait, list,
//! reopen, cancel) against the API; `describe`, `/v1/jobs/*`, the
//! x-request-id replay, `x-lancedb-min-read-version`, extra fields with
//! `skip_frags`, and dry runs through raw HTTP.

use std::collections::HashMap;
use std::time::Duration;

use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::estimate::{Function, Shape, estimate};
use lance_backfill_tests::{
    API_KEY, Stack, StackOptions, assert_json_close, fast_engine, latest_version, read_i64,
    write_sample_table,
};
use serde_json::{Value, json};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const VISIBILITY: Duration = Duration::from_secs(30);
const LANCEDB_AGENT: &str = "LanceDB-Python-Client/0.40.0";

fn python() -> String {
    std::env::var("LANCE_BACKFILL_UDF_PYTHON").unwrap_or_else(|_| "python3".into())
}

async fn filled_stack(rows: u64, fragments: u64) -> (Stack, String) {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, rows, fragments).await.unwrap();
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    (stack, uri)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lancedb_client_refreshes_a_computed_column() {
    let (stack, uri) = filled_stack(2000, 4).await;
    let output = tokio::process::Command::new(python())
        .arg(format!("{REPO}/tests/lancedb_session.py"))
        .args([&stack.base_url(), API_KEY, "items"])
        .output()
        .await
        .expect("run the lancedb session");
    assert!(
        output.status.success(),
        "lancedb session failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).expect("session JSON");
    println!("lancedb session: {out}");
    assert_eq!(out["opened_version"], 1);
    assert_eq!(out["add_columns_version"], 2);
    let result = &out["result"];
    assert_eq!(result["rows_assigned"], 2000, "{out}");
    assert_eq!(result["rows_failed"], 0);
    assert_eq!(result["rows_remaining"], 0);
    assert_eq!(result["source_version"], 2);
    let published = latest_version(&uri).await;
    assert_eq!(result["published_version"], published);
    assert_eq!(out["version_after"], published);
    assert_eq!(out["status"], "finished");
    assert_eq!(out["reopened_state"], "finished");
    assert_eq!(out["spec"]["column"], "y");
    let listed = out["listed"].as_array().unwrap();
    assert!(
        listed
            .iter()
            .any(|job| job["job_id"] == out["job_id"] && job["state"] == "finished"),
        "{out}"
    );
    // A finished job cannot be cancelled (409), and an unknown column is
    // a 400, not the 404 the client would read as a missing table.
    assert_eq!(out["cancel_finished"], "HttpError: 409");
    assert_eq!(out["unknown_column"], "HttpError: 400");
    // The values, in the table itself.
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
    assert_eq!(y, expected);
}

async fn post_as_lancedb(
    stack: &Stack,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value) {
    let mut all = vec![("x-api-key", API_KEY), ("user-agent", LANCEDB_AGENT)];
    all.extend_from_slice(headers);
    stack.call("POST", path, &all, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn describe_answers_version_schema_and_stats_without_storage() {
    let (stack, _uri) = filled_stack(300, 3).await;
    stack.declare("items", &[("y", "x + 1")]).await;
    // LanceDB's open: no body at all, a trailing slash, Lance's type names.
    let (status, lancedb) = post_as_lancedb(&stack, "/v1/table/items/describe/", &[], None).await;
    assert_eq!(status, 200, "{lancedb}");
    assert_eq!(lancedb["version"], 2);
    assert_eq!(lancedb["table"], "items");
    assert_eq!(lancedb["stats"]["num_fragments"], 3);
    assert_eq!(lancedb["stats"]["num_deleted_rows"], 0);
    let fields = lancedb["schema"]["fields"].as_array().unwrap();
    let types: Vec<(&str, &str, bool)> = fields
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap(),
                f["type"]["type"].as_str().unwrap(),
                f["nullable"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        types,
        [
            ("id", "int64", false),
            ("x", "int64", true),
            ("s", "string", true),
            ("y", "int64", true)
        ]
    );
    let text = lancedb.to_string();
    for secret in [
        "location",
        "storage_options",
        "table_uri",
        stack.root.as_str(),
    ] {
        assert!(!text.contains(secret), "describe shows {secret}: {text}");
    }
    // Other clients get the spec's type names; an older version on request.
    let (status, spec) = stack
        .post("/v1/table/items/describe", json!({"version": 1}))
        .await;
    assert_eq!(status, 200, "{spec}");
    assert_eq!(spec["version"], 1);
    assert_eq!(spec["schema"]["fields"][2]["type"]["type"], "utf8");
    assert_eq!(spec["schema"]["fields"].as_array().unwrap().len(), 3);
    let (status, missing) = stack
        .post("/v1/table/items/describe", json!({"version": 9}))
        .await;
    assert_eq!(
        (status, missing["code"].as_i64()),
        (404, Some(11)),
        "{missing}"
    );
    let (status, _) = post_as_lancedb(&stack, "/v1/table/nope/describe/", &[], None).await;
    assert_eq!(status, 404);
    // A client that has seen a newer version than the table has.
    let (status, stale) = post_as_lancedb(
        &stack,
        "/v1/table/items/describe/",
        &[("x-lancedb-min-read-version", "7")],
        Some(r#"{"version":null}"#),
    )
    .await;
    assert_eq!(status, 400, "{stale}");
    let (status, _) = stack
        .call("POST", "/v1/table/items/describe", &[], None)
        .await;
    assert_eq!(status, 401, "describe needs credentials");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_with_the_same_request_id_finds_the_first_job() {
    let (stack, _uri) = filled_stack(400, 4).await;
    stack.declare("items", &[("y", "x + 1")]).await;
    let headers = [("x-request-id", "6f1c2d3e-retry")];
    let body = r#"{"column":"y"}"#;
    let path = "/v1/table/items/backfill_column";
    let (status, first) = post_as_lancedb(&stack, path, &headers, Some(body)).await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = post_as_lancedb(&stack, path, &headers, Some(body)).await;
    assert_eq!(status, 202, "a retry is not a 409: {again}");
    assert_eq!(first["job_id"], again["job_id"]);
    let job_id = first["job_id"].as_str().unwrap();
    let job = stack.wait_done(job_id, Duration::from_secs(60)).await;
    // The job describes as LanceDB's client reads it.
    let body = json!({ "job_id": job_id }).to_string();
    let (status, described) = post_as_lancedb(&stack, "/v1/jobs/describe", &[], Some(&body)).await;
    assert_eq!(status, 200, "{described}");
    assert_eq!(described["job_state"], "DONE");
    assert_eq!(described["job_type"], "backfill");
    assert_eq!(described["result"]["rows_assigned"], 400);
    assert_eq!(described["result"]["source_version"], job.spec.read_version);
    assert!(described["creation_ms"].as_i64().unwrap() > 0);
    let (status, missing) = post_as_lancedb(
        &stack,
        "/v1/jobs/describe",
        &[],
        Some(r#"{"job_id":"0123456789abcdef"}"#),
    )
    .await;
    assert_eq!(status, 404, "{missing}");
    let (status, _) = post_as_lancedb(&stack, "/v1/jobs/describe", &[], Some("{}")).await;
    assert_eq!(status, 400, "a body without job_id");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_frags_leaves_fragments_alone_and_extra_fields_are_noted() {
    let (stack, uri) = filled_stack(400, 4).await;
    stack.declare("items", &[("y", "x + 1")]).await;
    let version = latest_version(&uri).await.to_string();
    let (status, accepted) = post_as_lancedb(
        &stack,
        "/v1/table/items/backfill_column",
        &[("x-lancedb-min-read-version", &version)],
        Some(r#"{"column":"y","skip_frags":[1,3],"priority":"high"}"#),
    )
    .await;
    assert_eq!(status, 202, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap();
    let job = stack.wait_done(job_id, Duration::from_secs(60)).await;
    assert_eq!(job.spec.skip_fragments, [1, 3]);
    assert_eq!(job.spec.ignored_fields, ["priority"]);
    let events = stack.events(job_id).await;
    assert!(
        events
            .iter()
            .any(|e| e.contains("request fields ignored: priority")),
        "{events:?}"
    );
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    for (row, value) in y.iter().enumerate() {
        let fragment = row / 100;
        if fragment == 1 || fragment == 3 {
            assert_eq!(*value, None, "row {row} of a skipped fragment");
        } else {
            assert_eq!(*value, Some(row as i64 + 1), "row {row}");
        }
    }
    for (bad, field) in [
        (r#"{"column":"y","skip_frags":"1"}"#, "skip_frags"),
        (r#"{"column":"y","Not_Lower":1}"#, "Not_Lower"),
    ] {
        let (status, err) =
            post_as_lancedb(&stack, "/v1/table/items/backfill_column", &[], Some(bad)).await;
        assert_eq!(status, 400, "{err}");
        assert!(err["error"].as_str().unwrap().contains(field), "{err}");
    }
    // A version newer than the table: the job would read an older one.
    let (status, err) = post_as_lancedb(
        &stack,
        "/v1/table/items/backfill_column",
        &[("x-lancedb-min-read-version", "99")],
        Some(r#"{"column":"y"}"#),
    )
    .await;
    assert_eq!(status, 400, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dry_run_answers_the_plan_and_records_nothing() {
    let (stack, uri) = filled_stack(1000, 5).await;
    stack.declare("items", &[("y", "x + 1")]).await;
    let (status, plan) = stack
        .post(
            "/v1/table/items/backfill_column",
            json!({"column": "y", "commit_granularity": 2, "task_size": 100,
                   "context": {"dry_run": "true"}}),
        )
        .await;
    assert_eq!(status, 200, "{plan}");
    assert_eq!(plan["dry_run"], true);
    assert_eq!(plan["fragments"], 5);
    assert_eq!(plan["tasks"], 10);
    assert_eq!(plan["rows"], 1000);
    assert_eq!(plan["commits"], 3);
    assert_eq!(plan["fragment_ids"], json!([0, 1, 2, 3, 4]));
    assert_eq!(plan["read_version"], latest_version(&uri).await);
    assert_eq!(plan["where"], "`y` IS NULL");
    // What it would take on AWS, from the plan's own figures.
    let shape = Shape {
        rows: 1000,
        fragments: 5,
        tasks: 10,
        commits: 3,
        concurrency: plan["parameters"]["concurrency"].as_u64().unwrap() as u32,
        function: Function::Sql,
    };
    let expected = serde_json::to_value(estimate(&shape).unwrap()).unwrap();
    assert_json_close(&plan["estimate"], &expected);
    assert!(plan["estimate"]["cost_usd"]["total"].as_f64().unwrap() > 0.0);
    // A function's time that is not a number of milliseconds is refused.
    let (status, refused) = stack
        .post(
            "/v1/table/items/backfill_column",
            json!({"column": "y", "context": {"dry_run": "true", "function_ms_per_1k_rows": "-5"}}),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(
        refused.to_string().contains("function_ms_per_1k_rows"),
        "{refused}"
    );
    let (_, jobs) = stack.get("/v1/table/items/jobs").await;
    assert_eq!(jobs["jobs"], json!([]), "a dry run records no job");
    let (status, listed) = post_as_lancedb(&stack, "/v1/jobs/list", &[], Some("{}")).await;
    assert_eq!((status, &listed["jobs"]), (200, &json!([])));
    // A real job afterwards: nothing is locked by the dry run.
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    stack.wait_done(&job_id, Duration::from_secs(60)).await;
    let (_, listed) = post_as_lancedb(&stack, "/v1/jobs/list", &[], None).await;
    assert_eq!(listed["jobs"][0]["job_id"], job_id.as_str());
    assert_eq!(listed["jobs"][0]["state"], "DONE");
    assert_eq!(listed["jobs"][0]["table"], "items");
}
