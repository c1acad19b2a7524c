//! The HTTP runtime: a remote function (a model server on GPUs) that takes
//! an Arrow IPC stream and answers one. The service's own handler runs as
//! such a server (`lance_backfill_udf_runtime.py http`) and loads functions
//! on demand (`PUT /udf/<id>`); any server speaking the same exchange
//! works.

use std::time::{Duration, Instant};

use arrow_array::{ArrayRef, RecordBatch};
use async_trait::async_trait;
use hmac::{Hmac, Mac};
use reqwest::{Method, StatusCode};
use sha2::Sha256;

use crate::adapters::ipc;
use crate::ports::udf::{UdfError, UdfRef, UdfRuntime};

/// Tries of a call the server answered busy or did not answer.
const ATTEMPTS: u32 = 6;
/// First pause after a busy answer; doubles each time.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";
/// Largest answer read from the server: 1 GiB, as large as the values of
/// the engine's biggest batch (`computed::limits::MAX_BATCH_VALUE_BYTES`).
const MAX_ANSWER_BYTES: usize = 1 << 30;
/// How far the server's clock may be from ours (the runtime's window).
pub const SIGNATURE_WINDOW: Duration = Duration::from_secs(300);

pub struct HttpRuntime {
    client: reqwest::Client,
    url: reqwest::Url,
    /// Signs every request (`LANCE_BACKFILL_UDF_HTTP_SECRET`): the server
    /// refuses unsigned ones.
    secret: Option<Vec<u8>>,
    /// How long one call may take, retries included.
    timeout: Duration,
}

/// The signature headers of a request: the time, and
/// `v1=hex(HMAC-SHA256(secret, "<time>\n<METHOD>\n<path?query>\n" + body))`.
pub fn signature(secret: &[u8], method: &str, target: &str, body: &[u8], at: u64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(format!("{at}\n{method}\n{target}\n").as_bytes());
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

impl HttpRuntime {
    pub fn new(url: &str, timeout: Duration, secret: Option<&str>) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url)
            .map_err(|err| anyhow::anyhow!("UDF endpoint '{url}' is not a URL: {err}"))?;
        let client = reqwest::Client::builder().build()?;
        Ok(Self {
            client,
            url,
            secret: secret
                .filter(|s| !s.is_empty())
                .map(|s| s.as_bytes().to_vec()),
            timeout,
        })
    }

    /// A request signed for the server (when a secret is configured),
    /// bounded by what is left of the call's time.
    fn request(
        &self,
        method: Method,
        url: reqwest::Url,
        body: Vec<u8>,
        deadline: Instant,
    ) -> Result<reqwest::RequestBuilder, UdfError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(UdfError::Unavailable(format!(
                "UDF endpoint {}: no answer within {:?}",
                self.url, self.timeout
            )));
        }
        let mut request = self
            .client
            .request(method.clone(), url.clone())
            .timeout(left);
        if let Some(secret) = &self.secret {
            let at = chrono::Utc::now().timestamp().max(0) as u64;
            let target = match url.query() {
                Some(query) => format!("{}?{query}", url.path()),
                None => url.path().to_string(),
            };
            let signed = signature(secret, method.as_str(), &target, &body, at);
            request = request
                .header("x-lance-backfill-timestamp", at.to_string())
                .header("x-lance-backfill-signature", signed);
        }
        Ok(request.body(body))
    }

    async fn post(
        &self,
        udf: &UdfRef,
        body: &[u8],
        deadline: Instant,
    ) -> Result<reqwest::Response, UdfError> {
        self.request(Method::POST, self.url.clone(), body.to_vec(), deadline)?
            .header("content-type", ARROW_STREAM)
            .header("x-lance-backfill-udf", &udf.id)
            .header("x-lance-backfill-udf-name", &udf.name)
            .header("x-lance-backfill-outputs", udf.outputs.to_string())
            .send()
            .await
            .map_err(|err| UdfError::Unavailable(format!("UDF endpoint {}: {err}", self.url)))
    }

    /// Sends the function (and the user's code archives) to a server that
    /// does not have it yet.
    async fn upload(&self, udf: &UdfRef, deadline: Instant) -> Result<(), UdfError> {
        use base64::Engine as _;
        for zip in &udf.workspace_zips {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(zip)
                .map_err(|err| UdfError::Setup(format!("a workspace archive: {err}")))?;
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            self.put(&format!("/workspace/{digest}"), bytes, udf, deadline)
                .await?;
        }
        self.put(
            &format!("/udf/{}", udf.id),
            udf.pickle.to_vec(),
            udf,
            deadline,
        )
        .await
    }

    async fn put(
        &self,
        path: &str,
        body: Vec<u8>,
        udf: &UdfRef,
        deadline: Instant,
    ) -> Result<(), UdfError> {
        let url = self
            .url
            .join(path)
            .map_err(|err| UdfError::Setup(format!("{err}")))?;
        let response = self
            .request(Method::PUT, url, body, deadline)?
            .header("x-lance-backfill-outputs", udf.outputs.to_string())
            .header("x-lance-backfill-udf-name", &udf.name)
            .send()
            .await
            .map_err(|err| UdfError::Unavailable(format!("UDF endpoint {}: {err}", self.url)))?;
        if response.status().is_success() {
            return Ok(());
        }
        if response.status() == StatusCode::UNAUTHORIZED {
            return Err(self.refused());
        }
        let answer: serde_json::Value =
            serde_json::from_slice(&bounded_body(response).await?).unwrap_or_default();
        Err(match UdfError::from_answer(&answer) {
            UdfError::Raised {
                error_type,
                message,
                ..
            } => UdfError::Setup(format!("{error_type}: {message}")),
            other => other,
        })
    }

    /// The server refused our signature: no retry will change that.
    fn refused(&self) -> UdfError {
        UdfError::Setup(format!(
            "UDF endpoint {} refused the request's signature: set \
             LANCE_BACKFILL_UDF_HTTP_SECRET to the server's secret (and keep the clocks within \
             {} s)",
            self.url,
            SIGNATURE_WINDOW.as_secs()
        ))
    }
}

