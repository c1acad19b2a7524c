//! Declaring columns (`add_columns`): `expression` entries are filled once
//! (Lance `add_columns`); `computed` entries declare a computed column,
//! added all-null with its type inferred and its binding kept in the
//! field's metadata, for backfill jobs to fill.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use futures::FutureExt;
use lance::Dataset;
use lance::dataset::NewColumnTransform;
use lance_namespace_reqwest_client::models::AddColumnsEntry;
use tracing::info;

use crate::computed::{BINDING_KEY, infer_expression};
use crate::error::{Error, Missing};
use crate::table::{Catalog, TableId, branch_name};

/// One requested column, checked for shape.
enum NewColumn {
    Expression { name: String, sql: String },
    Computed { name: String, sql: String },
}

impl NewColumn {
    fn name(&self) -> &str {
        match self {
            Self::Expression { name, .. } | Self::Computed { name, .. } => name,
        }
    }
}

/// What to add, checked against the table before anything changes.
struct Additions {
    /// Filled at once: (name, SQL).
    fills: Vec<(String, String)>,
    /// Declared all-null, filled by backfills.
    declared: Vec<ArrowField>,
}

/// Adds the columns to the table (on `branch`); returns the new version.
pub async fn add_columns(
    catalog: &Catalog,
    table: &TableId,
    branch: Option<String>,
    entries: &[AddColumnsEntry],
) -> Result<u64, Error> {
    let columns = parse_entries(entries)?;
    let uri = catalog.locate(table).await?;
    let branch = branch.filter(|b| branch_name(Some(b)).is_some());
    let mut dataset = open_latest(catalog, &uri, branch.as_deref()).await?;
    let additions = check(&ArrowSchema::from(dataset.schema()), &columns)?;
    apply(&mut dataset, &additions).await?;
    let version = dataset.version().version;
    info!(table = %table.display(), filled = additions.fills.len(), computed = additions.declared.len(), version, "columns added");
    Ok(version)
}

fn parse_entries(entries: &[AddColumnsEntry]) -> Result<Vec<NewColumn>, Error> {
    if entries.is_empty() {
        return Err(Error::invalid_input(
            "field 'new_columns' must list at least one column",
        ));
    }
    let mut columns = Vec::new();
    let mut names = HashSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("new_columns[{i}]");
        let name = entry.name.trim().to_string();
        if name.is_empty() {
            return Err(Error::invalid_input(format!(
                "field '{field}.name' must not be empty"
            )));
        }
        if !names.insert(name.clone()) {
            return Err(Error::invalid_input(format!(
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
                return Err(Error::invalid_input(format!(
                    "field '{field}': column '{name}' must set exactly one of 'expression', 'computed' or 'virtual_column'"
                )));
            }
        }
    }
    Ok(columns)
}

async fn open_latest(catalog: &Catalog, uri: &str, branch: Option<&str>) -> Result<Dataset, Error> {
    catalog.latest(uri, branch).await.map_err(|err| {
        match Error::from_lance(err, "opening the table") {
            Error::NotFound { .. } if branch.is_some() => Error::not_found(
                Missing::Branch,
                format!(
                    "field 'branch': the table has no branch '{}'",
                    branch.unwrap_or_default()
                ),
            ),
            other => other,
        }
    })
}

/// Checks every column before anything changes: names are new, expressions
/// fit the table (computed ones may read the filled ones).
fn check(schema: &ArrowSchema, columns: &[NewColumn]) -> Result<Additions, Error> {
    if let Some(existing) = columns
        .iter()
        .find(|c| schema.field_with_name(c.name()).is_ok())
    {
        return Err(Error::invalid_input(format!(
            "column '{}' already exists in the table",
            existing.name()
        )));
    }
    let mut schema = schema.clone();
    let mut fills = Vec::new();
    let mut filled_types: Vec<(String, DataType)> = Vec::new();
    for column in columns {
        if let NewColumn::Expression { name, sql } = column {
            let (data_type, _) =
                infer_expression(&schema, sql, &format!("expression of column '{name}'"))?;
            fills.push((name.clone(), sql.clone()));
            filled_types.push((name.clone(), data_type));
        }
    }
    for (name, data_type) in filled_types {
        schema = extend(&schema, ArrowField::new(name, data_type, true));
    }
    let mut declared = Vec::new();
    for column in columns {
        if let NewColumn::Computed { name, sql } = column {
            let what = format!("computed expression of column '{name}'");
            let (data_type, _) = infer_expression(&schema, sql, &what)?;
            let field = ArrowField::new(name, data_type, true)
                .with_metadata(HashMap::from([(BINDING_KEY.to_string(), sql.clone())]));
            schema = extend(&schema, field.clone());
            declared.push(field);
        }
    }
    Ok(Additions { fills, declared })
}

async fn apply(dataset: &mut Dataset, additions: &Additions) -> Result<(), Error> {
    if !additions.fills.is_empty() {
        let transform = NewColumnTransform::SqlExpressions(additions.fills.clone());
        // Evaluating the expressions over the table may panic inside Arrow
        // (a value past a 2 GB array): that is the request's fault, not the
        // process's.
        let filled = std::panic::AssertUnwindSafe(dataset.add_columns(transform, None, None))
            .catch_unwind()
            .await
            .map_err(|_| {
                Error::invalid_input(
                    "evaluating the expression columns failed: their values are too large",
                )
            })?;
        filled.map_err(|err| Error::from_lance(err, "adding expression columns"))?;
    }
    if !additions.declared.is_empty() {
        let schema = Arc::new(ArrowSchema::new(additions.declared.clone()));
        dataset
            .add_columns(NewColumnTransform::AllNulls(schema), None, None)
            .await
            .map_err(|err| Error::from_lance(err, "declaring computed columns"))?;
    }
    Ok(())
}

fn extend(schema: &ArrowSchema, field: ArrowField) -> ArrowSchema {
    let mut fields: Vec<ArrowField> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(field);
    ArrowSchema::new_with_metadata(fields, schema.metadata().clone())
}
