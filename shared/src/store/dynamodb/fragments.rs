//! Per-fragment progress and leases on DynamoDB: a fragment's item records
//! its status; each finished task and each staged fragment's file is an
//! item of its own, so no item grows with the size of a job.

use std::time::Duration;

use aws_sdk_dynamodb::types::{Delete, Put, TransactWriteItem, Update};
use futures::{StreamExt, TryStreamExt};

use super::calls::{Failure, classify, retry_busy};
use super::items::{
    Item, counters_update, create_only, fragment_sk, get_s, job_pk, key, lease_sk, n, s, staged_sk,
    task_prefix, task_sk,
};
use super::{DynamoJobStore, unavailable};
use crate::job::{Counter, MetricsDelta, now_millis};
use crate::store::{FragmentRecord, FragmentStatus, StagedFragment, StoreResult, TaskMark};

/// Fragments committed per transaction: 2 writes each plus the counters
/// stay within DynamoDB's 100 items per transaction.
const COMMITTED_PER_TRANSACTION: usize = 49;
/// Commit-recording transactions in flight at once.
const COMMIT_RECORD_PARALLELISM: usize = 8;

impl DynamoJobStore {
    pub(super) async fn fragment(
        &self,
        job_id: &str,
        fragment_id: u64,
    ) -> StoreResult<FragmentRecord> {
        let item = self
            .get_item(job_pk(job_id), &fragment_sk(fragment_id))
            .await?;
        let status = item
            .as_ref()
            .and_then(|item| get_s(item, "status"))
            .map(FragmentStatus::parse)
            .unwrap_or(FragmentStatus::Open);
        let tasks_done = self
            .task_records(job_id, fragment_id)
            .await?
            .iter()
            .filter_map(|item| get_s(item, "sk"))
            .filter_map(|sk| sk.rsplit('#').next()?.parse().ok())
            .collect();
        Ok(FragmentRecord { status, tasks_done })
    }

