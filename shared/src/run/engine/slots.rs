//! Concurrency slots: a job runs at most `concurrency` tasks at once, each
//! holding one of its slot leases in the job store.
//!
//! Tasks of one process first queue for one of the job's `concurrency`
//! permits in memory, so only as many as could hold a slot try the store:
//! a batch of messages of one job no longer has every waiter write to the
//! store for each slot it tries each time one frees. A slot a task gives
//! back passes to the process's next task of the job without a store call.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::model::job::Job;
use crate::ports::store::{HeldLease, Leases, lease::slot_lease};

/// First pause between tries for a slot; doubles up to the cap.
const SLOT_PAUSE_START: Duration = Duration::from_millis(5);
const SLOT_PAUSE_CAP: Duration = Duration::from_millis(200);
/// Random extra pause, so waiters spread out.
const SLOT_JITTER_MICROS: u64 = 5_000;
/// Slots tried per attempt: a few random ones, so a wide job costs few writes.
const SLOTS_TRIED: u32 = 16;
/// Jobs whose in-process permits are kept; past it the map starts afresh
/// (the store's leases still bound the job, so that costs only writes).
const PERMIT_JOBS_KEPT: usize = 64;

/// One of a job's slots: the lease in the store and this process's permit.
pub(super) struct Slot {
    lease: HeldLease,
    permit: OwnedSemaphorePermit,
    job: Arc<JobSlots>,
}

/// How long a slot given back stays with this process for its next task of
/// the same job before its lease is released: tasks that follow each other
/// then take no lease of their own (two store writes each).
const IDLE_SLOT_GRACE: Duration = Duration::from_millis(25);

/// This process's share of one job's slots.
struct JobSlots {
    permits: Arc<Semaphore>,
    /// Leases given back by finished tasks, not yet released: (id, lease).
    idle: Mutex<Vec<(u64, HeldLease)>>,
    /// Slots whose lease a task of this process holds (not worth trying).
    held: Mutex<HashSet<String>>,
    next_id: AtomicU64,
}

/// This process's permits per job.
#[derive(Default)]
struct LocalPermits {
    jobs: Mutex<HashMap<String, Arc<JobSlots>>>,
}

/// The slots of the jobs this process runs tasks of: what a task waits for
/// before it computes, and gives back after.
pub(super) struct Slots {
    leases: Arc<dyn Leases>,
    /// Names this process's leases (each task's gets a suffix of its own).
    worker_id: String,
    lease_ttl: Duration,
    /// How long a task waits for a slot before giving up its turn.
    busy_wait: Duration,
    local: LocalPermits,
}

impl LocalPermits {
    fn of(&self, job: &Job) -> Arc<JobSlots> {
        let mut jobs = lock(&self.jobs);
        if let Some(found) = jobs.get(&job.job_id) {
            return found.clone();
        }
        if jobs.len() >= PERMIT_JOBS_KEPT {
            jobs.clear();
        }
        let permits = job.spec.params.concurrency.max(1) as usize;
        let slots = Arc::new(JobSlots {
            permits: Arc::new(Semaphore::new(permits)),
            idle: Mutex::new(Vec::new()),
            held: Mutex::new(HashSet::new()),
            next_id: AtomicU64::new(0),
        });
        jobs.insert(job.job_id.clone(), slots.clone());
        slots
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Slots {
    pub(super) fn new(
        leases: Arc<dyn Leases>,
        worker_id: String,
        lease_ttl: Duration,
        busy_wait: Duration,
    ) -> Self {
        Self {
            leases,
            worker_id,
            lease_ttl,
            busy_wait,
            local: LocalPermits::default(),
        }
    }

    /// Waits (up to `busy_wait`) for one of the job's `concurrency` slots.
    pub(super) async fn wait_for(&self, job: &Job) -> anyhow::Result<Option<Slot>> {
        let give_up = Instant::now() + self.busy_wait;
        let slots = self.local.of(job);
        let permits = slots.permits.clone().acquire_owned();
        let Ok(Ok(permit)) = tokio::time::timeout_at(give_up.into(), permits).await else {
            return Ok(None);
        };
        let mut pause = SLOT_PAUSE_START;
        loop {
            let idle = lock(&slots.idle).pop().map(|(_, lease)| lease);
            let lease = match idle {
                Some(lease) => Some(lease),
                None => self.acquire_slot(job, &slots).await?,
            };
            if let Some(lease) = lease {
                lock(&slots.held).insert(lease.name().to_string());
                return Ok(Some(Slot {
                    lease,
                    permit,
                    job: slots,
                }));
            }
            if Instant::now() >= give_up {
                return Ok(None);
            }
            // Every slot is held by other processes: back off.
            let jitter = Duration::from_micros(rand::random::<u64>() % SLOT_JITTER_MICROS);
            tokio::time::sleep(pause + jitter).await;
            pause = (pause * 2).min(SLOT_PAUSE_CAP);
        }
    }

    /// Takes one of the job's slots, or `None` when the ones tried are held.
    async fn acquire_slot(&self, job: &Job, local: &JobSlots) -> anyhow::Result<Option<HeldLease>> {
        let slots = job.spec.params.concurrency.max(1);
        let owner = format!("{}/{}", self.worker_id, uuid::Uuid::new_v4().simple());
        let first = rand::random::<u32>() % slots;
        for i in 0..slots.min(SLOTS_TRIED) {
            let name = slot_lease((first + i) % slots);
            if lock(&local.held).contains(&name) {
                continue;
            }
            if let Some(lease) = HeldLease::acquire(
                self.leases.clone(),
                &job.job_id,
                &name,
                &owner,
                self.lease_ttl,
            )
            .await?
            {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    /// Releases every slot kept for a next task, now (before the process
    /// is frozen or stops).
    pub(super) async fn release_idle(&self) {
        let jobs: Vec<Arc<JobSlots>> = lock(&self.local.jobs).values().cloned().collect();
        for job in jobs {
            let idle: Vec<_> = lock(&job.idle).drain(..).collect();
            for (_, lease) in idle {
                lease.release().await;
            }
        }
    }

    /// Gives a slot back: the next task of the job in this process takes
    /// it over; if none does within [`IDLE_SLOT_GRACE`], its lease is released.
    pub(super) async fn give_back(&self, slot: Slot) {
        let Slot { lease, permit, job } = slot;
        lock(&job.held).remove(lease.name());
        let id = job.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&job.idle).push((id, lease));
        drop(permit);
        tokio::spawn(async move {
            tokio::time::sleep(IDLE_SLOT_GRACE).await;
            let unused = {
                let mut idle = lock(&job.idle);
                let at = idle.iter().position(|(held, _)| *held == id);
                at.map(|at| idle.swap_remove(at).1)
            };
            if let Some(lease) = unused {
                lease.release().await;
            }
        });
    }
}
