//! Memory bounds of evaluating SQL: before a batch is evaluated, an upper
//! bound of the bytes the expression can make per row is worked out from
//! the batch itself (the longest value of each column it reads, the largest
//! count a function is asked for), so a batch is evaluated in slices that
//! fit a budget, a row that alone would not fit fails the task with the
//! reason, and every evaluation in the process holds its bytes of one
//! shared budget while it runs. DataFusion allocates a function's whole
//! result up front, and a failed allocation aborts the process: the bound
//! must come first.

use std::sync::OnceLock;

use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use lance::deps::datafusion::common::ScalarValue;
use lance::deps::datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use lance::deps::datafusion::logical_expr::Operator;
use lance::deps::datafusion::prelude::Expr;
use tokio::sync::{Semaphore, SemaphorePermit};

/// What one slice of a batch may make at most.
pub const SLICE_BYTES: u64 = 256 << 20;
/// What every evaluation of the process together may hold at once.
pub const PROCESS_BYTES: u64 = 2 << 30;
/// The budget's unit (a permit).
const UNIT: u64 = 1 << 20;
/// Bytes counted for a value of unknown shape, and per operator.
const OVERHEAD: u64 = 64;
/// The widest fixed-width value an operator makes (a 256-bit decimal).
const FIXED_WIDTH: u64 = 32;

/// The process's budget, in permits of [`UNIT`] bytes.
fn process_budget() -> &'static Semaphore {
    static BUDGET: OnceLock<Semaphore> = OnceLock::new();
    BUDGET.get_or_init(|| Semaphore::new((PROCESS_BYTES / UNIT) as usize))
}

/// Holds `bytes` of the process's budget (at most all of it) until dropped.
pub async fn hold(bytes: u64) -> SemaphorePermit<'static> {
    let units = bytes.div_ceil(UNIT).clamp(1, PROCESS_BYTES / UNIT) as u32;
    process_budget()
        .acquire_many(units)
        .await
        .expect("the evaluation budget is never closed")
}

/// An upper bound of the bytes evaluating `expr` holds for one row of
/// `batch`: every sub-expression's result is made (DataFusion evaluates
/// the arguments of a function before it, whatever it then does with
/// them), so the bound is the sum of each one's.
pub fn bytes_per_row(expr: &Expr, batch: &RecordBatch) -> u64 {
    let mut total: u64 = 0;
    let _ = expr.apply(|node| {
        total = total.saturating_add(output_bytes(node, batch));
        Ok(TreeNodeRecursion::Continue)
    });
    total
}

/// An upper bound of the bytes of `expr`'s result for one row of `batch`.
fn output_bytes(expr: &Expr, batch: &RecordBatch) -> u64 {
    match expr {
        Expr::Column(column) => batch
            .column_by_name(column.name())
            .map(max_row_bytes)
            .unwrap_or(OVERHEAD),
        Expr::Literal(value, _) => value.size() as u64,
        Expr::ScalarFunction(call) => function_bytes(call.func.name(), &call.args, batch),
        // Concatenation makes both sides; any other operator a number or a
        // boolean (a decimal at most 32 bytes wide).
        Expr::BinaryExpr(binary) => match binary.op {
            Operator::StringConcat => output_bytes(&binary.left, batch)
                .saturating_add(output_bytes(&binary.right, batch))
                .saturating_add(OVERHEAD),
            _ => FIXED_WIDTH,
        },
        Expr::Not(_)
        | Expr::IsNull(_)
        | Expr::IsNotNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::Like(_)
        | Expr::SimilarTo(_)
        | Expr::Between(_)
        | Expr::InList(_) => FIXED_WIDTH,
        other => {
            let mut total = OVERHEAD;
            let _ = other.apply_children(|child| {
                total = total.saturating_add(output_bytes(child, batch));
                Ok(TreeNodeRecursion::Continue)
            });
            total
        }
    }
}

