//! Job routes: `GET /v1/job/{job_id}`, `GET /v1/table/{id}/jobs`,
//! `POST /v1/job/{job_id}/cancel`.

use http::StatusCode;
use lance_namespace::ErrorCode;

use super::backfill::store_unavailable;
use super::{ApiRequest, ApiResponse, Service};
use crate::error::ApiError;
use crate::job::{Job, JobState};
use crate::plan::Message;
use crate::queue::Outgoing;
use crate::store::BadPageToken;

pub const DEFAULT_PAGE_SIZE: usize = 50;
pub const MAX_PAGE_SIZE: usize = 1000;

/// Jobs have no code of their own in the Lance Namespace spec; a missing
/// job is reported like a missing transaction (code 10), with a 404.
fn job_not_found(job_id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::TransactionNotFound,
        format!("job '{job_id}' does not exist"),
    )
}

fn valid_job_id(job_id: &str) -> Result<&str, ApiError> {
    if job_id.is_empty()
        || job_id.len() > 64
        || !job_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(ApiError::invalid_input(format!(
            "path parameter 'job_id' ('{job_id}') is not a job id"
        )));
    }
    Ok(job_id)
}

impl Service {
    async fn load_job(&self, job_id: &str) -> Result<Job, ApiError> {
        let job_id = valid_job_id(job_id)?;
        self.store
            .get_job(job_id)
            .await
            .map_err(store_unavailable)?
            .ok_or_else(|| job_not_found(job_id))
    }

    pub(super) async fn get_job(
        &self,
        http: &ApiRequest,
        job_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        self.authenticate_headers(&http.headers)?;
        let job = self.load_job(job_id).await?;
        Ok(ApiResponse::json(StatusCode::OK, &job.to_json()))
    }

    pub(super) async fn list_jobs(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        self.authenticate_headers(&http.headers)?;
        let limit = match http.query_param("limit")? {
            None => DEFAULT_PAGE_SIZE,
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=MAX_PAGE_SIZE).contains(&n) => n,
                _ => {
                    return Err(ApiError::invalid_input(format!(
                        "query parameter 'limit' must be a number from 1 to {MAX_PAGE_SIZE}, got '{text}'"
                    )));
                }
            },
        };
        let token = http.query_param("page_token")?.filter(|t| !t.is_empty());
        // The table must exist, so a typo is a 404 rather than an empty list.
        self.catalog.locate(&table).await?;
        let page = self
            .store
            .list_jobs(&table.key(), limit, token.as_deref())
            .await
            .map_err(|err| {
                if err.downcast_ref::<BadPageToken>().is_some() {
                    ApiError::invalid_input(
                        "query parameter 'page_token' is not a token this API issued",
                    )
                } else {
                    store_unavailable(err)
                }
            })?;
        let jobs: Vec<serde_json::Value> = page.jobs.iter().map(Job::to_json).collect();
        Ok(ApiResponse::json(
            StatusCode::OK,
            &serde_json::json!({ "jobs": jobs, "page_token": page.next_page_token }),
        ))
    }

    pub(super) async fn cancel_job(
        &self,
        http: &ApiRequest,
        job_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let principal = self.authenticate_headers(&http.headers)?;
        let job = self.load_job(job_id).await?;
        let moved = self
            .store
            .transition(
                &job.job_id,
                JobState::Cancelled,
                Some(&format!("cancelled by {}", principal.subject)),
                None,
            )
            .await
            .map_err(store_unavailable)?;
        if moved.is_none() {
            let current = self.load_job(job_id).await?;
            if current.state == JobState::Cancelled {
                return Ok(ApiResponse::json(StatusCode::OK, &current.to_json()));
            }
            return Err(ApiError::invalid_state(format!(
                "job '{job_id}' is already {} and cannot be cancelled",
                current.state.as_str()
            )));
        }
        // Staged but uncommitted files are removed by a worker.
        if let Some(queue) = self.queues.for_cluster(job.spec.params.cluster.as_deref()) {
            let _ = queue
                .send_many(vec![Outgoing::now(Message::cleanup(&job.job_id).to_body())])
                .await;
        }
        let job = self.load_job(job_id).await?;
        Ok(ApiResponse::json(StatusCode::OK, &job.to_json()))
    }
}
