//! `demo --udf`: a 64-dimension float32 embedding column filled from the
//! text column `s` by a Python function (numpy), run by the local pool.
//! The function's values are exact in float32, so every row is checked.

use anyhow::{Context, ensure};
use arrow_array::{Array, FixedSizeListArray, Float32Array, StringArray};
use futures::TryStreamExt;
use lance::Dataset;
use lance_namespace_reqwest_client::models::{
    AddColumnsEntry, AddVirtualColumnEntry, AddVirtualColumnOutputEntry,
};

/// The embedding's width.
pub const DIM: usize = 64;
/// The column the demo fills.
pub const COLUMN: &str = "embedding";

/// Pickles the embedding function with the pool's Python (cloudpickle,
/// numpy); prints base64.
const PICKLE: &str = r#"
import base64, cloudpickle, numpy as np, pyarrow as pa, pyarrow.compute as pc

def embed(batch):
    lengths = np.asarray(pc.utf8_length(batch.column("s")).to_numpy(zero_copy_only=False), dtype=np.float64)
    return ((lengths[:, None] * np.arange(1, 65)) / 64).astype(np.float32)

print(base64.b64encode(cloudpickle.dumps(embed)).decode())
"#;

/// The function's payload, made by `python`.
pub async fn payload(python: &str) -> anyhow::Result<String> {
    let output = tokio::process::Command::new(python)
        .arg("-c")
        .arg(PICKLE)
        .output()
        .await
        .with_context(|| format!("running {python} (set LANCE_BACKFILL_UDF_PYTHON)"))?;
    ensure!(
        output.status.success(),
        "{python} could not pickle the function (it needs numpy, pyarrow and cloudpickle): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?.trim().to_string())
}

/// The declaration of the embedding column.
pub fn entry(payload: String) -> AddColumnsEntry {
    let output = AddVirtualColumnOutputEntry::new(
        COLUMN.to_string(),
        COLUMN.to_string(),
        serde_json::json!({"type": "fixed_size_list", "length": DIM,
            "fields": [{"name": "item", "type": {"type": "float32"}, "nullable": true}]}),
        true,
    );
    let mut entry = AddColumnsEntry::new(COLUMN.to_string());
    entry.virtual_column = Some(Some(Box::new(AddVirtualColumnEntry::new(
        vec!["s".to_string()],
        vec![output],
        "local".to_string(),
        payload,
        "embed".to_string(),
        "1".to_string(),
    ))));
    entry
}

/// Reads `s` and the embedding back and checks every value.
pub async fn verify(dataset: &Dataset) -> anyhow::Result<u64> {
    let mut scanner = dataset.scan();
    scanner.project(&["s", COLUMN])?;
    let mut stream = scanner.try_into_stream().await?;
    let mut rows = 0u64;
    while let Some(batch) = stream.try_next().await? {
        let s = batch
            .column(0)
            .as_any()
            .downcast_ref::<StringArray>()
            .context("s is not a string")?;
        let embedding = batch
            .column(1)
            .as_any()
            .downcast_ref::<FixedSizeListArray>()
            .context("the embedding is not a fixed_size_list")?;
        ensure!(
            embedding.null_count() == 0,
            "{} rows have no embedding",
            embedding.null_count()
        );
        let values = embedding
            .values()
            .as_any()
            .downcast_ref::<Float32Array>()
            .context("the embedding is not float32")?;
        for row in 0..batch.num_rows() {
            let length = s.value(row).chars().count() as f32;
            for j in 0..DIM {
                let expected = length * (j + 1) as f32 / 64.0;
                let actual = values.value(row * DIM + j);
                ensure!(
                    actual == expected,
                    "row {rows} + {row}, dimension {j}: {actual} != {expected}"
                );
            }
        }
        rows += batch.num_rows() as u64;
    }
    Ok(rows)
}
