//! Job changes as CloudWatch metrics: one line of the Embedded Metric
//! Format per change on the function's standard output, which Lambda's log
//! agent turns into the metrics `JobChanges` (by `Change`: SUBMITTED,
//! RUNNING, PAUSED, DONE, FAILED, CANCELLED), `RowsCommitted` and
//! `RowsFailed` (at a job's end) in the namespace [`METRICS_NAMESPACE`],
//! for the stack's dashboard and alarms. No API call, no cost per change.

use async_trait::async_trait;
use serde_json::{Value, json};

use crate::ports::events::{EventSink, JobChange, JobNotice};

pub const METRICS_NAMESPACE: &str = "LanceBackfill";

/// Writes each change as an EMF line; `stack` is the `Stack` dimension,
/// so several deployments in one account keep their own figures.
pub struct MetricsSink {
    stack: String,
}

impl MetricsSink {
    pub fn new(stack: impl Into<String>) -> Self {
        Self {
            stack: stack.into(),
        }
    }

    pub fn line(&self, notice: &JobNotice) -> Value {
        let ended = matches!(
            notice.change,
            JobChange::Done | JobChange::Failed | JobChange::Cancelled
        );
        let mut metrics = vec![json!({"Name": "JobChanges", "Unit": "Count"})];
        if ended {
            metrics.push(json!({"Name": "RowsCommitted", "Unit": "Count"}));
            metrics.push(json!({"Name": "RowsFailed", "Unit": "Count"}));
        }
        let mut line = json!({
            "_aws": {
                "Timestamp": crate::model::job::now_millis(),
                "CloudWatchMetrics": [{
                    "Namespace": METRICS_NAMESPACE,
                    "Dimensions": [["Stack", "Change"]],
                    "Metrics": metrics,
                }],
            },
            "Stack": self.stack,
            "Change": notice.change.as_str(),
            "JobChanges": 1,
            "job_id": notice.job_id,
            "table": notice.table,
        });
        if ended {
            line["RowsCommitted"] = json!(notice.rows_committed);
            line["RowsFailed"] = json!(notice.rows_failed);
        }
        line
    }
}

#[async_trait]
impl EventSink for MetricsSink {
    async fn publish(&self, notice: &JobNotice) {
        println!("{}", self.line(notice));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn notice(change: JobChange) -> JobNotice {
        JobNotice {
            change,
            job_id: "j".into(),
            table: "items".into(),
            table_id: vec!["items".into()],
            column: "y".into(),
            columns: vec!["y".into()],
            submitted_by: "alice".into(),
            read_version: 2,
            published_version: Some(3),
            fragments_total: 4,
            fragments_committed: 4,
            rows_total: 1000,
            rows_committed: 990,
            rows_failed: 10,
            error: None,
            at: String::new(),
        }
    }

    #[test]
    fn a_change_is_one_metric_and_an_end_counts_its_rows() {
        let sink = MetricsSink::new("prod");
        let done = sink.line(&notice(JobChange::Done));
        let declared = &done["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(declared["Namespace"], "LanceBackfill");
        assert_eq!(declared["Dimensions"], json!([["Stack", "Change"]]));
        let names: Vec<&str> = declared["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["JobChanges", "RowsCommitted", "RowsFailed"]);
        // Every declared metric and dimension has its value in the line.
        for key in names.iter().chain(&["Stack", "Change"]) {
            assert!(!done[*key].is_null(), "{key} missing from {done}");
        }
        assert_eq!(
            (done["Change"].as_str(), done["RowsCommitted"].as_u64()),
            (Some("DONE"), Some(990))
        );
        let running = sink.line(&notice(JobChange::Running));
        assert_eq!(
            running["_aws"]["CloudWatchMetrics"][0]["Metrics"]
                .as_array()
                .unwrap()
                .len(),
            1
        );
        assert!(running["RowsCommitted"].is_null());
    }
}
