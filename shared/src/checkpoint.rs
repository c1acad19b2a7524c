//! Checkpoints (the `CheckpointStore` of the design): computed values of a row range, kept as Arrow IPC files next
//! to the table (`_backfill/checkpoints/<digest>/<start>-<end>.arrow`).
//!
//! The digest covers everything the values depend on (column, expression,
//! `where`, output type, fragment and its data files), so a re-run of the
//! same backfill finds them and a changed expression does not. A fragment's
//! checkpoints are listed under one prefix only, never the whole folder.

use std::io::Cursor;
use std::sync::Arc;

use anyhow::Context;
use arrow_array::RecordBatch;
use arrow_schema::{Field as ArrowField, Schema as ArrowSchema};
use futures::TryStreamExt;
use lance::Dataset;
use lance::dataset::fragment::FileFragment;
use lance::io::ObjectStore;
use object_store::path::Path;
use sha2::{Digest, Sha256};

use crate::error::{Error, Missing};
use crate::job::JobSpec;

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
    /// The key of a job's checkpoints, with the columns' types at the job's
    /// read version, and the fields the checkpoints hold.
    pub fn for_job(
        spec: &JobSpec,
        dataset: &Dataset,
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
        let key = Self {
            column: columns.join(","),
            expression: spec.expression.clone(),
            filter: spec.filter.clone(),
            output_type: fields
                .iter()
                .map(|f| f.data_type().to_string())
                .collect::<Vec<_>>()
                .join(","),
        };
        Ok((key, fields))
    }
}

