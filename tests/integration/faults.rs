//! What real DynamoDB, SQS and S3 do under load and moto never does:
//! transactions cancelled for conflicts, throttling, 500s, empty receives,
//! lost deletes, S3 SlowDown. The fault-injecting moto of this run
//! (`MOTO_FAULTS_ENDPOINT`, scripts/moto_server.py) injects them, seeded;
//! these tests run one at a time (.config/nextest.toml).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::app::worker::Worker;
use lance_backfill::http::lambda;
use lance_backfill::model::job::{Counter, Job, JobState, MetricsDelta};
use lance_backfill::model::table::TableId;
use lance_backfill::ports::queue::TaskQueue;
use lance_backfill::ports::store::{FragmentLedger, JobRecords, StagedFragment, StoreError};
use lance_backfill_tests::{
    API_KEY, Moto, Stack, StackOptions, fast_engine, fuzz_seed, pending_job, read_i64,
    replacements_per_fragment, write_table,
};
use serde_json::{Value, json};

/// The issue's rates: a quarter of the transactions cancelled for a
/// conflict, and some of everything else.
fn every_fault() -> Value {
    json!({
        "seed": fuzz_seed(),
        "dynamodb": {"transaction_conflict": 0.25, "throttling": 0.05, "internal_error": 0.02, "item_conflict": 0.05},
        "sqs": {"internal_error": 0.05, "empty_receive": 0.2, "lost_delete": 0.1},
        "s3": {"slow_down": 0.05},
    })
}

fn a_job() -> Job {
    pending_job(vec!["faults".into()], "y", 64, 0)
}

