//! Staged fragment files: a fragment's new column file, written by a task
//! and recorded in the job store until a commit publishes it. What the
//! latest version says about one, and removing one nobody will commit.

use lance::Dataset;
use tracing::warn;

use crate::ports::store::StagedFragment;

/// Whether the latest version already holds the staged file (a committer
/// died after committing but before recording it).
pub fn is_committed(latest: &Dataset, staged: &StagedFragment) -> bool {
    let Some(path) = staged.data_file.get("path").and_then(|p| p.as_str()) else {
        return false;
    };
    latest
        .get_fragment(staged.lance_id() as usize)
        .is_some_and(|f| f.metadata().files.iter().any(|file| file.path == path))
}

/// Whether the staged file still lines up with its fragment in `latest`:
/// the same fragment with the same physical rows, and the same files for
/// every field its values were computed from as in `base`, the version it
/// was read at. Deleted rows and new columns do not matter.
pub fn still_aligned(latest: &Dataset, base: &Dataset, staged: &StagedFragment) -> bool {
    let id = staged.lance_id() as usize;
    let (Some(now), Some(then)) = (latest.get_fragment(id), base.get_fragment(id)) else {
        return false;
    };
    let files = |fragment: &lance::dataset::fragment::FileFragment| {
        let mut paths: Vec<String> = fragment
            .metadata()
            .files
            .iter()
            .filter(|file| {
                file.fields
                    .iter()
                    .any(|field| staged.read_fields.contains(field))
            })
            .map(|file| file.path.clone())
            .collect();
        paths.sort();
        paths
    };
    now.metadata().physical_rows.map(|r| r as u64) == Some(staged.rows)
        && files(&now) == files(&then)
}

/// Removes a staged file that will never be committed.
pub async fn delete_data_file(dataset: &Dataset, staged: &StagedFragment) {
    match serde_json::from_value::<lance::table::format::DataFile>(staged.data_file.clone()) {
        Ok(file) => delete_file_at(dataset, &file.path).await,
        Err(err) => warn!(error = %err, "staged data file record unreadable"),
    }
}

/// Removes a data file (relative to the table's data directory).
pub async fn delete_file_at(dataset: &Dataset, relative: &str) {
    let path = dataset.data_dir().join(relative);
    match dataset.object_store(None).await {
        Ok(store) => {
            if let Err(err) = store.delete(&path).await {
                warn!(%path, error = %err, "could not delete surplus data file");
            }
        }
        Err(err) => warn!(%path, error = %err, "no object store to delete surplus data file"),
    }
}

/// "0-3, 7, 9-10"
pub fn describe_fragments(ids: &[u64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(", ")
}

pub fn ids(fragments: &[StagedFragment]) -> Vec<u64> {
    fragments.iter().map(|s| s.fragment_id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fragment_ranges_read_well() {
        assert_eq!(describe_fragments(&[3, 0, 1, 2, 7, 9, 10]), "0-3, 7, 9-10");
        assert_eq!(describe_fragments(&[5]), "5");
    }
}
