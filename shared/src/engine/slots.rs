//! Concurrency slots: a job runs at most `concurrency` tasks at once, each
//! holding one of its slot leases in the job store.

use std::time::{Duration, Instant};

use super::Engine;
use crate::job::Job;
use crate::store::{HeldLease, lease::slot_lease};

/// First pause between tries for a slot; doubles up to the cap.
const SLOT_PAUSE_START: Duration = Duration::from_millis(5);
const SLOT_PAUSE_CAP: Duration = Duration::from_millis(200);
/// Random extra pause, so waiters spread out.
const SLOT_JITTER_MICROS: u64 = 5_000;
/// Slots tried per attempt: a few random ones, so a wide job costs few writes.
const SLOTS_TRIED: u32 = 16;

impl Engine {
    /// Waits (up to `busy_wait`) for one of the job's `concurrency` slots.
    pub(super) async fn wait_for_slot(&self, job: &Job) -> anyhow::Result<Option<HeldLease>> {
        let give_up = Instant::now() + self.config.busy_wait;
        let mut pause = SLOT_PAUSE_START;
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
            // Back off unless a slot of this process frees up first.
            let jitter = Duration::from_micros(rand::random::<u64>() % SLOT_JITTER_MICROS);
            tokio::select! {
                _ = tokio::time::sleep(pause + jitter) => {}
                _ = &mut freed => {}
            }
            pause = (pause * 2).min(SLOT_PAUSE_CAP);
        }
    }

    /// Takes one of the job's slots, or `None` when the ones tried are held.
    async fn acquire_slot(&self, job: &Job) -> anyhow::Result<Option<HeldLease>> {
        let slots = job.spec.params.concurrency.max(1);
        let owner = format!(
            "{}/{}",
            self.config.worker_id,
            uuid::Uuid::new_v4().simple()
        );
        let first = rand::random::<u32>() % slots;
        for i in 0..slots.min(SLOTS_TRIED) {
            let name = slot_lease((first + i) % slots);
            if let Some(lease) = HeldLease::acquire(
                &self.store,
                &job.job_id,
                &name,
                &owner,
                self.config.lease_ttl,
            )
            .await?
            {
                return Ok(Some(lease));
            }
        }
        Ok(None)
    }

    /// Gives a slot back and wakes this process's waiters.
    pub(super) async fn release_slot(&self, slot: HeldLease) {
        slot.release().await;
        self.slot_freed.notify_waiters();
    }
}