fn staged(fragment_id: u64) -> StagedFragment {
    StagedFragment {
        fragment_id,
        data_file: json!({"path": format!("{fragment_id}.lance")}),
        rows: 10,
        version: None,
        read_fields: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conflicts_and_throttling_never_lose_a_staged_fragment() {
    let moto = Moto::faulty().await;
    let (store, _) = moto.fresh_store().await;
    let job = a_job();
    store.create_job(&job, "planned", None).await.unwrap();
    moto.set_faults(
        json!({"seed": fuzz_seed(), "dynamodb": {"transaction_conflict": 0.5, "throttling": 0.1}}),
    )
    .await;
    for fragment in 0..40 {
        let staged_now = store.stage_fragment(&job.job_id, &staged(fragment)).await;
        assert!(
            matches!(staged_now, Ok(true)),
            "fragment {fragment}: a conflict is not 'already staged': {staged_now:?}"
        );
        assert!(
            store
                .mark_task_done(&job.job_id, fragment, 0, &MetricsDelta::new())
                .await
                .unwrap()
                .newly_done,
            "task of fragment {fragment} counted"
        );
    }
    let pending = store.staged_fragments(&job.job_id).await.unwrap();
    assert_eq!(pending.len(), 40);
    store.mark_committed(&job.job_id, &pending).await.unwrap();
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    let metrics = store.get_job(&job.job_id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsStaged), 40);
    assert_eq!(metrics.get(Counter::FragmentsCommitted), 40);
    assert_eq!(metrics.get(Counter::TasksDone), 40);
    assert!(
        store
            .staged_fragments(&job.job_id)
            .await
            .unwrap()
            .is_empty()
    );
    println!(
        "FIGURES faults store: 40 fragments staged, counted and committed exactly once; injected {injected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transition_that_always_conflicts_ends_in_an_error() {
    let moto = Moto::faulty().await;
    let (store, _) = moto.fresh_store().await;
    let job = a_job();
    store.create_job(&job, "planned", None).await.unwrap();
    moto.set_faults(json!({"seed": 1, "dynamodb": {"transaction_conflict": 1.0}}))
        .await;
    let moved = tokio::time::timeout(
        Duration::from_secs(90),
        store.transition(&job.job_id, JobState::Running, Some("running"), None),
    )
    .await;
    moto.clear_faults().await;
    let moved = moved.expect("the transition gives up in bounded time");
    assert!(matches!(moved, Err(StoreError::Contention(_))), "{moved:?}");
    // Once the conflicts stop, the same transition goes through.
    assert_eq!(
        store
            .transition(&job.job_id, JobState::Running, None, None)
            .await
            .unwrap(),
        Some(JobState::Pending)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_item_too_large_is_told_apart_from_a_condition() {
    let moto = Moto::faulty().await;
    let (store, _) = moto.fresh_store().await;
    let mut job = a_job();
    // Only possible by going around the API, which bounds `where`.
    job.spec.filter = "x".repeat(500_000);
    let created = store.create_job(&job, "planned", None).await;
    assert!(
        matches!(created, Err(StoreError::ItemTooLarge(_))),
        "{created:?}"
    );
    assert!(store.get_job(&job.job_id).await.unwrap().is_none());
}

/// Three tables on moto's S3, three jobs, every kind of fault at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_jobs_finish_exactly_under_every_fault() {
    let moto = Moto::faulty().await;
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
    let tables = ["a", "b", "c"];
    let mut before = HashMap::new();
    for table in tables {
        let uri = format!("{root}/{table}.lance");
        write_table(&uri, 40_000, 8, &storage).await.unwrap();
        stack.declare(table, &[("y", "x * 2 + 1")]).await;
        before.insert(table, latest(&uri, &storage).await);
    }
    moto.set_faults(every_fault()).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 2,
            batch_size: 4,
            ..RunnerConfig::default()
        },
        Duration::from_secs(20),
    );
    let mut jobs = Vec::new();
    for table in tables {
        let body = json!({"column": "y", "task_size": 2500, "commit_granularity": 2,
            "batch_checkpoint_flush_interval_seconds": 0, "checkpoint_size": 1000});
        jobs.push((table, submit_retrying(&stack, table, body).await));
    }
    for (table, job_id) in &jobs {
        let job = stack.wait_done(job_id, Duration::from_secs(600)).await;
        let uri = format!("{root}/{table}.lance");
        check_filled(&uri, &storage).await;
        let changes = replacements_per_fragment(&uri, &storage, "y", before[table]).await;
        assert_eq!(changes.len(), 8, "{table}: {changes:?}");
        assert!(changes.values().all(|c| *c == 1), "{table}: {changes:?}");
        assert_eq!(job.metrics.get(Counter::TasksDone), 16, "{table}");
        assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 8, "{table}");
    }
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    stack.stop_workers().await;
    println!(
        "FIGURES faults jobs: 3 jobs of 16 tasks DONE with exact values, each fragment replaced once; injected {injected}"
    );
}

/// Small fragments packed into tasks, under every fault: each fragment is
/// filled once and exactly, each pack counted once, with some messages
/// delivered twice (SQS's lost deletes).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn packs_of_small_fragments_finish_exactly_under_every_fault() {
    let moto = Moto::faulty().await;
    let mut stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_table(&uri, 6_000, 300, &HashMap::new())
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let before = latest(&uri, &HashMap::new()).await;
    moto.set_faults(every_fault()).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 2,
            batch_size: 4,
            ..RunnerConfig::default()
        },
        Duration::from_secs(20),
    );
    // Packs of up to 40 fragments of 20 rows; a commit per 50 fragments.
    let body = json!({"column": "y", "task_size": 800, "commit_granularity": 50,
        "batch_checkpoint_flush_interval_seconds": 0});
    let job_id = submit_retrying(&stack, "items", body).await;
    let job = stack.wait_done(&job_id, Duration::from_secs(600)).await;
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    stack.stop_workers().await;
    check_filled(&uri, &HashMap::new()).await;
    let changes = replacements_per_fragment(&uri, &HashMap::new(), "y", before).await;
    assert_eq!(changes.len(), 300, "{changes:?}");
    assert!(changes.values().all(|c| *c == 1), "{changes:?}");
    assert_eq!(job.spec.plan.tasks, 300 / 40 + 1);
    assert_eq!(job.metrics.get(Counter::TasksDone), 8);
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 300);
    println!(
        "FIGURES faults packs: 300 fragments in 8 packs DONE with exact values, each fragment replaced once; injected {injected}"
    );
}

