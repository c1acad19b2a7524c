//! Per-fragment progress and leases on DynamoDB: a fragment's item records
//! its status; each finished task and each staged fragment's file is an
//! item of its own, so no item grows with the size of a job.

use std::collections::HashSet;
use std::time::Duration;

use aws_sdk_dynamodb::types::{Delete, Put, TransactWriteItem, Update};
use futures::{StreamExt, TryStreamExt};

use super::calls::{Failure, classify, retry_busy};
use super::items::{
    Item, counters_update, create_only, event_put, fragment_sk, get_s, key, lease_sk, n, s,
    staged_sk, task_prefix, task_sk,
};
use super::{DynamoJobStore, Layout, Read, unavailable};
use crate::model::job::{Counter, MetricsDelta, now_millis};
use crate::ports::store::{
    FragmentRecord, FragmentStatus, Resolution, StagedFragment, StoreResult, TaskMark,
};

/// Fragments committed per transaction: 2 writes each plus the counters
/// and an event stay within DynamoDB's 100 items per transaction.
const COMMITTED_PER_TRANSACTION: usize = 49;
/// Fragments resolved per transaction: up to 2 writes each plus the counters.
pub(super) const RESOLVED_PER_TRANSACTION: usize = 49;

/// The counters a group of outcomes adds.
fn resolution_counts(group: &[Resolution]) -> MetricsDelta {
    let staged = group.iter().filter(|r| r.staged.is_some()).count() as i64;
    MetricsDelta::new()
        .add(Counter::FragmentsStaged, staged)
        .add(Counter::FragmentsSkipped, group.len() as i64 - staged)
}
/// Shards of a job read at once.
const SHARD_READ_PARALLELISM: usize = 8;
/// Commit-recording transactions in flight at once.
const COMMIT_RECORD_PARALLELISM: usize = 8;

impl DynamoJobStore {
    pub(super) async fn fragment(
        &self,
        job_id: &str,
        fragment_id: u64,
    ) -> StoreResult<FragmentRecord> {
        let layout = self.layout(job_id).await?;
        let item = self
            .get_item(
                layout.fragment_pk(job_id, fragment_id),
                &fragment_sk(fragment_id),
            )
            .await?;
        let status = item
            .as_ref()
            .and_then(|item| get_s(item, "status"))
            .map(FragmentStatus::parse)
            .unwrap_or(FragmentStatus::Open);
        let tasks_done = self
            .task_records(layout, job_id, fragment_id)
            .await?
            .iter()
            .filter_map(|item| get_s(item, "sk"))
            .filter_map(|sk| sk.rsplit('#').next()?.parse().ok())
            .collect();
        Ok(FragmentRecord { status, tasks_done })
    }

    /// The records of a fragment's finished tasks, in task order.
    async fn task_records(
        &self,
        layout: Layout,
        job_id: &str,
        fragment_id: u64,
    ) -> StoreResult<Vec<Item>> {
        let pk = layout.fragment_pk(job_id, fragment_id);
        self.all_under(pk, &task_prefix(fragment_id), "Query tasks")
            .await
    }

    pub(super) async fn task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> StoreResult<TaskMark> {
        let layout = self.layout(job_id).await?;
        let items = self
            .task_done_items(layout, job_id, fragment_id, task, delta)
            .map_err(unavailable)?;
        let newly_done = self.transact(items).await?;
        let tasks_done = self.task_records(layout, job_id, fragment_id).await?.len() as u32;
        Ok(TaskMark {
            newly_done,
            tasks_done,
        })
    }

    fn task_done_items(
        &self,
        layout: Layout,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let pk = layout.fragment_pk(job_id, fragment_id);
        let record = create_only(&self.table, key(pk, task_sk(fragment_id, task)))?;
        let count = counters_update(
            &self.table,
            layout.counters_key(job_id, fragment_id),
            &MetricsDelta::new().add(Counter::TasksDone, 1).merge(delta),
        )?;
        Ok(vec![
            TransactWriteItem::builder().put(record).build(),
            TransactWriteItem::builder().update(count).build(),
        ])
    }

