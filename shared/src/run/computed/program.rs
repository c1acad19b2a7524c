//! Compiling a backfill: what to read, how values are made (a SQL
//! expression planned with DataFusion, or a user function's call), and the
//! `where` predicate that chooses rows.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow_schema::{DataType, Field as ArrowField, Schema as ArrowSchema};
use lance::datatypes::{Schema as LanceSchema, escape_field_path_for_project};
use lance::deps::datafusion::physical_plan::PhysicalExpr;
use lance::deps::datafusion::prelude::Expr;
use lance::io::exec::Planner;

use super::{TargetColumn, default_filter, limits};
use crate::model::binding::Binding;
use crate::model::error::{Error, first_line};
use crate::ports::udf::UdfCall;

/// An expression planned for evaluation, with its parsed form (which the
/// evaluation's memory bound is worked out from).
pub(super) struct Planned {
    pub physical: Arc<dyn PhysicalExpr>,
    pub logical: Expr,
}

/// How a program makes values.
pub(super) enum Values {
    Sql(Planned),
    /// A user function reading the columns at `inputs` (positions in the
    /// read schema); `call` is attached by the worker that runs it.
    Udf {
        binding: Box<Binding>,
        inputs: Vec<usize>,
        call: Option<Arc<UdfCall>>,
    },
}

/// A compiled backfill: what to read, what to compute, which rows to choose.
pub struct Program {
    /// The column that names the job (a function's first output).
    pub column: String,
    /// Every column the program fills, in order.
    pub columns: Vec<String>,
    pub expression: String,
    pub filter: String,
    /// The columns read from each fragment (inputs, filter inputs, targets).
    pub read_schema: LanceSchema,
    /// The fields filled, as the table declares them.
    pub output_fields: Vec<Arc<ArrowField>>,
    pub(super) values: Values,
    pub(super) predicate: Planned,
    /// Positions of the filled columns in the read schema.
    pub(super) target_indices: Vec<usize>,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program")
            .field("columns", &self.columns)
            .field("expression", &self.expression)
            .field("filter", &self.filter)
            .finish()
    }
}

/// The parsed (not yet planned) value expression and predicate.
struct Parsed {
    expression: String,
    filter: String,
    /// `None` for a user function.
    value: Option<Expr>,
    predicate: Expr,
}

fn bad_where(filter: &str, err: &dyn std::fmt::Display) -> Error {
    Error::invalid_input(format!(
        "field 'where': cannot use '{filter}': {}",
        first_line(err)
    ))
}

impl Parsed {
    fn new(
        schema: &LanceSchema,
        target: &TargetColumn,
        filter: Option<&str>,
    ) -> Result<Self, Error> {
        let planner = Planner::new(Arc::new(ArrowSchema::from(schema)));
        let filter = filter
            .map(str::to_string)
            .unwrap_or_else(|| default_filter(&target.name));
        limits::check_text(&filter, "field 'where'")?;
        let predicate = planner
            .parse_filter(&filter)
            .map_err(|err| bad_where(&filter, &err))?;
        limits::check_constants(&predicate, "field 'where'")?;
        let value = match &target.udf {
            Some(_) => None,
            None => Some(parse_value(&planner, target)?),
        };
        Ok(Self {
            expression: target.expression.clone(),
            filter,
            value,
            predicate,
        })
    }

    /// Every column the program reads: inputs, filter inputs and targets.
    fn read_columns(
        &self,
        schema: &LanceSchema,
        target: &TargetColumn,
    ) -> Result<Vec<String>, Error> {
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
        // SQL inputs come as paths already; a function's are plain names.
        let inputs = match (&self.value, &target.udf) {
            (Some(value), _) => Planner::column_names_in_expr(value),
            (None, Some(binding)) => binding
                .input_columns
                .iter()
                .map(|c| escape_field_path_for_project(c))
                .collect(),
            (None, None) => Vec::new(),
        };
        if let Some(missing) = inputs.iter().find(|c| schema.resolve(c.as_str()).is_none()) {
            return Err(Error::invalid_input(format!(
                "the binding of column '{}' ('{}') reads column '{missing}', which no longer \
                 exists in the table",
                target.name, self.expression
            )));
        }
        let mut columns: BTreeSet<String> = inputs.into_iter().collect();
        columns.extend(predicate_columns);
        for column in targets(target) {
            columns.insert(escape_field_path_for_project(&column));
        }
        Ok(columns.into_iter().collect())
    }
}

