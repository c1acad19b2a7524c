//! Job events: every state change of a job that finishes, one that is
//! cancelled and one that fails reaches the JSON-lines log and a webhook
//! (which refuses its first delivery, so the retry is exercised, and takes
//! only events signed with the shared secret), with the table, columns,
//! versions and row counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use lance_backfill::adapters::local::JsonLinesSink;
use lance_backfill::adapters::local::WebhookSink;
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::ports::events::Publisher;
use lance_backfill_tests::{
    Stack, StackOptions, eventually, fast_engine, latest_version, write_sample_table,
};
use serde_json::{Value, json};

#[derive(Clone, Default)]
struct Webhook {
    received: Arc<Mutex<Vec<Value>>>,
    refused: Arc<Mutex<u32>>,
    forged: Arc<Mutex<u32>>,
}

const EVENT_SECRET: &str = "the webhook's shared secret";

/// What a receiver does (docs/events.md): HMAC-SHA256 of "timestamp.body"
/// with the shared secret, compared in constant time, the timestamp near.
fn signed(headers: &axum::http::HeaderMap, body: &str) -> bool {
    use hmac::{Hmac, Mac};
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(signature)) = (
        header("x-lance-backfill-timestamp"),
        header("x-lance-backfill-signature"),
    ) else {
        return false;
    };
    let Ok(sent) = timestamp.parse::<i64>() else {
        return false;
    };
    if (chrono::Utc::now().timestamp() - sent).abs() > 300 {
        return false;
    }
    let Some(Ok(given)) = signature.strip_prefix("v1=").map(hex::decode) else {
        return false;
    };
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(EVENT_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.{body}").as_bytes());
    mac.verify_slice(&given).is_ok()
}

