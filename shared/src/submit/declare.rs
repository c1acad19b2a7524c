//! Declaring columns (`add_columns`): `computed` entries declare a computed
//! column (a SQL expression), `virtual_column` entries a user function's
//! outputs, and `expression` entries a column filled once: all are added
//! all-null with their binding in the fields' metadata, for backfill jobs
//! to fill (the caller starts the jobs of `expression` columns and of
//! those declared with `auto_backfill`). Nothing here evaluates an
//! expression or runs a user function: a payload is only decoded, checked
//! and kept.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow_schema::{Field as ArrowField, Schema as ArrowSchema};
use lance::Dataset;
use lance::dataset::NewColumnTransform;
use lance_namespace_reqwest_client::models::{AddColumnsEntry, AddVirtualColumnEntry};
use tracing::info;

use crate::model::binding::{self, Declared};
use crate::model::error::{Error, Missing};
use crate::model::table::{Catalog, TableId, branch_name};
use crate::run::computed::{
    BINDING_KEY, DECLARED_BY_KEY, MAINTAINED_KEY, REFRESH_INTERVAL_KEY, infer_expression,
};

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
    /// Declared all-null, filled by backfills.
    declared: Vec<ArrowField>,
    /// User functions whose payloads are kept beside the table.
    functions: Vec<Declared>,
    /// Columns to fill right after the declaration (one per function or
    /// computed column declared with `auto_backfill`).
    to_fill: Vec<String>,
    /// `expression` columns: filled once, now.
    fill_once: Vec<String>,
}

/// What a declaration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declaration {
    pub version: u64,
    /// Columns the caller should backfill now (`auto_backfill`).
    pub to_fill: Vec<String>,
    /// `expression` columns the caller should fill now, and wait for.
    pub fill_once: Vec<String>,
}

/// Whether an entry declares a user function (that needs its own permission).
pub fn declares_udf(entries: &[AddColumnsEntry]) -> bool {
    entries
        .iter()
        .any(|e| e.virtual_column.as_ref().is_some_and(Option::is_some))
}

/// Whether the entries ask for a backfill at once (`expression` columns,
/// `auto_backfill` functions; `maintained` for computed columns): the
/// caller needs the right to submit.
pub fn starts_jobs(entries: &[AddColumnsEntry], maintained: bool) -> bool {
    entries.iter().any(|e| {
        e.expression.as_ref().is_some_and(Option::is_some)
            || (maintained && e.computed.as_ref().is_some_and(Option::is_some))
            || e.virtual_column
                .as_ref()
                .and_then(Option::as_ref)
                .is_some_and(|v| v.auto_backfill.flatten().unwrap_or(false))
    })
}

/// Whether the request asked for its computed columns to be kept filled as
/// rows arrive (`context.auto_backfill`, LanceDB's `auto_refresh_enabled`)
/// and how often at most a pass may start (`auto_refresh_interval_seconds`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Upkeep {
    pub maintained: bool,
    pub interval_seconds: Option<u64>,
}

