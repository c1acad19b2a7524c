//! Queue semantics and concurrent writers: several holders of the same
//! task at once, deletes and compaction while a job runs.

use std::collections::HashMap;
use std::time::Duration;

use lance::dataset::optimize::{CompactionOptions, compact_files};
use lance_backfill::app::runner::RunnerConfig;
use lance_backfill::model::job::Counter;
use lance_backfill::run::engine::{Delivery, Disposition};
use lance_backfill_tests::{
    Moto, Stack, StackOptions, fast_engine, latest_version, read_i64, write_sample_table,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_holders_of_every_task_at_once_commit_each_group_once() {
    three_holders(Stack::embedded(StackOptions::default()).await, None).await;
}

/// A late delivery (after the visibility timeout) runs while the first
/// holder still works: here every task has three holders at once. With
/// `faults`, the emulator injects them once the tasks are taken.
pub(crate) async fn three_holders(stack: Stack, faults: Option<(&Moto, serde_json::Value)>) {
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 60_000, 6).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let before = latest_version(&uri).await;
    let job_id = stack
        .submit("items", json!({"column": "y", "task_size": 4000, "checkpoint_size": 1000,
            "batch_checkpoint_flush_interval_seconds": 0, "commit_granularity": 2, "concurrency": 64}))
        .await;
    let bodies = stack.drain().await;
    assert_eq!(bodies.len(), 6 * 3);
    let faulty = faults.is_some();
    if let Some((moto, faults)) = faults {
        moto.set_faults(faults).await;
    }
    let engine = stack.components.engine(fast_engine());
    let mut handles = Vec::new();
    for holder in 0..3 {
        for body in &bodies {
            let engine = engine.clone();
            let body = body.clone();
            handles.push(tokio::spawn(async move {
                let delivery = Delivery {
                    message_id: format!("{holder}"),
                    receive_count: 1,
                    deadline: None,
                };
                engine.handle(&body, &delivery).await
            }));
        }
    }
    for handle in handles {
        let disposition = handle.await.unwrap();
        assert!(
            matches!(disposition, Disposition::Done | Disposition::Requeue { .. })
                // Under injected faults a holder may also give up for now.
                || (faulty && matches!(disposition, Disposition::Retry { .. })),
            "{disposition:?}"
        );
    }
    // Requeued holders (all slots busy) are simply finished by a worker.
    let mut stack = stack;
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let job = stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
    assert_eq!(job.metrics.get(Counter::TasksDone), 18);
    assert_eq!(job.metrics.get(Counter::FragmentsCommitted), 6);
    let versions = latest_version(&uri).await - before;
    assert_eq!(versions, job.metrics.get(Counter::CommitsDone));
    assert!(versions <= 3, "{versions} commits for 3 groups of 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_during_a_job_keep_rows_aligned() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 40_000, 4).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "checkpoint_size": 500, "commit_granularity": 1}),
        )
        .await;
    stack.start_worker(
        fast_engine(),
        RunnerConfig {
            pollers: 1,
            batch_size: 1,
            ..RunnerConfig::default()
        },
        Duration::from_secs(30),
    );
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    dataset.delete("x % 7 = 0").await.unwrap();
    stack.wait_done(&job_id, Duration::from_secs(120)).await;
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert!(x.iter().all(|x| x.unwrap() % 7 != 0));
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compaction_during_a_job_never_puts_values_on_wrong_rows() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 16_000, 8).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    // Deletions make every fragment a compaction candidate.
    lance::Dataset::open(&uri)
        .await
        .unwrap()
        .delete("x % 2 = 0")
        .await
        .unwrap();
    // One task per fragment (fragments of 2,000 rows would be packed); a
    // commit per four fragments, so the second four are all staged before
    // their commit finds them moved.
    let job_id = stack
        .submit(
            "items",
            json!({"column": "y", "commit_granularity": 4, "task_size": 2000}),
        )
        .await;
    let bodies = stack.drain().await;
    assert_eq!(bodies.len(), 8);
    let engine = stack.components.engine(fast_engine());
    let delivery = Delivery {
        message_id: "m".into(),
        receive_count: 1,
        deadline: None,
    };
    // Half the fragments are filled and committed...
    for body in &bodies[..4] {
        assert_eq!(engine.handle(body, &delivery).await, Disposition::Done);
    }
    // ...then compaction rewrites every fragment into one...
    let mut dataset = lance::Dataset::open(&uri).await.unwrap();
    let options = CompactionOptions {
        target_rows_per_fragment: 1_000_000,
        ..Default::default()
    };
    let metrics = compact_files(&mut dataset, options, None).await.unwrap();
    assert!(metrics.fragments_removed >= 8, "{metrics:?}");
    // ...and the rest of the job meets fragments the compaction rewrote:
    // they are filled at the read version and staged, then found moved,
    // and the fragment holding their rows now is added to the job with
    // their values carried to it.
    for body in &bodies[4..] {
        engine.handle(body, &delivery).await;
    }
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    let job = stack.wait_done(&job_id, Duration::from_secs(60)).await;
    let events = stack.events(&job_id).await;
    let replanned = job.metrics.get(Counter::RowsReplanned);
    assert_eq!(
        job.metrics.get(Counter::FragmentsReplanned),
        1,
        "{events:?}"
    );
    assert_eq!(job.metrics.get(Counter::FragmentsMoved), 4, "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e.contains(" 4000 computed values carried")),
        "the values of the four staged fragments' live rows were carried: {events:?}"
    );
    assert!(
        job.metrics.get(Counter::RowsComputed) + 4000 <= 16_000 + replanned,
        "carried values were not computed again: {:?}",
        job.metrics
    );
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    assert_eq!(x.len(), 8000, "the deleted rows stay deleted");
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>(),
        "every row has its own value"
    );
}

