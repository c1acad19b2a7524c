//! `POST /v1/table/{id}/add_columns`: declare computed columns or fill
//! expression columns once; `virtual_column` (pickled Python UDFs) is refused.

use http::StatusCode;
use lance_namespace_reqwest_client::models::{
    AlterTableAddColumnsRequest, AlterTableAddColumnsResponse,
};

use super::policy::Action;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::declare;

impl Service {
    pub(super) async fn add_columns(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        let principal = self.authenticate(http)?;
        self.authorize(&principal, &table, Action::Declare)?;
        refuse_virtual_columns(http)?;
        let request: AlterTableAddColumnsRequest = http.json()?;
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(ApiError::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        let version = declare::add_columns(
            &self.catalog,
            &table,
            request.branch.clone(),
            &request.new_columns,
        )
        .await?;
        Ok(ApiResponse::json(
            StatusCode::OK,
            &AlterTableAddColumnsResponse::new(version as i64),
        ))
    }
}

/// Python UDFs are refused before the body is read strictly, so the client
/// learns why rather than which UDF field it left out.
fn refuse_virtual_columns(http: &ApiRequest) -> Result<(), ApiError> {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(&http.body) else {
        return Ok(());
    };
    let entries = body
        .get("new_columns")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    for (i, entry) in entries.iter().enumerate() {
        if entry.get("virtual_column").is_some_and(|v| !v.is_null()) {
            let name = entry.get("name").and_then(|n| n.as_str()).unwrap_or("?");
            return Err(ApiError::coded(
                lance_namespace::ErrorCode::Unsupported,
                format!(
                    "field 'new_columns[{i}].virtual_column': column '{name}' is a virtual column (a pickled \
                     Python UDF); this service evaluates SQL expressions only and cannot run Python. Declare \
                     it with 'computed' and a SQL expression instead"
                ),
            ));
        }
    }
    Ok(())
}
