//! The job: what was asked (the spec, with every parameter's effective
//! value), where it stands (state machine), and how far it got (metrics, events).

use serde::{Deserialize, Serialize};

use crate::model::table::TableId;

mod backfill;
mod options;
mod params;
pub use backfill::*;
pub use options::*;
pub use params::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    Pending,
    Running,
    /// Hands out no tasks until resumed; keeps its checkpoints and its
    /// column.
    Paused,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub const ACTIVE: [JobState; 3] = [JobState::Pending, JobState::Running, JobState::Paused];

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "PENDING",
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "PENDING" => Self::Pending,
            "RUNNING" => Self::Running,
            "PAUSED" => Self::Paused,
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
                | (Pending, Paused)
                | (Running, Paused)
                // Resumed, a paused job waits for its next task to start
                // again (a task that read the job before the pause cannot
                // move it to RUNNING).
                | (Paused, Pending)
                | (Paused, Done)
                | (Paused, Failed)
                | (Paused, Cancelled)
        )
    }
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
    /// The user function that fills the columns (`None`: a SQL expression).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udf: Option<crate::model::binding::FunctionRef>,
    /// What the request's `context` asked for.
    #[serde(default)]
    pub options: JobOptions,
    /// Fragments the request asked to leave alone (`skip_frags`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skip_fragments: Vec<u64>,
    /// Only these fragments: those holding the rows the job named by
    /// `context.retry_failed_of` skipped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub only_fragments: Vec<u64>,
    /// Request fields this service does not use, noted here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_fields: Vec<String>,
    /// Only fragments with this id or a higher one (a maintained column's
    /// job for appended rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_fragment_id: Option<u64>,
    /// A maintained column's job: the highest fragment id it covers (the
    /// next job starts after it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintained_through: Option<u64>,
    /// A maintained column's job: the table version whose changes it
    /// takes the column up to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintained_version: Option<u64>,
    /// Fragments whose inputs an update rewrote since the column's last
    /// job: filled whole, even rows that have a value (see
    /// [`crate::model::plan::ReadAt::refill`]). `refill_all`: every fragment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refill_fragments: Vec<u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refill_all: bool,
    /// A maintained column's job: the principal that declared the column,
    /// whose rights (checked when the job is made) it runs with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

impl JobSpec {
    /// The fragments the job covers.
    pub fn selection(&self) -> crate::model::plan::Selection<'_> {
        crate::model::plan::Selection {
            num_frags: self.params.num_frags,
            skip: &self.skip_fragments,
            first_id: self.first_fragment_id,
            refill: &self.refill_fragments,
            refill_all: self.refill_all,
            only: &self.only_fragments,
        }
    }

    /// The `where` a fragment read `at` is filled with: the job's, except
    /// that a fragment holding rows an update rewrote is filled whole when
    /// the job's `where` is the default (`<column> IS NULL`): their values
    /// may be there already, computed from inputs the update changed.
    pub fn filter_for(&self, at: &crate::model::plan::ReadAt) -> String {
        if at.refill && self.filter == default_filter(&self.column) {
            REFILL_FILTER.to_string()
        } else {
            self.filter.clone()
        }
    }

    /// Whose rights and processes the job runs with: its submitter, or,
    /// for a maintained column's job, whoever declared the column.
    pub fn principal(&self) -> &str {
        self.on_behalf_of.as_deref().unwrap_or(&self.submitted_by)
    }

    /// The columns the job fills: a function's outputs, or the one column.
    pub fn columns(&self) -> Vec<String> {
        match &self.udf {
            Some(binding) => binding.columns(),
            None => vec![self.column.clone()],
        }
    }
}

/// The default `where`: rows whose value is still missing.
pub fn default_filter(column: &str) -> String {
    format!(
        "{} IS NULL",
        lance::datatypes::escape_field_path_for_project(column)
    )
}

/// The `where` of rows filled whole (see [`JobSpec::filter_for`]).
pub const REFILL_FILTER: &str = "true";

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
    /// Set once the submission queued the job's work (tasks or a planning message).
    Queued,
    /// Rows a user function raised on, left null (`on_error: skip`).
    RowsFailed,
    /// Fragments whose rows moved on (compaction, an update) or whose
    /// inputs were rewritten before their values were committed.
    FragmentsMoved,
    /// Fragments the job planned after its submission (where moved rows
    /// went, rows an update rewrote), and their rows; both are also in
    /// the totals.
    FragmentsReplanned,
    RowsReplanned,
    /// Commits made at a later version than the one their fragments were
    /// read at, over commits of other writers.
    CommitsRebased,
    /// The latest table version whose changes the job has taken into
    /// account (set, not summed: only its committer moves it).
    HistoryVersion,
    /// The latest version seen made by another writer (set likewise).
    ForeignVersion,
}

