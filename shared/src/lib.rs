//! lance-backfill: fill computed columns of Lance tables with jobs that run
//! as queued tasks, checkpoint their progress and commit in groups.
//!
//! One path through the crate: [`api`] validates a request and [`plan`]s it
//! into tasks, [`store`] records the job and [`queue`] carries the tasks;
//! a worker hands each message to the [`engine`], which computes values
//! ([`computed`]), checkpoints them and stages fragment files; [`commit`]
//! publishes them as Lance versions. [`worker`] and [`runner`] are the two
//! ways messages reach the engine (Lambda's SQS event, the local poller).

pub mod api;
pub mod auth;
pub mod bootstrap;
pub mod commit;
pub mod computed;
pub mod config;
pub mod demo;
pub mod embedded;
pub mod engine;
pub mod error;
pub mod job;
pub mod local;
pub mod plan;
pub mod queue;
pub mod runner;
pub mod store;
pub mod table;
pub mod telemetry;
pub mod worker;
