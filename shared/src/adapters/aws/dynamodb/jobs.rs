//! Jobs on DynamoDB: creating one with its column lock and idempotency
//! record, reading and listing them, moving their state, events, counters.

use std::collections::HashMap;

use aws_sdk_dynamodb::types::{Delete, Put, ReturnValue, TransactWriteItem, Update};

use super::calls::{Failure, classify, retry_busy};
use super::items::{
    EVENT_PREFIX, Item, counters_update, create_only, event_from_item, event_put, get_s,
    job_from_item, job_key, job_pk, job_put, key, metrics_from_item, metrics_from_items, n, s,
};
use super::layout::job_of_counter_item;
use super::{
    BY_TABLE_INDEX, DynamoJobStore, Layout, RECENT_INDEX, RECENT_KEY, RECENT_KEY_ATTRIBUTE, Read,
    unavailable,
};
use crate::model::job::{Job, JobEvent, JobState, Metrics, MetricsDelta, now_millis, now_rfc3339};
use crate::ports::store::{
    CreateOutcome, IDEMPOTENCY_TTL, IdempotencyClaim, JobPage, StoreError, StoreResult,
    column_lock_key, decode_token, encode_token,
};

/// Events read at once (a page of a job's events, newest first).
const MAX_EVENTS_PER_QUERY: usize = 1_000;

/// A create finding the column lock of a job that already ended releases it
/// and tries again; the lock changing hands more often than this is a conflict.
const CREATE_ATTEMPTS: usize = 3;
/// A transition re-reads the job when its state moved under it; that
/// happens at most once or twice in a job's life, so more is contention.
const TRANSITION_ATTEMPTS: usize = 16;

fn lock_pk(job: &Job) -> String {
    format!("LOCK#{}", column_lock_key(job))
}

fn idempotency_pk(claim: &IdempotencyClaim) -> String {
    format!("IDEMP#{}", claim.key)
}

impl DynamoJobStore {
    /// The job, its first event, its column lock and its idempotency record,
    /// all or nothing.
    fn create_items(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let mut lock = key(lock_pk(job), "LOCK");
        lock.insert("job_id".into(), s(&job.job_id));
        let mut record = job_put(&self.table, job, now_millis())?;
        let layout = self.shard_policy.layout_for(job);
        record.item.extend(layout.job_attribute());
        let mut items = vec![
            TransactWriteItem::builder().put(record).build(),
            TransactWriteItem::builder()
                .put(event_put(&self.table, &job.job_id, event)?)
                .build(),
            TransactWriteItem::builder()
                .put(create_only(&self.table, lock)?)
                .build(),
        ];
        if let Some(claim) = idempotency {
            items.push(self.idempotency_put(job, claim)?);
        }
        Ok(items)
    }

