//! Declaring columns (`add_columns`): `expression` entries are filled once
//! (Lance `add_columns`); `computed` entries declare a computed column (a SQL
//! expression) and `virtual_column` entries a user function's outputs, all
//! added all-null with their binding in the fields' metadata, for backfill
//! jobs to fill. Nothing here runs a user function: its payload is only
//! decoded, checked and kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use futures::FutureExt;
use lance::Dataset;
use lance::dataset::NewColumnTransform;
use lance_namespace_reqwest_client::models::{AddColumnsEntry, AddVirtualColumnEntry};
use tracing::info;

use crate::computed::{BINDING_KEY, MAINTAINED_KEY, infer_expression};
use crate::error::{Error, Missing};
use crate::table::{Catalog, TableId, branch_name};
use crate::udf::binding::{self, Declared};

/// Columns one request may add.
const MAX_NEW_COLUMNS: usize = 256;

/// One requested column, checked for shape.
enum NewColumn {
    Expression {
        name: String,
        sql: String,
    },
    Computed {
        name: String,
        sql: String,
    },
    Virtual {
        at: String,
        entry: Box<AddVirtualColumnEntry>,
    },
}

/// What to add, checked against the table before anything changes.
struct Additions {
    /// Filled at once: (name, SQL).
    fills: Vec<(String, String)>,
    /// Declared all-null, filled by backfills.
    declared: Vec<ArrowField>,
    /// User functions whose payloads are kept beside the table.
    functions: Vec<Declared>,
    /// Columns to fill right after the declaration (one per function or
    /// computed column declared with `auto_backfill`).
    to_fill: Vec<String>,
}

/// What a declaration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    pub version: u64,
    /// Columns the caller should backfill now (`auto_backfill`).
    pub to_fill: Vec<String>,
}

/// Whether an entry declares a user function (that needs its own permission).
pub fn declares_udf(entries: &[AddColumnsEntry]) -> bool {
    entries
        .iter()
        .any(|e| e.virtual_column.as_ref().is_some_and(Option::is_some))
}

/// Adds the columns to the table (on `branch`). `maintained`: the request's
/// `context` asked for its computed columns to be kept filled as rows arrive.
pub async fn add_columns(
    catalog: &Catalog,
    table: &TableId,
    branch: Option<String>,
    entries: &[AddColumnsEntry],
    maintained: bool,
) -> Result<Declaration, Error> {
    let columns = parse_entries(entries)?;
    let uri = catalog.locate(table).await?;
    let branch = branch.filter(|b| branch_name(Some(b)).is_some());
    let mut dataset = open_latest(catalog, &uri, branch.as_deref()).await?;
    let additions = check(&ArrowSchema::from(dataset.schema()), &columns, maintained)?;
    apply(&mut dataset, &additions).await?;
    let version = dataset.version().version;
    info!(table = %table.display(), filled = additions.fills.len(), declared = additions.declared.len(), version, "columns added");
    Ok(Declaration {
        version,
        to_fill: additions.to_fill,
    })
}

