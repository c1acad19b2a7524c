//! Logging: JSON lines in Lambda (CloudWatch parses them), readable text on a terminal.

use tracing_subscriber::EnvFilter;

/// Our own events at info; Lance and the AWS SDK only when something is wrong.
const DEFAULT_FILTER: &str = "warn,lance_backfill=info,lance=error,lance_table=error,lance_core=error,lance_io=error,lance_file=error";

/// For commands with their own progress display (the demo): warnings only.
const QUIET_FILTER: &str =
    "warn,lance=error,lance_table=error,lance_core=error,lance_io=error,lance_file=error";

/// Logging for the services; `RUST_LOG` overrides the default filter.
pub fn init() {
    init_with(DEFAULT_FILTER)
}

/// Logging for an interactive command that shows its own progress.
pub fn init_quiet() {
    init_with(QUIET_FILTER)
}

fn init_with(default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = std::env::var(crate::app::config::env::LOG_FORMAT)
        .map(|v| v == "json")
        .unwrap_or_else(|_| std::env::var("AWS_LAMBDA_FUNCTION_NAME").is_ok());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.compact().try_init()
    };
    // A second init (tests) keeps the first subscriber.
    drop(result);
}
