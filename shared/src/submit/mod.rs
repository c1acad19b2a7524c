//! Submitting a backfill: validate the request against the table, plan its
//! tasks, record the job and queue its work. The HTTP handler calls this;
//! so can anything else that starts jobs (an event trigger).

pub mod declare;
mod dry_run;
pub mod maintain;
pub mod trigger;

pub use dry_run::DryRunPlan;

use std::sync::Arc;

use lance::Dataset;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::model::binding::Binding;
use crate::model::error::{Error, Missing};
use crate::model::job::{
    BackfillSpec, Counter, Job, JobOptions, JobSpec, JobState, MAX_TASKS_PER_JOB, Metrics,
    MetricsDelta, Params, PlanSummary, RETRY_FAILED_OF, RequestedParams,
};
use crate::model::plan::{self, PlannedFragment};
use crate::model::table::{Catalog, TableId};
use crate::ports::queue::{Message, Outgoing, QueueSet, TaskQueue};
use crate::ports::store::{CreateOutcome, IdempotencyClaim, JobStore, StoreError};
use crate::run::computed::{Program, resolve_target};
use crate::run::lifecycle::Lifecycle;

/// Jobs with more tasks than this are fanned out by a worker from one
/// planning message: the API then answers after one queue call, whatever
/// the table's size (sending 1,000 tasks inline is 100 SendMessageBatch calls).
pub const DEFAULT_INLINE_PLAN_LIMIT: u64 = 100;

#[derive(Debug, Clone)]
pub struct SubmitSettings {
    /// Above this many tasks one planning message is queued and a worker
    /// fans the tasks out, so submission takes bounded time.
    pub inline_plan_limit: u64,
    /// Named runtime environments jobs may ask for (`manifest`).
    pub manifests: Vec<String>,
}

impl Default for SubmitSettings {
    fn default() -> Self {
        Self {
            inline_plan_limit: DEFAULT_INLINE_PLAN_LIMIT,
            manifests: Vec::new(),
        }
    }
}

/// A backfill to submit.
#[derive(Debug, Clone)]
pub struct SubmitRequest {
    pub table: TableId,
    /// What the backfill asks for, read and checked at the edge.
    pub spec: BackfillSpec,
    /// Who asks (recorded on the job; scopes the idempotency key).
    pub submitted_by: String,
    /// The client's `Idempotency-Key`: a retry with the same key and request
    /// returns the job the first call created.
    pub idempotency_key: Option<String>,
    /// Whether the caller may run user functions (decided by the API's
    /// policy): a backfill of a user-function column needs it.
    pub allow_udf: bool,
    /// The job reads no version older than this (the version the client
    /// has seen: LanceDB's `x-lancedb-min-read-version`).
    pub min_read_version: Option<u64>,
    /// Fragments to leave alone (LanceDB's `skip_frags`).
    pub skip_fragments: Vec<u64>,
    /// Only these fragments (`context.retry_failed_of`); empty: every one.
    pub only_fragments: Vec<u64>,
    /// Request fields this service does not use, noted on the job.
    pub ignored_fields: Vec<String>,
    /// Only fragments with this id or a higher one (maintained columns).
    pub first_fragment_id: Option<u64>,
    /// For a maintained column's job: the highest fragment id it covers,
    /// and the table version it takes the column up to.
    pub maintained_through: Option<u64>,
    pub maintained_version: Option<u64>,
    /// Fragments filled whole (their inputs were rewritten since the
    /// column's last job); `refill_all`: every fragment.
    pub refill_fragments: Vec<u64>,
    pub refill_all: bool,
    /// A maintained column's job: who declared the column (its rights and
    /// processes are the job's).
    pub on_behalf_of: Option<String>,
    /// When another job already fills the column, answer that job instead
    /// of refusing: a column declared with `auto_backfill` is filled by
    /// whichever comes first, the declaration's job or the maintainer's.
    pub join_running: bool,
}

