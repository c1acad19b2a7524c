//! A job as the API shows it: state, parameters, metrics with done/total,
//! events.

use serde_json::{Value, json};

use crate::model::job::{Counter, Job, JobEvent, Metrics};
use crate::ports::store::RowFailure;
use crate::run::commit::MAX_CONFLICT_RETRIES;

pub(crate) fn metrics_json(metrics: &Metrics) -> Value {
    let pair = |done: u64, total: u64| json!({ "done": done, "total": total });
    let total_rows = metrics.get(Counter::RowsTotal);
    let commits_planned = metrics.get(Counter::CommitsPlanned);
    json!({
        "fragments": pair(metrics.fragments_finished(), metrics.get(Counter::FragmentsTotal)),
        "fragments_skipped": metrics.get(Counter::FragmentsSkipped),
        "fragments_moved": metrics.get(Counter::FragmentsMoved),
        "fragments_replanned": metrics.get(Counter::FragmentsReplanned),
        "rows_replanned": metrics.get(Counter::RowsReplanned),
        "commits_rebased": metrics.get(Counter::CommitsRebased),
        "tasks": pair(metrics.get(Counter::TasksDone), metrics.get(Counter::TasksTotal)),
        "rows_computed": pair(metrics.get(Counter::RowsComputed), total_rows),
        "rows_checkpointed": pair(metrics.get(Counter::RowsCheckpointed), total_rows),
        "rows_committed": pair(metrics.get(Counter::RowsCommitted), total_rows),
        "rows_failed": metrics.get(Counter::RowsFailed),
        "commits": pair(metrics.get(Counter::CommitsDone), commits_planned.max(metrics.get(Counter::CommitsDone))),
        "commit_conflict_retries": pair(
            metrics.get(Counter::ConflictRetries),
            MAX_CONFLICT_RETRIES as u64 * commits_planned.max(1)
        ),
    })
}

/// A job's own page adds its latest events and the first rows a user
/// function raised on.
pub(crate) struct Details<'a> {
    pub events: &'a [JobEvent],
    pub row_failures: &'a [RowFailure],
}

/// The job; with `details`, as its own page shows it.
pub(crate) fn job_json(job: &Job, details: Option<Details<'_>>) -> Value {
    let spec = &job.spec;
    let p = &spec.params;
    let mut value = json!({
        "job_id": job.job_id,
        "table_id": spec.table_id.0,
        "column": spec.column,
        "columns": spec.columns(),
        "expression": spec.expression,
        "udf": spec.udf.as_ref().map(|udf| json!({
            "name": udf.udf_name,
            "version": udf.udf_version,
            "id": udf.udf_id,
            "image": udf.image,
            "input_columns": udf.input_columns,
        })),
        "state": job.state.as_str(),
        "error": job.error,
        "read_version": spec.read_version,
        "submitted_by": spec.submitted_by,
        "parameters": {
            "branch": spec.branch.clone().unwrap_or_else(|| "main".to_string()),
            "where": spec.filter,
            "read_version": spec.read_version,
            "concurrency": p.concurrency,
            "intra_applier_concurrency": p.intra_applier_concurrency,
            "task_size": p.task_size,
            "num_frags": p.num_frags,
            "checkpoint_size": p.checkpoint_size,
            "min_checkpoint_size": p.min_checkpoint_size,
            "max_checkpoint_size": p.max_checkpoint_size,
            "adaptive_checkpoint_size": p.adaptive_checkpoint,
            "batch_checkpoint_flush_interval_seconds": p.flush_interval.as_secs_f64(),
            "commit_granularity": p.commit_granularity,
            "cluster": p.cluster,
            "manifest": p.manifest,
            "on_error": spec.options.on_error,
            "max_skip_fraction": spec.options.max_skip_fraction,
            "context": spec.options.other,
            "skip_frags": spec.skip_fragments,
            "ignored_fields": spec.ignored_fields,
        },
        "plan": spec.plan,
        "metrics": metrics_json(&job.metrics),
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
    });
    if let Some(details) = details {
        value["events"] = json!(details.events);
        value["row_failures"] = json!(details.row_failures);
    }
    value
}
