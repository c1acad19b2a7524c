//! A job's life: creating it, starting it, failing it, finishing it,
//! pausing, resuming and cancelling it, and removing what a stopped job
//! left behind. The only code that changes a job's state: the submitter,
//! workers, the committer and the API all go through here, and each change
//! is published to the process's event sinks from here.

use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use tracing::{info, warn};

use crate::model::job::{Counter, Job, JobState, published_version};
use crate::model::plan::{self, PlannedFragment};
use crate::model::table::Catalog;
use crate::ports::events::{JobChange, JobNotice, Publisher};
use crate::ports::queue::{Message, Outgoing, QueueSet};
use crate::ports::store::{
    COMMIT_LEASE, CreateOutcome, HeldLease, IdempotencyClaim, JobStore, StoreError, StoreResult,
};
use crate::run::checkpoint::{self, checkpoints_root};
use crate::run::staging::{delete_data_file, is_committed};

/// Fragments whose leftover checkpoints are removed at once when a job ends.
const SWEEP_PARALLELISM: usize = 16;
/// How long a cancellation waits for a commit being published (a commit
/// lasts at most its lease, a minute by default; most take milliseconds).
pub const CANCEL_WAIT: Duration = Duration::from_secs(20);
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// Events read to find a DONE job's published version (its last commit's).
const EVENTS_READ: usize = 100;

#[derive(Clone)]
pub struct Lifecycle {
    store: Arc<dyn JobStore>,
    queues: QueueSet,
    catalog: Arc<Catalog>,
    publisher: Publisher,
}

/// One change of a job's state, as the store records it.
struct Move<'a> {
    to: JobState,
    change: JobChange,
    event: &'a str,
    error: Option<&'a str>,
}

impl<'a> Move<'a> {
    fn new(to: JobState, event: &'a str) -> Self {
        Self {
            to,
            change: JobChange::of(to),
            event,
            error: None,
        }
    }
}

/// How removing a stopped job's staged files went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cleanup {
    Done,
    /// The commit lease is held (a committer still at work): try later.
    Busy,
}

impl Lifecycle {
    pub fn new(
        store: Arc<dyn JobStore>,
        queues: QueueSet,
        catalog: Arc<Catalog>,
        publisher: Publisher,
    ) -> Self {
        Self {
            store,
            queues,
            catalog,
            publisher,
        }
    }

    /// Records a new job (PENDING) with its first event; publishes
    /// SUBMITTED when this call created it.
    pub async fn create(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        let outcome = self.store.create_job(job, event, idempotency).await?;
        if outcome == CreateOutcome::Created && !self.publisher.is_empty() {
            let notice = JobNotice::new(JobChange::Submitted, job, None);
            self.publisher.publish(&notice).await;
        }
        Ok(outcome)
    }

    /// Marks a PENDING job RUNNING: its first task started on `worker`.
    pub async fn start_running(&self, job: &Job, worker: &str) -> StoreResult<()> {
        if job.state == JobState::Pending {
            let event = format!("running: first task started on {worker}");
            self.apply(&job.job_id, Move::new(JobState::Running, &event))
                .await?;
        }
        Ok(())
    }

    /// Ends a job that has nothing to fill: DONE at once.
    pub async fn done_when_empty(&self, job_id: &str) -> StoreResult<()> {
        let event = "done: no fragment to fill";
        self.apply(job_id, Move::new(JobState::Done, event)).await?;
        Ok(())
    }

    /// Records the move and publishes it; returns the state the job left,
    /// or `None` when the move was not allowed.
    async fn apply(&self, job_id: &str, change: Move<'_>) -> StoreResult<Option<JobState>> {
        let moved = self
            .store
            .transition(job_id, change.to, Some(change.event), change.error)
            .await?;
        if moved.is_some() {
            self.publish(job_id, change.change).await;
        }
        Ok(moved)
    }