fn parse_value(planner: &Planner, target: &TargetColumn) -> Result<Expr, Error> {
    let what = format!("the expression of computed column '{}'", target.name);
    limits::check_text(&target.expression, &what)?;
    let value = planner.parse_expr(&target.expression).map_err(|err| {
        Error::invalid_input(format!(
            "the expression of computed column '{}' ('{}') no longer fits the table: {}",
            target.name,
            target.expression,
            first_line(&err)
        ))
    })?;
    limits::check_constants(&value, &what)?;
    Ok(value)
}

/// The columns a target fills.
fn targets(target: &TargetColumn) -> Vec<String> {
    match &target.udf {
        Some(binding) => binding.columns(),
        None => vec![target.name.clone()],
    }
}

impl Program {
    /// The key of this program's checkpoints.
    pub fn checkpoint_key(&self) -> crate::run::checkpoint::Key {
        crate::run::checkpoint::Key::new(
            &self.columns,
            &self.expression,
            self.filter.clone(),
            &self.output_fields,
        )
    }

    /// Compiles the program of a job's fragments read `at`: its column
    /// (`target`, resolved in `schema`) and the `where` of those fragments.
    /// Its [`Self::checkpoint_key`] is the fragments'
    /// ([`crate::run::checkpoint::Key::for_fragment`]).
    pub fn for_job(
        schema: &LanceSchema,
        target: &TargetColumn,
        spec: &crate::model::job::JobSpec,
        at: &crate::model::plan::ReadAt,
    ) -> Result<Self, Error> {
        Self::compile(schema, target, Some(&spec.filter_for(at)))
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
        let outputs = targets(target);
        let target_indices = indices(&read_arrow, &outputs)?;
        let planner = Planner::new(read_arrow.clone());
        let values = match (&target.udf, &parsed.value) {
            (None, Some(logical)) => Values::Sql(Planned {
                physical: plan_value(&planner, &read_arrow, &parsed.expression, target)?,
                logical: logical.clone(),
            }),
            (None, None) => {
                return Err(Error::Internal(
                    "a SQL column without its expression".into(),
                ));
            }
            (Some(binding), _) => Values::Udf {
                binding: Box::new(binding.clone()),
                inputs: indices(&read_arrow, &binding.input_columns)?,
                call: None,
            },
        };
        let predicate = Planned {
            physical: plan_predicate(&planner, &read_arrow, &parsed.filter)?,
            logical: parsed.predicate.clone(),
        };
        Ok(Self {
            column: target.name.clone(),
            output_fields: target_indices
                .iter()
                .map(|i| Arc::new(read_arrow.field(*i).clone()))
                .collect(),
            columns: outputs,
            expression: parsed.expression,
            filter: parsed.filter,
            read_schema,
            values,
            predicate,
            target_indices,
        })
    }

    /// The program with the call of its user function attached (workers).
    pub fn with_udf(mut self, call: Arc<UdfCall>) -> Self {
        if let Values::Udf { call: slot, .. } = &mut self.values {
            *slot = Some(call);
        }
        self
    }

    /// Ids of the fields it fills, and of the other fields it reads (its
    /// inputs and the `where`'s columns), children included.
    pub fn field_ids(&self) -> (Vec<i32>, Vec<i32>) {
        let targets: Vec<i32> = self
            .read_schema
            .fields
            .iter()
            .filter(|f| self.columns.contains(&f.name))
            .flat_map(field_ids)
            .collect();
        let inputs = self
            .read_schema
            .field_ids()
            .into_iter()
            .filter(|id| !targets.contains(id))
            .collect();
        (targets, inputs)
    }

    /// The user function's binding, for a program that runs one.
    pub fn udf(&self) -> Option<&Binding> {
        match &self.values {
            Values::Udf { binding, .. } => Some(binding),
            Values::Sql(_) => None,
        }
    }
}

/// The ids of a field and of its children, all the way down.
pub fn field_ids(field: &lance::datatypes::Field) -> Vec<i32> {
    let mut ids = vec![field.id];
    for child in &field.children {
        ids.extend(field_ids(child));
    }
    ids
}

fn indices(schema: &ArrowSchema, columns: &[String]) -> Result<Vec<usize>, Error> {
    columns
        .iter()
        .map(|column| {
            schema.index_of(column).map_err(|_| {
                Error::Internal(format!("column '{column}' missing from its own projection"))
            })
        })
        .collect()
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
