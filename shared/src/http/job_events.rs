//! `POST /v1/jobs/query_events`: a job's events as an Arrow IPC stream, as
//! LanceDB's client reads them (`job.events(...)`), optionally filtered.
//!
//! The filter is a SQL predicate over the events' columns, kept to
//! comparisons, `AND`/`OR`/`NOT`, `IN`, `LIKE`, `BETWEEN` and `IS NULL`:
//! no function calls, so no request can make it expensive.

use std::sync::Arc;

use arrow_array::{ArrayRef, BooleanArray, Int64Array, RecordBatch, StringArray};
use arrow_schema::{DataType, Field, Schema};
use lance::deps::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use lance::deps::datafusion::prelude::Expr;
use lance::io::exec::Planner;
use lance_namespace::ErrorCode;
use serde::Deserialize;

use super::ApiError;
use crate::model::error::first_line;
use crate::model::job::{Job, JobEvent};
use crate::run::computed::limits::on_planning_stack;

/// Events a query answers when it names no `limit`, and the most it may ask.
pub const DEFAULT_EVENTS: usize = 1_000;
pub const MAX_EVENTS: usize = 10_000;
/// The longest filter accepted.
const MAX_FILTER_BYTES: usize = 4 * 1024;

#[derive(Debug, Deserialize)]
pub(super) struct EventsRequest {
    pub job_id: String,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    filter: Option<String>,
}

impl EventsRequest {
    pub(super) fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_EVENTS),
            Some(n) if (1..=MAX_EVENTS as u64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid_input(format!(
                "field 'limit' must be from 1 to {MAX_EVENTS}, got {n}"
            ))),
        }
    }
}

fn schema() -> Arc<Schema> {
    Arc::new(Schema::new(vec![
        Field::new("job_id", DataType::Utf8, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("created_at_millis", DataType::Int64, false),
        Field::new("state", DataType::Utf8, false),
        Field::new("message", DataType::Utf8, false),
        Field::new("rows_processed", DataType::Int64, true),
    ]))
}

/// The job's events (oldest first), filtered, as an Arrow IPC stream.
pub(super) fn events_stream(
    job: &Job,
    events: &[JobEvent],
    request: &EventsRequest,
) -> Result<Vec<u8>, ApiError> {
    let batch = events_batch(job, events)?;
    let batch = match request.filter.as_deref().filter(|f| !f.trim().is_empty()) {
        Some(filter) => filtered(&batch, filter)?,
        None => batch,
    };
    let mut out = Vec::new();
    let mut writer =
        arrow_ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).map_err(internal)?;
    writer.write(&batch).map_err(internal)?;
    writer.finish().map_err(internal)?;
    drop(writer);
    Ok(out)
}

fn events_batch(job: &Job, events: &[JobEvent]) -> Result<RecordBatch, ApiError> {
    let millis = |at: &str| {
        chrono::DateTime::parse_from_rfc3339(at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0)
    };
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![job.job_id.as_str(); events.len()])),
        Arc::new(Int64Array::from_iter_values(0..events.len() as i64)),
        Arc::new(Int64Array::from_iter_values(
            events.iter().map(|e| millis(&e.at)),
        )),
        Arc::new(StringArray::from_iter_values(
            events.iter().map(|e| event_kind(&e.message)),
        )),
        Arc::new(StringArray::from_iter_values(
            events.iter().map(|e| e.message.as_str()),
        )),
        Arc::new(Int64Array::from_iter(
            events.iter().map(|e| rows_in(&e.message)),
        )),
    ];
    RecordBatch::try_new(schema(), columns).map_err(internal)
}

/// What an event says happened, in a word: its message's first word
/// (`planned`, `running`, `committed`, `paused`, `done`, ...).
fn event_kind(message: &str) -> &str {
    message
        .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
        .next()
        .unwrap_or("")
}

/// The rows an event counts, where it names them ("... (1000 rows) ...").
fn rows_in(message: &str) -> Option<i64> {
    let (before, _) = message.split_once(" rows")?;
    let digits = before.rsplit(|c: char| !c.is_ascii_digit()).next()?;
    digits.parse().ok()
}

fn filtered(batch: &RecordBatch, filter: &str) -> Result<RecordBatch, ApiError> {
    if filter.len() > MAX_FILTER_BYTES {
        return Err(ApiError::invalid_input(format!(
            "field 'filter' is longer than {MAX_FILTER_BYTES} bytes"
        )));
    }
    let bad = |err: &dyn std::fmt::Display| {
        ApiError::invalid_input(format!("invalid filter '{filter}': {}", first_line(err)))
    };
    let schema = batch.schema();
    on_planning_stack(|| {
        let planner = Planner::new(schema.clone());
        let expr = planner.parse_expr(filter).map_err(|e| bad(&e))?;
        only_plain_predicates(&expr).map_err(|e| bad(&e))?;
        let physical = planner.create_physical_expr(&expr).map_err(|e| bad(&e))?;
        let kept = physical
            .evaluate(batch)
            .and_then(|value| value.into_array(batch.num_rows()))
            .map_err(|e| bad(&e))?;
        let kept = kept
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| bad(&"the filter is not a true/false condition"))?;
        arrow_select::filter::filter_record_batch(batch, kept).map_err(|e| bad(&e))
    })
}

/// Refuses function calls, subqueries and anything but plain predicates.
fn only_plain_predicates(expr: &Expr) -> Result<(), String> {
    let mut refused = None;
    let _ = expr.apply(|node| {
        let plain = matches!(
            node,
            Expr::Column(_)
                | Expr::Literal(..)
                | Expr::BinaryExpr(_)
                | Expr::Not(_)
                | Expr::IsNull(_)
                | Expr::IsNotNull(_)
                | Expr::IsTrue(_)
                | Expr::IsFalse(_)
                | Expr::Negative(_)
                | Expr::Between(_)
                | Expr::Like(_)
                | Expr::InList(_)
                | Expr::Cast(_)
        );
        if plain {
            Ok(TreeNodeRecursion::Continue)
        } else {
            refused = Some(node.schema_name().to_string());
            Ok(TreeNodeRecursion::Stop)
        }
    });
    match refused {
        None => Ok(()),
        Some(what) => Err(format!(
            "only comparisons, AND/OR/NOT, IN, LIKE, BETWEEN and IS NULL are allowed, not {what}"
        )),
    }
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError::coded(ErrorCode::Internal, format!("writing the events: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_says_what_happened_and_how_many_rows() {
        assert_eq!(
            event_kind("committed fragments 0 (10 rows) as version 4"),
            "committed"
        );
        assert_eq!(event_kind("running: first task started on w"), "running");
        assert_eq!(
            rows_in("committed fragments 0 (1000 rows) as version 4"),
            Some(1000)
        );
        assert_eq!(
            rows_in("planned 2 tasks over 2 fragments (20 rows) at version 3"),
            Some(20)
        );
        assert_eq!(rows_in("paused by admin"), None);
    }
}
