//! The REST API: route a request, authenticate, call the operation, answer
//! with JSON (an `ErrorResponse` with a Lance Namespace code on failure).
//! Transport-neutral: the Lambda adapter and the local HTTP server both
//! turn their requests into an [`ApiRequest`].

pub mod auth;
pub mod backfill;
pub mod columns;
pub mod error;
mod job_json;
pub mod jobs;
pub mod lambda;
pub mod request;
pub mod server;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use tracing::{info, warn};

use crate::lifecycle::Lifecycle;
use crate::store::{JobStore, StoreError};
use crate::submit::Submitter;
use crate::table::Catalog;
use auth::Authenticator;
pub use error::ApiError;

pub use request::ApiRequest;

/// Largest request body accepted (bodies are small JSON documents).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub body: Vec<u8>,
}

impl ApiResponse {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        Self {
            status,
            body: serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
        }
    }

    pub fn error(err: &ApiError, instance: &str) -> Self {
        Self::json(err.status, &err.to_response(Some(instance)))
    }
}

/// Everything a request needs, built once per process.
pub struct Service {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn JobStore>,
    pub submitter: Submitter,
    pub lifecycle: Lifecycle,
    pub auth: Authenticator,
}

/// A route with its path parameter.
enum Route<'a> {
    Backfill(&'a str),
    AddColumns(&'a str),
    TableJobs(&'a str),
    Job(&'a str),
    CancelJob(&'a str),
    Health,
}

fn route<'a>(method: &Method, segments: &[&'a str]) -> Result<Route<'a>, ApiError> {
    let route = match segments {
        ["v1", "table", id, "backfill_column"] => (Method::POST, Route::Backfill(id)),
        ["v1", "table", id, "add_columns"] => (Method::POST, Route::AddColumns(id)),
        ["v1", "table", id, "jobs"] => (Method::GET, Route::TableJobs(id)),
        ["v1", "job", id] => (Method::GET, Route::Job(id)),
        ["v1", "job", id, "cancel"] => (Method::POST, Route::CancelJob(id)),
        ["health"] => (Method::GET, Route::Health),
        _ => {
            return Err(ApiError::route_not_found(format!(
                "no route for {method} /{}",
                segments.join("/")
            )));
        }
    };
    if route.0 != method {
        return Err(ApiError::method_not_allowed(format!(
            "{method} is not allowed here; use {}",
            route.0
        )));
    }
    Ok(route.1)
}

impl Service {
    pub async fn handle(&self, request: ApiRequest) -> ApiResponse {
        let started = std::time::Instant::now();
        let path = request.path.clone();
        let method = request.method.clone();
        let response = match self.dispatch(&request).await {
            Ok(response) => response,
            Err(err) => {
                if err.status.is_server_error() {
                    warn!(%method, %path, status = err.status.as_u16(), error = %err.message, "request failed");
                }
                ApiResponse::error(&err, &path)
            }
        };
        info!(%method, %path, status = response.status.as_u16(), ms = started.elapsed().as_millis() as u64, "request");
        response
    }

    async fn dispatch(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let segments = request.segments();
        match route(&request.method, &segments)? {
            Route::Health => Ok(ApiResponse::json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
            Route::Backfill(id) => self.submit_backfill(request, id).await,
            Route::AddColumns(id) => self.add_columns(request, id).await,
            Route::TableJobs(id) => self.list_jobs(request, id).await,
            Route::Job(job_id) => self.get_job(request, job_id).await,
            Route::CancelJob(job_id) => self.cancel_job(request, job_id).await,
        }
    }

    /// Requests without a JSON body authenticate from headers only.
    fn authenticate_headers(&self, headers: &HeaderMap) -> Result<auth::Principal, ApiError> {
        self.auth.authenticate(headers, None)
    }
}

/// A store failure as clients see it: busy (429) or unavailable (503),
/// without internals (they go to the log).
pub(crate) fn store_unavailable(err: StoreError) -> ApiError {
    match err {
        StoreError::Contention(_) => ApiError::coded(
            lance_namespace::ErrorCode::Throttling,
            "the job store is busy; retry shortly",
        ),
        StoreError::BadPageToken => {
            ApiError::invalid_input("query parameter 'page_token' is not a token this API issued")
        }
        other => {
            warn!(error = %format!("{other:#}"), "job store call failed");
            ApiError::unavailable("the job store is not reachable; retry shortly")
        }
    }
}

/// Builds an [`ApiRequest`] from parts (used by both adapters and tests).
pub fn request(
    method: Method,
    path_and_query: &str,
    headers: HeaderMap,
    body: Bytes,
) -> ApiRequest {
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path.to_string(), Some(query.to_string())),
        None => (path_and_query.to_string(), None),
    };
    ApiRequest {
        method,
        path,
        query,
        headers,
        body,
    }
}