impl Counter {
    pub const ALL: [Counter; 21] = [
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
        Counter::Queued,
        Counter::RowsFailed,
        Counter::FragmentsMoved,
        Counter::FragmentsReplanned,
        Counter::RowsReplanned,
        Counter::CommitsRebased,
        Counter::HistoryVersion,
        Counter::ForeignVersion,
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
            Self::Queued => "queued",
            Self::RowsFailed => "rows_failed",
            Self::FragmentsMoved => "fragments_moved",
            Self::FragmentsReplanned => "fragments_replanned",
            Self::RowsReplanned => "rows_replanned",
            Self::CommitsRebased => "commits_rebased",
            Self::HistoryVersion => "history_version",
            Self::ForeignVersion => "foreign_version",
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

    /// Fragments with nothing left to do: committed, skipped, or moved
    /// on (the job planned where their rows went instead).
    pub fn fragments_finished(&self) -> u64 {
        self.get(Counter::FragmentsCommitted)
            + self.get(Counter::FragmentsSkipped)
            + self.get(Counter::FragmentsMoved)
    }

    /// Staged fragments not yet committed.
    pub fn fragments_pending_commit(&self) -> u64 {
        self.get(Counter::FragmentsStaged)
            .saturating_sub(self.get(Counter::FragmentsCommitted))
    }

    /// Every fragment has been staged, skipped or moved on.
    pub fn all_fragments_resolved(&self) -> bool {
        self.get(Counter::FragmentsStaged)
            + self.get(Counter::FragmentsSkipped)
            + self.get(Counter::FragmentsMoved)
            >= self.get(Counter::FragmentsTotal)
    }
}

/// A change to counters, applied atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsDelta(pub Vec<(Counter, i64)>);

impl MetricsDelta {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `by` to `counter` (one entry per counter).
    pub fn add(mut self, counter: Counter, by: i64) -> Self {
        if by == 0 {
            return self;
        }
        match self.0.iter_mut().find(|(c, _)| *c == counter) {
            Some((_, sum)) => *sum += by,
            None => self.0.push((counter, by)),
        }
        self.0.retain(|(_, by)| *by != 0);
        self
    }

    /// Both changes at once.
    pub fn merge(self, other: &MetricsDelta) -> Self {
        other
            .0
            .iter()
            .fold(self, |delta, (counter, by)| delta.add(*counter, *by))
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
}

impl Job {
    /// A new PENDING job of `spec`, made now, with a new id.
    pub fn pending(spec: JobSpec, metrics: Metrics) -> Self {
        let now = now_rfc3339();
        Self {
            job_id: new_job_id(),
            spec,
            state: JobState::Pending,
            created_at: now.clone(),
            updated_at: now,
            started_at: None,
            finished_at: None,
            error: None,
            metrics,
        }
    }
}

/// Longest event message kept (the rest is cut): events are records of
/// their own, each bounded.
pub const MAX_EVENT_CHARS: usize = 2_000;

impl JobEvent {
    /// An event happening now; a long message is cut to [`MAX_EVENT_CHARS`].
    pub fn now(message: &str) -> Self {
        let message = match message.char_indices().nth(MAX_EVENT_CHARS) {
            Some((cut, _)) => format!("{}…", &message[..cut]),
            None => message.to_string(),
        };
        Self {
            at: now_rfc3339(),
            message,
        }
    }
}

/// Microseconds: a small job runs in a few milliseconds, and its
/// `created_at`/`finished_at` should still tell how long it took.
/// The version a job's last commit made, from its events ("committed ...
/// as version N"); `None` when it committed nothing.
pub fn published_version(events: &[JobEvent]) -> Option<u64> {
    events.iter().rev().find_map(|event| {
        let rest = event.message.strip_prefix("committed ")?;
        rest.rsplit_once(" as version ")?.1.trim().parse().ok()
    })
}

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

impl JobSpec {
    /// The table at the job's read version (cached by the catalog: a fixed
    /// version never changes).
    pub async fn read_dataset(
        &self,
        catalog: &crate::model::table::Catalog,
    ) -> anyhow::Result<std::sync::Arc<lance::Dataset>> {
        use anyhow::Context;
        catalog
            .at_version(&self.table_uri, self.branch.as_deref(), self.read_version)
            .await
            .with_context(|| {
                format!(
                    "opening {} at version {}",
                    self.table_uri, self.read_version
                )
            })
    }
}
