//! Planning: the fragments a job covers, split into tasks.

use lance::Dataset;
use serde::{Deserialize, Serialize};

/// One task: a contiguous range of physical rows of ONE fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    pub fragment_id: u64,
    /// Index of this task within its fragment.
    pub task: u32,
    pub tasks_in_fragment: u32,
    /// Physical row offsets `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// The fragment's physical row count at the read version.
    pub fragment_rows: u64,
}

impl TaskRef {
    pub fn rows(&self) -> u64 {
        self.end - self.start
    }

    pub fn covers_fragment(&self) -> bool {
        self.start == 0 && self.end == self.fragment_rows
    }

    pub fn label(&self) -> String {
        format!("{}/{}", self.fragment_id, self.task)
    }
}

/// A fragment chosen by the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlannedFragment {
    pub id: u64,
    pub physical_rows: u64,
}

/// The fragments a job covers, in table order, from manifest metadata only
/// (no data file is opened), so planning a 10,000-fragment table is cheap.
pub async fn fragments(
    dataset: &Dataset,
    num_frags: Option<u64>,
) -> lance::Result<Vec<PlannedFragment>> {
    let limit = num_frags.map(|n| n as usize).unwrap_or(usize::MAX);
    let mut planned = Vec::new();
    for fragment in dataset.get_fragments().into_iter().take(limit) {
        let physical_rows = match fragment.metadata().physical_rows {
            Some(rows) => rows as u64,
            // Only very old tables lack the count in the manifest.
            None => fragment.physical_rows().await? as u64,
        };
        if physical_rows > 0 {
            planned.push(PlannedFragment {
                id: fragment.id() as u64,
                physical_rows,
            });
        }
    }
    Ok(planned)
}

/// Splits a fragment into tasks of `task_size` rows (`None`: one task).
pub fn tasks_of(fragment: PlannedFragment, task_size: Option<u64>) -> Vec<TaskRef> {
    let rows = fragment.physical_rows;
    let size = task_size.filter(|s| *s > 0 && *s < rows).unwrap_or(rows);
    let count = rows.div_ceil(size) as u32;
    (0..count)
        .map(|i| {
            let start = i as u64 * size;
            TaskRef {
                fragment_id: fragment.id,
                task: i,
                tasks_in_fragment: count,
                start,
                end: (start + size).min(rows),
                fragment_rows: rows,
            }
        })
        .collect()
}

pub fn task_count(fragments: &[PlannedFragment], task_size: Option<u64>) -> u64 {
    fragments
        .iter()
        .map(|f| match task_size.filter(|s| *s > 0) {
            Some(size) => f.physical_rows.div_ceil(size),
            None => 1,
        })
        .sum()
}

/// Fragments of the job at its read version (for a fan-out message).
pub fn fragment_slice(all: &[PlannedFragment], first: u64, count: u64) -> &[PlannedFragment] {
    let start = (first as usize).min(all.len());
    let end = (first.saturating_add(count) as usize).min(all.len());
    &all[start..end]
}

/// Every task of the given fragments, in order.
pub fn tasks(fragments: &[PlannedFragment], task_size: Option<u64>) -> Vec<TaskRef> {
    fragments
        .iter()
        .flat_map(|f| tasks_of(*f, task_size))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_fragment_into_contiguous_tasks() {
        let fragment = PlannedFragment {
            id: 7,
            physical_rows: 25,
        };
        let tasks = tasks_of(fragment, Some(10));
        assert_eq!(tasks.len(), 3);
        assert_eq!((tasks[0].start, tasks[0].end), (0, 10));
        assert_eq!((tasks[2].start, tasks[2].end), (20, 25));
        assert!(
            tasks
                .iter()
                .all(|t| t.tasks_in_fragment == 3 && t.fragment_id == 7)
        );
        assert_eq!(tasks_of(fragment, None).len(), 1);
        assert_eq!(tasks_of(fragment, Some(0)).len(), 1);
        assert_eq!(tasks_of(fragment, Some(100)).len(), 1);
        assert!(tasks_of(fragment, None)[0].covers_fragment());
        assert_eq!(task_count(&[fragment], Some(10)), 3);
    }
}
