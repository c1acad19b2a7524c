//! Leases: a named, expiring claim on part of a job (a concurrency slot, the
//! right to commit), held by one owner and renewed while it works.

use std::sync::Arc;
use std::time::Duration;

use tracing::warn;

use super::Leases;

/// The lease of the one process allowed to commit a job's staged fragments
/// (and to remove them once the job stopped).
pub const COMMIT_LEASE: &str = "commit";

/// A lease outlives a holder that stopped renewing it by at most a minute:
/// long next to a renewal ([`renewal_interval`]), short next to a job.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(60);

/// How often a held lease of time to live `ttl` is renewed: three tries
/// before it lapses, so one slow or failed renewal does not lose it.
pub fn renewal_interval(ttl: Duration) -> Duration {
    ttl / 3
}

/// The lease of concurrency slot `index` of a job.
pub fn slot_lease(index: u32) -> String {
    format!("{SLOT_PREFIX}{index}")
}

const SLOT_PREFIX: &str = "slot-";

/// The slot a lease name is of ([`slot_lease`]), if it is a slot's.
pub fn slot_of(name: &str) -> Option<u32> {
    name.strip_prefix(SLOT_PREFIX)?.parse().ok()
}

/// A held lease, renewed in the background ([`renewal_interval`]).
/// It ends with its owner: `release` gives it back; dropping it (a panic,
/// a cancelled future) stops the renewal and releases it in the background.
pub struct HeldLease {
    store: Arc<dyn Leases>,
    job_id: String,
    name: String,
    owner: String,
    renewer: Option<tokio::task::JoinHandle<()>>,
}

impl HeldLease {
    /// Takes the lease, or `None` when someone else holds it.
    pub async fn acquire(
        store: Arc<dyn Leases>,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Result<Option<Self>, super::StoreError> {
        if !store.try_lease(job_id, name, owner, ttl).await? {
            return Ok(None);
        }
        Ok(Some(Self::renewed(store, job_id, name, owner, ttl)))
    }

    fn renewed(
        store: Arc<dyn Leases>,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> Self {
        let renewer = {
            let (store, job_id, name, owner) = (
                store.clone(),
                job_id.to_string(),
                name.to_string(),
                owner.to_string(),
            );
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(renewal_interval(ttl)).await;
                    match store.try_lease(&job_id, &name, &owner, ttl).await {
                        Ok(true) => {}
                        Ok(false) => {
                            warn!(job_id, lease = %name, "lease taken over by another owner");
                            return;
                        }
                        Err(err) => {
                            warn!(job_id, lease = %name, error = %format!("{err:#}"), "could not renew lease")
                        }
                    }
                }
            })
        };
        Self {
            store,
            job_id: job_id.to_string(),
            name: name.to_string(),
            owner: owner.to_string(),
            renewer: Some(renewer),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Stops renewing and gives the lease back.
    pub async fn release(mut self) {
        if let Some(renewer) = self.renewer.take() {
            renewer.abort();
        }
        release(&*self.store, &self.job_id, &self.name, &self.owner).await;
    }
}

async fn release(store: &dyn Leases, job_id: &str, name: &str, owner: &str) {
    if let Err(err) = store.release_lease(job_id, name, owner).await {
        warn!(job_id, lease = %name, error = %format!("{err:#}"), "could not release lease");
    }
}

impl Drop for HeldLease {
    fn drop(&mut self) {
        let Some(renewer) = self.renewer.take() else {
            return;
        };
        renewer.abort();
        // Dropped without `release` (a panic or a cancelled future): give it
        // back in the background; if no runtime is left it simply expires.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, job_id, name, owner) = (
                self.store.clone(),
                self.job_id.clone(),
                self.name.clone(),
                self.owner.clone(),
            );
            runtime.spawn(async move { release(&*store, &job_id, &name, &owner).await });
        }
    }
}
