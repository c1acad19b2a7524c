//! Computing one batch: chosen rows get new values (the expression's, or
//! the user function's called on the chosen rows only), the others keep
//! their current values, and deleted rows become null.

use arrow_array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt32Array};
use arrow_select::filter::filter_record_batch;

use super::budget;
use super::program::{Planned, Program, Values};
use crate::model::error::Error;
use crate::ports::udf::{UdfCall, UdfError};
use crate::run::results;

/// The values of one batch of rows, ready to be written.
pub struct Evaluated {
    /// One array per filled column, in the program's order.
    pub values: Vec<ArrayRef>,
    /// Rows the predicate chose (and so were computed).
    pub selected: usize,
    /// Whether any live row's value differs from the current one.
    pub changed: bool,
    /// Rows of the batch a user function raised on (left null), with the error.
    pub failed: Vec<(usize, String)>,
}

fn evaluation(err: impl std::fmt::Display) -> Error {
    Error::Permanent(format!("computing values failed: {err}"))
}

impl Program {
    /// Computes one batch; `deleted` marks rows deleted at the read version.
    pub async fn evaluate(
        &self,
        batch: &RecordBatch,
        deleted: Option<&BooleanArray>,
    ) -> Result<Evaluated, Error> {
        let rows = batch.num_rows();
        let chosen = self.chosen(batch, deleted).await?;
        let selected = chosen.true_count();
        let current: Vec<ArrayRef> = self
            .target_indices
            .iter()
            .map(|i| batch.column(*i).clone())
            .collect();
        let (mut values, failed) = if selected == 0 {
            (current.clone(), Vec::new())
        } else {
            match &self.values {
                Values::Sql(value) => (
                    self.sql_values(value, batch, &chosen, &current).await?,
                    Vec::new(),
                ),
                Values::Udf {
                    binding,
                    inputs,
                    call,
                } => {
                    let call = call.as_ref().ok_or_else(|| {
                        Error::Internal(format!(
                            "user function '{}' has no runtime in this process",
                            binding.udf_name
                        ))
                    })?;
                    udf_values(call, binding, inputs, batch, &chosen, &current).await?
                }
            }
        };
        if let Some(deleted) = deleted
            && deleted.true_count() > 0
        {
            for column in &mut values {
                *column = arrow_select::nullif::nullif(column, deleted).map_err(evaluation)?;
            }
        }
        let changed = selected > 0 && changed(&values, &current, rows, deleted)?;
        Ok(Evaluated {
            values,
            selected,
            changed,
            failed,
        })
    }

    /// Rows the predicate chooses (a NULL predicate does not), live ones only.
    async fn chosen(
        &self,
        batch: &RecordBatch,
        deleted: Option<&BooleanArray>,
    ) -> Result<BooleanArray, Error> {
        let chosen = bounded(&self.predicate, batch, "the where predicate").await?;
        let chosen = chosen
            .as_any()
            .downcast_ref::<BooleanArray>()
            .ok_or_else(|| evaluation("the where predicate is not boolean"))?;
        let mut chosen = if chosen.null_count() > 0 {
            arrow_select::filter::prep_null_mask_filter(chosen)
        } else {
            chosen.clone()
        };
        if let Some(deleted) = deleted {
            chosen = arrow_arith::boolean::and_not(&chosen, deleted).map_err(evaluation)?;
        }
        Ok(chosen)
    }

    /// The expression's values for the chosen rows, the current ones for
    /// the others. Only the chosen rows are evaluated: a row the `where`
    /// leaves alone, or a deleted one, cannot fail the batch (a division
    /// by zero on a deleted row) nor cost its evaluation.
    async fn sql_values(
        &self,
        value: &Planned,
        batch: &RecordBatch,
        chosen: &BooleanArray,
        current: &[ArrayRef],
    ) -> Result<Vec<ArrayRef>, Error> {
        let rows = batch.num_rows();
        let all = chosen.true_count() == rows;
        let input = if all {
            batch.clone()
        } else {
            filter_record_batch(batch, chosen).map_err(evaluation)?
        };
        let computed = bounded(value, &input, "the expression").await?;
        let target = self.output_fields[0].data_type();
        let computed = if computed.data_type() == target {
            computed
        } else {
            arrow_cast::cast(&computed, target).map_err(evaluation)?
        };
        if all {
            return Ok(vec![computed]);
        }
        Ok(vec![put_back(&computed, chosen, &current[0])?])
    }
}

/// Evaluates `planned` over `batch` within the memory budget: the batch's
/// bound is held of the process's budget while it is evaluated (all at
/// once, so evaluations never wait on each other's halves), in slices of
/// rows whose bound fits [`budget::SLICE_BYTES`] (DataFusion allocates a
/// slice's whole result at once). A row whose bound alone is past a
/// slice's, or a batch whose bound is past the whole budget, fails the
/// batch (the task, not the process).
async fn bounded(planned: &Planned, batch: &RecordBatch, what: &str) -> Result<ArrayRef, Error> {
    let rows = batch.num_rows();
    let per_row = budget::bytes_per_row(&planned.logical, batch);
    let Some(slice_rows) = budget::rows_per_slice(per_row) else {
        return Err(Error::Permanent(format!(
            "computing values failed: {what} could make {} for one row of this batch, more \
             than the {} bytes a row may take; bound the count a function asks for",
            describe_bytes(per_row),
            budget::SLICE_BYTES
        )));
    };
    let total = per_row.saturating_mul(rows as u64);
    if total > budget::PROCESS_BYTES {
        return Err(Error::Permanent(format!(
            "computing values failed: {what} could make {} for this batch of {rows} rows, more \
             than the {} bytes evaluations may hold at once; lower 'checkpoint_size' (rows per \
             batch)",
            describe_bytes(total),
            budget::PROCESS_BYTES
        )));
    }
    let _held = budget::hold(total).await;
    let mut parts = Vec::new();
    let mut offset = 0;
    loop {
        let length = slice_rows.min(rows - offset);
        let slice = batch.slice(offset, length);
        let values = evaluate_slice(planned, &slice, what)?;
        parts.push(values);
        offset += length;
        if offset >= rows {
            break;
        }
    }
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    let arrays: Vec<&dyn Array> = parts.iter().map(|a| a.as_ref()).collect();
    arrow_select::concat::concat(&arrays).map_err(evaluation)
}

