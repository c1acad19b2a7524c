//! The trigger function's events: which table an EventBridge event is about.
//! Two kinds reach it:
//! - S3 "Object Created" for a table's `_versions/` object (a new version:
//!   appended rows may need a maintained column's values);
//! - this service's own job events (a maintainer job ended: versions that
//!   arrived while it ran get their follow-up job).
//!
//! Either way the function runs [`crate::submit::maintain::Maintainer::maintain`]
//! on the table, which submits what is due, idempotently.

use serde_json::Value;

use crate::model::table::TableId;
use crate::ports::events::EVENT_SOURCE;

/// The table an event names, or `None` for an event that is not about a
/// table version or a job's end under `root` (`s3://bucket/prefix`).
pub fn table_of_event(root: &str, event: &Value) -> Option<TableId> {
    let detail = event.get("detail")?;
    match event.get("source").and_then(Value::as_str)? {
        "aws.s3" => {
            let bucket = detail.pointer("/bucket/name")?.as_str()?;
            let key = detail.pointer("/object/key")?.as_str()?;
            table_of_version_key(root, bucket, key)
        }
        EVENT_SOURCE => {
            let parts: Vec<String> = detail
                .get("table_id")?
                .as_array()?
                .iter()
                .map(|part| part.as_str().map(str::to_string))
                .collect::<Option<_>>()?;
            TableId::from_parts(parts, "table_id").ok()
        }
        _ => None,
    }
}

/// The tables an SQS event's records name (retries the maintainer
/// scheduled, [`crate::submit::maintain::Retry`]), each with its message id; `None`
/// when the event is not an SQS event. A record that names no table is
/// left out.
pub fn tables_of_queue_event(event: &Value) -> Option<Vec<(String, TableId)>> {
    let records = event.get("Records")?.as_array()?;
    if !records
        .iter()
        .all(|r| r.get("eventSource").and_then(Value::as_str) == Some("aws:sqs"))
    {
        return None;
    }
    Some(
        records
            .iter()
            .filter_map(|record| {
                let id = record.get("messageId")?.as_str()?.to_string();
                let body = record.get("body")?.as_str()?;
                let retry: crate::submit::maintain::Retry = serde_json::from_str(body).ok()?;
                let table = TableId::from_parts(retry.table_id, "table_id").ok()?;
                Some((id, table))
            })
            .collect(),
    )
}

/// `<prefix>/<name>.lance/_versions/<file>` in the root's bucket is a
/// version of the table `<name>`.
pub fn table_of_version_key(root: &str, bucket: &str, key: &str) -> Option<TableId> {
    let (root_bucket, prefix) = root
        .strip_prefix("s3://")?
        .split_once('/')
        .unwrap_or((root.strip_prefix("s3://")?, ""));
    if root_bucket != bucket {
        return None;
    }
    let prefix = prefix.trim_matches('/');
    let relative = if prefix.is_empty() {
        key
    } else {
        key.strip_prefix(prefix)?.strip_prefix('/')?
    };
    let (table, version_file) = relative.split_once(".lance/_versions/")?;
    if table.is_empty() || table.contains('/') || version_file.contains('/') {
        return None;
    }
    TableId::from_parts(vec![table.to_string()], "key").ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn version_objects_name_their_table() {
        let root = "s3://data/lance/ns";
        let table = |key: &str| table_of_version_key(root, "data", key).map(|t| t.0);
        assert_eq!(
            table("lance/ns/items.lance/_versions/18446744073709551613.manifest"),
            Some(vec!["items".to_string()])
        );
        assert_eq!(table("lance/ns/items.lance/data/abc.lance"), None);
        assert_eq!(table("lance/other/items.lance/_versions/1.manifest"), None);
        assert_eq!(table("lance/ns/a/items.lance/_versions/1.manifest"), None);
        assert_eq!(
            table_of_version_key(
                root,
                "elsewhere",
                "lance/ns/items.lance/_versions/1.manifest"
            ),
            None
        );
        assert_eq!(
            table_of_version_key("s3://data", "data", "t.lance/_versions/2.manifest").map(|t| t.0),
            Some(vec!["t".to_string()])
        );
    }

    #[test]
    fn retry_messages_name_their_tables() {
        let event = json!({"Records": [
            {"eventSource": "aws:sqs", "messageId": "m1", "body": "{\"table_id\": [\"ns\", \"t\"]}"},
            {"eventSource": "aws:sqs", "messageId": "m2", "body": "not json"}
        ]});
        let tables = tables_of_queue_event(&event).unwrap();
        assert_eq!(tables.len(), 1);
        assert_eq!(tables[0].0, "m1");
        assert_eq!(tables[0].1.0, vec!["ns".to_string(), "t".to_string()]);
        assert!(tables_of_queue_event(&json!({"source": "aws.s3"})).is_none());
    }

    #[test]
    fn events_of_s3_and_of_jobs() {
        let s3 = json!({"source": "aws.s3", "detail-type": "Object Created",
            "detail": {"bucket": {"name": "data"},
                       "object": {"key": "root/items.lance/_versions/5.manifest"}}});
        assert_eq!(
            table_of_event("s3://data/root", &s3).map(|t| t.0),
            Some(vec!["items".to_string()])
        );
        let job = json!({"source": EVENT_SOURCE, "detail-type": "Job DONE",
            "detail": {"table_id": ["ns", "items"], "change": "DONE"}});
        assert_eq!(
            table_of_event("s3://data/root", &job).map(|t| t.0),
            Some(vec!["ns".to_string(), "items".to_string()])
        );
        assert_eq!(
            table_of_event("s3://data/root", &json!({"source": "aws.ec2"})),
            None
        );
    }
}
