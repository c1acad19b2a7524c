//! The API Lambda function.

// Layout of the deeply nested request future needs more than the default 128.
#![recursion_limit = "256"]

use lambda_http::{Error, service_fn};
use lance_backfill::app::{bootstrap, config, telemetry};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let components = bootstrap::aws(&config::root()?).await?;
    let service = components.service(config::authenticator()?, config::submit_settings()?);
    lambda_http::run(service_fn(|request| {
        lance_backfill::http::lambda::handle(&service, request)
    }))
    .await
}
