//! Checkpoints (the `CheckpointStore` of the design): computed values of a
//! row range, kept as Arrow IPC next to the table: on an object store one
//! object per range (`_backfill/checkpoints/<digest>/<start>-<end>.arrow`),
//! on a local disk one append-only file per fragment
//! (`_backfill/checkpoints/<digest>.log`, see [`log`]).
//!
//! The digest covers everything the values depend on (column, expression,
//! `where`, output type, fragment and its data files), so a re-run of the
//! same backfill finds them and a changed expression does not. A fragment's
//! checkpoints are listed under one prefix only, never the whole folder.

use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_buffer::Buffer;
use arrow_ipc::reader::FileDecoder;
use arrow_schema::{Field as ArrowField, Schema as ArrowSchema};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use lance::io::ObjectStore;
use object_store::path::Path;
use sha2::{Digest, Sha256};

use crate::model::error::{Error, Missing};
use crate::model::job::JobSpec;
use crate::model::plan::{PlannedFragment, ReadAt};

/// A checkpointed range `[start, end)` of one fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    pub start: u64,
    pub end: u64,
}

/// What a fragment's computed values depend on besides the fragment: the
/// column, its expression, the `where` and the column's type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub column: String,
    pub expression: String,
    pub filter: String,
    pub output_type: String,
}

