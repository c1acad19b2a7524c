//! The job store port, one trait per role: [`JobRecords`] (jobs, their
//! states and counters), [`JobJournal`] (events, rows a function raised
//! on), [`FragmentLedger`] (per-fragment progress), [`Leases`] (and commit
//! fencing) and [`Watermarks`] (maintained columns); [`JobStore`] is all of
//! them. DynamoDB in the cloud, SQLite on one machine; both pass the same
//! conformance suite, role by role (tests/integration/store_conformance.rs).

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::model::job::{Counter, Job, JobEvent, JobState, Metrics, MetricsDelta};
use crate::model::plan::PlannedFragment;

mod error;
pub mod lease;

pub use error::StoreError;
pub use lease::{COMMIT_LEASE, HeldLease};

pub type StoreResult<T> = Result<T, StoreError>;

/// How long an idempotency key is remembered.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Makes a retried submit return the job it created the first time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyClaim {
    /// The client's key, scoped to who sent it.
    pub key: String,
    /// A digest of the request; the same key with another request is a conflict.
    pub fingerprint: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created,
    /// The idempotency key was seen with the same request: this is its job.
    Replayed {
        job_id: String,
    },
    /// The idempotency key was seen with a different request.
    IdempotencyMismatch {
        job_id: String,
    },
    /// Another job is already filling this column of this table.
    ColumnBusy {
        job_id: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct JobPage {
    pub jobs: Vec<Job>,
    pub next_page_token: Option<String>,
}

/// A fragment whose new column file is written but not yet committed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StagedFragment {
    pub fragment_id: u64,
    /// The Lance `DataFile` written by `write_columns`, serialised.
    pub data_file: serde_json::Value,
    /// Physical rows of the fragment at the version it was read at: a
    /// fragment with another count (or none) at commit time was rewritten
    /// meanwhile.
    pub rows: u64,
    /// The version the fragment was read at (`None`: the job's read version).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    /// Ids of every field the values were computed from (inputs, `where`
    /// columns and the filled columns): the file is committed only while
    /// the fragment still has the same files for them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub read_fields: Vec<i32>,
}

impl StagedFragment {
    /// The Lance fragment the file belongs to.
    pub fn lance_id(&self) -> u64 {
        crate::model::plan::lance_fragment(self.fragment_id)
    }
}

/// A fragment a job planned after its submission, because the table
/// changed under it: rows a compaction or an update moved into it, or a
/// fragment whose inputs were rewritten in place.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Replanned {
    pub fragment: PlannedFragment,
    /// Tasks it is split into (counted with it).
    pub tasks: u64,
    /// False: the fragment only holds rows the job already filled (a
    /// compaction of committed fragments); it is followed, so an update of
    /// its rows later in the job is seen, but nothing is computed.
    pub work: bool,
}

impl Replanned {
    /// What adding the fragment adds to the job's counters.
    pub fn counts(&self) -> MetricsDelta {
        if !self.work {
            return MetricsDelta::new();
        }
        let rows = self.fragment.physical_rows as i64;
        MetricsDelta::new()
            .add(Counter::FragmentsTotal, 1)
            .add(Counter::FragmentsReplanned, 1)
            .add(Counter::TasksTotal, self.tasks as i64)
            .add(Counter::RowsTotal, rows)
            .add(Counter::RowsReplanned, rows)
    }
}

/// A change of a job's plan while it runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanChange {
    /// Fragments added to the job (each once, however often it is added).
    pub added: Vec<Replanned>,
    /// Fragments whose rows moved on (or whose inputs were rewritten) before
    /// their values were committed: open or staged ones become moved, and
    /// their staged files are no longer the job's to commit.
    pub moved: Vec<u64>,
}

/// What [`FragmentLedger::change_plan`] recorded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PlanChanged {
    /// Fragments newly added (the others were added before).
    pub added: Vec<u64>,
    /// Fragments newly moved, with the staged file each had, if any.
    pub moved: Vec<(u64, Option<StagedFragment>)>,
}

/// What became of one fragment: a new file staged, or none needed.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution {
    pub fragment_id: u64,
    /// `None`: no value changed, the fragment is skipped.
    pub staged: Option<StagedFragment>,
}

impl Resolution {
    pub fn staged(staged: StagedFragment) -> Self {
        Self {
            fragment_id: staged.fragment_id,
            staged: Some(staged),
        }
    }

    pub fn skipped(fragment_id: u64) -> Self {
        Self {
            fragment_id,
            staged: None,
        }
    }
}

