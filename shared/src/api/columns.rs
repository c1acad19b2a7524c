//! `POST /v1/table/{id}/add_columns`: `expression` entries are filled once
//! (Lance `add_columns`); `computed` entries declare a computed column
//! (added all-null, type inferred, binding kept in field metadata) that
//! backfill jobs fill; `virtual_column` (pickled Python UDFs) is refused.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_schema::{Field as ArrowField, Schema as ArrowSchema};
use http::StatusCode;
use lance::dataset::NewColumnTransform;
use lance_namespace_reqwest_client::models::{
    AlterTableAddColumnsRequest, AlterTableAddColumnsResponse,
};
use tracing::info;

use super::{ApiRequest, ApiResponse, Service};
use crate::computed::{BINDING_KEY, infer_expression};
use crate::error::ApiError;
use crate::table::branch_name;

enum NewColumn {
    Expression { name: String, sql: String },
    Computed { name: String, sql: String },
}

impl Service {
    pub(super) async fn add_columns(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        refuse_virtual_columns(http)?;
        let request: AlterTableAddColumnsRequest = http.json()?;
        self.auth
            .authenticate(&http.headers, request.identity.as_deref())?;
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(ApiError::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        if request.new_columns.is_empty() {
            return Err(ApiError::invalid_input(
                "field 'new_columns' must list at least one column",
            ));
        }
        let mut columns = Vec::new();
        let mut names = HashSet::new();
        for (i, entry) in request.new_columns.iter().enumerate() {
            let field = format!("new_columns[{i}]");
            let name = entry.name.trim().to_string();
            if name.is_empty() {
                return Err(ApiError::invalid_input(format!(
                    "field '{field}.name' must not be empty"
                )));
            }
            if !names.insert(name.clone()) {
                return Err(ApiError::invalid_input(format!(
                    "field '{field}.name': column '{name}' is listed twice"
                )));
            }
            let expression = entry.expression.clone().flatten();
            let computed = entry.computed.clone().flatten();
            let virtual_column = entry.virtual_column.clone().flatten();
            match (expression, computed, virtual_column) {
                (Some(sql), None, None) => columns.push(NewColumn::Expression { name, sql }),
                (None, Some(sql), None) => columns.push(NewColumn::Computed { name, sql }),
                _ => {
                    return Err(ApiError::invalid_input(format!(
                        "field '{field}': column '{name}' must set exactly one of 'expression', 'computed' or 'virtual_column'"
                    )));
                }
            }
        }

        let uri = self.catalog.locate(&table).await?;
        let branch = request
            .branch
            .clone()
            .filter(|b| branch_name(Some(b)).is_some());
        let mut dataset = self
            .catalog
            .latest(&uri, branch.as_deref())
            .await
            .map_err(|err| {
                let api = ApiError::from_lance(err, "opening the table");
                if branch.is_some() && api.status == StatusCode::NOT_FOUND {
                    ApiError::branch_not_found(format!(
                        "field 'branch': the table has no branch '{}'",
                        branch.clone().unwrap_or_default()
                    ))
                } else {
                    api
                }
            })?;

        // Check everything before changing anything.
        let mut schema = ArrowSchema::from(dataset.schema());
        for column in &columns {
            let name = match column {
                NewColumn::Expression { name, .. } | NewColumn::Computed { name, .. } => name,
            };
            if schema.field_with_name(name).is_ok() {
                return Err(ApiError::invalid_input(format!(
                    "column '{name}' already exists in the table"
                )));
            }
        }
        let mut fills = Vec::new();
        for column in &columns {
            if let NewColumn::Expression { name, sql } = column {
                let (data_type, _) =
                    infer_expression(&schema, sql, &format!("expression of column '{name}'"))?;
                fills.push((name.clone(), sql.clone(), data_type));
            }
        }
        for (name, _, data_type) in &fills {
            schema = extend(&schema, ArrowField::new(name, data_type.clone(), true));
        }
        let mut declared = Vec::new();
        for column in &columns {
            if let NewColumn::Computed { name, sql } = column {
                let (data_type, _) = infer_expression(
                    &schema,
                    sql,
                    &format!("computed expression of column '{name}'"),
                )?;
                let field = ArrowField::new(name, data_type, true)
                    .with_metadata(HashMap::from([(BINDING_KEY.to_string(), sql.clone())]));
                schema = extend(&schema, field.clone());
                declared.push(field);
            }
        }

        if !fills.is_empty() {
            let expressions = fills
                .iter()
                .map(|(name, sql, _)| (name.clone(), sql.clone()))
                .collect();
            dataset
                .add_columns(NewColumnTransform::SqlExpressions(expressions), None, None)
                .await
                .map_err(|err| ApiError::from_lance(err, "adding expression columns"))?;
        }
        if !declared.is_empty() {
            dataset
                .add_columns(
                    NewColumnTransform::AllNulls(Arc::new(ArrowSchema::new(declared.clone()))),
                    None,
                    None,
                )
                .await
                .map_err(|err| ApiError::from_lance(err, "declaring computed columns"))?;
        }
        let version = dataset.version().version;
        info!(table = %table.display(), filled = fills.len(), computed = declared.len(), version, "columns added");
        Ok(ApiResponse::json(
            StatusCode::OK,
            &AlterTableAddColumnsResponse::new(version as i64),
        ))
    }
}

fn extend(schema: &ArrowSchema, field: ArrowField) -> ArrowSchema {
    let mut fields: Vec<ArrowField> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(field);
    ArrowSchema::new_with_metadata(fields, schema.metadata().clone())
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
            return Err(ApiError::unsupported(format!(
                "field 'new_columns[{i}].virtual_column': column '{name}' is a virtual column (a pickled \
                 Python UDF); this service evaluates SQL expressions only and cannot run Python. Declare \
                 it with 'computed' and a SQL expression instead"
            )));
        }
    }
    Ok(())
}
