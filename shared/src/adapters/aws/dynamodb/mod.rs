//! The job store on DynamoDB: one table, items keyed by `pk`/`sk`, a sparse
//! GSI `by_table` for listing a table's jobs newest first. Every state change
//! that must happen once (a task counted, a fragment staged or committed) is
//! a conditional write or a transaction, so repeated deliveries are harmless.
//! Calls DynamoDB refuses for now (a conflicting transaction, throttling)
//! are retried with bounded backoff ([`calls`]).

mod calls;
mod fragments;
mod items;
mod jobs;
mod layout;
mod plans;
mod row_failures;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::anyhow;
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, BillingMode, GlobalSecondaryIndex, KeySchemaElement, KeyType,
    KeysAndAttributes, Projection, ProjectionType, ScalarAttributeType, TransactWriteItem,
};

use crate::model::job::{Job, JobEvent, JobState, Metrics, MetricsDelta};
use crate::ports::store::{
    ColumnWatermark, CreateOutcome, FragmentLedger, FragmentRecord, FragmentStatus,
    IdempotencyClaim, JobJournal, JobPage, JobRecords, Leases, PlanChange, PlanChanged, Replanned,
    Resolution, RowFailure, StagedFragment, StoreError, StoreResult, TaskMark, Watermarks,
};
use calls::{Failure, classify, classify_transaction, retry_busy};
use items::{Item, key};
use layout::Layout;
pub use layout::{MAX_SHARDS, ShardPolicy};

pub const BY_TABLE_INDEX: &str = "by_table";
/// Every job, newest first (`POST /v1/jobs/list`): job items carry
/// `list_key` = `JOBS`, so only they are in this index.
pub const RECENT_INDEX: &str = "recent";
pub(crate) const RECENT_KEY_ATTRIBUTE: &str = "list_key";
pub(crate) const RECENT_KEY: &str = "JOBS";

/// Jobs whose layout a store remembers; past this many it starts over
/// (a layout is read again with its job's record).
const LAYOUTS_REMEMBERED: usize = 10_000;

/// Keys of one BatchGetItem (DynamoDB's limit).
const KEYS_PER_BATCH_GET: usize = 100;
/// Tries of the keys a BatchGetItem left unprocessed, backing off from 20 ms.
const UNPROCESSED_ATTEMPTS: u32 = 8;
const UNPROCESSED_BACKOFF: Duration = Duration::from_millis(20);

/// What a BatchGetItem reads of each item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Read {
    /// The key and the `status` attribute.
    Statuses,
    Whole,
}

#[derive(Clone)]
pub struct DynamoJobStore {
    client: Client,
    table: String,
    shard_policy: ShardPolicy,
    /// Each job's layout, as its record states it (it never changes).
    layouts: Arc<Mutex<HashMap<String, Layout>>>,
}

