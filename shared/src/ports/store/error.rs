//! What can go wrong in a job store, told apart by what the caller should do.

/// A job store call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A conditional write found the item in another state (the caller's
    /// premise no longer holds: look again).
    #[error("the item changed: {0}")]
    ConditionFailed(String),
    /// The store is busy (a conflicting transaction on the same item,
    /// throttling) and bounded retries did not get through: retry later.
    #[error("the job store is busy: {0}")]
    Contention(String),
    /// The write would make an item larger than the store allows; retrying
    /// cannot help.
    #[error("a job store item would be too large: {0}")]
    ItemTooLarge(String),
    /// The item the call is about does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A commit of the job is being published: the job cannot be cancelled
    /// until it is recorded (or its commit lease expires).
    #[error("a commit of job {0} is being published")]
    CommitInFlight(String),
    /// A page token this store did not issue.
    #[error("page_token is not valid")]
    BadPageToken,
    /// The store could not be reached or failed in another way.
    #[error(transparent)]
    Unavailable(#[from] anyhow::Error),
}

impl StoreError {
    /// Whether a later retry of the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Contention(_) | Self::Unavailable(_) | Self::CommitInFlight(_)
        )
    }
}

impl StoreError {
    /// The error a client is told (the API's answers, a submission's
    /// refusal): a short sentence saying what to do, the store's own words
    /// logged here and kept from the client.
    pub fn for_client(self) -> crate::model::error::Error {
        use crate::model::error::Error;
        match self {
            // No retry makes it fit: the client's request is what must change.
            Self::ItemTooLarge(message) => {
                tracing::warn!(%message, "job record too large");
                Error::invalid_input(
                    "the job's record would be larger than the job store keeps (DynamoDB's \
                     400 KB item); shorten the request's 'where', 'context' or column expression",
                )
            }
            Self::Contention(message) => {
                tracing::warn!(%message, "job store busy");
                Error::Transient {
                    message: "the job store is busy; retry shortly".to_string(),
                    throttled: true,
                }
            }
            Self::CommitInFlight(_) => Error::Transient {
                message: "a commit of the job is being published; retry the cancel shortly"
                    .to_string(),
                throttled: true,
            },
            Self::BadPageToken => {
                Error::invalid_input("query parameter 'page_token' is not a token this API issued")
            }
            other => {
                tracing::warn!(error = %format!("{other:#}"), "job store call failed");
                Error::transient("the job store is not reachable; retry shortly")
            }
        }
    }
}

impl From<StoreError> for crate::model::error::Error {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::ItemTooLarge(_) => Self::Permanent(err.to_string()),
            StoreError::BadPageToken => Self::invalid_input(err.to_string()),
            StoreError::NotFound(_) => Self::Internal(err.to_string()),
            StoreError::Contention(_) | StoreError::CommitInFlight(_) => Self::Transient {
                message: err.to_string(),
                throttled: true,
            },
            StoreError::ConditionFailed(_) | StoreError::Unavailable(_) => {
                Self::transient(format!("{err:#}"))
            }
        }
    }
}
