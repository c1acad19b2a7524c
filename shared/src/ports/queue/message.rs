//! The queue's message format: what a worker is asked to do. Every message
//! that goes on a queue is one of these, made into an [`Outgoing`] by
//! [`Outgoing::message`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Outgoing;
use crate::model::plan::{PACK_FRAGMENTS, Pack, TaskRef, Work};

/// A queue message. Versioned so a newer worker can refuse an older format
/// loudly instead of misreading it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Message {
    /// Fan out the tasks of fragments `[first, first + count)` (positions in
    /// table order at the read version).
    Plan {
        v: u32,
        job_id: String,
        first: u64,
        count: u64,
    },
    /// Run one task.
    Run {
        v: u32,
        job_id: String,
        task: TaskRef,
    },
    /// Fill several small fragments, each whole.
    RunPack { v: u32, job_id: String, pack: Pack },
    /// Remove what a stopped job left behind (staged files).
    Cleanup { v: u32, job_id: String },
}

pub const MESSAGE_VERSION: u32 = 1;

impl Message {
    pub fn run(job_id: &str, task: TaskRef) -> Self {
        Self::Run {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
            task,
        }
    }

    /// The message of a planned task.
    pub fn work(job_id: &str, work: Work) -> Self {
        match work {
            Work::Range(task) => Self::run(job_id, task),
            Work::Pack(pack) => Self::RunPack {
                v: MESSAGE_VERSION,
                job_id: job_id.to_string(),
                pack,
            },
        }
    }

    pub fn plan(job_id: &str, first: u64, count: u64) -> Self {
        Self::Plan {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
            first,
            count,
        }
    }

    pub fn cleanup(job_id: &str) -> Self {
        Self::Cleanup {
            v: MESSAGE_VERSION,
            job_id: job_id.to_string(),
        }
    }

    pub fn job_id(&self) -> &str {
        match self {
            Self::Plan { job_id, .. }
            | Self::Run { job_id, .. }
            | Self::RunPack { job_id, .. }
            | Self::Cleanup { job_id, .. } => job_id,
        }
    }

    pub fn version(&self) -> u32 {
        match self {
            Self::Plan { v, .. }
            | Self::Run { v, .. }
            | Self::RunPack { v, .. }
            | Self::Cleanup { v, .. } => *v,
        }
    }

    fn to_body(&self) -> String {
        // A message is plain data (strings and integers): it always serialises.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses a message body; the error says what is wrong with it.
    pub fn parse(body: &str) -> Result<Self, String> {
        let message: Message =
            serde_json::from_str(body).map_err(|err| format!("malformed task message: {err}"))?;
        if message.version() != MESSAGE_VERSION {
            return Err(format!(
                "task message version {} is not supported (expected {MESSAGE_VERSION})",
                message.version()
            ));
        }
        if let Message::Run { task, .. } = &message
            && (task.start >= task.end
                || task.end > task.fragment_rows
                || task.task >= task.tasks_in_fragment.max(1))
        {
            return Err(format!("task message has an invalid row range: {task:?}"));
        }
        if let Message::RunPack { pack, .. } = &message {
            check_pack(pack)?;
        }
        Ok(message)
    }
}

/// A pack names 2 to [`PACK_FRAGMENTS`] distinct fragments, none empty.
fn check_pack(pack: &Pack) -> Result<(), String> {
    let count = pack.fragments.len();
    if !(2..=PACK_FRAGMENTS).contains(&count) {
        return Err(format!(
            "pack message has {count} fragments; a pack has 2 to {PACK_FRAGMENTS}"
        ));
    }
    let mut ids = pack.ids();
    ids.sort_unstable();
    ids.dedup();
    if ids.len() != count || pack.fragments.iter().any(|f| f.physical_rows == 0) {
        return Err("pack message names a fragment twice or an empty one".to_string());
    }
    Ok(())
}

impl Outgoing {
    /// A message to deliver at once.
    pub fn message(message: &Message) -> Self {
        Self::delayed(message, Duration::ZERO)
    }

    /// A message to deliver after `delay` (SQS caps delays at 15 minutes).
    pub fn delayed(message: &Message, delay: Duration) -> Self {
        Self {
            body: message.to_body(),
            delay,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_ones_are_named() {
        let task = TaskRef {
            fragment_id: 1,
            task: 0,
            tasks_in_fragment: 1,
            start: 0,
            end: 5,
            fragment_rows: 5,
            at: Default::default(),
        };
        let message = Message::run("j", task);
        assert_eq!(Message::parse(&message.to_body()).unwrap(), message);
        assert!(Message::parse("{").unwrap_err().contains("malformed"));
        assert!(Message::parse(r#"{"kind":"run","v":9,"job_id":"j","task":{"fragment_id":1,"task":0,"tasks_in_fragment":1,"start":0,"end":5,"fragment_rows":5}}"#).unwrap_err().contains("version"));
        assert!(Message::parse(r#"{"kind":"run","v":1,"job_id":"j","task":{"fragment_id":1,"task":0,"tasks_in_fragment":1,"start":5,"end":5,"fragment_rows":5}}"#).unwrap_err().contains("range"));
    }

    #[test]
    fn pack_messages_round_trip_and_bad_packs_are_refused() {
        let pack = |ids: &[u64]| Pack {
            fragments: ids
                .iter()
                .map(|id| crate::model::plan::PlannedFragment {
                    id: *id,
                    physical_rows: 10,
                    at: Default::default(),
                })
                .collect(),
        };
        let message = Message::work("j", Work::Pack(pack(&[1, 2, 3])));
        assert_eq!(Message::parse(&message.to_body()).unwrap(), message);
        let body = |p: Pack| Message::work("j", Work::Pack(p)).to_body();
        assert!(
            Message::parse(&body(pack(&[1])))
                .unwrap_err()
                .contains("2 to")
        );
        assert!(
            Message::parse(&body(pack(&[1, 1])))
                .unwrap_err()
                .contains("twice")
        );
        let too_many: Vec<u64> = (0..=PACK_FRAGMENTS as u64).collect();
        assert!(Message::parse(&body(pack(&too_many))).is_err());
    }
}
