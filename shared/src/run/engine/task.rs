//! Running one task: take a concurrency slot, compute the task's rows (or
//! the whole fragment), record it done, and commit what is due.

use std::sync::Arc;

use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use tracing::info;

use super::stop::{Admission, StopCheck};
use super::{Delivery, Disposition, Engine, permanent};
use crate::model::job::{Job, MetricsDelta};
use crate::model::plan::{PlannedFragment, TaskRef};
use crate::run::checkpoint;
use crate::run::computed::Program;

/// How a task that held a slot ended.
enum Ran {
    /// Its range is checkpointed and other tasks of the fragment are still
    /// to come: the fragment is not resolved, so there is nothing to commit.
    RangeOnly,
    /// The fragment was written (or the task stopped, or was told how to end).
    Fragment(Disposition),
}

impl Engine {
    pub(super) async fn run_task(
        &self,
        job_id: &str,
        task: &TaskRef,
        delivery: &Delivery,
    ) -> anyhow::Result<Disposition> {
        let job = match self.admit(job_id).await? {
            Admission::Run(job) => job,
            Admission::Ends(disposition) => return Ok(disposition),
            Admission::Finished(job) => {
                self.forget_checkpoints(&job, &task.fragment()).await;
                return Ok(Disposition::Done);
            }
        };
        let (resolved, tasks_done) = self.fragment_progress(job_id, task).await?;
        if resolved {
            // A repeated delivery: whatever an earlier holder of this task
            // checkpointed after the fragment was written is of no use.
            self.forget_checkpoints(&job, &task.fragment()).await;
            self.committer.advance(&job).await?;
            return Ok(Disposition::Done);
        }
        let Some(slot) = self.slots.wait_for(&job).await? else {
            return Ok(Disposition::Requeue {
                delay: self.config.busy_delay,
            });
        };
        let result = self.run_in_slot(&job, task, &tasks_done, delivery).await;
        self.slots.give_back(slot).await;
        let disposition = match result {
            // A range of a fragment others still work on: nothing to commit.
            Ok(Ran::RangeOnly) => return Ok(Disposition::Done),
            Ok(Ran::Fragment(disposition)) => disposition,
            Err(err) => self.after_error(&job, task, err).await?,
        };
        if disposition == Disposition::Done {
            self.committer.advance(&job).await?;
        }
        Ok(disposition)
    }

    /// Another holder of the same task (a repeated or late delivery) may
    /// have finished the fragment under us, removing the checkpoints we
    /// read: then all is well. Otherwise the error stands.
    async fn after_error(
        &self,
        job: &Job,
        task: &TaskRef,
        err: anyhow::Error,
    ) -> anyhow::Result<Disposition> {
        let (resolved, _) = self.fragment_progress(&job.job_id, task).await?;
        if !resolved {
            return Err(err);
        }
        info!(error = %format!("{err:#}"), "another delivery finished the fragment first");
        self.forget_checkpoints(job, &task.fragment()).await;
        Ok(Disposition::Done)
    }

    async fn run_in_slot(
        &self,
        job: &Job,
        task: &TaskRef,
        tasks_done: &[u32],
        delivery: &Delivery,
    ) -> anyhow::Result<Ran> {
        self.mark_running(job).await?;
        let planned = task.fragment();
        let dataset = self.read_dataset(job, &planned.at).await?;
        let program = self.program(job, &dataset, &planned.at).await?;
        let fragment = planned_fragment(&dataset, &planned)?;
        let mut stop = StopCheck::new(self, &job.job_id, delivery.deadline);
        let open = Open {
            dataset: &dataset,
            planned: &planned,
            fragment: &fragment,
            program: &program,
        };
        if task.covers_fragment() {
            // The whole fragment in one pass: its file directly, no checkpoints.
            return self
                .finish_fragment(job, &open, &mut stop, Some(task))
                .await
                .map(Ran::Fragment);
        }
        let mut counted = MetricsDelta::new();
        if !tasks_done.contains(&task.task) {
            match self.checkpoint_range(job, &open, task, &mut stop).await? {
                Ok(progress) => {
                    counted = progress
                        .counters_to_record(self.store.as_ref(), job)
                        .await?;
                }
                Err(stopped) => {
                    let stopped = self.stopped(&job.job_id, &task.fragment(), stopped).await;
                    return Ok(Ran::Fragment(stopped));
                }
            }
        }
        // One write records the task and what it computed.
        let mark = self
            .store
            .mark_task_done(&job.job_id, task.fragment_id, task.task, &counted)
            .await?;
        if mark.tasks_done < task.tasks_in_fragment {
            if !mark.newly_done {
                self.forget_if_resolved(job, task).await?;
            }
            return Ok(Ran::RangeOnly);
        }
        // Every task of the fragment is checkpointed: assemble its file.
        self.finish_fragment(job, &open, &mut stop, None)
            .await
            .map(Ran::Fragment)
    }

