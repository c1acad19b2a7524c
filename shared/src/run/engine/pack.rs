//! Running a pack: several small fragments in one task, each filled whole
//! with its own file, their outcomes recorded in batches (at most
//! [`RECORD_EVERY`] fragments, and no more than the store records in one
//! write) and the task counted
//! with the last. A redelivered pack skips the fragments already recorded.

use std::time::{Duration, Instant};

use anyhow::Context;
use lance::Dataset;
use tracing::info;

use super::stop::{Admission, StopCheck};
use super::task::{Open, planned_fragment};
use super::write::{Filled, Written};
use super::{Delivery, Disposition, Engine};
use crate::model::job::{Counter, Job, MetricsDelta};
use crate::model::plan::{Pack, PlannedFragment};
use crate::run::checkpoint;

/// Fragments recorded together at most: what a crash can make a pack do
/// again.
const RECORD_EVERY: usize = 64;

/// The filled fragments of a pack not yet recorded.
struct Pending<'a> {
    engine: &'a Engine,
    job: &'a Job,
    /// The table (at any version: it locates files to remove).
    dataset: &'a Dataset,
    filled: Vec<Filled>,
    recorded_at: Instant,
    every: Duration,
}

impl Pending<'_> {
    /// Records what is pending (with `counted` added with the last).
    async fn record(&mut self, counted: MetricsDelta) -> anyhow::Result<()> {
        let filled = std::mem::take(&mut self.filled);
        self.recorded_at = Instant::now();
        if filled.is_empty() {
            return Ok(());
        }
        self.engine
            .record_filled(self.job, self.dataset, filled, counted)
            .await
    }

    /// A batch is full, or the flush interval passed since the last record.
    fn due(&self) -> bool {
        let batch = RECORD_EVERY.min(self.engine.store.resolutions_per_write());
        self.filled.len() >= batch
            || (!self.filled.is_empty() && self.recorded_at.elapsed() >= self.every)
    }
}

impl Engine {
    pub(super) async fn run_pack(
        &self,
        job_id: &str,
        pack: &Pack,
        delivery: &Delivery,
    ) -> anyhow::Result<Disposition> {
        let job = match self.admit(job_id).await? {
            Admission::Run(job) => job,
            Admission::Ends(disposition) => return Ok(disposition),
            Admission::Finished(job) => {
                self.forget_pack_checkpoints(&job, pack).await;
                return Ok(Disposition::Done);
            }
        };
        let open = self.open_fragments(job_id, pack).await?;
        if open.is_empty() {
            self.committer.advance(&job).await?;
            return Ok(Disposition::Done);
        }
        let Some(slot) = self.slots.wait_for(&job).await? else {
            return Ok(Disposition::Requeue {
                delay: self.config.busy_delay,
            });
        };
        let result = self.fill_pack(&job, &open, delivery).await;
        self.slots.give_back(slot).await;
        let disposition = match result {
            Ok(disposition) => disposition,
            // Another holder of the pack may have finished it under us.
            Err(err) if self.open_fragments(job_id, pack).await?.is_empty() => {
                info!(error = %format!("{err:#}"), "another delivery finished the pack first");
                Disposition::Done
            }
            Err(err) => return Err(err),
        };
        if disposition == Disposition::Done {
            self.committer.advance(&job).await?;
        }
        Ok(disposition)
    }

    /// The pack's fragments not yet staged, committed or skipped.
    async fn open_fragments(
        &self,
        job_id: &str,
        pack: &Pack,
    ) -> anyhow::Result<Vec<PlannedFragment>> {
        let resolved = self.store.resolved_fragments(job_id, &pack.ids()).await?;
        Ok(pack
            .fragments
            .iter()
            .filter(|f| !resolved.contains(&f.id))
            .copied()
            .collect())
    }

    /// Fills the open fragments in order, recording them in batches.
    async fn fill_pack(
        &self,
        job: &Job,
        open: &[PlannedFragment],
        delivery: &Delivery,
    ) -> anyhow::Result<Disposition> {
        self.mark_running(job).await?;
        let first = open.first().map(|f| f.at).unwrap_or_default();
        let table = self.read_dataset(job, &first).await?;
        // One listing for the pack instead of one per fragment.
        let may_have_checkpoints = checkpoint::any_kept(&table).await?;
        let mut stop = StopCheck::new(self, &job.job_id, delivery.deadline);
        let mut pending = Pending {
            engine: self,
            job,
            dataset: &table,
            filled: Vec::new(),
            recorded_at: Instant::now(),
            every: job.spec.params.flush_interval,
        };
        for (i, planned) in open.iter().enumerate() {
            let written = self
                .fill_one(job, planned, &mut stop, may_have_checkpoints)
                .await
                .with_context(|| {
                    format!("fragment {}, rows 0..{}", planned.id, planned.physical_rows)
                })?;
            let reason = match written {
                Written::Filled(filled) => {
                    pending.filled.push(filled);
                    if i + 1 == open.len() {
                        break;
                    }
                    stop.check().await?
                }
                Written::Stopped(reason) => Some(reason),
            };
            if let Some(reason) = reason {
                pending.record(MetricsDelta::new()).await?;
                return Ok(self.stopped(&job.job_id, planned, reason).await);
            }
            if pending.due() {
                pending.record(MetricsDelta::new()).await?;
            }
        }
        // The last fragment carries the task's count: counted once, by
        // whoever records it.
        pending
            .record(MetricsDelta::new().add(Counter::TasksDone, 1))
            .await?;
        Ok(Disposition::Done)
    }

    /// Writes one fragment of a pack, read at its version.
    async fn fill_one(
        &self,
        job: &Job,
        planned: &PlannedFragment,
        stop: &mut StopCheck<'_>,
        may_have_checkpoints: bool,
    ) -> anyhow::Result<Written> {
        let dataset = self.read_dataset(job, &planned.at).await?;
        let program = self.program(job, &dataset, &planned.at).await?;
        let fragment = planned_fragment(&dataset, planned)?;
        let open = Open {
            dataset: &dataset,
            planned,
            fragment: &fragment,
            program: &program,
        };
        self.write_fragment(job, &open, stop, may_have_checkpoints)
            .await
    }

    /// A late delivery of a pack of a DONE job removes what any holder left
    /// of its fragments' checkpoints (if any checkpoint is kept at all).
    async fn forget_pack_checkpoints(&self, job: &Job, pack: &Pack) {
        let first = pack.fragments.first().map(|f| f.at).unwrap_or_default();
        let kept = match self.read_dataset(job, &first).await {
            Ok(dataset) => checkpoint::any_kept(&dataset).await.unwrap_or(true),
            Err(_) => true,
        };
        if kept {
            for fragment in &pack.fragments {
                self.forget_checkpoints(job, fragment).await;
            }
        }
    }
}
