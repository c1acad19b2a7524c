//! Fan-out: a big job's API answers after queueing one planning message; a
//! worker then queues the tasks of the fragments it names.

use tracing::info;

use super::{Disposition, permanent};
use crate::model::plan;
use crate::model::table::Catalog;
use crate::ports::queue::{Message, Outgoing, QueueSet};
use crate::ports::store::JobStore;

/// Queues the tasks of the job's fragments `first..first + count`, as its
/// planning message asks.
pub(super) async fn fan_out(
    store: &dyn JobStore,
    catalog: &Catalog,
    queues: &QueueSet,
    job_id: &str,
    (first, count): (u64, u64),
) -> anyhow::Result<Disposition> {
    let Some(job) = store.get_job(job_id).await? else {
        return Ok(Disposition::Poison {
            reason: format!("job {job_id} does not exist"),
        });
    };
    if job.state.is_terminal() {
        return Ok(Disposition::Done);
    }
    let dataset = job.spec.read_dataset(catalog).await?;
    let fragments = plan::fragments(&dataset, job.spec.selection()).await?;
    let slice = plan::fragment_slice(&fragments, first, count);
    let messages: Vec<Outgoing> = plan::tasks(slice, job.spec.params.task_size)
        .into_iter()
        .map(|work| Outgoing::message(&Message::work(job_id, work)))
        .collect();
    let cluster = job.spec.params.cluster.as_deref();
    let queue = queues
        .for_cluster(cluster)
        .ok_or_else(|| permanent(format!("cluster {cluster:?} has no queue")))?;
    let sent = messages.len();
    queue.send_many(messages).await?;
    info!(tasks = sent, "fanned out");
    store
        .add_event(
            job_id,
            &format!(
                "queued {sent} tasks for fragments {first}..{}",
                first + slice.len() as u64
            ),
        )
        .await?;
    Ok(Disposition::Done)
}
