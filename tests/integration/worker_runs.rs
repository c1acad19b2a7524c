//! Jobs run to the end through the queue and the worker; the table read
//! back with a fresh reader holds exactly the expected values.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow_array::{Int64Array, RecordBatch, RecordBatchIterator, StringArray};
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::job::{Counter, JobState};
use lance_backfill::ports::queue::{Outgoing, Received, TaskQueue};
use lance_backfill::run::engine::EngineConfig;
use lance_backfill_tests::{
    Moto, Stack, StackOptions, append_rows, eventually, fast_engine, latest_version, read_i64,
    write_sample_table,
};
use serde_json::json;

const VISIBILITY: Duration = Duration::from_secs(30);

fn expected(x: &[Option<i64>]) -> Vec<Option<i64>> {
    x.iter().map(|v| v.map(|x| x * 2 + 1)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn million_rows_in_sixteen_fragments_through_sqs() {
    let moto = Moto::connect().await;
    let mut stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1_000_000, 16).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let before = latest_version(&uri).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 2,
            batch_size: 10,
            ..RunnerConfig::default()
        },
        VISIBILITY,
    );
    let began = Instant::now();
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    let job = stack.wait_done(&job_id, Duration::from_secs(300)).await;
    let elapsed = began.elapsed();
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), 1_000_000);
    assert_eq!(y, expected(&x));
    let versions = latest_version(&uri).await - before;
    assert_eq!(versions, 1, "16 fragments, granularity 64: one commit");
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 16);
    assert_eq!(job.metrics.get(Counter::RowsCommitted), 1_000_000);
    assert_eq!(job.metrics.get(Counter::CommitsDone), 1);
    let events = stack.events(&job_id).await;
    assert!(events.iter().any(|e| e.starts_with("done:")), "{events:?}");
    println!(
        "FIGURES million_rows: {} rows in {:.3} s = {:.0} rows/s (moto SQS + DynamoDB, debug build), {versions} version(s) created",
        x.len(),
        elapsed.as_secs_f64(),
        x.len() as f64 / elapsed.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn where_chooses_rows_and_the_rest_keep_their_values() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 3000, 3).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job = stack
        .submit(
            "items",
            json!({"column": "y", "where": "x < 100 OR x >= 2950"}),
        )
        .await;
    stack.wait_done(&job, Duration::from_secs(60)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    for (x, y) in x.iter().zip(&y) {
        let x = x.unwrap();
        if !(100..2950).contains(&x) {
            assert_eq!(*y, Some(x * 2 + 1));
        } else {
            assert_eq!(*y, None, "x = {x} was not chosen");
        }
    }
    // The default where fills only what is still null; the middle
    // fragment had nothing chosen before and the chosen rows keep theirs.
    let job = stack.submit("items", json!({"column": "y"})).await;
    stack.wait_done(&job, Duration::from_secs(60)).await;
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(y, expected(&x));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn read_version_and_appends_during_the_job() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 4000, 4).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let declared = latest_version(&uri).await;
    append_rows(&uri, 4000, 1000).await;
    // Read the version before the append: the appended rows stay null.
    let job = stack
        .submit(
            "items",
            json!({"column": "y", "read_version": declared, "commit_granularity": 1}),
        )
        .await;
    // Appends while the job runs do not fail it.
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 1,
            batch_size: 1,
            ..RunnerConfig::default()
        },
        VISIBILITY,
    );
    append_rows(&uri, 5000, 500).await;
    let job = stack.wait_done(&job, Duration::from_secs(60)).await;
    assert_eq!(job.spec.read_version, declared);
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), 5500);
    for (x, y) in x.iter().zip(&y) {
        let x = x.unwrap();
        assert_eq!(*y, (x < 4000).then_some(x * 2 + 1), "x = {x}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deleted_rows_stay_aligned_and_a_noop_rerun_makes_no_version() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 2000, 2).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    dataset
        .delete("x % 3 = 0 OR (x > 500 AND x < 700)")
        .await
        .unwrap();
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job = stack
        .submit("items", json!({"column": "y", "checkpoint_size": 128}))
        .await;
    stack.wait_done(&job, Duration::from_secs(60)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert!(x.iter().all(|x| {
        let x = x.unwrap();
        x % 3 != 0 && !(x > 500 && x < 700)
    }));
    assert_eq!(y, expected(&x));

    let version = latest_version(&uri).await;
    let rerun = stack.submit("items", json!({"column": "y"})).await;
    let rerun = stack.wait_done(&rerun, Duration::from_secs(60)).await;
    assert_eq!(
        latest_version(&uri).await,
        version,
        "a re-run with nothing to do commits nothing"
    );
    assert_eq!(rerun.metrics.get(Counter::FragmentsSkipped), 2);
    assert_eq!(rerun.metrics.get(Counter::CommitsDone), 0);
    // An explicit where that recomputes filled rows changes nothing either.
    let rerun = stack
        .submit("items", json!({"column": "y", "where": "x < 50"}))
        .await;
    stack.wait_done(&rerun, Duration::from_secs(60)).await;
    assert_eq!(latest_version(&uri).await, version);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_delivered_twice_commits_each_group_once() {
    delivered_twice(&Moto::connect().await, None).await;
}

/// Every task message delivered twice, in reverse order; with `faults`,
/// the emulator injects them once the messages are queued.
pub(crate) async fn delivered_twice(moto: &Moto, faults: Option<serde_json::Value>) {
    let mut stack = Stack::aws(moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 8000, 8).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let before = latest_version(&uri).await;
    let job_id = stack
        .submit("items", json!({"column": "y", "commit_granularity": 2, "task_size": 600, "batch_checkpoint_flush_interval_seconds": 0}))
        .await;
    // Duplicate every queued task message before any worker runs.
    let sqs = stack.sqs.clone().unwrap();
    let bodies = stack.drain().await;
    assert_eq!(bodies.len(), 8 * 2, "600-row tasks over 1000-row fragments");
    let mut twice: Vec<Outgoing> = bodies
        .iter()
        .chain(bodies.iter())
        .map(|b| Outgoing::raw(b, Duration::ZERO))
        .collect();
    twice.reverse();
    sqs.send_many(twice).await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    if let Some(faults) = faults {
        moto.set_faults(faults).await;
    }
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 3,
            batch_size: 5,
            ..RunnerConfig::default()
        },
        VISIBILITY,
    );
    let job = stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(y, expected(&x));
    let versions = latest_version(&uri).await - before;
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 8);
    assert_eq!(
        job.metrics.get(Counter::TasksDone),
        16,
        "each task counted once"
    );
    assert_eq!(versions, job.metrics.get(Counter::CommitsDone));
    assert!(
        versions <= 4,
        "at most one commit per group of 2 fragments, got {versions}"
    );
    // Checkpoints of committed fragments are gone. Under faults, a late
    // holder whose record call failed after the job's final sweep keeps its
    // checkpoint until its message comes back (a visibility timeout later)
    // and finds the job DONE.
    let backfill_dir = format!("{uri}/_backfill");
    let gone = eventually(VISIBILITY * 3, || {
        let dir = backfill_dir.clone();
        async move { walk(&dir).is_empty() }
    })
    .await;
    assert!(
        gone.is_ok(),
        "leftover checkpoints: {:?}",
        walk(&backfill_dir)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_stopped_mid_way_resumes_from_its_checkpoint() {
    let mut stack = Stack::embedded(StackOptions {
        visibility: Duration::from_secs(2),
        ..StackOptions::default()
    })
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 200_000, 2).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack
        .submit("items", json!({"column": "y", "checkpoint_size": 2000, "batch_checkpoint_flush_interval_seconds": 0}))
        .await;
    // A worker whose invocations end almost at once: every task stops
    // at its deadline, checkpoints and requeues the rest, many times.
    let engine = EngineConfig {
        deadline_margin: Duration::from_millis(900),
        ..fast_engine()
    };
    let runner = RunnerConfig {
        pollers: 1,
        batch_size: 2,
        invocation_timeout: Some(Duration::from_secs(1)),
        ..RunnerConfig::default()
    };
    stack.start_worker(engine, runner, Duration::from_secs(2));
    let job = stack.wait_done(&job_id, Duration::from_secs(180)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(y, expected(&x));
    // Work was resumed, not redone: computed rows stay close to the table size.
    let computed = job.metrics.get(Counter::RowsComputed);
    assert!(
        (200_000..240_000).contains(&computed),
        "rows computed: {computed}"
    );
    assert!(job.metrics.get(Counter::RowsCheckpointed) > 0);
    assert!(walk(&format!("{uri}/_backfill")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_leaves_a_job_the_next_one_finishes() {
    let mut stack = Stack::embedded(StackOptions {
        visibility: Duration::from_secs(2),
        ..StackOptions::default()
    })
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 300_000, 3).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack
        .submit("items", json!({"column": "y", "checkpoint_size": 500, "batch_checkpoint_flush_interval_seconds": 0, "task_size": 50000}))
        .await;
    // The first worker runs on its own runtime, which is torn down
    // mid-job: its in-flight messages are never acknowledged.
    let components = stack.components.clone();
    let queue = stack.queue.clone();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    runtime.spawn(async move {
        let worker = Arc::new(components.worker(fast_engine(), Duration::from_secs(2)));
        lance_backfill::app::runner::run(
            worker,
            queue,
            Duration::from_secs(2),
            RunnerConfig {
                pollers: 1,
                batch_size: 2,
                ..RunnerConfig::default()
            },
            stop_rx,
        )
        .await;
    });
    let store = stack.store().clone();
    let id = job_id.clone();
    lance_backfill_tests::eventually(Duration::from_secs(60), || {
        let store = store.clone();
        let id = id.clone();
        async move {
            let job = store.get_job(&id).await.unwrap().unwrap();
            job.metrics.get(Counter::RowsCheckpointed) > 20_000
        }
    })
    .await
    .unwrap();
    runtime.shutdown_background();
    drop(stop_tx);
    let killed_at = stack.store().get_job(&job_id).await.unwrap().unwrap();
    assert_ne!(killed_at.state, JobState::Done);
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(2),
    );
    let job = stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(y, expected(&x));
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_s3_through_moto() {
    let moto = Moto::connect().await;
    let (bucket, storage) = moto.fresh_bucket().await;
    let root = format!("s3://{bucket}/warehouse");
    let mut stack = Stack::aws(
        &moto,
        StackOptions {
            root: Some(root.clone()),
            storage_options: storage.clone(),
            ..StackOptions::default()
        },
    )
    .await;
    let uri = format!("{root}/items.lance");
    let params = lance::dataset::WriteParams {
        store_params: Some(lance::io::ObjectStoreParams {
            storage_options_accessor: Some(Arc::new(
                lance::io::StorageOptionsAccessor::with_static_options(storage.clone()),
            )),
            ..Default::default()
        }),
        max_rows_per_file: 5000,
        ..Default::default()
    };
    let batch = sample_batch(20_000);
    let schema = batch.schema();
    lance::Dataset::write(
        RecordBatchIterator::new(vec![Ok(batch)], schema),
        &uri,
        Some(params),
    )
    .await
    .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job = stack
        .submit("items", json!({"column": "y", "task_size": 2500}))
        .await;
    let job = stack.wait_done(&job, Duration::from_secs(120)).await;
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 4);
    let x = read_i64(&uri, "x", &storage).await.unwrap();
    let y = read_i64(&uri, "y", &storage).await.unwrap();
    assert_eq!(x.len(), 20_000);
    assert_eq!(y, expected(&x));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_stops_the_job_and_a_poison_message_fails_it() {
    let moto = Moto::connect().await;
    let mut stack = Stack::aws(
        &moto,
        StackOptions {
            max_receive_count: 2,
            ..StackOptions::default()
        },
    )
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1000, 1).await.unwrap();
    stack
        .declare("items", &[("y", "x * 2 + 1"), ("z", "x + 1")])
        .await;
    let cancelled = stack.submit("items", json!({"column": "y"})).await;
    let (status, _) = stack
        .post(&format!("/v1/job/{cancelled}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    let poisoned = stack.submit("items", json!({"column": "z"})).await;
    let sqs = stack.sqs.clone().unwrap();
    // A message that can never be read, naming the job.
    sqs.send_many(vec![Outgoing::raw(
        &format!(r#"{{"kind":"run","v":1,"job_id":"{poisoned}","task":"garbage"}}"#),
        Duration::ZERO,
    )])
    .await
    .unwrap();
    sqs.send_many(vec![Outgoing::raw("not even json", Duration::ZERO)])
        .await
        .unwrap();
    // Dead letters stay in the DLQ for this test to see them there.
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            dead_letters: false,
            ..RunnerConfig::default()
        },
        Duration::from_secs(1),
    );
    let job = stack.wait(&poisoned, Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.error
            .as_deref()
            .unwrap_or_default()
            .contains("malformed task message"),
        "{:?}",
        job.error
    );
    let job = stack.wait(&cancelled, Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Cancelled);
    // Both bad messages end in the DLQ after the redrive limit.
    lance_backfill_tests::eventually(Duration::from_secs(60), || {
        let sqs = sqs.clone();
        async move { sqs.dead_letters().await.unwrap().len() >= 2 }
    })
    .await
    .unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert!(
        y.iter().all(Option::is_none),
        "a cancelled job wrote nothing"
    );
    // Handling them (the DLQ's event source) consumes them and leaves
    // the already failed job as it was.
    let worker = stack
        .components
        .worker(fast_engine(), Duration::from_secs(1));
    worker.sweep_dead_letters().await;
    assert!(sqs.dead_letters().await.unwrap().is_empty());
    let again = stack.wait(&poisoned, Duration::from_secs(1)).await;
    assert!(
        again
            .error
            .unwrap_or_default()
            .starts_with("malformed task message")
    );
}

/// Receives every waiting message and lets it go, as a worker killed
/// while holding it would (its receive count grows, nothing is done).
async fn die_holding_every_message(queue: &Arc<dyn TaskQueue>) -> usize {
    let mut held = 0;
    for message in queue
        .receive(10, Duration::from_millis(200), Duration::from_secs(2))
        .await
        .unwrap()
    {
        assert!(!message.body.is_empty());
        held += 1;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    held
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_whose_every_delivery_dies_fails_its_job_from_the_dead_letters() {
    let mut stack = Stack::embedded(StackOptions {
        max_receive_count: 2,
        ..StackOptions::default()
    })
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1000, 1).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    assert_eq!(die_holding_every_message(&stack.queue).await, 1);
    assert_eq!(die_holding_every_message(&stack.queue).await, 1);
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(5),
    );
    let job = stack.wait(&job_id, Duration::from_secs(30)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("fragment 0") && error.contains("dead-letter queue"),
        "{error}"
    );
    // The dead letter stays listed for operators, handled once.
    let sqlite = stack.sqlite.clone().unwrap();
    assert_eq!(sqlite.dead_letters().await.unwrap().len(), 1);
    assert!(
        sqlite
            .take_dead_letters(10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert!(y.iter().all(Option::is_none), "nothing was committed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_function_fails_the_job_of_a_record_from_the_dlq() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1000, 1).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    let sqs = stack.sqs.clone().unwrap();
    let task = sqs
        .receive(1, Duration::from_secs(30), Duration::from_secs(2))
        .await
        .unwrap()
        .pop()
        .expect("a task");
    let dlq_name = sqs.url().rsplit('/').next().unwrap().to_string() + "-dlq";
    let worker = stack
        .components
        .worker(fast_engine(), Duration::from_secs(30));
    // The same body from the DLQ's event source fails the job, and is finished with.
    let dlq_arn = format!("arn:aws:sqs:us-east-1:123456789012:{dlq_name}");
    let event = sqs_event(&task, &dlq_arn, 4);
    let response = worker.handle_sqs_event(event, None).await;
    assert!(response.batch_item_failures.is_empty());
    let job = stack.wait(&job_id, Duration::from_secs(10)).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(job.error.unwrap_or_default().contains("dead-letter queue"));
}

/// The worker function's event for one received message, as the event
/// source with ARN `arn` delivers it on its `receive_count`th receive.
fn sqs_event(
    task: &Received,
    arn: &str,
    receive_count: u32,
) -> aws_lambda_events::event::sqs::SqsEvent {
    serde_json::from_value(json!({
        "Records": [{
            "messageId": task.message_id, "receiptHandle": task.receipt, "body": task.body,
            "attributes": {"ApproximateReceiveCount": receive_count.to_string()},
            "messageAttributes": {}, "eventSource": "aws:sqs", "eventSourceARN": arn,
            "awsRegion": "us-east-1",
        }]
    }))
    .unwrap()
}

fn sample_batch(rows: i64) -> RecordBatch {
    let schema = Arc::new(arrow_schema::Schema::new(vec![
        arrow_schema::Field::new("id", arrow_schema::DataType::Int64, false),
        arrow_schema::Field::new("x", arrow_schema::DataType::Int64, true),
        arrow_schema::Field::new("s", arrow_schema::DataType::Utf8, true),
    ]));
    let ids: Vec<i64> = (0..rows).collect();
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(Int64Array::from(ids.clone())),
            Arc::new(StringArray::from(
                ids.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
            )),
        ],
    )
    .unwrap()
}

/// What a job may leave under a table's `_backfill/` once it has ended:
/// files of its own (checkpoints, staged files) are gone; what declarations
/// keep beside the table (pickles, manifests, code) stays.
pub fn leftovers(backfill_dir: &str) -> Vec<String> {
    walk(backfill_dir)
        .into_iter()
        .filter(|path| {
            !path.contains("/_backfill/udfs/") && !path.contains("/_backfill/manifests/")
        })
        .collect()
}

/// Files under a local directory (empty if it does not exist).
pub fn walk(dir: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(dir)];
    while let Some(path) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.to_string_lossy().into_owned());
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_branch_is_read_and_committed_on_leaving_main_alone() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 3000, 3).await.unwrap();
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    let version = dataset.manifest().version;
    dataset.create_branch("dev", version, None).await.unwrap();
    let (status, body) = stack
        .post(
            "/v1/table/items/add_columns",
            json!({"branch": "dev", "new_columns": [{"name": "y", "computed": "x * 2 + 1"}]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // main has no such column, so a backfill there is a missing column.
    let (status, body) = stack
        .post("/v1/table/items/backfill_column", json!({"column": "y"}))
        .await;
    assert_eq!((status, body["code"].as_i64()), (404, Some(12)), "{body}");
    let main_version = latest_version(&uri).await;
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job = stack
        .submit("items", json!({"column": "y", "branch": "dev"}))
        .await;
    let job = stack.wait_done(&job, Duration::from_secs(60)).await;
    assert_eq!(job.spec.branch.as_deref(), Some("dev"));
    let branch = lance::Dataset::open(&uri)
        .await
        .unwrap()
        .checkout_branch("dev")
        .await
        .unwrap();
    let mut scanner = branch.scan();
    scanner.project(&["x", "y"]).unwrap();
    let batches: Vec<RecordBatch> =
        futures::TryStreamExt::try_collect(scanner.try_into_stream().await.unwrap())
            .await
            .unwrap();
    let mut rows = 0;
    for batch in batches {
        let x = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        let y = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap();
        for i in 0..batch.num_rows() {
            assert_eq!(y.value(i), x.value(i) * 2 + 1);
        }
        rows += batch.num_rows();
    }
    assert_eq!(rows, 3000);
    assert_eq!(
        latest_version(&uri).await,
        main_version,
        "main is untouched"
    );
}

/// A task that ends its Lambda invocation gives its concurrency slot back
/// before the handler returns (Lambda then freezes the process, so a slot
/// kept for a next task would stay held until its lease expired), and is
/// recorded with the rows it computed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_worker_function_gives_its_slot_back_before_returning() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 4000, 1).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "task_size": 1000, "concurrency": 1}),
        )
        .await;
    let sqs = stack.sqs.clone().unwrap();
    let task = sqs
        .receive(1, Duration::from_secs(30), Duration::from_secs(2))
        .await
        .unwrap()
        .pop()
        .expect("a task");
    let event = sqs_event(&task, "arn:aws:sqs:us-east-1:123456789012:tasks", 1);
    let worker = stack
        .components
        .worker(fast_engine(), Duration::from_secs(30));
    let response = worker.handle_sqs_event(event, None).await;
    assert!(response.batch_item_failures.is_empty());
    // The job's one slot is free the moment the handler has returned.
    let ttl = Duration::from_secs(60);
    assert!(
        stack
            .store()
            .try_lease(&job_id, "slot-0", "another-worker", ttl)
            .await
            .unwrap(),
        "the slot was still held after the invocation"
    );
    let job = stack.store().get_job(&job_id).await.unwrap().unwrap();
    assert_eq!(job.metrics.get(Counter::TasksDone), 1);
    assert_eq!(job.metrics.get(Counter::RowsComputed), 1000);
    assert_eq!(job.metrics.get(Counter::TasksTotal), 4);
}

/// On a long-running worker, a task's slot passes to the next task of the
/// job; once no task takes it, it is released: every slot is free soon
/// after the job, and the values are exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_pass_between_tasks_and_are_released_when_idle() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 8000, 1).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "task_size": 500, "concurrency": 2}),
        )
        .await;
    let job = stack.wait(&job_id, Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Done, "{:?}", job.error);
    assert_eq!(job.metrics.get(Counter::TasksDone), 16);
    assert_eq!(job.metrics.get(Counter::RowsComputed), 8000);
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(y, expected(&x));
    let store = stack.store();
    let ttl = Duration::from_secs(60);
    eventually(Duration::from_secs(5), || async {
        let mut free = true;
        for slot in ["slot-0", "slot-1"] {
            free &= store
                .try_lease(&job_id, slot, "another-worker", ttl)
                .await
                .unwrap();
        }
        free
    })
    .await
    .expect("both slots free after the job");
}

/// Batches of a fixed size are read a window at a time: a fragment of
/// several windows, split into range tasks that start and end inside
/// windows, with a batch size that divides neither, and deleted rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windowed_reads_cover_every_row_of_split_fragments() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 300_000, 2).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    dataset.delete("x % 1000 = 7 OR x = 70000").await.unwrap();
    stack.start_worker(fast_engine(), RunnerConfig::default(), VISIBILITY);
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "checkpoint_size": 7000, "task_size": 100000}),
        )
        .await;
    let job = stack.wait_done(&job_id, Duration::from_secs(120)).await;
    assert_eq!(
        job.metrics.get(Counter::TasksTotal),
        4,
        "2 tasks per fragment"
    );
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), 300_000 - 300 - 1);
    assert!(!x.contains(&Some(70000)) && !x.contains(&Some(1007)));
    assert_eq!(y, expected(&x));
}
