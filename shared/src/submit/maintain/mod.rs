//! Maintained columns: a column declared with `auto_backfill` is filled
//! whenever a new table version brings rows it has no value for, and
//! computed again where an update rewrote its inputs, as a stored generated
//! column would be. Each pass looks at a table's latest version and
//! submits, through the same submission as the API, one job per column
//! over the fragments appended since its last DONE job (fragment ids only
//! grow, so "appended since" is "id above") and the fragments whose inputs
//! changed since then ([`due`]).
//!
//! - Durable: where each column stands is a record of its own in the job
//!   store ([`ColumnWatermark`]), moved forward only by DONE jobs, so any
//!   process, a restarted `serve` or a fresh Lambda, carries on where the
//!   last left off, however many jobs the table has had.
//! - Idempotent: one job per table, column, version and attempt (the
//!   idempotency key names them), however many watchers see the version.
//! - Coalesced: while a column's job runs, new versions wait; the next pass
//!   after it ends submits one job covering all of them.
//! - Retried: a failed or cancelled job counts nothing covered; the column
//!   is tried again after a backoff (5 s doubling to 10 minutes), noted on
//!   the failed job, until a job is DONE.
//! - Chained: a column whose inputs include a maintained column waits until
//!   that column has caught up with the same version and its job has ended.

use std::sync::Arc;
use std::time::Duration;

use lance::Dataset;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::model::error::Error;
use crate::model::job::{BackfillSpec, Job, JobState, now_millis};
use crate::model::policy::{Access, Action, Decision};
use crate::model::table::{Catalog, TableId};
use crate::ports::queue::{Outgoing, TaskQueue};
use crate::ports::store::{ColumnWatermark, JobStore};
use crate::run::computed::{
    DECLARED_BY_KEY, MAINTAINED_KEY, Program, REFRESH_INTERVAL_KEY, resolve_target,
};
use crate::submit::{SubmitOutcome, SubmitRequest, Submitter};

mod due;
mod wake;

use due::Due;
pub use wake::{MIN_WAKE_GAP, VersionWatch, Wake, WakeOnJobEnd};

/// How `serve` looks for new versions by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Tables a watcher looks at (the first this many the namespace lists).
pub const MAX_WATCHED_TABLES: usize = 10_000;
/// Who maintained-column jobs are submitted by.
pub const MAINTAINER: &str = "maintainer";
/// The wait before trying a column again after its first failed job;
/// doubled after each further one, up to [`RETRY_BACKOFF_CAP`].
pub const RETRY_BACKOFF_BASE: Duration = Duration::from_secs(5);
pub const RETRY_BACKOFF_CAP: Duration = Duration::from_secs(600);

/// A maintained column and the columns it reads.
pub(crate) struct Maintained {
    pub column: String,
    /// Whose behalf its jobs run on (`None`: a column declared before
    /// declarers were recorded).
    pub declared_by: Option<String>,
    /// Whether a user function fills it.
    pub udf: bool,
    pub inputs: Vec<String>,
    /// Ids of the fields it reads (not those it fills).
    pub input_fields: Vec<i32>,
    /// The least time between the starts of its jobs, if its declaration
    /// set one.
    pub interval: Option<Duration>,
}

impl Maintained {
    /// When its next job may start (milliseconds since the epoch).
    fn next_start_ms(&self, mark: &ColumnWatermark) -> i64 {
        match self.interval {
            Some(interval) => mark.last_started_ms + interval.as_millis() as i64,
            None => 0,
        }
    }
}

pub struct Maintainer {
    catalog: Arc<Catalog>,
    store: Arc<dyn JobStore>,
    submitter: Submitter,
    /// Who may do what: a column's jobs need its declarer's rights.
    access: Arc<Access>,
    /// Where a table's next attempt is scheduled, when nothing polls (the
    /// trigger function on AWS): a message naming the table, delayed by
    /// the column's backoff, comes back to the trigger.
    retries: Option<Arc<dyn TaskQueue>>,
}

/// A scheduled look at a table (the body of a retry message).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Retry {
    pub table_id: Vec<String>,
}

/// SQS delays a message 15 minutes at most.
const MAX_MESSAGE_DELAY: Duration = Duration::from_secs(900);

/// A table at its latest version, as one pass sees it.
struct Latest<'a> {
    table: &'a TableId,
    dataset: &'a Arc<Dataset>,
    columns: &'a [Maintained],
}

/// The wait before attempt `failures + 1`.
pub fn retry_backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    (RETRY_BACKOFF_BASE * (1u32 << doublings)).min(RETRY_BACKOFF_CAP)
}

