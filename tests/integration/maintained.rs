//! Maintained columns fill appended rows by themselves: a watcher over the
//! namespace submits a job per new version (idempotently), coalesces the
//! versions that arrive while a job runs, and fills a column that reads
//! another maintained column after it. The values are read back from the
//! table.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::submit::maintain::{self, MAINTAINER, Maintainer};
use lance_backfill_tests::{
    Stack, StackOptions, append_rows, eventually, fast_engine, read_i64, write_sample_table,
};
use serde_json::json;
use tokio::sync::watch;

/// The watcher looks often here; `serve` defaults to once a second.
const POLL: Duration = Duration::from_millis(100);

async fn declare_maintained(stack: &Stack, name: &str, sql: &str) {
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": name, "computed": sql}],
                   "context": {"auto_backfill": "true"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let job_id = body["context"]["job_id"]
        .as_str()
        .expect("auto_backfill job");
    stack.wait_done(job_id, Duration::from_secs(60)).await;
}

/// A table of 1,000 rows with a worker and two maintained columns, `z`
/// reading `y`, both filled; returns the table's URI.
async fn chained_columns(stack: &mut Stack) -> String {
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1000, 2).await.unwrap();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    declare_maintained(stack, "y", "x * 2 + 1").await;
    declare_maintained(stack, "z", "y + 1").await;
    uri
}

/// Every row holds y = 2x + 1 and z = y + 1.
async fn all_filled(uri: &str) -> bool {
    let storage = HashMap::new();
    let (Ok(x), Ok(y), Ok(z)) = (
        read_i64(uri, "x", &storage).await,
        read_i64(uri, "y", &storage).await,
        read_i64(uri, "z", &storage).await,
    ) else {
        return false;
    };
    x.iter().zip(y.iter().zip(&z)).all(|(x, (y, z))| {
        let y_expected = x.map(|x| x * 2 + 1);
        *y == y_expected && *z == y_expected.map(|y| y + 1)
    })
}

fn maintainer(stack: &Stack) -> Arc<Maintainer> {
    Arc::new(
        stack
            .components
            .maintainer(StackOptions::default().settings),
    )
}

fn start_watcher(stack: &Stack) -> (Arc<Maintainer>, watch::Sender<bool>) {
    let maintainer = maintainer(stack);
    let (stop, stop_rx) = watch::channel(false);
    let wake = maintain::Wake::default();
    tokio::spawn(maintain::watch(maintainer.clone(), POLL, wake, stop_rx));
    (maintainer, stop)
}

async fn maintainer_jobs(stack: &Stack) -> Vec<lance_backfill::model::job::Job> {
    let page = stack
        .store()
        .list_jobs("items", 1000, None)
        .await
        .expect("list jobs");
    page.jobs
        .into_iter()
        .filter(|job| job.spec.submitted_by == MAINTAINER)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appended_rows_are_filled_in_order_and_bursts_coalesce() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = chained_columns(&mut stack).await;
    assert!(all_filled(&uri).await);
    let (_maintainer, stop) = start_watcher(&stack);

    // One append at a time: each is filled, z after y.
    let mut next = 1000;
    for _ in 0..3 {
        append_rows(&uri, next, 500).await;
        next += 500;
        eventually(Duration::from_secs(60), || all_filled(&uri))
            .await
            .expect("the appended rows filled");
    }
    let jobs = maintainer_jobs(&stack).await;
    // The watcher's first pass covers everything (it knows nothing yet);
    // later jobs cover only the fragments appended since.
    assert!(
        jobs.iter().any(|job| job.spec.first_fragment_id.is_some()),
        "{jobs:?}"
    );
    for job in &jobs {
        if let Some(first) = job.spec.first_fragment_id {
            assert!(
                job.spec.plan.fragments <= 3,
                "job over {first}..: {:?}",
                job.spec.plan
            );
        }
    }

    // A burst of 100 appends: every row filled, through far fewer jobs.
    let before = maintainer_jobs(&stack).await.len();
    for _ in 0..100 {
        append_rows(&uri, next, 20).await;
        next += 20;
    }
    eventually(Duration::from_secs(120), || all_filled(&uri))
        .await
        .expect("every row of the burst filled");
    let burst_jobs = maintainer_jobs(&stack).await.len() - before;
    println!("burst of 100 appends: {burst_jobs} maintainer jobs");
    assert!(burst_jobs <= 2 * 50, "{burst_jobs} jobs for 100 appends");
    assert!(
        burst_jobs < 100,
        "versions were not coalesced: {burst_jobs} jobs"
    );
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), next as usize);
    let _ = stop.send(true);
}