    /// Publishes a change of the job, read back after it.
    async fn publish(&self, job_id: &str, change: JobChange) {
        if self.publisher.is_empty() {
            return;
        }
        let job = match self.store.get_job(job_id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(err) => {
                warn!(%job_id, error = %err, "could not read the job to publish its change");
                return;
            }
        };
        let published = match change {
            JobChange::Done => match self.store.list_events(job_id, EVENTS_READ).await {
                Ok(events) => published_version(&events),
                Err(err) => {
                    warn!(%job_id, error = %err, "could not read the job's events");
                    None
                }
            },
            _ => None,
        };
        let notice = JobNotice::new(change, &job, published);
        self.publisher.publish(&notice).await;
    }

    /// Marks the job FAILED (once) and queues the removal of its staged files.
    /// The job keeps a scrubbed reason; the log keeps the whole of it.
    pub async fn fail(&self, job_id: &str, reason: &str) {
        warn!(job_id, %reason, "job failed");
        let reason = &crate::model::error::scrub(reason);
        let event = format!("failed: {reason}");
        let failed = Move {
            error: Some(reason),
            ..Move::new(JobState::Failed, &event)
        };
        let moved = self.apply(job_id, failed).await;
        match moved {
            Ok(Some(_)) => {
                if let Ok(Some(job)) = self.store.get_job(job_id).await {
                    self.queue_cleanup(&job).await;
                }
            }
            Ok(None) => {}
            Err(err) => warn!(job_id, error = %format!("{err:#}"), "could not mark job failed"),
        }
    }

    /// Marks the job CANCELLED; returns the state it left, or `None` when it
    /// had already ended. Staged files are then removed by a worker. A
    /// commit being published is waited for (at most
    /// [`CANCEL_WAIT`]): once the cancel is answered, the job publishes
    /// nothing more.
    pub async fn cancel(&self, job: &Job, by: &str) -> StoreResult<Option<JobState>> {
        let event = format!("cancelled by {by}");
        let started = tokio::time::Instant::now();
        let moved = loop {
            match self
                .apply(&job.job_id, Move::new(JobState::Cancelled, &event))
                .await
            {
                Err(StoreError::CommitInFlight(_)) if started.elapsed() < CANCEL_WAIT => {
                    tokio::time::sleep(CANCEL_POLL).await;
                }
                other => break other?,
            }
        };
        if moved.is_some() {
            self.queue_cleanup(job).await;
        }
        Ok(moved)
    }

    /// Marks the job PAUSED: its tasks stop at their next look at the job
    /// (checkpointing what they computed) and wait in the queue; commits of
    /// fragments already written go on. Returns the state it left, or
    /// `None` when it is not PENDING or RUNNING.
    pub async fn pause(&self, job: &Job, by: &str) -> StoreResult<Option<JobState>> {
        let event = format!("paused by {by}");
        self.apply(&job.job_id, Move::new(JobState::Paused, &event))
            .await
    }

    /// Moves a PAUSED job back to PENDING: its waiting tasks carry on from
    /// their checkpoints when they next come round, and the first to start
    /// makes it RUNNING. `None` when it was not paused.
    pub async fn resume(&self, job: &Job, by: &str) -> StoreResult<Option<JobState>> {
        let event = format!("resumed by {by}");
        let resumed = Move {
            change: JobChange::Resumed,
            ..Move::new(JobState::Pending, &event)
        };
        self.apply(&job.job_id, resumed).await
    }

    /// Queues the removal of the job's staged, uncommitted files.
    pub async fn queue_cleanup(&self, job: &Job) {
        let Some(queue) = self.queues.for_cluster(job.spec.params.cluster.as_deref()) else {
            return;
        };
        let message = Outgoing::message(&Message::cleanup(&job.job_id));
        if let Err(err) = queue.send_many(vec![message]).await {
            warn!(job_id = %job.job_id, error = %format!("{err:#}"), "could not queue cleanup");
        }
    }

