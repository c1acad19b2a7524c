//! Writing a fragment's new column file (every physical row, in order) and
//! recording it: staged for a commit, or skipped when no value changed.

use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::produce::{Produced, Producer};
use super::progress::Progress;
use super::stop::{Stop, StopCheck};
use super::{Disposition, Engine};
use crate::checkpoint::FragmentCheckpoints;
use crate::computed::Program;
use crate::job::{Counter, Job, MetricsDelta};
use crate::plan::TaskRef;
use crate::staging::{delete_data_file, delete_file_at};
use crate::store::{Resolution, StagedFragment};

/// Batches in flight between the producer and the file writer.
const WRITER_QUEUE: usize = 4;

/// A fragment filled: its outcome, whether it had checkpoints (to clear
/// once the outcome is recorded) and the progress to record with it.
pub(super) struct Filled {
    pub resolution: Resolution,
    pub checkpointed: bool,
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
        dataset: &Dataset,
        fragment: &FileFragment,
        program: &Arc<Program>,
        stop: &mut StopCheck<'_>,
        task: Option<&TaskRef>,
    ) -> anyhow::Result<Disposition> {
        let filled = match self
            .write_fragment(job, dataset, fragment, program, stop, true)
            .await?
        {
            Written::Filled(filled) => filled,
            Written::Stopped(reason) => {
                return Ok(self
                    .stopped(&job.job_id, fragment.id() as u64, reason)
                    .await);
            }
        };
        let counted = MetricsDelta::new().add(Counter::TasksDone, task.is_some() as i64);
        self.record_filled(job, dataset, program, vec![filled], counted)
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
        dataset: &Dataset,
        fragment: &FileFragment,
        program: &Arc<Program>,
        stop: &mut StopCheck<'_>,
        may_have_checkpoints: bool,
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
        .await?
        .known_empty(!may_have_checkpoints);
        let computer = self
            .open_fragments
            .take(&job.job_id, fragment, program, self.config.max_batch_bytes)
            .await?;
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
        let written = written.map(|group| group.1);
        settle_written(dataset, fragment.id() as u64, rows, produced, written).await
    }

    /// Records filled fragments (staged, or needing no new file) with their
    /// progress and `counted` in as few store calls as the store allows.
    /// Files of fragments another delivery recorded first are removed, and
    /// the checkpoints of recorded ones cleared.
    pub(super) async fn record_filled(
        &self,
        job: &Job,
        dataset: &Dataset,
        program: &Program,
        filled: Vec<Filled>,
        counted: MetricsDelta,
    ) -> anyhow::Result<()> {
        let mut progress = Progress::default();
        let mut resolutions = Vec::with_capacity(filled.len());
        let mut checkpointed = Vec::new();
        for fragment in filled {
            progress.merge(fragment.progress);
            if fragment.checkpointed {
                checkpointed.push(fragment.resolution.fragment_id);
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
        for id in checkpointed {
            clear_checkpoints(dataset, program, id).await;
        }
        Ok(())
    }
}

/// The staged file (or the skip) now stands for these values.
async fn clear_checkpoints(dataset: &Dataset, program: &Program, fragment_id: u64) {
    let cleared = async {
        if let Some(fragment) = dataset.get_fragment(fragment_id as usize) {
            let key = program.checkpoint_key();
            FragmentCheckpoints::open(dataset, &fragment, &key, program.output_fields.clone())
                .await?
                .clear()
                .await?;
        }
        anyhow::Ok(())
    }
    .await;
    if let Err(err) = cleared {
        warn!(fragment = fragment_id, error = %format!("{err:#}"), "could not clear checkpoints");
    }
}

/// Pairs what the producer reported with the file the writer wrote: a
/// stopped or failed fill removes the file, a fill that changed nothing too.
async fn settle_written(
    dataset: &Dataset,
    fragment_id: u64,
    rows: u64,
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
                delete_file_at(dataset, &file.path).await;
            }
            return match produced {
                Ok(Produced::Stopped(reason)) => Ok(Written::Stopped(reason)),
                Err(err) => Err(err),
                Ok(Produced::Completed { .. }) => unreachable!("matched above"),
            };
        }
    };
    let file = written.context("writing the fragment's column file")?;
    let resolution = if changed {
        Resolution::staged(StagedFragment {
            fragment_id,
            data_file: serde_json::to_value(&file)?,
            rows,
        })
    } else {
        delete_file_at(dataset, &file.path).await;
        Resolution::skipped(fragment_id)
    };
    Ok(Written::Filled(Filled {
        resolution,
        checkpointed,
        progress,
    }))
}
