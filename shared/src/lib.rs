//! lance-backfill: fill computed columns of Lance tables with jobs that run
//! as queued tasks, checkpoint their progress and commit in groups.
//!
//! The folders are the layers. [`model`] is the domain (a job, its spec and
//! plan, policies, the estimate) and depends on nothing else here;
//! [`ports`] are the traits the service needs from the world (the job
//! store by role, the task queue, event sinks, user-function runtimes) and
//! [`adapters`] implement them (AWS, one SQLite file, local processes).
//! [`submit`] turns a request into a job and its queued tasks; [`run`]
//! handles each task (compute, checkpoint, stage), commits the staged
//! files in groups, follows a table other writers change and ends the job
//! ([`run::lifecycle`] is the only code that changes a job's state).
//! [`http`] is the REST API in front of both, and [`app`] wires it all
//! into the Lambda functions and the local `serve`. docs/architecture.md
//! walks one request from HTTP to commit.

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
