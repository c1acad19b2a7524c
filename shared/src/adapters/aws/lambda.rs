//! The AWS Lambda runtime: a Python function built from `udf-runtime/`
//! (its Dockerfile), invoked synchronously with an Arrow IPC payload.
//! Lambda caps requests and responses at 6 MB: a batch whose request would
//! be larger, or whose answer was, is split; throttling is retried with
//! backoff, and so is an invocation the function did not live through (it
//! timed out or ran out of memory: the next may land on a fresh container),
//! up to [`DEATH_ATTEMPTS`] tries, after which the batch fails with the
//! reason.

use std::time::Duration;

use arrow_array::{ArrayRef, RecordBatch};
use async_trait::async_trait;
use aws_sdk_lambda::Client;
use aws_sdk_lambda::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_lambda::primitives::Blob;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::adapters::ipc;
use crate::ports::udf::{UdfError, UdfRef, UdfRuntime};

/// Lambda's limit on a synchronous request or response.
const MAX_PAYLOAD_BYTES: usize = 6 * 1024 * 1024;
/// Room kept for the event's other members.
const ENVELOPE_BYTES: usize = 64 * 1024;
/// Pickles up to this size travel with every call; larger ones (up to the
/// 750 KiB a declaration can carry) only when the container says it does
/// not have the function yet. The function reads nothing of the tables.
const INLINE_PICKLE_BYTES: usize = 256 * 1024;
/// Tries of a throttled invocation, backing off from 100 ms to 6.4 s.
const THROTTLE_ATTEMPTS: u32 = 8;
const THROTTLE_BACKOFF: Duration = Duration::from_millis(100);
/// Tries of a batch whose invocation timed out or ran out of memory.
pub const DEATH_ATTEMPTS: u32 = 3;
const DEATH_BACKOFF: Duration = Duration::from_secs(1);

pub struct LambdaRuntime {
    client: Client,
    function: String,
}

impl LambdaRuntime {
    pub fn new(client: Client, function: impl Into<String>) -> Self {
        Self {
            client,
            function: function.into(),
        }
    }

