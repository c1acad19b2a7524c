//! Entry points and wiring: settings from the environment, assembling the
//! service, logging, the local poller, the Lambda worker and `serve`.

pub mod bootstrap;
pub mod config;
pub mod local;
pub mod runner;
pub mod runtimes;
pub mod telemetry;
pub mod worker;
