//! Which operation a method and path name.

use http::Method;

use super::ApiError;

/// A route with its path parameter.
pub(super) enum Route<'a> {
    Backfill(&'a str),
    AddColumns(&'a str),
    TableJobs(&'a str),
    Job(&'a str),
    CancelJob(&'a str),
    PauseJob(&'a str),
    ResumeJob(&'a str),
    /// The spec's DescribeTable (LanceDB's client opens tables with it).
    Describe(&'a str),
    /// The rows user functions raised on, as LanceDB's client reads them.
    RowErrors(&'a str),
    /// `/v1/jobs/*`: the job routes as LanceDB's client speaks them.
    ClientJobs(ClientJobsRoute),
    Health,
    /// The job dashboard's page (its data comes from the routes above).
    Dashboard,
}

/// The operations under `/v1/jobs/`, each a POST with a JSON body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClientJobsRoute {
    Describe,
    List,
    Cancel,
    Pause,
    Resume,
    QueryEvents,
}

pub(super) fn route<'a>(method: &Method, segments: &[&'a str]) -> Result<Route<'a>, ApiError> {
    let route = match segments {
        ["v1", "table", id, "backfill_column"] => (Method::POST, Route::Backfill(id)),
        ["v1", "table", id, "add_columns"] => (Method::POST, Route::AddColumns(id)),
        ["v1", "table", id, "jobs"] => (Method::GET, Route::TableJobs(id)),
        ["v1", "job", id] => (Method::GET, Route::Job(id)),
        ["v1", "job", id, "cancel"] => (Method::POST, Route::CancelJob(id)),
        ["v1", "job", id, "pause"] => (Method::POST, Route::PauseJob(id)),
        ["v1", "job", id, "resume"] => (Method::POST, Route::ResumeJob(id)),
        ["v1", "table", id, "describe"] => (Method::POST, Route::Describe(id)),
        ["v1", "jobs", "describe"] => (Method::POST, Route::ClientJobs(ClientJobsRoute::Describe)),
        ["v1", "jobs", "list"] => (Method::POST, Route::ClientJobs(ClientJobsRoute::List)),
        ["v1", "jobs", "cancel"] => (Method::POST, Route::ClientJobs(ClientJobsRoute::Cancel)),
        ["v1", "jobs", "pause"] => (Method::POST, Route::ClientJobs(ClientJobsRoute::Pause)),
        ["v1", "jobs", "resume"] => (Method::POST, Route::ClientJobs(ClientJobsRoute::Resume)),
        ["v1", "jobs", "query_events"] => (
            Method::POST,
            Route::ClientJobs(ClientJobsRoute::QueryEvents),
        ),
        ["v1", "table", id, "errors"] => (Method::POST, Route::RowErrors(id)),
        ["health"] => (Method::GET, Route::Health),
        ["ui"] => (Method::GET, Route::Dashboard),
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
