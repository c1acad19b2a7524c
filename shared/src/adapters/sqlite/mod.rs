//! The ports on one machine: the job store and the task queue in one
//! SQLite file.

pub mod embedded;
pub mod queue;
pub mod store;

pub use embedded::EmbeddedDb;
pub use queue::SqliteQueue;
pub use store::SqliteJobStore;
