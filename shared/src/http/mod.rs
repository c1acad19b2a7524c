//! The REST API: route a request, authenticate, call the operation, answer
//! with JSON (an `ErrorResponse` with a Lance Namespace code on failure).
//! Transport-neutral: the Lambda adapter and the local HTTP server both
//! turn their requests into an [`ApiRequest`].

pub mod auth;
pub mod backfill;
mod caller;
pub mod client_jobs;
pub mod columns;
pub mod describe;
pub mod error;
mod job_events;
mod job_json;
pub mod jobs;
pub mod lambda;
pub mod request;
mod routes;
mod row_errors;
pub mod server;
pub mod tokens;

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;
use tracing::{info, warn};

use crate::model::policy::Action;
use crate::model::table::Catalog;
use crate::ports::store::{JobStore, StoreError};
use crate::run::lifecycle::Lifecycle;
use crate::submit::Submitter;
use auth::Authenticator;
pub use error::ApiError;
use jobs::Control;
use routes::Route;

pub use request::ApiRequest;

/// Largest request body accepted (bodies are small JSON documents).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq)]
pub struct ApiResponse {
    pub status: StatusCode,
    pub body: Vec<u8>,
    pub content_type: &'static str,
    /// Names this request in the log; sent back as `x-request-id`.
    pub request_id: Option<String>,
}

/// The job dashboard (`GET /ui`): one page, its script inline, compiled in.
const DASHBOARD: &str = include_str!("dashboard.html");

/// The media type of an Arrow IPC stream.
pub const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

impl ApiResponse {
    pub fn json(status: StatusCode, value: &impl Serialize) -> Self {
        Self {
            status,
            body: serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec()),
            content_type: "application/json",
            request_id: None,
        }
    }

    /// An HTML page.
    pub fn page(html: &'static str) -> Self {
        Self {
            status: StatusCode::OK,
            body: html.as_bytes().to_vec(),
            content_type: "text/html; charset=utf-8",
            request_id: None,
        }
    }

    /// Record batches as an Arrow IPC stream.
    pub fn arrow_stream(body: Vec<u8>) -> Self {
        Self {
            status: StatusCode::OK,
            body,
            content_type: ARROW_STREAM,
            request_id: None,
        }
    }

    pub fn error(err: &ApiError, instance: &str, request_id: &str) -> Self {
        let mut response = Self::json(err.status, &err.to_response(Some(instance), request_id));
        response.request_id = Some(request_id.to_string());
        response
    }
}

/// Everything a request needs, built once per process.
pub struct Service {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn JobStore>,
    pub submitter: Submitter,
    pub lifecycle: Lifecycle,
    pub auth: Authenticator,
    /// Seals the page tokens of listings.
    pub tokens: tokens::PageTokens,
}

/// A client's `x-request-id` is kept when it is a short visible token;
/// otherwise the request gets one of ours.
const MAX_REQUEST_ID_LEN: usize = 128;

fn request_id_of(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|id| {
            !id.is_empty()
                && id.len() <= MAX_REQUEST_ID_LEN
                && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string())
}

impl Service {
    pub async fn handle(&self, request: ApiRequest) -> ApiResponse {
        let started = std::time::Instant::now();
        let request_id = request_id_of(&request.headers);
        let path = request.path.clone();
        let method = request.method.clone();
        let mut response = match self.dispatch(&request).await {
            Ok(response) => response,
            Err(err) => {
                if err.status.is_server_error() {
                    warn!(%request_id, %method, %path, status = err.status.as_u16(), error = %err.message, "request failed");
                }
                let err = for_lancedb_client(err, &request);
                ApiResponse::error(&err.public(), &path, &request_id)
            }
        };
        response.request_id = Some(request_id.clone());
        info!(%request_id, %method, %path, status = response.status.as_u16(), ms = started.elapsed().as_millis() as u64, "request");
        response
    }

    /// The store's cursor a client's page token holds, if this deployment
    /// issued it for this listing.
    fn open_token(&self, scope: &str, token: &str) -> Result<String, ApiError> {
        self.tokens.open(scope, token).ok_or_else(|| {
            ApiError::invalid_input(
                "page_token is not a token this API issued for this listing; \
                 pass the page_token of the previous page unchanged",
            )
        })
    }

    async fn dispatch(&self, request: &ApiRequest) -> Result<ApiResponse, ApiError> {
        let segments = request.segments();
        match routes::route(&request.method, &segments)? {
            Route::Health => Ok(ApiResponse::json(
                StatusCode::OK,
                &serde_json::json!({"status": "ok"}),
            )),
            Route::Backfill(id) => {
                let call = self.table_call(request, id, Action::Submit)?;
                self.submit_backfill(request, call).await
            }
            Route::AddColumns(id) => {
                let call = self.table_call(request, id, Action::Declare)?;
                self.add_columns(request, call).await
            }
            Route::TableJobs(id) => {
                let call = self.table_call(request, id, Action::Read)?;
                self.list_jobs(request, call).await
            }
            Route::Describe(id) => {
                let call = self.table_call(request, id, Action::Read)?;
                self.describe_table(request, call).await
            }
            Route::RowErrors(id) => {
                let call = self.table_call(request, id, Action::Read)?;
                self.row_errors(request, call).await
            }
            Route::Job(job_id) => self.get_job(&self.caller(request)?, job_id).await,
            Route::CancelJob(job_id) => {
                let caller = self.caller(request)?;
                self.control_job(&caller, job_id, Control::Cancel).await
            }
            Route::PauseJob(job_id) => {
                let caller = self.caller(request)?;
                self.control_job(&caller, job_id, Control::Pause).await
            }
            Route::ResumeJob(job_id) => {
                let caller = self.caller(request)?;
                self.control_job(&caller, job_id, Control::Resume).await
            }
            Route::ClientJobs(route) => {
                let caller = self.caller(request)?;
                self.client_jobs(request, &caller, route).await
            }
            Route::Dashboard => Ok(ApiResponse::page(DASHBOARD)),
        }
    }
}

/// LanceDB's client reads any 404 on a table route as "table not found";
/// a missing column or version is then told as a 400 with its own code.
fn for_lancedb_client(mut err: ApiError, request: &ApiRequest) -> ApiError {
    let lancedb = request
        .header("user-agent")
        .is_some_and(|agent| agent.starts_with(describe::LANCEDB_AGENT_PREFIX));
    let table_route = request.segments().get(1) == Some(&"table");
    let table_missing = matches!(
        err.code,
        lance_namespace::ErrorCode::TableNotFound | lance_namespace::ErrorCode::NamespaceNotFound
    );
    if lancedb && table_route && err.status == StatusCode::NOT_FOUND && !table_missing {
        err.status = StatusCode::BAD_REQUEST;
    }
    err
}

/// A store failure as clients see it: busy (429) or unavailable (503),
/// without internals (they go to the log).
pub(crate) fn store_unavailable(err: StoreError) -> ApiError {
    ApiError::from(err.for_client())
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
