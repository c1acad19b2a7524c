//! Where a job's items live. DynamoDB gives each partition key about 1,000
//! write units a second, so a job that many workers run at once cannot keep
//! every record under one key. A job's own record, events, leases and plan
//! changes share its key `JOB#<id>`; its per-fragment records (status,
//! staged file, finished tasks) and the counters they add to go to one of
//! the job's shards, `JOB#<id>#S<n>` chosen by fragment id, each shard with
//! a counter item of its own (`COUNTERS`). A job's counters are the sum of
//! its record's and its shards'. The job's record is then written when its
//! state changes, not by every task (nor, through it, the indexes that copy
//! it). A job of one shard keeps all of it under `JOB#<id>`, as jobs
//! recorded before shards existed do.

use aws_sdk_dynamodb::types::{AttributeValue, TransactWriteItem, Update};

use super::items::{
    Item, counters_update, get_s, job_active_check, job_key, job_pk, key, n, while_active,
};
use crate::model::job::{Counter, Job, MetricsDelta};
use crate::ports::store::lease::slot_of;

/// The job record's attribute that says how many shards the job has.
pub(super) const SHARDS_ATTRIBUTE: &str = "shards";
const COUNTERS_SK: &str = "COUNTERS";
/// Concurrent workers one shard takes: a finished task writes about 14
/// units to its shard (its record, its fragment's status and staged file,
/// counters, all in transactions at twice the price), and a worker on a
/// small fragment finishes a few tasks a second.
const WORKERS_PER_SHARD: u32 = 8;
/// Shards of one job at most (a listing of its staged fragments reads each).
pub const MAX_SHARDS: u32 = 64;

/// How many shards a new job gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ShardPolicy {
    /// One per [`WORKERS_PER_SHARD`] workers the job may run at once, no
    /// more than it has tasks.
    #[default]
    ByConcurrency,
    /// This many (clamped to 1..=[`MAX_SHARDS`]), whatever the job.
    Fixed(u32),
}

impl ShardPolicy {
    pub(super) fn layout_for(self, job: &Job) -> Layout {
        let shards = match self {
            Self::Fixed(shards) => shards,
            Self::ByConcurrency => {
                let tasks = job.metrics.get(Counter::TasksTotal).max(1);
                let workers = job.spec.params.concurrency.div_ceil(WORKERS_PER_SHARD);
                workers.min(u32::try_from(tasks).unwrap_or(u32::MAX))
            }
        };
        Layout {
            shards: shards.clamp(1, MAX_SHARDS),
        }
    }
}

/// The shards of one job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    shards: u32,
}

impl Layout {
    /// Everything under the job's own key.
    pub(super) const SINGLE: Self = Self { shards: 1 };

    /// The layout a job record states (one shard when it states none).
    pub(super) fn of_job_item(item: &Item) -> Self {
        let shards = item
            .get(SHARDS_ATTRIBUTE)
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(1);
        Self {
            shards: shards.clamp(1, MAX_SHARDS),
        }
    }

    /// The attribute the job's record carries, if it has shards.
    pub(super) fn job_attribute(self) -> Option<(String, AttributeValue)> {
        self.is_sharded()
            .then(|| (SHARDS_ATTRIBUTE.to_string(), n(self.shards)))
    }

    pub(super) fn is_sharded(self) -> bool {
        self.shards > 1
    }

    /// The partition key of a fragment's records.
    pub(super) fn fragment_pk(self, job_id: &str, fragment_id: u64) -> String {
        match self.is_sharded() {
            true => shard_pk(job_id, (fragment_id % u64::from(self.shards)) as u32),
            false => job_pk(job_id),
        }
    }

    /// Every partition key holding per-fragment records of the job.
    pub(super) fn fragment_pks(self, job_id: &str) -> Vec<String> {
        match self.is_sharded() {
            true => (0..self.shards).map(|s| shard_pk(job_id, s)).collect(),
            false => vec![job_pk(job_id)],
        }
    }

    /// The partition key of a lease: a concurrency slot's on its shard
    /// (slot n as fragment n), any other (the commit's) on the job's key.
    pub(super) fn lease_pk(self, job_id: &str, name: &str) -> String {
        match slot_of(name) {
            Some(slot) => self.fragment_pk(job_id, u64::from(slot)),
            None => job_pk(job_id),
        }
    }

    /// The item that counts what is recorded about a fragment.
    pub(super) fn counters_key(self, job_id: &str, fragment_id: u64) -> Item {
        match self.is_sharded() {
            true => key(self.fragment_pk(job_id, fragment_id), COUNTERS_SK),
            false => job_key(job_id),
        }
    }

    /// The shards' counter items (none for a job of one shard), whose
    /// counters add to the job record's.
    pub(super) fn shard_counter_keys(self, job_id: &str) -> Vec<Item> {
        if !self.is_sharded() {
            return Vec::new();
        }
        let pks = self.fragment_pks(job_id).into_iter();
        pks.map(|pk| key(pk, COUNTERS_SK)).collect()
    }
}

impl Layout {
    /// Counters added to the fragment's counter item only while the job is
    /// PENDING, RUNNING or PAUSED (a transaction carrying them fails
    /// otherwise): on the job's record, an update under that condition; on
    /// a shard, the update and a check of the record.
    pub(super) fn counters_while_active(
        self,
        table: &str,
        job_id: &str,
        fragment_id: u64,
        delta: &MetricsDelta,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let update = counters_update(table, self.counters_key(job_id, fragment_id), delta)?;
        if self.is_sharded() {
            let check = job_active_check(table, job_id)?;
            return Ok(vec![
                TransactWriteItem::builder().update(update).build(),
                TransactWriteItem::builder().condition_check(check).build(),
            ]);
        }
        let (condition, values, names) = while_active();
        let mut all_names = update.expression_attribute_names.unwrap_or_default();
        all_names.extend(names);
        let mut all_values = update.expression_attribute_values.unwrap_or_default();
        all_values.extend(values);
        let guarded = Update::builder()
            .table_name(table)
            .set_key(Some(update.key))
            .update_expression(update.update_expression)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(all_names))
            .set_expression_attribute_values(Some(all_values))
            .build()?;
        Ok(vec![TransactWriteItem::builder().update(guarded).build()])
    }
}

fn shard_pk(job_id: &str, shard: u32) -> String {
    format!("{}#S{shard:02}", job_pk(job_id))
}

/// The job id a shard's counter item belongs to (`None` for other items).
pub(super) fn job_of_counter_item(item: &Item) -> Option<&str> {
    if get_s(item, "sk") != Some(COUNTERS_SK) {
        return None;
    }
    let pk = get_s(item, "pk")?.strip_prefix("JOB#")?;
    Some(pk.rsplit_once("#S")?.0)
}
