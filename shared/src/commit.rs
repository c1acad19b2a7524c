//! Committing staged fragments: grouped `DataReplacement` transactions, one
//! committer at a time (a lease in the job store), conflicts retried against
//! the latest version, rewritten fragments reported rather than written.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use futures::{StreamExt, TryStreamExt};
use lance::Dataset;
use lance::dataset::CommitBuilder;
use lance::dataset::transaction::{DataReplacementGroup, Operation, Transaction};
use lance::table::format::DataFile;
use tracing::{info, warn};

use crate::engine::checkpoint::{FragmentCheckpoints, checkpoints_root};
use crate::engine::{Engine, HeldLease, delete_data_file};
use crate::job::{Counter, Job, JobState, MetricsDelta};
use crate::store::StagedFragment;

pub const COMMIT_LEASE: &str = "commit";
/// Our own retries after Lance's (which rebase over compatible commits)
/// give up on a conflict.
pub const MAX_CONFLICT_RETRIES: u32 = 8;
const LANCE_COMMIT_RETRIES: u32 = 20;

/// Whether the latest version already holds the staged file (a committer
/// died after committing but before recording it).
pub fn is_committed(latest: &Dataset, staged: &StagedFragment) -> bool {
    let Some(path) = staged.data_file.get("path").and_then(|p| p.as_str()) else {
        return false;
    };
    latest
        .get_fragment(staged.fragment_id as usize)
        .is_some_and(|f| f.metadata().files.iter().any(|file| file.path == path))
}

