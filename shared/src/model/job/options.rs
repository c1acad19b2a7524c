//! What a request's `context` asks of a job (the spec leaves `context` to
//! implementations): what to do with rows a user function raised on, and
//! the entries this service does not know, kept on the job.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::model::binding::OnError;
use crate::model::error::Error;

/// Entries a `context` may hold, and their sizes (as LanceDB's own server
/// accepts: lower-case names of up to 64 characters, values up to 1,024).
pub const MAX_CONTEXT_ENTRIES: usize = 64;
pub const MAX_CONTEXT_KEY_CHARS: usize = 64;
pub const MAX_CONTEXT_VALUE_CHARS: usize = 1024;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    #[serde(default)]
    pub on_error: OnError,
    /// With `skip`: beyond this share of the job's rows failing, it fails.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_skip_fraction: Option<f64>,
    /// Entries this service does not use, kept and ignored.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub other: BTreeMap<String, String>,
}

/// Keys with a meaning here (see docs/api.md); `header.*` entries are
/// HTTP headers, as the spec says.
const KNOWN: [&str; 5] = [
    "on_error",
    "max_skip_fraction",
    "dry_run",
    "auto_backfill",
    FUNCTION_MS_PER_1K_ROWS,
];

/// `context` key: the caller's figure for a Python function's own time per
/// 1,000 rows, in milliseconds, which the job's estimate adds.
pub const FUNCTION_MS_PER_1K_ROWS: &str = "function_ms_per_1k_rows";
/// At most an hour per 1,000 rows.
const MAX_FUNCTION_MS_PER_1K_ROWS: f64 = 3_600_000.0;

/// `context.function_ms_per_1k_rows`, checked.
pub fn function_ms_per_1k_rows(
    context: Option<&HashMap<String, String>>,
) -> Result<Option<f64>, Error> {
    let Some(text) = context.and_then(|c| c.get(FUNCTION_MS_PER_1K_ROWS)) else {
        return Ok(None);
    };
    match text.trim().parse::<f64>() {
        Ok(ms) if (0.0..=MAX_FUNCTION_MS_PER_1K_ROWS).contains(&ms) => Ok(Some(ms)),
        _ => Err(Error::invalid_input(format!(
            "field 'context.{FUNCTION_MS_PER_1K_ROWS}': '{text}' is not a number of \
             milliseconds from 0 to {MAX_FUNCTION_MS_PER_1K_ROWS}"
        ))),
    }
}

/// Checks a `context` map's size and shape (`field` names it in errors).
pub fn check_context(context: &HashMap<String, String>, field: &str) -> Result<(), Error> {
    if context.len() > MAX_CONTEXT_ENTRIES {
        return Err(Error::invalid_input(format!(
            "field '{field}' has {} entries; the limit is {MAX_CONTEXT_ENTRIES}",
            context.len()
        )));
    }
    for (key, value) in context {
        if key.is_empty() || key.chars().count() > MAX_CONTEXT_KEY_CHARS {
            return Err(Error::invalid_input(format!(
                "field '{field}': key '{key}' must have 1 to {MAX_CONTEXT_KEY_CHARS} characters"
            )));
        }
        if value.chars().count() > MAX_CONTEXT_VALUE_CHARS {
            return Err(Error::invalid_input(format!(
                "field '{field}.{key}' is longer than {MAX_CONTEXT_VALUE_CHARS} characters"
            )));
        }
    }
    Ok(())
}

impl JobOptions {
    /// The options of a backfill request's `context`.
    pub fn from_context(context: Option<&HashMap<String, String>>) -> Result<Self, Error> {
        let Some(context) = context else {
            return Ok(Self::default());
        };
        check_context(context, "context")?;
        let on_error = match context.get("on_error").map(|v| v.trim()) {
            None | Some("fail") => OnError::Fail,
            Some("skip") => OnError::Skip,
            Some(other) => {
                return Err(Error::invalid_input(format!(
                    "field 'context.on_error': '{other}' is not fail or skip"
                )));
            }
        };
        let max_skip_fraction = match context.get("max_skip_fraction") {
            None => None,
            Some(text) => match text.trim().parse::<f64>() {
                Ok(v) if (0.0..=1.0).contains(&v) => Some(v),
                _ => {
                    return Err(Error::invalid_input(format!(
                        "field 'context.max_skip_fraction': '{text}' is not a number from 0 to 1"
                    )));
                }
            },
        };
        let other = context
            .iter()
            .filter(|(k, _)| !KNOWN.contains(&k.as_str()) && !k.starts_with("header."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Self {
            on_error,
            max_skip_fraction,
            other,
        })
    }
}

/// Whether a `context` flag is set (`"true"`, any case).
pub fn flag(context: Option<&HashMap<String, String>>, key: &str) -> bool {
    context
        .and_then(|c| c.get(key))
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn options_are_read_and_the_rest_kept() {
        let options = JobOptions::from_context(Some(&context(&[
            ("on_error", "skip"),
            ("max_skip_fraction", "0.25"),
            ("team", "search"),
            ("header.x-trace", "1"),
        ])))
        .unwrap();
        assert_eq!(options.on_error, OnError::Skip);
        assert_eq!(options.max_skip_fraction, Some(0.25));
        assert_eq!(options.other.len(), 1);
        for bad in [
            context(&[("on_error", "ignore")]),
            context(&[("max_skip_fraction", "2")]),
            context(&[(&"k".repeat(65), "v")]),
            context(&[("k", &"v".repeat(1025))]),
        ] {
            assert!(JobOptions::from_context(Some(&bad)).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_function_cost_is_a_bounded_number_of_milliseconds() {
        let read = |value: &str| {
            function_ms_per_1k_rows(Some(&context(&[(FUNCTION_MS_PER_1K_ROWS, value)])))
        };
        assert_eq!(read(" 10 ").unwrap(), Some(10.0));
        assert_eq!(function_ms_per_1k_rows(None).unwrap(), None);
        for bad in ["-1", "NaN", "inf", "ten", "3600001"] {
            assert!(read(bad).is_err(), "{bad}");
        }
        let options = JobOptions::from_context(Some(&context(&[(FUNCTION_MS_PER_1K_ROWS, "5")])));
        assert!(
            options.unwrap().other.is_empty(),
            "a known key is not kept as another's"
        );
    }
}
