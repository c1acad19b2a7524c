//! Everything a request controls is bounded: sizes and durations, the tasks
//! a job plans, the SQL it carries, the memory a batch computes. Values past
//! a bound are a 400 naming the field; none takes the service down.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use lance_backfill::adapters::aws::SqsQueue;
use lance_backfill::app::bootstrap::Components;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::http::Service;
use lance_backfill::model::job::JobState;
use lance_backfill::ports::queue::QueueSet;
use lance_backfill::run::engine::EngineConfig;
use lance_backfill_tests::{
    API_KEY, Moto, Stack, StackOptions, fast_engine, read_i64, write_sample_table,
};
use serde_json::{Value, json};

const BACKFILL: &str = "/v1/table/items/backfill_column";

async fn stack_with_table(rows: u64, fragments: u64) -> Stack {
    let stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), rows, fragments)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    stack
}

async fn refused(stack: &Stack, path: &str, body: Value, mentions: &str) {
    let (status, response) = stack.post(path, body.clone()).await;
    assert_eq!(status, 400, "{body}: {response}");
    assert_eq!(response["code"], 13, "{response}");
    let message = response["error"].as_str().unwrap_or_default();
    assert!(
        message.contains(mentions),
        "'{message}' should mention '{mentions}'"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn durations_and_sizes_are_bounded() {
    let stack = stack_with_table(1000, 2).await;
    for (field, value) in [
        ("batch_checkpoint_flush_interval_seconds", json!(1e20)),
        ("batch_checkpoint_flush_interval_seconds", json!(3601)),
        ("checkpoint_size", json!(2_000_000)),
        ("min_checkpoint_size", json!(2_000_000)),
        ("max_checkpoint_size", json!(2_000_000)),
        ("commit_granularity", json!(100_001)),
        ("concurrency", json!(10_001)),
    ] {
        let mut body = json!({"column": "y"});
        body[field] = value;
        refused(&stack, BACKFILL, body, field).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_too_many_tasks_is_refused() {
    let stack = stack_with_table(100_001, 1).await;
    refused(
        &stack,
        BACKFILL,
        json!({"column": "y", "task_size": 1}),
        "100000",
    )
    .await;
    // Within the bound it is accepted.
    let (status, response) = stack
        .post(BACKFILL, json!({"column": "y", "task_size": 10}))
        .await;
    assert_eq!(status, 202, "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expressions_are_bounded_and_the_service_keeps_serving() {
    let stack = stack_with_table(1000, 2).await;
    // 100,000 OR terms once overflowed the planner's stack; such a body is
    // now over the body limit, and a `where` over its own limit is named.
    let terms = |n: usize| {
        (0..n)
            .map(|i| format!("x = {i}"))
            .collect::<Vec<_>>()
            .join(" OR ")
    };
    let (status, response) = stack
        .post(BACKFILL, json!({"column": "y", "where": terms(100_000)}))
        .await;
    assert_eq!(
        (status, response["code"].clone()),
        (400, json!(13)),
        "{response}"
    );
    refused(
        &stack,
        BACKFILL,
        json!({"column": "y", "where": terms(60_000)}),
        "'where'",
    )
    .await;
    let many = (0..1_200)
        .map(|i| format!("x = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    refused(
        &stack,
        BACKFILL,
        json!({"column": "y", "where": many}),
        "tokens",
    )
    .await;
    let deep = format!("{}x > 1{}", "(".repeat(200), ")".repeat(200));
    refused(
        &stack,
        BACKFILL,
        json!({"column": "y", "where": deep}),
        "nests",
    )
    .await;
    refused(
        &stack,
        BACKFILL,
        json!({"column": "y", "where": "repeat('x', 2000000000) = s"}),
        "the limit is",
    )
    .await;
    refused(
        &stack,
        "/v1/table/items/add_columns",
        json!({"new_columns": [{"name": "z", "computed": "repeat('x', 2000000000)"}]}),
        "the limit is",
    )
    .await;
    refused(
        &stack,
        "/v1/table/items/add_columns",
        json!({"new_columns": [{"name": "z", "expression": "lpad(s, 2000000000)"}]}),
        "the limit is",
    )
    .await;
    // A long but reasonable predicate is fine, and the service still serves.
    let fine = (0..300)
        .map(|i| format!("x = {i}"))
        .collect::<Vec<_>>()
        .join(" OR ");
    let (status, response) = stack
        .post(BACKFILL, json!({"column": "y", "where": fine}))
        .await;
    assert_eq!(status, 202, "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runaway_batch_fails_its_task_not_the_process() {
    let mut stack = stack_with_table(20_000, 2).await;
    stack.declare("items", &[("big", "repeat(s, 100)")]).await;
    stack.start_worker(
        EngineConfig {
            max_batch_bytes: 1 << 20,
            ..fast_engine()
        },
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let runaway = stack
        .submit("items", json!({"column": "big", "checkpoint_size": 10_000}))
        .await;
    let job = stack.wait(&runaway, Duration::from_secs(60)).await;
    assert_eq!(job.state, JobState::Failed);
    let error = job.error.unwrap_or_default();
    assert!(
        error.contains("bytes") && error.contains("checkpoint_size"),
        "{error}"
    );
    // The same worker goes on with the next job.
    let next = stack.submit("items", json!({"column": "y"})).await;
    stack.wait_done(&next, Duration::from_secs(60)).await;
    let uri = stack.table_uri("items");
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_ids_with_control_characters_are_refused() {
    let stack = stack_with_table(100, 1).await;
    // The unit separator once joined id parts in store keys: ["a\u{1f}b"]
    // and ["a", "b"] were the same key.
    for path in ["/v1/table/a%1Fb/backfill_column", "/v1/table/a%00b/jobs"] {
        let method = if path.ends_with("jobs") {
            "GET"
        } else {
            "POST"
        };
        let (status, response) = stack
            .call(
                method,
                path,
                &[("x-api-key", API_KEY)],
                Some(r#"{"column": "y"}"#),
            )
            .await;
        assert_eq!(status, 400, "{path}: {response}");
        assert_eq!(response["code"], 13);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_columns_authenticates_before_it_reads_the_body() {
    let stack = stack_with_table(100, 1).await;
    for body in [
        "{not json",
        r#"{"new_columns": [{"name": "v", "virtual_column": {}}]}"#,
    ] {
        let (status, response) = stack
            .call("POST", "/v1/table/items/add_columns", &[], Some(body))
            .await;
        assert_eq!(status, 401, "{body}: {response}");
        assert_eq!(response["code"], 16);
    }
}

/// A queue that does not exist stands for SQS failing: the client gets a
/// short answer with a request id, the details stay in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn service_faults_reach_clients_without_internals() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 1000, 2)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let missing = format!("{}/123456789012/no-such-queue", moto.endpoint);
    let components = Components {
        queues: QueueSet::new(Arc::new(SqsQueue::new(moto.sqs(), missing, None))),
        ..stack.components.clone()
    };
    let service: Service = components.service(
        lance_backfill::http::auth::Authenticator::default().with_plain_key(API_KEY),
        Default::default(),
    );
    let mut headers = http::HeaderMap::new();
    headers.insert("x-api-key", API_KEY.parse().unwrap());
    let request = lance_backfill::http::request(
        http::Method::POST,
        BACKFILL,
        headers,
        bytes::Bytes::from(r#"{"column": "y"}"#),
    );
    let response = service.handle(request).await;
    assert_eq!(response.status, 503);
    let body: Value = serde_json::from_slice(&response.body).unwrap();
    let text = body.to_string();
    for internal in [
        "http://",
        "arn:",
        "QueueDoesNotExist",
        "dispatch",
        "127.0.0.1",
    ] {
        assert!(
            !text.contains(internal),
            "'{internal}' reached the client: {text}"
        );
    }
    let request_id = response.request_id.clone().expect("a request id");
    assert!(
        body["detail"].as_str().unwrap().contains(&request_id),
        "{text}"
    );
    // The job that could not be queued is FAILED, with a reason fit to show.
    let failed = stack
        .store()
        .list_jobs(
            &lance_backfill::model::table::TableId(vec!["items".into()]).key(),
            10,
            None,
        )
        .await
        .unwrap()
        .jobs;
    let failed = failed
        .iter()
        .find(|j| j.state == JobState::Failed)
        .expect("a failed job");
    let error = failed.error.clone().unwrap_or_default();
    assert!(
        !error.contains("http://") && !error.contains("QueueDoesNotExist"),
        "{error}"
    );
}

/// The longest operator chains a request may carry (a left-deep tree as
/// deep as the token limit allows), as a computed column and as a `where`,
/// are evaluated on the worker's threads (their default stacks) to the
/// right values: no stack overflow ends the process.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_longest_operator_chains_evaluate_on_worker_threads() {
    use lance_backfill::run::computed::limits::MAX_EXPRESSION_TOKENS;
    let mut stack = stack_with_table(2_000, 2).await;
    // "x", then " + 1" (two tokens) as often as the limit allows.
    let terms = (MAX_EXPRESSION_TOKENS - 1) / 2;
    let sum = format!("x{}", " + 1".repeat(terms));
    stack.declare("items", &[("deep", sum.as_str())]).await;
    // "x >= 0" (three tokens) joined by AND.
    let conditions = (MAX_EXPRESSION_TOKENS + 1) / 4;
    let predicate = vec!["x >= 0"; conditions].join(" AND ");
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let job_id = stack
        .submit("items", json!({"column": "deep", "where": predicate}))
        .await;
    stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let uri = stack.table_uri("items");
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let deep = read_i64(&uri, "deep", &HashMap::new()).await.unwrap();
    assert_eq!(
        deep,
        x.iter()
            .map(|x| x.map(|x| x + terms as i64))
            .collect::<Vec<_>>()
    );
}
