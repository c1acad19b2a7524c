//! Whether a delivered task runs at all (its job's state), and when a
//! running task stops early: its invocation's deadline is near (checkpoint
//! and requeue the rest), its job was paused (checkpoint and wait in the
//! queue), or its job ended (leave).

use std::time::{Duration, Instant};

use tracing::warn;

use super::{Disposition, Engine};
use crate::model::job::{Job, JobState};
use crate::model::plan::PlannedFragment;

/// How often a running task looks at the job's state (cancel, pause).
pub const STATE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Why a running task stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    Deadline,
    Paused,
    Cancelled,
}

/// Looks at the deadline every batch and at the job's state every second.
pub(super) struct StopCheck<'a> {
    engine: &'a Engine,
    job_id: &'a str,
    deadline: Option<Instant>,
    next_state_check: Instant,
}

impl<'a> StopCheck<'a> {
    pub(super) fn new(engine: &'a Engine, job_id: &'a str, deadline: Option<Instant>) -> Self {
        Self {
            engine,
            job_id,
            deadline,
            next_state_check: Instant::now() + STATE_CHECK_INTERVAL,
        }
    }

    pub(super) async fn check(&mut self) -> anyhow::Result<Option<Stop>> {
        let now = Instant::now();
        if let Some(deadline) = self.deadline
            && now + self.engine.config.deadline_margin >= deadline
        {
            return Ok(Some(Stop::Deadline));
        }
        if now >= self.next_state_check {
            self.next_state_check = now + STATE_CHECK_INTERVAL;
            let state = self
                .engine
                .store
                .get_job(self.job_id)
                .await?
                .map(|j| j.state);
            if state.is_none_or(JobState::is_terminal) {
                return Ok(Some(Stop::Cancelled));
            }
            if state == Some(JobState::Paused) {
                return Ok(Some(Stop::Paused));
            }
        }
        Ok(None)
    }
}

/// What a delivered task's job says about running it.
pub(super) enum Admission {
    /// The job is PENDING or RUNNING: run the task.
    Run(Job),
    /// The job is DONE: the task has nothing to do but forget what an
    /// earlier delivery of it left behind.
    Finished(Job),
    /// The job is gone, ended otherwise, or paused: the delivery ends so.
    Ends(Disposition),
}

impl Engine {
    /// Reads the task's job and says whether the task runs.
    pub(super) async fn admit(&self, job_id: &str) -> anyhow::Result<Admission> {
        let Some(job) = self.store.get_job(job_id).await? else {
            return Ok(Admission::Ends(Disposition::Poison {
                reason: format!("job {job_id} does not exist"),
            }));
        };
        Ok(match job.state {
            JobState::Done => Admission::Finished(job),
            state if state.is_terminal() => Admission::Ends(Disposition::Done),
            JobState::Paused => Admission::Ends(self.while_paused()),
            _ => Admission::Run(job),
        })
    }

    /// A task of a paused job waits in the queue, spending no receive, and
    /// looks again after [`super::EngineConfig::paused_delay`].
    pub(super) fn while_paused(&self) -> Disposition {
        Disposition::Requeue {
            delay: self.config.paused_delay,
        }
    }

    /// What becomes of a task that stopped early: near its deadline it goes
    /// back to the queue at once (its progress is checkpointed), paused it
    /// waits there; when its
    /// job ended it is done, and leaves nothing behind if the job is DONE
    /// (if the job cannot be read, it comes back to look again).
    pub(super) async fn stopped(
        &self,
        job_id: &str,
        fragment: &PlannedFragment,
        stop: Stop,
    ) -> Disposition {
        match stop {
            Stop::Deadline => Disposition::Requeue {
                delay: Duration::ZERO,
            },
            Stop::Paused => self.while_paused(),
            Stop::Cancelled => {
                match self.store.get_job(job_id).await {
                    Ok(Some(job)) if job.state == JobState::Done => {
                        self.forget_checkpoints(&job, fragment).await
                    }
                    Ok(_) => {}
                    // The task may have checkpointed after the job's final
                    // sweep: its next delivery finds the job ended and
                    // removes what it left, where deleting it now would not.
                    Err(err) => {
                        warn!(job_id, error = %format!("{err:#}"), "could not read the job");
                        return Disposition::Retry {
                            after: STATE_CHECK_INTERVAL,
                            reason: format!("reading the job after it ended: {err:#}"),
                        };
                    }
                }
                Disposition::Done
            }
        }
    }
}
