//! LanceDB's Rust client (the `lancedb` crate 0.41.0, as users get it from
//! crates.io) against the API, unchanged: a computed column declared with
//! and without auto-refresh, a refresh job waited for, jobs listed page by
//! page, a job paused and resumed, its events read as Arrow, and the rows a
//! function raised on read back as `function_errors`.

use std::collections::HashMap;
use std::time::Duration;

use arrow_array::{Array, StringArray};
use futures::TryStreamExt;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill_tests::{
    API_KEY, Stack, StackOptions, fast_engine, read_i64, write_sample_table,
};
use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;
use lancedb::database::{PauseJobStatus, ResumeJobStatus};
use lancedb::function::FunctionErrorsRequest;
use lancedb::job::JobEventsRequest;
use lancedb::listing::ListingOptions;
use lancedb::table::computed_columns::ComputedColumnOptions;
use serde_json::json;

use crate::udf::{backfill, function_column};

const VISIBILITY: Duration = Duration::from_secs(30);
const ROWS: u64 = 4_000;

async fn connect(stack: &Stack) -> lancedb::Connection {
    lancedb::connect("db://tests")
        .api_key(API_KEY)
        .region("us-east-1")
        .host_override(stack.base_url().trim_end_matches('/'))
        .execute()
        .await
        .expect("connect")
}

fn manual() -> ComputedColumnOptions {
    ComputedColumnOptions {
        auto_refresh_enabled: false,
        auto_refresh_interval_seconds: None,
    }
}

