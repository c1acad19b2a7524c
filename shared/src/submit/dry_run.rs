//! A dry run's answer: what the job would do (fragments, tasks, rows,
//! commits) and what it would take on AWS (`model::estimate`).

use crate::model::estimate::{self, Estimate, Function, Shape};
use crate::model::job::{Job, Params};

/// What a backfill would do, as a dry run answers it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DryRunPlan {
    pub dry_run: bool,
    pub column: String,
    pub columns: Vec<String>,
    pub expression: String,
    #[serde(rename = "where")]
    pub filter: String,
    pub read_version: u64,
    /// Fragments the job would fill, tasks it would queue, rows it would
    /// read (the `where` picks which of them get values) and commits.
    pub fragments: u64,
    pub tasks: u64,
    pub rows: u64,
    pub commits: u64,
    pub fragment_ids: Vec<u64>,
    pub skipped_fragments: Vec<u64>,
    pub parameters: Params,
    /// Its wall time at its `concurrency`, Lambda-seconds, requests and
    /// dollars on AWS, and what bounds it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<Estimate>,
}

impl DryRunPlan {
    /// The plan of `job` over `fragment_ids`; `function_ms_per_1k_rows` is
    /// the caller's figure for a Python function's own time.
    pub fn of(job: &Job, fragment_ids: Vec<u64>, function_ms_per_1k_rows: Option<f64>) -> Self {
        let spec = &job.spec;
        let commits = spec.params.commits_expected(spec.plan.fragments);
        let shape = Shape {
            rows: spec.plan.rows,
            fragments: spec.plan.fragments,
            tasks: spec.plan.tasks,
            commits,
            concurrency: spec.params.concurrency,
            function: match spec.udf {
                Some(_) => Function::Python {
                    ms_per_1k_rows: function_ms_per_1k_rows,
                },
                None => Function::Sql,
            },
        };
        Self {
            dry_run: true,
            column: spec.column.clone(),
            columns: spec.columns(),
            expression: spec.expression.clone(),
            filter: spec.filter.clone(),
            read_version: spec.read_version,
            fragments: spec.plan.fragments,
            tasks: spec.plan.tasks,
            rows: spec.plan.rows,
            commits,
            fragment_ids,
            skipped_fragments: spec.skip_fragments.clone(),
            parameters: spec.params.clone(),
            // Built-in inputs a unit test reads; an estimate left out is
            // better than a dry run refused.
            estimate: estimate::estimate(&shape).ok(),
        }
    }
}
