//! Computing a row range of one fragment: read the program's columns at the
//! read version (every physical row, deleted ones included, so output stays
//! aligned), evaluate, and hand back batches in order.

use std::sync::{Arc, Mutex};

use anyhow::Context;
use std::time::Instant;

use arrow_array::{BooleanArray, RecordBatch};
use arrow_schema::Schema as ArrowSchema;
use futures::future::BoxFuture;
use futures::stream::{self, BoxStream};
use futures::{FutureExt, StreamExt, TryStreamExt};
use lance::dataset::fragment::{FileFragment, FragReadConfig, FragmentReader};
use lance_core::utils::deletion::DeletionVector;

use super::batching::BatchSizer;
use crate::model::error::Error;
use crate::run::checkpoint::Range;
use crate::run::computed::Program;
use crate::run::tasks::AbortOnDrop;

/// Values computed for one batch of rows.
pub struct ComputedBatch {
    pub range: Range,
    /// The filled columns, named and typed as the target fields.
    pub values: RecordBatch,
    pub selected: usize,
    pub changed: bool,
    /// (physical row, error) of rows a user function raised on, left null.
    pub failed: Vec<(u64, String)>,
}

/// Reads and evaluates one fragment's rows (clones share the open fragment).
#[derive(Clone)]
pub struct FragmentComputer {
    shared: Arc<Evaluator>,
}

/// What every batch of a fragment needs, shared by the batches in flight.
struct Evaluator {
    reader: FragmentReader,
    program: Arc<Program>,
    deletions: Option<Arc<DeletionVector>>,
    output_schema: Arc<ArrowSchema>,
    max_batch_bytes: usize,
    /// Every data file is of format 2 or later, whose reads cut batches at
    /// exactly the size asked (legacy files cut at their own row groups).
    exact_batches: bool,
}

impl FragmentComputer {
    /// `max_batch_bytes` bounds the values one batch may compute.
    pub async fn open(
        fragment: &FileFragment,
        program: Arc<Program>,
        max_batch_bytes: usize,
    ) -> lance::Result<Self> {
        let config = FragReadConfig {
            ignore_deletions: true,
            ..Default::default()
        };
        let reader = fragment.open(&program.read_schema, config).await?;
        let deletions = fragment
            .get_deletion_vector()
            .await?
            .filter(|dv| !dv.is_empty());
        let output_schema = Arc::new(ArrowSchema::new(
            program
                .output_fields
                .iter()
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
        ));
        Ok(Self {
            shared: Arc::new(Evaluator {
                reader,
                program,
                deletions,
                output_schema,
                max_batch_bytes,
                exact_batches: fragment
                    .metadata()
                    .files
                    .iter()
                    .all(|file| file.file_major_version >= 2),
            }),
        })
    }

    /// Whether both are clones of one opening.
    #[cfg(test)]
    pub(super) fn is_same_open(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.shared, &other.shared)
    }

    pub fn output_schema(&self) -> Arc<ArrowSchema> {
        self.shared.output_schema.clone()
    }

    /// Batches for `[start, end)`, in order, with up to `parallelism`
    /// batches read and computed at once. Sizes come from `sizer`: fixed
    /// sizes are read a window of batches per read (one decode schedule
    /// for several batches), adaptive ones (and legacy files) a batch per
    /// read, as large as the sizer says after learning from each batch.
    /// `background`: each batch runs on a task of its own, so it overlaps
    /// with what the caller does meanwhile (writing the file); otherwise
    /// batches run on the caller's task, sparing a thread hop per batch.
    pub fn stream(
        &self,
        span: Range,
        sizer: Arc<Mutex<BatchSizer>>,
        parallelism: usize,
        background: bool,
    ) -> BoxStream<'static, anyhow::Result<ComputedBatch>> {
        let fixed = {
            let sizer = sizer.lock().unwrap_or_else(|p| p.into_inner());
            (sizer.is_fixed() && self.shared.exact_batches).then(|| sizer.size().max(1))
        };
        let batches = match fixed {
            Some(size) => self.fixed_batches(span, size),
            None => self.sized_batches(span, sizer),
        };
        let parallelism = parallelism.max(1);
        if !background && parallelism == 1 {
            return batches.buffered(1).boxed();
        }
        // Spawned, so batches use every core; aborted when the caller stops
        // reading them.
        batches
            .map(AbortOnDrop::spawn)
            .buffered(parallelism)
            .map(|joined| match joined {
                Ok(result) => result,
                Err(err) => Err(anyhow::anyhow!("batch computation panicked: {err}")),
            })
            .boxed()
    }

    /// Batches of `size` rows, read a window of whole batches at a time.
    fn fixed_batches(&self, span: Range, size: u64) -> BoxStream<'static, BatchWork> {
        let shared = self.shared.clone();
        let window = size * (READ_WINDOW_ROWS / size).clamp(1, READ_WINDOW_BATCHES);
        let windows = stream::iter(split(span, window));
        let reads = windows
            .then(move |window| {
                let shared = shared.clone();
                async move {
                    let futures = shared
                        .reader
                        .read_range(window.start as u32..window.end as u32, size as u32)
                        .await?;
                    let ranges = stream::iter(split(window, size));
                    anyhow::Ok(ranges.zip(futures).map(anyhow::Ok))
                }
            })
            .try_flatten();
        let shared = self.shared.clone();
        reads
            .map(move |read| -> BatchWork {
                let shared = shared.clone();
                async move {
                    let (range, batch) = read?;
                    let input = batch.await?;
                    shared.compute(range, input).await
                }
                .boxed()
            })
            .boxed()
    }

    /// Batches read one at a time, each as large as `sizer` says when it
    /// is drawn; the sizer learns from each finished batch.
    fn sized_batches(
        &self,
        span: Range,
        sizer: Arc<Mutex<BatchSizer>>,
    ) -> BoxStream<'static, BatchWork> {
        let shared = self.shared.clone();
        ranges(span.start, span.end, sizer.clone())
            .map(move |range| -> BatchWork {
                let (shared, sizer) = (shared.clone(), sizer.clone());
                async move {
                    let began = Instant::now();
                    let input = shared.read(range).await?;
                    let batch = shared.compute(range, input).await;
                    if batch.is_ok() {
                        sizer
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .observe(range.end - range.start, began.elapsed());
                    }
                    batch
                }
                .boxed()
            })
            .boxed()
    }
}