impl DynamoJobStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
            shard_policy: ShardPolicy::default(),
            layouts: Arc::default(),
        }
    }

    /// How many shards the jobs this store creates get.
    pub fn with_shard_policy(mut self, policy: ShardPolicy) -> Self {
        self.shard_policy = policy;
        self
    }

    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// Creates the table as template.yaml declares it, if missing. For local
    /// emulators and tests; in AWS the stack owns the table.
    pub async fn ensure_table(&self) -> anyhow::Result<()> {
        let attr = |name: &str| {
            AttributeDefinition::builder()
                .attribute_name(name)
                .attribute_type(ScalarAttributeType::S)
                .build()
        };
        let key_el = |name: &str, kind: KeyType| {
            KeySchemaElement::builder()
                .attribute_name(name)
                .key_type(kind)
                .build()
        };
        let result = self
            .client
            .create_table()
            .table_name(&self.table)
            .billing_mode(BillingMode::PayPerRequest)
            .attribute_definitions(attr("pk")?)
            .attribute_definitions(attr("sk")?)
            .attribute_definitions(attr("table_key")?)
            .attribute_definitions(attr("created_sk")?)
            .attribute_definitions(attr(RECENT_KEY_ATTRIBUTE)?)
            .key_schema(key_el("pk", KeyType::Hash)?)
            .key_schema(key_el("sk", KeyType::Range)?)
            .global_secondary_indexes(newest_first(BY_TABLE_INDEX, "table_key")?)
            .global_secondary_indexes(newest_first(RECENT_INDEX, RECENT_KEY_ATTRIBUTE)?)
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) => {
                let service = err.into_service_error();
                if service.is_resource_in_use_exception() {
                    Ok(())
                } else {
                    Err(anyhow!(service).context(format!("creating table {}", self.table)))
                }
            }
        }
    }

    /// A consistent read of one item.
    async fn get_item(&self, pk: String, sk: &str) -> StoreResult<Option<Item>> {
        let key = key(pk, sk);
        retry_busy(|| async {
            self.client
                .get_item()
                .table_name(&self.table)
                .set_key(Some(key.clone()))
                .consistent_read(true)
                .send()
                .await
                .map(|output| output.item)
                .map_err(|err| classify(err, "GetItem"))
        })
        .await
        .map_err(Failure::into_store_error)
    }

    /// Every item under the partition key `pk` whose sort key starts with
    /// `prefix`, read through all pages (`what` names the query in errors).
    async fn all_under(&self, pk: String, prefix: &str, what: &str) -> StoreResult<Vec<Item>> {
        retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", items::s(pk.clone()))
                .expression_attribute_values(":prefix", items::s(prefix))
                .consistent_read(true)
                .into_paginator()
                .items()
                .send()
                .try_collect()
                .await
                .map_err(|err| classify(err, what))
        })
        .await
        .map_err(Failure::into_store_error)
    }

    /// The items of `keys` that exist, read consistently,
    /// [`KEYS_PER_BATCH_GET`] at a time.
    async fn batch_get(&self, keys: Vec<Item>, read: Read, what: &str) -> StoreResult<Vec<Item>> {
        let mut found = Vec::new();
        for chunk in keys.chunks(KEYS_PER_BATCH_GET) {
            found.extend(self.batch_get_once(chunk.to_vec(), read, what).await?);
        }
        Ok(found)
    }

    /// One BatchGetItem, retried for the keys DynamoDB leaves unprocessed
    /// (it may, under load).
    async fn batch_get_once(
        &self,
        mut keys: Vec<Item>,
        read: Read,
        what: &str,
    ) -> StoreResult<Vec<Item>> {
        let mut found = Vec::new();
        for attempt in 0..UNPROCESSED_ATTEMPTS {
            if keys.is_empty() {
                return Ok(found);
            }
            let mut request = KeysAndAttributes::builder()
                .set_keys(Some(keys.clone()))
                .consistent_read(true);
            if read == Read::Statuses {
                request = request
                    .projection_expression("sk, #status")
                    .expression_attribute_names("#status", "status");
            }
            let request = request.build().map_err(unavailable)?;
            let output = retry_busy(|| async {
                self.client
                    .batch_get_item()
                    .request_items(&self.table, request.clone())
                    .send()
                    .await
                    .map_err(|err| classify(err, what))
            })
            .await
            .map_err(Failure::into_store_error)?;
            if let Some(items) = output.responses().and_then(|r| r.get(&self.table)) {
                found.extend(items.iter().cloned());
            }
            keys = output
                .unprocessed_keys()
                .and_then(|u| u.get(&self.table))
                .map(|k| k.keys().to_vec())
                .unwrap_or_default();
            if keys.is_empty() {
                return Ok(found);
            }
            tokio::time::sleep(UNPROCESSED_BACKOFF * (1 << attempt)).await;
        }
        Err(StoreError::Contention(format!(
            "DynamoDB left keys of {what} unprocessed too many times"
        )))
    }

    /// The job's layout: remembered, or read from its record (a job not
    /// recorded has everything under its own key).
    async fn layout(&self, job_id: &str) -> StoreResult<Layout> {
        if let Some(layout) = self.remembered(job_id) {
            return Ok(layout);
        }
        match self.get_item(items::job_pk(job_id), "JOB").await? {
            Some(item) => {
                let layout = Layout::of_job_item(&item);
                self.remember(job_id, layout);
                Ok(layout)
            }
            None => Ok(Layout::SINGLE),
        }
    }

    fn remembered(&self, job_id: &str) -> Option<Layout> {
        let layouts = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        layouts.get(job_id).copied()
    }

    fn remember(&self, job_id: &str, layout: Layout) {
        let mut layouts = self.layouts.lock().unwrap_or_else(|e| e.into_inner());
        if layouts.len() >= LAYOUTS_REMEMBERED {
            layouts.clear();
        }
        layouts.insert(job_id.to_string(), layout);
    }

    /// Applies `items` all or nothing: `Ok(false)` when a condition did not hold.
    async fn transact(&self, items: Vec<TransactWriteItem>) -> StoreResult<bool> {
        let result = retry_busy(|| async {
            self.client
                .transact_write_items()
                .set_transact_items(Some(items.clone()))
                .send()
                .await
                .map_err(classify_transaction)
        })
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(Failure::Condition(_)) => Ok(false),
            Err(failure) => Err(failure.into_store_error()),
        }
    }
}

/// An index of job items by `hash`, newest first (`created_sk`), with every
/// attribute (as template.yaml declares `by_table` and `recent`).
fn newest_first(name: &str, hash: &str) -> anyhow::Result<GlobalSecondaryIndex> {
    let key_el = |name: &str, kind: KeyType| {
        KeySchemaElement::builder()
            .attribute_name(name)
            .key_type(kind)
            .build()
    };
    Ok(GlobalSecondaryIndex::builder()
        .index_name(name)
        .key_schema(key_el(hash, KeyType::Hash)?)
        .key_schema(key_el("created_sk", KeyType::Range)?)
        .projection(
            Projection::builder()
                .projection_type(ProjectionType::All)
                .build(),
        )
        .build()?)
}

