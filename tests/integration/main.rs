//! One test binary (each links all of Lance): modules by area. Every async
//! test runs on a multi-threaded runtime: tasks spawn CPU work.

// Layout of the API handler's nested futures needs more than the default 128.
#![recursion_limit = "256"]

mod api_errors;
mod api_jobs;
mod authorization;
mod bounds;
mod cli;
mod crash;
mod dashboard;
mod events;
mod faults;
mod fuzz;
mod isolation;
mod lancedb_client;
mod lancedb_rust_client;
mod live;
mod maintained;
mod official_client;
mod python_client;
mod queue_conformance;
mod reliability;
mod scale;
mod store_conformance;
mod template;
mod udf;
mod worker_runs;
