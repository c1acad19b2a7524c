//! Calling DynamoDB: every failure told apart by what it means (a condition
//! that did not hold, a busy table, an item too large, anything else), and
//! busy answers retried with bounded backoff.

use std::future::Future;
use std::time::Duration;

use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;

use crate::ports::store::StoreError;

/// How a failed call is handled.
#[derive(Debug)]
pub(super) enum Failure {
    /// A condition of the write did not hold: nothing was written.
    Condition(String),
    /// A conflicting transaction on the same item, throttling or a fault
    /// of the service: nothing was written, the same call may succeed later.
    Busy(String),
    /// An item would exceed DynamoDB's 400 KB (or a transaction its 4 MB).
    TooLarge(String),
    Other(anyhow::Error),
}

impl Failure {
    pub(super) fn into_store_error(self) -> StoreError {
        match self {
            Self::Condition(message) => StoreError::ConditionFailed(message),
            Self::Busy(message) => StoreError::Contention(message),
            Self::TooLarge(message) => StoreError::ItemTooLarge(message),
            Self::Other(err) => StoreError::Unavailable(err),
        }
    }
}

/// Error codes of calls refused for now: retrying later may succeed.
const BUSY_CODES: [&str; 7] = [
    "ThrottlingException",
    "ProvisionedThroughputExceededException",
    "RequestLimitExceeded",
    "TransactionConflictException",
    "TransactionInProgressException",
    "InternalServerError",
    "ServiceUnavailable",
];

/// Cancellation reasons of a transaction refused for now.
const BUSY_REASONS: [&str; 3] = [
    "TransactionConflict",
    "ThrottlingError",
    "ProvisionedThroughputExceeded",
];

/// Retries of a call DynamoDB answered "busy", backing off exponentially
/// from 20 ms to at most 1 s with jitter: about 6 s in all before the
/// caller is told the store is busy.
const BUSY_RETRIES: u32 = 10;
const BUSY_BACKOFF_BASE: Duration = Duration::from_millis(20);
const BUSY_BACKOFF_CAP: Duration = Duration::from_secs(1);

fn mentions_size(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    message.contains("size") && message.contains("exceed")
}

/// Classifies a failed single-item call (or query) by its error code.
pub(super) fn classify<E, R>(err: SdkError<E, R>, what: &str) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let (code, message) = match &err {
        SdkError::ServiceError(service) => (
            service.err().code().map(str::to_string),
            service.err().message().unwrap_or_default().to_string(),
        ),
        _ => (None, String::new()),
    };
    match code.as_deref() {
        Some("ConditionalCheckFailedException") => Failure::Condition(message),
        Some(code) if BUSY_CODES.contains(&code) => {
            Failure::Busy(format!("{what}: {code}: {message}"))
        }
        Some("ValidationException") if mentions_size(&message) => {
            Failure::TooLarge(format!("{what}: {message}"))
        }
        _ => Failure::Other(anyhow::anyhow!("{what}: {}", DisplayErrorContext(&err))),
    }
}

/// Classifies a failed transaction by its cancellation reasons: any item
/// refused for a conflict or throttling makes the whole call busy, since
/// the conditions of the others were perhaps never checked.
pub(super) fn classify_transaction<R>(err: SdkError<TransactWriteItemsError, R>) -> Failure
where
    R: std::fmt::Debug + Send + Sync + 'static,
{
    let SdkError::ServiceError(service) = &err else {
        return classify(err, "TransactWriteItems");
    };
    let TransactWriteItemsError::TransactionCanceledException(cancelled) = service.err() else {
        return classify(err, "TransactWriteItems");
    };
    let message = cancelled.message().unwrap_or_default().to_string();
    let reasons = cancelled.cancellation_reasons();
    let has = |codes: &[&str]| {
        reasons
            .iter()
            .any(|r| r.code().is_some_and(|c| codes.contains(&c)))
    };
    if has(&BUSY_REASONS) {
        return Failure::Busy(format!("TransactWriteItems: {message}"));
    }
    if has(&["ItemCollectionSizeLimitExceeded"])
        || (has(&["ValidationError"])
            && (mentions_size(&message)
                || reasons
                    .iter()
                    .any(|r| r.message().is_some_and(mentions_size))))
    {
        return Failure::TooLarge(format!("TransactWriteItems: {message}"));
    }
    if has(&["ValidationError"]) {
        return Failure::Other(anyhow::anyhow!("TransactWriteItems: {message}"));
    }
    // ConditionalCheckFailed (or an emulator that names no reason).
    Failure::Condition(message)
}

fn backoff(attempt: u32) -> Duration {
    let exponential = BUSY_BACKOFF_BASE.saturating_mul(1 << attempt.min(16));
    let capped = exponential.min(BUSY_BACKOFF_CAP);
    // Full jitter, so callers that collided do not collide again.
    capped.mul_f64(0.5 + rand::random::<f64>() / 2.0)
}

/// Runs `call` until it succeeds, fails for another reason than "busy", or
/// has been busy [`BUSY_RETRIES`] times.
pub(super) async fn retry_busy<T, F, Fut>(mut call: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Failure>>,
{
    let mut attempt = 0;
    loop {
        match call().await {
            Err(Failure::Busy(reason)) if attempt < BUSY_RETRIES => {
                tracing::debug!(%reason, attempt, "DynamoDB busy, retrying");
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn busy_calls_are_retried_a_bounded_number_of_times() {
        let mut calls = 0;
        let result: Result<(), Failure> = retry_busy(|| {
            calls += 1;
            async { Err(Failure::Busy("conflict".into())) }
        })
        .await;
        assert!(matches!(result, Err(Failure::Busy(_))));
        assert_eq!(calls, BUSY_RETRIES + 1);
        let mut calls = 0;
        let result = retry_busy(|| {
            calls += 1;
            let busy = calls < 3;
            async move {
                if busy {
                    Err(Failure::Busy("conflict".into()))
                } else {
                    Ok(7)
                }
            }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls, 3);
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 0..40 {
            assert!(backoff(attempt) <= BUSY_BACKOFF_CAP);
        }
    }
}
