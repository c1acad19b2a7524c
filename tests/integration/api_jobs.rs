//! Job creation details: idempotency, the column lock, fan-out for big
//! tables, listing, reading and cancelling jobs.

use std::time::Duration;

use lance_backfill::ports::queue::Message;
use lance_backfill::ports::queue::TaskQueue;
use lance_backfill::submit::SubmitSettings;
use lance_backfill_tests::{API_KEY, Moto, Stack, StackOptions, write_sample_table};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotency_key_replays_and_conflicts() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 100, 2)
        .await
        .unwrap();
    stack
        .declare("items", &[("y", "x + 1"), ("z", "x + 2")])
        .await;
    let headers = [("x-api-key", API_KEY), ("idempotency-key", "abc-1")];
    // One task per fragment (fragments of 50 rows would be packed otherwise).
    let body = r#"{"column":"y","concurrency":2,"task_size":50}"#;
    let (status, first) = stack
        .call(
            "POST",
            "/v1/table/items/backfill_column",
            &headers,
            Some(body),
        )
        .await;
    assert_eq!(status, 202, "{first}");
    let (status, again) = stack
        .call(
            "POST",
            "/v1/table/items/backfill_column",
            &headers,
            Some(body),
        )
        .await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(first["job_id"], again["job_id"]);
    // Same key, different request.
    let (status, conflict) = stack
        .call(
            "POST",
            "/v1/table/items/backfill_column",
            &headers,
            Some(r#"{"column":"z"}"#),
        )
        .await;
    assert_eq!(
        (status, conflict["code"].as_i64()),
        (409, Some(14)),
        "{conflict}"
    );
    // Only one job exists, and only its two tasks are queued.
    let (_, jobs) = stack.get("/v1/table/items/jobs").await;
    assert_eq!(jobs["jobs"].as_array().unwrap().len(), 1);
    let sqs = stack.sqs.as_ref().unwrap();
    let mut seen = 0;
    for _ in 0..5 {
        seen += sqs
            .receive(10, Duration::from_secs(60), Duration::from_millis(500))
            .await
            .unwrap()
            .len();
    }
    // The two tasks, once: a replay of a job whose work is queued queues nothing.
    assert_eq!(seen, 2);
    // Another column is not blocked by the first job.
    let (status, other) = stack
        .post("/v1/table/items/backfill_column", json!({"column": "z"}))
        .await;
    assert_eq!(status, 202, "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn big_tables_fan_out_through_one_planning_message() {
    let moto = Moto::connect().await;
    let options = StackOptions {
        settings: SubmitSettings {
            inline_plan_limit: 3,
            manifests: vec![],
        },
        ..StackOptions::default()
    };
    let stack = Stack::aws(&moto, options).await;
    write_sample_table(&stack.table_uri("items"), 800, 8)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x + 1")]).await;
    // One task per fragment: 8 tasks, more than the inline limit.
    let job_id = stack
        .submit("items", json!({"column": "y", "task_size": 100}))
        .await;
    let sqs = stack.sqs.as_ref().unwrap();
    let messages = sqs
        .receive(10, Duration::from_secs(60), Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(messages.len(), 1);
    assert_eq!(
        Message::parse(&messages[0].body).unwrap(),
        Message::plan(&job_id, 0, 8)
    );
    let job = stack.store().get_job(&job_id).await.unwrap().unwrap();
    assert!(job.spec.plan.fanned_out);
    assert_eq!(job.spec.plan.tasks, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_listed_newest_first_read_and_cancelled() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 100, 1)
        .await
        .unwrap();
    stack
        .declare("items", &[("a", "x + 1"), ("b", "x + 2"), ("c", "x + 3")])
        .await;
    let mut ids = Vec::new();
    for column in ["a", "b", "c"] {
        ids.push(
            stack
                .submit("items", json!({"column": column, "cluster": "gpu"}))
                .await,
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (status, page) = stack.get("/v1/table/items/jobs?limit=2").await;
    assert_eq!(status, 200);
    let listed: Vec<&str> = page["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[2].as_str(), ids[1].as_str()]);
    let token = page["page_token"].as_str().expect("a second page");
    let (_, rest) = stack
        .get(&format!("/v1/table/items/jobs?limit=2&page_token={token}"))
        .await;
    let listed: Vec<&str> = rest["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(listed, vec![ids[0].as_str()]);

    let (status, job) = stack.get(&format!("/v1/job/{}", ids[0])).await;
    assert_eq!(status, 200);
    assert_eq!(job["state"], "PENDING");
    assert_eq!(job["column"], "a");
    assert_eq!(job["parameters"]["cluster"], "gpu");
    assert_eq!(job["parameters"]["where"], "`a` IS NULL");
    assert_eq!(job["metrics"]["fragments"], json!({"done": 0, "total": 1}));
    assert_eq!(job["metrics"]["tasks"], json!({"done": 0, "total": 1}));
    assert!(
        job["events"][0]["message"]
            .as_str()
            .unwrap()
            .starts_with("planned 1 tasks")
    );
    assert!(job["created_at"].as_str().is_some());

    let (status, cancelled) = stack
        .post(&format!("/v1/job/{}/cancel", ids[0]), json!({}))
        .await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["state"], "CANCELLED");
    assert!(cancelled["finished_at"].as_str().is_some());
    // Cancelling again is harmless; the column is free again.
    let (status, _) = stack
        .post(&format!("/v1/job/{}/cancel", ids[0]), json!({}))
        .await;
    assert_eq!(status, 200);
    stack.submit("items", json!({"column": "a"})).await;
}

/// Two identical requests are one request, whatever the order of their
/// `context` entries and whether absent fields are spelled `null`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_retries_are_one_job_whatever_their_member_order() {
    let stack = Stack::embedded(StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 100, 2)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x + 1")]).await;
    let entries: Vec<(String, String)> = (0..40)
        .map(|i| (format!("k{i}"), format!("v{i}")))
        .collect();
    let context = |reverse: bool| {
        let mut entries = entries.clone();
        if reverse {
            entries.reverse();
        }
        let pairs: Vec<String> = entries
            .iter()
            .map(|(k, v)| format!("\"{k}\": \"{v}\""))
            .collect();
        format!("{{{}}}", pairs.join(", "))
    };
    let headers = [("x-api-key", API_KEY), ("idempotency-key", "same-request")];
    let first = format!(r#"{{"column": "y", "context": {}}}"#, context(false));
    let second = format!(
        r#"{{"where": null, "context": {}, "column": "y"}}"#,
        context(true)
    );
    let mut ids = Vec::new();
    for body in [first, second] {
        let (status, response) = stack
            .call(
                "POST",
                "/v1/table/items/backfill_column",
                &headers,
                Some(&body),
            )
            .await;
        assert_eq!(status, 202, "{response}");
        ids.push(response["job_id"].clone());
    }
    assert_eq!(ids[0], ids[1]);
}

/// An idempotency record past its day is forgotten on read, before the
/// store's own expiry removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_expired_idempotency_key_starts_a_new_job() {
    let moto = Moto::connect().await;
    let stack = Stack::aws(&moto, StackOptions::default()).await;
    write_sample_table(&stack.table_uri("items"), 100, 2)
        .await
        .unwrap();
    stack.declare("items", &[("y", "x + 1")]).await;
    let headers = [("x-api-key", API_KEY), ("idempotency-key", "old-key")];
    let submit = || async {
        let (status, response) = stack
            .call(
                "POST",
                "/v1/table/items/backfill_column",
                &headers,
                Some(r#"{"column": "y"}"#),
            )
            .await;
        assert_eq!(status, 202, "{response}");
        response["job_id"].as_str().unwrap().to_string()
    };
    let first = submit().await;
    // The first job ends, and its record ages past the idempotency window.
    let cancelled = stack
        .post(&format!("/v1/job/{first}/cancel"), json!({}))
        .await;
    assert_eq!(cancelled.0, 200, "{cancelled:?}");
    let table = stack.jobs_table.clone().unwrap();
    let items = moto
        .dynamodb()
        .scan()
        .table_name(&table)
        .filter_expression("begins_with(pk, :p)")
        .expression_attribute_values(
            ":p",
            aws_sdk_dynamodb::types::AttributeValue::S("IDEMP#".into()),
        )
        .send()
        .await
        .unwrap();
    let record = items
        .items()
        .first()
        .expect("the idempotency record")
        .clone();
    let key = std::collections::HashMap::from([
        ("pk".to_string(), record["pk"].clone()),
        ("sk".to_string(), record["sk"].clone()),
    ]);
    moto.dynamodb()
        .update_item()
        .table_name(&table)
        .set_key(Some(key))
        .update_expression("SET expires_at = :past")
        .expression_attribute_values(
            ":past",
            aws_sdk_dynamodb::types::AttributeValue::N("1000".into()),
        )
        .send()
        .await
        .unwrap();
    let second = submit().await;
    assert_ne!(first, second, "an expired key names no job");
    assert_eq!(submit().await, second, "the new record replays");
}
