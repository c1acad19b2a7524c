//! `POST /v1/table/{id}/backfill_column`: read the request, authenticate,
//! submit, answer 202 with the job id.

use http::StatusCode;
use lance_namespace_reqwest_client::models::{
    AlterTableBackfillColumnsRequest, AlterTableBackfillColumnsResponse,
};

use super::policy::Action;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::submit::SubmitRequest;

impl Service {
    pub(super) async fn submit_backfill(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        let principal = self.authenticate(http)?;
        self.authorize(&principal, &table, Action::Submit)?;
        let request: AlterTableBackfillColumnsRequest = http.json()?;
        let allow_udf = self.authorize(&principal, &table, Action::Udf).is_ok();
        let outcome = self
            .submitter
            .submit(SubmitRequest {
                table,
                request,
                allow_udf,
                submitted_by: principal.subject,
                idempotency_key: http.header("idempotency-key").map(str::to_string),
            })
            .await?;
        Ok(ApiResponse::json(
            StatusCode::ACCEPTED,
            &AlterTableBackfillColumnsResponse::new(outcome.job_id().to_string()),
        ))
    }
}
