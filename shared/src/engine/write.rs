//! Writing a fragment's new column file (every physical row, in order) and
//! recording it: staged for a commit, or skipped when no value changed.

use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::compute::FragmentComputer;
use super::produce::{Produced, Producer};
use super::stop::{Stop, StopCheck};
use super::{Disposition, Engine};
use crate::checkpoint::FragmentCheckpoints;
use crate::computed::Program;
use crate::job::Job;
use crate::plan::TaskRef;
use crate::staging::{delete_data_file, delete_file_at};
use crate::store::StagedFragment;

/// Batches in flight between the producer and the file writer.
const WRITER_QUEUE: usize = 4;

/// How writing a fragment's file ended (`bool`: checkpoints to clear).
enum Written {
    Staged(StagedFragment, bool),
    Unchanged(bool),
    Stopped(Stop),
}

impl Engine {
    /// Writes the fragment's file and records it; `task` (a task covering
    /// the whole fragment) is recorded done once the file is written.
    pub(super) async fn finish_fragment(
        &self,
        job: &Job,
        dataset: &Dataset,
        fragment: &FileFragment,
        program: &Arc<Program>,
        stop: &mut StopCheck<'_>,
        task: Option<&TaskRef>,
    ) -> anyhow::Result<Disposition> {
        let written = self
            .write_fragment(job, dataset, fragment, program, stop)
            .await?;
        if let Written::Stopped(reason) = written {
            return Ok(self
                .stopped(&job.job_id, fragment.id() as u64, reason)
                .await);
        }
        if let Some(task) = task {
            self.store
                .mark_task_done(&job.job_id, task.fragment_id, task.task)
                .await?;
        }
        self.resolve_fragment(job, dataset, fragment, program, written)
            .await?;
        Ok(Disposition::Done)
    }

    /// Writes the column's new data file for the whole fragment: checkpointed
    /// ranges are replayed, the rest computed, all streamed into
    /// `write_columns` in physical row order.
    async fn write_fragment(
        &self,
        job: &Job,
        dataset: &Dataset,
        fragment: &FileFragment,
        program: &Arc<Program>,
        stop: &mut StopCheck<'_>,
    ) -> anyhow::Result<Written> {
        let rows = fragment
            .metadata()
            .physical_rows
            .context("fragment without a physical row count")? as u64;
        let checkpoints = FragmentCheckpoints::open(
            dataset,
            fragment,
            &program.checkpoint_key(),
            program.output_fields.clone(),
        )
        .await?;
        let computer =
            FragmentComputer::open(fragment, program.clone(), self.config.max_batch_bytes).await?;
        let target = dataset
            .schema()
            .project(&program.columns)
            .context("projecting the target columns")?;
        let (sender, receiver) = mpsc::channel::<lance::Result<RecordBatch>>(WRITER_QUEUE);
        let batches = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        let producer = Producer::new(
            self,
            job,
            &computer,
            &checkpoints,
            fragment.id() as u64,
            Some(sender),
        )
        .run(0, rows, stop);
        let writer = fragment.write_columns(batches, &target);
        let (produced, written) = tokio::join!(producer, writer);
        let produced = match produced {
            Ok(Produced::Completed {
                changed,
                checkpointed,
            }) => (changed, checkpointed),
            Ok(Produced::Stopped(reason)) => {
                if let Ok(group) = written {
                    delete_file_at(dataset, &group.1.path).await;
                }
                return Ok(Written::Stopped(reason));
            }
            Err(err) => {
                if let Ok(group) = written {
                    delete_file_at(dataset, &group.1.path).await;
                }
                return Err(err);
            }
        };
        let (changed, checkpointed) = produced;
        let group = written.context("writing the fragment's column file")?;
        if !changed {
            delete_file_at(dataset, &group.1.path).await;
            return Ok(Written::Unchanged(checkpointed));
        }
        Ok(Written::Staged(
            StagedFragment {
                fragment_id: fragment.id() as u64,
                data_file: serde_json::to_value(&group.1)?,
                rows,
            },
            checkpointed,
        ))
    }

    /// Records a written fragment (or that it needs no new file). A repeated
    /// delivery that wrote the same fragment again removes its surplus file.
    async fn resolve_fragment(
        &self,
        job: &Job,
        dataset: &Dataset,
        fragment: &FileFragment,
        program: &Program,
        written: Written,
    ) -> anyhow::Result<()> {
        let job_id = job.job_id.as_str();
        let checkpointed = match written {
            Written::Staged(staged, checkpointed) => {
                if self.store.stage_fragment(job_id, &staged).await? {
                    info!(fragment = staged.fragment_id, "fragment staged");
                } else {
                    delete_data_file(dataset, &staged).await;
                }
                checkpointed
            }
            Written::Unchanged(checkpointed) => {
                if self
                    .store
                    .skip_fragment(job_id, fragment.id() as u64)
                    .await?
                {
                    info!(fragment = fragment.id(), "fragment unchanged, skipped");
                }
                checkpointed
            }
            Written::Stopped(_) => return Ok(()),
        };
        if !checkpointed {
            return Ok(());
        }
        // The staged file (or the skip) now stands for these values.
        let checkpoints = FragmentCheckpoints::open(
            dataset,
            fragment,
            &program.checkpoint_key(),
            program.output_fields.clone(),
        )
        .await?;
        if let Err(err) = checkpoints.clear().await {
            warn!(fragment = fragment.id(), error = %format!("{err:#}"), "could not clear checkpoints");
        }
        Ok(())
    }
}