/// The checkpoints of one fragment under one key.
pub struct FragmentCheckpoints {
    store: Arc<ObjectStore>,
    prefix: Path,
    /// The prefix as a directory, when the table is on a local disk: each
    /// operation is then one blocking call instead of the object store's
    /// several (each a thread hop, which small tasks pay for).
    local: Option<std::path::PathBuf>,
    fields: Vec<Arc<ArrowField>>,
    /// Known to have none: listing is skipped.
    known_empty: bool,
}

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
            .then(|| std::path::PathBuf::from(format!("/{prefix}")));
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
        let names = match &self.local {
            Some(dir) => local::names(dir.clone()).await?,
            None => self
                .store
                .list(Some(self.prefix.clone()))
                .map_ok(|meta| meta.location.filename().unwrap_or_default().to_string())
                .try_collect()
                .await
                .context("listing checkpoints")?,
        };
        let mut ranges: Vec<Range> = names
            .iter()
            .filter_map(|name| {
                let (start, end) = name.strip_suffix(".arrow")?.split_once('-')?;
                Some(Range {
                    start: start.parse().ok()?,
                    end: end.parse().ok()?,
                })
            })
            .collect();
        ranges.sort_by_key(|r| (r.start, r.end));
        Ok(ranges)
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
        let mut buffer = Vec::new();
        {
            let mut writer = arrow_ipc::writer::FileWriter::try_new(&mut buffer, &schema)?;
            for batch in batches {
                let batch = RecordBatch::try_new(schema.clone(), batch.columns().to_vec())?;
                writer.write(&batch)?;
            }
            writer.finish()?;
        }
        match &self.local {
            Some(dir) => local::put(dir.clone(), file_name(range), buffer).await,
            None => self
                .store
                .put(&self.path(range), &buffer)
                .await
                .map(drop)
                .context("writing checkpoint"),
        }
    }

    /// The batches of a checkpoint and whether it changed any row.
    pub async fn read(&self, range: Range) -> anyhow::Result<(Vec<RecordBatch>, bool)> {
        let bytes = match &self.local {
            Some(dir) => local::read(dir.join(file_name(range))).await?,
            None => self
                .store
                .read_one_all(&self.path(range))
                .await
                .context("reading checkpoint")?,
        };
        let reader = arrow_ipc::reader::FileReader::try_new(Cursor::new(bytes), None)?;
        let changed = reader
            .schema()
            .metadata()
            .get(CHANGED_KEY)
            .map(|v| v == "true")
            .unwrap_or(true);
        let batches = reader.collect::<Result<Vec<_>, _>>()?;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        anyhow::ensure!(
            rows as u64 == range.end - range.start,
            "checkpoint {}-{} holds {rows} rows",
            range.start,
            range.end
        );
        Ok((batches, changed))
    }

    /// Removes every checkpoint of the fragment.
    pub async fn clear(&self) -> anyhow::Result<()> {
        if let Some(dir) = &self.local {
            return local::clear(dir.clone()).await;
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

/// A checkpoint's file name: its range, zero-padded so names sort by start.
fn file_name(range: Range) -> String {
    format!("{:020}-{:020}.arrow", range.start, range.end)
}

/// Checkpoints on a local disk: each operation in one blocking call.
mod local {
    use std::io::ErrorKind;
    use std::path::{Path, PathBuf};

    use anyhow::Context;

    async fn blocking<T: Send + 'static>(
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        tokio::task::spawn_blocking(f)
            .await
            .context("checkpoint file task panicked")?
    }

    /// The names of the files in `dir` (none if it does not exist).
    pub(super) async fn names(dir: PathBuf) -> anyhow::Result<Vec<String>> {
        blocking(move || list(&dir).context("listing checkpoints")).await
    }

    fn list(dir: &Path) -> std::io::Result<Vec<String>> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        entries
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect()
    }

    /// Writes `name` in `dir` whole or not at all: a temporary file,
    /// renamed into place (as the object store does for local files).
    pub(super) async fn put(dir: PathBuf, name: String, bytes: Vec<u8>) -> anyhow::Result<()> {
        blocking(move || {
            let mut written = write_whole(&dir, &name, &bytes);
            // Another holder of the fragment cleared (and removed) the
            // directory between our creating it and writing: once more.
            if matches!(&written, Err(err) if err.kind() == ErrorKind::NotFound) {
                written = write_whole(&dir, &name, &bytes);
            }
            written.context("writing checkpoint")
        })
        .await
    }

    fn write_whole(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let temporary = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
        let written = std::fs::write(&temporary, bytes)
            .and_then(|()| std::fs::rename(&temporary, dir.join(name)));
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        written
    }

    pub(super) async fn read(path: PathBuf) -> anyhow::Result<bytes::Bytes> {
        blocking(move || {
            std::fs::read(&path)
                .map(bytes::Bytes::from)
                .context("reading checkpoint")
        })
        .await
    }

    /// Removes every file in `dir`, then `dir` itself (so a table does not
    /// gather an empty directory per fragment and job). A file another
    /// holder removed first is no error, nor one written meanwhile that
    /// keeps the directory.
    pub(super) async fn clear(dir: PathBuf) -> anyhow::Result<()> {
        blocking(move || {
            for name in list(&dir).context("listing checkpoints")? {
                match std::fs::remove_file(dir.join(name)) {
                    Err(err) if err.kind() != ErrorKind::NotFound => {
                        return Err(err).context("deleting checkpoint");
                    }
                    _ => {}
                }
            }
            match std::fs::remove_dir(&dir) {
                Err(err)
                    if !matches!(
                        err.kind(),
                        ErrorKind::NotFound | ErrorKind::DirectoryNotEmpty
                    ) =>
                {
                    Err(err).context("removing the checkpoints' directory")
                }
                _ => Ok(()),
            }
        })
        .await
    }
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

    #[tokio::test]
    async fn local_files_are_written_whole_listed_read_and_cleared() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("digest");
        assert!(local::names(dir.clone()).await.unwrap().is_empty());
        local::clear(dir.clone()).await.unwrap();
        let range = Range { start: 0, end: 10 };
        local::put(dir.clone(), file_name(range), b"ten rows".to_vec())
            .await
            .unwrap();
        local::put(
            dir.clone(),
            file_name(Range { start: 10, end: 20 }),
            vec![1],
        )
        .await
        .unwrap();
        let mut names = local::names(dir.clone()).await.unwrap();
        names.sort();
        assert_eq!(
            names,
            vec![
                "00000000000000000000-00000000000000000010.arrow",
                "00000000000000000010-00000000000000000020.arrow"
            ],
            "no temporary file is left"
        );
        let bytes = local::read(dir.join(file_name(range))).await.unwrap();
        assert_eq!(&bytes[..], b"ten rows");
        local::clear(dir.clone()).await.unwrap();
        assert!(!dir.exists(), "the emptied directory is removed");
        assert!(local::names(dir.clone()).await.unwrap().is_empty());
        assert!(local::read(dir.join(file_name(range))).await.is_err());
        // A write after a clear makes the directory again.
        local::put(dir.clone(), file_name(range), vec![2])
            .await
            .unwrap();
        assert_eq!(local::names(dir.clone()).await.unwrap().len(), 1);
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