impl Maintainer {
    pub fn new(catalog: Arc<Catalog>, store: Arc<dyn JobStore>, submitter: Submitter) -> Self {
        Self {
            catalog,
            store,
            submitter,
            access: Arc::new(Access::Open),
            retries: None,
        }
    }

    /// Checks each column's declarer against `access` before its jobs.
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = Arc::new(access);
        self
    }

    /// Schedules columns' next attempts on `queue` (see [`Retry`]).
    pub fn with_retries(mut self, queue: Option<Arc<dyn TaskQueue>>) -> Self {
        self.retries = queue;
        self
    }

    /// Sends the table's retry message, due in `wait`.
    async fn schedule(&self, table: &TableId, wait: Duration) {
        let Some(queue) = &self.retries else {
            return;
        };
        let body = serde_json::to_string(&Retry {
            table_id: table.0.clone(),
        })
        .unwrap_or_default();
        let message = Outgoing::raw(&body, wait.min(MAX_MESSAGE_DELAY));
        if let Err(err) = queue.send_many(vec![message]).await {
            warn!(table = %table.display(), error = %format!("{err:#}"), "could not schedule the retry");
        }
    }

    /// One pass over every table under the root.
    pub async fn pass(&self) -> Vec<String> {
        let mut jobs = Vec::new();
        for table in self.catalog.list_tables(MAX_WATCHED_TABLES).await {
            match self.maintain(&table).await {
                Ok(mut submitted) => jobs.append(&mut submitted),
                Err(err) => {
                    warn!(table = %table.display(), error = %err, "could not maintain the table's columns")
                }
            }
        }
        jobs
    }

    /// Submits the jobs the table's maintained columns need at its latest
    /// version; returns their ids.
    pub async fn maintain(&self, table: &TableId) -> Result<Vec<String>, Error> {
        let uri = self.catalog.locate(table).await?;
        let dataset = Arc::new(
            self.catalog
                .latest(&uri, None)
                .await
                .map_err(|err| Error::from_lance(err, "opening the table"))?,
        );
        let columns = maintained_columns(&dataset)?;
        if dataset.get_fragments().is_empty() {
            return Ok(Vec::new());
        }
        let latest = Latest {
            table,
            dataset: &dataset,
            columns: &columns,
        };
        let mut submitted = Vec::new();
        for column in &columns {
            if let Some(job_id) = self.maintain_column(&latest, column).await? {
                submitted.push(job_id);
            }
        }
        Ok(submitted)
    }

    /// The column's job, if it needs one now.
    async fn maintain_column(
        &self,
        latest: &Latest<'_>,
        column: &Maintained,
    ) -> Result<Option<String>, Error> {
        let Some((mark, revision)) = self.settled(latest.table, &column.column).await? else {
            return Ok(None);
        };
        if now_millis() < mark.retry_at_ms.max(column.next_start_ms(&mark)) {
            return Ok(None);
        }
        let Some((mark, revision)) = self.permitted(latest.table, column, mark, revision).await?
        else {
            return Ok(None);
        };
        let version = latest.dataset.manifest().version;
        let Some(due) = Due::of(latest.dataset, column, &mark).await? else {
            // Nothing to fill: the column is caught up with this version.
            if mark.through_version.is_none_or(|v| v < version) {
                let caught_up = ColumnWatermark {
                    through_version: Some(version),
                    ..mark
                };
                self.save(latest.table, &column.column, &caught_up, revision)
                    .await?;
            }
            return Ok(None);
        };
        if !self.inputs_settled(latest, column, version).await? {
            return Ok(None);
        }
        let Some(job_id) = self.submit(latest, column, &mark, &due).await? else {
            return Ok(None);
        };
        let started = ColumnWatermark {
            last_job: Some(job_id.clone()),
            last_started_ms: now_millis(),
            ..mark
        };
        self.save(latest.table, &column.column, &started, revision)
            .await?;
        Ok(Some(job_id))
    }

    /// The column's record and revision when its declarer may have its jobs
    /// run now; `None` when not: the column stops, the reason kept in its
    /// record and noted on its last job, until the right is back.
    async fn permitted(
        &self,
        table: &TableId,
        column: &Maintained,
        mark: ColumnWatermark,
        revision: u64,
    ) -> Result<Option<(ColumnWatermark, u64)>, Error> {
        let refusal = self.refusal(table, column);
        if refusal == mark.stopped {
            return Ok(refusal.is_none().then_some((mark, revision)));
        }
        let changed = ColumnWatermark {
            stopped: refusal.clone(),
            ..mark
        };
        if !self.save(table, &column.column, &changed, revision).await? {
            return Ok(None);
        }
        let Some(reason) = refusal else {
            info!(table = %table.display(), column = %column.column, "maintained column: its declarer may run its jobs again");
            return Ok(Some((changed, revision + 1)));
        };
        warn!(table = %table.display(), column = %column.column, %reason, "maintained column stopped");
        if let Some(job_id) = &changed.last_job
            && let Err(err) = self.store.add_event(job_id, &reason).await
        {
            warn!(%job_id, error = %err, "could not note why the column stopped");
        }
        Ok(None)
    }

    /// Why the column's jobs may not run now, if they may not: they run on
    /// behalf of its declarer, who must still be allowed to submit (and to
    /// run functions, for a function's column).
    fn refusal(&self, table: &TableId, column: &Maintained) -> Option<String> {
        if self.access.is_open() {
            return None;
        }
        let Some(principal) = &column.declared_by else {
            return Some(format!(
                "maintained column '{}' stopped: it names no declarer whose rights its jobs \
                 could run with; declare it again",
                column.column
            ));
        };
        let mut actions = vec![Action::Submit];
        if column.udf {
            actions.push(Action::Udf);
        }
        actions.into_iter().find_map(
            |action| match self.access.decide(principal, table, action) {
                Decision::Allowed => None,
                Decision::Denied(reason) => Some(format!(
                    "maintained column '{}' stopped: its jobs run on behalf of '{principal}', \
                     who may no longer {} here ({reason}); restore the grant or declare the \
                     column again",
                    column.column,
                    action.as_str()
                )),
            },
        )
    }

    /// The column's record once its last job's end is taken into account
    /// (a DONE job moves it forward, a failed one counts), with its
    /// revision; `None` while that job runs, or when another maintainer
    /// changed the record meanwhile.
    async fn settled(
        &self,
        table: &TableId,
        column: &str,
    ) -> Result<Option<(ColumnWatermark, u64)>, Error> {
        let (mark, revision) = self
            .store
            .watermark(&table.key(), column)
            .await
            .map_err(|err| Error::transient(format!("reading the column's record: {err}")))?;
        let Some(job_id) = mark.last_job.clone() else {
            return Ok(Some((mark, revision)));
        };
        let job = self
            .store
            .get_job(&job_id)
            .await
            .map_err(|err| Error::transient(format!("reading job {job_id}: {err}")))?;
        let Some(job) = job else {
            return Ok(Some((mark, revision)));
        };
        let next = match job.state {
            JobState::Pending | JobState::Running | JobState::Paused => return Ok(None),
            JobState::Done => advanced(&mark, &job),
            JobState::Failed | JobState::Cancelled => {
                let next = self.count_failure(&mark, &job).await;
                if next != mark {
                    let wait = retry_backoff(next.failures);
                    self.schedule(table, wait).await;
                }
                next
            }
        };
        if next == mark {
            return Ok(Some((mark, revision)));
        }
        if !self.save(table, column, &next, revision).await? {
            return Ok(None);
        }
        Ok(Some((next, revision + 1)))
    }

    /// The record after a failed or cancelled job (counted once), with the
    /// time of the next attempt noted on the job.
    async fn count_failure(&self, mark: &ColumnWatermark, job: &Job) -> ColumnWatermark {
        if mark.counted_failure.as_deref() == Some(job.job_id.as_str()) {
            return mark.clone();
        }
        let failures = mark.failures + 1;
        let wait = retry_backoff(failures);
        let note = format!(
            "maintained column '{}': tried again in {} s (attempt {}), from the rows its last \
             DONE job covered",
            job.spec.column,
            wait.as_secs(),
            failures + 1
        );
        if let Err(err) = self.store.add_event(&job.job_id, &note).await {
            warn!(job_id = %job.job_id, error = %err, "could not note the retry");
        }
        info!(job_id = %job.job_id, failures, "maintained column: job ended without filling it");
        ColumnWatermark {
            failures,
            counted_failure: Some(job.job_id.clone()),
            retry_at_ms: now_millis() + wait.as_millis() as i64,
            ..mark.clone()
        }
    }

    /// Writes the record if nobody changed it since `revision`.
    async fn save(
        &self,
        table: &TableId,
        column: &str,
        mark: &ColumnWatermark,
        revision: u64,
    ) -> Result<bool, Error> {
        self.store
            .set_watermark(&table.key(), column, mark, revision)
            .await
            .map_err(|err| Error::transient(format!("recording the column's record: {err}")))
    }

    /// Whether every maintained column the column reads has caught up with
    /// `version` and has no job running.
    async fn inputs_settled(
        &self,
        latest: &Latest<'_>,
        column: &Maintained,
        version: u64,
    ) -> Result<bool, Error> {
        for input in latest
            .columns
            .iter()
            .filter(|c| column.inputs.contains(&c.column))
        {
            let Some((mark, _)) = self.settled(latest.table, &input.column).await? else {
                return Ok(false);
            };
            if mark.through_version.is_none_or(|v| v < version) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Submits the column's job; `None` when another job (a user's) fills
    /// the column now.
    async fn submit(
        &self,
        latest: &Latest<'_>,
        column: &Maintained,
        mark: &ColumnWatermark,
        due: &Due,
    ) -> Result<Option<String>, Error> {
        let (table, version) = (latest.table, latest.dataset.manifest().version);
        let spec = BackfillSpec {
            // The job plans at the version its fragments were chosen at: a
            // compaction since then would take fragments to refill out of a
            // plan made at the latest version, and their rows would keep
            // values of old inputs. Changes after it the job follows itself.
            read_version: Some(version),
            ..BackfillSpec::of_column(column.column.clone())
        };
        let mut submit = SubmitRequest::new(table.clone(), spec, MAINTAINER.to_string());
        submit.on_behalf_of = column.declared_by.clone();
        // Declaring a maintained user-function column needed the permission.
        submit.allow_udf = true;
        submit.first_fragment_id = due.first_fragment;
        submit.refill_fragments = due.refill.clone();
        submit.refill_all = due.refill_all;
        submit.maintained_through = Some(due.last_fragment);
        submit.maintained_version = Some(version);
        submit.idempotency_key = Some(format!(
            "maintain:{}:{}:{version}:{}",
            table.key(),
            column.column,
            mark.failures
        ));
        let job_id = match self.submitter.submit(submit).await {
            Ok(
                SubmitOutcome::Created { job_id }
                | SubmitOutcome::Replayed { job_id }
                | SubmitOutcome::Joined { job_id },
            ) => job_id,
            Ok(SubmitOutcome::DryRun(_)) => return Ok(None),
            // Another job (a user's) fills the column: look again next pass.
            Err(Error::Conflict(_)) => return Ok(None),
            Err(err) => return Err(err),
        };
        info!(table = %table.display(), column = %column.column, %job_id, version, through = due.last_fragment, refill = due.refill.len(), "maintained column: job submitted");
        Ok(Some(job_id))
    }
}