/// Where a maintained column stands: the maintainer's durable record of
/// it, one per table and column.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ColumnWatermark {
    /// Every row of fragments up to this id, as of `through_version`, has
    /// the column's value: its DONE jobs filled them.
    pub through_fragment: Option<u64>,
    pub through_version: Option<u64>,
    /// The column's latest job.
    pub last_job: Option<String>,
    /// Jobs that failed (or were cancelled) in a row, the last of them
    /// counted, and when the next may start (milliseconds since the epoch).
    pub failures: u32,
    pub counted_failure: Option<String>,
    pub retry_at_ms: i64,
    /// Why the column is not being filled (its declarer lost the right to
    /// run its jobs); it goes on once the right is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<String>,
    /// When the column's latest job was started (milliseconds since the
    /// epoch): a column with a refresh interval waits that long between starts.
    #[serde(default)]
    pub last_started_ms: i64,
}

/// A row a user function raised on (left null, `on_error: skip`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowFailure {
    pub fragment_id: u64,
    /// The row's physical offset in the fragment.
    pub row: u64,
    pub error: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FragmentStatus {
    Open,
    Staged,
    Committed,
    Skipped,
    /// Its rows moved to other fragments (compaction, an update) or its
    /// inputs were rewritten before its values were committed: the job
    /// planned where they went instead.
    Moved,
}