/// The worker takes any message without panicking.
#[test]
fn message_parsing_never_panics() {
    use proptest::prelude::*;
    let mut runner = lance_backfill_tests::seeded_runner(2000);
    let json_value = proptest::arbitrary::any::<String>().prop_map(|s| s);
    runner
        .run(&json_value, |body| {
            let _ = lance_backfill::ports::queue::Message::parse(&body);
            Ok(())
        })
        .unwrap();
    let shaped = (
        prop_oneof![Just("run"), Just("plan"), Just("cleanup"), Just("other")],
        proptest::option::of(0u32..3),
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<i64>()),
        proptest::option::of(any::<u64>()),
    );
    runner
        .run(&shaped, |(kind, v, start, end, rows)| {
            let body = json!({"kind": kind, "v": v, "job_id": "j", "first": start, "count": end,
                "task": {"fragment_id": rows, "task": 0, "tasks_in_fragment": 1, "start": start, "end": end, "fragment_rows": rows}});
            let _ = lance_backfill::ports::queue::Message::parse(&body.to_string());
            Ok(())
        })
        .unwrap();
}

/// A file of one column of a fragment, written as a worker writes it and
/// recorded nowhere: what a worker killed right after writing leaves.
async fn unrecorded_file(uri: &str, column: &str) -> std::path::PathBuf {
    use std::sync::Arc;

    use arrow_array::{Int64Array, RecordBatch};
    let dataset = lance::Dataset::open(uri).await.unwrap();
    let fragment = dataset.get_fragment(0).unwrap();
    let rows = fragment.physical_rows().await.unwrap();
    let schema = dataset.schema().project(&[column]).unwrap();
    let arrow = Arc::new(arrow_schema::Schema::from(&schema));
    let values = Int64Array::from_iter_values(0..rows as i64);
    let batch = RecordBatch::try_new(arrow, vec![Arc::new(values)]).unwrap();
    let written = fragment
        .write_columns(futures::stream::iter([Ok(batch)]), &schema)
        .await
        .unwrap();
    std::path::Path::new(uri).join("data").join(&written.1.path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn files_a_killed_worker_left_unrecorded_are_removed_when_the_job_ends() {
    let mut stack = Stack::embedded(StackOptions::default()).await;
    let uri = stack.table_uri("items");
    write_sample_table(&uri, 4_000, 2).await.unwrap();
    stack.declare("items", &[("y", "x * 2 + 1")]).await;
    let job_id = stack.submit("items", json!({"column": "y"})).await;
    let stray = unrecorded_file(&uri, "y").await;
    // A file of another column is another writer's business.
    let others = unrecorded_file(&uri, "x").await;
    assert!(stray.exists() && others.exists());
    stack.start_worker(
        fast_engine(),
        RunnerConfig::default(),
        Duration::from_secs(30),
    );
    stack.wait_done(&job_id, Duration::from_secs(60)).await;
    assert!(!stray.exists(), "the job's stray file was removed");
    assert!(others.exists(), "a file of another column was left alone");
    let y = read_i64(&uri, "y", &HashMap::new()).await.unwrap();
    let x = read_i64(&uri, "x", &HashMap::new()).await.unwrap();
    assert_eq!(
        y,
        x.iter().map(|v| v.map(|x| x * 2 + 1)).collect::<Vec<_>>()
    );
}
