//! The API Lambda function.

use lambda_http::{Error, service_fn};
use lance_backfill::{api, bootstrap, config, telemetry};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let components = bootstrap::aws(&config::root()?).await?;
    let settings = api::ApiSettings {
        inline_plan_limit: config::inline_plan_limit()?,
        manifests: config::manifests(),
    };
    let service = components.service(config::authenticator()?, settings);
    lambda_http::run(service_fn(|request| api::lambda::handle(&service, request))).await
}