async fn receive(
    State(hook): State<Webhook>,
    headers: axum::http::HeaderMap,
    body: String,
) -> StatusCode {
    if !signed(&headers, &body) {
        *hook.forged.lock().unwrap() += 1;
        return StatusCode::UNAUTHORIZED;
    }
    {
        let mut refused = hook.refused.lock().unwrap();
        if *refused == 0 {
            *refused += 1;
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    match serde_json::from_str(&body) {
        Ok(value) => {
            hook.received.lock().unwrap().push(value);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

async fn start_webhook() -> (String, Webhook) {
    let hook = Webhook::default();
    let app = Router::new()
        .route("/events", axum::routing::post(receive))
        .with_state(hook.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{address}/events"), hook)
}

/// The changes each job went through, in order.
fn changes_by_job(events: &[Value]) -> HashMap<String, Vec<String>> {
    let mut by_job: HashMap<String, Vec<String>> = HashMap::new();
    for event in events {
        by_job
            .entry(event["job_id"].as_str().unwrap().to_string())
            .or_default()
            .push(event["change"].as_str().unwrap().to_string());
    }
    by_job
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_state_change_reaches_the_log_and_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("events.jsonl");
    let (url, hook) = start_webhook().await;
    let publisher = Publisher::default()
        .with(Arc::new(JsonLinesSink::open(&log).await.unwrap()))
        .with(Arc::new(
            WebhookSink::start(url, Some(EVENT_SECRET.to_string())).unwrap(),
        ));
    let mut stack = Stack::embedded(StackOptions {
        publisher,
        ..StackOptions::default()
    })
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 1000, 4).await.unwrap();
    stack
        .declare(
            "items",
            &[
                ("y", "x * 2 + 1"),
                ("z", "x + 1"),
                ("bad", "CAST(s AS BIGINT)"),
            ],
        )
        .await;
    // Cancelled before any worker runs.
    let cancelled = stack.submit("items", json!({"column": "z"})).await;
    let (status, _) = stack
        .post(&format!("/v1/job/{cancelled}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let done = stack.submit("items", json!({"column": "y"})).await;
    let done_job = stack.wait_done(&done, Duration::from_secs(60)).await;
    let failed = stack.submit("items", json!({"column": "bad"})).await;
    stack.wait(&failed, Duration::from_secs(60)).await;

    let expected = HashMap::from([
        (cancelled.clone(), vec!["SUBMITTED", "CANCELLED"]),
        (done.clone(), vec!["SUBMITTED", "RUNNING", "DONE"]),
        (failed.clone(), vec!["SUBMITTED", "RUNNING", "FAILED"]),
    ]);
    let expected: HashMap<String, Vec<String>> = expected
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().map(String::from).collect()))
        .collect();
    let text = std::fs::read_to_string(&log).unwrap();
    let logged: Vec<Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(changes_by_job(&logged), expected, "{text}");
    // The webhook refused the first delivery; the retry brought every event.
    eventually(Duration::from_secs(30), || {
        let hook = hook.clone();
        let expected = expected.clone();
        async move { changes_by_job(&hook.received.lock().unwrap()) == expected }
    })
    .await
    .expect("every event at the webhook");
    assert_eq!(*hook.forged.lock().unwrap(), 0, "every delivery was signed");

    let finished = logged
        .iter()
        .find(|e| e["job_id"] == done.as_str() && e["change"] == "DONE")
        .unwrap();
    assert_eq!(finished["table"], "items");
    assert_eq!(finished["columns"], json!(["y"]));
    assert_eq!(finished["read_version"], done_job.spec.read_version);
    assert_eq!(finished["published_version"], latest_version(&uri).await);
    assert_eq!(finished["rows_total"], 1000);
    assert_eq!(finished["rows_committed"], 1000);
    let failure = logged
        .iter()
        .find(|e| e["job_id"] == failed.as_str() && e["change"] == "FAILED")
        .unwrap();
    assert!(
        !failure["error"].as_str().unwrap_or_default().is_empty(),
        "{failure}"
    );
}

/// On AWS the events go to EventBridge: a rule on the bus sends them to an
/// SQS queue here, where each state change of a job arrives with its
/// detail-type and detail.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_events_reach_an_eventbridge_bus() {
    use aws_sdk_eventbridge::types::Target;
    use lance_backfill::adapters::aws::EventBridgeSink;
    use lance_backfill_tests::{Moto, unique};

    let moto = Moto::connect().await;
    let events = aws_sdk_eventbridge::Client::new(&moto.sdk);
    let bus = unique("bus");
    events.create_event_bus().name(&bus).send().await.unwrap();
    let sqs = moto.sqs();
    let queue_url = sqs
        .create_queue()
        .queue_name(unique("job-events"))
        .send()
        .await
        .unwrap()
        .queue_url
        .unwrap();
    let queue_arn = sqs
        .get_queue_attributes()
        .queue_url(&queue_url)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&aws_sdk_sqs::types::QueueAttributeName::QueueArn]
        .clone();
    events
        .put_rule()
        .name("job-events")
        .event_bus_name(&bus)
        .event_pattern(r#"{"source": ["lance-backfill"]}"#)
        .send()
        .await
        .unwrap();
    events
        .put_targets()
        .rule("job-events")
        .event_bus_name(&bus)
        .targets(
            Target::builder()
                .id("queue")
                .arn(queue_arn)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let publisher = Publisher::default().with(Arc::new(EventBridgeSink::new(events, &bus)));
    let mut stack = Stack::aws(
        &moto,
        StackOptions {
            publisher,
            ..StackOptions::default()
        },
    )
    .await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 500, 2).await.unwrap();
    stack.declare("items", &[("y", "x + 1")]).await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    stack.wait_done(&job_id, Duration::from_secs(60)).await;

    let mut received: Vec<Value> = Vec::new();
    let until = std::time::Instant::now() + Duration::from_secs(30);
    while received.len() < 3 && std::time::Instant::now() < until {
        let messages = sqs
            .receive_message()
            .queue_url(&queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .unwrap()
            .messages
            .unwrap_or_default();
        for message in messages {
            received.push(serde_json::from_str(message.body().unwrap()).unwrap());
        }
    }
    let kinds: Vec<&str> = received
        .iter()
        .map(|e| e["detail-type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Job SUBMITTED", "Job RUNNING", "Job DONE"]);
    for event in &received {
        assert_eq!(event["source"], "lance-backfill");
        assert_eq!(event["detail"]["job_id"], job_id.as_str());
        assert_eq!(event["detail"]["table_id"], json!(["items"]));
    }
    assert_eq!(received[2]["detail"]["rows_committed"], 500);
    assert_eq!(
        received[2]["detail"]["published_version"],
        latest_version(&uri).await
    );
}

/// A receiver that refuses every delivery (here: signed with another
/// secret) gets each event its bounded number of times; then the event is
/// dropped and counted, and nothing waits on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_no_receiver_takes_is_dropped_and_counted() {
    use lance_backfill::ports::events::{EventSink, JobChange, JobNotice};
    let (url, hook) = start_webhook().await;
    let sink = WebhookSink::start(url, Some("not the receiver's secret".to_string())).unwrap();
    let notice = JobNotice {
        change: JobChange::Done,
        job_id: "job-1".into(),
        table: "items".into(),
        table_id: vec!["items".into()],
        column: "y".into(),
        columns: vec!["y".into()],
        submitted_by: "key:ops".into(),
        read_version: 1,
        published_version: Some(2),
        fragments_total: 1,
        fragments_committed: 1,
        rows_total: 10,
        rows_committed: 10,
        rows_failed: 0,
        error: None,
        at: "2026-12-06T00:00:00Z".into(),
    };
    let started = std::time::Instant::now();
    sink.publish(&notice).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "publishing never waits"
    );
    eventually(Duration::from_secs(60), || {
        let dropped = sink.dropped();
        async move { dropped == 1 }
    })
    .await
    .expect("the event dropped and counted");
    assert_eq!(*hook.forged.lock().unwrap(), 6, "each attempt refused");
    assert!(hook.received.lock().unwrap().is_empty());
}