/// The record after a DONE job: what it covered is covered.
fn advanced(mark: &ColumnWatermark, job: &Job) -> ColumnWatermark {
    let spec = &job.spec;
    let version = spec.maintained_version.unwrap_or(spec.read_version);
    ColumnWatermark {
        through_fragment: mark.through_fragment.max(spec.maintained_through),
        through_version: mark.through_version.max(Some(version)),
        failures: 0,
        counted_failure: None,
        retry_at_ms: 0,
        ..mark.clone()
    }
}

/// The table's maintained columns (a user function's once, by its first
/// output), each with the columns it reads.
pub(crate) fn maintained_columns(dataset: &Dataset) -> Result<Vec<Maintained>, Error> {
    let schema = dataset.schema();
    let mut columns: Vec<Maintained> = Vec::new();
    for field in &schema.fields {
        if field.metadata.get(MAINTAINED_KEY).map(String::as_str) != Some("true") {
            continue;
        }
        let target = resolve_target(schema, &field.name)?;
        if columns.iter().any(|c| c.column == target.name) {
            continue;
        }
        let program = Program::compile(schema, &target, None)?;
        let inputs = program
            .read_schema
            .fields
            .iter()
            .map(|f| f.name.clone())
            .filter(|name| !program.columns.contains(name))
            .collect();
        let (_, input_fields) = program.field_ids();
        columns.push(Maintained {
            declared_by: field.metadata.get(DECLARED_BY_KEY).cloned(),
            interval: field
                .metadata
                .get(REFRESH_INTERVAL_KEY)
                .and_then(|s| s.parse().ok())
                .map(Duration::from_secs),
            udf: target.udf.is_some(),
            column: target.name,
            inputs,
            input_fields,
        });
    }
    Ok(columns)
}

/// Passes over the tables every `interval`, and as soon as `wake` is woken
/// (at most every [`MIN_WAKE_GAP`]), until `stop` turns true.
pub async fn watch(
    maintainer: Arc<Maintainer>,
    interval: Duration,
    wake: Wake,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let began = Instant::now();
        maintainer.pass().await;
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wake.woken() => tokio::time::sleep_until(began + MIN_WAKE_GAP).await,
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}