/// A function's bound from its arguments': the functions that build values
/// as large as an argument asks by its count, its replacement or its width.
fn function_bytes(name: &str, args: &[Expr], batch: &RecordBatch) -> u64 {
    let arg = |i: usize| args.get(i).map_or(0, |a| output_bytes(a, batch));
    let count = |i: usize| args.get(i).map_or(0, |a| largest_count(a, batch));
    let sum = (0..args.len()).fold(OVERHEAD, |t, i| t.saturating_add(arg(i)));
    match name {
        "repeat" => arg(0).saturating_mul(count(1)).saturating_add(OVERHEAD),
        "array_repeat" => arg(0)
            .saturating_add(8)
            .saturating_mul(count(1))
            .saturating_add(OVERHEAD),
        // Characters of up to 4 bytes each, filled to the asked length.
        "lpad" | "rpad" => count(1).saturating_mul(4).saturating_add(arg(0)),
        // Every character (or match) may become the replacement.
        "replace" | "regexp_replace" => arg(0).saturating_mul(arg(2).max(1)).saturating_add(arg(0)),
        "translate" => arg(0).saturating_mul(4),
        // Case changes may make a character up to three times longer.
        "upper" | "lower" | "initcap" => arg(0).saturating_mul(3).saturating_add(OVERHEAD),
        // The separator goes between every two arguments.
        "concat_ws" => arg(0).saturating_mul(args.len() as u64).saturating_add(sum),
        // Every element (at least a byte of the list each) as text, with
        // the separator (and the null replacement) after each.
        "array_to_string" | "array_join" | "list_to_string" | "list_join" => arg(0)
            .saturating_mul(arg(1).saturating_add(arg(2)).saturating_add(24))
            .saturating_add(OVERHEAD),
        // Every character may become an element.
        "string_to_array" | "string_to_list" | "regexp_split_to_array" => {
            arg(0).saturating_mul(8).saturating_add(OVERHEAD)
        }
        "regexp_match" => arg(0)
            .saturating_mul(arg(1).max(1))
            .saturating_add(OVERHEAD),
        "array_resize" | "list_resize" => count(1)
            .saturating_mul(arg(2).saturating_add(8))
            .saturating_add(arg(0)),
        "encode" => arg(0).saturating_mul(2).saturating_add(OVERHEAD),
        "range" | "generate_series" => series_elements(args, batch)
            .saturating_mul(8)
            .saturating_add(OVERHEAD),
        _ => sum,
    }
}

/// The most elements `range(start, stop[, step])` (or `range(stop)`) may
/// make over the batch: the widest distance between a start and a stop
/// over the smallest step.
fn series_elements(args: &[Expr], batch: &RecordBatch) -> u64 {
    let range = |i: usize| args.get(i).map(|a| value_range(a, batch));
    let (start, stop) = match (range(0), range(1)) {
        (Some(stop), None) => ((0, 0), stop),
        (Some(start), Some(stop)) => (start, stop),
        _ => return 0,
    };
    let step = match range(2) {
        // A step of zero is an error; of either sign, the smallest size.
        Some((low, high)) if low > 0 || high < 0 => low.abs().min(high.abs()),
        Some(_) => 1,
        None => 1,
    };
    let widest = (stop.1 - start.0).abs().max((start.1 - stop.0).abs());
    u64::try_from(widest / step.max(1) + 1).unwrap_or(u64::MAX)
}

/// The smallest and largest value an integer argument may take over the
/// batch (a literal's, a column's); unknown: any 64-bit integer.
fn value_range(expr: &Expr, batch: &RecordBatch) -> (i128, i128) {
    let any = (i128::from(i64::MIN), i128::from(i64::MAX));
    match expr {
        Expr::Literal(value, _) => match value.cast_to(&DataType::Int64) {
            Ok(ScalarValue::Int64(Some(n))) => (n.into(), n.into()),
            _ => any,
        },
        Expr::Column(column) => batch
            .column_by_name(column.name())
            .and_then(|array| {
                let ints = arrow_cast::cast(array, &DataType::Int64).ok()?;
                let ints = ints.as_primitive::<arrow_array::types::Int64Type>();
                let low = arrow_arith::aggregate::min(ints)?;
                let high = arrow_arith::aggregate::max(ints)?;
                Some((low.into(), high.into()))
            })
            .unwrap_or(any),
        Expr::Cast(cast) => value_range(&cast.expr, batch),
        Expr::Negative(inner) => {
            let (low, high) = value_range(inner, batch);
            (-high, -low)
        }
        _ => any,
    }
}

