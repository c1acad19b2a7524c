//! The backfill engine: what a worker does with one queue message. It never
//! knows which queue fed it; the worker (Lambda or local runner) maps its
//! [`Disposition`] onto the queue.
//!
//! One step per module: [`dispatch`] reads a message and classifies how it
//! ended, [`fanout`] queues a big job's tasks, [`task`] runs one task,
//! [`pack`] one task over several small fragments, [`readers`] keeps
//! fragments open for their next task,
//! [`produce`] computes and checkpoints a row range, [`write`] writes and
//! stages a fragment's file, [`slots`] caps a job's concurrency and
//! [`stop`] decides when a running task stops early. Commits are the
//! [`Committer`]'s; a job's end is the [`Lifecycle`]'s.

pub mod batching;
pub mod compute;
mod dispatch;
mod fanout;
mod pack;
mod produce;
mod progress;
mod readers;
mod slots;
mod stop;
mod task;
mod write;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

use lance::Dataset;

use crate::model::binding::Binding;
use crate::model::error::Error;
use crate::model::job::Job;
use crate::model::plan::ReadAt;
use crate::model::table::Catalog;
use crate::ports::queue::QueueSet;
use crate::ports::store::JobStore;
use crate::ports::udf::UdfCall;
use crate::ports::udf::runtimes::UdfRuntimes;
use crate::run::commit::Committer;
use crate::run::computed::{Program, TargetColumn};
use crate::run::lifecycle::Lifecycle;
use crate::run::live::Reconciler;

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
    /// How long a task of a paused job stays in the queue before it looks
    /// at the job again (resuming waits at most this long).
    pub paused_delay: Duration,
    /// Largest set of values one batch may compute; beyond it the task
    /// fails (naming the rows) rather than the process running out of memory.
    pub max_batch_bytes: usize,
}

/// Time kept before a Lambda deadline to checkpoint and requeue the rest.
pub const DEFAULT_DEADLINE_MARGIN: Duration = Duration::from_secs(30);
/// Deliveries of a message before its task fails (the queue's redrive
/// policy, `MaxReceiveCount` in the template, says the same).
pub const DEFAULT_MAX_RECEIVE_COUNT: u32 = 5;
/// How long a task waits for a concurrency slot before giving up its turn.
const DEFAULT_BUSY_WAIT: Duration = Duration::from_secs(5);
/// How long a task that found no slot stays in the queue before it is seen again.
const DEFAULT_BUSY_DELAY: Duration = Duration::from_secs(2);
/// How long a paused job's task waits in the queue between looks.
const DEFAULT_PAUSED_DELAY: Duration = Duration::from_secs(20);
/// Compiled programs kept per process (one per recent job).
const PROGRAM_CACHE_SIZE: usize = 64;

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", uuid::Uuid::new_v4().simple()),
            lease_ttl: crate::ports::store::lease::DEFAULT_LEASE_TTL,
            deadline_margin: DEFAULT_DEADLINE_MARGIN,
            max_receive_count: DEFAULT_MAX_RECEIVE_COUNT,
            busy_wait: DEFAULT_BUSY_WAIT,
            busy_delay: DEFAULT_BUSY_DELAY,
            paused_delay: DEFAULT_PAUSED_DELAY,
            max_batch_bytes: crate::run::computed::limits::MAX_BATCH_VALUE_BYTES,
        }
    }
}

/// A failure that no retry can fix (bad expression for the data, a fragment
/// that does not exist): the job fails with it at once.
pub fn permanent(message: impl Into<String>) -> anyhow::Error {
    Error::Permanent(message.into()).into()
}

pub struct Engine {
    store: Arc<dyn JobStore>,
    queues: QueueSet,
    catalog: Arc<Catalog>,
    config: EngineConfig,
    lifecycle: Lifecycle,
    committer: Committer,
    programs: Mutex<HashMap<String, Arc<Program>>>,
    /// Runtimes of user functions (`None`: this worker runs SQL only).
    udf: Option<Arc<UdfRuntimes>>,
    /// This process's share of each job's concurrency slots.
    slots: slots::Slots,
    open_fragments: readers::OpenFragments,
}

