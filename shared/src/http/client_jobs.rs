//! `POST /v1/jobs/describe`, `/v1/jobs/list`, `/v1/jobs/cancel`,
//! `/v1/jobs/pause`, `/v1/jobs/resume` and `/v1/jobs/query_events`: the job
//! routes as LanceDB's client speaks them (`refresh_column(...).wait()`,
//! `list_jobs()`, `cancel_job()`, `pause_job()`, `resume_job()`,
//! `job.events()`), over the same store, authentication and authorization
//! as `/v1/job/{id}`.

use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::Principal;
use super::job_events::{EventsRequest, events_stream};
use super::jobs::{Control, DEFAULT_PAGE_SIZE, EVENTS_SHOWN, MAX_PAGE_SIZE};
use super::routes::ClientJobsRoute;
use super::{ApiError, ApiRequest, ApiResponse, Service, store_unavailable};
use crate::model::job::{Counter, Job, JobState, published_version};
use crate::model::policy::Action;

#[derive(Debug, Deserialize)]
struct JobRequest {
    job_id: String,
}

#[derive(Debug, Default, Deserialize)]
struct ListRequest {
    #[serde(default)]
    page_token: Option<String>,
    #[serde(default)]
    limit: Option<u64>,
}

impl Service {
    pub(super) async fn client_jobs(
        &self,
        http: &ApiRequest,
        principal: &Principal,
        route: ClientJobsRoute,
    ) -> Result<ApiResponse, ApiError> {
        let body = match route {
            ClientJobsRoute::Describe => {
                let request: JobRequest = http.json()?;
                let job = self.load_job(principal, &request.job_id).await?;
                self.described(&job).await?
            }
            ClientJobsRoute::Cancel => {
                let request: JobRequest = http.json()?;
                let job = self
                    .control(principal, &request.job_id, Control::Cancel)
                    .await?;
                self.described(&job).await?
            }
            ClientJobsRoute::Pause | ClientJobsRoute::Resume => {
                let request: JobRequest = http.json()?;
                self.pause_or_resume(principal, &request.job_id, route)
                    .await?
            }
            ClientJobsRoute::QueryEvents => {
                let request: EventsRequest = http.json()?;
                let job = self.load_job(principal, &request.job_id).await?;
                let events = self
                    .store
                    .list_events(&job.job_id, request.limit()?)
                    .await
                    .map_err(store_unavailable)?;
                return Ok(ApiResponse::arrow_stream(events_stream(
                    &job, &events, &request,
                )?));
            }
            ClientJobsRoute::List => {
                let request: ListRequest = http.json_or_default()?;
                self.list_all(principal, request).await?
            }
        };
        Ok(ApiResponse::json(StatusCode::OK, &body))
    }

    /// `{"paused": true}` / `{"resumed": true}` when the job moved, `{}`
    /// when it already was (paused) or was not (resumed) in that state: the
    /// answers LanceDB's client reads as AlreadyPaused / NotPaused.
    async fn pause_or_resume(
        &self,
        principal: &Principal,
        job_id: &str,
        route: ClientJobsRoute,
    ) -> Result<Value, ApiError> {
        let (control, key) = match route {
            ClientJobsRoute::Pause => (Control::Pause, "paused"),
            _ => (Control::Resume, "resumed"),
        };
        let before = self.load_job(principal, job_id).await?.state;
        let after = self.control(principal, job_id, control).await?.state;
        Ok(match before != after {
            true => json!({ key: true, "job_id": job_id, "job_state": wire_state(after) }),
            false => json!({ "job_id": job_id, "job_state": wire_state(after) }),
        })
    }

    /// The job as `jobs/describe` answers it; the published version is in
    /// its latest commit event.
    async fn described(&self, job: &Job) -> Result<Value, ApiError> {
        let events = if job.state == JobState::Done {
            self.store
                .list_events(&job.job_id, EVENTS_SHOWN)
                .await
                .map_err(store_unavailable)?
        } else {
            Vec::new()
        };
        Ok(client_job_json(job, published_version(&events)))
    }

