//! `POST /v1/table/{id}/add_columns`: declare computed columns (SQL) and
//! user-function columns (`virtual_column`, which needs the `udf`
//! permission), or fill expression columns once. Columns declared with
//! `auto_backfill`, and expression columns, get a backfill job at once
//! (which needs the `submit` permission); their ids are in the answer's
//! `context` as `job_id`/`job_ids`. LanceDB's client asks for maintained
//! computed columns with `auto_refresh_enabled` (and spaces their passes
//! with `auto_refresh_interval_seconds`) at the top of the body. Expressions
//! are never evaluated in this process: the workers fill the columns, and
//! the answer waits for them a while.

use std::collections::HashMap;

use http::StatusCode;
use lance_namespace_reqwest_client::models::{
    AlterTableAddColumnsRequest, AlterTableAddColumnsResponse,
};

use std::time::Duration;

use super::auth::Principal;
use super::caller::TableCall;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::model::job::{BackfillSpec, JobState, check_context, flag};
use crate::model::policy::Action;
use crate::model::table::{TableId, branch_name};
use crate::submit::SubmitRequest;
use crate::submit::declare;

/// How long `add_columns` waits for its `expression` columns' jobs.
pub const EXPRESSION_WAIT: Duration = Duration::from_secs(20);
const EXPRESSION_POLL: Duration = Duration::from_millis(50);

/// The spec's request with the fields LanceDB's client adds to it.
#[derive(Debug, serde::Deserialize)]
struct AddColumnsBody {
    #[serde(flatten)]
    request: AlterTableAddColumnsRequest,
    #[serde(default)]
    auto_refresh_enabled: Option<bool>,
    #[serde(default)]
    auto_refresh_interval_seconds: Option<u64>,
}

/// The longest refresh interval accepted: a year.
const MAX_REFRESH_INTERVAL_SECONDS: u64 = 366 * 24 * 3600;

impl AddColumnsBody {
    fn upkeep(&self) -> Result<declare::Upkeep, ApiError> {
        let interval_seconds = self.auto_refresh_interval_seconds;
        if let Some(seconds) = interval_seconds
            && !(1..=MAX_REFRESH_INTERVAL_SECONDS).contains(&seconds)
        {
            return Err(ApiError::invalid_input(format!(
                "field 'auto_refresh_interval_seconds' must be from 1 to {MAX_REFRESH_INTERVAL_SECONDS}, got {seconds}"
            )));
        }
        let maintained = flag(self.request.context.as_ref(), "auto_backfill")
            || self.auto_refresh_enabled.unwrap_or(false);
        Ok(declare::Upkeep {
            maintained,
            interval_seconds: interval_seconds.filter(|_| maintained),
        })
    }
}

/// How filling `expression` columns went.
struct Filled {
    /// The version with their values (`None`: still being filled).
    version: Option<u64>,
    context: HashMap<String, String>,
}

