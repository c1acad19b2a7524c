//! User functions as columns. A `virtual_column` declaration binds a
//! pickled Python function to output columns ([`binding`]); a backfill of
//! one of them sends each batch of the input columns to a runtime and gets
//! the outputs back. The Rust side never unpickles anything: runtimes are
//! Python processes this service starts ([`pool`]), an AWS Lambda function
//! ([`lambda`]) or an HTTP endpoint ([`http`]), chosen by configuration
//! ([`registry`]); all run `udf-runtime/lance_backfill_udf_runtime.py`.

pub mod runtimes;

use std::sync::Arc;

use arrow_array::{Array, ArrayRef, RecordBatch};
use async_trait::async_trait;

pub use crate::model::binding::{Binding, OnError, UDF_BINDING_KEY};

/// How a call of a user function failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UdfError {
    /// The function raised on this batch (or returned something unusable):
    /// its rows failed; other batches may succeed.
    #[error("{error_type}: {message}")]
    Raised {
        error_type: String,
        message: String,
        traceback: String,
    },
    /// The function could not be set up (unpickling, a missing module, its
    /// `setup()` raised): no batch can succeed.
    #[error("setting up the function failed: {0}")]
    Setup(String),
    /// The batch is too large for one call (a payload limit): split it.
    #[error("{0}")]
    TooLarge(String),
    /// The runtime died or hung on this batch (killed, out of memory, a
    /// segfault, a timeout).
    #[error("{0}")]
    Crashed(String),
    /// The runtime is busy or unreachable: the same call may succeed later.
    #[error("{0}")]
    Unavailable(String),
}

/// Error types the runtime reports for loading, not for rows.
const SETUP_ERROR_TYPES: [&str; 5] = [
    "ModuleNotFoundError",
    "ChecksumMismatch",
    "NotCallable",
    "PayloadUnavailable",
    "BadRequest",
];

impl UdfError {
    /// An error object answered by the runtime.
    pub fn from_answer(answer: &serde_json::Value) -> Self {
        let text = |key: &str| answer[key].as_str().unwrap_or_default().to_string();
        let error_type = text("error_type");
        if SETUP_ERROR_TYPES.contains(&error_type.as_str()) {
            return Self::Setup(format!("{error_type}: {}", text("message")));
        }
        Self::Raised {
            error_type,
            message: text("message"),
            traceback: text("traceback"),
        }
    }
}

/// A function as the runtimes need it.
#[derive(Debug, Clone)]
pub struct UdfRef {
    /// SHA-256 of the pickle.
    pub id: String,
    pub name: String,
    /// The declared outputs, as the runtime's protocol carries them.
    pub outputs: serde_json::Value,
    pub pickle: Arc<Vec<u8>>,
    /// Base64 of the user's code archives.
    pub workspace_zips: Vec<String>,
    /// Who the function runs for (the job's principal): a process that ran
    /// one principal's code is never handed another's batch.
    pub principal: String,
    /// What its declaration asks of the process it runs in.
    pub wants: crate::model::binding::Wants,
}

/// Something that runs a user function on a batch.
#[async_trait]
pub trait UdfRuntime: Send + Sync + 'static {
    /// The function's result for `input`: one value per row (a struct for
    /// several outputs).
    async fn call(&self, udf: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError>;

    /// For logs and errors: "2 local python3 processes", "lambda:embed"...
    fn describe(&self) -> String;
}

/// A batch's result: one value per input row, null where a row failed.
pub struct Called {
    pub values: ArrayRef,
    /// (row of the input batch, error) of each row the function raised on.
    pub failed: Vec<(usize, String)>,
}

/// A function bound to the runtime that runs it.
pub struct UdfCall {
    pub udf: UdfRef,
    pub runtime: Arc<dyn UdfRuntime>,
    pub on_error: OnError,
}

impl UdfCall {
    /// Calls the function on `input`; batches too large for one call are
    /// split. With [`OnError::Skip`], a batch the function raised on is
    /// split until the failing rows are found, and only they are null.
    pub async fn call(&self, input: &RecordBatch) -> Result<Called, UdfError> {
        match self.call_fitting(input).await {
            Ok(values) => Ok(Called {
                values,
                failed: Vec::new(),
            }),
            Err(UdfError::Raised { .. }) if self.on_error == OnError::Skip => {
                self.isolate_failures(input).await
            }
            Err(err) => Err(err),
        }
    }

    /// One call, or calls of halves while the runtime finds a batch too large.
    async fn call_fitting(&self, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
        let mut pending = vec![(0usize, input.num_rows())];
        let mut done: Vec<(usize, ArrayRef)> = Vec::new();
        while let Some((offset, len)) = pending.pop() {
            match self
                .runtime
                .call(&self.udf, &input.slice(offset, len))
                .await
            {
                Ok(values) => done.push((offset, values)),
                Err(UdfError::TooLarge(_)) if len > 1 => {
                    let half = len / 2;
                    pending.push((offset + half, len - half));
                    pending.push((offset, half));
                }
                Err(err) => return Err(err),
            }
        }
        concat_in_order(done)
    }