/// Store and queue calls of a job over small fragments, from the
/// emulator's request log (no faults): at most one store write per
/// fragment, and a bounded number of queue calls per task.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn store_and_queue_calls_stay_few_per_small_fragment() {
    let moto = Moto::faulty().await;
    moto.clear_faults().await;
    let mut stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_table(&uri, 4_000, 400, &HashMap::new())
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(60),
    );
    moto.reset_calls().await;
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    let job = stack.wait_done(&job_id, Duration::from_secs(300)).await;
    let calls = moto.calls().await;
    stack.stop_workers().await;
    check_filled(&uri, &HashMap::new()).await;
    let count =
        |names: &[&str]| -> u64 { names.iter().map(|n| calls[*n].as_u64().unwrap_or(0)).sum() };
    let writes = count(&[
        "dynamodb.PutItem",
        "dynamodb.UpdateItem",
        "dynamodb.DeleteItem",
        "dynamodb.TransactWriteItems",
        "dynamodb.BatchWriteItem",
    ]);
    let reads = count(&[
        "dynamodb.GetItem",
        "dynamodb.Query",
        "dynamodb.BatchGetItem",
    ]);
    // Receives are the pollers' (long polls, whether or not work waits).
    let per_task = count(&[
        "sqs.SendMessage",
        "sqs.SendMessageBatch",
        "sqs.DeleteMessage",
        "sqs.DeleteMessageBatch",
        "sqs.ChangeMessageVisibility",
    ]);
    let tasks = job.spec.plan.tasks;
    println!(
        "FIGURES calls: 400 fragments of 10 rows in {tasks} tasks: DynamoDB {writes} writes, {reads} reads; SQS {per_task} sends and deletes ({calls})"
    );
    assert_eq!(tasks, 2, "400 fragments of 10 rows fit in 2 packs");
    assert!(
        writes <= 400,
        "{writes} store writes for 400 fragments: {calls}"
    );
    assert!(
        per_task <= 3 * tasks,
        "{per_task} queue calls for {tasks} tasks: {calls}"
    );
}

