//! Job routes: `GET /v1/job/{job_id}`, `GET /v1/table/{id}/jobs`,
//! `POST /v1/job/{job_id}/cancel`, `.../pause` and `.../resume`.

use http::StatusCode;

use super::auth::Principal;
use super::caller::TableCall;
use super::job_json::{Details, job_json};
use super::{ApiError, ApiRequest, ApiResponse, Service, store_unavailable};
use crate::model::error::{Error, Missing};
use crate::model::job::{Job, JobState};
use crate::model::policy::Action;

/// Jobs on a page when the client names no `page_size`.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// The most a page may hold: a page is one response, read in one pass.
pub const MAX_PAGE_SIZE: usize = 1000;
/// A job's page shows its latest this many events (commits, failures...).
pub const EVENTS_SHOWN: usize = 100;
/// ... and this many of the rows a user function raised on.
pub const ROW_FAILURES_SHOWN: usize = 100;
/// Job ids are UUIDs (32 hex digits); anything longer is not one of ours.
const MAX_JOB_ID_LEN: usize = 64;

fn job_not_found(job_id: &str) -> ApiError {
    Error::not_found(Missing::Job, format!("job '{job_id}' does not exist")).into()
}

fn valid_job_id(job_id: &str) -> Result<&str, ApiError> {
    if job_id.is_empty()
        || job_id.len() > MAX_JOB_ID_LEN
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
    /// The job, if it exists and `principal` may read its table: to anyone
    /// else it does not exist.
    pub(super) async fn load_job(
        &self,
        principal: &Principal,
        job_id: &str,
    ) -> Result<Job, ApiError> {
        let job_id = valid_job_id(job_id)?;
        let job = self
            .store
            .get_job(job_id)
            .await
            .map_err(store_unavailable)?
            .ok_or_else(|| job_not_found(job_id))?;
        if self
            .authorize(principal, &job.spec.table_id, Action::Read)
            .is_err()
        {
            return Err(job_not_found(job_id));
        }
        Ok(job)
    }

    pub(super) async fn get_job(
        &self,
        principal: &Principal,
        job_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let job = self.load_job(principal, job_id).await?;
        let events = self
            .store
            .list_events(&job.job_id, EVENTS_SHOWN)
            .await
            .map_err(store_unavailable)?;
        let row_failures = self
            .store
            .list_row_failures(&job.job_id, ROW_FAILURES_SHOWN)
            .await
            .map_err(store_unavailable)?;
        let details = Details {
            events: &events,
            row_failures: &row_failures,
        };
        Ok(ApiResponse::json(
            StatusCode::OK,
            &job_json(&job, Some(details)),
        ))
    }

    pub(super) async fn list_jobs(
        &self,
        http: &ApiRequest,
        call: TableCall,
    ) -> Result<ApiResponse, ApiError> {
        let table = &call.table;
        let limit = page_size(http.query_param("limit")?)?;
        let scope = format!("table:{}", table.key());
        let cursor = match http.query_param("page_token")?.filter(|t| !t.is_empty()) {
            Some(token) => Some(self.open_token(&scope, &token)?),
            None => None,
        };
        // The table must exist, so a typo is a 404 rather than an empty list.
        self.catalog.locate(table).await?;
        let page = self
            .store
            .list_jobs(&table.key(), limit, cursor.as_deref())
            .await
            .map_err(store_unavailable)?;
        let jobs: Vec<serde_json::Value> = page.jobs.iter().map(|j| job_json(j, None)).collect();
        let next = page.next_page_token.map(|c| self.tokens.seal(&scope, &c));
        Ok(ApiResponse::json(
            StatusCode::OK,
            &serde_json::json!({ "jobs": jobs, "page_token": next }),
        ))
    }

    pub(super) async fn control_job(
        &self,
        principal: &Principal,
        job_id: &str,
        control: Control,
    ) -> Result<ApiResponse, ApiError> {
        let current = self.control(principal, job_id, control).await?;
        Ok(ApiResponse::json(StatusCode::OK, &job_json(&current, None)))
    }

    /// Cancels, pauses or resumes the job (the caller needs the cancel
    /// permission). Asking again for the state the job is already in is not
    /// an error. Returns the job as it now is.
    pub(super) async fn control(
        &self,
        principal: &Principal,
        job_id: &str,
        control: Control,
    ) -> Result<Job, ApiError> {
        let job = self.load_job(principal, job_id).await?;
        self.authorize(principal, &job.spec.table_id, Action::Cancel)?;
        let by = &principal.subject;
        let moved = match control {
            Control::Cancel => self.lifecycle.cancel(&job, by).await,
            Control::Pause => self.lifecycle.pause(&job, by).await,
            // Only a paused job resumes (one not yet started starts by itself).
            Control::Resume if job.state != JobState::Paused => Ok(None),
            Control::Resume => self.lifecycle.resume(&job, by).await,
        }
        .map_err(store_unavailable)?;
        let current = self.load_job(principal, job_id).await?;
        if moved.is_none() && !control.already_done(current.state) {
            return Err(Error::InvalidState(format!(
                "job '{job_id}' is {} and cannot be {}",
                current.state.as_str(),
                control.done()
            ))
            .into());
        }
        Ok(current)
    }
}

/// What a caller may do to a job besides reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Control {
    Cancel,
    Pause,
    Resume,
}

impl Control {
    /// Whether a job in `state` is as this would leave it (asking again
    /// is not an error): cancelled, paused, or (resumed) pending or running.
    fn already_done(self, state: JobState) -> bool {
        match self {
            Self::Cancel => state == JobState::Cancelled,
            Self::Pause => state == JobState::Paused,
            Self::Resume => matches!(state, JobState::Pending | JobState::Running),
        }
    }

    fn done(self) -> &'static str {
        match self {
            Self::Cancel => "cancelled",
            Self::Pause => "paused",
            Self::Resume => "resumed",
        }
    }
}

fn page_size(limit: Option<String>) -> Result<usize, ApiError> {
    let Some(text) = limit else {
        return Ok(DEFAULT_PAGE_SIZE);
    };
    match text.parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE_SIZE).contains(&n) => Ok(n),
        _ => Err(ApiError::invalid_input(format!(
            "query parameter 'limit' must be a number from 1 to {MAX_PAGE_SIZE}, got '{text}'"
        ))),
    }
}
