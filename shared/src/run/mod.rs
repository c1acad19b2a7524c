//! Running jobs: the engine that handles each queue message (compute,
//! checkpoint, stage), the programs it compiles, the committer, a job's
//! life from creation to its end, and following a table other writers
//! change.

pub mod checkpoint;
pub mod commit;
pub mod computed;
pub mod engine;
pub mod lifecycle;
pub mod live;
pub mod payload;
pub mod results;
pub mod staging;
pub mod strays;
pub mod tasks;
