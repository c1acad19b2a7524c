//! What a running task has done, written to the job in one update per
//! flush: rows computed and checkpointed, and the rows a user function
//! raised on (counted, the first ones listed; too many fail the job).

use crate::model::error::Error;
use crate::model::job::{Counter, Job, MetricsDelta};
use crate::ports::store::{JobStore, RowFailure};

/// Row failures listed on a job; beyond them they are only counted.
pub const MAX_ROW_FAILURES_LISTED: u64 = 1_000;
/// Characters of a row failure's error kept.
const MAX_ROW_ERROR_CHARS: usize = 1_024;

#[derive(Default)]
pub(super) struct Progress {
    pub computed: u64,
    pub checkpointed: u64,
    failures: Vec<RowFailure>,
}

impl Progress {
    /// Adds what another range did.
    pub fn merge(&mut self, other: Progress) {
        self.computed += other.computed;
        self.checkpointed += other.checkpointed;
        self.failures.extend(other.failures);
    }

    fn has_failures(&self) -> bool {
        !self.failures.is_empty()
    }

    /// The counters, for a caller that records them with something else.
    fn delta(&self) -> MetricsDelta {
        MetricsDelta::new()
            .add(Counter::RowsComputed, self.computed as i64)
            .add(Counter::RowsCheckpointed, self.checkpointed as i64)
    }

    pub fn failed(&mut self, fragment_id: u64, rows: &[(u64, String)]) {
        self.failures.extend(rows.iter().map(|(row, error)| {
            RowFailure {
                fragment_id,
                row: *row,
                error: crate::model::error::scrub(error)
                    .chars()
                    .take(MAX_ROW_ERROR_CHARS)
                    .collect(),
            }
        }));
    }

    /// The counters to record with something else (a task, fragments'
    /// outcomes); rows a user function failed on are listed, and checked
    /// against the job's limit, on their own first.
    pub async fn counters_to_record(
        mut self,
        store: &dyn JobStore,
        job: &Job,
    ) -> anyhow::Result<MetricsDelta> {
        if self.has_failures() {
            self.flush(store, job).await?;
            return Ok(MetricsDelta::new());
        }
        Ok(self.delta())
    }

    /// Writes what was gathered and starts over; fails when the job's
    /// failed rows passed its `max_skip_fraction`.
    pub async fn flush(&mut self, store: &dyn JobStore, job: &Job) -> anyhow::Result<()> {
        let failed = self.failures.len() as i64;
        let delta = MetricsDelta::new()
            .add(Counter::RowsComputed, self.computed as i64)
            .add(Counter::RowsCheckpointed, self.checkpointed as i64)
            .add(Counter::RowsFailed, failed);
        let failures = std::mem::take(&mut self.failures);
        *self = Self::default();
        if delta.is_empty() {
            return Ok(());
        }
        let metrics = store.add_metrics(&job.job_id, &delta).await?;
        if failures.is_empty() {
            return Ok(());
        }
        let total_failed = metrics.get(Counter::RowsFailed);
        let room = MAX_ROW_FAILURES_LISTED
            .saturating_sub(total_failed.saturating_sub(failed as u64)) as usize;
        if room > 0 {
            let listed = &failures[..failures.len().min(room)];
            store.add_row_failures(&job.job_id, listed).await?;
        }
        too_many_failed(job, total_failed, metrics.get(Counter::RowsTotal))
    }
}

fn too_many_failed(job: &Job, failed: u64, total: u64) -> anyhow::Result<()> {
    let Some(fraction) = job.spec.options.max_skip_fraction else {
        return Ok(());
    };
    if failed as f64 > fraction * total.max(1) as f64 {
        return Err(Error::Permanent(format!(
            "{failed} of {total} rows failed in the user function, more than max_skip_fraction {fraction}"
        ))
        .into());
    }
    Ok(())
}
