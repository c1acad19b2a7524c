//! Committing staged fragments: grouped `DataReplacement` transactions, one
//! committer at a time (the commit lease in the job store), conflicts
//! retried against the latest version, rewritten fragments reported rather
//! than written.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lance::Dataset;
use lance::dataset::CommitBuilder;
use lance::dataset::transaction::{DataReplacementGroup, Operation, Transaction};
use lance::table::format::DataFile;
use tracing::{info, warn};

use crate::job::{Counter, Job, MetricsDelta};
use crate::lifecycle::Lifecycle;
use crate::staging::{delete_data_file, describe_fragments, ids, is_committed, still_aligned};
use crate::store::{COMMIT_LEASE, HeldLease, JobStore, StagedFragment};
use crate::table::Catalog;

/// Our own retries after Lance's (which rebase over compatible commits)
/// give up on a conflict.
pub const MAX_CONFLICT_RETRIES: u32 = 8;
/// Lance's own rebase-and-retry attempts inside one commit call.
const LANCE_COMMIT_RETRIES: u32 = 20;
/// How long Lance may keep retrying one commit call.
const LANCE_COMMIT_TIMEOUT: Duration = Duration::from_secs(60);
/// First wait after a conflict; doubles with each retry.
const CONFLICT_BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The wait stops doubling here (6.4 s): later retries wait no longer, so a
/// busy table is still retried within a task's time.
const CONFLICT_BACKOFF_MAX_DOUBLINGS: u32 = 6;
/// Rounds of "commit what is due, then look again": each round either
/// commits a group, finds nothing due, or loses the lease to another
/// committer, so this bound is never reached by a job that makes progress.
const MAX_COMMIT_ROUNDS: usize = 1000;

/// Publishes a job's staged fragments as table versions.
#[derive(Clone)]
pub struct Committer {
    store: Arc<dyn JobStore>,
    catalog: Arc<Catalog>,
    lifecycle: Lifecycle,
    worker_id: String,
    lease_ttl: Duration,
}

/// What one commit attempt did.
enum Attempt {
    Committed,
    Conflict(lance::Error),
}

/// Whether a running job has a group to commit: `granularity` fragments
/// staged and not committed, or the last ones once every fragment is resolved.
fn commit_due(job: &Job, granularity: u64) -> bool {
    let pending = job.metrics.fragments_pending_commit();
    !job.state.is_terminal()
        && pending > 0
        && (pending >= granularity || job.metrics.all_fragments_resolved())
}

