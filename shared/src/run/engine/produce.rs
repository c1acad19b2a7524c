//! Producing a row range's values: checkpointed ranges are reused, gaps
//! computed and checkpointed every flush interval. While a fragment's file
//! is being written, every batch is also sent on to the writer, in order.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::RecordBatch;
use futures::StreamExt;
use tokio::sync::mpsc;
use tracing::info;

use super::batching::BatchSizer;
use super::compute::{ComputedBatch, FragmentComputer};
use super::progress::Progress;
use super::stop::{Stop, StopCheck};
use super::task::Open;
use super::{Engine, permanent};
use crate::model::job::Job;
use crate::model::plan::TaskRef;
use crate::run::checkpoint::{FragmentCheckpoints, Range};

/// Where a fragment's values go while its file is written.
pub(super) type Sink = mpsc::Sender<lance::Result<RecordBatch>>;

/// How producing a range ended.
pub(super) enum Produced {
    /// `checkpointed`: some checkpoint of the fragment existed or was
    /// written. `progress`: what was done since the last flush, for the
    /// caller to record (with the fragment's outcome when it has one).
    Completed {
        changed: bool,
        checkpointed: bool,
        progress: Progress,
    },
    Stopped(Stop),
}

/// Computed batches not yet in a checkpoint.
struct Buffer {
    batches: Vec<RecordBatch>,
    start: u64,
    changed: bool,
    flushed_at: Instant,
}

impl Buffer {
    fn starting_at(start: u64) -> Self {
        Self {
            batches: Vec::new(),
            start,
            changed: false,
            flushed_at: Instant::now(),
        }
    }
}

/// One range's production: what it reads, where it writes, what it counted.
pub(super) struct Producer<'a> {
    engine: &'a Engine,
    job: &'a Job,
    computer: &'a FragmentComputer,
    checkpoints: &'a FragmentCheckpoints,
    sink: Option<Sink>,
    sizer: Arc<Mutex<BatchSizer>>,
    flush_every: Duration,
    counts: Progress,
    fragment_id: u64,
    changed: bool,
    checkpointed: bool,
}

/// How computing a gap between checkpoints ended.
enum Gap {
    Reached(u64),
    Stopped(Stop),
}

impl<'a> Producer<'a> {
    pub(super) fn new(
        engine: &'a Engine,
        job: &'a Job,
        computer: &'a FragmentComputer,
        checkpoints: &'a FragmentCheckpoints,
        fragment_id: u64,
        sink: Option<Sink>,
    ) -> Self {
        let params = &job.spec.params;
        Self {
            engine,
            job,
            computer,
            checkpoints,
            sink,
            sizer: Arc::new(Mutex::new(BatchSizer::new(params))),
            flush_every: params.flush_interval,
            counts: Progress::default(),
            fragment_id,
            changed: false,
            checkpointed: false,
        }
    }

    /// Produces `[start, end)`.
    pub(super) async fn run(
        mut self,
        start: u64,
        end: u64,
        stop: &mut StopCheck<'_>,
    ) -> anyhow::Result<Produced> {
        let existing = self.checkpoints.list().await?;
        self.checkpointed = !existing.is_empty();
        let mut at = start;
        while at < end {
            at = self.replay(&existing, at, end).await?;
            if at >= end {
                break;
            }
            // Compute up to the next checkpoint (or the end).
            let gap_end = existing
                .iter()
                .filter(|r| r.start > at)
                .map(|r| r.start)
                .min()
                .unwrap_or(end)
                .min(end);
            match self.compute_gap(at, gap_end, end, stop).await? {
                Gap::Reached(next) => at = next,
                Gap::Stopped(reason) => return Ok(Produced::Stopped(reason)),
            }
        }
        Ok(Produced::Completed {
            changed: self.changed,
            checkpointed: self.checkpointed,
            progress: self.counts,
        })
    }

    /// Reuses the checkpoints that continue from `at`; returns where they end.
    async fn replay(&mut self, existing: &[Range], at: u64, end: u64) -> anyhow::Result<u64> {
        let chain = FragmentCheckpoints::covered_from(existing, at, end);
        let Some(last) = chain.last() else {
            return Ok(at);
        };
        let mut unread = if self.sink.is_some() { &chain[..] } else { &[] };
        while !unread.is_empty() {
            let read = self.checkpoints.read_some(unread).await?;
            anyhow::ensure!(!read.is_empty(), "no checkpoint was read");
            unread = &unread[read.len().min(unread.len())..];
            for (batches, changed) in read {
                self.changed |= changed;
                for batch in batches {
                    self.send(batch).await?;
                }
            }
        }
        Ok(last.end)
    }

    async fn send(&self, batch: RecordBatch) -> anyhow::Result<()> {
        if let Some(sink) = &self.sink {
            sink.send(Ok(batch))
                .await
                .map_err(|_| anyhow::anyhow!("the fragment writer stopped"))?;
        }
        Ok(())
    }

