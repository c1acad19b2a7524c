//! Committing staged fragments: grouped `DataReplacement` transactions, one
//! committer at a time (the commit lease in the job store). Before each
//! commit the job is reconciled with the latest version of its table
//! ([`crate::run::live`]): what moved is planned again, and the staged files
//! still aligned with their fragments are committed on top of the latest
//! version. Each publication is announced to the job store first
//! ([`JobStore::begin_commit`]), so a job cancelled, or a committer whose
//! lease lapsed, publishes nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use lance::Dataset;
use lance::dataset::CommitBuilder;
use lance::dataset::transaction::{DataReplacementGroup, Operation, Transaction};
use lance::table::format::DataFile;
use tracing::{info, warn};

use crate::model::job::{Counter, Job, MetricsDelta, now_millis};
use crate::model::table::Catalog;
use crate::ports::store::{COMMIT_LEASE, HeldLease, JobStore, StagedFragment};
use crate::run::lifecycle::Lifecycle;
use crate::run::live::{Reconciled, Reconciler};
use crate::run::staging::{describe_fragments, ids, is_committed, still_aligned};

/// Our own retries after Lance's (which rebase over compatible commits)
/// give up on a conflict: each reconciles the job with the table again.
pub const MAX_CONFLICT_RETRIES: u32 = 8;
/// Lance's own rebase-and-retry attempts inside one commit call.
const LANCE_COMMIT_RETRIES: u32 = 20;
/// A publication must end this long before the commit lease it was
/// announced under expires.
const PUBLISH_MARGIN: Duration = Duration::from_millis(100);
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
    reconciler: Reconciler,
    worker_id: String,
    lease_ttl: Duration,
}

/// What one commit attempt did.
enum Attempt {
    Committed,
    Conflict(lance::Error),
    /// The job store refused the publication (the job ended, or the lease
    /// was lost): nothing was published.
    Refused,
}

/// What a round under the commit lease did.
enum Round {
    /// Committed a group: look again.
    Again,
    Stop,
}

/// Whether a running job has a group to commit: `granularity` fragments
/// staged and not committed, or the last ones once every fragment is resolved.
fn commit_due(job: &Job, granularity: u64) -> bool {
    let pending = job.metrics.fragments_pending_commit();
    !job.state.is_terminal()
        && pending > 0
        && (pending >= granularity || job.metrics.all_fragments_resolved())
}

/// Whether every fragment of a running job is committed, skipped or moved on.
fn finished(job: &Job) -> bool {
    let metrics = &job.metrics;
    !job.state.is_terminal()
        && metrics.fragments_pending_commit() == 0
        && metrics.all_fragments_resolved()
        && metrics.fragments_finished() >= metrics.get(Counter::FragmentsTotal)
}

