//! `POST /v1/table/{id}/backfill_column`: validate, plan, record the job,
//! queue its tasks, answer 202 with the job id.

use std::sync::Arc;

use http::StatusCode;
use lance::Dataset;
use lance_namespace_reqwest_client::models::{
    AlterTableBackfillColumnsRequest, AlterTableBackfillColumnsResponse,
};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::{ApiRequest, ApiResponse, Service};
use crate::auth::Principal;
use crate::computed::{Program, resolve_target};
use crate::error::ApiError;
use crate::job::{
    Counter, Job, JobEvent, JobSpec, JobState, Metrics, Params, PlanSummary, new_job_id,
    now_rfc3339,
};
use crate::plan::{self, Message, PlannedFragment};
use crate::queue::Outgoing;
use crate::store::{CreateOutcome, IdempotencyClaim};
use crate::table::{TableId, branch_name};

pub const DEFAULT_CONCURRENCY: u32 = 8;
pub const DEFAULT_INTRA_APPLIER_CONCURRENCY: u32 = 1;
pub const DEFAULT_CHECKPOINT_SIZE: u32 = 10_240;
pub const DEFAULT_FLUSH_INTERVAL_SECONDS: f64 = 10.0;
/// Batches computed at once inside one task; more only costs memory.
pub const MAX_INTRA_APPLIER_CONCURRENCY: u32 = 256;
pub const MAX_CONCURRENCY: u32 = 10_000;

fn at_least_one(value: Option<i32>, field: &str) -> Result<Option<u32>, ApiError> {
    match value {
        None => Ok(None),
        Some(v) if v >= 1 => Ok(Some(v as u32)),
        Some(v) => Err(ApiError::invalid_input(format!(
            "field '{field}' must be at least 1, got {v}"
        ))),
    }
}

/// The effective parameters of a request (everything but the commit
/// granularity default, which depends on the fragment count).
pub fn effective_params(
    request: &AlterTableBackfillColumnsRequest,
    fragments: u64,
) -> Result<Params, ApiError> {
    let concurrency =
        at_least_one(request.concurrency.flatten(), "concurrency")?.unwrap_or(DEFAULT_CONCURRENCY);
    if concurrency > MAX_CONCURRENCY {
        return Err(ApiError::invalid_input(format!(
            "field 'concurrency' must be at most {MAX_CONCURRENCY}, got {concurrency}"
        )));
    }
    let intra = at_least_one(
        request.intra_applier_concurrency.flatten(),
        "intra_applier_concurrency",
    )?
    .unwrap_or(DEFAULT_INTRA_APPLIER_CONCURRENCY);
    if intra > MAX_INTRA_APPLIER_CONCURRENCY {
        return Err(ApiError::invalid_input(format!(
            "field 'intra_applier_concurrency' must be at most {MAX_INTRA_APPLIER_CONCURRENCY}, got {intra}"
        )));
    }
    let task_size = request
        .task_size
        .flatten()
        .filter(|size| *size > 0)
        .map(|size| size as u64);
    let num_frags = at_least_one(request.num_frags.flatten(), "num_frags")?.map(u64::from);
    let checkpoint_size = at_least_one(request.checkpoint_size.flatten(), "checkpoint_size")?
        .unwrap_or(DEFAULT_CHECKPOINT_SIZE);
    let min = at_least_one(request.min_checkpoint_size.flatten(), "min_checkpoint_size")?;
    let max = at_least_one(request.max_checkpoint_size.flatten(), "max_checkpoint_size")?;
    let adaptive = min.is_some() || max.is_some();
    let min_checkpoint_size = min.unwrap_or(1);
    let max_checkpoint_size = max.unwrap_or(checkpoint_size.max(min_checkpoint_size));
    if min_checkpoint_size > max_checkpoint_size {
        return Err(ApiError::invalid_input(format!(
            "field 'min_checkpoint_size' ({min_checkpoint_size}) must not exceed 'max_checkpoint_size' ({max_checkpoint_size})"
        )));
    }
    let flush = request
        .batch_checkpoint_flush_interval_seconds
        .flatten()
        .unwrap_or(DEFAULT_FLUSH_INTERVAL_SECONDS);
    if !flush.is_finite() || flush < 0.0 {
        return Err(ApiError::invalid_input(format!(
            "field 'batch_checkpoint_flush_interval_seconds' must be 0 or more, got {flush}"
        )));
    }
    let commit_granularity =
        at_least_one(request.commit_granularity.flatten(), "commit_granularity")?
            .unwrap_or_else(|| plan::default_commit_granularity(fragments));
    let named = |value: &Option<Option<String>>, field: &str| -> Result<Option<String>, ApiError> {
        match value.clone().flatten() {
            Some(name) if name.trim().is_empty() => Err(ApiError::invalid_input(format!(
                "field '{field}' must not be empty"
            ))),
            other => Ok(other),
        }
    };
    Ok(Params {
        concurrency,
        intra_applier_concurrency: intra,
        task_size,
        num_frags,
        checkpoint_size,
        min_checkpoint_size,
        max_checkpoint_size,
        adaptive_checkpoint: adaptive,
        batch_checkpoint_flush_interval_seconds: flush,
        commit_granularity,
        cluster: named(&request.cluster, "cluster")?,
        manifest: named(&request.manifest, "manifest")?,
    })
}