    /// Splits a failing batch until each failing row stands alone.
    async fn isolate_failures(&self, input: &RecordBatch) -> Result<Called, UdfError> {
        let mut pending = vec![(0usize, input.num_rows())];
        let mut done: Vec<(usize, Option<ArrayRef>, usize)> = Vec::new();
        let mut failed = Vec::new();
        while let Some((offset, len)) = pending.pop() {
            match self.call_fitting(&input.slice(offset, len)).await {
                Ok(values) => done.push((offset, Some(values), len)),
                Err(UdfError::Raised {
                    error_type,
                    message,
                    ..
                }) if len == 1 => {
                    failed.push((offset, format!("{error_type}: {message}")));
                    done.push((offset, None, 1));
                }
                Err(UdfError::Raised { .. }) => {
                    let half = len / 2;
                    pending.push((offset + half, len - half));
                    pending.push((offset, half));
                }
                Err(err) => return Err(err),
            }
        }
        failed.sort_by_key(|(row, _)| *row);
        Ok(Called {
            values: fill_failed(done)?,
            failed,
        })
    }
}

fn concat_in_order(mut parts: Vec<(usize, ArrayRef)>) -> Result<ArrayRef, UdfError> {
    parts.sort_by_key(|(offset, _)| *offset);
    if parts.len() == 1 {
        return Ok(parts.remove(0).1);
    }
    let arrays: Vec<&dyn Array> = parts.iter().map(|(_, a)| a.as_ref()).collect();
    arrow_select::concat::concat(&arrays).map_err(|err| UdfError::Raised {
        error_type: "BadResult".into(),
        message: format!("the results of a split batch do not fit together: {err}"),
        traceback: String::new(),
    })
}

/// The successful parts in row order, with nulls for the failed rows.
fn fill_failed(mut parts: Vec<(usize, Option<ArrayRef>, usize)>) -> Result<ArrayRef, UdfError> {
    parts.sort_by_key(|(offset, _, _)| *offset);
    let data_type = parts
        .iter()
        .find_map(|(_, values, _)| values.as_ref().map(|v| v.data_type().clone()));
    let Some(data_type) = data_type else {
        // Every row failed: the type is unknown, nulls of Null type stand in
        // (the caller casts them to the declared type).
        let rows = parts.iter().map(|(_, _, len)| len).sum();
        return Ok(arrow_array::new_null_array(
            &arrow_schema::DataType::Null,
            rows,
        ));
    };
    let filled: Vec<(usize, ArrayRef)> = parts
        .into_iter()
        .map(|(offset, values, len)| {
            (
                offset,
                values.unwrap_or_else(|| arrow_array::new_null_array(&data_type, len)),
            )
        })
        .collect();
    concat_in_order(filled)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use arrow_array::Int64Array;

    use super::*;

    /// A runtime that doubles `x`, raises on the values listed, and refuses
    /// batches over `limit` rows as too large.
    struct Fake {
        raises_on: Vec<i64>,
        limit: usize,
        calls: Mutex<usize>,
    }

    #[async_trait]
    impl UdfRuntime for Fake {
        async fn call(&self, _: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
            *self.calls.lock().unwrap() += 1;
            if input.num_rows() > self.limit {
                return Err(UdfError::TooLarge("too large".into()));
            }
            let x = input
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap();
            if x.iter().flatten().any(|v| self.raises_on.contains(&v)) {
                return Err(UdfError::Raised {
                    error_type: "ValueError".into(),
                    message: "bad row".into(),
                    traceback: String::new(),
                });
            }
            Ok(Arc::new(
                x.iter().map(|v| v.map(|v| v * 2)).collect::<Int64Array>(),
            ))
        }

        fn describe(&self) -> String {
            "fake".into()
        }
    }

    fn call(raises_on: Vec<i64>, limit: usize, on_error: OnError) -> UdfCall {
        UdfCall {
            udf: UdfRef {
                id: "id".into(),
                name: "double".into(),
                outputs: serde_json::json!([]),
                pickle: Arc::new(Vec::new()),
                workspace_zips: Vec::new(),
                principal: "p".into(),
                wants: Default::default(),
            },
            runtime: Arc::new(Fake {
                raises_on,
                limit,
                calls: Mutex::new(0),
            }),
            on_error,
        }
    }

    fn input(n: i64) -> RecordBatch {
        let x: ArrayRef = Arc::new(Int64Array::from((0..n).collect::<Vec<_>>()));
        RecordBatch::try_from_iter([("x", x)]).unwrap()
    }

    #[tokio::test]
    async fn batches_too_large_are_split_and_kept_in_order() {
        let called = call(vec![], 7, OnError::Fail)
            .call(&input(100))
            .await
            .unwrap();
        let values = called.values.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(
            values.values().to_vec(),
            (0..100).map(|v| v * 2).collect::<Vec<_>>()
        );
    }

    #[tokio::test]
    async fn skipping_finds_exactly_the_failing_rows() {
        let udf = call(vec![3, 64, 99], 1000, OnError::Skip);
        let called = udf.call(&input(100)).await.unwrap();
        let rows: Vec<usize> = called.failed.iter().map(|(row, _)| *row).collect();
        assert_eq!(rows, vec![3, 64, 99]);
        let values = called.values.as_any().downcast_ref::<Int64Array>().unwrap();
        assert_eq!(values.null_count(), 3);
        assert_eq!(values.value(10), 20);
        assert!(values.is_null(64));
        let failing = call(vec![5], 1000, OnError::Fail).call(&input(10)).await;
        assert!(matches!(failing, Err(UdfError::Raised { .. })));
    }
}
