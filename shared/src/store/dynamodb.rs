//! The job store on DynamoDB: one table, items keyed by `pk`/`sk`, a sparse
//! GSI `by_table` for listing a table's jobs newest first. Every state change
//! that must happen once (a task counted, a fragment staged or committed) is
//! a conditional write or a transaction, so repeated deliveries are harmless.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, anyhow};
use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, Delete, GlobalSecondaryIndex,
    KeySchemaElement, KeyType, Projection, ProjectionType, Put, ReturnValue, ScalarAttributeType,
    TransactWriteItem, Update,
};
use futures::{StreamExt, TryStreamExt};

use super::{
    BadPageToken, CreateOutcome, FragmentRecord, FragmentStatus, IdempotencyClaim, JobPage,
    JobStore, StagedFragment, StoreResult, TaskMark, column_lock_key, decode_token, encode_token,
};
use crate::job::{
    Counter, Job, JobEvent, JobSpec, JobState, Metrics, MetricsDelta, now_millis, now_rfc3339,
};

pub const BY_TABLE_INDEX: &str = "by_table";
/// Idempotency records expire after a day (DynamoDB TTL on `expires_at`).
const IDEMPOTENCY_TTL_SECS: i64 = 24 * 3600;

type Item = HashMap<String, AttributeValue>;

#[derive(Clone)]
pub struct DynamoJobStore {
    client: Client,
    table: String,
}

fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

fn job_pk(job_id: &str) -> String {
    format!("JOB#{job_id}")
}

fn fragment_sk(fragment_id: u64) -> String {
    format!("FRAG#{fragment_id:020}")
}

fn staged_sk(fragment_id: u64) -> String {
    format!("STAGED#{fragment_id:020}")
}

fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

fn metric_attr(counter: Counter) -> String {
    format!("m_{}", counter.name())
}

fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

fn is_condition_failure<E, R>(err: &SdkError<E, R>) -> bool
where
    E: aws_sdk_dynamodb::error::ProvideErrorMetadata,
{
    match err {
        SdkError::ServiceError(service) => matches!(
            service.err().code(),
            Some("ConditionalCheckFailedException") | Some("TransactionCanceledException")
        ),
        _ => false,
    }
}

fn job_from_item(item: &Item) -> anyhow::Result<Job> {
    let job_id = get_s(item, "job_id").context("job item without job_id")?;
    let spec: JobSpec = serde_json::from_str(get_s(item, "spec").context("job item without spec")?)
        .context("job spec")?;
    let state = get_s(item, "state")
        .and_then(JobState::parse)
        .context("job state")?;
    let events = match item.get("events") {
        Some(AttributeValue::L(list)) => list
            .iter()
            .filter_map(|v| v.as_s().ok())
            .filter_map(|text| serde_json::from_str::<JobEvent>(text).ok())
            .collect(),
        _ => Vec::new(),
    };
    Ok(Job {
        job_id: job_id.to_string(),
        spec,
        state,
        created_at: get_s(item, "created_at").unwrap_or_default().to_string(),
        updated_at: get_s(item, "updated_at").unwrap_or_default().to_string(),
        started_at: get_s(item, "started_at").map(str::to_string),
        finished_at: get_s(item, "finished_at").map(str::to_string),
        error: get_s(item, "error").map(str::to_string),
        metrics: metrics_from_item(item),
        events,
    })
}

fn metrics_from_item(item: &Item) -> Metrics {
    let mut metrics = Metrics::default();
    for counter in Counter::ALL {
        if let Some(value) = get_n(item, &metric_attr(counter)) {
            metrics.set(counter, value);
        }
    }
    metrics
}

fn event_value(message: &str) -> anyhow::Result<AttributeValue> {
    Ok(AttributeValue::L(vec![s(serde_json::to_string(
        &JobEvent {
            at: now_rfc3339(),
            message: message.to_string(),
        },
    )?)]))
}

/// An `ADD` update of counters on the job item.
fn counters_update(table: &str, job_id: &str, delta: &MetricsDelta) -> anyhow::Result<Update> {
    let mut names = HashMap::new();
    let mut values = HashMap::new();
    let mut parts = Vec::new();
    for (i, (counter, by)) in delta.0.iter().enumerate() {
        names.insert(format!("#c{i}"), metric_attr(*counter));
        values.insert(format!(":c{i}"), n(by));
        parts.push(format!("#c{i} :c{i}"));
    }
    Ok(Update::builder()
        .table_name(table)
        .set_key(Some(key(job_pk(job_id), "JOB")))
        .update_expression(format!("ADD {}", parts.join(", ")))
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()?)
}

