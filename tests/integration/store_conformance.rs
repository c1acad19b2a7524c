//! One contract, two adapters: every behaviour of each job store role
//! (`JobRecords`, `JobJournal`, `FragmentLedger`, `Leases`, `Watermarks`)
//! the service relies on, checked against the embedded SQLite store and
//! against DynamoDB (moto), unsharded and sharded.

use std::sync::Arc;
use std::time::Duration;

use lance_backfill::adapters::aws::dynamodb::ShardPolicy;
use lance_backfill::adapters::sqlite::SqliteJobStore;
use lance_backfill::adapters::sqlite::embedded::EmbeddedDb;
use lance_backfill::model::job::{Counter, Job, JobState, MetricsDelta, new_job_id};
use lance_backfill::model::plan::{PlannedFragment, ReadAt, job_fragment};
use lance_backfill::model::table::TableId;
use lance_backfill::ports::store::{
    COMMIT_LEASE, ColumnWatermark, CreateOutcome, FragmentStatus, HeldLease, IdempotencyClaim,
    JobStore, PlanChange, Replanned, Resolution, RowFailure, StagedFragment, StoreError,
};
use lance_backfill_tests::{Moto, pending_job};

/// A store under test and what keeps it alive.
struct Adapter {
    store: Arc<dyn JobStore>,
    _dir: Option<tempfile::TempDir>,
}

async fn sqlite() -> Adapter {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = EmbeddedDb::open(&dir.path().join("state.db")).expect("open state");
    Adapter {
        store: Arc::new(SqliteJobStore::new(db)),
        _dir: Some(dir),
    }
}

async fn dynamodb() -> Adapter {
    let (store, _) = Moto::connect().await.fresh_store().await;
    Adapter {
        store: Arc::new(store),
        _dir: None,
    }
}

async fn dynamodb_sharded() -> Adapter {
    let (store, _) = Moto::connect().await.fresh_store().await;
    Adapter {
        store: Arc::new(store.with_shard_policy(ShardPolicy::Fixed(4))),
        _dir: None,
    }
}

/// Runs each named check against each adapter, grouped by the store role
/// it checks: `<adapter>::<role>::<name>`, where the adapters are SQLite,
/// DynamoDB with a job's records under its own key, and DynamoDB with them
/// spread over four shards.
macro_rules! conformance {
    ($($role:ident: [$($name:ident),* $(,)?]),* $(,)?) => {
        conformance!(@on sqlite; $($role: [$($name),*]),*);
        conformance!(@on dynamodb; $($role: [$($name),*]),*);
        conformance!(@on dynamodb_sharded; $($role: [$($name),*]),*);
    };
    (@on $adapter:ident; $($role:ident: [$($name:ident),*]),*) => {
        mod $adapter {
            $(
                mod $role {
                    $(
                        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                        async fn $name() {
                            super::super::$name(super::super::$adapter().await).await
                        }
                    )*
                }
            )*
        }
    };
}

conformance!(
    records: [
        create_replays_and_refuses,
        a_released_idempotency_key_starts_a_new_job,
        a_column_is_free_again_once_its_job_ends,
        counters_add_up_under_concurrency,
        transitions_follow_the_state_machine,
        listing_pages_newest_first,
        missing_jobs_and_bad_tokens,
    ],
    journal: [events_and_row_failures_are_kept_in_order_once],
    fragments: [
        tasks_and_fragments_are_recorded_once,
        committed_fragments_leave_the_staged_list,
        fragments_are_resolved_in_batches,
        plans_change_once_however_often_recorded,
    ],
    leases: [
        leases_are_exclusive_expire_and_renew,
        a_dropped_lease_is_given_back,
        a_commit_in_flight_holds_off_a_cancel,
        an_ended_commit_lets_a_cancel_through,
    ],
    watermarks: [watermarks_change_only_from_the_revision_read],
);

