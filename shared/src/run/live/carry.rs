//! Carrying values the job already computed to the rows' new places: the
//! values of a moved fragment (its staged file, or the checkpoints of its
//! ranges) are read at the rows a compaction kept and written as
//! checkpoints of the fragment now holding those rows, where its task
//! replays them instead of computing them again.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::{RecordBatch, UInt32Array};
use lance::Dataset;
use lance::dataset::fragment::{FileFragment, FragReadConfig};
use lance::table::format::DataFile;
use tracing::warn;

use super::lineage::Origin;
use crate::ports::store::StagedFragment;
use crate::run::checkpoint::{FragmentCheckpoints, Range};

/// Rows carried in one piece at most: bounds the values held at once.
const PIECE_ROWS: usize = 65_536;

/// Where a moved fragment's computed values are.
pub enum Values {
    /// Its staged file: every row's values.
    Staged {
        dataset: Arc<Dataset>,
        staged: StagedFragment,
    },
    /// The checkpoints of some of its ranges.
    Checkpoints(FragmentCheckpoints),
}

/// The fragment that now holds carried rows: its checkpoints, and the
/// columns they hold, in order.
pub struct Destination {
    pub checkpoints: FragmentCheckpoints,
    pub columns: Vec<String>,
}

/// Writes the values of `origins` (spans of `destination`'s rows coming
/// from moved fragments) as its checkpoints; returns the rows carried.
/// A span whose values cannot be read is left to be computed.
pub async fn carry(
    origins: &[Origin],
    sources: &HashMap<u64, Values>,
    destination: &Destination,
) -> u64 {
    let mut carried = 0;
    for origin in origins {
        let Some(source) = sources.get(&origin.unit) else {
            continue;
        };
        for (start, piece) in pieces(origin) {
            match carry_piece(source, start, &piece, destination).await {
                Ok(rows) => carried += rows,
                Err(err) => {
                    warn!(unit = origin.unit, error = %format!("{err:#}"), "values not carried; they are computed again")
                }
            }
        }
    }
    carried
}

/// A span cut into pieces of at most [`PIECE_ROWS`] rows: (first row of
/// the destination, source offsets).
fn pieces(origin: &Origin) -> Vec<(u64, Vec<u32>)> {
    origin
        .from
        .chunks(PIECE_ROWS)
        .enumerate()
        .map(|(i, chunk)| (origin.to + (i * PIECE_ROWS) as u64, chunk.to_vec()))
        .collect()
}

async fn carry_piece(
    source: &Values,
    start: u64,
    offsets: &[u32],
    destination: &Destination,
) -> anyhow::Result<u64> {
    let pieces = match source {
        Values::Staged { dataset, staged } => {
            let batch = read_staged(dataset, staged, &destination.columns, offsets).await?;
            vec![(start, batch)]
        }
        Values::Checkpoints(checkpoints) => read_checkpointed(checkpoints, start, offsets).await?,
    };
    let mut rows = 0;
    for (at, batch) in pieces {
        let range = Range {
            start: at,
            end: at + batch.num_rows() as u64,
        };
        destination
            .checkpoints
            .write(range, std::slice::from_ref(&batch), true)
            .await?;
        rows += batch.num_rows() as u64;
    }
    Ok(rows)
}

/// The staged file's values of `columns` at `offsets` (increasing).
async fn read_staged(
    dataset: &Arc<Dataset>,
    staged: &StagedFragment,
    columns: &[String],
    offsets: &[u32],
) -> anyhow::Result<RecordBatch> {
    let file: DataFile =
        serde_json::from_value(staged.data_file.clone()).context("staged data file record")?;
    let fragment = dataset
        .get_fragment(staged.lance_id() as usize)
        .context("the moved fragment at its read version")?;
    let mut metadata = fragment.metadata().clone();
    metadata.files = vec![file.clone()];
    metadata.deletion_file = None;
    let projection = dataset.schema().project(columns)?;
    let reader = FileFragment::new(dataset.clone(), metadata)
        .open(
            &projection,
            FragReadConfig {
                ignore_deletions: true,
                ..Default::default()
            },
        )
        .await?;
    let (first, last) = (offsets[0] as usize, offsets[offsets.len() - 1] as usize);
    let batch = reader.read_range_as_batch(first..last + 1).await?;
    let ordered = columns
        .iter()
        .map(|name| {
            batch
                .column_by_name(name)
                .cloned()
                .with_context(|| format!("column '{name}' missing from the staged file"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let fields: Vec<_> = columns
        .iter()
        .filter_map(|name| batch.schema().field_with_name(name).ok().cloned())
        .collect();
    let batch = RecordBatch::try_new(Arc::new(arrow_schema::Schema::new(fields)), ordered)?;
    gather(&batch, first as u32, offsets)
}

/// The checkpointed values at `offsets`, as pieces of consecutive
/// destination rows starting at `start`; rows no checkpoint holds are left.
async fn read_checkpointed(
    checkpoints: &FragmentCheckpoints,
    start: u64,
    offsets: &[u32],
) -> anyhow::Result<Vec<(u64, RecordBatch)>> {
    let ranges = checkpoints.list().await?;
    let mut pieces = Vec::new();
    let mut i = 0;
    while i < offsets.len() {
        let row = offsets[i] as u64;
        let Some(range) = ranges.iter().find(|r| r.start <= row && row < r.end) else {
            i += 1;
            continue;
        };
        let covered = offsets[i..]
            .iter()
            .take_while(|o| (**o as u64) < range.end)
            .count();
        let read = checkpoints.read_some(std::slice::from_ref(range)).await?;
        let (batches, _) = read.into_iter().next().context("no checkpoint read")?;
        let schema = batches.first().context("empty checkpoint")?.schema();
        let values = arrow_select::concat::concat_batches(&schema, &batches)?;
        let batch = gather(&values, range.start as u32, &offsets[i..i + covered])?;
        pieces.push((start + i as u64, batch));
        i += covered;
    }
    Ok(pieces)
}

/// The rows `offsets` of `batch`, whose first row is offset `first`.
fn gather(batch: &RecordBatch, first: u32, offsets: &[u32]) -> anyhow::Result<RecordBatch> {
    let indices = UInt32Array::from_iter_values(offsets.iter().map(|o| o - first));
    let columns = batch
        .columns()
        .iter()
        .map(|column| arrow_select::take::take(column.as_ref(), &indices, None))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(RecordBatch::try_new(batch.schema(), columns)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_are_cut_into_bounded_pieces() {
        let origin = Origin {
            unit: 1,
            to: 10,
            from: (0..(PIECE_ROWS as u32 + 5)).collect(),
        };
        let pieces = pieces(&origin);
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].0, 10);
        assert_eq!(pieces[1].0, 10 + PIECE_ROWS as u64);
        assert_eq!(pieces[1].1.len(), 5);
    }

    #[test]
    fn gathering_picks_rows_by_offset() {
        let schema = Arc::new(arrow_schema::Schema::new(vec![arrow_schema::Field::new(
            "y",
            arrow_schema::DataType::Int64,
            true,
        )]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(arrow_array::Int64Array::from(vec![
                10, 11, 12, 13,
            ]))],
        )
        .unwrap();
        let picked = gather(&batch, 5, &[5, 7, 8]).unwrap();
        let values = picked
            .column(0)
            .as_any()
            .downcast_ref::<arrow_array::Int64Array>()
            .unwrap();
        assert_eq!(values.values(), &[10, 12, 13]);
    }
}
