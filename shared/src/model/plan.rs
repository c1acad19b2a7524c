//! Planning: the fragments a job covers, made into tasks. A large
//! fragment is one task (or several of `task_size` rows); small fragments
//! are packed, several whole fragments to a task, so a table of many small
//! fragments costs few tasks (queue messages, slot leases, store records).

use lance::Dataset;
use serde::{Deserialize, Serialize};

/// Rows a pack of small fragments holds at most (without `task_size`).
pub const PACK_ROWS: u64 = 131_072;
/// Fragments a pack holds at most: bounds its message, its store batches
/// and how much a redelivery repeats.
pub const PACK_FRAGMENTS: usize = 256;

/// Lance numbers fragments with 32 bits (a row address holds the id in its
/// upper half). A job's own id for a fragment adds above those bits how
/// many times the job planned that fragment again after its inputs were
/// rewritten in place ([`job_fragment`]): each planning is a fragment of
/// its own in the job store, with its own tasks and outcome.
const LANCE_ID_BITS: u32 = 32;

/// The Lance fragment a job's fragment id names.
pub fn lance_fragment(job_fragment: u64) -> u64 {
    job_fragment & ((1u64 << LANCE_ID_BITS) - 1)
}

/// How many times the job planned the fragment again in place.
pub fn generation(job_fragment: u64) -> u64 {
    job_fragment >> LANCE_ID_BITS
}

/// The job's id for Lance fragment `lance` planned for the
/// `generation`-th time in place (0: the first).
pub fn job_fragment(lance: u64, generation: u64) -> u64 {
    (generation << LANCE_ID_BITS) | lance_fragment(lance)
}

/// Where a job reads a fragment: fragments planned at submission are read
/// at the job's read version and choose rows with its `where`; fragments
/// the job planned later, because the table changed under it (compaction
/// moved rows, an update rewrote them), are read at the version that made
/// them, and those an update made choose every row again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct ReadAt {
    /// `None`: the job's read version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Every row is computed again, even where the default `where`
    /// (`<column> IS NULL`) would skip it: its inputs may have changed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refill: bool,
}

impl ReadAt {
    /// The version to read, given the job's read version.
    pub fn version_or(&self, read_version: u64) -> u64 {
        self.version.unwrap_or(read_version)
    }
}

/// One task: a contiguous range of physical rows of ONE fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRef {
    /// The job's id of the fragment (see [`job_fragment`]).
    pub fragment_id: u64,
    /// Index of this task within its fragment.
    pub task: u32,
    pub tasks_in_fragment: u32,
    /// Physical row offsets `[start, end)`.
    pub start: u64,
    pub end: u64,
    /// The fragment's physical row count at the version it is read at.
    pub fragment_rows: u64,
    #[serde(flatten)]
    pub at: ReadAt,
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

    /// The fragment the task reads.
    pub fn fragment(&self) -> PlannedFragment {
        PlannedFragment {
            id: self.fragment_id,
            physical_rows: self.fragment_rows,
            at: self.at,
        }
    }
}

/// A fragment chosen by the planner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedFragment {
    /// The job's id of the fragment (see [`job_fragment`]).
    pub id: u64,
    #[serde(rename = "rows")]
    pub physical_rows: u64,
    #[serde(flatten)]
    pub at: ReadAt,
}

impl PlannedFragment {
    /// The Lance fragment.
    pub fn lance_id(&self) -> u64 {
        lance_fragment(self.id)
    }
}

/// One task over several small fragments, each filled whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pack {
    pub fragments: Vec<PlannedFragment>,
}

impl Pack {
    pub fn rows(&self) -> u64 {
        self.fragments.iter().map(|f| f.physical_rows).sum()
    }

    pub fn ids(&self) -> Vec<u64> {
        self.fragments.iter().map(|f| f.id).collect()
    }

    pub fn label(&self) -> String {
        match (self.fragments.first(), self.fragments.last()) {
            (Some(first), Some(last)) => format!(
                "pack of {} fragments ({}..={})",
                self.fragments.len(),
                first.id,
                last.id
            ),
            _ => "empty pack".to_string(),
        }
    }
}

/// What one queue message asks a worker to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Range(TaskRef),
    Pack(Pack),
}

/// Which of a table's fragments a job covers.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selection<'a> {
    /// The first this many fragments of the table (`num_frags`).
    pub num_frags: Option<u64>,
    /// Fragments to leave alone (`skip_frags`).
    pub skip: &'a [u64],
    /// Only fragments with this id or a higher one (a maintained column's
    /// job covers the fragments appended since the last)...
    pub first_id: Option<u64>,
    /// ... and these, filled whole (their inputs were rewritten); with
    /// `refill_all`, every fragment is.
    pub refill: &'a [u64],
    pub refill_all: bool,
    /// Only these fragments (a job that retries the rows another skipped);
    /// empty: no such limit.
    pub only: &'a [u64],
}

impl Selection<'_> {
    fn covers(&self, id: u64) -> bool {
        (self.only.is_empty() || self.only.contains(&id))
            && !self.skip.contains(&id)
            && (self.first_id.is_none_or(|first| id >= first) || self.refill.contains(&id))
    }

    fn refills(&self, id: u64) -> bool {
        self.refill_all || self.refill.contains(&id)
    }
}

