//! The official Lance Namespace Rust client against the API: a job id whose
//! item is really in DynamoDB and whose tasks are really in SQS, and typed
//! errors with the spec's codes.

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_dynamodb::types::AttributeValue;
use lance_backfill::ports::queue::Message;
use lance_backfill::ports::queue::TaskQueue;
use lance_backfill_tests::{Moto, Stack, StackOptions, write_sample_table};
use lance_namespace_reqwest_client::apis::{Error as ClientError, table_api};
use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_client_gets_a_job_in_dynamodb_and_tasks_in_sqs() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 10_000, 5).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let version = lance_backfill_tests::latest_version(&uri).await;

    // Official clients send every field, null when unset, and ?delimiter=%24.
    let mut request = AlterTableBackfillColumnsRequest::new("y".to_string());
    request.id = Some(vec!["items".to_string()]);
    request.r#where = Some(None);
    request.concurrency = Some(Some(3));
    request.task_size = Some(Some(1500));
    request.checkpoint_size = Some(Some(500));
    request.manifest = Some(Some("py311".to_string()));
    let response =
        table_api::alter_table_backfill_columns(&stack.client(), "items", request, Some("$"))
            .await
            .expect("202 with a job id");
    let job_id = response.job_id;

    // The job item, read straight from DynamoDB.
    let item = moto
        .dynamodb()
        .get_item()
        .table_name(stack.jobs_table.as_ref().unwrap())
        .key("pk", AttributeValue::S(format!("JOB#{job_id}")))
        .key("sk", AttributeValue::S("JOB".into()))
        .consistent_read(true)
        .send()
        .await
        .unwrap()
        .item
        .expect("job item in DynamoDB");
    assert_eq!(item["state"].as_s().unwrap(), "PENDING");
    assert_eq!(item["table_key"].as_s().unwrap(), "items");
    let spec: serde_json::Value = serde_json::from_str(item["spec"].as_s().unwrap()).unwrap();
    assert_eq!(spec["column"], "y");
    assert_eq!(spec["expression"], "x * 2 + 1");
    assert_eq!(spec["where"], "`y` IS NULL");
    assert_eq!(spec["read_version"], version);
    assert!(spec["submitted_by"].as_str().unwrap().starts_with("key:"));
    assert_eq!(spec["params"]["concurrency"], 3);
    assert_eq!(spec["params"]["task_size"], 1500);
    assert_eq!(spec["params"]["checkpoint_size"], 500);
    assert_eq!(spec["params"]["commit_granularity"], 64);
    assert_eq!(spec["params"]["manifest"], "py311");
    assert_eq!(item["m_fragments_total"].as_n().unwrap(), "5");
    assert_eq!(item["m_tasks_total"].as_n().unwrap(), "10");
    assert_eq!(item["m_rows_total"].as_n().unwrap(), "10000");

    // The task messages, read straight from SQS: every row of every
    // fragment exactly once, no task crossing a fragment.
    let sqs = stack.sqs.as_ref().unwrap();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        for message in sqs
            .receive(10, Duration::from_secs(60), Duration::from_secs(1))
            .await
            .unwrap()
        {
            match Message::parse(&message.body).unwrap() {
                Message::Run {
                    job_id: id, task, ..
                } => {
                    assert_eq!(id, job_id);
                    tasks.push(task);
                }
                other => panic!("unexpected message {other:?}"),
            }
        }
        if tasks.len() >= 10 {
            break;
        }
    }
    assert_eq!(tasks.len(), 10);
    let dataset = lance::Dataset::open(&uri).await.unwrap();
    for fragment in dataset.get_fragments() {
        let mut covered: Vec<(u64, u64)> = tasks
            .iter()
            .filter(|t| t.fragment_id == fragment.id() as u64)
            .map(|t| (t.start, t.end))
            .collect();
        covered.sort();
        assert_eq!(
            covered,
            vec![(0, 1500), (1500, 2000)],
            "fragment {}",
            fragment.id()
        );
    }
    let unique: HashSet<_> = tasks.iter().map(|t| (t.fragment_id, t.task)).collect();
    assert_eq!(unique.len(), 10);

    // Typed errors through the official client.
    let error = table_api::alter_table_backfill_columns(
        &stack.client(),
        "items",
        AlterTableBackfillColumnsRequest::new("nope".to_string()),
        None,
    )
    .await
    .unwrap_err();
    match error {
        ClientError::ResponseError(content) => {
            assert_eq!(content.status.as_u16(), 404);
            let entity = serde_json::to_value(content.entity.expect("typed error body")).unwrap();
            assert_eq!(entity["code"], 12);
            assert!(entity["error"].as_str().unwrap().contains("nope"));
        }
        other => panic!("expected a response error, got {other}"),
    }
    let mut unauthenticated = stack.client();
    unauthenticated.api_key = None;
    match table_api::alter_table_backfill_columns(
        &unauthenticated,
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
        None,
    )
    .await
    {
        Err(ClientError::ResponseError(content)) => {
            assert_eq!(content.status.as_u16(), 401);
            assert_eq!(
                serde_json::to_value(content.entity.unwrap()).unwrap()["code"],
                16
            );
        }
        other => panic!("expected 401, got {other:?}"),
    }
    match table_api::alter_table_backfill_columns(
        &stack.client(),
        "ghost",
        AlterTableBackfillColumnsRequest::new("y".into()),
        Some("$"),
    )
    .await
    {
        Err(ClientError::ResponseError(content)) => {
            assert_eq!(content.status.as_u16(), 404);
            assert_eq!(
                serde_json::to_value(content.entity.unwrap()).unwrap()["code"],
                4
            );
        }
        other => panic!("expected 404, got {other:?}"),
    }
    // The job is still the only one, and the column is now busy.
    match table_api::alter_table_backfill_columns(
        &stack.client(),
        "items",
        AlterTableBackfillColumnsRequest::new("y".into()),
        None,
    )
    .await
    {
        Err(ClientError::ResponseError(content)) => {
            assert_eq!(content.status.as_u16(), 409);
            let entity = serde_json::to_value(content.entity.unwrap()).unwrap();
            assert_eq!(entity["code"], 14);
            assert!(entity["error"].as_str().unwrap().contains(&job_id));
        }
        other => panic!("expected 409, got {other:?}"),
    }
}
