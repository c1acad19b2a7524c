//! What a backfill asks for, typed: the column, the rows (`where`), the
//! table version and branch, the parameters with their defaults applied
//! and the options of its `context`. Read once at the edge from the wire
//! request (`AlterTableBackfillColumnsRequest`), built directly by the
//! maintainer and the declaration's `auto_backfill`.

use std::collections::HashMap;
use std::sync::OnceLock;

use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;
use serde::{Deserialize, Serialize};

use super::{JobOptions, RequestedParams, flag, function_ms_per_1k_rows};
use crate::model::error::{Error, Missing};
use crate::model::table::{TableId, branch_name};

/// `context` key naming a job whose skipped rows a new job computes again.
pub const RETRY_FAILED_OF: &str = "retry_failed_of";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BackfillSpec {
    pub column: String,
    /// The request's `where` (`None`: the rows whose value is missing).
    pub filter: Option<String>,
    /// The branch to read and commit to (`None`: main).
    pub branch: Option<String>,
    /// The version to read (`None`: the latest).
    pub read_version: Option<u64>,
    pub params: RequestedParams,
    pub options: JobOptions,
    /// Plan only: answer what the job would do, record nothing.
    pub dry_run: bool,
    /// The caller's figure for a Python function's time per 1,000 rows
    /// (`context.function_ms_per_1k_rows`), for the job's estimate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function_ms_per_1k_rows: Option<f64>,
    /// Compute again the rows this ended job of the column skipped.
    pub retry_failed_of: Option<String>,
}

impl BackfillSpec {
    /// A backfill of `column` with every default: the latest version of
    /// main, the rows whose value is missing.
    pub fn of_column(column: impl Into<String>) -> Self {
        Self {
            column: column.into(),
            filter: None,
            branch: None,
            read_version: None,
            params: RequestedParams::default(),
            options: JobOptions::default(),
            dry_run: false,
            function_ms_per_1k_rows: None,
            retry_failed_of: None,
        }
    }

    /// Reads and checks a request for `table` (the table in the path): an
    /// invalid field is an error naming it, before the table is opened.
    pub fn parse(
        table: &TableId,
        request: &AlterTableBackfillColumnsRequest,
    ) -> Result<Self, Error> {
        if let Some(body_id) = &request.id
            && body_id != &table.0
        {
            return Err(Error::invalid_input(format!(
                "field 'id' ({body_id:?}) does not match the table in the path ({:?})",
                table.0
            )));
        }
        let context = request.context.as_ref();
        Ok(Self {
            column: request.column.clone(),
            filter: filter(request)?,
            branch: branch_name(request.branch.as_deref()).map(str::to_string),
            read_version: read_version(request)?,
            params: RequestedParams::parse(request)?,
            options: JobOptions::from_context(context)?,
            dry_run: flag(context, "dry_run"),
            function_ms_per_1k_rows: function_ms_per_1k_rows(context)?,
            retry_failed_of: context_value(context, RETRY_FAILED_OF),
        })
    }
}

fn filter(request: &AlterTableBackfillColumnsRequest) -> Result<Option<String>, Error> {
    match request.r#where.clone().flatten() {
        Some(text) if text.trim().is_empty() => {
            Err(Error::invalid_input("field 'where' must not be empty"))
        }
        other => Ok(other),
    }
}

fn read_version(request: &AlterTableBackfillColumnsRequest) -> Result<Option<u64>, Error> {
    match request.read_version.flatten() {
        Some(v) if v < 1 => Err(Error::not_found(
            Missing::Version,
            format!("field 'read_version': version {v} does not exist (versions start at 1)"),
        )),
        other => Ok(other.map(|v| v as u64)),
    }
}

fn context_value(context: Option<&HashMap<String, String>>, key: &str) -> Option<String> {
    context
        .and_then(|context| context.get(key))
        .map(|value| value.trim().to_string())
        .filter(|value| !value.is_empty())
}