/// A digest of what the request asks for, to tell a retry from a new request
/// under the same idempotency key.
fn fingerprint(table: &TableId, request: &AlterTableBackfillColumnsRequest) -> String {
    let mut canonical = request.clone();
    canonical.identity = None;
    canonical.id = None;
    let mut hasher = Sha256::new();
    hasher.update(table.key().as_bytes());
    hasher.update([0]);
    hasher.update(serde_json::to_vec(&canonical).unwrap_or_default());
    hex::encode(hasher.finalize())
}

impl Service {
    pub(super) async fn submit_backfill(
        &self,
        http: &ApiRequest,
        raw_id: &str,
    ) -> Result<ApiResponse, ApiError> {
        let table = http.table_id(raw_id)?;
        let request: AlterTableBackfillColumnsRequest = http.json()?;
        let principal = self
            .auth
            .authenticate(&http.headers, request.identity.as_deref())?;
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(ApiError::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        // Cheap checks first: nothing below needs the table.
        effective_params(&request, 0)?;
        let cluster = request.cluster.clone().flatten();
        let queue = self.queues.for_cluster(cluster.as_deref()).ok_or_else(|| {
            ApiError::invalid_input(format!(
                "field 'cluster': unknown cluster '{}' (known: default{})",
                cluster.clone().unwrap_or_default(),
                self.queues
                    .cluster_names()
                    .iter()
                    .map(|c| format!(", {c}"))
                    .collect::<String>()
            ))
        })?;
        if let Some(manifest) = request.manifest.clone().flatten()
            && !self.settings.manifests.contains(&manifest)
        {
            return Err(ApiError::invalid_input(format!(
                "field 'manifest': unknown manifest '{manifest}' (known: {})",
                if self.settings.manifests.is_empty() {
                    "none".to_string()
                } else {
                    self.settings.manifests.join(", ")
                }
            )));
        }
        let idempotency = http
            .header("idempotency-key")
            .map(str::trim)
            .filter(|key| !key.is_empty())
            .map(|key| IdempotencyClaim {
                key: crate::auth::sha256_hex(&format!("{}\n{key}", principal.subject)),
                fingerprint: fingerprint(&table, &request),
            });

        let uri = self.catalog.locate(&table).await?;
        let branch = request
            .branch
            .clone()
            .filter(|b| branch_name(Some(b)).is_some());
        let dataset = self
            .open_for_backfill(&uri, branch.as_deref(), request.read_version.flatten())
            .await?;
        let dataset = Arc::new(dataset);
        self.catalog.pin(&uri, branch.as_deref(), dataset.clone());
        let read_version = dataset.version().version;
        let target = resolve_target(dataset.schema(), &request.column)?;
        let filter = match request.r#where.clone().flatten() {
            Some(text) if text.trim().is_empty() => {
                return Err(ApiError::invalid_input("field 'where' must not be empty"));
            }
            other => other,
        };
        let program = Program::compile(dataset.schema(), &target, filter.as_deref())?;
        let fragments = plan::fragments(
            &dataset,
            request
                .num_frags
                .flatten()
                .filter(|n| *n > 0)
                .map(|n| n as u64),
        )
        .await
        .map_err(|err| ApiError::from_lance(err, "listing fragments"))?;
        let params = effective_params(&request, fragments.len() as u64)?;
        let mut job = new_job(
            &table,
            uri,
            branch,
            &program,
            read_version,
            params,
            &principal,
            &fragments,
        );
        job.spec.plan.fanned_out = job.spec.plan.tasks > self.settings.inline_plan_limit;

        match self
            .store
            .create_job(&job, idempotency.as_ref())
            .await
            .map_err(store_unavailable)?
        {
            CreateOutcome::Created => {}
            CreateOutcome::Replayed { job_id } => {
                info!(%job_id, "idempotent replay");
                self.requeue_if_stalled(&job_id, &queue).await?;
                return Ok(accepted(job_id));
            }
            CreateOutcome::IdempotencyMismatch { job_id } => {
                return Err(ApiError::conflict(format!(
                    "the Idempotency-Key was already used for a different request (job {job_id})"
                )));
            }
            CreateOutcome::ColumnBusy { job_id } => {
                return Err(ApiError::conflict(format!(
                    "column '{}' of table '{}' is already being backfilled by job {job_id}; wait for it or cancel it",
                    job.spec.column,
                    table.display()
                )));
            }
        }
        let job_id = job.job_id.clone();
        if fragments.is_empty() {
            self.store
                .transition(
                    &job_id,
                    JobState::Done,
                    Some("done: no fragment to fill"),
                    None,
                )
                .await
                .map_err(store_unavailable)?;
            return Ok(accepted(job_id));
        }
        let messages = if job.spec.plan.fanned_out {
            vec![Message::plan(&job_id, 0, fragments.len() as u64)]
        } else {
            plan::run_messages(&job.spec, &job_id, &fragments)
        };
        let outgoing = messages
            .iter()
            .map(|m| Outgoing::now(m.to_body()))
            .collect();
        if let Err(err) = queue.send_many(outgoing).await {
            let reason = format!("could not queue the job's tasks: {err:#}");
            warn!(%job_id, %reason);
            let _ = self
                .store
                .transition(
                    &job_id,
                    JobState::Failed,
                    Some(&format!("failed: {reason}")),
                    Some(&reason),
                )
                .await;
            return Err(ApiError::unavailable(format!(
                "{reason}; the job was marked FAILED, submit again"
            )));
        }
        info!(%job_id, table = %table.display(), column = %job.spec.column, tasks = job.spec.plan.tasks, "job accepted");
        Ok(accepted(job_id))
    }

