//! Writing a fragment's new column file (every physical row, in order) and
//! recording it: staged for a commit, or skipped when no value changed.

use anyhow::Context;
use arrow_array::RecordBatch;
use lance::Dataset;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::produce::{Produced, Producer};
use super::progress::Progress;
use super::stop::{Stop, StopCheck};
use super::task::Open;
use super::{Disposition, Engine};
use crate::model::job::{Counter, Job, MetricsDelta};
use crate::model::plan::{PlannedFragment, TaskRef};
use crate::ports::store::{Resolution, StagedFragment};
use crate::run::checkpoint::FragmentCheckpoints;
use crate::run::staging::{delete_data_file, delete_file_at};

/// Batches in flight between the producer and the file writer.
const WRITER_QUEUE: usize = 4;

/// A fragment filled: its outcome, its checkpoints (to clear once the
/// outcome is recorded, if it had any) and the progress to record with it.
pub(super) struct Filled {
    pub resolution: Resolution,
    pub checkpoints: Option<Box<FragmentCheckpoints>>,
    pub progress: Progress,
}

/// How writing a fragment's file ended.
pub(super) enum Written {
    Filled(Filled),
    Stopped(Stop),
}

impl Engine {
    /// Writes the fragment's file and records it; `task` (a task covering
    /// the whole fragment) is counted done with it.
    pub(super) async fn finish_fragment(
        &self,
        job: &Job,
        open: &Open<'_>,
        stop: &mut StopCheck<'_>,
        task: Option<&TaskRef>,
    ) -> anyhow::Result<Disposition> {
        let filled = match self.write_fragment(job, open, stop, true).await? {
            Written::Filled(filled) => filled,
            Written::Stopped(reason) => {
                return Ok(self.stopped(&job.job_id, open.planned, reason).await);
            }
        };
        let counted = MetricsDelta::new().add(Counter::TasksDone, task.is_some() as i64);
        self.record_filled(job, open.dataset, vec![filled], counted)
            .await?;
        Ok(Disposition::Done)
    }

    /// Writes the column's new data file for the whole fragment: checkpointed
    /// ranges are replayed, the rest computed, all streamed into
    /// `write_columns` in physical row order.
    /// `may_have_checkpoints`: false when the caller knows no checkpoint of
    /// the job exists (no listing then).
    pub(super) async fn write_fragment(
        &self,
        job: &Job,
        open: &Open<'_>,
        stop: &mut StopCheck<'_>,
        may_have_checkpoints: bool,
    ) -> anyhow::Result<Written> {
        let Open {
            dataset,
            planned,
            fragment,
            program,
        } = *open;
        let rows = planned.physical_rows;
        let checkpoints = FragmentCheckpoints::open(
            dataset,
            fragment,
            &program.checkpoint_key(),
            program.output_fields.clone(),
        )
        .await?
        .known_empty(!may_have_checkpoints);
        let computer = self
            .open_fragments
            .take(
                &job.job_id,
                planned.id,
                fragment,
                program,
                self.config.max_batch_bytes,
            )
            .await?;
        let target = dataset
            .schema()
            .project(&program.columns)
            .context("projecting the target columns")?;
        let (sender, receiver) = mpsc::channel::<lance::Result<RecordBatch>>(WRITER_QUEUE);
        let batches = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        let producer = Producer::new(self, job, &computer, &checkpoints, planned.id, Some(sender))
            .run(0, rows, stop);
        let writer = fragment.write_columns(batches, &target);
        let (produced, written) = tokio::join!(producer, writer);
        let written = written.map(|group| group.1);
        let staging = Staging {
            dataset,
            planned,
            read_fields: program.read_schema.field_ids(),
            checkpoints,
        };
        staging.settle(produced, written).await
    }

    /// Records filled fragments (staged, or needing no new file) with their
    /// progress and `counted` in as few store calls as the store allows.
    /// Files of fragments another delivery recorded first are removed, and
    /// the checkpoints of recorded ones cleared.
    pub(super) async fn record_filled(
        &self,
        job: &Job,
        dataset: &Dataset,
        filled: Vec<Filled>,
        counted: MetricsDelta,
    ) -> anyhow::Result<()> {
        let mut progress = Progress::default();
        let mut resolutions = Vec::with_capacity(filled.len());
        let mut checkpointed = Vec::new();
        for fragment in filled {
            progress.merge(fragment.progress);
            if let Some(checkpoints) = fragment.checkpoints {
                checkpointed.push((fragment.resolution.fragment_id, checkpoints));
            }
            resolutions.push(fragment.resolution);
        }
        let delta = progress
            .counters_to_record(self.store.as_ref(), job)
            .await?
            .merge(&counted);
        let recorded = self
            .store
            .resolve_fragments(&job.job_id, &resolutions, &delta)
            .await?;
        for resolution in &resolutions {
            let id = resolution.fragment_id;
            match (&resolution.staged, recorded.contains(&id)) {
                (Some(_), true) => info!(fragment = id, "fragment staged"),
                (None, true) => info!(fragment = id, "fragment unchanged, skipped"),
                (Some(staged), false) => delete_data_file(dataset, staged).await,
                (None, false) => {}
            }
        }
        for (id, checkpoints) in checkpointed {
            // The staged file (or the skip) now stands for these values.
            if let Err(err) = checkpoints.clear().await {
                warn!(fragment = id, error = %format!("{err:#}"), "could not clear checkpoints");
            }
        }
        Ok(())
    }
}

/// A fragment's file being settled: where it was read, what its values
/// were computed from, and its checkpoints.
struct Staging<'a> {
    dataset: &'a Dataset,
    planned: &'a PlannedFragment,
    read_fields: Vec<i32>,
    checkpoints: FragmentCheckpoints,
}

impl Staging<'_> {
    /// Pairs what the producer reported with the file the writer wrote: a
    /// stopped or failed fill removes the file, a fill that changed nothing
    /// too.
    async fn settle(
        self,
        produced: anyhow::Result<Produced>,
        written: lance::Result<lance::table::format::DataFile>,
    ) -> anyhow::Result<Written> {
        let (changed, checkpointed, progress) = match produced {
            Ok(Produced::Completed {
                changed,
                checkpointed,
                progress,
            }) => (changed, checkpointed, progress),
            Ok(Produced::Stopped(_)) | Err(_) => {
                if let Ok(file) = &written {
                    delete_file_at(self.dataset, &file.path).await;
                }
                return match produced {
                    Ok(Produced::Stopped(reason)) => Ok(Written::Stopped(reason)),
                    Err(err) => Err(err),
                    Ok(Produced::Completed { .. }) => unreachable!("matched above"),
                };
            }
        };
        let file = written.context("writing the fragment's column file")?;
        let planned = self.planned;
        let resolution = if changed {
            Resolution::staged(StagedFragment {
                fragment_id: planned.id,
                data_file: serde_json::to_value(&file)?,
                rows: planned.physical_rows,
                version: planned.at.version,
                read_fields: self.read_fields,
            })
        } else {
            delete_file_at(self.dataset, &file.path).await;
            Resolution::skipped(planned.id)
        };
        Ok(Written::Filled(Filled {
            resolution,
            checkpoints: checkpointed.then(|| Box::new(self.checkpoints)),
            progress,
        }))
    }
}
