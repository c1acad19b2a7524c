//! Computed columns: the binding kept in field metadata (a SQL expression,
//! or a user function), resolving the column a request names, and the
//! [`Program`] that computes its values over Arrow batches.

use std::sync::Arc;

use arrow_schema::{DataType, Schema as ArrowSchema};
use lance::datatypes::{Schema as LanceSchema, parse_field_path};
use lance::io::exec::Planner;

use crate::model::binding::Binding;
use crate::model::binding::UDF_OUTPUT_OF_KEY;
use crate::model::error::{Error, Missing, first_line};
use crate::ports::udf::UDF_BINDING_KEY;

pub mod budget;
mod evaluate;
pub mod limits;
mod program;

pub use evaluate::Evaluated;
pub use program::{Program, field_ids};

/// Field metadata key holding a computed column's SQL expression.
pub const BINDING_KEY: &str = "lance-backfill:expression";
/// Field metadata key marking a column kept filled as rows arrive.
pub const MAINTAINED_KEY: &str = "lance-backfill:maintained";
/// Field metadata key holding the least time, in seconds, between the
/// starts of a maintained column's jobs (LanceDB's
/// `auto_refresh_interval_seconds`).
pub const REFRESH_INTERVAL_KEY: &str = "lance-backfill:refresh-interval-seconds";
/// Field metadata key naming who declared a maintained column: its jobs
/// run on that principal's behalf, with its rights of the moment.
pub const DECLARED_BY_KEY: &str = "lance-backfill:declared-by";

/// The column a backfill request names, resolved against the table schema.
#[derive(Debug, Clone)]
pub struct TargetColumn {
    /// Top-level field name (computed columns are always top-level); for a
    /// user function, its first output.
    pub name: String,
    /// The SQL expression, or a description of the user function.
    pub expression: String,
    pub data_type: DataType,
    /// The user function that fills the column and its sibling outputs.
    pub udf: Option<Binding>,
}

impl TargetColumn {
    /// The target of a recorded job in `schema` (the table as the job reads
    /// it): a function's binding is read from the table and must still be
    /// the job's function.
    pub fn of_job(spec: &crate::model::job::JobSpec, schema: &LanceSchema) -> Result<Self, Error> {
        let field = schema.field(&spec.column).ok_or_else(|| {
            Error::not_found(
                Missing::Column,
                format!("column '{}' is no longer in the table", spec.column),
            )
        })?;
        let udf = match &spec.udf {
            None => None,
            Some(function) => {
                let binding = binding_of(schema, field).unwrap_or_else(|| {
                    Err(Error::invalid_input(format!(
                        "column '{}' is no longer filled by a user function",
                        spec.column
                    )))
                })?;
                if binding.udf_id != function.udf_id {
                    return Err(Error::invalid_input(format!(
                        "column '{}' is now filled by another function ({} {}) than the job's ({} {})",
                        spec.column,
                        binding.udf_name,
                        binding.udf_version,
                        function.udf_name,
                        function.udf_version
                    )));
                }
                Some(binding)
            }
        };
        Ok(Self {
            name: spec.column.clone(),
            expression: spec.expression.clone(),
            data_type: field.data_type(),
            udf,
        })
    }
}

/// The binding of the function that fills `field`, if one does: kept whole
/// in the function's first output, which its other outputs name.
pub fn binding_of(
    schema: &LanceSchema,
    field: &lance::datatypes::Field,
) -> Option<Result<Binding, Error>> {
    if let Some(json) = field.metadata.get(UDF_BINDING_KEY) {
        return Some(Binding::from_json(json));
    }
    let primary = field.metadata.get(UDF_OUTPUT_OF_KEY)?;
    let json = schema
        .field(primary)
        .and_then(|p| p.metadata.get(UDF_BINDING_KEY))
        .ok_or_else(|| {
            Error::invalid_input(format!(
                "column '{}' is an output of a function whose first output '{primary}' is no \
                 longer in the table",
                field.name
            ))
        });
    Some(json.and_then(|json| Binding::from_json(json)))
}

