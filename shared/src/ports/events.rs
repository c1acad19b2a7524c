//! Job events for pipelines: every change of a job's state (SUBMITTED,
//! RUNNING, DONE, FAILED, CANCELLED) is published, with the table, the
//! columns, the versions read and published and the row counts, to the
//! sinks a process is given (a JSON-lines file, a webhook, EventBridge).
//! [`crate::run::lifecycle::Lifecycle`], the only code that changes a job's
//! state, publishes each change through a [`Publisher`].

use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

use crate::model::job::{Counter, Job, JobState, now_rfc3339};

/// The `source` of this service's events on EventBridge.
pub const EVENT_SOURCE: &str = "lance-backfill";

/// What happened to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobChange {
    Submitted,
    Running,
    Paused,
    Resumed,
    Done,
    Failed,
    Cancelled,
}

impl JobChange {
    /// The change a move to `state` is.
    pub fn of(state: JobState) -> Self {
        match state {
            JobState::Pending => Self::Submitted,
            JobState::Running => Self::Running,
            JobState::Paused => Self::Paused,
            JobState::Done => Self::Done,
            JobState::Failed => Self::Failed,
            JobState::Cancelled => Self::Cancelled,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submitted => "SUBMITTED",
            Self::Running => "RUNNING",
            Self::Paused => "PAUSED",
            Self::Resumed => "RESUMED",
            Self::Done => "DONE",
            Self::Failed => "FAILED",
            Self::Cancelled => "CANCELLED",
        }
    }
}

/// One published event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobNotice {
    pub change: JobChange,
    pub job_id: String,
    /// The table id joined with `$`, and its parts.
    pub table: String,
    pub table_id: Vec<String>,
    pub column: String,
    pub columns: Vec<String>,
    /// Who submitted the job (`maintainer` for maintained columns' jobs).
    pub submitted_by: String,
    pub read_version: u64,
    /// The version of the job's last commit (DONE only; null when the job
    /// changed nothing).
    pub published_version: Option<u64>,
    pub fragments_total: u64,
    pub fragments_committed: u64,
    pub rows_total: u64,
    pub rows_committed: u64,
    pub rows_failed: u64,
    pub error: Option<String>,
    pub at: String,
}

impl JobNotice {
    pub fn new(change: JobChange, job: &Job, published_version: Option<u64>) -> Self {
        let metrics = &job.metrics;
        Self {
            change,
            job_id: job.job_id.clone(),
            table: job.spec.table_id.display(),
            table_id: job.spec.table_id.0.clone(),
            column: job.spec.column.clone(),
            columns: job.spec.columns(),
            submitted_by: job.spec.submitted_by.clone(),
            read_version: job.spec.read_version,
            published_version,
            fragments_total: metrics.get(Counter::FragmentsTotal),
            fragments_committed: metrics.get(Counter::FragmentsCommitted),
            rows_total: metrics.get(Counter::RowsTotal),
            rows_committed: metrics.get(Counter::RowsCommitted),
            rows_failed: metrics.get(Counter::RowsFailed),
            error: job.error.clone(),
            at: now_rfc3339(),
        }
    }
}

/// Where events go. Publishing never blocks or fails the job: a sink that
/// cannot deliver logs it (and retries on its own time).
#[async_trait]
pub trait EventSink: Send + Sync {
    async fn publish(&self, notice: &JobNotice);
}

/// The sinks of a process.
#[derive(Clone, Default)]
pub struct Publisher {
    sinks: Vec<Arc<dyn EventSink>>,
}

impl Publisher {
    pub fn with(mut self, sink: Arc<dyn EventSink>) -> Self {
        self.sinks.push(sink);
        self
    }

    pub fn is_empty(&self) -> bool {
        self.sinks.is_empty()
    }

    pub async fn publish(&self, notice: &JobNotice) {
        for sink in &self.sinks {
            sink.publish(notice).await;
        }
    }
}
