//! Computed columns: the binding kept in field metadata, resolving the column
//! a request names, and compiling its expression and `where` predicate into
//! DataFusion physical expressions evaluated over Arrow batches.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch};
use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use lance::datatypes::{Schema as LanceSchema, escape_field_path_for_project, parse_field_path};
use lance::deps::datafusion::physical_plan::PhysicalExpr;
use lance::io::exec::Planner;

use crate::error::{Error, Missing, first_line};

pub mod limits;

/// Field metadata key holding a computed column's SQL expression.
pub const BINDING_KEY: &str = "lance-backfill:expression";

/// The column a backfill request names, resolved against the table schema.
#[derive(Debug, Clone)]
pub struct TargetColumn {
    /// Top-level field name (computed columns are always top-level).
    pub name: String,
    pub expression: String,
    pub data_type: DataType,
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
    let expression = field.metadata.get(BINDING_KEY).cloned().ok_or_else(|| {
        Error::invalid_input(format!(
            "field 'column': column '{column}' is not a computed column (declare it with \
             POST /v1/table/{{id}}/add_columns and a 'computed' expression)"
        ))
    })?;
    Ok(TargetColumn {
        name: field.name.clone(),
        expression,
        data_type: field.data_type(),
    })
}

/// The default `where`: rows whose value is still missing.
pub fn default_filter(column: &str) -> String {
    format!("{} IS NULL", escape_field_path_for_project(column))
}

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

/// A compiled backfill: what to read, what to compute, which rows to choose.
pub struct Program {
    pub column: String,
    pub expression: String,
    pub filter: String,
    /// The columns read from each fragment (inputs, filter inputs and the target).
    pub read_schema: LanceSchema,
    pub output_field: Arc<ArrowField>,
    value: Arc<dyn PhysicalExpr>,
    predicate: Arc<dyn PhysicalExpr>,
    target_index: usize,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("column", &self.column)
            .field("expression", &self.expression)
            .field("filter", &self.filter)
            .finish()
    }
}

/// The values of one batch of rows, ready to be written.
pub struct Evaluated {
    pub values: ArrayRef,
    /// Rows the predicate chose (and so were computed).
    pub selected: usize,
    /// Whether any live row's value differs from the current one.
    pub changed: bool,
}

/// The parsed (not yet planned) expression and predicate of a backfill.
struct Parsed {
    expression: String,
    filter: String,
    value: lance::deps::datafusion::prelude::Expr,
    predicate: lance::deps::datafusion::prelude::Expr,
}

impl Parsed {
    fn new(
        schema: &LanceSchema,
        target: &TargetColumn,
        filter: Option<&str>,
    ) -> Result<Self, Error> {
        let planner = Planner::new(Arc::new(ArrowSchema::from(schema)));
        let expression = target.expression.clone();
        let filter = filter
            .map(str::to_string)
            .unwrap_or_else(|| default_filter(&target.name));
        let expression_what = format!("the expression of computed column '{}'", target.name);
        limits::check_text(&expression, &expression_what)?;
        limits::check_text(&filter, "field 'where'")?;
        let value = planner.parse_expr(&expression).map_err(|err| {
            Error::invalid_input(format!(
                "the expression of computed column '{}' ('{expression}') no longer fits the table: {}",
                target.name,
                first_line(&err)
            ))
        })?;
        let predicate = planner
            .parse_filter(&filter)
            .map_err(|err| bad_where(&filter, &err))?;
        limits::check_constants(&value, &expression_what)?;
        limits::check_constants(&predicate, "field 'where'")?;
        Ok(Self {
            expression,
            filter,
            value,
            predicate,
        })
    }

    /// Every column the program reads: inputs, filter inputs and the target.
    fn read_columns(
        &self,
        schema: &LanceSchema,
        target: &TargetColumn,
    ) -> Result<Vec<String>, Error> {
        let value_columns = Planner::column_names_in_expr(&self.value);
        let predicate_columns = Planner::column_names_in_expr(&self.predicate);
        if let Some(missing) = predicate_columns
            .iter()
            .find(|c| schema.resolve(c.as_str()).is_none())
        {
            return Err(Error::invalid_input(format!(
                "field 'where': column '{missing}' in '{}' does not exist in the table",
                self.filter
            )));
        }
        if let Some(missing) = value_columns
            .iter()
            .find(|c| schema.resolve(c.as_str()).is_none())
        {
            return Err(Error::invalid_input(format!(
                "the expression of computed column '{}' ('{}') reads column '{missing}', which no longer exists in the table",
                target.name, self.expression
            )));
        }
        let mut columns: BTreeSet<String> = value_columns.into_iter().collect();
        columns.extend(predicate_columns);
        columns.insert(escape_field_path_for_project(&target.name));
        Ok(columns.into_iter().collect())
    }
}

fn bad_where(filter: &str, err: &dyn std::fmt::Display) -> Error {
    Error::invalid_input(format!(
        "field 'where': cannot use '{filter}': {}",
        first_line(err)
    ))
}

impl Program {
    /// The key of this program's checkpoints.
    pub fn checkpoint_key(&self) -> crate::checkpoint::Key {
        crate::checkpoint::Key {
            column: self.column.clone(),
            expression: self.expression.clone(),
            filter: self.filter.clone(),
            output_type: self.output_field.data_type().to_string(),
        }
    }