/// The embedded store's run of the 10,000-fragment job; DynamoDB's runs on
/// its own moto (faults::a_job_of_ten_thousand_fragments_on_dynamodb), so
/// its 30,000 writes do not slow the other suites.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_of_ten_thousand_fragments_in_sqlite() {
    a_job_of_ten_thousand_fragments_committed_one_by_one(sqlite().await.store).await
}

pub(crate) async fn a_job_of_ten_thousand_fragments_on(store: Arc<dyn JobStore>) {
    a_job_of_ten_thousand_fragments_committed_one_by_one(store).await
}

fn job(table: &str, column: &str) -> Job {
    pending_job(vec!["ns".into(), table.into()], column, 4, 400)
}

fn claim(key: &str, fingerprint: &str) -> IdempotencyClaim {
    IdempotencyClaim {
        key: key.into(),
        fingerprint: fingerprint.into(),
    }
}

fn staged(fragment_id: u64, rows: u64) -> StagedFragment {
    StagedFragment {
        fragment_id,
        data_file: serde_json::json!({"path": format!("{fragment_id}.lance")}),
        rows,
        version: None,
        read_fields: vec![0, 1],
    }
}

async fn create_replays_and_refuses(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    let created = store
        .create_job(&first, "planned", Some(&claim("k1", "f1")))
        .await
        .unwrap();
    assert_eq!(created, CreateOutcome::Created);
    let stored = store.get_job(&first.job_id).await.unwrap().unwrap();
    assert_eq!(stored.spec, first.spec);
    assert_eq!(stored.state, JobState::Pending);
    assert_eq!(stored.metrics.get(Counter::FragmentsTotal), 4);
    // The same key and request: the first job.
    let again = store
        .create_job(&job("t", "y"), "planned", Some(&claim("k1", "f1")))
        .await
        .unwrap();
    assert_eq!(
        again,
        CreateOutcome::Replayed {
            job_id: first.job_id.clone()
        }
    );
    // The same key, another request.
    let other = store
        .create_job(&job("t", "y"), "planned", Some(&claim("k1", "f2")))
        .await
        .unwrap();
    assert_eq!(
        other,
        CreateOutcome::IdempotencyMismatch {
            job_id: first.job_id.clone()
        }
    );
    // Another key, the same column: busy.
    let busy = store
        .create_job(&job("t", "y"), "planned", Some(&claim("k2", "f1")))
        .await
        .unwrap();
    assert_eq!(
        busy,
        CreateOutcome::ColumnBusy {
            job_id: first.job_id.clone()
        }
    );
    // Another column of the same table is free.
    let z = store
        .create_job(&job("t", "z"), "planned", None)
        .await
        .unwrap();
    assert_eq!(z, CreateOutcome::Created);
}

/// A submission that could not queue its work forgets its key, so its
/// retry makes a new job; a key is forgotten only for the job it names.
async fn a_released_idempotency_key_starts_a_new_job(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    let key = claim("k1", "f1");
    store
        .create_job(&first, "planned", Some(&key))
        .await
        .unwrap();
    store
        .release_idempotency("k1", "another-job")
        .await
        .unwrap();
    let replayed = CreateOutcome::Replayed {
        job_id: first.job_id.clone(),
    };
    let again = store
        .create_job(&job("t", "y"), "planned", Some(&key))
        .await;
    assert_eq!(
        again.unwrap(),
        replayed,
        "another job's release keeps the key"
    );
    store
        .transition(
            &first.job_id,
            JobState::Failed,
            Some("failed: unqueued"),
            Some("unqueued"),
        )
        .await
        .unwrap();
    store
        .release_idempotency("k1", &first.job_id)
        .await
        .unwrap();
    let retry = job("t", "y");
    let created = store.create_job(&retry, "planned", Some(&key)).await;
    assert_eq!(created.unwrap(), CreateOutcome::Created);
    let replay = store
        .create_job(&job("t", "y"), "planned", Some(&key))
        .await;
    assert_eq!(
        replay.unwrap(),
        CreateOutcome::Replayed {
            job_id: retry.job_id.clone()
        }
    );
}