    async fn compute_gap(
        &mut self,
        mut at: u64,
        gap_end: u64,
        end: u64,
        stop: &mut StopCheck<'_>,
    ) -> anyhow::Result<Gap> {
        let parallelism = self.job.spec.params.intra_applier_concurrency as usize;
        // Batches overlap with the file's writing; with no file to write,
        // they run on this task.
        let span = Range {
            start: at,
            end: gap_end,
        };
        let mut batches =
            self.computer
                .stream(span, self.sizer.clone(), parallelism, self.sink.is_some());
        let mut buffer = Buffer::starting_at(at);
        while let Some(batch) = batches.next().await {
            let batch = batch.map_err(classify_compute_error)?;
            at = batch.range.end;
            self.take(&mut buffer, batch).await?;
            let stopping = if at < end { stop.check().await? } else { None };
            if stopping.is_some() || buffer.flushed_at.elapsed() >= self.flush_every {
                self.checkpoint(&mut buffer, at).await?;
                self.counts
                    .flush(self.engine.store.as_ref(), self.job)
                    .await?;
            }
            if let Some(reason) = stopping {
                drop(batches);
                if let Some(sink) = &self.sink {
                    let why = format!("task stopped: {reason:?}");
                    let _ = sink.try_send(Err(lance::Error::io(why)));
                }
                info!(?reason, at, "task stopped early, progress checkpointed");
                return Ok(Gap::Stopped(reason));
            }
        }
        // The reads must have covered the gap: a short read is an error,
        // not a gap left in the file.
        anyhow::ensure!(
            at == gap_end,
            "the read of fragment {} ended at row {at}, before row {gap_end}",
            self.fragment_id
        );
        // While a file is written, the file itself stands for the last values.
        if self.sink.is_none() {
            self.checkpoint(&mut buffer, at).await?;
        }
        Ok(Gap::Reached(at))
    }

    async fn take(&mut self, buffer: &mut Buffer, batch: ComputedBatch) -> anyhow::Result<()> {
        self.changed |= batch.changed;
        buffer.changed |= batch.changed;
        self.counts.computed += batch.range.end - batch.range.start;
        self.counts.failed(self.fragment_id, &batch.failed);
        buffer.batches.push(batch.values.clone());
        self.send(batch.values).await
    }

    /// Makes the buffered batches `[buffer.start, at)` durable.
    async fn checkpoint(&mut self, buffer: &mut Buffer, at: u64) -> anyhow::Result<()> {
        if at > buffer.start {
            let range = Range {
                start: buffer.start,
                end: at,
            };
            self.checkpoints
                .write(range, &buffer.batches, buffer.changed)
                .await?;
            self.counts.checkpointed += at - buffer.start;
            self.checkpointed = true;
        }
        *buffer = Buffer::starting_at(at);
        Ok(())
    }
}

impl Engine {
    /// Computes and checkpoints a task's rows of a fragment others share.
    /// Ends with what was done since the last flush, for the caller to
    /// record with the task.
    pub(super) async fn checkpoint_range(
        &self,
        job: &Job,
        open: &Open<'_>,
        task: &TaskRef,
        stop: &mut StopCheck<'_>,
    ) -> anyhow::Result<Result<Progress, Stop>> {
        let checkpoints = FragmentCheckpoints::open(
            open.dataset,
            open.fragment,
            &open.program.checkpoint_key(),
            open.program.output_fields.clone(),
        )
        .await?;
        let computer = self
            .open_fragments
            .open(
                &job.job_id,
                open.planned.id,
                open.fragment,
                open.program,
                self.config.max_batch_bytes,
            )
            .await?;
        let produced = Producer::new(self, job, &computer, &checkpoints, open.planned.id, None)
            .run(task.start, task.end, stop)
            .await?;
        Ok(match produced {
            Produced::Stopped(reason) => Err(reason),
            Produced::Completed { progress, .. } => Ok(progress),
        })
    }
}

/// Evaluation errors (a cast that overflows, a division by zero) fail the
/// job; I/O errors are retried.
fn classify_compute_error(err: anyhow::Error) -> anyhow::Error {
    let is_evaluation = err.chain().any(|cause| {
        cause.downcast_ref::<arrow_schema::ArrowError>().is_some()
            || cause
                .downcast_ref::<lance::deps::datafusion::error::DataFusionError>()
                .is_some()
    }) || err.downcast_ref::<lance::Error>().is_some_and(|e| {
        matches!(
            e,
            lance::Error::Arrow { .. } | lance::Error::InvalidInput { .. }
        )
    });
    if is_evaluation {
        permanent(format!("computing values failed: {err:#}"))
    } else {
        err
    }
}