    /// Compiles a backfill of `target`, choosing rows with `filter` (default:
    /// the rows whose value is missing). Planned on a thread of its own with
    /// a large stack; every bound of [`limits`] is checked first.
    pub fn compile(
        schema: &LanceSchema,
        target: &TargetColumn,
        filter: Option<&str>,
    ) -> Result<Self, Error> {
        limits::on_planning_stack(|| Self::compile_here(schema, target, filter))
    }

    fn compile_here(
        schema: &LanceSchema,
        target: &TargetColumn,
        filter: Option<&str>,
    ) -> Result<Self, Error> {
        let parsed = Parsed::new(schema, target, filter)?;
        let columns = parsed.read_columns(schema, target)?;
        let read_schema = schema.project(&columns).map_err(|err| {
            Error::invalid_input(format!(
                "cannot read columns {columns:?}: {}",
                first_line(&err)
            ))
        })?;
        let read_arrow = Arc::new(ArrowSchema::from(&read_schema));
        let target_index = read_arrow.index_of(&target.name).map_err(|_| {
            Error::Internal(format!(
                "column '{}' missing from its own projection",
                target.name
            ))
        })?;
        let planner = Planner::new(read_arrow.clone());
        let value = plan_value(&planner, &read_arrow, &parsed.expression, target)?;
        let predicate = plan_predicate(&planner, &read_arrow, &parsed.filter)?;
        Ok(Self {
            column: target.name.clone(),
            expression: parsed.expression,
            filter: parsed.filter,
            read_schema,
            output_field: Arc::new(read_arrow.field(target_index).clone()),
            value,
            predicate,
            target_index,
        })
    }

    /// Computes one batch: chosen rows get the expression's value, the others
    /// keep their current value, and rows in `deleted` become null.
    pub fn evaluate(
        &self,
        batch: &RecordBatch,
        deleted: Option<&BooleanArray>,
    ) -> Result<Evaluated, lance::Error> {
        let rows = batch.num_rows();
        let current = batch.column(self.target_index).clone();
        let chosen = self.predicate.evaluate(batch)?.into_array(rows)?;
        let chosen = chosen
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| lance::Error::invalid_input("the where predicate is not boolean"))?;
        // A NULL predicate does not choose the row.
        let mut chosen = if chosen.null_count() > 0 {
            arrow_select::filter::prep_null_mask_filter(chosen)
        } else {
            chosen.clone()
        };
        if let Some(deleted) = deleted {
            chosen = arrow_arith::boolean::and_not(&chosen, deleted)?;
        }
        let selected = chosen.true_count();
        let mut values = if selected == 0 {
            current.clone()
        } else {
            let computed = self.value.evaluate(batch)?.into_array(rows)?;
            let computed = if computed.data_type() == self.output_field.data_type() {
                computed
            } else {
                arrow_cast::cast(&computed, self.output_field.data_type())?
            };
            if selected == rows {
                computed
            } else {
                arrow_select::zip::zip(&chosen, &computed, &current)?
            }
        };
        if let Some(deleted) = deleted
            && deleted.true_count() > 0
        {
            values = arrow_select::nullif::nullif(&values, deleted)?;
        }
        let changed = selected > 0
            && if current.null_count() == rows && deleted.is_none_or(|d| d.true_count() == 0) {
                // A column not filled yet (the common first run): any value is new.
                values.null_count() < rows
            } else {
                let distinct = arrow_ord::cmp::distinct(&values, &current)?;
                let distinct = match deleted {
                    Some(deleted) => arrow_arith::boolean::and_not(&distinct, deleted)?,
                    None => distinct,
                };
                distinct.true_count() > 0
            };
        Ok(Evaluated {
            values,
            selected,
            changed,
        })
    }
}

/// Plans the column's expression over the projected schema and checks its
/// type can be stored in the column.
fn plan_value(
    planner: &Planner,
    read_arrow: &ArrowSchema,
    expression: &str,
    target: &TargetColumn,
) -> Result<Arc<dyn PhysicalExpr>, Error> {
    let value = planner
        .parse_expr(expression)
        .and_then(|e| planner.optimize_expr(e))
        .and_then(|e| planner.create_physical_expr(&e))
        .map_err(|err| {
            Error::invalid_input(format!(
                "the expression of computed column '{}' ('{expression}') cannot be planned: {}",
                target.name,
                first_line(&err)
            ))
        })?;
    let value_type = value.data_type(read_arrow).map_err(|err| {
        Error::invalid_input(format!(
            "the expression of computed column '{}' has no type: {}",
            target.name,
            first_line(&err)
        ))
    })?;
    if !arrow_cast::can_cast_types(&value_type, &target.data_type) {
        return Err(Error::invalid_input(format!(
            "the expression of computed column '{}' yields {value_type}, which cannot be \
             stored in the column's type {}",
            target.name, target.data_type
        )));
    }
    Ok(value)
}

/// Plans the `where` predicate and checks it is boolean.
fn plan_predicate(
    planner: &Planner,
    read_arrow: &ArrowSchema,
    filter: &str,
) -> Result<Arc<dyn PhysicalExpr>, Error> {
    let predicate = planner
        .parse_filter(filter)
        .and_then(|e| planner.optimize_expr(e))
        .and_then(|e| planner.create_physical_expr(&e))
        .map_err(|err| bad_where(filter, &err))?;
    let predicate_type = predicate.data_type(read_arrow).map_err(|err| {
        Error::invalid_input(format!("field 'where': '{filter}': {}", first_line(&err)))
    })?;
    if predicate_type != DataType::Boolean {
        return Err(Error::invalid_input(format!(
            "field 'where': '{filter}' is {predicate_type}, not a boolean predicate"
        )));
    }
    Ok(predicate)
}