impl Service {
    pub(super) async fn add_columns(
        &self,
        http: &ApiRequest,
        call: TableCall,
    ) -> Result<ApiResponse, ApiError> {
        let (principal, table) = (&call.principal, &call.table);
        let body: AddColumnsBody = http.json()?;
        let upkeep = body.upkeep()?;
        let request = body.request;
        if declare::declares_udf(&request.new_columns) {
            self.authorize(principal, table, Action::Udf)?;
        }
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(ApiError::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        if let Some(context) = &request.context {
            check_context(context, "context")?;
        }
        // Filling now (expression columns, auto_backfill) is a backfill:
        // it needs the right to submit one, checked before anything changes.
        if declare::starts_jobs(&request.new_columns, upkeep.maintained) {
            self.authorize(principal, table, Action::Submit)?;
        }
        let branch = request.branch.clone();
        let declaration = declare::add_columns(
            &self.catalog,
            table,
            branch.clone(),
            &request.new_columns,
            upkeep,
            &principal.subject,
        )
        .await?;
        let mut response = AlterTableAddColumnsResponse::new(declaration.version as i64);
        let mut context = HashMap::new();
        if !declaration.fill_once.is_empty() {
            let filled = self
                .fill_once(principal, table, branch.clone(), &declaration.fill_once)
                .await?;
            if let Some(version) = filled.version {
                response.version = version as i64;
            }
            context.extend(filled.context);
        }
        if !declaration.to_fill.is_empty() {
            context.extend(
                self.fill_now(principal, table, branch, &declaration.to_fill)
                    .await?,
            );
        }
        if !context.is_empty() {
            response.context = Some(context);
        }
        Ok(ApiResponse::json(StatusCode::OK, &response))
    }

    /// Fills `expression` columns with one job each, on the workers (never
    /// in this process), and waits for them up to [`EXPRESSION_WAIT`]: when
    /// they are DONE the answer carries the version they made; when one
    /// failed, the columns are dropped (nothing half-filled is left) and
    /// the answer is 400 with the reason; when they are still running the
    /// answer says so and names the jobs.
    async fn fill_once(
        &self,
        principal: &Principal,
        table: &TableId,
        branch: Option<String>,
        columns: &[String],
    ) -> Result<Filled, ApiError> {
        let jobs = self
            .fill_now(principal, table, branch.clone(), columns)
            .await?;
        let ids: Vec<String> = jobs["job_ids"].split(',').map(str::to_string).collect();
        let until = tokio::time::Instant::now() + EXPRESSION_WAIT;
        loop {
            let mut running = false;
            for id in &ids {
                let job = self
                    .store
                    .get_job(id)
                    .await
                    .map_err(super::store_unavailable)?;
                match job {
                    Some(job) if job.state == JobState::Done => {}
                    Some(job) if job.state.is_terminal() => {
                        let _ =
                            declare::drop_columns(&self.catalog, table, branch.as_deref(), columns)
                                .await;
                        return Err(ApiError::invalid_input(format!(
                            "filling column '{}' failed, so the columns were not added: {}",
                            job.spec.column,
                            job.error.unwrap_or_else(|| job.state.as_str().to_string())
                        )));
                    }
                    _ => running = true,
                }
            }
            if !running {
                let version = self.latest_version(table, branch.as_deref()).await;
                return Ok(Filled {
                    version,
                    context: jobs,
                });
            }
            if tokio::time::Instant::now() >= until {
                let mut context = jobs;
                context.insert("state".to_string(), JobState::Running.as_str().to_string());
                return Ok(Filled {
                    version: None,
                    context,
                });
            }
            tokio::time::sleep(EXPRESSION_POLL).await;
        }
    }

    async fn latest_version(&self, table: &TableId, branch: Option<&str>) -> Option<u64> {
        let uri = self.catalog.locate(table).await.ok()?;
        let dataset = self.catalog.latest(&uri, branch).await.ok()?;
        Some(dataset.manifest().version)
    }

    /// Backfills the declared columns that asked for it; the job ids go in
    /// the answer's context (`job_id` for the first, `job_ids` for all).
    async fn fill_now(
        &self,
        principal: &Principal,
        table: &TableId,
        branch: Option<String>,
        columns: &[String],
    ) -> Result<HashMap<String, String>, ApiError> {
        let mut ids = Vec::new();
        for column in columns {
            let spec = BackfillSpec {
                branch: branch_name(branch.as_deref()).map(str::to_string),
                ..BackfillSpec::of_column(column.clone())
            };
            let mut submit = SubmitRequest::new(table.clone(), spec, principal.subject.clone());
            // Declaring a user-function column already needed the permission.
            submit.allow_udf = true;
            // A maintained column's first job may be the maintainer's, woken
            // by the version the declaration made: that job fills it.
            submit.join_running = true;
            let outcome = self.submitter.submit(submit).await?;
            ids.extend(outcome.job_id().map(str::to_string));
        }
        Ok(HashMap::from([
            ("job_id".to_string(), ids[0].clone()),
            ("job_ids".to_string(), ids.join(",")),
        ]))
    }
}
