//! What the service needs from the world, as traits: the job store (one
//! trait per role), the task queue and its messages, the sinks of job
//! events and the runtimes of user functions. Implemented in [`crate::adapters`].

pub mod events;
pub mod queue;
pub mod store;
pub mod udf;
