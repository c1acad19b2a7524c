//! Job events on AWS: one EventBridge event per change, on the bus the
//! stack names (`LANCE_BACKFILL_EVENT_BUS`), `source` `lance-backfill`,
//! `detail-type` `Job <CHANGE>`, the [`JobNotice`] as `detail`.

use async_trait::async_trait;
use aws_sdk_eventbridge::types::PutEventsRequestEntry;
use tracing::warn;

use crate::ports::events::{EVENT_SOURCE, EventSink, JobNotice};

pub struct EventBridgeSink {
    client: aws_sdk_eventbridge::Client,
    bus: String,
}

impl EventBridgeSink {
    pub fn new(client: aws_sdk_eventbridge::Client, bus: impl Into<String>) -> Self {
        Self {
            client,
            bus: bus.into(),
        }
    }
}

/// The `detail-type` of a change: rules match on it.
pub fn detail_type(notice: &JobNotice) -> String {
    format!("Job {}", notice.change.as_str())
}

#[async_trait]
impl EventSink for EventBridgeSink {
    /// One PutEvents call (the SDK retries throttling and 5xx); a failure is
    /// logged, never the job's.
    async fn publish(&self, notice: &JobNotice) {
        let Ok(detail) = serde_json::to_string(notice) else {
            return;
        };
        let entry = PutEventsRequestEntry::builder()
            .source(EVENT_SOURCE)
            .detail_type(detail_type(notice))
            .detail(detail)
            .event_bus_name(&self.bus)
            .build();
        let sent = self.client.put_events().entries(entry).send().await;
        let failure = match sent {
            Ok(output) if output.failed_entry_count() == 0 => return,
            Ok(output) => output
                .entries()
                .iter()
                .filter_map(|e| e.error_message())
                .collect::<Vec<_>>()
                .join("; "),
            Err(err) => format!("{}", aws_sdk_eventbridge::error::DisplayErrorContext(err)),
        };
        warn!(job_id = %notice.job_id, change = notice.change.as_str(), bus = %self.bus, %failure, "could not publish a job event");
    }
}