    /// A submit that died between recording its job and queueing the tasks
    /// leaves a PENDING job with no work done; its retry (same
    /// Idempotency-Key) queues the tasks again, through one planning
    /// message. Tasks are idempotent, so a needless repeat costs only time.
    async fn requeue_if_stalled(
        &self,
        job_id: &str,
        queue: &std::sync::Arc<dyn crate::queue::TaskQueue>,
    ) -> Result<(), ApiError> {
        let Some(job) = self
            .store
            .get_job(job_id)
            .await
            .map_err(store_unavailable)?
        else {
            return Ok(());
        };
        let untouched =
            job.metrics.get(Counter::TasksDone) == 0 && job.metrics.get(Counter::RowsComputed) == 0;
        if job.state != JobState::Pending || !untouched || job.spec.plan.fragments == 0 {
            return Ok(());
        }
        let message = Message::plan(job_id, 0, job.spec.plan.fragments);
        queue
            .send_many(vec![Outgoing::now(message.to_body())])
            .await
            .map_err(|err| {
                ApiError::unavailable(format!("could not queue the job's tasks: {err:#}"))
            })
    }

    async fn open_for_backfill(
        &self,
        uri: &str,
        branch: Option<&str>,
        version: Option<i32>,
    ) -> Result<Dataset, ApiError> {
        if let Some(branch) = branch {
            let main = self
                .catalog
                .latest(uri, None)
                .await
                .map_err(|err| ApiError::from_lance(err, "opening the table"))?;
            let branches = main
                .list_branches()
                .await
                .map_err(|err| ApiError::from_lance(err, "listing branches"))?;
            if !branches.contains_key(branch) {
                return Err(ApiError::branch_not_found(format!(
                    "field 'branch': the table has no branch '{branch}'"
                )));
            }
        }
        match version {
            Some(v) if v < 1 => Err(ApiError::version_not_found(format!(
                "field 'read_version': version {v} does not exist (versions start at 1)"
            ))),
            Some(v) => match self.catalog.at_version(uri, branch, v as u64).await {
                Ok(dataset) => Ok(dataset.as_ref().clone()),
                Err(err) => {
                    let api = ApiError::from_lance(err, "field 'read_version'");
                    if api.status == StatusCode::INTERNAL_SERVER_ERROR
                        || api.status == StatusCode::NOT_FOUND
                    {
                        Err(ApiError::version_not_found(format!(
                            "field 'read_version': version {v} of the table does not exist"
                        )))
                    } else {
                        Err(api)
                    }
                }
            },
            None => self
                .catalog
                .latest(uri, branch)
                .await
                .map_err(|err| ApiError::from_lance(err, "opening the table")),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn new_job(
    table: &TableId,
    uri: String,
    branch: Option<String>,
    program: &Program,
    read_version: u64,
    params: Params,
    principal: &Principal,
    fragments: &[PlannedFragment],
) -> Job {
    let now = now_rfc3339();
    let tasks = plan::task_count(fragments, params.task_size);
    let rows: u64 = fragments.iter().map(|f| f.physical_rows).sum();
    let mut metrics = Metrics::default();
    metrics.set(Counter::FragmentsTotal, fragments.len() as i64);
    metrics.set(Counter::TasksTotal, tasks as i64);
    metrics.set(Counter::RowsTotal, rows as i64);
    metrics.set(
        Counter::CommitsPlanned,
        plan::commits_expected(fragments.len() as u64, &params) as i64,
    );
    Job {
        job_id: new_job_id(),
        spec: JobSpec {
            table_id: table.clone(),
            table_uri: uri,
            branch,
            column: program.column.clone(),
            expression: program.expression.clone(),
            filter: program.filter.clone(),
            read_version,
            params,
            submitted_by: principal.subject.clone(),
            plan: PlanSummary {
                fragments: fragments.len() as u64,
                tasks,
                rows,
                fanned_out: false,
            },
        },
        state: JobState::Pending,
        created_at: now.clone(),
        updated_at: now.clone(),
        started_at: None,
        finished_at: None,
        error: None,
        metrics,
        events: vec![JobEvent {
            at: now,
            message: format!(
                "planned {tasks} tasks over {} fragments ({rows} rows) at version {read_version}",
                fragments.len()
            ),
        }],
    }
}

fn accepted(job_id: String) -> ApiResponse {
    ApiResponse::json(
        StatusCode::ACCEPTED,
        &AlterTableBackfillColumnsResponse::new(job_id),
    )
}

pub(super) fn store_unavailable(err: anyhow::Error) -> ApiError {
    warn!(error = %format!("{err:#}"), "job store call failed");
    ApiError::unavailable("the job store is not reachable; retry shortly")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> AlterTableBackfillColumnsRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn defaults() {
        let params = effective_params(&request(serde_json::json!({"column": "c"})), 100).unwrap();
        assert_eq!(params.concurrency, 8);
        assert_eq!(params.intra_applier_concurrency, 1);
        assert_eq!(params.task_size, None);
        assert_eq!(params.checkpoint_size, 10_240);
        assert!(!params.adaptive_checkpoint);
        assert_eq!(params.batch_checkpoint_flush_interval_seconds, 10.0);
        assert_eq!(params.commit_granularity, 64);
        let params =
            effective_params(&request(serde_json::json!({"column": "c"})), 10_000).unwrap();
        assert_eq!(params.commit_granularity, 500);
    }

    #[test]
    fn adaptive_bounds() {
        let params = effective_params(
            &request(serde_json::json!({"column": "c", "min_checkpoint_size": 100})),
            1,
        )
        .unwrap();
        assert!(params.adaptive_checkpoint);
        assert_eq!(
            (params.min_checkpoint_size, params.max_checkpoint_size),
            (100, 10_240)
        );
        let err = effective_params(
            &request(serde_json::json!({"column": "c", "min_checkpoint_size": 10, "max_checkpoint_size": 5})),
            1,
        )
        .unwrap_err();
        assert!(err.message.contains("min_checkpoint_size"));
    }

    #[test]
    fn bad_values_name_their_field() {
        for (field, value) in [
            ("concurrency", serde_json::json!(0)),
            ("intra_applier_concurrency", serde_json::json!(-1)),
            ("num_frags", serde_json::json!(0)),
            ("checkpoint_size", serde_json::json!(0)),
            ("min_checkpoint_size", serde_json::json!(0)),
            ("max_checkpoint_size", serde_json::json!(0)),
            (
                "batch_checkpoint_flush_interval_seconds",
                serde_json::json!(-0.5),
            ),
            ("commit_granularity", serde_json::json!(0)),
            ("cluster", serde_json::json!(" ")),
        ] {
            let mut body = serde_json::json!({"column": "c"});
            body[field] = value;
            let err = effective_params(&request(body), 1).unwrap_err();
            assert_eq!(err.status, 400, "{field}");
            assert!(err.message.contains(field), "{field}: {}", err.message);
        }
        // task_size 0 or less means whole fragments.
        let params = effective_params(
            &request(serde_json::json!({"column": "c", "task_size": -5})),
            1,
        )
        .unwrap();
        assert_eq!(params.task_size, None);
        let params = effective_params(
            &request(
                serde_json::json!({"column": "c", "batch_checkpoint_flush_interval_seconds": 0}),
            ),
            1,
        )
        .unwrap();
        assert_eq!(params.batch_checkpoint_flush_interval_seconds, 0.0);
    }
}
