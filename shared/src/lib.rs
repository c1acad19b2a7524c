//! lance-backfill: fill computed columns of Lance tables with jobs that run
//! as queued tasks, checkpoint their progress and commit in groups.
//!
//! One path through the crate: [`api`] reads a request and hands it to
//! [`submit`], which [`plan`]s it into tasks, records the job in the
//! [`store`] and puts its tasks on a [`queue`]. A worker hands each message
//! to the [`engine`], which computes values ([`computed`]), keeps
//! [`checkpoint`]s and stages fragment files ([`staging`]); the
//! [`commit`]ter publishes them as Lance versions and the [`lifecycle`]
//! ends the job. [`worker`] and [`runner`] are the two ways messages reach
//! the engine (Lambda's SQS event, the local poller). docs/architecture.md
//! walks the same path.

// The worker's future nests the engine's, the committer's and reconciling's
// (which plans SQL): proving it Send and Sync needs more than the default 128.
#![recursion_limit = "256"]

pub mod adapters;
pub mod app;
pub mod http;
pub mod model;
pub mod ports;
pub mod run;
pub mod submit;