/// A job's events are kept oldest first, the latest `limit` of them; rows
/// a function raised on are listed once each, by fragment and row.
async fn events_and_row_failures_are_kept_in_order_once(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    store.create_job(&first, "planned", None).await.unwrap();
    let id = first.job_id.as_str();
    for message in ["one", "two", "three"] {
        store.add_event(id, message).await.unwrap();
    }
    let messages = |events: Vec<lance_backfill::model::job::JobEvent>| -> Vec<String> {
        events.into_iter().map(|e| e.message).collect()
    };
    let all = messages(store.list_events(id, 10).await.unwrap());
    assert_eq!(all, ["planned", "one", "two", "three"]);
    let latest = messages(store.list_events(id, 2).await.unwrap());
    assert_eq!(latest, ["two", "three"]);
    let failure = |fragment_id: u64, row: u64| RowFailure {
        fragment_id,
        row,
        error: format!("ValueError at {fragment_id}/{row}"),
    };
    let first_batch = [failure(2, 5), failure(0, 9), failure(0, 3)];
    store.add_row_failures(id, &first_batch).await.unwrap();
    // A redelivered task lists its rows again.
    let second_batch = [failure(0, 3), failure(1, 0)];
    store.add_row_failures(id, &second_batch).await.unwrap();
    let listed = store.list_row_failures(id, 10).await.unwrap();
    let rows: Vec<(u64, u64)> = listed.iter().map(|f| (f.fragment_id, f.row)).collect();
    assert_eq!(rows, [(0, 3), (0, 9), (1, 0), (2, 5)]);
    assert_eq!(listed[0], failure(0, 3));
    assert_eq!(store.list_row_failures(id, 2).await.unwrap().len(), 2);
    let other = job("t", "z");
    store.create_job(&other, "planned", None).await.unwrap();
    assert!(
        store
            .list_row_failures(&other.job_id, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_column_is_free_again_once_its_job_ends(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    store.create_job(&first, "planned", None).await.unwrap();
    let moved = store
        .transition(&first.job_id, JobState::Cancelled, Some("cancelled"), None)
        .await
        .unwrap();
    assert_eq!(moved, Some(JobState::Pending));
    let second = job("t", "y");
    assert_eq!(
        store.create_job(&second, "planned", None).await.unwrap(),
        CreateOutcome::Created
    );
}

async fn counters_add_up_under_concurrency(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let adds = (0..20).map(|i| {
        let store = store.clone();
        let job_id = job.job_id.clone();
        tokio::spawn(async move {
            let delta = MetricsDelta::new()
                .add(Counter::RowsComputed, 10)
                .add(Counter::RowsCheckpointed, i);
            store.add_metrics(&job_id, &delta).await.unwrap()
        })
    });
    for add in adds.collect::<Vec<_>>() {
        add.await.unwrap();
    }
    let metrics = store
        .add_metrics(&job.job_id, &MetricsDelta::new())
        .await
        .unwrap();
    assert_eq!(metrics.get(Counter::RowsComputed), 200);
    assert_eq!(
        metrics.get(Counter::RowsCheckpointed),
        (0..20).sum::<i64>() as u64
    );
    assert_eq!(metrics.get(Counter::FragmentsTotal), 4);
    let after = store
        .add_metrics(
            &job.job_id,
            &MetricsDelta::new().add(Counter::CommitsDone, 1),
        )
        .await
        .unwrap();
    assert_eq!(after.get(Counter::CommitsDone), 1);
    assert_eq!(after.get(Counter::RowsComputed), 200);
}

async fn transitions_follow_the_state_machine(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    assert_eq!(
        store
            .transition(id, JobState::Running, Some("running"), None)
            .await
            .unwrap(),
        Some(JobState::Pending)
    );
    // Not allowed: back to PENDING, or RUNNING again.
    assert_eq!(
        store
            .transition(id, JobState::Pending, None, None)
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store
            .transition(id, JobState::Running, None, None)
            .await
            .unwrap(),
        None
    );
    store.add_event(id, "an event").await.unwrap();
    assert_eq!(
        store
            .transition(id, JobState::Failed, Some("failed: boom"), Some("boom"))
            .await
            .unwrap(),
        Some(JobState::Running)
    );
    // Terminal states are final.
    assert_eq!(
        store
            .transition(id, JobState::Done, None, None)
            .await
            .unwrap(),
        None
    );
    let stored = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.as_deref(), Some("boom"));
    assert!(stored.started_at.is_some() && stored.finished_at.is_some());
    let events: Vec<String> = store
        .list_events(id, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.message)
        .collect();
    assert_eq!(
        events,
        vec!["planned", "running", "an event", "failed: boom"]
    );
    let latest = store.list_events(id, 2).await.unwrap();
    assert_eq!(latest[0].message, "an event");
    assert_eq!(latest[1].message, "failed: boom");
}

async fn leases_are_exclusive_expire_and_renew(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    let ttl = Duration::from_millis(1500);
    assert!(store.try_lease(id, "commit", "a", ttl).await.unwrap());
    assert!(!store.try_lease(id, "commit", "b", ttl).await.unwrap());
    // Other names are independent; the owner renews.
    assert!(store.try_lease(id, "slot-0", "b", ttl).await.unwrap());
    assert!(store.try_lease(id, "commit", "a", ttl).await.unwrap());
    // Only the owner releases.
    store.release_lease(id, "commit", "b").await.unwrap();
    assert!(!store.try_lease(id, "commit", "b", ttl).await.unwrap());
    store.release_lease(id, "commit", "a").await.unwrap();
    assert!(store.try_lease(id, "commit", "b", ttl).await.unwrap());
    // An expired lease goes to whoever asks.
    tokio::time::sleep(ttl + Duration::from_millis(300)).await;
    assert!(store.try_lease(id, "commit", "c", ttl).await.unwrap());
    assert!(!store.try_lease(id, "commit", "b", ttl).await.unwrap());
}

/// A lease ends with its holder: dropped (a panic, a cancelled task) it is
/// released at once instead of being renewed for ever or waiting to expire.
async fn a_dropped_lease_is_given_back(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    let ttl = Duration::from_secs(60);
    let held = HeldLease::acquire(store.clone(), id, "slot-0", "holder", ttl)
        .await
        .unwrap()
        .expect("a free lease");
    assert!(!store.try_lease(id, "slot-0", "other", ttl).await.unwrap());
    drop(held);
    let mut taken = false;
    for _ in 0..50 {
        if store.try_lease(id, "slot-0", "other", ttl).await.unwrap() {
            taken = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        taken,
        "the dropped lease was released long before its minute"
    );
}

async fn tasks_and_fragments_are_recorded_once(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    let computed = MetricsDelta::new().add(Counter::RowsComputed, 100);
    let first = store.mark_task_done(id, 7, 0, &computed).await.unwrap();
    assert!(first.newly_done);
    assert_eq!(first.tasks_done, 1);
    let repeated = store.mark_task_done(id, 7, 0, &computed).await.unwrap();
    assert!(!repeated.newly_done);
    assert_eq!(repeated.tasks_done, 1);
    let second = store.mark_task_done(id, 7, 2, &computed).await.unwrap();
    assert_eq!(second.tasks_done, 2);
    // A task's rows are counted with it, once however often it is recorded.
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::RowsComputed), 200);
    assert_eq!(metrics.get(Counter::TasksDone), 2);
    let record = store.get_fragment(id, 7).await.unwrap();
    assert_eq!(record.status, FragmentStatus::Open);
    assert_eq!(record.tasks_done, vec![0, 2]);
    assert!(store.stage_fragment(id, &staged(7, 100)).await.unwrap());
    assert!(!store.stage_fragment(id, &staged(7, 100)).await.unwrap());
    assert!(!store.skip_fragment(id, 7).await.unwrap());
    assert!(store.skip_fragment(id, 8).await.unwrap());
    assert!(!store.stage_fragment(id, &staged(8, 100)).await.unwrap());
    assert_eq!(
        store.get_fragment(id, 7).await.unwrap().status,
        FragmentStatus::Staged
    );
    assert_eq!(
        store.get_fragment(id, 8).await.unwrap().status,
        FragmentStatus::Skipped
    );
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::TasksDone), 2);
    assert_eq!(metrics.get(Counter::FragmentsStaged), 1);
    assert_eq!(metrics.get(Counter::FragmentsSkipped), 1);
}

