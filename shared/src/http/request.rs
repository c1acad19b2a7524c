//! Reading a request: path segments, query parameters and the JSON body,
//! each failure a 400 that names the field.

use bytes::Bytes;
use http::{HeaderMap, Method};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::http::ApiError;
use crate::model::table::{DEFAULT_DELIMITER, TableId};
use lance_namespace_reqwest_client::models::Identity;

#[derive(Debug, Clone)]
pub struct ApiRequest {
    pub method: Method,
    /// Raw (percent-encoded) path; a stage prefix before `/v1/` is ignored.
    pub path: String,
    /// Raw query string.
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl ApiRequest {
    /// Path segments from `v1` on (API Gateway stages and base paths dropped).
    pub fn segments(&self) -> Vec<&str> {
        let path = match self.path.find("/v1/") {
            Some(idx) => &self.path[idx + 1..],
            None => self.path.trim_start_matches('/'),
        };
        path.trim_end_matches('/').split('/').collect()
    }

    /// A query parameter, percent-decoded; the first occurrence wins.
    pub fn query_param(&self, name: &str) -> Result<Option<String>, ApiError> {
        let Some(query) = &self.query else {
            return Ok(None);
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if decode(key, "query parameter name")? == name {
                return decode(
                    &value.replace('+', " "),
                    &format!("query parameter '{name}'"),
                )
                .map(Some);
            }
        }
        Ok(None)
    }

    /// The table id of the path, split with `?delimiter=` (default `$`).
    pub fn table_id(&self, raw: &str) -> Result<TableId, ApiError> {
        let delimiter = self
            .query_param("delimiter")?
            .unwrap_or_else(|| DEFAULT_DELIMITER.to_string());
        let id = decode(raw, "path parameter 'id'")?;
        Ok(TableId::parse(&id, &delimiter)?)
    }

    /// The body's `identity` (API key or token), read leniently: nothing
    /// else of the body is looked at before the caller is known.
    pub fn identity(&self) -> Option<Identity> {
        if self.body.len() > super::MAX_BODY_BYTES {
            return None;
        }
        let value: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
        serde_json::from_value(value.get("identity")?.clone()).ok()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as `T`, or `T::default()` when there is no body at all
    /// (LanceDB's client sends some requests without one).
    pub fn json_or_default<T: DeserializeOwned + Default>(&self) -> Result<T, ApiError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        self.json()
    }

    /// The body as `T`. Unknown fields are ignored; a wrong type, a missing
    /// required field or malformed JSON is a 400 naming the field.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        if self.body.len() > super::MAX_BODY_BYTES {
            return Err(ApiError::invalid_input(format!(
                "request body is {} bytes; the limit is {}",
                self.body.len(),
                super::MAX_BODY_BYTES
            )));
        }
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(ApiError::invalid_input("a JSON request body is required"));
        }
        if self.body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
            return Err(ApiError::invalid_input(
                "request body must be a JSON object",
            ));
        }
        let mut deserializer = serde_json::Deserializer::from_slice(&self.body);
        let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner();
            let detail = strip_position(&inner.to_string());
            if inner.is_syntax() || inner.is_eof() {
                ApiError::invalid_input(format!("request body is not valid JSON: {detail}"))
            } else if path == "." || path.is_empty() {
                ApiError::invalid_input(format!("request body: {detail}"))
            } else {
                ApiError::invalid_input(format!("field '{path}': {detail}"))
            }
        })?;
        deserializer.end().map_err(|err| {
            ApiError::invalid_input(format!("request body has trailing data: {err}"))
        })?;
        Ok(value)
    }
}

fn decode(text: &str, what: &str) -> Result<String, ApiError> {
    percent_decode_str(text)
        .decode_utf8()
        .map(|s| s.into_owned())
        .map_err(|_| {
            ApiError::invalid_input(format!("{what} is not valid UTF-8 after percent-decoding"))
        })
}

/// serde_json appends " at line 1 column 7"; the field name says more.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(idx) => message[..idx].to_string(),
        None => message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lance_namespace_reqwest_client::models::AlterTableBackfillColumnsRequest;

    fn post(path: &str, body: &str) -> ApiRequest {
        crate::http::request(
            Method::POST,
            path,
            HeaderMap::new(),
            Bytes::from(body.to_string()),
        )
    }

    #[test]
    fn path_and_query() {
        let req = post(
            "/prod/v1/table/ns%24items/backfill_column?delimiter=%24",
            "",
        );
        assert_eq!(
            req.segments(),
            vec!["v1", "table", "ns%24items", "backfill_column"]
        );
        assert_eq!(req.table_id("ns%24items").unwrap().0, vec!["ns", "items"]);
        let req = post("/v1/table/a.b/backfill_column?delimiter=.", "");
        assert_eq!(req.table_id("a.b").unwrap().0, vec!["a", "b"]);
    }

    #[test]
    fn body_errors_name_the_field() {
        let err = post("/", r#"{"column": "c", "concurrency": "x"}"#)
            .json::<AlterTableBackfillColumnsRequest>()
            .unwrap_err();
        assert!(
            err.message.contains("field 'concurrency'"),
            "{}",
            err.message
        );
        let err = post("/", r#"{"concurrency": 2}"#)
            .json::<AlterTableBackfillColumnsRequest>()
            .unwrap_err();
        assert!(err.message.contains("column"), "{}", err.message);
        let err = post("/", "{nope")
            .json::<AlterTableBackfillColumnsRequest>()
            .unwrap_err();
        assert!(err.message.contains("not valid JSON"), "{}", err.message);
        let err = post("/", "[1]")
            .json::<AlterTableBackfillColumnsRequest>()
            .unwrap_err();
        assert!(err.message.contains("JSON object"), "{}", err.message);
        let err = post("/", r#"{"column": "c", "task_size": 1e40}"#)
            .json::<AlterTableBackfillColumnsRequest>()
            .unwrap_err();
        assert!(err.message.contains("task_size"), "{}", err.message);
        assert_eq!(
            post("/", "")
                .json::<AlterTableBackfillColumnsRequest>()
                .unwrap_err()
                .status,
            400
        );
        // Nulls mean absent; unknown fields are ignored.
        let ok: AlterTableBackfillColumnsRequest = post(
            "/",
            r#"{"column": "c", "where": null, "branch": null, "id": null, "extra": 1}"#,
        )
        .json()
        .unwrap();
        assert_eq!(ok.r#where, Some(None));
    }
}