    fn event(&self, udf: &UdfRef, input: &str, with_pickle: bool) -> Result<Vec<u8>, UdfError> {
        let mut function = serde_json::json!({
            "id": udf.id, "name": udf.name, "outputs": udf.outputs,
            "workspace_zips": udf.workspace_zips,
        });
        if with_pickle {
            function["payload_b64"] = BASE64.encode(udf.pickle.as_slice()).into();
        }
        let event = serde_json::json!({"protocol": 1, "udf": function, "input_b64": input});
        let bytes = serde_json::to_vec(&event).map_err(|err| UdfError::Setup(err.to_string()))?;
        if bytes.len() + ENVELOPE_BYTES > MAX_PAYLOAD_BYTES {
            return Err(UdfError::TooLarge(format!(
                "a request of {} bytes is over Lambda's 6 MB",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// One invocation; throttling and 5xx are retried with backoff, and
    /// so is a function that died on it (timeout, out of memory), a few
    /// times.
    async fn invoke(&self, event: Vec<u8>) -> Result<serde_json::Value, UdfError> {
        let mut deaths = 0;
        loop {
            match self.invoke_once(&event).await {
                Err(Invocation::Died(reason)) => {
                    deaths += 1;
                    tracing::warn!(function = %self.function, deaths, %reason, "the user function's Lambda died on a batch");
                    if deaths >= DEATH_ATTEMPTS {
                        return Err(UdfError::Crashed(format!(
                            "Lambda {} died on this batch {deaths} times: {reason}",
                            self.function
                        )));
                    }
                    tokio::time::sleep(DEATH_BACKOFF * deaths).await;
                }
                Err(Invocation::Failed(err)) => return Err(err),
                Ok(answer) => return Ok(answer),
            }
        }
    }

    /// One invocation, throttling retried.
    async fn invoke_once(&self, event: &[u8]) -> Result<serde_json::Value, Invocation> {
        let mut last = String::new();
        for attempt in 0..THROTTLE_ATTEMPTS {
            let sent = self
                .client
                .invoke()
                .function_name(&self.function)
                .payload(Blob::new(event.to_vec()))
                .send()
                .await;
            match sent {
                Ok(output) => return self.answer(output),
                Err(err) => match classify(err, &self.function) {
                    Retry::Later(reason) => {
                        last = reason;
                        tokio::time::sleep(THROTTLE_BACKOFF * (1 << attempt)).await;
                    }
                    Retry::Never(err) => return Err(Invocation::Failed(err)),
                },
            }
        }
        Err(Invocation::Failed(UdfError::Unavailable(format!(
            "Lambda {}: {last} (after {THROTTLE_ATTEMPTS} tries)",
            self.function
        ))))
    }

    fn answer(
        &self,
        output: aws_sdk_lambda::operation::invoke::InvokeOutput,
    ) -> Result<serde_json::Value, Invocation> {
        let payload = output
            .payload()
            .map(|p| p.as_ref().to_vec())
            .unwrap_or_default();
        let answer: serde_json::Value = serde_json::from_slice(&payload).unwrap_or_default();
        match output.function_error() {
            None => Ok(answer),
            Some(_) if answer["errorType"] == "Function.ResponseSizeTooLarge" => {
                Err(Invocation::Failed(UdfError::TooLarge(
                    "the function's answer was over Lambda's 6 MB".into(),
                )))
            }
            Some(_) if died(&answer) => Err(Invocation::Died(format!(
                "{} {}",
                answer["errorType"], answer["errorMessage"]
            ))),
            Some(kind) => Err(Invocation::Failed(UdfError::Crashed(format!(
                "Lambda {} failed ({kind}): {} {}",
                self.function, answer["errorType"], answer["errorMessage"]
            )))),
        }
    }
}

/// How an invocation went wrong.
enum Invocation {
    /// The function did not live through it: worth another try.
    Died(String),
    Failed(UdfError),
}

/// Whether Lambda's error answer says the function timed out or was killed
/// (out of memory): what Lambda reports as `Sandbox.Timedout`,
/// `Runtime.ExitError` or `Runtime.OutOfMemory`, or older runtimes only
/// in the message.
fn died(answer: &serde_json::Value) -> bool {
    let kind = answer["errorType"].as_str().unwrap_or_default();
    let message = answer["errorMessage"].as_str().unwrap_or_default();
    [
        "Sandbox.Timedout",
        "Runtime.ExitError",
        "Runtime.OutOfMemory",
    ]
    .contains(&kind)
        || message.contains("Task timed out")
        || message.contains("signal: killed")
        || message.contains("Runtime exited")
}

enum Retry {
    Later(String),
    Never(UdfError),
}

fn classify<E, R>(err: SdkError<E, R>, function: &str) -> Retry
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug,
{
    let code = err.code().unwrap_or_default().to_string();
    let message = err.message().unwrap_or_default().to_string();
    match code.as_str() {
        "TooManyRequestsException"
        | "ServiceException"
        | "EC2ThrottledException"
        | "ResourceNotReadyException" => Retry::Later(format!("{code}: {message}")),
        "RequestTooLargeException" => Retry::Never(UdfError::TooLarge(message)),
        "ResourceNotFoundException" => Retry::Never(UdfError::Setup(format!(
            "the UDF Lambda function '{function}' does not exist"
        ))),
        "" => Retry::Later(format!(
            "{}",
            aws_sdk_lambda::error::DisplayErrorContext(&err)
        )),
        _ => Retry::Never(UdfError::Unavailable(format!("{code}: {message}"))),
    }
}

#[async_trait]
impl UdfRuntime for LambdaRuntime {
    async fn call(&self, udf: &UdfRef, input: &RecordBatch) -> Result<ArrayRef, UdfError> {
        let bytes = ipc::encode(input).map_err(|err| UdfError::Setup(format!("{err:#}")))?;
        let input = BASE64.encode(bytes);
        // Small pickles travel at once; large ones only when the container
        // does not have the function.
        let small = udf.pickle.len() <= INLINE_PICKLE_BYTES;
        let mut answer = self.invoke(self.event(udf, &input, small)?).await?;
        if answer["status"] == "unknown_udf" {
            answer = self.invoke(self.event(udf, &input, true)?).await?;
        }
        match answer["status"].as_str() {
            Some("ok") => {
                let output = BASE64
                    .decode(answer["output_b64"].as_str().unwrap_or_default())
                    .map_err(|err| UdfError::Crashed(format!("the function's answer: {err}")))?;
                ipc::decode_result(&output)
                    .map_err(|err| UdfError::Crashed(format!("the function's answer: {err:#}")))
            }
            Some("unknown_udf") => Err(UdfError::Setup(
                "the UDF Lambda function could not load the function".into(),
            )),
            _ => Err(UdfError::from_answer(&answer)),
        }
    }

    fn describe(&self) -> String {
        format!("the Lambda function {}", self.function)
    }
}