impl Committer {
    pub fn new(
        store: Arc<dyn JobStore>,
        catalog: Arc<Catalog>,
        lifecycle: Lifecycle,
        reconciler: Reconciler,
        worker_id: String,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            store,
            catalog,
            lifecycle,
            reconciler,
            worker_id,
            lease_ttl,
        }
    }

    /// Commits what is due: a full group of staged fragments, or everything
    /// once every fragment is resolved; ends the job when nothing is left
    /// and the table has not moved rows of the job meanwhile. Whoever holds
    /// the commit lease re-checks after releasing it, so a fragment staged
    /// meanwhile is never left behind.
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
            if !commit_due(&current, granularity) && !finished(&current) {
                return Ok(());
            }
            let Some(lease) = HeldLease::acquire(
                self.store.clone(),
                &job.job_id,
                COMMIT_LEASE,
                &owner,
                self.lease_ttl,
            )
            .await?
            else {
                return Ok(());
            };
            let round = self.under_lease(&job.job_id, granularity, &owner).await;
            lease.release().await;
            match round? {
                Round::Again => continue,
                Round::Stop => return Ok(()),
            }
        }
        Ok(())
    }

    /// With the lease: the job reconciled with its table, then a group
    /// committed, or the job finished.
    async fn under_lease(
        &self,
        job_id: &str,
        granularity: u64,
        owner: &str,
    ) -> anyhow::Result<Round> {
        // Another committer may have committed some between our look and
        // the lease: look again, so a group is not cut short.
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Round::Stop);
        };
        if !commit_due(&job, granularity) && !finished(&job) {
            return Ok(Round::Stop);
        }
        let Some(latest) = self.reconciled(&job).await? else {
            return Ok(Round::Stop);
        };
        // Reconciling may have moved fragments or planned new ones.
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Round::Stop);
        };
        if commit_due(&job, granularity) {
            self.commit_staged(&job, latest, owner).await?;
            return Ok(Round::Again);
        }
        if finished(&job) {
            self.lifecycle.finish(&job).await?;
        }
        Ok(Round::Stop)
    }

    /// The latest version once the job's plan matches it; `None` when the
    /// table changed in a way the job cannot follow (it is failed).
    async fn reconciled(&self, job: &Job) -> anyhow::Result<Option<Arc<Dataset>>> {
        match self.reconciler.reconcile(job).await? {
            Reconciled::Current(latest) => Ok(Some(latest)),
            Reconciled::Failed(reason) => {
                self.lifecycle.fail(&job.job_id, &reason).await;
                Ok(None)
            }
        }
    }

    async fn commit_staged(
        &self,
        job: &Job,
        mut latest: Arc<Dataset>,
        owner: &str,
    ) -> anyhow::Result<()> {
        let mut conflicts = 0;
        loop {
            let staged = self.store.staged_fragments(&job.job_id).await?;
            let rest = self.record_found_committed(job, &latest, &staged).await?;
            let ready = self.aligned(job, &latest, rest).await?;
            if ready.is_empty() {
                return Ok(());
            }
            match self.commit_ready(job, &latest, &ready, owner).await? {
                Attempt::Committed | Attempt::Refused => return Ok(()),
                Attempt::Conflict(err) if conflicts < MAX_CONFLICT_RETRIES => {
                    conflicts += 1;
                    self.note_conflict(job, conflicts, &err).await?;
                    let now = self.store.get_job(&job.job_id).await?;
                    let Some(now) = now.filter(|j| !j.state.is_terminal()) else {
                        return Ok(());
                    };
                    let Some(reconciled) = self.reconciled(&now).await? else {
                        return Ok(());
                    };
                    latest = reconciled;
                }
                Attempt::Conflict(err) => {
                    return Err(anyhow::Error::new(err).context("committing DataReplacement"));
                }
            }
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

    /// The staged files still aligned with their fragments in `latest`.
    /// Reconciling has moved every fragment the table's changes touched,
    /// so a file out of line here is a change the job could not follow:
    /// the job fails rather than commit values onto other rows.
    async fn aligned(
        &self,
        job: &Job,
        latest: &Dataset,
        staged: Vec<StagedFragment>,
    ) -> anyhow::Result<Vec<StagedFragment>> {
        let mut bases: HashMap<u64, Arc<Dataset>> = HashMap::new();
        let mut ready = Vec::with_capacity(staged.len());
        for fragment in staged {
            let version = fragment.version.unwrap_or(job.spec.read_version);
            let base = match bases.get(&version) {
                Some(base) => base.clone(),
                None => {
                    let spec = &job.spec;
                    let base = self
                        .catalog
                        .at_version(&spec.table_uri, spec.branch.as_deref(), version)
                        .await?;
                    bases.insert(version, base.clone());
                    base
                }
            };
            if !still_aligned(latest, &base, &fragment) {
                let reason = format!(
                    "fragment {} changed at version {} in a way the job could not follow; its \
                     values were not committed: submit the backfill again",
                    fragment.lance_id(),
                    latest.manifest().version
                );
                self.lifecycle.fail(&job.job_id, &reason).await;
                return Ok(Vec::new());
            }
            ready.push(fragment);
        }
        Ok(ready)
    }

    /// One `DataReplacement` of the ready fragments on top of `latest`,
    /// published only under a commit the job store accepted.
    async fn commit_ready(
        &self,
        job: &Job,
        latest: &Arc<Dataset>,
        ready: &[StagedFragment],
        owner: &str,
    ) -> anyhow::Result<Attempt> {
        let transaction = data_replacement(latest.manifest().version, ready)?;
        let Some(until) = self
            .store
            .begin_commit(&job.job_id, owner, self.lease_ttl)
            .await?
        else {
            info!("commit refused: the job ended or the commit lease was lost");
            return Ok(Attempt::Refused);
        };
        let window = Duration::from_millis((until - now_millis()).max(0) as u64)
            .saturating_sub(PUBLISH_MARGIN);
        let commit = CommitBuilder::new(latest.clone())
            .with_max_retries(LANCE_COMMIT_RETRIES)
            .with_retry_timeout(window)
            .execute(transaction);
        let committed = match tokio::time::timeout(window, commit).await {
            Ok(committed) => committed,
            // It may still land: the announcement stands until the lease
            // it was made under expires, and the next look finds it.
            Err(_) => anyhow::bail!("publishing the commit took longer than its commit lease"),
        };
        let dataset = match committed {
            Ok(dataset) => dataset,
            Err(err) => {
                self.store.end_commit(&job.job_id, owner).await?;
                if is_conflict(&err) {
                    return Ok(Attempt::Conflict(err));
                }
                return Err(anyhow::Error::new(err).context("committing DataReplacement"));
            }
        };
        self.record_commit(job, dataset.manifest().version, ready, owner)
            .await?;
        Ok(Attempt::Committed)
    }

    /// The fragments committed, the commit counted and its event, together.
    async fn record_commit(
        &self,
        job: &Job,
        version: u64,
        ready: &[StagedFragment],
        owner: &str,
    ) -> anyhow::Result<()> {
        let rows: u64 = ready.iter().map(|s| s.rows).sum();
        let lance_ids: Vec<u64> = ready.iter().map(StagedFragment::lance_id).collect();
        let fragments = describe_fragments(&lance_ids);
        let event = format!("committed fragments {fragments} ({rows} rows) as version {version}");
        self.store
            .record_commit(&job.job_id, ready, &event, owner)
            .await?;
        let foreign = job.metrics.get(Counter::ForeignVersion);
        let read = job.spec.read_version;
        if ready.iter().any(|s| s.version.unwrap_or(read) < foreign) {
            let delta = MetricsDelta::new().add(Counter::CommitsRebased, 1);
            self.store.add_metrics(&job.job_id, &delta).await?;
        }
        info!(%fragments, version, rows, "committed");
        Ok(())
    }

    async fn note_conflict(
        &self,
        job: &Job,
        attempt: u32,
        err: &lance::Error,
    ) -> anyhow::Result<()> {
        warn!(attempt, error = %crate::model::error::first_line(err), "commit conflict, reconciling and retrying");
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
}

/// The replacement of the staged fragments' files, read at `version`: the
/// job's own check of the versions before it (reconciling) replaces
/// Lance's, which would refuse a group read at an older version after any
/// compaction, update or new column anywhere in its fragments.
fn data_replacement(version: u64, ready: &[StagedFragment]) -> anyhow::Result<Transaction> {
    let replacements = ready
        .iter()
        .map(|s| {
            let file: DataFile =
                serde_json::from_value(s.data_file.clone()).context("staged data file record")?;
            Ok(DataReplacementGroup(s.lance_id(), file))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Transaction::new(
        version,
        Operation::DataReplacement { replacements },
        None,
    ))
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