/// Reading and computing one batch.
type BatchWork = BoxFuture<'static, anyhow::Result<ComputedBatch>>;

/// Rows read per call when batches have a fixed size: Lance schedules
/// and coalesces the reads of a whole window at once.
const READ_WINDOW_ROWS: u64 = 65_536;
/// ... but never more batches than this per read, so the input a read
/// holds stays a few batches' worth: a job that lowers `checkpoint_size`
/// to bound memory (wide rows) keeps that bound within a small factor.
const READ_WINDOW_BATCHES: u64 = 4;

/// `range` cut into consecutive pieces of `size` rows (the last may be shorter).
fn split(range: Range, size: u64) -> Vec<Range> {
    let size = size.max(1);
    (range.start..range.end)
        .step_by(size as usize)
        .map(|at| Range {
            start: at,
            end: (at + size).min(range.end),
        })
        .collect()
}

/// The row ranges of `[start, end)`, each as large as `sizer` says when it
/// is drawn.
fn ranges(start: u64, end: u64, sizer: Arc<Mutex<BatchSizer>>) -> BoxStream<'static, Range> {
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
    .boxed()
}

impl Evaluator {
    async fn compute(&self, range: Range, input: RecordBatch) -> anyhow::Result<ComputedBatch> {
        anyhow::ensure!(
            input.num_rows() as u64 == range.end - range.start,
            "read {} rows for physical rows {}..{}",
            input.num_rows(),
            range.start,
            range.end
        );
        let deleted = self.deletions.as_deref().map(|dv| deleted_mask(dv, range));
        let evaluated = self.program.evaluate(&input, deleted.as_ref()).await?;
        let bytes: usize = evaluated
            .values
            .iter()
            .map(|v| v.get_array_memory_size())
            .sum();
        if bytes > self.max_batch_bytes {
            return Err(Error::Permanent(format!(
                "the values computed for rows {}..{} take {bytes} bytes, more than the {} a \
                 batch may hold; lower checkpoint_size",
                range.start, range.end, self.max_batch_bytes
            ))
            .into());
        }
        Ok(ComputedBatch {
            range,
            values: RecordBatch::try_new(self.output_schema.clone(), evaluated.values)?,
            selected: evaluated.selected,
            changed: evaluated.changed,
            failed: evaluated
                .failed
                .into_iter()
                .map(|(row, error)| (range.start + row as u64, error))
                .collect(),
        })
    }

    /// Every physical row of the range, deleted ones included.
    async fn read(&self, range: Range) -> anyhow::Result<RecordBatch> {
        let rows = (range.end - range.start) as u32;
        let batches: Vec<RecordBatch> = self
            .reader
            .read_range(range.start as u32..range.end as u32, rows)
            .await?
            .buffered(2)
            .try_collect()
            .await?;
        let input = match batches.len() {
            1 => batches.into_iter().next().context("no rows read")?,
            _ => {
                let schema = batches
                    .first()
                    .map(|b| b.schema())
                    .ok_or_else(|| anyhow::anyhow!("no rows read for {range:?}"))?;
                arrow_select::concat::concat_batches(&schema, &batches)?
            }
        };
        Ok(input)
    }
}

fn deleted_mask(deletions: &DeletionVector, range: Range) -> BooleanArray {
    (range.start as u32..range.end as u32)
        .map(|offset| Some(deletions.contains(offset)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Range {
        Range { start, end }
    }

    #[test]
    fn split_cuts_consecutive_pieces_with_a_shorter_last() {
        assert_eq!(
            split(r(100_000, 150_000), 63_000),
            vec![r(100_000, 150_000)]
        );
        assert_eq!(split(r(5, 27), 10), vec![r(5, 15), r(15, 25), r(25, 27)]);
        assert_eq!(split(r(0, 20), 10), vec![r(0, 10), r(10, 20)]);
        assert!(split(r(7, 7), 10).is_empty());
    }
}