/// Adds the columns to the table (on `branch`), maintained as `upkeep`
/// says, on behalf of `declared_by`.
pub async fn add_columns(
    catalog: &Catalog,
    table: &TableId,
    branch: Option<String>,
    entries: &[AddColumnsEntry],
    upkeep: Upkeep,
    declared_by: &str,
) -> Result<Declaration, Error> {
    let columns = parse_entries(entries)?;
    let uri = catalog.locate(table).await?;
    let branch = branch.filter(|b| branch_name(Some(b)).is_some());
    let mut dataset = open_latest(catalog, &uri, branch.as_deref()).await?;
    let schema = ArrowSchema::from(dataset.schema());
    let additions = check(&schema, &columns, upkeep, declared_by)?;
    apply(&mut dataset, &additions).await?;
    let version = dataset.manifest().version;
    info!(table = %table.display(), declared = additions.declared.len(), version, "columns added");
    Ok(Declaration {
        version,
        to_fill: additions.to_fill,
        fill_once: additions.fill_once,
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
    upkeep: Upkeep,
    declared_by: &str,
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
    let maintain = |field: ArrowField| mark_maintained(field, declared_by, upkeep);
    let SqlColumns {
        mut declared,
        mut to_fill,
        fill_once,
    } = check_sql(schema, columns, upkeep.maintained, &maintain)?;
    let functions = functions
        .into_iter()
        .map(|(function, auto)| {
            let mut fields = function.fields.clone();
            if auto {
                to_fill.push(function.binding.primary_column().to_string());
                fields = fields.into_iter().map(maintain).collect();
            }
            declared.extend(fields);
            function
        })
        .collect();
    Ok(Additions {
        declared,
        functions,
        to_fill,
        fill_once,
    })
}

/// The SQL columns of a declaration.
#[derive(Default)]
struct SqlColumns {
    declared: Vec<ArrowField>,
    /// Maintained ones: filled now and as rows arrive.
    to_fill: Vec<String>,
    /// `expression` ones: filled once, now.
    fill_once: Vec<String>,
}

/// The `computed` and `expression` columns as fields (an expression
/// column's SQL is kept like a computed one's), with those to fill now:
/// maintained ones, and expression ones (filled once).
fn check_sql(
    schema: &ArrowSchema,
    columns: &[NewColumn],
    maintained: bool,
    maintain: &dyn Fn(ArrowField) -> ArrowField,
) -> Result<SqlColumns, Error> {
    let mut schema = schema.clone();
    let mut sql_columns = SqlColumns::default();
    for column in columns {
        let (name, sql, once) = match column {
            NewColumn::Computed { name, sql } => (name, sql, false),
            NewColumn::Expression { name, sql } => (name, sql, true),
            NewColumn::Virtual { .. } => continue,
        };
        let what = match once {
            true => format!("expression of column '{name}'"),
            false => format!("computed expression of column '{name}'"),
        };
        let (data_type, _) = infer_expression(&schema, sql, &what)?;
        let mut field = ArrowField::new(name, data_type, true)
            .with_metadata(HashMap::from([(BINDING_KEY.to_string(), sql.clone())]));
        if once {
            sql_columns.fill_once.push(name.clone());
        } else if maintained {
            field = maintain(field);
            sql_columns.to_fill.push(name.clone());
        }
        schema = extend(&schema, field.clone());
        sql_columns.declared.push(field);
    }
    Ok(sql_columns)
}

/// A maintained column is filled whenever new rows arrive, with the rights
/// of whoever declared it.
fn mark_maintained(field: ArrowField, declared_by: &str, upkeep: Upkeep) -> ArrowField {
    let mut metadata = field.metadata().clone();
    metadata.insert(MAINTAINED_KEY.to_string(), "true".to_string());
    metadata.insert(DECLARED_BY_KEY.to_string(), declared_by.to_string());
    if let Some(seconds) = upkeep.interval_seconds {
        metadata.insert(REFRESH_INTERVAL_KEY.to_string(), seconds.to_string());
    }
    field.with_metadata(metadata)
}

async fn apply(dataset: &mut Dataset, additions: &Additions) -> Result<(), Error> {
    for function in &additions.functions {
        crate::run::payload::store(dataset, function)
            .await
            .map_err(|err| Error::transient(format!("{err:#}")))?;
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

/// Drops columns a declaration added (an `expression` column whose filling
/// failed: nothing of it is left).
pub async fn drop_columns(
    catalog: &Catalog,
    table: &TableId,
    branch: Option<&str>,
    columns: &[String],
) -> Result<(), Error> {
    let uri = catalog.locate(table).await?;
    let mut dataset = open_latest(catalog, &uri, branch).await?;
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    dataset
        .drop_columns(&names)
        .await
        .map_err(|err| Error::from_lance(err, "dropping the columns whose filling failed"))
}

fn extend(schema: &ArrowSchema, field: ArrowField) -> ArrowSchema {
    let mut fields: Vec<ArrowField> = schema.fields().iter().map(|f| f.as_ref().clone()).collect();
    fields.push(field);
    ArrowSchema::new_with_metadata(fields, schema.metadata().clone())
}
