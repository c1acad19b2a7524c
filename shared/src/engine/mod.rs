//! The backfill engine: what a worker does with one queue message. It never
//! knows which queue fed it; the worker (Lambda or local runner) maps its
//! [`Disposition`] onto the queue.

pub mod batching;
pub mod checkpoint;
pub mod task;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use arrow_array::RecordBatch;
use futures::StreamExt;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use tokio::sync::mpsc;
use tracing::{Instrument, info, warn};

use crate::computed::{Program, TargetColumn};
use crate::job::{Counter, Job, JobState, MetricsDelta};
use crate::plan::{self, Message, TaskRef};
use crate::queue::{Outgoing, QueueSet};
use crate::store::{JobStore, StagedFragment};
use crate::table::Catalog;
use batching::BatchSizer;
use checkpoint::{FragmentCheckpoints, Range};
use task::{FragmentComputer, STATE_CHECK_INTERVAL};

/// What the queue should do with a message after the engine handled it.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    /// Finished (or nothing left to do): delete it.
    Done,
    /// Failed for now: leave it, visible again after `after`.
    Retry { after: Duration, reason: String },
    /// Waiting, not failing (a paused task, a full job): send a fresh copy
    /// after `delay` and delete this one, so no receive is spent.
    Requeue { delay: Duration },
    /// Can never succeed: reported failed until the redrive moves it to the DLQ.
    Poison { reason: String },
}

/// What the worker knows about one delivery.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message_id: String,
    pub receive_count: u32,
    /// When the invocation must have finished (Lambda's deadline).
    pub deadline: Option<Instant>,
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub worker_id: String,
    /// Leases (concurrency slots, the commit lease) expire unless renewed.
    pub lease_ttl: Duration,
    /// A task stops this long before the deadline, checkpoints and requeues.
    pub deadline_margin: Duration,
    /// The queue's redrive limit; the last receive of a failing task fails the job.
    pub max_receive_count: u32,
    /// How long a task waits for a free concurrency slot of its job before
    /// it goes back to the queue.
    pub busy_wait: Duration,
    /// How long it then stays in the queue.
    pub busy_delay: Duration,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: Duration::from_secs(60),
            deadline_margin: Duration::from_secs(30),
            max_receive_count: 5,
            busy_wait: Duration::from_secs(5),
            busy_delay: Duration::from_secs(2),
        }
    }
}

/// A failure that no retry can fix (bad expression for the data, a fragment
/// that does not exist): the job fails with it at once.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Permanent(pub String);

pub fn permanent(message: impl Into<String>) -> anyhow::Error {
    Permanent(message.into()).into()
}

pub struct Engine {
    pub(crate) store: Arc<dyn JobStore>,
    pub(crate) queues: QueueSet,
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) config: EngineConfig,
    programs: Mutex<HashMap<String, Arc<Program>>>,
    /// Wakes tasks of this process waiting for a slot as soon as one is
    /// released here (slots released elsewhere are found by polling).
    slot_freed: tokio::sync::Notify,
}

/// Why a running task stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Deadline,
    Cancelled,
}

/// How producing a range ended.
enum Produced {
    /// `checkpointed`: some checkpoint of the fragment existed or was written.
    Completed {
        changed: bool,
        checkpointed: bool,
    },
    Stopped(Stop),
}

/// How writing a fragment's file ended (`bool`: checkpoints to clear).
enum Written {
    Staged(StagedFragment, bool),
    Unchanged(bool),
    Stopped(Stop),
}

