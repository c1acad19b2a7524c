//! The embedded job store: the same contract as DynamoDB, in SQLite.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Transaction, params};

use crate::adapters::sqlite::embedded::EmbeddedDb;
use crate::ports::store::{
    ColumnWatermark, CreateOutcome, FragmentLedger, FragmentRecord, FragmentStatus,
    IdempotencyClaim, JobJournal, JobPage, JobRecords, Leases, PlanChange, PlanChanged, Replanned,
    Resolution, RowFailure, StagedFragment, StoreError, StoreResult, TaskMark, Watermarks,
    column_lock_key, decode_token, encode_token,
};

mod rows;
use crate::model::job::{
    Counter, Job, JobEvent, JobState, Metrics, MetricsDelta, now_millis, now_rfc3339,
};
use rows::{
    active_lock_holder, add_counters, commit_fragments, commit_in_flight, fragment_status,
    idempotency_outcome, insert_job, push_event, read_events, read_job, read_metrics, resolve_one,
};

#[derive(Clone)]
pub struct SqliteJobStore {
    db: EmbeddedDb,
}

impl SqliteJobStore {
    pub fn new(db: EmbeddedDb) -> Self {
        Self { db }
    }

    /// Runs `f` in one SQLite transaction.
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    {
        Ok(self.db.call(f).await?)
    }

    /// [`Self::run`] for a read-only `f` (see [`EmbeddedDb::read`]).
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> anyhow::Result<T> + Send + 'static,
    {
        Ok(self.db.read(f).await?)
    }

