//! Reading and writing the embedded store's rows inside a transaction.

use anyhow::Context;
use rusqlite::{OptionalExtension, Transaction, params};

use crate::model::job::{
    Counter, Job, JobEvent, JobSpec, JobState, Metrics, MetricsDelta, now_millis,
};
use crate::ports::store::{
    COMMIT_LEASE, ColumnWatermark, CreateOutcome, FragmentStatus, IDEMPOTENCY_TTL,
    IdempotencyClaim, PlanChange, PlanChanged, Replanned, Resolution, StagedFragment,
    column_lock_key,
};

pub(super) fn read_job(tx: &Transaction<'_>, job_id: &str) -> anyhow::Result<Option<Job>> {
    let row = tx
        .prepare_cached(
            "SELECT state, spec, created_at, updated_at, started_at, finished_at, error
             FROM jobs WHERE job_id = ?1",
        )?
        .query_row(params![job_id], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })
        .optional()?;
    let Some((state, spec, created_at, updated_at, started_at, finished_at, error)) = row else {
        return Ok(None);
    };
    let spec: JobSpec = serde_json::from_str(&spec).context("job spec")?;
    Ok(Some(Job {
        job_id: job_id.to_string(),
        spec,
        state: JobState::parse(&state).with_context(|| format!("job state {state}"))?,
        created_at,
        updated_at,
        started_at,
        finished_at,
        error,
        metrics: read_metrics(tx, job_id)?,
    }))
}

pub(super) fn read_metrics(tx: &Transaction<'_>, job_id: &str) -> anyhow::Result<Metrics> {
    let mut stmt = tx.prepare_cached("SELECT name, value FROM counters WHERE job_id = ?1")?;
    let mut metrics = Metrics::default();
    let rows = stmt.query_map(params![job_id], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?))
    })?;
    for row in rows {
        let (name, value) = row?;
        if let Some(counter) = Counter::from_name(&name) {
            metrics.set(counter, value);
        }
    }
    Ok(metrics)
}

pub(super) fn add_counters(
    tx: &Transaction<'_>,
    job_id: &str,
    delta: &MetricsDelta,
) -> anyhow::Result<()> {
    let mut stmt = tx.prepare_cached(
        "INSERT INTO counters (job_id, name, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (job_id, name) DO UPDATE SET value = value + excluded.value",
    )?;
    for (counter, by) in &delta.0 {
        stmt.execute(params![job_id, counter.name(), by])?;
    }
    Ok(())
}

pub(super) fn push_event(tx: &Transaction<'_>, job_id: &str, message: &str) -> anyhow::Result<()> {
    let event = JobEvent::now(message);
    tx.prepare_cached("INSERT INTO events (job_id, at, message) VALUES (?1, ?2, ?3)")?
        .execute(params![job_id, event.at, event.message])?;
    Ok(())
}