impl DynamoJobStore {
    pub fn new(client: Client, table: impl Into<String>) -> Self {
        Self {
            client,
            table: table.into(),
        }
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
            .key_schema(key_el("pk", KeyType::Hash)?)
            .key_schema(key_el("sk", KeyType::Range)?)
            .global_secondary_indexes(
                GlobalSecondaryIndex::builder()
                    .index_name(BY_TABLE_INDEX)
                    .key_schema(key_el("table_key", KeyType::Hash)?)
                    .key_schema(key_el("created_sk", KeyType::Range)?)
                    .projection(
                        Projection::builder()
                            .projection_type(ProjectionType::All)
                            .build(),
                    )
                    .build()?,
            )
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

    async fn get_item(&self, pk: String, sk: &str) -> anyhow::Result<Option<Item>> {
        let output = self
            .client
            .get_item()
            .table_name(&self.table)
            .set_key(Some(key(pk, sk)))
            .consistent_read(true)
            .send()
            .await
            .context("GetItem")?;
        Ok(output.item)
    }

    async fn job_item(&self, job_id: &str) -> anyhow::Result<Option<Item>> {
        self.get_item(job_pk(job_id), "JOB").await
    }

    async fn transact(&self, items: Vec<TransactWriteItem>) -> anyhow::Result<bool> {
        match self
            .client
            .transact_write_items()
            .set_transact_items(Some(items))
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(err) if is_condition_failure(&err) => Ok(false),
            Err(err) => Err(anyhow!(err.into_service_error()).context("TransactWriteItems")),
        }
    }

    fn job_put(&self, job: &Job) -> anyhow::Result<Put> {
        let created_ms = now_millis();
        let mut item = key(job_pk(&job.job_id), "JOB");
        item.insert("job_id".into(), s(&job.job_id));
        item.insert("table_key".into(), s(job.spec.table_id.key()));
        item.insert(
            "created_sk".into(),
            s(format!("{created_ms:015}#{}", job.job_id)),
        );
        item.insert("state".into(), s(job.state.as_str()));
        item.insert("spec".into(), s(serde_json::to_string(&job.spec)?));
        item.insert("created_at".into(), s(&job.created_at));
        item.insert("updated_at".into(), s(&job.updated_at));
        item.insert(
            "events".into(),
            AttributeValue::L(
                job.events
                    .iter()
                    .map(|e| serde_json::to_string(e).map(s))
                    .collect::<Result<_, _>>()?,
            ),
        );
        for counter in Counter::ALL {
            item.insert(metric_attr(counter), n(job.metrics.get(counter)));
        }
        Ok(Put::builder()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk)")
            .build()?)
    }

    async fn idempotency_outcome(
        &self,
        claim: &IdempotencyClaim,
    ) -> anyhow::Result<Option<CreateOutcome>> {
        let Some(item) = self
            .get_item(format!("IDEMP#{}", claim.key), "IDEMP")
            .await?
        else {
            return Ok(None);
        };
        let job_id = get_s(&item, "job_id").unwrap_or_default().to_string();
        Ok(Some(
            if get_s(&item, "fingerprint") == Some(claim.fingerprint.as_str()) {
                CreateOutcome::Replayed { job_id }
            } else {
                CreateOutcome::IdempotencyMismatch { job_id }
            },
        ))
    }
}