async fn committed_fragments_leave_the_staged_list(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    for fragment in [3, 1, 2, 60] {
        assert!(
            store
                .stage_fragment(id, &staged(fragment, 100))
                .await
                .unwrap()
        );
    }
    let listed = store.staged_fragments(id).await.unwrap();
    let ids: Vec<u64> = listed.iter().map(|s| s.fragment_id).collect();
    assert_eq!(ids, vec![1, 2, 3, 60]);
    assert_eq!(listed[0], staged(1, 100));
    store
        .mark_committed(id, &[staged(1, 100), staged(3, 100)])
        .await
        .unwrap();
    // Again (a committer whose lease expired under it): counted once.
    store
        .mark_committed(id, &[staged(1, 100), staged(2, 100)])
        .await
        .unwrap();
    let rest: Vec<u64> = store
        .staged_fragments(id)
        .await
        .unwrap()
        .iter()
        .map(|s| s.fragment_id)
        .collect();
    assert_eq!(rest, vec![60]);
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsCommitted), 3);
    assert_eq!(metrics.get(Counter::RowsCommitted), 300);
    assert_eq!(metrics.fragments_pending_commit(), 1);
    assert_eq!(
        store.get_fragment(id, 2).await.unwrap().status,
        FragmentStatus::Committed
    );
}