    /// Sets the fragment's status if it has none yet.
    fn resolve_update(
        &self,
        layout: Layout,
        job_id: &str,
        fragment_id: u64,
        status: FragmentStatus,
    ) -> anyhow::Result<Update> {
        let pk = layout.fragment_pk(job_id, fragment_id);
        Ok(Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk, fragment_sk(fragment_id))))
            .update_expression("SET #status = :status")
            .condition_expression("attribute_not_exists(#status)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":status", s(status.as_str()))
            .build()?)
    }

    /// The writes that record one fragment's outcome: its status, and its
    /// staged file when it has one.
    fn resolution_items(
        &self,
        layout: Layout,
        job_id: &str,
        resolution: &Resolution,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let status = match resolution.staged {
            Some(_) => FragmentStatus::Staged,
            None => FragmentStatus::Skipped,
        };
        let update = self.resolve_update(layout, job_id, resolution.fragment_id, status)?;
        let mut items = vec![TransactWriteItem::builder().update(update).build()];
        if let Some(staged) = &resolution.staged {
            let pk = layout.fragment_pk(job_id, staged.fragment_id);
            let mut pending = key(pk, staged_sk(staged.fragment_id));
            pending.insert("staged".into(), s(serde_json::to_string(staged)?));
            let put = Put::builder()
                .table_name(&self.table)
                .set_item(Some(pending))
                .build()?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        Ok(items)
    }

    /// One transaction recording `group`, with `delta` when it is given.
    /// False when some fragment of it was resolved already.
    async fn resolve_group(
        &self,
        job_id: &str,
        group: &[Resolution],
        delta: Option<&MetricsDelta>,
    ) -> StoreResult<bool> {
        let layout = self.layout(job_id).await?;
        let items = (|| -> anyhow::Result<Vec<TransactWriteItem>> {
            let mut items = Vec::new();
            for resolution in group {
                items.extend(self.resolution_items(layout, job_id, resolution)?);
            }
            let mut counts = resolution_counts(group);
            if let Some(delta) = delta {
                counts = counts.merge(delta);
            }
            // Only while the job runs: an ended job takes no more outcomes.
            let first = group.first().map_or(0, |r| r.fragment_id);
            items.extend(layout.counters_while_active(&self.table, job_id, first, &counts)?);
            Ok(items)
        })()
        .map_err(unavailable)?;
        self.transact(items).await
    }

    /// Records the outcomes in transactions of up to
    /// [`RESOLVED_PER_TRANSACTION`] fragments, the last carrying `delta`.
    pub(super) async fn resolve(
        &self,
        job_id: &str,
        resolutions: &[Resolution],
        delta: &MetricsDelta,
    ) -> StoreResult<Vec<u64>> {
        let mut recorded = Vec::with_capacity(resolutions.len());
        let groups: Vec<&[Resolution]> = resolutions.chunks(RESOLVED_PER_TRANSACTION).collect();
        for (i, group) in groups.iter().enumerate() {
            let carries = (i + 1 == groups.len()).then_some(delta);
            recorded.extend(self.resolve_or_retry(job_id, group, carries).await?);
        }
        Ok(recorded)
    }

    /// A group holding fragments resolved already (a repeated delivery) is
    /// recorded without them; if others are resolved meanwhile, one by one.
    /// Nothing is recorded for a job that ended.
    /// `delta` goes with the group's last fragment.
    async fn resolve_or_retry(
        &self,
        job_id: &str,
        group: &[Resolution],
        delta: Option<&MetricsDelta>,
    ) -> StoreResult<Vec<u64>> {
        let ids = |rs: &[Resolution]| rs.iter().map(|r| r.fragment_id).collect::<Vec<_>>();
        if self.resolve_group(job_id, group, delta).await? {
            return Ok(ids(group));
        }
        if self
            .job(job_id)
            .await?
            .is_none_or(|job| job.state.is_terminal())
        {
            return Ok(Vec::new());
        }
        let resolved = self.resolved(job_id, &ids(group)).await?;
        let last = group.last().map(|r| r.fragment_id);
        let rest: Vec<Resolution> = group
            .iter()
            .filter(|r| !resolved.contains(&r.fragment_id))
            .cloned()
            .collect();
        let delta = delta.filter(|_| rest.last().map(|r| r.fragment_id) == last);
        if rest.is_empty() || self.resolve_group(job_id, &rest, delta).await? {
            return Ok(ids(&rest));
        }
        let mut recorded = Vec::new();
        for (j, one) in rest.iter().enumerate() {
            let carries = delta.filter(|_| j + 1 == rest.len());
            if self
                .resolve_group(job_id, std::slice::from_ref(one), carries)
                .await?
            {
                recorded.push(one.fragment_id);
            }
        }
        Ok(recorded)
    }

    /// Of `fragment_ids`, those with a status (staged, committed, skipped,
    /// moved).
    pub(super) async fn resolved(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashSet<u64>> {
        let recorded = self.recorded_statuses(job_id, fragment_ids).await?;
        Ok(recorded.into_iter().map(|(id, _)| id).collect())
    }

    /// The status recorded for each of `ids` that has one, read in
    /// BatchGetItems of up to 100 keys (DynamoDB's limit).
    pub(super) async fn recorded_statuses(
        &self,
        job_id: &str,
        ids: &[u64],
    ) -> StoreResult<Vec<(u64, String)>> {
        let layout = self.layout(job_id).await?;
        let keys: Vec<Item> = ids
            .iter()
            .map(|id| key(layout.fragment_pk(job_id, *id), fragment_sk(*id)))
            .collect();
        let items = self
            .batch_get(keys, Read::Statuses, "BatchGetItem fragments")
            .await?;
        Ok(items
            .iter()
            .filter_map(|item| {
                let id = get_s(item, "sk")?.strip_prefix("FRAG#")?.parse().ok()?;
                Some((id, get_s(item, "status")?.to_string()))
            })
            .collect())
    }

    /// Staged fragments not yet committed, read from every shard, in
    /// fragment order.
    pub(super) async fn staged(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        let layout = self.layout(job_id).await?;
        let shards: Vec<Vec<Item>> = futures::stream::iter(layout.fragment_pks(job_id))
            .map(|pk| self.all_under(pk, "STAGED#", "Query staged fragments"))
            .buffered(SHARD_READ_PARALLELISM)
            .try_collect()
            .await?;
        let mut staged: Vec<StagedFragment> = super::bodies(&shards.concat(), "staged")?;
        staged.sort_by_key(|fragment| fragment.fragment_id);
        Ok(staged)
    }

    /// The writes that mark one staged fragment committed.
    fn commit_items(
        &self,
        layout: Layout,
        job_id: &str,
        fragment: &StagedFragment,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let pk = layout.fragment_pk(job_id, fragment.fragment_id);
        let status = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk.clone(), fragment_sk(fragment.fragment_id))))
            .update_expression("SET #status = :committed")
            .condition_expression("#status = :staged")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":committed", s(FragmentStatus::Committed.as_str()))
            .expression_attribute_values(":staged", s(FragmentStatus::Staged.as_str()))
            .build()?;
        let pending = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk, staged_sk(fragment.fragment_id))))
            .build()?;
        Ok(vec![
            TransactWriteItem::builder().update(status).build(),
            TransactWriteItem::builder().delete(pending).build(),
        ])
    }

    fn commit_count(
        &self,
        layout: Layout,
        job_id: &str,
        group: &[StagedFragment],
        counts_commit: bool,
    ) -> anyhow::Result<TransactWriteItem> {
        let delta = MetricsDelta::new()
            .add(Counter::FragmentsCommitted, group.len() as i64)
            .add(
                Counter::RowsCommitted,
                group.iter().map(|f| f.rows as i64).sum(),
            )
            .add(Counter::CommitsDone, counts_commit as i64);
        let first = group.first().map_or(0, |f| f.fragment_id);
        let at = layout.counters_key(job_id, first);
        Ok(TransactWriteItem::builder()
            .update(counters_update(&self.table, at, &delta)?)
            .build())
    }

    /// Marks a group committed in one transaction (with the commit's count
    /// and event when `note` is given); when some fragment of it was
    /// already committed (a lease that expired under a slow holder), counts
    /// the rest one by one.
    async fn commit_group(
        &self,
        job_id: &str,
        group: &[StagedFragment],
        note: Option<&str>,
    ) -> StoreResult<()> {
        let layout = self.layout(job_id).await?;
        let mut items = Vec::new();
        for fragment in group {
            let commit = self.commit_items(layout, job_id, fragment);
            items.extend(commit.map_err(unavailable)?);
        }
        items.push(
            self.commit_count(layout, job_id, group, note.is_some())
                .map_err(unavailable)?,
        );
        if let Some(event) = note {
            let put = event_put(&self.table, job_id, event).map_err(unavailable)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        if self.transact(items).await? {
            return Ok(());
        }
        for fragment in group {
            let mut items = self
                .commit_items(layout, job_id, fragment)
                .map_err(unavailable)?;
            items.push(
                self.commit_count(layout, job_id, std::slice::from_ref(fragment), false)
                    .map_err(unavailable)?,
            );
            self.transact(items).await?;
        }
        if let Some(event) = note {
            let delta = MetricsDelta::new().add(Counter::CommitsDone, 1);
            self.add_counters(job_id, &delta).await?;
            self.append_event(job_id, event).await?;
        }
        Ok(())
    }

    /// Marks fragments committed, [`COMMITTED_PER_TRANSACTION`] at a time;
    /// the first group also counts the commit and records its event.
    pub(super) async fn committed(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
        note: Option<&str>,
    ) -> StoreResult<()> {
        let groups: Vec<Vec<StagedFragment>> = fragments
            .chunks(COMMITTED_PER_TRANSACTION)
            .map(<[StagedFragment]>::to_vec)
            .collect();
        futures::stream::iter(groups.into_iter().enumerate())
            .map(|(i, group)| async move {
                let note = note.filter(|_| i == 0);
                self.commit_group(job_id, &group, note).await
            })
            .buffer_unordered(COMMIT_RECORD_PARALLELISM)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    pub(super) async fn lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let pk = self.layout(job_id).await?.lease_pk(job_id, name);
        let result = retry_busy(|| async {
            let now = now_millis();
            let mut item = key(pk.clone(), lease_sk(name));
            item.insert("owner".into(), s(owner));
            item.insert("until".into(), n(now + ttl.as_millis() as i64));
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item))
                .condition_expression(
                    "attribute_not_exists(pk) OR #until < :now OR #owner = :owner",
                )
                .expression_attribute_names("#until", "until")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":now", n(now))
                .expression_attribute_values(":owner", s(owner))
                .send()
                .await
                .map_err(|err| classify(err, "PutItem lease"))
        })
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(Failure::Condition(_)) => Ok(false),
            Err(failure) => Err(failure.into_store_error()),
        }
    }

    pub(super) async fn release(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()> {
        let pk = self.layout(job_id).await?.lease_pk(job_id, name);
        let result = retry_busy(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(pk.clone(), lease_sk(name))))
                .condition_expression("#owner = :owner")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":owner", s(owner))
                .send()
                .await
                .map_err(|err| classify(err, "DeleteItem lease"))
        })
        .await;
        match result {
            Ok(_) | Err(Failure::Condition(_)) => Ok(()),
            Err(failure) => Err(failure.into_store_error()),
        }
    }
}