    /// The records of a fragment's finished tasks, in task order.
    async fn task_records(&self, job_id: &str, fragment_id: u64) -> StoreResult<Vec<Item>> {
        retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(job_pk(job_id)))
                .expression_attribute_values(":prefix", s(task_prefix(fragment_id)))
                .projection_expression("sk")
                .consistent_read(true)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|err| classify(err, "Query tasks"))
        })
        .await
        .map_err(Failure::into_store_error)
    }

    pub(super) async fn task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
    ) -> StoreResult<TaskMark> {
        let items = self
            .task_done_items(job_id, fragment_id, task)
            .map_err(unavailable)?;
        let newly_done = self.transact(items).await?;
        let tasks_done = self.task_records(job_id, fragment_id).await?.len() as u32;
        Ok(TaskMark {
            newly_done,
            tasks_done,
        })
    }

    fn task_done_items(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let record = create_only(&self.table, key(job_pk(job_id), task_sk(fragment_id, task)))?;
        let count = counters_update(
            &self.table,
            job_id,
            &MetricsDelta::new().add(Counter::TasksDone, 1),
        )?;
        Ok(vec![
            TransactWriteItem::builder().put(record).build(),
            TransactWriteItem::builder().update(count).build(),
        ])
    }

    /// Sets the fragment's status if it has none yet.
    fn resolve_update(
        &self,
        job_id: &str,
        fragment_id: u64,
        status: FragmentStatus,
    ) -> anyhow::Result<Update> {
        Ok(Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), fragment_sk(fragment_id))))
            .update_expression("SET #status = :status")
            .condition_expression("attribute_not_exists(#status)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":status", s(status.as_str()))
            .build()?)
    }

    pub(super) async fn stage(&self, job_id: &str, staged: &StagedFragment) -> StoreResult<bool> {
        let items = (|| -> anyhow::Result<Vec<TransactWriteItem>> {
            let status = self.resolve_update(job_id, staged.fragment_id, FragmentStatus::Staged)?;
            let mut pending = key(job_pk(job_id), staged_sk(staged.fragment_id));
            pending.insert("staged".into(), s(serde_json::to_string(staged)?));
            let pending = Put::builder()
                .table_name(&self.table)
                .set_item(Some(pending))
                .build()?;
            let count = counters_update(
                &self.table,
                job_id,
                &MetricsDelta::new().add(Counter::FragmentsStaged, 1),
            )?;
            Ok(vec![
                TransactWriteItem::builder().update(status).build(),
                TransactWriteItem::builder().put(pending).build(),
                TransactWriteItem::builder().update(count).build(),
            ])
        })()
        .map_err(unavailable)?;
        self.transact(items).await
    }

    pub(super) async fn skip(&self, job_id: &str, fragment_id: u64) -> StoreResult<bool> {
        let items = (|| -> anyhow::Result<Vec<TransactWriteItem>> {
            let status = self.resolve_update(job_id, fragment_id, FragmentStatus::Skipped)?;
            let count = counters_update(
                &self.table,
                job_id,
                &MetricsDelta::new().add(Counter::FragmentsSkipped, 1),
            )?;
            Ok(vec![
                TransactWriteItem::builder().update(status).build(),
                TransactWriteItem::builder().update(count).build(),
            ])
        })()
        .map_err(unavailable)?;
        self.transact(items).await
    }

    pub(super) async fn staged(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        let items: Vec<Item> = retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(job_pk(job_id)))
                .expression_attribute_values(":prefix", s("STAGED#"))
                .consistent_read(true)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|err| classify(err, "Query staged fragments"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        items
            .iter()
            .map(|item| {
                let text = get_s(item, "staged")
                    .ok_or_else(|| anyhow::anyhow!("staged item without body"))?;
                serde_json::from_str(text).map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()
            .map_err(unavailable)
    }

    /// The writes that mark one staged fragment committed.
    fn commit_items(
        &self,
        job_id: &str,
        fragment: &StagedFragment,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let status = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), fragment_sk(fragment.fragment_id))))
            .update_expression("SET #status = :committed")
            .condition_expression("#status = :staged")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":committed", s(FragmentStatus::Committed.as_str()))
            .expression_attribute_values(":staged", s(FragmentStatus::Staged.as_str()))
            .build()?;
        let pending = Delete::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), staged_sk(fragment.fragment_id))))
            .build()?;
        Ok(vec![
            TransactWriteItem::builder().update(status).build(),
            TransactWriteItem::builder().delete(pending).build(),
        ])
    }

    fn commit_count(
        &self,
        job_id: &str,
        group: &[StagedFragment],
    ) -> anyhow::Result<TransactWriteItem> {
        let delta = MetricsDelta::new()
            .add(Counter::FragmentsCommitted, group.len() as i64)
            .add(
                Counter::RowsCommitted,
                group.iter().map(|f| f.rows as i64).sum(),
            );
        Ok(TransactWriteItem::builder()
            .update(counters_update(&self.table, job_id, &delta)?)
            .build())
    }

    /// Marks a group committed in one transaction; when some fragment of it
    /// was already committed (a lease that expired under a slow holder),
    /// counts the rest one by one.
    async fn commit_group(&self, job_id: &str, group: &[StagedFragment]) -> StoreResult<()> {
        let mut items = Vec::new();
        for fragment in group {
            items.extend(self.commit_items(job_id, fragment).map_err(unavailable)?);
        }
        items.push(self.commit_count(job_id, group).map_err(unavailable)?);
        if self.transact(items).await? {
            return Ok(());
        }
        for fragment in group {
            let mut items = self.commit_items(job_id, fragment).map_err(unavailable)?;
            items.push(
                self.commit_count(job_id, std::slice::from_ref(fragment))
                    .map_err(unavailable)?,
            );
            self.transact(items).await?;
        }
        Ok(())
    }

    pub(super) async fn committed(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
    ) -> StoreResult<()> {
        let groups: Vec<Vec<StagedFragment>> = fragments
            .chunks(COMMITTED_PER_TRANSACTION)
            .map(<[StagedFragment]>::to_vec)
            .collect();
        futures::stream::iter(groups)
            .map(|group| async move { self.commit_group(job_id, &group).await })
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
        let result = retry_busy(|| async {
            let now = now_millis();
            let mut item = key(job_pk(job_id), lease_sk(name));
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
        let result = retry_busy(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(job_pk(job_id), lease_sk(name))))
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
