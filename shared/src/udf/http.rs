//! The HTTP runtime: a remote function (a model server on GPUs) that takes
//! an Arrow IPC stream and answers one. The service's own handler runs as
//! such a server (`lance_backfill_udf_runtime.py http`) and loads functions
//! on demand (`PUT /udf/<id>`); any server speaking the same exchange
//! works.

use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch};
use async_trait::async_trait;
use reqwest::StatusCode;

use super::{UdfError, UdfRef, UdfRuntime, ipc};

/// Tries of a call the server answered busy or did not answer.
const ATTEMPTS: u32 = 6;
/// First pause after a busy answer; doubles each time.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

pub struct HttpRuntime {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl HttpRuntime {
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let url = reqwest::Url::parse(url)
            .map_err(|err| anyhow::anyhow!("UDF endpoint '{url}' is not a URL: {err}"))?;
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Self { client, url })
    }

    async fn post(&self, udf: &UdfRef, body: &[u8]) -> Result<reqwest::Response, reqwest::Error> {
        self.client
            .post(self.url.clone())
            .header("content-type", ARROW_STREAM)
            .header("x-lance-backfill-udf", &udf.id)
            .header("x-lance-backfill-udf-name", &udf.name)
            .header("x-lance-backfill-outputs", udf.outputs.to_string())
            .body(body.to_vec())
            .send()
            .await
    }

    /// Sends the function (and the user's code archives) to a server that
    /// does not have it yet.
    async fn upload(&self, udf: &UdfRef) -> Result<(), UdfError> {
        use base64::Engine as _;
        for zip in &udf.workspace_zips {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(zip)
                .map_err(|err| UdfError::Setup(format!("a workspace archive: {err}")))?;
            let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            self.put(&format!("/workspace/{digest}"), bytes, udf)
                .await?;
        }
        self.put(&format!("/udf/{}", udf.id), udf.pickle.to_vec(), udf)
            .await
    }

    async fn put(&self, path: &str, body: Vec<u8>, udf: &UdfRef) -> Result<(), UdfError> {
        let url = self
            .url
            .join(path)
            .map_err(|err| UdfError::Setup(format!("{err}")))?;
        let response = self
            .client
            .put(url)
            .header("x-lance-backfill-outputs", udf.outputs.to_string())
            .header("x-lance-backfill-udf-name", &udf.name)
            .body(body)
            .send()
            .await
            .map_err(|err| UdfError::Unavailable(format!("UDF endpoint {}: {err}", self.url)))?;
        if response.status().is_success() {
            return Ok(());
        }
        let answer: serde_json::Value = response.json().await.unwrap_or_default();
        Err(match UdfError::from_answer(&answer) {
            UdfError::Raised {
                error_type,
                message,
                ..
            } => UdfError::Setup(format!("{error_type}: {message}")),
            other => other,
        })
    }
}

#[async_trait]
impl UdfRuntime for HttpRuntime {
    async fn call(&self, udf: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
        let body = ipc::encode(input).map_err(|err| UdfError::Setup(format!("{err:#}")))?;
        let mut uploaded = false;
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            let response = match self.post(udf, &body).await {
                Ok(response) => response,
                Err(err) => {
                    last = format!("UDF endpoint {}: {err}", self.url);
                    tokio::time::sleep(BACKOFF_BASE * (1 << attempt)).await;
                    continue;
                }
            };
            match response.status() {
                StatusCode::OK => {
                    let bytes = response
                        .bytes()
                        .await
                        .map_err(|err| UdfError::Unavailable(format!("{err}")))?;
                    return ipc::decode_result(&bytes).map_err(|err| {
                        UdfError::Crashed(format!("the endpoint's answer: {err:#}"))
                    });
                }
                StatusCode::NOT_FOUND if !uploaded => {
                    self.upload(udf).await?;
                    uploaded = true;
                }
                StatusCode::PAYLOAD_TOO_LARGE => {
                    return Err(UdfError::TooLarge(
                        "the endpoint refused a batch this large".into(),
                    ));
                }
                StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST => {
                    let answer: serde_json::Value = response.json().await.unwrap_or_default();
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