impl Engine {
    pub fn new(
        store: Arc<dyn JobStore>,
        queues: QueueSet,
        catalog: Arc<Catalog>,
        lifecycle: Lifecycle,
        config: EngineConfig,
    ) -> Self {
        let reconciler = Reconciler::new(store.clone(), catalog.clone(), queues.clone());
        let committer = Committer::new(
            store.clone(),
            catalog.clone(),
            lifecycle.clone(),
            reconciler,
            config.worker_id.clone(),
            config.lease_ttl,
        );
        let slots = slots::Slots::new(
            store.clone(),
            config.worker_id.clone(),
            config.lease_ttl,
            config.busy_wait,
        );
        Self {
            store,
            queues,
            catalog,
            config,
            lifecycle,
            committer,
            programs: Mutex::new(HashMap::new()),
            udf: None,
            slots,
            open_fragments: readers::OpenFragments::default(),
        }
    }

    /// Runs user functions on these runtimes.
    pub fn with_udf(mut self, runtimes: Option<Arc<UdfRuntimes>>) -> Self {
        self.udf = runtimes;
        self
    }

    /// Releases every slot kept for a next task, now (before the process
    /// is frozen or stops).
    pub async fn release_idle_slots(&self) {
        self.slots.release_idle().await;
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The compiled program of a job for fragments read `at` (cached per
    /// job and `where`), with its user function's runtime attached.
    async fn program(
        &self,
        job: &Job,
        dataset: &Dataset,
        at: &ReadAt,
    ) -> anyhow::Result<Arc<Program>> {
        let filter = job.spec.filter_for(at);
        let cache_key = format!("{}\u{1f}{filter}", job.job_id);
        if let Some(found) = self
            .programs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&cache_key)
        {
            return Ok(found.clone());
        }
        let target = TargetColumn::of_job(&job.spec, dataset.schema()).map_err(|err| {
            Error::Permanent(format!("at version {}: {err}", dataset.manifest().version))
        })?;
        let udf = target.udf.clone();
        let mut program = Program::for_job(dataset.schema(), &target, &job.spec, at)
            .map_err(Error::into_permanent)?;
        if let Some(binding) = &udf {
            program = program.with_udf(self.udf_call(job, dataset, binding).await?);
        }
        let program = Arc::new(program);
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        if programs.len() >= PROGRAM_CACHE_SIZE {
            programs.clear();
        }
        programs.insert(cache_key, program.clone());
        Ok(program)
    }

    /// The job's user function on the runtime configured for it.
    async fn udf_call(
        &self,
        job: &Job,
        dataset: &Dataset,
        binding: &Binding,
    ) -> anyhow::Result<Arc<UdfCall>> {
        let runtimes = self.udf.as_ref().ok_or_else(|| {
            permanent(format!(
                "user function '{}': this worker has no runtime for user functions",
                binding.udf_name
            ))
        })?;
        let mut udf = crate::run::payload::load(dataset, binding).await?;
        // Processes are per principal: the job's code never shares one
        // with another principal's.
        udf.principal = job.spec.principal().to_string();
        let runtime = runtimes.for_job(job.spec.params.cluster.as_deref(), &binding.image);
        Ok(Arc::new(UdfCall {
            udf,
            runtime,
            on_error: job.spec.options.on_error,
        }))
    }

    /// The table at the version a fragment read `at` is read at.
    async fn read_dataset(&self, job: &Job, at: &ReadAt) -> anyhow::Result<Arc<Dataset>> {
        let spec = &job.spec;
        match at.version {
            None => spec.read_dataset(&self.catalog).await,
            Some(version) => self
                .catalog
                .at_version(&spec.table_uri, spec.branch.as_deref(), version)
                .await
                .with_context(|| format!("opening {} at version {version}", spec.table_uri)),
        }
    }
}
