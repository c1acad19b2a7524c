//! `POST /v1/table/{id}/errors`: the rows user functions raised on (jobs
//! with `on_error: skip`), as LanceDB's client reads them
//! (`table.function_errors(...)`): one record per row, a summary per
//! fragment, and whether more were recorded than shown.

use std::collections::BTreeMap;

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::caller::TableCall;
use super::{ApiError, ApiRequest, ApiResponse, Service, store_unavailable};
use crate::model::error::{Error, Missing};
use crate::model::job::{Counter, Job};
use crate::ports::store::RowFailure;

/// Records answered when the request names no `limit`, and the most.
const DEFAULT_RECORDS: usize = 10_000;
const MAX_RECORDS: usize = 100_000;
/// Without a `job_id`, the table's newest jobs looked at.
const JOBS_LOOKED_AT: usize = 100;

#[derive(Debug, Default, Deserialize)]
struct ErrorsRequest {
    #[serde(default)]
    job_id: Option<String>,
    #[serde(default)]
    column: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    branch: Option<String>,
}

impl ErrorsRequest {
    fn limit(&self) -> Result<usize, ApiError> {
        match self.limit {
            None => Ok(DEFAULT_RECORDS),
            Some(n) if (1..=MAX_RECORDS as u64).contains(&n) => Ok(n as usize),
            Some(n) => Err(ApiError::invalid_input(format!(
                "field 'limit' must be from 1 to {MAX_RECORDS}, got {n}"
            ))),
        }
    }

    fn wants(&self, job: &Job) -> bool {
        let column = self
            .column
            .as_ref()
            .is_none_or(|c| job.spec.columns().contains(c));
        let branch = self.branch.as_deref().unwrap_or("main");
        column && job.spec.branch.as_deref().unwrap_or("main") == branch
    }
}

impl Service {
    pub(super) async fn row_errors(
        &self,
        http: &ApiRequest,
        call: TableCall,
    ) -> Result<ApiResponse, ApiError> {
        let (principal, table) = (&call.principal, &call.table);
        let request: ErrorsRequest = http.json_or_default()?;
        let limit = request.limit()?;
        let jobs = match &request.job_id {
            Some(job_id) => {
                let job = self.load_job(principal, job_id).await?;
                if &job.spec.table_id != table {
                    return Err(Error::not_found(
                        Missing::Job,
                        format!("job '{job_id}' is not a job of this table"),
                    )
                    .into());
                }
                vec![job]
            }
            None => {
                self.catalog.locate(table).await?;
                self.store
                    .list_jobs(&table.key(), JOBS_LOOKED_AT, None)
                    .await
                    .map_err(store_unavailable)?
                    .jobs
            }
        };
        let mut answer = Answer::default();
        for job in jobs.iter().filter(|job| request.wants(job)) {
            if job.metrics.get(Counter::RowsFailed) == 0 || answer.records.len() >= limit {
                answer.truncated |= job.metrics.get(Counter::RowsFailed) > 0;
                continue;
            }
            let failures = self
                .store
                .list_row_failures(&job.job_id, limit - answer.records.len())
                .await
                .map_err(store_unavailable)?;
            answer.add(job, &failures);
        }
        Ok(ApiResponse::json(StatusCode::OK, &answer.json()))
    }
}

#[derive(Default)]
struct Answer {
    records: Vec<Value>,
    /// (job, fragment) -> (rows skipped, rows recorded).
    fragments: BTreeMap<(String, u64), (u64, u64)>,
    truncated: bool,
}

impl Answer {
    fn add(&mut self, job: &Job, failures: &[RowFailure]) {
        let (function, version) = match &job.spec.udf {
            Some(udf) => (udf.udf_name.clone(), udf.udf_version.clone()),
            None => ("sql".to_string(), String::new()),
        };
        let at = chrono::DateTime::parse_from_rfc3339(&job.updated_at)
            .map(|t| t.timestamp_millis())
            .unwrap_or(0);
        for failure in failures {
            self.records.push(json!({
                "job_id": job.job_id,
                "fragment_id": failure.fragment_id,
                "row_offset": failure.row,
                "column": job.spec.column,
                "function": function,
                "function_version": version,
                "table_version": job.spec.read_version,
                "error_type": error_type(&failure.error),
                "error_message": failure.error,
                "created_at_millis": at,
            }));
            let entry = self
                .fragments
                .entry((job.job_id.clone(), failure.fragment_id))
                .or_default();
            entry.0 += 1;
            entry.1 += 1;
        }
        self.truncated |= (failures.len() as u64) < job.metrics.get(Counter::RowsFailed);
    }

    fn json(self) -> Value {
        let fragments: Vec<Value> = self
            .fragments
            .into_iter()
            .map(|((job_id, fragment_id), (skipped, recorded))| {
                json!({
                    "job_id": job_id,
                    "fragment_id": fragment_id,
                    "rows_skipped": skipped,
                    "rows_recorded": recorded,
                })
            })
            .collect();
        json!({ "records": self.records, "fragments": fragments, "truncated": self.truncated })
    }
}

/// The exception's name where the message starts with one
/// (`ValueError: ...`), else `Error`.
fn error_type(message: &str) -> &str {
    match message.split_once(':') {
        Some((name, _))
            if !name.is_empty()
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') =>
        {
            name.rsplit('.').next().unwrap_or(name)
        }
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_named_by_its_exception() {
        assert_eq!(error_type("ValueError: cannot handle x = 7"), "ValueError");
        assert_eq!(
            error_type("builtins.ZeroDivisionError: division"),
            "ZeroDivisionError"
        );
        assert_eq!(error_type("the function returned 3 rows for 4"), "Error");
        assert_eq!(error_type("no colon here"), "Error");
    }
}