/// One slice's values. A panic of DataFusion's (a limit it checks by
/// panicking) fails the batch, not the worker.
fn evaluate_slice(planned: &Planned, slice: &RecordBatch, what: &str) -> Result<ArrayRef, Error> {
    let rows = slice.num_rows();
    let evaluated = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        planned
            .physical
            .evaluate(slice)
            .and_then(|v| v.into_array(rows))
    }));
    match evaluated {
        Ok(values) => values.map_err(evaluation),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no reason given".to_string());
            Err(Error::Permanent(format!(
                "computing values failed: evaluating {what} stopped: {reason}"
            )))
        }
    }
}

fn describe_bytes(bytes: u64) -> String {
    if bytes == u64::MAX {
        "an unbounded number of bytes (a count that depends on the data)".to_string()
    } else {
        format!("up to {bytes} bytes")
    }
}

/// Values computed for the chosen rows (in order) put in their places;
/// the other rows keep `current`.
fn put_back(
    computed: &ArrayRef,
    chosen: &BooleanArray,
    current: &ArrayRef,
) -> Result<ArrayRef, Error> {
    let mut next = 0u32;
    let take: UInt32Array = (0..chosen.len())
        .map(|i| {
            chosen.value(i).then(|| {
                next += 1;
                next - 1
            })
        })
        .collect();
    let placed = arrow_select::take::take(computed.as_ref(), &take, None).map_err(evaluation)?;
    arrow_select::zip::zip(chosen, &placed, current).map_err(evaluation)
}

/// Calls the function on the chosen rows only and puts its values back in
/// place; rows it raised on (when skipping) keep null.
async fn udf_values(
    call: &UdfCall,
    binding: &crate::model::binding::Binding,
    inputs: &[usize],
    batch: &RecordBatch,
    chosen: &BooleanArray,
    current: &[ArrayRef],
) -> Result<(Vec<ArrayRef>, Vec<(usize, String)>), Error> {
    let input = batch.project(inputs).map_err(evaluation)?;
    let input = filter_record_batch(&input, chosen).map_err(evaluation)?;
    let called = call
        .call(&input)
        .await
        .map_err(|err| udf_failure(binding, err))?;
    let computed = results::outputs(&called.values, binding, input.num_rows())?;
    let positions: Vec<usize> = (0..chosen.len()).filter(|i| chosen.value(*i)).collect();
    let values = computed
        .iter()
        .zip(current)
        .map(|(computed, current)| put_back(computed, chosen, current))
        .collect::<Result<Vec<_>, _>>()?;
    let failed = called
        .failed
        .into_iter()
        .map(|(row, error)| (positions[row], error))
        .collect();
    Ok((values, failed))
}

/// A user function's failure as the job sees it: the runtime being busy is
/// worth a retry; anything else fails the task.
fn udf_failure(binding: &crate::model::binding::Binding, err: UdfError) -> Error {
    let name = &binding.udf_name;
    match err {
        UdfError::Unavailable(reason) => {
            Error::transient(format!("user function '{name}': {reason}"))
        }
        UdfError::Raised {
            error_type,
            message,
            traceback,
        } => Error::Permanent(format!(
            "user function '{name}' raised {error_type}: {message}{}",
            last_line(&traceback)
        )),
        other => Error::Permanent(format!("user function '{name}': {other}")),
    }
}

/// The traceback's last frame line, for context.
fn last_line(traceback: &str) -> String {
    traceback
        .lines()
        .rev()
        .find(|line| line.trim_start().starts_with("File "))
        .map(|line| format!(" ({})", line.trim()))
        .unwrap_or_default()
}

/// Whether some live row's value differs: the distinct kernel where the
/// type has one, a row-by-row comparison for nested types (lists, structs).
fn rows_differ(
    values: &ArrayRef,
    current: &ArrayRef,
    deleted: Option<&BooleanArray>,
) -> Result<bool, Error> {
    let live = |row: usize| deleted.is_none_or(|d| !d.value(row));
    if let Ok(distinct) = arrow_ord::cmp::distinct(values, current) {
        return Ok((0..distinct.len()).any(|row| distinct.value(row) && live(row)));
    }
    let compare = arrow_ord::ord::make_comparator(
        values.as_ref(),
        current.as_ref(),
        arrow_schema::SortOptions::default(),
    )
    .map_err(evaluation)?;
    Ok((0..values.len()).any(|row| live(row) && compare(row, row) != std::cmp::Ordering::Equal))
}

/// Whether any live row's value differs from its current one.
fn changed(
    values: &[ArrayRef],
    current: &[ArrayRef],
    rows: usize,
    deleted: Option<&BooleanArray>,
) -> Result<bool, Error> {
    for (values, current) in values.iter().zip(current) {
        let fresh = current.null_count() == rows && deleted.is_none_or(|d| d.true_count() == 0);
        let differs = if fresh {
            // A column not filled yet (the common first run): any value is new.
            values.null_count() < rows
        } else {
            rows_differ(values, current, deleted)?
        };
        if differs {
            return Ok(true);
        }
    }
    Ok(false)
}