    /// Another holder recorded this task first and may already have
    /// assembled the fragment and cleared its checkpoints, before ours were
    /// written: then ours are left to us. (Checkpoints written before this
    /// read are cleared by whoever resolves the fragment after it.)
    async fn forget_if_resolved(&self, job: &Job, task: &TaskRef) -> anyhow::Result<()> {
        let (resolved, _) = self.fragment_progress(&job.job_id, task).await?;
        if resolved {
            self.forget_checkpoints(job, &task.fragment()).await;
        }
        Ok(())
    }

    /// Whether the task's fragment is resolved (staged, committed or
    /// skipped), and which of its tasks are done; a task covering its
    /// fragment needs only the first (one read).
    async fn fragment_progress(
        &self,
        job_id: &str,
        task: &TaskRef,
    ) -> anyhow::Result<(bool, Vec<u32>)> {
        if task.covers_fragment() {
            let resolved = self
                .store
                .resolved_fragments(job_id, &[task.fragment_id])
                .await?;
            return Ok((!resolved.is_empty(), Vec::new()));
        }
        let record = self.store.get_fragment(job_id, task.fragment_id).await?;
        Ok((record.status.is_resolved(), record.tasks_done))
    }

    pub(super) async fn mark_running(&self, job: &Job) -> anyhow::Result<()> {
        self.lifecycle
            .start_running(job, &self.config.worker_id)
            .await?;
        Ok(())
    }

    /// A task of a finished job (a late or repeated delivery, or one that
    /// was computing when the job ended) removes what it or an earlier
    /// holder left of its fragment's checkpoints.
    pub(super) async fn forget_checkpoints(&self, job: &Job, planned: &PlannedFragment) {
        let result = async {
            let dataset = self.read_dataset(job, &planned.at).await?;
            checkpoint::clear_fragment(&job.spec, &dataset, planned).await
        }
        .await;
        if let Err(err) = result {
            tracing::warn!(job_id = %job.job_id, fragment = planned.id, error = %format!("{err:#}"), "could not remove checkpoints");
        }
    }
}

/// A fragment opened for a task: the version it is read at, the job's
/// fragment, the Lance fragment and the program filling it.
pub(super) struct Open<'a> {
    pub dataset: &'a Dataset,
    pub planned: &'a PlannedFragment,
    pub fragment: &'a FileFragment,
    pub program: &'a Arc<Program>,
}

/// The planned fragment at the version it is read at, which must have the
/// physical rows it was planned with.
pub(super) fn planned_fragment(
    dataset: &Dataset,
    planned: &PlannedFragment,
) -> anyhow::Result<FileFragment> {
    let id = planned.lance_id();
    let version = dataset.manifest().version;
    let fragment = dataset
        .get_fragment(id as usize)
        .ok_or_else(|| permanent(format!("fragment {id} does not exist at version {version}")))?;
    let actual = fragment.metadata().physical_rows.map(|r| r as u64);
    if actual != Some(planned.physical_rows) {
        return Err(permanent(format!(
            "fragment {id} has {actual:?} physical rows at version {version}, the task expected {}",
            planned.physical_rows
        )));
    }
    Ok(fragment)
}