    /// A page of jobs, newest first: of one table, or (`None`) of all.
    async fn list_page(
        &self,
        table_key: Option<String>,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        let cursor = match page_token {
            Some(token) => {
                let value = decode_token(token).ok_or(StoreError::BadPageToken)?;
                let created = value
                    .get("c")
                    .and_then(|v| v.as_i64())
                    .ok_or(StoreError::BadPageToken)?;
                let id = value
                    .get("j")
                    .and_then(|v| v.as_str())
                    .ok_or(StoreError::BadPageToken)?
                    .to_string();
                // A token continues only the listing that issued it.
                if value.get("t").and_then(|v| v.as_str()) != table_key.as_deref() {
                    return Err(StoreError::BadPageToken);
                }
                Some((created, id))
            }
            None => None,
        };
        self.run(move |tx| {
            let (after_ms, after_id) = cursor.unwrap_or((i64::MAX, String::from("\u{10ffff}")));
            let mut stmt = tx.prepare(
                "SELECT job_id, created_ms FROM jobs WHERE (?1 IS NULL OR table_key = ?1)
                       AND (created_ms < ?2 OR (created_ms = ?2 AND job_id < ?3))
                     ORDER BY created_ms DESC, job_id DESC LIMIT ?4",
            )?;
            let ids: Vec<(String, i64)> = stmt
                .query_map(
                    params![table_key, after_ms, after_id, (limit + 1) as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?
                .collect::<Result<_, _>>()?;
            let more = ids.len() > limit;
            let mut jobs = Vec::new();
            for (id, _) in ids.iter().take(limit) {
                if let Some(job) = read_job(tx, id)? {
                    jobs.push(job);
                }
            }
            let next_page_token = if more {
                ids.get(limit - 1).map(|(id, created)| {
                    encode_token(&serde_json::json!({"c": created, "j": id, "t": table_key}))
                })
            } else {
                None
            };
            Ok(JobPage {
                jobs,
                next_page_token,
            })
        })
        .await
    }
}

#[async_trait]
impl JobRecords for SqliteJobStore {
    async fn create_job(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        let job = job.clone();
        let event = event.to_string();
        let claim = idempotency.cloned();
        self.run(move |tx| {
            if let Some(claim) = &claim
                && let Some(outcome) = idempotency_outcome(tx, claim)?
            {
                return Ok(outcome);
            }
            if let Some(holder) = active_lock_holder(tx, &job)? {
                return Ok(CreateOutcome::ColumnBusy { job_id: holder });
            }
            insert_job(tx, &job)?;
            push_event(tx, &job.job_id, &event)?;
            if let Some(claim) = &claim {
                tx.execute(
                    "INSERT INTO idempotency (key, fingerprint, job_id, created_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![claim.key, claim.fingerprint, job.job_id, now_millis()],
                )?;
            }
            Ok(CreateOutcome::Created)
        })
        .await
    }

    async fn release_idempotency(&self, key: &str, job_id: &str) -> StoreResult<()> {
        let (key, job_id) = (key.to_string(), job_id.to_string());
        self.run(move |tx| {
            tx.execute(
                "DELETE FROM idempotency WHERE key = ?1 AND job_id = ?2",
                params![key, job_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Option<Job>> {
        let job_id = job_id.to_string();
        self.read(move |tx| read_job(tx, &job_id)).await
    }

    async fn list_jobs(
        &self,
        table_key: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.list_page(Some(table_key.to_string()), limit, page_token)
            .await
    }

    async fn list_recent_jobs(
        &self,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.list_page(None, limit, page_token).await
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>> {
        let id = job_id.to_string();
        let event = event.map(str::to_string);
        let error = error.map(str::to_string);
        let moved = self
            .run(move |tx| {
                let Some(job) = read_job(tx, &id)? else {
                    return Ok(Ok(None));
                };
                if !job.state.can_become(to) {
                    return Ok(Ok(None));
                }
                if to == JobState::Cancelled && commit_in_flight(tx, &id)? {
                    return Ok(Err(()));
                }
                move_job(tx, &job, to, event.as_deref(), error.as_deref())?;
                Ok(Ok(Some(job.state)))
            })
            .await?;
        moved.map_err(|()| StoreError::CommitInFlight(job_id.to_string()))
    }

    async fn add_metrics(&self, job_id: &str, delta: &MetricsDelta) -> StoreResult<Metrics> {
        let job_id = job_id.to_string();
        let delta = delta.clone();
        self.run(move |tx| {
            add_counters(tx, &job_id, &delta)?;
            read_metrics(tx, &job_id)
        })
        .await
    }
}

#[async_trait]
impl JobJournal for SqliteJobStore {
    async fn add_row_failures(&self, job_id: &str, failures: &[RowFailure]) -> StoreResult<()> {
        let job_id = job_id.to_string();
        let failures = failures.to_vec();
        self.run(move |tx| {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO row_failures (job_id, fragment_id, row, error) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for failure in &failures {
                stmt.execute(params![
                    job_id,
                    failure.fragment_id as i64,
                    failure.row as i64,
                    failure.error
                ])?;
            }
            Ok(())
        })
        .await
    }

    async fn list_row_failures(&self, job_id: &str, limit: usize) -> StoreResult<Vec<RowFailure>> {
        let job_id = job_id.to_string();
        self.run(move |tx| {
            let mut stmt = tx.prepare_cached(
                "SELECT fragment_id, row, error FROM row_failures WHERE job_id = ?1
                 ORDER BY fragment_id, row LIMIT ?2",
            )?;
            let failures = stmt
                .query_map(params![job_id, limit as i64], |r| {
                    Ok(RowFailure {
                        fragment_id: r.get::<_, i64>(0)? as u64,
                        row: r.get::<_, i64>(1)? as u64,
                        error: r.get(2)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(failures)
        })
        .await
    }

    async fn list_events(&self, job_id: &str, limit: usize) -> StoreResult<Vec<JobEvent>> {
        let job_id = job_id.to_string();
        self.run(move |tx| read_events(tx, &job_id, limit)).await
    }

    async fn add_event(&self, job_id: &str, message: &str) -> StoreResult<()> {
        let job_id = job_id.to_string();
        let message = message.to_string();
        self.run(move |tx| push_event(tx, &job_id, &message)).await
    }
}

#[async_trait]
impl FragmentLedger for SqliteJobStore {
    async fn get_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<FragmentRecord> {
        let job_id = job_id.to_string();
        self.read(move |tx| {
                let status = fragment_status(tx, &job_id, fragment_id)?;
                let mut stmt = tx.prepare_cached(
                    "SELECT task FROM fragment_tasks WHERE job_id = ?1 AND fragment_id = ?2 ORDER BY task",
                )?;
                let tasks_done = stmt
                    .query_map(params![job_id, fragment_id as i64], |r| r.get::<_, u32>(0))?
                    .collect::<Result<_, _>>()?;
                Ok(FragmentRecord { status, tasks_done })
            })
            .await
    }

    async fn mark_task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> StoreResult<TaskMark> {
        let job_id = job_id.to_string();
        let delta = MetricsDelta::new().add(Counter::TasksDone, 1).merge(delta);
        self.run(move |tx| {
                let inserted = tx
                    .prepare_cached(
                        "INSERT OR IGNORE INTO fragment_tasks (job_id, fragment_id, task) VALUES (?1, ?2, ?3)",
                    )?
                    .execute(params![job_id, fragment_id as i64, task])?
                    == 1;
                if inserted {
                    add_counters(tx, &job_id, &delta)?;
                }
                let tasks_done: u32 = tx
                    .prepare_cached(
                        "SELECT COUNT(*) FROM fragment_tasks WHERE job_id = ?1 AND fragment_id = ?2",
                    )?
                    .query_row(params![job_id, fragment_id as i64], |r| r.get(0))?;
                Ok(TaskMark {
                    newly_done: inserted,
                    tasks_done,
                })
            })
            .await
    }

    async fn resolve_fragments(
        &self,
        job_id: &str,
        resolutions: &[Resolution],
        delta: &MetricsDelta,
    ) -> StoreResult<Vec<u64>> {
        let job_id = job_id.to_string();
        let resolutions = resolutions.to_vec();
        let delta = delta.clone();
        self.run(move |tx| {
            let mut recorded = Vec::with_capacity(resolutions.len());
            // A job that ended takes no more outcomes: the caller removes
            // its file (cleanup may have run already).
            if read_job(tx, &job_id)?.is_none_or(|job| job.state.is_terminal()) {
                return Ok(recorded);
            }
            for (i, resolution) in resolutions.iter().enumerate() {
                if !resolve_one(tx, &job_id, resolution)? {
                    continue;
                }
                recorded.push(resolution.fragment_id);
                if i + 1 == resolutions.len() && !delta.is_empty() {
                    add_counters(tx, &job_id, &delta)?;
                }
            }
            Ok(recorded)
        })
        .await
    }

    async fn resolved_fragments(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashSet<u64>> {
        let job_id = job_id.to_string();
        let ids = fragment_ids.to_vec();
        self.read(move |tx| {
            let mut resolved = HashSet::new();
            for id in ids {
                if fragment_status(tx, &job_id, id)?.is_resolved() {
                    resolved.insert(id);
                }
            }
            Ok(resolved)
        })
        .await
    }

    async fn fragment_statuses(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashMap<u64, FragmentStatus>> {
        let job_id = job_id.to_string();
        let ids = fragment_ids.to_vec();
        self.read(move |tx| {
            ids.into_iter()
                .map(|id| Ok((id, fragment_status(tx, &job_id, id)?)))
                .collect()
        })
        .await
    }

    async fn change_plan(&self, job_id: &str, change: &PlanChange) -> StoreResult<PlanChanged> {
        let job_id = job_id.to_string();
        let change = change.clone();
        self.run(move |tx| rows::change_plan(tx, &job_id, &change))
            .await
    }

    async fn replanned_fragments(&self, job_id: &str) -> StoreResult<Vec<Replanned>> {
        let job_id = job_id.to_string();
        self.read(move |tx| rows::replanned(tx, &job_id)).await
    }

    async fn staged_fragments(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        let job_id = job_id.to_string();
        self.run(move |tx| {
                let mut stmt = tx.prepare(
                    "SELECT staged FROM fragments WHERE job_id = ?1 AND status = 'STAGED' ORDER BY fragment_id",
                )?;
                let rows = stmt.query_map(params![job_id], |r| r.get::<_, String>(0))?;
                let mut staged = Vec::new();
                for row in rows {
                    staged.push(serde_json::from_str(&row?)?);
                }
                Ok(staged)
            })
            .await
    }

    async fn mark_committed(&self, job_id: &str, fragments: &[StagedFragment]) -> StoreResult<()> {
        let job_id = job_id.to_string();
        let fragments = fragments.to_vec();
        self.run(move |tx| commit_fragments(tx, &job_id, &fragments))
            .await
    }
}

#[async_trait]
impl Leases for SqliteJobStore {
    async fn begin_commit(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<i64>> {
        let (job_id, owner) = (job_id.to_string(), owner.to_string());
        let ttl_ms = ttl.as_millis() as i64;
        self.run(move |tx| rows::begin_commit(tx, &job_id, &owner, ttl_ms))
            .await
    }

    async fn record_commit(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
        event: &str,
        owner: &str,
    ) -> StoreResult<()> {
        let job_id = job_id.to_string();
        let fragments = fragments.to_vec();
        let event = event.to_string();
        let owner = owner.to_string();
        self.run(move |tx| {
            commit_fragments(tx, &job_id, &fragments)?;
            add_counters(
                tx,
                &job_id,
                &MetricsDelta::new().add(Counter::CommitsDone, 1),
            )?;
            rows::end_commit(tx, &job_id, &owner)?;
            push_event(tx, &job_id, &event)
        })
        .await
    }

    async fn end_commit(&self, job_id: &str, owner: &str) -> StoreResult<()> {
        let (job_id, owner) = (job_id.to_string(), owner.to_string());
        self.run(move |tx| rows::end_commit(tx, &job_id, &owner))
            .await
    }

    async fn try_lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool> {
        let job_id = job_id.to_string();
        let name = name.to_string();
        let owner = owner.to_string();
        self.run(move |tx| {
                let now = now_millis();
                let changed = tx
                    .prepare_cached(
                        "INSERT INTO leases (job_id, name, owner, until_ms) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (job_id, name) DO UPDATE SET owner = excluded.owner, until_ms = excluded.until_ms
                         WHERE leases.until_ms < ?5 OR leases.owner = excluded.owner",
                    )?
                    .execute(params![job_id, name, owner, now + ttl.as_millis() as i64, now])?;
                Ok(changed == 1)
            })
            .await
    }

    async fn release_lease(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()> {
        let job_id = job_id.to_string();
        let name = name.to_string();
        let owner = owner.to_string();
        self.run(move |tx| {
            tx.prepare_cached("DELETE FROM leases WHERE job_id = ?1 AND name = ?2 AND owner = ?3")?
                .execute(params![job_id, name, owner])?;
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl Watermarks for SqliteJobStore {
    async fn watermark(
        &self,
        table_key: &str,
        column: &str,
    ) -> StoreResult<(ColumnWatermark, u64)> {
        let (table_key, column) = (table_key.to_string(), column.to_string());
        self.read(move |tx| rows::watermark(tx, &table_key, &column))
            .await
    }

    async fn set_watermark(
        &self,
        table_key: &str,
        column: &str,
        watermark: &ColumnWatermark,
        revision: u64,
    ) -> StoreResult<bool> {
        let (table_key, column) = (table_key.to_string(), column.to_string());
        let watermark = watermark.clone();
        self.run(move |tx| rows::set_watermark(tx, &table_key, &column, &watermark, revision))
            .await
    }
}

/// Moves the job to `to`: its times, error and event; a terminal state
/// releases its column lock.
fn move_job(
    tx: &Transaction<'_>,
    job: &Job,
    to: JobState,
    event: Option<&str>,
    error: Option<&str>,
) -> anyhow::Result<()> {
    let now = now_rfc3339();
    tx.execute(
        "UPDATE jobs SET state = ?2, updated_at = ?3,
            started_at = CASE WHEN ?2 = 'RUNNING' THEN COALESCE(started_at, ?3) ELSE started_at END,
            finished_at = CASE WHEN ?2 IN ('DONE','FAILED','CANCELLED') THEN ?3 ELSE finished_at END,
            error = COALESCE(?4, error)
         WHERE job_id = ?1",
        params![job.job_id, to.as_str(), now, error],
    )?;
    if to.is_terminal() {
        tx.execute(
            "DELETE FROM column_locks WHERE lock_key = ?1 AND job_id = ?2",
            params![column_lock_key(job), job.job_id],
        )?;
    }
    if let Some(event) = event {
        push_event(tx, &job.job_id, event)?;
    }
    Ok(())
}