/// Many fragments recorded at once (more than one DynamoDB transaction
/// holds), a batch overlapping fragments resolved before, and a commit
/// recorded with its count and event.
async fn fragments_are_resolved_in_batches(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    let resolutions = |ids: std::ops::Range<u64>| -> Vec<Resolution> {
        ids.map(|i| match i % 3 {
            0 => Resolution::skipped(i),
            _ => Resolution::staged(staged(i, 10)),
        })
        .collect()
    };
    let counted = MetricsDelta::new()
        .add(Counter::TasksDone, 1)
        .add(Counter::RowsComputed, 1200);
    let recorded = store
        .resolve_fragments(id, &resolutions(0..120), &counted)
        .await
        .unwrap();
    assert_eq!(recorded, (0..120).collect::<Vec<_>>());
    // Half of these were recorded already: only the new ones are, and the
    // count travels with the last, which is new.
    let recorded = store
        .resolve_fragments(id, &resolutions(60..180), &counted)
        .await
        .unwrap();
    assert_eq!(recorded, (120..180).collect::<Vec<_>>());
    // A batch of fragments all recorded before changes nothing.
    let recorded = store
        .resolve_fragments(id, &resolutions(0..50), &counted)
        .await
        .unwrap();
    assert!(recorded.is_empty());
    let asked: Vec<u64> = (170..250).collect();
    let resolved = store.resolved_fragments(id, &asked).await.unwrap();
    assert_eq!(
        resolved,
        (170..180).collect::<std::collections::HashSet<u64>>()
    );
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsSkipped), 60);
    assert_eq!(metrics.get(Counter::FragmentsStaged), 120);
    assert_eq!(metrics.get(Counter::TasksDone), 2);
    assert_eq!(metrics.get(Counter::RowsComputed), 2400);
    let staged_now = store.staged_fragments(id).await.unwrap();
    assert_eq!(staged_now.len(), 120);
    store
        .record_commit(id, &staged_now, "committed 120 fragments as version 2", "c")
        .await
        .unwrap();
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsCommitted), 120);
    assert_eq!(metrics.get(Counter::CommitsDone), 1);
    assert_eq!(metrics.fragments_pending_commit(), 0);
    let events = store.list_events(id, 10).await.unwrap();
    assert_eq!(
        events.last().map(|e| e.message.as_str()),
        Some("committed 120 fragments as version 2")
    );
}

