//! Logging: JSON lines in Lambda (CloudWatch parses them), readable text on a terminal.

use tracing_subscriber::EnvFilter;

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new("info,lance=warn,aws_config=warn,aws_smithy_runtime=warn")
    });
    let json = std::env::var(crate::config::env::LOG_FORMAT)
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