impl FragmentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "OPEN",
            Self::Staged => "STAGED",
            Self::Committed => "COMMITTED",
            Self::Skipped => "SKIPPED",
            Self::Moved => "MOVED",
        }
    }

    pub fn parse(text: &str) -> Self {
        match text {
            "STAGED" => Self::Staged,
            "COMMITTED" => Self::Committed,
            "SKIPPED" => Self::Skipped,
            "MOVED" => Self::Moved,
            _ => Self::Open,
        }
    }

    /// Nothing left for a task to do on this fragment.
    pub fn is_resolved(self) -> bool {
        !matches!(self, Self::Open)
    }

    /// Its values are in the table (committed) or needed none (skipped).
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Committed | Self::Skipped)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct FragmentRecord {
    pub status: FragmentStatus,
    pub tasks_done: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskMark {
    /// This call recorded the task (false for a repeated delivery).
    pub newly_done: bool,
    /// Tasks of the fragment recorded so far.
    pub tasks_done: u32,
}

/// Jobs: their records, states and counters, and the submission's
/// idempotency records and column locks.
#[async_trait]
pub trait JobRecords: Send + Sync {
    /// Writes a new job and its first event, with its idempotency record and
    /// the lock that keeps two jobs from filling the same column, all or
    /// nothing. An idempotency record older than [`IDEMPOTENCY_TTL`] is
    /// treated as absent.
    async fn create_job(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome>;

    /// Forgets an idempotency key if it names `job_id` (a submission that
    /// could not queue its job's work: a retry must create a new job).
    async fn release_idempotency(&self, key: &str, job_id: &str) -> StoreResult<()>;

    async fn get_job(&self, job_id: &str) -> StoreResult<Option<Job>>;

    /// Jobs of a table, newest first.
    async fn list_jobs(
        &self,
        table_key: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage>;

    /// A page of every table's jobs, newest first.
    async fn list_recent_jobs(
        &self,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage>;

    /// Moves the job to `to` if its current state allows it; returns the
    /// state it left, or `None` when the move was not allowed. A terminal
    /// state releases the column lock. CANCELLED waits for no one: while a
    /// commit of the job is being published ([`Leases::begin_commit`]) the
    /// move is refused with [`StoreError::CommitInFlight`].
    async fn transition(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>>;

    /// Adds to counters atomically and returns all counters after the change.
    async fn add_metrics(&self, job_id: &str, delta: &MetricsDelta) -> StoreResult<Metrics>;
}

/// What happened in a job, kept beside it: its events and the rows a user
/// function raised on.
#[async_trait]
pub trait JobJournal: Send + Sync {
    /// Records an event of the job (a record of its own, so a job's events
    /// never make its own record grow).
    async fn add_event(&self, job_id: &str, message: &str) -> StoreResult<()>;

    /// The latest `limit` events of the job, oldest first.
    async fn list_events(&self, job_id: &str, limit: usize) -> StoreResult<Vec<JobEvent>>;

    /// Lists rows a user function raised on (each row once, however often
    /// it is recorded).
    async fn add_row_failures(&self, job_id: &str, failures: &[RowFailure]) -> StoreResult<()>;

    /// The first `limit` listed failures, by fragment and row.
    async fn list_row_failures(&self, job_id: &str, limit: usize) -> StoreResult<Vec<RowFailure>>;
}

/// Per-fragment progress of a job: tasks done, files staged, skipped and
/// committed, and the plan's changes while the table changes under it.
#[async_trait]
pub trait FragmentLedger: Send + Sync {
    async fn get_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<FragmentRecord>;

    /// Records a finished task once, however often it is delivered, and
    /// adds `delta` (what the task computed) with it: only the delivery that
    /// records the task counts its rows.
    async fn mark_task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> StoreResult<TaskMark>;

    /// Records fragments staged or skipped, each once however often it is
    /// recorded, with their counters; `delta` is added with the last one,
    /// and only if this call records it. Returns the fragments this call
    /// recorded: the others were resolved before, or the job has ended
    /// (their files are surplus). Many fragments cost few calls (DynamoDB:
    /// one transaction per 49).
    async fn resolve_fragments(
        &self,
        job_id: &str,
        resolutions: &[Resolution],
        delta: &MetricsDelta,
    ) -> StoreResult<Vec<u64>>;

    /// Resolutions [`Self::resolve_fragments`] records in one write (a
    /// caller batching them fills writes whole).
    fn resolutions_per_write(&self) -> usize {
        usize::MAX
    }

    /// Of `fragment_ids`, those staged, committed or skipped.
    async fn resolved_fragments(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashSet<u64>>;

    /// Records the fragment's staged file; false if the fragment was already
    /// staged, committed or skipped (the caller's file is then surplus).
    async fn stage_fragment(&self, job_id: &str, staged: &StagedFragment) -> StoreResult<bool> {
        let resolution = Resolution::staged(staged.clone());
        let recorded = self
            .resolve_fragments(job_id, &[resolution], &MetricsDelta::new())
            .await?;
        Ok(!recorded.is_empty())
    }

    /// Records that the fragment needs no new file; false if already resolved.
    async fn skip_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<bool> {
        let resolution = Resolution::skipped(fragment_id);
        let recorded = self
            .resolve_fragments(job_id, &[resolution], &MetricsDelta::new())
            .await?;
        Ok(!recorded.is_empty())
    }

    /// The status of each of `fragment_ids` (open when never recorded).
    async fn fragment_statuses(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashMap<u64, FragmentStatus>>;

    /// Adds fragments to the job and marks others moved, each once however
    /// often it is recorded, with their counters: an added fragment with
    /// work counts in the fragments, tasks and rows to do (and as
    /// re-planned); a moved one leaves the staged count if it was staged.
    async fn change_plan(&self, job_id: &str, change: &PlanChange) -> StoreResult<PlanChanged>;

    /// The fragments added to the job after its submission, in id order.
    async fn replanned_fragments(&self, job_id: &str) -> StoreResult<Vec<Replanned>>;

    /// Staged fragments not yet committed, in fragment order.
    async fn staged_fragments(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>>;

    /// Marks staged fragments committed and counts them, atomically per fragment.
    async fn mark_committed(&self, job_id: &str, fragments: &[StagedFragment]) -> StoreResult<()>;
}

/// Named, expiring claims on part of a job (concurrency slots, the right
/// to commit) and the fencing of its commits.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Says that `owner` is about to publish a commit of the job: recorded
    /// only while the job is PENDING or RUNNING and `owner` holds the
    /// unexpired commit lease, which is renewed for `ttl` with it; returns
    /// that expiry (milliseconds since the epoch), which the publication
    /// must not outlive. `None`: refused, publish nothing. While it stands,
    /// the job cannot be cancelled.
    async fn begin_commit(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<i64>>;

    /// Records a commit of `fragments`: marks them committed, counts one
    /// commit and adds its event, in as few calls as the store allows,
    /// and ends `owner`'s [`Self::begin_commit`].
    async fn record_commit(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
        event: &str,
        owner: &str,
    ) -> StoreResult<()>;

    /// Ends `owner`'s [`Self::begin_commit`] without a commit (it failed).
    async fn end_commit(&self, job_id: &str, owner: &str) -> StoreResult<()>;

    /// Takes (or renews, for the same owner) a named lease of the job.
    async fn try_lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool>;

    async fn release_lease(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()>;
}

/// Where each maintained column stands: the maintainer's durable record.
#[async_trait]
pub trait Watermarks: Send + Sync {
    /// The maintained column's record and its revision (0 when it has none).
    async fn watermark(&self, table_key: &str, column: &str)
    -> StoreResult<(ColumnWatermark, u64)>;

    /// Replaces the record if its revision is still `revision`; false when
    /// another maintainer changed it first.
    async fn set_watermark(
        &self,
        table_key: &str,
        column: &str,
        watermark: &ColumnWatermark,
        revision: u64,
    ) -> StoreResult<bool>;
}

/// The whole job store, each role of it: what the service is assembled
/// with. A caller that needs one role takes that role's trait.
pub trait JobStore:
    JobRecords + JobJournal + FragmentLedger + Leases + Watermarks + 'static
{
}

impl<T> JobStore for T where
    T: JobRecords + JobJournal + FragmentLedger + Leases + Watermarks + 'static
{
}

/// Page tokens are opaque to clients: base64 of the store's own cursor.
pub(crate) fn encode_token(cursor: &serde_json::Value) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(cursor.to_string())
}

pub(crate) fn decode_token(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The column lock's key.
pub(crate) fn column_lock_key(job: &Job) -> String {
    format!(
        "{}\u{1f}{}\u{1f}{}",
        job.spec.table_id.key(),
        job.spec.branch.as_deref().unwrap_or("main"),
        job.spec.column
    )
}