/// With a poll too slow to matter, new versions and jobs' ends wake the
/// watcher: appended rows are filled at once, bursts too (the follow-up job
/// starts when the running one ends).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn new_versions_and_job_ends_wake_the_watcher_before_its_poll() {
    let wake = maintain::Wake::default();
    let publisher = lance_backfill::ports::events::Publisher::default()
        .with(Arc::new(maintain::WakeOnJobEnd(wake.clone())));
    let mut stack = Stack::embedded(StackOptions {
        publisher,
        ..StackOptions::default()
    })
    .await;
    let uri = chained_columns(&mut stack).await;
    let versions =
        maintain::VersionWatch::start(&stack.root, wake.clone()).expect("a local root is watched");
    let (stop, stop_rx) = watch::channel(false);
    let hour = Duration::from_secs(3600);
    tokio::spawn(maintain::watch(maintainer(&stack), hour, wake, stop_rx));

    let mut next = 1000;
    for _ in 0..3 {
        append_rows(&uri, next, 500).await;
        next += 500;
        eventually(Duration::from_secs(60), || all_filled(&uri))
            .await
            .expect("the appended rows filled without a poll");
    }
    for _ in 0..30 {
        append_rows(&uri, next, 20).await;
        next += 20;
    }
    eventually(Duration::from_secs(60), || all_filled(&uri))
        .await
        .expect("every row of the burst filled without a poll");
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), next as usize);
    let _ = stop.send(true);
    drop(versions);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_job_per_version_however_many_watchers() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 400, 2).await.unwrap();
    declare_maintained_without_worker(&stack).await;
    // Two watchers (two serve processes, or a trigger invoked twice) look
    // at the same version at once: the idempotency key, or the job the
    // other made, leaves one job.
    let (first, second) = (maintainer(&stack), maintainer(&stack));
    let table = lance_backfill::model::table::TableId(vec!["items".into()]);
    let (a, b) = tokio::join!(first.maintain(&table), second.maintain(&table));
    let (a, b) = (a.unwrap(), b.unwrap());
    // Whichever got there first made the job; the other made none, or
    // found the same one.
    let a = if a.is_empty() { b.clone() } else { a };
    assert_eq!(a.len(), 1, "{a:?}");
    assert!(b.is_empty() || b == a, "{a:?} {b:?}");
    assert_eq!(maintainer_jobs(&stack).await.len(), 1);
    // Looked at again, one after the other: nothing new.
    assert!(second.maintain(&table).await.unwrap().is_empty());
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    stack.wait_done(&a[0], Duration::from_secs(60)).await;
    // Nothing new: no job.
    assert!(first.maintain(&table).await.unwrap().is_empty());
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert!(y.iter().all(Option::is_some));
}