#[async_trait]
impl JobStore for DynamoJobStore {
    async fn create_job(
        &self,
        job: &Job,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        let lock_pk = format!("LOCK#{}", column_lock_key(job));
        // A lock left by a job that already ended is released and the put retried.
        for _ in 0..3 {
            let mut items = vec![TransactWriteItem::builder().put(self.job_put(job)?).build()];
            let mut lock = key(lock_pk.clone(), "LOCK");
            lock.insert("job_id".into(), s(&job.job_id));
            items.push(
                TransactWriteItem::builder()
                    .put(
                        Put::builder()
                            .table_name(&self.table)
                            .set_item(Some(lock))
                            .condition_expression("attribute_not_exists(pk)")
                            .build()?,
                    )
                    .build(),
            );
            if let Some(claim) = idempotency {
                let mut item = key(format!("IDEMP#{}", claim.key), "IDEMP");
                item.insert("fingerprint".into(), s(&claim.fingerprint));
                item.insert("job_id".into(), s(&job.job_id));
                item.insert(
                    "expires_at".into(),
                    n(now_millis() / 1000 + IDEMPOTENCY_TTL_SECS),
                );
                items.push(
                    TransactWriteItem::builder()
                        .put(
                            Put::builder()
                                .table_name(&self.table)
                                .set_item(Some(item))
                                .condition_expression("attribute_not_exists(pk)")
                                .build()?,
                        )
                        .build(),
                );
            }
            if self.transact(items).await? {
                return Ok(CreateOutcome::Created);
            }
            if let Some(claim) = idempotency
                && let Some(outcome) = self.idempotency_outcome(claim).await?
            {
                return Ok(outcome);
            }
            let Some(lock_item) = self.get_item(lock_pk.clone(), "LOCK").await? else {
                continue;
            };
            let holder = get_s(&lock_item, "job_id").unwrap_or_default().to_string();
            let active = match self.job_item(&holder).await? {
                Some(item) => get_s(&item, "state")
                    .and_then(JobState::parse)
                    .map(|state| !state.is_terminal())
                    .unwrap_or(false),
                None => false,
            };
            if active {
                return Ok(CreateOutcome::ColumnBusy { job_id: holder });
            }
            let _ = self
                .client
                .delete_item()
                .table_name(&self.table)
                .set_key(Some(key(lock_pk.clone(), "LOCK")))
                .condition_expression("job_id = :j")
                .expression_attribute_values(":j", s(&holder))
                .send()
                .await;
        }
        Err(anyhow!(
            "could not create job {}: the column lock kept changing",
            job.job_id
        ))
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Option<Job>> {
        match self.job_item(job_id).await? {
            Some(item) => Ok(Some(job_from_item(&item)?)),
            None => Ok(None),
        }
    }

    async fn list_jobs(
        &self,
        table_key: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        let start = match page_token {
            Some(token) => {
                let value = decode_token(token).ok_or(BadPageToken)?;
                let object = value.as_object().ok_or(BadPageToken)?;
                let mut start = Item::new();
                for name in ["pk", "sk", "table_key", "created_sk"] {
                    let text = object
                        .get(name)
                        .and_then(|v| v.as_str())
                        .ok_or(BadPageToken)?;
                    start.insert(name.to_string(), s(text));
                }
                if get_s(&start, "table_key") != Some(table_key) {
                    return Err(BadPageToken.into());
                }
                Some(start)
            }
            None => None,
        };
        let output = self
            .client
            .query()
            .table_name(&self.table)
            .index_name(BY_TABLE_INDEX)
            .key_condition_expression("table_key = :t")
            .expression_attribute_values(":t", s(table_key))
            .scan_index_forward(false)
            .limit(limit as i32)
            .set_exclusive_start_key(start)
            .send()
            .await
            .context("Query by_table")?;
        let jobs = output
            .items()
            .iter()
            .map(job_from_item)
            .collect::<anyhow::Result<Vec<_>>>()?;
        let next_page_token = output
            .last_evaluated_key()
            .filter(|_| jobs.len() == limit)
            .map(|last| {
                let cursor: serde_json::Map<String, serde_json::Value> = last
                    .iter()
                    .filter_map(|(k, v)| {
                        v.as_s()
                            .ok()
                            .map(|v| (k.clone(), serde_json::Value::from(v.clone())))
                    })
                    .collect();
                encode_token(&serde_json::Value::Object(cursor))
            });
        Ok(JobPage {
            jobs,
            next_page_token,
        })
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>> {
        loop {
            let Some(job) = self.get_job(job_id).await? else {
                return Ok(None);
            };
            if !job.state.can_become(to) {
                return Ok(None);
            }
            let now = now_rfc3339();
            let mut sets = vec!["#state = :to", "updated_at = :now"];
            let mut values = HashMap::from([
                (":to".to_string(), s(to.as_str())),
                (":from".to_string(), s(job.state.as_str())),
                (":now".to_string(), s(&now)),
            ]);
            if to == JobState::Running {
                sets.push("started_at = :now");
            }
            if to.is_terminal() {
                sets.push("finished_at = :now");
            }
            let mut names = HashMap::from([("#state".to_string(), "state".to_string())]);
            if let Some(error) = error {
                sets.push("#error = :error");
                values.insert(":error".into(), s(error));
                names.insert("#error".into(), "error".into());
            }
            if let Some(event) = event {
                sets.push("events = list_append(if_not_exists(events, :empty), :event)");
                values.insert(":event".into(), event_value(event)?);
                values.insert(":empty".into(), AttributeValue::L(vec![]));
            }
            let update = Update::builder()
                .table_name(&self.table)
                .set_key(Some(key(job_pk(job_id), "JOB")))
                .update_expression(format!("SET {}", sets.join(", ")))
                .condition_expression("#state = :from")
                .set_expression_attribute_names(Some(names))
                .set_expression_attribute_values(Some(values))
                .build()?;
            let mut items = vec![TransactWriteItem::builder().update(update).build()];
            if to.is_terminal() {
                items.push(
                    TransactWriteItem::builder()
                        .delete(
                            Delete::builder()
                                .table_name(&self.table)
                                .set_key(Some(key(
                                    format!("LOCK#{}", column_lock_key(&job)),
                                    "LOCK",
                                )))
                                .condition_expression("attribute_not_exists(pk) OR job_id = :j")
                                .expression_attribute_values(":j", s(job_id))
                                .build()?,
                        )
                        .build(),
                );
            }
            if self.transact(items).await? {
                return Ok(Some(job.state));
            }
            // The state moved under us: look again.
        }
    }

    async fn add_event(&self, job_id: &str, message: &str) -> StoreResult<()> {
        self.client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), "JOB")))
            .update_expression("SET events = list_append(if_not_exists(events, :empty), :event), updated_at = :now")
            .condition_expression("attribute_exists(pk)")
            .expression_attribute_values(":event", event_value(message)?)
            .expression_attribute_values(":empty", AttributeValue::L(vec![]))
            .expression_attribute_values(":now", s(now_rfc3339()))
            .send()
            .await
            .context("UpdateItem events")?;
        Ok(())
    }

    async fn add_metrics(&self, job_id: &str, delta: &MetricsDelta) -> StoreResult<Metrics> {
        if delta.is_empty() {
            let item = self.job_item(job_id).await?.context("job not found")?;
            return Ok(metrics_from_item(&item));
        }
        let update = counters_update(&self.table, job_id, delta)?;
        let output = self
            .client
            .update_item()
            .table_name(&self.table)
            .set_key(Some(update.key))
            .update_expression(update.update_expression)
            .set_expression_attribute_names(update.expression_attribute_names)
            .set_expression_attribute_values(update.expression_attribute_values)
            .return_values(ReturnValue::AllNew)
            .send()
            .await
            .context("UpdateItem counters")?;
        Ok(output
            .attributes
            .as_ref()
            .map(metrics_from_item)
            .unwrap_or_default())
    }

    async fn get_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<FragmentRecord> {
        let item = self
            .get_item(job_pk(job_id), &fragment_sk(fragment_id))
            .await?;
        Ok(match item {
            None => FragmentRecord {
                status: FragmentStatus::Open,
                tasks_done: Vec::new(),
            },
            Some(item) => {
                let mut tasks_done: Vec<u32> = match item.get("tasks") {
                    Some(AttributeValue::Ns(values)) => {
                        values.iter().filter_map(|v| v.parse().ok()).collect()
                    }
                    _ => Vec::new(),
                };
                tasks_done.sort_unstable();
                FragmentRecord {
                    status: get_s(&item, "status")
                        .map(FragmentStatus::parse)
                        .unwrap_or(FragmentStatus::Open),
                    tasks_done,
                }
            }
        })
    }

    async fn mark_task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
    ) -> StoreResult<TaskMark> {
        let record = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), fragment_sk(fragment_id))))
            .update_expression("ADD tasks :t")
            .condition_expression("attribute_not_exists(tasks) OR NOT contains(tasks, :n)")
            .expression_attribute_values(":t", AttributeValue::Ns(vec![task.to_string()]))
            .expression_attribute_values(":n", n(task))
            .build()?;
        let count = counters_update(
            &self.table,
            job_id,
            &MetricsDelta::new().add(Counter::TasksDone, 1),
        )?;
        let newly_done = self
            .transact(vec![
                TransactWriteItem::builder().update(record).build(),
                TransactWriteItem::builder().update(count).build(),
            ])
            .await?;
        let fragment = self.get_fragment(job_id, fragment_id).await?;
        Ok(TaskMark {
            newly_done,
            tasks_done: fragment.tasks_done.len() as u32,
        })
    }

    async fn stage_fragment(&self, job_id: &str, staged: &StagedFragment) -> StoreResult<bool> {
        let status = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), fragment_sk(staged.fragment_id))))
            .update_expression("SET #status = :staged")
            .condition_expression("attribute_not_exists(#status)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":staged", s(FragmentStatus::Staged.as_str()))
            .build()?;
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
        self.transact(vec![
            TransactWriteItem::builder().update(status).build(),
            TransactWriteItem::builder().put(pending).build(),
            TransactWriteItem::builder().update(count).build(),
        ])
        .await
    }

    async fn skip_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<bool> {
        let status = Update::builder()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), fragment_sk(fragment_id))))
            .update_expression("SET #status = :skipped")
            .condition_expression("attribute_not_exists(#status)")
            .expression_attribute_names("#status", "status")
            .expression_attribute_values(":skipped", s(FragmentStatus::Skipped.as_str()))
            .build()?;
        let count = counters_update(
            &self.table,
            job_id,
            &MetricsDelta::new().add(Counter::FragmentsSkipped, 1),
        )?;
        self.transact(vec![
            TransactWriteItem::builder().update(status).build(),
            TransactWriteItem::builder().update(count).build(),
        ])
        .await
    }

    async fn staged_fragments(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        let pages = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("pk = :pk AND begins_with(sk, :prefix)")
            .expression_attribute_values(":pk", s(job_pk(job_id)))
            .expression_attribute_values(":prefix", s("STAGED#"))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        let items: Vec<Item> = pages
            .try_collect()
            .await
            .context("Query staged fragments")?;
        items
            .iter()
            .map(|item| {
                let text = get_s(item, "staged").context("staged item without body")?;
                Ok(serde_json::from_str(text)?)
            })
            .collect()
    }

    async fn mark_committed(&self, job_id: &str, fragments: &[StagedFragment]) -> StoreResult<()> {
        let fragment_ops = |fragment: &StagedFragment| -> anyhow::Result<Vec<TransactWriteItem>> {
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
        };
        let counts = |group: &[StagedFragment]| {
            counters_update(
                &self.table,
                job_id,
                &MetricsDelta::new()
                    .add(Counter::FragmentsCommitted, group.len() as i64)
                    .add(
                        Counter::RowsCommitted,
                        group.iter().map(|f| f.rows as i64).sum(),
                    ),
            )
        };
        // 49 fragments x 2 writes + 1 counter update stays within DynamoDB's
        // 100 items per transaction.
        let chunks: Vec<Vec<StagedFragment>> = fragments
            .chunks(49)
            .map(<[StagedFragment]>::to_vec)
            .collect();
        futures::stream::iter(chunks)
            .map(|chunk| async move {
                let chunk = chunk.as_slice();
                let mut items = Vec::new();
                for fragment in chunk {
                    items.extend(fragment_ops(fragment)?);
                }
                items.push(TransactWriteItem::builder().update(counts(chunk)?).build());
                if self.transact(items).await? {
                    return Ok::<_, anyhow::Error>(());
                }
                // Some fragment of the chunk was already committed (a lease
                // that expired under a slow holder): count the rest one by one.
                for fragment in chunk {
                    let mut items = fragment_ops(fragment)?;
                    items.push(
                        TransactWriteItem::builder()
                            .update(counts(std::slice::from_ref(fragment))?)
                            .build(),
                    );
                    self.transact(items).await?;
                }
                Ok(())
            })
            .buffer_unordered(8)
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    async fn try_lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let now = now_millis();
        let mut item = key(job_pk(job_id), format!("LEASE#{name}"));
        item.insert("owner".into(), s(owner));
        item.insert("until".into(), n(now + ttl.as_millis() as i64));
        let result = self
            .client
            .put_item()
            .table_name(&self.table)
            .set_item(Some(item))
            .condition_expression("attribute_not_exists(pk) OR #until < :now OR #owner = :owner")
            .expression_attribute_names("#until", "until")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":now", n(now))
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(true),
            Err(err) if is_condition_failure(&err) => Ok(false),
            Err(err) => Err(anyhow!(err.into_service_error()).context("PutItem lease")),
        }
    }

    async fn release_lease(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()> {
        let result = self
            .client
            .delete_item()
            .table_name(&self.table)
            .set_key(Some(key(job_pk(job_id), format!("LEASE#{name}"))))
            .condition_expression("#owner = :owner")
            .expression_attribute_names("#owner", "owner")
            .expression_attribute_values(":owner", s(owner))
            .send()
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if is_condition_failure(&err) => Ok(()),
            Err(err) => Err(anyhow!(err.into_service_error()).context("DeleteItem lease")),
        }
    }
}