impl Engine {
    pub fn new(
        store: Arc<dyn JobStore>,
        queues: QueueSet,
        catalog: Arc<Catalog>,
        config: EngineConfig,
    ) -> Self {
        Self {
            store,
            queues,
            catalog,
            config,
            programs: Mutex::new(HashMap::new()),
            slot_freed: tokio::sync::Notify::new(),
        }
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Handles one message body. Never panics on bad input; every outcome
    /// is a [`Disposition`].
    pub async fn handle(&self, body: &str, delivery: &Delivery) -> Disposition {
        let message = match Message::parse(body) {
            Ok(message) => message,
            Err(reason) => {
                if let Some(job_id) = lenient_job_id(body) {
                    self.fail_job(&job_id, &reason).await;
                }
                warn!(message_id = %delivery.message_id, %reason, "poison message");
                return Disposition::Poison { reason };
            }
        };
        let job_id = message.job_id().to_string();
        let span = match &message {
            Message::Run { task, .. } => {
                tracing::info_span!("task", job_id = %job_id, fragment = task.fragment_id, task = task.task)
            }
            Message::Plan { first, count, .. } => {
                tracing::info_span!("plan", job_id = %job_id, first, count)
            }
            Message::Cleanup { .. } => tracing::info_span!("cleanup", job_id = %job_id),
        };
        let outcome = async {
            match &message {
                Message::Run { task, .. } => self.run_task(&job_id, task, delivery).await,
                Message::Plan { first, count, .. } => self.fan_out(&job_id, *first, *count).await,
                Message::Cleanup { .. } => self.cleanup(&job_id).await,
            }
        }
        .instrument(span.clone())
        .await;
        let _entered = span.enter();
        match outcome {
            Ok(disposition) => disposition,
            Err(err) if err.downcast_ref::<Permanent>().is_some() => {
                let reason = format!("{}: {err:#}", describe(&message));
                warn!(%reason, "task failed permanently");
                self.fail_job(&job_id, &reason).await;
                Disposition::Done
            }
            Err(err) if delivery.receive_count >= self.config.max_receive_count => {
                let reason = format!(
                    "{} failed {} times, last: {err:#}",
                    describe(&message),
                    delivery.receive_count
                );
                warn!(%reason, "giving up on message");
                self.fail_job(&job_id, &reason).await;
                Disposition::Poison { reason }
            }
            Err(err) => {
                let after = Duration::from_secs(1 << delivery.receive_count.min(6));
                warn!(error = %format!("{err:#}"), retry_in = ?after, "task failed, will retry");
                Disposition::Retry {
                    after,
                    reason: format!("{err:#}"),
                }
            }
        }
    }

    /// A message that reached the dead-letter queue: it was received the
    /// redrive limit's number of times and never finished. A worker that
    /// saw its last receive fail has already failed the job; this covers
    /// the deliveries that died with their process (out of memory, killed,
    /// a hard timeout), which would otherwise leave the job RUNNING.
    pub async fn handle_dead_letter(&self, body: &str) {
        let (job_id, what) = match Message::parse(body) {
            Ok(Message::Cleanup { job_id, .. }) => {
                warn!(
                    job_id,
                    "a cleanup message went to the dead-letter queue; staged files may remain"
                );
                return;
            }
            Ok(message) => (message.job_id().to_string(), describe(&message)),
            Err(reason) => match lenient_job_id(body) {
                Some(job_id) => (job_id, format!("a malformed message ({reason})")),
                None => {
                    warn!(%reason, "dead letter names no job");
                    return;
                }
            },
        };
        let reason = format!(
            "{what} was received {} times without finishing and went to the dead-letter queue \
             (each attempt ended without a result: the process died, ran out of memory or was stopped); \
             submit the backfill again to resume from its checkpoints",
            self.config.max_receive_count
        );
        warn!(job_id, %reason, "dead letter");
        self.fail_job(&job_id, &reason).await;
    }

    /// Marks the job FAILED (once) and queues the removal of its staged files.
    pub(crate) async fn fail_job(&self, job_id: &str, reason: &str) {
        match self
            .store
            .transition(
                job_id,
                JobState::Failed,
                Some(&format!("failed: {reason}")),
                Some(reason),
            )
            .await
        {
            Ok(Some(_)) => {
                if let Ok(Some(job)) = self.store.get_job(job_id).await {
                    self.queue_cleanup(&job).await;
                }
            }
            Ok(None) => {}
            Err(err) => warn!(job_id, error = %format!("{err:#}"), "could not mark job failed"),
        }
    }

    pub(crate) async fn queue_cleanup(&self, job: &Job) {
        if let Some(queue) = self.queues.for_cluster(job.spec.params.cluster.as_deref())
            && let Err(err) = queue
                .send_many(vec![Outgoing::now(Message::cleanup(&job.job_id).to_body())])
                .await
        {
            warn!(job_id = %job.job_id, error = %format!("{err:#}"), "could not queue cleanup");
        }
    }

    /// The compiled program of a job (cached per job).
    pub(crate) fn program(&self, job: &Job, dataset: &Dataset) -> anyhow::Result<Arc<Program>> {
        if let Some(found) = self
            .programs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&job.job_id)
        {
            return Ok(found.clone());
        }
        let field = dataset.schema().field(&job.spec.column).ok_or_else(|| {
            permanent(format!(
                "column '{}' is missing at version {}",
                job.spec.column, job.spec.read_version
            ))
        })?;
        let target = TargetColumn {
            name: job.spec.column.clone(),
            expression: job.spec.expression.clone(),
            data_type: field.data_type(),
        };
        let program = Program::compile(dataset.schema(), &target, Some(&job.spec.filter))
            .map_err(|err| permanent(err.message))?;
        let program = Arc::new(program);
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        if programs.len() > 64 {
            programs.clear();
        }
        programs.insert(job.job_id.clone(), program.clone());
        Ok(program)
    }