    /// The idempotency record, written if none exists or the one there expired
    /// (DynamoDB's TTL deletes expired items only eventually).
    fn idempotency_put(
        &self,
        job: &Job,
        claim: &IdempotencyClaim,
    ) -> anyhow::Result<TransactWriteItem> {
        let now = now_millis() / 1000;
        let mut item = key(idempotency_pk(claim), "IDEMP");
        item.insert("fingerprint".into(), s(&claim.fingerprint));
        item.insert("job_id".into(), s(&job.job_id));
        item.insert(
            "expires_at".into(),
            n(now + IDEMPOTENCY_TTL.as_secs() as i64),
        );
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR expires_at < :now")
            .expression_attribute_values(":now", n(now))
            .build()?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    pub(super) async fn create(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        for _ in 0..CREATE_ATTEMPTS {
            let items = self
                .create_items(job, event, idempotency)
                .map_err(unavailable)?;
            if self.transact(items).await? {
                self.remember(&job.job_id, self.shard_policy.layout_for(job));
                return Ok(CreateOutcome::Created);
            }
            if let Some(claim) = idempotency
                && let Some(outcome) = self.idempotency_outcome(claim).await?
            {
                return Ok(outcome);
            }
            if let Some(holder) = self.active_lock_holder(job).await? {
                return Ok(CreateOutcome::ColumnBusy { job_id: holder });
            }
        }
        Err(StoreError::Contention(format!(
            "could not create job {}: the column lock kept changing",
            job.job_id
        )))
    }

    /// The job holding the column lock if it is still active; a lock left by
    /// a job that ended is removed.
    async fn active_lock_holder(&self, job: &Job) -> StoreResult<Option<String>> {
        let Some(lock_item) = self.get_item(lock_pk(job), "LOCK").await? else {
            return Ok(None);
        };
        let holder = get_s(&lock_item, "job_id").unwrap_or_default().to_string();
        let active = match self.get_item(job_pk(&holder), "JOB").await? {
            Some(item) => get_s(&item, "state")
                .and_then(JobState::parse)
                .is_some_and(|state| !state.is_terminal()),
            None => false,
        };
        if active {
            return Ok(Some(holder));
        }
        let released = retry_busy(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(lock_pk(job), "LOCK")))
                .condition_expression("job_id = :j")
                .expression_attribute_values(":j", s(&holder))
                .send()
                .await
                .map_err(|err| classify(err, "DeleteItem lock"))
        })
        .await;
        match released {
            Ok(_) | Err(Failure::Condition(_)) => Ok(None),
            Err(failure) => Err(failure.into_store_error()),
        }
    }

    async fn idempotency_outcome(
        &self,
        claim: &IdempotencyClaim,
    ) -> StoreResult<Option<CreateOutcome>> {
        let Some(item) = self.get_item(idempotency_pk(claim), "IDEMP").await? else {
            return Ok(None);
        };
        let expires_at = item
            .get("expires_at")
            .and_then(|v| v.as_n().ok())
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(i64::MAX);
        if expires_at < now_millis() / 1000 {
            return Ok(None);
        }
        let job_id = get_s(&item, "job_id").unwrap_or_default().to_string();
        Ok(Some(
            if get_s(&item, "fingerprint") == Some(claim.fingerprint.as_str()) {
                CreateOutcome::Replayed { job_id }
            } else {
                CreateOutcome::IdempotencyMismatch { job_id }
            },
        ))
    }

    pub(super) async fn job(&self, job_id: &str) -> StoreResult<Option<Job>> {
        match self.get_item(job_pk(job_id), "JOB").await? {
            Some(item) => Ok(self.jobs_of(&[item]).await?.pop()),
            None => Ok(None),
        }
    }

    /// The jobs of their records, each with its shards' counters added
    /// (one BatchGetItem for up to 100 shards).
    async fn jobs_of(&self, records: &[Item]) -> StoreResult<Vec<Job>> {
        let mut shard_keys = Vec::new();
        for record in records {
            let job_id = get_s(record, "job_id").unwrap_or_default();
            let layout = Layout::of_job_item(record);
            self.remember(job_id, layout);
            shard_keys.extend(layout.shard_counter_keys(job_id));
        }
        let counters = match shard_keys.is_empty() {
            true => Vec::new(),
            false => {
                self.batch_get(shard_keys, Read::Whole, "BatchGetItem counters")
                    .await?
            }
        };
        let mut by_job: HashMap<&str, Vec<&Item>> = HashMap::new();
        for item in &counters {
            if let Some(job_id) = job_of_counter_item(item) {
                by_job.entry(job_id).or_default().push(item);
            }
        }
        records
            .iter()
            .map(|record| {
                let mut job = job_from_item(record).map_err(unavailable)?;
                let mut parts = vec![record];
                parts.extend(by_job.remove(job.job_id.as_str()).unwrap_or_default());
                job.metrics = metrics_from_items(&parts);
                Ok(job)
            })
            .collect()
    }

    /// A page of `limit` jobs of `listing`, newest first. DynamoDB ends a
    /// query page at 1 MB of items whatever the `Limit`, so pages are read
    /// until `limit` jobs are in hand or the index has no more.
    pub(super) async fn list(
        &self,
        listing: Listing<'_>,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        let mut start = page_token
            .map(|token| start_key(token, &listing))
            .transpose()?;
        let mut jobs = Vec::new();
        loop {
            let (page, last) = self
                .query_jobs(&listing, limit - jobs.len(), start.take())
                .await?;
            jobs.extend(page);
            match last {
                Some(last) if jobs.len() < limit => start = Some(last),
                Some(last) => {
                    return Ok(JobPage {
                        jobs,
                        next_page_token: Some(page_token_of(&last)),
                    });
                }
                None => {
                    return Ok(JobPage {
                        jobs,
                        next_page_token: None,
                    });
                }
            }
        }
    }

    /// One query page of a listing, newest first, and where it ended.
    async fn query_jobs(
        &self,
        listing: &Listing<'_>,
        limit: usize,
        start: Option<Item>,
    ) -> StoreResult<(Vec<Job>, Option<Item>)> {
        let output = retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .index_name(listing.index())
                .key_condition_expression("#h = :h")
                .expression_attribute_names("#h", listing.hash_attribute())
                .expression_attribute_values(":h", s(listing.hash_value()))
                .scan_index_forward(false)
                .limit(limit as i32)
                .set_exclusive_start_key(start.clone())
                .send()
                .await
                .map_err(|err| classify(err, "Query jobs"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        let jobs = self.jobs_of(output.items()).await?;
        Ok((jobs, output.last_evaluated_key().cloned()))
    }

    pub(super) async fn move_to(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>> {
        for _ in 0..TRANSITION_ATTEMPTS {
            let Some(job) = self.job(job_id).await? else {
                return Ok(None);
            };
            if !job.state.can_become(to) {
                return Ok(None);
            }
            let mut items = self
                .transition_items(&job, to, event, error)
                .map_err(unavailable)?;
            if to == JobState::Cancelled {
                items.push(self.no_commit_in_flight(job_id).map_err(unavailable)?);
            }
            if self.transact(items).await? {
                return Ok(Some(job.state));
            }
            if to == JobState::Cancelled && self.commit_in_flight(job_id).await? {
                return Err(StoreError::CommitInFlight(job_id.to_string()));
            }
            // The state moved under us: look again.
        }
        Err(StoreError::Contention(format!(
            "job {job_id}: its state kept changing while moving it to {}",
            to.as_str()
        )))
    }

    /// The update of the job's state (conditional on the state it was read
    /// in) and, for a terminal state, the release of its column lock.
    fn transition_items(
        &self,
        job: &Job,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> anyhow::Result<Vec<TransactWriteItem>> {
        let mut sets = vec!["#state = :to", "updated_at = :now"];
        let mut values = HashMap::from([
            (":to".to_string(), s(to.as_str())),
            (":from".to_string(), s(job.state.as_str())),
            (":now".to_string(), s(now_rfc3339())),
        ]);
        let mut names = HashMap::from([("#state".to_string(), "state".to_string())]);
        if to == JobState::Running {
            // A resumed job keeps the time it first started.
            sets.push("started_at = if_not_exists(started_at, :now)");
        }
        if to.is_terminal() {
            sets.push("finished_at = :now");
        }
        if let Some(error) = error {
            sets.push("#error = :error");
            values.insert(":error".into(), s(error));
            names.insert("#error".into(), "error".into());
        }
        let update = Update::builder()
            .table_name(&self.table)
            .set_key(Some(job_key(&job.job_id)))
            .update_expression(format!("SET {}", sets.join(", ")))
            .condition_expression("#state = :from")
            .set_expression_attribute_names(Some(names))
            .set_expression_attribute_values(Some(values))
            .build()?;
        let mut items = vec![TransactWriteItem::builder().update(update).build()];
        if let Some(event) = event {
            let put = event_put(&self.table, &job.job_id, event)?;
            items.push(TransactWriteItem::builder().put(put).build());
        }
        if to.is_terminal() {
            let release = Delete::builder()
                .table_name(&self.table)
                .set_key(Some(key(lock_pk(job), "LOCK")))
                .condition_expression("attribute_not_exists(pk) OR job_id = :j")
                .expression_attribute_values(":j", s(&job.job_id))
                .build()?;
            items.push(TransactWriteItem::builder().delete(release).build());
        }
        Ok(items)
    }

    pub(super) async fn append_event(&self, job_id: &str, message: &str) -> StoreResult<()> {
        let put = event_put(&self.table, job_id, message).map_err(unavailable)?;
        retry_busy(|| async {
            self.client
                .put_item()
                .table_name(&self.table)
                .set_item(Some(put.item.clone()))
                .send()
                .await
                .map_err(|err| classify(err, "PutItem event"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        Ok(())
    }

    pub(super) async fn events(&self, job_id: &str, limit: usize) -> StoreResult<Vec<JobEvent>> {
        let output = retry_busy(|| async {
            self.client
                .query()
                .table_name(&self.table)
                .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
                .expression_attribute_values(":pk", s(job_pk(job_id)))
                .expression_attribute_values(":prefix", s(EVENT_PREFIX))
                .scan_index_forward(false)
                .limit(limit.clamp(1, MAX_EVENTS_PER_QUERY) as i32)
                .consistent_read(true)
                .send()
                .await
                .map_err(|err| classify(err, "Query events"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        let mut events: Vec<JobEvent> = output.items().iter().map(event_from_item).collect();
        events.reverse();
        Ok(events)
    }

    pub(super) async fn forget_claim(&self, claim_key: &str, job_id: &str) -> StoreResult<()> {
        let result = retry_busy(|| async {
            self.client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(format!("IDEMP#{claim_key}"), "IDEMP")))
                .condition_expression("job_id = :j")
                .expression_attribute_values(":j", s(job_id))
                .send()
                .await
                .map_err(|err| classify(err, "DeleteItem idempotency"))
        })
        .await;
        match result {
            Ok(_) | Err(Failure::Condition(_)) => Ok(()),
            Err(failure) => Err(failure.into_store_error()),
        }
    }

    pub(super) async fn add_counters(
        &self,
        job_id: &str,
        delta: &MetricsDelta,
    ) -> StoreResult<Metrics> {
        let layout = self.layout(job_id).await?;
        if delta.is_empty() || layout.is_sharded() {
            return self.add_to_a_shard(layout, job_id, delta).await;
        }
        let at = job_key(job_id);
        let counters = self.add_to_counters(at, delta).await?;
        Ok(counters.as_ref().map(metrics_from_item).unwrap_or_default())
    }

    /// Adds `delta` to a shard's counters (any shard: counters are sums),
    /// then reads the job's counters.
    async fn add_to_a_shard(
        &self,
        layout: Layout,
        job_id: &str,
        delta: &MetricsDelta,
    ) -> StoreResult<Metrics> {
        if !delta.is_empty() {
            let shard = uuid::Uuid::new_v4().as_u64_pair().0;
            self.add_to_counters(layout.counters_key(job_id, shard), delta)
                .await?;
        }
        let job = self.job(job_id).await?;
        Ok(job
            .ok_or_else(|| StoreError::NotFound(format!("job {job_id}")))?
            .metrics)
    }

    /// Adds `delta` to the counters of the item `at`; returns the item after.
    async fn add_to_counters(&self, at: Item, delta: &MetricsDelta) -> StoreResult<Option<Item>> {
        let update = counters_update(&self.table, at, delta).map_err(unavailable)?;
        let output = retry_busy(|| async {
            self.client
                .update_item()
                .table_name(&self.table)
                .set_key(Some(update.key.clone()))
                .update_expression(update.update_expression.clone())
                .set_expression_attribute_names(update.expression_attribute_names.clone())
                .set_expression_attribute_values(update.expression_attribute_values.clone())
                .return_values(ReturnValue::AllNew)
                .send()
                .await
                .map_err(|err| classify(err, "UpdateItem counters"))
        })
        .await
        .map_err(Failure::into_store_error)?;
        Ok(output.attributes)
    }
}

/// Which jobs a listing reads: one table's (index `by_table`) or every
/// table's (index `recent`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Listing<'a> {
    Table(&'a str),
    All,
}

impl Listing<'_> {
    fn index(&self) -> &'static str {
        match self {
            Self::Table(_) => BY_TABLE_INDEX,
            Self::All => RECENT_INDEX,
        }
    }

    fn hash_attribute(&self) -> &'static str {
        match self {
            Self::Table(_) => "table_key",
            Self::All => RECENT_KEY_ATTRIBUTE,
        }
    }

    fn hash_value(&self) -> &str {
        match self {
            Self::Table(key) => key,
            Self::All => RECENT_KEY,
        }
    }
}

/// The exclusive start key a page token stands for (only for its own listing).
fn start_key(token: &str, listing: &Listing<'_>) -> StoreResult<Item> {
    let value = decode_token(token).ok_or(StoreError::BadPageToken)?;
    let object = value.as_object().ok_or(StoreError::BadPageToken)?;
    let mut start = Item::new();
    for name in ["pk", "sk", listing.hash_attribute(), "created_sk"] {
        let text = object
            .get(name)
            .and_then(|v| v.as_str())
            .ok_or(StoreError::BadPageToken)?;
        start.insert(name.to_string(), s(text));
    }
    if get_s(&start, listing.hash_attribute()) != Some(listing.hash_value()) {
        return Err(StoreError::BadPageToken);
    }
    Ok(start)
}

fn page_token_of(last: &Item) -> String {
    let cursor: serde_json::Map<String, serde_json::Value> = last
        .iter()
        .filter_map(|(k, v)| {
            v.as_s()
                .ok()
                .map(|v| (k.clone(), serde_json::Value::from(v.clone())))
        })
        .collect();
    encode_token(&serde_json::Value::Object(cursor))
}