/// The strings of a column of the job's events.
fn strings(batches: &[arrow_array::RecordBatch], column: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|batch| {
            let values = batch
                .column_by_name(column)
                .expect("column")
                .as_any()
                .downcast_ref::<StringArray>()
                .expect("strings")
                .clone();
            (0..values.len())
                .map(|i| values.value(i).to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lancedb_rust_client_declares_refreshes_lists_pauses_and_reads_events() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, ROWS, 4).await.unwrap();
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let db = connect(&stack).await;
    let table = db.open_table("items").execute().await.expect("open");
    // A computed column refreshed by hand: a job LanceDB's client waits for.
    let added = table
        .add_columns()
        .computed("y", "x * 2 + 1")
        .computed_options(manual())
        .execute()
        .await
        .expect("add y");
    assert_eq!(added.version, 2);
    let job = table.refresh_column_async("y").await.expect("refresh y");
    let y_job = job.id().unwrap().to_string();
    let result = job.wait().await.expect("wait for y");
    assert_eq!(
        (
            result.rows_assigned,
            result.rows_failed,
            result.rows_remaining
        ),
        (ROWS, 0, 0)
    );
    assert_eq!(result.source_version, 2);
    // The client's default is auto-refresh: the column is maintained and
    // its first job starts at once; the interval is kept with it.
    table
        .add_columns()
        .computed("w", "x - 1")
        .computed_options(ComputedColumnOptions {
            auto_refresh_enabled: true,
            auto_refresh_interval_seconds: Some(600),
        })
        .execute()
        .await
        .expect("add w");
    let (_, described) = stack.post("/v1/table/items/describe", json!({})).await;
    let w = described["schema"]["fields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "w")
        .cloned()
        .unwrap();
    assert_eq!(w["metadata"]["lance-backfill:maintained"], "true", "{w}");
    assert_eq!(
        w["metadata"]["lance-backfill:refresh-interval-seconds"],
        "600"
    );
    // Jobs, one per page.
    let listed: Vec<_> = db
        .list_jobs(ListingOptions::default().page_limit(1))
        .try_collect()
        .await
        .expect("list jobs");
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .any(|j| j.job_id == y_job && j.state == "finished")
    );
    let w_job = listed
        .iter()
        .find(|j| j.job_id != y_job)
        .unwrap()
        .job_id
        .clone();
    db.open_job(&w_job)
        .await
        .unwrap()
        .wait()
        .await
        .expect("w filled");
    let none = HashMap::new();
    let x = read_i64(&uri, "x", &none).await.unwrap();
    let w_values = read_i64(&uri, "w", &none).await.unwrap();
    assert_eq!(
        w_values,
        x.iter().map(|v| v.map(|x| x - 1)).collect::<Vec<_>>()
    );

    // Paused before any worker takes it: no work until resumed.
    stack.stop_workers().await;
    table
        .add_columns()
        .computed("z", "x + 100")
        .computed_options(manual())
        .execute()
        .await
        .expect("add z");
    let job = table.refresh_column_async("z").await.expect("refresh z");
    let z_job = job.id().unwrap().to_string();
    assert_eq!(db.pause_job(&z_job).await.unwrap(), PauseJobStatus::Pausing);
    assert_eq!(
        db.pause_job(&z_job).await.unwrap(),
        PauseJobStatus::AlreadyPaused
    );
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(job.status().await.unwrap(), "PAUSED");
    let (_, page) = stack.get(&format!("/v1/job/{z_job}")).await;
    assert_eq!(page["metrics"]["rows_computed"]["done"], 0, "{page}");
    assert_eq!(
        db.resume_job(&z_job).await.unwrap(),
        ResumeJobStatus::Resumed
    );
    assert_eq!(
        db.resume_job(&z_job).await.unwrap(),
        ResumeJobStatus::NotPaused
    );
    let result = job.wait().await.expect("z after resume");
    assert_eq!(result.rows_assigned, ROWS);
    // Its events, as Arrow, whole and filtered.
    let opened = db.open_job(&z_job).await.unwrap();
    let events = opened.events(JobEventsRequest::default()).await.unwrap();
    let kinds = strings(&events, "state");
    for kind in ["planned", "paused", "resumed", "committed", "done"] {
        assert!(
            kinds.iter().any(|k| k == kind),
            "{kind} missing from {kinds:?}"
        );
    }
    let committed = opened
        .events(
            JobEventsRequest::default()
                .filter("state = 'committed'")
                .limit(100),
        )
        .await
        .unwrap();
    let only = strings(&committed, "state");
    assert!(
        !only.is_empty() && only.iter().all(|k| k == "committed"),
        "{only:?}"
    );
    let refused = opened
        .events(JobEventsRequest::default().filter("length(repeat(message, 1000000)) > 1"))
        .await;
    assert!(format!("{refused:?}").contains("400"), "{refused:?}");
    // No job: a 404 the client names.
    assert!(matches!(
        db.open_job("0123456789abcdef0123456789abcdef").await,
        Err(lancedb::Error::JobNotFound { .. })
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lancedb_rust_client_reads_the_rows_a_function_raised_on() {
    let (_state, stack) = function_column(12_000, "raises_on_sevens").await;
    let mut request = AlterTableBackfillColumnsRequest::new("r".into());
    request.context = Some(HashMap::from([("on_error".into(), "skip".into())]));
    let job_id = backfill(&stack, "items", request).await;
    stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let db = connect(&stack).await;
    let table = db.open_table("items").execute().await.expect("open");
    let errors = table
        .function_errors(FunctionErrorsRequest::new().job_id(&job_id).column("r"))
        .await
        .expect("function errors");
    assert_eq!(errors.records.len(), 12, "{errors:?}");
    assert!(!errors.truncated);
    let record = &errors.records[0];
    assert_eq!(record.job_id, job_id);
    assert_eq!(record.column, "r");
    assert_eq!(record.error_type, "ValueError", "{record:?}");
    assert!(record.error_message.contains("cannot handle x"));
    let skipped: u64 = errors.fragments.iter().map(|f| f.rows_skipped).sum();
    assert_eq!(skipped, 12);
    // The table's errors without naming the job, and a limit.
    let first = table
        .function_errors(FunctionErrorsRequest::new().limit(5))
        .await
        .expect("function errors");
    assert_eq!(first.records.len(), 5);
    assert!(first.truncated);
}
