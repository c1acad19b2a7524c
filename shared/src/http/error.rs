//! Errors as clients see them: an HTTP status, a Lance Namespace error code
//! and a message naming what was wrong. Domain errors become API errors
//! here and nowhere else.

use http::StatusCode;
use lance_namespace::ErrorCode;
use lance_namespace_reqwest_client::models::ErrorResponse;

use crate::model::error::{Error, Missing};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// A fault of the service (5xx) whose message the client is told
    /// anyway, because it says what the client should do.
    pub told: bool,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    /// An error with the status that fits its code.
    pub fn coded(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: status_for_code(code),
            code,
            message: message.into(),
            told: false,
        }
    }

    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::coded(ErrorCode::InvalidInput, message)
    }

    pub fn route_not_found(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: ErrorCode::Unsupported,
            message: message.into(),
            told: false,
        }
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            code: ErrorCode::Unsupported,
            message: message.into(),
            told: false,
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::coded(ErrorCode::Unauthenticated, message)
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::coded(ErrorCode::PermissionDenied, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::coded(ErrorCode::ServiceUnavailable, message)
    }

    /// The wire form: `{error, code, detail, instance}`; the detail names
    /// the request, so a client's report can be found in the log.
    pub fn to_response(&self, instance: Option<&str>, request_id: &str) -> ErrorResponse {
        let mut response = ErrorResponse::new(self.code.as_u32() as i32);
        response.error = Some(self.message.clone());
        response.detail = Some(format!(
            "{}: {} (request {request_id})",
            self.code, self.message
        ));
        response.instance = instance.map(str::to_string);
        response
    }

    /// What a client is told: a fault of the service (5xx) is a short
    /// sentence (the log holds the details under the request id); a
    /// client's mistake keeps its message, scrubbed of locations.
    pub fn public(&self) -> Self {
        let message = match self.status {
            _ if self.told => crate::model::error::scrub(&self.message),
            StatusCode::INTERNAL_SERVER_ERROR => {
                "the service failed to handle the request; retry, or report the request id".into()
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                "a service the API depends on is not reachable; retry shortly".into()
            }
            _ => crate::model::error::scrub(&self.message),
        };
        Self {
            message,
            ..self.clone()
        }
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let code = match &err {
            Error::InvalidInput(_) | Error::Permanent(_) => ErrorCode::InvalidInput,
            Error::Unsupported(_) => ErrorCode::Unsupported,
            Error::NotFound { what, .. } => match what {
                Missing::Namespace => ErrorCode::NamespaceNotFound,
                Missing::Table => ErrorCode::TableNotFound,
                Missing::Version => ErrorCode::TableVersionNotFound,
                Missing::Column => ErrorCode::TableColumnNotFound,
                Missing::Branch => ErrorCode::TableBranchNotFound,
                // Jobs have no code of their own in the spec; a missing job
                // is reported like a missing transaction (code 10).
                Missing::Job => ErrorCode::TransactionNotFound,
            },
            Error::Conflict(_) => ErrorCode::ConcurrentModification,
            Error::Forbidden(_) => ErrorCode::PermissionDenied,
            Error::InvalidState(_) => ErrorCode::InvalidTableState,
            Error::Transient {
                throttled: true, ..
            } => ErrorCode::Throttling,
            Error::Transient { .. } | Error::Unqueued(_) => ErrorCode::ServiceUnavailable,
            Error::Internal(_) => ErrorCode::Internal,
        };
        Self {
            told: matches!(err, Error::Unqueued(_)),
            ..Self::coded(code, err.to_string())
        }
    }
}

/// The HTTP status that fits a Lance Namespace code.
pub fn status_for_code(code: ErrorCode) -> StatusCode {
    use ErrorCode::*;
    match code {
        NamespaceNotFound | TableNotFound | TableIndexNotFound | TableTagNotFound
        | TransactionNotFound | TableVersionNotFound | TableColumnNotFound
        | TableBranchNotFound => StatusCode::NOT_FOUND,
        NamespaceAlreadyExists
        | TableAlreadyExists
        | TableIndexAlreadyExists
        | TableTagAlreadyExists
        | TableBranchAlreadyExists
        | ConcurrentModification
        | NamespaceNotEmpty
        | InvalidTableState => StatusCode::CONFLICT,
        Unsupported | InvalidInput | TableSchemaValidationError => StatusCode::BAD_REQUEST,
        PermissionDenied => StatusCode::FORBIDDEN,
        Unauthenticated => StatusCode::UNAUTHORIZED,
        ServiceUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        Throttling => StatusCode::TOO_MANY_REQUESTS,
        Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}
