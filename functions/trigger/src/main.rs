//! The trigger Lambda function: an EventBridge event in (a table's new
//! `_versions/` object, or a job's end), or an SQS batch of scheduled
//! retries of maintained columns; the jobs it submitted out.

use lambda_runtime::{Error, LambdaEvent, service_fn};
use lance_backfill::app::{bootstrap, config, telemetry};
use lance_backfill::submit::maintain::Maintainer;
use lance_backfill::submit::trigger::{table_of_event, tables_of_queue_event};
use serde_json::{Value, json};
use tracing::{info, warn};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let root = config::root()?;
    let (_components, maintainer) = bootstrap::aws_trigger(&root).await?;
    lambda_runtime::run(service_fn(|event: LambdaEvent<Value>| {
        handle(&maintainer, &root, event.payload)
    }))
    .await
}

/// Maintains the table the event names; other events are acknowledged.
/// A failure is returned, so EventBridge retries the event (an SQS batch
/// reports the records that failed).
async fn handle(maintainer: &Maintainer, root: &str, event: Value) -> Result<Value, Error> {
    if let Some(tables) = tables_of_queue_event(&event) {
        let mut failures = Vec::new();
        for (message_id, table) in tables {
            if let Err(err) = maintainer.maintain(&table).await {
                warn!(table = %table.display(), error = %err, "scheduled retry failed");
                failures.push(json!({"itemIdentifier": message_id}));
            }
        }
        return Ok(json!({"batchItemFailures": failures}));
    }
    let Some(table) = table_of_event(root, &event) else {
        info!("event names no table version or job of this root: ignored");
        return Ok(json!({"table": null, "jobs": []}));
    };
    let jobs = maintainer.maintain(&table).await?;
    Ok(json!({"table": table.display(), "jobs": jobs}))
}