/// A submission may meet a fault the client sees (a 503 after retries):
/// clients retry with the same Idempotency-Key, as this does.
async fn submit_retrying(stack: &Stack, table: &str, body: Value) -> String {
    let key = format!("faults-{table}-{}", uuid::Uuid::new_v4().simple());
    for _ in 0..10 {
        let (status, response) = stack
            .call(
                "POST",
                &format!("/v1/table/{table}/backfill_column"),
                &[("x-api-key", API_KEY), ("idempotency-key", &key)],
                Some(&body.to_string()),
            )
            .await;
        if status == 202 {
            return response["job_id"].as_str().expect("job id").to_string();
        }
        assert!(status == 429 || status == 503, "{status}: {response}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("the submission never got through");
}

async fn latest(uri: &str, storage: &HashMap<String, String>) -> u64 {
    lance::dataset::builder::DatasetBuilder::from_uri(uri)
        .with_storage_options(storage.clone())
        .load()
        .await
        .unwrap()
        .manifest()
        .version
}

async fn check_filled(uri: &str, storage: &HashMap<String, String>) {
    let x = read_i64(uri, "x", storage).await.unwrap();
    let y = read_i64(uri, "y", storage).await.unwrap();
    let expected: Vec<Option<i64>> = x.iter().map(|v| v.map(|x| x * 2 + 1)).collect();
    assert!(y == expected, "{uri}: wrong values");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_message_delivered_twice_under_faults() {
    let moto = Moto::faulty().await;
    crate::worker_runs::delivered_twice(&moto, Some(every_fault())).await;
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    println!(
        "FIGURES faults twice: 1 job of 16 tasks, every message delivered twice, DONE with exact values, each task counted once; injected {injected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_holders_of_every_task_under_faults() {
    let moto = Moto::faulty().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    crate::reliability::three_holders(stack, Some((&moto, every_fault()))).await;
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    println!(
        "FIGURES faults holders: 1 job of 18 tasks, three holders of each at once, DONE with exact values, 6 fragments committed once; injected {injected}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_aws_survives_sigkill_under_faults() {
    let moto = Moto::faulty().await;
    moto.set_faults(every_fault()).await;
    let runs = std::env::var("LANCE_BACKFILL_FAULT_CRASH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    crate::crash::crash_loop(
        || crate::crash::Backend::aws(&moto),
        runs,
        "crash under faults (serve --aws)",
        &crate::crash::Shape::split(crate::crash::computed_y()),
    )
    .await;
    // The loop prints its runs and kills; the emulator, shared by every
    // run's `serve --aws`, counts what it injected into all of them.
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    println!(
        "FIGURES faults crash: {runs} runs of serve --aws killed and restarted, every job DONE with exact values; injected {injected}"
    );
}

/// The two Lambda functions' handlers, driven as API Gateway and the SQS
/// event source drive them, under faults: the API function takes the
/// requests; an event source loop receives from SQS, invokes the worker
/// function's handler with SQS events and deletes what it did not report
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lambda_handlers_finish_a_job_under_faults() {
    let moto = Moto::faulty().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_table(&uri, 40_000, 8, &HashMap::new()).await.unwrap();
    let before = latest(&uri, &HashMap::new()).await;
    let declared = invoke_api(
        &stack,
        "/v1/table/items/add_columns",
        json!({"new_columns": [{"name": "y", "computed": "x * 2 + 1"}]}),
    )
    .await;
    assert_eq!(declared.0, 200, "{declared:?}");
    moto.set_faults(every_fault()).await;
    let worker = Arc::new(
        stack
            .components
            .worker(fast_engine(), Duration::from_secs(20)),
    );
    let source = tokio::spawn(event_source(worker, stack.sqs.clone().unwrap()));
    let mut job_id = None;
    for _ in 0..10 {
        let (status, body) = invoke_api(
            &stack,
            "/v1/table/items/backfill_column",
            json!({"column": "y", "task_size": 2500, "commit_granularity": 2}),
        )
        .await;
        if status == 202 {
            job_id = body["job_id"].as_str().map(str::to_string);
            break;
        }
        assert!(status == 429 || status == 503, "{status}: {body}");
    }
    let job_id = job_id.expect("the submission got through");
    let job = stack.wait_done(&job_id, Duration::from_secs(600)).await;
    source.abort();
    let injected = moto.faults_injected().await;
    moto.clear_faults().await;
    check_filled(&uri, &HashMap::new()).await;
    let changes = replacements_per_fragment(&uri, &HashMap::new(), "y", before).await;
    assert!(
        changes.len() == 8 && changes.values().all(|c| *c == 1),
        "{changes:?}"
    );
    assert_eq!(job.metrics.get(Counter::TasksDone), 16);
    println!(
        "FIGURES faults lambda: 1 job of 16 tasks through the API and worker handlers DONE with exact values, each fragment replaced once; injected {injected}"
    );
}

/// A request to the API function's handler, as API Gateway sends it.
async fn invoke_api(stack: &Stack, path: &str, body: Value) -> (u16, Value) {
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("https://api.example.com{path}"))
        .header("x-api-key", API_KEY)
        .header("content-type", "application/json")
        .body(lambda_http::Body::Text(body.to_string()))
        .expect("request");
    let response = lambda::handle(&stack.service, request)
        .await
        .expect("the handler answers");
    let status = response.status().as_u16();
    let text = match response.body() {
        lambda_http::Body::Text(text) => text.clone(),
        lambda_http::Body::Binary(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    };
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// What the SQS event source does for the worker function.
async fn event_source(worker: Arc<Worker>, queue: lance_backfill::adapters::aws::SqsQueue) {
    let arn = format!(
        "arn:aws:sqs:us-east-1:123456789012:{}",
        queue.url().rsplit('/').next().unwrap_or_default()
    );
    loop {
        let received = match queue
            .receive(10, Duration::from_secs(20), Duration::from_secs(1))
            .await
        {
            Ok(received) => received,
            Err(_) => continue,
        };
        if received.is_empty() {
            continue;
        }
        let records = received
            .iter()
            .map(|m| {
                let mut record = SqsMessage::default();
                record.message_id = Some(m.message_id.clone());
                record.receipt_handle = Some(m.receipt.clone());
                record.body = Some(m.body.clone());
                record.event_source_arn = Some(arn.clone());
                record.attributes.insert(
                    "ApproximateReceiveCount".into(),
                    m.receive_count.to_string(),
                );
                record
            })
            .collect();
        let mut event = SqsEvent::default();
        event.records = records;
        let deadline = Instant::now() + Duration::from_secs(60);
        let response = worker.handle_sqs_event(event, Some(deadline)).await;
        let failed: Vec<String> = response
            .batch_item_failures
            .iter()
            .map(|f| f.item_identifier.clone())
            .collect();
        for message in received {
            if !failed.contains(&message.message_id) {
                let _ = queue.delete(&message.receipt).await;
            }
        }
    }
}

/// A submission whose tasks could not be queued fails its job and forgets
/// its Idempotency-Key: the client's retry with the same key starts a job
/// that runs, instead of finding the failed one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_submission_that_could_not_queue_can_be_retried_with_its_key() {
    let moto = Moto::faulty().await;
    let mut stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_table(&uri, 2000, 2, &HashMap::new()).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    moto.set_faults(
        json!({"seed": 3, "sqs": {"internal_error": 1.0, "operations": ["SendMessageBatch"]}}),
    )
    .await;
    let headers = [("x-api-key", API_KEY), ("idempotency-key", "retry-me")];
    let body = r#"{"column": "y"}"#;
    let path = "/v1/table/items/backfill_column";
    let (status, response) = stack.call("POST", path, &headers, Some(body)).await;
    assert_eq!(status, 503, "{response}");
    moto.clear_faults().await;
    let (status, response) = stack.call("POST", path, &headers, Some(body)).await;
    assert_eq!(status, 202, "{response}");
    let job_id = response["job_id"].as_str().unwrap().to_string();
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(20),
    );
    stack.wait_done(&job_id, Duration::from_secs(60)).await;
    check_filled(&uri, &HashMap::new()).await;
}

/// DynamoDB ends a query page at 1 MB whatever the Limit: a listing must
/// still hold every job it asked for, and say where the next page starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_listings_are_whole_when_pages_end_early() {
    let moto = Moto::faulty().await;
    let (store, _) = moto.fresh_store().await;
    let mut ids = Vec::new();
    for i in 0..12 {
        let mut job = a_job();
        job.spec.column = format!("c{i}");
        // A long `where` (within the API's bound) makes each item ~10 KB.
        job.spec.filter = format!("x > {i} OR s = '{}'", "q".repeat(10_000));
        store.create_job(&job, "planned", None).await.unwrap();
        ids.push(job.job_id);
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    ids.reverse();
    moto.set_faults(json!({"dynamodb": {"page_bytes": 40_000}}))
        .await;
    let key = TableId(vec!["faults".into()]).key();
    let first = store.list_jobs(&key, 8, None).await;
    let all = store.list_jobs(&key, 12, None).await;
    moto.clear_faults().await;
    let first = first.unwrap();
    assert_eq!(first.jobs.len(), 8, "a page holds what it asked for");
    let token = first.next_page_token.expect("more jobs follow");
    let rest = store.list_jobs(&key, 8, Some(&token)).await.unwrap();
    let listed: Vec<String> = first
        .jobs
        .iter()
        .chain(rest.jobs.iter())
        .map(|j| j.job_id.clone())
        .collect();
    assert_eq!(listed, ids);
    assert_eq!(all.unwrap().jobs.len(), 12);
}

/// What the engine writes for a 10,000-fragment job with commit_granularity
/// 1, on DynamoDB (no faults: this is about item sizes; it runs here so its
/// 30,000 writes have a moto of their own).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_ten_thousand_fragments_on_dynamodb() {
    let moto = Moto::faulty().await;
    let (store, _) = moto.fresh_store().await;
    crate::store_conformance::a_job_of_ten_thousand_fragments_on(Arc::new(store)).await;
}