    /// Ends a job whose every fragment is committed or skipped: sweeps the
    /// checkpoints a crash may have left, then marks it DONE.
    pub async fn finish(&self, job: &Job) -> anyhow::Result<()> {
        let metrics = &job.metrics;
        // The versions are in the "committed ... as version" events.
        let message = format!(
            "done: {} fragments committed in {} commits, {} unchanged",
            metrics.get(Counter::FragmentsCommitted),
            metrics.get(Counter::CommitsDone),
            metrics.get(Counter::FragmentsSkipped),
        );
        // Sweep first: a process killed after the sweep repeats it when its
        // message comes back; one killed after DONE would leave them forever.
        self.sweep_checkpoints(job).await?;
        self.sweep_strays(job).await;
        if self
            .apply(&job.job_id, Move::new(JobState::Done, &message))
            .await?
            .is_some()
        {
            info!(job_id = %job.job_id, "{message}");
        }
        Ok(())
    }

    /// Removes the data files of the job that a crash left unrecorded (best
    /// effort: what is left is garbage no version holds, which Lance's own
    /// cleanup removes in time).
    async fn sweep_strays(&self, job: &Job) {
        if let Err(err) = crate::run::strays::sweep(&self.catalog, job).await {
            warn!(job_id = %job.job_id, error = %format!("{err:#}"), "could not look for the job's stray files");
        }
    }

    /// Removes checkpoints of the job's fragments that a crash left behind
    /// (normally they are removed as each fragment is staged), those
    /// planned at submission and those planned since.
    async fn sweep_checkpoints(&self, job: &Job) -> anyhow::Result<()> {
        let dataset = job.spec.read_dataset(&self.catalog).await?;
        let store = dataset.object_store(None).await?;
        let leftovers: Vec<_> = store
            .list(Some(checkpoints_root(&dataset)))
            .try_collect()
            .await?;
        if leftovers.is_empty() {
            return Ok(());
        }
        let mut fragments = plan::fragments(&dataset, job.spec.selection()).await?;
        fragments.extend(
            self.store
                .replanned_fragments(&job.job_id)
                .await?
                .into_iter()
                .filter(|r| r.work)
                .map(|r| r.fragment),
        );
        futures::stream::iter(fragments)
            .map(|planned| self.clear_checkpoints(job, planned))
            .buffer_unordered(SWEEP_PARALLELISM)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Removes one fragment's checkpoints, at the version it is read at.
    async fn clear_checkpoints(&self, job: &Job, planned: PlannedFragment) -> anyhow::Result<()> {
        let spec = &job.spec;
        let version = planned.at.version_or(spec.read_version);
        let dataset = self
            .catalog
            .at_version(&spec.table_uri, spec.branch.as_deref(), version)
            .await?;
        checkpoint::clear_fragment(spec, &dataset, &planned).await
    }

    /// Removes the staged files of a job that stopped (cancelled or failed),
    /// under the commit lease so no committer publishes one meanwhile.
    pub async fn cleanup(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> anyhow::Result<Cleanup> {
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Cleanup::Done);
        };
        if !matches!(job.state, JobState::Cancelled | JobState::Failed) {
            return Ok(Cleanup::Done);
        }
        let Some(lease) =
            HeldLease::acquire(self.store.clone(), job_id, COMMIT_LEASE, owner, ttl).await?
        else {
            return Ok(Cleanup::Busy);
        };
        let result = self.remove_uncommitted(&job).await;
        if result.is_ok() {
            self.sweep_strays(&job).await;
        }
        lease.release().await;
        result?;
        Ok(Cleanup::Done)
    }

    async fn remove_uncommitted(&self, job: &Job) -> anyhow::Result<()> {
        let job_id = job.job_id.as_str();
        let dataset = job.spec.read_dataset(&self.catalog).await?;
        let latest = self
            .catalog
            .latest(&job.spec.table_uri, job.spec.branch.as_deref())
            .await?;
        let staged = self.store.staged_fragments(job_id).await?;
        let (committed, uncommitted): (Vec<_>, Vec<_>) =
            staged.into_iter().partition(|s| is_committed(&latest, s));
        if !committed.is_empty() {
            self.store.mark_committed(job_id, &committed).await?;
        }
        for staged in &uncommitted {
            delete_data_file(&dataset, staged).await;
        }
        if !uncommitted.is_empty() {
            self.store
                .add_event(
                    job_id,
                    &format!(
                        "removed {} staged, uncommitted fragment files",
                        uncommitted.len()
                    ),
                )
                .await?;
        }
        Ok(())
    }
}
