//! One test binary (each links all of Lance): modules by area. Every async
//! test runs on a multi-threaded runtime: tasks spawn CPU work.

mod api_errors;
mod api_jobs;
mod crash;
mod fuzz;
mod official_client;
mod queue_conformance;
mod reliability;
mod store_conformance;
mod template;
mod worker_runs;
