//! The job: what was asked (the spec, with every parameter's effective
//! value), where it stands (state machine), and how far it got (metrics, events).

use serde::{Deserialize, Serialize};

use crate::table::TableId;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Pending,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ACTIVE: [JobState; 2] = [JobState::Pending, JobState::Running];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "PENDING" => Self::Pending,
            "RUNNING" => Self::Running,
            "DONE" => Self::Done,
            "FAILED" => Self::Failed,
            "CANCELLED" => Self::Cancelled,
            _ => return None,
        })
    }

    /// The transitions the state machine allows.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Pending, Running)
                | (Pending, Done)
                | (Pending, Failed)
                | (Pending, Cancelled)
                | (Running, Done)
                | (Running, Failed)
                | (Running, Cancelled)
        )
    }
}

/// The effective value of every request parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub concurrency: u32,
    pub intra_applier_concurrency: u32,
    /// Rows per task; `None` means one task per fragment.
    pub task_size: Option<u64>,
    pub num_frags: Option<u64>,
    pub checkpoint_size: u32,
    pub min_checkpoint_size: u32,
    pub max_checkpoint_size: u32,
    /// Adaptive batch sizing is on only when the request set a bound.
    pub adaptive_checkpoint: bool,
    pub batch_checkpoint_flush_interval_seconds: f64,
    pub commit_granularity: u32,
    pub cluster: Option<String>,
    pub manifest: Option<String>,
}

/// What the planner found at submission.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanSummary {
    pub fragments: u64,
    pub tasks: u64,
    pub rows: u64,
    /// Tasks are fanned out by a worker (large tables) rather than by the API.
    pub fanned_out: bool,
}

/// The immutable part of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    pub table_id: TableId,
    pub table_uri: String,
    pub branch: Option<String>,
    pub column: String,
    pub expression: String,
    /// The effective `where`.
    #[serde(rename = "where")]
    pub filter: String,
    pub read_version: u64,
    pub params: Params,
    pub submitted_by: String,
    pub plan: PlanSummary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobEvent {
    pub at: String,
    pub message: String,
}

/// Counters kept atomically by the job store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    FragmentsTotal,
    FragmentsStaged,
    FragmentsCommitted,
    FragmentsSkipped,
    TasksTotal,
    TasksDone,
    RowsTotal,
    RowsComputed,
    RowsCheckpointed,
    RowsCommitted,
    CommitsPlanned,
    CommitsDone,
    ConflictRetries,
}

impl Counter {
    pub const ALL: [Counter; 13] = [
        Counter::FragmentsTotal,
        Counter::FragmentsStaged,
        Counter::FragmentsCommitted,
        Counter::FragmentsSkipped,
        Counter::TasksTotal,
        Counter::TasksDone,
        Counter::RowsTotal,
        Counter::RowsComputed,
        Counter::RowsCheckpointed,
        Counter::RowsCommitted,
        Counter::CommitsPlanned,
        Counter::CommitsDone,
        Counter::ConflictRetries,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::FragmentsTotal => "fragments_total",
            Self::FragmentsStaged => "fragments_staged",
            Self::FragmentsCommitted => "fragments_committed",
            Self::FragmentsSkipped => "fragments_skipped",
            Self::TasksTotal => "tasks_total",
            Self::TasksDone => "tasks_done",
            Self::RowsTotal => "rows_total",
            Self::RowsComputed => "rows_computed",
            Self::RowsCheckpointed => "rows_checkpointed",
            Self::RowsCommitted => "rows_committed",
            Self::CommitsPlanned => "commits_planned",
            Self::CommitsDone => "commits_done",
            Self::ConflictRetries => "conflict_retries",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.name() == name)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metrics {
    values: std::collections::BTreeMap<&'static str, i64>,
}

impl Metrics {
    pub fn get(&self, counter: Counter) -> u64 {
        self.values.get(counter.name()).copied().unwrap_or(0).max(0) as u64
    }