/// The largest count an argument may ask for: a literal's value, or the
/// largest value of an integer column in the batch; unknown: unbounded.
fn largest_count(expr: &Expr, batch: &RecordBatch) -> u64 {
    let as_count = |value: ScalarValue| match value.cast_to(&DataType::Int64) {
        Ok(ScalarValue::Int64(Some(n))) => n.max(0) as u64,
        Ok(ScalarValue::Int64(None)) => 0,
        _ => u64::MAX,
    };
    match expr {
        Expr::Literal(value, _) => as_count(value.clone()),
        Expr::Column(column) => batch
            .column_by_name(column.name())
            .and_then(|array| {
                let ints = arrow_cast::cast(array, &DataType::Int64).ok()?;
                arrow_arith::aggregate::max(ints.as_primitive::<arrow_array::types::Int64Type>())
            })
            .map_or(u64::MAX, |n| n.max(0) as u64),
        Expr::Cast(cast) => largest_count(&cast.expr, batch),
        _ => u64::MAX,
    }
}

/// The most bytes any one row of `array` holds.
pub fn max_row_bytes(array: &ArrayRef) -> u64 {
    if array.is_empty() {
        return 0;
    }
    match array.data_type() {
        DataType::Utf8 | DataType::Binary => longest(array.to_data().buffer::<i32>(0)),
        DataType::LargeUtf8 | DataType::LargeBinary => longest(array.to_data().buffer::<i64>(0)),
        DataType::List(_) => {
            let list = array.as_list::<i32>();
            longest(list.value_offsets()).saturating_mul(max_row_bytes(list.values()))
        }
        DataType::LargeList(_) => {
            let list = array.as_list::<i64>();
            longest(list.value_offsets()).saturating_mul(max_row_bytes(list.values()))
        }
        DataType::FixedSizeList(_, n) => {
            let list = array.as_fixed_size_list();
            (*n as u64).saturating_mul(max_row_bytes(list.values()))
        }
        DataType::Struct(_) => array
            .as_struct()
            .columns()
            .iter()
            .fold(0, |t, c| t.saturating_add(max_row_bytes(c))),
        other => match other.primitive_width() {
            Some(width) => width as u64,
            // Any other shape: as if one row held all of it.
            None => array.get_array_memory_size() as u64,
        },
    }
}

/// The largest difference between neighbouring offsets.
fn longest<T: Copy + Into<i128>>(offsets: &[T]) -> u64 {
    offsets
        .windows(2)
        .map(|w| (w[1].into() - w[0].into()).max(0) as u64)
        .max()
        .unwrap_or(0)
}

