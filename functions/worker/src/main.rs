//! The worker Lambda function: an SQS event in, partial batch failures out.

use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use lambda_runtime::{Error, LambdaEvent, service_fn};
use lance_backfill::app::worker::deadline_from_epoch_ms;
use lance_backfill::app::{bootstrap, config, telemetry};

#[tokio::main]
async fn main() -> Result<(), Error> {
    telemetry::init();
    let components = bootstrap::aws_worker(&config::root()?).await?;
    let worker = components.worker(config::engine()?, config::visibility()?);
    lambda_runtime::run(service_fn(|event: LambdaEvent<SqsEvent>| {
        let worker = &worker;
        async move {
            let deadline = deadline_from_epoch_ms(event.context.deadline);
            Ok::<SqsBatchResponse, Error>(
                worker.handle_sqs_event(event.payload, Some(deadline)).await,
            )
        }
    }))
    .await
}