async fn listing_pages_newest_first(adapter: Adapter) {
    let store = adapter.store;
    let mut ids = Vec::new();
    for i in 0..7 {
        let job = job("listed", &format!("c{i}"));
        store.create_job(&job, "planned", None).await.unwrap();
        ids.push(job.job_id);
        // Creation times differ, so the order is by time.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    store
        .create_job(&job("other", "c0"), "planned", None)
        .await
        .unwrap();
    let key = TableId(vec!["ns".into(), "listed".into()]).key();
    let mut seen = Vec::new();
    let mut token = None;
    let mut pages = 0;
    loop {
        let page = store.list_jobs(&key, 3, token.as_deref()).await.unwrap();
        pages += 1;
        assert!(page.jobs.len() <= 3);
        seen.extend(page.jobs.into_iter().map(|j| j.job_id));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);
    assert_eq!(pages, 3);
    // Every table's jobs, newest first: the other table's job leads.
    let mut recent = Vec::new();
    let mut token = None;
    loop {
        let page = store.list_recent_jobs(2, token.as_deref()).await.unwrap();
        assert!(page.jobs.len() <= 2);
        recent.extend(page.jobs.into_iter().map(|j| j.spec.table_id.key()));
        token = page.next_page_token;
        if token.is_none() {
            break;
        }
    }
    assert_eq!(recent.len(), 8);
    assert_eq!(recent[0], TableId(vec!["ns".into(), "other".into()]).key());
    assert!(recent[1..].iter().all(|k| k == &key));
    // A table listing's token is not a token of the whole listing.
    let first = store.list_jobs(&key, 3, None).await.unwrap();
    let token = first.next_page_token.unwrap();
    assert!(matches!(
        store.list_recent_jobs(3, Some(&token)).await,
        Err(StoreError::BadPageToken)
    ));
}

async fn missing_jobs_and_bad_tokens(adapter: Adapter) {
    let store = adapter.store;
    assert!(store.get_job(&new_job_id()).await.unwrap().is_none());
    let key = TableId(vec!["ns".into(), "t".into()]).key();
    let err = store
        .list_jobs(&key, 10, Some("not-a-token"))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::BadPageToken), "{err:?}");
    assert_eq!(
        store
            .transition(&new_job_id(), JobState::Running, None, None)
            .await
            .unwrap(),
        None
    );
}

