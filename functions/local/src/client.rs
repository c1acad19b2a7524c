//! The service's HTTP API as the command line calls it: one base URL, one
//! API key, JSON in and out, and the service's error answers turned into
//! messages a person can act on.

use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::Value;

/// How long one call may take before the command gives up on it.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Calls tried again when the service answers busy or does not answer.
const ATTEMPTS: u32 = 5;
/// The first pause before a call is tried again; doubles each time.
const BACKOFF: Duration = Duration::from_millis(500);

pub struct Api {
    http: reqwest::Client,
    base: reqwest::Url,
    key: Option<String>,
}

/// A call the service answered with an error: its status, code and message.
#[derive(Debug)]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.message, self.status)
    }
}

impl std::error::Error for Refused {}

impl Api {
    pub fn new(url: &str, key: Option<String>) -> anyhow::Result<Self> {
        let base = reqwest::Url::parse(url)
            .with_context(|| format!("--url '{url}' is not a URL (e.g. http://127.0.0.1:8080)"))?;
        if base.cannot_be_a_base() || !matches!(base.scheme(), "http" | "https") {
            bail!("--url '{url}' must be an http:// or https:// URL");
        }
        let http = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .build()
            .context("could not make an HTTP client")?;
        Ok(Self {
            http,
            base,
            key: key.filter(|k| !k.is_empty()),
        })
    }

    /// `base` joined with `segments`, each escaped as one path segment (a
    /// table name may hold characters a URL gives meaning to).
    fn url(&self, segments: &[&str], query: &[(&str, String)]) -> reqwest::Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.call(reqwest::Method::GET, self.url(segments, query), None)
            .await
    }

    pub async fn post(&self, segments: &[&str], body: &Value) -> anyhow::Result<Value> {
        self.call(reqwest::Method::POST, self.url(segments, &[]), Some(body))
            .await
    }

    /// One call, tried again on 429, 503 and connection failures (the
    /// answers the service gives while it is busy or restarting).
    async fn call(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut pause = BACKOFF;
        for attempt in 1..=ATTEMPTS {
            match self.send(method.clone(), url.clone(), body).await {
                Ok(answer) => return Ok(answer),
                Err(err) if attempt < ATTEMPTS && retryable(&err) => {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn send(
        &self,
        method: reqwest::Method,
        url: reqwest::Url,
        body: Option<&Value>,
    ) -> anyhow::Result<Value> {
        let mut request = self.http.request(method, url.clone());
        if let Some(key) = &self.key {
            request = request.header("x-api-key", key);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/json")
                .body(body.to_string());
        }
        let response = request
            .send()
            .await
            .with_context(|| format!("could not reach {}", origin(&url)))?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        let answer: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            return Err(Refused {
                status,
                message: refusal_message(status, &answer),
            }
            .into());
        }
        Ok(answer)
    }
}

fn origin(url: &reqwest::Url) -> String {
    url.origin().ascii_serialization()
}

fn retryable(err: &anyhow::Error) -> bool {
    match err.downcast_ref::<Refused>() {
        Some(refused) => matches!(refused.status, 429 | 502 | 503 | 504),
        None => err
            .chain()
            .filter_map(|cause| cause.downcast_ref::<reqwest::Error>())
            .any(|e| e.is_connect() || e.is_timeout()),
    }
}

/// The service's `ErrorResponse` in a line: its `error`, or the body.
fn refusal_message(status: u16, answer: &Value) -> String {
    let text = answer["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| match answer {
            Value::String(text) if !text.is_empty() => text.clone(),
            _ => format!("HTTP {status}"),
        });
    match status {
        401 => format!("{text}: give an API key with --api-key or LANCE_BACKFILL_API_KEY"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_one_path_segment_each() {
        let api = Api::new("http://127.0.0.1:8080/prefix/", None).unwrap();
        let url = api.url(&["v1", "table", "a/b c", "jobs"], &[("limit", "5".into())]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:8080/prefix/v1/table/a%2Fb%20c/jobs?limit=5"
        );
    }

    #[test]
    fn urls_that_are_not_http_are_refused() {
        assert!(Api::new("127.0.0.1:8080", None).is_err());
        assert!(Api::new("file:///tmp", None).is_err());
        assert!(Api::new("https://example.com", Some(String::new())).is_ok());
    }

    #[test]
    fn refusals_name_what_to_do() {
        let answer = serde_json::json!({"error": "missing credentials", "code": 16});
        assert_eq!(
            refusal_message(401, &answer),
            "missing credentials: give an API key with --api-key or LANCE_BACKFILL_API_KEY"
        );
        assert_eq!(
            refusal_message(502, &Value::String(String::new())),
            "HTTP 502"
        );
    }
}