/// y maintained, declared without filling (no worker runs yet).
async fn declare_maintained_without_worker(stack: &Stack) {
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": "y", "computed": "x * 2 + 1"}],
                   "context": {"auto_backfill": "true"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let job_id = body["context"]["job_id"].as_str().unwrap();
    let (status, _) = stack
        .post(&format!("/v1/job/{job_id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
}

/// The trigger function's path on AWS: the sample S3 "Object Created"
/// event (events/), pointed at a version of a table in an S3 bucket on
/// moto, names the table; maintaining it submits the job that fills the
/// appended rows (DynamoDB and SQS on moto too).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_version_event_fills_the_appended_rows() {
    use lance_backfill::submit::trigger::table_of_event;
    use lance_backfill_sample::write_sample_table_with;
    use lance_backfill_tests::{Moto, append_rows_with};

    let moto = Moto::connect().await;
    let (bucket, storage) = moto.fresh_bucket().await;
    let root = format!("s3://{bucket}/lance");
    let mut stack = Stack::aws(
        &moto,
        StackOptions {
            root: Some(root.clone()),
            storage_options: storage.clone(),
            ..StackOptions::default()
        },
    )
    .await;
    let uri = stack.table_uri("items");
    write_sample_table_with(&uri, 600, 2, storage.clone())
        .await
        .unwrap();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"new_columns": [{"name": "y", "computed": "x * 2 + 1"}],
                   "context": {"auto_backfill": "true"}}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    stack
        .wait_done(
            body["context"]["job_id"].as_str().unwrap(),
            Duration::from_secs(60),
        )
        .await;
    append_rows_with(&uri, 600, 300, &storage).await;

    let sample = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../events/eventbridge-table-version.json"
    ))
    .unwrap()
    .replace("BUCKET", &bucket)
    .replace("PREFIX", "lance");
    let event: serde_json::Value = serde_json::from_str(&sample).unwrap();
    let table = table_of_event(&root, &event).expect("the event names a table");
    assert_eq!(table.0, ["items"]);
    let maintainer = maintainer(&stack);
    let jobs = maintainer.maintain(&table).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    stack.wait_done(&jobs[0], Duration::from_secs(60)).await;
    // The same event again (EventBridge delivers at least once): no job.
    assert!(maintainer.maintain(&table).await.unwrap().is_empty());
    let x = read_i64(&uri, "x", &storage).await.unwrap();
    let y = read_i64(&uri, "y", &storage).await.unwrap();
    assert_eq!(x.len(), 900);
    let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
    assert_eq!(y, expected);
}

/// A table of `rows` rows in `fragments` fragments with a worker and `y`
/// maintained as `sql`, filled; returns the table's URI.
async fn maintained_y(stack: &mut Stack, rows: u64, fragments: u64, sql: &str) -> String {
    let uri = stack.table_uri("items");
    write_sample_table(&uri, rows, fragments).await.unwrap();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    declare_maintained(stack, "y", sql).await;
    uri
}

/// Every row holds `f(x)` in `column`.
async fn column_holds(uri: &str, column: &str, f: impl Fn(i64) -> i64) -> bool {
    let storage = HashMap::new();
    let (Ok(x), Ok(y)) = (
        read_i64(uri, "x", &storage).await,
        read_i64(uri, column, &storage).await,
    ) else {
        return false;
    };
    x.iter().zip(&y).all(|(x, y)| *y == x.map(&f))
}

/// A maintained job fails on a row (division by zero); once the row is
/// deleted the column is tried again (after its backoff) from what its
/// last DONE job covered, and every row is filled, those of the failed
/// fragment included.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_maintained_job_is_retried_until_every_row_is_filled() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = maintained_y(&mut stack, 1000, 2, "100 / (x + 1)").await;
    let (_maintainer, stop) = start_watcher(&stack);
    // x = -1, 0, 1: the first divides by zero.
    append_rows(&uri, -1, 3).await;
    eventually(Duration::from_secs(60), || async {
        maintainer_jobs(&stack)
            .await
            .iter()
            .any(|job| job.state == lance_backfill::model::job::JobState::Failed)
    })
    .await
    .expect("the job over the bad row fails");
    let failed = maintainer_jobs(&stack)
        .await
        .into_iter()
        .find(|job| job.state == lance_backfill::model::job::JobState::Failed)
        .unwrap();
    eventually(Duration::from_secs(30), || async {
        stack
            .events(&failed.job_id)
            .await
            .iter()
            .any(|e| e.contains("tried again in"))
    })
    .await
    .expect("the retry is noted on the failed job");
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    dataset.delete("x = -1").await.unwrap();
    append_rows(&uri, 5000, 10).await;
    if eventually(Duration::from_secs(90), || {
        column_holds(&uri, "y", |x| 100 / (x + 1))
    })
    .await
    .is_err()
    {
        for job in maintainer_jobs(&stack).await {
            eprintln!(
                "{} {:?} {:?} {:?}",
                job.job_id,
                job.state,
                job.spec.first_fragment_id,
                stack.events(&job.job_id).await
            );
        }
        panic!("every row filled once the bad row is gone");
    }
    let _ = stop.send(true);
}