impl Committer {
    pub fn new(
        store: Arc<dyn JobStore>,
        catalog: Arc<Catalog>,
        lifecycle: Lifecycle,
        worker_id: String,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            store,
            catalog,
            lifecycle,
            worker_id,
            lease_ttl,
        }
    }

    /// Commits what is due: a full group of staged fragments, or everything
    /// once every fragment is resolved; ends the job when nothing is left.
    /// Whoever holds the commit lease re-checks after releasing it, so a
    /// fragment staged meanwhile is never left behind.
    pub async fn advance(&self, job: &Job) -> anyhow::Result<()> {
        let owner = format!(
            "{}/commit/{}",
            self.worker_id,
            uuid::Uuid::new_v4().simple()
        );
        let granularity = job.spec.params.commit_granularity.max(1) as u64;
        for _ in 0..MAX_COMMIT_ROUNDS {
            let Some(current) = self.store.get_job(&job.job_id).await? else {
                return Ok(());
            };
            if current.state.is_terminal() {
                return Ok(());
            }
            let metrics = &current.metrics;
            let pending = metrics.fragments_pending_commit();
            let resolved = metrics.all_fragments_resolved();
            if pending == 0 {
                if resolved && metrics.fragments_finished() >= metrics.get(Counter::FragmentsTotal)
                {
                    self.lifecycle.finish(&current).await?;
                }
                return Ok(());
            }
            if pending < granularity && !resolved {
                return Ok(());
            }
            let Some(lease) = HeldLease::acquire(
                &self.store,
                &job.job_id,
                COMMIT_LEASE,
                &owner,
                self.lease_ttl,
            )
            .await?
            else {
                return Ok(());
            };
            // Another committer may have committed some of them between our
            // look and the lease: look again, so a group is not cut short.
            let result = match self.store.get_job(&job.job_id).await {
                Ok(Some(now)) if commit_due(&now, granularity) => self.commit_staged(&now).await,
                Ok(_) => {
                    lease.release().await;
                    return Ok(());
                }
                Err(err) => Err(err.into()),
            };
            lease.release().await;
            result?;
        }
        Ok(())
    }

    async fn commit_staged(&self, job: &Job) -> anyhow::Result<()> {
        let staged = self.store.staged_fragments(&job.job_id).await?;
        if staged.is_empty() {
            return Ok(());
        }
        let pinned = job.spec.read_dataset(&self.catalog).await?;
        let mut conflicts = 0;
        loop {
            // From the job's open read version: resolving the latest version
            // reuses its store and session, and its manifest when nothing
            // was committed since.
            let mut latest = Dataset::clone(&pinned);
            latest
                .checkout_latest()
                .await
                .context("opening the latest version")?;
            let rest = self.record_found_committed(job, &latest, &staged).await?;
            let (ready, rewritten): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|s| still_aligned(&latest, s));
            if !ready.is_empty() {
                match self.commit_ready(job, latest, &ready).await? {
                    Attempt::Committed => {}
                    Attempt::Conflict(err) if conflicts < MAX_CONFLICT_RETRIES => {
                        conflicts += 1;
                        self.note_conflict(job, conflicts, &err).await?;
                        continue;
                    }
                    Attempt::Conflict(err) => {
                        return Err(anyhow::Error::new(err).context("committing DataReplacement"));
                    }
                }
            }
            if !rewritten.is_empty() {
                self.report_rewritten(job, &pinned, &rewritten).await;
            }
            return Ok(());
        }
    }

    /// Records staged files the latest version already holds (a committer
    /// died after committing them) and returns the others.
    async fn record_found_committed(
        &self,
        job: &Job,
        latest: &Dataset,
        staged: &[StagedFragment],
    ) -> anyhow::Result<Vec<StagedFragment>> {
        let (done, rest): (Vec<_>, Vec<_>) = staged
            .iter()
            .cloned()
            .partition(|s| is_committed(latest, s));
        if !done.is_empty() {
            self.store.mark_committed(&job.job_id, &done).await?;
            info!(fragments = %describe_fragments(&ids(&done)), "found already committed");
        }
        Ok(rest)
    }

    /// One `DataReplacement` of the ready fragments on top of `latest`.
    async fn commit_ready(
        &self,
        job: &Job,
        latest: Dataset,
        ready: &[StagedFragment],
    ) -> anyhow::Result<Attempt> {
        let replacements = ready
            .iter()
            .map(|s| {
                let file: DataFile = serde_json::from_value(s.data_file.clone())
                    .context("staged data file record")?;
                Ok(DataReplacementGroup(s.fragment_id, file))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        // The read version, not the latest: Lance then checks every commit
        // since the rows were read for conflicts.
        let transaction = Transaction::new(
            job.spec.read_version,
            Operation::DataReplacement { replacements },
            None,
        );
        let committed = CommitBuilder::new(Arc::new(latest))
            .with_max_retries(LANCE_COMMIT_RETRIES)
            .with_retry_timeout(LANCE_COMMIT_TIMEOUT)
            .execute(transaction)
            .await;
        let dataset = match committed {
            Ok(dataset) => dataset,
            Err(err) if is_conflict(&err) => return Ok(Attempt::Conflict(err)),
            Err(err) => return Err(anyhow::Error::new(err).context("committing DataReplacement")),
        };
        self.record_commit(job, dataset.version().version, ready)
            .await?;
        Ok(Attempt::Committed)
    }

    /// The fragments committed, the commit counted and its event, together.
    async fn record_commit(
        &self,
        job: &Job,
        version: u64,
        ready: &[StagedFragment],
    ) -> anyhow::Result<()> {
        let rows: u64 = ready.iter().map(|s| s.rows).sum();
        let fragments = describe_fragments(&ids(ready));
        let event = format!("committed fragments {fragments} ({rows} rows) as version {version}");
        self.store.record_commit(&job.job_id, ready, &event).await?;
        info!(%fragments, version, rows, "committed");
        Ok(())
    }

    async fn note_conflict(
        &self,
        job: &Job,
        attempt: u32,
        err: &lance::Error,
    ) -> anyhow::Result<()> {
        warn!(attempt, error = %crate::error::first_line(err), "commit conflict, retrying");
        self.store
            .add_metrics(
                &job.job_id,
                &MetricsDelta::new().add(Counter::ConflictRetries, 1),
            )
            .await?;
        tokio::time::sleep(
            CONFLICT_BACKOFF_BASE * (1 << attempt.min(CONFLICT_BACKOFF_MAX_DOUBLINGS)),
        )
        .await;
        Ok(())
    }

    /// Fragments rewritten since the read version are never written: their
    /// files are removed and the job fails naming them.
    async fn report_rewritten(&self, job: &Job, pinned: &Dataset, rewritten: &[StagedFragment]) {
        for staged in rewritten {
            delete_data_file(pinned, staged).await;
        }
        let fragments = describe_fragments(&ids(rewritten));
        self.lifecycle
            .fail(
                &job.job_id,
                &format!(
                    "fragments {fragments} were rewritten (compaction or an update) after read version {}; \
                     their new values were not committed, so no row got a value meant for another; \
                     the other fragments are committed: submit the backfill again to fill the rest",
                    job.spec.read_version
                ),
            )
            .await;
    }
}

fn is_conflict(err: &lance::Error) -> bool {
    matches!(
        err,
        lance::Error::CommitConflict { .. }
            | lance::Error::RetryableCommitConflict { .. }
            | lance::Error::TooMuchWriteContention { .. }
            | lance::Error::IncompatibleTransaction { .. }
    )
}