/// What the engine writes for a 10,000-fragment job with commit_granularity
/// 1: every fragment staged, committed alone and announced by an event.
/// No record may grow with the job (DynamoDB refuses items over 400 KB).
async fn a_job_of_ten_thousand_fragments_committed_one_by_one(store: Arc<dyn JobStore>) {
    use futures::StreamExt;
    const FRAGMENTS: u64 = 10_000;
    let mut job = job("big", "y");
    job.metrics.set(Counter::FragmentsTotal, FRAGMENTS as i64);
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    let began = std::time::Instant::now();
    futures::stream::iter(0..FRAGMENTS)
        .map(|fragment| {
            let store = store.clone();
            async move {
                let one = staged(fragment, 10);
                assert!(store.stage_fragment(id, &one).await.unwrap());
                store.mark_committed(id, &[one]).await.unwrap();
                store
                    .add_metrics(id, &MetricsDelta::new().add(Counter::CommitsDone, 1))
                    .await
                    .unwrap();
                let event =
                    format!("committed fragments {fragment} (10 rows) as version {fragment}");
                store.add_event(id, &event).await.unwrap();
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsCommitted), FRAGMENTS);
    assert_eq!(metrics.get(Counter::CommitsDone), FRAGMENTS);
    assert_eq!(metrics.fragments_pending_commit(), 0);
    assert_eq!(store.list_events(id, 100).await.unwrap().len(), 100);
    assert!(
        store
            .transition(id, JobState::Done, Some("done"), None)
            .await
            .unwrap()
            .is_some()
    );
    println!(
        "FIGURES ten thousand fragments: staged, committed and announced one by one in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

fn replanned(id: u64, rows: u64, work: bool) -> Replanned {
    Replanned {
        fragment: PlannedFragment {
            id,
            physical_rows: rows,
            at: ReadAt {
                version: Some(9),
                refill: id % 2 == 1,
            },
        },
        tasks: u64::from(work),
        work,
    }
}

/// Fragments added to a job and moved on, each once: staged ones leave
/// the staged list with their file handed back, finished ones stay.
async fn plans_change_once_however_often_recorded(adapter: Adapter) {
    let store = adapter.store;
    let job = job("t", "y");
    store.create_job(&job, "planned", None).await.unwrap();
    let id = job.job_id.as_str();
    store.stage_fragment(id, &staged(0, 100)).await.unwrap();
    store.stage_fragment(id, &staged(1, 100)).await.unwrap();
    store.mark_committed(id, &[staged(1, 100)]).await.unwrap();
    let again = job_fragment(2, 1);
    let change = PlanChange {
        added: vec![
            replanned(7, 300, true),
            replanned(8, 50, false),
            replanned(again, 100, true),
        ],
        moved: vec![0, 1, 2],
    };
    let first = store.change_plan(id, &change).await.unwrap();
    assert_eq!(first.added, vec![7, 8, again]);
    let moved: Vec<u64> = first.moved.iter().map(|(id, _)| *id).collect();
    assert_eq!(moved, vec![0, 2], "the committed fragment stays committed");
    assert_eq!(
        first.moved[0].1,
        Some(staged(0, 100)),
        "its file is handed back"
    );
    assert_eq!(first.moved[1].1, None, "an open fragment had none");
    // Recorded again (a committer that died before moving its watermark).
    let second = store.change_plan(id, &change).await.unwrap();
    assert!(
        second.added.is_empty() && second.moved.is_empty(),
        "{second:?}"
    );
    assert!(store.staged_fragments(id).await.unwrap().is_empty());
    let statuses = store.fragment_statuses(id, &[0, 1, 2, 7]).await.unwrap();
    assert_eq!(statuses[&0], FragmentStatus::Moved);
    assert_eq!(statuses[&1], FragmentStatus::Committed);
    assert_eq!(statuses[&7], FragmentStatus::Open);
    let listed = store.replanned_fragments(id).await.unwrap();
    let ids: Vec<u64> = listed.iter().map(|r| r.fragment.id).collect();
    assert_eq!(ids, vec![7, 8, again]);
    assert_eq!(listed[0], replanned(7, 300, true));
    let metrics = store.get_job(id).await.unwrap().unwrap().metrics;
    assert_eq!(metrics.get(Counter::FragmentsTotal), 4 + 2, "work only");
    assert_eq!(metrics.get(Counter::FragmentsReplanned), 2);
    assert_eq!(metrics.get(Counter::RowsReplanned), 400);
    assert_eq!(metrics.get(Counter::RowsTotal), 400 + 400);
    assert_eq!(metrics.get(Counter::FragmentsMoved), 2);
    assert_eq!(
        metrics.get(Counter::FragmentsStaged),
        1,
        "one staged, one moved"
    );
    assert_eq!(metrics.fragments_pending_commit(), 0);
}

/// A commit is announced only by the lease's holder of an active job; a
/// cancel waits while it stands, and once cancelled no commit is accepted.
async fn a_commit_in_flight_holds_off_a_cancel(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    store.create_job(&first, "planned", None).await.unwrap();
    let id = first.job_id.as_str();
    let ttl = Duration::from_secs(30);
    assert_eq!(
        store.begin_commit(id, "a", ttl).await.unwrap(),
        None,
        "no lease"
    );
    assert!(store.try_lease(id, COMMIT_LEASE, "a", ttl).await.unwrap());
    assert_eq!(
        store.begin_commit(id, "b", ttl).await.unwrap(),
        None,
        "not b's lease"
    );
    let until = store
        .begin_commit(id, "a", ttl)
        .await
        .unwrap()
        .expect("a holds it");
    assert!(until > lance_backfill::model::job::now_millis());
    let refused = store
        .transition(id, JobState::Cancelled, Some("c"), None)
        .await;
    assert!(
        matches!(refused, Err(StoreError::CommitInFlight(_))),
        "{refused:?}"
    );
    assert_eq!(
        store.get_job(id).await.unwrap().unwrap().state,
        JobState::Pending
    );
    store
        .record_commit(id, &[], "committed nothing as version 4", "a")
        .await
        .unwrap();
    let moved = store
        .transition(id, JobState::Cancelled, Some("c"), None)
        .await;
    assert_eq!(moved.unwrap(), Some(JobState::Pending));
    assert_eq!(
        store.begin_commit(id, "a", ttl).await.unwrap(),
        None,
        "a cancelled job publishes nothing"
    );
    // An announcement that was never ended stops holding a cancel once
    // the lease it was made under expires.
    let other = job("t", "z");
    store.create_job(&other, "planned", None).await.unwrap();
    let other_id = other.job_id.as_str();
    let short = Duration::from_millis(300);
    assert!(
        store
            .try_lease(other_id, COMMIT_LEASE, "a", short)
            .await
            .unwrap()
    );
    assert!(
        store
            .begin_commit(other_id, "a", short)
            .await
            .unwrap()
            .is_some()
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    let moved = store
        .transition(other_id, JobState::Cancelled, None, None)
        .await;
    assert_eq!(moved.unwrap(), Some(JobState::Pending));
}

/// A committer whose publication failed ends its announcement: the job
/// can be cancelled at once, without waiting for the lease to lapse.
async fn an_ended_commit_lets_a_cancel_through(adapter: Adapter) {
    let store = adapter.store;
    let first = job("t", "y");
    store.create_job(&first, "planned", None).await.unwrap();
    let id = first.job_id.as_str();
    let ttl = Duration::from_secs(30);
    assert!(store.try_lease(id, COMMIT_LEASE, "a", ttl).await.unwrap());
    assert!(store.begin_commit(id, "a", ttl).await.unwrap().is_some());
    let refused = store.transition(id, JobState::Cancelled, None, None).await;
    assert!(
        matches!(refused, Err(StoreError::CommitInFlight(_))),
        "{refused:?}"
    );
    // Another owner cannot end a's announcement.
    store.end_commit(id, "b").await.unwrap();
    let still = store.transition(id, JobState::Cancelled, None, None).await;
    assert!(
        matches!(still, Err(StoreError::CommitInFlight(_))),
        "{still:?}"
    );
    store.end_commit(id, "a").await.unwrap();
    let moved = store.transition(id, JobState::Cancelled, None, None).await;
    assert_eq!(moved.unwrap(), Some(JobState::Pending));
    let job = store.get_job(id).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    assert_eq!(job.metrics.get(Counter::CommitsDone), 0);
}

/// A maintained column's record: written from revision 0, then only by
/// whoever read its current revision.
async fn watermarks_change_only_from_the_revision_read(adapter: Adapter) {
    let store = adapter.store;
    let (mark, revision) = store.watermark("t", "y").await.unwrap();
    assert_eq!((mark.clone(), revision), (ColumnWatermark::default(), 0));
    let first = ColumnWatermark {
        through_fragment: Some(3),
        through_version: Some(7),
        last_job: Some("j1".into()),
        ..ColumnWatermark::default()
    };
    assert!(store.set_watermark("t", "y", &first, 0).await.unwrap());
    assert!(
        !store.set_watermark("t", "y", &first, 0).await.unwrap(),
        "exists"
    );
    let (read, revision) = store.watermark("t", "y").await.unwrap();
    assert_eq!(read, first);
    let next = ColumnWatermark {
        failures: 2,
        retry_at_ms: 99,
        ..first.clone()
    };
    assert!(
        store
            .set_watermark("t", "y", &next, revision)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_watermark("t", "y", &first, revision)
            .await
            .unwrap(),
        "a stale revision changes nothing"
    );
    assert_eq!(store.watermark("t", "y").await.unwrap().0, next);
    assert_eq!(store.watermark("t", "z").await.unwrap().1, 0, "per column");
}
