//! Data files a job wrote that no version of the table holds. A worker
//! killed between writing a fragment's new file and recording it leaves
//! one behind, and Lance names files at random, so the next delivery of
//! the task cannot find it. When the job ends, the files under the table's
//! data directory written since the job was created, that hold none but the
//! job's columns and that no version since its read version references, are
//! the job's strays, and are removed.
//!
//! The job's columns have no other writer through this service while it
//! runs (one job per column); a client writing one of them directly while
//! the job ends could lose a file not yet committed.

use std::collections::HashSet;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use lance::Dataset;
use lance_file::reader::FileReader;
use lance_io::scheduler::{ScanScheduler, SchedulerConfig};
use lance_io::utils::CachedFileSize;
use object_store::ObjectMeta;
use tracing::{info, warn};

use crate::model::job::Job;
use crate::model::table::Catalog;

/// Versions read at most to learn which files are referenced; a job that
/// saw more (a very busy table) leaves its strays to Lance's own cleanup.
pub const MAX_VERSIONS: u64 = 2_000;
/// Files written shortly before the job was recorded are its too (the
/// clocks of the store and of the object store differ a little).
const CLOCK_MARGIN: chrono::TimeDelta = chrono::TimeDelta::seconds(60);
/// Footers read at once.
const PARALLELISM: usize = 16;

/// Removes the job's strays; answers how many.
pub async fn sweep(catalog: &Catalog, job: &Job) -> anyhow::Result<usize> {
    let spec = &job.spec;
    let latest = catalog
        .latest(&spec.table_uri, spec.branch.as_deref())
        .await?;
    let seen = latest.manifest().version.saturating_sub(spec.read_version);
    if seen > MAX_VERSIONS {
        warn!(job_id = %job.job_id, versions = seen, "too many versions to look for the job's stray files");
        return Ok(0);
    }
    let columns = field_ids(&latest, &spec.columns());
    let Some(since) = created(job) else {
        return Ok(0);
    };
    let referenced = referenced_files(&latest, spec.read_version).await?;
    let store = latest.object_store(None).await?;
    let candidates: Vec<ObjectMeta> = store
        .list(Some(latest.data_dir()))
        .try_filter(|meta| {
            let name = meta.location.filename().unwrap_or_default();
            let fresh = meta.last_modified >= since;
            std::future::ready(fresh && name.ends_with(".lance") && !referenced.contains(name))
        })
        .try_collect()
        .await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let scheduler = ScanScheduler::new(store.clone(), SchedulerConfig::new(8 << 20));
    let strays: Vec<ObjectMeta> = futures::stream::iter(candidates)
        .map(|meta| {
            let scheduler = scheduler.clone();
            let columns = &columns;
            async move { holds_only(&scheduler, &meta, columns).await.then_some(meta) }
        })
        .buffer_unordered(PARALLELISM)
        .filter_map(std::future::ready)
        .collect()
        .await;
    for stray in &strays {
        store.delete(&stray.location).await?;
    }
    if !strays.is_empty() {
        info!(job_id = %job.job_id, files = strays.len(), "removed data files of the job no version holds");
    }
    Ok(strays.len())
}

/// When the job was recorded, less the margin.
fn created(job: &Job) -> Option<chrono::DateTime<chrono::Utc>> {
    let at = chrono::DateTime::parse_from_rfc3339(&job.created_at).ok()?;
    Some(at.with_timezone(&chrono::Utc) - CLOCK_MARGIN)
}

/// Every field id of the columns (their children's included).
fn field_ids(dataset: &Dataset, columns: &[String]) -> HashSet<i32> {
    let names: Vec<&str> = columns.iter().map(String::as_str).collect();
    dataset
        .schema()
        .project(&names)
        .map(|schema| schema.field_ids().into_iter().collect())
        .unwrap_or_default()
}

/// The data files some version from `from` to `latest` references.
async fn referenced_files(latest: &Dataset, from: u64) -> anyhow::Result<HashSet<String>> {
    let mut files = HashSet::new();
    for version in from..=latest.manifest().version {
        let dataset = match latest.checkout_version(version).await {
            Ok(dataset) => dataset,
            // A version cleaned up since references nothing that exists.
            Err(lance::Error::DatasetNotFound { .. } | lance::Error::NotFound { .. }) => continue,
            Err(err) => return Err(err.into()),
        };
        for fragment in dataset.get_fragments() {
            files.extend(fragment.metadata().files.iter().map(|f| f.path.clone()));
        }
    }
    Ok(files)
}

/// Whether the file's footer names fields and only fields of `columns`
/// (a file that cannot be read as a Lance file is left alone).
async fn holds_only(
    scheduler: &Arc<ScanScheduler>,
    meta: &ObjectMeta,
    columns: &HashSet<i32>,
) -> bool {
    let size = CachedFileSize::new(meta.size);
    let Ok(file) = scheduler.open_file(&meta.location, &size).await else {
        return false;
    };
    let Ok(metadata) = FileReader::read_all_metadata(&file).await else {
        return false;
    };
    let ids = metadata.file_schema.field_ids();
    !ids.is_empty() && ids.iter().all(|id| columns.contains(id))
}
