//! The ports on AWS: the job store on DynamoDB, the task queue on SQS, job
//! events on EventBridge and as CloudWatch metrics, user functions on Lambda.

pub mod dynamodb;
pub mod eventbridge;
pub mod lambda;
pub mod metrics;
pub mod sqs;

pub use dynamodb::DynamoJobStore;
pub use eventbridge::{EventBridgeSink, detail_type};
pub use metrics::{METRICS_NAMESPACE, MetricsSink};
pub use sqs::SqsQueue;
