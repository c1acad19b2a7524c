//! A [`JobStore`] that publishes every job state change it records: the
//! creation (SUBMITTED) and each transition, after the store took it. One
//! seam for the API, the engine and the lifecycle alike.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tracing::warn;

use super::{JobChange, JobNotice, Publisher};
use crate::job::{Job, JobEvent, JobState, Metrics, MetricsDelta, published_version};
use crate::store::{
    ColumnWatermark, CreateOutcome, FragmentRecord, FragmentStatus, IdempotencyClaim, JobPage,
    JobStore, PlanChange, PlanChanged, Replanned, Resolution, RowFailure, StagedFragment,
    StoreResult, TaskMark,
};

/// Events read to find a DONE job's published version (its last commit's).
const EVENTS_READ: usize = 100;

pub struct PublishingStore {
    inner: Arc<dyn JobStore>,
    publisher: Publisher,
}

impl PublishingStore {
    /// `inner` itself when there is nothing to publish to.
    pub fn wrap(inner: Arc<dyn JobStore>, publisher: Publisher) -> Arc<dyn JobStore> {
        if publisher.is_empty() {
            return inner;
        }
        Arc::new(Self { inner, publisher })
    }

    /// Publishes the job's move to `to`, read back after the change.
    async fn publish_transition(&self, job_id: &str, from: JobState, to: JobState) {
        let job = match self.inner.get_job(job_id).await {
            Ok(Some(job)) => job,
            Ok(None) => return,
            Err(err) => {
                warn!(%job_id, error = %err, "could not read the job to publish its change");
                return;
            }
        };
        let published = match to {
            JobState::Done => match self.inner.list_events(job_id, EVENTS_READ).await {
                Ok(events) => published_version(&events),
                Err(err) => {
                    warn!(%job_id, error = %err, "could not read the job's events");
                    None
                }
            },
            _ => None,
        };
        let notice = JobNotice::new(JobChange::of_move(from, to), &job, published);
        self.publisher.publish(&notice).await;
    }
}

#[async_trait]
impl JobStore for PublishingStore {
    async fn create_job(
        &self,
        job: &Job,
        event: &str,
        idempotency: Option<&IdempotencyClaim>,
    ) -> StoreResult<CreateOutcome> {
        let outcome = self.inner.create_job(job, event, idempotency).await?;
        if outcome == CreateOutcome::Created {
            let notice = JobNotice::new(JobChange::Submitted, job, None);
            self.publisher.publish(&notice).await;
        }
        Ok(outcome)
    }

    async fn transition(
        &self,
        job_id: &str,
        to: JobState,
        event: Option<&str>,
        error: Option<&str>,
    ) -> StoreResult<Option<JobState>> {
        let moved = self.inner.transition(job_id, to, event, error).await?;
        if let Some(from) = moved {
            self.publish_transition(job_id, from, to).await;
        }
        Ok(moved)
    }

    async fn release_idempotency(&self, key: &str, job_id: &str) -> StoreResult<()> {
        self.inner.release_idempotency(key, job_id).await
    }

    async fn get_job(&self, job_id: &str) -> StoreResult<Option<Job>> {
        self.inner.get_job(job_id).await
    }

    async fn list_jobs(
        &self,
        table_key: &str,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.inner.list_jobs(table_key, limit, page_token).await
    }

    async fn list_recent_jobs(
        &self,
        limit: usize,
        page_token: Option<&str>,
    ) -> StoreResult<JobPage> {
        self.inner.list_recent_jobs(limit, page_token).await
    }

    async fn add_event(&self, job_id: &str, message: &str) -> StoreResult<()> {
        self.inner.add_event(job_id, message).await
    }

    async fn list_events(&self, job_id: &str, limit: usize) -> StoreResult<Vec<JobEvent>> {
        self.inner.list_events(job_id, limit).await
    }

    async fn add_row_failures(&self, job_id: &str, failures: &[RowFailure]) -> StoreResult<()> {
        self.inner.add_row_failures(job_id, failures).await
    }

    async fn list_row_failures(&self, job_id: &str, limit: usize) -> StoreResult<Vec<RowFailure>> {
        self.inner.list_row_failures(job_id, limit).await
    }

    async fn add_metrics(&self, job_id: &str, delta: &MetricsDelta) -> StoreResult<Metrics> {
        self.inner.add_metrics(job_id, delta).await
    }

    async fn get_fragment(&self, job_id: &str, fragment_id: u64) -> StoreResult<FragmentRecord> {
        self.inner.get_fragment(job_id, fragment_id).await
    }

    async fn mark_task_done(
        &self,
        job_id: &str,
        fragment_id: u64,
        task: u32,
        delta: &MetricsDelta,
    ) -> StoreResult<TaskMark> {
        self.inner
            .mark_task_done(job_id, fragment_id, task, delta)
            .await
    }

    async fn resolve_fragments(
        &self,
        job_id: &str,
        resolutions: &[Resolution],
        delta: &MetricsDelta,
    ) -> StoreResult<Vec<u64>> {
        self.inner
            .resolve_fragments(job_id, resolutions, delta)
            .await
    }

    async fn resolved_fragments(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashSet<u64>> {
        self.inner.resolved_fragments(job_id, fragment_ids).await
    }

    async fn fragment_statuses(
        &self,
        job_id: &str,
        fragment_ids: &[u64],
    ) -> StoreResult<HashMap<u64, FragmentStatus>> {
        self.inner.fragment_statuses(job_id, fragment_ids).await
    }

    async fn change_plan(&self, job_id: &str, change: &PlanChange) -> StoreResult<PlanChanged> {
        self.inner.change_plan(job_id, change).await
    }

    async fn replanned_fragments(&self, job_id: &str) -> StoreResult<Vec<Replanned>> {
        self.inner.replanned_fragments(job_id).await
    }

    async fn staged_fragments(&self, job_id: &str) -> StoreResult<Vec<StagedFragment>> {
        self.inner.staged_fragments(job_id).await
    }

    async fn mark_committed(&self, job_id: &str, fragments: &[StagedFragment]) -> StoreResult<()> {
        self.inner.mark_committed(job_id, fragments).await
    }

    async fn begin_commit(
        &self,
        job_id: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<Option<i64>> {
        self.inner.begin_commit(job_id, owner, ttl).await
    }

    async fn record_commit(
        &self,
        job_id: &str,
        fragments: &[StagedFragment],
        event: &str,
        owner: &str,
    ) -> StoreResult<()> {
        self.inner
            .record_commit(job_id, fragments, event, owner)
            .await
    }

    async fn end_commit(&self, job_id: &str, owner: &str) -> StoreResult<()> {
        self.inner.end_commit(job_id, owner).await
    }

    async fn watermark(
        &self,
        table_key: &str,
        column: &str,
    ) -> StoreResult<(ColumnWatermark, u64)> {
        self.inner.watermark(table_key, column).await
    }

    async fn set_watermark(
        &self,
        table_key: &str,
        column: &str,
        watermark: &ColumnWatermark,
        revision: u64,
    ) -> StoreResult<bool> {
        self.inner
            .set_watermark(table_key, column, watermark, revision)
            .await
    }

    async fn try_lease(
        &self,
        job_id: &str,
        name: &str,
        owner: &str,
        ttl: Duration,
    ) -> StoreResult<bool> {
        self.inner.try_lease(job_id, name, owner, ttl).await
    }

    async fn release_lease(&self, job_id: &str, name: &str, owner: &str) -> StoreResult<()> {
        self.inner.release_lease(job_id, name, owner).await
    }
}
