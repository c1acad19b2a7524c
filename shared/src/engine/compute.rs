//! Computing a row range of one fragment: read the program's columns at the
//! read version (every physical row, deleted ones included, so output stays
//! aligned), evaluate, and hand back batches in order.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::Schema as ArrowSchema;
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use lance::dataset::fragment::{FileFragment, FragReadConfig, FragmentReader};
use lance_core::utils::deletion::DeletionVector;

use super::batching::BatchSizer;
use crate::checkpoint::Range;
use crate::computed::Program;

/// Values computed for one batch of rows.
pub struct ComputedBatch {
    pub range: Range,
    /// One column, named and typed as the target field.
    pub values: RecordBatch,
    pub selected: usize,
    pub changed: bool,
}

/// Reads and evaluates one fragment's rows.
pub struct FragmentComputer {
    reader: Arc<FragmentReader>,
    program: Arc<Program>,
    deletions: Option<Arc<DeletionVector>>,
    output_schema: Arc<ArrowSchema>,
}

impl FragmentComputer {
    pub async fn open(fragment: &FileFragment, program: Arc<Program>) -> lance::Result<Self> {
        let config = FragReadConfig {
            ignore_deletions: true,
            ..Default::default()
        };
        let reader = fragment.open(&program.read_schema, config).await?;
        let deletions = fragment
            .get_deletion_vector()
            .await?
            .filter(|dv| !dv.is_empty());
        let output_schema = Arc::new(ArrowSchema::new(vec![
            program.output_field.as_ref().clone(),
        ]));
        Ok(Self {
            reader: Arc::new(reader),
            program,
            deletions,
            output_schema,
        })
    }

    pub fn output_schema(&self) -> Arc<ArrowSchema> {
        self.output_schema.clone()
    }

    /// Batches for `[start, end)`, in order, with up to `parallelism`
    /// batches read and computed at once. Sizes come from `sizer`, which
    /// learns from each finished batch.
    pub fn stream(
        &self,
        start: u64,
        end: u64,
        sizer: Arc<Mutex<BatchSizer>>,
        parallelism: usize,
    ) -> BoxStream<'static, anyhow::Result<ComputedBatch>> {
        let ranges = {
            let sizer = sizer.clone();
            stream::unfold(start, move |at| {
                let sizer = sizer.clone();
                async move {
                    if at >= end {
                        return None;
                    }
                    let size = sizer.lock().unwrap_or_else(|p| p.into_inner()).size();
                    let next = (at + size.max(1)).min(end);
                    Some((
                        Range {
                            start: at,
                            end: next,
                        },
                        next,
                    ))
                }
            })
        };
        let reader = self.reader.clone();
        let program = self.program.clone();
        let deletions = self.deletions.clone();
        let schema = self.output_schema.clone();
        ranges
            .map(move |range| {
                let reader = reader.clone();
                let program = program.clone();
                let deletions = deletions.clone();
                let schema = schema.clone();
                let sizer = sizer.clone();
                // Spawned, so batches of one task use every core.
                tokio::spawn(async move {
                    let began = Instant::now();
                    let batch =
                        compute_range(&reader, &program, deletions.as_deref(), schema, range).await;
                    if batch.is_ok() {
                        sizer
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .observe(range.end - range.start, began.elapsed());
                    }
                    batch
                })
            })
            .buffered(parallelism.max(1))
            .map(|joined| match joined {
                Ok(result) => result,
                Err(err) => Err(anyhow::anyhow!("batch computation panicked: {err}")),
            })
            .boxed()
    }
}

async fn compute_range(
    reader: &FragmentReader,
    program: &Program,
    deletions: Option<&DeletionVector>,
    schema: Arc<ArrowSchema>,
    range: Range,
) -> anyhow::Result<ComputedBatch> {
    let rows = (range.end - range.start) as u32;
    let batches: Vec<RecordBatch> = reader
        .read_range(range.start as u32..range.end as u32, rows)
        .await?
        .buffered(2)
        .try_collect()
        .await?;
    let input = match batches.len() {
        1 => batches
            .into_iter()
            .next()
            .unwrap_or_else(|| RecordBatch::new_empty(schema.clone())),
        _ => {
            let schema = batches
                .first()
                .map(|b| b.schema())
                .ok_or_else(|| anyhow::anyhow!("no rows read for {range:?}"))?;
            arrow_select::concat::concat_batches(&schema, &batches)?
        }
    };
    anyhow::ensure!(
        input.num_rows() as u32 == rows,
        "read {} rows for physical rows {}..{}",
        input.num_rows(),
        range.start,
        range.end
    );
    let deleted = deletions.map(|dv| deleted_mask(dv, range));
    let evaluated = program.evaluate(&input, deleted.as_ref())?;
    Ok(ComputedBatch {
        range,
        values: RecordBatch::try_new(schema, vec![evaluated.values])?,
        selected: evaluated.selected,
        changed: evaluated.changed,
    })
}

fn deleted_mask(deletions: &DeletionVector, range: Range) -> BooleanArray {
    (range.start as u32..range.end as u32)
        .map(|offset| Some(deletions.contains(offset)))
        .collect()
}