    pub(crate) async fn read_dataset(&self, job: &Job) -> anyhow::Result<Arc<Dataset>> {
        self.catalog
            .at_version(
                &job.spec.table_uri,
                job.spec.branch.as_deref(),
                job.spec.read_version,
            )
            .await
            .with_context(|| {
                format!(
                    "opening {} at version {}",
                    job.spec.table_uri, job.spec.read_version
                )
            })
    }

    async fn fan_out(&self, job_id: &str, first: u64, count: u64) -> anyhow::Result<Disposition> {
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Disposition::Poison {
                reason: format!("job {job_id} does not exist"),
            });
        };
        if job.state.is_terminal() {
            return Ok(Disposition::Done);
        }
        let dataset = self.read_dataset(&job).await?;
        let fragments = plan::fragments(&dataset, job.spec.params.num_frags).await?;
        let slice = plan::fragment_slice(&fragments, first, count);
        let messages: Vec<Outgoing> = plan::run_messages(&job.spec, job_id, slice)
            .iter()
            .map(|m| Outgoing::now(m.to_body()))
            .collect();
        let queue = self
            .queues
            .for_cluster(job.spec.params.cluster.as_deref())
            .ok_or_else(|| {
                permanent(format!(
                    "cluster {:?} has no queue",
                    job.spec.params.cluster
                ))
            })?;
        let sent = messages.len();
        queue.send_many(messages).await?;
        info!(tasks = sent, "fanned out");
        self.store
            .add_event(
                job_id,
                &format!(
                    "queued {sent} tasks for fragments {first}..{}",
                    first + slice.len() as u64
                ),
            )
            .await?;
        Ok(Disposition::Done)
    }

    async fn run_task(
        &self,
        job_id: &str,
        task: &TaskRef,
        delivery: &Delivery,
    ) -> anyhow::Result<Disposition> {
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Disposition::Poison {
                reason: format!("job {job_id} does not exist"),
            });
        };
        if job.state.is_terminal() {
            if job.state == JobState::Done {
                self.forget_checkpoints(&job, task.fragment_id).await;
            }
            return Ok(Disposition::Done);
        }
        let record = self.store.get_fragment(job_id, task.fragment_id).await?;
        if record.status.is_resolved() {
            // A repeated delivery: whatever an earlier holder of this task
            // checkpointed after the fragment was written is of no use.
            self.forget_checkpoints(&job, task.fragment_id).await;
            self.advance_commits(&job).await?;
            return Ok(Disposition::Done);
        }
        let Some(slot) = self.wait_for_slot(&job).await? else {
            return Ok(Disposition::Requeue {
                delay: self.config.busy_delay,
            });
        };
        let result = self
            .run_task_in_slot(&job, task, &record.tasks_done, delivery)
            .await;
        slot.release(self.store.as_ref(), job_id).await;
        self.slot_freed.notify_waiters();
        let disposition = match result {
            Ok(disposition) => disposition,
            // Another holder of the same task (a repeated or late delivery)
            // finished the fragment under us, removing the checkpoints we read.
            Err(err)
                if self
                    .store
                    .get_fragment(job_id, task.fragment_id)
                    .await?
                    .status
                    .is_resolved() =>
            {
                info!(error = %format!("{err:#}"), "another delivery finished the fragment first");
                self.forget_checkpoints(&job, task.fragment_id).await;
                Disposition::Done
            }
            Err(err) => return Err(err),
        };
        if disposition == Disposition::Done {
            self.advance_commits(&job).await?;
        }
        Ok(disposition)
    }

    async fn run_task_in_slot(
        &self,
        job: &Job,
        task: &TaskRef,
        tasks_done: &[u32],
        delivery: &Delivery,
    ) -> anyhow::Result<Disposition> {
        let job_id = job.job_id.as_str();
        if job.state == JobState::Pending {
            self.store
                .transition(
                    job_id,
                    JobState::Running,
                    Some(&format!(
                        "running: first task started on {}",
                        self.config.worker_id
                    )),
                    None,
                )
                .await?;
        }
        let dataset = self.read_dataset(job).await?;
        let program = self.program(job, &dataset)?;
        let fragment = dataset
            .get_fragment(task.fragment_id as usize)
            .ok_or_else(|| {
                permanent(format!(
                    "fragment {} does not exist at version {}",
                    task.fragment_id, job.spec.read_version
                ))
            })?;
        let rows = fragment.metadata().physical_rows.map(|r| r as u64);
        if rows != Some(task.fragment_rows) {
            return Err(permanent(format!(
                "fragment {} has {rows:?} physical rows at version {}, the task expected {}",
                task.fragment_id, job.spec.read_version, task.fragment_rows
            )));
        }
        let mut stop = StopCheck::new(self, job_id, delivery.deadline);

        if task.covers_fragment() {
            return match self
                .write_fragment(job, &dataset, &fragment, &program, &mut stop)
                .await?
            {
                Written::Stopped(Stop::Deadline) => Ok(Disposition::Requeue {
                    delay: Duration::ZERO,
                }),
                Written::Stopped(Stop::Cancelled) => {
                    self.forget_checkpoints_if_done(job_id, task.fragment_id)
                        .await;
                    Ok(Disposition::Done)
                }
                written => {
                    self.store
                        .mark_task_done(job_id, task.fragment_id, task.task)
                        .await?;
                    self.resolve_fragment(job, &dataset, &fragment, &program, written)
                        .await?;
                    Ok(Disposition::Done)
                }
            };
        }

        if !tasks_done.contains(&task.task) {
            let checkpoints = FragmentCheckpoints::open(&dataset, &fragment, &program).await?;
            let computer = FragmentComputer::open(&fragment, program.clone()).await?;
            let produced = self
                .produce(
                    job,
                    &computer,
                    &checkpoints,
                    task.start,
                    task.end,
                    None,
                    &mut stop,
                )
                .await?;
            match produced {
                Produced::Stopped(Stop::Deadline) => {
                    return Ok(Disposition::Requeue {
                        delay: Duration::ZERO,
                    });
                }
                Produced::Stopped(Stop::Cancelled) => {
                    self.forget_checkpoints_if_done(job_id, task.fragment_id)
                        .await;
                    return Ok(Disposition::Done);
                }
                Produced::Completed { .. } => {}
            }
        }
        let mark = self
            .store
            .mark_task_done(job_id, task.fragment_id, task.task)
            .await?;
        if mark.tasks_done >= task.tasks_in_fragment {
            // Every task of the fragment is checkpointed: assemble its file.
            let written = self
                .write_fragment(job, &dataset, &fragment, &program, &mut stop)
                .await?;
            match written {
                Written::Stopped(Stop::Deadline) => {
                    return Ok(Disposition::Requeue {
                        delay: Duration::ZERO,
                    });
                }
                Written::Stopped(Stop::Cancelled) => {
                    self.forget_checkpoints_if_done(job_id, task.fragment_id)
                        .await;
                    return Ok(Disposition::Done);
                }
                written => {
                    self.resolve_fragment(job, &dataset, &fragment, &program, written)
                        .await?
                }
            }
        }
        Ok(Disposition::Done)
    }

    /// A task of a finished job (a late or repeated delivery, or one that
    /// was computing when the job ended) removes what it or an earlier
    /// holder left of its fragment's checkpoints. A failed or cancelled
    /// job keeps them: a new submission reuses them.
    async fn forget_checkpoints_if_done(&self, job_id: &str, fragment_id: u64) {
        match self.store.get_job(job_id).await {
            Ok(Some(job)) if job.state == JobState::Done => {
                self.forget_checkpoints(&job, fragment_id).await
            }
            Ok(_) => {}
            Err(err) => warn!(job_id, error = %format!("{err:#}"), "could not read the job"),
        }
    }

    /// Removes the checkpoints of a fragment whose file is written.
    async fn forget_checkpoints(&self, job: &Job, fragment_id: u64) {
        let result = async {
            let dataset = self.read_dataset(job).await?;
            let program = self.program(job, &dataset)?;
            if let Some(fragment) = dataset.get_fragment(fragment_id as usize) {
                FragmentCheckpoints::open(&dataset, &fragment, &program)
                    .await?
                    .clear()
                    .await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(err) = result {
            warn!(job_id = %job.job_id, fragment = fragment_id, error = %format!("{err:#}"), "could not remove checkpoints");
        }
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
        let checkpoints = FragmentCheckpoints::open(dataset, fragment, program).await?;
        if let Err(err) = checkpoints.clear().await {
            warn!(fragment = fragment.id(), error = %format!("{err:#}"), "could not clear checkpoints");
        }
        Ok(())
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
        let checkpoints = FragmentCheckpoints::open(dataset, fragment, program).await?;
        let computer = FragmentComputer::open(fragment, program.clone()).await?;
        let target = dataset
            .schema()
            .project(&[program.column.as_str()])
            .context("projecting the target column")?;
        let (sender, receiver) = mpsc::channel::<lance::Result<RecordBatch>>(4);
        let batches = futures::stream::unfold(receiver, |mut receiver| async move {
            receiver.recv().await.map(|item| (item, receiver))
        });
        let producer = self.produce(job, &computer, &checkpoints, 0, rows, Some(sender), stop);
        let writer = fragment.write_columns(batches, &target);
        let (produced, written) = tokio::join!(producer, writer);
        let produced = match produced {
            Ok(produced) => produced,
            Err(err) => {
                if let Ok(group) = written {
                    delete_file_at(dataset, &group.1.path).await;
                }
                return Err(err);
            }
        };
        match produced {
            Produced::Stopped(stop) => {
                if let Ok(group) = written {
                    delete_file_at(dataset, &group.1.path).await;
                }
                Ok(Written::Stopped(stop))
            }
            Produced::Completed {
                changed,
                checkpointed,
            } => {
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
        }
    }

    /// Produces the values of `[start, end)`: checkpointed ranges are reused,
    /// gaps computed and checkpointed every flush interval. With a `sink`,
    /// every batch is also sent on, in order (the fragment file is being
    /// written); without one, the last values are checkpointed at the end.
    #[allow(clippy::too_many_arguments)]
    async fn produce(
        &self,
        job: &Job,
        computer: &FragmentComputer,
        checkpoints: &FragmentCheckpoints,
        start: u64,
        end: u64,
        sink: Option<mpsc::Sender<lance::Result<RecordBatch>>>,
        stop: &mut StopCheck<'_>,
    ) -> anyhow::Result<Produced> {
        let params = &job.spec.params;
        let flush_every =
            Duration::from_secs_f64(params.batch_checkpoint_flush_interval_seconds.max(0.0));
        let sizer = Arc::new(Mutex::new(BatchSizer::new(params)));
        let existing = checkpoints.list().await?;
        let mut checkpointed = !existing.is_empty();
        let mut changed = false;
        let mut at = start;
        let mut delta = Counts::default();
        let send = |batch: RecordBatch| {
            let sink = sink.clone();
            async move {
                match sink {
                    Some(sink) => sink
                        .send(Ok(batch))
                        .await
                        .map_err(|_| anyhow::anyhow!("the fragment writer stopped")),
                    None => Ok(()),
                }
            }
        };
        let abort_sink = |why: &str| {
            if let Some(sink) = &sink {
                let _ = sink.try_send(Err(lance::Error::io(why.to_string())));
            }
        };

        while at < end {
            for range in FragmentCheckpoints::covered_from(&existing, at, end) {
                if sink.is_some() {
                    let (batches, range_changed) = checkpoints.read(range).await?;
                    changed |= range_changed;
                    for batch in batches {
                        send(batch).await?;
                    }
                }
                at = range.end;
            }
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
            let mut batches = computer.stream(
                at,
                gap_end,
                sizer.clone(),
                params.intra_applier_concurrency as usize,
            );
            let mut buffer: Vec<RecordBatch> = Vec::new();
            let mut buffer_start = at;
            let mut buffer_changed = false;
            let mut last_flush = Instant::now();
            while let Some(batch) = batches.next().await {
                let batch = batch.map_err(classify_compute_error)?;
                changed |= batch.changed;
                buffer_changed |= batch.changed;
                delta.computed += batch.range.end - batch.range.start;
                at = batch.range.end;
                buffer.push(batch.values.clone());
                send(batch.values).await?;
                let stopping = if at < end { stop.check().await? } else { None };
                if stopping.is_some() || last_flush.elapsed() >= flush_every {
                    if at > buffer_start {
                        checkpoints
                            .write(
                                Range {
                                    start: buffer_start,
                                    end: at,
                                },
                                &buffer,
                                buffer_changed,
                            )
                            .await?;
                        delta.checkpointed += at - buffer_start;
                        checkpointed = true;
                    }
                    buffer.clear();
                    buffer_start = at;
                    buffer_changed = false;
                    last_flush = Instant::now();
                    delta.flush(self.store.as_ref(), &job.job_id).await?;
                }
                if let Some(reason) = stopping {
                    drop(batches);
                    abort_sink(&format!("task stopped: {reason:?}"));
                    info!(?reason, at, "task stopped early, progress checkpointed");
                    return Ok(Produced::Stopped(reason));
                }
            }
            if sink.is_none() && at > buffer_start {
                checkpoints
                    .write(
                        Range {
                            start: buffer_start,
                            end: at,
                        },
                        &buffer,
                        buffer_changed,
                    )
                    .await?;
                delta.checkpointed += at - buffer_start;
                checkpointed = true;
            }
        }
        delta.flush(self.store.as_ref(), &job.job_id).await?;
        Ok(Produced::Completed {
            changed,
            checkpointed,
        })
    }

    /// Waits (up to `busy_wait`) for one of the job's `concurrency` slots.
    async fn wait_for_slot(&self, job: &Job) -> anyhow::Result<Option<HeldLease>> {
        let give_up = Instant::now() + self.config.busy_wait;
        let mut pause = Duration::from_millis(5);
        loop {
            let freed = self.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.acquire_slot(job).await? {
                return Ok(Some(slot));
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
            // Back off (with jitter, so waiters spread out) unless a slot of
            // this process frees up first.
            let jitter = Duration::from_micros(rand::random::<u64>() % 5_000);
            tokio::select! {
                _ = tokio::time::sleep(pause + jitter) => {}
                _ = &mut freed => {}
            }
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Takes one of the job's `concurrency` slots, or `None` when the ones
    /// tried are held (a few random ones, so a wide job costs few writes).
    async fn acquire_slot(&self, job: &Job) -> anyhow::Result<Option<HeldLease>> {
        let slots = job.spec.params.concurrency.max(1);
        let owner = format!(
            "{}/{}",
            self.config.worker_id,
            uuid::Uuid::new_v4().simple()
        );
        let first = rand::random::<u32>() % slots;
        for i in 0..slots.min(16) {
            let name = format!("slot-{}", (first + i) % slots);
            if self
                .store
                .try_lease(&job.job_id, &name, &owner, self.config.lease_ttl)
                .await?
            {
                return Ok(Some(HeldLease::start(
                    self.store.clone(),
                    job.job_id.clone(),
                    name,
                    owner,
                    self.config.lease_ttl,
                )));
            }
        }
        Ok(None)
    }

    /// Removes staged files of a job that stopped (cancelled or failed).
    async fn cleanup(&self, job_id: &str) -> anyhow::Result<Disposition> {
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Disposition::Done);
        };
        if !matches!(job.state, JobState::Cancelled | JobState::Failed) {
            return Ok(Disposition::Done);
        }
        let owner = format!("{}/cleanup", self.config.worker_id);
        if !self
            .store
            .try_lease(
                job_id,
                crate::commit::COMMIT_LEASE,
                &owner,
                self.config.lease_ttl,
            )
            .await?
        {
            return Ok(Disposition::Requeue {
                delay: self.config.busy_delay,
            });
        }
        let result = async {
            let dataset = self.read_dataset(&job).await?;
            let latest = self
                .catalog
                .latest(&job.spec.table_uri, job.spec.branch.as_deref())
                .await?;
            let staged = self.store.staged_fragments(job_id).await?;
            let (committed, uncommitted): (Vec<_>, Vec<_>) = staged
                .into_iter()
                .partition(|s| crate::commit::is_committed(&latest, s));
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
            anyhow::Ok(())
        }
        .await;
        self.store
            .release_lease(job_id, crate::commit::COMMIT_LEASE, &owner)
            .await?;
        result?;
        Ok(Disposition::Done)
    }
}

/// Counters gathered while a task runs and written in one update.
#[derive(Default)]
struct Counts {
    computed: u64,
    checkpointed: u64,
}

impl Counts {
    async fn flush(&mut self, store: &dyn JobStore, job_id: &str) -> anyhow::Result<()> {
        let delta = MetricsDelta::new()
            .add(Counter::RowsComputed, self.computed as i64)
            .add(Counter::RowsCheckpointed, self.checkpointed as i64);
        if !delta.is_empty() {
            store.add_metrics(job_id, &delta).await?;
        }
        *self = Self::default();
        Ok(())
    }
}

/// Looks at the deadline every batch and at the job's state every second.
struct StopCheck<'a> {
    engine: &'a Engine,
    job_id: &'a str,
    deadline: Option<Instant>,
    next_state_check: Instant,
}

impl<'a> StopCheck<'a> {
    fn new(engine: &'a Engine, job_id: &'a str, deadline: Option<Instant>) -> Self {
        Self {
            engine,
            job_id,
            deadline,
            next_state_check: Instant::now() + STATE_CHECK_INTERVAL,
        }
    }

    async fn check(&mut self) -> anyhow::Result<Option<Stop>> {
        let now = Instant::now();
        if let Some(deadline) = self.deadline
            && now + self.engine.config.deadline_margin >= deadline
        {
            return Ok(Some(Stop::Deadline));
        }
        if now >= self.next_state_check {
            self.next_state_check = now + STATE_CHECK_INTERVAL;
            let state = self
                .engine
                .store
                .get_job(self.job_id)
                .await?
                .map(|j| j.state);
            if state.is_none_or(JobState::is_terminal) {
                return Ok(Some(Stop::Cancelled));
            }
        }
        Ok(None)
    }
}

/// A held lease (a concurrency slot, the commit lease), renewed in the
/// background until released.
pub(crate) struct HeldLease {
    name: String,
    owner: String,
    renewer: tokio::task::JoinHandle<()>,
}

impl HeldLease {
    pub(crate) fn start(
        store: Arc<dyn JobStore>,
        job_id: String,
        name: String,
        owner: String,
        ttl: Duration,
    ) -> Self {
        let renewer = {
            let (name, owner) = (name.clone(), owner.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(ttl / 3).await;
                    if let Err(err) = store.try_lease(&job_id, &name, &owner, ttl).await {
                        warn!(job_id, lease = %name, error = %format!("{err:#}"), "could not renew lease");
                    }
                }
            })
        };
        Self {
            name,
            owner,
            renewer,
        }
    }

    pub(crate) async fn release(self, store: &dyn JobStore, job_id: &str) {
        self.renewer.abort();
        if let Err(err) = store.release_lease(job_id, &self.name, &self.owner).await {
            warn!(job_id, lease = %self.name, error = %format!("{err:#}"), "could not release lease");
        }
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

pub(crate) async fn delete_data_file(dataset: &Dataset, staged: &StagedFragment) {
    match serde_json::from_value::<lance::table::format::DataFile>(staged.data_file.clone()) {
        Ok(file) => delete_file_at(dataset, &file.path).await,
        Err(err) => warn!(error = %err, "staged data file record unreadable"),
    }
}

async fn delete_file_at(dataset: &Dataset, relative: &str) {
    let path = dataset.data_dir().join(relative);
    match dataset.object_store(None).await {
        Ok(store) => {
            if let Err(err) = store.delete(&path).await {
                warn!(%path, error = %err, "could not delete surplus data file");
            }
        }
        Err(err) => warn!(%path, error = %err, "no object store to delete surplus data file"),
    }
}

fn describe(message: &Message) -> String {
    match message {
        Message::Run { task, .. } => format!(
            "task {} (fragment {}, rows {}..{})",
            task.label(),
            task.fragment_id,
            task.start,
            task.end
        ),
        Message::Plan { first, count, .. } => {
            format!("planning fragments {first}..{}", first + count)
        }
        Message::Cleanup { .. } => "cleanup".to_string(),
    }
}

/// A job id from a message that does not parse, if it names one.
fn lenient_job_id(body: &str) -> Option<String> {
    let value: serde_json::Value = serde_json::from_str(body).ok()?;
    value.get("job_id")?.as_str().map(str::to_string)
}
