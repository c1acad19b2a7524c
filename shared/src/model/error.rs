//! The domain's errors: what went wrong, in terms a caller can act on. The
//! API maps them to HTTP statuses and Lance Namespace codes (`api::error`);
//! the engine maps them to queue dispositions (`engine::dispatch`).

use lance_namespace::ErrorCode;

/// What a request named that does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    Namespace,
    Table,
    Version,
    Column,
    Branch,
    Job,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The request is malformed, or names something that cannot work.
    #[error("{0}")]
    InvalidInput(String),
    /// Something this service does not do.
    #[error("{0}")]
    Unsupported(String),
    /// Something the request named does not exist.
    #[error("{message}")]
    NotFound { what: Missing, message: String },
    /// Another operation holds, or changed, what the request is about.
    #[error("{0}")]
    Conflict(String),
    /// The caller may not do this (decided by the API's policy and passed in).
    #[error("{0}")]
    Forbidden(String),
    /// The object is in a state that does not allow the operation.
    #[error("{0}")]
    InvalidState(String),
    /// No retry can fix it (a task whose data does not fit its expression).
    #[error("{0}")]
    Permanent(String),
    /// A dependency failed or is busy; the same call may succeed later.
    #[error("{message}")]
    Transient { message: String, throttled: bool },
    /// A fault of the service itself.
    #[error("{0}")]
    Internal(String),
    /// A job was recorded but its tasks could not be queued: it is marked
    /// FAILED, and the client should submit again (the message says so).
    #[error("{0}")]
    Unqueued(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn invalid_input(message: impl Into<String>) -> Self {
        Self::InvalidInput(message.into())
    }

    pub fn not_found(what: Missing, message: impl Into<String>) -> Self {
        Self::NotFound {
            what,
            message: message.into(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Self::Transient {
            message: message.into(),
            throttled: false,
        }
    }

    pub fn message(&self) -> String {
        self.to_string()
    }

    /// A request error seen by a worker: the job can never succeed.
    pub fn into_permanent(self) -> Self {
        match self {
            Self::Transient { .. }
            | Self::Internal(_)
            | Self::Permanent(_)
            | Self::Forbidden(_) => self,
            other => Self::Permanent(other.to_string()),
        }
    }

    /// Maps an error raised by Lance (or by the namespace implementation it
    /// wraps) to the closest domain error. `what` names the object.
    pub fn from_lance(err: lance::Error, what: &str) -> Self {
        if let lance::Error::Namespace { source, .. } = &err
            && let Some(ns) = source.downcast_ref::<lance_namespace::NamespaceError>()
        {
            return Self::from_namespace_code(ns.code(), format!("{what}: {}", ns.message()));
        }
        let message = format!("{what}: {}", first_line(&err));
        match &err {
            lance::Error::DatasetNotFound { .. } | lance::Error::NotFound { .. } => {
                Self::not_found(Missing::Table, message)
            }
            // A schema Lance refuses is the one a request described.
            lance::Error::InvalidInput { .. } | lance::Error::Schema { .. } => {
                Self::InvalidInput(message)
            }
            lance::Error::CommitConflict { .. }
            | lance::Error::RetryableCommitConflict { .. }
            | lance::Error::IncompatibleTransaction { .. }
            | lance::Error::TooMuchWriteContention { .. } => Self::Conflict(message),
            _ => Self::Internal(message),
        }
    }

    fn from_namespace_code(code: ErrorCode, message: String) -> Self {
        use ErrorCode::*;
        match code {
            NamespaceNotFound => Self::not_found(Missing::Namespace, message),
            TableNotFound => Self::not_found(Missing::Table, message),
            TableVersionNotFound => Self::not_found(Missing::Version, message),
            TableColumnNotFound => Self::not_found(Missing::Column, message),
            TableBranchNotFound => Self::not_found(Missing::Branch, message),
            TransactionNotFound => Self::not_found(Missing::Job, message),
            TableIndexNotFound | TableTagNotFound => Self::not_found(Missing::Table, message),
            Unsupported => Self::Unsupported(message),
            InvalidInput | TableSchemaValidationError => Self::InvalidInput(message),
            ConcurrentModification
            | NamespaceAlreadyExists
            | TableAlreadyExists
            | TableIndexAlreadyExists
            | TableTagAlreadyExists
            | TableBranchAlreadyExists
            | NamespaceNotEmpty => Self::Conflict(message),
            InvalidTableState => Self::InvalidState(message),
            ServiceUnavailable => Self::transient(message),
            Throttling => Self::Transient {
                message,
                throttled: true,
            },
            PermissionDenied | Unauthenticated | Internal => Self::Internal(message),
        }
    }
}

/// Lance errors carry a source location after the first line; callers get the first.
pub fn first_line(err: &dyn std::fmt::Display) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    // Lance appends ", <file>:<line>:<col>" to messages; that is for logs, not clients.
    match line.rfind(", /") {
        Some(idx) => line[..idx].to_string(),
        None => line.to_string(),
    }
}

/// Longest reason kept on a job or shown to a client.
pub const MAX_REASON_CHARS: usize = 2_000;

/// A reason fit to show outside the service: object-store URIs, ARNs,
/// filesystem paths and source locations are replaced by a placeholder
/// (they stay in the log), and the text is cut to [`MAX_REASON_CHARS`].
pub fn scrub(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REASON_CHARS));
    for (i, word) in text.split(' ').enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&scrub_word(word));
    }
    match out.char_indices().nth(MAX_REASON_CHARS) {
        Some((cut, _)) => format!("{}…", &out[..cut]),
        None => out,
    }
}

fn scrub_word(word: &str) -> String {
    let trimmed = word.trim_start_matches(['(', '\'', '"', '[']);
    let lead = &word[..word.len() - trimmed.len()];
    let tail_len = trimmed.len()
        - trimmed
            .trim_end_matches([')', '\'', '"', ']', ',', ';', '.', ':'])
            .len();
    let core = &trimmed[..trimmed.len() - tail_len];
    let tail = &trimmed[trimmed.len() - tail_len..];
    let placeholder = if core.contains("://") {
        Some("<uri>")
    } else if core.starts_with("arn:") {
        Some("<arn>")
    } else if core.contains(".rs:") {
        Some("<source>")
    } else if core.starts_with('/') && core.len() > 1 {
        Some("<path>")
    } else {
        None
    };
    match placeholder {
        Some(placeholder) => format!("{lead}{placeholder}{tail}"),
        None => word.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrubbed_reasons_keep_the_words_and_drop_the_locations() {
        assert_eq!(
            scrub("opening s3://bucket/t/items.lance at version 3: SlowDown"),
            "opening <uri> at version 3: SlowDown"
        );
        assert_eq!(
            scrub("queue arn:aws:sqs:us-east-1:123456789012:tasks refused (/root/x/y.rs:10:4)"),
            "queue <arn> refused (<source>)"
        );
        assert_eq!(
            scrub("file '/tmp/a/b.lance' missing"),
            "file '<path>' missing"
        );
        assert_eq!(
            scrub("rows 0..10 of fragment 3"),
            "rows 0..10 of fragment 3"
        );
        assert!(scrub(&"x ".repeat(5000)).chars().count() <= MAX_REASON_CHARS + 1);
    }
}