#[async_trait]
impl JobRecords for DynamoJobStore {
    async fn create_job(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        self.create(job, event, idempotency).await
    }

    async fn release_idempotency(&self, key: &str, job_id: &str) -> StoreResult<()> {
        self.forget_claim(key, job_id).await
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Option<Job>> {
        self.job(job_id).await
    }

    async fn list_jobs(
        &self,
        table_key: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.list(jobs::Listing::Table(table_key), limit, page_token)
            .await
    }

    async fn list_recent_jobs(
        &self,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.list(jobs::Listing::All, limit, page_token).await
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>> {
        self.move_to(job_id, to, event, error).await
    }

    async fn add_metrics(&self, job_id: &str, delta: &MetricsDelta) -> StoreResult<Metrics> {
        self.add_counters(job_id, delta).await
    }
}

#[async_trait]
impl JobJournal for DynamoJobStore {
    async fn list_events(&self, job_id: &str, limit: usize) -> StoreResult<Vec<JobEvent>> {
        self.events(job_id, limit).await
    }

    async fn add_row_failures(&self, job_id: &str, failures: &[RowFailure]) -> StoreResult<()> {
        self.put_row_failures(job_id, failures).await
    }

    async fn list_row_failures(&self, job_id: &str, limit: usize) -> StoreResult<Vec<RowFailure>> {
        self.row_failures(job_id, limit).await
    }

    async fn add_event(&self, job_id: &str, message: &str) -> StoreResult<()> {
        self.append_event(job_id, message).await
    }
}

#[async_trait]
impl FragmentLedger for DynamoJobStore {
    async fn get_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<FragmentRecord> {
        self.fragment(job_id, fragment_id).await
    }

    async fn mark_task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> StoreResult<TaskMark> {
        self.task_done(job_id, fragment_id, task, delta).await
    }

    async fn resolve_fragments(
        &self,
        job_id: &str,
        resolutions: &[Resolution],
        delta: &MetricsDelta,
    ) -> StoreResult<Vec<u64>> {
        self.resolve(job_id, resolutions, delta).await
    }

    fn resolutions_per_write(&self) -> usize {
        fragments::RESOLVED_PER_TRANSACTION
    }

    async fn resolved_fragments(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashSet<u64>> {
        self.resolved(job_id, fragment_ids).await
    }

    async fn fragment_statuses(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashMap<u64, FragmentStatus>> {
        self.statuses(job_id, fragment_ids).await
    }

    async fn change_plan(&self, job_id: &str, change: &PlanChange) -> StoreResult<PlanChanged> {
        self.change(job_id, change).await
    }

    async fn replanned_fragments(&self, job_id: &str) -> StoreResult<Vec<Replanned>> {
        self.replanned(job_id).await
    }

    async fn staged_fragments(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        self.staged(job_id).await
    }

    async fn mark_committed(&self, job_id: &str, fragments: &[StagedFragment]) -> StoreResult<()> {
        self.committed(job_id, fragments, None).await
    }
}

#[async_trait]
impl Leases for DynamoJobStore {
    async fn begin_commit(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<i64>> {
        self.begin(job_id, owner, ttl).await
    }

    async fn record_commit(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
        event: &str,
        owner: &str,
    ) -> StoreResult<()> {
        self.committed(job_id, fragments, Some(event)).await?;
        self.end(job_id, owner).await
    }

    async fn end_commit(&self, job_id: &str, owner: &str) -> StoreResult<()> {
        self.end(job_id, owner).await
    }

    async fn try_lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.lease(job_id, name, owner, ttl).await
    }

    async fn release_lease(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()> {
        self.release(job_id, name, owner).await
    }
}

#[async_trait]
impl Watermarks for DynamoJobStore {
    async fn watermark(
        &self,
        table_key: &str,
        column: &str,
    ) -> StoreResult<(ColumnWatermark, u64)> {
        self.read_watermark(table_key, column).await
    }

    async fn set_watermark(
        &self,
        table_key: &str,
        column: &str,
        watermark: &ColumnWatermark,
        revision: u64,
    ) -> StoreResult<bool> {
        self.write_watermark(table_key, column, watermark, revision)
            .await
    }
}

fn unavailable(err: impl Into<anyhow::Error>) -> StoreError {
    StoreError::Unavailable(err.into())
}

/// The JSON each item holds in `attribute`, read back.
fn bodies<T: serde::de::DeserializeOwned>(items: &[Item], attribute: &str) -> StoreResult<Vec<T>> {
    items
        .iter()
        .map(|item| {
            let text = items::get_s(item, attribute)
                .ok_or_else(|| anyhow!("an item without its '{attribute}'"))?;
            serde_json::from_str(text).map_err(anyhow::Error::from)
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(unavailable)
}
