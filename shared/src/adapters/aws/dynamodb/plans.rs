//! A job's plan changing while it runs, and commits being published, on
//! DynamoDB. A fragment added after submission is an item of its own
//! (`PLAN#<fragment>`, written once); a fragment moved on changes its
//! status item from what it was read to be, so the counters it carries
//! are changed once however often the move is recorded. A commit in
//! progress is the item `INTENT#commit`, written only while the job is
//! active and its writer holds the commit lease: the lease item itself is
//! rewritten whole by each renewal, so it cannot carry it.

use std::collections::HashMap;
use std::time::Duration;

use aws_sdk_dynamodb::types::{ConditionCheck, Delete, Put, TransactWriteItem, Update};
use futures::{StreamExt, TryStreamExt};

use super::calls::{Failure, classify, retry_busy};
use super::items::{
    counters_update, create_only, fragment_sk, get_s, job_active_check, job_pk, key, lease_sk, n,
    s, staged_sk,
};
use super::{DynamoJobStore, Layout, unavailable};
use crate::model::job::{Counter, MetricsDelta, now_millis};
use crate::ports::store::{
    COMMIT_LEASE, ColumnWatermark, FragmentStatus, PlanChange, PlanChanged, Replanned,
    StagedFragment, StoreError, StoreResult,
};

/// The sort key of a fragment added after submission.
fn plan_sk(fragment_id: u64) -> String {
    format!("{PLAN_PREFIX}{fragment_id:020}")
}

const PLAN_PREFIX: &str = "PLAN#";
const INTENT_SK: &str = "INTENT#commit";
/// Changes recorded at once (each its own small transaction).
const PLAN_PARALLELISM: usize = 8;
/// Reads and retries of a move whose fragment changed under it.
const MOVE_ATTEMPTS: usize = 5;

impl DynamoJobStore {
    pub(super) async fn change(
        &self,
        job_id: &str,
        change: &PlanChange,
    ) -> StoreResult<PlanChanged> {
        let layout = self.layout(job_id).await?;
        let added: Vec<Option<u64>> = futures::stream::iter(change.added.clone())
            .map(|added| async move { self.add_planned(layout, job_id, &added).await })
            .buffered(PLAN_PARALLELISM)
            .try_collect()
            .await?;
        let moved: Vec<Option<(u64, Option<StagedFragment>)>> =
            futures::stream::iter(change.moved.clone())
                .map(|id| self.move_fragment(layout, job_id, id))
                .buffered(PLAN_PARALLELISM)
                .try_collect()
                .await?;
        Ok(PlanChanged {
            added: added.into_iter().flatten().collect(),
            moved: moved.into_iter().flatten().collect(),
        })
    }

    /// Records one added fragment with its counters, unless it was added before.
    async fn add_planned(
        &self,
        layout: Layout,
        job_id: &str,
        added: &Replanned,
    ) -> StoreResult<Option<u64>> {
        let items = (|| -> anyhow::Result<Vec<TransactWriteItem>> {
            let mut item = key(job_pk(job_id), plan_sk(added.fragment.id));
            item.insert("body".into(), s(serde_json::to_string(added)?));
            let mut items = vec![
                TransactWriteItem::builder()
                    .put(create_only(&self.table, item)?)
                    .build(),
            ];
            let counts = added.counts();
            if !counts.is_empty() {
                let at = layout.counters_key(job_id, added.fragment.id);
                let update = counters_update(&self.table, at, &counts)?;
                items.push(TransactWriteItem::builder().update(update).build());
            }
            Ok(items)
        })()
        .map_err(unavailable)?;
        Ok(self.transact(items).await?.then_some(added.fragment.id))
    }

