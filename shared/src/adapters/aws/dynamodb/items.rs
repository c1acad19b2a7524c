//! The table's items: keys, attribute values, and a job read back from its
//! item. AWS types stay in this adapter.

use std::collections::HashMap;

use anyhow::Context;
use aws_sdk_dynamodb::types::{AttributeValue, ConditionCheck, Put, Update};

use crate::model::job::{Counter, Job, JobEvent, JobSpec, JobState, Metrics, MetricsDelta};

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

pub(super) fn n(value: impl ToString) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

pub(super) fn job_pk(job_id: &str) -> String {
    format!("JOB#{job_id}")
}

pub(super) fn fragment_sk(fragment_id: u64) -> String {
    format!("FRAG#{fragment_id:020}")
}

pub(super) fn staged_sk(fragment_id: u64) -> String {
    format!("STAGED#{fragment_id:020}")
}

pub(super) fn lease_sk(name: &str) -> String {
    format!("LEASE#{name}")
}

pub(super) fn key(pk: impl Into<String>, sk: impl Into<String>) -> Item {
    HashMap::from([("pk".to_string(), s(pk)), ("sk".to_string(), s(sk))])
}

pub(super) fn job_key(job_id: &str) -> Item {
    key(job_pk(job_id), "JOB")
}

fn metric_attr(counter: Counter) -> String {
    format!("m_{}", counter.name())
}

pub(super) fn get_s<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name)
        .and_then(|v| v.as_s().ok())
        .map(String::as_str)
}

fn get_n(item: &Item, name: &str) -> Option<i64> {
    item.get(name)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
}

pub(super) fn job_from_item(item: &Item) -> anyhow::Result<Job> {
    let job_id = get_s(item, "job_id").context("job item without job_id")?;
    let spec: JobSpec = serde_json::from_str(get_s(item, "spec").context("job item without spec")?)
        .context("job spec")?;
    let state = get_s(item, "state")
        .and_then(JobState::parse)
        .context("job state")?;
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
    })
}

pub(super) fn metrics_from_item(item: &Item) -> Metrics {
    metrics_from_items(&[item])
}

/// The counters of `items` (a job's record and its shards' counter items)
/// added up: a shard may hold a negative part of a counter.
pub(super) fn metrics_from_items(items: &[&Item]) -> Metrics {
    let mut metrics = Metrics::default();
    for counter in Counter::ALL {
        let name = metric_attr(counter);
        let values: Vec<i64> = items.iter().filter_map(|i| get_n(i, &name)).collect();
        if !values.is_empty() {
            metrics.set(counter, values.iter().sum());
        }
    }
    metrics
}

/// An event of a job: an item of its own, sorted by time under the job.
pub(super) fn event_put(table: &str, job_id: &str, message: &str) -> anyhow::Result<Put> {
    let event = JobEvent::now(message);
    let micros = chrono::Utc::now().timestamp_micros();
    let unique = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let mut item = key(
        job_pk(job_id),
        format!("{EVENT_PREFIX}{micros:020}#{unique}"),
    );
    item.insert("at".into(), s(event.at));
    item.insert("message".into(), s(event.message));
    Ok(Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .build()?)
}

pub(super) const EVENT_PREFIX: &str = "EVENT#";

pub(super) fn event_from_item(item: &Item) -> JobEvent {
    JobEvent {
        at: get_s(item, "at").unwrap_or_default().to_string(),
        message: get_s(item, "message").unwrap_or_default().to_string(),
    }
}

/// The prefix of the task records of a fragment.
pub(super) fn task_prefix(fragment_id: u64) -> String {
    format!("TASK#{fragment_id:020}#")
}

pub(super) fn task_sk(fragment_id: u64, task: u32) -> String {
    format!("{}{task:010}", task_prefix(fragment_id))
}

/// The new job's item, written only if no item has its key.
pub(super) fn job_put(table: &str, job: &Job, created_ms: i64) -> anyhow::Result<Put> {
    let mut item = job_key(&job.job_id);
    item.insert("job_id".into(), s(&job.job_id));
    item.insert("table_key".into(), s(job.spec.table_id.key()));
    item.insert(super::RECENT_KEY_ATTRIBUTE.into(), s(super::RECENT_KEY));
    item.insert(
        "created_sk".into(),
        s(format!("{created_ms:015}#{}", job.job_id)),
    );
    item.insert("state".into(), s(job.state.as_str()));
    item.insert("spec".into(), s(serde_json::to_string(&job.spec)?));
    item.insert("created_at".into(), s(&job.created_at));
    item.insert("updated_at".into(), s(&job.updated_at));
    for counter in Counter::ALL {
        item.insert(metric_attr(counter), n(job.metrics.get(counter)));
    }
    create_only(table, item)
}

/// A put of an item that must not exist yet.
pub(super) fn create_only(table: &str, item: Item) -> anyhow::Result<Put> {
    Ok(Put::builder()
        .table_name(table)
        .set_item(Some(item))
        .condition_expression("attribute_not_exists(pk)")
        .build()?)
}

/// The condition that the job is PENDING, RUNNING or PAUSED, with its names
/// and values, on the job's record.
pub(super) fn while_active() -> (&'static str, Item, HashMap<String, String>) {
    let values = HashMap::from([
        (":pending".to_string(), s(JobState::Pending.as_str())),
        (":running".to_string(), s(JobState::Running.as_str())),
        (":paused".to_string(), s(JobState::Paused.as_str())),
    ]);
    let names = HashMap::from([("#state".to_string(), "state".to_string())]);
    ("#state IN (:pending, :running, :paused)", values, names)
}

/// A transaction's check that the job is PENDING, RUNNING or PAUSED.
pub(super) fn job_active_check(table: &str, job_id: &str) -> anyhow::Result<ConditionCheck> {
    let (condition, values, names) = while_active();
    Ok(ConditionCheck::builder()
        .table_name(table)
        .set_key(Some(job_key(job_id)))
        .condition_expression(condition)
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()?)
}

/// An `ADD` update of counters on the item `at` (a job's record, or a
/// counter item of one of its shards).
pub(super) fn counters_update(
    table: &str,
    at: Item,
    delta: &MetricsDelta,
) -> anyhow::Result<Update> {
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
        .set_key(Some(at))
        .update_expression(format!("ADD {}", parts.join(", ")))
        .set_expression_attribute_names(Some(names))
        .set_expression_attribute_values(Some(values))
        .build()?)
}
