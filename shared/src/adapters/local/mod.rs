//! This machine: user functions in a pool of sandboxed Python processes,
//! job events to a JSON-lines file or a webhook.

pub mod pool;
pub mod sandbox;
pub mod sinks;

pub use sinks::{JsonLinesSink, WebhookSink};