    pub fn set(&mut self, counter: Counter, value: i64) {
        self.values.insert(counter.name(), value);
    }

    /// Fragments with nothing left to do: committed or skipped.
    pub fn fragments_finished(&self) -> u64 {
        self.get(Counter::FragmentsCommitted) + self.get(Counter::FragmentsSkipped)
    }

    /// Staged fragments not yet committed.
    pub fn fragments_pending_commit(&self) -> u64 {
        self.get(Counter::FragmentsStaged)
            .saturating_sub(self.get(Counter::FragmentsCommitted))
    }

    /// Every fragment has been staged or skipped.
    pub fn all_fragments_resolved(&self) -> bool {
        self.get(Counter::FragmentsStaged) + self.get(Counter::FragmentsSkipped)
            >= self.get(Counter::FragmentsTotal)
    }

    pub fn to_json(&self) -> serde_json::Value {
        let pair = |done: u64, total: u64| serde_json::json!({ "done": done, "total": total });
        serde_json::json!({
            "fragments": pair(self.fragments_finished(), self.get(Counter::FragmentsTotal)),
            "fragments_skipped": self.get(Counter::FragmentsSkipped),
            "tasks": pair(self.get(Counter::TasksDone), self.get(Counter::TasksTotal)),
            "rows_computed": pair(self.get(Counter::RowsComputed), self.get(Counter::RowsTotal)),
            "rows_checkpointed": pair(self.get(Counter::RowsCheckpointed), self.get(Counter::RowsTotal)),
            "rows_committed": pair(self.get(Counter::RowsCommitted), self.get(Counter::RowsTotal)),
            "commits": pair(self.get(Counter::CommitsDone), self.get(Counter::CommitsPlanned).max(self.get(Counter::CommitsDone))),
            "commit_conflict_retries": pair(self.get(Counter::ConflictRetries), crate::commit::MAX_CONFLICT_RETRIES as u64 * self.get(Counter::CommitsPlanned).max(1)),
        })
    }
}

/// A change to counters, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsDelta(pub Vec<(Counter, i64)>);

impl MetricsDelta {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(mut self, counter: Counter, by: i64) -> Self {
        if by != 0 {
            self.0.push((counter, by));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    pub job_id: String,
    pub spec: JobSpec,
    pub state: JobState,
    pub created_at: String,
    pub updated_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub metrics: Metrics,
    pub events: Vec<JobEvent>,
}

impl Job {
    pub fn to_json(&self) -> serde_json::Value {
        let spec = &self.spec;
        let p = &spec.params;
        serde_json::json!({
            "job_id": self.job_id,
            "table_id": spec.table_id.0,
            "column": spec.column,
            "expression": spec.expression,
            "state": self.state.as_str(),
            "error": self.error,
            "read_version": spec.read_version,
            "submitted_by": spec.submitted_by,
            "parameters": {
                "branch": spec.branch.clone().unwrap_or_else(|| "main".to_string()),
                "where": spec.filter,
                "read_version": spec.read_version,
                "concurrency": p.concurrency,
                "intra_applier_concurrency": p.intra_applier_concurrency,
                "task_size": p.task_size,
                "num_frags": p.num_frags,
                "checkpoint_size": p.checkpoint_size,
                "min_checkpoint_size": p.min_checkpoint_size,
                "max_checkpoint_size": p.max_checkpoint_size,
                "adaptive_checkpoint_size": p.adaptive_checkpoint,
                "batch_checkpoint_flush_interval_seconds": p.batch_checkpoint_flush_interval_seconds,
                "commit_granularity": p.commit_granularity,
                "cluster": p.cluster,
                "manifest": p.manifest,
            },
            "plan": spec.plan,
            "metrics": self.metrics.to_json(),
            "events": self.events,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        })
    }
}

/// Microseconds: a small job runs in a few milliseconds, and its
/// `created_at`/`finished_at` should still tell how long it took.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn new_job_id() -> String {
    // Time-ordered, so ids sort by submission.
    uuid::Uuid::now_v7().simple().to_string()
}
