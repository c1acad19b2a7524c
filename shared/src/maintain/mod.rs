//! Maintained columns: a column declared with `auto_backfill` is filled
//! whenever a new table version brings rows it has no value for. Each pass
//! looks at a table's latest version and submits, through the same
//! submission as the API, a job over the fragments appended since the last
//! job it made (fragment ids only grow, so "appended since" is "id above").
//!
//! - Idempotent: one job per table, column and version (the idempotency key
//!   names them), however many watchers see the version.
//! - Coalesced: while a column's job runs, new versions wait; the next pass
//!   after it ends submits one job covering all of them.
//! - Chained: a column whose inputs include a maintained column waits until
//!   that column has covered the same fragments and its job has ended.
//!
//! What each column covered is read from its latest maintainer job
//! (`maintained_through`), so any process, a restarted `serve` or a fresh
//! Lambda, carries on where the last left off. `serve` runs [`watch`] over
//! the tables under its root, woken early by new versions of local tables
//! and by jobs' ends ([`wake`]); on AWS the trigger function runs
//! [`Maintainer::maintain`] for the table an event names.

use std::sync::Arc;
use std::time::Duration;

use lance::Dataset;
use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::computed::{MAINTAINED_KEY, Program, resolve_target};
use crate::error::Error;
use crate::store::JobStore;
use crate::submit::{SubmitOutcome, SubmitRequest, Submitter};
use crate::table::{Catalog, TableId};

mod wake;

pub use wake::{MIN_WAKE_GAP, VersionWatch, Wake, WakeOnJobEnd};

/// How `serve` looks for new versions by default.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// Tables a watcher looks at (the first this many the namespace lists).
pub const MAX_WATCHED_TABLES: usize = 10_000;
/// Who maintained-column jobs are submitted by.
pub const MAINTAINER: &str = "maintainer";
/// A column's latest maintainer job is looked for among this many of the
/// table's newest jobs; beyond, the column starts again from every fragment
/// (its default `where` then fills only what is still null).
const JOBS_LOOKED_AT: usize = 50;

/// Where a maintained column stands, from its latest maintainer job.
#[derive(Debug, Clone, Default)]
struct Covered {
    /// The highest fragment id its jobs covered (`None`: none yet, so the
    /// first job covers every fragment, filling whatever is still null).
    through: Option<u64>,
    /// The last job submitted for it.
    last_job: Option<String>,
}

/// A maintained column and the columns it reads.
struct Maintained {
    column: String,
    inputs: Vec<String>,
}

pub struct Maintainer {
    catalog: Arc<Catalog>,
    store: Arc<dyn JobStore>,
    submitter: Submitter,
}

impl Maintainer {
    pub fn new(catalog: Arc<Catalog>, store: Arc<dyn JobStore>, submitter: Submitter) -> Self {
        Self {
            catalog,
            store,
            submitter,
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
        let dataset = self
            .catalog
            .latest(&uri, None)
            .await
            .map_err(|err| Error::from_lance(err, "opening the table"))?;
        let columns = maintained_columns(&dataset)?;
        let Some(last_fragment) = dataset.get_fragments().iter().map(|f| f.id() as u64).max()
        else {
            return Ok(Vec::new());
        };
        let mut submitted = Vec::new();
        for column in &columns {
            let Some(state) = self.due(table, column, &columns, last_fragment).await? else {
                continue;
            };
            if let Some(job_id) = self
                .submit(table, column, &state, &dataset, last_fragment)
                .await?
            {
                submitted.push(job_id);
            }
        }
        Ok(submitted)
    }

    /// The column's state when it needs a job now (fragments beyond what it
    /// covered, no job of its own running, its maintained inputs settled).
    async fn due(
        &self,
        table: &TableId,
        column: &Maintained,
        all: &[Maintained],
        last_fragment: u64,
    ) -> Result<Option<Covered>, Error> {
        let state = self.state(table, &column.column).await?;
        if state
            .through
            .is_some_and(|through| through >= last_fragment)
        {
            return Ok(None);
        }
        if self.is_running(&state).await? {
            return Ok(None);
        }
        for input in all.iter().filter(|c| column.inputs.contains(&c.column)) {
            let input_state = self.state(table, &input.column).await?;
            let settled = input_state.through.is_some_and(|t| t >= last_fragment)
                && !self.is_running(&input_state).await?;
            if !settled {
                return Ok(None);
            }
        }
        Ok(Some(state))
    }

    /// The column's latest maintainer job among the table's newest jobs.
    async fn state(&self, table: &TableId, column: &str) -> Result<Covered, Error> {
        let page = self
            .store
            .list_jobs(&table.key(), JOBS_LOOKED_AT, None)
            .await
            .map_err(|err| Error::transient(format!("listing the table's jobs: {err}")))?;
        Ok(page
            .jobs
            .into_iter()
            .find(|job| job.spec.submitted_by == MAINTAINER && job.spec.column == column)
            .map(|job| Covered {
                through: job.spec.maintained_through,
                last_job: Some(job.job_id),
            })
            .unwrap_or_default())
    }

    async fn is_running(&self, state: &Covered) -> Result<bool, Error> {
        let Some(job_id) = &state.last_job else {
            return Ok(false);
        };
        let job = self
            .store
            .get_job(job_id)
            .await
            .map_err(|err| Error::transient(format!("reading job {job_id}: {err}")))?;
        Ok(job.is_some_and(|job| !job.state.is_terminal()))
    }

    /// Submits the column's job over the fragments after those it covered.
    async fn submit(
        &self,
        table: &TableId,
        column: &Maintained,
        state: &Covered,
        dataset: &Dataset,
        last_fragment: u64,
    ) -> Result<Option<String>, Error> {
        let request = AlterTableBackfillColumnsRequest::new(column.column.clone());
        let mut submit = SubmitRequest::new(table.clone(), request, MAINTAINER.to_string());
        // Declaring a maintained user-function column needed the permission.
        submit.allow_udf = true;
        submit.first_fragment_id = state.through.map(|through| through + 1);
        submit.maintained_through = Some(last_fragment);
        submit.idempotency_key = Some(format!(
            "maintain:{}:{}:{}",
            table.key(),
            column.column,
            dataset.version().version
        ));
        let job_id = match self.submitter.submit(submit).await {
            Ok(SubmitOutcome::Created { job_id } | SubmitOutcome::Replayed { job_id }) => job_id,
            Ok(SubmitOutcome::DryRun(_)) => return Ok(None),
            // Another job (a user's) fills the column: look again next pass.
            Err(Error::Conflict(_)) => return Ok(None),
            Err(err) => return Err(err),
        };
        info!(table = %table.display(), column = %column.column, %job_id, version = dataset.version().version, through = last_fragment, "maintained column: job submitted");
        Ok(Some(job_id))
    }
}

/// The table's maintained columns (a user function's once, by its first
/// output), each with the columns it reads.
fn maintained_columns(dataset: &Dataset) -> Result<Vec<Maintained>, Error> {
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
        columns.push(Maintained {
            column: target.name,
            inputs,
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