/// Rows per slice so that a slice makes at most [`SLICE_BYTES`]; `None`
/// when one row alone would make more.
pub fn rows_per_slice(bytes_per_row: u64) -> Option<usize> {
    let per_row = bytes_per_row.max(1);
    (per_row <= SLICE_BYTES).then(|| (SLICE_BYTES / per_row).max(1) as usize)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Schema};
    use lance::io::exec::Planner;

    use super::*;

    fn batch() -> RecordBatch {
        RecordBatch::try_new(
            Arc::new(Schema::new(vec![
                Field::new("s", DataType::Utf8, true),
                Field::new("x", DataType::Int64, true),
            ])),
            vec![
                Arc::new(StringArray::from(vec!["a", "bbbb", "cc"])),
                Arc::new(Int64Array::from(vec![1, 7, 3])),
            ],
        )
        .unwrap()
    }

    fn bound(sql: &str) -> u64 {
        let batch = batch();
        let expr = Planner::new(batch.schema()).parse_expr(sql).unwrap();
        bytes_per_row(&expr, &batch)
    }

    #[test]
    fn amplifying_functions_are_bounded_by_what_they_ask() {
        assert!(
            bound("repeat(s, 1000000)") >= 4_000_000,
            "the longest s, a million times"
        );
        assert!(bound("repeat(s, x)") >= 4 * 7, "x's largest value");
        assert!(bound("lpad(s, 500000)") >= 2_000_000, "4 bytes a character");
        assert!(bound("concat(repeat(s, 1000), repeat(s, 1000))") >= 8_000);
        assert!(bound("replace(s, 'b', repeat('z', 100))") >= 400);
        assert!(bound("array_repeat(x, 100000)") >= 800_000);
        assert_eq!(
            bound("repeat(s, length(s) * 1000000)"),
            u64::MAX,
            "unbounded count"
        );
        assert!(bound("x * 2 + 1") < 1_000, "arithmetic stays small");
    }

    /// For each function that can make more than it reads, at sizes small
    /// enough to run: the bound is at least what DataFusion makes.
    #[test]
    fn bounds_hold_for_what_each_amplifying_function_makes() {
        let batch = batch();
        for sql in AMPLIFYING {
            let expr = Planner::new(batch.schema()).parse_expr(sql).unwrap();
            let bound = bytes_per_row(&expr, &batch);
            let made = evaluate(sql, &batch);
            let most = max_row_bytes(&made);
            assert!(
                most <= bound,
                "{sql}: a row made {most} bytes, bound {bound}"
            );
        }
    }

    /// What the functions with a count or a replacement are asked for here.
    const AMPLIFYING: [&str; 20] = [
        "repeat(s, 1000)",
        "repeat(s, x * 100)",
        "repeat(repeat(s, 10), 10)",
        "lpad(s, 3000)",
        "rpad(s, 3000, 'xyz')",
        "lpad(s, x * 300, 'é')",
        "concat(repeat(s, 100), repeat(s, 100))",
        "concat_ws(repeat(s, 50), s, s, s, s)",
        "replace(s, 'b', repeat('z', 100))",
        "regexp_replace(s, '.', repeat(s, 30), 'g')",
        "translate(s, 'b', 'é')",
        "upper(repeat(s, 100))",
        "array_repeat(x, 1000)",
        "array_repeat(s, 200)",
        "array_to_string(array_repeat(x, 500), repeat(s, 5))",
        "string_to_array(repeat(s, 20), '')",
        "range(0, 1000)",
        "generate_series(1, x * 100)",
        "array_resize(make_array(x), 300, 7)",
        "lower(repeat(s, 100))",
    ];

    fn evaluate(sql: &str, batch: &RecordBatch) -> ArrayRef {
        let planner = Planner::new(batch.schema());
        let expr = planner.parse_expr(sql).unwrap();
        let physical = planner.create_physical_expr(&expr).unwrap();
        physical
            .evaluate(batch)
            .and_then(|v| v.into_array(batch.num_rows()))
            .unwrap_or_else(|err| panic!("{sql}: {err}"))
    }

    /// A long chain of arithmetic makes numbers: its bound stays small
    /// (and a string concatenation's grows with what it joins).
    #[test]
    fn operator_chains_are_bounded_by_what_they_make() {
        // Parsed as requests are, on the planning stack; bounded here, on
        // a thread of the default size, as a worker bounds each batch.
        let parsed = |sql: String| {
            let schema = batch().schema();
            crate::run::computed::limits::on_planning_stack(move || {
                Planner::new(schema).parse_expr(&sql).unwrap()
            })
        };
        let chain = parsed(format!("x{}", " + 1".repeat(999)));
        let bound = |expr: &Expr| bytes_per_row(expr, &batch());
        assert!(bound(&chain) < 100_000, "{}", bound(&chain));
        let predicate = parsed(vec!["x >= 0"; 500].join(" AND "));
        assert!(bound(&predicate) < 100_000, "{}", bound(&predicate));
        let bound = |sql: &str| bytes_per_row(&parsed(sql.to_string()), &batch());
        assert!(bound("s || s || s") >= 12, "three times the longest s");
    }

    #[test]
    fn slices_fit_the_budget_and_a_row_past_it_is_refused() {
        assert_eq!(rows_per_slice(8), Some((SLICE_BYTES / 8) as usize));
        assert_eq!(rows_per_slice(SLICE_BYTES), Some(1));
        assert_eq!(rows_per_slice(SLICE_BYTES + 1), None);
        assert_eq!(rows_per_slice(u64::MAX), None);
    }
}
