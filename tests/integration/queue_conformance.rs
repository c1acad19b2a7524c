//! One contract, two adapters: every `TaskQueue` behaviour the worker relies
//! on, checked against the embedded SQLite queue and against SQS (moto).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lance_backfill::adapters::sqlite::SqliteQueue;
use lance_backfill::adapters::sqlite::embedded::EmbeddedDb;
use lance_backfill::ports::queue::{Outgoing, Received, TaskQueue};
use lance_backfill_tests::Moto;

/// Receives before a message goes to the dead letters, in every adapter here.
const MAX_RECEIVES: u32 = 2;
/// The queues' default visibility (SQS counts in whole seconds).
const VISIBILITY: Duration = Duration::from_secs(1);

struct Adapter {
    queue: Arc<dyn TaskQueue>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Adapter {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = EmbeddedDb::open(&dir.path().join("state.db")).expect("open state");
    Adapter {
        queue: Arc::new(SqliteQueue::new(db, "tasks", MAX_RECEIVES)),
        _dir: Some(dir),
    }
}

async fn sqs() -> Adapter {
    let queue = Moto::connect()
        .await
        .fresh_queue(MAX_RECEIVES, VISIBILITY)
        .await;
    Adapter {
        queue: Arc::new(queue),
        _dir: None,
    }
}

/// Runs each named check against both adapters: `sqlite::<name>` and `sqs::<name>`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::sqlite().await).await
                }
            )*
        }
        mod sqs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(super::sqs().await).await
                }
            )*
        }
    };
}

conformance!(
    every_message_sent_is_received,
    messages_deleted_together_are_gone_and_only_they,
    received_messages_hide_for_their_visibility,
    visibility_can_be_extended_or_ended,
    delayed_messages_wait,
    a_batch_partly_failed_returns_only_its_failures,
    messages_received_too_often_become_dead_letters,
);

fn outgoing(body: &str) -> Outgoing {
    Outgoing::raw(body, Duration::ZERO)
}

/// Everything visible now (waits briefly for the first message).
async fn receive_all(queue: &dyn TaskQueue, visibility: Duration) -> Vec<Received> {
    let mut all = Vec::new();
    loop {
        let batch = queue
            .receive(10, visibility, Duration::from_millis(500))
            .await
            .unwrap();
        if batch.is_empty() {
            return all;
        }
        all.extend(batch);
    }
}