/// A fragment keeps its id and row count unless it was rewritten
/// (compaction, or an update that moved its rows).
fn still_aligned(latest: &Dataset, staged: &StagedFragment) -> bool {
    latest
        .get_fragment(staged.fragment_id as usize)
        .is_some_and(|f| f.metadata().physical_rows.map(|r| r as u64) == Some(staged.rows))
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

/// "0-3, 7, 9-10"
pub fn describe_fragments(ids: &[u64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

impl Engine {
    /// Commits what is due: a full group of staged fragments, or everything
    /// once every fragment is resolved; ends the job when nothing is left.
    /// Whoever holds the commit lease re-checks after releasing it, so a
    /// fragment staged meanwhile is never left behind.
    pub(crate) async fn advance_commits(&self, job: &Job) -> anyhow::Result<()> {
        let owner = format!(
            "{}/commit/{}",
            self.config.worker_id,
            uuid::Uuid::new_v4().simple()
        );
        let granularity = job.spec.params.commit_granularity.max(1) as u64;
        for _ in 0..1000 {
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
                    self.finish_job(&current).await?;
                }
                return Ok(());
            }
            if pending < granularity && !resolved {
                return Ok(());
            }
            if !self
                .store
                .try_lease(&job.job_id, COMMIT_LEASE, &owner, self.config.lease_ttl)
                .await?
            {
                return Ok(());
            }
            let lease = HeldLease::start(
                self.store.clone(),
                job.job_id.clone(),
                COMMIT_LEASE.to_string(),
                owner.clone(),
                self.config.lease_ttl,
            );
            let result = self.commit_staged(&current).await;
            lease.release(self.store.as_ref(), &job.job_id).await;
            result?;
        }
        Ok(())
    }

    async fn commit_staged(&self, job: &Job) -> anyhow::Result<()> {
        let job_id = job.job_id.as_str();
        let staged = self.store.staged_fragments(job_id).await?;
        if staged.is_empty() {
            return Ok(());
        }
        let mut conflicts = 0;
        let pinned = self.read_dataset(job).await?;
        loop {
            // From the job's open read version: resolving the latest version
            // reuses its store and session, and its manifest when nothing
            // was committed since.
            let mut latest = Dataset::clone(&pinned);
            latest
                .checkout_latest()
                .await
                .context("opening the latest version")?;
            let (done, rest): (Vec<_>, Vec<_>) = staged
                .iter()
                .cloned()
                .partition(|s| is_committed(&latest, s));
            if !done.is_empty() {
                // Committed by a committer that died before recording it.
                self.store.mark_committed(job_id, &done).await?;
                info!(fragments = %describe_fragments(&ids(&done)), "found already committed");
            }
            let (ready, rewritten): (Vec<_>, Vec<_>) =
                rest.into_iter().partition(|s| still_aligned(&latest, s));
            if !ready.is_empty() {
                let replacements = ready
                    .iter()
                    .map(|s| {
                        let file: DataFile = serde_json::from_value(s.data_file.clone())
                            .context("staged data file record")?;
                        Ok(DataReplacementGroup(s.fragment_id, file))
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                // The read version, not the latest: Lance then checks every
                // commit since the rows were read for conflicts.
                let transaction = Transaction::new(
                    job.spec.read_version,
                    Operation::DataReplacement { replacements },
                    None,
                );
                let committed = CommitBuilder::new(Arc::new(latest))
                    .with_max_retries(LANCE_COMMIT_RETRIES)
                    .with_retry_timeout(Duration::from_secs(60))
                    .execute(transaction)
                    .await;
                match committed {
                    Ok(dataset) => {
                        let version = dataset.version().version;
                        self.store.mark_committed(job_id, &ready).await?;
                        let rows: u64 = ready.iter().map(|s| s.rows).sum();
                        self.store
                            .add_metrics(job_id, &MetricsDelta::new().add(Counter::CommitsDone, 1))
                            .await?;
                        let fragments = describe_fragments(&ids(&ready));
                        info!(%fragments, version, rows, "committed");
                        self.store
                            .add_event(
                                job_id,
                                &format!("committed fragments {fragments} ({rows} rows) as version {version}"),
                            )
                            .await?;
                    }
                    Err(err) if is_conflict(&err) && conflicts < MAX_CONFLICT_RETRIES => {
                        conflicts += 1;
                        warn!(attempt = conflicts, error = %crate::error::first_line(&err), "commit conflict, retrying");
                        self.store
                            .add_metrics(
                                job_id,
                                &MetricsDelta::new().add(Counter::ConflictRetries, 1),
                            )
                            .await?;
                        tokio::time::sleep(Duration::from_millis(100 << conflicts.min(6))).await;
                        continue;
                    }
                    Err(err) => {
                        return Err(anyhow::Error::new(err).context("committing DataReplacement"));
                    }
                }
            }
            if !rewritten.is_empty() {
                for staged in &rewritten {
                    delete_data_file(&pinned, staged).await;
                }
                let fragments = describe_fragments(&ids(&rewritten));
                self.fail_job(
                    job_id,
                    &format!(
                        "fragments {fragments} were rewritten (compaction or an update) after read version {}; \
                         their new values were not committed, so no row got a value meant for another; \
                         the other fragments are committed: submit the backfill again to fill the rest",
                        job.spec.read_version
                    ),
                )
                .await;
            }
            return Ok(());
        }
    }

    async fn finish_job(&self, job: &Job) -> anyhow::Result<()> {
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
        if self
            .store
            .transition(&job.job_id, JobState::Done, Some(&message), None)
            .await?
            .is_some()
        {
            info!(job_id = %job.job_id, "{message}");
        }
        Ok(())
    }

    /// Removes checkpoints of the job's fragments that a crash left behind
    /// (normally they are removed as each fragment is staged), for example
    /// when a process died half-way through removing them.
    async fn sweep_checkpoints(&self, job: &Job) -> anyhow::Result<()> {
        let dataset = self.read_dataset(job).await?;
        let program = self.program(job, &dataset)?;
        let store = dataset.object_store(None).await?;
        let root = checkpoints_root(&dataset);
        let leftovers: Vec<_> = store.list(Some(root)).try_collect().await?;
        if leftovers.is_empty() {
            return Ok(());
        }
        let fragments = crate::plan::fragments(&dataset, job.spec.params.num_frags).await?;
        futures::stream::iter(fragments)
            .map(|planned| {
                let dataset = dataset.clone();
                let program = program.clone();
                async move {
                    if let Some(fragment) = dataset.get_fragment(planned.id as usize) {
                        FragmentCheckpoints::open(&dataset, &fragment, &program)
                            .await?
                            .clear()
                            .await?;
                    }
                    anyhow::Ok(())
                }
            })
            .buffer_unordered(16)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }
}

fn ids(fragments: &[StagedFragment]) -> Vec<u64> {
    fragments.iter().map(|s| s.fragment_id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_ranges_read_well() {
        assert_eq!(describe_fragments(&[3, 0, 1, 2, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(describe_fragments(&[5]), "5");
    }
}
