//! `POST /v1/table/{id}/backfill_column`: read the request, authenticate,
//! submit, answer 202 with the job id (200 with the plan for a dry run).

use http::StatusCode;
use lance_namespace_reqwest_client::models::{
    AlterTableBackfillColumnsRequest, AlterTableBackfillColumnsResponse,
};
use serde_json::Value;

use super::caller::TableCall;
use super::describe::min_read_version;
use super::{ApiError, ApiRequest, ApiResponse, Service};
use crate::model::job::{BackfillSpec, request_fields};
use crate::model::policy::Action;
use crate::submit::{SubmitOutcome, SubmitRequest};

/// Extra fields, as LanceDB's own server bounds them: at most this many,
/// lower-case names of up to 64 characters, values of up to 1,024.
const MAX_EXTRA_FIELDS: usize = 64;
const MAX_EXTRA_NAME_CHARS: usize = 64;
const MAX_EXTRA_VALUE_CHARS: usize = 1024;
/// The extra field naming fragments to leave alone.
const SKIP_FRAGS: &str = "skip_frags";

/// The extras of a backfill body: the fragments to skip, and the names of
/// the fields this service ignores.
#[derive(Debug, Default, PartialEq)]
struct Extras {
    skip_fragments: Vec<u64>,
    ignored: Vec<String>,
}

impl Service {
    pub(super) async fn submit_backfill(
        &self,
        http: &ApiRequest,
        call: TableCall,
    ) -> Result<ApiResponse, ApiError> {
        let request: AlterTableBackfillColumnsRequest = http.json()?;
        let spec = BackfillSpec::parse(&call.table, &request)?;
        let extras = extras(&http.json::<serde_json::Map<String, Value>>()?)?;
        let mut submit = SubmitRequest::new(call.table.clone(), spec, call.subject().to_string());
        submit.allow_udf = self.may(&call, Action::Udf);
        // LanceDB's client resends a request (same x-request-id) after a
        // 409, 429 or 5xx: the retry must find the job the first made.
        submit.idempotency_key = http
            .header("idempotency-key")
            .or_else(|| http.header("x-request-id"))
            .map(str::to_string);
        submit.min_read_version = min_read_version(http)?;
        submit.skip_fragments = extras.skip_fragments;
        submit.ignored_fields = extras.ignored;
        match self.submitter.submit(submit).await? {
            SubmitOutcome::DryRun(plan) => Ok(ApiResponse::json(StatusCode::OK, &plan)),
            SubmitOutcome::Created { job_id }
            | SubmitOutcome::Replayed { job_id }
            | SubmitOutcome::Joined { job_id } => Ok(ApiResponse::json(
                StatusCode::ACCEPTED,
                &AlterTableBackfillColumnsResponse::new(job_id),
            )),
        }
    }
}

/// Reads and bounds the body's fields that the spec does not declare.
fn extras(body: &serde_json::Map<String, Value>) -> Result<Extras, ApiError> {
    let mut extras = Extras::default();
    for (name, value) in body
        .iter()
        .filter(|(k, _)| !request_fields().contains(&k.as_str()))
    {
        let valid_name = !name.is_empty()
            && name.chars().count() <= MAX_EXTRA_NAME_CHARS
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid_name {
            return Err(ApiError::invalid_input(format!(
                "field '{}': extra field names are lower-case letters, digits and '_', \
                 up to {MAX_EXTRA_NAME_CHARS} characters",
                name.chars().take(MAX_EXTRA_NAME_CHARS).collect::<String>()
            )));
        }
        if value.to_string().chars().count() > MAX_EXTRA_VALUE_CHARS {
            return Err(ApiError::invalid_input(format!(
                "field '{name}' is longer than {MAX_EXTRA_VALUE_CHARS} characters"
            )));
        }
        if name == SKIP_FRAGS {
            extras.skip_fragments = fragment_ids(value)?;
        } else {
            extras.ignored.push(name.clone());
        }
    }
    if extras.ignored.len() + usize::from(!extras.skip_fragments.is_empty()) > MAX_EXTRA_FIELDS {
        return Err(ApiError::invalid_input(format!(
            "the request has more than {MAX_EXTRA_FIELDS} fields the spec does not declare"
        )));
    }
    extras.ignored.sort();
    Ok(extras)
}

/// `skip_frags`: a list of fragment ids (null: none).
fn fragment_ids(value: &Value) -> Result<Vec<u64>, ApiError> {
    let invalid = || {
        ApiError::invalid_input(format!(
            "field '{SKIP_FRAGS}' must be a list of fragment ids (non-negative integers)"
        ))
    };
    match value {
        Value::Null => Ok(Vec::new()),
        Value::Array(items) => {
            let mut ids: Vec<u64> = items
                .iter()
                .map(|item| item.as_u64().ok_or_else(invalid))
                .collect::<Result<_, _>>()?;
            ids.sort_unstable();
            ids.dedup();
            Ok(ids)
        }
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> serde_json::Map<String, Value> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn extras_are_read_and_bounded() {
        let found = extras(&body(
            r#"{"column": "y", "skip_frags": [3, 1, 3], "priority": "high", "where": null}"#,
        ))
        .unwrap();
        assert_eq!(
            found,
            Extras {
                skip_fragments: vec![1, 3],
                ignored: vec!["priority".to_string()],
            }
        );
        for bad in [
            r#"{"column": "y", "skip_frags": "1,2"}"#,
            r#"{"column": "y", "skip_frags": [-1]}"#,
            r#"{"column": "y", "Priority": 1}"#,
            r#"{"column": "y", "a-b": 1}"#,
        ] {
            assert_eq!(extras(&body(bad)).unwrap_err().status, 400, "{bad}");
        }
        let long = format!(r#"{{"column": "y", "note": "{}"}}"#, "x".repeat(1100));
        assert!(extras(&body(&long)).unwrap_err().message.contains("1024"));
        let name = "n".repeat(65);
        let long_name = format!(r#"{{"column": "y", "{name}": 1}}"#);
        assert_eq!(extras(&body(&long_name)).unwrap_err().status, 400);
    }
}
