//! Arrow IPC streams: how batches travel to a runtime and back.

use std::io::Cursor;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_ipc::reader::StreamReader;
use arrow_ipc::writer::StreamWriter;

/// One batch as an IPC stream.
pub fn encode(batch: &RecordBatch) -> anyhow::Result<Vec<u8>> {
    let mut buffer = Vec::with_capacity(batch.get_array_memory_size() + 1024);
    {
        let mut writer = StreamWriter::try_new(&mut buffer, &batch.schema())?;
        writer.write(batch)?;
        writer.finish()?;
    }
    Ok(buffer)
}

/// The `result` column of a runtime's answer (one batch, one column).
pub fn decode_result(bytes: &[u8]) -> anyhow::Result<ArrayRef> {
    let reader = StreamReader::try_new(Cursor::new(bytes), None)?;
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch?);
    }
    let batch = match batches.len() {
        1 => batches.remove(0),
        0 => anyhow::bail!("the runtime answered no batch"),
        _ => {
            let schema = batches[0].schema();
            arrow_select::concat::concat_batches(&schema, &batches)?
        }
    };
    let column = batch
        .column_by_name("result")
        .or_else(|| (batch.num_columns() == 1).then(|| batch.column(0)))
        .ok_or_else(|| anyhow::anyhow!("the runtime's answer has no 'result' column"))?;
    Ok(Arc::clone(column))
}

#[cfg(test)]
mod tests {
    use arrow_array::{Int64Array, RecordBatch};

    use super::*;

    #[test]
    fn batches_round_trip() {
        let values: ArrayRef = Arc::new(Int64Array::from(vec![1, 2, 3]));
        let batch = RecordBatch::try_from_iter([("result", values.clone())]).unwrap();
        let decoded = decode_result(&encode(&batch).unwrap()).unwrap();
        assert_eq!(&decoded, &values);
    }
}
