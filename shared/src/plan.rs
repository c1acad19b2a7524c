//! Planning: the fragments a job covers, split into tasks, and the messages
//! that carry them through the queue.

use lance::Dataset;
use serde::{Deserialize, Serialize};

use crate::job::{JobSpec, Params};

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

/// A queue message. Versioned so a newer worker can refuse an older format
/// loudly instead of misreading it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Fan out the tasks of fragments `[first, first + count)` (positions in
    /// table order at the read version).
    Plan {
        v: u32,
        job_id: String,
        first: u64,
        count: u64,
    },
    /// Run one task.
    Run {
        v: u32,
        job_id: String,
        task: TaskRef,
    },
    /// Remove what a stopped job left behind (staged files).
    Cleanup { v: u32, job_id: String },
}

pub const MESSAGE_VERSION: u32 = 1;

impl Message {
    pub fn run(job_id: &str, task: TaskRef) -> Self {
        Self::Run {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
            task,
        }
    }

    pub fn plan(job_id: &str, first: u64, count: u64) -> Self {
        Self::Plan {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
            first,
            count,
        }
    }

    pub fn cleanup(job_id: &str) -> Self {
        Self::Cleanup {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
        }
    }

    pub fn job_id(&self) -> &str {
        match self {
            Self::Plan { job_id, .. } | Self::Run { job_id, .. } | Self::Cleanup { job_id, .. } => {
                job_id
            }
        }
    }

    pub fn version(&self) -> u32 {
        match self {
            Self::Plan { v, .. } | Self::Run { v, .. } | Self::Cleanup { v, .. } => *v,
        }
    }

    pub fn to_body(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a message body; the error says what is wrong with it.
    pub fn parse(body: &str) -> Result<Self, String> {
        let message: Message =
            serde_json::from_str(body).map_err(|err| format!("malformed task message: {err}"))?;
        if message.version() != MESSAGE_VERSION {
            return Err(format!(
                "task message version {} is not supported (expected {MESSAGE_VERSION})",
                message.version()
            ));
        }
        if let Message::Run { task, .. } = &message
            && (task.start >= task.end
                || task.end > task.fragment_rows
                || task.task >= task.tasks_in_fragment.max(1))
        {
            return Err(format!("task message has an invalid row range: {task:?}"));
        }
        Ok(message)
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

/// `max(64, ceil(fragments / 20))`: about twenty commits for a big table.
pub fn default_commit_granularity(fragments: u64) -> u32 {
    fragments.div_ceil(20).max(64).min(u32::MAX as u64) as u32
}

pub fn commits_expected(fragments: u64, params: &Params) -> u64 {
    fragments.div_ceil(params.commit_granularity.max(1) as u64)
}

/// Fragments of the job at its read version (for a fan-out message).
pub fn fragment_slice(all: &[PlannedFragment], first: u64, count: u64) -> &[PlannedFragment] {
    let start = (first as usize).min(all.len());
    let end = (first.saturating_add(count) as usize).min(all.len());
    &all[start..end]
}

/// All task messages for the given fragments.
pub fn run_messages(spec: &JobSpec, job_id: &str, fragments: &[PlannedFragment]) -> Vec<Message> {
    fragments
        .iter()
        .flat_map(|f| tasks_of(*f, spec.params.task_size))
        .map(|task| Message::run(job_id, task))
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

    #[test]
    fn commit_granularity_default() {
        assert_eq!(default_commit_granularity(16), 64);
        assert_eq!(default_commit_granularity(10_000), 500);
    }

    #[test]
    fn messages_round_trip_and_bad_ones_are_named() {
        let task = TaskRef {
            fragment_id: 1,
            task: 0,
            tasks_in_fragment: 1,
            start: 0,
            end: 5,
            fragment_rows: 5,
        };
        let message = Message::run("j", task);
        assert_eq!(Message::parse(&message.to_body()).unwrap(), message);
        assert!(Message::parse("{").unwrap_err().contains("malformed"));
        assert!(Message::parse(r#"{"kind":"run","v":9,"job_id":"j","task":{"fragment_id":1,"task":0,"tasks_in_fragment":1,"start":0,"end":5,"fragment_rows":5}}"#).unwrap_err().contains("version"));
        assert!(Message::parse(r#"{"kind":"run","v":1,"job_id":"j","task":{"fragment_id":1,"task":0,"tasks_in_fragment":1,"start":5,"end":5,"fragment_rows":5}}"#).unwrap_err().contains("range"));
    }
}
