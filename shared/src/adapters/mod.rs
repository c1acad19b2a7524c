//! The ports on real systems: AWS (DynamoDB, SQS, EventBridge,
//! CloudWatch metrics, Lambda), one SQLite file on one machine, this
//! machine's processes and files, and HTTP model servers.

pub mod aws;
pub mod endpoint;
pub mod ipc;
pub mod local;
pub mod sqlite;
