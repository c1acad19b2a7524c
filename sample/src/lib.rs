//! The sample table the demo, the tests and the benchmarks fill: `id`,
//! `x = id` (int64) and `s` (a short string), written in a chosen number of
//! fragments, and the check that `y = x * 2 + 1` on every row.

use std::sync::Arc;

use anyhow::{Context, ensure};
use arrow_array::{Array, Int64Array, RecordBatch, RecordBatchIterator, StringArray};
use arrow_schema::{DataType, Field, Schema};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::{WriteMode, WriteParams};

/// Writes a table of `rows` rows in `fragments` fragments: `id`, `x = id`
/// (int64) and `s` (a short string whose length varies).
pub async fn write_sample_table(uri: &str, rows: u64, fragments: u64) -> anyhow::Result<Dataset> {
    write_sample_table_with(uri, rows, fragments, Default::default()).await
}

/// [`write_sample_table`] on an object store reached with `storage` options.
pub async fn write_sample_table_with(
    uri: &str,
    rows: u64,
    fragments: u64,
    storage: std::collections::HashMap<String, String>,
) -> anyhow::Result<Dataset> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("x", DataType::Int64, true),
        Field::new("s", DataType::Utf8, true),
    ]));
    let per_fragment = rows.div_ceil(fragments.max(1)).max(1);
    let batch_rows = per_fragment.min(65_536);
    let batches: Vec<RecordBatch> = (0..rows)
        .step_by(batch_rows as usize)
        .map(|start| {
            let end = (start + batch_rows).min(rows);
            let ids: Vec<i64> = (start as i64..end as i64).collect();
            let strings: Vec<String> = ids
                .iter()
                .map(|i| "s".repeat((*i % 17) as usize + 1))
                .collect();
            RecordBatch::try_new(
                schema.clone(),
                vec![
                    Arc::new(Int64Array::from(ids.clone())),
                    Arc::new(Int64Array::from(ids)),
                    Arc::new(StringArray::from(strings)),
                ],
            )
        })
        .collect::<Result<_, _>>()?;
    let params = WriteParams {
        max_rows_per_file: per_fragment as usize,
        max_rows_per_group: batch_rows as usize,
        mode: WriteMode::Overwrite,
        store_params: Some(lance::io::ObjectStoreParams {
            storage_options_accessor: Some(Arc::new(
                lance::io::StorageOptionsAccessor::with_static_options(storage),
            )),
            ..Default::default()
        }),
        ..Default::default()
    };
    let reader = RecordBatchIterator::new(batches.into_iter().map(Ok), schema);
    Ok(Dataset::write(reader, uri, Some(params)).await?)
}

/// Reads `x` and `y` back and checks `y = x * 2 + 1` on every row.
pub async fn verify(dataset: &Dataset) -> anyhow::Result<u64> {
    let mut scanner = dataset.scan();
    scanner.project(&["x", "y"])?;
    let mut stream = scanner.try_into_stream().await?;
    let mut rows = 0u64;
    while let Some(batch) = stream.try_next().await? {
        let x = batch
            .column(0)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("x is not int64")?;
        let y = batch
            .column(1)
            .as_any()
            .downcast_ref::<Int64Array>()
            .context("y is not int64")?;
        ensure!(y.null_count() == 0, "y has {} nulls", y.null_count());
        for i in 0..batch.num_rows() {
            ensure!(
                y.value(i) == x.value(i) * 2 + 1,
                "row with x = {} has y = {}",
                x.value(i),
                y.value(i)
            );
        }
        rows += batch.num_rows() as u64;
    }
    Ok(rows)
}