    /// Moves an open or staged fragment; `None` when it was moved or
    /// finished already.
    async fn move_fragment(
        &self,
        layout: Layout,
        job_id: &str,
        id: u64,
    ) -> StoreResult<Option<(u64, Option<StagedFragment>)>> {
        let pk = layout.fragment_pk(job_id, id);
        for _ in 0..MOVE_ATTEMPTS {
            let status = self
                .get_item(pk.clone(), &fragment_sk(id))
                .await?
                .as_ref()
                .and_then(|item| get_s(item, "status"))
                .map(FragmentStatus::parse);
            let staged = match status {
                None => None,
                Some(FragmentStatus::Staged) => Some(self.staged_one(pk.clone(), id).await?),
                Some(_) => return Ok(None),
            };
            let items = self
                .move_items(layout, job_id, id, status, staged.is_some())
                .map_err(unavailable)?;
            if self.transact(items).await? {
                return Ok(Some((id, staged)));
            }
        }
        Err(StoreError::Contention(format!(
            "job {job_id}: fragment {id} kept changing while moving it"
        )))
    }

    async fn staged_one(&self, pk: String, id: u64) -> StoreResult<StagedFragment> {
        let item = self
            .get_item(pk, &staged_sk(id))
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("staged file of fragment {id}")))?;
        let text = get_s(&item, "staged")
            .ok_or_else(|| StoreError::NotFound(format!("staged file of fragment {id}")))?;
        serde_json::from_str(text).map_err(|err| unavailable(anyhow::Error::from(err)))
    }

    /// The status change (conditional on the status read), the staged
    /// file's removal and the counters of one move.
    fn move_items(
        &self,
        layout: Layout,
        job_id: &str,
        id: u64,
        read: Option<FragmentStatus>,
        staged: bool,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let pk = layout.fragment_pk(job_id, id);
        let mut update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(pk.clone(), fragment_sk(id))))
            .update_expression("SET #status = :moved")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":moved", s(FragmentStatus::Moved.as_str()));
        update = match read {
            Some(status) => update
                .condition_expression("#status = :read")
                .expression_attribute_values(":read", s(status.as_str())),
            None => update.condition_expression("attribute_not_exists(#status)"),
        };
        let mut delta = MetricsDelta::new().add(Counter::FragmentsMoved, 1);
        let mut items = vec![TransactWriteItem::builder().update(update.build()?).build()];
        if staged {
            delta = delta.add(Counter::FragmentsStaged, -1);
            let delete = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(pk, staged_sk(id))))
                .build()?;
            items.push(TransactWriteItem::builder().delete(delete).build());
        }
        let counts = counters_update(&self.table, layout.counters_key(job_id, id), &delta)?;
        items.push(TransactWriteItem::builder().update(counts).build());
        Ok(items)
    }

    pub(super) async fn replanned(&self, job_id: &str) -> StoreResult<Vec<Replanned>> {
        let items = self
            .all_under(job_pk(job_id), PLAN_PREFIX, "Query re-planned fragments")
            .await?;
        super::bodies(&items, "body")
    }

    pub(super) async fn statuses(
        &self,
        job_id: &str,
        ids: &[u64],
    ) -> StoreResult<HashMap<u64, FragmentStatus>> {
        let mut statuses: HashMap<u64, FragmentStatus> =
            ids.iter().map(|id| (*id, FragmentStatus::Open)).collect();
        for (id, status) in self.recorded_statuses(job_id, ids).await? {
            statuses.insert(id, FragmentStatus::parse(&status));
        }
        Ok(statuses)
    }

    /// Writes `owner`'s commit in progress and renews its lease for `ttl`
    /// with it, if the job is active and the lease `owner`'s and unexpired.
    pub(super) async fn begin(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<i64>> {
        let now = now_millis();
        let until = now + ttl.as_millis() as i64;
        let items = self
            .intent_items(job_id, owner, now, until)
            .map_err(unavailable)?;
        Ok(self.transact(items).await?.then_some(until))
    }

    fn intent_items(
        &self,
        job_id: &str,
        owner: &str,
        now: i64,
        until: i64,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let lease = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), lease_sk(COMMIT_LEASE))))
            .update_expression("SET #until = :until")
            .condition_expression("#owner = :owner AND #until > :now")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":owner", s(owner))
            .expression_attribute_values(":until", n(until))
            .expression_attribute_values(":now", n(now))
            .build()?;
        let job = job_active_check(&self.table, job_id)?;
        let mut item = key(job_pk(job_id), INTENT_SK);
        item.insert("owner".into(), s(owner));
        item.insert("until".into(), n(until));
        let intent = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .build()?;
        Ok(vec![
            TransactWriteItem::builder().update(lease).build(),
            TransactWriteItem::builder().condition_check(job).build(),
            TransactWriteItem::builder().put(intent).build(),
        ])
    }

    pub(super) async fn end(&self, job_id: &str, owner: &str) -> StoreResult<()> {
        let result = retry_busy(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(job_pk(job_id), INTENT_SK)))
                .condition_expression("#owner = :owner")
                .expression_attribute_names("#owner", "owner")
                .expression_attribute_values(":owner", s(owner))
                .send()
                .await
                .map_err(|err| classify(err, "DeleteItem commit intent"))
        })
        .await;
        match result {
            Ok(_) | Err(Failure::Condition(_)) => Ok(()),
            Err(failure) => Err(failure.into_store_error()),
        }
    }

    /// The check a cancellation makes with its state change: no commit of
    /// the job is being published.
    pub(super) fn no_commit_in_flight(&self, job_id: &str) -> anyhow::Result<TransactWriteItem> {
        let check = ConditionCheck::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), INTENT_SK)))
            .condition_expression("attribute_not_exists(pk) OR #until < :now")
            .expression_attribute_names("#until", "until")
            .expression_attribute_values(":now", n(now_millis()))
            .build()?;
        Ok(TransactWriteItem::builder().condition_check(check).build())
    }

    /// Whether a commit of the job may be being published now.
    pub(super) async fn commit_in_flight(&self, job_id: &str) -> StoreResult<bool> {
        let item = self.get_item(job_pk(job_id), INTENT_SK).await?;
        Ok(item
            .and_then(|item| item.get("until")?.as_n().ok()?.parse::<i64>().ok())
            .is_some_and(|until| until >= now_millis()))
    }
}