impl SubmitRequest {
    /// A request with nothing but the backfill itself.
    pub fn new(table: TableId, spec: BackfillSpec, submitted_by: String) -> Self {
        Self {
            table,
            spec,
            submitted_by,
            idempotency_key: None,
            allow_udf: false,
            min_read_version: None,
            skip_fragments: Vec::new(),
            only_fragments: Vec::new(),
            ignored_fields: Vec::new(),
            first_fragment_id: None,
            maintained_through: None,
            maintained_version: None,
            refill_fragments: Vec::new(),
            refill_all: false,
            on_behalf_of: None,
            join_running: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubmitOutcome {
    /// A new job, its tasks queued (or already DONE when nothing matched).
    Created { job_id: String },
    /// The idempotency key's earlier job.
    Replayed { job_id: String },
    /// `context.dry_run`: what the job would do; nothing was recorded.
    DryRun(Box<DryRunPlan>),
    /// Another job already fills the column (`join_running`).
    Joined { job_id: String },
}

impl SubmitOutcome {
    /// The job's id (`None` for a dry run, which makes no job).
    pub fn job_id(&self) -> Option<&str> {
        match self {
            Self::Created { job_id } | Self::Replayed { job_id } | Self::Joined { job_id } => {
                Some(job_id)
            }
            Self::DryRun(_) => None,
        }
    }
}

/// What submission needs, built once per process.
#[derive(Clone)]
pub struct Submitter {
    pub catalog: Arc<Catalog>,
    pub store: Arc<dyn JobStore>,
    pub queues: QueueSet,
    /// Records the job and every change of its state.
    pub lifecycle: Lifecycle,
    pub settings: SubmitSettings,
}

/// The most rows of a job whose fragments a retry looks at.
const MAX_RETRIED_ROWS: usize = 100_000;

/// The table as the job will read it, and what the job will do there.
struct Planned {
    uri: String,
    branch: Option<String>,
    read_version: u64,
    program: Program,
    fragments: Vec<PlannedFragment>,
}

impl Submitter {
    pub async fn submit(&self, mut submit: SubmitRequest) -> Result<SubmitOutcome, Error> {
        if let Some(failed) = submit.spec.retry_failed_of.clone() {
            submit.only_fragments = self.failed_fragments(&submit, &failed).await?;
        }
        let spec = &submit.spec;
        // Cheap checks first: nothing here needs the table.
        let queue = self.queue_of(&spec.params)?;
        self.check_manifest(&spec.params)?;
        let idempotency = submit
            .idempotency_key
            .as_deref()
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .map(|key| IdempotencyClaim {
                key: hex::encode(Sha256::digest(format!("{}\n{key}", submit.submitted_by))),
                fingerprint: fingerprint(&submit),
            });
        let planned = self.plan(&submit).await?;
        let params = spec.params.effective(planned.fragments.len() as u64);
        check_task_count(&planned.fragments, &params)?;
        let mut job = new_job(&submit, &planned, params, spec.options.clone());
        job.spec.plan.fanned_out = job.spec.plan.tasks > self.settings.inline_plan_limit;
        if spec.dry_run {
            let fragments = planned.fragments.iter().map(|f| f.id).collect();
            let plan = DryRunPlan::of(&job, fragments, spec.function_ms_per_1k_rows);
            return Ok(SubmitOutcome::DryRun(Box::new(plan)));
        }
        let created = self
            .lifecycle
            .create(&job, &planned_event(&job), idempotency.as_ref())
            .await
            .map_err(StoreError::for_client)?;
        match created {
            CreateOutcome::Created => {
                self.start(&job, &planned.fragments, &queue, idempotency.as_ref())
                    .await
            }
            CreateOutcome::Replayed { job_id } => {
                info!(%job_id, "idempotent replay");
                self.requeue_if_stalled(&job_id, &queue).await?;
                Ok(SubmitOutcome::Replayed { job_id })
            }
            CreateOutcome::IdempotencyMismatch { job_id } => Err(Error::Conflict(format!(
                "the Idempotency-Key was already used for a different request (job {job_id})"
            ))),
            CreateOutcome::ColumnBusy { job_id } if submit.join_running => {
                info!(%job_id, "the column is being filled already: joined");
                Ok(SubmitOutcome::Joined { job_id })
            }
            CreateOutcome::ColumnBusy { job_id } => Err(Error::Conflict(format!(
                "column '{}' of table '{}' is already being backfilled by job {job_id}; wait for it or cancel it",
                job.spec.column,
                submit.table.display()
            ))),
        }
    }

    /// The fragments holding the rows job `failed_job` (of the same table
    /// and column, ended) skipped: the new job fills their rows that are
    /// still empty (its `where` defaults to `<column> IS NULL`).
    async fn failed_fragments(
        &self,
        submit: &SubmitRequest,
        failed_job: &str,
    ) -> Result<Vec<u64>, Error> {
        let missing = || {
            Error::invalid_input(format!(
                "context.{RETRY_FAILED_OF}: job '{failed_job}' is not a job of column '{}' of this table",
                submit.spec.column
            ))
        };
        let job = self
            .store
            .get_job(failed_job)
            .await
            .map_err(StoreError::for_client)?
            .filter(|job| job.spec.table_id == submit.table)
            .filter(|job| job.spec.columns().contains(&submit.spec.column))
            .ok_or_else(missing)?;
        if !job.state.is_terminal() {
            return Err(Error::InvalidState(format!(
                "context.{RETRY_FAILED_OF}: job '{failed_job}' is still {}; retry its rows once it ends",
                job.state.as_str()
            )));
        }
        let failures = self
            .store
            .list_row_failures(failed_job, MAX_RETRIED_ROWS)
            .await
            .map_err(StoreError::for_client)?;
        let mut fragments: Vec<u64> = failures.iter().map(|f| f.fragment_id).collect();
        fragments.sort_unstable();
        fragments.dedup();
        if fragments.is_empty() {
            return Err(Error::invalid_input(format!(
                "context.{RETRY_FAILED_OF}: job '{failed_job}' skipped no rows"
            )));
        }
        Ok(fragments)
    }

    fn queue_of(&self, params: &RequestedParams) -> Result<Arc<dyn TaskQueue>, Error> {
        let cluster = params.cluster();
        self.queues.for_cluster(cluster).ok_or_else(|| {
            Error::invalid_input(format!(
                "field 'cluster': unknown cluster '{}' (known: default{})",
                cluster.unwrap_or_default(),
                self.queues
                    .cluster_names()
                    .iter()
                    .map(|c| format!(", {c}"))
                    .collect::<String>()
            ))
        })
    }

    fn check_manifest(&self, params: &RequestedParams) -> Result<(), Error> {
        let Some(manifest) = params.manifest() else {
            return Ok(());
        };
        if self
            .settings
            .manifests
            .iter()
            .any(|known| known == manifest)
        {
            return Ok(());
        }
        Err(Error::invalid_input(format!(
            "field 'manifest': unknown manifest '{manifest}' (known: {})",
            if self.settings.manifests.is_empty() {
                "none".to_string()
            } else {
                self.settings.manifests.join(", ")
            }
        )))
    }

    /// Opens the table as the job will read it and plans the work.
    async fn plan(&self, submit: &SubmitRequest) -> Result<Planned, Error> {
        let (table, spec) = (&submit.table, &submit.spec);
        let uri = self.catalog.locate(table).await?;
        let branch = spec.branch.clone();
        let dataset = self
            .open_for_backfill(&uri, branch.as_deref(), spec.read_version)
            .await?;
        check_min_read_version(dataset.manifest().version, submit.min_read_version)?;
        let dataset = Arc::new(dataset);
        self.catalog.pin(&uri, branch.as_deref(), dataset.clone());
        let target = resolve_target(dataset.schema(), &spec.column)?;
        if let Some(binding) = &target.udf
            && !submit.allow_udf
        {
            return Err(Error::Forbidden(format!(
                "column '{}' is filled by the user function '{}'; running it needs the udf permission",
                spec.column, binding.udf_name
            )));
        }
        let program = Program::compile(dataset.schema(), &target, spec.filter.as_deref())?;
        let selection = plan::Selection {
            num_frags: spec.params.num_frags(),
            skip: &submit.skip_fragments,
            first_id: submit.first_fragment_id,
            refill: &submit.refill_fragments,
            refill_all: submit.refill_all,
            only: &submit.only_fragments,
        };
        let fragments = plan::fragments(&dataset, selection)
            .await
            .map_err(|err| Error::from_lance(err, "listing fragments"))?;
        Ok(Planned {
            uri,
            branch,
            read_version: dataset.manifest().version,
            program,
            fragments,
        })
    }

    /// Queues the new job's work (or ends it at once when it has none).
    async fn start(
        &self,
        job: &Job,
        fragments: &[PlannedFragment],
        queue: &Arc<dyn TaskQueue>,
        idempotency: Option<&IdempotencyClaim>,
    ) -> Result<SubmitOutcome, Error> {
        let job_id = job.job_id.clone();
        if job.spec.plan.fragments == 0 {
            self.lifecycle
                .done_when_empty(&job_id)
                .await
                .map_err(StoreError::for_client)?;
            return Ok(SubmitOutcome::Created { job_id });
        }
        let messages = if job.spec.plan.fanned_out {
            vec![Message::plan(&job_id, 0, job.spec.plan.fragments)]
        } else {
            plan::tasks(fragments, job.spec.params.task_size)
                .into_iter()
                .map(|work| Message::work(&job_id, work))
                .collect()
        };
        let outgoing = messages.iter().map(Outgoing::message).collect();
        if let Err(err) = queue.send_many(outgoing).await {
            if let Some(claim) = idempotency {
                // The job is FAILED: a retry with the same key must start a
                // new one, not find this one.
                let _ = self.store.release_idempotency(&claim.key, &job_id).await;
            }
            return Err(self.unqueued(&job_id, err).await);
        }
        // Recorded, so an idempotent replay knows not to queue it again.
        self.store
            .add_metrics(&job_id, &MetricsDelta::new().add(Counter::Queued, 1))
            .await
            .map_err(StoreError::for_client)?;
        info!(%job_id, table = %job.spec.table_id.display(), column = %job.spec.column, tasks = job.spec.plan.tasks, "job accepted");
        Ok(SubmitOutcome::Created { job_id })
    }

    /// A job whose tasks could not be queued is marked FAILED at once.
    async fn unqueued(&self, job_id: &str, err: anyhow::Error) -> Error {
        warn!(%job_id, error = %format!("{err:#}"), "could not queue the job's tasks");
        let reason = "could not queue the job's tasks (the task queue did not answer)";
        self.lifecycle.fail(job_id, reason).await;
        Error::Unqueued(format!(
            "{reason}; job {job_id} was marked FAILED: submit again"
        ))
    }

    /// A submit that died between recording its job and queueing the tasks
    /// leaves a PENDING job with no work done; its retry (same
    /// Idempotency-Key) queues the tasks again, through one planning
    /// message. Tasks are idempotent, so a needless repeat costs only time.
    async fn requeue_if_stalled(
        &self,
        job_id: &str,
        queue: &Arc<dyn TaskQueue>,
    ) -> Result<(), Error> {
        let Some(job) = self
            .store
            .get_job(job_id)
            .await
            .map_err(StoreError::for_client)?
        else {
            return Ok(());
        };
        let queued = job.metrics.get(Counter::Queued) > 0;
        if job.state != JobState::Pending || queued || job.spec.plan.fragments == 0 {
            return Ok(());
        }
        let message = Message::plan(job_id, 0, job.spec.plan.fragments);
        queue
            .send_many(vec![Outgoing::message(&message)])
            .await
            .map_err(|err| {
                warn!(%job_id, error = %format!("{err:#}"), "could not queue the job's tasks again");
                Error::transient("could not queue the job's tasks; retry shortly")
            })
    }

    async fn open_for_backfill(
        &self,
        uri: &str,
        branch: Option<&str>,
        version: Option<u64>,
    ) -> Result<Dataset, Error> {
        if let Some(branch) = branch {
            self.check_branch(uri, branch).await?;
        }
        match version {
            Some(v) => match self.catalog.at_version(uri, branch, v).await {
                Ok(dataset) => Ok(dataset.as_ref().clone()),
                Err(err) => match Error::from_lance(err, "field 'read_version'") {
                    Error::Internal(_) | Error::NotFound { .. } => Err(Error::not_found(
                        Missing::Version,
                        format!("field 'read_version': version {v} of the table does not exist"),
                    )),
                    other => Err(other),
                },
            },
            None => self
                .catalog
                .latest(uri, branch)
                .await
                .map_err(|err| Error::from_lance(err, "opening the table")),
        }
    }

    async fn check_branch(&self, uri: &str, branch: &str) -> Result<(), Error> {
        let main = self
            .catalog
            .latest(uri, None)
            .await
            .map_err(|err| Error::from_lance(err, "opening the table"))?;
        let branches = main
            .list_branches()
            .await
            .map_err(|err| Error::from_lance(err, "listing branches"))?;
        if !branches.contains_key(branch) {
            return Err(Error::not_found(
                Missing::Branch,
                format!("field 'branch': the table has no branch '{branch}'"),
            ));
        }
        Ok(())
    }
}

/// A job's tasks are queue messages and store records: their number is bounded.
fn check_task_count(fragments: &[PlannedFragment], params: &Params) -> Result<(), Error> {
    let tasks = plan::task_count(fragments, params.task_size);
    if tasks <= MAX_TASKS_PER_JOB {
        return Ok(());
    }
    if fragments.len() as u64 > MAX_TASKS_PER_JOB {
        return Err(Error::invalid_input(format!(
            "field 'num_frags': the table has {} fragments, more than the {MAX_TASKS_PER_JOB} \
             tasks a job may have; backfill it in parts with num_frags",
            fragments.len()
        )));
    }
    Err(Error::invalid_input(format!(
        "field 'task_size': the job would have {tasks} tasks, more than the limit of \
         {MAX_TASKS_PER_JOB}; raise task_size, or leave it unset (one task per fragment)"
    )))
}

/// A digest of what the request asks for, to tell a retry from a new request
/// under the same idempotency key: the typed spec (its defaults applied, so
/// a default written out is the same as one left out) and the fragments
/// chosen beside it.
fn fingerprint(submit: &SubmitRequest) -> String {
    let asked = serde_json::json!({
        "table": submit.table.key(),
        "spec": submit.spec,
        "skip": submit.skip_fragments,
        "from": submit.first_fragment_id,
        "refill": submit.refill_fragments,
        "refill_all": submit.refill_all,
    });
    let mut text = String::new();
    write_canonical(&asked, &mut text);
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// JSON with object keys sorted and null members left out.
fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut members: Vec<_> = map.iter().filter(|(_, v)| !v.is_null()).collect();
            members.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, member)) in members.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::from(key.as_str()).to_string());
                out.push(':');
                write_canonical(member, out);
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

fn new_job(submit: &SubmitRequest, planned: &Planned, params: Params, options: JobOptions) -> Job {
    let fragments = &planned.fragments;
    let tasks = plan::task_count(fragments, params.task_size);
    let rows: u64 = fragments.iter().map(|f| f.physical_rows).sum();
    let mut metrics = Metrics::default();
    metrics.set(Counter::FragmentsTotal, fragments.len() as i64);
    metrics.set(Counter::TasksTotal, tasks as i64);
    metrics.set(Counter::RowsTotal, rows as i64);
    metrics.set(
        Counter::CommitsPlanned,
        params.commits_expected(fragments.len() as u64) as i64,
    );
    let spec = JobSpec {
        table_id: submit.table.clone(),
        table_uri: planned.uri.clone(),
        branch: planned.branch.clone(),
        column: planned.program.column.clone(),
        expression: planned.program.expression.clone(),
        filter: planned.program.filter.clone(),
        read_version: planned.read_version,
        params,
        submitted_by: submit.submitted_by.clone(),
        udf: planned.program.udf().map(Binding::reference),
        options,
        skip_fragments: submit.skip_fragments.clone(),
        only_fragments: submit.only_fragments.clone(),
        ignored_fields: submit.ignored_fields.clone(),
        first_fragment_id: submit.first_fragment_id,
        maintained_through: submit.maintained_through,
        maintained_version: submit.maintained_version,
        refill_fragments: submit.refill_fragments.clone(),
        refill_all: submit.refill_all,
        on_behalf_of: submit.on_behalf_of.clone(),
        plan: PlanSummary {
            fragments: fragments.len() as u64,
            tasks,
            rows,
            fanned_out: false,
        },
    };
    Job::pending(spec, metrics)
}

/// The job's first event (with the fragments it leaves alone and the
/// request fields it ignored).
fn planned_event(job: &Job) -> String {
    let plan = &job.spec.plan;
    let mut event = format!(
        "planned {} tasks over {} fragments ({} rows) at version {}",
        plan.tasks, plan.fragments, plan.rows, job.spec.read_version
    );
    if !job.spec.skip_fragments.is_empty() {
        event.push_str(&format!(
            "; fragments left alone: {:?}",
            job.spec.skip_fragments
        ));
    }
    if !job.spec.ignored_fields.is_empty() {
        event.push_str(&format!(
            "; request fields ignored: {}",
            job.spec.ignored_fields.join(", ")
        ));
    }
    event
}

/// A job never reads an older version than the client has seen.
fn check_min_read_version(version: u64, floor: Option<u64>) -> Result<(), Error> {
    match floor {
        Some(floor) if version < floor => Err(Error::invalid_input(format!(
            "the job would read version {version}, older than version {floor} named by \
             x-lancedb-min-read-version"
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(json: serde_json::Value) -> SubmitRequest {
        let table = TableId(vec!["t".into()]);
        let request = serde_json::from_value(json).unwrap();
        let spec = BackfillSpec::parse(&table, &request).unwrap();
        SubmitRequest::new(table, spec, "p".into())
    }

    fn digest(json: serde_json::Value) -> String {
        fingerprint(&submit(json))
    }

    #[test]
    fn fingerprints_ignore_member_order_nulls_and_written_defaults() {
        let context: serde_json::Map<String, serde_json::Value> = (0..50)
            .map(|i| (format!("k{i}"), serde_json::json!(format!("v{i}"))))
            .collect();
        let reversed: serde_json::Map<String, serde_json::Value> = context
            .iter()
            .rev()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(
            digest(serde_json::json!({"column": "y", "context": context})),
            digest(serde_json::json!({"column": "y", "context": reversed}))
        );
        let plain = digest(serde_json::json!({"column": "y"}));
        assert_eq!(
            digest(serde_json::json!({"column": "y", "where": null})),
            plain
        );
        assert_eq!(
            digest(serde_json::json!({"column": "y", "concurrency": 8})),
            plain
        );
        assert_eq!(
            digest(serde_json::json!({"column": "y", "branch": "main"})),
            plain
        );
        for other in [
            serde_json::json!({"column": "y", "concurrency": 2}),
            serde_json::json!({"column": "z"}),
            serde_json::json!({"column": "y", "where": "x > 1"}),
            serde_json::json!({"column": "y", "context": {"on_error": "skip"}}),
            serde_json::json!({"column": "y", "commit_granularity": 64}),
        ] {
            assert_ne!(digest(other.clone()), plain, "{other}");
        }
        let mut skipping = submit(serde_json::json!({"column": "y"}));
        skipping.skip_fragments = vec![3];
        assert_ne!(fingerprint(&skipping), plain);
    }
}