/// The answer's body, read up to [`MAX_ANSWER_BYTES`].
async fn bounded_body(mut response: reqwest::Response) -> Result<Vec<u8>, UdfError> {
    if response
        .content_length()
        .is_some_and(|length| length as usize > MAX_ANSWER_BYTES)
    {
        return Err(too_large_answer());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| UdfError::Unavailable(format!("{err}")))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large_answer());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_large_answer() -> UdfError {
    UdfError::Crashed(format!(
        "the UDF endpoint answered more than {MAX_ANSWER_BYTES} bytes for one batch"
    ))
}

#[async_trait]
impl UdfRuntime for HttpRuntime {
    async fn call(&self, udf: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
        let body = ipc::encode(input).map_err(|err| UdfError::Setup(format!("{err:#}")))?;
        // One deadline for the call: retries share it, never multiply it.
        let deadline = Instant::now() + self.timeout;
        let mut uploaded = false;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let response = match self.post(udf, &body, deadline).await {
                Ok(response) => response,
                Err(UdfError::Unavailable(reason)) if Instant::now() < deadline => {
                    last = reason;
                    tokio::time::sleep(BACKOFF_BASE * (1 << attempt)).await;
                    continue;
                }
                Err(err) => return Err(err),
            };
            match response.status() {
                StatusCode::OK => {
                    let bytes = bounded_body(response).await?;
                    return ipc::decode_result(&bytes).map_err(|err| {
                        UdfError::Crashed(format!("the endpoint's answer: {err:#}"))
                    });
                }
                StatusCode::NOT_FOUND if !uploaded => {
                    self.upload(udf, deadline).await?;
                    uploaded = true;
                }
                StatusCode::UNAUTHORIZED => return Err(self.refused()),
                StatusCode::PAYLOAD_TOO_LARGE => {
                    return Err(UdfError::TooLarge(
                        "the endpoint refused a batch this large".into(),
                    ));
                }
                StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => {
                    let answer: serde_json::Value =
                        serde_json::from_slice(&bounded_body(response).await?).unwrap_or_default();
                    return Err(UdfError::from_answer(&answer));
                }
                status => {
                    last = format!("UDF endpoint {} answered {status}", self.url);
                    tokio::time::sleep(BACKOFF_BASE * (1 << attempt)).await;
                }
            }
        }
        Err(UdfError::Unavailable(last))
    }

    fn describe(&self) -> String {
        format!("the HTTP endpoint {}", self.url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signature the runtime checks (udf-runtime/lance_backfill_udf_runtime.py):
    /// the same value as Python's
    /// `hmac.new(b"s3cret", b"1700000000\nPOST\n/invoke?x=1\nbody", "sha256").hexdigest()`.
    #[test]
    fn requests_are_signed_as_the_runtime_checks() {
        let signed = signature(b"s3cret", "POST", "/invoke?x=1", b"body", 1_700_000_000);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"s3cret").unwrap();
        mac.update(b"1700000000\nPOST\n/invoke?x=1\nbody");
        assert_eq!(
            signed,
            format!("v1={}", hex::encode(mac.finalize().into_bytes()))
        );
        assert_ne!(
            signed,
            signature(b"s3cret", "PUT", "/invoke?x=1", b"body", 1_700_000_000)
        );
    }
}