impl Key {
    /// The key of the checkpoints of a job's fragment read `at`, with the
    /// columns' types in `dataset` (the version it is read at), and the
    /// fields the checkpoints hold. Equal to the key of the program the
    /// engine compiles for it ([`crate::run::computed::Program::checkpoint_key`]).
    pub fn for_fragment(
        spec: &JobSpec,
        dataset: &Dataset,
        at: &ReadAt,
    ) -> Result<(Self, Vec<Arc<ArrowField>>), Error> {
        let columns = spec.columns();
        let fields = columns
            .iter()
            .map(|column| {
                dataset
                    .schema()
                    .field(column)
                    .map(|f| Arc::new(ArrowField::from(f)))
                    .ok_or_else(|| {
                        Error::not_found(
                            Missing::Column,
                            format!(
                                "column '{column}' is missing at version {}",
                                spec.read_version
                            ),
                        )
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let key = Self::new(&columns, &spec.expression, spec.filter_for(at), &fields);
        Ok((key, fields))
    }

    /// The key of values of `columns` computed by `expression` for the
    /// rows `filter` chooses, of the types of `fields`: the one way a key
    /// is made, by a job's fragment and by the program compiled for it.
    pub fn new(
        columns: &[String],
        expression: &str,
        filter: String,
        fields: &[Arc<ArrowField>],
    ) -> Self {
        Self {
            column: columns.join(","),
            expression: expression.to_string(),
            filter,
            output_type: fields
                .iter()
                .map(|f| f.data_type().to_string())
                .collect::<Vec<_>>()
                .join(","),
        }
    }
}

/// Removes the checkpoints of a job's fragment; `dataset` is the table at
/// the version the fragment is read at.
pub async fn clear_fragment(
    spec: &JobSpec,
    dataset: &Dataset,
    planned: &PlannedFragment,
) -> anyhow::Result<()> {
    let (key, fields) = Key::for_fragment(spec, dataset, &planned.at)?;
    if let Some(fragment) = dataset.get_fragment(planned.lance_id() as usize) {
        FragmentCheckpoints::open(dataset, &fragment, &key, fields)
            .await?
            .clear()
            .await?;
    }
    Ok(())
}

/// The checkpoints of one fragment under one key.
pub struct FragmentCheckpoints {
    store: Arc<ObjectStore>,
    prefix: Path,
    /// The fragment's checkpoint file, when the table is on a local disk:
    /// each operation is then one blocking call instead of the object
    /// store's several (each a thread hop, which small tasks pay for).
    local: Option<std::path::PathBuf>,
    fields: Vec<Arc<ArrowField>>,
    /// Known to have none: listing is skipped.
    known_empty: bool,
}

/// Bytes of a local disk's checkpoints read in one call when several
/// follow each other: enough for a fragment's few, bounded so a long chain
/// is not all held at once.
const READ_TOGETHER_BYTES: u64 = 16 << 20;

/// An IPC file ends with its footer's length and the magic `ARROW1`.
const IPC_TRAILER_BYTES: usize = 10;

/// Room for an IPC file's schema, footer and padding besides the values.
const IPC_FRAMING_BYTES: usize = 4096;

/// Where a checkpoint says whether any row changed.
const CHANGED_KEY: &str = "lance-backfill:changed";

impl FragmentCheckpoints {
    pub async fn open(
        dataset: &Dataset,
        fragment: &FileFragment,
        key: &Key,
        fields: Vec<Arc<ArrowField>>,
    ) -> lance::Result<Self> {
        let store = dataset.object_store(None).await?;
        let mut hasher = Sha256::new();
        for part in [
            key.column.as_str(),
            key.expression.as_str(),
            key.filter.as_str(),
            key.output_type.as_str(),
            &fragment.id().to_string(),
        ] {
            hasher.update(part.as_bytes());
            hasher.update([0u8]);
        }
        for file in &fragment.metadata().files {
            hasher.update(file.path.as_bytes());
            hasher.update([0u8]);
        }
        let digest = hex::encode(&hasher.finalize()[..16]);
        let prefix = checkpoints_root(dataset).join(digest.as_str());
        // A local store's object path is the absolute file path without
        // its leading '/' (lance_io's `to_local_path`, not re-exported).
        let local = store
            .has_direct_local_paths()
            .then(|| std::path::PathBuf::from(format!("/{prefix}.log")));
        Ok(Self {
            store,
            prefix,
            local,
            fields,
            known_empty: false,
        })
    }

    /// Says whether the caller knows there are none (no checkpoint of any
    /// job was there when its task began): [`Self::list`] then reads
    /// nothing. One made since by another holder of the task is only not
    /// reused; the job's final sweep removes it.
    pub fn known_empty(mut self, known_empty: bool) -> Self {
        self.known_empty = known_empty;
        self
    }

    fn path(&self, range: Range) -> Path {
        self.prefix.clone().join(file_name(range).as_str())
    }

    /// The checkpointed ranges, sorted by start.
    pub async fn list(&self) -> anyhow::Result<Vec<Range>> {
        if self.known_empty {
            return Ok(Vec::new());
        }
        let mut ranges = match &self.local {
            Some(path) => {
                on_disk(path, |path| {
                    log::ranges(path).context("listing checkpoints")
                })
                .await?
            }
            None => self.stored_ranges().await?,
        };
        ranges.sort_by_key(|r| (r.start, r.end));
        Ok(ranges)
    }

    /// The ranges of the objects under the prefix, from their names.
    async fn stored_ranges(&self) -> anyhow::Result<Vec<Range>> {
        let names: Vec<String> = self
            .store
            .list(Some(self.prefix.clone()))
            .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
            .try_collect()
            .await
            .context("listing checkpoints")?;
        Ok(names
            .iter()
            .filter_map(|name| {
                let (start, end) = name.strip_suffix(".arrow")?.split_once('-')?;
                Some(Range {
                    start: start.parse().ok()?,
                    end: end.parse().ok()?,
                })
            })
            .collect())
    }

    /// The longest chain of checkpoints from `start` towards `end`.
    pub fn covered_from(ranges: &[Range], start: u64, end: u64) -> Vec<Range> {
        let mut chain = Vec::new();
        let mut at = start;
        while at < end {
            // Prefer the longest range starting here (a re-run may have
            // written a larger batch over the same start).
            let Some(next) = ranges
                .iter()
                .filter(|r| r.start == at && r.end <= end && r.end > r.start)
                .max_by_key(|r| r.end)
            else {
                break;
            };
            chain.push(*next);
            at = next.end;
        }
        chain
    }

    pub async fn write(
        &self,
        range: Range,
        batches: &[RecordBatch],
        changed: bool,
    ) -> anyhow::Result<()> {
        let schema = Arc::new(ArrowSchema::new_with_metadata(
            self.fields
                .iter()
                .map(|f| f.as_ref().clone())
                .collect::<Vec<_>>(),
            [(CHANGED_KEY.to_string(), changed.to_string())].into(),
        ));
        let mut buffer = Vec::with_capacity(encoded_size(batches) + IPC_FRAMING_BYTES);
        {
            let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut buffer, &schema)?;
            for batch in batches {
                let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())?;
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
        match &self.local {
            Some(path) => {
                on_disk(path, move |path| {
                    log::append(path, range, &buffer).context("writing checkpoint")
                })
                .await
            }
            None => self
                .store
                .put(&self.path(range), &buffer)
                .await
                .map(drop)
                .context("writing checkpoint"),
        }
    }

    /// The batches of the first of `ranges`, each with whether it changed
    /// any row, and on a local disk those of as many next ones as fit in
    /// [`READ_TOGETHER_BYTES`] (one blocking call and one open for them all).
    pub async fn read_some(
        &self,
        ranges: &[Range],
    ) -> anyhow::Result<Vec<(Vec<RecordBatch>, bool)>> {
        let Some(first) = ranges.first().copied() else {
            return Ok(Vec::new());
        };
        let pieces = match &self.local {
            Some(path) => {
                let ranges = ranges.to_vec();
                on_disk(path, move |path| {
                    log::read(path, &ranges, READ_TOGETHER_BYTES).context("reading checkpoints")
                })
                .await?
                .into_iter()
                .map(|(range, bytes)| (range, bytes::Bytes::from(bytes)))
                .collect()
            }
            None => {
                let bytes = self
                    .store
                    .read_one_all(&self.path(first))
                    .await
                    .context("reading checkpoint")?;
                vec![(first, bytes)]
            }
        };
        pieces
            .into_iter()
            .map(|(range, bytes)| decode(range, bytes))
            .collect()
    }

    /// Removes every checkpoint of the fragment.
    pub async fn clear(&self) -> anyhow::Result<()> {
        if let Some(path) = &self.local {
            return on_disk(path, |path| {
                log::remove(path).context("deleting checkpoints")?;
                // Versions before the log kept a directory of files per fragment.
                log::remove_directory(&path.with_extension(""))
                    .context("deleting checkpoints of an earlier layout")
            })
            .await;
        }
        let objects: Vec<_> = self
            .store
            .list(Some(self.prefix.clone()))
            .try_collect()
            .await
            .context("listing checkpoints")?;
        for meta in objects {
            match self.store.delete(&meta.location).await {
                // Another holder of the fragment removed it first.
                Ok(()) | Err(lance::Error::NotFound { .. }) => {}
                Err(err) => return Err(anyhow::Error::new(err).context("deleting checkpoint")),
            }
        }
        Ok(())
    }
}

/// About the bytes of the values in `batches`, so the buffer they are
/// encoded into is sized up front (growing it would copy them again).
/// Slices count only their own rows, not the arrays they slice.
fn encoded_size(batches: &[RecordBatch]) -> usize {
    batches
        .iter()
        .flat_map(|batch| batch.columns())
        .map(|column| column.to_data().get_slice_memory_size().unwrap_or(0))
        .sum()
}

/// A checkpoint's batches and whether it changed any row. The batches
/// are decoded in place: they share `bytes`, nothing is copied.
fn decode(range: Range, bytes: bytes::Bytes) -> anyhow::Result<(Vec<RecordBatch>, bool)> {
    let file = Buffer::from(bytes);
    let trailer = file
        .len()
        .checked_sub(IPC_TRAILER_BYTES)
        .context("checkpoint shorter than an IPC file's trailer")?;
    let footer_len = arrow_ipc::reader::read_footer_length(file[trailer..].try_into()?)?;
    let footer_start = trailer
        .checked_sub(footer_len)
        .context("checkpoint footer longer than the file")?;
    let footer = arrow_ipc::root_as_footer(&file[footer_start..trailer])
        .map_err(|err| anyhow::anyhow!("reading the checkpoint's footer: {err}"))?;
    let schema = arrow_ipc::convert::fb_to_schema(
        footer
            .schema()
            .context("checkpoint footer without a schema")?,
    );
    let changed = schema
        .metadata()
        .get(CHANGED_KEY)
        .map(|v| v == "true")
        .unwrap_or(true);
    let mut decoder = FileDecoder::new(Arc::new(schema), footer.version());
    for block in footer.dictionaries().iter().flatten() {
        decoder.read_dictionary(block, &block_bytes(&file, block)?)?;
    }
    let mut batches = Vec::new();
    for block in footer.recordBatches().iter().flatten() {
        batches.extend(decoder.read_record_batch(block, &block_bytes(&file, block)?)?);
    }
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    anyhow::ensure!(
        rows as u64 == range.end - range.start,
        "checkpoint {}-{} holds {rows} rows",
        range.start,
        range.end
    );
    Ok((batches, changed))
}

/// The bytes of one block (a message and its body) of an IPC file.
fn block_bytes(file: &Buffer, block: &arrow_ipc::Block) -> anyhow::Result<Buffer> {
    let offset = usize::try_from(block.offset())?;
    let len = usize::try_from(block.metaDataLength())? + usize::try_from(block.bodyLength())?;
    anyhow::ensure!(
        offset.checked_add(len).is_some_and(|end| end <= file.len()),
        "a checkpoint block lies past the end of the file"
    );
    Ok(file.slice_with_length(offset, len))
}

/// A checkpoint's file name: its range, zero-padded so names sort by start.
fn file_name(range: Range) -> String {
    format!("{:020}-{:020}.arrow", range.start, range.end)
}

mod log;

/// Runs `f` on the fragment's checkpoint file in one blocking call.
async fn on_disk<T: Send + 'static>(
    path: &std::path::Path,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<T> + Send + 'static,
) -> anyhow::Result<T> {
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || f(&path))
        .await
        .context("checkpoint file task panicked")?
}

/// Whether any checkpoint (of any job) is kept beside the table: one
/// listing, ended at the first entry.
pub async fn any_kept(dataset: &Dataset) -> anyhow::Result<bool> {
    let store = dataset.object_store(None).await?;
    let first = store
        .list(Some(checkpoints_root(dataset)))
        .try_next()
        .await
        .context("listing checkpoints")?;
    Ok(first.is_some())
}

pub fn checkpoints_root(dataset: &Dataset) -> Path {
    dataset
        .branch_location()
        .path
        .join("_backfill")
        .join("checkpoints")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slice_is_sized_by_its_own_rows() {
        let schema = Arc::new(ArrowSchema::new(vec![ArrowField::new(
            "x",
            arrow_schema::DataType::Int64,
            false,
        )]));
        let whole = arrow_array::Int64Array::from_iter_values(0..1_000_000);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(whole)]).unwrap();
        assert_eq!(encoded_size(std::slice::from_ref(&batch)), 8_000_000);
        let slices = [batch.slice(0, 10), batch.slice(500, 10)];
        assert_eq!(encoded_size(&slices), 160, "not twice the whole array");
    }

    #[test]
    fn finds_the_contiguous_chain() {
        let r = |start, end| Range { start, end };
        let ranges = vec![r(0, 10), r(10, 20), r(10, 15), r(30, 40)];
        assert_eq!(
            FragmentCheckpoints::covered_from(&ranges, 0, 40),
            vec![r(0, 10), r(10, 20)]
        );
        assert_eq!(
            FragmentCheckpoints::covered_from(&ranges, 30, 40),
            vec![r(30, 40)]
        );
        assert!(FragmentCheckpoints::covered_from(&ranges, 20, 30).is_empty());
        assert_eq!(
            FragmentCheckpoints::covered_from(&ranges, 0, 15),
            vec![r(0, 10), r(10, 15)]
        );
    }
}