fn parse_entries(entries: &[AddColumnsEntry]) -> Result<Vec<NewColumn>, Error> {
    if entries.is_empty() || entries.len() > MAX_NEW_COLUMNS {
        return Err(Error::invalid_input(format!(
            "field 'new_columns' must list from 1 to {MAX_NEW_COLUMNS} columns"
        )));
    }
    let mut columns = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let field = format!("new_columns[{i}]");
        let name = entry.name.trim().to_string();
        if name.is_empty() {
            return Err(Error::invalid_input(format!(
                "field '{field}.name' must not be empty"
            )));
        }
        let expression = entry.expression.clone().flatten();
        let computed = entry.computed.clone().flatten();
        let virtual_column = entry.virtual_column.clone().flatten();
        columns.push(match (expression, computed, virtual_column) {
            (Some(sql), None, None) => NewColumn::Expression { name, sql },
            (None, Some(sql), None) => NewColumn::Computed { name, sql },
            (None, None, Some(entry)) => NewColumn::Virtual {
                at: format!("{field}.virtual_column"),
                entry,
            },
            _ => {
                return Err(Error::invalid_input(format!(
                    "field '{field}': column '{name}' must set exactly one of 'expression', 'computed' or 'virtual_column'"
                )));
            }
        });
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

/// Every name a request adds, checked new and distinct.
fn check_names(schema: &ArrowSchema, names: &[String]) -> Result<(), Error> {
    let mut seen = HashSet::new();
    for name in names {
        if name.is_empty() || name.contains('.') {
            return Err(Error::invalid_input(format!(
                "column name '{name}' is not allowed: a column needs a name, without '.' \
                 (Lance reads a dot as the path to a struct's field)"
            )));
        }
        if schema.field_with_name(name).is_ok() {
            return Err(Error::invalid_input(format!(
                "column '{name}' already exists in the table"
            )));
        }
        if !seen.insert(name.as_str()) {
            return Err(Error::invalid_input(format!(
                "column '{name}' is listed twice"
            )));
        }
    }
    Ok(())
}

/// Checks every column before anything changes: names are new, expressions
/// fit the table (computed ones may read the filled ones), user functions'
/// declarations are complete and their payloads intact.
fn check(
    schema: &ArrowSchema,
    columns: &[NewColumn],
    maintained: bool,
) -> Result<Additions, Error> {
    let mut names = Vec::new();
    let mut functions = Vec::new();
    for column in columns {
        match column {
            NewColumn::Expression { name, .. } | NewColumn::Computed { name, .. } => {
                names.push(name.clone())
            }
            NewColumn::Virtual { at, entry } => {
                let declared = binding::declare(entry, schema, at)?;
                names.extend(declared.binding.columns());
                functions.push((declared, entry.auto_backfill.flatten().unwrap_or(false)));
            }
        }
    }
    check_names(schema, &names)?;
    let (fills, schema) = check_fills(schema, columns)?;
    let (mut declared, mut to_fill) = check_computed(&schema, columns, maintained)?;
    let functions = functions
        .into_iter()
        .map(|(function, auto)| {
            let mut fields = function.fields.clone();
            if auto {
                to_fill.push(function.binding.primary_column().to_string());
                fields = fields.into_iter().map(mark_maintained).collect();
            }
            declared.extend(fields);
            function
        })
        .collect();
    Ok(Additions {
        fills,
        declared,
        functions,
        to_fill,
    })
}

/// The `expression` columns, and the schema with them added.
fn check_fills(
    schema: &ArrowSchema,
    columns: &[NewColumn],
) -> Result<(Vec<(String, String)>, ArrowSchema), Error> {
    let mut fills = Vec::new();
    let mut types: Vec<(String, DataType)> = Vec::new();
    for column in columns {
        if let NewColumn::Expression { name, sql } = column {
            let (data_type, _) =
                infer_expression(schema, sql, &format!("expression of column '{name}'"))?;
            fills.push((name.clone(), sql.clone()));
            types.push((name.clone(), data_type));
        }
    }
    let mut extended = schema.clone();
    for (name, data_type) in types {
        extended = extend(&extended, ArrowField::new(name, data_type, true));
    }
    Ok((fills, extended))
}

/// The `computed` columns as fields (and those to fill now, when maintained).
fn check_computed(
    schema: &ArrowSchema,
    columns: &[NewColumn],
    maintained: bool,
) -> Result<(Vec<ArrowField>, Vec<String>), Error> {
    let mut schema = schema.clone();
    let mut declared = Vec::new();
    let mut to_fill = Vec::new();
    for column in columns {
        if let NewColumn::Computed { name, sql } = column {
            let what = format!("computed expression of column '{name}'");
            let (data_type, _) = infer_expression(&schema, sql, &what)?;
            let mut field = ArrowField::new(name, data_type, true)
                .with_metadata(HashMap::from([(BINDING_KEY.to_string(), sql.clone())]));
            if maintained {
                field = mark_maintained(field);
                to_fill.push(name.clone());
            }
            schema = extend(&schema, field.clone());
            declared.push(field);
        }
    }
    Ok((declared, to_fill))
}

/// A maintained column is filled whenever new rows arrive.
fn mark_maintained(field: ArrowField) -> ArrowField {
    let mut metadata = field.metadata().clone();
    metadata.insert(MAINTAINED_KEY.to_string(), "true".to_string());
    field.with_metadata(metadata)
}

async fn apply(dataset: &mut Dataset, additions: &Additions) -> Result<(), Error> {
    for function in &additions.functions {
        crate::udf::payload::store(dataset, function)
            .await
            .map_err(|err| Error::transient(format!("{err:#}")))?;
    }
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