/// The fragments a job covers, in table order, from manifest metadata only
/// (no data file is opened), so planning a 10,000-fragment table is cheap.
/// `num_frags` takes the first fragments of the table; the rest of the
/// selection then leaves some of them alone.
pub async fn fragments(
    dataset: &Dataset,
    selection: Selection<'_>,
) -> lance::Result<Vec<PlannedFragment>> {
    let limit = selection
        .num_frags
        .map(|n| n as usize)
        .unwrap_or(usize::MAX);
    let mut planned = Vec::new();
    for fragment in dataset.get_fragments().into_iter().take(limit) {
        if !selection.covers(fragment.id() as u64) {
            continue;
        }
        let physical_rows = match fragment.metadata().physical_rows {
            Some(rows) => rows as u64,
            // Only very old tables lack the count in the manifest.
            None => fragment.physical_rows().await? as u64,
        };
        if physical_rows > 0 {
            let id = fragment.id() as u64;
            planned.push(PlannedFragment {
                id,
                physical_rows,
                at: ReadAt {
                    version: None,
                    refill: selection.refills(id),
                },
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
                at: fragment.at,
            }
        })
        .collect()
}

/// How many tasks [`tasks`] makes.
pub fn task_count(fragments: &[PlannedFragment], task_size: Option<u64>) -> u64 {
    tasks(fragments, task_size).len() as u64
}

/// Fragments of the job at its read version (for a fan-out message).
pub fn fragment_slice(all: &[PlannedFragment], first: u64, count: u64) -> &[PlannedFragment] {
    let start = (first as usize).min(all.len());
    let end = (first.saturating_add(count) as usize).min(all.len());
    &all[start..end]
}

/// Every task of the given fragments. A fragment of more than half a
/// pack's rows is a task of its own, or several of `task_size` rows; the
/// others are packed in table order, up to [`PACK_ROWS`] rows (`task_size`
/// when set) and [`PACK_FRAGMENTS`] fragments a pack. A pack of one is a
/// plain task.
pub fn tasks(fragments: &[PlannedFragment], task_size: Option<u64>) -> Vec<Work> {
    let budget = task_size.filter(|s| *s > 0).unwrap_or(PACK_ROWS);
    let mut work = Vec::new();
    let mut pack: Vec<PlannedFragment> = Vec::new();
    let mut rows = 0;
    for fragment in fragments {
        if fragment.physical_rows * 2 > budget {
            work.extend(tasks_of(*fragment, task_size).into_iter().map(Work::Range));
            continue;
        }
        if rows + fragment.physical_rows > budget || pack.len() == PACK_FRAGMENTS {
            work.push(close(std::mem::take(&mut pack)));
            rows = 0;
        }
        rows += fragment.physical_rows;
        pack.push(*fragment);
    }
    if !pack.is_empty() {
        work.push(close(pack));
    }
    work
}

fn close(pack: Vec<PlannedFragment>) -> Work {
    match pack.as_slice() {
        [single] => Work::Range(tasks_of(*single, None)[0]),
        _ => Work::Pack(Pack { fragments: pack }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_fragment_into_contiguous_tasks() {
        let fragment = PlannedFragment {
            id: 7,
            physical_rows: 25,
            at: ReadAt::default(),
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

    fn fragments(sizes: &[u64]) -> Vec<PlannedFragment> {
        sizes
            .iter()
            .enumerate()
            .map(|(id, rows)| PlannedFragment {
                id: id as u64,
                physical_rows: *rows,
                at: ReadAt::default(),
            })
            .collect()
    }

    #[test]
    fn small_fragments_are_packed_and_large_ones_are_not() {
        // 10,000 fragments of 10 rows: packs of PACK_FRAGMENTS.
        let small = fragments(&[10; 10_000]);
        let work = tasks(&small, None);
        assert_eq!(work.len(), 10_000usize.div_ceil(PACK_FRAGMENTS));
        let packed: Vec<u64> = work
            .iter()
            .flat_map(|w| match w {
                Work::Pack(pack) => pack.ids(),
                Work::Range(task) => vec![task.fragment_id],
            })
            .collect();
        assert_eq!(
            packed,
            (0..10_000).collect::<Vec<_>>(),
            "every fragment once, in order"
        );
        // 1,000-row fragments: packs of PACK_ROWS rows.
        let work = tasks(&fragments(&[1_000; 1_000]), None);
        assert!(work.iter().all(|w| match w {
            Work::Pack(pack) => pack.rows() <= PACK_ROWS,
            Work::Range(_) => false,
        }));
        assert_eq!(
            work.len(),
            1_000usize.div_ceil((PACK_ROWS / 1_000) as usize)
        );
        // Large fragments are tasks of their own (or split by task_size);
        // the small ones around them share a pack.
        let mixed = fragments(&[10, 10, 100_000, 10, 500_000]);
        let work = tasks(&mixed, None);
        assert_eq!(work.len(), 3);
        assert!(matches!(&work[0], Work::Range(t) if t.fragment_id == 2 && t.covers_fragment()));
        assert!(matches!(&work[1], Work::Range(t) if t.fragment_id == 4));
        assert!(matches!(&work[2], Work::Pack(p) if p.ids() == vec![0, 1, 3]));
        // task_size is the budget: fragments over half of it are split.
        assert_eq!(task_count(&mixed, Some(40_000)), 3 + 13 + 1);
        // A pack of one is a plain task.
        assert!(
            matches!(&tasks(&fragments(&[10]), None)[0], Work::Range(t) if t.covers_fragment())
        );
    }
}