/// The latest `limit` events of a job, oldest first.
pub(super) fn read_events(
    tx: &Transaction<'_>,
    job_id: &str,
    limit: usize,
) -> anyhow::Result<Vec<JobEvent>> {
    let mut stmt = tx.prepare_cached(
        "SELECT at, message FROM events WHERE job_id = ?1 ORDER BY seq DESC LIMIT ?2",
    )?;
    let mut events: Vec<JobEvent> = stmt
        .query_map(params![job_id, limit as i64], |r| {
            Ok(JobEvent {
                at: r.get(0)?,
                message: r.get(1)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    events.reverse();
    Ok(events)
}

pub(super) fn fragment_status(
    tx: &Transaction<'_>,
    job_id: &str,
    fragment_id: u64,
) -> anyhow::Result<FragmentStatus> {
    let status: Option<String> = tx
        .prepare_cached("SELECT status FROM fragments WHERE job_id = ?1 AND fragment_id = ?2")?
        .query_row(params![job_id, fragment_id as i64], |r| r.get(0))
        .optional()?;
    Ok(status
        .map(|s| FragmentStatus::parse(&s))
        .unwrap_or(FragmentStatus::Open))
}

/// Records one fragment's outcome with its counter, unless it was resolved
/// already; returns whether it recorded it.
pub(super) fn resolve_one(
    tx: &Transaction<'_>,
    job_id: &str,
    resolution: &Resolution,
) -> anyhow::Result<bool> {
    if fragment_status(tx, job_id, resolution.fragment_id)?.is_resolved() {
        return Ok(false);
    }
    let (status, staged, counter) = match &resolution.staged {
        Some(staged) => (
            "STAGED",
            Some(serde_json::to_string(staged)?),
            Counter::FragmentsStaged,
        ),
        None => ("SKIPPED", None, Counter::FragmentsSkipped),
    };
    tx.prepare_cached(
        "INSERT INTO fragments (job_id, fragment_id, status, staged) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (job_id, fragment_id) DO UPDATE SET status = excluded.status, staged = excluded.staged",
    )?
    .execute(params![job_id, resolution.fragment_id as i64, status, staged])?;
    add_counters(tx, job_id, &MetricsDelta::new().add(counter, 1))?;
    Ok(true)
}

/// Marks staged fragments committed and counts them, each once.
pub(super) fn commit_fragments(
    tx: &Transaction<'_>,
    job_id: &str,
    fragments: &[StagedFragment],
) -> anyhow::Result<()> {
    for fragment in fragments {
        let changed = tx
            .prepare_cached(
                "UPDATE fragments SET status = 'COMMITTED' WHERE job_id = ?1 AND fragment_id = ?2 AND status = 'STAGED'",
            )?
            .execute(params![job_id, fragment.fragment_id as i64])?;
        if changed == 1 {
            add_counters(
                tx,
                job_id,
                &MetricsDelta::new()
                    .add(Counter::FragmentsCommitted, 1)
                    .add(Counter::RowsCommitted, fragment.rows as i64),
            )?;
        }
    }
    Ok(())
}

/// The earlier job of an idempotency key, if the key was seen.
pub(super) fn idempotency_outcome(
    tx: &Transaction<'_>,
    claim: &IdempotencyClaim,
) -> anyhow::Result<Option<CreateOutcome>> {
    let seen: Option<(String, String, i64)> = tx
        .query_row(
            "SELECT fingerprint, job_id, created_ms FROM idempotency WHERE key = ?1",
            params![claim.key],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let expired_before = now_millis() - IDEMPOTENCY_TTL.as_millis() as i64;
    if seen
        .as_ref()
        .is_some_and(|(_, _, created)| *created < expired_before)
    {
        tx.execute("DELETE FROM idempotency WHERE key = ?1", params![claim.key])?;
        return Ok(None);
    }
    Ok(seen.map(|(fingerprint, job_id, _)| {
        if fingerprint == claim.fingerprint {
            CreateOutcome::Replayed { job_id }
        } else {
            CreateOutcome::IdempotencyMismatch { job_id }
        }
    }))
}

/// The active job holding the column's lock; a lock left by a job that
/// ended is removed.
pub(super) fn active_lock_holder(
    tx: &Transaction<'_>,
    job: &Job,
) -> anyhow::Result<Option<String>> {
    let lock_key = column_lock_key(job);
    let holder: Option<String> = tx
        .query_row(
            "SELECT job_id FROM column_locks WHERE lock_key = ?1",
            params![lock_key],
            |r| r.get(0),
        )
        .optional()?;
    let Some(holder) = holder else {
        return Ok(None);
    };
    if read_job(tx, &holder)?.is_some_and(|j| !j.state.is_terminal()) {
        return Ok(Some(holder));
    }
    tx.execute(
        "DELETE FROM column_locks WHERE lock_key = ?1",
        params![lock_key],
    )?;
    Ok(None)
}

/// The job's row, its counters and its column lock.
pub(super) fn insert_job(tx: &Transaction<'_>, job: &Job) -> anyhow::Result<()> {
    tx.execute(
        "INSERT INTO jobs (job_id, table_key, created_ms, state, spec, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![
            job.job_id,
            job.spec.table_id.key(),
            now_millis(),
            job.state.as_str(),
            serde_json::to_string(&job.spec)?,
            job.created_at,
            job.updated_at,
        ],
    )?;
    let mut delta = MetricsDelta::new();
    for counter in Counter::ALL {
        let value = job.metrics.get(counter) as i64;
        if value != 0 {
            delta = delta.add(counter, value);
        }
    }
    add_counters(tx, &job.job_id, &delta)?;
    tx.execute(
        "INSERT INTO column_locks (lock_key, job_id) VALUES (?1, ?2)",
        params![column_lock_key(job), job.job_id],
    )?;
    Ok(())
}

/// Adds the change's fragments that are new and moves the open or staged
/// ones it names, each with its counters.
pub(super) fn change_plan(
    tx: &Transaction<'_>,
    job_id: &str,
    change: &PlanChange,
) -> anyhow::Result<PlanChanged> {
    let mut changed = PlanChanged::default();
    for added in &change.added {
        let inserted =
            tx.prepare_cached(
                "INSERT OR IGNORE INTO replanned (job_id, fragment_id, body) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![
                job_id,
                added.fragment.id as i64,
                serde_json::to_string(added)?
            ])? == 1;
        if inserted {
            add_counters(tx, job_id, &added.counts())?;
            changed.added.push(added.fragment.id);
        }
    }
    for id in &change.moved {
        if let Some(staged) = move_one(tx, job_id, *id)? {
            changed.moved.push((*id, staged));
        }
    }
    Ok(changed)
}

/// Marks an open or staged fragment moved; `Some(staged file)` when it
/// did (the file, if it had one), `None` when it was moved or finished.
fn move_one(
    tx: &Transaction<'_>,
    job_id: &str,
    id: u64,
) -> anyhow::Result<Option<Option<StagedFragment>>> {
    let row: Option<(String, Option<String>)> = tx
        .prepare_cached(
            "SELECT status, staged FROM fragments WHERE job_id = ?1 AND fragment_id = ?2",
        )?
        .query_row(params![job_id, id as i64], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (status, staged) = match row {
        Some((status, staged)) => (FragmentStatus::parse(&status), staged),
        None => (FragmentStatus::Open, None),
    };
    let staged: Option<StagedFragment> = match (status, staged) {
        (FragmentStatus::Open, _) => None,
        (FragmentStatus::Staged, Some(text)) => Some(serde_json::from_str(&text)?),
        _ => return Ok(None),
    };
    tx.prepare_cached(
        "INSERT INTO fragments (job_id, fragment_id, status, staged) VALUES (?1, ?2, 'MOVED', NULL)
         ON CONFLICT (job_id, fragment_id) DO UPDATE SET status = 'MOVED', staged = NULL",
    )?
    .execute(params![job_id, id as i64])?;
    let mut delta = MetricsDelta::new().add(Counter::FragmentsMoved, 1);
    if staged.is_some() {
        delta = delta.add(Counter::FragmentsStaged, -1);
    }
    add_counters(tx, job_id, &delta)?;
    Ok(Some(staged))
}

/// The fragments added to the job after its submission.
pub(super) fn replanned(tx: &Transaction<'_>, job_id: &str) -> anyhow::Result<Vec<Replanned>> {
    let mut stmt =
        tx.prepare_cached("SELECT body FROM replanned WHERE job_id = ?1 ORDER BY fragment_id")?;
    let rows = stmt.query_map(params![job_id], |r| r.get::<_, String>(0))?;
    let mut replanned = Vec::new();
    for row in rows {
        replanned.push(serde_json::from_str(&row?)?);
    }
    Ok(replanned)
}

/// Records `owner`'s commit in progress until its commit lease expires,
/// if the job is active and `owner` holds the lease.
pub(super) fn begin_commit(
    tx: &Transaction<'_>,
    job_id: &str,
    owner: &str,
    ttl_ms: i64,
) -> anyhow::Result<Option<i64>> {
    let active = read_job(tx, job_id)?.is_some_and(|job| !job.state.is_terminal());
    let now = now_millis();
    let renewed = tx
        .prepare_cached(
            "UPDATE leases SET until_ms = ?4
             WHERE job_id = ?1 AND name = ?2 AND owner = ?3 AND until_ms > ?5",
        )?
        .execute(params![job_id, COMMIT_LEASE, owner, now + ttl_ms, now])?
        == 1;
    if !(active && renewed) {
        return Ok(None);
    }
    let until = now + ttl_ms;
    tx.prepare_cached(
        "INSERT INTO commit_intents (job_id, owner, until_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT (job_id) DO UPDATE SET owner = excluded.owner, until_ms = excluded.until_ms",
    )?
    .execute(params![job_id, owner, until])?;
    Ok(Some(until))
}

pub(super) fn end_commit(tx: &Transaction<'_>, job_id: &str, owner: &str) -> anyhow::Result<()> {
    tx.prepare_cached("DELETE FROM commit_intents WHERE job_id = ?1 AND owner = ?2")?
        .execute(params![job_id, owner])?;
    Ok(())
}

/// Whether a commit of the job may be being published now.
pub(super) fn commit_in_flight(tx: &Transaction<'_>, job_id: &str) -> anyhow::Result<bool> {
    let until: Option<i64> = tx
        .prepare_cached("SELECT until_ms FROM commit_intents WHERE job_id = ?1")?
        .query_row(params![job_id], |r| r.get(0))
        .optional()?;
    Ok(until.is_some_and(|until| until >= now_millis()))
}

/// A maintained column's record and its revision (0: none).
pub(super) fn watermark(
    tx: &Transaction<'_>,
    table_key: &str,
    column: &str,
) -> anyhow::Result<(ColumnWatermark, u64)> {
    let row: Option<(String, i64)> = tx
        .prepare_cached(
            "SELECT body, revision FROM watermarks WHERE table_key = ?1 AND column = ?2",
        )?
        .query_row(params![table_key, column], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    Ok(match row {
        Some((body, revision)) => (serde_json::from_str(&body)?, revision as u64),
        None => (ColumnWatermark::default(), 0),
    })
}

/// Replaces the record if its revision is still `revision`.
pub(super) fn set_watermark(
    tx: &Transaction<'_>,
    table_key: &str,
    column: &str,
    watermark: &ColumnWatermark,
    revision: u64,
) -> anyhow::Result<bool> {
    let body = serde_json::to_string(watermark)?;
    let changed = if revision == 0 {
        tx.prepare_cached(
            "INSERT OR IGNORE INTO watermarks (table_key, column, body, revision) VALUES (?1, ?2, ?3, 1)",
        )?
        .execute(params![table_key, column, body])?
    } else {
        tx.prepare_cached(
            "UPDATE watermarks SET body = ?3, revision = revision + 1
             WHERE table_key = ?1 AND column = ?2 AND revision = ?4",
        )?
        .execute(params![table_key, column, body, revision as i64])?
    };
    Ok(changed == 1)
}