    async fn list_all(
        &self,
        principal: &Principal,
        request: ListRequest,
    ) -> Result<Value, ApiError> {
        let limit = match request.limit {
            None => DEFAULT_PAGE_SIZE,
            Some(n) if (1..=MAX_PAGE_SIZE as u64).contains(&n) => n as usize,
            Some(n) => {
                return Err(ApiError::invalid_input(format!(
                    "field 'limit' must be from 1 to {MAX_PAGE_SIZE}, got {n}"
                )));
            }
        };
        let cursor = match request.page_token.filter(|t| !t.is_empty()) {
            Some(token) => Some(self.open_token(ALL_JOBS, &token)?),
            None => None,
        };
        let page = self
            .store
            .list_recent_jobs(limit, cursor.as_deref())
            .await
            .map_err(store_unavailable)?;
        // Jobs of tables the caller may not read are left out, as if absent.
        let jobs: Vec<Value> = page
            .jobs
            .iter()
            .filter(|job| {
                self.authorize(principal, &job.spec.table_id, Action::Read)
                    .is_ok()
            })
            .map(|job| {
                json!({
                    "job_id": job.job_id,
                    "table": job.spec.table_id.display(),
                    "job_type": JOB_TYPE,
                    "state": wire_state(job.state),
                    "created_at_millis": created_millis(job),
                })
            })
            .collect();
        let next = page.next_page_token.map(|c| self.tokens.seal(ALL_JOBS, &c));
        Ok(json!({ "jobs": jobs, "page_token": next }))
    }
}

/// The scope of the listing of every table's jobs (its page tokens).
const ALL_JOBS: &str = "all";

/// Every job of this service fills columns.
const JOB_TYPE: &str = "backfill";

/// The states LanceDB's client knows: it polls on `IN_PROGRESS` (and any
/// state it does not know) and ends on DONE, FAILED and CANCELLED.
fn wire_state(state: JobState) -> &'static str {
    match state {
        JobState::Pending | JobState::Running => "IN_PROGRESS",
        // Not a state the client knows: it keeps polling, as it should.
        JobState::Paused => "PAUSED",
        JobState::Done => "DONE",
        JobState::Failed => "FAILED",
        JobState::Cancelled => "CANCELLED",
    }
}

fn created_millis(job: &Job) -> i64 {
    chrono::DateTime::parse_from_rfc3339(&job.created_at)
        .map(|at| at.timestamp_millis())
        .unwrap_or(0)
}

fn client_job_json(job: &Job, published: Option<u64>) -> Value {
    let metrics = &job.metrics;
    let total = metrics.get(Counter::RowsTotal);
    let result = (job.state == JobState::Done).then(|| {
        json!({
            "rows_assigned": total,
            "rows_failed": metrics.get(Counter::RowsFailed),
            // Every row a DONE job was given was filled, skipped or failed.
            "rows_remaining": 0,
            "source_version": job.spec.read_version,
            "published_version": published,
        })
    });
    let failure = (job.state == JobState::Failed).then(|| {
        json!({
            "phase": "execute",
            "message": job.error.clone().unwrap_or_else(|| "the job failed".to_string()),
            "retryable": false,
        })
    });
    json!({
        "job_id": job.job_id,
        "job_type": JOB_TYPE,
        "job_state": wire_state(job.state),
        "creation_ms": created_millis(job),
        "spec": {
            "table": job.spec.table_id.display(),
            "column": job.spec.column,
            "columns": job.spec.columns(),
            "expression": job.spec.expression,
            "where": job.spec.filter,
            "read_version": job.spec.read_version,
        },
        "result": result,
        "failure": failure,
        "progress": {
            "rows_total": total,
            "rows_computed": metrics.get(Counter::RowsComputed),
            "rows_committed": metrics.get(Counter::RowsCommitted),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::job::JobEvent;

    fn event(message: &str) -> JobEvent {
        JobEvent {
            at: String::new(),
            message: message.to_string(),
        }
    }

    #[test]
    fn the_last_commit_names_the_published_version() {
        let events = [
            event("planned 2 tasks over 2 fragments (20 rows) at version 3"),
            event("committed fragments 0 (10 rows) as version 4"),
            event("committed fragments 1 (10 rows) as version 6"),
            event("done: 2 fragments committed in 2 commits, 0 unchanged"),
        ];
        assert_eq!(published_version(&events), Some(6));
        assert_eq!(published_version(&events[..1]), None);
    }
}