/// How a job names a user function in its `expression`: name, version and
/// the start of the pickle's digest.
fn describe_udf(binding: &Binding) -> String {
    format!(
        "udf:{}@{}#{}",
        binding.udf_name,
        binding.udf_version,
        binding.udf_id.get(..12).unwrap_or(&binding.udf_id)
    )
}

/// Resolves `column` (a top-level name or a dot path with backtick quoting)
/// and checks it is a computed column.
pub fn resolve_target(schema: &LanceSchema, column: &str) -> Result<TargetColumn, Error> {
    if column.trim().is_empty() {
        return Err(Error::invalid_input("field 'column' must not be empty"));
    }
    // A literal top-level name wins over a dot-path reading of it.
    let fields = match schema.field(column) {
        Some(field) => vec![field],
        None => {
            parse_field_path(column).map_err(|err| {
                Error::invalid_input(format!(
                    "field 'column': '{column}' is not a valid column path: {}",
                    first_line(&err)
                ))
            })?;
            schema.resolve(column).ok_or_else(|| {
                Error::not_found(
                    Missing::Column,
                    format!("field 'column': column '{column}' does not exist in the table"),
                )
            })?
        }
    };
    let field = fields[fields.len() - 1];
    if fields.len() > 1 {
        return Err(Error::invalid_input(format!(
            "field 'column': '{column}' is a nested field; only top-level columns declared \
             with add_columns 'computed' can be backfilled"
        )));
    }
    if let Some(binding) = binding_of(schema, field) {
        let binding = binding?;
        let primary = binding.primary_column().to_string();
        let data_type = schema
            .field(&primary)
            .map(|f| f.data_type())
            .ok_or_else(|| {
                Error::invalid_input(format!(
                    "field 'column': the outputs of the function filling '{column}' are no \
                     longer all in the table"
                ))
            })?;
        return Ok(TargetColumn {
            name: primary,
            expression: describe_udf(&binding),
            data_type,
            udf: Some(binding),
        });
    }
    let expression = field.metadata.get(BINDING_KEY).cloned().ok_or_else(|| {
        Error::invalid_input(format!(
            "field 'column': column '{column}' is not a computed column (declare it with \
             POST /v1/table/{{id}}/add_columns and a 'computed' expression or a \
             'virtual_column')"
        ))
    })?;
    Ok(TargetColumn {
        name: field.name.clone(),
        expression,
        data_type: field.data_type(),
        udf: None,
    })
}

pub use crate::model::job::default_filter;

/// Checks an expression against a schema and returns its inferred type and
/// the columns it reads. Used when declaring a computed column.
pub fn infer_expression(
    schema: &ArrowSchema,
    expression: &str,
    what: &str,
) -> Result<(DataType, Vec<String>), Error> {
    limits::check_text(expression, what)?;
    limits::on_planning_stack(|| infer_checked(schema, expression, what))
}

fn infer_checked(
    schema: &ArrowSchema,
    expression: &str,
    what: &str,
) -> Result<(DataType, Vec<String>), Error> {
    let planner = Planner::new(Arc::new(schema.clone()));
    let bad = |err: &dyn std::fmt::Display| {
        Error::invalid_input(format!(
            "{what}: invalid expression '{expression}': {}",
            first_line(err)
        ))
    };
    let logical = planner.parse_expr(expression).map_err(|e| bad(&e))?;
    limits::check_constants(&logical, what)?;
    let inputs = Planner::column_names_in_expr(&logical);
    let logical = planner.optimize_expr(logical).map_err(|e| bad(&e))?;
    let physical = planner
        .create_physical_expr(&logical)
        .map_err(|e| bad(&e))?;
    let data_type = physical.data_type(schema).map_err(|e| bad(&e))?;
    if data_type == DataType::Null {
        return Err(Error::invalid_input(format!(
            "{what}: expression '{expression}' has no type (it is always NULL); cast it, e.g. CAST(NULL AS BIGINT)"
        )));
    }
    Ok((data_type, inputs))
}
