//! `POST /v1/table/{id}/add_columns`: declare computed columns (SQL) and
//! user-function columns (`virtual_column`, which needs the `udf`
//! permission), or fill expression columns once. Columns declared with
//! `auto_backfill` get a backfill job at once; its id is in the answer's
//! `context` as `job_id`.

use std::collections::HashMap;

use http::StatusCode;
use lance_namespace_reqwest_client::models::{
    AlterTableAddColumnsRequest, AlterTableAddColumnsResponse, AlterTableBackfillColumnsRequest,
};

use super::auth::Principal;
use super::policy::Action;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::declare;
use crate::job::{check_context, flag};
use crate::submit::SubmitRequest;
use crate::table::TableId;

impl Service {
    pub(super) async fn add_columns(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        let principal = self.authenticate(http)?;
        self.authorize(&principal, &table, Action::Declare)?;
        let request: AlterTableAddColumnsRequest = http.json()?;
        if declare::declares_udf(&request.new_columns) {
            self.authorize(&principal, &table, Action::Udf)?;
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
        let maintained = flag(request.context.as_ref(), "auto_backfill");
        let declaration = declare::add_columns(
            &self.catalog,
            &table,
            request.branch.clone(),
            &request.new_columns,
            maintained,
        )
        .await?;
        let mut response = AlterTableAddColumnsResponse::new(declaration.version as i64);
        if !declaration.to_fill.is_empty() {
            let jobs = self
                .fill_now(
                    &principal,
                    &table,
                    request.branch.clone(),
                    &declaration.to_fill,
                )
                .await?;
            response.context = Some(jobs);
        }
        Ok(ApiResponse::json(StatusCode::OK, &response))
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
            let mut request = AlterTableBackfillColumnsRequest::new(column.clone());
            request.branch = branch.clone();
            let mut submit = SubmitRequest::new(table.clone(), request, principal.subject.clone());
            // Declaring a user-function column already needed the permission.
            submit.allow_udf = true;
            let outcome = self.submitter.submit(submit).await?;
            ids.extend(outcome.job_id().map(str::to_string));
        }
        Ok(HashMap::from([
            ("job_id".to_string(), ids[0].clone()),
            ("job_ids".to_string(), ids.join(",")),
        ]))
    }
}
