//! Errors that cross the API boundary carry a Lance Namespace error code and
//! the HTTP status that goes with it; everything else is an internal fault.

use http::StatusCode;
use lance_namespace::ErrorCode;
use lance_namespace_reqwest_client::models::ErrorResponse;

/// An error a client can act on: an HTTP status, a Lance Namespace code and a
/// message naming what was wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

impl ApiError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::InvalidInput, message)
    }

    pub fn unsupported(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, message)
    }

    pub fn table_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::TableNotFound, message)
    }

    pub fn namespace_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::NamespaceNotFound, message)
    }

    pub fn version_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::TableVersionNotFound,
            message,
        )
    }

    pub fn column_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::TableColumnNotFound,
            message,
        )
    }

    pub fn branch_not_found(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorCode::TableBranchNotFound,
            message,
        )
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        // Jobs are not a Lance Namespace object; "not found" for them is still a 404,
        // and TableNotFound is the closest code the spec has. Routes use `route_not_found`.
        Self::new(StatusCode::NOT_FOUND, ErrorCode::TableNotFound, message)
    }

    pub fn route_not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, ErrorCode::Unsupported, message)
    }

    pub fn method_not_allowed(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            message,
        )
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::CONFLICT,
            ErrorCode::ConcurrentModification,
            message,
        )
    }

    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, ErrorCode::InvalidTableState, message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthenticated,
            message,
        )
    }

    pub fn permission_denied(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorCode::PermissionDenied, message)
    }

    pub fn throttled(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::Throttling,
            message,
        )
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ServiceUnavailable,
            message,
        )
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Internal,
            message,
        )
    }

    /// The wire form: `{error, code, detail, instance}`.
    pub fn to_response(&self, instance: Option<&str>) -> ErrorResponse {
        let mut response = ErrorResponse::new(self.code.as_u32() as i32);
        response.error = Some(self.message.clone());
        response.detail = Some(format!("{}: {}", self.code, self.message));
        response.instance = instance.map(str::to_string);
        response
    }

    /// Maps an error raised by Lance (or by the namespace implementation it
    /// wraps) to the closest API error. `what` names the object for messages.
    pub fn from_lance(err: lance::Error, what: &str) -> Self {
        if let lance::Error::Namespace { source, .. } = &err
            && let Some(ns) = source.downcast_ref::<lance_namespace::NamespaceError>()
        {
            let status = status_for_code(ns.code());
            return Self::new(status, ns.code(), format!("{what}: {}", ns.message()));
        }
        match &err {
            lance::Error::DatasetNotFound { .. } | lance::Error::NotFound { .. } => {
                Self::table_not_found(format!("{what}: {}", first_line(&err)))
            }
            lance::Error::InvalidInput { .. } => {
                Self::invalid_input(format!("{what}: {}", first_line(&err)))
            }
            lance::Error::CommitConflict { .. }
            | lance::Error::RetryableCommitConflict { .. }
            | lance::Error::IncompatibleTransaction { .. }
            | lance::Error::TooMuchWriteContention { .. } => {
                Self::conflict(format!("{what}: {}", first_line(&err)))
            }
            _ => Self::internal(format!("{what}: {}", first_line(&err))),
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

/// Lance errors carry a source location after the first line; clients get the first.
pub fn first_line(err: &dyn std::fmt::Display) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    // Lance appends ", <file>:<line>:<col>" to messages; that is for logs, not clients.
    match line.rfind(", /") {
        Some(idx) => line[..idx].to_string(),
        None => line.to_string(),
    }
}

/// Faults of the machinery (store, queue, object store): retried or logged,
/// shown to clients as 500/503 without internals.
pub type Fault = anyhow::Error;