/// A maintained column follows updates of its inputs, as a stored
/// generated column does: rows whose `x` an update rewrote (moving them)
/// or a merge rewrote in place get the values of their new `x`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_maintained_column_follows_updates_of_its_inputs() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = maintained_y(&mut stack, 1000, 4, "x * 3").await;
    let (_maintainer, stop) = start_watcher(&stack);
    let python = crate::udf::python();
    let writer = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/live_writer.py");
    for change in [
        &["update", "id < 100", "x", "x + 7"][..],
        &["patch-x", "9", "1000"],
    ] {
        let status = std::process::Command::new(&python)
            .arg(writer)
            .arg(&uri)
            .args(change)
            .status()
            .unwrap();
        assert!(status.success());
        eventually(Duration::from_secs(60), || {
            column_holds(&uri, "y", |x| x * 3)
        })
        .await
        .unwrap_or_else(|_| panic!("y follows {change:?}"));
    }
    let _ = stop.send(true);
}

/// Where a column stands is a record of its own: however many other jobs
/// the table had, the next maintainer job covers only what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_maintained_column_has_no_lookback_limit() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = maintained_y(&mut stack, 200, 2, "x * 2 + 1").await;
    let (maintainer, stop) = start_watcher(&stack);
    eventually(Duration::from_secs(60), || async {
        !maintainer_jobs(&stack).await.is_empty()
    })
    .await
    .unwrap();
    let _ = stop.send(true);
    // 60 other jobs on the table, more than any listing looks at.
    stack.declare("items", &[("w", "x + 1")]).await;
    for i in 0..60 {
        let job = stack
            .submit("items", json!({"column": "w", "where": format!("x > {i}")}))
            .await;
        stack.wait_done(&job, Duration::from_secs(60)).await;
    }
    append_rows(&uri, 200, 50).await;
    let table = lance_backfill::model::table::TableId(vec!["items".into()]);
    let jobs = maintainer.maintain(&table).await.unwrap();
    assert_eq!(jobs.len(), 1);
    let job = stack.wait_done(&jobs[0], Duration::from_secs(60)).await;
    assert!(
        job.spec.first_fragment_id.is_some_and(|first| first >= 2),
        "{:?}",
        job.spec
    );
    assert!(column_holds(&uri, "y", |x| x * 2 + 1).await);
}

/// A column declared with `auto_backfill` is filled by whichever job comes
/// first, the declaration's or the maintainer's (woken by the version the
/// declaration made): the declaration answers the job already running
/// rather than refusing, and a plain backfill is still refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_declaration_joins_the_job_already_filling_its_column() {
    use lance_backfill::submit::{SubmitOutcome, SubmitRequest};
    let stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 1000, 2)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    // No worker runs: the first job stays unfinished.
    let running = stack.submit("items", json!({"column": "y"})).await;
    let table = lance_backfill::model::table::TableId(vec!["items".to_string()]);
    let request = |join_running: bool| {
        let mut submit = SubmitRequest::new(
            table.clone(),
            lance_backfill::model::job::BackfillSpec::of_column("y"),
            MAINTAINER.to_string(),
        );
        submit.join_running = join_running;
        submit
    };
    let submitter = &stack.service.submitter;
    let joined = submitter.submit(request(true)).await.unwrap();
    assert_eq!(joined, SubmitOutcome::Joined { job_id: running });
    let refused = submitter.submit(request(false)).await.unwrap_err();
    assert!(
        refused.to_string().contains("already being backfilled"),
        "{refused}"
    );
}