/// Receives until `want` messages arrived or `timeout` passed.
async fn receive_within(
    queue: &dyn TaskQueue,
    want: usize,
    visibility: Duration,
    timeout: Duration,
) -> Vec<Received> {
    let until = Instant::now() + timeout;
    let mut all = Vec::new();
    while all.len() < want && Instant::now() < until {
        all.extend(
            queue
                .receive(10, visibility, Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    all
}

/// Sends `count` messages "`prefix` 0", "`prefix` 1", ...; returns their bodies.
async fn send_numbered(queue: &dyn TaskQueue, prefix: &str, count: usize) -> Vec<String> {
    let sent: Vec<String> = (0..count).map(|i| format!("{prefix} {i}")).collect();
    queue
        .send_many(sent.iter().map(|b| outgoing(b)).collect())
        .await
        .unwrap();
    sent
}

fn bodies(messages: &[Received]) -> BTreeSet<String> {
    messages.iter().map(|m| m.body.clone()).collect()
}

async fn every_message_sent_is_received(adapter: Adapter) {
    let queue = adapter.queue;
    let sent = send_numbered(&*queue, "message", 25).await;
    let received = receive_all(&*queue, Duration::from_secs(60)).await;
    assert_eq!(received.len(), 25);
    assert_eq!(bodies(&received), sent.iter().cloned().collect());
    assert!(received.iter().all(|m| m.receive_count == 1));
    for message in &received {
        queue.delete(&message.receipt).await.unwrap();
    }
    assert!(
        receive_all(&*queue, Duration::from_secs(60))
            .await
            .is_empty()
    );
}

async fn messages_deleted_together_are_gone_and_only_they(adapter: Adapter) {
    let queue = adapter.queue;
    send_numbered(&*queue, "message", 25).await;
    let received = receive_within(&*queue, 25, VISIBILITY, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 25);
    // 23: more than two SQS batches of 10, the last one partial.
    let (deleted, kept) = received.split_at(23);
    let receipts: Vec<String> = deleted.iter().map(|m| m.receipt.clone()).collect();
    queue.delete_many(&receipts).await.unwrap();
    queue.delete_many(&[]).await.unwrap();
    let again = receive_within(&*queue, 2, Duration::from_secs(60), Duration::from_secs(5)).await;
    assert_eq!(
        bodies(&again),
        bodies(kept),
        "only the messages not deleted come back"
    );
    assert!(again.iter().all(|m| m.receive_count == 2));
    assert!(
        receive_within(&*queue, 1, Duration::from_secs(60), Duration::from_secs(2))
            .await
            .is_empty(),
        "no deleted message comes back"
    );
}

async fn received_messages_hide_for_their_visibility(adapter: Adapter) {
    let queue = adapter.queue;
    queue.send_many(vec![outgoing("m")]).await.unwrap();
    let first = receive_within(&*queue, 1, VISIBILITY, Duration::from_secs(5)).await;
    assert_eq!(first.len(), 1);
    assert!(
        queue
            .receive(10, VISIBILITY, Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "a received message is hidden"
    );
    let again = receive_within(&*queue, 1, Duration::from_secs(60), Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1, "it comes back after its visibility timeout");
    assert_eq!(again[0].body, "m");
    assert_eq!(again[0].receive_count, 2);
    queue.delete(&again[0].receipt).await.unwrap();
}

async fn visibility_can_be_extended_or_ended(adapter: Adapter) {
    let queue = adapter.queue;
    queue
        .send_many(vec![outgoing("extended"), outgoing("ended")])
        .await
        .unwrap();
    let received = receive_within(&*queue, 2, VISIBILITY, Duration::from_secs(5)).await;
    assert_eq!(received.len(), 2);
    for message in &received {
        let timeout = if message.body == "extended" {
            Duration::from_secs(60)
        } else {
            Duration::ZERO
        };
        queue
            .change_visibility(&message.receipt, timeout)
            .await
            .unwrap();
    }
    let back = receive_within(&*queue, 2, Duration::from_secs(60), Duration::from_secs(3)).await;
    assert_eq!(bodies(&back), BTreeSet::from(["ended".to_string()]));
}

async fn delayed_messages_wait(adapter: Adapter) {
    let queue = adapter.queue;
    queue
        .send_many(vec![Outgoing::raw("later", Duration::from_secs(2))])
        .await
        .unwrap();
    assert!(
        queue
            .receive(10, VISIBILITY, Duration::ZERO)
            .await
            .unwrap()
            .is_empty()
    );
    let later = receive_within(&*queue, 1, VISIBILITY, Duration::from_secs(6)).await;
    assert_eq!(bodies(&later), BTreeSet::from(["later".to_string()]));
}

/// What the worker does with a batch: deletes the finished messages and
/// leaves the failed ones, which come back.
async fn a_batch_partly_failed_returns_only_its_failures(adapter: Adapter) {
    let queue = adapter.queue;
    send_numbered(&*queue, "task", 10).await;
    let batch = receive_within(&*queue, 10, VISIBILITY, Duration::from_secs(5)).await;
    assert_eq!(batch.len(), 10);
    let (failed, finished): (Vec<_>, Vec<_>) = batch
        .iter()
        .partition(|m| m.body.ends_with(['1', '3', '5']));
    for message in &finished {
        queue.delete(&message.receipt).await.unwrap();
    }
    for message in &failed {
        queue
            .change_visibility(&message.receipt, Duration::ZERO)
            .await
            .unwrap();
    }
    let back = receive_within(&*queue, 3, Duration::from_secs(60), Duration::from_secs(5)).await;
    assert_eq!(
        bodies(&back),
        BTreeSet::from(["task 1", "task 3", "task 5"].map(String::from))
    );
    assert!(back.iter().all(|m| m.receive_count == 2));
}

async fn messages_received_too_often_become_dead_letters(adapter: Adapter) {
    let queue = adapter.queue;
    queue.send_many(vec![outgoing("poison")]).await.unwrap();
    for receive in 1..=MAX_RECEIVES {
        let got = receive_within(&*queue, 1, VISIBILITY, Duration::from_secs(5)).await;
        assert_eq!(got.len(), 1, "receive {receive}");
        assert_eq!(got[0].receive_count, receive);
        queue
            .change_visibility(&got[0].receipt, Duration::ZERO)
            .await
            .unwrap();
    }
    // The next receive redrives it instead of delivering it.
    let after = receive_within(&*queue, 1, VISIBILITY, Duration::from_secs(2)).await;
    assert!(after.is_empty(), "{after:?}");
    // Operators can look without taking.
    assert_eq!(
        queue.dead_letters().await.unwrap(),
        vec!["poison".to_string()]
    );
    let mut dead = Vec::new();
    let until = Instant::now() + Duration::from_secs(5);
    while dead.is_empty() && Instant::now() < until {
        dead = queue
            .take_dead_letters(10, Duration::from_secs(60))
            .await
            .unwrap();
    }
    assert_eq!(bodies(&dead), BTreeSet::from(["poison".to_string()]));
    queue.settle_dead_letter(&dead[0].receipt).await.unwrap();
    assert!(
        queue
            .take_dead_letters(10, Duration::ZERO)
            .await
            .unwrap()
            .is_empty(),
        "a settled dead letter is not taken again"
    );
}