/// The fields of the spec's backfill request, as the spec crate's own
/// `Deserialize` names them (it hands them to the deserializer before
/// reading anything): any other field of a body is an extra.
pub fn request_fields() -> &'static [&'static str] {
    static FIELDS: OnceLock<&'static [&'static str]> = OnceLock::new();
    FIELDS.get_or_init(|| {
        let mut fields = None;
        let _ = AlterTableBackfillColumnsRequest::deserialize(FieldRecorder(&mut fields));
        fields.unwrap_or(&[])
    })
}

/// Stops a deserialization once the field names are known.
#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field names recorded")
    }
}

impl std::error::Error for Stop {}

impl serde::de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

struct FieldRecorder<'a>(&'a mut Option<&'static [&'static str]>);

impl<'de> serde::Deserializer<'de> for FieldRecorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: serde::de::Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Stop> {
        *self.0 = Some(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
        byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
        enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(json: serde_json::Value) -> AlterTableBackfillColumnsRequest {
        serde_json::from_value(json).unwrap()
    }

    fn table() -> TableId {
        TableId(vec!["ns".into(), "t".into()])
    }

    #[test]
    fn the_request_fields_are_the_spec_crates() {
        let fields = request_fields();
        assert_eq!(fields.len(), 18, "{fields:?}");
        for field in ["identity", "context", "id", "column", "where", "manifest"] {
            assert!(fields.contains(&field), "{field}: {fields:?}");
        }
        // Every field a full request writes is one of them.
        let mut full = AlterTableBackfillColumnsRequest::new("c".into());
        full.identity = Some(Default::default());
        full.context = Some(HashMap::new());
        full.id = Some(vec![]);
        full.branch = Some("b".into());
        full.r#where = Some(None);
        full.concurrency = Some(None);
        full.intra_applier_concurrency = Some(None);
        full.min_checkpoint_size = Some(None);
        full.max_checkpoint_size = Some(None);
        full.batch_checkpoint_flush_interval_seconds = Some(None);
        full.read_version = Some(None);
        full.task_size = Some(None);
        full.num_frags = Some(None);
        full.checkpoint_size = Some(None);
        full.commit_granularity = Some(None);
        full.cluster = Some(None);
        full.manifest = Some(None);
        let written = serde_json::to_value(&full).unwrap();
        let written: Vec<&String> = written.as_object().unwrap().keys().collect();
        assert_eq!(written.len(), fields.len());
        assert!(written.iter().all(|name| fields.contains(&name.as_str())));
    }

    #[test]
    fn a_request_is_read_once_with_its_defaults() {
        let spec = BackfillSpec::parse(&table(), &request(serde_json::json!({"column": "y"})));
        assert_eq!(spec.unwrap(), BackfillSpec::of_column("y"));
        let body = serde_json::json!({
            "column": "y", "id": ["ns", "t"], "where": "x > 1", "branch": "main",
            "read_version": 3, "context": {"dry_run": "true", "retry_failed_of": " job-1 "},
        });
        let spec = BackfillSpec::parse(&table(), &request(body)).unwrap();
        assert_eq!(spec.filter.as_deref(), Some("x > 1"));
        assert_eq!(spec.branch, None, "main is the default branch");
        assert_eq!(spec.read_version, Some(3));
        assert!(spec.dry_run);
        assert_eq!(spec.retry_failed_of.as_deref(), Some("job-1"));
    }

    #[test]
    fn invalid_fields_are_named() {
        for (body, field) in [
            (serde_json::json!({"column": "y", "id": ["other"]}), "'id'"),
            (serde_json::json!({"column": "y", "where": "  "}), "'where'"),
            (
                serde_json::json!({"column": "y", "read_version": 0}),
                "'read_version'",
            ),
            (
                serde_json::json!({"column": "y", "concurrency": 0}),
                "'concurrency'",
            ),
            (
                serde_json::json!({"column": "y", "context": {"on_error": "maybe"}}),
                "context.on_error",
            ),
        ] {
            let err = BackfillSpec::parse(&table(), &request(body)).unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
    }
}