/// The key of a maintained column's record.
fn watermark_pk(table_key: &str, column: &str) -> String {
    format!("MAINT#{table_key}\u{1f}{column}")
}

impl DynamoJobStore {
    pub(super) async fn read_watermark(
        &self,
        table_key: &str,
        column: &str,
    ) -> StoreResult<(ColumnWatermark, u64)> {
        let Some(item) = self
            .get_item(watermark_pk(table_key, column), "MAINT")
            .await?
        else {
            return Ok((ColumnWatermark::default(), 0));
        };
        let body = get_s(&item, "body").unwrap_or("{}");
        let watermark =
            serde_json::from_str(body).map_err(|err| unavailable(anyhow::Error::from(err)))?;
        let revision = item
            .get("revision")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        Ok((watermark, revision))
    }

    pub(super) async fn write_watermark(
        &self,
        table_key: &str,
        column: &str,
        watermark: &ColumnWatermark,
        revision: u64,
    ) -> StoreResult<bool> {
        let mut item = key(watermark_pk(table_key, column), "MAINT");
        let body = serde_json::to_string(watermark)
            .map_err(|err| unavailable(anyhow::Error::from(err)))?;
        item.insert("body".into(), s(body));
        item.insert("revision".into(), n(revision + 1));
        let result = retry_busy(|| async {
            let put = self
                .client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(item.clone()));
            let put = if revision == 0 {
                put.condition_expression("attribute_not_exists(pk)")
            } else {
                put.condition_expression("revision = :revision")
                    .expression_attribute_values(":revision", n(revision))
            };
            put.send()
                .await
                .map_err(|err| classify(err, "PutItem watermark"))
        })
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(Failure::Condition(_)) => Ok(false),
            Err(failure) => Err(failure.into_store_error()),
        }
    }
}
